"""`tokenmill chat`: a piped conversation against the real server, the history it sends, and clean failures."""

from __future__ import annotations

import argparse
import copy
import io
import socket

from tokenmill.chat_console import add_chat_parser, run_console
from tokenmill.client import APIClient


def _spy_on_requests(monkeypatch) -> list[dict]:
    """Records the messages of every chat request and the reply text streamed back, then lets it through."""
    calls: list[dict] = []
    real = APIClient.chat_completions_v1

    def spy(self, model, messages, stream=False, **params):
        call = {"messages": copy.deepcopy(messages), "reply": "", "params": params}
        calls.append(call)
        for chunk in real(self, model, messages, stream=stream, **params):
            for choice in chunk.get("choices") or []:
                call["reply"] += (choice.get("delta") or {}).get("content") or ""
            yield chunk

    monkeypatch.setattr(APIClient, "chat_completions_v1", spy)
    return calls


def test_piped_conversation_keeps_history_until_reset(server, monkeypatch):  # noqa: F811
    calls = _spy_on_requests(monkeypatch)
    script = "My name is Ada.\nWhat is my name?\n/reset\nWhat is the capital of France?\n/exit\nnever sent\n"
    out = io.StringIO()
    code = run_console(server.url, system="You are terse.", temperature=0, max_tokens=12,
                       input_stream=io.StringIO(script), output=out)
    assert code == 0
    assert [len(c["messages"]) for c in calls] == [2, 4, 2]  # system + turns; /reset forgot turns 1-2
    assert all(c["reply"].strip() for c in calls)
    assert all(c["params"] == {"temperature": 0, "max_tokens": 12} for c in calls)
    second = calls[1]["messages"]
    assert second[0] == {"role": "system", "content": "You are terse."}
    assert second[1:3] == [{"role": "user", "content": "My name is Ada."},
                           {"role": "assistant", "content": calls[0]["reply"]}]
    assert calls[2]["messages"][1] == {"role": "user", "content": "What is the capital of France?"}
    text = out.getvalue()
    assert all(c["reply"] in text for c in calls) and "[conversation reset]" in text
    assert text.index(calls[1]["reply"]) < text.index("[conversation reset]") < text.rindex(calls[2]["reply"])


def test_system_command_and_end_of_input(server, monkeypatch):  # noqa: F811
    calls = _spy_on_requests(monkeypatch)
    out = io.StringIO()
    code = run_console(server.url + "/v1", model="SmolLM2-135M-Instruct", max_tokens=4,
                       input_stream=io.StringIO("/system Answer in French.\nHello\n"), output=out)
    assert code == 0  # end of input ends the chat like /exit
    assert calls[0]["messages"][0] == {"role": "system", "content": "Answer in French."}
    assert calls[0]["params"] == {"max_tokens": 4}  # unset options are left to the server


def _closed_url() -> str:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_unreachable_server_is_one_line_and_status_1(capsys):
    out = io.StringIO()
    assert run_console(_closed_url(), input_stream=io.StringIO("hi\n"), output=out) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tokenmill chat: error: cannot connect to")
    assert "Traceback" not in err and out.getvalue() == ""


def test_chat_subcommand_arguments(capsys):
    parser = argparse.ArgumentParser(prog="tokenmill")
    add_chat_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["chat", "http://h:1", "--model", "m", "--system", "s", "--api-key", "k",
                              "--temperature", "0.5", "--max-tokens", "7"])
    assert (args.url, args.model, args.system, args.api_key, args.temperature) == ("http://h:1", "m", "s", "k", 0.5)
    assert args.reply_max_tokens == 7
    assert args.func(parser.parse_args(["chat", _closed_url()])) == 1
    assert "cannot connect" in capsys.readouterr().err
