"""LangChain's DaserVectorStore pointed at a real `daser-rag serve` (embedded engine, a child
process on 127.0.0.1) through DaserClient: chunk KV is stored at index time (before any query; the
first answer reads every chunk, 0 misses), and an update or a delete drops exactly the stale KV."""

from __future__ import annotations

import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("fastapi")

from langchain_core.documents import Document

from daser_rag.server.client import DaserClient
from daser_rag.server.testing import ServiceProcess
from langchain_daser import ChatDaser, DaserRetriever, DaserVectorStore, MiniLMEmbeddings
from langchain_daser.vectorstores import RESERVED_TOKENS

KB = {
    "vault": "The vault at the Harbor Bank opens with the code 4172.",
    "ferry": "The ferry to Gull Island leaves every day at 7 in the morning.",
    "library": "The city library closes at 9 in the evening on weekdays.",
}
VAULT_Q = "What is the code of the vault at the Harbor Bank?"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    svc = ServiceProcess(tmp_path_factory.mktemp("lc-service") / "cache",
                         extra_args=["--codec", "fp32", "--key-tokens-per-minute", "10000000"])
    with svc:
        yield svc


@pytest.mark.slow  # a service process (or a 1,500-token document) loads and computes: minutes on 2 cores
def test_vector_store_precomputes_on_the_service_and_drops_exactly_the_stale_kv(service):
    client = DaserClient(service.url)
    store = DaserVectorStore(client, embedding=MiniLMEmbeddings(), doc_id_prefix="kb:")
    window = client.context_window
    assert store.max_document_tokens() == window - min(window // 2, RESERVED_TOKENS)  # the service's window
    store.add_documents([Document(page_content=t) for t in KB.values()], ids=list(KB))
    keys = {name: client.document_keys(store.kv_doc_id(name)) for name in KB}
    assert all(len(k) == 1 for k in keys.values())
    assert all(client.stored([k[0] for k in keys.values()]))  # stored before any query

    llm = ChatDaser(generator=client, max_tokens=16)
    docs = DaserRetriever.from_vectorstore(store, k=2).invoke(VAULT_Q)
    answer = llm.invoke(VAULT_Q, documents=docs)
    meta = answer.response_metadata["daser"]
    assert "4172" in answer.content
    assert (meta["cache_hits"], meta["cache_misses"]) == (2, 0) and meta["exact_tokens"] + meta["reused_tokens"] > 0

    store.add_documents([Document(page_content=KB["vault"].replace("4172", "9035"))], ids=["vault"])  # update
    new_vault = client.document_keys(store.kv_doc_id("vault"))
    assert new_vault != keys["vault"] and client.stored(keys["vault"] + new_vault) == [False, True]
    assert all(client.stored([keys["ferry"][0], keys["library"][0]]))

    assert store.delete(["ferry"]) is True
    assert store.last_dropped == {"ferry": keys["ferry"]}
    assert client.stored([keys["ferry"][0], keys["library"][0], new_vault[0]]) == [False, True, True]
    client.close()
