"""`daser-rag bench calibration`: {none, APE, adapter, APE+adapter} x {r=0, chunk_heads, hybrid}.

Two steps, both reproducible from this file:

1. `--train DIR`: calibrate on the bundled Python Language Reference topics (the training
   documents; part of them held out by the calibration's own check), preparing the prompts
   once and fitting variants on them: `ape` (per-layer/per-head key and value scales on
   reused context, no new tokens), `bias` (those scales plus per-layer/per-head key and value
   biases), `adapter` (4 learned link tokens, no scales), `both`, `map` (the token map alone,
   fitted by regression) and `map_bias` (the map, then scales and biases by KL on top of it);
   `*_r15` are fitted at the
   default repair (hybrid, r = 0.15) instead of full reuse.
   Writes DIR/{ape,adapter,both}.safetensors, their loss curves, and DIR/train.json.
2. measure (default): the held-out stdlib grid (benchmarks/evalset.py: standard-library
   docstrings, none of which the calibration saw), answer document last by default; per
   variant and mode, top-1 agreement and mean KL vs full prefill along full prefill's greedy
   answer, the share of identical greedy answers, QA accuracy and the paired TTFT speed-up.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_R0 = {"fit_share": 0.0, "primer_tokens": 0}  # explicit: CalibrationConfig's default share is the engine's (0.15)
_R15 = {"fit_share": 0.15, "fit_selector": "hybrid", "primer_tokens": 0}
_PRIMED = {"fit_share": 0.0, "primer_tokens": 512, "primers": 1}  # explicit: the default is 4
VARIANTS: dict[str, dict[str, Any]] = {
    # fitted for full reuse (r = 0)
    "ape": {"scales": True, "biases": False, "link_tokens": 0, "token_map": False, **_R0},
    "adapter": {"scales": False, "biases": False, "link_tokens": 4, "token_map": False, **_R0},
    "both": {"scales": True, "biases": False, "link_tokens": 4, "token_map": False, **_R0},
    "bias": {"scales": True, "biases": True, "link_tokens": 0, "token_map": False, **_R0},  # scales + biases
    "map": {"scales": False, "biases": False, "link_tokens": 0, "token_map": True, **_R0},  # the token map alone
    "map_l1": {"scales": False, "biases": False, "link_tokens": 0, "token_map": True, "token_map_ridge": 1.0, **_R0},
    "map_bias": {"scales": True, "biases": True, "link_tokens": 0, "token_map": True, **_R0},  # map, then KL
    # reused chunks computed after a 512-token primer from the training documents
    "primer": {"scales": False, "biases": False, "link_tokens": 0, "token_map": False, **_PRIMED},
    "primer_map": {"scales": False, "biases": False, "link_tokens": 0, "token_map": True, "token_map_ridge": 1.0,
                   **_PRIMED},
    # each reused chunk's K/V averaged over 4 primers (from 4 training prompts)
    "primer4_map": {"scales": False, "biases": False, "link_tokens": 0, "token_map": True, "token_map_ridge": 1.0,
                    **_PRIMED, "primers": 4},
    # fitted at the default repair (hybrid, r = 0.15): the student replays that selection
    "ape_r15": {"scales": True, "biases": False, "link_tokens": 0, "token_map": False, **_R15},
    "both_r15": {"scales": True, "biases": False, "link_tokens": 4, "token_map": False, **_R15},
    "bias_r15": {"scales": True, "biases": True, "link_tokens": 0, "token_map": False, **_R15},
    "map_bias_r15": {"scales": True, "biases": True, "link_tokens": 0, "token_map": True, **_R15}}
DEFAULT_MODES = "0,chunk_heads:0.15,hybrid:0.15"


def training_documents(gen: Any, corpus: str, grid_n: int, seed: int) -> list[Any]:
    """`reference`: the bundled Language Reference topics (another domain than the grid);
    `stdlib`: standard-library docstrings minus every document any grid prompt uses (the
    user's own corpus, calibrated on its documents the grid does not ask about)."""
    from daser_rag.corpus import python_reference_corpus
    from daser_rag.types import Document

    if corpus == "reference":
        return python_reference_corpus()
    from benchmarks.evalset import build_evalset, stdlib_documents

    used = {d for it in build_evalset(gen.split, n=grid_n, seed=seed) for d in it.doc_ids}
    return [Document(d, t) for d, t in sorted(stdlib_documents().items()) if d not in used]


def train(out: Path, steps: int, train_prompts: int, held_out_prompts: int, seed: int, variants: list[str],
          chunk_tokens: int, corpus: str = "reference", grid_n: int = 100, answer_tokens: int = 8) -> dict[str, Any]:
    from daser_rag.calibration import storage
    from daser_rag.calibration.command import write_curve
    from daser_rag.calibration.train import CalibrationConfig, fit, prepare_split
    from daser_rag.engine.factory import build_generator

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        gen = build_generator(cache_dir=tmp, chunk_tokens=chunk_tokens)
        base = CalibrationConfig(steps=steps, train_prompts=train_prompts, held_out_prompts=held_out_prompts,
                                 seed=seed, answer_tokens=answer_tokens)
        docs = training_documents(gen, corpus, grid_n, seed)
        summary: dict[str, Any] = {"corpus": corpus, "documents": len(docs)}
        prepared = {}  # the same prompts, prepared once per fitted share (r > 0 adds the selection)
        for name in variants:
            opts = VARIANTS[name]
            cfg = CalibrationConfig(**{**base.__dict__, **opts})
            share_key = (cfg.fit_share, cfg.fit_selector if cfg.fit_share else "", cfg.primer_tokens, cfg.primers)
            if share_key not in prepared:
                # the same prompts at another share reuse the teacher; another primer prepares its own
                first = next((p for k, p in prepared.items() if k[2:] == share_key[2:]), None)
                with_map = any(VARIANTS[v].get("token_map", False) for v in variants)
                prepared[share_key] = (prepare_split(gen, docs, cfg, log=print, token_map=with_map) if first is None
                                       else first.for_config(gen, cfg))
                summary[f"prepare_s@{cfg.fit_share}"] = prepared[share_key].seconds
                summary["train_prompts"] = len(prepared[share_key].train)
                summary["held_out_prompts"] = len(prepared[share_key].held_out)
            data = prepared[share_key]
            t0 = time.perf_counter()
            rep = fit(gen, data, cfg, log=lambda m, n=name: print(f"[{n}] {m}", flush=True))
            storage.save(rep.calibration, out / f"{name}.safetensors")
            write_curve(rep.curve, out / f"{name}.curve")
            summary[name] = {**rep.summary(), "fit_s": time.perf_counter() - t0}
            (out / "train.json").write_text(json.dumps(summary, indent=1))
    return summary


def measure(cal_dir: Path, variants: list[str], modes_spec: str, n: int, position: str, answer_tokens: int,
            seed: int, shard: str, workload: str = "stdlib", premap: bool = True) -> dict[str, Any]:
    """`workload` "stdlib": the held-out grid; "qa": the QA trace's 16 multi-document questions
    over Language Reference topics (calibrate on `--train-corpus stdlib` for it: documents it
    never saw). `premap`: variants with a token map store each prompt's chunks mapped at ingest
    (untimed, like the ingest itself: what `add_documents` does with a map loaded); without it
    the map is applied on every request."""
    from benchmarks.harness import FULL, Harness, blend_mode
    from benchmarks.selection import prompt_sets, shard_items, token_f1
    from daser_rag.calibration import storage
    from daser_rag.calibration.adapter import CalibrationSet
    from daser_rag.engine.factory import build_generator

    modes = []
    for spec in modes_spec.split(","):
        sel, _, r = spec.rpartition(":")
        modes.append(blend_mode(float(r), sel or None))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        gen = build_generator(cache_dir=tmp)
        # each variant alone, applied to every mode (what the table compares), whatever its regime
        cals = {v: None if v == "none" else CalibrationSet((_everywhere(storage.load_for(
            cal_dir / f"{v}.safetensors", gen.runner, gen.fingerprint)),)) for v in variants}
        items = [it for it in prompt_sets(gen, workload, n if workload == "stdlib" else 0, seed)[workload]
                 if workload == "qa" or position in ("all", it["position"])]
        items = shard_items(items, shard)
        h = Harness(gen, answer_tokens=answer_tokens)
        gen.premap = premap
        for k, it in enumerate(items):
            h.ingest(it["chunks"])
            for v in variants if premap else ():
                gen.calibration = cals[v]
                gen.premap_contexts(it["chunks"])
            gen.calibration = None
            ref = h.run(FULL, it["question"], it["chunks"])
            order = [(v, m) for v in variants for m in modes]
            rot = k % len(order)
            for v, m in order[rot:] + order[:rot]:
                gen.calibration = cals[v]
                r = h.run(m, it["question"], it["chunks"], ref)
                rows.append({"item": it["idx"], "position": it["position"], "variant": v, "mode": m.name,
                             "full_ttft_s": ref.ttft_s,
                             "ttft_s": r.ttft_s, "steps": r.fidelity.total, "agree": r.fidelity.agree,
                             "kl_sum": r.fidelity.kl_sum, "identical": int(r.answer_ids == ref.answer_ids),
                             "close_steps": r.fidelity.close, "close_agree": r.fidelity.close_agree,
                             "f1": token_f1(r.answer, ref.answer),
                             "correct": int(any(a.lower() in r.answer.lower() for a in it["answers"])),
                             "full_correct": int(any(a.lower() in ref.answer.lower() for a in it["answers"])),
                             "share": r.share})
            gen.calibration = None
            print(f"[{k + 1}/{len(items)}] " + ", ".join(
                f"{v}/{m}: KL {s['mean_kl']:.3f}" for (v, m), s in list(summarize(rows).items())[:12]), flush=True)
    return {"rows": rows, "modes": [m.name for m in modes], "variants": variants, "position": position,
            "workload": workload, "premap": premap}


def _everywhere(cal: Any) -> Any:
    """`cal` acting at every share below 1 (the engine would keep an r = 0 fit to r = 0 requests;
    the table measures each fit in every mode to show why)."""
    import dataclasses

    return cal if cal.fit_share > 0 else dataclasses.replace(cal, fit_share=1e-9)  # > 0: acts at every r < 1


def summarize(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, float]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["mode"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        steps = sum(r["steps"] for r in rs)
        out[key] = {"prompts": len(rs), "top1": sum(r["agree"] for r in rs) / max(1, steps),
                    "mean_kl": sum(r["kl_sum"] for r in rs) / max(1, steps),
                    "identical": statistics.mean(r["identical"] for r in rs),
                    "f1": statistics.mean(r["f1"] for r in rs), "qa": statistics.mean(r["correct"] for r in rs),
                    "full_qa": statistics.mean(r["full_correct"] for r in rs),
                    "share": statistics.mean(r["share"] for r in rs),
                    "speedup": statistics.median(r["full_ttft_s"] / r["ttft_s"] for r in rs)}
        if all("close_steps" in r for r in rs):  # runs before 2026-12-04 did not count them
            close, close_agree = sum(r["close_steps"] for r in rs), sum(r["close_agree"] for r in rs)
            agree = sum(r["agree"] for r in rs)
            out[key].update(close_share=close / max(1, steps),
                            top1_clear=(agree - close_agree) / max(1, steps - close),
                            top1_close=close_agree / max(1, close),
                            misses_at_close=(close - close_agree) / max(1, steps - agree))
    return out


POSITIONS = ("first", "middle", "last")


def _footer(s: dict[tuple[str, str], dict[str, float]]) -> str:
    """How many prompts, and how many of them full prefill itself gets right (the accuracy column's scale)."""
    n = max((x["prompts"] for x in s.values()), default=0)
    full_qa = next(iter(s.values()))["full_qa"] if s else 0.0
    return f"{n} prompts; full prefill answers {full_qa:.0%} of them correctly."


def row_position(row: dict[str, Any], workload: str = "stdlib") -> str:
    """Where the answer document sat. Runs before 2026-12-05 did not record it: the held-out grid
    cycles first / middle / last by item (`benchmarks.evalset`), and the QA trace puts it last."""
    if "position" in row:
        return str(row["position"])
    return POSITIONS[row["item"] % 3] if workload == "stdlib" else "last"


def by_position(data: dict[str, Any]) -> dict[str, dict[tuple[str, str], dict[str, float]]]:
    """`summarize` per answer position (the issue's targets are stated for the answer document last)."""
    workload = data.get("workload", "stdlib")
    out = {p: summarize([r for r in data["rows"] if row_position(r, workload) == p]) for p in POSITIONS}
    return {p: s for p, s in out.items() if s}


def position_table(data: dict[str, Any]) -> str:
    """Top-1 / mean KL by answer position; empty when the run has one position."""
    per = by_position(data)
    if len(per) < 2:
        return ""
    lines = ["| calibration | mode | " + " | ".join(per) + " |", "|---|---|" + "---|" * len(per)]
    for v in data["variants"]:
        for m in data["modes"]:
            cells = [f"{s[(v, m)]['top1']:.3f} / {s[(v, m)]['mean_kl']:.4f}" if (v, m) in s else "-"
                     for s in per.values()]
            if any(c != "-" for c in cells):
                lines.append(f"| {v} | {m} | " + " | ".join(cells) + " |")
    return "By answer position, top-1 / mean KL:\n\n" + "\n".join(lines)


def readme_table(data: dict[str, Any]) -> str:
    """The README's compact frontier: each mode without and with each calibration, over all prompts
    and with the answer document last (where the issue states its targets)."""
    s, last = summarize(data["rows"]), by_position(data).get("last", {})
    cal = [v for v in data["variants"] if v != "none"]
    head = ["mode", *(["none"] if "none" in data["variants"] else []), *cal]
    command = re.sub(r"--shard \d+/(\d+)", r"--shard j/\1", data.get("command", "daser-rag bench calibration"))
    command = re.sub(r" --json \S+", "", re.sub(r"--dir \S+", "--dir DIR", command))
    joined = " (`--merge` joins the shards)" if "--shard" in command else ""
    lines = [f"`{command}`{joined}. Each cell: mean KL vs full prefill / "
             "top-1 agreement / TTFT speed-up (paired median); in brackets KL / top-1 with the answer document "
             "last.", "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for m in data["modes"]:
        cells = []
        for v in head[1:]:
            x, y = s.get((v, m)), last.get((v, m))
            cell = "-" if x is None else f"{x['mean_kl']:.4f} / {x['top1']:.3f} / {x['speedup']:.1f}x"
            if x is not None and y is not None:
                cell += f" ({y['mean_kl']:.4f} / {y['top1']:.3f})"
            cells.append(cell)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + _footer(s)


def table(data: dict[str, Any]) -> str:
    s = summarize(data["rows"])
    lines = ["| calibration | mode | top-1 | mean KL | greedy identical | token F1 | QA acc | speed-up |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for v in data["variants"]:
        for m in data["modes"]:
            x = s.get((v, m))
            if x:
                lines.append(f"| {v} | {m} | {x['top1']:.3f} | {x['mean_kl']:.4f} | {x['identical']:.0%} | "
                             f"{x['f1']:.3f} | {x['qa']:.0%} | {x['speedup']:.1f}x |")
    out = "\n".join(lines) + "\n\n" + _footer(s)
    if positions := position_table(data):
        out += "\n\n" + positions
    if s and all("close_share" in x for x in s.values()):
        from daser_rag.evaluation import CLOSE_MARGIN

        out += ("\n\nWhere top-1 disagrees: a step is close when full prefill's top two tokens are within "
                f"{CLOSE_MARGIN} probability.\n\n| calibration | mode | close steps | top-1 at close steps | "
                "top-1 elsewhere | disagreements at close steps |\n|---|---|---:|---:|---:|---:|")
        for v in data["variants"]:
            for m in data["modes"]:
                x = s.get((v, m))
                if x:
                    out += (f"\n| {v} | {m} | {x['close_share']:.0%} | {x['top1_close']:.3f} | "
                            f"{x['top1_clear']:.3f} | {x['misses_at_close']:.0%} |")
    return out


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summarize(data["rows"])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for v in data["variants"]:
        pts = sorted((x["speedup"], x["mean_kl"], m) for (vv, m), x in s.items() if vv == v)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=v)
        for p in pts:
            ax.annotate(p[2].replace("daser ", ""), (p[0], p[1]), fontsize=6)
    ax.set(xlabel="TTFT speed-up over full prefill (paired median)", ylabel="mean KL vs full prefill",
           yscale="log", title=(f"calibration on held-out stdlib docs (answer {data['position'].replace('all', 'first / middle / last')})"
                                if data.get("workload", "stdlib") == "stdlib" else "calibration on the QA trace"))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="daser-rag bench calibration", description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", action="store_true", help="train the variants into --dir first")
    ap.add_argument("--dir", default="results/calibration", help="calibration files (written by --train)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--train-variants", default="ape,adapter,both")
    ap.add_argument("--train-chunk-tokens", type=int, default=512, help="chunk size of the training prompts")
    ap.add_argument("--train-corpus", default="stdlib", choices=["stdlib", "reference"],
                    help="stdlib: docstrings no grid prompt uses; reference: the bundled Language Reference")
    ap.add_argument("--train-prompts", type=int, default=16)
    ap.add_argument("--train-answer-tokens", type=int, default=8, help="answer tokens in the training loss")
    ap.add_argument("--held-out-prompts", type=int, default=20)
    ap.add_argument("--variants", default="none,ape,adapter,both")
    ap.add_argument("--modes", default=DEFAULT_MODES, help="comma-separated [selector:]ratio")
    ap.add_argument("-n", type=int, default=100, help="grid size (answer first/middle/last cycle)")
    ap.add_argument("--position", default="last", choices=["first", "middle", "last", "all"])
    ap.add_argument("--workload", default="stdlib", choices=["stdlib", "qa"],
                    help="stdlib: the held-out grid; qa: the QA trace's 16 questions (Language Reference)")
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--shard", default="", help="j/k: only prompts i with i %% k == j (join with --merge)")
    ap.add_argument("--merge", nargs="*", default=[], help="no run: join the JSON of --shard runs")
    ap.add_argument("--json", default="results/calibration/bench.json")
    ap.add_argument("--img", default="", help="frontier PNG (e.g. docs/img/calibration.png)")
    ap.add_argument("--render", default="", help="no run: report a saved JSON")
    ap.add_argument("--readme", default="", help="also rewrite the README's compact frontier (marker readme-calibration)")
    ap.add_argument("--no-measure", action="store_true", help="with --train: train only")
    ap.add_argument("--premap", action=argparse.BooleanOptionalAction, default=True,
                    help="store chunks with a variant's token map applied at ingest (--no-premap: apply it per request)")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.merge or args.render:
        parts = [json.loads(Path(p).read_text()) for p in (args.merge or [args.render])]
        data = {**parts[0], "rows": [r for p in parts for r in p["rows"]]}
        if args.merge:
            Path(args.json).write_text(json.dumps(data, indent=1))
    else:
        if args.train:
            summary = train(Path(args.dir), args.steps, args.train_prompts, args.held_out_prompts, args.seed,
                            args.train_variants.split(","), args.train_chunk_tokens, args.train_corpus, args.n,
                            args.train_answer_tokens)
            print(json.dumps(summary, indent=1))
            if args.no_measure:
                return 0
        t0 = time.perf_counter()
        data = measure(Path(args.dir), args.variants.split(","), args.modes, args.n, args.position,
                       args.answer_tokens, args.seed, args.shard, args.workload, args.premap)
        data["minutes"] = (time.perf_counter() - t0) / 60
        data["command"] = " ".join(["daser-rag", "bench", "calibration", *(argv if argv is not None else sys.argv[1:])])
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(data, indent=1))
    print(table(data))
    if args.img:
        plot(data, Path(args.img))
    if args.readme:
        from benchmarks.markdown import replace_marked

        replace_marked(Path(args.readme), "readme-calibration", readme_table(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
