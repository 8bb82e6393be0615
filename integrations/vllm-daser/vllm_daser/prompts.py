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
from daser_rag.blend.prefix_tree import node_key
from daser_rag.errors import InvalidInputError
from daser_rag.generate import CacheAwareGenerator
from daser_rag.kv.chunk_kv import ChunkKV
from daser_rag.kv.keys import prefix_key
from daser_rag.model.loader import LoadedModel, converted_gguf_dir
from vllm_daser.plan import IN_ENGINE_SELECTORS, plan_params
from vllm_daser.plugin import CONNECTOR_MODULE, CONNECTOR_NAME

CONNECTOR_CLASS = CONNECTOR_NAME


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
) -> dict[str, Any]:
    """`kv_connector_extra_config` for DaserKVConnector (also usable as JSON for `vllm serve`).

    `fingerprint`: the daser model fingerprint of the generator that prepares KV (load it in
    the dtype vLLM serves, e.g. bf16); it namespaces the block keys of plan-less prompts.
    `redis_url`: share KV (and invalidations) with every vLLM instance and daser process on the
    same Redis; its key namespace is `redis_namespace`, by default derived from `fingerprint`
    exactly as daser's own processes derive it (`daser_rag.kv.shared.default_namespace`).
    """
    out: dict[str, Any] = {"store_dir": str(store_dir), "save": save, "block_fallback": block_fallback,
                           "codec": codec, "host_bytes": int(host_bytes)}
    if fingerprint:
        out["fingerprint"] = fingerprint
    if redis_url:
        if not (fingerprint or redis_namespace):
            raise ValueError("redis_url needs fingerprint= (the client's gen.fingerprint) or redis_namespace=, "
                             "so vLLM reads the keys daser's processes write")
        out["redis_url"] = redis_url
        if redis_namespace:
            out["redis_namespace"] = redis_namespace
    return out


def kv_transfer_dict(store_dir: str | Path, *, module_path: bool = False, **kwargs: Any) -> dict[str, Any]:
    """The `--kv-transfer-config` JSON object for `vllm serve` (see `connector_extra_config`).

    The connector is found by name through this distribution's vLLM plugin; `module_path=True`
    adds `kv_connector_module_path` for a vLLM where the plugin is not installed.
    """
    out: dict[str, Any] = {"kv_connector": CONNECTOR_NAME, "kv_role": "kv_both",
                           "kv_load_failure_policy": "recompute",
                           "kv_connector_extra_config": connector_extra_config(store_dir, **kwargs)}
    if module_path:
        out["kv_connector_module_path"] = CONNECTOR_MODULE
    return out


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
    """Turns (question, contexts) into `VllmRequest`s using a daser generator's store and keys.

    The generator's store must be the directory the connector was configured with, and the
    generator should run in vLLM's dtype (bf16) so that its fingerprint, chunk entries and
    blended KV describe the same model vLLM serves.
    """

    def __init__(self, generator: CacheAwareGenerator, *, codec: str = "bf16") -> None:
        self.gen = generator
        self.codec = codec

    def _pieces(self, contexts: Sequence[ContextItem] | None, tenant: str) -> list[Any]:
        return self.gen.resolve(contexts, tenant)

    def exact(self, question: str, contexts: Sequence[ContextItem] | None = None, *, tenant: str = "") -> VllmRequest:
        """Prefix-tree plan: exact reuse of whatever leading part of this chunk path is stored."""
        if not isinstance(question, str) or not question.strip():
            raise InvalidInputError("question must be a non-empty string")
        t0 = time.perf_counter()
        gen = self.gen
        pieces = self._pieces(contexts, tenant)
        pk = prefix_key(gen.fingerprint, gen.prompt.prefix_ids, tenant)
        segs: list[tuple[str, int]] = [(pk, len(gen.prompt.prefix_ids))]
        chunk_keys = [p.key for p in pieces]
        for j, p in enumerate(pieces):
            key = node_key(pk, chunk_keys[: j + 1])
            segs.append((key, len(p.token_ids)))
            doc_ids = [q.doc_id for q in pieces[: j + 1] if q.doc_id is not None]
            if j == 0 and p.doc_id is not None:
                gen.store.add_refs(p.doc_id, [key], tenant)
            elif j > 0 and doc_ids:
                gen.store.add_derived(doc_ids, key, tenant)  # invalidating any document drops the node
        ids = gen.prompt_ids(question, contexts, tenant)
        ctx = sum(n for _, n in segs)
        return VllmRequest({"prompt_token_ids": ids}, plan_params(segs), "exact", ctx,
                           time.perf_counter() - t0, {"node_keys": [k for k, _ in segs]})

    def reuse(self, question: str, contexts: Sequence[ContextItem] | None = None, *, tenant: str = "",
              exact_nodes: bool = True, recompute_ratio: float = 0.0, check_layer: int = 1,
              selector: str = "chunk_heads") -> VllmRequest:
        """Full reuse (r=0) inside vLLM: every stored context token is an external hit.

        Segment j loads the chunk's own entry (computed right after the system prefix) and the
        connector re-rotates it to its place; vLLM computes only the question. With
        `exact_nodes`, the longest run of leading chunks whose exact prefix-tree node is stored
        is loaded exactly instead. vLLM's computation of a segment is saved (as the node of its
        path) only while everything before it was exact. Missing chunk entries come back as
        `prefill` requests: run them first and the main request loads every chunk.

        `recompute_ratio > 0` (experimental, needs DASER_VLLM_BLEND=1 in vLLM's environment):
        the connector's worker recomputes that share of the re-positioned tokens with vLLM's
        weights after loading them, chosen by `selector`: "chunk_heads" (default: the first tokens
        of every chunk, no check pass; 2.19x vs vLLM prefix caching against 2.05x for deviation on
        the vllm_serve trace, docs/vllm.md; as faithful per share on the held-out grid) or "deviation"
        (CacheBlend, at `check_layer`), see blend.py.
        """
        if not isinstance(question, str) or not question.strip():
            raise InvalidInputError("question must be a non-empty string")
        t0 = time.perf_counter()
        gen = self.gen
        store = gen.store
        pieces = self._pieces(contexts, tenant)
        n_pre = len(gen.prompt.prefix_ids)
        pk = prefix_key(gen.fingerprint, gen.prompt.prefix_ids, tenant)
        segs: list[tuple[str, int, str | None]] = [(pk, n_pre, pk)]
        chunk_keys = [p.key for p in pieces]
        exact_run = True
        prefill: list[VllmRequest] = []
        seen: set[str] = set()
        for j, p in enumerate(pieces):
            node = node_key(pk, chunk_keys[: j + 1])
            if p.doc_id is not None:
                store.add_refs(p.doc_id, [p.key], tenant)
            if j > 0:
                doc_ids = [q.doc_id for q in pieces[: j + 1] if q.doc_id is not None]
                if doc_ids:
                    store.add_derived(doc_ids, node, tenant)  # invalidating any document drops the node
            if exact_run and (j == 0 or (exact_nodes and store.contains(node))):
                segs.append((node, len(p.token_ids), node))
            else:
                exact_run = False
                segs.append((p.key, len(p.token_ids), node))
            if not store.contains(p.key) and p.key not in seen:
                seen.add(p.key)
                ids = list(gen.prompt.prefix_ids) + list(p.token_ids)
                prefill.append(VllmRequest({"prompt_token_ids": ids},
                                           plan_params([(pk, n_pre), (p.key, len(p.token_ids))]),
                                           "prefill", n_pre))
        ids = gen.prompt_ids(question, contexts, tenant)
        ctx = sum(s[1] for s in segs)
        prompt: dict[str, Any] = {"prompt_token_ids": ids}
        if selector not in IN_ENGINE_SELECTORS:
            raise InvalidInputError(f"in-engine selector must be one of {IN_ENGINE_SELECTORS}, got {selector!r}")
        recompute = ((float(recompute_ratio), int(check_layer), selector)
                     if recompute_ratio > 0 and not exact_run else None)
        if not exact_run:
            # re-positioned KV must not enter vLLM's prefix cache under plain token hashes
            h = hashlib.blake2b(digest_size=16)
            h.update(b"daser-vllm-reuse-v1\0" + "\0".join(s[0] for s in segs).encode())
            h.update(repr(recompute).encode())
            prompt["cache_salt"] = "r" + h.hexdigest()
        return VllmRequest(prompt, plan_params(segs, recompute=recompute), "reuse", ctx, time.perf_counter() - t0,
                           {"segments": len(segs), "exact_chunks": sum(1 for s in segs[1:] if s[0] == s[2])},
                           prefill)

    def blend_key(self, pieces: Sequence[Any], ratio: float, tenant: str) -> str:
        gen = self.gen
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
        tenant: str = "",
    ) -> VllmRequest:
        """Fuse the context outside vLLM (daser CacheBlend) and stage it for the connector.

        The staged entry holds only context KV, which does not depend on the question (context
        tokens never attend to it), so later questions over the same document arrangement
        reuse it without another fusion.
        """
        gen = self.gen
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
