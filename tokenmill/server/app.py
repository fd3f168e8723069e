"""The FastAPI app: thin routes over `ServerState`; every route also answers without the `/v1` prefix.

Start-up: the HTTP server listens at once and the model loads in a background thread; until it is ready
`/health` answers 503 and the API routes 503 "loading". Shutdown (SIGINT/SIGTERM through uvicorn) stops
accepting, lets in-flight requests finish, then stops the engine thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response

from tokenmill import __version__
from tokenmill.server.chat import create_chat_completion, render_prompt
from tokenmill.server.completions import create_completion
from tokenmill.server.embeddings import create_embeddings
from tokenmill.server.errors import error_response, install_error_handlers
from tokenmill.server.interactive import register as register_interactive
from tokenmill.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from tokenmill.server.state import ServerState

logger = logging.getLogger(__name__)

# Paths that answer without an API key: liveness probes and the docs.
_OPEN_PATHS = {"/health", "/version", "/", "/docs", "/openapi.json", "/docs/oauth2-redirect"}


class _Holder:
    state: ServerState | None = None
    error: BaseException | None = None


class _Gate:
    """Checks every HTTP request before the routes: body size (413), API key (401), model loaded (503).

    A plain ASGI middleware, not `@app.middleware("http")`: Starlette's BaseHTTPMiddleware wraps `receive`,
    and the routes behind it then never see the client's disconnect (which aborts its request)."""

    def __init__(self, app, holder: _Holder, keys: set[str], max_body_bytes: int):
        self.app, self.holder, self.keys, self.max_body_bytes = app, holder, keys, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            response = self._refusal(scope)
            if response is not None:
                return await response(scope, receive, send)
        await self.app(scope, receive, send)

    def _refusal(self, scope) -> JSONResponse | None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        size = headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.max_body_bytes:
            return error_response(f"request body of {size} bytes exceeds the limit of {self.max_body_bytes}", 413)
        path = scope["path"]
        open_path = path in _OPEN_PATHS or scope["method"] == "OPTIONS"
        if self.keys and not open_path and headers.get("authorization") not in self.keys:
            return error_response("invalid or missing API key (send Authorization: Bearer KEY)", 401,
                                  code="invalid_api_key")
        if self.holder.state is None and path not in _OPEN_PATHS:
            if self.holder.error is not None:
                return error_response(f"the model failed to load: {self.holder.error}", 503)
            return error_response("the model is still loading; retry shortly", 503, headers={"Retry-After": "5"})
        return None


def build_app(load_state: Callable[[], ServerState], api_keys: list[str] | None = None,
              allowed_origins: list[str] | None = None, max_body_bytes: int = 32 << 20) -> FastAPI:
    """`load_state` builds the engine (slow); it runs in a thread after the server starts listening."""
    holder = _Holder()

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        async def load():
            try:
                holder.state = await asyncio.to_thread(load_state)
                holder.state.engine.start()
            except BaseException as e:  # reported by /health and every route
                holder.error = e
                logger.exception("model failed to load")

        task = asyncio.create_task(load())
        yield
        task.cancel()
        if holder.state is not None:
            holder.state.engine.shutdown(timeout=10)

    app = FastAPI(title="tokenmill", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible API served by tokenmill")
    install_error_handlers(app)
    if allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["*"], allow_headers=["*"],
                           allow_credentials=True)
    app.add_middleware(_Gate, holder=holder, keys={f"Bearer {k}" for k in api_keys or []},
                       max_body_bytes=max_body_bytes)

    def state() -> ServerState:
        return holder.state

    async def chat(req: ChatCompletionRequest, request: Request):
        return await create_chat_completion(state(), req, request)

    async def completions(req: CompletionRequest, request: Request):
        return await create_completion(state(), req, request)

    async def embeddings(req: EmbeddingRequest):
        return await create_embeddings(state(), req)

    async def models() -> ModelList:
        s = state()
        return ModelList(data=[ModelCard(id=n, root=s.model_name, max_model_len=s.max_model_len)
                               for n in s.model_names])

    async def model(model_id: str):
        s = state()
        if model_id not in s.model_names:
            return error_response(f"model {model_id!r} not found; available: {', '.join(s.model_names)}", 404,
                                  param="model", code="model_not_found")
        return ModelCard(id=model_id, root=s.model_name, max_model_len=s.max_model_len)

    async def tokenize(req: TokenizeRequest):
        s = state()
        if req.messages is not None:
            chat_req = ChatCompletionRequest(messages=req.messages, add_generation_prompt=req.add_generation_prompt)
            ids = render_prompt(s, chat_req)
        else:
            ids = s.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": s.max_model_len}

    async def detokenize(req: DetokenizeRequest):
        s = state()
        bad = [t for t in req.tokens if not 0 <= t < s.tokenizer.vocab_size]
        if bad:
            return error_response(f"token ids out of range: {bad[:5]}", 400, param="tokens")
        return {"prompt": s.tokenizer.decode(req.tokens, skip_special_tokens=False)}

    for prefix in ("/v1", ""):
        public = prefix == "/v1"  # the unprefixed twins stay out of the OpenAPI document
        app.add_api_route(f"{prefix}/chat/completions", chat, methods=["POST"], include_in_schema=public)
        app.add_api_route(f"{prefix}/completions", completions, methods=["POST"], include_in_schema=public)
        app.add_api_route(f"{prefix}/embeddings", embeddings, methods=["POST"], include_in_schema=public)
        app.add_api_route(f"{prefix}/models", models, methods=["GET"], include_in_schema=public)
        app.add_api_route(f"{prefix}/models/{{model_id:path}}", model, methods=["GET"], include_in_schema=public)
    register_interactive(app, state)
    app.add_api_route("/tokenize", tokenize, methods=["POST"])
    app.add_api_route("/detokenize", detokenize, methods=["POST"])

    @app.get("/health")
    async def health():
        if holder.state is None:
            return JSONResponse({"status": "failed" if holder.error else "loading"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(state().metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        name = holder.state.model_name if holder.state else "(loading)"
        return (f"<!doctype html><title>tokenmill</title><h1>tokenmill</h1><p>Serving <b>{name}</b> with an "
                "OpenAI-compatible API.</p><ul><li><a href='/docs'>API docs</a></li>"
                "<li><a href='/v1/models'>/v1/models</a></li><li><a href='/health'>/health</a></li></ul>")

    return app
