"""Bounded load test of the service on loopback, with invalidations mixed in.

By default it starts a real redis-server and two service processes (separate cache dirs; Redis
is all they share), loads a few documents, then runs N requests from C concurrent workers,
alternating between the two processes: mostly streamed completions that reference documents by
id, some updates (new text: the old chunks are invalidated) and some delete+re-add cycles.

Checks (the run fails, exit code 1, if any is violated):
* errors: every request answers 2xx (a 404 counts as expected only inside a delete window);
* stale: the chunk keys a completion used must belong to a document version that was current
  when the request was sent, or was being written while it ran;
* torn/inconsistent: with the fp32 codec, equal (chunk keys, question) must give equal text.
Prints throughput and p50/p99 TTFT (client-side: request sent -> first streamed token).

    python benchmarks/load_test.py                     # 200 requests, 8 concurrent
    python benchmarks/load_test.py --requests 40 --concurrency 4 --json out.json
    python benchmarks/load_test.py --url http://127.0.0.1:8000 --url http://127.0.0.1:8001
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

QUESTIONS = (
    "What does this statement do?",
    "Summarize the document in one sentence.",
    "What is the keyword described here?",
)


@dataclass
class DocState:
    doc_id: str
    base: str
    revision: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    # (version keys, t_sent, t_done); keys None = deleted
    history: list[tuple[tuple[str, ...] | None, float, float]] = field(default_factory=list)

    def text(self) -> str:
        return self.base if self.revision == 0 else f"{self.base}\n\n(Revision {self.revision}.)"


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[k]


def acceptable(doc: DocState, t_sent: float, t_done: float) -> set[tuple[str, ...] | None]:
    """Versions a request may legally see: the one current at send time, plus any written meanwhile."""
    ok: set[tuple[str, ...] | None] = set()
    committed = None
    for keys, ts, td in doc.history:
        if td <= t_sent:
            committed = (keys,)
        elif ts < t_done:
            ok.add(keys)
    if committed is not None:
        ok.add(committed[0])
    return ok


class LoadTest:
    def __init__(self, urls: list[str], args: argparse.Namespace) -> None:
        self.urls = urls
        self.args = args
        self.rng = random.Random(args.seed)
        self.docs: list[DocState] = []
        self.lock = threading.Lock()
        self.ttft: list[float] = []
        self.latency: list[float] = []
        self.errors: list[str] = []
        self.stale: list[str] = []
        self.not_found_expected = 0
        self.answers: dict[tuple[tuple[str, ...], str], set[str]] = defaultdict(set)
        self.counts: dict[str, int] = defaultdict(int)
        self.hits = 0
        self.misses = 0
        self.observations: list[tuple[list[DocState], tuple[str, ...] | None, float, float]] = []

    def verify(self) -> None:
        """Judge every completion once the run is over, so writes still in flight when a
        completion finished are known (a newer version is legal, an older one is stale)."""
        for docs, used, t0, t1 in self.observations:
            if used is None:  # a 404: legal only if some referenced document was deleted meanwhile
                if any(None in acceptable(d, t0, t1) for d in docs):
                    self.not_found_expected += 1
                else:
                    self.errors.append(f"404 outside any delete window for {[d.doc_id for d in docs]}")
                continue
            pos = 0
            for d in docs:  # split the used keys per document; each must be a legal version
                legal = [k for k in acceptable(d, t0, t1) if k is not None]
                match = next((k for k in legal if used[pos: pos + len(k)] == k), None)
                if match is None:
                    self.stale.append(f"{d.doc_id}: used {used[pos:pos + 1]} not in legal versions")
                    break
                pos += len(match)

    # -- setup -----------------------------------------------------------------------------
    def load_documents(self) -> None:
        from daser_rag.corpus import DEMO_TOPICS, python_reference_corpus

        corpus = python_reference_corpus(DEMO_TOPICS[: self.args.docs])
        with httpx.Client(timeout=600) as c:
            for d in corpus:
                doc = DocState(d.doc_id, d.text[: self.args.doc_chars])
                t0 = time.perf_counter()
                r = c.post(self.urls[0] + "/v1/documents", json={"documents": [{"id": doc.doc_id, "text": doc.text()}]})
                r.raise_for_status()
                doc.history.append((tuple(r.json()["documents"][0]["chunk_keys"]), t0, time.perf_counter()))
                self.docs.append(doc)

    # -- operations ------------------------------------------------------------------------
    def query(self, c: httpx.Client, url: str, docs: list[DocState], question: str) -> None:
        body = {"prompt": question, "documents": [{"id": d.doc_id} for d in docs], "max_tokens": self.args.max_tokens,
                "stream": True}
        t0 = time.perf_counter()
        first = None
        final: dict[str, Any] | None = None
        text = []
        with c.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code == 404:
                r.read()
                with self.lock:  # judged after the run, when every write's timing is known
                    self.observations.append((docs, None, t0, time.perf_counter()))
                return
            if r.status_code != 200:
                r.read()
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if first is None:
                    first = time.perf_counter()
                data = line[6:]
                if data == "[DONE]":
                    break
                ev = json.loads(data)
                if "error" in ev:
                    raise RuntimeError(f"stream error: {ev['error']}")
                text.append(ev["choices"][0].get("text") or "")
                if "daser" in ev:
                    final = ev["daser"]
        t1 = time.perf_counter()
        if final is None:
            raise RuntimeError("stream ended without a final event")
        used = tuple(final["chunk_keys"])
        with self.lock:
            self.observations.append((docs, used, t0, t1))
            self.ttft.append((first or t1) - t0)
            self.latency.append(t1 - t0)
            self.hits += final["cache_hits"]
            self.misses += final["cache_misses"]
            self.answers[(used, question)].add("".join(text))

    def update(self, c: httpx.Client, url: str, doc: DocState) -> None:
        with doc.lock:
            doc.revision += 1
            t0 = time.perf_counter()
            r = c.put(f"{url}/v1/documents/{doc.doc_id}", json={"text": doc.text()})
            r.raise_for_status()
            doc.history.append((tuple(r.json()["document"]["chunk_keys"]), t0, time.perf_counter()))

    def delete_readd(self, c: httpx.Client, url: str, doc: DocState) -> None:
        with doc.lock:
            t0 = time.perf_counter()
            r = c.delete(f"{url}/v1/documents/{doc.doc_id}")
            r.raise_for_status()
            doc.history.append((None, t0, time.perf_counter()))
            doc.revision += 1
            t0 = time.perf_counter()
            other = self.urls[(self.urls.index(url) + 1) % len(self.urls)]  # re-add on the other process
            r = c.post(other + "/v1/documents", json={"documents": [{"id": doc.doc_id, "text": doc.text()}]})
            r.raise_for_status()
            doc.history.append((tuple(r.json()["documents"][0]["chunk_keys"]), t0, time.perf_counter()))

    def plan(self) -> list[tuple[str, Any]]:
        ops: list[tuple[str, Any]] = []
        for i in range(self.args.requests):
            url = self.urls[i % len(self.urls)]
            x = self.rng.random()
            if x < self.args.update_share:
                ops.append(("update", (url, self.rng.choice(self.docs))))
            elif x < self.args.update_share + self.args.delete_share:
                ops.append(("delete", (url, self.rng.choice(self.docs))))
            else:
                k = self.rng.choice((1, 2))
                ops.append(("query", (url, self.rng.sample(self.docs, k), self.rng.choice(QUESTIONS))))
        return ops

    def run(self) -> dict[str, Any]:
        ops = self.plan()
        local = threading.local()

        def client() -> httpx.Client:
            if not hasattr(local, "c"):
                local.c = httpx.Client(timeout=self.args.timeout)
            return local.c

        def do(op: tuple[str, Any]) -> None:
            kind, arg = op
            try:
                if kind == "query":
                    self.query(client(), *arg)
                elif kind == "update":
                    self.update(client(), *arg)
                else:
                    self.delete_readd(client(), *arg)
                with self.lock:
                    self.counts[kind] += 1
            except Exception as exc:
                with self.lock:
                    self.errors.append(f"{kind}: {type(exc).__name__}: {exc}")

        t0 = time.perf_counter()
        with ThreadPoolExecutor(self.args.concurrency) as pool:
            list(pool.map(do, ops))
        wall = time.perf_counter() - t0
        self.verify()
        inconsistent = [k for k, v in self.answers.items() if len(v) > 1]
        return {
            "requests": len(ops), "concurrency": self.args.concurrency, "processes": len(self.urls),
            "ops": dict(self.counts), "wall_s": round(wall, 2), "throughput_rps": round(len(ops) / wall, 3),
            "completions": len(self.ttft),
            "ttft_p50_s": round(percentile(self.ttft, 50), 3), "ttft_p90_s": round(percentile(self.ttft, 90), 3),
            "ttft_p99_s": round(percentile(self.ttft, 99), 3),
            "latency_p50_s": round(percentile(self.latency, 50), 3),
            "latency_p99_s": round(percentile(self.latency, 99), 3),
            "ttft_mean_s": round(statistics.fmean(self.ttft), 3) if self.ttft else None,
            "chunk_hit_rate": round(self.hits / max(1, self.hits + self.misses), 3),
            "errors": len(self.errors), "stale": len(self.stale), "inconsistent_answers": len(inconsistent),
            "not_found_in_delete_window": self.not_found_expected,
            "error_samples": self.errors[:5], "stale_samples": self.stale[:5],
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--docs", type=int, default=8)
    p.add_argument("--doc-chars", type=int, default=600, help="truncate corpus documents (keeps requests short)")
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--update-share", type=float, default=0.07)
    p.add_argument("--delete-share", type=float, default=0.03)
    p.add_argument("--processes", type=int, default=2, help="service processes to start (without --url)")
    p.add_argument("--url", action="append", default=None, help="use running services instead (repeatable)")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args(argv)

    started: list[Any] = []
    urls = args.url
    if not urls:
        from daser_rag.server.testing import RedisServer, ServiceProcess

        work = Path(tempfile.mkdtemp(prefix="daser-load-"))
        redis = RedisServer(workdir=work / "redis").start()
        started.append(redis)
        procs = [ServiceProcess(work / f"svc{i}", redis_url=redis.url,
                                extra_args=["--codec", "fp32", "--max-pending", str(args.concurrency * 2),
                                            # throughput and staleness are measured here, not deadlines:
                                            # a 2-core machine shared with other work can queue > 30 s
                                            "--queue-timeout", "180", "--fair-share", "1"]).start()
                 for i in range(args.processes)]
        started.extend(procs)
        for sp in procs:
            sp.wait_healthy()
        urls = [sp.url for sp in procs]
    try:
        lt = LoadTest(urls, args)
        lt.load_documents()
        res = lt.run()
        for u in urls:
            res.setdefault("health", []).append(httpx.get(u + "/health", timeout=30).json()["status"])
    finally:
        for s in reversed(started):
            s.stop()
    print(json.dumps(res, indent=2))
    print(f"\n{res['requests']} requests, {res['concurrency']} concurrent, {res['processes']} processes: "
          f"{res['throughput_rps']} req/s, TTFT p50 {res['ttft_p50_s']} s / p99 {res['ttft_p99_s']} s, "
          f"errors {res['errors']}, stale {res['stale']}, inconsistent {res['inconsistent_answers']}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0 if res["errors"] == 0 and res["stale"] == 0 and res["inconsistent_answers"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
