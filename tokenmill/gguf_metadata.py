"""Read a GGUF file's key/value metadata into plain Python values.

The `gguf` package's reader memory-maps the file; `read_metadata` turns each field into an int, float,
bool, str or list of them, so the config and tokenizer builders never touch `gguf` internals.
"""

from __future__ import annotations

import os

from tokenmill.errors import ModelLoadError


def open_reader(path: str | os.PathLike):
    """Open a GGUF file, turning a truncated or corrupt file into a ModelLoadError."""
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, struct/numpy errors, ... on bad bytes
        raise ModelLoadError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def field_value(field):
    """One GGUF field as a Python value (str, int, float, bool, or a list of those)."""
    return field.contents()


def read_metadata(reader) -> dict:
    """All key/value fields of an open GGUF reader as a plain dict."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            out[key] = field_value(field)
        except Exception as e:
            raise ModelLoadError(f"GGUF field {key!r} cannot be read: {e}") from e
    return out
