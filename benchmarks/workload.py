"""Workload benchmark for PCR-style storage scheduling (issue 6).

One run replays the same seeded trace under every storage configuration and prints, side
by side: RAM hit rate, mean / p99 TTFT (from arrival, so queueing counts) and mean service
time (prefill only), for {LRU, look-ahead LRU, cost-aware} x {prefetch off, on} x
{layer-wise overlap off, on}.

Trace: Zipf-distributed document popularity over a pydoc corpus; a request asks about one
document and gets its chunks in order (top-1 retrieval of a multi-chunk document). The
prefix tree makes a repeated document an exact run, so after warm-up no request needs
CacheBlend repair and TTFT is fetch + fill + the question's compute: the regime where
storage scheduling matters. Arrivals are Poisson at a rate calibrated to `--load` times
the capacity of an all-miss server, measured at start on this machine.

Real parts: the real model computes every request; KV comes from a real disk tier. Host RAM
(the "cache") holds `--cache-frac` of the corpus KV. To model a corpus far larger than the
OS page cache, the disk tier drops each file from the page cache after reading it
(posix_fadvise DONTNEED), so every disk hit is a real device read.

Usage: python -m benchmarks.workload [--requests 48] [--docs 20] ...
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from daser_rag.corpus import python_reference_corpus
from daser_rag.engine.generator import CacheAwareGenerator
from daser_rag.kv.codecs import EncodedKV
from daser_rag.kv.policies import (
    CostAwarePolicy,
    EvictionPolicy,
    LookAheadLRUPolicy,
    LRUPolicy,
)
from daser_rag.kv.prefetch import Prefetcher
from daser_rag.kv.store import KVStore
from daser_rag.kv.tiers.disk import DiskTier
from daser_rag.scheduler import RequestScheduler
from daser_rag.types import ChunkRef

QUESTIONS = (
    "What does this section say?", "Summarize the rule described here.", "What is the syntax?",
    "When is this statement executed?", "What error can occur?", "Give the key point in one sentence.",
)


class ColdDiskTier(DiskTier):
    """DiskTier whose reads come from the device: each file leaves the page cache after use."""

    @staticmethod
    def _drop(path: Path) -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def get(self, key: str) -> EncodedKV | None:
        enc = super().get(key)
        self._drop(self._path(key))
        return enc

    def put(self, enc: EncodedKV) -> None:
        super().put(enc)
        self._drop(self._path(enc.key))


def zipf_weights(n: int, s: float) -> list[float]:
    w = [1.0 / (i + 1) ** s for i in range(n)]
    z = sum(w)
    return [x / z for x in w]


def make_trace(n_docs: int, n_requests: int, zipf_s: float, seed: int) -> list[tuple[int, str]]:
    rng = random.Random(seed)
    w = zipf_weights(n_docs, zipf_s)
    perm = list(range(n_docs))
    rng.shuffle(perm)  # popularity rank is unrelated to corpus order
    return [(perm[rng.choices(range(n_docs), w)[0]], rng.choice(QUESTIONS)) for _ in range(n_requests)]


def _pct(xs: list[float], p: float) -> float:
    ys = sorted(xs)
    return ys[min(len(ys) - 1, max(0, math.ceil(p / 100 * len(ys)) - 1))]


def _policy(name: str, chunk_cost_s: float) -> EvictionPolicy:
    if name == "lru":
        return LRUPolicy()
    if name == "lookahead":
        return LookAheadLRUPolicy()
    if name == "cost":
        # what a RAM miss costs here: a disk read, proportional to bytes -> uniform per byte,
        # so the policy ranks by (aged) frequency; measured recompute costs override it
        return CostAwarePolicy(lambda _k, nbytes: chunk_cost_s * nbytes / 1e6)
    raise ValueError(name)


def _setup(args: argparse.Namespace, root: Path) -> tuple[CacheAwareGenerator, list[list[ChunkRef]], int]:
    """Corpus KV on disk (chunks + exact prefix-tree nodes), computed once and reused."""
    store = KVStore(root, codec=args.codec, host_bytes=1 << 40)
    store.disk = ColdDiskTier(root / "kv")
    # inline: the warm-up below stores every path before anything is timed
    gen = CacheAwareGenerator(args.model, store=store, chunk_tokens=args.chunk_tokens, device=args.device,
                              prefix_tree="inline", prefix_tree_after=1)
    docs = [d for d in python_reference_corpus() if len(gen.split(d.text)) >= args.chunks_per_doc]
    docs = docs[: args.docs]
    if len(docs) < args.docs:
        raise SystemExit(f"only {len(docs)} pydoc topics have {args.chunks_per_doc} chunks of {args.chunk_tokens} tokens")
    contexts = [[ChunkRef(text=t, doc_id=d.doc_id) for t in gen.split(d.text)[: args.chunks_per_doc]] for d in docs]
    t0 = time.perf_counter()
    for ctx in contexts:  # chunk entries + tree nodes; a rerun finds them on disk
        keys = gen.plan_keys(ctx)
        if not all(store.contains(k) for k in keys) or sum(k.startswith("s") for k in keys) < len(ctx) - 1:
            gen.prefill(QUESTIONS[0], ctx)
    corpus_bytes = 0
    for ctx in contexts:
        for k in gen.plan_keys(ctx):
            enc = store.disk.get(k)
            assert enc is not None, "setup left a hole"
            corpus_bytes += enc.nbytes
    print(f"setup: {len(contexts)} docs x {args.chunks_per_doc} chunks of <= {args.chunk_tokens} tokens, "
          f"codec {args.codec}, corpus KV {corpus_bytes / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s", flush=True)
    return gen, contexts, corpus_bytes


def _calibrate(gen: CacheAwareGenerator, contexts: list[list[ChunkRef]], reps: int = 3) -> tuple[float, float]:
    """Mean service time with every entry on (cold) disk, and with every entry in RAM."""
    miss, hit = [], []
    gen.store.host.capacity_bytes = 1 << 40
    for i in range(reps):
        ctx = contexts[i % len(contexts)]
        gen.store.host.clear()
        r = gen.generate(QUESTIONS[1], ctx, max_new_tokens=1)
        miss.append(r.timings.ttft_s)
        r = gen.generate(QUESTIONS[1], ctx, max_new_tokens=1)
        hit.append(r.timings.ttft_s)
    return statistics.median(miss), statistics.median(hit)


def _run_config(gen: CacheAwareGenerator, contexts: list[list[ChunkRef]], trace: list[tuple[int, str]],
                arrivals: list[float], *, policy: str, prefetch: bool, overlap: bool, cache_bytes: int,
                chunk_cost_s: float, max_new_tokens: int, window: int) -> dict[str, Any]:
    store = gen.store
    store.host.clear()
    store.host.policy = _policy(policy, chunk_cost_s)
    store.host.capacity_bytes = cache_bytes
    store.host.evictions = 0
    gen.assembler.layerwise = overlap
    pf = Prefetcher(store, window=window) if prefetch else None
    sched = RequestScheduler(gen, concurrency=2, protect_queued=(policy == "lookahead"), prefetcher=pf)
    futs = []
    t0 = time.perf_counter()
    for (doc, q), at in zip(trace, arrivals):
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        futs.append(sched.submit(q, contexts[doc], arrival=t0 + at, max_new_tokens=max_new_tokens))
    sched.drain()
    sched.close()
    if pf is not None:
        pf.close()
    res = [f.result() for f in futs]
    ttft = [r.ttft_s for r in res]
    hits = sum(r.ram_hits for r in res)
    total = sum(r.ram_hits + r.ram_misses for r in res)
    return {
        "policy": policy, "prefetch": prefetch, "overlap": overlap,
        "hit_rate": hits / total if total else 0.0,
        "ttft_mean_s": statistics.fmean(ttft), "ttft_p99_s": _pct(ttft, 99),
        "service_mean_s": statistics.fmean(r.result.timings.ttft_s for r in res),
        "fetch_mean_s": statistics.fmean(r.result.timings.fetch_s for r in res),
        "exact_share": statistics.fmean(r.result.exact_tokens / max(1, r.result.context_tokens) for r in res),
        "evictions": store.host.evictions,
        "prefetched": pf.stats.loaded if pf else 0,
        "wall_s": time.perf_counter() - t0,
    }


def _tree_effect(gen: CacheAwareGenerator, contexts: list[list[ChunkRef]], n: int) -> dict[str, float]:
    """Prefix tree vs CacheBlend from chunks on the same requests: TTFT and agreement with full prefill."""
    out: dict[str, list[float]] = {"tree_ttft": [], "blend_ttft": [], "tree_maxdiff": [], "blend_maxdiff": [],
                                   "tree_top1": [], "blend_top1": []}
    tree = gen.assembler.prefix_tree
    gen.store.host.capacity_bytes = 1 << 40
    gen.assembler.layerwise = False
    for ctx in contexts[:n]:
        full, _ = gen.prefill(QUESTIONS[2], ctx, use_cache=False)
        for name, t in (("tree", tree), ("blend", None)):
            gen.assembler.prefix_tree = t
            gen.prefill(QUESTIONS[2], ctx)  # warm RAM: compare compute, not disk
            t0 = time.perf_counter()
            fused, _ = gen.prefill(QUESTIONS[2], ctx)
            out[f"{name}_ttft"].append(time.perf_counter() - t0)
            out[f"{name}_maxdiff"].append((fused.logits - full.logits).abs().max().item())
            out[f"{name}_top1"].append(float(fused.logits.argmax().item() == full.logits.argmax().item()))
    gen.assembler.prefix_tree = tree
    return {k: statistics.fmean(v) for k, v in out.items()}


def run_workload_benchmark(args: argparse.Namespace | None = None) -> dict[str, Any]:
    args = args if args is not None else build_parser().parse_args([])
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.cache_dir) if args.cache_dir else Path(tempfile.gettempdir()) / "daser-bench-workload"
    gen, contexts, corpus_bytes = _setup(args, root)
    cache_bytes = int(corpus_bytes * args.cache_frac)
    s_miss, s_hit = _calibrate(gen, contexts)
    rate = args.rate or args.load / s_miss
    per_mb = max(0.0, s_miss - s_hit) / (corpus_bytes / len(contexts) / 1e6)
    print(f"calibration: service all-miss {s_miss * 1e3:.0f} ms, all-hit {s_hit * 1e3:.0f} ms; "
          f"Poisson rate {rate:.2f}/s; RAM cache {cache_bytes / 1e6:.1f} MB ({args.cache_frac:.0%} of corpus)",
          flush=True)
    trace = make_trace(len(contexts), args.requests, args.zipf, args.seed)
    rng = random.Random(args.seed + 1)
    arrivals, t = [], 0.0
    for _ in trace:
        t += rng.expovariate(rate)
        arrivals.append(t)
    rows = []
    configs = [(p, pf, ov) for ov in (False, True) for pf in (False, True) for p in args.policies]
    for policy, pf, ov in configs:
        row = _run_config(gen, contexts, trace, arrivals, policy=policy, prefetch=pf, overlap=ov,
                          cache_bytes=cache_bytes, chunk_cost_s=per_mb, max_new_tokens=args.max_new_tokens,
                          window=args.window)
        rows.append(row)
        print(f"  {policy:10s} prefetch={'on ' if pf else 'off'} overlap={'on ' if ov else 'off'}  "
              f"hit {row['hit_rate']:.2f}  TTFT mean {row['ttft_mean_s'] * 1e3:7.1f} ms  "
              f"p99 {row['ttft_p99_s'] * 1e3:7.1f} ms  service {row['service_mean_s'] * 1e3:6.1f} ms", flush=True)
    base = next(r for r in rows if r["policy"] == "lru" and not r["prefetch"] and not r["overlap"])
    for r in rows:
        r["ttft_speedup_vs_lru"] = base["ttft_mean_s"] / r["ttft_mean_s"]
        r["service_speedup_vs_lru"] = base["service_mean_s"] / r["service_mean_s"]
    tree = _tree_effect(gen, contexts, args.tree_docs) if args.tree_docs else {}
    result = {"config": {k: v for k, v in vars(args).items()}, "rate_per_s": rate, "service_all_miss_s": s_miss,
              "service_all_hit_s": s_hit, "corpus_bytes": corpus_bytes, "cache_bytes": cache_bytes,
              "rows": rows, "prefix_tree": tree}
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def print_table(result: dict[str, Any]) -> None:
    print()
    print(f"{'policy':<10} {'prefetch':<8} {'overlap':<7} {'RAM hit':>7} {'TTFT mean':>10} {'TTFT p99':>10} "
          f"{'service':>9} {'x vs LRU':>8}")
    for r in result["rows"]:
        print(f"{r['policy']:<10} {'on' if r['prefetch'] else 'off':<8} {'on' if r['overlap'] else 'off':<7} "
              f"{r['hit_rate']:>7.2f} {r['ttft_mean_s'] * 1e3:>8.1f}ms {r['ttft_p99_s'] * 1e3:>8.1f}ms "
              f"{r['service_mean_s'] * 1e3:>7.1f}ms {r['ttft_speedup_vs_lru']:>7.2f}x")
    t = result.get("prefix_tree")
    if t:
        print(f"\nprefix tree (RAM-warm, same requests): exact-run TTFT {t['tree_ttft'] * 1e3:.1f} ms vs "
              f"CacheBlend-from-chunks {t['blend_ttft'] * 1e3:.1f} ms; max |logit diff| vs full prefill "
              f"{t['tree_maxdiff']:.2e} vs {t['blend_maxdiff']:.2e}; top-1 agreement {t['tree_top1']:.2f} vs "
              f"{t['blend_top1']:.2f}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--docs", type=int, default=16)
    p.add_argument("--chunks-per-doc", type=int, default=3)
    p.add_argument("--chunk-tokens", type=int, default=128)
    p.add_argument("--codec", default="bf16")
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--zipf", type=float, default=1.0)
    p.add_argument("--cache-frac", type=float, default=0.25, help="host RAM cache size / corpus KV size")
    p.add_argument("--load", type=float, default=0.7, help="arrival rate / all-miss service capacity")
    p.add_argument("--rate", type=float, default=None, help="fixed arrival rate (overrides --load)")
    p.add_argument("--window", type=int, default=4, help="prefetch window (queued requests)")
    p.add_argument("--max-new-tokens", type=int, default=1)
    p.add_argument("--policies", nargs="+", default=["lru", "lookahead", "cost"])
    p.add_argument("--tree-docs", type=int, default=3, help="docs for the prefix-tree fidelity/TTFT check (0: skip)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 leaves a core for the prefetch/loader threads; 0: torch default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--model", default=None, help="GGUF file or HF dir (default: the embedded SmolLM2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """`python -m benchmarks.workload [ARGS]` (what `daser-rag bench workload` runs)."""
    return run_workload_benchmark(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
