"""POST /v1/completions: one engine request per prompt (text or token ids), choices numbered
prompt_index * n + sample_index as OpenAI does; streams of several prompts are merged as they arrive."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from tokenmill.errors import InvalidRequestError
from tokenmill.outputs import RequestOutput
from tokenmill.server.chat import run_beam_search
from tokenmill.server.format import completion_logprobs, error_event, next_within, sse, start_deadline, until_finished
from tokenmill.server.protocol import CompletionRequest, CompletionResponse, random_id
from tokenmill.server.state import ServerState


async def create_completion(state: ServerState, req: CompletionRequest, request=None):
    model = state.check_model(req.model)
    state.admit()
    params = req.to_sampling_params(state.defaults)
    request_id = random_id("cmpl")
    prompts = []
    vocab = state.engine.engine.model_config.vocab_size
    for p in req.prompts():
        ids = state.tokenizer.encode(p) if isinstance(p, str) else list(p)
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:  # checked before decoding: the tokenizer raises on such ids
            raise InvalidRequestError(f"prompt token id {bad} is out of range [0, {vocab})", param="prompt")
        text = p if isinstance(p, str) else state.tokenizer.decode(ids, skip_special_tokens=False)
        prompts.append((text, ids))
    if params.use_beam_search:
        if req.stream:
            raise InvalidRequestError("beam search results cannot be streamed", param="stream")
        finals = [await run_beam_search(state, request_id, ids, params) for _, ids in prompts]
        return _response(state, req, model, request_id, prompts, finals)
    streams = [state.engine.generate(ids, params, f"{request_id}-{i}") for i, (_, ids) in enumerate(prompts)]
    firsts = []
    try:
        for s in streams:  # every prompt is validated by the engine before any byte is sent
            firsts.append(await anext(s))
    except BaseException:
        for s in streams:
            await s.aclose()
        raise
    if req.stream:
        return StreamingResponse(_events(state, req, model, request_id, prompts, firsts, streams),
                                 media_type="text/event-stream")
    try:
        finals = [await until_finished(state, first, s, request) for first, s in zip(firsts, streams, strict=True)]
    finally:
        for s in streams:  # a disconnect while draining one prompt must abort the others too
            await s.aclose()
    return _response(state, req, model, request_id, prompts, finals)


def _response(state, req, model, request_id, prompts, finals: list[RequestOutput]) -> CompletionResponse:
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for i, ((text, _), out) in enumerate(zip(prompts, finals, strict=True)):
        prompt_tokens += len(out.prompt_token_ids)
        for c in out.outputs:
            completion_tokens += len(c.token_ids)
            prefix = text if req.echo else ""
            logprobs = None
            if req.logprobs is not None:
                logprobs = completion_logprobs(c.token_ids, c.logprobs, req.logprobs, offset=len(prefix))
            choices.append({"index": i * req.n + c.index, "text": prefix + c.text, "logprobs": logprobs,
                            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
    return CompletionResponse(id=request_id, model=model, system_fingerprint=state.fingerprint, choices=choices,
                              usage={"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                     "total_tokens": prompt_tokens + completion_tokens})


async def _events(state, req, model, request_id, prompts, firsts, streams) -> AsyncIterator[str]:
    created = int(time.time())
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    queue: asyncio.Queue = asyncio.Queue()

    deadline = start_deadline(state)

    async def pump(i, first, stream):
        try:
            out = first
            await queue.put((i, out))
            while not out.finished:
                out = await next_within(state, stream, deadline)
                await queue.put((i, out))
        except Exception as e:
            await queue.put((i, e))
        finally:
            await stream.aclose()

    tasks = [asyncio.create_task(pump(i, f, s)) for i, (f, s) in enumerate(zip(firsts, streams, strict=True))]
    done, finished, totals = 0, set(), {}
    try:
        while done < len(tasks):
            i, out = await queue.get()
            if isinstance(out, Exception):
                yield error_event(out)
                break
            for c in out.outputs:
                index = i * req.n + c.index
                text = c.delta_text
                if req.echo and index not in totals:
                    text = prompts[i][0] + text
                totals[index] = len(c.token_ids)
                if text or c.delta_token_ids or (c.finish_reason and index not in finished):
                    logprobs = None
                    if req.logprobs is not None and c.delta_token_ids and c.logprobs:
                        n = len(c.delta_token_ids)
                        logprobs = completion_logprobs(c.token_ids[-n:], c.logprobs[-n:], req.logprobs)
                    reason = c.finish_reason if index not in finished else None
                    if reason:
                        finished.add(index)
                    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason,
                              "stop_reason": c.stop_reason if reason else None}
                    yield sse({"id": request_id, "object": "text_completion", "created": created, "model": model,
                               "system_fingerprint": state.fingerprint, "choices": [choice]})
            if out.finished:
                done += 1
        if include_usage:
            prompt_tokens = sum(len(ids) for _, ids in prompts)
            completion_tokens = sum(totals.values())
            yield sse({"id": request_id, "object": "text_completion", "created": created, "model": model,
                       "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                                "total_tokens": prompt_tokens + completion_tokens}})
    finally:
        for t in tasks:  # a disconnected client: stop the pumps, which close (abort) their streams
            t.cancel()
    yield "data: [DONE]\n\n"
