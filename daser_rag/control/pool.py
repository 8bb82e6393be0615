"""The vLLM instances behind the control plane: who is up, who is busy, and the HTTP calls.

A monitor thread asks every instance's `/health` every `health_interval_s`; an instance that
fails a request or a check is taken out of rotation for `down_s` (and its host-tier record is
forgotten, since a restarted instance starts empty). Requests pick among the instances that
are up through the routing policy; a request that fails on one instance before it finished is
retried on another by the engine (`vllm_engine.py`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import httpx

from daser_rag.control.routing import InstanceState, RoutingPolicy
from daser_rag.errors import EngineUnavailableError, InvalidInputError

log = logging.getLogger(__name__)

DEFAULT_HEALTH_INTERVAL_S = 2.0
DEFAULT_DOWN_S = 5.0
"""Seconds an instance that failed stays out of rotation before the monitor may readmit it."""
DEFAULT_FIRST_TOKEN_TIMEOUT_S = 120.0
"""An instance silent for this long (no token, no byte) counts as hung: the request moves on."""


class InstanceFailed(Exception):
    """A call to one instance failed in a way another instance may not (connection, 5xx, hang)."""


class InstancePool:
    def __init__(self, urls: Sequence[str], router: RoutingPolicy, *,
                 health_interval_s: float = DEFAULT_HEALTH_INTERVAL_S, down_s: float = DEFAULT_DOWN_S,
                 read_timeout_s: float = DEFAULT_FIRST_TOKEN_TIMEOUT_S, max_connections: int = 256) -> None:
        if not urls:
            raise ValueError("the vLLM engine needs at least one instance URL")
        self.instances = [InstanceState(u.rstrip("/"), f"vllm-{i}") for i, u in enumerate(urls)]
        self.router = router
        self.down_s = down_s
        self.health_interval_s = health_interval_s
        self.client = httpx.Client(timeout=httpx.Timeout(read_timeout_s, connect=2.0),
                                   limits=httpx.Limits(max_connections=max_connections, keepalive_expiry=2.0))
        self._probe = httpx.Client(timeout=httpx.Timeout(1.0, connect=0.5))
        self._lock = threading.Lock()
        self.routed_chunks = 0
        self.routed_held = 0
        """Chunks of routed requests, and how many of them the chosen instance held in its host tier
        by the control plane's record: the routing hit rate `/health` reports."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- choosing ---------------------------------------------------------------------------------
    def acquire(self, keys: Sequence[str], exclude: set[str] = frozenset(),  # type: ignore[assignment]
                tokens: int = 0) -> InstanceState:
        """An available instance for a request over chunk `keys` that computes `tokens` prompt
        tokens before its first one (its in-flight count and queued work taken; `first_token`
        moves it to decoding, `release` gives it back)."""
        return self.acquire_work(keys, exclude, tokens)[0]

    def acquire_work(self, keys: Sequence[str], exclude: set[str] = frozenset(),  # type: ignore[assignment]
                     tokens: int = 0, path: str | None = None,
                     cached_tokens: int = 0) -> tuple[InstanceState, int]:
        """`acquire` for a request over the ordered chunk `path` (`routing.path_id`), which
        computes `cached_tokens` fewer tokens where vLLM's prefix cache holds that path:
        (instance, the tokens charged to its queued work there). Give the same number back to
        `first_token` / `release`."""
        now = time.monotonic()
        with self._lock:
            ok = [i for i in self.instances
                  if i.url not in exclude and i.disabled is None and i.healthy and now >= i.down_until]
            if not ok:
                tried = f" ({len(exclude)} tried for this request)" if exclude else ""
                raise EngineUnavailableError(
                    f"no vLLM instance is available{tried}: " + "; ".join(
                        f"{i.name} {i.url}: {i.disabled or i.last_error or 'down'}" for i in self.instances), self.down_s)
            inst = self.router.choose(ok, keys, tokens, path, cached_tokens)
            if inst.holds_path(path):
                tokens = max(0, tokens - cached_tokens)
            inst.inflight += 1
            inst.prefilling += 1
            inst.prefill_tokens += tokens
            self.routed_chunks += len(keys)
        self.routed_held += inst.holds(keys)  # the chosen instance's host tier had these (our record)
        return inst, tokens

    def first_token(self, inst: InstanceState, tokens: int = 0) -> None:
        """The request's first token came back: its prefill work is done (it decodes now)."""
        with self._lock:
            inst.prefilling -= 1
            inst.prefill_tokens -= tokens

    def release(self, inst: InstanceState, keys: Sequence[str] = (), *, ok: bool = True, tokens: int = 0,
                prefilling: bool = True, path: str | None = None) -> None:
        """The request is over on `inst`; `prefilling`: it never got its first token (its queued
        `tokens` are given back here rather than by `first_token`)."""
        with self._lock:
            inst.inflight -= 1
            if prefilling:
                inst.prefilling -= 1
                inst.prefill_tokens -= tokens
            if ok:
                inst.served += 1
        if ok and keys:
            inst.remember(keys)
            inst.remember_path(path)

    def fail(self, inst: InstanceState, why: str) -> None:
        with self._lock:
            inst.healthy = False
            inst.down_until = time.monotonic() + self.down_s
            inst.failures += 1
            inst.last_error = why
        inst.forget_all()
        log.warning("vLLM instance %s (%s) taken out of rotation for %.0f s: %s", inst.name, inst.url, self.down_s,
                    why)

    # -- calls --------------------------------------------------------------------------------------
    def stream_completion(self, inst: InstanceState, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """POST /v1/completions with stream=True; yields each SSE event's JSON. Connection errors,
        5xx answers and silence past the read timeout raise InstanceFailed (retry elsewhere); a 4xx
        is the request's own fault and raises EngineRequestError."""
        try:
            with self.client.stream("POST", inst.url + "/v1/completions", json=body) as r:
                if r.status_code >= 500:
                    r.read()
                    raise InstanceFailed(f"HTTP {r.status_code}: {r.text[:300]}")
                if r.status_code >= 400:
                    r.read()
                    raise EngineRequestError(f"vLLM refused the request (HTTP {r.status_code}): {r.text[:500]}")
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        return
                    data = json.loads(line[6:])
                    if "error" in data and not data.get("choices"):
                        raise InstanceFailed(f"stream error: {str(data['error'])[:300]}")
                    yield data
        except httpx.HTTPError as exc:  # connect/read errors, timeouts, a peer that went away
            raise InstanceFailed(f"{type(exc).__name__}: {exc}") from exc

    # -- health -----------------------------------------------------------------------------------
    def check(self, inst: InstanceState) -> bool:
        try:
            up = self._probe.get(inst.url + "/health").status_code == 200
            why = None if up else "health check answered non-200"
        except httpx.HTTPError as exc:
            up, why = False, f"health check: {type(exc).__name__}"
        with self._lock:
            if up and not inst.healthy and time.monotonic() >= inst.down_until:
                inst.healthy, inst.last_error = True, None
                log.info("vLLM instance %s (%s) is back in rotation", inst.name, inst.url)
            elif not up and inst.healthy:
                inst.healthy, inst.last_error = False, why
                inst.down_until = time.monotonic() + self.down_s
        if not up:
            inst.forget_all()
        return up

    def max_model_len(self, inst: InstanceState) -> int | None:
        """The instance's `--max-model-len` (from /v1/models): prompts plus answers must fit it."""
        try:
            r = self._probe.get(inst.url + "/v1/models")
            lens = [int(m["max_model_len"]) for m in r.json().get("data", []) if m.get("max_model_len")]
            return min(lens) if r.status_code == 200 and lens else None
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None

    def version(self, inst: InstanceState) -> str | None:
        try:
            r = self._probe.get(inst.url + "/version")
            return str(r.json().get("version")) if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def start_monitor(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._monitor, name="daser-vllm-health", daemon=True)
            self._thread.start()

    def _monitor(self) -> None:
        while not self._stop.wait(self.health_interval_s):
            for inst in self.instances:
                self.check(inst)

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"name": i.name, "url": i.url,
                     "healthy": i.disabled is None and i.healthy and time.monotonic() >= i.down_until,
                     "disabled": i.disabled,
                     "inflight": i.inflight, "prefill_tokens": i.prefill_tokens, "served": i.served, "failures": i.failures,
                     "last_error": i.last_error, "version": i.version, "cached_chunks": len(i.keys)}
                    for i in self.instances]

    def close(self) -> None:
        self._stop.set()
        self.client.close()
        self._probe.close()


class EngineRequestError(InvalidInputError):
    """vLLM rejected the request itself (4xx): retrying elsewhere would not help."""


__all__ = ["DEFAULT_DOWN_S", "DEFAULT_FIRST_TOKEN_TIMEOUT_S", "DEFAULT_HEALTH_INTERVAL_S", "EngineRequestError",
           "InstanceFailed", "InstancePool"]
