"""Issue 21 items 2, 3, 5 on the core: one clear error for bad text on every core path,
progress counted in chunks, and `mode` that says "full" when nothing was reused."""

from __future__ import annotations

import pytest

from daser_rag.errors import InvalidInputError
from daser_rag.textcheck import check_document_text
from daser_rag.types import Document
from daser_rag.context import SHARED_TENANT

BAD_TEXTS = {"empty": "", "whitespace": " \n\t ", "none": None, "surrogate": "caf\udce9 menu"}


@pytest.mark.parametrize("kind", sorted(BAD_TEXTS))
def test_bad_document_text_is_one_clear_error_and_keeps_what_is_stored(generator, kind):
    generator.add_documents([Document("kept", "The lighthouse lamp is green.")])
    before = generator.store.document_chunk_keys("kept", SHARED_TENANT)
    bad = Document("bad", BAD_TEXTS[kind])
    with pytest.raises(InvalidInputError) as err:
        generator.add_documents([Document("kept", "Edited text that must not be stored."), bad])
    with pytest.raises(InvalidInputError) as same:
        check_document_text("bad", BAD_TEXTS[kind])
    assert str(err.value) == str(same.value)
    assert "'bad'" in str(err.value)
    assert generator.store.document_chunk_keys("kept", SHARED_TENANT) == before
    assert generator.store.document_info("bad", SHARED_TENANT) is None


def test_duplicate_ids_in_one_call_are_rejected_before_any_write(generator):
    with pytest.raises(InvalidInputError, match="duplicate document id"):
        generator.add_documents([Document("twin", "First text."), Document("twin", "Second text.")])
    assert generator.store.document_info("twin", SHARED_TENANT) is None


def test_lone_surrogates_in_question_and_context_are_invalid_input(generator):
    with pytest.raises(InvalidInputError, match="surrogate"):
        generator.generate("Where is \ud800 it?", ["Some context."], max_new_tokens=1)
    with pytest.raises(InvalidInputError, match="surrogate"):
        generator.generate("Where is it?", ["Some \udfff context."], max_new_tokens=1)
    with pytest.raises(InvalidInputError, match="surrogate"):
        generator.split("bad \ud83d text")


def test_progress_counts_chunks_not_documents(lm, store):
    from daser_rag.engine.generator import CacheAwareGenerator

    gen = CacheAwareGenerator(lm, store=store, chunk_tokens=16)
    text = " ".join(f"Fact {i}: the blue kite number {i} flies high." for i in range(8))
    calls: list[int] = []
    report = gen.add_documents([Document("long", text)], progress=calls.append)
    assert report.chunks > 3
    assert calls == [1] * report.chunks


def test_progress_bar_unit_is_chunks(lm, store, monkeypatch):
    import tqdm.auto

    from daser_rag.engine.generator import CacheAwareGenerator

    seen: dict = {}

    class Bar:
        def __init__(self, total, desc, unit):
            seen.update(total=total, unit=unit, n=0)

        def update(self, n):
            seen["n"] += n

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    gen = CacheAwareGenerator(lm, store=store, chunk_tokens=16)
    text = " ".join(f"Note {i}: the red door {i} is locked." for i in range(6))
    report = gen.add_documents([Document("one", text)], progress=True)
    assert seen == {"total": report.chunks, "unit": "chunk", "n": report.chunks}


def test_mode_is_full_when_nothing_was_reused(generator):
    ctx = ["The gate code of the old mill is 5521."]
    first = generator.generate("What is the gate code?", ctx, max_new_tokens=2)
    assert (first.cache_hits, first.reused_tokens) == (0, 0)
    assert first.mode == "full" and first.selector == "none" and first.recompute_ratio == 1.0
    second = generator.generate("What is the gate code?", ctx, max_new_tokens=2)
    assert second.cache_hits == 1 and second.mode == "blend"
    assert second.token_ids == first.token_ids
