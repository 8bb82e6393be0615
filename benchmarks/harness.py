"""One request, run the same way in every mode, so modes can be compared side by side.

Modes: full prefill (reference), exact prefix caching (benchmarks/prefix_cache.py), and
daser-rag blending at a recompute ratio r (r=0 is full reuse, r=1 recomputes everything).
Each run is timed from the call to the first greedy token (TTFT) and to the end of a short
greedy answer (latency); then, untimed, the same KV is teacher-forced along full prefill's
answer to measure next-token agreement and KL. Full prefill must run first for a request:
its answer and logits are the reference the others are held to.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks.prefix_cache import PrefixCache
from daser_rag.engine.decode import decode_n_tokens
from daser_rag.evaluation import Fidelity, is_close, kl_divergence


@dataclass(frozen=True)
class Mode:
    name: str
    kind: str  # "full" | "prefix" | "blend"
    ratio: float | str = 1.0  # a share in [0, 1] or "auto"
    selector: str | None = None  # None: the generator's default


FULL = Mode("full prefill", "full")
PREFIX = Mode("prefix cache", "prefix")


def blend_mode(r: float | str, selector: str | None = None) -> Mode:
    ratio = r if r == "auto" else float(r)
    label = "auto" if r == "auto" else f"{float(r):g}"
    name = f"daser r={label}" if selector is None else f"{selector} r={label}"
    return Mode(name, "blend", ratio, selector)


def standard_modes(ratios: list[float]) -> list[Mode]:
    return [FULL, PREFIX] + [blend_mode(r) for r in ratios]


@dataclass
class Run:
    mode: str
    ttft_s: float
    latency_s: float
    prompt_tokens: int
    reused_tokens: int  # context tokens served from a cache (exactly or blended)
    recomputed_tokens: int
    answer_ids: list[int]
    answer: str
    fidelity: Fidelity = field(default_factory=Fidelity)
    ref_logits: list[torch.Tensor] | None = None  # full prefill only: the reference logits
    ref_ids: list[int] | None = None  # full prefill only: the greedy tokens (EOS included)
    share: float = 0.0  # recomputed share of the non-exact context tokens (1 for full prefill)
    exact_tokens: int = 0  # context tokens whose KV is exactly full prefill's (system prefix, exact runs)

    def record(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("mode", "ttft_s", "latency_s", "prompt_tokens", "reused_tokens",
                                               "recomputed_tokens", "answer")}
        out["answer_tokens"] = len(self.answer_ids)
        out["top1_agreement"] = self.fidelity.top1
        out["mean_kl"] = self.fidelity.mean_kl
        return out


def disable_prefix_tree(gen: Any) -> None:
    """No exact tree nodes for this generator (benchmarks that compare blending modes on repeats)."""
    asm = gen.assembler
    if asm.materializer is not None:
        asm.materializer.close()
    asm.prefix_tree = None
    asm.materializer = None


class Harness:
    """Owns the generator, the prefix cache, and the per-request mode loop."""

    def __init__(self, gen: Any, *, answer_tokens: int = 32, prefix_block: int = 16, prefix_tree: bool = False) -> None:
        """`prefix_tree=False` (the default) turns the generator's prefix tree off: every mode runs
        on the same contexts, so with the tree (on by default in the engine) the repeats would be
        served exactly and hide what blending does. The prefix-tree bench sets it per mode."""
        if not prefix_tree:
            disable_prefix_tree(gen)
        self.gen = gen
        self.runner = gen.runner
        self.answer_tokens = answer_tokens
        self.prefix_cache = PrefixCache(gen.runner, block_size=prefix_block)
        self._primed: set[str] = set()
        self.ingest_s = 0.0

    # -- index time (not timed per request) ----------------------------------------------------
    @torch.inference_mode()
    def ingest(self, chunks: list[str]) -> None:
        """Precompute chunk KV into the daser store and prime the prefix cache with the same work.

        The prefix cache gets [system prefix][chunk] for every chunk: what exact prefix
        caching would hold if each document had been prefilled once on its own, the same
        index-time work daser-rag does. A request starting with a known chunk hits it.
        """
        gen = self.gen
        t0 = time.perf_counter()
        prefix_ids = list(gen.prompt.prefix_ids)
        pcache = self.runner.new_cache(len(prefix_ids))
        self.runner.forward(torch.tensor(prefix_ids, dtype=torch.long), 0, pcache)
        n_layers = self.runner.spec.num_layers
        pk = torch.stack([pcache.keys[i][:, : len(prefix_ids)] for i in range(n_layers)])
        pv = torch.stack([pcache.values[i][:, : len(prefix_ids)] for i in range(n_layers)])
        for text in dict.fromkeys(chunks):
            if text in self._primed:
                continue
            ids = gen.prompt.chunk_ids(text)
            key = gen.chunk_key_for(text)
            kv = gen.store.get(key, dtype=self.runner.dtype, device=self.runner.device)
            if kv is None:
                kv = gen.compute_chunk(ids, key)
                gen.store.put(kv)
            self.prefix_cache.insert_kv(prefix_ids + ids, torch.cat([pk, kv.keys], dim=2),
                                        torch.cat([pv, kv.values], dim=2), tag="ingest")
            self._primed.add(text)
        self.ingest_s += time.perf_counter() - t0

    def daser_cache_bytes(self) -> int:
        stats = self.gen.store.stats()
        return int(sum(max(v, 0) for k, v in stats["bytes"].items() if k != "device"))

    # -- one request --------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, mode: Mode, question: str, chunks: list[str], ref: Run | None = None,
            *, remember: bool = False, tag: str = "trace", answer_tokens: int | None = None) -> Run:
        """Time one request in one mode; teacher-force along `ref` afterwards (untimed).

        `remember`: a prefix-cache run keeps its prompt's blocks afterwards, as a server would.
        """
        gen, runner = self.gen, self.runner
        n_answer = answer_tokens or self.answer_tokens
        extra = n_answer
        t0 = time.perf_counter()
        ids: list[int] | None = None
        share = 1.0 if mode.kind == "full" else 0.0
        exact = 0
        if mode.kind == "full":
            fused, _ = gen.prefill(question, chunks, use_cache=False, extra_capacity=extra)
            cache, logits = fused.cache, fused.logits[-1]
            plen, reused, recomputed = fused.context_tokens + fused.query_tokens, 0, fused.context_tokens
            exact = fused.context_tokens
        elif mode.kind == "prefix":
            ids = gen.prompt_ids(question, chunks)
            cache, lg, hit = self.prefix_cache.prefill(ids, extra_capacity=extra)
            logits = lg[-1]
            plen = len(ids)
            q_len = len(gen.prompt.query_ids(question))
            reused = min(hit, plen - q_len)
            recomputed = plen - q_len - reused
        elif mode.kind == "blend":
            fused, _ = gen.prefill(question, chunks, recompute_ratio=mode.ratio, selector=mode.selector,
                                   extra_capacity=extra)
            cache, logits = fused.cache, fused.logits[-1]
            plen = fused.context_tokens + fused.query_tokens
            reused = fused.context_tokens - fused.recomputed_tokens
            recomputed = fused.recomputed_tokens
            share = fused.recompute_share
            exact = fused.exact_tokens
        else:
            raise ValueError(f"unknown mode kind {mode.kind!r}")
        out_ids: list[int] = []
        step_logits: list[torch.Tensor] = []
        ttft = 0.0
        for tok, lg in decode_n_tokens(runner, cache, logits, n_answer, stop_ids=gen.eos_ids):
            if not out_ids:
                ttft = time.perf_counter() - t0
            out_ids.append(tok)
            step_logits.append(lg)
        latency = time.perf_counter() - t0
        answer_ids = [t for t in out_ids if t not in gen.eos_ids]
        run = Run(mode.name, ttft, latency, plen, reused, recomputed, answer_ids,
                  gen.tokenizer.decode(answer_ids, skip_special_tokens=True), share=share, exact_tokens=exact)
        if mode.kind == "prefix" and remember and ids is not None:
            self.prefix_cache.insert(ids, cache, tag=tag)
        if ref is None:
            run.ref_logits, run.ref_ids = step_logits, out_ids
            run.fidelity = Fidelity(agree=len(out_ids), total=len(out_ids), first_token_agree=1, prompts=1,
                                    per_prompt_kl=[0.0])
            return run
        run.fidelity = self._teacher_force(cache, plen, step_logits[0], ref)
        return run

    def _teacher_force(self, cache: Any, plen: int, first_logits: torch.Tensor, ref: Run) -> Fidelity:
        """Next-token agreement and KL along the reference answer.

        The reference tokens go through in one forward pass (causal within the run), which
        gives the same per-position logits as feeding them one by one, at the cost of about
        one decode step instead of 31: decode on CPU is bound by reading the weights.
        """
        ref_ids = ref.ref_ids
        if ref_ids is None or ref.ref_logits is None:
            raise ValueError("the reference run must be a full prefill run from this harness")
        cache.length = plen  # overwrite this mode's own answer with the reference's
        logits = [first_logits.reshape(1, -1)]
        if len(ref_ids) > 1:
            logits.append(self.runner.forward(torch.tensor(ref_ids[:-1]), plen, cache, all_logits=True))
        steps = torch.cat(logits)
        f = Fidelity(prompts=1)
        kls = []
        for s, tok in enumerate(ref_ids):
            top = int(torch.argmax(steps[s]))
            f.total += 1
            f.agree += int(top == tok)
            if is_close(ref.ref_logits[s]):
                f.close += 1
                f.close_agree += int(top == tok)
            if s == 0:
                f.first_token_agree += int(top == tok)
            kls.append(kl_divergence(ref.ref_logits[s], steps[s]))
        f.kl_sum = sum(kls)
        f.per_prompt_kl.append(f.kl_sum / max(len(kls), 1))
        return f

    def request(self, question: str, chunks: list[str], modes: list[Mode], *, remember: bool = False,
                tag: str = "trace", answer_tokens: int | None = None, rotate: int = 0) -> dict[str, Run]:
        """All modes on one request, back to back.

        Full prefill runs first (it is the reference); the order of the others is rotated by
        `rotate` so slow drift in machine load does not always land on the same mode.
        """
        if not modes or modes[0].kind != "full":
            raise ValueError("the first mode must be full prefill (the reference)")
        ref = self.run(modes[0], question, chunks, answer_tokens=answer_tokens)
        runs: dict[str, Run] = {modes[0].name: ref}
        rest = modes[1:]
        k = rotate % len(rest) if rest else 0
        for m in rest[k:] + rest[:k]:
            runs[m.name] = self.run(m, question, chunks, ref, remember=remember, tag=tag,
                                    answer_tokens=answer_tokens)
        return {m.name: runs[m.name] for m in modes}
