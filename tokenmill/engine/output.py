"""Per-request output text: generated token ids in, the text deltas a client sees and the stop decision out.

The engine keeps one `RequestTextState` per request and calls `append(new_ids)` once per step. Each id is
handled on its own, so the result never depends on how ids were grouped (speculative / multi-token steps):

    id ─► token_ids ─► stop token? (eos unless ignore_eos, or stop_token_ids; from output token #min_tokens on)
       │     yes ─► finish "stop" (stop_reason = the id, None for eos): the id stays in token_ids, not in the text
       ▼
       IncrementalDetokenizer.add ─► new text (whole characters; prompt tail as context, as streaming shows it)
       ▼
       context (last longest-stop - 1 chars: emitted tail + held) + new text ─► stop strings ending in the new text
       │     found ─► cut before the stop string (after it with include_stop_str_in_output), drop the rest,
       │              finish "stop" (stop_reason = the string; the earliest-starting match wins)
       ▼
       hold back the longest suffix that is a proper prefix of a stop string; emit the rest as this step's delta
       ▼
       max_tokens reached? ─► finish "length": flush the detokenizer and the held text

Held text is always resolved: a later step either completes the stop string (cut) or breaks it (emitted), and
`finish()` / "length" emit what is left. So the deltas joined are exactly `text`, and no piece of a stop string
that ends up cut is ever streamed. Every step works on O(longest stop string + new text) characters.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.tokenizer.detokenizer import IncrementalDetokenizer

STOP, LENGTH, ABORT = "stop", "length", "abort"


@dataclass(slots=True)
class StepText:
    """What one `append` / `finish` call produced for the client."""

    delta: str  # new text to send; all deltas of a request joined == RequestTextState.text
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" once finished
    stop_reason: int | str | None  # the stop token id or stop string that ended it; None for eos and the rest


class RequestTextState:
    """Text, token ids and stop state of one request's output.

    `params` is any object with SamplingParams' `stop`, `stop_token_ids`, `include_stop_str_in_output`,
    `ignore_eos`, `max_tokens`, `min_tokens`, `skip_special_tokens` and `detokenize`.
    """

    def __init__(self, tokenizer, params, prompt_ids: list[int], eos_token_ids: list[int]):
        self._min_tokens = params.min_tokens or 0
        self._max_tokens = params.max_tokens
        self._eos = frozenset() if params.ignore_eos else frozenset(eos_token_ids)
        self._stop_ids = frozenset(params.stop_token_ids or ())
        self._detok = (
            IncrementalDetokenizer(tokenizer, prompt_ids=prompt_ids, skip_special_tokens=params.skip_special_tokens)
            if params.detokenize
            else None
        )
        # Without text there is nothing to match. SamplingParams rejects "", which would match everywhere.
        self._stops = [s for s in (params.stop or ()) if s] if self._detok is not None else []
        self._include_stop = params.include_stop_str_in_output
        # A match can start at most this many characters before the new text.
        self._window = max(map(len, self._stops), default=1) - 1
        # With include_stop_str_in_output nothing is held: text up to a stop string's end is output anyway,
        # and a match always ends in new text, so what was emitted is still a prefix of the final text.
        self._prefixes = set() if self._include_stop else {s[:k] for s in self._stops for k in range(1, len(s))}
        self._held = ""  # decoded but not yet emitted: a suffix that may begin a stop string
        self.text = ""  # everything emitted so far
        self.token_ids: list[int] = []
        self.finished = False
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    def append(self, token_ids: list[int]) -> StepText:
        """Add this step's new ids; ids after the one that ends the request are dropped."""
        if self.finished:
            raise RuntimeError(f"append() on a request that already finished ({self.finish_reason})")
        pieces = []
        for token_id in token_ids:
            pieces.append(self._append_one(token_id))
            if self.finished:
                break
        return self._step("".join(pieces))

    def finish(self, reason: str) -> StepText:
        """The request ended for another reason ("abort", or "length" at the model's context limit): emit the
        held text. A no-op on a request that already finished."""
        if self.finished:
            return self._step("")
        return self._step(self._close(reason, None))

    # ---- one id ---------------------------------------------------------------------------------

    def _append_one(self, token_id: int) -> str:
        # vLLM's min_tokens: stop tokens and stop strings count only from output token #min_tokens (0-based),
        # the same tokens the sampler stops masking them for.
        can_stop = len(self.token_ids) >= self._min_tokens
        self.token_ids.append(token_id)
        if can_stop and (token_id in self._eos or token_id in self._stop_ids):
            return self._close(STOP, None if token_id in self._eos else token_id)
        delta = self._add_text(self._detok.add([token_id]), can_stop) if self._detok is not None else ""
        if not self.finished and self._max_tokens is not None and len(self.token_ids) >= self._max_tokens:
            delta += self._close(LENGTH, None)
        return delta

    def _add_text(self, new: str, search: bool) -> str:
        """Take newly decoded text; return what can be emitted now. Finishes the request on a stop string."""
        # context = the last `_window` chars of everything decoded so far (emitted tail + held text).
        # `emitted` of them were already sent; len(held) <= _window, as it is a proper prefix of a stop string.
        room = self._window - len(self._held)
        context = (self.text[-room:] if room > 0 else "") + self._held
        emitted = len(context) - len(self._held)
        buf = context + new
        match = self._find_stop(buf, len(context)) if search and new else None
        if match is not None:
            start, stop = match
            # cut >= emitted. Without include: a match's part before `new` is a suffix of the decoded text and a
            # proper prefix of `stop`, so it lies within the held text (the longest such suffix). With include:
            # the match ends in `new`.
            cut = start + len(stop) if self._include_stop else start
            self._held = ""
            self._set_finished(STOP, stop)
            return self._emit(buf[emitted:cut])
        keep = min(self._held_length(buf), len(buf) - emitted)
        self._held = buf[len(buf) - keep :]
        return self._emit(buf[emitted : len(buf) - keep])

    def _find_stop(self, buf: str, new_from: int) -> tuple[int, str] | None:
        """The stop string match that ends past `new_from` and starts earliest (shortest on a tie)."""
        best: tuple[int, str] | None = None
        for stop in self._stops:
            # Matches ending before the new text were looked for in earlier steps.
            i = buf.find(stop, max(0, new_from - len(stop) + 1))
            if i >= 0 and (best is None or (i, len(stop)) < (best[0], len(best[1]))):
                best = (i, stop)
        return best

    def _held_length(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of some stop string."""
        if not self._prefixes:
            return 0
        for k in range(min(self._window, len(buf)), 0, -1):
            if buf[-k:] in self._prefixes:
                return k
        return 0

    def _close(self, reason: str, stop_reason: int | str | None) -> str:
        # flush() yields only a trailing unfinished character (U+FFFD), which no stop string is looked for in.
        tail = self._detok.flush() if self._detok is not None else ""
        delta = self._emit(self._held + tail)
        self._held = ""
        self._set_finished(reason, stop_reason)
        return delta

    def _emit(self, delta: str) -> str:
        self.text += delta
        return delta

    def _set_finished(self, reason: str, stop_reason: int | str | None) -> None:
        self.finished, self.finish_reason, self.stop_reason = True, reason, stop_reason

    def _step(self, delta: str) -> StepText:
        return StepText(delta, self.finished, self.finish_reason, self.stop_reason)
