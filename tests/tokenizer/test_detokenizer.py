"""IncrementalDetokenizer: streamed pieces rebuild `tokenizer.decode(ids)` exactly and never split a character.

Two vocabularies where characters span tokens: SmolLM2's byte-level BPE (a CJK character or an emoji is
often 2-4 byte tokens) and a SentencePiece BPE with byte fallback (`<0xE4>` tokens, '▁' spaces whose
decoding depends on the token before). Ids arrive in chunks of every size from 1 to 7.
"""

from __future__ import annotations

import random

import pytest

from tests.tokenizer.test_tokenizer import smollm, smollm_meta, spm_files, spm_tok  # noqa: F401 (fixtures)
from tokenmill.tokenizer import IncrementalDetokenizer

TEXTS = [
    "你好，世界！这是一个流式解码测试。",
    "emoji 😀🚀🔥 and a family 👨‍👩‍👧 then 🇫🇷 flags ✨ done",
    "Mixed: the model said 模型缓存 and 1,234 tokens 😀 ok.",
    "hello world the quick brown fox 你好世界 jumps 😀",
    "  leading spaces, tabs\t\tand\n\nnewlines  ",
    "ü é ñ — “quotes” … end",
]
CHUNKS = [1, 2, 3, 5, 7]


def _stream(tokenizer, ids, chunk, **kwargs):
    detok = IncrementalDetokenizer(tokenizer, **kwargs)
    pieces = [detok.add(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    pieces.append(detok.flush())
    assert detok.text == "".join(pieces)
    return pieces


@pytest.fixture(params=["smollm", "spm"])
def tok(request):
    return request.getfixturevalue("smollm" if request.param == "smollm" else "spm_tok")


def test_characters_span_tokens(tok):
    # Makes the tests below meaningful: some single tokens decode to half a character.
    ids = [i for text in TEXTS for i in tok.encode(text, add_special_tokens=False)]
    assert any("\ufffd" in tok.decode([i]) for i in ids)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_stream_rebuilds_decode(tok, chunk):
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        pieces = _stream(tok, ids, chunk)
        assert not any("\ufffd" in p for p in pieces), (text, pieces)
        assert "".join(pieces) == tok.decode(ids), text


def test_text_is_emitted_as_soon_as_stable(tok):
    ids = tok.encode("hello world 你好", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    for n, token in enumerate(ids, 1):
        detok.add([token])
        full = tok.decode(ids[:n])
        # Everything is out as soon as it decodes to whole characters; an unfinished one is held back.
        if full.endswith("\ufffd"):
            assert full.startswith(detok.text) and len(detok.text) < len(full)
        else:
            assert detok.text == full
    assert detok.flush() == ""


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(smollm, skip):  # noqa: F811
    ids = smollm.encode("<|im_start|>assistant\n你好 😀 world<|im_end|>\n<|im_start|>user\nok<|im_end|>")
    for chunk in CHUNKS:
        pieces = _stream(smollm, ids, chunk, skip_special_tokens=skip)
        assert "".join(pieces) == smollm.decode(ids, skip_special_tokens=skip)
        assert ("<|im_end|>" in "".join(pieces)) is not skip


@pytest.mark.parametrize("skip", [True, False])
def test_spm_special_tokens_and_leading_space(spm_tok, skip):  # noqa: F811
    # The decoder strips the first '▁' of what it decodes. A window whose context is only skipped special
    # tokens must not strip the space of the word after them ("hello</s> world" -> "hello world").
    eos, word = spm_tok.eos_token_id, spm_tok.encode("world", add_special_tokens=False)
    cases = [
        spm_tok.encode("hello", add_special_tokens=False) + [eos] + word,
        [eos, eos] + word + [eos] + word,
        word + word[:1] + [3, 3] + word,  # 3 is <|im_start|>, a user-defined (non-special) token
        spm_tok.encode("<|im_start|>你好 😀<|im_end|>"),
    ]
    for ids in cases:
        for chunk in CHUNKS:
            assert "".join(_stream(spm_tok, ids, chunk, skip_special_tokens=skip)) == spm_tok.decode(ids, skip)


def test_prompt_context(tok):
    # With prompt_ids the text is what the generated ids add to the decoded prompt (vLLM's behaviour): for
    # SentencePiece the first generated '▁word' keeps its space, which decode(generated) alone strips.
    prompt = tok.encode("the capital is")
    for text in TEXTS:
        gen = tok.encode(" " + text.strip(), add_special_tokens=False)
        for chunk in CHUNKS:
            streamed = "".join(_stream(tok, gen, chunk, prompt_ids=prompt))
            assert tok.decode(prompt) + streamed == tok.decode(prompt + gen)


def test_random_token_streams(tok):
    # Random ids (special and byte tokens included) in random chunk sizes: exact whenever the ids decode
    # to valid text (sentencepiece's ByteFallback rewrites a whole invalid byte run, which no stream can undo).
    rng = random.Random(0)
    vocab = tok.vocab_size
    whole = [i for i in range(vocab) if "\ufffd" not in tok.decode([i], skip_special_tokens=False)]
    checked = 0
    for _ in range(300):
        # Mostly tokens that are whole characters, so that most streams decode to valid text.
        ids = [rng.choice(whole) if rng.random() < 0.8 else rng.randrange(vocab) for _ in range(rng.randint(1, 30))]
        if "\ufffd" in tok.decode(ids, skip_special_tokens=False):
            continue
        for skip in (True, False):
            detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
            i, pieces = 0, []
            while i < len(ids):
                n = rng.randint(1, 4)
                pieces.append(detok.add(ids[i : i + n]))
                i += n
            pieces.append(detok.flush())
            assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip), ids
        checked += 1
    assert checked > 50


class _CountingTokenizer:
    """Records the longest id list decode() is given."""

    def __init__(self, inner):
        self.inner, self.longest = inner, 0

    def decode(self, ids, skip_special_tokens=True):
        self.longest = max(self.longest, len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def test_work_per_token_is_bounded(smollm):  # noqa: F811
    counting = _CountingTokenizer(smollm)
    ids = smollm.encode(" ".join(TEXTS) * 40, add_special_tokens=False)
    assert len(ids) > 1000
    prompt, generated = ids[:100], ids[100:]
    detok = IncrementalDetokenizer(counting, prompt_ids=prompt)
    for token in generated:
        detok.add([token])
    assert smollm.decode(prompt) + detok.text + detok.flush() == smollm.decode(ids)
    assert counting.longest <= 8  # a window of a few tokens, never the whole text
