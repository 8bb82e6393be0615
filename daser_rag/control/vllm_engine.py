"""The vLLM engine: daser's control plane in front of one or more `vllm serve` instances.

It implements the same engine protocol as daser's embedded engine (engine/protocol.py), so the
service, the CLI and the adapters use it unchanged. It loads no weights: requests are planned
from the tokenizer, the model files' fingerprint and the shared document index (planner.py);
every token is computed by vLLM, whose daser connector loads the planned chunk KV from the
shared store (Redis) and repairs it in-engine (`recompute`). Per request:

1. plan: the prompt's token ids, the stored segments that supply its context KV, and prefill
   requests for chunks not stored yet;
2. route: the instance whose host tier holds most of the request's chunks, balanced by load
   (routing.py);
3. run: missing chunks first (max_tokens=1, the connector saves them), then the request,
   streamed; an instance that fails or hangs is taken out of rotation and the request moves to
   another one, resuming after the tokens already produced (greedy output is unchanged);
4. report what vLLM says it did: `cached_tokens` from vLLM's usage (prompt tokens it did not
   compute) is the reuse reported, never the plan alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from daser_rag import settings
from daser_rag.api import ContextItem
from daser_rag.blend.selectors import num_selected
from daser_rag.control.ensemble import store_mean
from daser_rag.control.lookahead import InstanceLookAhead
from daser_rag.control.planner import MIN_QUESTION_ROOM, Planner, PrefillPlan, ReusePlan
from daser_rag.control.pool import InstanceFailed, InstancePool
from daser_rag.control.routing import InstanceState, make_router, path_id
from daser_rag.control.spawn import VllmProcess
from daser_rag.control.wire import PLAN_FIELD, STATS_FIELD, STATS_PARAMS, in_engine_selectors, plan_params
from daser_rag.context import SHARED_TENANT
from daser_rag.engine.chunk_index import ChunkIndex, ChunkInfo, ChunkReport, progress_bar
from daser_rag.engine.decode import StreamingEngine
from daser_rag.engine.ingest import Ingestor, Progress, check_documents
from daser_rag.engine.protocol import EngineHealth
from daser_rag.errors import ContextTooLongError, DaserError, InvalidInputError
from daser_rag.kv.store import KVStore
from daser_rag.model.files import ModelFiles
from daser_rag.params import GenerationParams, check_recompute_ratio
from daser_rag.types import Document, GenerationResult, IngestReport, ResolvedChunk, Timings

log = logging.getLogger(__name__)

DEFAULT_VLLM_SELECTOR = settings.VLLM_SELECTOR.default
"""In-engine selection by default: the first tokens of every re-positioned chunk (no check pass);
2.19x vs vLLM prefix caching at r=0.15 on the vllm_serve trace (docs/vllm.md)."""
DEFAULT_PREFILL_WORKERS = settings.VLLM_PREFILL_WORKERS.default
"""Chunk prefills in flight at once during ingestion (vLLM batches them)."""
QUERY_TOKENS_GUESS = 32
"""Question tokens assumed when a request is routed at `queued` (its question is not known yet)."""
CONTROL_TOKEN = 0
"""The one prompt token of a connector control message (any id works; the connector reads the
message from `kv_transfer_params`, and vLLM computes this one token)."""


def vllm_calibration(value: Any, files: ModelFiles, store_root: Any, aliases: Sequence[str] = ()) -> Any:
    """The engine's `calibration` option as what the connector can place (a CalibrationSet or
    None). Link tokens cannot go into vLLM (docs/calibration.md): a calibration with them is an
    error when named, and skipped with a warning when found by `auto` (a vLLM deployment must still
    start). Primers are carried: re-positioned chunks load entries vLLM computed after the primer,
    averaged by the control plane over an ensemble's primers (control/planner.py
    `primed_prefill_plan`). `aliases`: the fingerprint daser's own engine
    gives these weights (`model.loader.engine_fingerprint`), which files `daser-rag calibrate`
    wrote carry: they are found by `auto` and accepted by path."""
    from daser_rag.calibration.adapter import CalibrationSet
    from daser_rag.calibration.storage import CalibrationFileError, resolve_calibration

    loaded = resolve_calibration(value, files, files.fingerprint, store_root, aliases)
    if loaded is None:
        return None
    usable = []
    for c in loaded.members:
        why = "link tokens (they cannot be placed inside vLLM; calibrate with --link-tokens 0)"
        if not c.link_tokens:
            usable.append(c)
        elif value == "auto":
            log.warning("calibration fitted at r=%g skipped on the vLLM engine: it has %s", c.fit_share, why)
        else:
            raise CalibrationFileError(f"a calibration with {why} cannot be used on the vLLM engine")
    return CalibrationSet(tuple(usable)) if usable else None


class VllmEngine(StreamingEngine):
    """The engine protocol over N vLLM instances (see the module docstring)."""

    kind = "vllm"

    def __init__(self, files: ModelFiles, store: KVStore, urls: Sequence[str], *,
                 served_name: str = settings.VLLM_SERVED_NAME.default, model_name: str | None = None,
                 router: str = settings.VLLM_ROUTER.default, chunk_tokens: int = settings.CHUNK_TOKENS.default,
                 recompute_ratio: float | str = settings.RECOMPUTE_RATIO.default,
                 selector: str = DEFAULT_VLLM_SELECTOR, check_layer: int = settings.CHECK_LAYER.default,
                 prefill_workers: int = DEFAULT_PREFILL_WORKERS,
                 prefetch_window: int = settings.PREFETCH_WINDOW.default,
                 prefetch_ttl_s: float = settings.VLLM_PREFETCH_TTL.default,
                 processes: Sequence[VllmProcess] = (), pool_kw: dict[str, Any] | None = None,
                 calibration: Any = settings.CALIBRATION.default, calibration_dir: Any = None,
                 calibration_aliases: Sequence[str] = ()) -> None:
        self.files = files
        self._store = store
        # `auto` looks where `daser-rag calibrate` writes: the cache dir (the factory passes it;
        # the store directory otherwise)
        self.calibration = vllm_calibration(calibration, files, calibration_dir or store.root, calibration_aliases)
        """Scales for re-positioned KV, applied by the connector (docs/calibration.md), or None."""
        self.planner = Planner.from_files(files, store, chunk_tokens=chunk_tokens)
        for c in self.calibration.members if self.calibration is not None else ():
            self.planner.check_primer(c)  # fail at start-up, not on the first request
        self.pool = InstancePool(urls, make_router(router), **(pool_kw or {}))
        self.served_name = served_name
        self._model_name = model_name or files.name
        self.recompute_ratio = self._check_ratio(recompute_ratio)
        self.selector = self._check_selector(selector)
        self.check_layer = check_layer
        self.processes = list(processes)
        self._prefills = ThreadPoolExecutor(max(1, prefill_workers), thread_name_prefix="daser-prefill")
        self.ingestor = Ingestor(self.planner, store, files.tokenizer, chunk_tokens,  # type: ignore[arg-type]
                                 compute=self._compute_chunk)
        self.chunks = ChunkIndex(self.planner, store, compute_missing=self._compute_missing,
                                 max_tokens=lambda: self.context_window - len(self.planner.prompt.prefix_ids)
                                 - MIN_QUESTION_ROOM, prepare=self._prime_chunks)
        self.instance_window: int | None = None
        """The smallest `--max-model-len` of the instances (set at start-up by the factory)."""
        self.self_check: dict[str, dict[str, Any]] = {}
        """Per instance URL: what the start-up self-check found (`run_self_check`)."""
        self.eos = files.tokenizer.eos_token_id
        self.lookahead = InstanceLookAhead(self.pool, self._send_control, window=prefetch_window,
                                           ttl_s=prefetch_ttl_s)
        """PCR: routed at `queued`, chunk KV prefetched into that instance's host tier (lookahead.py)."""

    # -- protocol: identity ----------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def fingerprint(self) -> str:
        return self.files.fingerprint

    @property
    def context_window(self) -> int:
        """The model's window, or the smallest `--max-model-len` among the instances if less."""
        return min(int(self.files.spec.max_positions), self.instance_window or 1 << 62)

    @property
    def store(self) -> KVStore:
        return self._store

    @property
    def model_lock(self) -> None:
        return None  # vLLM batches: no request waits for another to finish

    def split(self, text: str, max_tokens: int | None = None) -> list[str]:
        return self.ingestor.split(text, max_tokens)

    def count_tokens(self, texts: Sequence[str]) -> int:
        return self.planner.count_tokens(texts)

    def token_ids(self, text: str) -> list[int]:
        return self.planner.prompt.encode(text)

    def chunk_keys(self, text: str, tenant: str = SHARED_TENANT) -> list[str]:
        return self.planner.chunk_keys(text, tenant)

    # -- request options ---------------------------------------------------------------------------
    @staticmethod
    def _check_ratio(r: object) -> float:
        """The one ratio validator (`params.check_recompute_ratio`), then what vLLM cannot do: an
        adaptive budget ("auto") needs the question's look-ahead, which vLLM runs after the repair."""
        checked = check_recompute_ratio(r)
        if isinstance(checked, str):
            raise InvalidInputError(f"recompute_ratio {checked!r} is not available on the vLLM engine (its "
                                    "in-engine repair takes a fixed share); pass a number in [0, 1]")
        return float(checked)

    @staticmethod
    def _check_selector(name: object) -> str:
        allowed = in_engine_selectors()
        if name not in allowed:
            raise InvalidInputError(f"selector {name!r} cannot run inside vLLM (it needs signals the connector "
                                    f"does not have); the vLLM engine takes one of {tuple(allowed)}")
        return str(name)

    def _plan(self, question: str, contexts: Sequence[ContextItem] | None, p: GenerationParams) -> ReusePlan:
        if not p.use_cache:
            return self.planner.full(question, contexts, p.tenant)
        ratio = self._check_ratio(p.recompute_ratio) if p.recompute_ratio is not None else self.recompute_ratio
        sel = self._check_selector(p.selector) if p.selector is not None else self.selector
        from daser_rag.calibration.adapter import calibration_for_request

        cal = calibration_for_request(self.calibration, p.calibration, float(ratio))
        if cal is not None and cal.kv_map is not None and sel == "deviation" and float(ratio) > 0 and not p.calibration:
            cal = None  # the in-engine deviation selector cannot rank under a token map: served uncalibrated, and says so
        return self.planner.reuse(question, contexts, tenant=p.tenant, recompute=(ratio, self.check_layer, sel),
                                  calibration=cal)

    def _body(self, ids: list[int], plan: ReusePlan, p: GenerationParams, max_tokens: int,
              prefetch_id: str | None = None) -> dict[str, Any]:
        kv = plan.kv_transfer_params
        if prefetch_id is not None and "segments" in (kv.get(PLAN_FIELD) or {}):
            kv = {**kv, PLAN_FIELD: {**kv[PLAN_FIELD], "prefetch_id": prefetch_id}}
        body: dict[str, Any] = {
            "model": self.served_name, "prompt": ids, "max_tokens": max_tokens, "temperature": p.temperature,
            "top_p": p.top_p, "top_k": p.top_k if p.top_k > 0 else -1, "stream": True,
            "stream_options": {"include_usage": True}, "return_token_ids": True,
            "kv_transfer_params": kv}
        if p.seed is not None:
            body["seed"] = p.seed
        if p.stop:
            body["stop"] = list(p.stop)
        if plan.cache_salt is not None:
            body["cache_salt"] = plan.cache_salt
        return body

    # -- protocol: generation ------------------------------------------------------------------------
    def _run(self, question: str, contexts: Sequence[ContextItem] | None, params: GenerationParams | None,
             *, cancel: Callable[[], bool] | None = None, **kwargs: Any) -> Generator[str, None, GenerationResult]:
        p = GenerationParams.from_kwargs(params, **kwargs)
        t_start = time.perf_counter()
        timings = Timings()
        cancelled = cancel if cancel is not None else (lambda: False)
        plan = self._plan(question, contexts, p)
        needed = len(plan.prompt_ids) + p.max_new_tokens
        if needed > self.context_window:
            raise ContextTooLongError(needed, self.context_window)
        keys = plan.chunk_keys
        path = path_id(keys) if "segments" in (plan.kv_transfer_params.get(PLAN_FIELD) or {}) else None
        text_parts: list[str] = []
        out_ids: list[int] = []
        finish = "length"
        usage: dict[str, Any] = {}
        computed: set[str] = set()
        tried: set[str] = set()
        first = True
        served: InstanceState | None = None
        reserved = self.lookahead.take()  # routed when it was queued: its KV was prefetched there
        while True:
            if cancelled():
                finish = "cancelled"
                if reserved is not None:
                    self.pool.release(reserved[1].inst, ok=False, tokens=reserved[1].tokens)
                break
            if reserved is not None:
                rid, res = reserved
                inst, tokens = res.inst, res.tokens
                # the pin ends when this request loads there; a full-prefill request (no plan)
                # loads nothing, so `finished` releases its pin instead
                prefetch_id = rid if res.prefetched and "segments" in (
                    plan.kv_transfer_params.get(PLAN_FIELD) or {}) else None
                reserved = None
            else:
                tokens, prefetch_id = self._work_tokens(plan), None
                inst, tokens = self.pool.acquire_work(keys, tried, tokens=tokens, path=path,
                                                      cached_tokens=tokens - plan.query_tokens)
            ok = got_first = False
            try:
                t_pre = time.perf_counter()
                for pf in plan.prefill:
                    if pf.key not in computed and self._prefill_on(inst, pf):
                        computed.add(pf.key)
                timings.precompute_s += time.perf_counter() - t_pre
                body = self._body(plan.prompt_ids + out_ids, plan, p, p.max_new_tokens - len(out_ids), prefetch_id)
                for event in self.pool.stream_completion(inst, body):
                    if event.get("usage") and first:  # the first attempt's usage says what vLLM reused
                        usage = event["usage"]
                    for ch in event.get("choices") or []:
                        out_ids.extend(int(t) for t in ch.get("token_ids") or [])
                        delta = ch.get("text") or ""
                        if delta or ch.get("token_ids"):
                            if not timings.ttft_s:
                                timings.ttft_s = time.perf_counter() - t_start
                            if not got_first:  # its prefill is done: the router stops counting it
                                got_first = True
                                self.pool.first_token(inst, tokens)
                        if delta:
                            text_parts.append(delta)
                            yield delta
                        if ch.get("finish_reason"):
                            finish = "stop" if ch["finish_reason"] == "stop" else str(ch["finish_reason"])
                    if cancelled():
                        finish = "cancelled"
                        break
                ok = True
                served = inst
                if prefetch_id is not None:
                    self.lookahead.served(prefetch_id)
            except InstanceFailed as exc:
                self.pool.fail(inst, str(exc))
                tried.add(inst.url)
                first = first and not out_ids
                log.warning("request moved off %s after %d tokens: %s", inst.url, len(out_ids), exc)
                continue
            finally:
                self.pool.release(inst, keys, ok=ok, tokens=tokens, prefilling=not got_first, path=path)
            break
        while out_ids and out_ids[-1] == self.eos and finish == "stop":
            out_ids.pop()  # vLLM returns the end-of-sequence token; daser's engine never reports it
        timings.total_s = time.perf_counter() - t_start
        timings.decode_s = max(0.0, timings.total_s - timings.ttft_s) if timings.ttft_s else 0.0
        repairs = served is not None and self.self_check.get(served.url, {}).get("recompute") is not False
        return self._result(plan, p, "".join(text_parts), out_ids, finish, usage, repairs, timings)

    def _result(self, plan: ReusePlan, p: GenerationParams, text: str, ids: list[int], finish: str,
                usage: dict[str, Any], repairs: bool, timings: Timings) -> GenerationResult:
        """What happened, from vLLM's own count of prompt tokens it did not compute."""
        details = usage.get("prompt_tokens_details") or {}
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        n_prefix = len(self.planner.prompt.prefix_ids)
        if cached is None:
            log.warning("vLLM reported no cached_tokens (start it with --enable-prompt-tokens-details): the "
                        "result reports no reuse it cannot confirm")
            cached = 0
        loaded = min(int(cached), plan.context_tokens)
        reuse = p.use_cache and bool(plan.chunks) and loaded > n_prefix
        exact_tokens = min(loaded, n_prefix + sum(c.num_tokens for c in plan.chunks[:plan.exact_chunks]))
        candidates = max(0, loaded - exact_tokens)
        rc = (plan.kv_transfer_params.get("daser") or {}).get("recompute") or {}
        # an instance whose self-check found no in-engine repair (DASER_VLLM_BLEND unset) ran r=0
        recomputed = num_selected(candidates, float(rc.get("ratio", 0.0))) if reuse and repairs else 0
        misses = len(plan.prefill)
        return GenerationResult(
            text=text, token_ids=ids, prompt_tokens=len(plan.prompt_ids), context_tokens=plan.context_tokens,
            query_tokens=plan.query_tokens, exact_tokens=exact_tokens if reuse else 0,
            reused_tokens=candidates - recomputed if reuse else 0, recomputed_tokens=recomputed,
            cache_hits=(len(plan.chunks) - misses) if reuse else 0, cache_misses=misses if reuse else 0,
            mode="blend" if reuse else "full",
            recompute_ratio=(float(rc.get("ratio", 0.0)) if repairs else 0.0) if reuse else 1.0, finish_reason=finish, timings=timings,
            chunk_keys=plan.chunk_keys, selector=str(rc.get("selector", "none")) if recomputed else "none",
            calibrated=plan.calibrated and reuse and candidates > 0)  # only re-positioned KV is calibrated

    # -- chunk KV through vLLM -------------------------------------------------------------------------
    def _prefill_on(self, inst: InstanceState, pf: PrefillPlan) -> bool:
        """Have `inst` compute one chunk after the system prefix (its connector saves it); True
        when the shared store holds it afterwards. An ensemble entry (`pf.parts`): its parts not
        stored yet, then their mean."""
        if pf.parts:
            for part in pf.parts:
                if not self._store.contains(part.key):
                    self._prefill_on(inst, part)
            return store_mean(self._store, pf)
        body = {"model": self.served_name, "prompt": pf.prompt_ids, "max_tokens": 1, "temperature": 0.0,
                "stream": True, "kv_transfer_params": pf.kv_transfer_params}
        for _ in self.pool.stream_completion(inst, body):
            pass
        inst.remember([pf.key])
        return self._store.contains(pf.key)

    def _compute_chunk(self, ids: Sequence[int], key: str) -> bool:
        """The ingestor's compute hook: one chunk through any available instance (retried)."""
        return self._compute(self._raw_plan(ids, key))

    def _raw_plan(self, ids: Sequence[int], key: str) -> PrefillPlan:
        """vLLM computes the chunk right after the system prefix and saves it under `key`."""
        n_pre = len(self.planner.prompt.prefix_ids)
        pk = self.planner.prefix_key("")  # the prefix KV does not depend on the tenant
        return PrefillPlan(key, list(self.planner.prompt.prefix_ids) + list(ids),
                           plan_params([(pk, n_pre), (key, len(ids))]))

    def _compute(self, pf: PrefillPlan) -> bool:
        """One prefill plan through any available instance (retried); True when the shared store
        holds its entry afterwards."""
        key = pf.key
        if pf.parts and all(self._store.contains(p.key) for p in pf.parts):
            return store_mean(self._store, pf)  # no instance needed
        tried: set[str] = set()
        while True:
            inst = self.pool.acquire([key], tried)
            try:
                stored = self._prefill_on(inst, pf)
            except InstanceFailed as exc:
                self.pool.fail(inst, str(exc))
                tried.add(inst.url)
                continue
            finally:
                self.pool.release(inst)
            if not stored:
                log.warning("vLLM computed chunk %s but the shared store does not hold it (connector not saving?)",
                            key)
            return stored

    # -- protocol: documents -------------------------------------------------------------------------
    def add_documents(self, documents: Iterable[Document], *, tenant: str = SHARED_TENANT, progress: Progress = False,
                      precompute: bool = True) -> IngestReport:
        """Register the documents and have vLLM compute their missing chunks, several at once
        (vLLM batches them); progress counts chunks."""
        docs = list(documents)
        if not precompute:
            return self.ingestor.add_documents(docs, tenant=tenant, progress=False, precompute=False)
        docs = check_documents(docs)
        chunks = [ResolvedChunk(text, d.doc_id, tuple(ids), self.planner.key(ids, tenant))
                  for d in docs for text in self.split(d.text) for ids in [self.planner.prompt.chunk_ids(text)]]
        todo: dict[str, list[int]] = {}
        for c in chunks:
            if c.key not in todo and not self._store.contains(c.key):
                todo[c.key] = list(c.token_ids)
        t0 = time.perf_counter()
        done = self._compute_missing(todo, progress)
        report = self.ingestor.add_documents(docs, tenant=tenant, progress=False, precompute=True)
        # the second pass found the pre-computed chunks stored; it computed only what the first missed
        report.reused_chunks, report.computed_chunks = (max(0, report.reused_chunks - done),
                                                        report.computed_chunks + done)
        report.mapped_chunks = self._prime_chunks(chunks, tenant, progress)
        report.seconds += time.perf_counter() - t0
        return report

    def _prime_chunks(self, chunks: Sequence[ResolvedChunk], tenant: str, progress: Progress) -> int:
        """With a calibration that has a primer loaded, each chunk's primed entry too (what its
        re-positioned placements load), registered under its document so invalidating or editing
        it drops the entry; as the embedded engine primes at ingest (`add_documents` and
        `add_chunks`). Returns how many the store holds afterwards (stored before or computed now)."""
        members = self.calibration.members if self.calibration is not None else ()
        primers = {c.primer_digest(): c for c in members if c.primer is not None}
        if not primers:
            return 0
        todo: dict[str, PrefillPlan] = {}
        held = 0
        for chunk in chunks:
            for cal in primers.values():
                key = self.planner.primed_key(chunk.key, cal)
                if chunk.doc_id is not None:
                    for k in self.planner.primed_entries(chunk.key, cal):
                        self._store.add_derived([chunk.doc_id], k, tenant)
                if key in todo:
                    continue
                if self._store.contains(key):
                    held += 1
                else:
                    todo[key] = self.planner.primed_prefill_plan(chunk, cal, tenant)
        # an ensemble's parts first, all at once (vLLM batches them); then each mean
        parts = {q.key: q for pf in todo.values() for q in pf.parts if not self._store.contains(q.key)}
        if parts:
            self._run_prefills(list(parts.values()), progress, "computing primed chunk KV on vLLM (per primer)")
        return held + self._run_prefills(list(todo.values()), False if parts else progress,
                                         "computing primed chunk KV on vLLM")

    def _compute_missing(self, todo: dict[str, list[int]], progress: Progress) -> int:
        """Have vLLM compute these chunks (key -> token ids), several at once (vLLM batches
        them); progress counts chunks. Returns how many the shared store holds afterwards."""
        return self._run_prefills([self._raw_plan(ids, key) for key, ids in todo.items()], progress,
                                  "precomputing chunk KV on vLLM")

    def _run_prefills(self, plans: Sequence[PrefillPlan], progress: Progress, label: str) -> int:
        """`plans` on the instances, several at once; how many entries the store holds after."""
        done = 0
        with progress_bar(len(plans), progress, label) as step:
            for f in as_completed([self._prefills.submit(self._compute, pf) for pf in plans]):
                done += int(f.result())
                step()
        return done

    def invalidate(self, doc_id: str, tenant: str = SHARED_TENANT) -> list[str]:
        return self._store.invalidate(doc_id, tenant)

    # -- protocol: index-time chunks for the adapters (engine/chunk_index.py) ---------------------------
    def chunk_info(self, texts: Sequence[str], *, tenant: str = SHARED_TENANT) -> list[ChunkInfo]:
        return self.chunks.info(texts, tenant)

    def add_chunks(self, chunks: Mapping[str, Sequence[str]], *, tenant: str = SHARED_TENANT,
                   progress: Progress = False, precompute: bool = True, replace: bool = False) -> ChunkReport:
        """Missing chunks computed through the vLLM instances, batched like `add_documents`."""
        return self.chunks.add(chunks, tenant=tenant, progress=progress, precompute=precompute, replace=replace)

    def replace_refs(self, doc_id: str, texts: Sequence[str], *, tenant: str = SHARED_TENANT) -> list[str]:
        return self.chunks.replace_refs(doc_id, texts, tenant)

    def document_keys(self, doc_id: str, *, tenant: str = SHARED_TENANT) -> list[str]:
        return self.chunks.document_keys(doc_id, tenant)

    def stored(self, keys: Sequence[str]) -> list[bool]:
        return self.chunks.stored(keys)

    # -- protocol: look-ahead -------------------------------------------------------------------------
    def queued(self, request_id: str, contexts: Sequence[ContextItem] | None, tenant: str = SHARED_TENANT) -> None:
        """Route the request now and have that instance's connector load its chunk KV into host
        RAM and pin it until the request has loaded it (control/lookahead.py,
        vllm_daser/prefetch.py). The request then runs on that instance (if it is still up)."""
        try:
            chunks = self.planner.resolve(contexts, tenant)
        except DaserError:
            return  # the request reports its own bad input when it runs
        stored = [self._store.contains(c.key) for c in chunks]
        tokens = QUERY_TOKENS_GUESS + int(self.recompute_ratio * sum(c.num_tokens for c, ok in zip(chunks, stored)
                                                                     if ok)) \
            + sum(c.num_tokens for c, ok in zip(chunks, stored) if not ok)
        keys = [c.key for c in chunks]
        self.lookahead.queued(request_id, keys, tokens, path_id(keys), tokens - QUERY_TOKENS_GUESS,
                              prefetch=self._loaded_keys(chunks, tenant))

    def _loaded_keys(self, chunks: Sequence[ResolvedChunk], tenant: str) -> list[str]:
        """The entries a request at the engine's default share will load for `chunks`: with a
        primer calibration for that share, every chunk after the first is placed re-positioned
        from its primed entry (a stored prefix-tree node would be loaded instead; the prefetch
        of a guess costs host RAM only)."""
        from daser_rag.calibration.adapter import calibration_for_request

        cal = calibration_for_request(self.calibration, None, float(self.recompute_ratio))
        if cal is None or cal.primer is None:
            return [c.key for c in chunks]
        return [c.key if j == 0 else self.planner.primed_key(c.key, cal) for j, c in enumerate(chunks)]

    def started(self, request_id: str) -> None:
        self.lookahead.started(request_id)

    def finished(self, request_id: str) -> None:
        self.lookahead.finished(request_id)

    def _work_tokens(self, plan: ReusePlan) -> int:
        """Prompt tokens vLLM computes for `plan` before its first token: the question, the repaired
        share of reused context, and chunks not stored yet (the router's unit of work)."""
        rc = ((plan.kv_transfer_params.get(PLAN_FIELD) or {}).get("recompute") or {}).get("ratio", 0.0)
        fresh = sum(pf.compute_tokens for pf in plan.prefill)
        reused = max(0, plan.context_tokens - len(self.planner.prompt.prefix_ids))
        if "segments" not in (plan.kv_transfer_params.get(PLAN_FIELD) or {}):
            return len(plan.prompt_ids)  # full prefill
        return plan.query_tokens + int(float(rc) * reused) + fresh

    def _send_control(self, inst: InstanceState, params: dict[str, Any]) -> dict[str, Any]:
        """A connector control message (prefetch, release, stats): a one-token completion whose
        answer carries the connector's reply in `kv_transfer_params`."""
        body = {"model": self.served_name, "prompt": [CONTROL_TOKEN], "max_tokens": 1, "temperature": 0.0,
                "kv_transfer_params": params}
        r = self.pool.client.post(inst.url + "/v1/completions", json=body)
        r.raise_for_status()
        return dict(r.json().get("kv_transfer_params") or {})

    def connector_stats(self, inst: InstanceState) -> list[dict[str, Any]]:
        """Each worker's connector stats on `inst` (host tier, store hits per tier, prefetch pins),
        as of the instance's last engine step."""
        return list((self._send_control(inst, STATS_PARAMS).get(STATS_FIELD) or {}).get("workers") or [])

    # -- start-up self-check -----------------------------------------------------------------------------
    SELF_CHECK_TENANT = "\x00daser-self-check"
    """Salts the probe's keys: no user tenant can name it (tenant names are printable)."""

    def _greedy(self, inst: InstanceState, plan: ReusePlan, n: int = 4) -> list[int]:
        body = self._body(plan.prompt_ids, plan, GenerationParams(max_new_tokens=n), n)
        for pf in plan.prefill:
            self._prefill_on(inst, pf)
        out: list[int] = []
        for event in self.pool.stream_completion(inst, body):
            for ch in event.get("choices") or []:
                out.extend(int(t) for t in ch.get("token_ids") or [])
        return out

    def run_self_check(self) -> dict[str, dict[str, Any]]:
        """On every instance, on a short probe: the connector stores KV in the shared store
        (`store`), exact reuse gives full prefill's greedy tokens (`exact_reuse`), and in-engine
        repair at r=1 does too (`recompute`). Catches what LMCache users hit most: a connector
        that silently does nothing (wrong namespace, no Redis, not loaded) and approximate reuse
        where exact was promised. An instance whose repair check fails serves r=0 and its results
        say so; one whose store or exact check fails is taken out of rotation."""
        a = "Self-check note: the lighthouse keeper on Corran Island counts eleven ships each dawn."
        b = "Self-check note: copper wire carries current with little loss over short runs."
        q = "How many ships does the keeper count?"
        t = self.SELF_CHECK_TENANT
        key_a = self.planner.key(self.planner.prompt.chunk_ids(a), t)
        sel = self.selector
        for inst in self.pool.instances:
            res: dict[str, Any] = {}
            try:
                self._store.delete(key_a)
                self._prefill_on(inst, self.planner.prefill_plan(self.planner.resolve([a], t)[0], t))
                res["store"] = self._store.contains(key_a)
                full = self._greedy(inst, self.planner.full(q, [b, a], t))
                res["exact_reuse"] = self._greedy(inst, self.planner.reuse(q, [a], tenant=t)) == \
                    self._greedy(inst, self.planner.full(q, [a], t))
                res["recompute"] = self._greedy(inst, self.planner.reuse(q, [b, a], tenant=t,
                                                                          recompute=(1.0, self.check_layer, sel))) == full
            except (InstanceFailed, InvalidInputError) as exc:
                res["error"] = str(exc)
            self.self_check[inst.url] = res
            if not (res.get("store") and res.get("exact_reuse")):
                inst.disabled = (f"self-check failed: {res} (is the daser connector loaded, with this control "
                                 "plane's Redis URL and namespace?)")
                log.error("vLLM instance %s is out of rotation: %s", inst.url, inst.disabled)
            else:
                inst.disabled = None
                if not res.get("recompute"):
                    log.warning("vLLM instance %s does not repair in-engine (start it with DASER_VLLM_BLEND=1); "
                                "requests there run at r=0 and say so", inst.url)
        return self.self_check

    # -- protocol: operations ------------------------------------------------------------------------
    def health(self) -> EngineHealth:
        instances = self.pool.snapshot()
        pids = {p.url: p.proc.pid for p in self.processes if p.proc is not None}
        for i in instances:
            i["self_check"] = self.self_check.get(i["url"])
            if i["url"] in pids:  # spawned by this service
                i["pid"] = pids[i["url"]]
        return EngineHealth(any(i["healthy"] for i in instances), "vllm",
                            {"instances": instances, "router": self.pool.router.name,
                             "routed_chunks": self.pool.routed_chunks,
                             "routing_hit_rate": self.pool.routed_held / max(1, self.pool.routed_chunks),
                             "selector": self.selector, "recompute_ratio": self.recompute_ratio,
                             "prefetch": self.lookahead.stats()})

    def close(self) -> None:
        self.lookahead.close()
        self.pool.close()
        self._prefills.shutdown(wait=False, cancel_futures=True)
        for proc in self.processes:
            proc.stop()


__all__ = ["DEFAULT_PREFILL_WORKERS", "DEFAULT_VLLM_SELECTOR", "VllmEngine"]
