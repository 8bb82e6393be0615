"""Index-time cost of a primer: one chunk computed after the system prefix (the raw entry) against
the same chunk computed after [system prefix, primer] (the primed entry), side by side, same run.

    python -m benchmarks.probes.primer_index_cost     # env: PRIMER=512 REPS=5 T=2
"""

import os
import statistics
import tempfile
import time

import torch

from benchmarks.calibration import training_documents
from daser_rag.engine.factory import build_generator


def main() -> None:
    torch.set_num_threads(int(os.environ.get("T", "2")))
    gen = build_generator(cache_dir=tempfile.mkdtemp(), chunk_tokens=512)
    docs = training_documents(gen, "reference", 100, 0)
    chunks = [gen.prompt.chunk_ids(c) for d in docs[:12] for c in gen.split(d.text)[:1]]
    primer = [t for ids in chunks[:2] for t in ids][: int(os.environ.get("PRIMER", "512"))]
    gen.computer.primed_prefix(primer)  # the primer's own KV: once per engine
    plain, primed = [], []
    for _ in range(int(os.environ.get("REPS", "5"))):
        for ids in chunks[2:]:
            t0 = time.perf_counter()
            gen.computer.compute(ids, "raw")
            t1 = time.perf_counter()
            gen.computer.compute_primed(ids, "primed", [primer])
            t2 = time.perf_counter()
            plain.append(t1 - t0)
            primed.append(t2 - t1)
    ratio = statistics.median(b / a for a, b in zip(plain, primed))
    print(f"{len(chunks) - 2} chunks of ~{statistics.mean(len(c) for c in chunks[2:]):.0f} tokens, primer "
          f"{len(primer)} tokens: raw {statistics.median(plain) * 1000:.0f} ms, primed "
          f"{statistics.median(primed) * 1000:.0f} ms (median), primed / raw {ratio:.2f}x")


if __name__ == "__main__":
    main()
