"""Eviction policies for byte-budgeted tiers. A policy only orders victims; the tier owns bytes."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Protocol


class EvictionPolicy(Protocol):
    def on_insert(self, key: str, nbytes: int) -> None: ...
    def on_access(self, key: str) -> None: ...
    def on_remove(self, key: str) -> None: ...
    def victims(self) -> Iterable[str]:
        """Candidate keys, best victim first."""
        ...


class LRUPolicy:
    """Least recently used first."""

    def __init__(self) -> None:
        self._order: OrderedDict[str, None] = OrderedDict()

    def on_insert(self, key: str, nbytes: int) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def on_access(self, key: str) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def on_remove(self, key: str) -> None:
        self._order.pop(key, None)

    def victims(self) -> Iterable[str]:
        return list(self._order)


ProtectFn = Callable[[str], bool]
