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


@dataclass
class ServerState:
    engine: AsyncLLMEngine
    model_names: list[str]
    """The served name first, then aliases."""
    fingerprint: str = field(default="fp_tokenmill")

    def __post_init__(self):
        llm = self.engine.engine
        self.tokenizer = llm.tokenizer
        self.max_model_len = llm.max_model_len
        self.defaults = dict(llm.model_config.generation_defaults)
        template = self.tokenizer.chat_template
        self.chat_template = ChatTemplate(template) if template else None

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
