"""The engine's view of one sequence being generated.

A client request with `n` > 1 (or `best_of`) becomes several `Request`s, one per sample, sharing the
prompt (and, through prefix caching, its KV blocks). The scheduler reads and advances
`num_computed_tokens`; the engine appends sampled tokens. No torch here beyond an opaque RNG handle.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    """Resolved limit on generated tokens (never None here)."""
    params: Any = None
    """The request's SamplingParams (opaque to the scheduler)."""
    group_id: str | None = None
    """The client request this sample belongs to; siblings share a prompt."""
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    """Tokens whose keys/values are in the KV cache."""
    status: RequestStatus = RequestStatus.WAITING
    arrival_time: float = field(default_factory=time.monotonic)
    num_preemptions: int = 0
    num_cached_prompt_tokens: int = 0
    """Prompt tokens served by the prefix cache at the last admission."""
    generator: Any = None
    """Per-request torch.Generator when the request has a seed."""
    state: Any = None
    """Engine-side output state (detokenizer, stop checks, logprobs)."""

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output without building the whole list."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    @property
    def is_prefilling(self) -> bool:
        """Still computing tokens it already knows (the prompt, or everything after a preemption)."""
        return self.num_computed_tokens < self.num_tokens - 1
