"""Service mode: the HTTP API (`create_app`, `serve`) and its Python client (`DaserClient`).

Imports are lazy so that `import daser_rag.server.client` needs neither torch nor FastAPI.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DaserClient", "Limits", "build_generator", "create_app", "serve"]


def __getattr__(name: str) -> Any:
    if name in ("create_app", "serve", "build_generator"):
        from daser_rag.server import app

        return getattr(app, name)
    if name == "Limits":
        from daser_rag.server.settings import Limits

        return Limits
    if name == "DaserClient":
        from daser_rag.server.client import DaserClient

        return DaserClient
    raise AttributeError(name)
