"""Issue 21: DaserLLM and the LlamaIndex components behave like native LlamaIndex parts.

TokenCountingHandler counts (raw is a dict with usage), bad text gets the core's one
InvalidInputError on every LlamaIndex path, an oversized Document splits in a pipeline into
parts the embedding reads whole, and the LLM names its model, round-trips through
to_dict/from_dict and fills ChatResponse.additional_kwargs.
"""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("llama_index.core")
pytest.importorskip("faiss")

from llama_index.core import Document, StorageContext, VectorStoreIndex
from llama_index.core.callbacks import CallbackManager, TokenCountingHandler
from llama_index.core.ingestion import IngestionPipeline
from llama_index.core.llms import ChatMessage
from llama_index.core.schema import MetadataMode, NodeWithScore, TextNode

from daser_rag.errors import InvalidInputError
from daser_rag.textcheck import check_document_text
from daser_rag.context import SHARED_TENANT
from llama_index.llms.daser import CacheAwareSynthesizer, DaserLLM, KVPrecomputeTransform, MiniLMEmbedding
from llama_index.llms.daser.kv_sync import embedding_window
from llama_index.vector_stores.daser import DaserFaissVectorStore

MAX_NEW = 4


@pytest.fixture(scope="module")
def embed():
    return MiniLMEmbedding()


def test_token_counting_handler_counts_complete_stream_chat_and_synthesizer(generator):
    counter = TokenCountingHandler(tokenizer=DaserLLM(generator).tokenizer)
    llm = DaserLLM(generator, max_new_tokens=MAX_NEW, callback_manager=CallbackManager([counter]))
    done = llm.complete("Say hi")
    assert isinstance(done.raw, dict) and done.raw["result"].text == done.text
    usage = done.raw["usage"]
    assert counter.prompt_llm_token_count == usage["prompt_tokens"] > 0
    assert counter.completion_llm_token_count == usage["completion_tokens"] > 0
    last = list(llm.stream_complete("Say hi"))[-1]
    assert isinstance(last.raw, dict) and last.raw["usage"] == usage
    chat = llm.chat([ChatMessage(role="user", content="Say hi")])
    assert chat.additional_kwargs["mode"] == "full" and chat.message.additional_kwargs["mode"] == "full"
    # one chat call is one LLM event: its tokens are counted once
    assert len(counter.llm_token_counts) == 3
    synth = CacheAwareSynthesizer(llm, callback_manager=CallbackManager([counter]))
    node = NodeWithScore(node=TextNode(text="The old mill's gate code is 5521."), score=1.0)
    resp = synth.synthesize("What is the gate code?", nodes=[node])
    assert len(counter.llm_token_counts) == 4
    assert counter.llm_token_counts[-1].prompt_token_count == resp.metadata["daser"]["prompt_tokens"]


def test_async_chat_fills_additional_kwargs(generator):
    llm = DaserLLM(generator, max_new_tokens=MAX_NEW)
    msgs = [ChatMessage(role="user", content="Say hi")]
    resp = asyncio.run(llm.achat(msgs))
    assert resp.additional_kwargs["completion_tokens"] > 0

    async def stream():
        return [r async for r in await llm.astream_chat(msgs)]

    assert asyncio.run(stream())[-1].additional_kwargs["mode"] == "full"
    assert list(llm.stream_chat(msgs))[-1].additional_kwargs["mode"] == "full"


def test_model_name_and_to_dict_from_dict(generator):
    llm = DaserLLM(generator, max_new_tokens=7)
    assert llm.metadata.model_name.startswith("SmolLM2-135M") and llm.model_name != "daser-rag"
    data = llm.to_dict()
    again = DaserLLM.from_dict(data, generator=generator)
    assert again.max_new_tokens == 7 and again.model_name == llm.model_name
    rebuilt = DaserLLM.from_dict(data)  # the generator is rebuilt from the dict (same model, same cache)
    assert rebuilt.generator is not generator and rebuilt.generator.fingerprint == generator.fingerprint
    assert DaserLLM(generator, model_name="mine").model_name == "mine"
    with pytest.raises(TypeError, match="generator"):
        DaserLLM.from_dict({k: v for k, v in data.items() if k != "generator_spec"})


BAD = {"empty": "", "whitespace": "  \n ", "surrogate": "gate \udc80 code"}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_node_text_is_the_core_error_in_store_and_transform(generator, kind):
    store = DaserFaissVectorStore(generator=generator, show_progress=False)
    good = TextNode(text="The lighthouse lamp is green.", id_="good", embedding=[1.0, 0.0, 0.0])
    store.add([good])
    bad = TextNode(text=BAD[kind], id_="bad", embedding=[0.0, 1.0, 0.0])
    with pytest.raises(InvalidInputError) as expected:
        check_document_text("bad", BAD[kind])
    with pytest.raises(InvalidInputError) as err:
        store.add([TextNode(text="Another fine node.", id_="other", embedding=[0.0, 0.0, 1.0]), bad])
    assert str(err.value) == str(expected.value)
    assert store.node_ids() == ["good"]
    with pytest.raises(InvalidInputError) as err:
        KVPrecomputeTransform(generator, show_progress=False)([bad])
    assert str(err.value) == str(expected.value)
    assert generator.store.document_chunk_keys("bad", SHARED_TENANT) == []


def test_empty_none_and_duplicate_documents_through_the_index(generator, embed):
    store = DaserFaissVectorStore(generator=generator, show_progress=False)
    index = VectorStoreIndex([], storage_context=StorageContext.from_defaults(vector_store=store), embed_model=embed)
    index.insert(Document(text="The ferry leaves at seven.", id_="ferry"))
    for doc in (Document(text="", id_="e1"), Document(text=None, id_="e2")):
        with pytest.raises(InvalidInputError, match="is empty"):
            index.insert(doc)
    with pytest.raises(InvalidInputError, match="duplicate document id"):
        index.insert_nodes([TextNode(text="one", id_="n1", embedding=[0.1] * 384),
                            TextNode(text="two", id_="n1", embedding=[0.2] * 384)])
    with pytest.raises(InvalidInputError, match=r"duplicate document id.*'twin'"):
        index.refresh_ref_docs  # noqa: B018 - a reminder that upserts come one document at a time
        IngestionPipeline(transformations=[KVPrecomputeTransform(generator, show_progress=False)]).run(
            documents=[Document(text="Version one.", id_="twin"), Document(text="Version two.", id_="twin")])
    with pytest.raises(InvalidInputError, match=r"duplicate document id.*'dup'"):
        VectorStoreIndex.from_documents(
            [Document(text="The vault code is 4172.", id_="dup"), Document(text="The vault code is 9999.", id_="dup")],
            storage_context=StorageContext.from_defaults(vector_store=store), embed_model=embed)
    assert store.ref_doc_ids() == ["ferry"]
    assert index.as_retriever(similarity_top_k=3).retrieve("When does the ferry leave?")


@pytest.fixture
def small_window(lm, tmp_path, monkeypatch):
    from daser_rag.engine.generator import CacheAwareGenerator
    from daser_rag.kv.store import KVStore

    gen = CacheAwareGenerator(lm, store=KVStore(tmp_path / "small", codec="fp32"), chunk_tokens=64)
    monkeypatch.setattr(gen.runner, "max_positions", 512)
    return gen


def test_oversized_document_splits_in_a_pipeline_into_parts_the_embedding_reads_whole(small_window, embed):
    gen = small_window
    text = " ".join(f"Note {i}: the lantern in room {i} is painted blue and green." for i in range(40))
    doc = Document(text=text, id_="lanterns", metadata={"topic": "lanterns"})
    transform = KVPrecomputeTransform(gen, show_progress=False, embed_max_tokens=64)
    parts = IngestionPipeline(transformations=[transform]).run(documents=[doc])
    limit = transform.kv.max_chunk_tokens()
    assert len(gen.tokenizer.encode(text)) > limit
    assert len(parts) > 1 and {p.ref_doc_id for p in parts} == {"lanterns"}
    tok = embed._tokenizer
    for part in parts:
        assert len(tok(part.get_content(metadata_mode=MetadataMode.EMBED))["input_ids"]) <= 64
        assert gen.resolve([part.get_content(metadata_mode=MetadataMode.LLM)])[0].num_tokens <= limit
    assert "".join(p.get_content(metadata_mode=MetadataMode.NONE) for p in parts).replace(" ", "") == \
        text.replace(" ", "")
    assert set(gen.store.document_chunk_keys("lanterns", SHARED_TENANT)) == set(transform.reports[-1].keys)
    # default: the bundled MiniLM's window bounds the parts (it truncates at 256 tokens)
    assert embedding_window()[1] == 256 and embedding_window(embed)[1] == embed.max_length
