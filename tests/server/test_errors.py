"""Every failure is an OpenAI error body with the right status; disconnects free their KV blocks."""

from __future__ import annotations

import time

import httpx
import pytest

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("body,param", [
    ({"messages": USER, "temperature": "hot"}, "temperature"),
    ({"messages": USER, "top_p": 2}, "top_p"),
    ({"messages": USER, "n": 0}, "n"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": USER, "max_tokens": 100000}, "max_tokens"),
    ({"messages": USER, "logit_bias": {"abc": 1}}, None),
    ({"messages": USER, "top_logprobs": 2}, None),
])
def test_bad_chat_requests_are_400(server, body, param):
    r = httpx.post(server.url + CHAT, json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    if param:
        assert error["param"] == param


def test_invalid_json_and_context_message(server):
    r = httpx.post(server.url + CHAT, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "invalid JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + CHAT, json={"messages": USER, "max_tokens": 9000})
    assert "maximum context length is 8192 tokens" in r.json()["error"]["message"]


def test_completions_errors(server):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "suffix": "y"})
    assert r.status_code == 400 and "suffix" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/completions", json={"prompt": [[10**7]]})
    assert r.status_code == 400 and "out of range" in r.json()["error"]["message"]


def test_unknown_route_and_model(server):
    r = httpx.get(server.url + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.get(server.url + "/v1/models/not-a-model")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_disconnect_mid_stream_frees_the_pool(server):
    body = {"messages": USER, "max_tokens": 400, "ignore_eos": True, "stream": True}
    for _ in range(3):
        with httpx.stream("POST", server.url + CHAT, json=body, timeout=60) as r:
            lines = r.iter_lines()
            for _ in range(6):
                next(lines)
        # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.metric("num_requests_running") == 0 and server.metric("kv_cache_usage_perc") == 0:
            break
        time.sleep(0.2)
    assert server.metric("num_requests_running") == 0
    assert server.metric("kv_cache_usage_perc") == 0.0
    assert server.metric("generation_tokens") < 3 * 400  # aborted well before max_tokens


def test_api_keys():
    from tests.server.conftest import Server

    s = Server("--api-key", "k1", "--api-key", "k2", "--max-model-len", "512")
    try:
        assert httpx.get(s.url + "/health").status_code == 200
        r = httpx.get(s.url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        for key in ("k1", "k2"):
            assert httpx.get(s.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    finally:
        s.stop()
