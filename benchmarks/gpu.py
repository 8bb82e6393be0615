"""GPU check and TTFT benchmark (run on a CUDA machine): exactness on the device, then TTFT of
full prefill vs blending vs full reuse, with and without layer-wise overlapped loading.

    python -m benchmarks.gpu [--model PATH] [--out FILE]

Everything is measured side by side in one run; CUDA is synchronized before every clock read.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from benchmarks.ttft import QUESTION, make_chunks


def _ttft(gen: Any, chunks: list[str], **kw: Any) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    gen.generate(QUESTION, chunks, max_new_tokens=1, **kw)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def exactness(model: str | None, dtype: torch.dtype) -> dict[str, Any]:
    from daser_rag.engine.generator import CacheAwareGenerator
    from daser_rag.kv.store import KVStore
    from daser_rag.model.loader import load_model

    lm = load_model(model, device="cuda", dtype=dtype)
    gen = CacheAwareGenerator(lm, store=KVStore(None, codec="fp32" if dtype == torch.float32 else "bf16"),
                              prefix_tree="off")
    chunks = make_chunks(gen, 3, 256)
    full, _ = gen.prefill(QUESTION, chunks, use_cache=False)
    gen.prefill(QUESTION, chunks)
    r1, _ = gen.prefill(QUESTION, chunks, recompute_ratio=1.0)
    one = chunks[:1]
    f1, _ = gen.prefill(QUESTION, one, use_cache=False)
    gen.prefill(QUESTION, one)
    e1, _ = gen.prefill(QUESTION, one, recompute_ratio=0.0)
    return {
        "dtype": str(dtype),
        "r1_vs_full_max_abs_logit_diff": float((r1.logits - full.logits).abs().max()),
        "r1_vs_full_same_top1": int(r1.logits.argmax()) == int(full.logits.argmax()),
        "exact_prefix_max_abs_logit_diff": float((e1.logits - f1.logits).abs().max()),
    }


SYNTHETIC = {
    # Llama-3-8B's shape. Random weights: no 8B checkpoint can be fetched here, and TTFT does
    # not depend on weight values; fidelity numbers are never taken from this model.
    "llama8b-shape": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=8, head_dim=128, max_position_embeddings=8192, rope_theta=500000.0,
                          tie_word_embeddings=False),
}


def synthetic_model(name: str, tokenizer_model: str | None) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    from daser_rag.model.loader import LoadedModel, spec_from_config, load_model

    base = load_model(tokenizer_model, device="cpu")
    cfg = LlamaConfig(vocab_size=len(base.tokenizer), **SYNTHETIC[name])
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            m = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    for p in m.parameters():
        p.requires_grad_(False)
    return LoadedModel(hf_model=m, tokenizer=base.tokenizer, spec=spec_from_config(cfg),
                       fingerprint=f"synthetic-{name}", source=f"synthetic:{name}",
                       device=torch.device("cuda"), dtype=torch.bfloat16)


def ttft_table(model: str | None, sizes: list[tuple[int, int]], repeats: int, lm: Any = None) -> list[dict[str, Any]]:
    from daser_rag.engine.generator import CacheAwareGenerator
    from daser_rag.kv.store import KVStore
    from daser_rag.model.loader import load_model

    lm = lm if lm is not None else load_model(model, device="cuda", dtype=torch.bfloat16)
    rows = []
    for n_chunks, chunk_tokens in sizes:
        gen = CacheAwareGenerator(lm, store=KVStore(None, codec="bf16", device="cuda", device_bytes=8 << 30),
                                  prefix_tree="off")
        chunks = make_chunks(gen, n_chunks, chunk_tokens)
        for _ in range(2):  # precompute + warm-up
            _ttft(gen, chunks)
            _ttft(gen, chunks, use_cache=False)
        modes = {"full prefill": {"use_cache": False}, "r=0.15": {"recompute_ratio": 0.15},
                 "r=0.15 layer-wise": {"recompute_ratio": 0.15, "_layerwise": True},
                 "r=0": {"recompute_ratio": 0.0}}
        times: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(repeats):
            for name, kw in modes.items():
                kw = dict(kw)
                gen.assembler.layerwise = bool(kw.pop("_layerwise", False))
                times[name].append(_ttft(gen, chunks, **kw))
        gen.assembler.layerwise = False
        full = statistics.median(times["full prefill"])
        for name, ts in times.items():
            med = statistics.median(ts)
            rows.append({"model": lm.source.split("/")[-1], "chunks": n_chunks, "chunk_tokens": chunk_tokens, "mode": name,
                         "ttft_ms": med * 1000, "speedup": full / med})
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--synthetic", action="append", default=[], choices=sorted(SYNTHETIC),
                    help="also time a random-weight model of this shape (speed only)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu needs a CUDA device")
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    result["exactness"] = [exactness(args.model, torch.float32), exactness(args.model, torch.bfloat16)]
    for e in result["exactness"]:
        print(json.dumps(e))
    sizes = [(4, 512), (8, 512), (6, 1024)]
    result["ttft"] = ttft_table(args.model, sizes, args.repeats)
    for name in args.synthetic:
        result["ttft"] += ttft_table(args.model, sizes, args.repeats, lm=synthetic_model(name, args.model))
    print(f"TTFT on {result['device']} (bf16, median of {args.repeats})")
    print(f"{'model':<34}{'context':<10}{'mode':<20}{'TTFT ms':>10}{'speed-up':>10}")
    for r in result["ttft"]:
        ctx = f"{r['chunks']}x{r['chunk_tokens']}"
        print(f"{r['model']:<34}{ctx:<10}{r['mode']:<20}{r['ttft_ms']:>10.1f}{r['speedup']:>9.1f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
