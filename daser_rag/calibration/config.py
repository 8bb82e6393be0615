"""What a calibration run fits and on how much data (torch-free: the CLI builds its options from it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from daser_rag.params import DEFAULT_RECOMPUTE_RATIO, DEFAULT_SELECTOR
from daser_rag.settings import CALIBRATED_SELECTOR

MAX_PRIMERS = 8
"""The most primers a calibration may average a chunk over (each costs one more chunk pass at index
time)."""

MAX_PRIMER_TOKENS = 2048
"""The longest primer a calibration may carry (fitted here, checked on every file by `adapter.py`):
more costs index time and measured no better (1,024 tokens: held-out KL 0.0286 against 0.0247 at 512)."""

if TYPE_CHECKING:
    from daser_rag.blend.config import BlendConfig


@dataclass(frozen=True)
class CalibrationConfig:
    """Defaults are what measured best on held-out documents (docs/calibration.md): the token
    map alone (no KL stage, no link tokens), checked at the repair requests get with it
    (chunk_heads r = 0.15, `blend.calibrated_selector`), 16-token answers in the loss."""

    link_tokens: int = 0
    """Learned link tokens between context and question (0: none)."""
    scales: bool | None = None
    """Learn the per-layer, per-head key/value scales on reused context by KL (None: only
    without a token map; on top of one they overfit, below)."""
    biases: bool | None = None
    """Learn per-layer, per-head key/value biases on reused context too ([head_dim] each; the key
    bias before RoPE; None: only without a token map). Without a map, the calibration's
    held-out check on the Language Reference, fitted at hybrid r = 0.15: KL 0.0505 (none) ->
    0.0360 (scales) -> 0.0321 (scales + biases). On top of the map they overfit the 16
    training prompts: 0.0236 (map) -> 0.0281 (map, then scales + biases); at r = 0 0.0652 -> 0.0737."""
    token_map: bool = True
    """Fit a token map (`token_map.py`): a per-token affine correction of each reused token's
    K/V from its own stored K/V, by ridge regression on full prefill's K/V over every reused
    token of the training prompts. Held-out (above; ridge 1e-2): r = 0.15 0.0505 -> 0.0236, r = 0
    0.2024 -> 0.0652."""
    token_map_ridge: float = 1.0
    """Ridge penalty, relative to each layer and head's mean feature energy. On the calibration's
    own held-out prompts it hardly matters (1e-3 / 1e-2 / 1e-1: r = 0 KL 0.0656 / 0.0652 /
    0.0655); on the standard-library grid, calibrated on other documents of that corpus, 1.0
    generalised better than 1e-2 (r = 0 0.0634 -> 0.0592, hybrid r = 0.15 0.0305 -> 0.0282)."""
    primer_tokens: int = 512
    """Compute every reused chunk after a primer of this many tokens (0: none): the beginning of
    the training documents' chunks, stored in the calibration (`adapter.py`). Held-out r = 0 KL on
    the Language Reference: 0.2024 (none) -> 0.0516 (128 tokens) -> 0.0357 (512); with the token
    map fitted on primed KV 0.0704 -> 0.0331 -> 0.0247. A generic paragraph does much less
    (128 tokens: 0.1324 / 0.062): the primer should look like the documents served."""
    primers: int = 4
    """How many primers each reused chunk is computed after, its K/V averaged over them (the
    first `primer_tokens` of as many training prompts' chunks). The mean over preceding texts is
    the best fixed guess of a chunk's state when what precedes it is unknown: held-out r = 0 KL
    on the Language Reference probe, with the map, 0.0247 (1 primer) -> 0.0197 (2) -> 0.0169 (4),
    at K times the primed index-time cost (`benchmarks/probes/chunk_primer.py`, avg512); on the
    60-prompt held-out grid 4 primers beat 1 in every mode (docs/calibration.md). The vLLM
    control plane averages them too (control/ensemble.py)."""
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
    fit_selector: str | None = None
    """The selection replayed at `fit_share` (None: what requests get with this calibration:
    `blend.calibrated_selector` with a token map, else `blend.selector`)."""
    min_gain: float = 0.05
    """Accept only if held-out mean KL drops by at least this share."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("scales", "biases"):  # frozen: resolve the defaults in place
            if getattr(self, name) is None:
                object.__setattr__(self, name, not self.token_map)
        if self.fit_selector is None:
            object.__setattr__(self, "fit_selector",
                               CALIBRATED_SELECTOR.default if self.token_map and CALIBRATED_SELECTOR.default
                               else DEFAULT_SELECTOR)
        if self.link_tokens < 0 or self.steps < 0 or self.batch < 1 or self.train_prompts < 1:
            raise ValueError("link_tokens and steps must be >= 0, batch and train_prompts >= 1")
        if not 0.0 < self.held_out_share < 1.0 or self.held_out_prompts < 1:
            raise ValueError("held_out_share must be in (0, 1) and held_out_prompts >= 1")
        if (not self.scales and not self.link_tokens and not self.biases and not self.token_map
                and not self.primer_tokens):
            raise ValueError("nothing to calibrate: scales, biases and token map off, no primer and no link tokens")
        if not 0 <= self.primer_tokens <= MAX_PRIMER_TOKENS:
            raise ValueError(f"primer_tokens must be in [0, {MAX_PRIMER_TOKENS}], got {self.primer_tokens}")
        if not isinstance(self.primers, int) or not 1 <= self.primers <= MAX_PRIMERS:
            raise ValueError(f"primers must be in [1, {MAX_PRIMERS}], got {self.primers!r}")
        if self.token_map_ridge < 0:
            raise ValueError(f"token_map_ridge must be >= 0, got {self.token_map_ridge}")
        if not 0.0 <= self.fit_share < 1.0:
            raise ValueError(f"fit_share must be in [0, 1) (at 1 nothing is reused), got {self.fit_share}")
        if self.loss_question_tokens < 1 or self.answer_tokens < 1:
            raise ValueError("loss_question_tokens and answer_tokens must be >= 1")

    def blend(self) -> BlendConfig | None:
        """The selection the student replays (None: r = 0)."""
        from daser_rag.blend.config import BlendConfig

        selector = self.fit_selector or DEFAULT_SELECTOR
        return BlendConfig(recompute_ratio=self.fit_share, selector=selector) if self.fit_share > 0 else None
