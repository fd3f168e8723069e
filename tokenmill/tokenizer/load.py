"""Pick the tokenizer that belongs to a loaded model: the GGUF file's own vocabulary, or the folder's files."""

from __future__ import annotations

from tokenmill.models.loader import LoadedModel
from tokenmill.tokenizer.tokenizer import Tokenizer


def load_tokenizer(loaded: LoadedModel) -> Tokenizer:
    if loaded.gguf_metadata is not None:
        return Tokenizer.from_gguf_metadata(loaded.gguf_metadata)
    return Tokenizer.from_folder(loaded.source.path)


def stop_token_ids(loaded: LoadedModel, tokenizer: Tokenizer) -> list[int]:
    """Every id that ends generation: the config's (all generation_config eos ids) and the tokenizer's eos."""
    ids = list(loaded.config.eos_token_ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
