"""ChatTemplate against transformers' apply_chat_template, on real model templates.

Conversations are written as an OpenAI client sends them (content parts, tool-call arguments as JSON text).
transformers is given what vLLM would hand it for the same request (parts joined with "\\n", arguments
parsed into dicts), so every matrix case checks our whole path, not only the Jinja rendering.
"""

import copy
import json
from datetime import datetime
from pathlib import Path

import jinja2
import pytest

from tokenmill.errors import ChatTemplateError
from tokenmill.tokenizer import chat_template as chat_template_module
from tokenmill.tokenizer.chat_template import ChatTemplate, load_chat_template

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "chat_templates"

# file stem -> bos, eos (from SOURCES.md), how the template reads tool-call arguments, default tools.
# DeepSeek templates concatenate `arguments` as a string; Hermes iterates `tools` without a None check.
TEMPLATES = {
    "Qwen2.5-7B-Instruct": dict(bos=None, eos="<|im_end|>"),
    "Qwen3-0.6B": dict(bos=None, eos="<|im_end|>"),
    "Qwen3-1.7B": dict(bos=None, eos="<|im_end|>"),
    "Llama-3.1-8B-Instruct": dict(bos="<|begin_of_text|>", eos="<|eot_id|>"),
    "Llama-3.2-3B-Instruct": dict(bos="<|begin_of_text|>", eos="<|eot_id|>"),
    "Mistral-7B-Instruct-v0.3": dict(bos="<s>", eos="</s>"),
    "DeepSeek-R1-Distill-Qwen-32B": dict(bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>", args_as_text=True),
    "DeepSeek-R1": dict(bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>", args_as_text=True),
    "internlm2-chat-7b": dict(bos="<s>", eos="</s>"),
    "Hermes-3-Llama-3.1-8B-tool_use": dict(bos="<|begin_of_text|>", eos="<|im_end|>", default_tools=[]),
    "SmolLM2-135M-Instruct": dict(bos="<|im_start|>", eos="<|im_end|>"),
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city (température actuelle).",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Zürich"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Unit"},
            },
            "required": ["city"],
        },
    },
}
SYSTEM = {"role": "system", "content": "You are a terse assistant."}


def _call(call_id: str, city: str) -> dict:
    # Mistral requires 9-character ids; the arguments are JSON text, as in the OpenAI API.
    arguments = json.dumps({"city": city, "unit": "celsius"}, ensure_ascii=False)
    return {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}


def _tool_result(call_id: str, temperature: int) -> dict:
    return {"role": "tool", "tool_call_id": call_id, "content": json.dumps({"temperature": temperature})}


TURNS = [
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello. How can I help?", "tool_calls": None},  # None keys are dropped
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
]
TOOL_TURNS = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [_call("call00001", "Paris")]},
    _tool_result("call00001", 21),
]
PARALLEL_TOOL_TURNS = [
    {"role": "user", "content": "Weather in Paris and Zürich?"},
    {"role": "assistant", "content": None, "tool_calls": [_call("call00001", "Paris"), _call("call00002", "Zürich")]},
    _tool_result("call00001", 21),
    _tool_result("call00002", 17),
]
REASONING = {"role": "assistant", "content": "Hello!", "reasoning_content": "The user greets me; reply."}

# name -> (messages, render options). Each runs on every template.
CASES = {
    "single": ([SYSTEM, TURNS[0]], {}),
    "single_gen": ([SYSTEM, TURNS[0]], {"add_generation_prompt": True}),
    "multi_turn_gen": ([SYSTEM, *TURNS], {"add_generation_prompt": True}),
    "no_system_gen": (TURNS[:3], {"add_generation_prompt": True}),
    "content_parts_gen": (
        [SYSTEM, {"role": "user", "content": [{"type": "text", "text": "Describe"}, {"type": "text", "text": "it."}]}],
        {"add_generation_prompt": True},
    ),
    "tools_gen": ([SYSTEM, TURNS[0]], {"add_generation_prompt": True, "tools": [WEATHER_TOOL]}),
    "tool_result_gen": ([SYSTEM, *TOOL_TURNS], {"add_generation_prompt": True, "tools": [WEATHER_TOOL]}),
    "tool_history_gen": (
        [SYSTEM, *TOOL_TURNS, {"role": "assistant", "content": "It is 21°C."}, {"role": "user", "content": "Thanks"}],
        {"add_generation_prompt": True, "tools": [WEATHER_TOOL]},
    ),
    "tools_in_system_gen": (
        [SYSTEM, *TOOL_TURNS],
        {"add_generation_prompt": True, "tools": [WEATHER_TOOL], "template_kwargs": {"tools_in_user_message": False}},
    ),
    "parallel_tools_gen": ([*PARALLEL_TOOL_TURNS], {"add_generation_prompt": True, "tools": [WEATHER_TOOL]}),
    "thinking_off_gen": ([TURNS[0]], {"add_generation_prompt": True, "template_kwargs": {"enable_thinking": False}}),
    "thinking_on_gen": ([TURNS[0]], {"add_generation_prompt": True, "template_kwargs": {"enable_thinking": True}}),
    "reasoning_history_gen": ([TURNS[0], REASONING, TURNS[2]], {"add_generation_prompt": True}),
    "reasoning_last": ([TURNS[0], REASONING], {}),
    "reasoning_alias_last": ([TURNS[0], {"role": "assistant", "content": "Hi.", "reasoning": "Greet back."}], {}),
    "think_in_content_gen": (
        [TURNS[0], {"role": "assistant", "content": "<think>\nA greeting.\n</think>\n\nHello!"}, TURNS[2]],
        {"add_generation_prompt": True},
    ),
    "continue_assistant": ([SYSTEM, TURNS[0], {"role": "assistant", "content": "Hello, I am"}],
                           {"continue_final_message": True}),
    "continue_trailing_space": ([TURNS[0], {"role": "assistant", "content": "Hello, I "}],
                                {"continue_final_message": True}),
    "continue_user": ([SYSTEM, {"role": "user", "content": "Write a haiku about"}], {"continue_final_message": True}),
    "documents_gen": ([TURNS[0]], {"add_generation_prompt": True,
                                   "documents": [{"title": "Doc", "text": "Paris is in France."}]}),
    "date_kwarg_gen": ([TURNS[0]], {"add_generation_prompt": True, "template_kwargs": {"date_string": "01 Jan 2025"}}),
    "no_alternation_gen": ([TURNS[0], TURNS[2]], {"add_generation_prompt": True}),
}

# The (template, case) pairs the template itself rejects; we must fail the same way.
REJECTED = {
    ("Llama-3.1-8B-Instruct", "parallel_tools_gen"),
    ("Llama-3.2-3B-Instruct", "parallel_tools_gen"),
    ("Mistral-7B-Instruct-v0.3", "no_alternation_gen"),
}

FIXED_NOW = datetime(2025, 3, 5, 12, 0, 0)


class _FixedDatetime(datetime):
    @classmethod
    def now(cls, tz=None):
        return FIXED_NOW


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch):
    """Both renderers see the same `strftime_now`, even across midnight."""
    monkeypatch.setattr(chat_template_module, "datetime", _FixedDatetime)
    try:
        from transformers.utils import chat_template_utils
    except ImportError:
        return
    monkeypatch.setattr(chat_template_utils, "datetime", _FixedDatetime)


def _read_fixture(stem: str) -> str:
    # CI always has shared/ beside the checkout: a missing folder is an error, not a reason to skip 240 tests.
    assert FIXTURES.is_dir(), f"chat template fixtures not found at {FIXTURES} (shared/ must sit beside the repo)"
    with open(FIXTURES / f"{stem}.jinja", encoding="utf-8", newline="") as f:
        return f.read()


def _as_vllm_passes_them(messages: list[dict], args_as_text: bool) -> list[dict]:
    """What vLLM hands transformers for OpenAI messages: string content, arguments parsed into dicts."""
    out = copy.deepcopy(messages)
    for message in out:
        content = message.get("content")
        if isinstance(content, list):
            message["content"] = "\n".join(part["text"] for part in content)
        elif content is None:
            message["content"] = ""
        for call in message.get("tool_calls") or []:
            if not args_as_text:
                call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    return out


_TOKENIZERS: dict = {}


def _transformers_render(source: str, messages: list[dict], *, bos=None, eos=None, args_as_text=False,
                         template_kwargs=None, **options) -> str:
    import transformers
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    if (bos, eos) not in _TOKENIZERS:
        backend = Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>"))
        _TOKENIZERS[bos, eos] = transformers.PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token=bos, eos_token=eos)
    tokenizer = _TOKENIZERS[bos, eos]
    return tokenizer.apply_chat_template(_as_vllm_passes_them(messages, args_as_text), chat_template=source,
                                         tokenize=False, **options, **(template_kwargs or {}))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("stem", list(TEMPLATES))
def test_matches_transformers(stem, case):
    source = _read_fixture(stem)
    spec = TEMPLATES[stem]
    messages, options = CASES[case]
    options = dict(options)
    if "tools" not in options and "default_tools" in spec:
        options["tools"] = spec["default_tools"]
    original = copy.deepcopy(messages)
    try:
        expected = _transformers_render(source, messages, bos=spec["bos"], eos=spec["eos"],
                                        args_as_text=spec.get("args_as_text", False), **options)
        expected_error = None
    except (jinja2.TemplateError, TypeError, ValueError) as e:
        expected_error = e
    assert ((stem, case) in REJECTED) == (expected_error is not None), expected_error

    template = ChatTemplate(source)
    render = lambda: template.render(messages, bos_token=spec["bos"] or "", eos_token=spec["eos"], **options)
    if expected_error is None:
        assert render() == expected
    else:
        with pytest.raises(ChatTemplateError) as info:
            render()
        assert info.value.message == str(expected_error)
    assert messages == original, "render() must not change the caller's messages"


def test_strftime_now_uses_todays_date():
    source = _read_fixture("Llama-3.2-3B-Instruct")
    text = ChatTemplate(source).render([TURNS[0]], bos_token="<|begin_of_text|>")
    assert "Today Date: 05 Mar 2025\n" in text


def test_continue_with_generation_prompt_is_rejected():
    source = _read_fixture("Qwen2.5-7B-Instruct")
    with pytest.raises(ValueError):  # transformers refuses too
        _transformers_render(source, [TURNS[0]], continue_final_message=True, add_generation_prompt=True)
    with pytest.raises(ChatTemplateError) as info:
        ChatTemplate(source).render([TURNS[0]], continue_final_message=True, add_generation_prompt=True)
    assert info.value.param == "continue_final_message"


@pytest.mark.parametrize("source, message", [
    ("{{ raise_exception('no system role here') }}", "no system role here"),
    ("{{ messages[0].missing.field }}", "'dict object' has no attribute 'missing'"),
    ("{{ messages[0].content + 1 }}", 'can only concatenate str (not "int") to str'),
    ("{% for m in messages %}{{ m.content | tojson(bogus=1) }}{% endfor %}", None),
    ("{{ ''.__class__.__mro__ }}", None),  # the sandbox refuses interpreter internals
    ("{% set ns = namespace(_x=1) %}", None),
])
def test_render_failures_become_chat_template_errors(source, message):
    with pytest.raises(ChatTemplateError) as info:
        ChatTemplate(source).render([{"role": "user", "content": "hi"}])
    if message is not None:
        assert info.value.message == message


def test_invalid_syntax_is_reported_with_its_line():
    with pytest.raises(ChatTemplateError, match=r"line 2.*endfor"):
        ChatTemplate("{% for m in messages %}\n{{ m.content }}")


def test_sandbox_features_match_transformers():
    source = (
        "  {% if true %}\nblocks trimmed\n  {% endif %}\n"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{% generation %}{% set local = 'x' %}{{ m.content | tojson(indent=2, sort_keys=true) }}{% endgeneration %}"
        "{% endfor %}{{ local is defined }}|{{ {'b': 'é', 'a': '<&>'} | tojson }}"
        "|{{ dict(a=1) }}{{ dict.fromkeys(['k']) }}|{{ bos_token }}{{ eos_token }}|{{ tools }}{{ documents }}"
    )
    messages = [{"role": "user", "content": "q\u00fc"}, {"role": "user", "content": "never"}]
    ours = ChatTemplate(source).render(messages, bos_token="<s>", eos_token="</s>")
    assert ours == _transformers_render(source, messages, bos="<s>", eos="</s>")
    assert ours == 'blocks trimmed\n"qü"False|{"b": "é", "a": "<&>"}|{\'a\': 1}{\'k\': None}|<s></s>|NoneNone'


def test_content_parts_are_joined_and_only_text_is_accepted():
    template = ChatTemplate("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert template.render([{"role": "user", "content": parts}, {"role": "assistant"}]) == "[a\nb][]"
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    with pytest.raises(ChatTemplateError, match="image_url") as info:
        template.render([{"role": "user", "content": [parts[0], image]}])
    assert info.value.param == "messages"


def test_tool_call_arguments_are_dicts_that_concatenate_as_their_text():
    source = ("{% set args = messages[0].tool_calls[0].function.arguments %}"
              "{{ args | tojson }}|{{ args.city }}|{{ args is string }}|{{ '<' + args + '>' }}")
    call = {"function": {"name": "f", "arguments": '{"city":  "Paris"}'}}
    text = ChatTemplate(source).render([{"role": "assistant", "tool_calls": [call]}])
    assert text == '{"city": "Paris"}|Paris|False|<{"city":  "Paris"}>'
    call["function"]["arguments"] = "{not json"
    with pytest.raises(ChatTemplateError, match="not valid JSON"):
        ChatTemplate(source).render([{"role": "assistant", "tool_calls": [call]}])


def test_bad_requests_are_client_errors():
    template = ChatTemplate("{{ messages }}")
    for kwargs in ({"messages": []}, {"messages": [{"content": "no role"}]},
                   {"messages": TURNS, "template_kwargs": {"messages": []}},
                   {"messages": TURNS, "tools": ["not a dict"]}):
        with pytest.raises(ChatTemplateError):
            template.render(**kwargs)


def test_load_chat_template_from_file_keeps_bytes(tmp_path):
    path = tmp_path / "t.jinja"
    text = "{{ bos_token }}\r\n{% for m in messages %}«{{ m.content }}»{% endfor %}\n"
    path.write_bytes(text.encode())
    assert load_chat_template(str(path)) == text


def test_load_chat_template_inline_and_invalid(tmp_path):
    assert load_chat_template("{{ messages[0].content }}") == "{{ messages[0].content }}"
    assert load_chat_template("{% if x %}y{% endif %}") == "{% if x %}y{% endif %}"
    for value in (str(tmp_path / "missing.jinja"), str(tmp_path), "chatml"):
        with pytest.raises(ValueError, match="neither an existing file nor a Jinja template"):
            load_chat_template(value)
