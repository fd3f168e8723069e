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
    from tests.server.harness import Server

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


def test_embedding_errors(server):
    r = httpx.post(server.url + "/v1/embeddings", json={"input": "x", "dimensions": 64})
    assert r.status_code == 400 and r.json()["error"]["param"] == "dimensions"
    r = httpx.post(server.url + "/v1/embeddings", json={"input": []})
    assert r.status_code == 400


def test_queue_full_is_429_and_body_limit_413(tiny_model_dirs):
    """With one running slot and no queue, a second request gets 429; the accepted one still completes."""
    import threading

    from tests.server.harness import Server

    s = Server(str(tiny_model_dirs["llama"]), "--max-num-seqs", "1", "--max-queue-len", "0",
               "--max-body-bytes", "20000", "--max-model-len", "1024")
    try:
        first = {}

        def run_long():
            body = {"prompt": "a b c", "max_tokens": 1000, "ignore_eos": True}
            first["r"] = httpx.post(s.url + "/v1/completions", json=body, timeout=120)

        t = threading.Thread(target=run_long)
        t.start()
        deadline = time.monotonic() + 10
        while s.metric("num_requests_running") < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        busy = httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
        t.join()
        assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["type"] == "rate_limit_error"
        assert first["r"].status_code == 200 and first["r"].json()["usage"]["completion_tokens"] == 1000
        big = httpx.post(s.url + "/v1/completions", json={"prompt": "x" * 30000}, timeout=30)
        assert big.status_code == 413 and big.json()["error"]["message"].startswith("request body")
        assert s.metric("time_to_first_token_seconds_count") >= 1
    finally:
        s.stop()


def test_request_timeout_is_504_or_in_band_error(tiny_model_dirs):
    from tests.server.harness import Server

    s = Server(str(tiny_model_dirs["llama"]), "--request-timeout", "0.3", "--max-model-len", "4096")
    try:
        body = {"prompt": "a b c", "max_tokens": 4000, "ignore_eos": True}
        r = httpx.post(s.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
        with httpx.stream("POST", s.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            lines = [line for line in r.iter_lines() if line]
        assert '"type": "timeout"' in lines[-2] and lines[-1] == "data: [DONE]"
        time.sleep(0.5)
        assert s.metric("num_requests_running") == 0 and s.metric("kv_cache_usage_perc") == 0
    finally:
        s.stop()


def test_non_streaming_disconnect_aborts(server):
    """A client that gives up on a non-streaming request frees its blocks without waiting for the end."""
    before = server.metric("generation_tokens")
    body = {"messages": USER, "max_tokens": 2000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + CHAT, json=body, timeout=1.5)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and server.metric("num_requests_running") > 0:
        time.sleep(0.2)
    assert server.metric("num_requests_running") == 0 and server.metric("kv_cache_usage_perc") == 0.0
    assert server.metric("generation_tokens") - before < 1000  # stopped long before its 2,000 tokens
