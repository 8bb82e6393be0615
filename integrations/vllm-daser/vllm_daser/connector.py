"""DaserKVConnector: vLLM v1 KV connector backed by daser-rag's KVStore.

Enable it by name (the `vllm.general_plugins` entry point of this distribution registers it):
    --kv-transfer-config '{"kv_connector":"DaserKVConnector","kv_role":"kv_both",
        "kv_load_failure_policy":"recompute","kv_connector_extra_config":{"store_dir":"/path"}}'
(`vllm_daser.prompts.kv_transfer_config` builds it). vLLM runs the scheduler half and the
worker half in different processes; they share nothing but the store directory and the
per-step metadata below. In vLLM's v1 style the two halves are separate classes
(`DaserConnectorScheduler`, `DaserConnectorWorker`) behind one facade.

Scheduler: for each new request, find the longest run of plan segments (see plan.py) present
in the store beyond what vLLM's own prefix cache already holds, and report it as external
hits (capped at prompt length - 1: vLLM must compute at least one token). Every step, name the
plan segments whose tokens became fully computed in an exact context, so the worker can save
them.
Worker: before the forward pass, write the hit entries into the request's paged blocks,
re-rotating keys from the positions an entry was computed at to the positions it takes in this
prompt (chunks in any order, full reuse); after the forward pass, read newly computed segments
out of the paged cache and put them in the store as ordinary daser `ChunkKV` entries (same
keys, same layout the embedded generator uses). An entry that disappeared, fails its checksum
or does not hold the request's tokens is a load error: vLLM recomputes those blocks (with
kv_load_failure_policy="recompute"); it is never served.
Prefetch (PCR, see prefetch.py): a control message names the chunks a request the control plane
has queued will read; the scheduler sees it on arrival (`on_new_request`), the worker loads them
into its host tier in the background and pins them until that request has loaded them. A stats
message answers with the worker's counters (`kv_transfer_params["daser_stats"]`).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.logger import init_logger

from daser_rag.control.wire import PLAN_FIELD, STATS_FIELD
from daser_rag.kv.chunk_kv import ChunkKV
from daser_rag.kv.shared import default_namespace, open_store
from daser_rag.kv.store import KVStore
from daser_rag.calibration.adapter import place_kv
from daser_rag.model.rope import rerotate_keys, rope_cos_sin
from daser_rag.settings import VLLM_PREFETCH_MAX_BYTES, VLLM_PREFETCH_MAX_REQUESTS, VLLM_PREFETCH_TTL
from vllm_daser.layout import PagedLayout, layer_order, layout_for, slots_for
from vllm_daser.plan import (
    Control,
    Plan,
    PlanError,
    Segment,
    block_chain_segments,
    parse_control,
    parse_plan,
    save_limit,
    stored_run,
)
from vllm_daser.prefetch import HostPrefetch
from vllm_daser.rope import inv_freq_for

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = init_logger("vllm.ext.daser_connector")  # under "vllm." so vLLM's handlers print it


@dataclass
class _Piece:
    """Part of a stored segment: entry `key`, token offsets [lo, hi) inside it, placed at `start`."""

    key: str
    lo: int
    hi: int
    start: int


@dataclass
class LoadSpec:
    req_id: str
    block_ids: list[int]
    token_ids: list[int]  # the prompt span being loaded, checked against the entries
    start: int
    end: int
    pieces: list[_Piece]
    recompute: tuple[float, int, str] | None = None  # (ratio, check layer, selector), see blend.py
    exact_len: int = 0  # leading tokens whose loaded KV is exact (never recomputed)
    chunk_starts: list[int] = field(default_factory=list)  # prompt position of each re-positioned segment
    context_ids: list[int] = field(default_factory=list)  # prompt tokens [0, end), for recompute
    prefetch_id: str | None = None  # the prefetch pin that holds these entries (released after the load)
    scales: tuple[Any, Any] | None = None  # calibration (key, value) factors [layers][kv_heads] past exact_len
    bias: tuple[tuple[int, int, int], bytes, bytes] | None = None  # calibration biases (plan.py Plan.bias)
    token_map: str | None = None  # digest of a published calibration whose token map applies (plan.py Plan.token_map)


def _plan_calibration(ld: LoadSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A load's calibration as tensors: key and value factors [layers, kv_heads], key and value
    biases [layers, kv_heads, head_dim] (None without biases); the plan parser checked them."""
    assert ld.scales is not None
    ks = torch.tensor(ld.scales[0], dtype=torch.float32)
    vs = torch.tensor(ld.scales[1], dtype=torch.float32)
    if ld.bias is None:
        return ks, vs, None, None
    shape, kraw, vraw = ld.bias
    return (ks, vs, torch.frombuffer(bytearray(kraw), dtype=torch.float32).view(shape),
            torch.frombuffer(bytearray(vraw), dtype=torch.float32).view(shape))


@dataclass
class SaveSpec:
    req_id: str
    key: str
    block_ids: list[int]
    token_ids: list[int]
    start: int


@dataclass
class PrefetchSpec:
    req_id: str  # the control plane's id of the queued request (its plan's prefetch_id)
    keys: list[str]
    ttl_s: float | None = None


@dataclass
class DaserConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    prefetches: list[PrefetchSpec] = field(default_factory=list)
    releases: list[str] = field(default_factory=list)  # prefetch pins to end


@dataclass
class DaserWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker -> scheduler, every step: each worker's stats (what a stats message answers)."""

    workers: list[dict[str, Any]] = field(default_factory=list)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        extra = other.workers if isinstance(other, DaserWorkerMetadata) else []
        return DaserWorkerMetadata(self.workers + extra)


@dataclass
class _ReqState:
    """Scheduler-side bookkeeping of one running request (for saving across steps)."""

    tokens: list[int]
    segments: list[Segment]
    block_ids: list[int]
    limit: int  # segments [0, limit) may be saved (see plan.save_limit)
    next_seg: int = 0
    next_start: int = 0


@dataclass
class _Settings:
    store_dir: str
    block_size: int
    cache_dtype: str
    save: bool
    block_fallback: bool
    codec: str
    fingerprint: str
    host_bytes: int
    redis_url: str = ""
    redis_namespace: str = ""
    prefetch_max_requests: int = VLLM_PREFETCH_MAX_REQUESTS.default
    prefetch_max_bytes: int = VLLM_PREFETCH_MAX_BYTES.default
    prefetch_ttl_s: float = VLLM_PREFETCH_TTL.default
    calibration_dir: str = ""
    """Where the control plane publishes the calibrations plans name by digest ("": `store_dir`)."""

    @property
    def calibration_root(self) -> str:
        return self.calibration_dir or self.store_dir

    @classmethod
    def from_config(cls, vllm_config: VllmConfig) -> _Settings:
        cfg = vllm_config.kv_transfer_config
        get = cfg.get_from_extra_config
        store_dir = get("store_dir", None)
        if not store_dir:
            raise ValueError("DaserKVConnector needs kv_connector_extra_config['store_dir'] "
                             "(the daser KVStore directory shared with the process that prepares requests)")
        m = vllm_config.model_config
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{m.model}|{getattr(m, 'revision', None)}|{m.dtype}|{vllm_config.cache_config.cache_dtype}".encode())
        return cls(str(store_dir), vllm_config.cache_config.block_size, vllm_config.cache_config.cache_dtype,
                   bool(get("save", True)), bool(get("block_fallback", True)), str(get("codec", "bf16")),
                   str(get("fingerprint", "") or h.hexdigest()), int(get("host_bytes", 1 << 30)),
                   str(get("redis_url", "") or ""), str(get("redis_namespace", "") or ""),
                   int(get("prefetch_max_requests", VLLM_PREFETCH_MAX_REQUESTS.default)),
                   int(get("prefetch_max_bytes", VLLM_PREFETCH_MAX_BYTES.default)),
                   float(get("prefetch_ttl_s", VLLM_PREFETCH_TTL.default)),
                   str(get("calibration_dir", "") or ""))

    def open_store(self, host_bytes: int) -> KVStore:
        if self.redis_url:
            # Shared with other vLLM instances and daser processes: KV any of them stored is a
            # hit here, and a local copy is served only while Redis still holds the entry, so an
            # invalidation anywhere in the deployment reaches this instance on its next lookup.
            return open_store(self.store_dir, redis_url=self.redis_url, codec=self.codec, host_bytes=host_bytes,
                              namespace=self.redis_namespace or default_namespace(self.fingerprint))
        store = KVStore(self.store_dir, codec=self.codec, host_bytes=host_bytes)
        disk = store.disk
        # a RAM copy is served only while the disk copy exists: another process that
        # invalidates a document deletes the files, and this process must not keep serving them
        store.validate = lambda key: disk is None or disk.contains(key)
        return store


class DaserConnectorScheduler:
    """Runs in vLLM's scheduler process: hit lookup and save planning. Reads only `contains`."""

    def __init__(self, settings: _Settings, max_num_seqs: int = 1 << 30) -> None:
        self.s = settings
        self.max_num_seqs = max_num_seqs
        self._active: set[str] = set()  # planned requests vLLM holds (waiting or running)
        self.store = settings.open_store(0)
        self._pending: dict[str, tuple[int, int, list[_Piece], int, Plan | None]] = {}
        self._reqs: dict[str, _ReqState] = {}
        self._prefetches: list[PrefetchSpec] = []  # control messages for the next step's metadata
        self._releases: list[str] = []
        self._pids: dict[str, str] = {}  # vLLM request id -> the prefetch pin its entries are under
        self.worker_stats: list[dict[str, Any]] = []  # the latest the workers reported
        self._maps_seen: set[str] = set()  # calibration digests found published (`_map_readable`)
        self._maps_missing: set[str] = set()  # ... and found missing (warned once each)

    def control(self, request: Request) -> Control | None:
        try:
            return parse_control(request.kv_transfer_params)
        except PlanError as exc:
            logger.warning("DaserKVConnector: ignoring the control message of request %s: %s",
                           request.request_id, exc)
            return None

    def on_new_request(self, request: Request) -> None:
        """On arrival, before vLLM's waiting queue: a prefetch or release message takes effect in
        the next step, however long vLLM's queue is. A planned request prefetches its own entries
        (under its plan's `prefetch_id`, or its own id): while it waits for a slot in vLLM, they
        come into host RAM, and its load then reads RAM (PCR with vLLM's own queue). Only when
        vLLM already holds `max_num_seqs` requests: otherwise it runs at the next step."""
        msg = self.control(request)
        if msg is None:
            self._active.add(request.request_id)
            # only a request that must wait for a slot gains: one scheduled at the next step would
            # have a background read compete with its own forward pass for the same cores
            if self.s.prefetch_max_requests > 0 and len(self._active) > self.max_num_seqs:
                self._prefetch_own(request)
            return
        if msg.release is not None:
            self._releases.append(msg.release)
        if msg.prefetch is not None:
            self._prefetches.append(PrefetchSpec(msg.prefetch, list(msg.keys), msg.ttl_s))

    def _prefetch_own(self, request: Request) -> None:
        try:
            plan = parse_plan(request.kv_transfer_params, len(request.prompt_token_ids or []))
        except PlanError:
            return  # get_num_new_matched_tokens says why, once
        if plan is None or not plan.segments:
            return
        pid = plan.prefetch_id or request.request_id
        self._pids[request.request_id] = pid
        self._prefetches.append(PrefetchSpec(pid, list(dict.fromkeys(s.key for s in plan.segments))))

    def update_connector_output(self, output: Any) -> None:
        meta = getattr(output, "kv_connector_worker_meta", None)
        if isinstance(meta, DaserWorkerMetadata) and meta.workers:
            self.worker_stats = meta.workers

    def segments(self, token_ids: list[int], params: dict[str, Any] | None, req_id: str) -> tuple[list[Segment], bool]:
        """(segments, may_save) for a request; malformed plans degrade to no reuse, loudly."""
        segs, save, _ = self.plan(token_ids, params, req_id)
        return segs, save

    def plan(self, token_ids: list[int], params: dict[str, Any] | None,
             req_id: str) -> tuple[list[Segment], bool, Plan | None]:
        try:
            plan: Plan | None = parse_plan(params, len(token_ids))
        except PlanError as exc:
            logger.warning("DaserKVConnector: ignoring the daser plan of request %s: %s", req_id, exc)
            return [], False, None
        if plan is not None:
            return list(plan.segments), plan.save, plan
        if self.s.block_fallback:
            return block_chain_segments(self.s.fingerprint, token_ids, self.s.block_size), True, None
        return [], False, None

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        self._pending.pop(request.request_id, None)
        tokens = list(request.prompt_token_ids or [])
        segments, _, plan = self.plan(tokens, request.kv_transfer_params, request.request_id)
        if plan is not None and plan.token_map is not None and not self._map_readable(plan.token_map):
            # the worker could not place the re-positioned segments, and vLLM would count the
            # tokens it then computes as loaded: claim only the exact run, so the hit count is true
            segments = segments[: save_limit(segments, len(segments))]
        n, end = stored_run(segments, self.store.contains, len(tokens) - 1)
        if end <= num_computed_tokens:
            return 0, False
        pieces, pos = [], 0
        for s in segments[:n]:
            lo, hi = max(num_computed_tokens, pos), min(end, pos + s.num_tokens)
            if lo < hi:
                pieces.append(_Piece(s.key, lo - pos, hi - pos, lo))
            pos += s.num_tokens
        self._pending[request.request_id] = (num_computed_tokens, end, pieces, n, plan)
        logger.debug("DaserKVConnector: %s external hit %d tokens (local %d)",
                     request.request_id, end - num_computed_tokens, num_computed_tokens)
        return end - num_computed_tokens, False

    def _map_readable(self, digest: str) -> bool:
        """Whether the calibration a plan names by `digest` can be read where this instance's
        workers read it (`calibration_dir`), verified (made for this model, checksum, digest):
        a file missing or damaged there is fetched from the shared Redis, where the control plane
        publishes it too (`storage.read_published`), so instances on other hosts need no shared
        disk. Verified once per digest; one that cannot be had is logged once and asked again
        next time (it may be published meanwhile), and its plans claim only their exact run, so
        vLLM's count of loaded tokens stays true."""
        if digest in self._maps_seen:
            return True
        from daser_rag.calibration.storage import read_published
        from daser_rag.errors import DaserError

        why = ""
        try:
            read_published(self.s.calibration_root, digest, fingerprint=self.s.fingerprint,
                           link=getattr(self.store.remote, "link", None))
        except DaserError as exc:  # CalibrationFileError, or Redis away
            why = str(exc)
        for seen in (self._maps_seen, self._maps_missing):
            if len(seen) >= 64:  # plans may name any digest: bounded
                seen.clear()
        if not why:
            self._maps_seen.add(digest)
        elif digest not in self._maps_missing:
            self._maps_missing.add(digest)
            logger.warning("DaserKVConnector: plans name calibration %s, which cannot be read here (%s; the control "
                           "plane publishes it in its store directory, set calibration_dir, and in Redis); they "
                           "load only their exact run", digest, why)
        return not why

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        if num_external_tokens == 0:
            self._pending.pop(request.request_id, None)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> DaserConnectorMetadata:
        meta = DaserConnectorMetadata()
        n_sched = scheduler_output.num_scheduled_tokens
        for nr in scheduler_output.scheduled_new_reqs:
            tokens = list(nr.prompt_token_ids or [])
            block_ids = list(nr.block_ids[0])
            ld = self._pending.pop(nr.req_id, None)
            if ld is not None:
                start, end, pieces, n_loaded, plan = ld
                spec = LoadSpec(nr.req_id, block_ids, tokens[start:end], start, end, pieces,
                                prefetch_id=self._pids.get(nr.req_id) or (plan.prefetch_id if plan else None))
                if plan is not None and (plan.recompute is not None or plan.scales is not None):
                    exact, pos, starts, in_exact = 0, 0, [], True
                    for s in plan.segments[:n_loaded]:
                        in_exact = in_exact and s.exact
                        if in_exact:
                            exact += s.num_tokens
                        elif pos < end:
                            starts.append(pos)
                        pos += s.num_tokens
                    spec.exact_len, spec.scales, spec.bias = min(exact, end), plan.scales, plan.bias
                    spec.token_map = plan.token_map
                    if plan.recompute is not None:
                        spec.recompute, spec.context_ids, spec.chunk_starts = plan.recompute, tokens[:end], starts
                meta.loads.append(spec)
            params = (nr.sampling_params.extra_args or {}).get("kv_transfer_params") if nr.sampling_params else None
            segments, may_save = self.segments(tokens, params, nr.req_id)
            if not (self.s.save and may_save and segments):
                continue
            if ld is not None:
                limit = save_limit(segments, ld[3])
            elif all(s.exact for s in segments):
                limit = len(segments)
            else:
                # no load this step (vLLM's own cache held the start): which entries its blocks came
                # from is unknown here, so nothing after the first re-positioned segment is saved
                limit = save_limit(segments, len(segments))
            self._reqs[nr.req_id] = _ReqState(tokens, segments, block_ids, limit)
            self._plan_saves(nr.req_id, nr.num_computed_tokens + n_sched.get(nr.req_id, 0), meta)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                st.block_ids = list(new_blocks[0]) if new_blocks else []
            elif new_blocks:
                st.block_ids.extend(new_blocks[0])
            self._plan_saves(req_id, cached.num_computed_tokens[i] + n_sched.get(req_id, 0), meta)
        self._pending.clear()  # anything left was not scheduled this step; it is asked again
        meta.prefetches, self._prefetches = self._prefetches, []
        meta.releases, self._releases = self._releases, []
        return meta

    def _plan_saves(self, req_id: str, computed: int, meta: DaserConnectorMetadata) -> None:
        st = self._reqs[req_id]
        limit = min(computed, len(st.tokens))
        while st.next_seg < st.limit:
            seg = st.segments[st.next_seg]
            end = st.next_start + seg.num_tokens
            if end > limit:
                break
            if seg.save_key is not None and not self.store.contains(seg.save_key):
                meta.saves.append(SaveSpec(req_id, seg.save_key, st.block_ids[: -(-end // self.s.block_size)],
                                           st.tokens[st.next_start:end], st.next_start))
            st.next_seg += 1
            st.next_start = end
        if st.next_seg >= st.limit:
            del self._reqs[req_id]

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._reqs.pop(request.request_id, None)
        self._pending.pop(request.request_id, None)
        self._active.discard(request.request_id)
        params = request.kv_transfer_params
        raw = (params or {}).get(PLAN_FIELD) if isinstance(params, dict) else None
        pid = self._pids.pop(request.request_id, None)
        if pid is None and isinstance(raw, dict) and isinstance(raw.get("prefetch_id"), str):
            pid = raw["prefetch_id"]
        if pid is not None:
            # a request that loaded released its pin in the worker already; one that did not load
            # (vLLM's own prefix cache held its start, or it was aborted) releases it here
            self._releases.append(pid)
        msg = self.control(request)
        if msg is not None and msg.stats:
            return False, {STATS_FIELD: {"workers": self.worker_stats}}
        return False, None


class DaserConnectorWorker:
    """Runs in each vLLM worker: paged-cache loads (with key re-rotation) and saves."""

    def __init__(self, settings: _Settings, vllm_config: VllmConfig) -> None:
        self.s = settings
        self.vllm_config = vllm_config
        self.store = settings.open_store(settings.host_bytes)
        self.kv_caches: dict[str, torch.Tensor] = {}
        self.layer_names: list[str] = []
        self.layout: PagedLayout | None = None
        self.inv_freq: torch.Tensor | None = None
        self._load_errors: set[int] = set()
        self._warned_blend = False
        self._paged_ok = True  # vLLM's paged-attention kernel for the repair (else torch attention)
        self._token_maps: dict[str, torch.Tensor] = {}  # digest -> map [L, H, 1 + 2D, 2D], the last few used
        self.stats = {"loaded_tokens": 0, "rerotated_tokens": 0, "saved_tokens": 0, "load_errors": 0}
        self.prefetch = HostPrefetch(self.store, max_requests=settings.prefetch_max_requests,
                                     max_bytes=settings.prefetch_max_bytes, ttl_s=settings.prefetch_ttl_s)

    def control(self, meta: DaserConnectorMetadata) -> None:
        """This step's prefetch and release messages (the loads run in the background)."""
        for pid in meta.releases:
            self.prefetch.release(pid)
        for pf in meta.prefetches:
            if not self.prefetch.add(pf.req_id, pf.keys, pf.ttl_s):
                logger.info("DaserKVConnector: prefetch for %s refused (pins %d/%d, bytes bound %d)", pf.req_id,
                            len(self.prefetch.snapshot().pins), self.prefetch.max_requests, self.prefetch.max_bytes)

    def report(self) -> dict[str, Any]:
        """What a stats message answers: this worker's counters, its store's hits per tier, its
        host tier and its prefetch pins (typed: `prefetch.PrefetchSnapshot`)."""
        host = self.store.host
        return {"connector": dict(self.stats), "store": dict(self.store.counters),
                "host": {"bytes": host.nbytes(), "capacity_bytes": host.capacity_bytes,
                         "entries": len(list(host.keys())), "evictions": host.evictions},
                "prefetch": asdict(self.prefetch.snapshot())}

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.kv_caches = kv_caches
        self.layer_names = layer_order(list(kv_caches))
        first = self.layer_names[0]
        layer = self.vllm_config.compilation_config.static_forward_context[first]
        self.layout = layout_for(kv_caches[first], layer, self.s.cache_dtype)
        try:
            self.inv_freq = inv_freq_for(self.vllm_config.model_config.hf_config)
        except ValueError as exc:  # entries are then loaded only where they were computed
            logger.warning("DaserKVConnector: no key re-rotation for this model (%s)", exc)
        logger.info("DaserKVConnector: %d layers, cache %s %s, layout %s", len(kv_caches),
                    tuple(kv_caches[first].shape), kv_caches[first].dtype, type(self.layout).__name__)

    def _fail(self, ld: LoadSpec, from_pos: int, why: str) -> None:
        bs = self.s.block_size
        bad = set(ld.block_ids[from_pos // bs: -(-ld.end // bs)])
        self._load_errors |= bad
        self.stats["load_errors"] += 1
        logger.warning("DaserKVConnector: load for %s failed at token %d (%s); %d blocks will be recomputed",
                       ld.req_id, from_pos, why, len(bad))

    def _entry(self, ld: LoadSpec, p: _Piece, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | str:
        """K, V [layers, heads, tokens, dim] of piece `p` at its place in the prompt, or why not."""
        kv = self.store.get(p.key, dtype=dtype)
        if kv is None:
            return f"entry {p.key} is gone or corrupt"
        want = ld.token_ids[p.start - ld.start: p.start - ld.start + p.hi - p.lo]
        if kv.keys.shape[0] != len(self.layer_names) or kv.token_ids[p.lo:p.hi].tolist() != want:
            return f"entry {p.key} does not hold this request's tokens/model shape"
        k, v = kv.keys[:, :, p.lo:p.hi], kv.values[:, :, p.lo:p.hi]
        delta = p.start - (kv.start_pos + p.lo)
        if delta:
            if self.inv_freq is None:
                return f"entry {p.key} was computed at other positions and this model's RoPE is unknown"
            # as daser's own fusion does it: fp32 keys, float64 angles, back to the cache dtype
            k = rerotate_keys(k.to(torch.float32), delta, self.inv_freq).to(dtype)
            self.stats["rerotated_tokens"] += p.hi - p.lo
        return k, v

    def start_load_kv(self, meta: DaserConnectorMetadata) -> None:
        if meta.prefetches or meta.releases:
            self.control(meta)
        if not meta.loads:
            return
        assert self.layout is not None
        layers = self.vllm_config.compilation_config.static_forward_context
        cdtype = next(iter(self.kv_caches.values())).dtype
        for ld in meta.loads:
            t0 = time.perf_counter()
            if ld.prefetch_id is not None:
                self.prefetch.claim(ld.prefetch_id)  # a load of its own entries under way is awaited
            try:
                self._load(ld, layers, cdtype)
            finally:
                if ld.prefetch_id is not None:
                    self.prefetch.release(ld.prefetch_id, used=True)
            logger.debug("DaserKVConnector: loaded %s in %.1f ms", ld.req_id, 1e3 * (time.perf_counter() - t0))

    def _load(self, ld: LoadSpec, layers: dict[str, Any], cdtype: torch.dtype) -> None:
        assert self.layout is not None
        ks, vs, ok_end = [], [], ld.start
        for p in ld.pieces:
            got = self._entry(ld, p, cdtype)
            if isinstance(got, str):
                self._fail(ld, p.start, got)
                break
            ks.append(got[0])
            vs.append(got[1])
            ok_end = p.start + p.hi - p.lo
        if ok_end <= ld.start:
            return
        k_all = torch.cat(ks, dim=2)  # [L, H, T, D]
        v_all = torch.cat(vs, dim=2)
        if ld.scales is not None:
            why = self._calibrate(ld, k_all, v_all)
            if why is not None:
                self._fail(ld, ld.start, why)
                return
        slots = slots_for(ld.block_ids, ld.start, ok_end, self.s.block_size)
        for i, name in enumerate(self.layer_names):
            self.layout.write(layers[name], self.kv_caches[name], k_all[i].transpose(0, 1),
                              v_all[i].transpose(0, 1), slots)
        self.stats["loaded_tokens"] += ok_end - ld.start
        if ld.recompute is not None and ok_end == ld.end:
            self._recompute(ld, (k_all, v_all, ld.start))

    def _calibrate(self, ld: LoadSpec, k_all: torch.Tensor, v_all: torch.Tensor) -> str | None:
        """Scale the re-positioned (stale) part of the loaded K/V in place, as daser's fusion does
        (daser_rag/blend/fusion.py `_LayerFiller`): per layer and KV head, never the exact run.
        Returns why not (then nothing is loaded and vLLM computes these tokens)."""
        first = max(0, ld.exact_len - ld.start)
        if first >= k_all.shape[2]:
            return None  # only the exact run was loaded: nothing to place
        ks, vs, kb, vb = _plan_calibration(ld)
        if tuple(ks.shape) != tuple(k_all.shape[:2]):
            return f"plan's calibration scales are {tuple(ks.shape)}, this model's K/V {tuple(k_all.shape[:2])}"
        if kb is not None and tuple(kb.shape) != (k_all.shape[0], k_all.shape[1], k_all.shape[3]):
            return (f"plan's calibration biases are {tuple(kb.shape)}, "
                    f"this model's K/V {tuple(k_all.shape[:2]) + (k_all.shape[3],)}")
        kv_map = None
        if ld.token_map is not None:
            if ld.recompute is not None and ld.recompute[2] == "deviation":
                return "the deviation selector cannot rank staleness under a token map (only V rows are undone)"
            got = self._token_map(ld.token_map, k_all)
            if isinstance(got, str):
                return got
            kv_map = got
        cos = sin = None
        if kb is not None or kv_map is not None:
            assert self.inv_freq is not None
            pos = torch.arange(ld.start + first, ld.start + k_all.shape[2])
            cos, sin = rope_cos_sin(pos, self.inv_freq, 1.0, torch.float32)
        for i in range(k_all.shape[0]):  # what daser's fusion does (calibration/adapter.py place_kv), in fp32
            k_pl, v_pl = place_kv(
                k_all[i, :, first:].float(), v_all[i, :, first:].float(), ks[i], vs[i],
                None if kb is None else kb[i], None if vb is None else vb[i],
                cos, sin, None if kv_map is None else kv_map[i])
            k_all[i, :, first:], v_all[i, :, first:] = k_pl.to(k_all.dtype), v_pl.to(v_all.dtype)
        self.stats["calibrated_tokens"] = self.stats.get("calibrated_tokens", 0) + int(k_all.shape[2] - first)
        return None

    def _token_map(self, digest: str, k_all: torch.Tensor) -> torch.Tensor | str:
        """The token map of the calibration published under `digest` in the store directory
        (checked: this model's fingerprint and K/V shape, the file's checksum and digest), or why
        not. The last 4 used stay in memory (6 MB each for SmolLM2-135M)."""
        if digest in self._token_maps:
            self._token_maps[digest] = self._token_maps.pop(digest)  # most recently used last
            return self._token_maps[digest]
        from daser_rag.calibration.storage import CalibrationFileError, load_published

        try:
            cal = load_published(self.s.calibration_root, digest, fingerprint=self.s.fingerprint,
                                 layers=int(k_all.shape[0]), kv_heads=int(k_all.shape[1]), head_dim=int(k_all.shape[3]))
        except CalibrationFileError as exc:
            return f"plan's token map cannot be used: {exc}"
        if cal.kv_map is None:
            return f"published calibration {digest} has no token map"
        while len(self._token_maps) >= 4:
            self._token_maps.pop(next(iter(self._token_maps)))
        self._token_maps[digest] = cal.kv_map.float()
        return self._token_maps[digest]

    @staticmethod
    def _stored_value(ld: LoadSpec) -> Callable[[int, torch.Tensor], torch.Tensor] | None:
        """Undoes `_calibrate` on loaded V rows [n, kv_heads, d] of layer i (None: nothing to
        undo), so the in-engine check layer compares fresh V with the stored V."""
        if ld.scales is None:
            return None
        _, vs, _, vb = _plan_calibration(ld)

        def stored(i: int, rows: torch.Tensor) -> torch.Tensor:
            out = rows.float()
            if vb is not None:
                out = out - vb[i].to(out.device)
            return (out / vs[i].to(out.device).view(1, -1, 1)).to(rows.dtype)

        return stored

    def _recompute(self, ld: LoadSpec, loaded: tuple[torch.Tensor, torch.Tensor, int]) -> None:
        from vllm_daser import blend

        model = blend.served_model()
        if model is None:
            if not self._warned_blend:
                logger.warning("DaserKVConnector: a plan asks for in-engine recompute but the model hook is off "
                               "(set DASER_VLLM_BLEND=1 for vLLM); serving full reuse (r=0)")
                self._warned_blend = True
            return
        layers = self.vllm_config.compilation_config.static_forward_context
        t0 = time.perf_counter()
        args = (model, self.layout, [layers[n] for n in self.layer_names], [self.kv_caches[n] for n in self.layer_names],
                ld.block_ids, ld.context_ids, ld.exact_len, ld.end, ld.recompute[0], ld.recompute[1], loaded)
        kw: dict[str, Any] = {"selector": ld.recompute[2], "chunk_starts": ld.chunk_starts,
                              "stored_value": self._stored_value(ld)}
        try:
            n = blend.repair(*args, **kw, paged_attention=None if self._paged_ok else False)
        except (RuntimeError, TypeError, AttributeError, ValueError) as exc:
            if not self._paged_ok:
                raise
            # vLLM's paged-attention kernel is an internal API: if this vLLM build calls it
            # differently, say so once and redo the pass with torch attention (every layer's
            # K/V is rewritten, and the paged path leaves `loaded` untouched)
            logger.warning("DaserKVConnector: paged-attention repair failed (%s: %s); using torch attention "
                           "from now on", type(exc).__name__, exc)
            self._paged_ok = False
            n = blend.repair(*args, **kw, paged_attention=False)
        self.stats["recomputed_tokens"] = self.stats.get("recomputed_tokens", 0) + n
        logger.debug("DaserKVConnector: recomputed %d of %d tokens for %s in %.1f ms", n, ld.end - ld.exact_len,
                     ld.req_id, 1e3 * (time.perf_counter() - t0))

    def wait_for_save(self, meta: DaserConnectorMetadata) -> None:
        if not meta.saves:
            return
        assert self.layout is not None
        for sv in meta.saves:
            if self.store.contains(sv.key):
                continue
            end = sv.start + len(sv.token_ids)
            ks, vs = [], []
            for name in self.layer_names:
                k, v = self.layout.read(self.kv_caches[name], sv.block_ids, sv.start, end)
                ks.append(k)
                vs.append(v)
            kv = ChunkKV(key=sv.key, token_ids=torch.tensor(sv.token_ids, dtype=torch.int64), start_pos=sv.start,
                         keys=torch.stack(ks), values=torch.stack(vs),
                         meta={"fingerprint": self.s.fingerprint, "source": "vllm"})
            try:
                self.store.put(kv)
            except OSError as exc:  # a full or read-only disk costs reuse, never the request
                logger.warning("DaserKVConnector: could not save %s: %s", sv.key, exc)
                continue
            self.stats["saved_tokens"] += len(sv.token_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        out, self._load_errors = self._load_errors, set()
        return out


class DaserKVConnector(KVConnectorBase_V1):
    """The class vLLM instantiates once per role; it delegates to the half of its role."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        settings = _Settings.from_config(vllm_config)
        self.scheduler: DaserConnectorScheduler | None = None
        self.worker: DaserConnectorWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self.scheduler = DaserConnectorScheduler(settings, int(vllm_config.scheduler_config.max_num_seqs))
        else:
            self.worker = DaserConnectorWorker(settings, vllm_config)
        logger.info("DaserKVConnector role=%s store=%s block_size=%d save=%s fallback=%s",
                    role.name, settings.store_dir, settings.block_size, settings.save, settings.block_fallback)

    # -- scheduler side
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self.scheduler is not None
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        assert self.scheduler is not None
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self.scheduler is not None
        return self.scheduler.build_connector_meta(scheduler_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self.scheduler is not None
        return self.scheduler.request_finished(request, block_ids)

    def on_new_request(self, request: Request) -> None:
        if self.scheduler is not None:
            self.scheduler.on_new_request(request)

    def update_connector_output(self, connector_output: Any) -> None:
        if self.scheduler is not None:
            self.scheduler.update_connector_output(connector_output)

    # -- worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self.worker is not None
        self.worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        assert self.worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, DaserConnectorMetadata)
        self.worker.start_load_kv(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # loads are synchronous (start_load_kv finished them)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return None  # saved in wait_for_save, once the whole step's KV is in the cache

    def wait_for_save(self) -> None:
        assert self.worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, DaserConnectorMetadata)
        self.worker.wait_for_save(meta)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.get_block_ids_with_load_errors() if self.worker is not None else set()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        return DaserWorkerMetadata([self.worker.report()]) if self.worker is not None else None

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.prefetch.close()
