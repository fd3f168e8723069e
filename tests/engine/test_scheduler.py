"""Scheduler + KV cache driven by a fake runner that simulates the paged pool.

The fake runner writes each scheduled token into its cache slot (block table -> slot) and, before
"computing" a token, checks that every slot of the sequence's prefix holds the right token. So a bug in
block tables, prefix reuse, chunking or preemption-recompute shows up as a wrong slot, not a silent pass.
The fake model's next token is a deterministic function of the whole sequence, so outputs must not
depend on batching.
"""

from __future__ import annotations

import random

import pytest

from tokenmill.engine.kv_cache import KVCacheManager
from tokenmill.engine.request import Request
from tokenmill.engine.scheduler import Scheduler


def next_token(seq: list[int]) -> int:
    return (sum(seq[-3:]) * 31 + len(seq)) % 1000


def expected_output(prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(next_token(seq))
    return seq[len(prompt):]


class FakeRunner:
    def __init__(self, kv: KVCacheManager):
        self.kv = kv
        self.slots: dict[int, int] = {}  # slot -> token id written there
        self.steps = 0

    def _slot(self, req: Request, pos: int) -> int:
        table = self.kv.block_ids(req.request_id)
        return table[pos // self.kv.block_size] * self.kv.block_size + pos % self.kv.block_size

    def run(self, out) -> dict[str, int]:
        self.steps += 1
        sampled = {}
        for chunk in out.chunks:
            req = chunk.request
            tokens = req.all_token_ids
            for pos in range(chunk.start, chunk.start + chunk.num_tokens):
                self.slots[self._slot(req, pos)] = tokens[pos]
            # Attention reads every earlier slot: all must hold this sequence's tokens.
            for pos in range(chunk.start + chunk.num_tokens):
                assert self.slots.get(self._slot(req, pos)) == tokens[pos], (req.request_id, pos)
            if chunk.samples:
                sampled[req.request_id] = next_token(tokens)
        return sampled


def run_to_completion(sched: Scheduler, runner: FakeRunner, max_steps: int = 10_000, on_step=None):
    finished = {}
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return finished
        out = sched.schedule()
        assert out.num_batched_tokens <= sched.max_num_batched_tokens
        assert len(sched.running) <= sched.max_num_seqs
        if on_step:
            on_step(out)
        sampled = runner.run(out)
        sched.advance(out)
        for chunk in out.chunks:
            req = chunk.request
            if req.request_id in sampled:
                req.output_token_ids.append(sampled[req.request_id])
                if len(req.output_token_ids) == req.max_tokens:
                    sched.finish(req)
                    finished[req.request_id] = list(req.output_token_ids)
    raise AssertionError("did not finish")


def make_requests(n: int, seed: int, max_prompt: int = 60, max_out: int = 20) -> list[Request]:
    rng = random.Random(seed)
    return [Request(f"r{i}", [rng.randrange(1000) for _ in range(rng.randint(1, max_prompt))], rng.randint(1, max_out))
            for i in range(n)]


@pytest.mark.parametrize("num_blocks,budget,max_seqs", [(400, 64, 8), (40, 32, 16), (21, 16, 4), (30, 7, 32)])
def test_all_requests_complete_with_correct_tokens(num_blocks, budget, max_seqs):
    kv = KVCacheManager(num_blocks=num_blocks, block_size=4)
    sched = Scheduler(kv, max_num_seqs=max_seqs, max_num_batched_tokens=budget)
    reqs = make_requests(30, seed=num_blocks)
    for r in reqs:
        sched.add(r)
    finished = run_to_completion(sched, FakeRunner(kv))
    for r in reqs:
        assert finished[r.request_id] == expected_output(r.prompt_token_ids, r.max_tokens)
    assert kv.num_free_blocks == num_blocks  # everything freed


def test_small_pool_preempts_and_recomputes():
    kv = KVCacheManager(num_blocks=14, block_size=4)
    sched = Scheduler(kv, max_num_seqs=16, max_num_batched_tokens=64)
    reqs = make_requests(12, seed=3, max_prompt=20, max_out=30)
    for r in reqs:
        sched.add(r)
    finished = run_to_completion(sched, FakeRunner(kv))
    assert sched.num_preemptions > 0
    assert all(finished[r.request_id] == expected_output(r.prompt_token_ids, r.max_tokens) for r in reqs)


def test_chunked_prefill_runs_alongside_decodes():
    kv = KVCacheManager(num_blocks=100, block_size=4)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=10)
    short = Request("short", [1, 2, 3], 20)
    sched.add(short)
    mixed_steps = []

    def on_step(out):
        kinds = {c.request.request_id: c.num_tokens for c in out.chunks}
        if kinds.get("short") == 1 and kinds.get("long", 0) > 1:
            mixed_steps.append(kinds)

    sched.add(Request("long", list(range(95)), 3))
    run_to_completion(sched, FakeRunner(kv), on_step=on_step)
    assert len(mixed_steps) >= 5  # the 95-token prompt went in ~9-token chunks next to the decode


def test_second_pass_hits_prefix_cache():
    kv = KVCacheManager(num_blocks=200, block_size=4)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64)
    prompts = [r.prompt_token_ids for r in make_requests(10, seed=5, max_prompt=40)]
    for i, p in enumerate(prompts):
        sched.add(Request(f"a{i}", p, 4))
    runner = FakeRunner(kv)  # one simulated pool for both passes: the cached blocks' slots must hold the prefix
    run_to_completion(sched, runner)
    first_hits = kv.stats.hits
    computed = []
    for i, p in enumerate(prompts):
        sched.add(Request(f"b{i}", p, 4))
    run_to_completion(sched, runner, on_step=lambda out: computed.extend(c.num_tokens for c in out.chunks))
    expected_hits = sum((len(p) - 1) // 4 * 4 for p in prompts)
    assert kv.stats.hits - first_hits == expected_hits
    assert sum(computed) == sum(len(p) for p in prompts) - expected_hits + sum(3 for _ in prompts)


def test_siblings_wait_for_shared_prompt():
    kv = KVCacheManager(num_blocks=100, block_size=4)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=256)
    prompt = list(range(50))
    for i in range(3):
        sched.add(Request(f"s{i}", prompt, 5, group_id="g"))
    first = sched.schedule()
    assert [c.request.request_id for c in first.chunks] == ["s0"]
    runner = FakeRunner(kv)
    runner.run(first)
    sched.advance(first)
    first.chunks[0].request.output_token_ids.append(next_token(prompt))
    second = sched.schedule()
    starts = {c.request.request_id: c.start for c in second.chunks}
    assert starts["s1"] == starts["s2"] == 48  # 12 shared blocks hit; only the tail is recomputed


def test_request_larger_than_pool_is_rejected():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64)
    with pytest.raises(ValueError, match="whole pool holds 16"):
        sched.add(Request("big", list(range(10)), 7))


def test_finish_waiting_request_frees_nothing_twice():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    sched = Scheduler(kv, max_num_seqs=1, max_num_batched_tokens=64)
    a, b = Request("a", [1, 2, 3], 5), Request("b", [4, 5], 5)
    sched.add(a)
    sched.add(b)
    sched.schedule()
    sched.finish(b)  # aborted while waiting
    sched.finish(a)  # aborted while running
    assert kv.num_free_blocks == 8 and not sched.has_unfinished()
