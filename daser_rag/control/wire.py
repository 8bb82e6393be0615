"""What travels to a vLLM instance with each request, and how an instance is configured.

The daser vLLM connector (integrations/vllm-daser) reads a *plan* from the request's
`kv_transfer_params`: an ordered list of segments `[store key, num_tokens(, save key|null)]`
tiling the start of the prompt (see vllm_daser/plan.py for the reading side). This module is
the writing side, in the core so that a control plane builds plans without vLLM installed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from daser_rag.blend.registry import NameView, Signal

PLAN_FIELD = "daser"
"""Key of the daser plan inside `kv_transfer_params`."""

CONNECTOR_NAME = "DaserKVConnector"
"""The connector's registered name (vllm_daser's plugin registers it under this name)."""

OFF_PARAMS: dict[str, Any] = {PLAN_FIELD: {"off": True}}
"""`kv_transfer_params` for a request that must bypass the connector (full prefill baselines)."""

Recompute = tuple[float, int] | tuple[float, int, str]


def engine_signals() -> frozenset[Signal]:
    """What the connector's worker can gather inside vLLM (vllm_daser/blend.py): where each
    re-positioned chunk starts (from the plan) and the value deviation at the check layer. Not
    the question's look-ahead attention: vLLM computes the question only after the repair."""
    from daser_rag.blend.registry import Signal

    return frozenset({Signal.CHUNK_STARTS, Signal.DEVIATION})


def in_engine_selectors() -> NameView:
    """Selectors that run inside vLLM: a live view of daser's selector registry, every selector
    that needs only `engine_signals()`."""
    from daser_rag.blend.registry import selectors_using_only

    return selectors_using_only(engine_signals())


def plan_params(segments: Sequence[Sequence[Any]], *, save: bool = True,
                recompute: Recompute | None = None, prefetch_id: str | None = None,
                scales: tuple[Sequence[Sequence[float]], Sequence[Sequence[float]]] | None = None,
                bias: tuple[Sequence[int], bytes, bytes] | None = None,
                token_map: str | None = None) -> dict[str, Any]:
    """The `kv_transfer_params` value that carries a plan: segments are (key, n) or (key, n, save_key).
    `prefetch_id`: the prefetch message that pinned this request's entries on the instance (its
    pin ends once the request has loaded them). `scales`: a calibration's (key, value) factors
    [layers][kv_heads], applied by the connector to every re-positioned segment it loads
    (daser_rag/calibration: exp of the stored log-scales). `bias`: its (shape [layers, kv_heads,
    head_dim], key bias, value bias) as little-endian float32 bytes, added after the scales (the
    key bias rotated to each token's position); base64 in the plan, about 31 KB each for
    SmolLM2-135M, where lists of numbers would be ~4x that. `token_map`: the digest of a
    calibration with a token map, published in the store directory
    (`daser_rag.calibration.storage.publish`): the connector loads the map from there and applies
    it before the scales."""
    out: list[list[Any]] = []
    for s in segments:
        out.append([s[0], int(s[1])] if len(s) == 2 else [s[0], int(s[1]), s[2]])
    plan: dict[str, Any] = {"segments": out, "save": save}
    if recompute is not None:
        plan["recompute"] = {"ratio": float(recompute[0]), "check_layer": int(recompute[1]),
                             "selector": recompute[2] if len(recompute) > 2 else "deviation"}
    if prefetch_id is not None:
        plan["prefetch_id"] = prefetch_id
    if scales is not None:
        plan["scales"] = {"k": [[float(x) for x in row] for row in scales[0]],
                          "v": [[float(x) for x in row] for row in scales[1]]}
    if bias is not None:
        plan["bias"] = encode_bias(*bias)
    if token_map is not None:
        plan["token_map"] = token_map
    return {PLAN_FIELD: plan}


def encode_bias(shape: Sequence[int], key: bytes, value: bytes) -> dict[str, Any]:
    """A plan's `bias` entry; vllm_daser/plan.py `_parse_bias` is the reading side."""
    import base64

    n = 4
    for d in shape:
        n *= int(d)
    if len(key) != n or len(value) != n:
        raise ValueError(f"bias bytes ({len(key)}, {len(value)}) do not hold float32 {list(shape)} ({n} bytes)")
    return {"shape": [int(d) for d in shape], "k": base64.b64encode(key).decode("ascii"),
            "v": base64.b64encode(value).decode("ascii")}


# -- control messages (vllm_daser/prefetch.py): one-token requests the connector acts on ---------------
def prefetch_params(request_id: str, keys: Sequence[str], ttl_s: float | None = None) -> dict[str, Any]:
    """`kv_transfer_params` of a prefetch message: the instance's connector loads `keys` into its
    host tier and pins them until request `request_id` (whose plan names it) has loaded them."""
    msg: dict[str, Any] = {"id": request_id, "keys": list(keys)}
    if ttl_s is not None:
        msg["ttl_s"] = float(ttl_s)
    return {PLAN_FIELD: {"prefetch": msg}}


def release_params(request_id: str) -> dict[str, Any]:
    """`kv_transfer_params` of a release message: end the pin of a request that will not run there."""
    return {PLAN_FIELD: {"release": request_id}}


STATS_PARAMS: dict[str, Any] = {PLAN_FIELD: {"stats": True}}
"""`kv_transfer_params` of a stats message: a non-streamed answer carries the connector's worker
stats (host tier, store hits per tier, prefetch pins) in `kv_transfer_params["daser_stats"]`."""

STATS_FIELD = "daser_stats"


def connector_extra_config(
    store_dir: str | Path,
    *,
    fingerprint: str | None = None,
    save: bool = True,
    block_fallback: bool = True,
    codec: str = "bf16",
    host_bytes: int = 1 << 30,
    redis_url: str | None = None,
    redis_namespace: str | None = None,
    prefetch_max_requests: int | None = None,
    prefetch_max_bytes: int | None = None,
    prefetch_ttl_s: float | None = None,
    calibration_dir: str | Path | None = None,
) -> dict[str, Any]:
    """`kv_connector_extra_config` for DaserKVConnector (also usable as JSON for `vllm serve`).

    `fingerprint`: the model fingerprint of whoever plans requests (the control plane's
    `ModelFiles.fingerprint`); it namespaces the block keys of plan-less prompts.
    `redis_url`: share KV (and invalidations) with every vLLM instance and daser process on the
    same Redis; its key namespace is `redis_namespace`, by default derived from `fingerprint`
    exactly as daser's own processes derive it (`daser_rag.kv.shared.default_namespace`).
    `prefetch_*`: the bounds of the connector's prefetch pins (None: the settings table's defaults,
    `vllm.prefetch_*`). `calibration_dir`: the store directory of the control plane, where it
    publishes the calibrations its plans name by digest (`calibration/storage.py` `publish`;
    None: `store_dir`, which must then be that directory or a copy of it).
    """
    out: dict[str, Any] = {"store_dir": str(store_dir), "save": save, "block_fallback": block_fallback,
                           "codec": codec, "host_bytes": int(host_bytes)}
    if fingerprint:
        out["fingerprint"] = fingerprint
    if redis_url:
        if not (fingerprint or redis_namespace):
            raise ValueError("redis_url needs fingerprint= (the planner's fingerprint) or redis_namespace=, "
                             "so vLLM reads the keys daser's processes write")
        out["redis_url"] = redis_url
        if redis_namespace:
            out["redis_namespace"] = redis_namespace
    if calibration_dir is not None:
        out["calibration_dir"] = str(calibration_dir)
    for name, value in (("prefetch_max_requests", prefetch_max_requests), ("prefetch_max_bytes", prefetch_max_bytes),
                        ("prefetch_ttl_s", prefetch_ttl_s)):
        if value is not None:
            out[name] = value
    return out


def kv_transfer_dict(store_dir: str | Path, *, module_path: bool = False, **kwargs: Any) -> dict[str, Any]:
    """The `--kv-transfer-config` JSON object for `vllm serve` (see `connector_extra_config`).

    The connector is found by name through vllm-daser's vLLM plugin; `module_path=True` adds
    `kv_connector_module_path` for a vLLM where the plugin is not installed.
    """
    out: dict[str, Any] = {"kv_connector": CONNECTOR_NAME, "kv_role": "kv_both",
                           "kv_load_failure_policy": "recompute",
                           "kv_connector_extra_config": connector_extra_config(store_dir, **kwargs)}
    if module_path:
        out["kv_connector_module_path"] = "vllm_daser.connector"
    return out


__all__ = ["CONNECTOR_NAME", "engine_signals", "in_engine_selectors", "OFF_PARAMS", "PLAN_FIELD", "STATS_FIELD",
           "STATS_PARAMS", "connector_extra_config", "kv_transfer_dict", "plan_params", "prefetch_params",
           "release_params"]
