"""Local-disk tier: one file per entry, written atomically (tmp + fsync + rename) and
checksummed, so a crash mid-write leaves at worst a stray temp file, never a servable
torn entry. A file that fails verification is deleted and reported as a miss."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from daser_rag.errors import CorruptEntryError
from daser_rag.kv.codecs import EncodedKV, from_bytes, to_bytes

log = logging.getLogger(__name__)

_RESCAN_PUTS = 256


def _writer_alive(tmp_name: str) -> bool:
    """Temp files are named .tmp-<key>-<pid>-<thread>; another live process may be mid-write."""
    try:
        pid = int(tmp_name.rsplit("-", 2)[1])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return False  # our own earlier incarnation cannot be writing: this process just started
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DiskTier:
    name = "disk"

    def __init__(self, root: str | os.PathLike[str], capacity_bytes: int | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.capacity_bytes = capacity_bytes
        self._lock = threading.RLock()
        self.corrupt_dropped = 0
        self.evictions = 0
        for stray in self.root.glob("*/.tmp-*"):  # leftovers of a crash mid-write
            if not _writer_alive(stray.name):
                stray.unlink(missing_ok=True)
        # bytes held, kept up to date by this process (other processes sharing the directory
        # are caught by a full rescan every `_RESCAN_PUTS` writes)
        self._bytes = self._scan_bytes()
        self._puts_since_scan = 0

    def _path(self, key: str) -> Path:
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"invalid cache key {key!r}")
        return self.root / key[1:3] / f"{key}.kv"

    def get(self, key: str) -> EncodedKV | None:
        path = self._path(key)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            enc = from_bytes(blob, expect_key=key)
        except CorruptEntryError as exc:
            log.warning("dropping corrupt disk entry %s: %s", path, exc)
            self.corrupt_dropped += 1
            path.unlink(missing_ok=True)
            return None
        try:
            os.utime(path)  # recency for LRU trimming
        except OSError:
            pass
        return enc

    def put(self, enc: EncodedKV) -> None:
        path = self._path(enc.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = to_bytes(enc)
        tmp = path.parent / f".tmp-{enc.key}-{os.getpid()}-{threading.get_ident()}"
        try:
            with open(tmp, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            try:
                old = path.stat().st_size
            except FileNotFoundError:
                old = 0
            os.replace(tmp, path)
        except BaseException:
            # a failed write (disk full: ENOSPC on write or fsync) leaves nothing behind; the
            # store counts the error and treats it as a skipped write
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            raise
        with self._lock:
            self._bytes += len(blob) - old
            self._puts_since_scan += 1
            if self._puts_since_scan >= _RESCAN_PUTS:
                self._bytes, self._puts_since_scan = self._scan_bytes(), 0
            over = self.capacity_bytes is not None and self._bytes > self.capacity_bytes
        if over:
            self._trim()

    def _scan_bytes(self) -> int:
        total = 0
        for p in self._files():
            try:
                total += p.stat().st_size
            except FileNotFoundError:
                pass
        return total

    def _files(self) -> list[Path]:
        return [p for p in self.root.glob("*/*.kv")]

    def _trim(self) -> None:
        with self._lock:
            files = []
            for p in self._files():
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                files.append((st.st_mtime, st.st_size, p))
            total = sum(s for _, s, _ in files)
            for _, size, p in sorted(files):
                if total <= (self.capacity_bytes or 0):
                    break
                p.unlink(missing_ok=True)
                total -= size
                self.evictions += 1
            self._bytes = total

    def delete(self, key: str) -> bool:
        path = self._path(key)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return False
        with self._lock:
            self._bytes = max(0, self._bytes - size)
        return True

    def idle_keys(self, max_idle_s: float) -> list[str]:
        """Keys nobody wrote or read for `max_idle_s` seconds (reads touch the file's mtime)."""
        import time

        cutoff = time.time() - max_idle_s
        out = []
        for p in self._files():
            try:
                if p.stat().st_mtime < cutoff:
                    out.append(p.stem)
            except FileNotFoundError:
                pass
        return out

    def contains(self, key: str) -> bool:
        return self._path(key).is_file()

    def keys(self) -> Iterable[str]:
        return [p.stem for p in self._files()]

    def nbytes(self) -> int:
        return self._scan_bytes()

    def clear(self) -> None:
        for p in self._files():
            p.unlink(missing_ok=True)
        with self._lock:
            self._bytes = 0
