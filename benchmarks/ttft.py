"""TTFT: full prefill vs daser-rag blending (r=0.15 by default) vs full reuse (r=0).

Workload (issue 2): N chunks x L tokens from the Python Language Reference + a ~32-token
question. Chunk KV is precomputed first (that is index-time work, not counted). Modes are
interleaved per repetition so machine noise hits all of them alike; the median is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from typing import Any

from daser_rag import settings
from daser_rag.corpus import python_reference_corpus

QUESTION = ("Based on the documents above, which statements can change the normal flow of control in a loop "
            "or a function, and how do they differ from each other?")
LONG_TOPICS = ("comparisons", "import", "try", "function", "class", "with", "raise", "exceptions",
               "augassign", "for", "global", "booleans")


def make_chunks(gen: Any, n_chunks: int, chunk_tokens: int, topics: Sequence[str] = LONG_TOPICS) -> list[str]:
    """n_chunks texts of about chunk_tokens tokens each, cut from long reference topics."""
    docs = python_reference_corpus(tuple(topics))
    out: list[str] = []
    tok = gen.tokenizer
    for d in docs:
        ids = tok(d.text, add_special_tokens=False)["input_ids"]
        start = 0
        while start + chunk_tokens <= len(ids) and len(out) < n_chunks:
            out.append(tok.decode(ids[start:start + chunk_tokens]))
            start += chunk_tokens
        if len(out) >= n_chunks:
            break
    if len(out) < n_chunks:
        raise ValueError(f"corpus too small for {n_chunks} chunks of {chunk_tokens} tokens")
    return out


def parse_mode(spec: str) -> tuple[str, dict[str, Any]]:
    """'0.15' (the default selector), 'hybrid:0.15', 'query:auto' -> (name, generate() options)."""
    sel, _, r = spec.rpartition(":")
    ratio: float | str = r if r == "auto" else float(r)
    name = f"daser r={r}" if not sel else f"{sel} r={r}"
    return name, {"recompute_ratio": ratio, **({"selector": sel} if sel else {})}


def measure_modes(
    gen: Any, chunks: list[str], question: str, ratios: Sequence[float | str], repeats: int
) -> dict[str, list[float]]:
    modes: list[tuple[str, dict[str, Any]]] = [("full prefill", {"use_cache": False})]
    modes += [parse_mode(str(r) if isinstance(r, str) else f"{r:g}") for r in ratios]
    gen.generate(question, chunks, max_new_tokens=1)  # precompute + warm-up (not timed)
    gen.generate(question, chunks, max_new_tokens=1, use_cache=False)
    times: dict[str, list[float]] = {name: [] for name, _ in modes}
    for _ in range(repeats):
        for name, kw in modes:
            res = gen.generate(question, chunks, max_new_tokens=1, **kw)
            times[name].append(res.timings.ttft_s)
    return times


def run_ttft_benchmark(
    gen: Any, *, n_chunks: int = 4, chunk_tokens: int = settings.CHUNK_TOKENS.default,
    ratios: Sequence[float | str] | None = None,
    repeats: int = 3, question: str = QUESTION,
) -> dict[str, Any]:
    ratios = ratios if ratios is not None else [0.15, 0.0]
    chunks = make_chunks(gen, n_chunks, chunk_tokens)
    q_tokens = len(gen.prompt.query_ids(question))
    ctx_tokens = len(gen.prompt_ids(question, chunks)) - q_tokens
    times = measure_modes(gen, chunks, question, ratios, repeats)
    full = statistics.median(times["full prefill"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"mode": name, "ttft_median_s": med, "ttft_min_s": min(ts), "speedup_vs_full": full / med,
                     "paired_speedup_median": statistics.median(f / t for f, t in zip(times["full prefill"], ts))})
    return {"n_chunks": n_chunks, "chunk_tokens": chunk_tokens, "context_tokens": ctx_tokens,
            "question_tokens": q_tokens, "repeats": repeats, "rows": rows}


def format_table(result: dict[str, Any]) -> str:
    lines = [f"context {result['context_tokens']} tokens ({result['n_chunks']} chunks x ~{result['chunk_tokens']}), "
             f"question {result['question_tokens']} tokens, median of {result['repeats']}",
             f"{'mode':<22}{'TTFT (s)':>10}{'min (s)':>10}{'speed-up':>10}{'paired':>9}"]
    for r in result["rows"]:
        lines.append(f"{r['mode']:<22}{r['ttft_median_s']:>10.3f}{r['ttft_min_s']:>10.3f}"
                     f"{r['speedup_vs_full']:>9.1f}x{r['paired_speedup_median']:>8.1f}x")
    return "\n".join(lines)


def markdown_table(result: dict[str, Any], command: str) -> str:
    lines = [f"`{command}`: {result['n_chunks']} chunks x {result['chunk_tokens']} tokens "
             f"({result['context_tokens']} context tokens) + a {result['question_tokens']}-token question, median of "
             f"{result['repeats']} interleaved repetitions:", "",
             "| mode | TTFT | speed-up | paired speed-up (median) |", "|---|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['mode']} | {r['ttft_median_s']:.3f} s | {r['speedup_vs_full']:.1f}x | "
                     f"{r['paired_speedup_median']:.1f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from daser_rag.engine.factory import build_generator
    from daser_rag.kv.store import KVStore

    ap = argparse.ArgumentParser(prog="daser-rag bench ttft", description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--chunk-tokens", type=int, default=settings.CHUNK_TOKENS.default)
    ap.add_argument("--ratios", default="0.15,0",
                    help="comma-separated modes: a share or 'auto' (the default selector), or SELECTOR:SHARE, "
                         "e.g. deviation:0.15,hybrid:0.15,hybrid:auto,0")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--codec", default=settings.CODEC.default, choices=list(settings.CODECS))
    ap.add_argument("--json", default=None, help="also write the result here")
    ap.add_argument("--readme", default=None, help="rewrite the marked TTFT table (readme-ttft) of this markdown file")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    # the same chunks every repeat: with the prefix tree they would turn exact, and this measures blending
    gen = build_generator(args.model, store=KVStore(None, codec=args.codec), prefix_tree="off")
    specs = [x for x in args.ratios.split(",") if x]
    res = run_ttft_benchmark(gen, n_chunks=args.chunks, chunk_tokens=args.chunk_tokens, ratios=specs,
                             repeats=args.repeats)
    print(format_table(res))
    if args.readme:
        from pathlib import Path

        from benchmarks.markdown import replace_marked

        command = "daser-rag bench ttft " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
        replace_marked(Path(args.readme), "readme-ttft", markdown_table(res, command.strip()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
