"""Beam search through the engine equals transformers' beam search (tiny model, float32)."""

from __future__ import annotations

import pytest
import torch

from tokenmill import LLM, SamplingParams


@pytest.fixture(scope="module")
def pair(tiny_model_dirs):
    from transformers import AutoModelForCausalLM

    folder = tiny_model_dirs["llama"]
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return LLM(str(folder), max_model_len=512), ref


@pytest.mark.parametrize("width,n,length_penalty,early_stopping", [
    (4, 2, 1.0, False), (3, 3, 0.0, "never"), (4, 1, 2.0, True), (2, 2, -1.0, False)])
@pytest.mark.parametrize("prompt_seed", [0, 1])
@torch.inference_mode()
def test_matches_transformers(pair, width, n, length_penalty, early_stopping, prompt_seed):
    llm, ref = pair
    g = torch.Generator().manual_seed(prompt_seed)
    prompt = torch.randint(3, 384, (int(torch.randint(4, 40, (1,), generator=g)),), generator=g).tolist()
    params = SamplingParams(n=n, num_beams=width, max_tokens=14, length_penalty=length_penalty,
                            early_stopping=early_stopping)
    ours = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs
    out = ref.generate(torch.tensor([prompt]), num_beams=width, num_return_sequences=n, max_new_tokens=14,
                       do_sample=False, length_penalty=length_penalty, early_stopping=early_stopping,
                       eos_token_id=2, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    expected = []
    for seq in out.sequences[:, len(prompt):].tolist():
        while seq and seq[-1] == 0:  # transformers pads finished beams with pad_token_id
            seq.pop()
        expected.append(seq)
    assert [c.token_ids for c in ours] == expected
    # Scores: transformers' sequences_scores are the length-normalized sums (accumulated in float32, so
    # compared relatively: with length_penalty=-1 a score is the sum times the length, ~500).
    for c, score in zip(ours, out.sequences_scores.tolist(), strict=True):
        ours_score = c.cumulative_logprob / max(len(c.token_ids), 1) ** length_penalty
        assert abs(ours_score - score) <= 1e-5 * max(1.0, abs(score))


def test_beam_search_frees_blocks(pair):
    llm, _ = pair
    llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}], SamplingParams(num_beams=3, max_tokens=6), use_tqdm=False)
    kv = llm.engine.kv
    assert kv.num_free_blocks == kv.num_blocks
