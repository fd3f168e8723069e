"""The `tokenmill` command.

    tokenmill serve [MODEL] [--host H] [--port P] [engine options]   the OpenAI-compatible server
    tokenmill generate "PROMPT" [--model PATH] [--max-tokens N] [--raw]
    tokenmill chat URL [--model M] [--system S]                          an interactive console for any OpenAI API

`generate` loads the model (the bundled SmolLM2 GGUF by default) into the engine, wraps the prompt in the
model's chat template unless --raw, and streams the reply to stdout (greedy unless --temperature).
A model that cannot be loaded or a bad argument prints one line on stderr and exits with status 1,
not a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from tokenmill.errors import TokenmillError


def _generate(args: argparse.Namespace) -> int:
    from tokenmill.config import EngineConfig
    from tokenmill.engine.engine import LLMEngine
    from tokenmill.sampling_params import SamplingParams
    from tokenmill.tokenizer.chat_template import ChatTemplate

    engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, device=args.device,
                                    chat_template=args.chat_template))
    tokenizer = engine.tokenizer
    if args.raw or tokenizer.chat_template is None:
        prompt_ids = tokenizer.encode(args.prompt)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}]
        text = ChatTemplate(tokenizer.chat_template).render(
            messages, add_generation_prompt=True, bos_token=tokenizer.bos_token or "",
            eos_token=tokenizer.eos_token or "")
        # The rendered template already holds every special token it wants (BOS included).
        prompt_ids = tokenizer.encode(text, add_special_tokens=False)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    engine.add_request("cli", prompt_ids, params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            sys.stdout.write(out.outputs[0].delta_text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from tokenmill.config import EngineConfig
    from tokenmill.server.serve import run_server
    from tokenmill.server.state import ServerLimits

    config = EngineConfig(**{f.name: getattr(args, f.name) for f in fields(EngineConfig)})
    origins = [o.strip() for item in args.allowed_origins or [] for o in item.split(",") if o.strip()]
    limits = ServerLimits(max_queue_len=args.max_queue_len if args.max_queue_len >= 0 else None,
                          request_timeout=args.request_timeout, max_body_bytes=args.max_body_bytes)
    run_server(config, args.host, args.port, args.served_model_name, args.api_key, origins, limits)
    return 0


# LMDeploy's names for the same settings, accepted as aliases.
_ALIASES = {"max_model_len": ["--session-len"], "tensor_parallel_size": ["--tp"],
            "gpu_memory_utilization": ["--cache-max-entry-count"]}


def _parse_size(text: str) -> int:
    """Bytes from "2GiB", "512MiB", "1.5GB", "1000000"."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    low = text.strip().lower()
    for unit, factor in units.items():
        if low.endswith(unit):
            return int(float(low[: -len(unit)]) * factor)
    return int(low)


def _add_engine_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per EngineConfig field, its help text the field's docstring."""
    from dataclasses import MISSING, fields

    from tokenmill.config import EngineConfig, field_docs

    docs = field_docs(EngineConfig)
    for f in fields(EngineConfig):
        if f.name in skip:
            continue
        flags = [f"--{f.name.replace('_', '-')}", *_ALIASES.get(f.name, [])]
        default = f.default if f.default is not MISSING else None
        help_text = docs.get(f.name, "")
        kind = str(f.type)
        if kind == "bool":
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
        else:
            convert = _parse_size if f.name == "kv_cache_memory" else (
                int if kind.startswith("int") else float if kind.startswith("float") else str)
            parser.add_argument(*flags, dest=f.name, type=convert, default=default, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description="LLM inference engine and OpenAI-compatible server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model with an OpenAI-compatible API",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    serve.add_argument("model", nargs="?", default=None,
                       help="a Hugging Face model folder or a .gguf file (default: the bundled SmolLM2-135M-Instruct)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    serve.add_argument("--port", "--server-port", dest="port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--served-model-name", nargs="+", default=None,
                       help="the name(s) clients use in `model`; the first is reported by /v1/models")
    serve.add_argument("--api-key", action="append", default=None,
                       help="require `Authorization: Bearer KEY` (repeat for several keys); /health stays open")
    serve.add_argument("--allowed-origins", action="append", default=None,
                       help="CORS origins allowed to call the API (comma-separated or repeated; '*' for any)")
    serve.add_argument("--max-queue-len", type=int, default=1024,
                       help="requests that may wait behind the running batch before new ones get 429 (-1: no limit)")
    serve.add_argument("--request-timeout", type=float, default=None,
                       help="seconds a request may run before it is aborted (504 / an in-band error when streaming)")
    serve.add_argument("--max-body-bytes", type=_parse_size, default=32 << 20, help="largest request body (413 above)")
    _add_engine_flags(serve, skip=("model",))
    serve.set_defaults(func=_serve)
    gen = sub.add_parser("generate", help="generate a reply to one prompt and stream it to stdout")
    gen.add_argument("prompt", help="the user message (or raw text with --raw)")
    gen.add_argument("--model", default=None,
                     help="a Hugging Face model folder or a .gguf file (default: the bundled SmolLM2-135M-Instruct)")
    gen.add_argument("--max-tokens", type=int, default=128, help="the most tokens to generate (default 128)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); higher samples more freely")
    gen.add_argument("--seed", type=int, default=None, help="seed for sampled generation")
    gen.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                     help="weights and activations dtype; auto = float32 on CPU, bfloat16 on GPU")
    gen.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    gen.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat template")
    gen.add_argument("--system", default=None, help="a system message to put before the prompt")
    gen.add_argument("--chat-template", default=None, help="a chat template file or inline Jinja string to use instead")
    gen.set_defaults(func=_generate)

    from tokenmill.chat_console import add_chat_parser

    add_chat_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    if getattr(args, "max_tokens", 1) < 1:
        print("tokenmill: error: --max-tokens must be at least 1", file=sys.stderr)
        return 1
    try:
        return args.func(args)
    except (TokenmillError, ValueError) as e:
        print(f"tokenmill: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
