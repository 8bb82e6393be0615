"""Issue 21: ChatDaser and DaserVectorStore follow LangChain's conventions.

Offline token counting (trim_messages works), dumpd/loads with the key kept secret, a clear
bind_tools refusal, the model's real name, the core's one InvalidInputError for bad text and
duplicate ids, and a progress bar counted in chunks even for one long document.
"""

from __future__ import annotations

import pytest

pytest.importorskip("langchain_core")

from langchain_core.documents import Document
from langchain_core.load import dumpd, dumps, loads
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, trim_messages

from daser_rag.errors import InvalidInputError
from daser_rag.textcheck import check_document_text
from daser_rag.context import SHARED_TENANT
from langchain_daser import ChatDaser, DaserVectorStore, MiniLMEmbeddings


@pytest.fixture(scope="module")
def embedding() -> MiniLMEmbeddings:
    return MiniLMEmbeddings()


def test_token_counts_use_daser_tokenizer_offline_and_trim_messages_works(generator, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("ChatDaser tried to go online to count tokens")

    monkeypatch.setattr(socket, "create_connection", no_network)
    llm = ChatDaser(generator=generator)
    text = "The ferry to Gull Island leaves at seven."
    assert llm.get_num_tokens(text) == len(generator.tokenizer.encode(text, add_special_tokens=False)) > 5
    msgs = [SystemMessage("Answer briefly."), HumanMessage("What is the vault code?"), AIMessage("It is 4172."),
            HumanMessage("And when does the ferry leave?")]
    total = llm.get_num_tokens_from_messages(msgs)
    assert total > sum(llm.get_num_tokens(m.content) for m in msgs) - 1
    kept = trim_messages(msgs, max_tokens=total // 2, token_counter=llm, strategy="last")
    assert 0 < len(kept) < len(msgs) and kept[-1] == msgs[-1]


def test_model_name_serialization_and_bind_tools(generator):
    llm = ChatDaser(generator=generator, max_tokens=5, temperature=0.3, api_key="s3cret-key")
    assert llm.model_name.startswith("SmolLM2-135M") and llm.model_name != "daser-rag"
    assert llm.invoke("Say hi").response_metadata["model_name"] == llm.model_name
    data = dumpd(llm)
    assert data["type"] == "constructor" and data["id"] == ["langchain_daser", "chat_models", "ChatDaser"]
    assert data["kwargs"]["api_key"] == {"lc": 1, "type": "secret", "id": ["DASER_API_KEY"]}
    assert "s3cret-key" not in dumps(llm)
    again = loads(dumps(llm), valid_namespaces=["langchain_daser"], allowed_objects=[ChatDaser],
                  secrets_map={"DASER_API_KEY": "s3cret-key"})
    assert isinstance(again, ChatDaser) and again.generator is not generator
    assert (again.max_tokens, again.temperature, again.model_name) == (5, 0.3, llm.model_name)
    assert again.generator.fingerprint == generator.fingerprint
    assert again.api_key.get_secret_value() == "s3cret-key"
    with pytest.raises(NotImplementedError, match="tool calling"):
        llm.bind_tools([])
    with pytest.raises(TypeError, match="generator"):
        ChatDaser()


BAD = {"empty": "", "whitespace": " \n ", "surrogate": "vault \ud800 code"}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_text_is_the_core_error_in_store_and_chat(generator, embedding, kind):
    store = DaserVectorStore(generator, embedding=embedding)
    store.add_documents([Document(page_content="The ferry leaves at seven.")], ids=["ferry"])
    with pytest.raises(InvalidInputError) as expected:
        check_document_text("bad", BAD[kind])
    with pytest.raises(InvalidInputError) as err:
        store.add_documents([Document(page_content="The museum opens at ten."), Document(page_content=BAD[kind])],
                            ids=["museum", "bad"])
    assert str(err.value) == str(expected.value)
    with pytest.raises(InvalidInputError) as err:
        ChatDaser(generator=generator).invoke("Where?", documents=[Document(id="bad", page_content=BAD[kind])])
    assert str(err.value) == str(expected.value)
    with pytest.raises(InvalidInputError, match="duplicate document id"):
        store.add_documents([Document(page_content="One."), Document(page_content="Two.")], ids=["d", "d"])
    assert list(store.vectorstore.store) == ["ferry"] and generator.store.documents(SHARED_TENANT) == ["ferry"]


def test_one_long_document_gets_a_progress_bar_counted_in_chunks(lm, tmp_path, embedding, monkeypatch):
    import tqdm.auto

    from daser_rag.engine.generator import CacheAwareGenerator
    from daser_rag.kv.store import KVStore

    bars: list[dict] = []

    class Bar:
        def __init__(self, total, desc, unit):
            bars.append({"total": total, "unit": unit, "n": 0})

        def update(self, n):
            bars[-1]["n"] += n

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    gen = CacheAwareGenerator(lm, store=KVStore(tmp_path / "c", codec="fp32"), chunk_tokens=16)
    store = DaserVectorStore(gen, embedding=embedding)
    text = " ".join(f"Fact {i}: lantern {i} hangs in hall {i}." for i in range(20))
    store.add_documents([Document(page_content=text)], ids=["long"])
    chunks = len(gen.store.document_chunk_keys("long", SHARED_TENANT))
    assert chunks >= 16 and bars == [{"total": chunks, "unit": "chunk", "n": chunks}]
    store.add_documents([Document(page_content="A short note.")], ids=["short"])
    assert len(bars) == 1  # auto: a few chunks get no bar


def test_mode_is_full_when_no_chunk_was_reused(generator):
    llm = ChatDaser(generator=generator, max_tokens=2)
    doc = Document(id="mill", page_content="The gate code of the old mill is 5521.")
    first = llm.invoke("What is the gate code?", documents=[doc]).response_metadata["daser"]
    assert first["cache_hits"] == 0 and first["mode"] == "full"
    second = llm.invoke("What is the gate code?", documents=[doc]).response_metadata["daser"]
    assert second["cache_hits"] == 1 and second["mode"] == "blend"
