"""POST /v1/embeddings: mean-pooled, L2-normalized final hidden states of the served decoder model,
computed by the engine's batched forward (float lists, or base64 of little-endian float32 like OpenAI)."""

from __future__ import annotations

import base64

import numpy as np

from tokenmill.errors import InvalidRequestError
from tokenmill.server.protocol import EmbeddingRequest
from tokenmill.server.state import ServerState


async def create_embeddings(state: ServerState, req: EmbeddingRequest) -> dict:
    model = state.check_model(req.model)
    hidden = state.engine.engine.model_config.hidden_size
    if req.dimensions is not None and req.dimensions != hidden:
        raise InvalidRequestError(f"dimensions={req.dimensions} is not supported: this model's embeddings have "
                                  f"{hidden} dimensions and cannot be shortened", param="dimensions")
    sequences = [state.tokenizer.encode(x) if isinstance(x, str) else list(x) for x in req.inputs()]
    vectors = await state.engine.embed(sequences)
    data = []
    for i, vec in enumerate(vectors):
        if req.encoding_format == "base64":
            value = base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode("ascii")
        else:
            value = vec
        data.append({"object": "embedding", "index": i, "embedding": value})
    tokens = sum(map(len, sequences))
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
