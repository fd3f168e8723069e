"""Wire-format helpers shared by the routes: SSE events, usage, and the two OpenAI logprobs formats."""

from __future__ import annotations

import json

from tokenmill.errors import ClientError
from tokenmill.outputs import Logprob, RequestOutput
from tokenmill.server.errors import error_body


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
