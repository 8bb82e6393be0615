"""Chunk-side soft tokens (KV-Packet style) at r = 0, with or without scales + biases.

K trainable embeddings appended to every chunk at index time: their KV is computed over [system
prefix, chunk] in the stored frame, stored with the chunk and re-rotated with it; the question
reads them. Trained by the same self-distillation on the prompts `kv_corrections` prepared
(run that first); prints the held-out mean KL (docs/benchmarks.md, "What else was tried").

    python -m benchmarks.probes.chunk_soft_tokens         # env: K=4 C=0|1 STEPS=40 LR=.01 T=1 OUT=results/probes
"""

import json
import os
import random
import tempfile
import time

import torch

from daser_rag.calibration.adapter import place_kv
from daser_rag.calibration.student import kl_loss
from daser_rag.engine.factory import build_generator
from daser_rag.model.rope import rerotate_keys

OUT = os.environ.get("OUT", "results/probes")
K = int(os.environ.get("K", "4"))
STEPS = int(os.environ.get("STEPS", "40"))
WITH_C = os.environ.get("C", "0") == "1"
LR = float(os.environ.get("LR", "0.01"))


def main():
    torch.set_num_threads(int(os.environ.get("T", "1")))
    gen = build_generator(cache_dir=tempfile.mkdtemp(), chunk_tokens=512)
    R = gen.runner
    L, H, D = R.spec.num_layers, R.n_kv, R.head_dim
    data = torch.load(f"{OUT}/prep_0.0_16.pt", weights_only=False)
    pre = len(gen.prompt.prefix_ids)
    for e in data.train + data.held_out:
        offs, o = [], pre
        for n in (len(gen.prompt.chunk_ids(c)) for c in e.spec.chunks):
            offs.append((o, n))
            o += n
        e.segs = offs
        assert o == e.context_tokens

    def soft_kv(soft, e):
        """Per chunk: (keys per layer [H, K, D] in the prompt's frame, values per layer)."""
        out = []
        for (o, n) in e.segs:
            pos = torch.arange(pre + n, pre + n + K)
            cos, sin = R.rope(pos)
            h = soft
            kk, vv = [], []
            for i in range(L):
                _, q, k, v = R.qkv(i, h, cos, sin)
                ck = rerotate_keys(e.keys[i][:, o:o + n], -(o - pre), R.inv_freq) if o != pre else e.keys[i][:, o:o + n]
                kc = torch.cat([e.keys[i][:, :pre], ck, k], 1)
                vc = torch.cat([e.values[i][:, :pre], e.values[i][:, o:o + n], v], 1)
                mask = torch.arange(pre + n + K)[None, :] <= pos[:, None]
                h = R.attend_and_mlp(i, h, q, kc, vc, mask)
                kk.append(rerotate_keys(k, o - pre, R.inv_freq) if o != pre else k)
                vv.append(v)
            out.append((kk, vv))
        return out

    def student(soft, cp, e):
        c = e.context_tokens
        h = R.embed(e.tail_ids)
        t = int(h.shape[0])
        cos, sin = R.rope(torch.arange(c, c + t))
        sk = soft_kv(soft, e) if soft is not None else None
        ctx_cos, ctx_sin = R.rope(torch.arange(c))
        nslots = c + (K * len(e.segs) if sk else 0)
        mask = torch.cat([torch.ones(t, nslots, dtype=torch.bool), torch.tril(torch.ones(t, t, dtype=torch.bool))], 1)
        for i in range(L):
            _, q, k, v = R.qkv(i, h, cos, sin)
            kc, vc = e.keys[i], e.values[i]
            if cp is not None:
                pk, pv = place_kv(kc, vc, cp["ks"][i].exp(), cp["vs"][i].exp(), cp["kb"][i], cp["vb"][i], ctx_cos, ctx_sin)
                r = e.reused.view(1, -1, 1)
                kc, vc = torch.where(r, pk, kc), torch.where(r, pv, vc)
            if sk:
                parts_k, parts_v = [kc[:, :pre]], [vc[:, :pre]]
                for j, (o, n) in enumerate(e.segs):
                    parts_k += [kc[:, o:o + n], sk[j][0][i]]
                    parts_v += [vc[:, o:o + n], sk[j][1][i]]
                kc, vc = torch.cat(parts_k, 1), torch.cat(parts_v, 1)
            h = R.attend_and_mlp(i, h, q, torch.cat([kc, k], 1), torch.cat([vc, v], 1), mask)
        return R.logits(h[-int(e.teacher_logp.shape[0]):])

    def kl(soft, cp, e):
        return kl_loss(e.teacher_logp, student(soft, cp, e))

    def held(soft, cp):
        with torch.no_grad():
            return [float(kl(soft, cp, e)) for e in data.held_out]

    for p in gen.lm.hf_model.parameters():
        p.requires_grad_(False)
    base = held(None, None)
    print("none", sum(base) / len(base), flush=True)
    init = R.embed(torch.tensor(gen.prompt.encode("\n\n")[:1])).detach()[0]
    soft = init.repeat(K, 1).clone().requires_grad_(True)

    def z(*s):
        return torch.zeros(*s, requires_grad=True)

    cp = {"ks": z(L, H), "vs": z(L, H), "kb": z(L, H, D), "vb": z(L, H, D)} if WITH_C else None
    groups = [{"params": [soft], "lr": LR}]
    if cp:
        groups += [{"params": [cp["ks"], cp["vs"]], "lr": .05}, {"params": [cp["kb"], cp["vb"]], "lr": .01}]
    opt = torch.optim.Adam(groups)
    rng = random.Random(0)
    t0 = time.time()
    with torch.enable_grad():
        for step in range(STEPS):
            opt.zero_grad()
            tot = 0.0
            for e in rng.sample(data.train, 4):
                loss = kl(soft, cp, e) / 4
                loss.backward()
                tot += float(loss.detach())
            opt.step()
            if step % 10 == 9:
                print(step + 1, round(tot, 4), round(time.time() - t0), flush=True)
    after = held(soft, cp)
    res = {"K": K, "C": WITH_C, "none": sum(base) / len(base), "after": sum(after) / len(after),
           "improved": sum(a < b for a, b in zip(after, base)) / len(base), "s": time.time() - t0}
    print(res, flush=True)
    with open(f"{OUT}/chunk_soft_tokens_K{K}_C{int(WITH_C)}_{STEPS}.json", "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main()
