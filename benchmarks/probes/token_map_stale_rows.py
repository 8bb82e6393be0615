"""Token map fitted only on the rows that stay stale at the serving repair, r = 0.15.

The shipped map is fitted on every reused token (r = 0 rows). With chunk_heads r = 0.15 (the
calibrated default) the chunk starts are recomputed, so a map could spend its capacity on the
tokens that stay stale. Same 16 + 12 Language Reference prompts as the other probes; held-out mean
KL by the product's student at SEL r = 0.15 and at r = 0 (docs/results/probes/token_map_stale_rows.json).
Measured: 0.0213 -> 0.0216 (ridge 1.0), 0.0206 -> 0.0195 (ridge 0.1) at r = 0.15, while r = 0
gets worse (0.0704 -> 0.0889): not worth a second map.

    python -m benchmarks.probes.token_map_stale_rows    # env: SEL=chunk_heads CORPUS=reference T=1
"""
import json
import os
import tempfile
import time

import torch

from benchmarks.calibration import training_documents
from daser_rag.calibration import examples as ex
from daser_rag.calibration.adapter import Calibration
from daser_rag.calibration.token_map import TokenMapStats
from daser_rag.calibration.train import CalibrationConfig, chunks_by_document, mean_kls
from daser_rag.engine.factory import build_generator

CORPUS = os.environ.get("CORPUS", "reference")
SEL = os.environ.get("SEL", "chunk_heads")


def main():
    torch.set_num_threads(int(os.environ.get("T", "1")))

    gen = build_generator(cache_dir=tempfile.mkdtemp(), chunk_tokens=512)
    spec = gen.runner.spec
    cfg = CalibrationConfig(fit_share=0.15, fit_selector=SEL, train_prompts=16, held_out_prompts=12)
    docs = training_documents(gen, CORPUS, 100, 0)
    by_doc = chunks_by_document(gen, docs, cfg.chunks_per_document)
    tr, ho = ex.split_documents(list(by_doc), cfg.held_out_share, cfg.seed)
    tspecs = ex.make_prompts({d: by_doc[d] for d in tr}, cfg.train_prompts, cfg.chunks_per_prompt, cfg.seed)
    hspecs = ex.make_prompts({d: by_doc[d] for d in ho}, cfg.held_out_prompts, cfg.chunks_per_prompt, cfg.seed + 1)
    blend = cfg.blend()
    A = TokenMapStats.empty(spec.num_layers, spec.num_kv_heads, spec.head_dim)
    B = TokenMapStats.empty(spec.num_layers, spec.num_kv_heads, spec.head_dim)
    t0 = time.time()
    for n, s in enumerate(tspecs):
        chunk_ids = [list(gen.prompt.chunk_ids(c)) for c in s.chunks]
        q_ids = list(gen.prompt.query_ids(s.question))
        ctx_ids = list(gen.prompt.prefix_ids) + [i for ids in chunk_ids for i in ids]
        with torch.inference_mode():
            _, _, teacher = ex._teacher(gen, ctx_ids, q_ids, cfg.answer_tokens, cfg.loss_question_tokens)
            segs = ex._segments(gen, chunk_ids)
            keys, values, reused = ex._reuse_buffer(gen, segs)
            sel = ex._selection(gen, segs, q_ids, blend)
            ex.add_token_map_rows(gen, A, teacher, keys, values, reused)
            stale = reused.clone()
            stale[sel] = False
            ex.add_token_map_rows(gen, B, teacher, keys, values, stale)
        print("train", n, round(time.time() - t0), flush=True)
    held = [ex.prepare(gen, s, answer_tokens=cfg.answer_tokens, loss_question_tokens=cfg.loss_question_tokens, blend=blend)
            for s in hspecs]
    held0 = [ex.with_selection(gen, e, None) for e in held]
    print("held prepared", round(time.time() - t0), flush=True)
    res = {}
    base = Calibration.identity(gen.fingerprint, spec.num_layers, spec.num_kv_heads, spec.hidden_size)
    base.fit_share = 0.15
    for name, st in (("none", None), ("all_rows", A), ("stale_rows", B)):
        for ridge in ((1.0, 0.1) if st is not None else (1.0,)):
            cal = Calibration.identity(gen.fingerprint, spec.num_layers, spec.num_kv_heads, spec.hidden_size)
            cal.fit_share = 0.15
            if st is not None:
                cal.kv_map = st.solve(ridge)
            k15 = mean_kls(gen, held, cal)
            k0 = mean_kls(gen, held0, cal)
            key = f"{name}@{ridge:g}"
            res[key] = {"r15": sum(k15) / len(k15), "r0": sum(k0) / len(k0)}
            print(key, SEL, "0.15:", round(res[key]["r15"], 4), "r0:", round(res[key]["r0"], 4), flush=True)
    os.makedirs("results/probes", exist_ok=True)
    json.dump(res, open(f"results/probes/token_map_stale_rows_{CORPUS}_{SEL}.json", "w"), indent=1)


if __name__ == "__main__":
    main()
