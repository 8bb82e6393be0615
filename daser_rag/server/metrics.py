"""Prometheus metrics for the service.

Request-level numbers (TTFT, recompute share, chunk hits/misses per request) are observed as
requests finish; store-level numbers (hits per tier, bytes per tier, evictions, invalidations,
corrupt drops, Redis health) are read from the store at scrape time by a custom collector, so
scraping never waits for the model lock. What a scrape costs Redis does not grow with the
keyspace: bytes and entries of the Redis tier come from a sampled, incremental SCAN bounded per
scrape and rate-limited (`tiers.redis._ScanSampler`), the document count is one SCARD. Each app gets its own registry, so several apps can
live in one process (tests) without colliding.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from daser_rag.kv.store import KVStore
    from daser_rag.types import GenerationResult

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
_SHARE_BUCKETS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0)


class _StoreCollector(Collector):
    def __init__(self, store: KVStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        st = self.store.snapshot()
        count = st.counters.get
        hits = CounterMetricFamily("daser_store_hits", "Chunk KV reads served, by tier", labels=["tier"])
        for tier, n in st.hits.items():
            hits.add_metric([tier], float(n))
        yield hits
        yield CounterMetricFamily("daser_store_misses", "Chunk KV reads found in no tier", value=float(count("miss", 0)))
        yield CounterMetricFamily("daser_store_puts", "Chunk KV entries written", value=float(count("put", 0)))
        nbytes = GaugeMetricFamily("daser_tier_bytes", "Bytes held per tier (-1: tier unreachable)", labels=["tier"])
        entries = GaugeMetricFamily("daser_tier_entries", "Entries held per tier (-1: tier unreachable)", labels=["tier"])
        for tier, val in st.bytes.items():
            nbytes.add_metric([tier], float(val))
        for tier, val in st.entries.items():
            entries.add_metric([tier], float(val))
        yield nbytes
        yield entries
        ev = CounterMetricFamily("daser_evictions", "Entries evicted for capacity, by tier", labels=["tier"])
        ev.add_metric(["host"], float(st.evictions_host))
        disk = getattr(self.store, "disk", None)
        if disk is not None:
            ev.add_metric(["disk"], float(getattr(disk, "evictions", 0)))
        yield ev
        yield CounterMetricFamily("daser_invalidations", "Document invalidations applied",
                                  value=float(count("invalidations", 0)))
        yield CounterMetricFamily("daser_invalidated_chunks", "Chunk KV entries dropped by invalidation or update",
                                  value=float(count("invalidated_chunks", 0)))
        yield CounterMetricFamily("daser_gc_dropped", "Idle local KV no document referenced, dropped by the "
                                  "garbage collector", value=float(count("gc_dropped", 0)))
        yield CounterMetricFamily("daser_stale_local_dropped", "Local copies dropped because another process "
                                  "invalidated them", value=float(count("stale_dropped", 0)))
        corrupt = CounterMetricFamily("daser_corrupt_dropped", "Entries that failed their checksum (dropped, never "
                                      "served)", labels=["tier"])
        corrupt.add_metric(["disk"], float(st.corrupt_dropped))
        remote = getattr(self.store, "remote", None)
        if remote is not None:
            corrupt.add_metric([remote.name], float(getattr(remote, "corrupt_dropped", 0)))
        yield corrupt
        link = getattr(remote, "link", None)
        if link is not None:
            yield GaugeMetricFamily("daser_redis_up", "1 while the shared Redis tier answers", value=float(link.up))
            yield CounterMetricFamily("daser_redis_errors", "Failed Redis calls", value=float(link.errors))
            yield GaugeMetricFamily("daser_redis_pending_invalidations", "Invalidations queued during an outage",
                                    value=float(link.pending))
            yield CounterMetricFamily("daser_redis_fenced_puts", "Writes refused because the entry was invalidated "
                                      "while being computed", value=float(getattr(remote, "fenced_puts", 0)))
            refusals = CounterMetricFamily("daser_redis_refusals", "Redis error replies that refused a command "
                                           "(OOM: maxmemory reached; READONLY, LOADING, ...), by reason",
                                           labels=["reason"])
            for reason, n in sorted(getattr(link, "refusals", {}).items()):
                refusals.add_metric([reason], float(n))
            yield refusals
            yield CounterMetricFamily("daser_redis_refused_puts", "KV writes Redis refused (skipped; KV is a cache)",
                                      value=float(getattr(remote, "refused_puts", 0)))
        index = getattr(self.store, "index", None)
        mirror_errors = getattr(index, "mirror_errors", None)
        if mirror_errors is not None:
            yield CounterMetricFamily("daser_index_mirror_errors", "Writes of the local index mirror that failed "
                                      "(local disk full); Redis held them", value=float(mirror_errors))
            yield CounterMetricFamily("daser_refused_refs", "Chunk refs refused because their document was removed "
                                      "while the request ran", value=float(getattr(index, "refused_refs", 0)))
        errors = CounterMetricFamily("daser_storage_errors", "Failed storage operations by tier (degraded to a miss "
                                     "or a skipped write; disk: local disk full or failing)", labels=["tier"])
        for tier, n in sorted(st.errors.items()):
            errors.add_metric([tier], float(n))
        yield errors
        problems = getattr(self.store, "problems", None)
        yield GaugeMetricFamily("daser_storage_degraded", "1 while /health reports a storage problem (see its "
                                "reasons)", value=float(bool(problems())) if callable(problems) else 0.0)


class ServiceMetrics:
    def __init__(self, store: KVStore) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("daser_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.ttft = Histogram("daser_ttft_seconds", "Time from request arrival to first token (queueing included)",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.latency = Histogram("daser_request_seconds", "Completion request latency", buckets=_TTFT_BUCKETS,
                                 registry=r)
        self.recompute_share = Histogram("daser_recompute_share", "Share of context tokens recomputed per request",
                                         buckets=_SHARE_BUCKETS, registry=r)
        self.chunk_hits = Counter("daser_chunk_hits", "Context chunks served from cache", registry=r)
        self.chunk_misses = Counter("daser_chunk_misses", "Context chunks computed at request time", registry=r)
        self.tokens = Counter("daser_completion_tokens", "Generated tokens", registry=r)
        self.inflight = Gauge("daser_inflight_requests", "Generation requests admitted and not finished", registry=r)
        self.inflight_documents = Gauge("daser_inflight_document_requests",
                                        "Document writes (add, update, delete) admitted and not finished", registry=r)
        self.cancelled = Counter("daser_cancelled", "Generations stopped early, by reason (client_closed: the "
                                 "client disconnected; deadline_exceeded)", ["reason"], registry=r)
        self.tenants = Gauge("daser_tenants", "Distinct tenant names in use in this process (bounded per key)",
                             registry=r)
        r.register(_StoreCollector(store))

    def observe_result(self, result: GenerationResult, ttft_s: float, total_s: float) -> None:
        self.ttft.observe(ttft_s)
        self.latency.observe(total_s)
        self.recompute_share.observe(result.recompute_share)
        self.chunk_hits.inc(result.cache_hits)
        self.chunk_misses.inc(result.cache_misses)
        self.tokens.inc(result.completion_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
