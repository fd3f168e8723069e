"""The sampler: exact logit edits (masks, penalties, processors), sampling distributions, seeds, logprobs.

Distribution tests draw thousands of samples in one call by repeating a row, with the global RNG seeded so
they are deterministic; tolerances are loose enough (chi-square at ~p=1e-4) that any seed would pass.
"""

from __future__ import annotations

import math

import pytest
import torch

from tokenmill.layers.sampler import Sampler, SamplingBatch, compute_prompt_logprobs
from tokenmill.sampling_params import SamplingParams

NEG_INF = float("-inf")


def make_batch(params, outputs=None, prompts=None, generators=None, eos=(2,)) -> SamplingBatch:
    rows = len(params)
    return SamplingBatch.from_params(
        params, outputs or [[] for _ in range(rows)], prompts or [[0] for _ in range(rows)],
        generators or [None] * rows, list(eos), "cpu")


def draw(logits_row: torch.Tensor, params: SamplingParams, num: int = 20000) -> torch.Tensor:
    """`num` independent samples of one distribution: the same row repeated `num` times in one batch."""
    torch.manual_seed(0)
    batch = make_batch([params] * num)
    return torch.tensor(Sampler()(logits_row.expand(num, -1), batch).token_ids)


def assert_frequencies(samples: torch.Tensor, expected: torch.Tensor):
    """Empirical frequencies match `expected` [V]: zero-probability tokens never appear, chi-square small."""
    counts = torch.bincount(samples, minlength=len(expected)).double()
    support = expected > 0
    assert counts[~support].sum() == 0, f"sampled outside the support: {counts[~support]}"
    exp = expected[support].double() * len(samples)
    chi2 = ((counts[support] - exp) ** 2 / exp).sum().item()
    dof = int(support.sum()) - 1
    assert chi2 < 15 + 3 * dof, f"chi-square {chi2:.1f} with {dof} dof: {counts[support]} vs {exp}"


def test_greedy_is_argmax_of_the_processed_logits():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0.0), SamplingParams(top_k=1, temperature=2.0)] * 4
    out = Sampler()(logits, make_batch(params))
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 8
    # A greedy row inside a sampled batch still takes the argmax.
    mixed = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=3)]
    assert Sampler()(logits[:2], make_batch(mixed)).token_ids[0] == logits[0].argmax().item()


def test_temperature_frequencies_match_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    for temperature in (0.5, 1.0, 2.5):
        samples = draw(logits, SamplingParams(temperature=temperature))
        assert_frequencies(samples, torch.softmax(logits / temperature, -1))


def test_top_k_never_leaves_the_k_best():
    logits = torch.randn(40, generator=torch.Generator().manual_seed(2))
    best = logits.topk(5).indices
    samples = draw(logits, SamplingParams(top_k=5, temperature=3.0), num=5000)
    assert set(samples.tolist()) == set(best.tolist())  # within the top 5, and all of them reachable
    expected = torch.full_like(logits, NEG_INF)
    expected[best] = logits[best] / 3.0
    assert_frequencies(samples, expected.softmax(-1))


def test_top_k_rows_keep_their_own_k_in_both_code_paths():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(1)
    for other in (SamplingParams(temperature=3.0), SamplingParams(temperature=3.0, top_p=0.99)):  # topk / sort
        params = [SamplingParams(top_k=2, temperature=3.0), SamplingParams(top_k=7, temperature=3.0),
                  SamplingParams(temperature=3.0, top_k=100), other]
        batch = make_batch(params * 500)
        ids = torch.tensor(Sampler()(logits.repeat(500, 1), batch).token_ids).view(500, 4)
        for row, k in ((0, 2), (1, 7), (2, 30)):
            assert set(ids[:, row].tolist()) <= set(logits[row].topk(k).indices.tolist())
        assert len(set(ids[:, 2].tolist())) > 7  # top_k beyond the vocabulary means all tokens


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])  # sorted: .4 .3 .15 | .1 .05
    samples = draw(probs.log(), SamplingParams(top_p=0.8))
    expected = torch.tensor([0.0, 0.4, 0.0, 0.3, 0.15])  # .4 + .3 = .7 < .8, adding .15 reaches it
    assert_frequencies(samples, expected / expected.sum())


def test_top_k_applies_before_top_p():
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    # Alone, top_p=0.9 keeps 4 tokens; after top_k=3 renormalizes, it needs all 3 (.47 + .35 < .9).
    samples = draw(probs.log(), SamplingParams(top_k=3, top_p=0.9), num=5000)
    assert set(samples.tolist()) == {0, 1, 2}
    samples = draw(probs.log(), SamplingParams(top_p=0.9), num=5000)
    assert set(samples.tolist()) == {0, 1, 2, 3}


def test_min_p_drops_tokens_below_the_scaled_max():
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    samples = draw(probs.log(), SamplingParams(min_p=0.25))  # threshold 0.125
    expected = torch.tensor([0.5, 0.2, 0.15, 0.0, 0.0])
    assert_frequencies(samples, expected / expected.sum())


def test_penalties_match_hand_computation():
    vocab = 10
    logits = torch.linspace(-2.0, 2.5, vocab).repeat(3, 1)  # negative and positive logits in every row
    params = [
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.3),
        SamplingParams(repetition_penalty=0.8, frequency_penalty=-0.4, presence_penalty=1.0),
    ]
    prompts = [[1, 8], [4, 3], [0, 9]]
    outputs = [[2, 5, 5], [3, 3, 3, 7], [9, 9, 6]]
    got = Sampler.process_logits(logits, make_batch(params, outputs, prompts))

    expected = logits.clone()
    for row, p in enumerate(params):
        for tok in set(prompts[row]) | set(outputs[row]):  # HF: prompt + output, sign-dependent
            x = expected[row, tok].item()
            expected[row, tok] = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
        for tok in set(outputs[row]):  # OpenAI: output only
            expected[row, tok] -= p.frequency_penalty * outputs[row].count(tok) + p.presence_penalty
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert got[1, 4] == logits[1, 4]  # a prompt-only token is not hit by presence/frequency


def test_logit_bias_and_allowed_token_ids():
    logits = torch.randn(3, 12, generator=torch.Generator().manual_seed(4))
    params = [SamplingParams(logit_bias={"3": 5.0, "7": -150}), SamplingParams(allowed_token_ids=[1, 4, 9]),
              SamplingParams(allowed_token_ids=[2, 5], logit_bias={2: 1.5, 6: 10.0})]
    got = Sampler.process_logits(logits, make_batch(params))
    expected = logits.clone()
    expected[0, 3] += 5.0
    expected[0, 7] -= 100.0  # clamped
    expected[1, [i for i in range(12) if i not in (1, 4, 9)]] = NEG_INF
    expected[2, [i for i in range(12) if i not in (2, 5)]] = NEG_INF
    expected[2, 2] += 1.5  # a bias on a disallowed token (6) stays masked
    torch.testing.assert_close(got, expected)

    torch.manual_seed(0)
    ids = Sampler()(logits[1].expand(3000, -1), make_batch([SamplingParams(allowed_token_ids=[1, 4, 9],
                                                                           temperature=5.0)] * 3000)).token_ids
    assert set(ids) == {1, 4, 9}


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.zeros(4, 8)
    params = [SamplingParams(min_tokens=3, stop_token_ids=[4])] * 2 + [
        SamplingParams(min_tokens=3, stop_token_ids=[4], ignore_eos=True), SamplingParams(stop_token_ids=[4])]
    outputs = [[5, 5], [5, 5, 5], [1], []]
    got = Sampler.process_logits(logits, make_batch(params, outputs, eos=[2, 6]))
    assert torch.isinf(got[0, [2, 4, 6]]).all() and torch.isfinite(got[0, [0, 1, 3, 5, 7]]).all()
    assert torch.isfinite(got[1]).all()  # 3 tokens generated: stopping is allowed again
    assert torch.isinf(got[2, 4]) and torch.isfinite(got[2, [2, 6]]).all()  # ignore_eos leaves eos alone
    assert torch.isfinite(got[3]).all()
    # A row whose eos is by far the most likely still cannot pick it.
    logits[0, 2] = 50.0
    assert Sampler()(logits[:1], make_batch(params[:1], outputs[:1], eos=[2])).token_ids[0] != 2


def test_logits_processor_sees_only_its_row():
    calls = []

    def force_seven(output_ids, logits):
        calls.append((list(output_ids), tuple(logits.shape)))
        forced = torch.full_like(logits, NEG_INF)
        forced[7] = 0.0
        return forced

    logits = torch.randn(3, 16, generator=torch.Generator().manual_seed(5))
    params = [SamplingParams(), SamplingParams(logits_processors=[force_seven]), SamplingParams(temperature=0)]
    batch = make_batch(params, outputs=[[1], [2, 3], [4]])
    got = Sampler.process_logits(logits, batch)
    assert calls == [([2, 3], (16,))]
    torch.testing.assert_close(got[[0, 2]], logits[[0, 2]])
    assert Sampler()(logits, batch).token_ids[1] == 7


def run_seeded(seed: int, layouts: list[tuple[int, list[SamplingParams]]], steps: int = 25) -> list[int]:
    """Sample `steps` tokens for one seeded row placed among other rows; the layout changes every step."""
    target = SamplingParams(seed=seed, temperature=1.3, top_p=0.95, top_k=40, min_p=0.02, presence_penalty=0.5)
    generator = torch.Generator().manual_seed(seed)
    produced: list[int] = []
    for step in range(steps):
        position, others = layouts[step % len(layouts)]
        params = others[:position] + [target] + others[position:]
        rows = len(params)
        logits = torch.randn(rows, 64, generator=torch.Generator().manual_seed(1000 + step + 7 * rows))
        logits[position] = torch.randn(64, generator=torch.Generator().manual_seed(step))  # the row's own logits
        generators = [torch.Generator().manual_seed(99 + r) if p.seed is not None else None for r, p in
                      enumerate(params)]
        generators[position] = generator
        outputs = [list(range(step % 5)) for _ in params]
        outputs[position] = list(produced)
        out = Sampler()(logits, make_batch(params, outputs, generators=generators))
        produced.append(out.token_ids[position])
    return produced


def test_seeded_row_is_independent_of_the_batch():
    alone = run_seeded(1234, [(0, [])])
    other = [SamplingParams(), SamplingParams(temperature=0), SamplingParams(seed=7, top_p=0.5),
             SamplingParams(top_k=3, frequency_penalty=1.0, logprobs=2), SamplingParams(min_p=0.3, temperature=0.7)]
    layouts = [(0, other[:1]), (2, other[:3]), (5, other), (1, other[3:]), (3, other[::-1] * 2), (0, [])]
    torch.manual_seed(0)
    assert run_seeded(1234, layouts) == alone
    torch.manual_seed(1)  # the global RNG feeds the unseeded rows only
    assert run_seeded(1234, layouts[::-1]) == alone
    assert run_seeded(4321, [(0, [])]) != alone


def test_logprobs_are_raw_log_softmax_with_sorted_top_k_and_rank():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(6)) * 3
    params = [SamplingParams(logprobs=5, temperature=0.5, presence_penalty=2.0),
              SamplingParams(),
              SamplingParams(logprobs=3, top_k=10, logit_bias={0: 100.0}),
              SamplingParams(logprobs=0, temperature=0.0)]
    torch.manual_seed(0)
    out = Sampler()(logits.to(torch.bfloat16).float(), make_batch(params, outputs=[[1, 1], [], [], []]))
    reference = torch.log_softmax(logits.to(torch.bfloat16).float(), -1)
    assert out.logprobs[1] is None
    assert out.token_ids[2] == 0  # the bias decides the token, but the logprob is still the raw one
    for row, k in ((0, 5), (2, 3), (3, 0)):
        entry = out.logprobs[row]
        token = out.token_ids[row]
        assert entry.token_id == token
        assert entry.logprob == pytest.approx(reference[row, token].item(), abs=1e-6)
        assert entry.rank == int((reference[row] > reference[row, token]).sum()) + 1
        assert len(entry.top_token_ids) == len(entry.top_logprobs) == k
        assert entry.top_logprobs == sorted(entry.top_logprobs, reverse=True)
        assert entry.top_token_ids == reference[row].topk(k).indices.tolist()
        torch.testing.assert_close(torch.tensor(entry.top_logprobs), reference[row].topk(k).values)
    assert out.logprobs[3].rank == 1  # greedy picks the most likely token


def test_prompt_logprobs():
    logits = torch.randn(6, 20, generator=torch.Generator().manual_seed(7))
    targets = [3, 0, 19, 7, 7, 12]
    entries = compute_prompt_logprobs(logits, targets, k=2)
    reference = torch.log_softmax(logits, -1)
    for t, entry in enumerate(entries):
        assert entry.token_id == targets[t]
        assert math.isclose(entry.logprob, reference[t, targets[t]].item(), abs_tol=1e-6)
        assert entry.rank == int((reference[t] > reference[t, targets[t]]).sum()) + 1
        assert entry.top_token_ids == reference[t].topk(2).indices.tolist()


def test_input_logits_are_not_modified_and_flags_skip_work():
    logits = torch.randn(2, 10)
    before = logits.clone()
    params = [SamplingParams(repetition_penalty=2.0, logit_bias={1: 3.0}), SamplingParams(top_p=0.5)]
    Sampler()(logits, make_batch(params, outputs=[[1, 2], [3]]))
    assert torch.equal(logits, before)
    plain = make_batch([SamplingParams(), SamplingParams(temperature=0.8)])
    assert not (plain.penalty_rows or plain.has_masks or plain.all_greedy or plain.max_top_k)
    assert plain.no_top_p and plain.no_min_p
    greedy = make_batch([SamplingParams(temperature=0, top_p=0.3)])
    assert greedy.all_greedy and greedy.no_top_p and greedy.temperature.tolist() == [1.0]
