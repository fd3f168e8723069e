"""Continuous batching with one token budget per step.

There are no prefill and decode phases. Each request has tokens it knows (prompt + generated) and tokens
whose KV is computed; every step, each scheduled request's computed count catches up to its known count
by as many tokens as the budget allows. One rule covers it all: a decode is a request 1 token behind,
a new prompt is a request len(prompt) behind (prefilled in chunks if the budget is short), a prefix-cache
hit starts a request partly caught up, and a preempted request starts again from zero.

    schedule():
      1. running requests, oldest first: 1 token each for decodes, a chunk for unfinished prefills.
         No blocks for one? Preempt the newest running request (free its blocks; it goes back to the
         front of the queue and is recomputed later) and retry.
      2. if nothing was preempted: admit waiting requests, FCFS, while the budget, `max_num_seqs` and the
         free blocks allow; each starts from its longest cached prefix.
    advance(output): computed counts move forward; newly full blocks enter the prefix cache.

Pure Python over integers (no torch); the engine owns sampling, stopping and outputs.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tokenmill.engine.kv_cache import KVCacheManager
from tokenmill.engine.request import Request, RequestStatus


@dataclass(slots=True)
class ScheduledChunk:
    request: Request
    num_tokens: int
    """Tokens of this request run in this step, starting at `start`."""
    start: int
    """The request's computed-token count when scheduled (= the chunk's first position)."""

    @property
    def samples(self) -> bool:
        """The chunk reaches the request's last known token, so a new token is sampled from it."""
        return self.start + self.num_tokens == self.request.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    """The step's batch, in order: the runner concatenates the chunks' tokens in this order."""
    num_batched_tokens: int = 0
    preempted: list[Request] = field(default_factory=list)
    """Requests pushed back to the waiting queue during this step."""

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    # ------------------------------------------------------------------ queue management

    def capacity_tokens(self) -> int:
        return self.kv.num_blocks * self.kv.block_size

    def add(self, request: Request) -> None:
        needed = len(request.prompt_token_ids) + request.max_tokens
        if needed > self.capacity_tokens():
            raise ValueError(f"request needs {needed} tokens of KV cache but the whole pool holds "
                             f"{self.capacity_tokens()}")
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def finish(self, request: Request) -> None:
        """Remove a request (finished or aborted) wherever it is, and free its blocks at once."""
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            self.waiting.remove(request)
        request.status = RequestStatus.FINISHED
        self.kv.free(request.request_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ one step

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate(req.request_id, req.num_computed_tokens + n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                out.chunks.append(ScheduledChunk(req, n, req.num_computed_tokens))
                budget -= n
                i += 1
                continue
            break  # the current request itself was preempted: everything after it is gone too

        if not out.preempted:
            budget = self._admit(out, budget)
        out.num_batched_tokens = self.max_num_batched_tokens - budget
        return out

    def _admit(self, out: SchedulerOutput, budget: int) -> int:
        skipped: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            if self._sibling_prefilling(req):
                # Let the sibling finish the shared prompt first, then hit its blocks in the prefix cache.
                skipped.append(self.waiting.popleft())
                continue
            tokens = req.all_token_ids
            cached = self.kv.find_cached_prefix(req.request_id, tokens)
            start = len(cached) * self.kv.block_size
            n = min(len(tokens) - start, budget)
            if not self.kv.allocate(req.request_id, start + n, cached):
                break
            self.kv.record_lookup(len(tokens), start)
            self.waiting.popleft()
            req.num_computed_tokens = start
            req.num_cached_prompt_tokens = min(start, len(req.prompt_token_ids))
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.chunks.append(ScheduledChunk(req, n, start))
            budget -= n
        self.waiting.extendleft(reversed(skipped))
        return budget

    def _sibling_prefilling(self, req: Request) -> bool:
        if req.group_id is None:
            return False
        # Only full blocks are shared, so a sibling past its prompt's last full block no longer matters.
        full = len(req.prompt_token_ids) // self.kv.block_size * self.kv.block_size
        return any(r.group_id == req.group_id and r.num_computed_tokens < full for r in self.running)

    def _preempt(self, req: Request) -> None:
        self.kv.free(req.request_id)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def advance(self, out: SchedulerOutput) -> None:
        """After the step ran: computed counts move forward and full blocks enter the prefix cache.

        Call before appending the sampled tokens (the hash chain reads the tokens that were computed).
        """
        bs = self.kv.block_size
        for chunk in out.chunks:
            req = chunk.request
            req.num_computed_tokens = chunk.start + chunk.num_tokens
            if req.num_computed_tokens // bs > chunk.start // bs:  # a block became full
                self.kv.cache_computed(req.request_id, req.all_token_ids, req.num_computed_tokens)
