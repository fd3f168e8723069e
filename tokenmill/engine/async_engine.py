"""The engine for asyncio servers: one background thread steps it, requests talk through queues.

    async generate(...)  ──add──►  inbox (thread-safe)  ──►  engine thread: drain inbox, step(), repeat
          ▲                                                        │
          └──────── per-request asyncio.Queue ◄── call_soon_threadsafe(RequestOutput) ┘

Only the engine thread touches the engine, so the engine needs no locks. A consumer that stops
listening (client disconnect, cancellation, timeout) aborts its request in the `finally` of `generate`:
the abort goes through the inbox and frees the request's blocks before the next step. torch releases the
GIL inside its kernels, so the event loop keeps serving while a step runs.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from tokenmill.engine.engine import LLMEngine
from tokenmill.errors import TokenmillError
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


def _resolve(future: asyncio.Future, result, error: BaseException | None) -> None:
    if not future.done():  # the caller may have gone away
        future.set_exception(error) if error is not None else future.set_result(result)


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.errored: BaseException | None = None
        self.on_finished: Callable[[RequestOutput], None] | None = None
        """Called on the engine thread with each finished output (the server's latency metrics)."""

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tokenmill-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float | None = None) -> None:
        self._stopping.set()
        self._inbox.put(None)  # wake the thread
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def num_requests(self) -> int:
        return len(self._streams)

    # ------------------------------------------------------------------ requests

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                       prompt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs until it finishes. Invalid requests raise before the first output."""
        if self._thread is None:
            self.start()
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[request_id] = stream
        self._inbox.put(("add", request_id, prompt_token_ids, params, prompt))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    async def embed(self, sequences: list[list[int]]) -> list[list[float]]:
        """Embeddings computed on the engine thread between steps."""
        if self._thread is None:
            self.start()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._inbox.put(("embed", loop, future, sequences))
        return await future

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    # ------------------------------------------------------------------ the engine thread

    def _run(self) -> None:
        engine = self.engine
        while not self._stopping.is_set():
            block = not engine.has_unfinished_requests()
            self._drain(block)
            if not engine.has_unfinished_requests():
                continue
            try:
                outputs = engine.step()
            except Exception as e:  # our bug: fail the requests in flight, keep serving new ones
                logger.exception("engine step failed; aborting %d requests", engine.num_unfinished_requests)
                self._fail_all(e)
                continue
            for out in outputs:
                self._deliver(out.request_id, out)
                if out.finished and self.on_finished is not None:
                    self.on_finished(out)

    def _drain(self, block: bool) -> None:
        """Apply every queued command; when idle, wait for the first one."""
        while True:
            try:
                cmd = self._inbox.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            block = False
            if cmd is None:
                return
            if cmd[0] == "add":
                _, request_id, ids, params, prompt = cmd
                try:
                    self.engine.add_request(request_id, ids, params, prompt=prompt)
                except (TokenmillError, ValueError) as e:
                    self._deliver(request_id, e)
            elif cmd[0] == "abort":
                out = self.engine.abort_request(cmd[1])
                if out is not None:  # a consumer still listening (abort not of its own making) gets the end
                    self._deliver(cmd[1], out)
            elif cmd[0] == "embed":
                _, loop, future, sequences = cmd
                try:
                    result = self.engine.embed(sequences)
                    loop.call_soon_threadsafe(_resolve, future, result, None)
                except Exception as e:  # client errors and our bugs both go back to the caller
                    loop.call_soon_threadsafe(_resolve, future, None, e)

    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _fail_all(self, error: Exception) -> None:
        for request_id in self.engine.unfinished_request_ids():
            self.engine.abort_request(request_id)
            self._deliver(request_id, RuntimeError(f"internal engine error: {error}"))
