"""Re-rotated keys must equal keys computed at the new positions (fp32, ~1e-3)."""

import torch

from daser_rag.model.rope import rerotate_keys


def _keys_at(runner, ids: torch.Tensor, start: int) -> list[torch.Tensor]:
    """Per-layer keys of `ids` run as a standalone sequence at positions [start, start+T)."""
    positions = torch.arange(start, start + ids.shape[0])
    cos, sin = runner.rope(positions)
    h = runner.embed(ids)
    keys = []
    with torch.inference_mode():
        for i in range(runner.spec.num_layers):
            _, q, k, v = runner.qkv(i, h, cos, sin)
            keys.append(k.clone())
            h = runner.attend_and_mlp(i, h, q, k, v, None, causal=True)
    return keys


def test_rerotation_matches_direct_computation(lm):
    from daser_rag.model.runner import LayerRunner

    runner = LayerRunner(lm)
    ids = torch.tensor(lm.tokenizer("The \"pass\" statement is a null operation; nothing happens.",
                                    add_special_tokens=False)["input_ids"])
    base = _keys_at(runner, ids, 0)
    for delta in (7, 513, 3000):
        moved = _keys_at(runner, ids, delta)
        worst = max(
            (rerotate_keys(b, delta, runner.inv_freq) - m).abs().max().item() for b, m in zip(base, moved)
        )
        scale = max(m.abs().max().item() for m in moved)
        assert worst < 1e-3 * max(1.0, scale / 10), f"delta={delta}: max abs error {worst} (key scale {scale})"


def test_rerotation_round_trip_and_per_token_delta(lm):
    from daser_rag.model.runner import LayerRunner

    runner = LayerRunner(lm)
    k = torch.randn(3, 50, runner.head_dim)
    back = rerotate_keys(rerotate_keys(k, 1234, runner.inv_freq), -1234, runner.inv_freq)
    assert (back - k).abs().max().item() < 1e-5
    per_token = rerotate_keys(k, torch.full((50,), 17), runner.inv_freq)
    assert torch.allclose(per_token, rerotate_keys(k, 17, runner.inv_freq), atol=1e-6)
    assert rerotate_keys(k, 0, runner.inv_freq) is k
