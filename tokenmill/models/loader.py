"""Load a model: resolve its files, read its config, build the module, fill it by name.

    resolve_source(path)  ->  ModelConfig (config.json or GGUF metadata)
    ->  registry.resolve(architecture)(config) on the meta device (no memory, no random init)
    ->  (HF name, tensor) pairs from safetensors shards or dequantized GGUF tensors
    ->  each parameter replaced by its loaded tensor, cast to the chosen dtype on the chosen device

The loader knows nothing model-specific: names must match the module's `named_parameters()`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tokenmill.config import ModelConfig
from tokenmill.errors import ModelLoadError
from tokenmill.gguf_metadata import open_reader, read_metadata
from tokenmill.models import gguf_weights, registry
from tokenmill.models.source import ModelSource, resolve_source

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}
# Checkpoint entries that are derived state, not weights (older HF Llama checkpoints store them).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class LoadedModel:
    model: nn.Module
    config: ModelConfig
    source: ModelSource
    dtype: torch.dtype
    device: torch.device
    gguf_metadata: dict | None
    """The GGUF key/values (tokenizer, chat template) when the model came from a GGUF file."""
    load_seconds: float


def resolve_dtype(dtype: str | torch.dtype, device: torch.device, config: ModelConfig | None = None) -> torch.dtype:
    """`auto` is float32 on CPU (bf16 matmul is ~500x slower than fp32 on CPUs without AVX-512) and
    the checkpoint's half type (bfloat16 unless it was saved in float16) on GPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        return torch.float16 if config is not None and config.torch_dtype == "float16" else torch.bfloat16
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


def load_model(model: str | Path | None = None, dtype: str | torch.dtype = "auto",
               device: str | torch.device = "cpu") -> LoadedModel:
    start = time.perf_counter()
    device = torch.device(device)
    source = resolve_source(model)
    meta = None
    if source.kind == "gguf":
        reader = open_reader(source.path)
        meta = read_metadata(reader)
        names = {t.name for t in reader.tensors}
        config = ModelConfig.from_gguf_metadata(meta, has_output_weight="output.weight" in names)
        factors = gguf_weights.rope_freq_factors(reader)
        if factors is not None:
            config.rope_scaling = {"rope_type": "freq_factors", "factors": factors}
        weights = gguf_weights.iter_weights(reader, meta["general.architecture"],
                                            config.num_attention_heads, config.num_key_value_heads)
    else:
        config = _read_hf_config(source.path)
        weights = _iter_safetensors(source.weight_files)
    torch_dtype = resolve_dtype(dtype, device, config)
    module = build_and_fill(config, weights, torch_dtype, device)
    seconds = time.perf_counter() - start
    logger.info("loaded %s (%s, %s) in %.1fs", source.name, config.architecture, torch_dtype, seconds)
    return LoadedModel(module, config, source, torch_dtype, device, meta, seconds)


def build_and_fill(config: ModelConfig, weights: Iterator[tuple[str, torch.Tensor]],
                   dtype: torch.dtype, device: torch.device) -> nn.Module:
    cls = registry.resolve(config.architecture)
    with torch.device("meta"):
        module = cls(config)
    if config.tie_word_embeddings:
        module.tie_weights()
    expected = dict(module.named_parameters())  # tied parameters appear once, under the embedding's name
    loaded: set[str] = set()
    for name, tensor in weights:
        if name not in expected:
            if not (name.endswith(_IGNORED_SUFFIXES) or (config.tie_word_embeddings and name == "lm_head.weight")):
                logger.warning("ignoring checkpoint tensor %s: the model has no such parameter", name)
            continue
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ModelLoadError(f"{name}: checkpoint shape {tuple(tensor.shape)}, "
                                 f"model expects {tuple(expected[name].shape)}")
        _set_parameter(module, name, tensor.to(device=device, dtype=dtype))
        loaded.add(name)
    missing = sorted(set(expected) - loaded)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ModelLoadError(f"checkpoint is missing weights: {', '.join(missing[:5])}{more}")
    if config.tie_word_embeddings:
        module.tie_weights()
    module.to(device)  # moves the non-persistent buffers (rotary frequencies), which stay float32
    return module.eval().requires_grad_(False)


def _set_parameter(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    module.get_submodule(owner)._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def _read_hf_config(folder: Path) -> ModelConfig:
    cfg = _read_json(folder / "config.json")
    gen_path = folder / "generation_config.json"
    gen = _read_json(gen_path) if gen_path.is_file() else None
    return ModelConfig.from_hf_dict(cfg, gen)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: cannot read JSON ({e})") from e


def _iter_safetensors(files) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    yield key, f.get_tensor(key)
        except ModelLoadError:
            raise
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise ModelLoadError(f"{path}: cannot read safetensors file ({type(e).__name__}: {e})") from e
