"""One error hierarchy for the whole project.

`ClientError` subclasses are the caller's fault (the server maps them to 4xx), everything else is ours
(5xx). `ModelLoadError` is raised at start-up for a model that cannot be loaded; the CLI prints its
message instead of a traceback.
"""


class TokenmillError(Exception):
    """Base class of every error tokenmill raises on purpose."""


class ModelLoadError(TokenmillError):
    """The model path, its files or its architecture cannot be loaded."""


class ClientError(TokenmillError):
    """The request is invalid. `param` names the offending field when there is one."""

    status_code = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(ClientError):
    """A request field has a bad value."""


class ChatTemplateError(ClientError):
    """The chat template failed to render these messages (its own `raise_exception` included)."""
