"""`daser-rag calibrate`: train the calibration on a corpus, check it, write the file and curve.

Corpus: the user's text files, or the bundled Python Language Reference topics. The file goes
to `--out` (default: `<cache dir>/calibration/<model fingerprint>.safetensors`, which the
engine's `calibration=auto` loads); the loss curve to `<out>.curve.csv` and `.png`. A
calibration the held-out check refuses is not written (exit status 1), the curve still is.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from daser_rag.errors import DaserError
from daser_rag.types import Document


def add_arguments(p: argparse.ArgumentParser) -> None:
    from daser_rag.calibration.config import CalibrationConfig

    d = CalibrationConfig()
    p.add_argument("files", nargs="*", help="text files to calibrate on (default: the bundled reference topics)")
    p.add_argument("--topics", default=None, help="pydoc topics: 'all' or comma-separated names")
    p.add_argument("--out", default=None, help="calibration file (default: in the cache dir, keyed by the model and "
                   "the fitted share, where the engine's calibration='auto' finds it)")
    p.add_argument("--fit-share", type=float, default=d.fit_share,
                   help="recompute share to fit for (0: full reuse; the calibration serves that regime only)")
    p.add_argument("--fit-selector", default=None,
                   help="selection replayed when --fit-share > 0 (default: what requests get with the calibration: "
                        "blend.calibrated_selector with a token map, else blend.selector)")
    p.add_argument("--steps", type=int, default=d.steps,
                   help="optimizer steps of the KL stage (batch of 4 prompts each; none without scales, biases or "
                        "link tokens)")
    p.add_argument("--link-tokens", type=int, default=d.link_tokens, help="learned link tokens before the question")
    p.add_argument("--scales", action=argparse.BooleanOptionalAction, default=None,
                   help="key/value scales fitted by KL (default: only with --no-token-map)")
    p.add_argument("--biases", action=argparse.BooleanOptionalAction, default=None,
                   help="key/value biases fitted by KL (default: only with --no-token-map)")
    p.add_argument("--token-map", action=argparse.BooleanOptionalAction, default=d.token_map,
                   help="fit the token map (a per-token K/V correction fitted by regression; docs/calibration.md)")
    p.add_argument("--token-map-ridge", type=float, default=d.token_map_ridge,
                   help="ridge penalty of the token map's regression (relative to the features' energy)")
    p.add_argument("--primer-tokens", type=int, default=d.primer_tokens,
                   help="compute reused chunks after a primer of this many tokens from the training documents "
                        "(0: none; docs/calibration.md)")
    p.add_argument("--primers", type=int, default=d.primers,
                   help="average each reused chunk's K/V over this many primers (from as many training prompts; "
                        "each costs one more chunk pass at index time; 1 for the cheapest ingest)")
    p.add_argument("--train-prompts", type=int, default=d.train_prompts)
    p.add_argument("--held-out-prompts", type=int, default=d.held_out_prompts)
    p.add_argument("--answer-tokens", type=int, default=d.answer_tokens, help="teacher answer tokens in the loss")
    p.add_argument("--min-gain", type=float, default=d.min_gain, help="held-out KL must drop by this share to accept")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")


def read_documents(files: Sequence[str], topics: str | None) -> list[Document]:
    from daser_rag.corpus import python_reference_corpus

    docs = []
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise DaserError(f"no such file: {path}")
        try:
            docs.append(Document(str(path), path.read_text(encoding="utf-8")))
        except UnicodeDecodeError as exc:
            raise DaserError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if topics or not docs:
        names = None if topics in (None, "all") else [t.strip() for t in str(topics).split(",") if t.strip()]
        docs.extend(python_reference_corpus(names))
    return docs


def write_curve(curve: Sequence[tuple[int, float, float]], stem: Path) -> list[Path]:
    """`stem`.csv (step, batch KL, seconds) and, when matplotlib is there, `stem`.png."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = [Path(f"{stem}.csv")]
    with out[0].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "batch_kl", "seconds"])
        w.writerows(curve)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return out
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([c[0] + 1 for c in curve], [c[1] for c in curve], marker=".")
    ax.set(xlabel="step", ylabel="batch KL(full prefill || r=0 calibrated)", yscale="log",
           title="calibration loss (training documents)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.append(Path(f"{stem}.png"))
    fig.savefig(out[-1], dpi=100)
    plt.close(fig)
    return out


def run(args: argparse.Namespace, gen: Any, documents: Sequence[Document] | None = None) -> int:
    import torch

    from daser_rag.calibration import storage
    from daser_rag.calibration.config import CalibrationConfig
    from daser_rag.calibration.train import calibrate

    if args.threads:
        torch.set_num_threads(args.threads)
    docs = list(documents) if documents is not None else read_documents(args.files, args.topics)
    try:
        cfg = CalibrationConfig(link_tokens=args.link_tokens, scales=args.scales, steps=args.steps,
                                biases=args.biases, token_map=args.token_map,
                                token_map_ridge=args.token_map_ridge, primer_tokens=args.primer_tokens,
                                primers=args.primers,
                                train_prompts=args.train_prompts, held_out_prompts=args.held_out_prompts,
                                answer_tokens=args.answer_tokens, min_gain=args.min_gain, seed=args.seed,
                                fit_share=args.fit_share, fit_selector=args.fit_selector)
        cfg.blend()  # an unknown selector is an error before any work
    except ValueError as e:
        raise DaserError(f"calibrate: {e}") from None
    rep = calibrate(gen, docs, cfg, log=lambda m: print(m, flush=True))
    from daser_rag.kv.store import default_cache_dir

    out = Path(args.out) if args.out else storage.default_path(gen.store.root or default_cache_dir(), gen.fingerprint,
                                                                          cfg.fit_share)
    curve = write_curve(rep.curve, out.with_name(out.stem + ".curve"))
    summary = {**rep.summary(), "curve": [str(p) for p in curve]}
    if rep.accepted:
        storage.save(rep.calibration, out)
        summary["file"] = str(out)
    print(json.dumps(summary, indent=2))
    return 0 if rep.accepted else 1
