"""`daser-rag bench suite`: speed and fidelity of every KV-cache mode, side by side, in one run.

Workload: a RAG trace over the Python Language Reference (pydoc_data.topics). Each request is
a multi-document question with a known answer (daser_rag.corpus.QA_BENCH); its documents are
mixed with distractor chunks (as a retriever's top-k would be) up to a target context length,
in a random order. Every chunk's KV is precomputed first (index time, not counted).

Per request, every mode runs back to back on the same prompt (full prefill first, the others
rotated), so machine noise hits them alike:

- full prefill: no cache; the reference for fidelity;
- prefix cache: exact prefix caching as a serving engine does it (benchmarks/prefix_cache.py),
  primed with every chunk prefilled once on its own and keeping each served prompt;
- daser r=...: chunk KV fused with CacheBlend repair of the top-r share (r=0: full reuse).

Reported per mode: TTFT mean/p50/p99, throughput, cache bytes, next-token top-1 agreement and
KL vs full prefill (teacher-forced), ROUGE-L and exact match of 32-token greedy answers vs full
prefill's, and QA accuracy. Then the scaling sweeps (benchmarks/scaling.py). Writes a JSON
file, a markdown summary and PNG plots to --out (default results/).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import Harness, Run, standard_modes
from benchmarks.markdown import replace_marked
from benchmarks.quality import answer_correct, exact_match, format_qa_table, rouge_l
from benchmarks.ttft import make_chunks
from daser_rag import settings
from daser_rag.corpus import QA_BENCH, QAItem, python_reference_corpus
from daser_rag.evaluation import Fidelity


@dataclass
class SuiteConfig:
    questions: int = len(QA_BENCH)
    context_tokens: int = 2048  # target context per QA request (documents + distractors)
    distractor_tokens: int = 256
    distractor_pool: int = 16
    ratios: list[float] = field(default_factory=lambda: [0.0, 0.05, 0.15, 0.3, 0.5, 1.0])
    answer_tokens: int = 32
    seed: int = 0
    codec: str = settings.CODEC.default
    scaling: bool = True
    scaling_contexts: list[int] = field(default_factory=lambda: [1000, 2000, 4000, 8000])
    scaling_context_chunks: int = 4
    scaling_chunk_counts: list[int] = field(default_factory=lambda: [2, 4, 6, 8, 10])
    scaling_chunk_tokens: int = 400
    scaling_ratios: list[float] = field(default_factory=lambda: [0.0, 0.15])
    scaling_repeats: int = 2
    scaling_answer_tokens: int = 8
    single_repeat_above: int = 3000  # points with more context tokens than this run once
    quick: bool = False


QUICK: dict[str, Any] = {"questions": 6, "context_tokens": 1024, "ratios": [0.0, 0.15, 1.0],
                         "scaling_contexts": [1000, 2000], "scaling_chunk_counts": [2, 4, 6],
                         "scaling_repeats": 1, "quick": True}


@dataclass
class Request:
    item: QAItem
    chunks: list[str]
    relevant: list[int]  # positions of the question's own document chunks


# -- workload ----------------------------------------------------------------------------------
def build_trace(gen: Any, cfg: SuiteConfig) -> list[Request]:
    """QA requests: the question's documents plus distractors up to the target length, shuffled."""
    if not 1 <= cfg.questions <= len(QA_BENCH):
        raise ValueError(f"questions must be in 1..{len(QA_BENCH)}, got {cfg.questions}")
    rng = random.Random(cfg.seed)
    pool = make_chunks(gen, cfg.distractor_pool, cfg.distractor_tokens)
    docs = {d.doc_id: d for d in python_reference_corpus()}
    trace = []
    for item in QA_BENCH[: cfg.questions]:
        own = [c for doc_id in item.doc_ids for c in gen.split(docs[doc_id].text)]
        n_tok = len(gen.prompt.prefix_ids) + sum(len(gen.prompt.chunk_ids(c)) for c in own)
        extra: list[str] = []
        candidates = pool[:]
        rng.shuffle(candidates)
        for c in candidates:
            t = len(gen.prompt.chunk_ids(c))
            if n_tok + t > cfg.context_tokens:
                break
            extra.append(c)
            n_tok += t
        chunks = own + extra
        order = list(range(len(chunks)))
        rng.shuffle(order)
        trace.append(Request(item, [chunks[i] for i in order], [order.index(i) for i in range(len(own))]))
    return trace


# -- statistics --------------------------------------------------------------------------------
def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def merge_fidelity(fs: list[Fidelity]) -> Fidelity:
    out = Fidelity()
    for f in fs:
        out.agree += f.agree
        out.total += f.total
        out.kl_sum += f.kl_sum
        out.first_token_agree += f.first_token_agree
        out.prompts += f.prompts
        out.per_prompt_kl.extend(f.per_prompt_kl)
    return out


def summarize(runs: dict[str, list[Run]], mode_meta: dict[str, dict[str, Any]], full_name: str,
              items: list[QAItem] | None) -> list[dict[str, Any]]:
    """One row per mode: speed, bytes and fidelity, all relative to full prefill's runs."""
    full = runs[full_name]
    full_mean = statistics.fmean(r.ttft_s for r in full)
    rows = []
    for name, rs in runs.items():
        ttft = [r.ttft_s for r in rs]
        fid = merge_fidelity([r.fidelity for r in rs])
        ctx = [r.reused_tokens + r.recomputed_tokens for r in rs]
        row = {
            "mode": name, **mode_meta[name], "n": len(rs),
            "ttft_mean_s": statistics.fmean(ttft), "ttft_p50_s": percentile(ttft, 50),
            "ttft_p99_s": percentile(ttft, 99),
            "speedup_vs_full": full_mean / statistics.fmean(ttft),
            "speedup_paired_median": statistics.median(f.ttft_s / r.ttft_s for f, r in zip(full, rs)),
            "prefill_tokens_per_s": sum(r.prompt_tokens for r in rs) / sum(ttft),
            "requests_per_s": len(rs) / sum(r.latency_s for r in rs),
            "latency_mean_s": statistics.fmean(r.latency_s for r in rs),
            "context_tokens_mean": statistics.fmean(ctx),
            "reused_share": sum(r.reused_tokens for r in rs) / max(sum(ctx), 1),
            "top1_agreement": fid.top1, "mean_kl": fid.mean_kl,
            "first_token_agreement": fid.first_token_agree / max(fid.prompts, 1),
            "rouge_l": statistics.fmean(rouge_l(r.answer, f.answer) for f, r in zip(full, rs)),
            "exact_match": statistics.fmean(float(exact_match(r.answer, f.answer)) for f, r in zip(full, rs)),
        }
        if items is not None:
            row["qa_accuracy"] = statistics.fmean(float(answer_correct(r.answer, it)) for it, r in zip(items, rs))
        rows.append(row)
    return rows


# -- the QA trace --------------------------------------------------------------------------------
def run_trace(h: Harness, cfg: SuiteConfig, log: Any = print, out_dir: Path | None = None) -> dict[str, Any]:
    gen = h.gen
    trace = build_trace(gen, cfg)
    modes = standard_modes(cfg.ratios)
    h.ingest([c for req in trace for c in req.chunks])
    # warm-up (allocator, thread pools): every mode once on a small request, discarded
    h.request(trace[0].item.question, trace[0].chunks[:2], modes, answer_tokens=2)
    runs: dict[str, list[Run]] = {m.name: [] for m in modes}
    per_request = []
    for i, req in enumerate(trace):
        rs = h.request(req.item.question, req.chunks, modes, remember=True, tag="trace", rotate=i,
                       answer_tokens=cfg.answer_tokens)
        for name, r in rs.items():
            runs[name].append(r)
        full = rs[modes[0].name]
        log(f"  [{i + 1}/{len(trace)}] {full.prompt_tokens} prompt tokens, {len(req.chunks)} chunks: " + ", ".join(
            f"{name.replace('daser ', '')} {r.ttft_s:.2f}s" for name, r in rs.items()))
        per_request.append({
            "question": req.item.question, "doc_ids": list(req.item.doc_ids), "answers": list(req.item.answers),
            "n_chunks": len(req.chunks), "relevant_positions": req.relevant,
            "chunk_tokens": [len(gen.prompt.chunk_ids(c)) for c in req.chunks],
            "runs": [r.record() | {"correct": answer_correct(r.answer, req.item),
                                   "rouge_l_vs_full": rouge_l(r.answer, full.answer),
                                   "exact_match_vs_full": exact_match(r.answer, full.answer)}
                     for r in rs.values()],
        })
    daser_bytes = h.daser_cache_bytes()
    meta = {m.name: {"kind": m.kind, "ratio": m.ratio if m.kind == "blend" else (1.0 if m.kind == "full" else None),
                     "cache_bytes": 0 if m.kind == "full" else
                     (h.prefix_cache.nbytes if m.kind == "prefix" else daser_bytes)} for m in modes}
    items = [req.item for req in trace]
    rows = summarize(runs, meta, modes[0].name, items)
    qa = {"questions": [it.question for it in items], "answers": [list(it.answers) for it in items],
          "correct": {name: [answer_correct(r.answer, it) for it, r in zip(items, rs)] for name, rs in runs.items()}}
    prompts = [gen.prompt_ids(req.item.question, req.chunks) for req in trace]
    h.prefix_cache.drop("trace")
    return {"requests": len(trace), "prompt_tokens_mean": statistics.fmean(len(p) for p in prompts),
            "chunks_mean": statistics.fmean(len(r.chunks) for r in trace), "modes": rows, "qa": qa,
            "per_request": per_request, "prefix_cache": {"block_size": h.prefix_cache.block_size,
                                                         "evictions": h.prefix_cache.evictions},
            "vllm": vllm_baseline(len(trace), cfg.answer_tokens, out_dir, log)}


def vllm_baseline(n_requests: int, answer_tokens: int, out_dir: Path | None, log: Any = print) -> dict[str, Any]:
    """vLLM's own prefix caching (and vLLM + daser-rag), when vLLM is importable here.

    Runs benchmarks/vllm_trace.py (the vLLM integration's trace: same corpus and QA questions,
    documents in random order, one vLLM engine per arm in its own process) and keeps a
    per-pass summary. Its trace and engine (bf16, block 32) are its own, so its rows are
    reported next to ours, not merged into our table.
    """
    if importlib.util.find_spec("vllm") is None:
        log("vLLM not installed: skipped")
        return {"status": "vLLM not installed: skipped"}
    import tempfile

    from benchmarks import vllm_trace

    with tempfile.TemporaryDirectory(prefix="daser-suite-vllm-") as tmp:
        path = (out_dir or Path(tmp)) / "vllm_trace.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        log("vLLM trace (benchmarks/vllm_trace.py) ...")
        try:
            vllm_trace.main(["--requests", str(n_requests), "--answer-tokens", str(answer_tokens),
                             "--json", str(path)])
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - an optional engine must not lose the run
            log(f"vLLM trace failed: {exc!r}")
            return {"status": f"failed: {exc!r}"}
    rows = []
    base = raw["vllm"]["passes"]["vllm_prefix_cache"]
    for arm in ("vllm", "daser"):
        for name, rs in raw[arm]["passes"].items():
            t = [r["ttft_s"] for r in rs]
            rows.append({"pass": name, "n": len(rs), "ttft_mean_s": statistics.fmean(t),
                         "ttft_p50_s": percentile(t, 50), "ttft_p99_s": percentile(t, 99),
                         "cached_share": sum(r["cached"] for r in rs) / max(1, sum(r["prompt_tokens"] for r in rs)),
                         "same_answer_as_vllm": statistics.fmean(float(r["tokens"] == b["tokens"])
                                                                for r, b in zip(rs, base))})
    return {"status": "ok", "source": "benchmarks/vllm_trace.py", "rows": rows,
            "json": str(path) if out_dir else None}


# -- environment ---------------------------------------------------------------------------------
def machine_label(gen: Any) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    dev = str(gen.runner.device)
    gpu = torch.cuda.get_device_name(gen.runner.device) if gen.runner.device.type == "cuda" else None
    label = f"{gpu}" if gpu else f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
                                timeout=5, cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"label": label, "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": dev, "gpu": gpu, "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "git_commit": commit, "model_dtype": str(gen.runner.dtype),
            "model_fingerprint": gen.fingerprint[:12]}


def load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# -- output ----------------------------------------------------------------------------------------
def _mb(b: int | None) -> str:
    return "-" if not b else f"{b / 2**20:.0f}"


def format_main_tables(main: dict[str, Any]) -> str:
    rows = main["modes"]
    w = max(len(r["mode"]) for r in rows) + 2
    out = [(f"QA trace: {main['requests']} requests, {main['prompt_tokens_mean']:.0f} prompt tokens and "
            f"{main['chunks_mean']:.1f} chunks on average; TTFT over n={rows[0]['n']} requests"),
           (f"{'mode':<{w}}{'mean s':>8}{'p50 s':>8}{'p99 s':>8}{'speed-up':>10}{'(paired)':>10}"
            f"{'prefill tok/s':>15}{'req/s':>7}{'reused':>8}{'cache MB':>10}")]
    for r in rows:
        out.append(f"{r['mode']:<{w}}{r['ttft_mean_s']:>8.3f}{r['ttft_p50_s']:>8.3f}{r['ttft_p99_s']:>8.3f}"
                   f"{r['speedup_vs_full']:>9.2f}x{r['speedup_paired_median']:>9.2f}x"
                   f"{r['prefill_tokens_per_s']:>15.0f}{r['requests_per_s']:>7.2f}"
                   f"{r['reused_share']:>8.0%}{_mb(r['cache_bytes']):>10}")
    out += ["", "fidelity vs full prefill (teacher-forced next token; 32-token greedy answers)",
            f"{'mode':<{w}}{'top-1':>8}{'mean KL':>10}{'1st tok':>9}{'ROUGE-L':>9}{'exact':>7}{'QA acc':>8}"]
    for r in rows:
        out.append(f"{r['mode']:<{w}}{r['top1_agreement']:>8.3f}{r['mean_kl']:>10.4f}"
                   f"{r['first_token_agreement']:>9.0%}{r['rouge_l']:>9.3f}{r['exact_match']:>7.0%}"
                   f"{r.get('qa_accuracy', float('nan')):>8.0%}")
    v = main["vllm"]
    out.append("")
    if v["status"] == "ok":
        out.append("vLLM (benchmarks/vllm_trace.py, its own trace):")
        out += [f"  {r['pass']:<22}TTFT mean {r['ttft_mean_s']:.3f}s p50 {r['ttft_p50_s']:.3f}s "
                f"p99 {r['ttft_p99_s']:.3f}s, cached {r['cached_share']:.0%}" for r in v["rows"]]
    else:
        out.append(f"vLLM prefix caching: {v['status']}")
    return "\n".join(out)


def markdown_report(result: dict[str, Any], img_prefix: str) -> str:
    """The results section for docs/README: machine label, tables, plots."""
    from benchmarks.scaling import markdown_scaling

    m = result["meta"]
    main = result["main"]
    lines = [
        (f"Measured on **{m['machine']['label']}** ({m['machine']['platform']}, torch {m['machine']['torch']}, "
         f"model dtype {m['machine']['model_dtype']}, KV codec {result['config']['codec']}), "
         f"{m['started']}, commit {m['machine']['git_commit']}; load average {m['load_start']} at start, "
         f"{m['load_end']} at end; run took {m['seconds'] / 60:.1f} min"
         f"{' (--quick)' if result['config']['quick'] else ''}. Reproduce: `{m['command']}`."),
        "",
        (f"**QA trace**: {main['requests']} multi-document questions over the Python Language Reference, "
         f"{main['prompt_tokens_mean']:.0f} prompt tokens and {main['chunks_mean']:.1f} chunks per request "
         f"(the question's documents plus distractors, shuffled). All modes run on each request back to back."),
        "",
        ("| mode | TTFT mean (s) | p50 (s) | p99 (s) | speed-up (means) | speed-up (paired median) | prefill tok/s "
         "| req/s | context reused | cache MB |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in main["modes"]:
        lines.append(f"| {r['mode']} | {r['ttft_mean_s']:.3f} | {r['ttft_p50_s']:.3f} | {r['ttft_p99_s']:.3f} | "
                     f"{r['speedup_vs_full']:.2f}x | {r['speedup_paired_median']:.2f}x | "
                     f"{r['prefill_tokens_per_s']:.0f} | {r['requests_per_s']:.2f} | "
                     f"{r['reused_share']:.0%} | {_mb(r['cache_bytes'])} |")
    lines += ["", "| mode | top-1 agreement | mean KL | first token | ROUGE-L | exact match | QA accuracy |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in main["modes"]:
        lines.append(f"| {r['mode']} | {r['top1_agreement']:.3f} | {r['mean_kl']:.4f} | "
                     f"{r['first_token_agreement']:.0%} | {r['rouge_l']:.3f} | {r['exact_match']:.0%} | "
                     f"{r.get('qa_accuracy', float('nan')):.0%} |")
    qa = main["qa"]
    names = list(qa["correct"])
    lines += ["", "QA accuracy per question (answer contains a known answer string):", "",
              "| question | expected | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for i, q in enumerate(qa["questions"]):
        lines.append(f"| {q} | {' / '.join(qa['answers'][i])} | "
                     + " | ".join("yes" if qa["correct"][n][i] else "no" for n in names) + " |")
    v = main["vllm"]
    if v["status"] == "ok":
        lines += ["", "vLLM (benchmarks/vllm_trace.py, its own trace of the same questions, bf16, block 32):", "",
                  "| pass | TTFT mean (s) | p50 (s) | p99 (s) | prompt cached | same answer as vLLM |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['pass']} | {r['ttft_mean_s']:.3f} | {r['ttft_p50_s']:.3f} | {r['ttft_p99_s']:.3f} | "
                  f"{r['cached_share']:.0%} | {r['same_answer_as_vllm']:.0%} |" for r in v["rows"]]
        lines.append("")
    else:
        lines += ["", f"vLLM prefix caching: {v['status']}", ""]
    if result.get("scaling"):
        lines += [markdown_scaling(result["scaling"]), ""]
    lines += [f"![TTFT vs context length]({img_prefix}ttft_vs_context.png) "
              f"![TTFT vs chunks]({img_prefix}ttft_vs_chunks.png)" if result.get("scaling") else "",
              f"![fidelity vs r]({img_prefix}fidelity_vs_r.png) ![TTFT vs r]({img_prefix}ttft_vs_r.png)"]
    return "\n".join(lines) + "\n"


def readme_table(result: dict[str, Any]) -> str:
    """The README's compact speed-and-fidelity table (marker readme-suite), from the same run."""
    main, m = result["main"], result["meta"]
    lines = [f"`{m['command']}` ({main['requests']} questions, {main['prompt_tokens_mean']:.0f}-token prompts, "
             f"{m['machine']['label']}):", "",
             "| mode | TTFT mean | speed-up | top-1 agreement | mean KL | ROUGE-L | QA accuracy |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in main["modes"]:
        lines.append(f"| {r['mode']} | {r['ttft_mean_s']:.2f} s | {r['speedup_vs_full']:.2f}x | "
                     f"{r['top1_agreement']:.3f} | {r['mean_kl']:.4f} | {r['rouge_l']:.3f} | {r['qa_accuracy']:.0%} |")
    return "\n".join(lines)


BEGIN, END = "<!-- bench-results:begin -->", "<!-- bench-results:end -->"


def update_doc(path: Path, section: str) -> None:
    """Replace the results section of a markdown file between the bench-results markers."""
    replace_marked(path, "bench-results", section)


# -- entry points ----------------------------------------------------------------------------------
def run_suite(gen: Any, cfg: SuiteConfig, out_dir: Path, *, img_dir: Path | None = None,
              command: str = "", log: Any = print) -> dict[str, Any]:
    from benchmarks import plots
    from benchmarks.scaling import format_scaling, run_scaling

    t0 = time.perf_counter()
    result: dict[str, Any] = {"meta": {"machine": machine_label(gen), "load_start": load_avg(),
                                       "started": time.strftime("%Y-%m-%d %H:%M %Z"), "command": command},
                              "config": asdict(cfg)}
    h = Harness(gen, answer_tokens=cfg.answer_tokens)
    log(f"machine: {result['meta']['machine']['label']}; load average {result['meta']['load_start']}")
    log("QA trace ...")
    result["main"] = run_trace(h, cfg, log, out_dir)
    log("")
    log(format_main_tables(result["main"]))
    log("")
    log(format_qa_table(result["main"]["qa"]["questions"], result["main"]["qa"]["correct"]))
    if cfg.scaling:
        log("\nscaling ...")
        result["scaling"] = run_scaling(h, cfg, log)
        log("")
        log(format_scaling(result["scaling"]))
    result["meta"]["ingest_s"] = h.ingest_s
    result["meta"]["load_end"] = load_avg()
    result["meta"]["seconds"] = time.perf_counter() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
    written = plots.write_all(result, out_dir)
    if img_dir is not None:
        plots.write_all(result, img_dir, small=True)
    (out_dir / "results.md").write_text(markdown_report(result, ""), encoding="utf-8")
    log(f"\nwrote {out_dir / 'bench.json'}, {out_dir / 'results.md'} and {len(written)} plots "
        f"({result['meta']['seconds'] / 60:.1f} min; load average {result['meta']['load_end']})")
    return result


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="daser-rag bench suite", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF model dir or .gguf (default: embedded SmolLM2-135M)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--out", default="results", help="results folder (JSON, markdown, PNGs)")
    ap.add_argument("--quick", action="store_true", help="smaller run (about 3 minutes on 2 CPU cores)")
    ap.add_argument("--questions", type=int, default=None, help=f"QA requests (max {len(QA_BENCH)})")
    ap.add_argument("--context-tokens", type=int, default=None, help="target context per QA request")
    ap.add_argument("--ratios", default=None, help="comma-separated recompute ratios, e.g. 0,0.15,1")
    ap.add_argument("--codec", default=settings.CODEC.default, choices=list(settings.CODECS))
    ap.add_argument("--no-scaling", action="store_true", help="skip the context/chunk-count sweeps")
    ap.add_argument("--scaling-contexts", default=None, help="comma-separated context lengths, e.g. 1000,2000")
    ap.add_argument("--scaling-chunks", default=None, help="comma-separated chunk counts, e.g. 2,4,6")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's choice; use 1 on a busy shared machine, where "
                         "oversubscribed OpenMP threads can run many times slower)")
    ap.add_argument("--img-dir", default=None, help="also write small PNGs here (docs/img for the README)")
    ap.add_argument("--readme", default=None, help="also rewrite the README's compact table (readme-suite markers)")
    ap.add_argument("--update-doc", default=None,
                    help="replace the results section (between bench-results markers) of this markdown file")
    return ap


def config_from_args(args: argparse.Namespace) -> SuiteConfig:
    cfg = SuiteConfig(**QUICK) if args.quick else SuiteConfig()
    over: dict[str, Any] = {"codec": args.codec, "seed": args.seed, "scaling": not args.no_scaling}
    if args.questions is not None:
        over["questions"] = args.questions
    if args.context_tokens is not None:
        over["context_tokens"] = args.context_tokens
    if args.ratios:
        over["ratios"] = [float(x) for x in args.ratios.split(",")]
    if args.scaling_contexts:
        over["scaling_contexts"] = [int(x) for x in args.scaling_contexts.split(",")]
    if args.scaling_chunks:
        over["scaling_chunk_counts"] = [int(x) for x in args.scaling_chunks.split(",")]
    cfg = replace(cfg, **over)
    if any(not 0 <= r <= 1 for r in cfg.ratios):
        raise SystemExit(f"error: ratios must be in [0, 1], got {cfg.ratios}")
    return cfg


def main(argv: list[str] | None = None) -> None:
    from daser_rag.engine.generator import CacheAwareGenerator
    from daser_rag.kv.store import KVStore

    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if cfg.questions > len(QA_BENCH) or cfg.questions < 1:
        raise SystemExit(f"error: --questions must be in 1..{len(QA_BENCH)}")
    gen = CacheAwareGenerator(args.model, store=KVStore(None, codec=cfg.codec, host_bytes=8 << 30),
                              device=args.device)
    command = "daser-rag bench suite " + " ".join(argv if argv is not None else sys.argv[1:])
    result = run_suite(gen, cfg, Path(args.out), img_dir=Path(args.img_dir) if args.img_dir else None,
                       command=command.strip(), log=lambda *a: print(*a, flush=True))
    if args.update_doc:
        img = Path(args.img_dir) if args.img_dir else Path(args.out)
        rel = os.path.relpath(img, Path(args.update_doc).parent)
        update_doc(Path(args.update_doc), markdown_report(result, rel.rstrip("/") + "/"))
        print(f"updated {args.update_doc}")
    if args.readme:
        replace_marked(Path(args.readme), "readme-suite", readme_table(result))
        print(f"updated {args.readme}")


if __name__ == "__main__":
    main()
