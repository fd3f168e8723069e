"""`tokenmill serve`: build the engine in the background, serve the app with uvicorn."""

from __future__ import annotations

import logging

from tokenmill.config import EngineConfig

logger = logging.getLogger("tokenmill.server")


def run_server(config: EngineConfig, host: str = "127.0.0.1", port: int = 8000,
               served_model_names: list[str] | None = None, api_keys: list[str] | None = None,
               allowed_origins: list[str] | None = None, limits=None) -> None:
    import uvicorn

    from tokenmill.engine.async_engine import AsyncLLMEngine
    from tokenmill.engine.engine import LLMEngine
    from tokenmill.server.app import build_app
    from tokenmill.server.state import ServerLimits, ServerState

    limits = limits or ServerLimits()

    def load() -> ServerState:
        engine = LLMEngine(config)
        names = list(served_model_names or [engine.model_name])
        if config.model and config.model not in names:
            names.append(config.model)  # the path the user typed is an alias
        logger.info("serving %s at http://%s:%d/v1 (OpenAI-compatible; docs at /docs)", names[0], host, port)
        return ServerState(AsyncLLMEngine(engine), names, limits=limits)

    app = build_app(load, api_keys=api_keys, allowed_origins=allowed_origins, max_body_bytes=limits.max_body_bytes)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=30)
