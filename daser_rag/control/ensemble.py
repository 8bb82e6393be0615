"""A primer ensemble's chunk entry from its parts: the one step of a primed prefill that is not a
vLLM request.

An ensemble calibration (`Calibration.primer` [K, P]) stores each reused chunk as the mean of
its K/V computed after each of K primers. vLLM computes each part (one request per primer,
saved by the connector under the member's key, `Planner.primed_prefill_plan`); the mean needs
no model, so whoever holds the shared store makes it: the control plane (`VllmEngine`) or a
planning client (`vllm_daser.VllmRagPrompter.complete`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from daser_rag.kv.chunk_kv import mean_kv
from daser_rag.kv.codecs import decode

if TYPE_CHECKING:
    from daser_rag.control.planner import PrefillPlan
    from daser_rag.kv.store import KVStore

log = logging.getLogger(__name__)


def store_mean(store: KVStore, plan: PrefillPlan) -> bool:
    """Store the mean of `plan.parts` (already stored) under `plan.key`, in the first part's codec.
    True when the store holds the entry afterwards; False, with a warning, when a part is missing
    (the request that names the entry then computes that chunk, as for any missing segment)."""
    if store.contains(plan.key):
        return True
    encoded = [store.get_encoded(p.key) for p in plan.parts]
    stored = [e for e in encoded if e is not None]
    if not stored or len(stored) < len(encoded):
        log.warning("primer ensemble entry %s not made: %d of its %d parts are not stored", plan.key,
                    len(encoded) - len(stored), len(encoded))
        return False
    try:
        mean = mean_kv([decode(e) for e in stored], plan.key)
    except ValueError as exc:  # parts of different chunks or places: never averaged into an entry
        log.warning("primer ensemble entry %s not made: %s", plan.key, exc)
        return False
    store.put(mean, codec=stored[0].codec)
    return store.contains(plan.key)


__all__ = ["store_mean"]
