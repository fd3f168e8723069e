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

The `n` best finished beams are returned (token ids include the eos that ended them).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from tokenmill.sampling_params import SamplingParams

_ids = itertools.count()


@dataclass(slots=True)
class Beam:
    token_ids: list[int]
    logprob: float
    """Sum of the raw log-probabilities of the generated tokens."""
    score: float = 0.0
    """Length-normalized score (finished beams)."""


def beam_search(engine, prompt_ids: list[int], params: SamplingParams) -> list[Beam]:
    width = params.num_beams or params.best_of or params.n
    max_tokens = params.max_tokens or engine.max_model_len - len(prompt_ids)
    eos = set() if params.ignore_eos else set(engine.eos_token_ids) | set(params.stop_token_ids or [])
    k = max(2, 1 + len(eos)) * width
    penalty, early = params.length_penalty, params.early_stopping
    running, finished = [Beam([], 0.0)], []
    improvable = True
    for step in range(max_tokens):
        tops = _expand(engine, prompt_ids, running, k)
        candidates = sorted(((beam.logprob + lp, b, tok) for b, beam in enumerate(running) for tok, lp in tops[b]),
                            key=lambda c: -c[0])[:k]
        ends = [tok in eos or step + 1 == max_tokens for _, _, tok in candidates]
        full = len(finished) == width and early is True
        if improvable and not full:
            for (total, b, tok), ended in zip(candidates[:width], ends[:width], strict=True):
                if ended:
                    finished.append(Beam(running[b].token_ids + [tok], total, total / (step + 1) ** penalty))
            finished = sorted(finished, key=lambda f: -f.score)[:width]
        running = [Beam(running[b].token_ids + [tok], total)
                   for (total, b, tok), ended in zip(candidates, ends, strict=True) if not ended][:width]
        if not running or all(ends):
            break
        best_len = max_tokens if early == "never" and penalty > 0 else step + 1
        if len(finished) == width and running[0].logprob / best_len ** penalty <= min(f.score for f in finished):
            improvable = False  # sticky, as in transformers
        if not improvable or (len(finished) == width and early is True):
            break
    return sorted(finished, key=lambda f: -f.score)[:params.n]


def _expand(engine, prompt_ids: list[int], beams: list[Beam], k: int) -> list[list[tuple[int, float]]]:
    """Top-k (token, logprob) of the next token after each beam, computed in one engine batch."""
    step_params = SamplingParams(temperature=0, max_tokens=1, logprobs=k, ignore_eos=True)
    ids = [f"beam{next(_ids)}" for _ in beams]
    for request_id, beam in zip(ids, beams, strict=True):
        engine.add_request(request_id, prompt_ids + beam.token_ids, step_params)
    results = {}
    while len(results) < len(ids):
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.outputs[0].logprobs[0]
    tops = []
    for request_id in ids:
        entry = sorted(results[request_id].items(), key=lambda kv: kv[1].rank)[:k]
        tops.append([(tok, lp.logprob) for tok, lp in entry])
    return tops
