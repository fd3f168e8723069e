"""Wire-format helpers shared by the routes: SSE events, usage, and the two OpenAI logprobs formats."""

from __future__ import annotations

import asyncio
import json
import time

from tokenmill.errors import ClientError
from tokenmill.outputs import Logprob, RequestOutput
from tokenmill.server.errors import error_body


class RequestTimeoutError(ClientError):
    status_code = 504
    error_type = "timeout"


def start_deadline(state) -> float | None:
    timeout = state.limits.request_timeout
    return None if timeout is None else time.monotonic() + timeout


async def next_within(state, stream, deadline: float | None):
    """The stream's next output, or RequestTimeoutError once the request's time is up (the caller's
    `finally` closes the stream, which aborts the request)."""
    if deadline is None:
        return await anext(stream)
    try:
        return await asyncio.wait_for(anext(stream), max(deadline - time.monotonic(), 0.0))
    except TimeoutError:
        raise RequestTimeoutError(f"the request ran longer than the server's {state.limits.request_timeout:g} s "
                                  "timeout and was stopped") from None


async def until_finished(state, first, stream, request=None):
    """Drain a non-streaming request to its final output, within the timeout; aborts it on any exit,
    including the client going away (`request`: the HTTP request, watched for a disconnect)."""
    deadline = start_deadline(state)
    out = first
    watcher = None
    if request is not None:
        watcher = asyncio.create_task(_cancel_on_disconnect(request, asyncio.current_task()))
    try:
        while not out.finished:
            out = await next_within(state, stream, deadline)
        return out
    finally:
        if watcher is not None:
            watcher.cancel()
        await stream.aclose()


async def _cancel_on_disconnect(request, task: asyncio.Task) -> None:
    """Cancel the handler when its client disconnects: its `finally` then aborts the engine request."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)
    task.cancel()


def sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def error_event(exc: Exception) -> str:
    status = exc.status_code if isinstance(exc, ClientError) else 500
    return sse(error_body(str(exc), status))


def usage(out: RequestOutput) -> dict:
    prompt = len(out.prompt_token_ids)
    completion = sum(len(c.token_ids) for c in out.outputs)
    body = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if out.metrics is not None:
        body["prompt_tokens_details"] = {"cached_tokens": out.metrics.num_cached_tokens}
    return body


def _ranked(entry: dict[int, Logprob], top: int) -> list[tuple[int, Logprob]]:
    return sorted(entry.items(), key=lambda kv: kv[1].rank)[:top]


def chat_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]] | None, top: int) -> dict | None:
    """Chat format: {"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}."""
    if entries is None:
        return None
    content = []
    for token, entry in zip(token_ids, entries, strict=False):
        chosen = entry[token]
        text = chosen.decoded_token or ""
        content.append({"token": text, "logprob": chosen.logprob, "bytes": list(text.encode("utf-8")),
                        "top_logprobs": [_top(lp) for _, lp in _ranked(entry, top)]})
    return {"content": content}


def _top(lp: Logprob) -> dict:
    text = lp.decoded_token or ""
    return {"token": text, "logprob": lp.logprob, "bytes": list(text.encode("utf-8"))}


def completion_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]] | None, top: int,
                        offset: int = 0) -> dict | None:
    """Legacy completions format: parallel lists of tokens, their logprobs, top alternatives and text offsets."""
    if entries is None:
        return None
    tokens, logprobs, tops, offsets = [], [], [], []
    for token, entry in zip(token_ids, entries, strict=False):
        chosen = entry[token]
        text = chosen.decoded_token or ""
        tokens.append(text)
        logprobs.append(chosen.logprob)
        tops.append({lp.decoded_token or "": lp.logprob for _, lp in _ranked(entry, top)} if top else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}
