"""LMDeploy's /v1/chat/interactive: sessions keep the conversation, earlier turns come from the prefix cache,
NDJSON streaming, session end and cancel, OpenAI-shaped 400s. The session store is also tested on its own."""

from __future__ import annotations

import json

import httpx
import pytest

from tokenmill.server.interactive import InteractiveRequest, SessionStore, conversation

URL = "/v1/chat/interactive"
GREEDY = {"temperature": 0, "request_output_len": 12}
EMPTY = {"text": "", "tokens": 0, "input_tokens": 0, "history_tokens": 0, "finish_reason": "stop"}


def post(server, **body) -> dict:
    r = httpx.post(server.url + URL, json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def rendered_len(server, messages: list[dict]) -> int:
    return httpx.post(server.url + "/tokenize", json={"messages": messages}, timeout=30).json()["count"]


def test_ten_turns_keep_history_and_reuse_the_prefix_cache(server):
    session_id, messages, history, sent = 9001, [], 0, 0
    computed_before = server.metric("prompt_tokens_total")
    for i in range(10):
        question = f"Question {i + 1}: name one animal that starts with the letter {'ABCDEFGHIJ'[i]}."
        out = post(server, prompt=question, session_id=session_id, interactive_mode=True, **GREEDY)
        messages.append({"role": "user", "content": question})
        # The server renders the whole conversation: the history it kept plus this turn.
        assert out["history_tokens"] == history and (i == 0 or history > 0)
        assert out["input_tokens"] == rendered_len(server, messages) > history
        assert 0 < out["tokens"] <= 12 and out["finish_reason"] in ("stop", "length")
        history = out["input_tokens"] + out["tokens"]
        messages.append({"role": "assistant", "content": out["text"]})
        sent += out["input_tokens"]
    computed = server.metric("prompt_tokens_total") - computed_before
    # Without the prefix cache every turn would recompute the conversation: `sent` tokens in all.
    assert computed < 0.4 * sent, (computed, sent)
    post(server, prompt="", session_id=session_id, request_output_len=0)  # end it


def test_stream_lines_rebuild_the_text(server):
    body = {"prompt": "What is the capital of France?", **GREEDY}
    full = post(server, **body)
    with httpx.stream("POST", server.url + URL, json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert "".join(line["text"] for line in lines) == full["text"] and full["text"]
    assert [line["finish_reason"] for line in lines[:-1]] == [None] * (len(lines) - 1)
    last = lines[-1]
    assert (last["finish_reason"], last["tokens"], last["input_tokens"], last["history_tokens"]) == (
        full["finish_reason"], full["tokens"], full["input_tokens"], 0)


def test_non_interactive_ends_the_session(server):
    session_id = 9002
    first = post(server, prompt="My name is Ada.", session_id=session_id, interactive_mode=True, **GREEDY)
    assert first["history_tokens"] == 0
    # Answered with the history, then the session ends.
    second = post(server, prompt="What is my name?", session_id=session_id, interactive_mode=False, **GREEDY)
    assert second["history_tokens"] == first["input_tokens"] + first["tokens"]
    third = post(server, prompt="What is my name?", session_id=session_id, interactive_mode=True, **GREEDY)
    assert third["history_tokens"] == 0
    # LMDeploy's end-session request: empty prompt, request_output_len 0, not interactive.
    assert post(server, prompt="", session_id=session_id, request_output_len=0) == EMPTY
    assert post(server, prompt="Hi", session_id=session_id, interactive_mode=True, **GREEDY)["history_tokens"] == 0
    assert post(server, prompt="", session_id=session_id, cancel=True) == EMPTY
    assert post(server, prompt="Hi", session_id=session_id, **GREEDY)["history_tokens"] == 0


def test_message_list_extends_or_replaces_the_history(server):
    session_id = 9003
    system = {"role": "system", "content": "You are terse."}
    user = {"role": "user", "content": "Say hello."}
    first = post(server, prompt=[system, user], session_id=session_id, interactive_mode=True, **GREEDY)
    history = [system, user, {"role": "assistant", "content": first["text"]}]
    assert first["input_tokens"] == rendered_len(server, [system, user])
    follow_up = {"role": "user", "content": "Again."}
    # Re-sending the whole conversation (OpenAI-style) replaces the history instead of doubling it.
    second = post(server, prompt=history + [follow_up], session_id=session_id, interactive_mode=True, **GREEDY)
    assert second["input_tokens"] == rendered_len(server, history + [follow_up])
    history += [follow_up, {"role": "assistant", "content": second["text"]}]
    # Only the new messages: appended.
    third = post(server, prompt=[follow_up], session_id=session_id, interactive_mode=False, **GREEDY)
    assert third["input_tokens"] == rendered_len(server, history + [follow_up])


def test_one_turn_at_a_time_and_cancel(server):
    session_id = 9004
    body = {"prompt": "Count to one hundred.", "session_id": session_id, "interactive_mode": True, "stream": True,
            "request_output_len": 400, "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", server.url + URL, json=body, timeout=120) as r:
        lines = r.iter_lines()
        assert json.loads(next(lines))["finish_reason"] is None  # the turn is running
        busy = httpx.post(server.url + URL, json={"prompt": "Hi", "session_id": session_id}, timeout=30)
        assert busy.status_code == 400 and busy.json()["error"]["param"] == "session_id"
        assert post(server, prompt="", session_id=session_id, cancel=True) == EMPTY
        last = [json.loads(line) for line in lines if line][-1]
    assert last["finish_reason"] == "abort" and last["tokens"] < 400
    assert post(server, prompt="Hi", session_id=session_id, interactive_mode=True, **GREEDY)["history_tokens"] == 0


@pytest.mark.parametrize("body,param", [
    ({"prompt": "hi", "temperature": 3}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "session_id": -5}, "session_id"),
    ({"prompt": "hi", "request_output_len": 0}, None),
    ({"prompt": "hi", "request_output_len": 4, "min_new_tokens": 8}, None),
    ({"prompt": []}, None),
    ({"prompt": [{"role": "wizard", "content": "hi"}]}, "prompt"),
    ({"prompt": "hi", "cancel": True}, "session_id"),
    ({"prompt": "hi", "image_url": "http://example.com/cat.png"}, None),
    ({"temperature": 0}, "prompt"),
])
def test_bad_requests_are_openai_400s(server, body, param):
    r = httpx.post(server.url + URL, json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_unprefixed_route(server):
    assert post(server, prompt="Hi", **GREEDY)["tokens"] > 0
    assert httpx.post(server.url + "/chat/interactive", json={"prompt": "Hi", **GREEDY}, timeout=60).status_code == 200


# ---------------------------------------------------------------------- no server


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_store_drops_idle_sessions_lazily():
    clock = _Clock()
    store = SessionStore(idle_timeout=10, clock=clock)
    store.open(1).messages.append({"role": "user", "content": "a"})
    store.open(2)
    clock.now = 8
    assert store.get(1).messages  # touched: its idle time restarts
    clock.now = 15
    assert store.get(2) is None and store.get(1) is not None
    clock.now = 40
    store.open(3)  # opening sweeps the expired ones
    assert len(store) == 1 and store.get(1) is None


def test_store_keeps_busy_sessions_and_drops_the_least_recently_used():
    clock = _Clock()
    store = SessionStore(idle_timeout=10, max_sessions=2, clock=clock)
    store.open(1).busy = True
    store.open(2)
    store.open(3)  # full: 2 is the oldest idle one
    assert store.get(2) is None and store.get(1) is not None and store.get(3) is not None
    clock.now = 100
    assert store.get(1) is not None  # a turn in flight never expires


def test_conversation_appends_or_replaces():
    a, b, c = ({"role": "user", "content": x} for x in "abc")
    assert conversation([], [a]) == [a]
    assert conversation([a, b], [c]) == [a, b, c]
    assert conversation([a, b], [a, b, c]) == [a, b, c]
    assert conversation([a, b], [a]) == [a, b, a]


def test_request_defaults_are_lmdeploys():
    params = InteractiveRequest(prompt="hi").to_sampling_params()
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == (0.8, 0.8, 40, None)
    assert InteractiveRequest(prompt="", request_output_len=0).ends_session
    assert not InteractiveRequest(prompt="", request_output_len=0, interactive_mode=True, cancel=True).ends_session
