"""A small client for OpenAI-compatible servers (tokenmill, LMDeploy, vLLM, ...), standard library only.

Modelled on LMDeploy's `lmdeploy.serve.openai.api_client.APIClient`:

    client = APIClient("http://127.0.0.1:8000")          # with or without a trailing /v1
    client.available_models                              # GET /v1/models -> ["SmolLM2-135M-Instruct"]
    for reply in client.chat_completions_v1(model, messages, stream=True, max_tokens=32):
        ...                                              # one dict per SSE `data:` chunk

Every method is a generator of response dicts: one dict for a plain request, one per chunk for a stream.

    POST json ─► stream=false: the whole body ─► one dict
               ─► stream=true:  SSE lines `data: {...}` until `data: [DONE]` (chat, completions)
                                or one JSON object per line (LMDeploy's /v1/chat/interactive)

An HTTP error raises `APIError` carrying the server's OpenAI error `message`; a server that cannot be reached
raises `APIConnectionError`. Closing a stream's generator early closes the connection, which makes the
server abort the request.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any


class APIError(Exception):
    """The server answered with an error (HTTP status >= 400, or an error event inside a stream)."""

    def __init__(self, message: str, status_code: int | None = None, body: dict | None = None):
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.body = body


class APIConnectionError(APIError):
    """The server could not be reached (refused, unknown host, timed out)."""


def _error_message(status: int, raw: bytes) -> tuple[str, dict | None]:
    """The OpenAI `error.message` of an error body; the raw text when the body is not OpenAI-shaped."""
    try:
        body = json.loads(raw)
    except ValueError:
        return (raw.decode("utf-8", "replace").strip() or f"HTTP {status}"), None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"]), body
        if isinstance(err, str):
            return err, body
        if "detail" in body:  # FastAPI's default error shape, from servers without OpenAI error handlers
            return str(body["detail"]), body
    return raw.decode("utf-8", "replace"), None


def _raise_if_error(obj: Any) -> None:
    # After the first byte a server can only report a failure in-band, as a chunk holding `error`.
    if isinstance(obj, dict) and isinstance(obj.get("error"), dict) and "choices" not in obj:
        err = obj["error"]
        code = err.get("code")
        raise APIError(str(err.get("message", err)), code if isinstance(code, int) else None, obj)


class APIClient:
    """Talks to `api_server_url` (e.g. "http://127.0.0.1:8000" or ".../v1"); sends `Bearer api_key` if set."""

    def __init__(self, api_server_url: str, api_key: str | None = None, timeout: float = 600.0):
        base = api_server_url.rstrip("/")
        # Both spellings are common in OpenAI SDK configs; the routes below add /v1 themselves.
        self.api_server_url = base.removesuffix("/v1")
        self.api_key = api_key
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if api_key is not None:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.chat_completions_v1_url = f"{self.api_server_url}/v1/chat/completions"
        self.completions_v1_url = f"{self.api_server_url}/v1/completions"
        self.chat_interactive_v1_url = f"{self.api_server_url}/v1/chat/interactive"
        self.models_v1_url = f"{self.api_server_url}/v1/models"

    @property
    def available_models(self) -> list[str]:
        """The model ids the server serves, in its order (the first is its default)."""
        with self._open("GET", self.models_v1_url) as resp:
            body = json.loads(resp.read())
        return [m["id"] for m in body.get("data", [])]

    def chat_completions_v1(self, model: str, messages: list[dict] | str, stream: bool = False,
                            **params: Any) -> Iterator[dict]:
        """POST /v1/chat/completions; `params` go into the body as is (temperature, max_tokens, stop, ...)."""
        if isinstance(messages, str):  # LMDeploy accepts a bare string as one user turn
            messages = [{"role": "user", "content": messages}]
        payload = {"model": model, "messages": messages, "stream": stream, **params}
        yield from self._post(self.chat_completions_v1_url, payload, stream, sse=True)

    def completions_v1(self, model: str, prompt: str | list, stream: bool = False, **params: Any) -> Iterator[dict]:
        """POST /v1/completions; `params` go into the body as is."""
        payload = {"model": model, "prompt": prompt, "stream": stream, **params}
        yield from self._post(self.completions_v1_url, payload, stream, sse=True)

    def chat_interactive_v1(self, prompt: str | list[dict], session_id: int = -1, interactive_mode: bool = False,
                            stream: bool = False, request_output_len: int | None = None,
                            **params: Any) -> Iterator[dict]:
        """POST /v1/chat/interactive (LMDeploy's stateful chat); a stream is newline-delimited JSON, not SSE."""
        payload = {"prompt": prompt, "session_id": session_id, "interactive_mode": interactive_mode,
                   "stream": stream, **params}
        if request_output_len is not None:
            payload["request_output_len"] = request_output_len
        yield from self._post(self.chat_interactive_v1_url, payload, stream, sse=False)

    def _open(self, method: str, url: str, payload: dict | None = None):
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(url, data=data, headers=self.headers, method=method)
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            with e:
                message, body = _error_message(e.code, e.read())
            raise APIError(message, e.code, body) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise APIConnectionError(f"cannot connect to {url}: {reason}") from None

    def _post(self, url: str, payload: dict, stream: bool, sse: bool) -> Iterator[dict]:
        # `with` closes the connection when the caller stops iterating early (generator close).
        with self._open("POST", url, payload) as resp:
            if not stream:
                body = json.loads(resp.read())
                _raise_if_error(body)
                yield body
                return
            # HTTPResponse.readline decodes chunked transfer encoding and returns each line as it arrives.
            for raw in resp:
                line = raw.decode("utf-8").strip()
                if not line:
                    continue
                if sse:
                    if not line.startswith("data:"):
                        continue  # SSE comments (": ping"), `event:` and `id:` fields carry no payload
                    line = line[5:].strip()
                    if line == "[DONE]":
                        return
                obj = json.loads(line)
                _raise_if_error(obj)
                yield obj
