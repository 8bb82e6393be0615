"""Prefix tree over chunk sequences: system prefix -> chunk -> chunk -> ...

A chunk's stored KV was computed right after the system prefix, so it is exact only as the
first chunk of a prompt; later chunks need CacheBlend repair. But RAG traffic repeats: the
same question family retrieves the same ordered chunks. For such a sequence we store, per
tree node, the KV of that node's chunk computed *after the whole path above it*. A node's
KV is exact for any prompt that starts with the node's path, so a request uses the longest
stored path as an exact run (no repair) and blends only the chunks after it.

Node at depth 1 is the plain chunk entry (same key, shared with everything else). Deeper
nodes are keyed by a hash of the prefix key and the chunk keys on their path, so changed
text anywhere on the path can never hit. Nodes are ordinary store entries: they are evicted,
spilled to disk, and invalidated (registered under every document on their path) like
chunks. Evicting a parent leaves its children valid: a child's bytes depend only on the
path's content, which a recomputed parent reproduces exactly.

The tree itself only keeps counts (how often a path was requested) to decide when paying
for an exact extension is worth it; lookups ask the store, so entries written by another
process or before a restart are found too.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from daser_rag import settings


def node_key(prefix_key: str, chunk_keys: Sequence[str]) -> str:
    """Store key of the node for `chunk_keys` (a path of >= 1 chunks) after `prefix_key`."""
    if not chunk_keys:
        raise ValueError("a tree node needs at least one chunk")
    if len(chunk_keys) == 1:
        return chunk_keys[0]
    h = hashlib.blake2b(digest_size=16)
    h.update(b"daser-seq-v1\0")
    h.update(prefix_key.encode())
    for k in chunk_keys:
        h.update(b"\0" + k.encode())
    return "s" + h.hexdigest()


@dataclass
class _Node:
    count: int = 0
    children: dict[str, _Node] = field(default_factory=dict)


@dataclass(frozen=True)
class TreeMatch:
    """Result of a lookup: `depth` leading chunks are covered by exact stored KV.

    node_keys[j] is the store key to use for chunk j when j < depth (node_keys[0] is the chunk
    key itself). `count` is how many times this exact sequence was requested, this time included.
    """

    depth: int
    node_keys: list[str]
    count: int


class PrefixTree:
    def __init__(self, *, materialize_after: int = 2,
                 max_nodes: int = settings.PREFIX_TREE_MAX_NODES.default) -> None:
        if materialize_after < 1:
            raise ValueError(f"materialize_after must be >= 1, got {materialize_after}")
        if max_nodes < 1:
            raise ValueError(f"max_nodes must be >= 1, got {max_nodes}")
        self.materialize_after = materialize_after
        self.max_nodes = max_nodes
        self._roots: dict[str, _Node] = {}
        self._nodes = 0
        self._lock = threading.Lock()
        self.pruned = 0
        """Times the full tree made room (see `_prune`)."""

    def __len__(self) -> int:
        return self._nodes

    def record(self, prefix_key: str, chunk_keys: Sequence[str]) -> int:
        """Count one request for this ordered sequence; returns the full path's count."""
        with self._lock:
            if self._nodes + len(chunk_keys) > self.max_nodes:
                self._prune()
            node = self._roots.setdefault(prefix_key, _Node())
            node.count += 1
            for k in chunk_keys:
                child = node.children.get(k)
                if child is None:
                    if self._nodes >= self.max_nodes:
                        return 0  # a path longer than the whole tree: not counted
                    child = node.children[k] = _Node()
                    self._nodes += 1
                child.count += 1
                node = child
            return node.count

    def count(self, prefix_key: str, chunk_keys: Sequence[str]) -> int:
        with self._lock:
            node = self._roots.get(prefix_key)
            for k in chunk_keys:
                if node is None:
                    return 0
                node = node.children.get(k)
            return 0 if node is None else node.count

    @staticmethod
    def longest_stored(prefix_key: str, chunk_keys: Sequence[str], contains: Callable[[str], bool]) -> TreeMatch:
        """Depth of the longest path whose deeper nodes (depth >= 2) are all stored.

        Depth 1 needs nothing stored: the first chunk's own entry is exact (or is computed
        in place, exactly, when missing).
        """
        keys = [node_key(prefix_key, chunk_keys[: j + 1]) for j in range(len(chunk_keys))]
        depth = min(1, len(chunk_keys))
        while depth < len(chunk_keys) and contains(keys[depth]):
            depth += 1
        return TreeMatch(depth, keys, 0)

    def should_materialize(self, count: int, depth: int, n_chunks: int) -> bool:
        return depth < n_chunks and count >= self.materialize_after

    def forget(self, prefix_key: str | None = None) -> None:
        with self._lock:
            if prefix_key is None:
                self._roots.clear()
                self._nodes = 0
            else:
                self._roots.pop(prefix_key, None)
                self._nodes = sum(self._count_nodes(r) for r in self._roots.values())

    def _prune(self) -> None:
        """Make room when the tree is full (it used to stop learning for good): forget the paths
        requested only once (the many one-off orders), or everything when those are not enough to
        free a quarter of the tree. Counts only decide what is worth materializing, so forgetting
        one costs at most one more request before that path is stored; stored nodes stay."""
        def drop_singles(node: _Node) -> None:
            for k in [k for k, c in node.children.items() if c.count < 2]:
                del node.children[k]
            for c in node.children.values():
                drop_singles(c)

        for r in self._roots.values():
            drop_singles(r)
        self._nodes = sum(self._count_nodes(r) for r in self._roots.values())
        if self._nodes > 3 * self.max_nodes // 4:
            self._roots.clear()
            self._nodes = 0
        self.pruned += 1

    @classmethod
    def _count_nodes(cls, node: _Node) -> int:
        return sum(1 + cls._count_nodes(c) for c in node.children.values())
