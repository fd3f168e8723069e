"""`SamplingParams`: how one request turns logits into text, with vLLM's field names and defaults.

The server's protocol models and the `LLM` library both build one of these per request; the engine reads
it for stopping and length, `SamplingBatch.from_params` (layers/sampler.py) turns a batch of them into
tensors each step. Validation happens once, here, and raises ValueError naming the field; the server maps
it to a 400. Token ids are checked against the vocabulary later with `verify_token_ids`, when it is known.
"""

from __future__ import annotations

import copy
import enum
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

# Below this temperature a request is greedy: dividing logits by ~0 would only overflow.
SAMPLING_EPS = 1e-5
# OpenAI's documented range for logit_bias values; larger magnitudes are clamped, not rejected.
LOGIT_BIAS_LIMIT = 100.0


class SamplingType(enum.IntEnum):
    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


@dataclass
class SamplingParams:
    n: int = 1
    """Number of completions returned for the prompt."""
    best_of: int | None = None
    """Completions generated (>= n); the n with the highest cumulative logprob are returned. None = n."""
    presence_penalty: float = 0.0
    """In [-2, 2]: subtracted once from the logit of every token already in the output (OpenAI)."""
    frequency_penalty: float = 0.0
    """In [-2, 2]: subtracted from a token's logit once per occurrence in the output (OpenAI)."""
    repetition_penalty: float = 1.0
    """> 0: logits of tokens in prompt + output are divided by it when positive, multiplied when not (HF)."""
    temperature: float = 1.0
    """>= 0: logits are divided by it before sampling; 0 means greedy (argmax)."""
    top_p: float = 1.0
    """In (0, 1]: sample only from the smallest set of tokens whose probabilities sum to >= top_p."""
    top_k: int = 0
    """Sample only from the top_k most likely tokens; 0 (or -1) turns it off."""
    min_p: float = 0.0
    """In [0, 1]: drop tokens whose probability is below min_p times the most likely token's."""
    seed: int | None = None
    """Seeds this request's own random generator, so its tokens do not depend on the rest of the batch."""
    stop: str | list[str] | None = None
    """Strings that end generation when they appear in the output (normalized to a list)."""
    stop_token_ids: list[int] | None = None
    """Token ids that end generation besides the model's eos ids (normalized to a list)."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the output text."""
    ignore_eos: bool = False
    """Keep generating past the model's eos tokens (stop_token_ids still stop)."""
    max_tokens: int | None = 16
    """Most tokens to generate (>= 1); None means up to the model's context limit."""
    min_tokens: int = 0
    """Eos and stop token ids are masked out until this many tokens have been generated."""
    logprobs: int | None = None
    """Return the sampled token's logprob plus this many top alternatives per generated token."""
    prompt_logprobs: int | None = None
    """Return the logprob of each prompt token plus this many top alternatives per position."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the output text."""
    spaces_between_special_tokens: bool = True
    """Put a space between special tokens and their neighbours in the output text."""
    logit_bias: dict[int, float] | None = None
    """Token id -> value added to its logit, clamped to [-100, 100]; string keys (OpenAI JSON) accepted."""
    allowed_token_ids: list[int] | None = None
    """When set, every other token is masked out."""
    logits_processors: list[Callable] | None = None
    """Per-request hooks `fn(output_token_ids, logits[vocab]) -> logits[vocab]` (grammar masks use this)."""
    use_beam_search: bool = False
    """Beam search (run by the engine above the sampler) instead of sampling."""
    num_beams: int | None = None
    """Beam width; > 1 turns beam search on. Defaults to best_of (or n) under beam search."""
    length_penalty: float = 1.0
    """Beam search: scores are cumulative logprob / length ** length_penalty."""
    early_stopping: bool | str = False
    """Beam search stop rule: True, False (heuristic) or "never" (HF semantics)."""
    detokenize: bool = True
    """Produce output text; False returns token ids only."""

    def __post_init__(self):
        self._check_counts()
        self._check_sampling()
        self._normalize_stops()
        self._normalize_token_maps()
        self._check_beam_search()
        if self.sampling_type == SamplingType.GREEDY:
            # Truncation cannot change an argmax; resetting it lets the sampler skip that work.
            self.top_p, self.min_p = 1.0, 0.0
            self.top_k = 1 if self.top_k == 1 else 0  # top_k == 1 is what makes the request greedy

    def _check_counts(self) -> None:
        _check_int("n", self.n, low=1)
        if self.best_of is not None:
            _check_int("best_of", self.best_of, low=1)
            if self.best_of < self.n:
                raise ValueError(f"best_of must be >= n, got best_of={self.best_of} and n={self.n}")
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, low=1)
        _check_int("min_tokens", self.min_tokens, low=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens={self.max_tokens}, got {self.min_tokens}")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, low=0)
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, low=0)
        if self.seed is not None:
            _check_int("seed", self.seed)

    def _check_sampling(self) -> None:
        self.presence_penalty = _check_float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        self.frequency_penalty = _check_float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        self.repetition_penalty = _check_float("repetition_penalty", self.repetition_penalty, 0.0, math.inf,
                                               low_open=True)
        self.temperature = _check_float("temperature", self.temperature, 0.0, math.inf)
        self.top_p = _check_float("top_p", self.top_p, 0.0, 1.0, low_open=True)
        self.min_p = _check_float("min_p", self.min_p, 0.0, 1.0)
        _check_int("top_k", self.top_k)
        if self.top_k == -1:  # vLLM's older spelling of "off"
            self.top_k = 0
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 or -1 (off) or >= 1, got {self.top_k}")

    def _normalize_stops(self) -> None:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if not isinstance(stop, list | tuple) or not all(isinstance(s, str) for s in stop):
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        # An empty stop string would match before the first token; clients that send one mean "none".
        self.stop = [s for s in stop if s]
        self.stop_token_ids = _check_ids("stop_token_ids", self.stop_token_ids or [])

    def _normalize_token_maps(self) -> None:
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"logit_bias must be a dict of token id -> float, got {self.logit_bias!r}")
            bias = {}
            for key, value in self.logit_bias.items():
                try:
                    token = int(key)  # OpenAI JSON objects have string keys: {"50256": -100}
                except (TypeError, ValueError):
                    raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from None
                if token < 0:
                    raise ValueError(f"logit_bias keys must be token ids >= 0, got {key!r}")
                value = _check_float("logit_bias", value, -math.inf, math.inf)
                bias[token] = min(max(value, -LOGIT_BIAS_LIMIT), LOGIT_BIAS_LIMIT)
            self.logit_bias = bias or None
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = _check_ids("allowed_token_ids", self.allowed_token_ids)
            if not self.allowed_token_ids:
                raise ValueError("allowed_token_ids must not be empty")
        if self.logits_processors is not None:
            self.logits_processors = list(self.logits_processors)
            if not all(callable(fn) for fn in self.logits_processors):
                raise ValueError("logits_processors must be a list of callables")

    def _check_beam_search(self) -> None:
        if self.num_beams is not None:
            _check_int("num_beams", self.num_beams, low=1)
            if self.num_beams > 1:
                self.use_beam_search = True
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        self.length_penalty = _check_float("length_penalty", self.length_penalty, -math.inf, math.inf)
        if self.use_beam_search:
            if self.num_beams is None:
                self.num_beams = self.best_of or self.n
            if self.num_beams < self.n:
                raise ValueError(f"num_beams must be >= n={self.n} under beam search, got {self.num_beams}")

    @property
    def sampling_type(self) -> SamplingType:
        """GREEDY when the choice is an argmax (temperature ~0 or top_k == 1), else RANDOM(_SEED)."""
        if self.temperature < SAMPLING_EPS or self.top_k == 1:
            return SamplingType.GREEDY
        return SamplingType.RANDOM if self.seed is None else SamplingType.RANDOM_SEED

    @property
    def all_stop_token_ids(self) -> set[int]:
        """The explicit stop ids; the engine adds the model's eos ids via `stopping_token_ids`."""
        return set(self.stop_token_ids)

    def stopping_token_ids(self, eos_token_ids: Iterable[int]) -> set[int]:
        """Every id that ends this request: stop_token_ids plus the model's eos ids unless ignore_eos."""
        return self.all_stop_token_ids if self.ignore_eos else self.all_stop_token_ids | set(eos_token_ids)

    def verify_token_ids(self, vocab_size: int) -> None:
        """Raise ValueError if an id in logit_bias / allowed_token_ids / stop_token_ids is outside the vocab."""
        for name, ids in (("logit_bias", self.logit_bias or {}), ("allowed_token_ids", self.allowed_token_ids or []),
                          ("stop_token_ids", self.stop_token_ids)):
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise ValueError(f"{name} has token ids outside the vocabulary (size {vocab_size}): {bad[:5]}")

    def clone(self) -> SamplingParams:
        """A deep copy; logits processors with a `clone()` (stateful grammar matchers) are cloned, others shared."""
        memo: dict[int, Any] = {}
        for fn in self.logits_processors or []:
            memo[id(fn)] = fn.clone() if hasattr(fn, "clone") else fn
        return copy.deepcopy(self, memo)


def _check_int(name: str, value: Any, low: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _check_float(name: str, value: Any, low: float, high: float, low_open: bool = False) -> float:
    """Return `value` as a float, or raise if it is not a finite number in [low, high] ((low, high] if open)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or value > high or (low_open and value == low):
        if high == math.inf:
            raise ValueError(f"{name} must be {'>' if low_open else '>='} {low:g}, got {value:g}")
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{low:g}, {high:g}], got {value:g}")
    return float(value)


def _check_ids(name: str, ids: Any) -> list[int]:
    if not isinstance(ids, list | tuple) or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
        raise ValueError(f"{name} must be a list of token ids >= 0, got {ids!r}")
    return list(ids)
