"""`tokenmill.client.APIClient` against the real server, plus a stdlib fake server for headers and error shapes."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tokenmill.client import APIClient, APIConnectionError, APIError

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server):  # noqa: F811 - pytest injects the imported fixture by name
    return APIClient(server.url)


def test_available_models_with_or_without_v1(server, client):  # noqa: F811
    models = client.available_models
    assert models and models[0] == "SmolLM2-135M-Instruct"
    assert APIClient(server.url + "/v1/").available_models == models


def test_chat_stream_rebuilds_the_non_streamed_reply(client):
    model = client.available_models[0]
    [reply] = client.chat_completions_v1(model, MESSAGES, temperature=0, max_tokens=16)
    text = reply["choices"][0]["message"]["content"]
    assert "Paris" in text and reply["object"] == "chat.completion"
    chunks = list(client.chat_completions_v1(model, MESSAGES, stream=True, temperature=0, max_tokens=16))
    assert len(chunks) > 2 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == text
    assert chunks[-1]["choices"][0]["finish_reason"] == reply["choices"][0]["finish_reason"]


def test_completions_stream(client):
    model = client.available_models[0]
    [full] = client.completions_v1(model, "The capital of France is", temperature=0, max_tokens=8)
    chunks = list(client.completions_v1(model, "The capital of France is", stream=True, temperature=0, max_tokens=8))
    assert len(chunks) > 1
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == full["choices"][0]["text"]


def test_bad_request_raises_the_servers_message(client):
    with pytest.raises(APIError) as info:
        next(client.chat_completions_v1("m", MESSAGES, top_p=5))
    assert info.value.status_code == 400
    assert str(info.value).startswith("top_p:") and "less than or equal to 1" in str(info.value)
    with pytest.raises(APIError, match="top_p"):  # a stream fails the same way: before its first chunk
        next(client.completions_v1("m", "hi", stream=True, top_p=5))


def test_closing_a_stream_early_is_clean(client):
    stream = client.chat_completions_v1("m", MESSAGES, stream=True, max_tokens=64)
    first = next(stream)
    stream.close()  # drops the connection; the server aborts the request
    assert first["choices"][0]["delta"]["role"] == "assistant"
    [again] = client.chat_completions_v1("m", MESSAGES, temperature=0, max_tokens=4)
    assert again["choices"][0]["message"]["content"]


def test_chat_interactive(server, client):  # noqa: F811
    paths = httpx.get(server.url + "/openapi.json", timeout=10).json()["paths"]
    if "/v1/chat/interactive" not in paths:
        pytest.skip("the server has no /v1/chat/interactive route yet")
    [full] = client.chat_interactive_v1("What is the capital of France?", temperature=0, request_output_len=8)
    assert full["text"]
    chunks = list(client.chat_interactive_v1("What is the capital of France?", stream=True, temperature=0,
                                             request_output_len=8))
    assert len(chunks) > 1 and "".join(c.get("text", "") for c in chunks) == full["text"]


class _FakeHandler(BaseHTTPRequestHandler):
    """Records each request's path and Authorization header; /v1/models needs the key, the rest say 401."""

    seen: list[tuple[str, str | None]] = []

    def do_GET(self):  # noqa: N802 - the http.server hook name
        self.seen.append((self.path, self.headers.get("Authorization")))
        if self.path == "/v1/models" and self.headers.get("Authorization") == "Bearer sk-test":
            self._send(200, {"object": "list", "data": [{"id": "fake-a"}, {"id": "fake-b"}]})
        else:
            self._send(401, {"error": {"message": "invalid API key", "type": "authentication_error"}})

    def do_POST(self):  # noqa: N802
        # Streams without Content-Length end when the connection closes, as HTTP/1.0 allows.
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.end_headers()
        if self.path == "/v1/chat/interactive":  # LMDeploy's format: one JSON object per line, no SSE framing
            for word in ("Par", "is", ""):
                self.wfile.write(json.dumps({"text": word, "finish_reason": None if word else "stop",
                                             "echo": body}).encode() + b"\n")
        else:  # one content chunk, then the in-band error event a server sends once streaming has begun
            self.wfile.write(b'data: {"choices": [{"index": 0, "delta": {"content": "Hi"}}]}\n\n')
            self.wfile.write(b'data: {"error": {"message": "engine died", "code": 500}}\n\ndata: [DONE]\n\n')

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # keep pytest's output clean
        pass


@pytest.fixture
def fake_url():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    _FakeHandler.seen.clear()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_api_key_header_and_openai_error_body(fake_url):
    assert APIClient(fake_url + "/v1", api_key="sk-test").available_models == ["fake-a", "fake-b"]
    assert _FakeHandler.seen[-1] == ("/v1/models", "Bearer sk-test")
    with pytest.raises(APIError, match="^invalid API key$") as info:
        _ = APIClient(fake_url).available_models
    assert info.value.status_code == 401 and _FakeHandler.seen[-1] == ("/v1/models", None)


def test_interactive_ndjson_stream_and_in_band_errors(fake_url):
    client = APIClient(fake_url)
    chunks = list(client.chat_interactive_v1("hi", session_id=3, stream=True, request_output_len=5, top_k=1))
    assert "".join(c["text"] for c in chunks) == "Paris" and chunks[-1]["finish_reason"] == "stop"
    assert chunks[0]["echo"] == {"prompt": "hi", "session_id": 3, "interactive_mode": False, "stream": True,
                                 "request_output_len": 5, "top_k": 1}
    stream = client.chat_completions_v1("m", "hi", stream=True)
    assert next(stream)["choices"][0]["delta"]["content"] == "Hi"
    with pytest.raises(APIError, match="^engine died$") as info:
        next(stream)
    assert info.value.status_code == 500


def test_unreachable_server_raises_connection_error():
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(APIConnectionError, match=f"cannot connect to http://127.0.0.1:{port}/v1/models"):
        _ = APIClient(f"http://127.0.0.1:{port}").available_models
