"""`daser-rag bench selection`: which tokens to recompute, measured side by side.

Every selector runs at the same recompute shares (plus r=0, "auto", and full prefill as the
reference) on the same prompts, back to back per prompt. Two prompt sets:

- `qa`: the Language Reference QA trace (daser_rag.corpus.QA_BENCH, answer document among the
  others), the text selection was tuned on;
- `stdlib`: a held-out set of >= 100 cloze questions over standard-library docstrings
  (benchmarks/evalset.py), answer document first, in the middle or last.

Per selector and share: teacher-forced top-1 agreement and mean KL vs full prefill along full
prefill's greedy answer (up to --answer-tokens steps), exact agreement and token F1 of the
greedy answer vs full prefill's, QA accuracy (answer substring), mean recompute share chosen,
TTFT and the speed-up over full prefill measured in the same run. Writes JSON, a markdown table,
and a PNG of fidelity vs recompute share and vs speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.harness import FULL, Harness, Mode, Run, blend_mode
from benchmarks.markdown import replace_marked
from benchmarks.quality import normalize

DEFAULT_SHARES = (0.05, 0.1, 0.15, 0.2, 0.3)
DEFAULT_SELECTORS = ("deviation", "query", "hybrid", "chunk_heads")
AUTO_SELECTORS = ("query", "hybrid")


def token_f1(candidate: str, reference: str) -> float:
    a, b = normalize(candidate).split(), normalize(reference).split()
    if not a and not b:
        return 1.0
    common = sum((Counter(a) & Counter(b)).values())
    if common == 0:
        return 0.0
    p, r = common / len(a), common / len(b)
    return 2 * p * r / (p + r)


def prompt_sets(gen: Any, which: str, n: int, seed: int) -> dict[str, list[dict[str, Any]]]:
    from benchmarks.evalset import build_evalset
    from daser_rag.corpus import QA_BENCH, python_reference_corpus

    out: dict[str, list[dict[str, Any]]] = {}
    if which in ("qa", "both"):
        docs = {d.doc_id: d for d in python_reference_corpus()}
        items = []
        for qa in QA_BENCH[: n or None]:
            if all(i in docs for i in qa.doc_ids):
                items.append({"question": qa.question, "chunks": [gen.split(docs[i].text)[0] for i in qa.doc_ids],
                              "answers": list(qa.answers), "position": "last", "idx": len(items)})
        out["qa"] = items
    if which in ("stdlib", "both"):
        items = build_evalset(gen.split, n=n or 120, seed=seed)
        out["stdlib"] = [{"question": it.question, "chunks": list(it.chunks), "answers": list(it.answers),
                          "position": it.position, "idx": k} for k, it in enumerate(items)]
    return out


def modes_for(selectors: list[str], shares: list[float], auto: list[str]) -> list[Mode]:
    """`selectors` items are names ("hybrid": every share) or name:share/share ("query:0.15":
    only those shares), so a long run can spend its time on the selectors that matter most."""
    modes = [FULL, blend_mode(0.0)]
    for spec in selectors:
        sel, _, own = spec.partition(":")
        modes += [blend_mode(s, sel) for s in ([float(x) for x in own.split("/")] if own else shares)]
        if sel in auto:
            modes.append(blend_mode("auto", sel))
    return modes


def shard_items(items: list[dict[str, Any]], shard: str) -> list[dict[str, Any]]:
    """Items i with i % k == j for shard "j/k" (keeping their index), so k processes with one
    torch thread each share a long run; `--merge` joins their JSON files."""
    if not shard:
        return items
    j, k = (int(x) for x in shard.split("/"))
    if not 0 <= j < k:
        raise SystemExit(f"--shard must be j/k with 0 <= j < k, got {shard!r}")
    return [it for it in items if it["idx"] % k == j]


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    by_mode: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_mode[r["mode"]].append(r)
    full_ttft = {r["item"]: r["ttft_s"] for r in by_mode.get(FULL.name, [])}
    out = {}
    for mode, rs in by_mode.items():
        steps = sum(r["steps"] for r in rs)
        out[mode] = {
            "selector": rs[0]["selector"], "ratio": rs[0]["ratio"], "prompts": len(rs),
            "top1": sum(r["agree"] for r in rs) / steps if steps else 0.0,
            "mean_kl": sum(r["kl_sum"] for r in rs) / steps if steps else 0.0,
            "greedy_identical": statistics.mean(r["identical"] for r in rs),
            "token_f1": statistics.mean(r["f1"] for r in rs),
            "qa_accuracy": statistics.mean(r["correct"] for r in rs),
            "share": statistics.mean(r["share"] for r in rs),
            "ttft_s": statistics.mean(r["ttft_s"] for r in rs),
            # paired with the full prefill of the same prompt in the same run
            "speedup": statistics.median(r.get("full_ttft_s", full_ttft.get(r["item"], 0.0)) / r["ttft_s"]
                                         for r in rs if "full_ttft_s" in r or r["item"] in full_ttft),
        }
    return out


def run_set(h: Harness, items: list[dict[str, Any]], modes: list[Mode], answer_tokens: int,
            set_name: str, log: bool = True, checkpoint: Any = None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for n, it in enumerate(items):
        i = it["idx"]
        h.ingest(it["chunks"])
        runs = h.request(it["question"], it["chunks"], modes, answer_tokens=answer_tokens, rotate=i)
        ref: Run = runs[FULL.name]
        for m in modes:
            r = runs[m.name]
            rows.append({
                "set": set_name, "item": i, "position": it["position"], "mode": m.name, "full_ttft_s": ref.ttft_s,
                "selector": m.selector or ("full" if m.kind == "full" else "default"), "ratio": m.ratio,
                "ttft_s": r.ttft_s, "steps": r.fidelity.total, "agree": r.fidelity.agree,
                "kl_sum": r.fidelity.kl_sum, "identical": int(r.answer_ids == ref.answer_ids),
                "f1": token_f1(r.answer, ref.answer),
                "correct": int(any(a.lower() in r.answer.lower() for a in it["answers"])),
                "share": r.share,
            })
        if checkpoint is not None:
            checkpoint(rows)
        if log:
            s = summarize(rows)
            best = sorted(((v["mean_kl"], k) for k, v in s.items() if k != FULL.name))[:3]
            print(f"[{set_name} {n + 1}/{len(items)}] lowest KL so far: "
                  + ", ".join(f"{k} {kl:.4f}" for kl, k in best), flush=True)
    return rows


def results_for(rows: list[dict[str, Any]]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in dict.fromkeys(r["set"] for r in rows):
        rs = [r for r in rows if r["set"] == name]
        results[name] = summarize(rs)
        by_pos = {p: summarize([r for r in rs if r["position"] == p]) for p in ("first", "middle", "last")}
        results[f"{name}:by_position"] = {p: v for p, v in by_pos.items() if v}
    return results


def merge_runs(parts: list[dict[str, Any]], out: str) -> dict[str, Any]:
    """One run from the JSON of several parts: --shard parts of one command, and runs that add
    selectors on the same prompts (their own full prefill and r=0 rows, which every run has, are
    dropped in favour of the first part's; a blend mode measured twice is an error). Speed-ups
    stay paired with the full prefill of the run that timed them."""
    rows, seen = [], set()
    for p in parts:
        for r in p["rows"]:
            key = (r["set"], r["item"], r["mode"])
            if key in seen:
                if r["selector"] in ("full", "default"):
                    continue
                raise SystemExit(f"--merge: the parts overlap ({r['mode']} on prompt {r['item']} twice)")
            seen.add(key)
            rows.append(r)
    rows.sort(key=lambda r: (r["set"], r["item"]))
    commands = []
    for p in parts:
        words, kept = p.get("command", "").split(" "), []
        for i, w in enumerate(words):
            if w == "--shard" or (i and words[i - 1] == "--shard") or w == "--json" or (i and words[i - 1] == "--json"):
                continue
            kept.append(w)
        if " ".join(kept) not in commands:
            commands.append(" ".join(kept))
    command = " ; ".join(c + f" --json {out}" for c in commands) if len(commands) > 1 else f"{commands[0]} --json {out}"
    first = parts[0]
    by_command: dict[str, list[float]] = defaultdict(list)  # shards of one command ran side by side
    for p in parts:
        by_command[p.get("command", "").split(" --shard")[0]].append(p.get("minutes", 0.0))
    per_run = max(len(v) for v in by_command.values())
    return {"results": results_for(rows), "rows": rows, "blend": first["blend"],
            "partial": any(p.get("partial") for p in parts), "command": command,
            "minutes": sum(max(v) for v in by_command.values()), "machine": first.get("machine", ""),
            "threads": f"{first.get('threads')} ({per_run} processes side by side)" if per_run > 1 else first.get("threads")}


def format_table(summary: dict[str, dict[str, Any]], modes: list[Mode]) -> str:
    lines = ["| selector | r | share | top-1 | mean KL | greedy identical | token F1 | QA acc | TTFT | speed-up |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in modes:
        v = summary.get(m.name)
        if v is None:
            continue
        r = "-" if m.kind == "full" else (m.ratio if m.ratio == "auto" else f"{m.ratio:g}")
        lines.append(f"| {v['selector']} | {r} | {v['share']:.2f} | {v['top1']:.3f} | {v['mean_kl']:.4f} | "
                     f"{v['greedy_identical']:.0%} | {v['token_f1']:.3f} | {v['qa_accuracy']:.0%} | "
                     f"{v['ttft_s'] * 1000:.0f} ms | {v['speedup']:.1f}x |")
    return "\n".join(lines)


def plot(results: dict[str, dict[str, dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(results)
    fig, axes = plt.subplots(len(sets), 2, figsize=(11, 4 * len(sets)), squeeze=False)
    for row, name in enumerate(sets):
        summ = results[name]
        sels = sorted({v["selector"] for v in summ.values()} - {"full", "default"})
        for sel in sels:
            pts = sorted((v["share"], v["mean_kl"], v["speedup"], v["ratio"]) for v in summ.values()
                         if v["selector"] == sel and v["ratio"] != "auto")
            auto = [v for v in summ.values() if v["selector"] == sel and v["ratio"] == "auto"]
            line = axes[row][0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=sel)[0]
            axes[row][1].plot([p[2] for p in pts], [p[1] for p in pts], marker="o", label=sel, color=line.get_color())
            for a in auto:
                axes[row][0].scatter([a["share"]], [a["mean_kl"]], marker="*", s=160, color=line.get_color())
                axes[row][1].scatter([a["speedup"]], [a["mean_kl"]], marker="*", s=160, color=line.get_color())
        axes[row][0].set(xlabel="recompute share", ylabel="mean KL vs full prefill (lower is better)",
                         title=f"{name}: fidelity vs recompute share (star: auto)", yscale="log")
        axes[row][1].set(xlabel="TTFT speed-up over full prefill", ylabel="mean KL vs full prefill",
                         title=f"{name}: frontier", yscale="log")
        for ax in axes[row]:
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def parse_override(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in pairs:
        k, _, v = p.partition("=")
        out[k] = json.loads(v) if v[:1] in "[{0123456789-tfn" else v
        if isinstance(out[k], list):
            out[k] = tuple(out[k])
    return out


def modes_from_rows(rows: list[dict[str, Any]]) -> list[Mode]:
    """The modes of a saved run: reference rows first, then each selector (in the order first
    seen) by share, `auto` last."""
    seen: dict[str, Mode] = {}
    for r in rows:
        if r["mode"] not in seen:
            kind = "full" if r["selector"] == "full" else "blend"
            sel = None if r["selector"] in ("full", "default") else r["selector"]
            seen[r["mode"]] = Mode(r["mode"], kind, r["ratio"], sel)
    order = list(dict.fromkeys(m.selector for m in seen.values()))
    return sorted(seen.values(), key=lambda m: (order.index(m.selector), m.kind != "full", m.ratio == "auto",
                                                0.0 if m.ratio == "auto" else float(m.ratio)))


def rerun_command(data: dict[str, Any]) -> str:
    """The command that regenerates a saved run (recorded by the run; derived from its rows for
    JSON written before the command was recorded)."""
    if data.get("command"):  # several runs merged: "cmd1 ; cmd2"
        return " ; ".join(shlex.join(c.strip().split(" ")) for c in data["command"].split(" ; "))
    rows = data["rows"]
    sets = sorted({r["set"] for r in rows})
    blend = [m for m in modes_from_rows(rows) if m.selector]
    sels = list(dict.fromkeys(m.selector for m in blend))
    shares = list(dict.fromkeys(f"{m.ratio:g}" for m in blend if m.ratio != "auto"))
    auto = [m.selector for m in blend if m.ratio == "auto"]
    n = max(r["item"] for r in rows) + 1
    return (f"daser-rag bench selection --set {sets[0] if len(sets) == 1 else 'both'} -n {n} --selectors "
            f"{','.join(sels)} --shares {','.join(shares)} --auto {','.join(auto)} --threads 1")


def readme_table(data: dict[str, Any]) -> str:
    """The compact table README shows: per selector and share, mean KL vs full prefill, top-1
    agreement and the paired TTFT speed-up; full prefill and r=0 in the lead line."""
    name = next(k for k in data["results"] if ":" not in k)
    summ = data["results"][name]
    n = max(v["prompts"] for v in summ.values())
    modes = [m for m in modes_from_rows(data["rows"]) if m.selector]
    shares = sorted({float(m.ratio) for m in modes if m.ratio != "auto"})
    has_auto = any(m.ratio == "auto" for m in modes)
    full, r0 = summ.get(FULL.name), summ.get("daser r=0")
    lead = f"{n} held-out questions (`{rerun_command(data)}`)."
    if full and r0:
        lead += (f" Full prefill answers {full['qa_accuracy']:.0%} correctly; r=0 (full reuse): top-1 "
                 f"{r0['top1']:.3f}, mean KL {r0['mean_kl']:.3f}, {r0['speedup']:.1f}x, QA {r0['qa_accuracy']:.0%}.")
    head = "| selector | " + " | ".join(f"r={x:g}" for x in shares) + (" | auto |" if has_auto else " |")
    lines = [lead, "", "Each cell: mean KL vs full prefill / top-1 agreement / TTFT speed-up (paired, both cores busy).", "",
             head, "|---|" + "---:|" * (len(shares) + has_auto)]
    for sel in dict.fromkeys(m.selector for m in modes):
        cells = []
        for x in [*shares, *(["auto"] if has_auto else [])]:
            v = next((summ[m.name] for m in modes if m.selector == sel and
                      (m.ratio == x if x == "auto" else m.ratio != "auto" and float(m.ratio) == x)), None)
            label = "" if v is None else f"{v['mean_kl']:.3f} / {v['top1']:.3f} / {v['speedup']:.1f}x"
            if v is not None and x == "auto":
                label += f" (share {v['share']:.2f})"
            cells.append(label or "-")
        lines.append(f"| {sel} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(data: dict[str, Any], *, img: str = "", update_doc: str = "", marker: str = "",
           readme: str = "") -> str:
    results, rows = data["results"], data["rows"]
    modes = modes_from_rows(rows)
    meta = (f"; {data['minutes']:.0f} min, torch threads {data['threads']}, {data['machine']}"
            if "minutes" in data else "")
    md = [f"Regenerate: `{rerun_command(data)}` (`--render JSON` redraws from a saved run). "
          f"Default blend config: `{data['blend']}`{meta}."]
    if data.get("partial"):
        md.append("This run was stopped before it finished: the tables hold the prompts it completed.")
    sets = [k for k in results if ":" not in k]
    for name in sets:
        n_items = max(v["prompts"] for v in results[name].values())
        md += ["", f"**{name}** ({n_items} prompts)", "", format_table(results[name], modes)]
        for pos, summ in results.get(f"{name}:by_position", {}).items():
            if name == "stdlib":
                md += ["", f"{name}, answer document {pos}:", "", format_table(summ, modes)]
    text = "\n".join(md)
    if img:
        plot({k: v for k, v in results.items() if ":" not in k}, Path(img))
    if update_doc:
        pic = f"\n\n![selection: fidelity vs share and vs speed-up](img/{Path(img).name})" if img else ""
        replace_marked(Path(update_doc), marker or f"selection-{'-'.join(sets)}", text + pic, append=True)
    if readme:
        replace_marked(Path(readme), f"readme-{marker or 'selection'}", readme_table(data))
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="daser-rag bench selection", description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", default="both", choices=["qa", "stdlib", "both"])
    ap.add_argument("-n", "--n", type=int, default=0, help="prompts per set (default: all QA, 120 stdlib)")
    ap.add_argument("--selectors", default=",".join(DEFAULT_SELECTORS))
    ap.add_argument("--shares", default=",".join(f"{s:g}" for s in DEFAULT_SHARES))
    ap.add_argument("--auto", default=",".join(AUTO_SELECTORS), help="selectors also run with r=auto")
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--blend", nargs="*", default=[], help="BlendConfig overrides, e.g. query_layers=[2,3]")
    ap.add_argument("--json", default="results/selection.json")
    ap.add_argument("--img", default="", help="write the PNG here (e.g. docs/img/selection.png)")
    ap.add_argument("--update-doc", default="",
                    help="rewrite the marked section (<!-- selection-SET:begin/end -->) of this markdown file")
    ap.add_argument("--marker", default="", help="doc section name (default: selection-SET)")
    ap.add_argument("--readme", default="", help="also rewrite the README's compact table (marker readme-MARKER)")
    ap.add_argument("--render", default="", help="no run: report a saved JSON (tables, --img, --update-doc)")
    ap.add_argument("--quick", action="store_true", help="8 prompts per set, shares 0.15 and 0.3")
    ap.add_argument("--shard", default="", help="j/k: run only prompts i with i %% k == j (see --merge)")
    ap.add_argument("--merge", nargs="*", default=[], help="no run: join the JSON of --shard runs into --json")
    args = ap.parse_args(argv)
    if args.merge:
        data = merge_runs([json.loads(Path(p).read_text()) for p in args.merge], args.json)
        Path(args.json).write_text(json.dumps(data, indent=1, default=str))
        print(report(data, img=args.img, update_doc=args.update_doc, marker=args.marker, readme=args.readme))
        return 0
    if args.render:
        print(report(json.loads(Path(args.render).read_text()), img=args.img, update_doc=args.update_doc,
                     marker=args.marker, readme=args.readme))
        return 0
    if args.quick:
        args.n, args.shares = 8, "0.15,0.3"

    import platform

    import torch

    from daser_rag.engine.factory import build_generator

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        gen = build_generator(cache_dir=tmp)
        if args.blend:
            gen.blend = replace(gen.blend, **parse_override(args.blend))
        selectors = [s for s in args.selectors.split(",") if s]
        shares = [float(s) for s in args.shares.split(",") if s]
        modes = modes_for(selectors, shares, [a for a in args.auto.split(",") if a])
        h = Harness(gen, answer_tokens=args.answer_tokens)
        t0 = time.perf_counter()
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        done: list[dict[str, Any]] = []

        def save(rows: list[dict[str, Any]], partial: bool = True) -> dict[str, Any]:
            """Written after every prompt, so an interrupted run still leaves its measurements."""
            all_rows = done + rows
            data = {"results": results_for(all_rows), "rows": all_rows, "blend": str(gen.blend), "partial": partial,
                    "command": " ".join(["daser-rag", "bench", "selection", *(argv if argv is not None else sys.argv[1:])]),
                    "minutes": (time.perf_counter() - t0) / 60, "threads": torch.get_num_threads(),
                    "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}
            out.write_text(json.dumps(data, indent=1, default=str))
            return data

        for name, items in prompt_sets(gen, args.set, args.n, args.seed).items():
            done += run_set(h, shard_items(items, args.shard), modes, args.answer_tokens, name, checkpoint=save)
        data = save([], partial=False)
    print(report(data, img=args.img, update_doc=args.update_doc, marker=args.marker, readme=args.readme))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
