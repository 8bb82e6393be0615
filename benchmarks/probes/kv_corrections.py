"""Richer corrections of stale (reused) KV than the shipped scales + biases, r = 0.

Self-distillation as `daser_rag.calibration.train` does it (same prompts, seed, batches,
optimizer), on the Language Reference (16 training + 12 held-out prompts), printing the held-out
mean KL of each variant (docs/benchmarks.md, "What else was tried"):

  A  per layer / KV head key and value log-scales (what `--no-biases` ships)
  B  A + value bias [L, H, D]
  C  B + key bias added before RoPE [L, H, D] (what ships)
  D  C + per-dimension key (pair scale and phase) and value scales
  E  A by the token's offset inside its chunk (6 buckets) + value bias

    python -m benchmarks.probes.kv_corrections            # env: V=ABCDE SHARE=0 STEPS=40 LRB=.01 T=2 OUT=results/probes
"""

import json
import os
import random
import tempfile
import time

import torch

from benchmarks.calibration import training_documents
from daser_rag.calibration.student import kl_loss
from daser_rag.calibration.train import CalibrationConfig, prepare_split
from daser_rag.engine.factory import build_generator
from daser_rag.model.rope import apply_rope, rotate_half

OUT = os.environ.get("OUT", "results/probes")
SHARE = float(os.environ.get("SHARE", "0"))
NTRAIN = int(os.environ.get("NTRAIN", "16"))
STEPS = int(os.environ.get("STEPS", "40"))
BUCKETS = [0, 1, 4, 16, 64, 256]


def prepared(gen):
    """The prompts (cached in OUT: preparing them is most of the cost)."""
    path = f"{OUT}/prep_{SHARE}_{NTRAIN}.pt"
    if os.path.exists(path):
        return torch.load(path, weights_only=False)
    cfg = CalibrationConfig(train_prompts=NTRAIN, held_out_prompts=12, fit_share=SHARE, seed=0, primer_tokens=0)
    t0 = time.time()
    data = prepare_split(gen, training_documents(gen, "reference", 100, 0), cfg, log=print)
    os.makedirs(OUT, exist_ok=True)
    torch.save(data, path)
    print("prep", time.time() - t0, flush=True)
    return data


def setup():
    """The generator, its runner, (layers, KV heads, head dim) and the prepared prompts."""
    torch.set_num_threads(int(os.environ.get("T", "2")))
    gen = build_generator(cache_dir=tempfile.mkdtemp(), chunk_tokens=512)
    runner = gen.runner
    return gen, runner, (runner.spec.num_layers, runner.n_kv, runner.head_dim), prepared(gen)


def main():
    gen, runner, (L, H, D), data = setup()

    def offsets(ex):
        lens = [len(gen.prompt.chunk_ids(c)) for c in ex.spec.chunks]
        off = torch.zeros(ex.context_tokens, dtype=torch.long)
        s = len(gen.prompt.prefix_ids)
        for n in lens:
            off[s:s + n] = torch.arange(n)
            s += n
        b = torch.zeros_like(off)
        for i, lo in enumerate(BUCKETS):
            b[off >= lo] = i
        return b

    for e in data.train + data.held_out:
        e.bucket = offsets(e)
        e.cos, e.sin = runner.rope(torch.arange(e.context_tokens))

    def make(variant):
        def z(*s):
            return torch.zeros(*s, requires_grad=True)

        p = {"ks": z(L, H), "vs": z(L, H)}
        if variant in "BCDE":
            p["vb"] = z(L, H, D)
        if variant in "CD":
            p["kb"] = z(L, H, D)
        if variant == "D":
            p["kd"], p["kph"], p["vd"] = z(L, H, D // 2), z(L, H, D // 2), z(L, H, D)
        if variant == "E":
            p["kbk"], p["vbk"] = z(L, H, len(BUCKETS)), z(L, H, len(BUCKETS))
        return p

    def transform(p, i, ex, k, v):
        r = ex.reused.view(1, -1, 1)
        ks, vs = p["ks"][i].view(-1, 1, 1), p["vs"][i].view(-1, 1, 1)
        if "kbk" in p:
            ks = ks + p["kbk"][i][:, ex.bucket].unsqueeze(-1)
            vs = vs + p["vbk"][i][:, ex.bucket].unsqueeze(-1)
        if "kd" in p:
            a = torch.cat([p["kd"][i], p["kd"][i]], -1).view(H, 1, D)
            ph = p["kph"][i]
            c = torch.cat([ph.cos(), ph.cos()], -1).view(H, 1, D)
            s = torch.cat([ph.sin(), ph.sin()], -1).view(H, 1, D)
            k2 = (k * c + rotate_half(k) * s) * (ks + a).exp()
            v2 = v * (vs + p["vd"][i].view(H, 1, D)).exp()
        else:
            k2, v2 = k * ks.exp(), v * vs.exp()
        if "kb" in p:
            k2 = k2 + apply_rope(p["kb"][i].view(H, 1, D).expand(H, ex.context_tokens, D), ex.cos, ex.sin)
        if "vb" in p:
            v2 = v2 + p["vb"][i].view(H, 1, D)
        return torch.where(r, k2, k), torch.where(r, v2, v)

    def student(p, ex, n_last):
        c = ex.context_tokens
        h = runner.embed(ex.tail_ids)
        t = int(h.shape[0])
        positions = torch.arange(c, c + t)
        sel = ex.selected if ex.selected is not None and ex.recomputed else None
        if sel is not None:
            h = torch.cat([runner.embed(ex.context_ids[sel]), h])
            positions = torch.cat([sel, positions])
        n_sel = 0 if sel is None else int(sel.shape[0])
        cos, sin = runner.rope(positions)
        mask = runner.mask_for(positions, c + t)
        for i in range(L):
            _, q, k, v = runner.qkv(i, h, cos, sin)
            k_ctx, v_ctx = transform(p, i, ex, ex.keys[i], ex.values[i])
            if sel is not None:
                k_ctx = k_ctx.index_copy(1, sel, k[:, :n_sel])
                v_ctx = v_ctx.index_copy(1, sel, v[:, :n_sel])
            h = runner.attend_and_mlp(i, h, q, torch.cat([k_ctx, k[:, n_sel:]], 1),
                                      torch.cat([v_ctx, v[:, n_sel:]], 1), mask)
        return runner.logits(h[-n_last:])

    def kl(p, ex):
        return kl_loss(ex.teacher_logp, student(p, ex, int(ex.teacher_logp.shape[0])))

    def held(p):
        with torch.no_grad():
            return [float(kl(p, e)) for e in data.held_out]

    for prm in gen.lm.hf_model.parameters():
        prm.requires_grad_(False)
    res = {}
    base = held(make("A"))
    print("none", sum(base) / len(base), flush=True)
    lrb = float(os.environ.get("LRB", ".01"))
    lrs = {"ks": .05, "vs": .05, "kbk": .05, "vbk": .05, "kd": .05, "vd": .05, "kph": .02, "vb": lrb, "kb": lrb}
    for variant in os.environ.get("V", "ABCDE"):
        p = make(variant)
        opt = torch.optim.Adam([{"params": [t], "lr": lrs[n]} for n, t in p.items()])
        rng = random.Random(0)
        t0 = time.time()
        with torch.enable_grad():
            for step in range(STEPS):
                opt.zero_grad()
                tot = 0.0
                for e in rng.sample(data.train, 4):
                    loss = kl(p, e) / 4
                    loss.backward()
                    tot += float(loss.detach())
                opt.step()
                if step % 10 == 9:
                    print(variant, step + 1, round(tot, 4), round(time.time() - t0), flush=True)
        after = held(p)
        res[variant] = {"kl": sum(after) / len(after), "improved": sum(a < b for a, b in zip(after, base)) / len(base),
                        "s": time.time() - t0}
        print(variant, res[variant], flush=True)
    res["none"] = sum(base) / len(base)
    os.makedirs(OUT, exist_ok=True)
    with open(f"{OUT}/kv_corrections_{SHARE}_{NTRAIN}_{os.environ.get('V', 'ABCDE')}_{STEPS}.json", "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
