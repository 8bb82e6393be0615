"""Build vLLM requests whose KV the daser connector can supply.

Three routes, all producing the exact token sequence daser's own full prefill would see
(`CacheAwareGenerator.prompt_ids`), so "with and without the connector" is a fair comparison:

- reuse (full reuse, r=0, entirely inside vLLM): a plan of the system prefix and each chunk's
  own entry (computed once after the system prefix, by vLLM or by daser's ingestion), in any
  order. The connector re-rotates the keys to the chunk's place and vLLM computes only the
  question. Chunks not stored yet come with `prefill` requests ([system prefix][chunk]) that
  make vLLM compute and save them; where exact prefix-tree nodes are stored they are used
  instead of re-positioned chunks.

- exact: a plan of prefix-tree keys (system prefix, then the node of every chunk *after the
  chunks before it*). Whatever prefix of that path is stored is loaded bit-for-bit; vLLM
  computes the rest and the connector saves it, so the next request with the same leading
  documents hits. No approximation is involved.
- blended: daser fuses the stored chunk KV outside vLLM (RoPE re-positioning + CacheBlend
  selective recompute, `CacheAwareGenerator.prefill`), stages the fused context KV in the
  shared store under a key of its own, and the request's plan points at that one entry.
  vLLM loads it as an "external prefix hit" and computes only the question. The request is
  salted (`cache_salt`) so the approximate blocks never enter vLLM's prefix cache under
  plain token hashes, and the connector does not save KV computed on top of it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from daser_rag.api import ContextItem
from daser_rag.context import SHARED_TENANT
from daser_rag.control.planner import Planner, PrefillPlan, ReusePlan
from daser_rag.control.wire import PLAN_FIELD, connector_extra_config, kv_transfer_dict
from daser_rag.errors import InvalidInputError
from daser_rag.engine.generator import CacheAwareGenerator
from daser_rag.kv.chunk_kv import ChunkKV
from daser_rag.kv.keys import prefix_key
from daser_rag.model.loader import LoadedModel, converted_gguf_dir
from vllm_daser.plan import IN_ENGINE_SELECTORS, plan_params
from vllm_daser.plugin import CONNECTOR_NAME

CONNECTOR_CLASS = CONNECTOR_NAME
__all__ = ["CONNECTOR_CLASS", "VllmRagPrompter", "VllmRequest", "connector_extra_config", "kv_transfer_config",
           "kv_transfer_dict", "vllm_model_dir"]


def kv_transfer_config(store_dir: str | Path, **kwargs: Any) -> Any:
    """A vLLM `KVTransferConfig` that loads DaserKVConnector (see `kv_transfer_dict`)."""
    from vllm.config import KVTransferConfig

    return KVTransferConfig(**kv_transfer_dict(store_dir, **kwargs))


def vllm_model_dir(lm: LoadedModel) -> Path:
    """An HF directory vLLM can serve holding the very weights `lm` was loaded from."""
    src = Path(lm.source)
    if src.is_dir():
        return src
    converted = converted_gguf_dir(src)
    if converted is None:
        raise InvalidInputError(f"{src} has no converted safetensors copy yet; load it once with "
                                "daser_rag.model.loader.load_model to create one")
    return converted


@dataclass
class VllmRequest:
    """A prompt for `LLM.generate` plus the connector instructions that go with it."""

    prompt: dict[str, Any]  # a vllm.inputs.TokensPrompt (a TypedDict)
    kv_transfer_params: dict[str, Any]
    mode: str  # "exact" | "blend"
    context_tokens: int
    prep_s: float = 0.0  # time spent outside vLLM (fusion, staging); part of TTFT
    info: dict[str, Any] = field(default_factory=dict)
    prefill: list[VllmRequest] = field(default_factory=list)
    """Requests to run first (max_tokens=1): they make vLLM compute and save missing chunks."""
    ensembles: list[PrefillPlan] = field(default_factory=list)
    """Primer-ensemble entries to make after `prefill` ran and before this request runs (the mean
    of several of the prefill requests' chunks): `VllmRagPrompter.complete`."""

    def sampling_params(self, base: Any = None, **kwargs: Any) -> Any:
        """`base` (or SamplingParams(**kwargs)) with this request's kv_transfer_params added."""
        from vllm import SamplingParams

        sp = base.clone() if base is not None else SamplingParams(**kwargs)
        extra = dict(sp.extra_args or {})
        extra["kv_transfer_params"] = {**extra.get("kv_transfer_params", {}), **self.kv_transfer_params}
        sp.extra_args = extra
        return sp

    def openai_body(self) -> dict[str, Any]:
        """Fields to merge into a `/v1/completions` request body for `vllm serve`."""
        body: dict[str, Any] = {"prompt": self.prompt["prompt_token_ids"],
                                "kv_transfer_params": self.kv_transfer_params}
        if "cache_salt" in self.prompt:
            body["cache_salt"] = self.prompt["cache_salt"]
        return body


class VllmRagPrompter:
    """Turns (question, contexts) into `VllmRequest`s with the weight-free control-plane planner.

    Built from a `daser_rag.control.planner.Planner` (tokenizer, fingerprint and the shared
    store: no model weights, e.g. `Planner.from_files(ModelFiles(path), store)`), or from a daser
    generator (then `blended()`, which fuses KV outside vLLM, is available too). The store must be
    the one the connector was configured with, and the fingerprint must describe the weights and
    dtype vLLM serves (bf16 by default).
    """

    def __init__(self, source: CacheAwareGenerator | Planner, *, codec: str = "bf16") -> None:
        if isinstance(source, Planner):
            self.gen: CacheAwareGenerator | None = None
            self.planner = source
        else:
            self.gen = source
            self.planner = Planner.for_generator(source)
        self.codec = codec

    @staticmethod
    def _request(plan: ReusePlan, mode: str, prep_s: float, info: dict[str, Any]) -> VllmRequest:
        prompt: dict[str, Any] = {"prompt_token_ids": plan.prompt_ids}
        if plan.cache_salt is not None:
            prompt["cache_salt"] = plan.cache_salt
        n_pre = plan.context_tokens - sum(c.num_tokens for c in plan.chunks)
        runs = [q for p in plan.prefill for q in (p.parts or (p,))]  # an ensemble's parts are requests
        prefill = [VllmRequest({"prompt_token_ids": p.prompt_ids}, p.kv_transfer_params, "prefill", n_pre)
                   for p in runs]
        return VllmRequest(prompt, plan.kv_transfer_params, mode, plan.context_tokens, prep_s, info, prefill,
                           [p for p in plan.prefill if p.parts])

    def complete(self, request: VllmRequest) -> int:
        """After `request.prefill` ran: store its primer-ensemble entries (each the mean of its
        parts, `daser_rag.control.ensemble`). Returns how many the store holds; one whose parts
        vLLM did not save is left missing (a warning), and the request then computes that chunk."""
        from daser_rag.control.ensemble import store_mean

        return sum(store_mean(self.planner.store, pf) for pf in request.ensembles)

    def exact(self, question: str, contexts: Sequence[ContextItem] | None = None, *, tenant: str = SHARED_TENANT) -> VllmRequest:
        """Prefix-tree plan: exact reuse of whatever leading part of this chunk path is stored."""
        t0 = time.perf_counter()
        plan = self.planner.exact(question, contexts, tenant=tenant)
        info = {"node_keys": [s[0] for s in plan.kv_transfer_params[PLAN_FIELD]["segments"]]}
        return self._request(plan, "exact", time.perf_counter() - t0, info)

    def reuse(self, question: str, contexts: Sequence[ContextItem] | None = None, *, tenant: str = SHARED_TENANT,
              exact_nodes: bool = True, recompute_ratio: float = 0.0, check_layer: int = 1,
              selector: str = "chunk_heads", calibration: Any = None) -> VllmRequest:
        """Full reuse (r=0) inside vLLM: every stored context token is an external hit
        (`Planner.reuse` says how). Missing chunk entries come back as `prefill` requests: run
        them first and the main request loads every chunk.

        `recompute_ratio > 0` (needs DASER_VLLM_BLEND=1 in vLLM's environment): the connector's
        worker recomputes that share of the re-positioned tokens with vLLM's weights after loading
        them, chosen by `selector`: "chunk_heads" (default: the first tokens of every chunk, no
        check pass; 2.19x vs vLLM prefix caching against 2.05x for deviation on the vllm_serve
        trace, docs/vllm.md) or "deviation" (CacheBlend, at `check_layer`), see blend.py.
        `calibration` (a `Calibration` without link tokens, docs/calibration.md): the connector
        places the re-positioned segments it loads with its scales, biases and token map, as
        daser's own fusion does; with a primer they are the chunks' primed entries (missing ones
        come back as `prefill` requests over [system prefix, primer, chunk]). With a primer
        ensemble those are one request per primer, and `complete(request)` must run after them
        to store each chunk's mean (`VllmRequest.ensembles`).
        """
        if selector not in IN_ENGINE_SELECTORS:
            raise InvalidInputError(f"in-engine selector must be one of {IN_ENGINE_SELECTORS}, got {selector!r}")
        t0 = time.perf_counter()
        plan = self.planner.reuse(question, contexts, tenant=tenant, exact_nodes=exact_nodes,
                                  recompute=(float(recompute_ratio), int(check_layer), selector),
                                  calibration=calibration)
        info = {"segments": len(plan.chunks) + 1, "exact_chunks": plan.exact_chunks, "calibrated": plan.calibrated}
        return self._request(plan, "reuse", time.perf_counter() - t0, info)

    def _generator(self) -> CacheAwareGenerator:
        if self.gen is None:
            raise InvalidInputError("blended reuse fuses KV outside vLLM and needs a daser generator; this "
                                    "prompter was built from a weight-free Planner (use reuse() with recompute)")
        return self.gen

    def _pieces(self, contexts: Sequence[ContextItem] | None, tenant: str) -> list[Any]:
        return self.planner.resolve(contexts, tenant)

    def blend_key(self, pieces: Sequence[Any], ratio: float, tenant: str) -> str:
        gen = self._generator()
        h = hashlib.blake2b(digest_size=16)
        h.update(b"daser-vllm-blend-v1\0")
        h.update(prefix_key(gen.fingerprint, gen.prompt.prefix_ids, tenant).encode())
        h.update(f"|{ratio}|{gen.blend!r}|{self.codec}".encode())
        for p in pieces:
            h.update(b"\0" + p.key.encode())
        return "x" + h.hexdigest()

    def blended(
        self,
        question: str,
        contexts: Sequence[ContextItem] | None = None,
        *,
        recompute_ratio: float | None = None,
        tenant: str = SHARED_TENANT,
    ) -> VllmRequest:
        """Fuse the context outside vLLM (daser CacheBlend) and stage it for the connector.

        The staged entry holds only context KV, which does not depend on the question (context
        tokens never attend to it), so later questions over the same document arrangement
        reuse it without another fusion.
        """
        gen = self._generator()
        r = gen.blend.recompute_ratio if recompute_ratio is None else recompute_ratio
        if not isinstance(r, str) and not 0.0 <= r <= 1.0:
            raise InvalidInputError(f"recompute_ratio must be in [0, 1], got {r}")
        t0 = time.perf_counter()
        pieces = self._pieces(contexts, tenant)
        if not pieces:
            raise InvalidInputError("blended reuse needs at least one context chunk")
        ids = gen.prompt_ids(question, contexts, tenant)
        ctx_len = len(gen.prompt.prefix_ids) + sum(len(p.token_ids) for p in pieces)
        key = self.blend_key(pieces, r, tenant)
        info: dict[str, Any] = {"blend_key": key, "staged": False}
        if not gen.store.contains(key):
            fused, finfo = gen.prefill(question, contexts, recompute_ratio=r, tenant=tenant)
            n_layers = gen.runner.spec.num_layers
            k = torch.stack([fused.cache.keys[i][:, :ctx_len] for i in range(n_layers)])
            v = torch.stack([fused.cache.values[i][:, :ctx_len] for i in range(n_layers)])
            kv = ChunkKV(key=key, token_ids=torch.tensor(ids[:ctx_len], dtype=torch.int64), start_pos=0,
                         keys=k, values=v, meta={"fingerprint": gen.fingerprint, "source": "daser-blend",
                                                 "recompute_ratio": r})
            gen.store.put(kv, codec=self.codec)
            gen.store.add_derived([p.doc_id for p in pieces if p.doc_id is not None], key, tenant)
            info.update(staged=True, hits=finfo["hits"], misses=finfo["misses"],
                        exact_tokens=fused.exact_tokens, recomputed_tokens=fused.recomputed_tokens,
                        reused_tokens=fused.reused_tokens)
        return VllmRequest({"prompt_token_ids": ids, "cache_salt": key}, plan_params([(key, ctx_len)], save=False),
                           "blend", ctx_len, time.perf_counter() - t0, info)
