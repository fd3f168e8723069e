"""GGUF tensors -> Hugging Face names and float tensors.

llama.cpp names tensors `blk.N.attn_q.weight`, ...; `hf_name` maps them back. Quantized blocks are
dequantized at load with the `gguf` package's numpy kernels (all types real files use: F32, F16, BF16,
Q8_0, Q4_0, Q4_1, Q5_0, Q4_K, Q5_K, Q6_K, ...). llama-architecture converters permute the rows of
q_proj/k_proj for llama.cpp's interleaved RoPE; `unpermute_rows` undoes that so the HF "rotate half"
layout applies.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from tokenmill.errors import ModelLoadError

_TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_IN_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Architectures whose converter permutes q/k rows (llama.cpp's `LlamaModel.permute`).
_PERMUTED_ARCHS = ("llama",)
# Holds llama3-style RoPE frequency divisors; read into the config, not a parameter.
ROPE_FREQS = "rope_freqs.weight"


def hf_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None for unknown names."""
    base, _, suffix = gguf_name.rpartition(".")
    if base in _TOP_LEVEL:
        return f"{_TOP_LEVEL[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _IN_BLOCK:
        return f"model.layers.{parts[1]}.{_IN_BLOCK[parts[2]]}.{suffix}"
    return None


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's q/k permutation: per head, rows (2, half) were interleaved as (half, 2)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize(tensor) -> np.ndarray:
    """One GGUF reader tensor as a float32 numpy array in HF [out, in] layout."""
    import gguf

    try:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise ModelLoadError(f"tensor {tensor.name}: GGUF type {tensor.tensor_type.name} is not supported") from e
    expected = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # GGML lists dims innermost-first
    if data.size != int(np.prod(expected)):
        raise ModelLoadError(f"tensor {tensor.name}: data does not match its shape {expected} (corrupt file?)")
    return data.reshape(expected)


def iter_weights(reader, arch: str, n_heads: int, n_kv_heads: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 tensor) for every weight tensor of an open GGUF reader."""
    permute = arch in _PERMUTED_ARCHS
    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQS:
            continue
        name = hf_name(tensor.name)
        if name is None:
            raise ModelLoadError(f"GGUF tensor {tensor.name!r} is not known to the {arch!r} loader")
        w = dequantize(tensor)
        if permute and ".self_attn.q_proj." in name:
            w = unpermute_rows(w, n_heads)
        elif permute and ".self_attn.k_proj." in name:
            w = unpermute_rows(w, n_kv_heads)
        # F32 tensors come back as read-only views of the memory-mapped file: copy them into owned memory.
        w = np.ascontiguousarray(w, dtype=np.float32)
        yield name, torch.from_numpy(w if w.flags.writeable else w.copy())


def rope_freq_factors(reader) -> list[float] | None:
    """The `rope_freqs` divisors of a llama3-style GGUF, if the file has them."""
    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQS:
            return dequantize(tensor).astype(np.float64).tolist()
    return None
