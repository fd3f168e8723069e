"""Configuration dataclasses shared by every layer of tokenmill.

`ModelConfig` describes a decoder model with Hugging Face field names. It is filled either from a
model folder's `config.json` (+ `generation_config.json`) or from a GGUF file's metadata, so the model
code never knows where its weights came from. Validation raises ValueError/ModelLoadError; no I/O here
beyond what the `from_*` constructors are handed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokenmill.errors import ModelLoadError

# Rope scaling types the rotary layer implements (HF `rope_type` names).
# "freq_factors" holds explicit per-frequency divisors (the `rope_freqs` tensor of llama3 GGUF files).
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "freq_factors")


@dataclass
class ModelConfig:
    architecture: str
    """HF architecture class name, e.g. "LlamaForCausalLM"; picks the model class in the registry."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    """Fewer than num_attention_heads means grouped-query attention."""
    head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    """The longest context the model was trained for; the default `max_model_len`."""
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    """HF rope parameters for non-default RoPE (`rope_type` plus its fields), None for plain RoPE."""
    tie_word_embeddings: bool = False
    """The output projection reuses the input embedding matrix."""
    attention_bias: bool = False
    """q/k/v projections carry a bias (Qwen2; Llama when `attention_bias` is set)."""
    attention_out_bias: bool = False
    """o_proj carries a bias (Llama with `attention_bias`; not Qwen2)."""
    mlp_bias: bool = False
    qk_norm: bool = False
    """Per-head RMSNorm on q and k before RoPE (Qwen3)."""
    torch_dtype: str | None = None
    """The dtype the checkpoint was saved in, as a string ("bfloat16", ...), if known."""
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    """Every id that ends generation: config.json's and generation_config.json's, merged."""
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    """Default sampling fields from generation_config.json (temperature, top_p, top_k, ...)."""

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ModelLoadError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError(
                f"model config: num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelLoadError(
                f"rope scaling type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")

    # ---------------------------------------------------------------- Hugging Face folders

    @classmethod
    def from_hf_dict(cls, cfg: dict, generation_config: dict | None = None) -> ModelConfig:
        """Build from the dicts of `config.json` and (optionally) `generation_config.json`."""
        archs = cfg.get("architectures") or []
        if not archs:
            raise ModelLoadError("config.json has no `architectures` entry; cannot tell which model this is")
        arch = archs[0]
        try:
            hidden = cfg["hidden_size"]
            heads = cfg["num_attention_heads"]
            rope_theta, rope_scaling = _hf_rope(cfg)
            bias = bool(cfg.get("attention_bias", False))
            is_qwen2 = arch.startswith("Qwen2")
            gen = generation_config or {}
            return cls(
                architecture=arch,
                vocab_size=cfg["vocab_size"],
                hidden_size=hidden,
                intermediate_size=cfg["intermediate_size"],
                num_hidden_layers=cfg["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=cfg.get("num_key_value_heads") or heads,
                head_dim=cfg.get("head_dim") or hidden // heads,
                rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
                max_position_embeddings=cfg.get("max_position_embeddings", 4096),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                # Qwen2 always has q/k/v bias and never an o_proj bias; Llama's flag covers all four.
                attention_bias=True if is_qwen2 else bias,
                attention_out_bias=False if is_qwen2 else bias,
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                qk_norm=arch.startswith("Qwen3"),
                torch_dtype=_dtype_name(cfg.get("torch_dtype") or cfg.get("dtype")),
                bos_token_id=gen.get("bos_token_id", cfg.get("bos_token_id")),
                eos_token_ids=_merge_ids(cfg.get("eos_token_id"), gen.get("eos_token_id")),
                generation_defaults={k: gen[k] for k in _GENERATION_KEYS if k in gen},
            )
        except KeyError as e:
            raise ModelLoadError(f"config.json is missing the field {e.args[0]!r}") from e

    # ---------------------------------------------------------------- GGUF files

    @classmethod
    def from_gguf_metadata(cls, meta: dict, has_output_weight: bool) -> ModelConfig:
        """Build from GGUF key/values. `has_output_weight`: the file has a separate `output.weight`."""
        arch = meta.get("general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            raise ModelLoadError(
                f"GGUF architecture {arch!r} is not supported (supported: {', '.join(GGUF_ARCHITECTURES)})")

        def get(key, default=None):
            return meta.get(f"{arch}.{key}", default)

        try:
            hidden = get("embedding_length")
            heads = get("attention.head_count")
            kv_heads = get("attention.head_count_kv", heads)
            tokens = meta.get("tokenizer.ggml.tokens") or []
            scaling = None
            scaling_type = get("rope.scaling.type")
            if scaling_type == "linear":
                scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
            elif scaling_type not in (None, "none"):
                raise ModelLoadError(f"GGUF rope scaling type {scaling_type!r} is not supported")
            eos = meta.get("tokenizer.ggml.eos_token_id")
            eot = meta.get("tokenizer.ggml.eot_token_id")
            return cls(
                architecture=GGUF_ARCHITECTURES[arch],
                vocab_size=get("vocab_size") or len(tokens),
                hidden_size=hidden,
                intermediate_size=get("feed_forward_length"),
                num_hidden_layers=get("block_count"),
                num_attention_heads=heads,
                num_key_value_heads=kv_heads,
                head_dim=get("attention.key_length") or hidden // heads,
                rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
                max_position_embeddings=get("context_length", 4096),
                rope_theta=float(get("rope.freq_base", 10000.0)),
                rope_scaling=scaling,
                tie_word_embeddings=not has_output_weight,
                attention_bias=arch == "qwen2",
                qk_norm=arch == "qwen3",
                bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
                eos_token_ids=_merge_ids(eos, eot),
            )
        except TypeError as e:  # a required key was missing (None in arithmetic / int check)
            raise ModelLoadError(f"GGUF metadata for {arch!r} is incomplete: {e}") from e


# GGUF `general.architecture` → the HF architecture whose module runs it.
GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

_GENERATION_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens")


def _hf_rope(cfg: dict) -> tuple[float, dict | None]:
    """rope_theta and scaling from either transformers 4 (`rope_theta` + `rope_scaling`) or 5 (`rope_parameters`)."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    params["rope_type"] = rope_type
    params.pop("type", None)
    return theta, params


def _merge_ids(*values) -> list[int]:
    out: list[int] = []
    for v in values:
        for i in v if isinstance(v, list | tuple) else [v]:
            if isinstance(i, int) and i not in out:
                out.append(i)
    return out


def _dtype_name(value) -> str | None:
    if value is None:
        return None
    return str(value).removeprefix("torch.")


@dataclass
class EngineConfig:
    """Everything the engine needs to start; vLLM's names. The CLI's flags are generated from these fields."""

    model: str | None = None
    """A Hugging Face model folder or a .gguf file; None = the bundled SmolLM2-135M-Instruct."""
    dtype: str = "auto"
    """auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16 or float16."""
    device: str = "cpu"
    """torch device to run on: cpu, cuda, cuda:1, ..."""
    max_model_len: int | None = None
    """Longest prompt + output in tokens; default: the model's max_position_embeddings."""
    max_num_seqs: int = 64
    """Most sequences in one batch."""
    max_num_batched_tokens: int = 1024
    """Token budget of one step: prefill chunks and decode tokens together."""
    block_size: int = 16
    """Tokens per KV-cache block."""
    kv_cache_memory: int | None = None
    """KV-cache size in bytes; default 1 GiB on CPU, `gpu_memory_utilization` of free memory on GPU."""
    gpu_memory_utilization: float = 0.9
    """On GPU: share of the device memory the weights, activations and KV cache may use together."""
    enable_prefix_caching: bool = True
    """Reuse the KV blocks of a cached prompt prefix (the next turn of a chat, a shared system prompt)."""
    seed: int = 0
    """Seed of the shared RNG that unseeded sampled requests draw from."""
    tensor_parallel_size: int = 1
    """GPUs per model; only 1 is implemented."""
    chat_template: str | None = None
    """A chat template file or inline Jinja string overriding the model's own."""

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 bytes, got {self.kv_cache_memory}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.tensor_parallel_size != 1:
            raise ValueError("tensor_parallel_size > 1 is not implemented yet")


def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass (read from its source): the CLI's help texts."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs
