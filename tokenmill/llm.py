"""Offline batch generation: `LLM(model).generate(prompts, SamplingParams(...))`, vLLM's interface.

    prompts (text, token ids, or {"prompt": ..} / {"prompt_token_ids": ..} dicts)
      -> tokenize -> engine.add_request for all -> engine.step() until done (progress bar) -> outputs in input order
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from tokenmill.config import EngineConfig
from tokenmill.engine.beam_search import beam_search, to_request_output
from tokenmill.engine.engine import LLMEngine
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

PromptType = str | list[int] | dict
logger = logging.getLogger(__name__)


class LLM:
    """An engine for offline use. Keyword arguments are `EngineConfig` fields (vLLM's names)."""

    def __init__(self, model: str | None = None, **kwargs: Any):
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.tokenizer

    # ------------------------------------------------------------------ generate

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        items = self._as_prompt_list(prompts)
        params = self._params_list(sampling_params, len(items))
        encoded = [self._encode(p) for p in items]
        beams = [i for i, p in enumerate(params) if p.use_beam_search]
        if not beams:
            return self._run(encoded, params, use_tqdm)
        rest = [i for i in range(len(items)) if i not in set(beams)]
        results: list[RequestOutput | None] = [None] * len(items)
        for i, out in zip(rest, self._run([encoded[i] for i in rest], [params[i] for i in rest], use_tqdm),
                          strict=True):
            results[i] = out
        for i in beams:
            results[i] = self._beam_search_one(encoded[i], params[i])
        return results

    def beam_search(self, prompts: PromptType | Sequence[PromptType], params: SamplingParams) -> list[RequestOutput]:
        """Beam search (transformers' semantics): `params.num_beams` wide, the `params.n` best beams returned."""
        return [self._beam_search_one(self._encode(p), params) for p in self._as_prompt_list(prompts)]

    def _beam_search_one(self, encoded: tuple[str | None, list[int]], params: SamplingParams) -> RequestOutput:
        text, ids = encoded
        beams = beam_search(self.engine, ids, params)
        return to_request_output(self.engine, str(next(self._ids)), text, ids, beams, params)

    # ------------------------------------------------------------------ internals

    def _run(self, encoded: list[tuple[str | None, list[int]]], params: list[SamplingParams],
             use_tqdm: bool) -> list[RequestOutput]:
        engine = self.engine
        order = {}
        for (text, ids), p in zip(encoded, params, strict=True):
            request_id = str(next(self._ids))
            engine.add_request(request_id, ids, p, prompt=text)
            order[request_id] = len(order)
        results: list[RequestOutput | None] = [None] * len(order)
        bar = tqdm(total=len(order), desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm)
        start, in_tokens, out_tokens = time.perf_counter(), 0, 0
        try:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        results[order[output.request_id]] = output
                        in_tokens += len(output.prompt_token_ids)
                        out_tokens += sum(len(c.token_ids) for c in output.outputs)
                        elapsed = time.perf_counter() - start
                        bar.set_postfix_str(f"est. speed input: {in_tokens / elapsed:.2f} toks/s, "
                                            f"output: {out_tokens / elapsed:.2f} toks/s", refresh=False)
                        bar.update(1)
        finally:
            bar.close()
            for request_id in list(order):  # an exception mid-run must not leave requests holding blocks
                engine.abort_request(request_id)
        cache = engine.kv.stats
        logger.info("%d prompts: %d prompt + %d output tokens in %.1fs; prefix cache hit rate %.1f%% (%d of %d tokens)",
                    len(order), in_tokens, out_tokens, time.perf_counter() - start,
                    100 * cache.hits / max(cache.queries, 1), cache.hits, cache.queries)
        return results

    def _encode(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        return None, list(prompt)

    @staticmethod
    def _as_prompt_list(prompts) -> list[PromptType]:
        if isinstance(prompts, str | dict):
            return [prompts]
        prompts = list(prompts)
        if prompts and isinstance(prompts[0], int):  # one prompt given as token ids
            return [prompts]
        return prompts

    @staticmethod
    def _params_list(params, count: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams() for _ in range(count)]
        if isinstance(params, SamplingParams):
            return [params] * count
        params = list(params)
        if len(params) != count:
            raise ValueError(f"got {len(params)} SamplingParams for {count} prompts")
        return params

    def _require_template(self) -> str:
        if self.tokenizer.chat_template is None:
            raise ValueError("this model has no chat template; pass chat_template=...")
        return self.tokenizer.chat_template
