"""`daser-rag` command line: demo | ingest | ask | cache | bench | serve."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from daser_rag import settings as s
from daser_rag.errors import DaserError
from daser_rag.params import SELECTORS
from daser_rag.settings import add_option


def _add_common(p: argparse.ArgumentParser) -> None:
    """The engine options of demo, ingest and ask (flags, defaults and help from daser_rag/settings.py)."""
    for setting in (s.MODEL, s.CACHE_DIR, s.CODEC, s.TENANT, s.CHUNK_TOKENS, s.CALIBRATION):
        add_option(p, setting)


def _add_blend(p: argparse.ArgumentParser) -> None:
    """--ratio / --selector: None means the generator's default (the table's), so a request that names
    neither is the generator's own choice, as with the service and the adapters."""
    add_option(p, s.RECOMPUTE_RATIO, "--ratio", "--recompute-ratio", default=None,
               help=f"{s.RECOMPUTE_RATIO.help} (default: the generator's, {s.RECOMPUTE_RATIO.default})")
    add_option(p, s.SELECTOR, default=None, choices=list(SELECTORS),
               help=f"{s.SELECTOR.help} (default: the generator's, {s.SELECTOR.default})")


def _generator(args: argparse.Namespace) -> Any:
    from daser_rag.engine.factory import build_generator

    return build_generator(args.model, cache_dir=args.cache_dir, codec=args.codec, chunk_tokens=args.chunk_tokens,
                           calibration=args.calibration)


# -- demo ---------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    """Questions full prefill answers correctly, answered again with reuse: does the fast answer agree?"""
    from daser_rag.corpus import QA_BENCH, demo_topics, python_reference_corpus
    from daser_rag.types import ChunkRef

    print("daser-rag demo: Python Language Reference (pydoc_data.topics) on the embedded SmolLM2-135M-Instruct")
    t0 = time.perf_counter()
    gen = _generator(args)
    print(f"model loaded in {time.perf_counter() - t0:.1f}s  (fingerprint {gen.fingerprint[:12]}, "
          f"device {gen.runner.device}, cache {gen.store.root}; blend: selector {gen.blend.selector}, "
          f"r={gen.blend.recompute_ratio})")
    docs = python_reference_corpus(demo_topics())
    rep = gen.add_documents(docs, progress=True, tenant=args.tenant)
    print(f"ingested {rep.documents} documents -> {rep.chunks} chunks, {rep.tokens} tokens: "
          f"{rep.computed_chunks} chunk KVs computed, {rep.reused_chunks} already cached ({rep.seconds:.1f}s)\n")
    opts = dict(max_new_tokens=args.max_new_tokens, tenant=args.tenant)
    speedups, same, shown, skipped = [], 0, 0, 0
    for qa in QA_BENCH:
        if shown >= args.questions:
            break
        refs = [ChunkRef(doc_id=d) for d in qa.doc_ids]
        full = gen.generate(qa.question, refs, use_cache=False, **opts)
        if not any(a.lower() in full.text.lower() for a in qa.answers):
            skipped += 1  # the 135M model gets this one wrong even with full prefill: not a fair test
            continue
        fast = gen.generate(qa.question, refs, recompute_ratio=args.ratio, selector=args.selector, **opts)
        shown += 1
        sp = full.timings.ttft_s / fast.timings.ttft_s
        speedups.append(sp)
        agree = fast.token_ids == full.token_ids
        same += agree
        found = any(a.lower() in fast.text.lower() for a in qa.answers)
        print(f"[{shown}/{args.questions}] Q: {qa.question}")
        print(f"      documents: {', '.join(qa.doc_ids)}  ({fast.context_tokens} context tokens)")
        print(f"      full prefill : {full.text.strip()!r}")
        print(f"      daser-rag    : {fast.text.strip()!r}")
        print(f"      same answer as full prefill: {'yes' if agree else 'no'}; expected answer "
              f"{'found' if found else 'not found'} in the fast answer")
        print(f"      TTFT full {full.timings.ttft_s * 1000:.0f} ms | daser-rag {fast.timings.ttft_s * 1000:.0f} ms "
              f"(mode {fast.mode}, selector {fast.selector}, recomputed {fast.recompute_share:.0%}, "
              f"hits {fast.cache_hits}, misses {fast.cache_misses}) | speed-up {sp:.1f}x\n")
    _record_counters(gen.store)
    if speedups:
        import statistics

        print(f"{shown} questions that full prefill answers correctly ({skipped} it gets wrong were skipped): "
              f"identical answers {same}/{shown}, median TTFT speed-up {statistics.median(speedups):.1f}x")
    return 0


# -- ingest / ask / cache -------------------------------------------------------------------
def cmd_ingest(args: argparse.Namespace) -> int:
    from daser_rag.corpus import python_reference_corpus
    from daser_rag.engine.ingest import check_documents
    from daser_rag.types import Document

    docs: list[Document] = []
    for f in args.files:
        p = Path(f)
        if not p.is_file():
            raise DaserError(f"no such file: {p}")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise DaserError(f"{p} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        docs.append(Document(doc_id=str(p), text=text))
    if args.topics:
        topics = None if args.topics == "all" else [t.strip() for t in args.topics.split(",") if t.strip()]
        docs.extend(python_reference_corpus(topics))  # UnknownTopicError is a DaserError
    if not docs:
        raise DaserError("nothing to ingest: pass files and/or --topics")
    check_documents(docs)  # empty files, bad text, one file twice: a clear error before the model loads
    gen = _generator(args)
    rep = gen.add_documents(docs, progress=True, tenant=args.tenant)  # the bar counts chunks
    _record_counters(gen.store)
    print(json.dumps(rep.__dict__, indent=2))
    if args.calibrate:  # the calibration's defaults, on the documents just ingested
        from daser_rag.calibration.command import add_arguments, run

        cal = argparse.ArgumentParser()
        add_arguments(cal)
        return run(cal.parse_args([]), gen, docs)
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from daser_rag.types import ChunkRef

    gen = _generator(args)
    contexts: list[Any] = [ChunkRef(doc_id=d) for d in args.doc] + [ChunkRef(text=t) for t in args.text]
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
              use_cache=not args.full, tenant=args.tenant, recompute_ratio=args.ratio, selector=args.selector)
    # With --json, stdout carries exactly one JSON document (the answer is its "text");
    # streamed deltas then go to stderr so a human still sees them arrive.
    answer_out = sys.stderr if args.json else sys.stdout
    if args.stream:
        stream = gen.stream(args.question, contexts, **kw)
        for delta in stream:
            print(delta, end="", flush=True, file=answer_out)
        print(file=answer_out)
        res = stream.result
    else:
        res = gen.generate(args.question, contexts, **kw)
        if not args.json:
            print(res.text.strip())
    _record_counters(gen.store)
    if args.json:
        print(json.dumps(res.to_dict(), indent=2, default=str))
    else:
        print(f"-- TTFT {res.timings.ttft_s * 1000:.0f} ms, {res.prompt_tokens} prompt tokens, "
              f"mode {res.mode}, hits {res.cache_hits}, misses {res.cache_misses}, recomputed "
              f"{res.recompute_share:.0%} ({res.recomputed_tokens} tokens, selector {res.selector})",
              file=sys.stderr)
    return 0


COUNTERS_FILE = "cli_counters.json"
"""Lookup counters of past CLI runs, kept in the cache folder: a KVStore counts hits per process,
so `cache stats` in a new process would always say hit_rate 0.0 without them."""


def _record_counters(store: Any) -> None:
    """Add this run's store lookups (hits per tier, misses) to the cache folder's running totals."""
    root = getattr(store, "root", None)
    counters = getattr(store, "counters", None)
    if root is None or not counters:
        return
    path = Path(root) / COUNTERS_FILE
    try:
        total = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except (OSError, ValueError):
        total = {}
    for k, v in counters.items():
        if k.startswith("hit_") or k == "miss":
            total[k] = int(total.get(k, 0)) + int(v)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(total), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache still answers; only the statistics are lost


def _existing_cache(path: Path) -> Path:
    """The cache folder, which must exist already: `cache` commands never create one (a typo in
    --cache-dir would otherwise leave an empty cache behind and report it as empty)."""
    if not path.is_dir():
        raise DaserError(f"no KV cache at {path}: the folder does not exist (check --cache-dir, or "
                         "$DASER_RAG_CACHE_DIR; 'daser-rag ingest' creates it)")
    if not (path / "index.sqlite").exists() and not (path / "kv").is_dir():
        raise DaserError(f"{path} is not a daser-rag KV cache (no index.sqlite or kv/ inside)")
    return path


def cmd_cache(args: argparse.Namespace) -> int:
    from daser_rag.kv.store import KVStore, default_cache_dir

    root = _existing_cache(Path(args.cache_dir) if args.cache_dir else default_cache_dir())
    store = KVStore(root)
    if args.action == "stats":
        stats = store.stats()
        try:
            past = json.loads((root / COUNTERS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            past = {}
        hits = sum(int(v) for k, v in past.items() if k.startswith("hit_"))
        lookups = hits + int(past.get("miss", 0))
        stats["lookups"] = lookups
        stats["hits"] = hits
        stats["misses"] = lookups - hits
        # the share of chunk lookups of past runs (ask, ingest, demo) served from this cache;
        # None until something was looked up (0.0 would claim a measured miss rate)
        stats["hit_rate"] = hits / lookups if lookups else None
        print(json.dumps(stats, indent=2))
    elif args.action == "clear":
        store.clear()
        (root / COUNTERS_FILE).unlink(missing_ok=True)
        print("cache cleared")
    elif args.action == "invalidate":
        if not args.doc:
            raise DaserError("cache invalidate needs --doc ID")
        for d in args.doc:
            dropped = store.invalidate(d, args.tenant)
            print(f"{d}: dropped {len(dropped)} chunk KV entries")
    return 0


# -- bench / serve --------------------------------------------------------------------------
def find_benchmarks(start: Path | None = None) -> Path | None:
    """The checkout that holds the benchmarks: a folder with `benchmarks/__init__.py` next to
    `pyproject.toml`, searched from `start` (default: the current directory) upwards, then from
    this package's own location (an editable install). The library never imports them."""
    starts = [start or Path.cwd(), Path(__file__).resolve().parent]
    for first in starts:
        for d in (first, *first.parents):
            if (d / "benchmarks" / "__init__.py").is_file() and (d / "pyproject.toml").is_file():
                return d
    return None


def runnable_benchmarks(root: Path) -> list[str]:
    """Benchmark scripts in a checkout: modules of benchmarks/ with a `__main__` block."""
    return sorted(p.stem for p in (root / "benchmarks").glob("*.py")
                  if not p.stem.startswith("_") and '__name__ == "__main__"' in p.read_text(encoding="utf-8"))


def cmd_bench(args: argparse.Namespace, rest: list[str]) -> int:
    root = find_benchmarks()
    if root is None:
        raise DaserError("'daser-rag bench' runs the benchmarks of a daser-rag checkout (its benchmarks/ folder), "
                         "and none was found from the current directory upwards: run it inside a clone of the "
                         "repository")
    names = runnable_benchmarks(root)
    if args.name is None and any(a in ("-h", "--help") for a in rest):
        print("usage: daser-rag bench [NAME] [ARGS ...]\n\nRuns benchmarks/NAME.py of the checkout at "
              f"{root} (default: ttft); 'daser-rag bench NAME --help' shows its options.\n\n"
              f"benchmarks: {', '.join(names)}")
        return 0
    name = (args.name or "ttft").replace("-", "_")
    if name not in names:
        raise DaserError(f"unknown benchmark {args.name!r}; available: {', '.join(names)}")
    source = (root / "benchmarks" / f"{name}.py").read_text(encoding="utf-8")
    if "argparse" not in source:  # a script that reads no options would ignore --help and start a run
        if any(a in ("-h", "--help") for a in rest):
            import ast

            doc = ast.get_docstring(ast.parse(source)) or ""
            print(f"usage: daser-rag bench {name}\n\n{doc}\n\n(this benchmark takes no options)".replace("\n\n\n", "\n\n"))
            return 0
        if rest:
            raise DaserError(f"benchmark {name!r} takes no options, got: {' '.join(rest)}")
    # A fresh interpreter with the checkout on its path, in the caller's directory (so relative
    # paths in ARGS mean what the caller expects): `python -m benchmarks.NAME ARGS`.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    return subprocess.call([sys.executable, "-m", f"benchmarks.{name}", *rest], env=env)


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Train and check the calibration of reused KV (daser_rag/calibration/command.py)."""
    from daser_rag.calibration.command import run

    return run(args, _generator(args))


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from daser_rag.server.__main__ import run
    except ImportError as exc:
        raise DaserError(f"service mode needs the server extra: pip install 'daser-rag[server]' ({exc})") from exc
    run(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="daser-rag", description="RAG-native KV-cache middleware")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("demo", help="ingest a real corpus, answer multi-document questions, compare TTFT")
    _add_common(p)
    add_option(p, s.DEMO_QUESTIONS)
    _add_blend(p)
    add_option(p, s.DEMO_MAX_NEW_TOKENS)

    p = sub.add_parser("ingest", help="precompute and store chunk KV for documents")
    _add_common(p)
    p.add_argument("files", nargs="*", help="text files (doc id = path)")
    p.add_argument("--topics", default=None, help="pydoc topics: 'all' or comma-separated names")
    p.add_argument("--calibrate", action="store_true",
                   help="then run `daser-rag calibrate` (its defaults) on these documents")

    p = sub.add_parser("ask", help="answer a question over stored documents and/or given texts")
    _add_common(p)
    p.add_argument("question")
    p.add_argument("--doc", action="append", default=[], help="document id (repeatable)")
    p.add_argument("--text", action="append", default=[], help="literal chunk text (repeatable)")
    _add_blend(p)
    p.add_argument("--full", action="store_true", help="full prefill, no cache (baseline)")
    p.add_argument("--stream", action="store_true")
    p.add_argument("--json", action="store_true")
    for setting in (s.MAX_NEW_TOKENS, s.TEMPERATURE, s.SEED):
        add_option(p, setting)

    p = sub.add_parser("calibrate", help="learn a per-model calibration of reused KV on a corpus (self-distillation "
                       "against full prefill; checked on held-out documents; docs/calibration.md)")
    _add_common(p)
    from daser_rag.calibration.command import add_arguments

    add_arguments(p)

    p = sub.add_parser("cache", help="inspect or manage the KV cache")
    p.add_argument("action", choices=["stats", "clear", "invalidate"])
    add_option(p, s.CACHE_DIR)
    p.add_argument("--doc", action="append", default=[])
    add_option(p, s.TENANT)

    p = sub.add_parser("bench", add_help=False,  # -h/--help goes to the benchmark itself
                       help="run a benchmark of the checkout (benchmarks/NAME.py; default ttft): 'daser-rag bench "
                       "--help' lists them, 'daser-rag bench NAME --help' shows a benchmark's options; see "
                       "docs/benchmarks.md")
    p.add_argument("name", nargs="?", default=None)

    p = sub.add_parser("serve", help="run the HTTP service (same options as python -m daser_rag.server)")
    from daser_rag.server.settings import add_serve_arguments

    add_serve_arguments(p)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args, rest = ap.parse_known_args(argv)
    if rest and args.cmd != "bench":
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.cmd == "bench":
            return cmd_bench(args, rest)
        return {"demo": cmd_demo, "ingest": cmd_ingest, "ask": cmd_ask, "cache": cmd_cache, "serve": cmd_serve,
                "calibrate": cmd_calibrate}[
            args.cmd](args)
    except DaserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
