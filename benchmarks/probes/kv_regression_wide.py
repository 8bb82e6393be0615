"""Wider token-map features, r = 0: does more of the token's own state predict its staleness?

The token map (`daser_rag/calibration/token_map.py`) maps each reused token's stored [k
v] of one
KV head to that head's correction. Here, per layer, one ridge regression over every reused token
of the training prompts (the same 16 + 12 Language Reference prompts as `kv_regression.py`):

  own    per KV head: [1
  k_h
  v_h] -> that head's correction (what ships)
  xhead  [1
  k, v of every KV head] -> every head's correction (more of the token's hidden state)
  xpos   xhead + [log1p(offset in its chunk) / 6, 1 / (1 + offset)]
  xprev  xpos + every head's stored k, v of the layer below

Printed: held-out r = 0 mean KL vs full prefill and the share of the KV deviation left, at each
ridge strength in LAMS (times the mean feature energy, as the product solves it). Measured
(docs/results/probes/kv_regression_wide.json): no feature set beats `own` by more than 1%.

    python -m benchmarks.probes.kv_regression_wide     # env: LAMS=1.0,0.1 T=2 OUT=results/probes/wide V=...
"""
import json
import os
import time

import torch

from benchmarks.probes.kv_corrections import setup
from benchmarks.probes.kv_regression import fixed_kv_logits, full_context_kv
from daser_rag.calibration.student import kl_loss
from daser_rag.model.rope import apply_rope

OUT = os.environ.get("OUT", "results/probes/wide")


def main():
    os.makedirs(OUT, exist_ok=True)
    gen, runner, (L, H, D), data = setup()
    E = H * 2 * D  # every head's k and v
    NPOS = 2
    F = 1 + E + NPOS + E

    def offsets(ex):
        lens = [len(gen.prompt.chunk_ids(c)) for c in ex.spec.chunks]
        off = torch.zeros(ex.context_tokens)
        s = len(gen.prompt.prefix_ids)
        for n in lens:
            off[s:s + n] = torch.arange(n).float()
            s += n
        return off

    for e in data.train + data.held_out:
        e.cos, e.sin = runner.rope(torch.arange(e.context_tokens))
        e.off = offsets(e)
        e.r = e.reused.nonzero().squeeze(1)

    def kv_flat(e, i):
        """[C, E] every head's pre-RoPE k and v, head-major ([k_h; v_h] per head)."""
        k = apply_rope(e.keys[i].float(), e.cos, -e.sin)
        v = e.values[i].float()
        return torch.cat([k, v], -1).transpose(0, 1).reshape(e.context_tokens, E)

    @torch.inference_mode()
    def feats(e, i):
        r = e.r
        cur = kv_flat(e, i)[r]
        prev = kv_flat(e, i - 1)[r] if i > 0 else torch.zeros_like(cur)
        off = e.off[r]
        pos = torch.stack([torch.log1p(off) / 6, 1 / (1 + off)], -1)
        return torch.cat([torch.ones(len(r), 1), cur, pos, prev], -1), cur

    def teacher_kv(e):
        return full_context_kv(runner, e)

    def flat_of(e, ks, vs, i):
        k = apply_rope(ks[i].float(), e.cos, -e.sin)
        return torch.cat([k, vs[i].float()], -1).transpose(0, 1).reshape(e.context_tokens, E)

    normal = f"{OUT}/normal.pt"
    if os.path.exists(normal):
        xtx, xty = torch.load(normal)
    else:
        xtx = torch.zeros(L, F, F, dtype=torch.float64)
        xty = torch.zeros(L, F, E, dtype=torch.float64)
        t0 = time.time()
        for n, e in enumerate(data.train):
            tk, tv = teacher_kv(e)
            for i in range(L):
                x, cur = feats(e, i)
                y = flat_of(e, tk, tv, i)[e.r] - cur
                x, y = x.double(), y.double()
                xtx[i] += x.T @ x
                xty[i] += x.T @ y
            print("train", n, round(time.time() - t0), flush=True)
        torch.save((xtx, xty), normal)

    def solve_idx(idx, tidx, lam):
        idx = torch.tensor(idx)
        tidx = torch.tensor(tidx)
        a = xtx[:, idx][:, :, idx]
        b = xty[:, idx][:, :, tidx]
        scale = a.diagonal(dim1=-2, dim2=-1)[..., 1:].mean(-1).clamp(min=1e-12)
        reg = torch.eye(len(idx), dtype=torch.float64) * lam
        reg[0, 0] = 1e-9
        c = torch.linalg.cholesky((a + reg * scale.view(L, 1, 1)).contiguous())
        return torch.cholesky_solve(b.contiguous(), c).float()  # [L, f, t]

    def solve(name, lam):
        if name == "own":
            ws = []
            for h in range(H):
                cols = list(range(1 + h * 2 * D, 1 + (h + 1) * 2 * D))
                ws.append(solve_idx([0] + cols, [c - 1 for c in cols], lam))
            def corr(x, i):
                return torch.cat([torch.cat([x[:, :1], x[:, 1 + h * 2 * D:1 + (h + 1) * 2 * D]], -1) @ ws[h][i] for h in range(H)], -1)
            return corr
        n = {"xhead": 1 + E, "xpos": 1 + E + NPOS, "xprev": F}[name]
        w = solve_idx(list(range(n)), list(range(E)), lam)
        return lambda x, i: x[:, :n] @ w[i]

    def student(ex, fixed_k, fixed_v):
        return fixed_kv_logits(runner, ex, fixed_k, fixed_v)

    held = {}
    res = {}
    lams = [float(x) for x in os.environ.get("LAMS", "1.0").split(",")]
    with torch.inference_mode():
        for lam in lams:
            for name in os.environ.get("V", "none,own,xhead,xpos,xprev").split(","):
                if name == "none" and lam != lams[0]:
                    continue
                corr = None if name == "none" else solve(name, lam)
                kls, errs = [], []
                for j, e in enumerate(data.held_out):
                    if j not in held:
                        held[j] = teacher_kv(e)
                    tk, tv = held[j]
                    ks, vs = [], []
                    num = den = 0.0
                    for i in range(L):
                        x, cur = feats(e, i)
                        full = kv_flat(e, i)
                        if corr is not None:
                            full = full.clone()
                            full[e.r] = cur + corr(x, i)
                        tgt = flat_of(e, tk, tv, i)
                        num += float(((full - tgt)[e.r] ** 2).sum())
                        den += float(((cur - tgt[e.r]) ** 2).sum())
                        per = full.reshape(e.context_tokens, H, 2 * D).transpose(0, 1)
                        ks.append(apply_rope(per[..., :D], e.cos, e.sin))
                        vs.append(per[..., D:].contiguous())
                    kls.append(float(kl_loss(e.teacher_logp, student(e, ks, vs))))
                    errs.append(num / den)
                key = f"{name}@{lam:g}"
                res[key] = {"kl": sum(kls) / len(kls), "kv_error": sum(errs) / len(errs), "per_prompt": kls}
                print(key, round(res[key]["kl"], 4), "kv error left", round(res[key]["kv_error"], 3), flush=True)
                json.dump(res, open(f"{OUT}/kv_regression_wide.json", "w"), indent=1)


if __name__ == "__main__":
    main()
