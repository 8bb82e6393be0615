"""Token-specific correction of stale (reused) KV, fitted by regression on full prefill's KV, r = 0.

The shipped calibration (scales + biases) corrects what every stale token shares. What is left is
token-specific: what each token would have drawn from the chunks before it. Here a per layer /
KV head linear map predicts the deviation (full prefill's KV minus the stored KV, keys compared
before RoPE) from features known at placement time, fitted in closed form (ridge) on every
reused token of the training prompts (far more supervision than the KL on answer tokens):

  bias     the mean deviation (what the shipped biases approximate)
  own      + the token's own stored key and value
  ctx      + the mean stored key and value of everything before the token's chunk
  attn     + an attention read of the preceding chunks' values with the token's own key as query

Held-out: the relative KV error left and the r = 0 mean KL vs full prefill (same prompts as
kv_corrections.py: 16 training + 12 held-out from the Language Reference, cached in OUT).

    python -m benchmarks.probes.kv_regression      # env: LAM=1e-2 T=2 OUT=results/probes ALPHA=1
"""

import json
import math
import os
import time

import torch

from benchmarks.probes.kv_corrections import setup
from daser_rag.calibration.student import kl_loss
from daser_rag.model.rope import apply_rope

OUT = os.environ.get("OUT", "results/probes")
SETS = {"bias": 1, "own": 3, "ctx": 5, "attn": 6}  # how many feature blocks (1 = the constant)


@torch.inference_mode()
def full_context_kv(runner, ex):
    """Full prefill's K/V of the example's context, per layer [kvH, C, D] (the regression target)."""
    cache = runner.new_cache(ex.context_tokens)
    runner.forward(ex.context_ids, 0, cache)
    n = ex.context_tokens
    layers = runner.spec.num_layers
    return [cache.keys[i][:, :n].clone() for i in range(layers)], [cache.values[i][:, :n].clone() for i in range(layers)]


def fixed_kv_logits(runner, ex, fixed_k, fixed_v):
    """The question and answer run over a context whose K/V are given per layer (an r = 0 student):
    logits at the teacher's loss positions."""
    c = ex.context_tokens
    h = runner.embed(ex.tail_ids)
    t = int(h.shape[0])
    positions = torch.arange(c, c + t)
    cos, sin = runner.rope(positions)
    mask = runner.mask_for(positions, c + t)
    for i in range(runner.spec.num_layers):
        _, q, k, v = runner.qkv(i, h, cos, sin)
        h = runner.attend_and_mlp(i, h, q, torch.cat([fixed_k[i], k], 1), torch.cat([fixed_v[i], v], 1), mask)
    return runner.logits(h[-int(ex.teacher_logp.shape[0]):])



def main():
    gen, runner, (L, H, D), data = setup()
    lam = float(os.environ.get("LAM", "1e-2"))
    alpha = float(os.environ.get("ALPHA", "1"))

    def starts(ex):
        """Per context position: where its chunk starts (the exact head counts as one chunk)."""
        lens = [len(gen.prompt.chunk_ids(c)) for c in ex.spec.chunks]
        s = torch.zeros(ex.context_tokens, dtype=torch.long)
        pos = len(gen.prompt.prefix_ids)
        s[:pos] = 0
        for n in lens:
            s[pos:pos + n] = pos
            pos += n
        return s

    def teacher_kv(ex):
        return full_context_kv(runner, ex)

    @torch.inference_mode()
    def features(ex, i, cos, sin, st):
        """[H, R, F] for the reused rows R, and the pre-RoPE stale keys [H, C, D]."""
        k = apply_rope(ex.keys[i], cos, -sin)  # undo the rotation: pre-RoPE stale keys
        v = ex.values[i]
        r = ex.reused.nonzero().squeeze(1)
        c = ex.context_tokens
        ck = torch.cumsum(k, 1)  # prefix sums for the mean of everything before each chunk
        cv = torch.cumsum(v, 1)
        s = st[r]
        denom = s.clamp(min=1).to(k.dtype).view(1, -1, 1)
        mk = ck[:, s - 1] / denom
        mv = cv[:, s - 1] / denom
        # attention read: the token's own rotated key as query over the keys before its chunk
        q = ex.keys[i][:, r]  # [H, R, D]
        sc = q @ ex.keys[i].transpose(1, 2) / math.sqrt(D)  # [H, R, C]
        before = torch.arange(c).view(1, -1) < s.view(-1, 1)
        sc = sc.masked_fill(~before.unsqueeze(0), float("-inf"))
        av = torch.softmax(sc, -1) @ v
        one = torch.ones(H, r.shape[0], 1)
        return torch.cat([one, k[:, r], v[:, r], mk, mv, av], -1), k, r

    F = 1 + 5 * D
    xtx = torch.zeros(L, H, F, F, dtype=torch.float64)
    xty = torch.zeros(L, H, F, 2 * D, dtype=torch.float64)
    t0 = time.time()
    for e in data.train + data.held_out:
        e.cos, e.sin = runner.rope(torch.arange(e.context_tokens))
        e.starts = starts(e)
    normal = f"{OUT}/kv_regression_normal.pt"  # the normal equations (the teacher prefills are the cost)
    if os.path.exists(normal):
        xtx, xty = torch.load(normal)
    for n, e in enumerate([] if os.path.exists(normal) else data.train):
        tk, tv = teacher_kv(e)
        for i in range(L):
            x, kpre, r = features(e, i, e.cos, e.sin, e.starts)
            tkp = apply_rope(tk[i], e.cos, -e.sin)
            y = torch.cat([tkp[:, r] - kpre[:, r], tv[i][:, r] - e.values[i][:, r]], -1)
            x, y = x.double(), y.double()
            xtx[i] += x.transpose(1, 2) @ x
            xty[i] += x.transpose(1, 2) @ y
        print("train", n, round(time.time() - t0), flush=True)
    if not os.path.exists(normal):
        torch.save((xtx, xty), normal)

    def solve(nblocks):
        f = 1 + (nblocks - 1) * D
        a = xtx[:, :, :f, :f]
        scale = a.diagonal(dim1=-2, dim2=-1)[..., 1:].mean(-1).clamp(min=1e-12) if f > 1 else torch.ones(L, H)
        reg = torch.eye(f, dtype=torch.float64) * lam
        reg[0, 0] = 1e-9
        # Cholesky: the system is symmetric positive definite (batched LU in MKL fails at some sizes)
        c = torch.linalg.cholesky((a + reg * scale.view(L, H, 1, 1)).contiguous())
        return torch.cholesky_solve(xty[:, :, :f].contiguous(), c).float()

    def student(ex, fixed_k, fixed_v):
        return fixed_kv_logits(runner, ex, fixed_k, fixed_v)

    held_teacher = {}
    res = {}
    with torch.inference_mode():
        for name in os.environ.get("V", "none,bias,own,ctx,attn").split(","):
            w = None if name == "none" else solve(SETS[name])
            kls, errs = [], []
            for j, e in enumerate(data.held_out):
                if j not in held_teacher:
                    held_teacher[j] = teacher_kv(e)
                tk, tv = held_teacher[j]
                ks, vs = [], []
                num = den = 0.0
                for i in range(L):
                    x, kpre, r = features(e, i, e.cos, e.sin, e.starts)
                    k2, v2 = kpre.clone(), e.values[i].clone()
                    if w is not None:
                        d = x[..., : w.shape[2]] @ w[i]
                        if not torch.isfinite(d).all() or j == 0 and i % 10 == 0:
                            print(name, "layer", i, "correction rms", float(d.pow(2).mean().sqrt()), flush=True)
                        k2[:, r] += alpha * d[..., :D]
                        v2[:, r] += alpha * d[..., D:]
                    tkp = apply_rope(tk[i], e.cos, -e.sin)
                    num += float(((k2 - tkp)[:, r] ** 2).sum() + ((v2 - tv[i])[:, r] ** 2).sum())
                    den += float(((kpre - tkp)[:, r] ** 2).sum() + ((e.values[i] - tv[i])[:, r] ** 2).sum())
                    ks.append(apply_rope(k2, e.cos, e.sin))
                    vs.append(v2)
                kls.append(float(kl_loss(e.teacher_logp, student(e, ks, vs))))
                errs.append(num / den)
            res[name] = {"kl": sum(kls) / len(kls), "kv_error": sum(errs) / len(errs), "per_prompt": kls}
            print(name, round(res[name]["kl"], 4), "kv error left", round(res[name]["kv_error"], 3), flush=True)
    os.makedirs(OUT, exist_ok=True)
    with open(f"{OUT}/kv_regression_lam{lam:g}_a{alpha:g}.json", "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
