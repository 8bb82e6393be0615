"""Issue 20 item 14: the official `openai` Python client against a real service on 127.0.0.1
(uvicorn in a thread, real model): streamed chat opens with `delta.role`, `stream_options.
include_usage` sends a usage chunk, `max_completion_tokens` is honoured, neutral values of
unsupported fields pass, other values are refused with code `unsupported_parameter` and a
`param`, and every error object carries `param`."""

from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
import httpx

from daser_rag.server.app import Limits, create_app
from daser_rag.server.testing import AppThread

PASS_DOC = "The pass statement is a null operation; when it is executed, nothing happens."
Q = "What happens when pass is executed?"


@pytest.fixture
def served(generator):
    app = create_app(generator, api_keys=["sk-test"], limits=Limits(max_new_tokens=64))
    with AppThread(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="sk-test", max_retries=0, timeout=120)
        client.post("/documents", cast_to=httpx.Response, body={"documents": [{"id": "pass", "text": PASS_DOC}]})
        yield srv, client
        client.close()


EXTRA = {"documents": [{"id": "pass"}]}


def test_streamed_chat_opens_with_the_role_and_ends_with_usage(served):
    _, client = served
    plain = client.chat.completions.create(model="daser", messages=[{"role": "user", "content": Q}],
                                           max_completion_tokens=6, extra_body=EXTRA)
    assert plain.choices[0].message.role == "assistant" and plain.usage.completion_tokens <= 6
    stream = client.chat.completions.create(model="daser", messages=[{"role": "user", "content": Q}], stream=True,
                                            stream_options={"include_usage": True}, max_completion_tokens=6,
                                            extra_body=EXTRA)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [plain.choices[0].finish_reason]


def test_legacy_completions_stream_with_usage(served):
    _, client = served
    chunks = list(client.completions.create(model="daser", prompt=Q, max_tokens=4, stream=True,
                                            stream_options={"include_usage": True}, extra_body=EXTRA))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    # without include_usage there is no usage-only chunk
    chunks = list(client.completions.create(model="daser", prompt=Q, max_tokens=4, stream=True, extra_body=EXTRA))
    assert all(c.choices for c in chunks)


def test_neutral_values_of_unsupported_fields_are_accepted(served):
    _, client = served
    r = client.chat.completions.create(model="daser", messages=[{"role": "user", "content": Q}], max_tokens=2,
                                       logprobs=False, presence_penalty=0, frequency_penalty=0.0, logit_bias={},
                                       n=1, response_format={"type": "text"}, store=False, extra_body=EXTRA)
    assert r.choices[0].message.content is not None


@pytest.mark.parametrize("field,value", [("logprobs", True), ("presence_penalty", 0.5), ("frequency_penalty", -1.0),
                                         ("logit_bias", {"1": 5}), ("top_logprobs", 3),
                                         ("response_format", {"type": "json_object"}),
                                         ("tools", [{"type": "function", "function": {"name": "f"}}])])
def test_other_values_are_refused_with_a_clear_code_and_param(served, field, value):
    _, client = served
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model="daser", messages=[{"role": "user", "content": Q}], max_tokens=2,
                                       **{field: value})
    err = ei.value
    assert err.code == "unsupported_parameter" and err.param == field, err.body
    assert field in err.message


def test_errors_carry_param_and_code(served):
    srv, client = served
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model="daser", messages=[{"role": "user", "content": Q}], max_tokens=0)
    assert ei.value.code == "invalid_request" and ei.value.param == "max_tokens", ei.value.body
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model="daser", messages=[{"role": "user", "content": Q}], max_tokens=2,
                                       max_completion_tokens=3)
    assert "max_completion_tokens" in ei.value.message
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model="daser", messages=[{"role": "user", "content": Q}], max_tokens=10_000)
    assert ei.value.code == "max_tokens_exceeded" and ei.value.param == "max_tokens", ei.value.body
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model="daser", messages=[{"role": "user", "content": Q}],
                                       extra_headers={"X-Daser-Tenant": "not a tenant!"})
    assert ei.value.code == "invalid_tenant" and ei.value.param == "tenant", ei.value.body
    with pytest.raises(openai.NotFoundError) as ei:
        client.chat.completions.create(model="gpt-nope", messages=[{"role": "user", "content": Q}])
    assert ei.value.code == "model_not_found" and "param" in ei.value.body
    bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as ei:
        bad.chat.completions.create(model="daser", messages=[{"role": "user", "content": Q}])
    assert ei.value.code == "invalid_api_key"
    bad.close()


def test_stream_error_events_carry_param(served):
    srv, _ = served
    from daser_rag.server.openai import sse_error

    event = json.loads(sse_error("boom", "internal_error")[6:])
    assert event["error"]["param"] is None and event["error"]["code"] == "internal_error"
