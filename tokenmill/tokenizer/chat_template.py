"""Render a model's own Hugging Face chat template, byte for byte as transformers does.

Data flow of `ChatTemplate.render`:

    OpenAI-style messages
      -> `_template_message` (what vLLM does before templating): content parts joined with "\\n",
         content None -> "", tool-call `arguments` JSON strings parsed into dicts, empty `tool_calls` dropped
      -> what transformers' `apply_chat_template` does: keys whose value is None dropped, reasoning aliased
         under `reasoning_content` and `thinking`, `continue_final_message` tagging
      -> the compiled Jinja template in a sandbox configured like transformers' (trim_blocks, lstrip_blocks,
         loopcontrols, `{% generation %}`, `tojson`, `raise_exception`, `strftime_now`, `dict`, `namespace`)
      -> prompt string (cut after the final message's content for `continue_final_message`).

Every failure, the template's own `raise_exception(...)` included, becomes a `ChatTemplateError` (HTTP 400).
We never import transformers: `tests/tokenizer/test_chat_template.py` compares our output with it.
"""

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tokenmill.errors import ChatTemplateError

# transformers appends this to the final message and cuts the rendered prompt there. We use the same
# literal so that templates that inspect the content (split, trim, length) see exactly the same text.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
# Names a message's reasoning arrives under; templates read `reasoning_content` (Qwen3) or `thinking`.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# Content-part types vLLM renders as plain text when the template takes string content.
_TEXT_PART_TYPES = ("text", "input_text", "output_text", "refusal", "thinking")
# Variables render() sets itself; a template kwarg with one of these names would collide.
_RESERVED_KWARGS = frozenset({"messages", "tools", "documents", "add_generation_prompt"})


class ChatTemplate:
    """One chat template, compiled once, rendered for any number of conversations (thread-safe)."""

    def __init__(self, source: str):
        self.source = source
        try:
            self._template = _ENVIRONMENT.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"invalid chat template (line {e.lineno}): {e.message}") from e

    def render(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        bos_token: str = "",
        eos_token: str = "",
        template_kwargs: dict | None = None,
    ) -> str:
        """The prompt text for `messages`. Raises ChatTemplateError for anything the template rejects."""
        if not messages:
            raise ChatTemplateError("cannot apply the chat template to an empty conversation", "messages")
        if continue_final_message and add_generation_prompt:
            raise ChatTemplateError(
                "continue_final_message and add_generation_prompt are not compatible: the first continues the "
                "final message, the second starts a new assistant message",
                "continue_final_message",
            )
        _check_dicts(tools, "tools")
        _check_dicts(documents, "documents")
        kwargs = dict(template_kwargs or {})
        if clash := sorted(_RESERVED_KWARGS & kwargs.keys()):
            raise ChatTemplateError(f"chat template kwargs cannot set {', '.join(clash)}", "chat_template_kwargs")
        chat = [_template_message(message, i) for i, message in enumerate(messages)]
        final_content = ""
        if continue_final_message:
            # transformers only checks that the field name appears somewhere in the template source.
            if "content" not in self.source:
                raise ChatTemplateError("continue_final_message is set but the chat template never reads "
                                        "'content'", "continue_final_message")
            final_content = chat[-1].get("content", "")
            chat[-1]["content"] = final_content + _CONTINUE_TAG
        variables = {"bos_token": bos_token, "eos_token": eos_token, **kwargs}
        try:
            text = self._template.render(
                messages=chat, tools=tools, documents=documents,
                add_generation_prompt=add_generation_prompt, **variables,
            )
        except Exception as e:  # the template is untrusted code: any failure is the request's fault
            raise ChatTemplateError(str(e) or type(e).__name__) from e
        return _cut_at_tag(text, final_content) if continue_final_message else text


def load_chat_template(value: str) -> str:
    """`value` is a template file's path or an inline template; returns the template text, bytes intact."""
    try:
        is_file = Path(value).is_file()
    except (OSError, ValueError):  # an inline template can be too long or odd to be a path
        is_file = False
    if is_file:
        # newline="" keeps "\r\n" as is: the template's whitespace is part of the prompt.
        with open(value, encoding="utf-8", newline="") as f:
            return f.read()
    if "{{" in value or "{%" in value:
        return value
    shown = value if len(value) <= 80 else value[:77] + "..."
    raise ValueError(f"chat template {shown!r} is neither an existing file nor a Jinja template "
                     "(an inline template contains '{{' or '{%')")


def _check_dicts(items: list[dict] | None, param: str) -> None:
    if items is not None and not (isinstance(items, list) and all(isinstance(item, dict) for item in items)):
        raise ChatTemplateError(f"{param} must be a list of JSON objects", param)


def _template_message(message: dict, index: int) -> dict:
    """A fresh copy of `message` in the shape templates expect (the caller's dict is never changed)."""
    if not isinstance(message, dict) or "role" not in message:
        raise ChatTemplateError(f"messages[{index}] must be an object with a 'role'", "messages")
    out = _copy(message)  # the steps below and continue_final_message edit the message
    out["content"] = _flatten_content(out.get("content"), index)
    tool_calls = out.get("tool_calls")
    if isinstance(tool_calls, list) and not tool_calls:
        del out["tool_calls"]  # as vLLM: an empty list would send templates down the tool-call branch
    elif isinstance(tool_calls, list) and out["role"] == "assistant":
        for call in tool_calls:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                function["arguments"] = _parse_arguments(function.get("arguments"), index)
    # transformers drops None values: templates handle a missing key, but print "None" for a None one.
    out = {key: value for key, value in out.items() if value is not None}
    reasoning = next((out[key] for key in _REASONING_FIELDS if key in out), None)
    if reasoning is not None:  # same precedence as transformers: an explicit `thinking` is kept
        out = {"thinking": reasoning, **out, "reasoning_content": reasoning}
    return out


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return (tuple if isinstance(value, tuple) else list)(_copy(item) for item in value)
    return value


def _flatten_content(content: Any, index: int) -> str:
    # vLLM's "string" content format: a missing content is "", text parts are joined with newlines.
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise ChatTemplateError(f"messages[{index}].content must be a string or a list of parts", "messages")
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
            continue
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PART_TYPES:
            raise ChatTemplateError(f"messages[{index}].content: part type {kind!r} is not supported, "
                                    "only text", "messages")
        if part.get("text") is not None:
            texts.append(part["text"])
    return "\n".join(texts)


class _JSONArguments(dict):
    """Tool-call arguments parsed from their JSON text, as vLLM passes them (templates `tojson` or iterate
    them). DeepSeek templates instead concatenate the arguments with `+`, which fails on a dict; there the
    original JSON text is used, which is what those models were trained on."""

    # Underscored: Jinja looks attributes up before keys, and the sandbox hides underscored ones, so an
    # argument named like a public attribute stays reachable as `arguments.name`.
    __slots__ = ("_json_text",)

    def __init__(self, parsed: dict, text: str):
        super().__init__(parsed)
        self._json_text = text

    def __add__(self, other):
        return self._json_text + other if isinstance(other, str) else NotImplemented

    def __radd__(self, other):
        return other + self._json_text if isinstance(other, str) else NotImplemented


def _parse_arguments(arguments: Any, index: int) -> Any:
    if isinstance(arguments, (dict, list)):
        return arguments
    if not arguments:
        return _JSONArguments({}, "{}")  # vLLM: a missing or empty arguments string means no arguments
    try:
        parsed = json.loads(arguments)
    except (TypeError, ValueError) as e:
        raise ChatTemplateError(f"messages[{index}].tool_calls: arguments are not valid JSON: {e}",
                                "messages") from e
    return _JSONArguments(parsed, arguments) if isinstance(parsed, dict) else parsed


def _cut_at_tag(text: str, final_content: str) -> str:
    """Cut the prompt right after the final message's content, so the model continues it."""
    tag = _CONTINUE_TAG.strip()
    if final_content.strip() not in text or tag not in text:
        raise ChatTemplateError("continue_final_message is set but the chat template drops part of the final "
                                "message, so it cannot be continued", "continue_final_message")
    at = text.rindex(tag)
    if text.startswith(_CONTINUE_TAG, at):
        return text[:at]
    # The template trimmed the space after the tag, so it trims trailing whitespace of content too.
    return text[:at].rstrip()


# --- the sandbox: the same globals, filters and extensions as transformers gives templates ---


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & and ' as HTML; templates expect plain json.dumps, non-ASCII kept.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _DictFactory:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without exposing the `dict` type itself."""

    def __call__(self, *args, **kwargs) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """Jinja's `namespace()`, refusing underscore names that could reach interpreter internals."""

    def __init__(*args, **kwargs):  # Jinja's signature trick, so that `namespace(self=...)` still works
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template cannot set namespace attribute {name!r}")


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; for inference it just
    renders its body. A call block, as in transformers, so `set` inside it stays local to it."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller) -> str:
        return caller()


def _make_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       dict=_DictFactory(), namespace=_Namespace)
    return env


_ENVIRONMENT = _make_environment()
