"""POST /v1/chat/interactive: LMDeploy's stateful chat API, on top of prefix caching.

    {prompt, session_id, interactive_mode, ...}
      ─► SessionStore[session_id]: the conversation so far (messages) and its token count
      ─► history + this turn's message(s) ─► the model's chat template ─► token ids of the WHOLE conversation
      ─► engine stream: prefix caching finds the blocks of the earlier turns, so only the new tokens are computed
      ─► stream=false: one JSON object; stream=true: one JSON object per line (NDJSON, as LMDeploy; not SSE)
      ─► turn finished: interactive_mode → the history gains the turn and the reply; otherwise the session ends

LMDeploy pins each session's KV cache in the engine; we keep only the text and re-send the whole conversation.
Sessions then cost no KV memory while idle, the engine stays stateless, and a turn whose blocks were evicted is
recomputed (slower, still correct). `history_tokens` is the previous prompt + reply length, as LMDeploy's step
count; `input_tokens` is this request's whole prompt (history included, the tokens the model attends to).

Semantics, as LMDeploy's (differences noted):
- session_id -1: a one-off request; nothing is stored.
- a string prompt is one user message; a list of messages is appended to the history, except that a list that
  starts with the whole stored history replaces it (a client re-sending the conversation, OpenAI-style).
- interactive_mode false: answered from the history (if any) plus the prompt, then the session ends.
- prompt "" with request_output_len 0 and interactive_mode false: ends the session, generates nothing.
- cancel true: ends the session; a turn in flight on it stops at its next token (finish_reason "abort").
- one turn at a time per session: a second concurrent one is a 400 (it would interleave the history).
- a turn that fails or whose client disconnects leaves the history as it was.
- sampling defaults are LMDeploy's (temperature 0.8, top_p 0.8, top_k 40), not the model's generation config,
  so an LMDeploy client gets the same behaviour here.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tokenmill.errors import ClientError, InvalidRequestError
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.chat import render_prompt
from tokenmill.server.errors import error_body
from tokenmill.server.format import next_within, start_deadline
from tokenmill.server.protocol import ChatCompletionRequest, ChatMessage, random_id
from tokenmill.server.state import ServerState


class InteractiveRequest(BaseModel):
    """LMDeploy's `GenerateRequest`, with its defaults. Unknown fields (adapter_name, ...) are ignored."""

    model_config = ConfigDict(extra="ignore")
    prompt: list[ChatMessage] | str  # list first: a bad message then reports its own error, not "not a string"
    session_id: int = Field(-1, ge=-1)
    interactive_mode: bool = False
    stream: bool = False
    stop: str | list[str] | None = None
    request_output_len: int | None = Field(None, ge=0)
    top_p: float = Field(0.8, gt=0, le=1)
    top_k: int = Field(40, ge=0)
    temperature: float = Field(0.8, ge=0, le=2)
    repetition_penalty: float = Field(1.0, gt=0)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    min_new_tokens: int | None = Field(None, ge=0)
    min_p: float = Field(0.0, ge=0, le=1)
    seed: int | None = None
    cancel: bool = False
    image_url: str | list[str] | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.image_url:
            raise ValueError("image_url is not supported: this server runs text-only models")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be empty")
        if self.request_output_len == 0 and not self.ends_session and not self.cancel:
            raise ValueError("request_output_len must be >= 1 (0, with prompt \"\" and interactive_mode false, "
                             "ends the session)")
        if self.min_new_tokens and self.request_output_len and self.min_new_tokens > self.request_output_len:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) must be <= request_output_len "
                             f"({self.request_output_len})")
        return self

    @property
    def ends_session(self) -> bool:
        """LMDeploy's "end this session" request: nothing to say, nothing to generate, not interactive."""
        return self.prompt == "" and self.request_output_len == 0 and not self.interactive_mode

    def new_messages(self) -> list[dict]:
        if isinstance(self.prompt, str):
            return [{"role": "user", "content": self.prompt}]
        return [m.model_dump(exclude_none=True) for m in self.prompt]

    def to_sampling_params(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, max_tokens=self.request_output_len,
            min_tokens=self.min_new_tokens or 0, stop=self.stop, ignore_eos=self.ignore_eos, seed=self.seed,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens)


# ---------------------------------------------------------------------- sessions


@dataclass
class Session:
    messages: list[dict] = field(default_factory=list)
    """The conversation so far, OpenAI-style; rendered whole with the chat template every turn."""
    history_tokens: int = 0
    """Prompt + reply tokens of the last finished turn: what the next turn finds in the prefix cache."""
    last_used: float = 0.0
    busy: bool = False
    """A turn is in flight: a second one at once would interleave the history."""
    cancelled: bool = False
    """Set by `cancel: true`; the turn in flight stops at its next token."""


class SessionStore:
    """session_id -> Session, least recently used first. Sessions idle longer than `idle_timeout` seconds are
    dropped lazily (when touched, and from the old end whenever a session is opened); past `max_sessions` the
    least recently used idle one is dropped. Only the event loop touches it, so it needs no lock."""

    def __init__(self, idle_timeout: float = 1800.0, max_sessions: int = 4096,
                 clock: Callable[[], float] = time.monotonic):
        if idle_timeout <= 0 or max_sessions < 1:
            raise ValueError("idle_timeout must be > 0 and max_sessions >= 1")
        self.idle_timeout, self.max_sessions, self.clock = idle_timeout, max_sessions, clock
        self._sessions: OrderedDict[int, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def _expired(self, session: Session, now: float) -> bool:
        return not session.busy and now - session.last_used > self.idle_timeout

    def get(self, session_id: int) -> Session | None:
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = self.clock()
        if self._expired(session, now):
            del self._sessions[session_id]
            return None
        session.last_used = now
        self._sessions.move_to_end(session_id)
        return session

    def open(self, session_id: int) -> Session:
        """The session, created if needed, marked as just used."""
        session = self.get(session_id)
        if session is not None:
            return session
        now = self.clock()
        self._drop_expired(now)
        if len(self._sessions) >= self.max_sessions:
            # Busy sessions are skipped: they are bounded by the requests in flight, and dropping one would lose
            # the turn it is about to commit.
            oldest = next((k for k, s in self._sessions.items() if not s.busy), None)
            if oldest is not None:
                del self._sessions[oldest]
        session = self._sessions[session_id] = Session(last_used=now)
        return session

    def pop(self, session_id: int) -> Session | None:
        return self._sessions.pop(session_id, None)

    def discard(self, session_id: int, session: Session) -> None:
        """Drop `session` if it is still the one stored under its id (a cancel may have replaced it)."""
        if self._sessions.get(session_id) is session:
            del self._sessions[session_id]

    def _drop_expired(self, now: float) -> None:
        for session_id in list(self._sessions):  # oldest first: stop at the first one still alive
            session = self._sessions[session_id]
            if now - session.last_used <= self.idle_timeout:
                break
            if not session.busy:
                del self._sessions[session_id]


def conversation(history: list[dict], new: list[dict]) -> list[dict]:
    """History + the request's messages; a request that re-sends the whole history replaces it."""
    if history and len(new) >= len(history) and new[:len(history)] == history:
        return list(new)
    return history + new


# ---------------------------------------------------------------------- one turn


@dataclass
class _Turn:
    store: SessionStore
    req: InteractiveRequest
    session: Session | None
    messages: list[dict]
    prompt_ids: list[int]
    history_tokens: int
    ended: bool = False

    @property
    def cancelled(self) -> bool:
        return self.session is not None and self.session.cancelled

    def body(self, out: RequestOutput, text: str) -> dict:
        c = out.outputs[0]
        finish = c.finish_reason or ("abort" if self.cancelled else None)
        return {"text": text, "tokens": len(c.token_ids), "input_tokens": len(self.prompt_ids),
                "history_tokens": self.history_tokens, "finish_reason": finish}

    def end(self, out: RequestOutput | None) -> None:
        """Commit the turn (interactive and finished normally) or end the session, and free it for the next
        turn. Called before the last byte is sent, so a client that asks again at once sees the new history."""
        if self.ended or self.session is None:
            return
        self.ended = True
        session = self.session
        session.busy = False
        if not self.req.interactive_mode:
            self.store.discard(self.req.session_id, session)
        elif out is not None and out.finished and out.outputs[0].finish_reason in ("stop", "length") \
                and not session.cancelled:
            c = out.outputs[0]
            session.messages = self.messages + [{"role": "assistant", "content": c.text}]
            session.history_tokens = len(self.prompt_ids) + len(c.token_ids)
            session.last_used = self.store.clock()


_EMPTY = {"text": "", "tokens": 0, "input_tokens": 0, "history_tokens": 0, "finish_reason": "stop"}


async def create_interactive(state: ServerState, store: SessionStore, req: InteractiveRequest):
    if req.cancel:
        if req.session_id == -1:
            raise InvalidRequestError("please set a session_id to cancel a request", param="session_id")
        session = store.pop(req.session_id)
        if session is not None:
            session.cancelled = True
        return dict(_EMPTY)
    if req.ends_session:
        store.pop(req.session_id)
        return dict(_EMPTY)
    state.admit()
    one_off = req.session_id == -1
    session = None if one_off else store.get(req.session_id)
    if session is not None and session.busy:
        raise InvalidRequestError(f"session {req.session_id} already has a request in flight; wait for it, or "
                                  "send cancel: true", param="session_id")
    messages = conversation(session.messages if session else [], req.new_messages())
    prompt_ids = render_prompt(state, ChatCompletionRequest(messages=messages))
    params = req.to_sampling_params()
    if not one_off:  # claimed before the first await: a concurrent turn on this session sees it busy
        session = store.open(req.session_id)
        session.busy, session.cancelled = True, False
    turn = _Turn(store, req, session, messages, prompt_ids, session.history_tokens if session else 0)
    stream = state.engine.generate(prompt_ids, params, random_id(f"interactive-{req.session_id}"))
    out = None
    try:
        out = await anext(stream)  # engine-side validation errors (context too long, ...) are a plain 400
        if req.stream:
            lines, stream = _lines(state, turn, out, stream), None  # the lines now own the stream
            # Started here, so that even a response dropped unread gets it closed (asyncio finalizes started
            # async generators): its `finally` aborts the request and frees the session.
            head = await anext(lines)
            return StreamingResponse(_prepend(head, lines), media_type="application/x-ndjson")
        deadline = start_deadline(state)
        while not out.finished and not turn.cancelled:
            out = await next_within(state, stream, deadline)
        turn.end(out)
        return turn.body(out, out.outputs[0].text)
    finally:
        if stream is not None:
            await stream.aclose()  # aborts the request unless it finished
            turn.end(None)


async def _lines(state: ServerState, turn: _Turn, first: RequestOutput,
                 stream: AsyncIterator[RequestOutput]) -> AsyncIterator[str]:
    deadline = start_deadline(state)
    out = first
    try:
        while True:
            done = out.finished or turn.cancelled
            if done:
                turn.end(out)
            delta = out.outputs[0].delta_text
            if delta or done:
                yield json.dumps(turn.body(out, delta), ensure_ascii=False) + "\n"
            if done:
                break
            out = await next_within(state, stream, deadline)
    except Exception as e:  # after the first byte, an error can only travel in-band
        status = e.status_code if isinstance(e, ClientError) else 500
        yield json.dumps(error_body(str(e), status)) + "\n"
    finally:
        await stream.aclose()  # a disconnected client lands here too: the request is aborted
        turn.end(None)  # no-op after a commit; otherwise the history stays as it was


async def _prepend(head: str, lines: AsyncIterator[str]) -> AsyncIterator[str]:
    try:
        yield head
        async for line in lines:
            yield line
    finally:
        await lines.aclose()


def register(app: FastAPI, get_state: Callable[[], ServerState], store: SessionStore | None = None) -> SessionStore:
    """Add POST /v1/chat/interactive (and its unprefixed twin) to `app`; returns the session store it uses."""
    store = store if store is not None else SessionStore()

    async def chat_interactive(req: InteractiveRequest):
        return await create_interactive(get_state(), store, req)

    for prefix in ("/v1", ""):
        app.add_api_route(f"{prefix}/chat/interactive", chat_interactive, methods=["POST"],
                          include_in_schema=prefix == "/v1")
    return store
