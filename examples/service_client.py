"""Service mode end to end: start redis-server and two service processes, add a document on one,
ask on the other (cache hit through Redis), update and invalidate, all through DaserClient,
the same interface as the in-process CacheAwareGenerator.

    python examples/service_client.py                 # starts everything itself, then stops it
    python examples/service_client.py --url http://127.0.0.1:8000 --url http://127.0.0.1:8001
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from daser_rag.corpus import python_reference_corpus
from daser_rag.errors import UnknownDocumentError
from daser_rag.server.client import DaserClient
from daser_rag.types import ChunkRef, Document


def demo(url_a: str, url_b: str) -> None:
    a, b = DaserClient(url_a), DaserClient(url_b)
    doc = python_reference_corpus(["pass"])[0]
    rep = a.add_documents([doc])
    print(f"[A] precomputed {rep.computed_chunks} chunk(s) of {doc.doc_id} in {rep.seconds:.2f}s")

    q = "What happens when a pass statement is executed?"
    r = b.generate(q, [ChunkRef(doc_id=doc.doc_id)], max_new_tokens=24)
    print(f"[B] {r.text!r}  hits={r.cache_hits} misses={r.cache_misses} ttft={r.timings.ttft_s:.3f}s")

    print("[B] streaming: ", end="", flush=True)
    stream = b.stream(q, [ChunkRef(doc_id=doc.doc_id)], max_new_tokens=24)
    for delta in stream:
        print(delta, end="", flush=True)
    print(f"\n[B] stream result: hits={stream.result.cache_hits}")

    edited = Document(doc.doc_id, doc.text + "\n\nNote: this copy of the manual was edited.")
    a.add_documents([edited])
    r = b.generate(q, [ChunkRef(doc_id=doc.doc_id)], max_new_tokens=8)
    print(f"[B] after update on A: hits={r.cache_hits} keys={r.chunk_keys}")

    dropped = a.invalidate(doc.doc_id)
    print(f"[A] invalidated {doc.doc_id}: dropped {len(dropped)} chunk(s)")
    try:
        b.generate(q, [ChunkRef(doc_id=doc.doc_id)], max_new_tokens=8)
    except UnknownDocumentError as exc:
        print(f"[B] as expected: {exc}")
    print(f"[B] health: {b.health()}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", action="append", default=None, help="two running services (A then B)")
    args = p.parse_args()
    if args.url:
        urls = args.url if len(args.url) > 1 else args.url * 2
        demo(urls[0], urls[1])
        return
    from daser_rag.server.testing import RedisServer, ServiceProcess

    work = Path(tempfile.mkdtemp(prefix="daser-service-demo-"))
    with RedisServer(workdir=work / "redis") as redis:
        a = ServiceProcess(work / "a", redis_url=redis.url).start()
        b = ServiceProcess(work / "b", redis_url=redis.url).start()
        try:
            a.wait_healthy()
            b.wait_healthy()
            demo(a.url, b.url)
        finally:
            a.stop()
            b.stop()


if __name__ == "__main__":
    main()
