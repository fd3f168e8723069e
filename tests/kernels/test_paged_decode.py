"""The native paged decode kernel equals the PyTorch gather + matmul path."""

from __future__ import annotations

import pytest
import torch

from tokenmill import kernels
from tokenmill.layers.attention import AttentionMetadata, TorchSDPABackend


@pytest.mark.parametrize("heads,kv_heads,seqs", [(9, 3, 17), (4, 4, 5), (8, 1, 3)])
def test_kernel_matches_torch_path(heads, kv_heads, seqs):
    module = kernels.load("paged_decode")
    assert module is not None, "the kernel must build on the CI machine (g++ and ninja are installed)"
    torch.manual_seed(heads + seqs)
    num_blocks, block_size, head_dim = 300, 16, 64
    k_cache = torch.randn(num_blocks, kv_heads, block_size, head_dim)
    v_cache = torch.randn(num_blocks, kv_heads, block_size, head_dim)
    lens = torch.randint(1, 200, (seqs,))
    lens[0] = 1  # a sequence whose only key is the new token
    perm = torch.randperm(num_blocks)
    tables, used = [], 0
    for n in lens.tolist():
        blocks = -(-n // block_size)
        tables.append(perm[used:used + blocks].tolist())
        used += blocks
    meta = AttentionMetadata.build([1] * seqs, (lens - 1).tolist(), tables, block_size)
    q = torch.randn(seqs, heads, head_dim)
    got = module.paged_decode(q, k_cache, v_cache, meta.decode.block_ids, meta.decode.seq_lens, 0.125)
    # The torch path, forced: the backend's gather + matmul code.
    backend = TorchSDPABackend()
    saved = kernels._cache.pop("paged_decode")
    kernels._cache["paged_decode"] = None
    try:
        expected = backend._decode(q, k_cache, v_cache, meta.decode, 0.125)
    finally:
        kernels._cache["paged_decode"] = saved
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
