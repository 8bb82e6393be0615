"""`daser-rag bench ablation`: BlendConfig variants side by side on the tuning prompts.

The design choices of selection (which heads, question tokens and layers the query signal
uses; the check layer; chunk heads; the auto budget's coverage) were made here, on prompts
from the Language Reference (daser_rag.evaluation.fidelity_prompts), never on the held-out
stdlib set that `bench selection` reports. Each variant is teacher-forced along full
prefill's greedy answer; printed sorted by mean KL.

Presets reproduce the tables in docs/benchmarks.md:
  --preset signals   query-signal aggregation and layers vs deviation, hybrid, random (r=0.15)
  --preset budget    hybrid vs deviation at 0.1/0.15/0.2/0.3, check layer 2, chunk heads, auto coverage
  --preset placement where selection happens (check layer 1/2/4, two-stage funnel) and how the
                     budget is spread (global top share vs the same share of every chunk)
  --preset lookahead how deep hybrid's look-ahead pass of the question needs to go (it stops
                     after the last of `query_layers`) vs deviation and chunk heads (r=0.15)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from typing import Any

L = list(range(30))
PRESETS: dict[str, list[tuple[str, dict[str, Any], float | str]]] = {
    "signals": [
        ("deviation", {"selector": "deviation"}, 0.15),
        ("query (all layers, row-normalized, mean over heads)", {"selector": "query"}, 0.15),
        ("query, raw attention", {"selector": "query", "query_norm": "raw"}, 0.15),
        ("query, max over heads", {"selector": "query", "query_heads": "max"}, 0.15),
        ("query, last question token", {"selector": "query", "query_tokens": 1}, 0.15),
        ("query, last 8 question tokens", {"selector": "query", "query_tokens": 8}, 0.15),
        ("query, layers 0-9", {"selector": "query", "query_layers": L[:10]}, 0.15),
        ("query, layers 10-19", {"selector": "query", "query_layers": L[10:20]}, 0.15),
        ("query, layers 20-29", {"selector": "query", "query_layers": L[20:]}, 0.15),
        ("hybrid", {"selector": "hybrid"}, 0.15),
        ("random", {"selector": "random"}, 0.15),
        ("query + 8 chunk heads", {"selector": "query", "chunk_heads": 8}, 0.15),
        ("full reuse (r=0)", {"selector": "deviation"}, 0.0),
    ],
    "budget": [
        ("deviation r=0.1", {"selector": "deviation"}, 0.1),
        ("deviation r=0.15", {"selector": "deviation"}, 0.15),
        ("deviation r=0.2", {"selector": "deviation"}, 0.2),
        ("deviation r=0.3", {"selector": "deviation"}, 0.3),
        ("hybrid r=0.1", {"selector": "hybrid"}, 0.1),
        ("hybrid r=0.15", {"selector": "hybrid"}, 0.15),
        ("hybrid r=0.2", {"selector": "hybrid"}, 0.2),
        ("hybrid r=0.3", {"selector": "hybrid"}, 0.3),
        ("hybrid, max over heads r=0.15", {"selector": "hybrid", "query_heads": "max"}, 0.15),
        ("hybrid, check layer 2 r=0.15", {"selector": "hybrid", "check_layer": 2}, 0.15),
        ("hybrid + 4 chunk heads r=0.15", {"selector": "hybrid", "chunk_heads": 4}, 0.15),
        ("query, max over heads r=0.3", {"selector": "query", "query_heads": "max"}, 0.3),
        ("hybrid auto, coverage 0.5", {"selector": "hybrid", "auto_coverage": 0.5}, "auto"),
        ("hybrid auto, coverage 0.6", {"selector": "hybrid", "auto_coverage": 0.6}, "auto"),
        ("hybrid auto, coverage 0.7", {"selector": "hybrid", "auto_coverage": 0.7}, "auto"),
        ("hybrid auto, coverage 0.8", {"selector": "hybrid", "auto_coverage": 0.8}, "auto"),
    ],
    "placement": [
        ("hybrid r=0.15 (check layer 1)", {"selector": "hybrid"}, 0.15),
        ("hybrid, check layer 2", {"selector": "hybrid", "check_layer": 2}, 0.15),
        ("hybrid, check layer 4", {"selector": "hybrid", "check_layer": 4}, 0.15),
        ("hybrid, funnel 2 (2r at layer 1 -> r at layer 2)", {"selector": "hybrid", "funnel": 2.0}, 0.15),
        ("hybrid, funnel 3", {"selector": "hybrid", "funnel": 3.0}, 0.15),
        ("hybrid, per-chunk budget", {"selector": "hybrid", "budget": "per_chunk"}, 0.15),
        ("deviation r=0.15", {"selector": "deviation"}, 0.15),
        ("deviation, funnel 2", {"selector": "deviation", "funnel": 2.0}, 0.15),
        ("deviation, per-chunk budget", {"selector": "deviation", "budget": "per_chunk"}, 0.15),
        ("query, per-chunk budget", {"selector": "query", "budget": "per_chunk"}, 0.15),
    ],
    "lookahead": [
        ("hybrid r=0.15 (look-ahead through all 30 layers)", {"selector": "hybrid"}, 0.15),
        ("hybrid, look-ahead layers 0-19", {"selector": "hybrid", "query_layers": L[:20]}, 0.15),
        ("hybrid, look-ahead to layer 19, signal from 10-19", {"selector": "hybrid", "query_layers": L[10:20]}, 0.15),
        ("hybrid, look-ahead layers 0-14", {"selector": "hybrid", "query_layers": L[:15]}, 0.15),
        ("hybrid, look-ahead to layer 14, signal from 5-14", {"selector": "hybrid", "query_layers": L[5:15]}, 0.15),
        ("hybrid, look-ahead layers 0-9", {"selector": "hybrid", "query_layers": L[:10]}, 0.15),
        ("deviation r=0.15", {"selector": "deviation"}, 0.15),
        ("chunk_heads r=0.15", {"selector": "chunk_heads"}, 0.15),
    ],
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="daser-rag bench ablation", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="budget")
    ap.add_argument("--variants", default="", help="JSON list of [name, BlendConfig overrides, ratio] (instead)")
    ap.add_argument("-n", "--n", type=int, default=16, help="prompts")
    ap.add_argument("--answer-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import torch

    from benchmarks.harness import FULL, Harness, blend_mode
    from daser_rag.engine.factory import build_generator
    from daser_rag.evaluation import fidelity_prompts

    torch.set_num_threads(args.threads)
    variants = [tuple(v) for v in json.loads(args.variants)] if args.variants else PRESETS[args.preset]
    gen = build_generator(cache_dir=tempfile.mkdtemp(prefix="daser-ablation-"))
    h = Harness(gen, answer_tokens=args.answer_tokens)
    base = gen.blend
    stats = {v[0]: {"agree": 0, "steps": 0, "kl": 0.0, "ident": 0, "share": 0.0, "speedup": []} for v in variants}
    prompts = fidelity_prompts(gen, n=args.n, seed=1)
    t0 = time.perf_counter()
    for question, chunks in prompts:
        h.ingest(chunks)
        ref = h.run(FULL, question, chunks)
        for name, over, ratio in variants:
            gen.blend = replace(base, **{k: tuple(v) if isinstance(v, list) else v for k, v in over.items()})
            r = h.run(blend_mode(ratio), question, chunks, ref)
            s = stats[name]
            s["agree"] += r.fidelity.agree
            s["steps"] += r.fidelity.total
            s["kl"] += r.fidelity.kl_sum
            s["ident"] += int(r.answer_ids == ref.answer_ids)
            s["share"] += r.share
            s["speedup"].append(ref.ttft_s / r.ttft_s)
    n = len(prompts)
    print(f"{n} prompts, {(time.perf_counter() - t0) / 60:.0f} min; sorted by mean KL vs full prefill\n")
    print("| variant | share | top-1 | mean KL | greedy identical | TTFT speed-up (median, paired) |\n"
          "|---|---:|---:|---:|---:|---:|")
    for name, s in sorted(stats.items(), key=lambda kv: kv[1]["kl"] / max(1, kv[1]["steps"])):
        print(f"| {name} | {s['share'] / n:.2f} | {s['agree'] / s['steps']:.3f} | {s['kl'] / s['steps']:.4f} | "
              f"{s['ident'] / n:.0%} | {statistics.median(s['speedup']):.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
