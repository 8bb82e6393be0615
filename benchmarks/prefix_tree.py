"""`daser-rag bench prefix_tree`: is exact-first (the prefix tree) worth turning on by default?

A RAG trace where retrieved documents come back in a new set, the same set reordered, or the
same set in the same order (a repeated or popular query), run side by side per request:
full prefill (the reference), the default blend with the prefix tree off, and the same with
the prefix tree on (`PrefixTree(materialize_after=2)`: the second time an ordered chunk path is
requested, its chunks are computed after the whole path and stored, and every later request
starting with that path uses them as an exact run). Per mode and request kind: mean TTFT and
the paired speed-up over full prefill, teacher-forced top-1 and mean KL vs full prefill, greedy
answers identical to full prefill's, and the share of context tokens served exactly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.harness import FULL, Harness, Mode
from benchmarks.markdown import replace_marked

KINDS = ("new", "reorder", "repeat")
TOPICS = ("pass", "break", "continue", "del", "assert", "global", "for", "return", "raise", "import", "while",
          "if", "try", "with", "class", "function")
QUESTIONS = ("Which of these statements ends a loop early?", "What does the first document describe?",
             "Summarize how these statements change control flow.", "Which statement is a no-op?",
             "What happens to names bound in this code?", "Which statement can raise an error?")


def make_trace(n: int, per_request: int, n_docs: int, repeat_share: float, seed: int) -> list[dict[str, Any]]:
    """Request kinds: `new` (a random set and order), `reorder` (an earlier set, new order),
    `repeat` (an earlier set in the same order, with another question)."""
    rng = random.Random(seed)
    seen: list[list[int]] = []
    out = []
    for i in range(n):
        r = rng.random()
        kind = "new" if not seen or i < 2 else ("repeat" if r < repeat_share else ("reorder" if r < 0.75 else "new"))
        if kind == "new":
            docs = rng.sample(range(n_docs), per_request)
        elif kind == "repeat":
            docs = list(rng.choice(seen))
        else:
            docs = list(rng.choice(seen))
            while len(docs) > 1 and docs == seen[-1]:
                rng.shuffle(docs)
            rng.shuffle(docs)
        seen.append(docs)
        out.append({"kind": kind, "docs": docs, "question": QUESTIONS[i % len(QUESTIONS)]})
    return out


def run(gen: Any, trace: list[dict[str, Any]], chunks: list[str], ratio: float, answer_tokens: int,
        log: Any = print, materialize: str = "inline", back_to_back: bool = False, burst: int = 0,
        gap_s: float = 0.0, stats: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """`materialize`: "inline" (the request crossing the threshold computes the path) or
    "background" (engine/materialize.py computes it after the request, in idle time, which this
    trace grants between requests: the background seconds are reported, never charged to a TTFT).
    `back_to_back`: grant no idle time; the next request starts at once, so background work only
    gets the gaps the engine's own idle rule (`engine.prefix_tree_idle_ms`) finds and is
    preempted at a layer boundary when a request wants the model: what a busy service sees.
    `burst` > 0 (background only): bursty traffic, what a service sees between those extremes:
    `burst` requests back to back, then `gap_s` seconds in which no request arrives; the
    materializer runs under the engine's own idle rule, as in a service, and nothing waits for it."""
    if burst < 0 or gap_s < 0:
        raise ValueError(f"burst and gap_s must be >= 0, got {burst} and {gap_s}")
    if burst and materialize != "background":
        raise ValueError("bursts with idle gaps only make sense with background materialization")
    if burst:
        back_to_back = True
    from daser_rag.blend.prefix_tree import PrefixTree
    from daser_rag.engine.materialize import BackgroundMaterializer

    h = Harness(gen, answer_tokens=answer_tokens)
    h.ingest(chunks)
    tree = PrefixTree(materialize_after=2)
    mat = None
    if materialize == "background":
        mat = BackgroundMaterializer(gen.assembler, gen.lock) if back_to_back else \
            BackgroundMaterializer(gen.assembler, gen.lock, idle_s=0.0)
    off = Mode(f"blend r={ratio:g}, tree off", "blend", ratio)
    arrival = f", bursts of {burst}, {gap_s:g} s idle" if burst else (", back-to-back" if back_to_back else "")
    on = Mode(f"blend r={ratio:g}, tree on ({materialize}{arrival})", "blend", ratio)
    rows = []
    for i, tr in enumerate(trace):
        ctx = [chunks[d] for d in tr["docs"]]
        ref = h.run(FULL, tr["question"], ctx, answer_tokens=answer_tokens)
        rows.append(_row(i, tr, ref, ref))
        order = [off, on] if i % 2 == 0 else [on, off]  # neither always runs second
        for m in order:
            gen.assembler.prefix_tree = tree if m is on else None
            gen.assembler.materializer = mat if m is on else None
            r = h.run(m, tr["question"], ctx, ref, answer_tokens=answer_tokens)
            rows.append(_row(i, tr, r, ref))
            if mat is not None and m is on and not back_to_back:  # idle time after the request: background work
                t0 = time.perf_counter()
                mat.wait_idle(600)
                rows[-1]["background_s"] = time.perf_counter() - t0
        gen.assembler.prefix_tree = None
        gen.assembler.materializer = None
        log(f"[{i + 1}/{len(trace)}] {tr['kind']:7s} " + ", ".join(
            f"{r['mode']} {r['ttft_s'] * 1000:.0f} ms" for r in rows[-3:]))
        if burst and (i + 1) % burst == 0 and i + 1 < len(trace):
            time.sleep(gap_s)  # no request arrives: the engine is idle, the materializer may run
    if mat is not None:
        log(f"background materializer: {mat.stats}")
        if stats is not None:
            stats.update(dataclasses.asdict(mat.stats))
            w = gen.lock.background_waits  # the only way background work can delay a request
            stats.update(request_waits=w.count, request_wait_max_ms=round(w.max_s * 1000, 1),
                         request_wait_total_ms=round(w.total_s * 1000, 1))
        mat.close()
    return rows


def _row(i: int, tr: dict[str, Any], r: Any, ref: Any) -> dict[str, Any]:
    return {"request": i, "kind": tr["kind"], "mode": r.mode, "ttft_s": r.ttft_s,
            "full_ttft_s": ref.ttft_s, "steps": r.fidelity.total, "agree": r.fidelity.agree,
            "kl_sum": r.fidelity.kl_sum, "identical": int(r.answer_ids == ref.answer_ids),
            "context_tokens": r.reused_tokens + r.recomputed_tokens, "recomputed": r.recomputed_tokens,
            "exact": r.exact_tokens}


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["mode"], r["kind"])].append(r)
        groups[(r["mode"], "all")].append(r)
    out: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    for (mode, kind), rs in groups.items():
        steps = sum(r["steps"] for r in rs) or 1
        out[mode][kind] = {
            "requests": len(rs), "ttft_s": statistics.fmean(r["ttft_s"] for r in rs),
            "speedup": statistics.median(r["full_ttft_s"] / r["ttft_s"] for r in rs),
            "top1": sum(r["agree"] for r in rs) / steps, "mean_kl": sum(r["kl_sum"] for r in rs) / steps,
            "identical": statistics.fmean(r["identical"] for r in rs),
            "exact_share": sum(r["exact"] for r in rs) / max(1, sum(r["context_tokens"] for r in rs)),
            "ttft_p50_s": _pct([r["ttft_s"] for r in rs], 0.5), "ttft_p90_s": _pct([r["ttft_s"] for r in rs], 0.9),
            "ttft_max_s": max(r["ttft_s"] for r in rs),
            "background_s": sum(r.get("background_s", 0.0) for r in rs),
        }
    return dict(out)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def table(summary: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = ["| mode | requests | exact context | TTFT mean | TTFT p50 / p90 / max | paired speed-up (median) "
             "| top-1 | mean KL | greedy identical | background work |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for mode, kinds in summary.items():
        for kind in ("all", *KINDS):
            v = kinds.get(kind)
            if v is None:
                continue
            bg = f"{v['background_s']:.1f} s" if v["background_s"] else "-"
            lines.append(f"| {mode} | {kind} ({v['requests']}) | {v['exact_share']:.0%} | {v['ttft_s'] * 1000:.0f} ms | "
                         f"{v['ttft_p50_s'] * 1000:.0f} / {v['ttft_p90_s'] * 1000:.0f} / {v['ttft_max_s'] * 1000:.0f} ms | "
                         f"{v['speedup']:.1f}x | "
                         f"{v['top1']:.3f} | {v['mean_kl']:.4f} | {v['identical']:.0%} | {bg} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="daser-rag bench prefix_tree", description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--per-request", type=int, default=4, help="documents per request")
    ap.add_argument("--docs", type=int, default=10, help="document pool")
    ap.add_argument("--repeat-share", type=float, default=0.3, help="share of requests repeating an earlier order")
    ap.add_argument("--ratio", type=float, default=0.15)
    ap.add_argument("--answer-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--materialize", choices=("inline", "background"), default="background",
                    help="how the tree-on mode stores a repeated path: in the request that crosses the threshold, "
                         "or in idle time after it (engine/materialize.py)")
    ap.add_argument("--back-to-back", action="store_true",
                    help="background mode without idle time between requests (the materializer only gets the "
                         "gaps its idle rule finds and is preempted by requests)")
    ap.add_argument("--burst", type=int, default=0,
                    help="bursty traffic (background only): this many requests back to back, then --gap-s seconds "
                         "with no request; the materializer works under the engine's own idle rule")
    ap.add_argument("--gap-s", type=float, default=5.0, help="idle seconds between bursts (with --burst)")
    ap.add_argument("--json", default="")
    ap.add_argument("--update-doc", default="", help="rewrite the marked section (--section) of this markdown file")
    ap.add_argument("--section", default="prefix-tree", help="the marked section --update-doc rewrites")
    args = ap.parse_args(argv)

    import torch

    from daser_rag.corpus import python_reference_corpus
    from daser_rag.engine.factory import build_generator

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        gen = build_generator(cache_dir=tmp)
        docs = python_reference_corpus(TOPICS[: args.docs])
        chunks = [gen.split(d.text)[0] for d in docs]  # the first chunk of each document
        trace = make_trace(args.requests, args.per_request, len(chunks), args.repeat_share, args.seed)
        t0 = time.perf_counter()
        mat_stats: dict[str, Any] = {}
        rows = run(gen, trace, chunks, args.ratio, args.answer_tokens, materialize=args.materialize,
                   back_to_back=args.back_to_back, burst=args.burst, gap_s=args.gap_s, stats=mat_stats)
        minutes = (time.perf_counter() - t0) / 60
    summary = summarize(rows)
    cmd = "daser-rag bench prefix_tree " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    counts = {k: sum(t["kind"] == k for t in trace) for k in KINDS}
    text = (f"`{cmd.strip()}`: {args.requests} requests, {args.per_request} of {len(chunks)} documents each "
            f"(first chunk, ~{statistics.fmean(r['context_tokens'] for r in rows if 'tree' in r['mode']):.0f} "
            f"context tokens), kinds {counts}, {args.answer_tokens}-token greedy answers, {minutes:.0f} min, "
            f"torch threads {torch.get_num_threads()}:\n\n" + table(summary))
    if mat_stats:
        text += ("\n\nBackground materializer: " + ", ".join(f"{k} {v}" for k, v in mat_stats.items() if k != "pending")
                 + " (paths).")
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": summary, "trace": trace, "command": cmd,
                                               "materializer": mat_stats},
                                              indent=1))
    if args.update_doc:
        replace_marked(Path(args.update_doc), args.section, text, append=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
