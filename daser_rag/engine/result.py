"""Pack what a request did into a GenerationResult, reporting only what really happened."""

from __future__ import annotations

from daser_rag.blend.fusion import FusionResult
from daser_rag.engine.decode import TextEmitter
from daser_rag.params import GenerationParams
from daser_rag.types import GenerationResult, PrefillInfo, Timings


def pack_result(fused: FusionResult, info: PrefillInfo, emitter: TextEmitter, finish: str, timings: Timings,
                params: GenerationParams, default_ratio: float | str) -> GenerationResult:
    """mode "blend" only when KV was actually reused: a stored chunk hit, or chunk KV computed
    apart from the rest and fused in (reused_tokens > 0). With no context chunks, use_cache=False,
    or only misses that were computed in place at their exact positions (0 hits, 0 reused
    tokens), the prompt's KV is exactly full prefill's, and the result says "full"."""
    reused = params.use_cache and bool(info["keys"]) and (info["hits"] > 0 or fused.reused_tokens > 0)
    return GenerationResult(
        text=emitter.text, token_ids=list(emitter.ids),
        prompt_tokens=fused.context_tokens + fused.query_tokens, context_tokens=fused.context_tokens,
        query_tokens=fused.query_tokens, exact_tokens=fused.exact_tokens, reused_tokens=fused.reused_tokens,
        recomputed_tokens=fused.recomputed_tokens, cache_hits=info["hits"], cache_misses=info["misses"],
        mode="blend" if reused else "full",
        recompute_ratio=(params.recompute_ratio if params.recompute_ratio is not None else default_ratio)
        if reused else 1.0,
        selector=fused.selector if reused else "none", finish_reason=finish, timings=timings,
        chunk_keys=info["keys"], calibrated=reused and fused.calibrated,
    )
