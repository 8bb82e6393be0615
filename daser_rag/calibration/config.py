"""What a calibration run fits and on how much data (torch-free: the CLI builds its options from it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from daser_rag.params import DEFAULT_RECOMPUTE_RATIO, DEFAULT_SELECTOR

if TYPE_CHECKING:
    from daser_rag.blend.config import BlendConfig


@dataclass(frozen=True)
class CalibrationConfig:
    """Defaults are what measured best on held-out documents (docs/calibration.md): scales and
    biases, no link tokens, fitted at the engine's default repair (hybrid, r = 0.15), 16-token answers in the loss."""

    link_tokens: int = 0
    """Learned link tokens between context and question (0: scales only, the APE-style part)."""
    scales: bool = True
    """Learn the per-layer, per-head key/value scales on reused context."""
    biases: bool = True
    """Learn per-layer, per-head key/value biases on reused context too ([head_dim] each; the key
    bias before RoPE). The calibration's held-out check on the Language Reference, fitted at
    hybrid r = 0.15: KL 0.0505 (none) -> 0.0360 (scales) -> 0.0321 (scales + biases)."""
    steps: int = 40
    batch: int = 4
    lr_scale: float = 0.05
    lr_link: float = 0.01
    lr_bias: float = 0.01
    train_prompts: int = 16
    held_out_prompts: int = 12
    held_out_share: float = 0.3
    chunks_per_prompt: int = 4
    chunks_per_document: int = 2
    answer_tokens: int = 16
    loss_question_tokens: int = 4
    """The loss covers this many last question positions (1: the answer only) and the answer."""
    fit_share: float = DEFAULT_RECOMPUTE_RATIO if isinstance(DEFAULT_RECOMPUTE_RATIO, float) else 0.15
    """The recompute share the calibration is fitted at (and, with `Calibration.applies_to`, the
    regime it serves): 0 fits full reuse; > 0 replays the selection `fit_selector` makes at that
    share, so the scales suit stale KV beside repaired KV. Default: the engine's default share."""
    fit_selector: str = DEFAULT_SELECTOR
    min_gain: float = 0.05
    """Accept only if held-out mean KL drops by at least this share."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.link_tokens < 0 or self.steps < 0 or self.batch < 1 or self.train_prompts < 1:
            raise ValueError("link_tokens and steps must be >= 0, batch and train_prompts >= 1")
        if not 0.0 < self.held_out_share < 1.0 or self.held_out_prompts < 1:
            raise ValueError("held_out_share must be in (0, 1) and held_out_prompts >= 1")
        if not self.scales and not self.link_tokens and not self.biases:
            raise ValueError("nothing to calibrate: scales and biases off and no link tokens")
        if not 0.0 <= self.fit_share < 1.0:
            raise ValueError(f"fit_share must be in [0, 1) (at 1 nothing is reused), got {self.fit_share}")
        if self.loss_question_tokens < 1 or self.answer_tokens < 1:
            raise ValueError("loss_question_tokens and answer_tokens must be >= 1")

    def blend(self) -> BlendConfig | None:
        """The selection the student replays (None: r = 0)."""
        from daser_rag.blend.config import BlendConfig

        return BlendConfig(recompute_ratio=self.fit_share, selector=self.fit_selector) if self.fit_share > 0 else None
