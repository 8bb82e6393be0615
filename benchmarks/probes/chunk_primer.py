"""Chunks computed after a primer: does stored KV need less repair when each chunk, at index time,
is computed after some other text instead of after the system prefix alone? r = 0.

A stored chunk is stale because it never saw the chunks placed before it. Its tokens' hidden states
were formed with attention spread over the system prefix and its own text only. Here every reused
chunk is computed after [system prefix, primer] instead (the primer's KV is not placed in the prompt;
the chunk's keys are re-rotated to where it lands), so the stale state has seen *some* preceding
document. Variants:

  none      what ships: the chunk after the system prefix alone
  docN      the primer is the first N tokens of a training prompt's chunks (fixed for every chunk)
  genN      the primer is the first N tokens of a fixed generic paragraph, repeated (GENERIC below:
            no document of any corpus)
  ...all    (suffix) the first chunk is primed too, so it is no longer exact
  mixN      the primer is N tokens made of the first N/4 tokens of 4 training documents (the first
            chunks of 4 training prompts): several documents instead of one
  avgN      the chunk is computed after AVG_K (4) different docN primers (the first chunks of as
            many training prompts) and its K/V averaged: a chunk state that is no one document's
  nearN     the primer is the first N tokens of the training document most like the chunk (cosine of
            token counts): the document most likely to be retrieved with it
  prev      oracle: the primer is the chunk actually placed before it (pairwise caching; not
            available at index time, an upper bound on what one preceding chunk can give)

For each, the held-out r = 0 mean KL against full prefill, uncalibrated and with the token map
(own [k; v] features, ridge 1.0 x the mean diagonal, as `daser-rag calibrate` fits it) refitted on
that variant's stale KV of the 16 training prompts (same prompts as kv_corrections.py).

    python -m benchmarks.probes.chunk_primer     # env: V=none,doc128,doc512,prev T=2 OUT=results/probes
                                                 #      PRIMER_PROMPT=k: docN from training prompt k (0)
"""

import json
import os
import time

import torch

from benchmarks.probes.kv_corrections import setup
from benchmarks.probes.kv_regression import fixed_kv_logits, full_context_kv
from daser_rag.calibration.student import kl_loss
from daser_rag.model.rope import apply_rope, rerotate_keys

OUT = os.environ.get("OUT", "results/probes")
LAM = float(os.environ.get("LAM", "1.0"))
GENERIC = (
    "The following notes describe general reference material. Each section explains one topic, gives "
    "its definition, and shows how it relates to the others. Details that apply only in special cases "
    "are stated where they arise, and examples follow the explanations they illustrate. Terms are "
    "defined before they are used, and later sections may refer back to earlier ones. Where two "
    "descriptions seem to differ, the more specific one applies. Lists are given in no particular "
    "order unless the text says otherwise, and numbers are exact unless marked as approximate. The "
    "notes are meant to be read in any order; each section can be understood on its own.\n\n"
)


def main() -> None:
    gen, runner, (L, H, D), data = setup()
    pre_ids = list(gen.prompt.prefix_ids)
    pre = len(pre_ids)
    # the training prompt's chunks one after another (its first chunk first, so doc128 and doc512 are
    # the beginning of one chunk), and the generic paragraph repeated
    src = int(os.environ.get("PRIMER_PROMPT", "0"))  # which training prompt docN's primer comes from
    sources = {"doc": [t for c in data.train[src].spec.chunks for t in gen.prompt.chunk_ids(c)],
               "gen": gen.prompt.chunk_ids(GENERIC) * 8}
    n_avg = int(os.environ.get("AVG_K", "4"))  # how many primers avgN averages over
    firsts = [gen.prompt.chunk_ids(e.spec.chunks[0]) for e in data.train[:max(4, n_avg)]]
    train_docs = {c: gen.prompt.chunk_ids(c) for e in data.train for c in e.spec.chunks}
    vocab = runner.vocab_size

    def counts(ids):
        v = torch.zeros(vocab)
        v.index_add_(0, torch.tensor(list(ids)), torch.ones(len(ids)))
        return v / v.norm()

    doc_vecs = {c: counts(ids) for c, ids in train_docs.items()}

    def primers(name, ids):
        """The primers a chunk is computed after (their K/V averaged when more than one)."""
        kind = name.rstrip("0123456789")
        n = int(name[len(kind):])
        if kind == "mix":
            return [[t for f in firsts for t in f[: n // 4]]]
        if kind == "avg":
            return [f[:n] for f in firsts[:n_avg]]
        if kind == "near":
            q = counts(ids)
            best = max((c for c in train_docs if c not in ex_chunks), key=lambda c: float(q @ doc_vecs[c]))
            return [train_docs[best][:n]]
        return [sources[kind][:n]]

    ex_chunks: set = set()

    def chunk_spans(ex):
        out, o = [], pre
        for c in ex.spec.chunks:
            ids = gen.prompt.chunk_ids(c)
            out.append((o, ids))
            o += len(ids)
        assert o == ex.context_tokens
        return out

    @torch.inference_mode()
    def primed(ex, variant):
        """The example's r = 0 context K/V (post-RoPE, prompt frame) with its reused chunks computed
        after [system prefix, primer]."""
        if variant == "none":
            return ex.keys, ex.values
        ks = [k.clone() for k in ex.keys]
        vs = [v.clone() for v in ex.values]
        spans = chunk_spans(ex)
        ex_chunks.clear()
        ex_chunks.update(ex.spec.chunks)
        everything = variant.endswith("all")
        name = variant[:-3] if everything else variant
        for j, (o, ids) in enumerate(spans):
            if j == 0 and not everything:
                continue  # the first chunk is exact: computed right after the prefix, at its place
            group = [spans[j - 1][1]] if name == "prev" else primers(name, ids)
            n = len(ids)
            for g, primer in enumerate(group):
                seq = torch.tensor(pre_ids + list(primer) + list(ids))
                cache = runner.new_cache(len(seq))
                runner.forward(seq, 0, cache)
                s = pre + len(primer)
                for i in range(L):
                    k = rerotate_keys(cache.keys[i][:, s:s + n], o - s, runner.inv_freq) / len(group)
                    v = cache.values[i][:, s:s + n] / len(group)
                    ks[i][:, o:o + n] = k if g == 0 else ks[i][:, o:o + n] + k
                    vs[i][:, o:o + n] = v if g == 0 else vs[i][:, o:o + n] + v
        return ks, vs

    def rows(ex, variant):
        """The stale rows: the reused chunks, and the first chunk too when it is primed."""
        if variant.endswith("all"):
            return torch.arange(pre, ex.context_tokens)
        return ex.reused.nonzero().squeeze(1)

    teacher: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    def teacher_kv(ex):
        if id(ex) not in teacher:
            teacher[id(ex)] = full_context_kv(runner, ex)
        return teacher[id(ex)]

    for e in data.train + data.held_out:
        e.cos, e.sin = runner.rope(torch.arange(e.context_tokens))

    res = {}
    t0 = time.time()
    for variant in os.environ.get("V", "none,doc128,doc512,prev").split(","):
        F = 1 + 2 * D
        xtx = torch.zeros(L, H, F, F, dtype=torch.float64)
        xty = torch.zeros(L, H, F, 2 * D, dtype=torch.float64)
        with torch.inference_mode():
            for e in data.train:
                ks, vs = primed(e, variant)
                tk, tv = teacher_kv(e)
                r = rows(e, variant)
                for i in range(L):
                    kpre = apply_rope(ks[i], e.cos, -e.sin)
                    x = torch.cat([torch.ones(H, r.shape[0], 1), kpre[:, r], vs[i][:, r]], -1).double()
                    tkp = apply_rope(tk[i], e.cos, -e.sin)
                    y = torch.cat([tkp[:, r] - kpre[:, r], tv[i][:, r] - vs[i][:, r]], -1).double()
                    xtx[i] += x.transpose(1, 2) @ x
                    xty[i] += x.transpose(1, 2) @ y
            scale = xtx.diagonal(dim1=-2, dim2=-1)[..., 1:].mean(-1).clamp(min=1e-12)
            reg = torch.eye(F, dtype=torch.float64) * LAM
            reg[0, 0] = 1e-9
            w = torch.cholesky_solve(xty, torch.linalg.cholesky(xtx + reg * scale.view(L, H, 1, 1))).float()
            kl_raw, kl_map, err_raw, err_map = [], [], [], []
            for e in data.held_out:
                ks, vs = primed(e, variant)
                tk, tv = teacher_kv(e)
                r = rows(e, variant)
                mk, mv = [], []
                num = den = 0.0
                for i in range(L):
                    kpre = apply_rope(ks[i], e.cos, -e.sin)
                    x = torch.cat([torch.ones(H, r.shape[0], 1), kpre[:, r], vs[i][:, r]], -1)
                    d = x @ w[i]
                    k2, v2 = kpre.clone(), vs[i].clone()
                    k2[:, r] += d[..., :D]
                    v2[:, r] += d[..., D:]
                    tkp = apply_rope(tk[i], e.cos, -e.sin)
                    num += float(((k2 - tkp)[:, r] ** 2).sum() + ((v2 - tv[i])[:, r] ** 2).sum())
                    den += float(((kpre - tkp)[:, r] ** 2).sum() + ((vs[i] - tv[i])[:, r] ** 2).sum())
                    mk.append(apply_rope(k2, e.cos, e.sin))
                    mv.append(v2)
                kl_raw.append(float(kl_loss(e.teacher_logp, fixed_kv_logits(runner, e, ks, vs))))
                kl_map.append(float(kl_loss(e.teacher_logp, fixed_kv_logits(runner, e, mk, mv))))
                err_raw.append(den)
                err_map.append(num / den)
        res[variant] = {
            "kl": sum(kl_raw) / len(kl_raw),
            "kl_token_map": sum(kl_map) / len(kl_map),
            "kv_error_left_by_map": sum(err_map) / len(err_map),
            "kv_sq_deviation": sum(err_raw) / len(err_raw),
            "per_prompt": {"kl": kl_raw, "kl_token_map": kl_map},
        }
        print(variant, "kl", round(res[variant]["kl"], 4), "with map", round(res[variant]["kl_token_map"], 4),
              "sq deviation", round(res[variant]["kv_sq_deviation"]), "left by map",
              round(res[variant]["kv_error_left_by_map"], 3), round(time.time() - t0), "s", flush=True)
    os.makedirs(OUT, exist_ok=True)
    tag = (os.environ.get("V", "default").replace(",", "_") + (f"_p{src}" if src else "")
           + (f"_k{n_avg}" if n_avg != 4 else ""))
    with open(f"{OUT}/chunk_primer_{tag}.json", "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
