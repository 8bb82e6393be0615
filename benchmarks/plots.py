"""PNG plots of a suite result (matplotlib, headless): the two numbers users choose a cache by.

- ttft_vs_context.png / ttft_vs_chunks.png: median TTFT per mode along the scaling sweeps;
- fidelity_vs_r.png: top-1 agreement, ROUGE-L, exact match, QA accuracy and KL against r,
  with prefix caching and full prefill as reference lines;
- ttft_vs_r.png: TTFT (mean, p50..p99 whiskers) against r, with the same reference lines.

Install with the bench extra: pip install 'daser-rag[bench]'.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _plt() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise SystemExit("plots need matplotlib: pip install 'daser-rag[bench]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


STYLE = {"full": {"color": "black", "marker": "o"}, "prefix": {"color": "tab:orange", "marker": "s"}}


def _style(row: dict[str, Any], i: int) -> dict[str, Any]:
    if row["kind"] in STYLE:
        return STYLE[row["kind"]]
    colors = ["tab:blue", "tab:green", "tab:purple", "tab:red", "tab:brown", "tab:cyan"]
    return {"color": colors[i % len(colors)], "marker": "^"}


def _save(fig: Any, path: Path, small: bool) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=80 if small else 120)
    _plt().close(fig)
    return path


def _footer(fig: Any, label: str | None) -> None:
    if label:
        fig.text(0.99, 0.005, label, ha="right", va="bottom", fontsize=6, color="gray")


def _sweep(points: list[dict[str, Any]], x_key: str, xlabel: str, title: str, path: Path, small: bool,
           label: str | None, log_x: bool) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    names = [r["mode"] for r in points[0]["modes"]]
    xs = [p[x_key] for p in points]
    for i, name in enumerate(names):
        rows = [next(r for r in p["modes"] if r["mode"] == name) for p in points]
        ax.plot(xs, [r["ttft_median_s"] for r in rows], label=name, **_style(rows[0], i))
    if log_x:
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("TTFT, median (s, log scale)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    _footer(fig, label)
    return _save(fig, path, small)


def write_scaling(scaling: dict[str, Any], out: Path, *, small: bool = False, label: str | None = None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    if scaling.get("context"):
        paths.append(_sweep(scaling["context"], "context_tokens", "context tokens",
                            f"TTFT vs context length ({scaling['context'][0]['n_chunks']} chunks)",
                            out / "ttft_vs_context.png", small, label, True))
    if scaling.get("chunks"):
        paths.append(_sweep(scaling["chunks"], "n_chunks", "chunks in the prompt",
                            f"TTFT vs number of chunks ({scaling['chunks'][0]['chunk_tokens']} tokens each)",
                            out / "ttft_vs_chunks.png", small, label, False))
    return paths


def _refs(ax: Any, rows: list[dict[str, Any]], key: str) -> None:
    for r in rows:
        if r["kind"] in STYLE:
            ax.axhline(r[key], ls="-.", lw=1, color=STYLE[r["kind"]]["color"], label=f"{r['mode']}, mean")


def write_trace(main: dict[str, Any], out: Path, *, small: bool = False, label: str | None = None) -> list[Path]:
    plt = _plt()
    out.mkdir(parents=True, exist_ok=True)
    rows = main["modes"]
    blend = sorted((r for r in rows if r["kind"] == "blend"), key=lambda r: r["ratio"])
    rs = [r["ratio"] for r in blend]
    paths = []

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 4))
    for key, name, mk in (("top1_agreement", "top-1 agreement", "o"), ("rouge_l", "ROUGE-L vs full", "s"),
                          ("exact_match", "exact match vs full", "^"), ("qa_accuracy", "QA accuracy", "D")):
        if all(key in r for r in blend):
            ax.plot(rs, [r[key] for r in blend], marker=mk, label=name)
    full = next(r for r in rows if r["kind"] == "full")
    if "qa_accuracy" in full:
        ax.axhline(full["qa_accuracy"], ls="--", lw=1, color="black", label="QA accuracy, full prefill")
    ax.set_xlabel("recompute ratio r")
    ax.set_ylim(-0.02, 1.05)
    ax.set_title("answer fidelity vs full prefill")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    kl = [max(r["mean_kl"], 1e-9) for r in blend]
    ax2.plot(rs, kl, marker="o", color="tab:red", label="daser r")
    prefix = next((r for r in rows if r["kind"] == "prefix"), None)
    if prefix is not None:
        ax2.axhline(max(prefix["mean_kl"], 1e-9), ls="--", lw=1, color=STYLE["prefix"]["color"],
                    label="prefix cache (exact)")
    ax2.set_yscale("log")
    ax2.set_xlabel("recompute ratio r")
    ax2.set_ylabel("mean KL(full || mode) per token")
    ax2.set_title("next-token KL vs full prefill")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=7)
    _footer(fig, label)
    paths.append(_save(fig, out / "fidelity_vs_r.png", small))

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, name, ls in (("ttft_mean_s", "daser, mean", "-"), ("ttft_p50_s", "daser, p50", "--"),
                          ("ttft_p99_s", "daser, p99", ":")):
        ax.plot(rs, [r[key] for r in blend], marker="o", ls=ls, color="tab:blue", label=name)
    _refs(ax, rows, "ttft_mean_s")
    ax.set_xlabel("recompute ratio r")
    ax.set_ylabel("TTFT (s)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"TTFT vs r ({main['prompt_tokens_mean']:.0f}-token prompts, {main['requests']} requests)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    _footer(fig, label)
    paths.append(_save(fig, out / "ttft_vs_r.png", small))
    return paths


def write_all(result: dict[str, Any], out: Path, *, small: bool = False) -> list[Path]:
    label = result.get("meta", {}).get("machine", {}).get("label")
    paths = write_trace(result["main"], out, small=small, label=label)
    if result.get("scaling"):
        paths += write_scaling(result["scaling"], out, small=small, label=label)
    return paths


def main(argv: list[str] | None = None) -> None:
    """Redraw the plots from a saved bench.json: daser-rag bench plots results/bench.json [--out DIR]."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="daser-rag bench plots")
    ap.add_argument("json_file")
    ap.add_argument("--out", default=None)
    ap.add_argument("--small", action="store_true")
    args = ap.parse_args(argv)
    result = json.loads(Path(args.json_file).read_text(encoding="utf-8"))
    out = Path(args.out) if args.out else Path(args.json_file).parent
    for p in write_all(result, out, small=args.small):
        print(p)


if __name__ == "__main__":
    main()
