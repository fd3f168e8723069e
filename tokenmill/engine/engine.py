"""The synchronous engine: requests in, one `step()` at a time, RequestOutputs out.

    add_request(id, prompt ids, SamplingParams) -> one `Request` per sample (n, best_of), queued
    step():  schedule -> run the flat batch -> sample -> append tokens, detokenize, check stops -> outputs

A client request ("group") fans out into `best_of or n` sibling requests sharing the prompt; prefix
caching shares the prompt's KV blocks among them. Each sibling carries its own text state (incremental
detokenizer + stop strings) and, when seeded, its own torch.Generator (seed + index, like vLLM).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from tokenmill.config import EngineConfig
from tokenmill.engine.kv_cache import KVCacheManager
from tokenmill.engine.output import RequestTextState
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.runner import ModelRunner, kv_bytes_per_token
from tokenmill.engine.scheduler import Scheduler, SchedulerOutput
from tokenmill.errors import InvalidRequestError
from tokenmill.layers.sampler import Sampler, SamplingBatch, TokenLogprobs, compute_prompt_logprobs
from tokenmill.models.loader import load_model
from tokenmill.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.tokenizer.load import load_tokenizer, stop_token_ids

logger = logging.getLogger(__name__)

_DEFAULT_CPU_KV_BYTES = 1 << 30


@dataclass
class EngineStats:
    prompt_tokens_computed: int = 0
    """Prompt tokens run through the model (prefix-cache hits are not counted)."""
    generation_tokens: int = 0
    steps: int = 0


@dataclass
class _Group:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    children: list[Request]
    metrics: RequestMetrics
    logprob_totals: list[float]
    logprobs: list[list[dict[int, Logprob]]]
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    deltas: dict[int, tuple[str, list[int]]] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return all(c.status == RequestStatus.FINISHED for c in self.children)


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, **kwargs):
        config = config or EngineConfig(**kwargs)
        self.config = config
        loaded = load_model(config.model, config.dtype, config.device)
        self.model_config = loaded.config
        self.model_name = loaded.source.name
        self.tokenizer = load_tokenizer(loaded)
        if config.chat_template:
            from tokenmill.tokenizer.chat_template import load_chat_template

            self.tokenizer.chat_template = load_chat_template(config.chat_template)
        self.eos_token_ids = stop_token_ids(loaded, self.tokenizer)
        self.device = loaded.device
        self.max_model_len = config.max_model_len or loaded.config.max_position_embeddings
        per_token = kv_bytes_per_token(loaded.model, loaded.dtype)
        budget = config.kv_cache_memory or self._default_kv_bytes(loaded)
        num_blocks = budget // (per_token * config.block_size)
        if num_blocks * config.block_size < self.max_model_len:
            raise ValueError(
                f"the KV cache ({budget / 2**20:.0f} MiB = {num_blocks * config.block_size} tokens) cannot hold one "
                f"sequence of max_model_len={self.max_model_len}; raise kv_cache_memory or lower max_model_len")
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(loaded.model, num_blocks, config.block_size, loaded.dtype, self.device)
        self.sampler = Sampler()
        self.stats = EngineStats()
        self._groups: dict[str, _Group] = {}
        torch.manual_seed(config.seed)
        logger.info("engine ready: %s, %s, KV cache %d tokens (%d blocks x %d), max_model_len %d",
                    self.model_name, loaded.dtype, num_blocks * config.block_size, num_blocks, config.block_size,
                    self.max_model_len)

    def _default_kv_bytes(self, loaded) -> int:
        if self.device.type != "cuda":
            return _DEFAULT_CPU_KV_BYTES
        free, total = torch.cuda.mem_get_info(self.device)
        return max(int(free - total * (1 - self.config.gpu_memory_utilization)), 0)

    # ------------------------------------------------------------------ requests

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None) -> None:
        if request_id in self._groups:
            raise InvalidRequestError(f"request id {request_id!r} is already running")
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"prompt token id {bad} is out of range [0, {vocab})", param="prompt")
        max_tokens = self.resolve_max_tokens(len(prompt_token_ids), params.max_tokens)
        count = params.best_of or params.n
        children, metrics = [], RequestMetrics(time.monotonic(), num_prompt_tokens=len(prompt_token_ids))
        for i in range(count):
            child_params = params
            if params.best_of and params.best_of > params.n and params.logprobs is None:
                child_params = params.clone()  # best_of ranks samples by cumulative logprob: track it
                child_params.logprobs = 0
            child = Request(f"{request_id}#{i}", prompt_token_ids, max_tokens, child_params, group_id=request_id)
            if params.seed is not None:
                child.generator = torch.Generator(self.device).manual_seed(params.seed + i)
            child.state = RequestTextState(self.tokenizer, child_params, prompt_token_ids, self.eos_token_ids)
            children.append(child)
        group = _Group(request_id, prompt, prompt_token_ids, params, children, metrics,
                       [0.0] * count, [[] for _ in range(count)])
        for child in children:
            try:
                self.scheduler.add(child)
            except ValueError as e:
                for queued in children:
                    if queued.status != RequestStatus.FINISHED and queued in self.scheduler.waiting:
                        self.scheduler.finish(queued)
                raise InvalidRequestError(str(e), param="max_tokens") from e
        self._groups[request_id] = group

    def resolve_max_tokens(self, num_prompt: int, max_tokens: int | None) -> int:
        """The request's generation limit; InvalidRequestError when prompt + max_tokens exceed the context."""
        limit = self.max_model_len
        if max_tokens is None:
            if num_prompt >= limit:
                raise InvalidRequestError(
                    f"This model's maximum context length is {limit} tokens. However, your prompt has "
                    f"{num_prompt} tokens. Please reduce the length of the prompt.", param="messages")
            return limit - num_prompt
        if num_prompt + max_tokens > limit:
            raise InvalidRequestError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{num_prompt + max_tokens} tokens ({num_prompt} in the messages, {max_tokens} in the completion). "
                "Please reduce the length of the messages or completion.", param="max_tokens")
        return max_tokens

    def embed(self, sequences: list[list[int]]) -> list[list[float]]:
        """Embeddings of token sequences (mean-pooled final hidden states, L2-normalized), in batches that
        respect the step token budget. Runs between steps; it does not touch the KV cache."""
        for ids in sequences:
            if not ids:
                raise InvalidRequestError("an embedding input is empty", param="input")
            if len(ids) > self.max_model_len:
                raise InvalidRequestError(f"an embedding input has {len(ids)} tokens; this model's maximum "
                                          f"context length is {self.max_model_len} tokens", param="input")
            bad = next((t for t in ids if not 0 <= t < self.model_config.vocab_size), None)
            if bad is not None:
                raise InvalidRequestError(f"token id {bad} is out of range", param="input")
        out: list[list[float]] = []
        batch: list[list[int]] = []
        for ids in sequences + [None]:
            if ids is None or (batch and sum(map(len, batch)) + len(ids) > self.config.max_num_batched_tokens):
                if batch:
                    out.extend(self.runner.embed(batch).tolist())
                batch = []
            if ids is not None:
                batch.append(ids)
        return out

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its final output (finish_reason "abort")."""
        group = self._groups.pop(request_id, None)
        if group is None:
            return None
        for child in group.children:
            if child.status != RequestStatus.FINISHED:
                self.scheduler.finish(child)
                delta = child.state.finish("abort")
                group.deltas[int(child.request_id.rsplit("#", 1)[1])] = (delta.delta, [])
        return self._make_output(group)

    def unfinished_request_ids(self) -> list[str]:
        return list(self._groups)

    def has_unfinished_requests(self) -> bool:
        return bool(self._groups)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._groups)

    # ------------------------------------------------------------------ one step

    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        if out.is_empty:
            return []
        self.stats.steps += 1
        chunks = out.chunks
        tables = [self.kv.block_ids(c.request.request_id) for c in chunks]
        want_prompt = {i for i, c in enumerate(chunks) if self._wants_prompt_logprobs(c)}
        result = self.runner.execute(out, tables, want_prompt)
        for c in chunks:
            n_prompt = len(c.request.prompt_token_ids)
            self.stats.prompt_tokens_computed += max(0, min(c.start + c.num_tokens, n_prompt) - c.start)
        self.scheduler.advance(out)
        for i, logits in result.prompt_logits.items():
            self._record_prompt_logprobs(chunks[i], logits)
        touched: dict[str, _Group] = {}
        if result.sample_chunks:
            self._sample_and_append(out, result.sample_chunks, result.sample_logits, touched)
        return [self._finish_if_done(g) for g in touched.values()]

    def _sample_and_append(self, out: SchedulerOutput, rows: list[int], logits: torch.Tensor, touched) -> None:
        reqs = [out.chunks[i].request for i in rows]
        batch = SamplingBatch.from_params([r.params for r in reqs], [r.output_token_ids for r in reqs],
                                          [r.prompt_token_ids for r in reqs], [r.generator for r in reqs],
                                          self.eos_token_ids, self.device)
        sampled = self.sampler(logits, batch)
        now = time.monotonic()
        for row, req in enumerate(reqs):
            token = sampled.token_ids[row]
            req.output_token_ids.append(token)
            self.stats.generation_tokens += 1
            group = self._groups[req.group_id]
            index = int(req.request_id.rsplit("#", 1)[1])
            if group.metrics.first_token_time is None:
                group.metrics.first_token_time = now
                group.metrics.num_cached_tokens = req.num_cached_prompt_tokens
            step = req.state.append([token])
            if not step.finished and len(req.output_token_ids) >= req.max_tokens:
                extra = req.state.finish("length")
                step.delta += extra.delta
                step.finished = True
            lp = sampled.logprobs[row]
            if lp is not None and len(req.state.token_ids) == len(req.output_token_ids):
                group.logprob_totals[index] += lp.logprob
                if group.params.logprobs is not None:
                    group.logprobs[index].append(self._logprob_dict(lp))
            previous = group.deltas.get(index, ("", []))
            group.deltas[index] = (previous[0] + step.delta, previous[1] + [token])
            if step.finished:
                self.scheduler.finish(req)
            touched[group.request_id] = group

    def _finish_if_done(self, group: _Group) -> RequestOutput:
        if group.finished:
            self._groups.pop(group.request_id, None)
            group.metrics.finished_time = time.monotonic()
        return self._make_output(group)

    def _make_output(self, group: _Group) -> RequestOutput:
        completions = []
        for i, child in enumerate(group.children):
            state = child.state
            delta_text, delta_ids = group.deltas.pop(i, ("", []))
            keep_lp = group.params.logprobs is not None
            completions.append(CompletionOutput(
                index=i, text=state.text, token_ids=list(state.token_ids),
                cumulative_logprob=group.logprob_totals[i] if child.params.logprobs is not None else None,
                logprobs=group.logprobs[i] if keep_lp else None,
                finish_reason=state.finish_reason if child.status == RequestStatus.FINISHED else None,
                stop_reason=state.stop_reason, delta_text=delta_text, delta_token_ids=delta_ids))
        finished = group.finished
        if finished and len(completions) > group.params.n:  # best_of: keep the n most likely samples
            completions.sort(key=lambda c: c.cumulative_logprob or 0.0, reverse=True)
            completions = completions[:group.params.n]
            for i, c in enumerate(completions):
                c.index = i
                if group.params.logprobs is None:
                    c.cumulative_logprob = None
        group.metrics.num_generation_tokens = sum(len(c.output_token_ids) for c in group.children)
        return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, completions, finished,
                             group.prompt_logprobs, group.metrics)

    # ------------------------------------------------------------------ logprobs

    def _wants_prompt_logprobs(self, chunk) -> bool:
        req = chunk.request
        return (req.params.prompt_logprobs is not None and req.request_id.endswith("#0")
                and chunk.start < len(req.prompt_token_ids) and req.num_preemptions == 0)

    def _record_prompt_logprobs(self, chunk, logits: torch.Tensor) -> None:
        req = chunk.request
        group = self._groups[req.group_id]
        if group.prompt_logprobs is None:
            group.prompt_logprobs = [None]  # the first prompt token has no logprob
        prompt = req.prompt_token_ids
        end = min(chunk.start + chunk.num_tokens, len(prompt) - 1)  # row j predicts token j + 1
        if end <= chunk.start:
            return
        targets = prompt[chunk.start + 1:end + 1]
        entries = compute_prompt_logprobs(logits[:end - chunk.start], targets, req.params.prompt_logprobs)
        group.prompt_logprobs.extend(self._logprob_dict(e) for e in entries)

    def _logprob_dict(self, lp: TokenLogprobs) -> dict[int, Logprob]:
        decode = self.tokenizer.decode
        out = {lp.token_id: Logprob(lp.logprob, lp.rank, decode([lp.token_id], skip_special_tokens=False))}
        for rank, (tok, value) in enumerate(zip(lp.top_token_ids, lp.top_logprobs, strict=True), start=1):
            if tok not in out:
                out[tok] = Logprob(value, rank, decode([tok], skip_special_tokens=False))
        return out
