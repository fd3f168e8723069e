"""Every failure the client sees is OpenAI-shaped: {"error": {"message", "type", "param", "code"}}.

4xx for the client's fault (bad JSON, a wrong type or range naming the field, an unknown model or route,
a missing key), 5xx only for ours, logged with a request id the client also gets.
"""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenmill.errors import ClientError

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          503: "service_unavailable", 504: "timeout"}


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "literal"}


def error_body(message: str, status: int, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "internal_server_error"),
                      "param": param, "code": code if code is not None else status}}


def error_response(message: str, status: int, param: str | None = None, code: str | int | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param, code), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first problem as one sentence naming the field (`messages.0.role: ...`)."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"invalid JSON in the request body: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    loc = []
    for part in first.get("loc", ()):
        if part == "body":
            continue
        if isinstance(part, str) and ("[" in part or part in _TYPE_TAGS or part.startswith("function-")):
            break  # pydantic names the union branch it tried (`prompt.str`): the field itself is the param
        loc.append(str(part))
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")
    return (f"{param}: {msg}" if param else msg), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(message, 400, param)

    @app.exception_handler(ClientError)
    async def _client(_: Request, exc: ClientError):
        headers = {"Retry-After": "1"} if exc.status_code == 429 else None
        return error_response(exc.message, exc.status_code, exc.param, headers=headers)

    @app.exception_handler(ValueError)
    async def _value(_: Request, exc: ValueError):  # SamplingParams and friends validate with ValueError
        return error_response(str(exc), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        message = "not found" if exc.status_code == 404 else str(exc.detail)
        return error_response(message, exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _ours(request: Request, exc: Exception):
        request_id = uuid.uuid4().hex[:12]
        logger.exception("internal error %s on %s %s", request_id, request.method, request.url.path)
        return error_response(f"internal server error (request id {request_id})", 500)
