"""The OpenAI-compatible HTTP server (FastAPI). Run it with `tokenmill serve` or `python -m tokenmill.server`."""
