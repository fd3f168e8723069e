"""Our Llama-family modules vs transformers on tiny random-weight models (float32, CPU).

Covers Llama (untied), Llama with llama3 rope scaling and tied embeddings, Qwen2 (q/k/v bias) and
Qwen3 (q/k norm, head_dim != hidden/heads), all with GQA.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TINY_MODELS, assert_greedy_match
from tokenmill.engine.greedy import greedy_generate
from tokenmill.layers.attention import AttentionMetadata
from tokenmill.models.loader import load_model


@pytest.fixture(scope="module", params=sorted(TINY_MODELS))
def pair(request, tiny_model_dirs):
    from transformers import AutoModelForCausalLM

    folder = tiny_model_dirs[request.param]
    ours = load_model(folder, dtype="float32").model
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return ours, ref


def _random_ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 384, (n,), generator=g).tolist()


@torch.inference_mode()
def test_logits_match_transformers(pair):
    ours, ref = pair
    ids = _random_ids(57, seed=1)
    expected = ref(torch.tensor([ids])).logits[0]
    got = ours.compute_logits(ours(torch.tensor(ids), AttentionMetadata.build([len(ids)])))
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@torch.inference_mode()
def test_flat_batch_equals_each_sequence_alone(pair):
    """Three sequences of different lengths in one flat forward pass: each row equals its own reference."""
    ours, ref = pair
    seqs = [_random_ids(n, seed=n) for n in (5, 33, 18)]
    flat = torch.tensor([t for s in seqs for t in s])
    logits = ours.compute_logits(ours(flat, AttentionMetadata.build([len(s) for s in seqs])))
    start = 0
    for s in seqs:
        expected = ref(torch.tensor([s])).logits[0]
        torch.testing.assert_close(logits[start:start + len(s)], expected, atol=2e-5, rtol=1e-4)
        start += len(s)


@torch.inference_mode()
def test_paged_cache_chunked_prefill_matches(pair):
    """Prefill in two chunks through the paged cache, with scattered block ids, gives the full-pass logits."""
    ours, ref = pair
    from tokenmill.engine.greedy import allocate_kv_cache, free_kv_cache

    ids = _random_ids(40, seed=7)
    expected = ref(torch.tensor([ids])).logits[0]
    table = [7, 2, 5, 0, 3, 6, 1, 4, 9, 8]  # out-of-order blocks
    try:
        allocate_kv_cache(ours, num_blocks=10, block_size=4, dtype=torch.float32, device=torch.device("cpu"))
        first = ours(torch.tensor(ids[:23]), AttentionMetadata.build([23], [0], [table], block_size=4))
        second = ours(torch.tensor(ids[23:]), AttentionMetadata.build([17], [23], [table], block_size=4))
        got = ours.compute_logits(torch.cat([first, second]))
    finally:
        free_kv_cache(ours)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@torch.inference_mode()
def test_greedy_32_tokens_match_transformers(pair):
    """All prompts decoded together by us; each alone by transformers' generate."""
    ours, ref = pair
    prompts = [_random_ids(n, seed=100 + n) for n in (3, 21, 64, 9)]
    results = greedy_generate(ours, prompts, max_new_tokens=32)
    for prompt, res in zip(prompts, results, strict=True):
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                           pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        expected = out.sequences[0, len(prompt):].tolist()
        assert_greedy_match(res.token_ids, expected, [step[0] for step in out.logits])


@torch.inference_mode()
def test_step_mixing_decodes_and_prefill_chunks(pair):
    """One step with two decodes (attended as the padded decode group) and a prompt chunk plus a longer
    chunk (the masked group) gives each new token the logits of its full sequence."""
    ours, ref = pair
    from tokenmill.engine.greedy import allocate_kv_cache, free_kv_cache

    seqs = {name: _random_ids(n, seed=n) for name, n in (("a", 31), ("b", 25), ("c", 11), ("d", 40))}
    tables = {"a": [0, 1], "b": [2, 3], "c": [4], "d": [5, 6, 7]}
    allocate_kv_cache(ours, num_blocks=8, block_size=16, dtype=torch.float32, device=torch.device("cpu"))
    try:
        # Step 1: a, c and the first 17 tokens of d are prefilled (all but the last token of a and c).
        first = [("a", 0, 30), ("c", 0, 10), ("d", 0, 17)]
        ours(torch.tensor([t for n, s, e in first for t in seqs[n][s:e]]),
             AttentionMetadata.build([e - s for _, s, e in first], [s for _, s, _ in first],
                                     [tables[n] for n, _, _ in first]))
        # Step 2: a and c decode one token each, b prefills whole, d continues its prompt.
        second = [("a", 30, 31), ("b", 0, 25), ("c", 10, 11), ("d", 17, 40)]
        meta = AttentionMetadata.build([e - s for _, s, e in second], [s for _, s, _ in second],
                                       [tables[n] for n, _, _ in second])
        assert meta.decode is not None and len(meta.decode.tokens) == 2
        hidden = ours(torch.tensor([t for n, s, e in second for t in seqs[n][s:e]]), meta)
        logits = ours.compute_logits(hidden)
    finally:
        free_kv_cache(ours)
    row = 0
    for name, start, end in second:
        expected = ref(torch.tensor([seqs[name][:end]])).logits[0, start:end]
        torch.testing.assert_close(logits[row:row + end - start], expected, atol=2e-5, rtol=1e-4)
        row += end - start
