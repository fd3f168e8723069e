"""Beam search on top of the engine, with Hugging Face transformers' semantics.

Each step, every live beam is submitted to the engine as a one-token request asking for the top-K
log-probabilities (K = max(2, 1 + number of eos ids) x width); prefix caching makes the beams' shared
history free, so only each beam's last partial block is recomputed. Then, as transformers does:

    candidates  = the K best (beam score + logprob) over all beams' top-K tokens
    running     = the `width` best candidates that did not end (eos, or the length limit)
    finished   += candidates among the first `width` that ended, scored sum_logprob / gen_len ** length_penalty,
                  keeping the `width` best; blocked once full with early_stopping=True, or once the
                  early-stop heuristic says no running beam can beat the worst finished one
    stop when   that heuristic fires, or finished is full with early_stopping=True, or every candidate ended

`BeamSearch` holds that state and advances one step per `advance(tops)`; `beam_search` (offline engine)
and `beam_search_async` (the server's async engine, alongside other traffic) only differ in how they
obtain each step's top-K. The `n` best finished beams are returned (token ids include the ending eos).
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass

from tokenmill.outputs import CompletionOutput, RequestOutput
from tokenmill.sampling_params import SamplingParams

_ids = itertools.count()


@dataclass(slots=True)
class Beam:
    token_ids: list[int]
    logprob: float
    """Sum of the raw log-probabilities of the generated tokens."""
    score: float = 0.0
    """Length-normalized score (finished beams)."""


class BeamSearch:
    def __init__(self, params: SamplingParams, eos_ids: set[int], max_tokens: int):
        self.width = params.num_beams or params.best_of or params.n
        self.n = params.n
        self.max_tokens = max_tokens
        self.eos = set() if params.ignore_eos else set(eos_ids) | set(params.stop_token_ids or [])
        self.k = max(2, 1 + len(self.eos)) * self.width
        self.penalty, self.early = params.length_penalty, params.early_stopping
        self.running = [Beam([], 0.0)]
        self.finished: list[Beam] = []
        self.improvable = True
        self.step = 0
        self.done = max_tokens <= 0

    def advance(self, tops: list[list[tuple[int, float]]]) -> None:
        """One step, given each running beam's top-k (token, logprob) for its next token."""
        width, step = self.width, self.step
        candidates = sorted(((beam.logprob + lp, b, tok) for b, beam in enumerate(self.running) for tok, lp in tops[b]),
                            key=lambda c: -c[0])[:self.k]
        ends = [tok in self.eos or step + 1 == self.max_tokens for _, _, tok in candidates]
        full = len(self.finished) == width and self.early is True
        if self.improvable and not full:
            for (total, b, tok), ended in zip(candidates[:width], ends[:width], strict=True):
                if ended:
                    self.finished.append(Beam(self.running[b].token_ids + [tok], total,
                                              total / (step + 1) ** self.penalty))
            self.finished = sorted(self.finished, key=lambda f: -f.score)[:width]
        self.running = [Beam(self.running[b].token_ids + [tok], total)
                        for (total, b, tok), ended in zip(candidates, ends, strict=True) if not ended][:width]
        self.step += 1
        if not self.running or all(ends):
            self.done = True
            return
        best_len = self.max_tokens if self.early == "never" and self.penalty > 0 else step + 1
        if len(self.finished) == width and self.running[0].logprob / best_len ** self.penalty <= min(
                f.score for f in self.finished):
            self.improvable = False  # sticky, as in transformers
        self.done = not self.improvable or (len(self.finished) == width and self.early is True)

    def best(self) -> list[Beam]:
        return sorted(self.finished, key=lambda f: -f.score)[:self.n]


def _new_search(engine, prompt_ids: list[int], params: SamplingParams) -> BeamSearch:
    """Validates the length up front: each step's one-token requests could not see the whole budget."""
    return BeamSearch(params, set(engine.eos_token_ids), engine.resolve_max_tokens(len(prompt_ids), params.max_tokens))


def _step_params(k: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=1, logprobs=k, ignore_eos=True)


def _top(entry, k: int) -> list[tuple[int, float]]:
    return [(tok, lp.logprob) for tok, lp in sorted(entry.items(), key=lambda kv: kv[1].rank)[:k]]


def beam_search(engine, prompt_ids: list[int], params: SamplingParams) -> list[Beam]:
    """Beam search through a synchronous LLMEngine (offline use: the engine runs nothing else meanwhile)."""
    search = _new_search(engine, prompt_ids, params)
    while not search.done:
        ids = [f"beam{next(_ids)}" for _ in search.running]
        for request_id, beam in zip(ids, search.running, strict=True):
            engine.add_request(request_id, prompt_ids + beam.token_ids, _step_params(search.k))
        results = {}
        while len(results) < len(ids):
            for out in engine.step():
                if out.finished:
                    results[out.request_id] = out.outputs[0].logprobs[0]
        search.advance([_top(results[i], search.k) for i in ids])
    return search.best()


async def beam_search_async(async_engine, prompt_ids: list[int], params: SamplingParams) -> list[Beam]:
    """Beam search through the AsyncLLMEngine: each step's beams run as concurrent requests."""
    engine = async_engine.engine
    search = _new_search(engine, prompt_ids, params)

    async def expand(tokens: list[int]) -> list[tuple[int, float]]:
        final = None
        async for out in async_engine.generate(prompt_ids + tokens, _step_params(search.k), f"beam{next(_ids)}"):
            final = out
        return _top(final.outputs[0].logprobs[0], search.k)

    while not search.done:
        search.advance(await asyncio.gather(*(expand(b.token_ids) for b in search.running)))
    return search.best()


def to_request_output(engine, request_id: str, prompt: str | None, prompt_ids: list[int], beams: list[Beam],
                      params: SamplingParams) -> RequestOutput:
    """Finished beams as a RequestOutput (finish_reason "stop" when a beam ended on eos)."""
    eos = set(engine.eos_token_ids) | set(params.stop_token_ids or [])
    outputs = []
    for index, beam in enumerate(beams):
        ended = bool(beam.token_ids) and beam.token_ids[-1] in eos and not params.ignore_eos
        text_ids = beam.token_ids[:-1] if ended else beam.token_ids  # the eos itself is not text
        outputs.append(CompletionOutput(
            index=index, text=engine.tokenizer.decode(text_ids, skip_special_tokens=params.skip_special_tokens),
            token_ids=beam.token_ids, cumulative_logprob=beam.logprob, finish_reason="stop" if ended else "length"))
    return RequestOutput(request_id, prompt, prompt_ids, outputs, finished=True)
