"""`tokenmill chat URL`: an interactive multi-turn chat with any OpenAI-compatible server.

    user line ─► history + [system] ─► APIClient.chat_completions_v1(stream=True) ─► deltas printed live
              ─► the full reply joins the history, so the next turn sees the whole conversation

Commands: `/reset` forgets the history, `/system TEXT` sets the system prompt (`/system` alone clears it),
`/exit`, `/quit` or end of input ends the chat. On a terminal the prompt is `> ` with readline editing;
from a pipe lines are read silently, so `printf 'hi\\n/exit\\n' | tokenmill chat URL` prints only replies.
A server that cannot be reached prints one line on stderr and returns 1.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import TextIO

from tokenmill.client import APIClient, APIConnectionError, APIError

_HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt), /exit or /quit"


def _read_line(input_stream: TextIO, output: TextIO) -> str | None:
    """The next user line without its newline, or None at end of input."""
    if input_stream is sys.stdin and input_stream.isatty():
        with contextlib.suppress(ImportError):  # Windows has no readline
            import readline  # noqa: F401 - importing it gives input() line editing and history
        try:
            return input("> ")
        except EOFError:
            output.write("\n")
            return None
    if input_stream.isatty():
        output.write("> ")
        output.flush()
    line = input_stream.readline()
    return None if line == "" else line.rstrip("\r\n")


class ChatSession:
    """The conversation state; `history` holds user and assistant turns, the system prompt is kept apart
    so `/reset` keeps it and `/system` can change it mid-conversation."""

    def __init__(self, client: APIClient, model: str, system: str | None = None, **params):
        self.client = client
        self.model = model
        self.system = system
        self.params = {k: v for k, v in params.items() if v is not None}  # unset: the server's defaults
        self.history: list[dict] = []

    def messages(self, user_text: str) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, *self.history, {"role": "user", "content": user_text}]

    def ask(self, user_text: str, output: TextIO) -> str:
        """Streams one reply to `output` and records the turn; a failed turn leaves the history as it was."""
        pieces: list[str] = []
        stream = self.client.chat_completions_v1(self.model, self.messages(user_text), stream=True, **self.params)
        try:
            for chunk in stream:
                for choice in chunk.get("choices") or []:
                    delta = (choice.get("delta") or {}).get("content")
                    if choice.get("index", 0) == 0 and delta:
                        pieces.append(delta)
                        output.write(delta)
                        output.flush()
        finally:
            stream.close()  # an interrupted turn drops the connection, so the server stops generating
            output.write("\n")
            output.flush()
        reply = "".join(pieces)
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": reply}]
        return reply


def _command(session: ChatSession, line: str, output: TextIO) -> bool:
    """Runs a `/command`; False when the chat should end."""
    name, _, arg = line.partition(" ")
    if name in ("/exit", "/quit"):
        return False
    if name == "/reset":
        session.history.clear()
        output.write("[conversation reset]\n")
    elif name == "/system":
        session.system = arg.strip() or None
        output.write("[system prompt set]\n" if session.system else "[system prompt cleared]\n")
    else:
        output.write(f"[unknown command {name}; {_HELP}]\n")
    output.flush()
    return True


def run_console(url: str, model: str | None = None, system: str | None = None, api_key: str | None = None,
                temperature: float | None = None, max_tokens: int | None = None,
                input_stream: TextIO | None = None, output: TextIO | None = None) -> int:
    """Chats until /exit or end of input; returns the exit status (1 when the server cannot be reached).
    `input_stream` and `output` default to stdin and stdout."""
    input_stream = sys.stdin if input_stream is None else input_stream
    output = sys.stdout if output is None else output
    client = APIClient(url, api_key=api_key)
    try:
        if model is None:
            models = client.available_models
            if not models:
                print(f"tokenmill chat: error: {url} serves no models", file=sys.stderr)
                return 1
            model = models[0]
        session = ChatSession(client, model, system, temperature=temperature, max_tokens=max_tokens)
        if input_stream.isatty():
            output.write(f"chatting with {model} at {client.api_server_url}; {_HELP}\n")
        while (line := _read_line(input_stream, output)) is not None:
            if not line.strip():
                continue
            if line.startswith("/"):
                if not _command(session, line.strip(), output):
                    break
                continue
            try:
                session.ask(line, output)
            except APIConnectionError:
                raise
            except APIError as e:  # a bad turn (context too long, ...) need not end the conversation
                print(f"tokenmill chat: error: {e}", file=sys.stderr)
            except KeyboardInterrupt:
                output.write("[interrupted]\n")
    except APIConnectionError as e:
        print(f"tokenmill chat: error: {e} (is the server running?)", file=sys.stderr)
        return 1
    except APIError as e:
        print(f"tokenmill chat: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        output.write("\n")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _chat(args: argparse.Namespace) -> int:
    return run_console(args.url, model=args.model, system=args.system, api_key=args.api_key,
                       temperature=args.temperature, max_tokens=args.reply_max_tokens)


def add_chat_parser(subparsers) -> argparse.ArgumentParser:
    """Registers `tokenmill chat URL ...` on the `add_subparsers()` object of the CLI."""
    chat = subparsers.add_parser("chat", help="chat interactively with an OpenAI-compatible server")
    chat.add_argument("url", help="the server's base URL, e.g. http://127.0.0.1:8000 (a trailing /v1 is fine)")
    chat.add_argument("--model", default=None, help="the model to ask (default: the first one /v1/models lists)")
    chat.add_argument("--system", default=None, help="a system prompt to put before the conversation")
    chat.add_argument("--api-key", default=None, help="sent as `Authorization: Bearer KEY`")
    chat.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the server's)")
    # Its own dest: cli.main compares `args.max_tokens` with 1, which an unset (None) value would break.
    chat.add_argument("--max-tokens", dest="reply_max_tokens", metavar="N", type=_positive_int, default=None,
                      help="the most tokens per reply (default: the server's)")
    chat.set_defaults(func=_chat)
    return chat
