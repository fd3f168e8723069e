"""AsyncLLMEngine: concurrent streams equal the synchronous results; a consumer that stops aborts."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.engine.async_engine import AsyncLLMEngine
from tokenmill.errors import InvalidRequestError


@pytest.fixture(scope="module")
def llm():
    return LLM(max_num_seqs=16)


def test_concurrent_streams_match_sync_and_abort_frees(llm):
    prompts = [llm.tokenizer.encode(f"Write a sentence about the number {i}.") for i in range(8)]
    params = SamplingParams(temperature=0, max_tokens=16)
    expected = [o.outputs[0].text for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                         use_tqdm=False)]
    kv = llm.engine.kv
    engine = AsyncLLMEngine(llm.engine)

    async def collect(i, ids):
        text, last = "", None
        async for out in engine.generate(ids, params, f"req{i}"):
            text += out.outputs[0].delta_text
            last = out
        assert last.finished and text == last.outputs[0].text
        return text

    async def stop_early(ids):
        stream = engine.generate(ids, SamplingParams(max_tokens=200, ignore_eos=True), "quitter")
        async with contextlib.aclosing(stream):
            seen = 0
            async for _ in stream:
                seen += 1
                if seen == 3:
                    break  # the consumer goes away mid-stream

    async def main():
        texts = await asyncio.gather(*(collect(i, p) for i, p in enumerate(prompts)), stop_early(prompts[0]))
        with pytest.raises(InvalidRequestError, match="maximum context length"):
            async for _ in engine.generate([1] * 10, SamplingParams(max_tokens=10**6), "too-long"):
                pass
        for _ in range(100):  # the abort is applied by the engine thread
            if not llm.engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.02)
        return texts[:-1]

    try:
        assert asyncio.run(main()) == expected
    finally:
        engine.shutdown()
    assert not llm.engine.has_unfinished_requests()
    assert kv.num_free_blocks == kv.num_blocks
