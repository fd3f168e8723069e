"""What every route handler needs: the async engine, the tokenizer, the served names, and the rules for
the request's `model` field."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.engine.async_engine import AsyncLLMEngine
from tokenmill.errors import ClientError
from tokenmill.tokenizer.chat_template import ChatTemplate


class ModelNotFoundError(ClientError):
    status_code = 404
    error_type = "not_found_error"


class ServerBusyError(ClientError):
    """The queue is full: retry later. Requests already accepted keep running."""

    status_code = 429
    error_type = "rate_limit_error"


@dataclass
class ServerLimits:
    max_queue_len: int | None = 1024
    """Most requests waiting beyond the running batch before new ones get 429; None = no limit."""
    request_timeout: float | None = None
    """Seconds a request may run before it is aborted (504, or an error event when streaming); None = none."""
    max_body_bytes: int = 32 << 20
    """Largest request body accepted (413 above)."""


@dataclass
class ServerState:
    engine: AsyncLLMEngine
    model_names: list[str]
    """The served name first, then aliases."""
    fingerprint: str = field(default="fp_tokenmill")
    limits: ServerLimits = field(default_factory=ServerLimits)

    def __post_init__(self):
        llm = self.engine.engine
        self.tokenizer = llm.tokenizer
        self.max_model_len = llm.max_model_len
        self.defaults = dict(llm.model_config.generation_defaults)
        template = self.tokenizer.chat_template
        self.chat_template = ChatTemplate(template) if template else None
        from tokenmill.server.metrics import ServerMetrics

        self.metrics = ServerMetrics(self)
        self.engine.on_finished = self.metrics.observe

    def admit(self) -> None:
        """Refuse a new request when more than max_queue_len would wait behind the running batch."""
        limit = self.limits.max_queue_len
        if limit is None:
            return
        waiting = self.engine.num_requests - self.engine.engine.config.max_num_seqs
        if waiting >= limit:
            raise ServerBusyError(f"the server is at capacity ({self.engine.num_requests} requests in flight, "
                                  f"{waiting} waiting); retry shortly")

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    def check_model(self, requested: str | None) -> str:
        """The name to echo back for the request's `model` field.

        A served name or alias selects that model. While one generative model is served, any other string,
        or none, selects it too: clients such as rtp-llm's send "whatever". With several, it is a 404."""
        if requested in self.model_names:
            return requested
        if self.single_model:
            return self.model_name
        raise ModelNotFoundError(f"model {requested!r} not found; available: {', '.join(self.model_names)}",
                                 param="model")

    @property
    def single_model(self) -> bool:
        return True  # one process serves one model (DESIGN.md); routing several is future work
