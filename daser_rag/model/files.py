"""A model known from its files alone: tokenizer, prompt template, shape and fingerprint, with no
weights loaded and no transformers imported.

The control plane in front of vLLM plans every request (token ids, chunk keys, segment plans)
but never runs the model: loading an 8B model's weights into each planning process would cost
~16 GB per process for nothing. Everything a plan depends on is in the model directory's small
files (`tokenizer.json`, `tokenizer_config.json`, `config.json`), and the fingerprint that
namespaces every key is a hash of the files' *content*, so two processes that serve the same
files agree on keys without comparing tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from daser_rag.errors import ModelLoadError

WEIGHT_SUFFIXES = (".safetensors", ".bin")
"""Files whose bytes are the weights: hashed into the fingerprint."""
META_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja", "chat_template.json")
"""Small files that change what the model computes or how text becomes tokens."""


def resolve_model_dir(path: str | os.PathLike[str] | None) -> Path:
    """The HF directory holding a model's files: `path` itself, or the converted copy of a GGUF
    file (made by the first `load_model` of it; the default model when `path` is None)."""
    from daser_rag.model.loader import converted_gguf_dir, default_model_path

    src = Path(path) if path is not None else default_model_path()
    if src.is_dir():
        if not (src / "config.json").is_file():
            raise ModelLoadError(f"{src} is not an HF model directory (no config.json)")
        return src
    if not src.is_file():
        raise ModelLoadError(f"model path does not exist: {src}")
    converted = converted_gguf_dir(src)
    if converted is None:
        raise ModelLoadError(f"{src} is a GGUF file without a converted HF copy yet; make one with "
                             f"`daser-rag convert --model {src}` (it loads the weights once, in its own process)")
    return converted


def _file_digest(path: Path, memo: dict[str, Any]) -> str:
    """blake2b of one file, memoized by (path, size, mtime) in `memo` (weights are large)."""
    st = path.stat()
    tag = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    hit = memo.get(tag)
    if isinstance(hit, str):
        return hit
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    digest = h.hexdigest()
    memo[tag] = digest
    return digest


def files_fingerprint(model_dir: Path, dtype: str) -> str:
    """Identity of a served model from its files' content and the dtype it is served in.

    `dtype` is part of it because the same weights in bf16 and fp32 give different KV. Digests of
    the weight files are memoized next to the conversion cache, so a restart does not re-read GBs.
    """
    from daser_rag.model.loader import _conversion_root

    memo_path = _conversion_root() / "file_digests.json"
    try:
        memo: dict[str, Any] = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    files = sorted(p for p in model_dir.iterdir()
                   if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name in META_FILES))
    if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
        raise ModelLoadError(f"{model_dir} holds no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    h = hashlib.blake2b(digest_size=16)
    h.update(b"daser-files-v1\0")
    for p in files:
        h.update(p.name.encode() + b"\0" + _file_digest(p, memo).encode() + b"\0")
    h.update(dtype.encode())
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_name(memo_path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_path)
    except OSError:
        pass  # a read-only cache only costs a re-hash next time
    return h.hexdigest()


class FileTokenizer:
    """The model's fast tokenizer read from `tokenizer.json` with the `tokenizers` library, plus
    its chat template rendered with jinja2: the subset of the transformers tokenizer API that
    daser's prompt layout and chunker use, at ~20 MB instead of transformers' ~200 MB import.
    Its ids equal transformers' for the same files (tested)."""

    def __init__(self, model_dir: Path) -> None:
        from tokenizers import Tokenizer

        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(f"{model_dir} has no tokenizer.json (a fast tokenizer is needed to plan without "
                                 "loading the model)")
        self._tok = Tokenizer.from_file(str(path))
        self._literal = Tokenizer.from_file(str(path))
        self._literal.encode_special_tokens = True  # special-token text in user input stays text
        self._lock = threading.Lock()
        try:
            cfg: dict[str, Any] = json.loads((model_dir / "tokenizer_config.json").read_text())
        except (OSError, ValueError):
            cfg = {}
        self.config = cfg
        template = cfg.get("chat_template")
        jinja = model_dir / "chat_template.jinja"  # where transformers >= 4.5x saves it
        if not isinstance(template, str) and jinja.is_file():
            template = jinja.read_text()
        self.chat_template: str | None = template if isinstance(template, str) else None
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        added = json.loads(path.read_text()).get("added_tokens") or []
        self.all_special_ids = sorted(int(t["id"]) for t in added if isinstance(t, Mapping) and t.get("special"))

    def __call__(self, text: str, *, add_special_tokens: bool = False, return_offsets_mapping: bool = False,
                 split_special_tokens: bool = False) -> dict[str, Any]:
        tok = self._literal if split_special_tokens else self._tok
        enc = tok.encode(text, add_special_tokens=add_special_tokens)
        out: dict[str, Any] = {"input_ids": list(enc.ids)}
        if return_offsets_mapping:
            out["offset_mapping"] = list(enc.offsets)
        return out

    def encode(self, text: str, add_special_tokens: bool = False, **kw: Any) -> list[int]:
        ids: list[int] = self(text, add_special_tokens=add_special_tokens, **kw)["input_ids"]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False, **_: Any) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def convert_tokens_to_ids(self, token: str) -> int | None:
        tid = self._tok.token_to_id(token)
        return int(tid) if tid is not None else None

    def get_vocab(self) -> dict[str, int]:
        return dict(self._tok.get_vocab(with_added_tokens=True))

    def __len__(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *, tokenize: bool = False,
                            add_generation_prompt: bool = False, **kw: Any) -> str | list[int]:
        """The template as transformers renders it (jinja2 sandbox, trimmed blocks)."""
        if not self.chat_template:
            raise ModelLoadError("this tokenizer has no chat template")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg: str) -> None:
            raise ModelLoadError(f"chat template: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        text = env.from_string(self.chat_template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
            eos_token=self.eos_token or "", **kw)
        return self.encode(text) if tokenize else text


def _token_text(v: Any) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, Mapping) and isinstance(v.get("content"), str):
        return str(v["content"])
    return None


class ModelFiles:
    """A model directory read for planning: config shape, tokenizer, fingerprint (no weights)."""

    def __init__(self, path: str | os.PathLike[str] | None, *, dtype: str = "bfloat16") -> None:
        self.dir = resolve_model_dir(path)
        try:
            self.config: dict[str, Any] = json.loads((self.dir / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot read {self.dir / 'config.json'}: {exc}") from exc
        from daser_rag.model.loader import spec_from_config

        self.spec = spec_from_config(SimpleNamespace(**self.config))
        self.dtype = dtype
        marker = self.dir / "COMPLETE"  # a converted GGUF names its source file there
        source = marker.read_text().strip() if marker.is_file() else ""
        self.name = Path(source).stem if source else self.dir.name
        """The model's name for the OpenAI API: the GGUF file's stem, or the directory's name."""
        self.tokenizer = FileTokenizer(self.dir)
        self.fingerprint = files_fingerprint(self.dir, f"torch.{dtype}")


__all__ = ["FileTokenizer", "ModelFiles", "files_fingerprint", "resolve_model_dir"]
