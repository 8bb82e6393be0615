"""The benchmark suite, end to end at toy size: the JSON it writes is complete and consistent.

Real model, real corpus, every mode; sizes are tiny so this stays well under a minute.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.quality import answer_correct, exact_match, lcs_length, rouge_l
from daser_rag.corpus import QA_BENCH, python_reference_corpus


def test_rouge_l_and_exact_match():
    assert rouge_l("The nearest enclosing loop.", "the nearest enclosing loop") == 1.0
    assert rouge_l("", "") == 1.0
    assert rouge_l("a b", "") == 0.0
    assert lcs_length(["a", "b", "c", "d"], ["a", "c"]) == 2
    # P = 2/4, R = 2/2 -> F1 = 2/3
    assert rouge_l("a b c d", "a c") == pytest.approx(2 / 3)
    assert exact_match(" It   does nothing.\n", "It does nothing.")
    assert not exact_match("It does nothing", "It does nothing.")


def test_qa_answers_are_in_the_documents():
    docs = {d.doc_id: d.text.lower() for d in python_reference_corpus()}
    assert len(QA_BENCH) >= 16
    for item in QA_BENCH:
        text = " ".join(docs[i] for i in item.doc_ids)
        assert any(a.lower() in text for a in item.answers), item.question
        assert answer_correct(f"xx {item.answers[0].upper()} yy", item)


@pytest.fixture
def one_thread():
    # on a shared 2-core machine two OpenMP threads can run 10x slower than one
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_prefix_cache_is_exact_and_block_aligned(lm, one_thread):
    from benchmarks.prefix_cache import PrefixCache
    from daser_rag.model.runner import LayerRunner

    runner = LayerRunner(lm)
    ids = lm.tokenizer("The pass statement is a null operation; nothing happens when it executes.",
                       add_special_tokens=False)["input_ids"] * 3
    pc = PrefixCache(runner, block_size=16, dtype=torch.float32)
    cache, ref_logits, hit = pc.prefill(ids)
    assert hit == 0 and len(pc) == 0
    assert pc.insert(ids, cache) == len(ids) // 16
    assert pc.nbytes > 0
    _, logits, hit = pc.prefill(ids)
    assert hit == (len(ids) - 1) // 16 * 16  # whole blocks only, and the last token is always computed
    assert torch.allclose(logits, ref_logits, atol=1e-4)
    other = ids[:5] + [ids[0]] + ids[6:]  # a change early on: nothing after it may hit
    assert pc.match(other) == 0
    assert pc.drop("") == len(ids) // 16 and pc.nbytes == 0


@pytest.fixture(scope="module")
def suite_result(lm, tmp_path_factory):
    from benchmarks.suite import SuiteConfig, run_suite
    from daser_rag.engine.generator import CacheAwareGenerator
    from daser_rag.kv.store import KVStore

    out = tmp_path_factory.mktemp("bench")
    gen = CacheAwareGenerator(lm, store=KVStore(None, codec="fp32"))
    # one thread: on a shared 2-core machine two OpenMP threads can run 10x slower than one
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = SuiteConfig(questions=2, context_tokens=320, distractor_tokens=64, distractor_pool=4, ratios=[0.0, 1.0],
                      answer_tokens=6, codec="fp32", scaling_contexts=[200], scaling_context_chunks=2,
                      scaling_chunk_counts=[3], scaling_chunk_tokens=48, scaling_repeats=1,
                      scaling_answer_tokens=4)
    try:
        result = run_suite(gen, cfg, out, img_dir=out / "img", command="test", log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    return result, out


@pytest.mark.slow  # benchmark-sized: CI's slow step runs it; the default run stays under 5 minutes
def test_suite_writes_consistent_json(suite_result):
    _, out = suite_result
    saved = json.loads((out / "bench.json").read_text())
    assert saved["meta"]["machine"]["label"] and saved["meta"]["seconds"] > 0
    rows = {r["mode"]: r for r in saved["main"]["modes"]}
    assert list(rows) == ["full prefill", "prefix cache", "daser r=0", "daser r=1"]
    for r in rows.values():
        assert r["n"] == 2
        assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"]
        assert r["ttft_mean_s"] > 0 and r["requests_per_s"] > 0 and r["prefill_tokens_per_s"] > 0
        for key in ("top1_agreement", "first_token_agreement", "rouge_l", "exact_match", "qa_accuracy",
                    "reused_share"):
            assert 0.0 <= r[key] <= 1.0, key
    full, prefix, r0, r1 = (rows[k] for k in rows)
    assert full["speedup_vs_full"] == pytest.approx(1.0)
    assert full["cache_bytes"] == 0 and full["reused_share"] == 0
    assert prefix["cache_bytes"] > 0 and r0["cache_bytes"] > 0
    assert r0["reused_share"] == pytest.approx(1.0)  # full reuse: nothing recomputed
    # r=1 recomputes every non-exact token: it *is* full prefill
    assert r1["top1_agreement"] == 1.0 and r1["mean_kl"] < 1e-4
    assert r1["rouge_l"] == 1.0 and r1["exact_match"] == 1.0
    assert r1["qa_accuracy"] == full["qa_accuracy"]
    # exact prefix caching changes nothing but float rounding of the stored blocks
    assert prefix["top1_agreement"] == 1.0 and prefix["mean_kl"] < 1e-3
    assert r0["mean_kl"] > r1["mean_kl"]
    qa = saved["main"]["qa"]
    assert len(qa["questions"]) == 2 and all(len(v) == 2 for v in qa["correct"].values())
    per = saved["main"]["per_request"]
    assert len(per) == 2 and all(len(p["runs"]) == 4 for p in per)
    assert saved["main"]["vllm"]["status"]


@pytest.mark.slow  # shares the benchmark-sized suite run above
def test_suite_scaling_and_artifacts(suite_result):
    result, out = suite_result
    sc = result["scaling"]
    assert [p["n_chunks"] for p in sc["context"]] == [2] and [p["n_chunks"] for p in sc["chunks"]] == [3]
    for p in sc["context"] + sc["chunks"]:
        assert p["context_tokens"] > 0
        names = [m["mode"] for m in p["modes"]]
        assert names == ["full prefill", "prefix cache", "daser r=0", "daser r=0.15"]
        assert all(m["ttft_median_s"] > 0 for m in p["modes"])
        assert p["modes"][1]["top1_agreement"] == 1.0
    for name in ("ttft_vs_context.png", "ttft_vs_chunks.png", "fidelity_vs_r.png", "ttft_vs_r.png"):
        for d in (out, out / "img"):
            data = (d / name).read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    md = (out / "results.md").read_text()
    assert result["meta"]["machine"]["label"] in md and "| daser r=1 |" in md


def test_update_doc_replaces_only_the_results_section(tmp_path):
    from benchmarks.suite import BEGIN, END, update_doc

    doc = tmp_path / "b.md"
    doc.write_text(f"# Title\nintro\n{BEGIN}\nold numbers\n{END}\nfooter\n")
    update_doc(doc, "new numbers\n")
    assert doc.read_text() == f"# Title\nintro\n{BEGIN}\nnew numbers\n{END}\nfooter\n"
    bad = tmp_path / "c.md"
    bad.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        update_doc(bad, "x")


@pytest.mark.slow  # benchmark-sized: CI's slow step runs it; the default run stays under 5 minutes
def test_harness_fidelity_matches_evaluation_module(lm, one_thread):
    """The suite's one-pass teacher forcing agrees with daser_rag.evaluation's step-by-step loop."""
    from benchmarks.harness import Harness, standard_modes
    from benchmarks.ttft import QUESTION, make_chunks
    from daser_rag.evaluation import measure_fidelity
    from daser_rag.engine.generator import CacheAwareGenerator
    from daser_rag.kv.store import KVStore

    gen = CacheAwareGenerator(lm, store=KVStore(None, codec="fp32"))
    h = Harness(gen, answer_tokens=6)
    chunks = make_chunks(gen, 3, 48)
    h.ingest(chunks)
    runs = h.request(QUESTION, chunks, standard_modes([0.0]))
    ref = measure_fidelity(gen, [(QUESTION, chunks)], [0.0], steps=len(runs["full prefill"].ref_ids))[0.0]
    mine = runs["daser r=0"].fidelity
    assert mine.total == ref.total and mine.agree == ref.agree
    assert mine.mean_kl == pytest.approx(ref.mean_kl, rel=1e-3, abs=1e-6)


def test_selection_shards_partition_the_prompts_and_merge_back():
    from benchmarks.selection import merge_runs, modes_for, shard_items

    items = [{"idx": i} for i in range(7)]
    parts = [shard_items(items, f"{j}/3") for j in range(3)]
    assert sorted(it["idx"] for p in parts for it in p) == list(range(7))
    with pytest.raises(SystemExit):
        shard_items(items, "3/3")
    names = [m.name for m in modes_for(["deviation", "query:0.15/0.3"], [0.1, 0.2], ["deviation"])]
    assert names == ["full prefill", "daser r=0", "deviation r=0.1", "deviation r=0.2", "deviation r=auto",
                     "query r=0.15", "query r=0.3"]

    def row(item, mode, sel, ttft, kl):
        return {"set": "stdlib", "item": item, "position": "last", "mode": mode, "selector": sel, "ratio": 0.1,
                "ttft_s": ttft, "steps": 2, "agree": 2, "kl_sum": kl, "identical": 1, "f1": 1.0, "correct": 0,
                "share": 0.1}

    a = {"rows": [row(0, "full prefill", "full", 2.0, 0.0), row(0, "hybrid r=0.1", "hybrid", 1.0, 0.2)],
         "blend": "B", "command": "daser-rag bench selection --shard 0/2 --json a.json", "minutes": 3.0}
    b = {"rows": [row(1, "full prefill", "full", 4.0, 0.0), row(1, "hybrid r=0.1", "hybrid", 1.0, 0.6)],
         "blend": "B", "command": "daser-rag bench selection --shard 1/2 --json b.json", "minutes": 5.0}
    merged = merge_runs([a, b], "all.json")
    assert merged["command"] == "daser-rag bench selection --json all.json" and merged["minutes"] == 5.0
    v = merged["results"]["stdlib"]["hybrid r=0.1"]
    assert v["prompts"] == 2 and v["mean_kl"] == pytest.approx(0.2) and v["speedup"] == pytest.approx(3.0)
    with pytest.raises(SystemExit, match="overlap"):
        merge_runs([a, a], "x.json")
    # a run adding a selector on the same prompts: its own reference rows are dropped, its
    # speed-up stays paired with its own full prefill
    extra = {"rows": [dict(row(0, "full prefill", "full", 8.0, 0.0), full_ttft_s=8.0),
                      dict(row(0, "query r=0.1", "query", 2.0, 0.4), full_ttft_s=8.0)],
             "blend": "B", "command": "daser-rag bench selection --selectors query --json c.json", "minutes": 1.0}
    both = merge_runs([a, b, extra], "all.json")
    assert both["results"]["stdlib"]["full prefill"]["prompts"] == 2
    assert both["results"]["stdlib"]["query r=0.1"]["speedup"] == pytest.approx(4.0)
    assert both["command"].count(" ; ") == 1


def test_prefix_tree_trace_kinds():
    from benchmarks.prefix_tree import make_trace

    trace = make_trace(40, 4, 10, 0.3, seed=1)
    kinds = {t["kind"] for t in trace}
    assert kinds == {"new", "reorder", "repeat"}
    for i, t in enumerate(trace):
        assert len(set(t["docs"])) == 4
        earlier = [u["docs"] for u in trace[:i]]
        if t["kind"] == "repeat":
            assert t["docs"] in earlier
        if t["kind"] == "reorder":
            assert any(sorted(t["docs"]) == sorted(e) for e in earlier)


def test_calibration_bench_variants_fit_the_regime_their_name_says():
    """`ape`, `adapter`, `both`, `bias` are full-reuse fits, `*_r15` fits at hybrid r = 0.15: the
    share is explicit (CalibrationConfig's default share is the engine's, 0.15, so a variant that
    left it out silently became an r = 0.15 fit)."""
    from benchmarks.calibration import VARIANTS
    from daser_rag.calibration.config import CalibrationConfig

    for name, opts in VARIANTS.items():
        cfg = CalibrationConfig(**{**CalibrationConfig().__dict__, **opts})
        assert cfg.fit_share == (0.15 if name.endswith("_r15") else 0.0), name
        # likewise the primer (CalibrationConfig's default is 512): only the primer variants have one
        assert cfg.primer_tokens == (512 if name.startswith("primer") else 0), name
        # and how many primers (the default is 4): one unless the name says otherwise
        assert cfg.primers == (4 if name.startswith("primer4") else 1) or not cfg.primer_tokens, name


def test_calibration_bench_says_where_top1_disagrees():
    """Close steps (full prefill's top two within CLOSE_MARGIN) are counted apart, so the report
    says how much of the top-1 gap sits where full prefill itself hesitates."""
    import torch

    from benchmarks.calibration import summarize, table
    from daser_rag.evaluation import is_close

    assert is_close(torch.tensor([2.0, 1.9, -5.0])) and not is_close(torch.tensor([5.0, 1.0, -5.0]))
    row = {"item": 0, "variant": "v", "mode": "m", "full_ttft_s": 1.0, "ttft_s": 0.5, "steps": 10, "agree": 8,
           "kl_sum": 0.1, "identical": 0, "f1": 0.5, "correct": 0, "full_correct": 0, "share": 0.1,
           "close_steps": 3, "close_agree": 1}
    s = summarize([row])[("v", "m")]
    assert s["close_share"] == 0.3 and s["top1_clear"] == 1.0 and abs(s["top1_close"] - 1 / 3) < 1e-9
    assert s["misses_at_close"] == 1.0  # both disagreements were at close steps
    text = table({"rows": [row], "variants": ["v"], "modes": ["m"]})
    assert "| v | m | 30% | 0.333 | 1.000 | 100% |" in text
    old = {k: v for k, v in row.items() if not k.startswith("close")}
    assert "close_share" not in summarize([old])[("v", "m")] and "close steps" not in table(
        {"rows": [old], "variants": ["v"], "modes": ["m"]})


def test_calibration_bench_reports_by_answer_position_and_writes_the_readme_block(tmp_path: Path) -> None:
    """The issue's targets are stated for the answer document last: the report and the README block
    say it per position (recorded in new rows; older runs' items cycle first / middle / last)."""
    from benchmarks.calibration import readme_table, row_position, table
    from benchmarks.markdown import replace_marked

    def row(item: int, variant: str, kl: float, **extra: object) -> dict[str, object]:
        return {"item": item, "variant": variant, "mode": "daser r=0", "full_ttft_s": 1.0, "ttft_s": 0.1,
                "steps": 10, "agree": 9, "kl_sum": kl, "identical": 0, "f1": 0.5, "correct": 0,
                "full_correct": 0, "share": 0.0, **extra}

    assert [row_position(row(i, "v", 0.0)) for i in range(4)] == ["first", "middle", "last", "first"]
    assert row_position(row(0, "v", 0.0, position="last")) == "last"
    assert row_position(row(0, "v", 0.0), "qa") == "last"
    rows = [row(i, v, (i + 1) * (1.0 if v == "none" else 0.1)) for i in range(3) for v in ("none", "cal")]
    data = {"rows": rows, "variants": ["none", "cal"], "modes": ["daser r=0"],
            "command": "daser-rag bench calibration --dir /x/y -n 3 --shard 1/2 --json /x/z.json"}
    assert "| cal | daser r=0 | 0.900 / 0.0100 | 0.900 / 0.0200 | 0.900 / 0.0300 |" in table(data)
    block = readme_table(data)
    assert "`daser-rag bench calibration --dir DIR -n 3 --shard j/2` (`--merge` joins the shards)" in block
    assert "| daser r=0 | 0.2000 / 0.900 / 10.0x (0.3000 / 0.900) | 0.0200 / 0.900 / 10.0x (0.0300 / 0.900) |" in block
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- readme-calibration:begin -->\nold\n<!-- readme-calibration:end -->\nb\n")
    replace_marked(readme, "readme-calibration", block)
    assert "old" not in readme.read_text() and readme.read_text().endswith("b\n")
