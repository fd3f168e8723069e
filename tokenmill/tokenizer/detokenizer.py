"""Streaming detokenization: token ids in, stable text deltas out.

Decoding one token at a time is wrong in two ways: a character can be spread over several tokens
(byte-level BPE bytes, SentencePiece `<0xE4>` byte-fallback tokens), and a token's text can depend on
the token before it (SentencePiece's decoder strips the space of the *first* '▁word' it sees). So, as in
vLLM, we decode a short window of ids and emit only what it adds past the text already emitted:

    ids:   ... | prefix_offset ......... read_offset | new ids
                 └ context: already emitted ┘          └ text to emit ┘
    delta = decode(ids[prefix_offset:]) minus decode(ids[prefix_offset:read_offset])

While the window's text ends in U+FFFD (an unfinished UTF-8 character) the new ids are held back.
Each call decodes O(window) tokens, never the whole text. `flush()` emits what is still held at the end.

The invariant the tests check: with no `prompt_ids`, `"".join(pieces) + flush() == tokenizer.decode(ids)`
whenever the ids decode to valid UTF-8. (An invalid byte run is the one exception: sentencepiece's
ByteFallback decoder turns the *whole* run into U+FFFD, including bytes already emitted as text.)
"""

from __future__ import annotations

# Prompt tokens kept as context when `prompt_ids` is given: enough for a multi-byte character and a space.
_PROMPT_CONTEXT = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Decode one request's generated ids as they arrive."""

    def __init__(self, tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True):
        """`prompt_ids`, when given, are context only: the text is then what the generated ids add to the
        decoded prompt (vLLM's behaviour), so a SentencePiece model's first '▁word' keeps its space
        ("The capital is" + " Paris"), which `tokenizer.decode(generated)` strips. Leave it None to get
        exactly `tokenizer.decode(generated)`."""
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        context = list(prompt_ids[-_PROMPT_CONTEXT:]) if prompt_ids else []
        self._ids: list[int] = context  # context + generated ids; only the tail from prefix_offset is read
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text = self._decode(0, self._read_offset)
        self.text = ""  # everything emitted so far

    def add(self, token_ids: list[int]) -> str:
        """Append generated ids; return the text that became stable (possibly "")."""
        self._ids.extend(token_ids)
        window = self._decode(self._prefix_offset, len(self._ids))
        if window.endswith(_REPLACEMENT) or len(window) < len(self._prefix_text):
            return ""  # an unfinished character: wait for its remaining bytes
        return self._advance(window)

    def flush(self) -> str:
        """The text still held back (an unfinished character at the very end); call once, at the end."""
        window = self._decode(self._prefix_offset, len(self._ids))
        if len(window) <= len(self._prefix_text):
            return ""
        return self._advance(window)

    def _advance(self, window: str) -> str:
        delta = window[len(self._prefix_text) :]
        if delta:
            # The next window starts at the first id not yet in the context. Only when those ids produced
            # text: the context must decode to something, or a decoder that strips the window's first space
            # (SentencePiece) would strip it from the new text instead.
            self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        self.text += delta
        return delta

    def _decode(self, start: int, end: int) -> str:
        if start >= end:
            return ""
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip)
