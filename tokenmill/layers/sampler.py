"""The sampler: one step's logits [B, V] (one row per sequence) -> one token id per row, plus logprobs.

The engine builds a `SamplingBatch` each step with `SamplingBatch.from_params` and calls `Sampler()(logits,
batch)`. Every stage is batched over rows; Python loops run only over the rows that need them (seeded
generators, logits processors). Flags on the batch let the common case (plain sampling, no penalties)
skip whole stages. The only host sync is the final `.tolist()`.

Pipeline, in order:
  1. raw logprobs     log_softmax of the model's logits (vLLM v1's default), for rows that asked for logprobs
  2. token masks      allowed_token_ids (all others -> -inf), logit_bias (added), min_tokens (eos/stop -> -inf)
  3. processors       per-request `fn(output_token_ids, logits[V]) -> logits[V]` (grammar masks), own row only
  4. penalties        repetition (HF, prompt + output), then frequency and presence (OpenAI, output only)
  5. greedy rows      argmax of the logits so far
  6. temperature      logits / T
  7. top-k            keep the k largest logits
  8. top-p            keep the smallest set whose probability mass reaches p
  9. min-p            drop tokens whose probability < min_p * max probability
 10. sample           exponential race: argmax(probs / q), q ~ Exponential(1); a seeded row draws q from its own
                      generator, so its tokens do not depend on what else is in the batch
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tokenmill.sampling_params import SamplingParams, SamplingType


@dataclass(slots=True)
class TokenLogprobs:
    token_id: int
    """The sampled (or, for prompt logprobs, the actual next) token."""
    logprob: float
    rank: int
    """1 + the number of tokens with a strictly higher logprob (1 = the most likely token)."""
    top_token_ids: list[int]
    """The `k` most likely tokens, most likely first (empty when k = 0)."""
    top_logprobs: list[float]


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    """One sampled token per row."""
    logprobs: list[TokenLogprobs | None]
    """Per row; None where the request did not ask for logprobs."""


@dataclass(slots=True)
class SamplingBatch:
    temperature: torch.Tensor  # [B] float32; 1.0 on greedy rows so the division is a no-op there
    top_k: torch.Tensor  # [B] int64, 0 = off
    top_p: torch.Tensor  # [B] float32, 1.0 = off
    min_p: torch.Tensor  # [B] float32, 0.0 = off
    presence_penalty: torch.Tensor  # [B] float32
    frequency_penalty: torch.Tensor  # [B] float32
    repetition_penalty: torch.Tensor  # [B] float32
    greedy: torch.Tensor  # [B] bool: the row takes the argmax
    output_token_ids: list[list[int]]
    """Per row, the tokens generated so far (penalties and logits processors read them)."""
    prompt_token_ids: list[list[int]]
    """Per row, the prompt (the repetition penalty sees prompt + output)."""
    seeded: list[tuple[int, torch.Generator]]
    """(row, generator) for sampled rows with their own generator; other rows use the global RNG."""
    logit_bias: list[dict[int, float] | None]
    allowed_token_ids: list[list[int] | None]
    banned_until_min_tokens: list[list[int] | None]
    """Per row, eos/stop ids masked this step because fewer than min_tokens tokens exist yet."""
    logits_processors: list[list[Callable] | None]
    num_logprobs: list[int | None]
    """Per row, how many top alternatives to return; None = no logprobs."""
    penalty_rows: list[int]
    """Rows with any non-neutral penalty; empty in the common case, which skips stage 4."""
    repetition_rows: list[int]
    """Rows with repetition_penalty != 1 (they need the prompt's tokens)."""
    all_greedy: bool
    any_greedy: bool
    max_top_k: int
    """Largest top_k over sampled rows; 0 when no row uses top-k."""
    no_top_p: bool
    no_min_p: bool
    has_masks: bool
    """Some row has allowed_token_ids, logit_bias or min_tokens bans this step."""

    @classmethod
    def from_params(
        cls,
        params: Sequence[SamplingParams],
        output_token_ids: Sequence[list[int]],
        prompt_token_ids: Sequence[list[int]],
        generators: Sequence[torch.Generator | None],
        eos_token_ids: Sequence[int],
        device: torch.device | str,
    ) -> SamplingBatch:
        """Row i samples for a sequence with `params[i]`, `output_token_ids[i]` generated so far."""
        num_rows = len(params)
        if not (len(output_token_ids) == len(prompt_token_ids) == len(generators) == num_rows):
            raise ValueError("from_params needs one params / output / prompt / generator entry per row")
        greedy = [p.sampling_type == SamplingType.GREEDY for p in params]
        sampled = [p for p, g in zip(params, greedy, strict=True) if not g]
        # One host->device copy for every float column: rows are temperature, top_p, min_p, penalties.
        floats = torch.tensor([
            [1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)],
            [1.0 if g else p.top_p for p, g in zip(params, greedy, strict=True)],
            [0.0 if g else p.min_p for p, g in zip(params, greedy, strict=True)],
            [p.presence_penalty for p in params],
            [p.frequency_penalty for p in params],
            [p.repetition_penalty for p in params],
        ], dtype=torch.float32).to(device)  # [6, B]
        banned = [
            sorted(p.stopping_token_ids(eos_token_ids)) if len(out) < p.min_tokens else None
            for p, out in zip(params, output_token_ids, strict=True)]
        banned = [b or None for b in banned]
        penalty_rows = [i for i, p in enumerate(params)
                        if p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0]
        return cls(
            temperature=floats[0], top_p=floats[1], min_p=floats[2],
            presence_penalty=floats[3], frequency_penalty=floats[4], repetition_penalty=floats[5],
            top_k=torch.tensor([0 if g else p.top_k for p, g in zip(params, greedy, strict=True)],
                               dtype=torch.int64).to(device),
            greedy=torch.tensor(greedy, dtype=torch.bool).to(device),
            output_token_ids=list(output_token_ids),
            prompt_token_ids=list(prompt_token_ids),
            seeded=[(i, gen) for i, gen in enumerate(generators) if gen is not None and not greedy[i]],
            logit_bias=[p.logit_bias for p in params],
            allowed_token_ids=[p.allowed_token_ids for p in params],
            banned_until_min_tokens=banned,
            logits_processors=[p.logits_processors or None for p in params],
            num_logprobs=[p.logprobs for p in params],
            penalty_rows=penalty_rows,
            repetition_rows=[i for i in penalty_rows if params[i].repetition_penalty != 1.0],
            all_greedy=all(greedy),
            any_greedy=any(greedy),
            max_top_k=max((p.top_k for p in sampled), default=0),
            no_top_p=all(p.top_p >= 1.0 for p in sampled),
            no_min_p=all(p.min_p <= 0.0 for p in sampled),
            has_masks=any(p.logit_bias or p.allowed_token_ids for p in params) or any(banned),
        )


class Sampler:
    """Stateless; call it with the logits of one step and that step's `SamplingBatch`."""

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        lp_rows = [i for i, k in enumerate(batch.num_logprobs) if k is not None]
        raw_logprobs = None
        if lp_rows:
            raw_logprobs = torch.log_softmax(logits[_index(lp_rows, logits.device)].float(), dim=-1)  # [R, V]
        logits = self.process_logits(logits, batch)
        if batch.all_greedy:
            ids = logits.argmax(dim=-1)  # [B]
        else:
            greedy_ids = logits.argmax(dim=-1) if batch.any_greedy else None  # before temperature edits logits
            ids = _sample(logits, batch)
            if greedy_ids is not None:
                ids = torch.where(batch.greedy, greedy_ids, ids)
        token_ids = ids.tolist()  # the one host sync
        logprobs: list[TokenLogprobs | None] = [None] * len(token_ids)
        if raw_logprobs is not None:
            ks = [batch.num_logprobs[i] for i in lp_rows]
            for i, entry in zip(lp_rows, _gather_logprobs(raw_logprobs, ids[_index(lp_rows, ids.device)], ks),
                                strict=True):
                logprobs[i] = entry
        return SamplerOutput(token_ids, logprobs)

    @staticmethod
    def process_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Stages 2-4 (masks, processors, penalties) on a float32 copy of logits [B, V]; the input is untouched."""
        logits = logits.to(torch.float32, copy=True)  # [B, V]; every later stage edits it in place
        if batch.has_masks:
            _apply_token_masks(logits, batch)
        for i, fns in enumerate(batch.logits_processors):
            for fn in fns or ():
                logits[i] = fn(batch.output_token_ids[i], logits[i])
        if batch.penalty_rows:
            _apply_penalties(logits, batch)
        return logits


def compute_prompt_logprobs(logits: torch.Tensor, target_ids: torch.Tensor | Sequence[int], k: int
                            ) -> list[TokenLogprobs]:
    """Logprobs of each target under the raw logits: `logits[t]` [T, V] predicts `target_ids[t]` [T]."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [T, V]
    targets = torch.as_tensor(target_ids, dtype=torch.int64, device=logits.device)
    return _gather_logprobs(logprobs, targets, [k] * len(targets))


def _gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, ks: list[int]) -> list[TokenLogprobs]:
    """logprobs [R, V], token_ids [R], ks per row -> each row's token logprob, rank and top-k alternatives."""
    chosen = logprobs.gather(1, token_ids[:, None])  # [R, 1]
    ranks = (logprobs > chosen).sum(dim=-1) + 1  # [R]
    max_k = min(max(ks, default=0), logprobs.shape[-1])
    top_values, top_ids = logprobs.topk(max_k, dim=-1)  # [R, max_k], sorted descending
    rows = zip(token_ids.tolist(), chosen[:, 0].tolist(), ranks.tolist(), top_ids.tolist(),
               top_values.tolist(), ks, strict=True)
    return [TokenLogprobs(tok, lp, rank, tids[:k], tlps[:k]) for tok, lp, rank, tids, tlps, k in rows]


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64).to(device)


def _flat_pairs(rows: list[int], ids: list[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, ...]:
    """(row index, token id) tensors [N] listing every id of every given row, for index_put_."""
    r = torch.tensor([row for row, row_ids in zip(rows, ids, strict=True) for _ in row_ids], dtype=torch.int64)
    c = torch.tensor([t for row_ids in ids for t in row_ids], dtype=torch.int64)
    return r.to(device), c.to(device)


def _apply_token_masks(logits: torch.Tensor, batch: SamplingBatch) -> None:
    device, neg_inf = logits.device, torch.tensor(float("-inf"), device=logits.device)
    allowed = [i for i, a in enumerate(batch.allowed_token_ids) if a]
    if allowed:
        # Local row j of `keep` [A, V] belongs to batch row allowed[j].
        keep = torch.zeros((len(allowed), logits.shape[-1]), dtype=torch.bool, device=device)
        keep.index_put_(_flat_pairs(list(range(len(allowed))), [batch.allowed_token_ids[i] for i in allowed],
                                    device), torch.tensor(True, device=device))
        rows = _index(allowed, device)
        logits[rows] = logits[rows].masked_fill(~keep, float("-inf"))
    biased = [i for i, b in enumerate(batch.logit_bias) if b]
    if biased:
        r, c = _flat_pairs(biased, [list(batch.logit_bias[i]) for i in biased], device)
        values = torch.tensor([v for i in biased for v in batch.logit_bias[i].values()], dtype=torch.float32)
        logits.index_put_((r, c), values.to(device), accumulate=True)
    banned = [i for i, b in enumerate(batch.banned_until_min_tokens) if b]
    if banned:
        logits.index_put_(_flat_pairs(banned, [batch.banned_until_min_tokens[i] for i in banned], device), neg_inf)


def _token_counts(ids: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """How often each token occurs in each list: [len(ids), vocab_size] float32."""
    counts = torch.zeros((len(ids), vocab_size), dtype=torch.float32, device=device)
    r, c = _flat_pairs(list(range(len(ids))), ids, device)
    return counts.index_put_((r, c), torch.ones(len(c), device=device), accumulate=True)


def _apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> None:
    device, vocab_size = logits.device, logits.shape[-1]
    rows = _index(batch.penalty_rows, device)
    sub = logits[rows]  # [P, V], a copy written back at the end
    outputs = [batch.output_token_ids[i] for i in batch.penalty_rows]
    out_counts = _token_counts(outputs, vocab_size, device)  # [P, V]
    if batch.repetition_rows:
        # HF semantics: every token seen in prompt or output is pushed toward "less likely" whatever its sign.
        seen = out_counts > 0
        seen |= _token_counts([batch.prompt_token_ids[i] for i in batch.penalty_rows], vocab_size, device) > 0
        penalty = batch.repetition_penalty[rows][:, None]  # [P, 1]
        sub = torch.where(seen, torch.where(sub > 0, sub / penalty, sub * penalty), sub)
    # OpenAI semantics: over output tokens only.
    sub -= batch.frequency_penalty[rows][:, None] * out_counts
    sub -= batch.presence_penalty[rows][:, None] * (out_counts > 0)
    logits[rows] = sub


def _sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Stages 6-10 on logits [B, V] (edited in place) -> sampled ids [B]."""
    logits.div_(batch.temperature[:, None])
    if not batch.no_top_p:
        logits = _apply_top_k_top_p(logits, batch.top_k if batch.max_top_k else None, batch.top_p)
    elif batch.max_top_k:
        _apply_top_k(logits, batch.top_k, batch.max_top_k)
    probs = logits.softmax(dim=-1)  # [B, V]
    if not batch.no_min_p:
        # No renormalization needed: the race below is invariant to scaling a row.
        threshold = batch.min_p[:, None] * probs.amax(dim=-1, keepdim=True)
        probs.masked_fill_(probs < threshold, 0.0)
    q = torch.empty_like(probs).exponential_()  # [B, V] from the global RNG
    for row, generator in batch.seeded:
        q[row].exponential_(generator=generator)
    # A zero draw would turn a masked token's 0/0 into NaN, which argmax would pick.
    q.clamp_min_(torch.finfo(q.dtype).tiny)
    return probs.div_(q).argmax(dim=-1)


def _apply_top_k(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> None:
    """Top-k alone: one `topk(max_k)` instead of a full sort. Ties with the k-th logit are kept."""
    max_top_k = min(max_top_k, logits.shape[-1])
    values = logits.topk(max_top_k, dim=-1).values  # [B, max_k], descending
    k = top_k.clamp(1, max_top_k)
    threshold = values.gather(1, (k - 1)[:, None]).masked_fill((top_k == 0)[:, None], float("-inf"))  # [B, 1]
    logits.masked_fill_(logits < threshold, float("-inf"))


def _apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor) -> torch.Tensor:
    """Top-k then top-p on one ascending sort of each row (vLLM's method); returns the masked logits."""
    vocab_size = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1)  # [B, V] ascending
    if top_k is not None:
        k = torch.where(top_k > 0, top_k, vocab_size).clamp(max=vocab_size)
        threshold = sorted_logits.gather(1, (vocab_size - k)[:, None])  # the k-th largest, [B, 1]
        sorted_logits.masked_fill_(sorted_logits < threshold, float("-inf"))
    # Drop the longest low-probability prefix whose mass is <= 1 - p; what remains holds >= p.
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= 1.0 - top_p[:, None]
    drop[:, -1] = False  # the most likely token always survives
    sorted_logits.masked_fill_(drop, float("-inf"))
    return logits.scatter_(1, order, sorted_logits)
