"""Attention over a flat batch, behind a small backend interface.

A step's batch is flat: the new tokens of every sequence concatenated ([num_tokens, ...]), prefill
chunks and single decode tokens alike, with no padding. `AttentionMetadata` is built once per step
from per-sequence integers and shared by every layer:

    query_lens [S]   new tokens of each sequence in this step
    context_lens [S] tokens of each sequence already in the KV cache (0 without a cache)
    block_tables [S][*] paged-cache blocks of each sequence (None: no cache, keys are the new tokens)

From these it derives, with tensor ops only (no Python loop over sequences or tokens):
    positions     [num_tokens]          absolute position of each new token
    slot_mapping  [num_tokens]          cache slot where each new token's k/v is written
    kv_slots      [num_keys]            cache slot of every key attended to, sequence after sequence
    attn_mask     [num_tokens, num_keys] query i may see key j: same sequence and not in its future

The `TorchSDPABackend` (any device) runs one `scaled_dot_product_attention` over the whole batch with
that mask. Its cost grows with (new tokens x keys of the whole batch); a GPU backend with varlen paged
kernels can replace it behind the same `forward` signature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class AttentionMetadata:
    positions: torch.Tensor
    """[num_tokens] int64 absolute position of each new token (RoPE reads it too)."""
    attn_mask: torch.Tensor
    """[num_tokens, num_keys] bool, True where attention is allowed."""
    slot_mapping: torch.Tensor | None
    """[num_tokens] int64 cache slot for each new token's k/v; None when running without a cache."""
    kv_slots: torch.Tensor | None
    """[num_keys] int64 cache slots of all keys attended to; None when the keys are the new tokens."""
    query_start_loc: torch.Tensor
    """[num_seqs + 1] int64 offsets of each sequence's tokens in the flat batch."""

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        context_lens: list[int] | None = None,
        block_tables: list[list[int]] | None = None,
        block_size: int = 16,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        num_seqs = len(query_lens)
        q_lens = torch.tensor(query_lens, dtype=torch.int64)
        ctx = torch.tensor(context_lens if context_lens is not None else [0] * num_seqs, dtype=torch.int64)
        if block_tables is None and bool(ctx.any()):
            raise ValueError("context_lens > 0 needs block_tables: cached keys live in the paged cache")
        seq_ids = torch.arange(num_seqs)
        q_seq = seq_ids.repeat_interleave(q_lens)  # [num_tokens] sequence of each new token
        q_start = torch.cumsum(q_lens, 0) - q_lens
        positions = ctx[q_seq] + torch.arange(len(q_seq)) - q_start[q_seq]

        seq_lens = ctx + q_lens
        k_seq = seq_ids.repeat_interleave(seq_lens)  # [num_keys] sequence of each key
        k_pos = torch.arange(len(k_seq)) - (torch.cumsum(seq_lens, 0) - seq_lens)[k_seq]
        attn_mask = (q_seq[:, None] == k_seq[None, :]) & (k_pos[None, :] <= positions[:, None])

        slot_mapping = kv_slots = None
        if block_tables is not None:
            width = max((len(b) for b in block_tables), default=0)
            table = torch.tensor([b + [0] * (width - len(b)) for b in block_tables], dtype=torch.int64)
            slot_mapping = table[q_seq, positions // block_size] * block_size + positions % block_size
            kv_slots = table[k_seq, k_pos // block_size] * block_size + k_pos % block_size
            slot_mapping, kv_slots = slot_mapping.to(device), kv_slots.to(device)
        return cls(
            positions=positions.to(device),
            attn_mask=attn_mask.to(device),
            slot_mapping=slot_mapping,
            kv_slots=kv_slots,
            query_start_loc=torch.cat([q_start, q_lens.sum().view(1)]).to(device),
        )


class AttentionBackend(Protocol):
    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None,  # each [num_slots, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor: ...  # [num_tokens, num_heads, head_dim]


class TorchSDPABackend:
    """One masked SDPA call over the flat batch; works on every device torch supports."""

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if kv_cache is not None:
            k_cache, v_cache = kv_cache
            k_cache.index_copy_(0, meta.slot_mapping, k)
            v_cache.index_copy_(0, meta.slot_mapping, v)
            k = k_cache.index_select(0, meta.kv_slots)  # [num_keys, num_kv_heads, head_dim]
            v = v_cache.index_select(0, meta.kv_slots)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),  # [1, num_heads, num_tokens, head_dim]
            k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0),
            attn_mask=meta.attn_mask,
            scale=scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        return out.squeeze(0).transpose(0, 1)


def get_backend(device: torch.device) -> AttentionBackend:
    """The attention backend for a device. GPU kernels will be imported lazily from here."""
    return TorchSDPABackend()
