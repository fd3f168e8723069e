"""A minimal batched greedy decoder over the paged KV cache.

The parity tests drive the bare model with it (no scheduler, sampler or fused/packed weights, so a
mismatch points at the model code); serving goes through the engine. It runs the real data path: every step is one
flat forward pass over all active sequences (the first step prefills every prompt at once, later steps
decode one token per sequence), keys and values live in a paged cache addressed by block tables.

    prompts -> allocate blocks per sequence -> [prefill all] -> argmax -> [decode all active] -> ...
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tokenmill.layers.attention import AttentionMetadata
from tokenmill.layers.attention import allocate_kv_cache as allocate_layer_cache


@dataclass
class GreedyResult:
    token_ids: list[int]
    logits: list[torch.Tensor] = field(default_factory=list)
    """The logits [vocab] each generated token was chosen from (kept when `keep_logits`)."""


def allocate_kv_cache(model, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device) -> None:
    """Give every attention layer a (k, v) pool of num_blocks * block_size slots."""
    for attn in model.attention_layers():
        attn.kv_cache = allocate_layer_cache(num_blocks, attn.num_kv_heads, block_size, attn.head_dim, dtype, device)


def free_kv_cache(model) -> None:
    for attn in model.attention_layers():
        attn.kv_cache = None


@torch.inference_mode()
def greedy_generate(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_token_ids: Sequence[int] = (),
    block_size: int = 16,
    keep_logits: bool = False,
) -> list[GreedyResult]:
    """Greedy-decode every prompt together."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    # Contiguous block ranges per sequence: enough for its prompt plus every token it may generate.
    tables, next_block = [], 0
    for p in prompts:
        n = math.ceil((len(p) + max_new_tokens) / block_size)
        tables.append(list(range(next_block, next_block + n)))
        next_block += n
    allocate_kv_cache(model, next_block, block_size, dtype, device)
    try:
        results = [GreedyResult([]) for _ in prompts]
        active = list(range(len(prompts)))
        feed = [list(p) for p in prompts]  # tokens to run this step, per sequence
        cached = [0] * len(prompts)  # tokens already in the cache, per sequence
        while active and max_new_tokens > 0:
            meta = AttentionMetadata.build(
                [len(feed[i]) for i in active], [cached[i] for i in active],
                [tables[i] for i in active], block_size, device)
            ids = torch.tensor([t for i in active for t in feed[i]], dtype=torch.long, device=device)
            hidden = model(ids, meta)
            last = meta.query_start_loc[1:] - 1  # each sequence's last token in the flat batch
            logits = model.compute_logits(hidden[last]).float()  # [num_active, vocab]
            next_ids = logits.argmax(-1).tolist()
            still = []
            for row, (i, tok) in enumerate(zip(active, next_ids, strict=True)):
                cached[i] += len(feed[i])
                feed[i] = [tok]
                results[i].token_ids.append(tok)
                if keep_logits:
                    results[i].logits.append(logits[row].cpu())
                if tok not in eos_token_ids and len(results[i].token_ids) < max_new_tokens:
                    still.append(i)
            active = still
        return results
    finally:
        free_kv_cache(model)
