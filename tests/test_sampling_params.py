"""SamplingParams: vLLM defaults, validation that names the bad field, normalization of OpenAI-shaped input."""

from __future__ import annotations

import pytest

from tokenmill.sampling_params import SamplingParams, SamplingType


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.best_of, p.temperature, p.top_p, p.top_k, p.min_p) == (1, None, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.prompt_logprobs, p.seed) == (16, 0, None, None, None)
    assert p.stop == [] and p.stop_token_ids == [] and p.all_stop_token_ids == set()
    assert p.skip_special_tokens and p.spaces_between_special_tokens and p.detokenize
    assert not (p.ignore_eos or p.include_stop_str_in_output or p.use_beam_search)
    assert p.sampling_type == SamplingType.RANDOM


@pytest.mark.parametrize("field, value", [
    ("n", 0), ("n", 1.5), ("best_of", 0), ("presence_penalty", 2.5), ("presence_penalty", -2.1),
    ("frequency_penalty", 3), ("frequency_penalty", float("nan")), ("repetition_penalty", 0.0),
    ("repetition_penalty", -1), ("temperature", -1), ("temperature", float("inf")), ("temperature", "hot"),
    ("top_p", 0.0), ("top_p", 1.01), ("top_k", -2), ("top_k", 2.0), ("min_p", -0.1), ("min_p", 1.5),
    ("seed", "42"), ("max_tokens", 0), ("min_tokens", -1), ("logprobs", -1), ("prompt_logprobs", -1),
    ("stop", 5), ("stop", ["a", 3]), ("stop_token_ids", [-1]), ("stop_token_ids", 7), ("logit_bias", {"x": 1.0}),
    ("logit_bias", {-3: 1.0}), ("logit_bias", {3: "big"}), ("logit_bias", [1, 2]), ("allowed_token_ids", []),
    ("allowed_token_ids", [1, -2]), ("logits_processors", [42]), ("num_beams", 0), ("early_stopping", "soon"),
    ("length_penalty", float("nan")),
])
def test_bad_value_raises_value_error_naming_its_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_cross_field_checks():
    with pytest.raises(ValueError, match="temperature must be >= 0, got -1"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="best_of"):
        SamplingParams(n=3, best_of=2)
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)
    SamplingParams(max_tokens=None, min_tokens=5)  # no limit: any min_tokens
    with pytest.raises(ValueError, match="num_beams"):
        SamplingParams(n=4, num_beams=2)


def test_logit_bias_string_keys_are_converted_and_values_clamped():
    p = SamplingParams(logit_bias={"50256": -250, "7": 3, 9: 100.5})
    assert p.logit_bias == {50256: -100.0, 7: 3.0, 9: 100.0}
    assert all(isinstance(k, int) and isinstance(v, float) for k, v in p.logit_bias.items())
    assert SamplingParams(logit_bias={}).logit_bias is None


def test_stop_normalization():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop=["", "x"]).stop == ["x"]  # an empty stop string would end before any text
    assert SamplingParams(stop_token_ids=(5, 6)).stop_token_ids == [5, 6]


def test_sampling_type_and_greedy_resets_truncation():
    g = SamplingParams(temperature=0.0, top_p=0.5, top_k=7, min_p=0.3)
    assert g.sampling_type == SamplingType.GREEDY and (g.top_p, g.top_k, g.min_p) == (1.0, 0, 0.0)
    assert SamplingParams(top_k=1).sampling_type == SamplingType.GREEDY
    assert SamplingParams(seed=3).sampling_type == SamplingType.RANDOM_SEED
    assert SamplingParams(top_k=-1).top_k == 0


def test_stop_ids_with_eos():
    p = SamplingParams(stop_token_ids=[9])
    assert p.stopping_token_ids([2, 3]) == {2, 3, 9}
    assert SamplingParams(stop_token_ids=[9], ignore_eos=True).stopping_token_ids([2]) == {9}


def test_verify_token_ids_against_vocab():
    SamplingParams(logit_bias={"99": 1}).verify_token_ids(100)
    for kwargs in ({"logit_bias": {"100": 1}}, {"allowed_token_ids": [3, 100]}, {"stop_token_ids": [100]}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            SamplingParams(**kwargs).verify_token_ids(100)


def test_beam_search_fields():
    assert SamplingParams(num_beams=4).use_beam_search
    assert not SamplingParams(num_beams=1).use_beam_search
    p = SamplingParams(use_beam_search=True, n=2, best_of=5, early_stopping="never", length_penalty=0.5)
    assert p.num_beams == 5 and p.early_stopping == "never"


def test_clone_is_deep_and_clones_stateful_processors():
    class Matcher:
        def __init__(self):
            self.state = []

        def __call__(self, output_ids, logits):
            return logits

        def clone(self):
            return Matcher()

    def plain(output_ids, logits):
        return logits

    matcher = Matcher()
    p = SamplingParams(stop=["x"], logit_bias={1: 2.0}, logits_processors=[matcher, plain])
    q = p.clone()
    assert q == SamplingParams(stop=["x"], logit_bias={1: 2.0}, logits_processors=q.logits_processors)
    q.stop.append("y")
    q.logit_bias[5] = 1.0
    assert p.stop == ["x"] and p.logit_bias == {1: 2.0}
    assert isinstance(q.logits_processors[0], Matcher) and q.logits_processors[0] is not matcher
    assert q.logits_processors[1] is plain
