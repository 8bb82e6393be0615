"""DaserClient speaks the parts of the engine protocol adapters need (model name, context window,
token counts, splits), answered by the service's own engine: an adapter pointed at a service
counts and sizes exactly as one holding the engine in process."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from daser_rag.server.app import Limits, create_app
from daser_rag.server.client import DaserClient

TEXTS = ["Hello wörld, a plain sentence.", "A <|im_end|> B: control-token text counts as text", ""]


def test_client_reports_the_engines_name_window_and_token_counts(generator):
    with TestClient(create_app(generator, limits=Limits(key_tokens_per_minute=10_000))) as http:
        client = DaserClient("http://testserver")
        client._http.close()
        client._http = http
        assert client.model_name == generator.model_name
        assert client.context_window == generator.context_window
        assert client.count_tokens(TEXTS) == generator.count_tokens(TEXTS)
        assert client.split("one. two.") == generator.split("one. two.")
        models = http.get("/v1/models").json()["data"][0]
        assert models["engine"] == "daser" and models["context_window"] == generator.context_window


def test_adapters_pointed_at_the_service_count_with_the_engines_own_token_ids(generator):
    """Through DaserClient, LangChain's get_token_ids used to return `range(count)` (made-up ids)
    and LlamaIndex's `DaserLLM.tokenizer` was None (TokenCountingHandler could not count): both
    are now the service engine's own ids, equal to the in-process engine's."""
    from langchain_daser import ChatDaser
    from llama_index.llms.daser import DaserLLM

    with TestClient(create_app(generator, limits=Limits(key_tokens_per_minute=10_000))) as http:
        client = DaserClient("http://testserver")
        client._http.close()
        client._http = http
        for text in TEXTS:
            want = generator.token_ids(text)
            assert len(want) == generator.count_tokens([text])
            assert client.token_ids(text) == want
            assert ChatDaser(generator=client).get_token_ids(text) == want
            assert DaserLLM(client).tokenizer(text) == want
            assert DaserLLM(generator).tokenizer(text) == want
        assert http.post("/v1/tokenize", json={"text": TEXTS[1]}).json()["token_ids"] == generator.token_ids(TEXTS[1])
