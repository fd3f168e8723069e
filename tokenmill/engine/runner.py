"""The model runner: one flat forward pass per step over the paged KV pool.

    SchedulerOutput.chunks  ->  input ids (each chunk's tokens, concatenated; no padding)
                            ->  AttentionMetadata (positions, slot mapping, key slots, mask)
                            ->  model forward -> hidden [num_tokens, hidden]
                            ->  logits of each sampling chunk's last token   [num_samples, vocab]
                                (+ logits of every prompt position for requests asking prompt_logprobs)

The runner owns the KV tensors: per layer one key pool and one value pool of
[num_blocks, num_kv_heads, block_size, head_dim], addressed by the scheduler's block ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokenmill.engine.scheduler import SchedulerOutput
from tokenmill.layers.attention import AttentionMetadata, allocate_kv_cache
from tokenmill.layers.linear import pack_linears


def kv_bytes_per_token(model, dtype: torch.dtype) -> int:
    """Bytes of KV cache one token takes across all layers (keys + values)."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(2 * a.num_kv_heads * a.head_dim * size for a in model.attention_layers())


@dataclass
class RunnerOutput:
    sample_logits: torch.Tensor | None
    """[num_samples, vocab] float32, one row per chunk that samples, in chunk order."""
    sample_chunks: list[int] = field(default_factory=list)
    """Indices into SchedulerOutput.chunks of the rows of `sample_logits`."""
    prompt_logits: dict[int, torch.Tensor] = field(default_factory=dict)
    """chunk index -> [chunk tokens, vocab] logits, for chunks whose request wants prompt logprobs."""


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device):
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.device = device
        if hasattr(model, "fuse_projections"):
            model.fuse_projections()
        pack_linears(model)  # CPU float32: oneDNN with pre-packed weights (see layers/linear.py)
        if device.type == "cpu" and dtype == torch.float32:
            from tokenmill import kernels

            kernels.load("paged_decode")  # built now (~35 s once per machine), not on the first batched request
        for attn in model.attention_layers():
            attn.kv_cache = allocate_kv_cache(num_blocks, attn.num_kv_heads, block_size, attn.head_dim, dtype, device)

    @torch.inference_mode()
    def embed(self, sequences: list[list[int]]) -> torch.Tensor:
        """Mean-pooled, L2-normalized final hidden states: [num_sequences, hidden], float32.

        One cache-free flat forward pass (the KV pool is neither read nor written)."""
        lens = torch.tensor([len(s) for s in sequences])
        meta = AttentionMetadata.build(lens.tolist(), device=self.device)
        ids = torch.tensor([t for s in sequences for t in s], dtype=torch.long, device=self.device)
        hidden = self.model(ids, meta).float()  # [num_tokens, hidden]
        owner = torch.arange(len(sequences), device=self.device).repeat_interleave(lens.to(self.device))
        sums = torch.zeros(len(sequences), hidden.shape[1], device=self.device).index_add_(0, owner, hidden)
        means = sums / lens.to(self.device)[:, None]
        return torch.nn.functional.normalize(means, dim=-1)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, block_tables: list[list[int]],
                want_prompt_logits: set[int] = frozenset()) -> RunnerOutput:
        """Run the step. `block_tables[i]` belongs to `out.chunks[i]`; `want_prompt_logits` holds chunk indices."""
        ids: list[int] = []
        for chunk in out.chunks:
            ids.extend(chunk.request.token_slice(chunk.start, chunk.start + chunk.num_tokens))
        meta = AttentionMetadata.build([c.num_tokens for c in out.chunks], [c.start for c in out.chunks],
                                       block_tables, self.block_size, self.device)
        hidden = self.model(torch.tensor(ids, dtype=torch.long, device=self.device), meta)

        sample_chunks = [i for i, c in enumerate(out.chunks) if c.samples]
        result = RunnerOutput(None, sample_chunks)
        if sample_chunks:
            last = meta.query_start_loc[1:] - 1  # [num_chunks] each chunk's last token in the flat batch
            rows = last[torch.tensor(sample_chunks, device=self.device)]
            result.sample_logits = self.model.compute_logits(hidden[rows]).float()
        if want_prompt_logits:
            starts = meta.query_start_loc.tolist()
            for i in want_prompt_logits:
                result.prompt_logits[i] = self.model.compute_logits(hidden[starts[i]:starts[i + 1]]).float()
        return result
