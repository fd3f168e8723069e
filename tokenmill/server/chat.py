"""POST /v1/chat/completions.

    messages ─► the model's chat template ─► token ids ─► engine stream
      stream=false: wait for the final output ─► one chat.completion
      stream=true:  SSE chunks: the role first, content deltas, a finish chunk per choice,
                    usage (when asked), `data: [DONE]`

The engine's first output is awaited before any byte is sent, so a request the engine rejects (context
too long, ...) is a plain 400, never a broken stream. A client that disconnects closes the stream, which
aborts the request and frees its blocks.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from tokenmill.engine.beam_search import beam_search_async, to_request_output
from tokenmill.errors import InvalidRequestError
from tokenmill.outputs import RequestOutput
from tokenmill.server.format import (
    chat_logprobs,
    error_event,
    next_within,
    sse,
    start_deadline,
    until_finished,
    usage,
)
from tokenmill.server.protocol import ChatCompletionRequest, ChatCompletionResponse, random_id
from tokenmill.server.state import ServerState


def render_prompt(state: ServerState, req: ChatCompletionRequest) -> list[int]:
    if state.chat_template is None:
        raise InvalidRequestError("this model has no chat template: use /v1/completions, or start the server "
                                  "with --chat-template")
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    for m in messages:  # OpenAI's newer name for the system role; templates know "system"
        if m["role"] == "developer":
            m["role"] = "system"
    tok = state.tokenizer
    text = state.chat_template.render(
        messages, add_generation_prompt=req.add_generation_prompt, continue_final_message=req.continue_final_message,
        tools=req.tools, bos_token=tok.bos_token or "", eos_token=tok.eos_token or "",
        template_kwargs=req.chat_template_kwargs)
    return tok.encode(text, add_special_tokens=False)


async def run_beam_search(state: ServerState, request_id: str, prompt_ids: list[int], params) -> RequestOutput:
    beams = await beam_search_async(state.engine, prompt_ids, params)
    return to_request_output(state.engine.engine, request_id, None, prompt_ids, beams, params)


async def create_chat_completion(state: ServerState, req: ChatCompletionRequest, request=None):
    model = state.check_model(req.model)
    state.admit()
    prompt_ids = render_prompt(state, req)
    params = req.to_sampling_params(state.defaults)
    request_id = random_id("chatcmpl")
    if params.use_beam_search:
        if req.stream:
            raise InvalidRequestError("beam search results cannot be streamed", param="stream")
        out = await run_beam_search(state, request_id, prompt_ids, params)
        return _response(state, req, model, request_id, out)
    stream = state.engine.generate(prompt_ids, params, request_id)
    try:
        first = await anext(stream)  # engine-side validation errors surface here, before any byte is sent
    except BaseException:
        await stream.aclose()
        raise
    if req.stream:
        return StreamingResponse(_events(state, req, model, request_id, first, stream),
                                 media_type="text/event-stream")
    final = await until_finished(state, first, stream, request)
    return _response(state, req, model, request_id, final)


def _response(state, req, model, request_id, out: RequestOutput) -> ChatCompletionResponse:
    choices = []
    for c in out.outputs:
        message = {"role": "assistant", "content": c.text}
        logprobs = chat_logprobs(c.token_ids, c.logprobs, req.top_logprobs or 0) if req.logprobs else None
        choices.append({"index": c.index, "message": message, "logprobs": logprobs,
                        "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
    return ChatCompletionResponse(id=request_id, model=model, system_fingerprint=state.fingerprint,
                                  choices=choices, usage=usage(out))


async def _events(state, req, model, request_id, first: RequestOutput,
                  stream: AsyncIterator[RequestOutput]) -> AsyncIterator[str]:
    created = int(time.time())
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    continuous = include_usage and req.stream_options.continuous_usage_stats

    def chunk(choices, out=None) -> str:
        body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": state.fingerprint, "choices": choices}
        if continuous and out is not None:
            body["usage"] = usage(out)
        return sse(body)

    last, finished = first, set()
    deadline = start_deadline(state)
    try:
        yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for c in first.outputs])
        out = first
        while True:
            for c in out.outputs:
                if c.delta_text or (req.logprobs and c.delta_token_ids):
                    lp = None
                    if req.logprobs and c.logprobs is not None and c.delta_token_ids:
                        n = len(c.delta_token_ids)
                        lp = chat_logprobs(c.token_ids[-n:], c.logprobs[-n:], req.top_logprobs or 0)
                    yield chunk([{"index": c.index, "delta": {"content": c.delta_text}, "logprobs": lp,
                                  "finish_reason": None}], out)
                if c.finish_reason is not None and c.index not in finished:
                    finished.add(c.index)
                    yield chunk([{"index": c.index, "delta": {}, "logprobs": None, "finish_reason": c.finish_reason,
                                  "stop_reason": c.stop_reason}], out)
            last = out
            if out.finished:
                break
            out = await next_within(state, stream, deadline)
        if include_usage:
            yield sse({"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                       "system_fingerprint": state.fingerprint, "choices": [], "usage": usage(last)})
    except Exception as e:  # after the first byte, an error can only travel in-band
        yield error_event(e)
    finally:
        await stream.aclose()  # a disconnected client lands here too: the request is aborted
    yield "data: [DONE]\n\n"
