"""Document id -> chunk keys, with reference counting, in SQLite.

Two documents can share a chunk (same text, same prefix), so a chunk's KV may only be dropped
when no document references it any more. SQLite gives atomic updates and lets several
processes on one machine share the index.

An update can be one transaction (`commit_document`: text, version and refs together), so a
failure (disk full) leaves the previous version whole. A removed document leaves a "gone" mark
for `GONE_TTL_S`, and refs added to it meanwhile (by a request that resolved it before the
removal) are refused: no ghost documents.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from daser_rag.errors import UnknownDocumentError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS doc_chunks (
    tenant TEXT NOT NULL, doc_id TEXT NOT NULL, chunk_key TEXT NOT NULL,
    PRIMARY KEY (tenant, doc_id, chunk_key)
);
CREATE INDEX IF NOT EXISTS doc_chunks_key ON doc_chunks(chunk_key);
CREATE TABLE IF NOT EXISTS doc_texts (
    tenant TEXT NOT NULL, doc_id TEXT NOT NULL, ord INTEGER NOT NULL, text TEXT NOT NULL,
    PRIMARY KEY (tenant, doc_id, ord)
);
CREATE TABLE IF NOT EXISTS doc_pending (
    tenant TEXT NOT NULL, doc_id TEXT NOT NULL, PRIMARY KEY (tenant, doc_id)
);
CREATE TABLE IF NOT EXISTS doc_gone (
    tenant TEXT NOT NULL, doc_id TEXT NOT NULL, at REAL NOT NULL, version INTEGER NOT NULL,
    PRIMARY KEY (tenant, doc_id)
);
CREATE TABLE IF NOT EXISTS doc_meta (
    tenant TEXT NOT NULL, doc_id TEXT NOT NULL, content_digest TEXT NOT NULL, version INTEGER NOT NULL,
    PRIMARY KEY (tenant, doc_id)
);
"""


GONE_TTL_S = 3600.0
"""How long refs to a removed document are refused (longer than a request can queue and run)."""


@dataclass(frozen=True)
class DocInfo:
    doc_id: str
    content_digest: str
    version: int
    num_chunks: int


class DocIndex:
    def __init__(self, path: str | Path | None = None, *, track_gone: bool = True) -> None:
        """`track_gone=False`: no "gone" marks (an index of derived entries, whose documents are
        registered elsewhere)."""
        self._path = str(path) if path is not None else ":memory:"
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(self._path, check_same_thread=False, timeout=30.0, isolation_level=None)
        if path is not None:
            self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.executescript(_SCHEMA)
        self.gone_ttl_s = GONE_TTL_S
        self.track_gone = track_gone

    def _rollback(self) -> None:
        """Roll back unless SQLite already did: on SQLITE_FULL (disk full) it aborts the
        transaction itself, and a second ROLLBACK would replace the real error with "cannot
        rollback - no transaction is active"."""
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")

    # -- writes ----------------------------------------------------------------------------
    def set_document(
        self, doc_id: str, chunk_texts: Sequence[str], content_digest: str, tenant: str,
        *, version: int | None = None, pending: bool = True,
    ) -> bool:
        """Record a document's chunk texts. Returns True if the content changed (or is new).
        `version` forces the version number (a mirror of another index keeps its numbers).

        A changed document stays *pending* until `replace_refs` ties it to its new chunk keys
        (one transaction each): a process killed in between leaves it listed by
        `pending_documents`, and `KVStore.repair_documents` finishes the switch at start."""
        with self._lock:
            cur = self._conn.execute(
                "SELECT content_digest, version FROM doc_meta WHERE tenant=? AND doc_id=?", (tenant, doc_id)
            ).fetchone()
            if cur is not None and cur[0] == content_digest and (version is None or version == cur[1]):
                return False
            if version is None:
                version = (cur[1] if cur else self._last_version(doc_id, tenant)) + 1
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.execute("DELETE FROM doc_texts WHERE tenant=? AND doc_id=?", (tenant, doc_id))
                self._conn.executemany(
                    "INSERT INTO doc_texts VALUES (?,?,?,?)",
                    [(tenant, doc_id, i, t) for i, t in enumerate(chunk_texts)],
                )
                self._conn.execute(
                    "INSERT OR REPLACE INTO doc_meta VALUES (?,?,?,?)", (tenant, doc_id, content_digest, version)
                )
                if pending:
                    self._conn.execute("INSERT OR IGNORE INTO doc_pending VALUES (?,?)", (tenant, doc_id))
                self._conn.execute("DELETE FROM doc_gone WHERE tenant=? AND doc_id=?", (tenant, doc_id))
                self._conn.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
            return True

    def commit_document(self, doc_id: str, chunk_texts: Sequence[str], content_digest: str,
                        chunk_keys: Iterable[str], tenant: str, *,
                        version: int | None = None) -> tuple[bool, int, list[str]]:
        """Save the text and make `chunk_keys` the doc's only refs in one transaction (nothing
        is written if it fails). Returns (changed, version saved, keys nobody references any
        more). `version` forces the number (a mirror keeps its authority's numbers)."""
        new = set(chunk_keys)
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                cur = self._conn.execute(
                    "SELECT content_digest, version FROM doc_meta WHERE tenant=? AND doc_id=?", (tenant, doc_id)
                ).fetchone()
                changed = cur is None or cur[0] != content_digest or (version is not None and version != cur[1])
                if changed:
                    if version is None:
                        version = (cur[1] if cur else self._last_version(doc_id, tenant)) + 1
                    self._conn.execute("DELETE FROM doc_texts WHERE tenant=? AND doc_id=?", (tenant, doc_id))
                    self._conn.executemany("INSERT INTO doc_texts VALUES (?,?,?,?)",
                                           [(tenant, doc_id, i, t) for i, t in enumerate(chunk_texts)])
                    self._conn.execute("INSERT OR REPLACE INTO doc_meta VALUES (?,?,?,?)",
                                       (tenant, doc_id, content_digest, version))
                else:
                    version = cur[1]
                self._conn.execute("DELETE FROM doc_gone WHERE tenant=? AND doc_id=?", (tenant, doc_id))
                orphans = self._switch(doc_id, tenant, new)
                self._conn.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
            return changed, int(version), orphans

    def _last_version(self, doc_id: str, tenant: str) -> int:
        """The version a removed document had (0 if unknown): a re-add continues from it."""
        row = self._conn.execute("SELECT version FROM doc_gone WHERE tenant=? AND doc_id=?",
                                 (tenant, doc_id)).fetchone()
        return int(row[0]) if row else 0

    def _gone(self, doc_id: str, tenant: str) -> bool:
        row = self._conn.execute("SELECT at FROM doc_gone WHERE tenant=? AND doc_id=?", (tenant, doc_id)).fetchone()
        return self.track_gone and row is not None and time.time() - row[0] < self.gone_ttl_s

    def add_refs(self, doc_id: str, chunk_keys: Iterable[str], tenant: str) -> bool:
        """Tie chunk keys to a document. Refused (False) for a document removed within
        `gone_ttl_s` and not re-added: refs a request adds after a removal make no ghost."""
        with self._lock:
            known = self._conn.execute(
                "SELECT 1 FROM doc_meta WHERE tenant=? AND doc_id=?", (tenant, doc_id)).fetchone()
            if known is None and self._gone(doc_id, tenant):
                return False
            self._conn.executemany(
                "INSERT OR IGNORE INTO doc_chunks VALUES (?,?,?)", [(tenant, doc_id, k) for k in chunk_keys]
            )
            return True

    def _switch(self, doc_id: str, tenant: str, new: set[str]) -> list[str]:
        """Inside a transaction: make `new` the doc's refs, clear its pending mark, return orphans."""
        old = {r[0] for r in self._conn.execute(
            "SELECT chunk_key FROM doc_chunks WHERE tenant=? AND doc_id=?", (tenant, doc_id))}
        gone = old - new
        self._conn.executemany("DELETE FROM doc_chunks WHERE tenant=? AND doc_id=? AND chunk_key=?",
                               [(tenant, doc_id, k) for k in gone])
        self._conn.executemany("INSERT OR IGNORE INTO doc_chunks VALUES (?,?,?)",
                               [(tenant, doc_id, k) for k in new - old])
        self._conn.execute("DELETE FROM doc_pending WHERE tenant=? AND doc_id=?", (tenant, doc_id))
        return [k for k in gone if self._refcount(k) == 0]

    def replace_refs(self, doc_id: str, chunk_keys: Iterable[str], tenant: str, *,
                     version: int | None = None) -> list[str]:
        """Make `chunk_keys` the doc's only refs; return keys that became unreferenced. With
        `version`: only if the document is still at that version (compare-and-set); otherwise
        nothing switches and the given keys nobody references are returned (to be dropped)."""
        new = set(chunk_keys)
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                if version is not None:
                    row = self._conn.execute("SELECT version FROM doc_meta WHERE tenant=? AND doc_id=?",
                                             (tenant, doc_id)).fetchone()
                    if row is None or row[0] != version:
                        self._conn.execute("COMMIT")
                        return [k for k in new if self._refcount(k) == 0]
                orphans = self._switch(doc_id, tenant, new)
                self._conn.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
            return orphans

    def remove_document(self, doc_id: str, tenant: str) -> list[str] | None:
        """Forget a document. Returns the chunk keys nobody references any more, or None if unknown."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                keys = [r[0] for r in self._conn.execute(
                    "SELECT chunk_key FROM doc_chunks WHERE tenant=? AND doc_id=?", (tenant, doc_id))]
                known = self._conn.execute(
                    "SELECT version FROM doc_meta WHERE tenant=? AND doc_id=?", (tenant, doc_id)).fetchone()
                if not keys and not known:
                    self._conn.execute("COMMIT")
                    return None
                for table in ("doc_chunks", "doc_texts", "doc_meta", "doc_pending"):
                    self._conn.execute(f"DELETE FROM {table} WHERE tenant=? AND doc_id=?", (tenant, doc_id))
                if self.track_gone:
                    now = time.time()
                    self._conn.execute("DELETE FROM doc_gone WHERE at < ?", (now - self.gone_ttl_s,))  # marks expire
                    self._conn.execute("INSERT OR REPLACE INTO doc_gone VALUES (?,?,?,?)",
                                       (tenant, doc_id, now, known[0] if known else 0))
                orphans = [k for k in keys if self._refcount(k) == 0]
                self._conn.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
            return orphans

    def clear(self) -> None:
        with self._lock:
            for table in ("doc_chunks", "doc_texts", "doc_meta", "doc_pending", "doc_gone"):
                self._conn.execute(f"DELETE FROM {table}")

    # -- reads -----------------------------------------------------------------------------
    def _refcount(self, key: str) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM doc_chunks WHERE chunk_key=?", (key,)).fetchone()[0])

    def refcount(self, key: str) -> int:
        with self._lock:
            return self._refcount(key)

    def chunk_keys(self, doc_id: str, tenant: str) -> list[str]:
        with self._lock:
            return [r[0] for r in self._conn.execute(
                "SELECT chunk_key FROM doc_chunks WHERE tenant=? AND doc_id=?", (tenant, doc_id))]

    def chunk_texts(self, doc_id: str, tenant: str) -> list[str]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT text FROM doc_texts WHERE tenant=? AND doc_id=? ORDER BY ord", (tenant, doc_id)).fetchall()
        if not rows:
            raise UnknownDocumentError(doc_id)
        return [r[0] for r in rows]

    def info(self, doc_id: str, tenant: str) -> DocInfo | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT content_digest, version FROM doc_meta WHERE tenant=? AND doc_id=?", (tenant, doc_id)
            ).fetchone()
            if row is None:
                return None
            n = self._conn.execute(
                "SELECT COUNT(*) FROM doc_texts WHERE tenant=? AND doc_id=?", (tenant, doc_id)).fetchone()[0]
        return DocInfo(doc_id, row[0], row[1], n)

    def documents(self, tenant: str) -> list[str]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT doc_id FROM doc_meta WHERE tenant=? UNION SELECT doc_id FROM doc_chunks WHERE tenant=? "
                "ORDER BY 1", (tenant, tenant)).fetchall()
        return [r[0] for r in rows]

    def num_documents(self, tenant: str) -> int:
        with self._lock:
            return int(self._conn.execute(
                "SELECT COUNT(*) FROM (SELECT doc_id FROM doc_meta WHERE tenant=? UNION "
                "SELECT doc_id FROM doc_chunks WHERE tenant=?)", (tenant, tenant)).fetchone()[0])

    def pending_documents(self) -> list[tuple[str, str]]:
        """(tenant, doc_id) of documents whose text changed but whose refs were not switched yet."""
        with self._lock:
            return [(r[0], r[1]) for r in self._conn.execute("SELECT tenant, doc_id FROM doc_pending ORDER BY 1, 2")]

    def referenced_keys(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._conn.execute("SELECT DISTINCT chunk_key FROM doc_chunks")}
