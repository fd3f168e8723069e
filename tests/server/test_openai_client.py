"""The official `openai` SDK against the server: chat, streaming, completions, models, base_url forms."""

from __future__ import annotations

import asyncio

import openai
import pytest


@pytest.fixture(scope="module", params=["/v1", ""])
def client(server, request):
    return openai.OpenAI(base_url=server.url + request.param, api_key="unused")


def test_models(client):
    models = client.models.list().data
    assert models[0].id == "SmolLM2-135M-Instruct"
    assert client.models.retrieve(models[0].id).id == models[0].id


def test_chat_and_stream_give_the_same_text(client):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(model="anything", messages=messages, temperature=0, max_tokens=24)
    choice = reply.choices[0]
    assert "Paris" in choice.message.content and choice.message.role == "assistant"
    assert reply.id.startswith("chatcmpl-") and reply.usage.completion_tokens > 0
    stream = client.chat.completions.create(model="anything", messages=messages, temperature=0, max_tokens=24,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == reply.usage.total_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason


def test_multi_turn(client):
    messages = [{"role": "user", "content": "My name is Ada."},
                {"role": "assistant", "content": "Nice to meet you, Ada!"},
                {"role": "user", "content": "What is my name?"}]
    reply = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=16)
    assert reply.choices[0].message.content


def test_seeded_sampling_is_reproducible_streamed_or_not(client):
    args = dict(model="m", messages=[{"role": "user", "content": "Tell me a story."}], temperature=1.0, seed=42,
                max_tokens=20)
    a = client.chat.completions.create(**args).choices[0].message.content
    b = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **args)
                if c.choices)
    assert a == b


def test_completions_with_logprobs(client):
    out = client.completions.create(model="m", prompt=["The capital of France is", "1, 2, 3,"], max_tokens=5,
                                    temperature=0, logprobs=2)
    assert len(out.choices) == 2 and out.id.startswith("cmpl-")
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 5
    assert all(len(t) <= 2 and max(t.values()) <= 0 for t in lp.top_logprobs)
    assert "".join(lp.tokens) == out.choices[0].text


def test_chat_logprobs(client):
    out = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                         temperature=0, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content)


def test_32_concurrent_streams_match_non_streamed(server):
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused")
    prompts = [f"Count from {i} to {i + 5}." for i in range(32)]

    async def one(p):
        args = dict(model="m", messages=[{"role": "user", "content": p}], temperature=0, max_tokens=16)
        full = (await client.chat.completions.create(**args)).choices[0].message.content
        parts = [c.choices[0].delta.content or "" async for c in await client.chat.completions.create(
            stream=True, **args) if c.choices]
        return full, "".join(parts)

    async def main():
        return await asyncio.gather(*(one(p) for p in prompts))

    results = asyncio.run(main())
    assert len(results) == 32
    mismatched = [i for i, (full, streamed) in enumerate(results) if full != streamed]
    assert not mismatched, f"streamed text differs for prompts {mismatched}"


def test_embeddings(client):
    import numpy as np

    out = client.embeddings.create(model="m", input=["The cat sat on the mat.", "A cat was sitting on a rug.",
                                                     "Quarterly revenue grew by 4%."])
    vecs = np.array([d.embedding for d in out.data])
    assert vecs.shape == (3, 576) and np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert out.usage.prompt_tokens > 0 and [d.index for d in out.data] == [0, 1, 2]
    # The SDK asks for base64 by default when numpy is around; both encodings must agree.
    raw = client.embeddings.create(model="m", input="The cat sat on the mat.", encoding_format="float")
    assert np.allclose(raw.data[0].embedding, vecs[0], atol=1e-5)
    # Similar sentences are closer than unrelated ones.
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2]


def test_beam_search_through_the_server(server):
    """vLLM's extra fields select beam search; the result equals the offline LLM's beam search."""
    import httpx

    body = {"prompt": "The best thing about mills is", "max_tokens": 8, "use_beam_search": True, "num_beams": 3,
            "n": 2, "temperature": 0}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert len(choices) == 2 and choices[0]["text"] != choices[1]["text"]
    stream = httpx.post(server.url + "/v1/completions", json={**body, "stream": True}, timeout=30)
    assert stream.status_code == 400 and stream.json()["error"]["param"] == "stream"


def test_chinese_streams_without_broken_characters(client):
    stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "请用中文介绍一下长城。"}],
                                            temperature=0, max_tokens=40, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert all("\ufffd" not in p for p in pieces) and any(p.strip() for p in pieces)
