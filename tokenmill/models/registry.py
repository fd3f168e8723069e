"""Architecture name (HF `architectures[0]`) -> model class, imported lazily.

A name missing here is an unsupported architecture: `resolve` raises a ModelLoadError that lists the
supported ones. Import errors of a known model module propagate; they are bugs, not "unsupported".
"""

from __future__ import annotations

import importlib

from tokenmill.errors import ModelLoadError

# One module may serve several architectures: they differ only in config flags.
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("tokenmill.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("tokenmill.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("tokenmill.models.llama", "LlamaForCausalLM"),
    "Qwen3ForCausalLM": ("tokenmill.models.llama", "LlamaForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def resolve(architecture: str) -> type:
    if architecture not in _MODELS:
        raise ModelLoadError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(supported_architectures())}")
    module, name = _MODELS[architecture]
    return getattr(importlib.import_module(module), name)
