"""KV codec benchmark: stored bytes and fidelity of fp32 / fp16 / bf16 / int8 / fp8 entries.

Chunk KV is computed once in fp32, then stored through each codec. For every QA prompt of
the fidelity set, the bf16 run decodes `--steps` greedy tokens; every other codec is
teacher-forced along the same tokens and we count how often its top-1 next token agrees
(the prompt's first token included). The default recompute ratio is the generator's
operating point, 0.15; `--ratio 0` uses every stored value as is, the strictest setting for
a codec (recompute repairs part of the error).

Usage: python -m benchmarks.codecs [--items 8] [--steps 16] [--ratio 0.15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from daser_rag.corpus import QA_SET, python_reference_corpus
from daser_rag.engine.generator import CacheAwareGenerator
from daser_rag.kv.codecs import CODECS, decode, encode
from daser_rag.kv.store import KVStore
from daser_rag.model.loader import LoadedModel, load_model


def _teacher_forced(gen: CacheAwareGenerator, question: str, docs: list[Any], tokens: list[int] | None,
                    steps: int, ratio: float) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens (or the given ones) and the logits at each position."""
    fused, _ = gen.prefill(question, docs, recompute_ratio=ratio, extra_capacity=steps + 1)
    cache, logits = fused.cache, fused.logits[-1]
    out, all_logits = [], [logits]
    for i in range(steps):
        tok = int(logits.argmax()) if tokens is None else tokens[i]
        out.append(tok)
        logits = gen.runner.forward(torch.tensor([tok]), cache.length, cache)[-1]
        all_logits.append(logits)
    return out, all_logits


def codec_fidelity(lm: LoadedModel, *, codecs: tuple[str, ...] = CODECS, items: int = 8, steps: int = 16,
                   ratio: float = 0.0, chunk_tokens: int = 256, reference: str = "bf16") -> dict[str, Any]:
    corpus = {d.doc_id: d for d in python_reference_corpus()}
    qa = QA_SET[:items]
    base = CacheAwareGenerator(lm, store=KVStore(None, codec="fp32"), chunk_tokens=chunk_tokens, prefix_tree="off")
    for item in qa:  # compute every chunk once, in fp32
        base.add_documents([corpus[d] for d in item.doc_ids])
    keys = list(base.store.host.keys())
    gens: dict[str, CacheAwareGenerator] = {}
    sizes: dict[str, dict[str, float]] = {}
    for c in codecs:
        store = KVStore(None, codec=c)
        nbytes = tokens = 0
        t_enc = t_dec = 0.0
        for k in keys:
            kv = base.store.get(k)
            t0 = time.perf_counter()
            enc = encode(kv, c)
            t_enc += time.perf_counter() - t0
            t0 = time.perf_counter()
            decode(enc)
            t_dec += time.perf_counter() - t0
            store.put_encoded(enc)
            assert store.get_encoded(k).codec == c  # the codec travels with the entry
            nbytes += enc.nbytes
            tokens += kv.num_tokens
        store.index = base.store.index  # same documents, same chunk texts
        gens[c] = CacheAwareGenerator(lm, store=store, chunk_tokens=chunk_tokens, prefix_tree="off")
        sizes[c] = {"bytes_per_token": nbytes / tokens,
                    "encode_s": t_enc, "decode_s": t_dec, "tokens": tokens}
    agree = {c: [] for c in codecs}
    maxdiff = {c: [] for c in codecs}
    for item in qa:
        docs = [corpus[d] for d in item.doc_ids]
        ref_tokens, ref_logits = _teacher_forced(gens[reference], item.question, docs, None, steps, ratio)
        for c in codecs:
            _, lg = _teacher_forced(gens[c], item.question, docs, ref_tokens, steps, ratio)
            for a, b in zip(lg, ref_logits):
                agree[c].append(float(int(a.argmax()) == int(b.argmax())))
                maxdiff[c].append((a - b).abs().max().item())
    out = {"reference": reference, "positions": len(agree[reference]), "ratio": ratio, "codecs": {}}
    for c in codecs:
        out["codecs"][c] = dict(sizes[c], top1_agreement=statistics.fmean(agree[c]),
                                mean_max_logit_diff=statistics.fmean(maxdiff[c]),
                                bytes_vs_reference=sizes[c]["bytes_per_token"] / sizes[reference]["bytes_per_token"])
    return out


def run_codec_benchmark(args: argparse.Namespace | None = None) -> dict[str, Any]:
    args = args if args is not None else build_parser().parse_args([])
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    t0 = time.perf_counter()
    res = codec_fidelity(lm, items=args.items, steps=args.steps, ratio=args.ratio, chunk_tokens=args.chunk_tokens)
    res["seconds"] = time.perf_counter() - t0
    print(f"codec fidelity vs {res['reference']} over {res['positions']} next-token positions "
          f"({args.items} QA prompts x {args.steps + 1}), recompute ratio {res['ratio']}:")
    print(f"{'codec':<6} {'bytes/token':>11} {'vs bf16':>8} {'top-1 agree':>11} {'max|dlogit|':>11} "
          f"{'encode':>8} {'decode':>8}")
    for c, r in res["codecs"].items():
        print(f"{c:<6} {r['bytes_per_token']:>11.0f} {r['bytes_vs_reference']:>8.3f} {r['top1_agreement']:>11.3f} "
              f"{r['mean_max_logit_diff']:>11.3f} {r['encode_s'] * 1e3:>6.0f}ms {r['decode_s'] * 1e3:>6.0f}ms")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=len(QA_SET))
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--ratio", type=float, default=0.15, help="recompute ratio (0: every stored value used as is)")
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default=None)
    p.add_argument("--json", default=None)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """`python -m benchmarks.codecs [ARGS]` (what `daser-rag bench codecs` runs)."""
    return run_codec_benchmark(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
