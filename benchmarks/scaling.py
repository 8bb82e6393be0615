"""How cost grows with work: TTFT against context length and against the number of chunks.

Two sweeps, same question (benchmarks.ttft.QUESTION), chunks cut from long Language
Reference topics:
- context length: 1k / 2k / 4k / 8k tokens in 4 chunks;
- chunk count: 2..10 chunks of 400 tokens.
At each point every mode runs on the same prompt back to back (full prefill first, the others
rotated), repeated; the median TTFT is reported, plus teacher-forced top-1 agreement and KL
over a short answer. The prefix cache here holds only the index-time priming (each chunk after
the system prefix): a repeat of the very same prompt would otherwise be a trivial full hit.

`daser-rag bench scaling [--quick] [--contexts 1000,2000] [--chunks 2,4]` runs only this part.
"""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks.harness import Harness, Run, standard_modes
from benchmarks.ttft import QUESTION, make_chunks
from daser_rag.evaluation import Fidelity

SCALING_TOPICS = ("specialnames", "compound", "types", "formatstrings", "string-methods", "typesseq")


def _point(h: Harness, cfg: Any, n_chunks: int, chunk_tokens: int, log: Any) -> dict[str, Any]:
    gen = h.gen
    chunks = make_chunks(gen, n_chunks, chunk_tokens, SCALING_TOPICS)
    h.ingest(chunks)
    modes = standard_modes(cfg.scaling_ratios)
    ctx = len(gen.prompt_ids(QUESTION, chunks)) - len(gen.prompt.query_ids(QUESTION))
    repeats = 1 if ctx > cfg.single_repeat_above else cfg.scaling_repeats
    runs: dict[str, list[Run]] = {m.name: [] for m in modes}
    for rep in range(repeats):
        rs = h.request(QUESTION, chunks, modes, rotate=rep, answer_tokens=cfg.scaling_answer_tokens)
        for name, r in rs.items():
            runs[name].append(r)
    full_med = statistics.median(r.ttft_s for r in runs[modes[0].name])
    rows = []
    for m in modes:
        rs = runs[m.name]
        fid = Fidelity()
        for r in rs:
            fid.agree += r.fidelity.agree
            fid.total += r.fidelity.total
            fid.kl_sum += r.fidelity.kl_sum
        med = statistics.median(r.ttft_s for r in rs)
        rows.append({"mode": m.name, "kind": m.kind, "ratio": m.ratio if m.kind == "blend" else None,
                     "ttft_median_s": med, "ttft_all_s": [r.ttft_s for r in rs], "speedup_vs_full": full_med / med,
                     "reused_tokens": rs[0].reused_tokens, "top1_agreement": fid.top1, "mean_kl": fid.mean_kl})
    log(f"  {n_chunks} chunks x {chunk_tokens} -> {ctx} context tokens (x{repeats}): " + ", ".join(
        f"{r['mode'].replace('daser ', '')} {r['ttft_median_s']:.2f}s" for r in rows))
    return {"n_chunks": n_chunks, "chunk_tokens": chunk_tokens, "context_tokens": ctx, "repeats": repeats,
            "modes": rows}


def run_scaling(h: Harness, cfg: Any, log: Any = print) -> dict[str, Any]:
    prefix_len = len(h.gen.prompt.prefix_ids)
    ctx_points = []
    for target in cfg.scaling_contexts:
        per_chunk = (target - prefix_len) // cfg.scaling_context_chunks
        ctx_points.append(_point(h, cfg, cfg.scaling_context_chunks, per_chunk, log))
    chunk_points = [_point(h, cfg, n, cfg.scaling_chunk_tokens, log) for n in cfg.scaling_chunk_counts]
    return {"question": QUESTION, "context": ctx_points, "chunks": chunk_points,
            "answer_tokens": cfg.scaling_answer_tokens}


def _table(points: list[dict[str, Any]], md: bool) -> list[str]:
    if not points:
        return []
    names = [r["mode"] for r in points[0]["modes"]]
    if md:
        out = ["| context tokens | chunks | " + " | ".join(names) + " | top-1 agreement (" + ", ".join(names[1:]) + ") |",
               "|---:|---:|" + "---:|" * len(names) + "---|"]
        for p in points:
            rows = p["modes"]
            cells = [f"{rows[0]['ttft_median_s']:.3f} s"]
            cells += [f"{r['ttft_median_s']:.3f} s ({r['speedup_vs_full']:.1f}x)" for r in rows[1:]]
            out.append(f"| {p['context_tokens']} | {p['n_chunks']} | " + " | ".join(cells) + " | "
                       + ", ".join(f"{r['top1_agreement']:.2f}" for r in rows[1:]) + " |")
        return out
    out = [f"{'ctx':>6}{'chunks':>7}" + "".join(f"{n:>18}" for n in names) + "   top-1 (non-full modes)"]
    for p in points:
        rows = p["modes"]
        cells = [f"{rows[0]['ttft_median_s']:>17.3f}s"]
        cells += [f"{r['ttft_median_s']:>9.3f}s ({r['speedup_vs_full']:>4.1f}x)" for r in rows[1:]]
        out.append(f"{p['context_tokens']:>6}{p['n_chunks']:>7}" + "".join(cells) + "   "
                   + " ".join(f"{r['top1_agreement']:.2f}" for r in rows[1:]))
    return out


def format_scaling(s: dict[str, Any]) -> str:
    return "\n".join(["scaling: TTFT median (speed-up vs full prefill)", "by context length:",
                      *_table(s["context"], False), "by chunk count:", *_table(s["chunks"], False)])


def markdown_scaling(s: dict[str, Any]) -> str:
    parts = [f"**Scaling** (median TTFT; top-1 agreement over a {s['answer_tokens']}-token answer):", ""]
    if s["context"]:
        parts += ["By context length:", "", *_table(s["context"], True), ""]
    if s["chunks"]:
        parts += ["By number of chunks:", "", *_table(s["chunks"], True)]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    from benchmarks import suite

    args = list(argv or [])
    for flag, dest in (("--contexts", "--scaling-contexts"), ("--chunks", "--scaling-chunks")):
        args = [dest if a == flag else a for a in args]
    p = suite.build_parser()
    ns = p.parse_args(args)
    cfg = suite.config_from_args(ns)
    if ns.threads is not None:
        import torch

        torch.set_num_threads(ns.threads)
    from pathlib import Path

    from daser_rag.engine.generator import CacheAwareGenerator
    from daser_rag.kv.store import KVStore

    gen = CacheAwareGenerator(ns.model, store=KVStore(None, codec=cfg.codec, host_bytes=8 << 30), device=ns.device)
    h = Harness(gen, answer_tokens=cfg.answer_tokens)
    res = {"scaling": run_scaling(h, cfg, lambda *a: print(*a, flush=True))}
    print(format_scaling(res["scaling"]))
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    import json

    (out / "scaling.json").write_text(json.dumps(res, indent=1), encoding="utf-8")
    from benchmarks import plots

    plots.write_scaling(res["scaling"], out)
    print(f"wrote {out / 'scaling.json'}")


if __name__ == "__main__":
    main()
