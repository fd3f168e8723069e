"""Text <-> token ids over a Hugging Face `tokenizers.Tokenizer`, loaded from a model folder or a GGUF.

    folder: tokenizer.json ─► backend as saved; its post-processor says whether BOS/EOS are added
            tokenizer_config.json, special_tokens_map.json ─► bos/eos/unk/pad token text
            tokenizer_config's chat_template, chat_template.jinja, additional_chat_templates/ ─► chat_templates
    GGUF:   read_metadata(reader) ─► tokens, merges | scores, token types, `tokenizer.ggml.pre`
            ─► BPE model + pre-tokenizer + decoder (what llama.cpp runs for that vocabulary)
            ─► control / user-defined tokens added whole ─► add_bos/add_eos ─► post-processor

Both paths end in the same `Tokenizer`: `encode`, `decode`, the special token ids and the chat templates.
A GGUF carries no tokenizer.json, so we rebuild the pipeline ourselves; transformers is never imported
(it is the reference the tests compare against, and where it disagrees with llama.cpp the tests say so).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from tokenmill.errors import ModelLoadError

# llama.cpp's token types (`tokenizer.ggml.token_type`), same numbering as SentencePiece's.
_CONTROL, _USER_DEFINED = 3, 4

# Split regexes of the byte-level BPE pre-tokenizers, as in the models' tokenizer.json; llama.cpp
# (src/llama-vocab.cpp) hand-expands the `(?i:...)` group of the same expressions.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level(split: str | None = None, digits: bool = False):
    """A byte-level pre-tokenizer: an optional digit split, then `split` (or GPT-2's regex), then bytes."""
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if split is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps.append(pre_tokenizers.Split(Regex(split), behavior="isolated"))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(steps)


# `tokenizer.ggml.pre` -> (pre-tokenizer factory, BPE ignore_merges). Grouped as llama.cpp groups them.
_BYTE_LEVEL_PRE = {
    # "\p{N}" first, then GPT-2's regex: every digit is its own word (SmolLM's tokenizer.json: Digits + ByteLevel).
    **dict.fromkeys(("smollm", "starcoder", "refact", "codeshell"), (lambda: _byte_level(digits=True), False)),
    **dict.fromkeys(("default", "gpt2", "mpt", "olmo"), (lambda: _byte_level(), False)),
    # Llama 3's tokenizer.json sets `ignore_merges`: a word that is itself a token is not re-merged.
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3"), (lambda: _byte_level(_LLAMA3_SPLIT), True)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2"), (lambda: _byte_level(_QWEN2_SPLIT), False)),
}


@dataclass(slots=True)
class SpecialTokens:
    """The named special tokens (their text, None when the model has none) and what `encode` adds."""

    bos: str | None = None
    eos: str | None = None
    unk: str | None = None
    pad: str | None = None
    add_bos: bool = False
    add_eos: bool = False


class Tokenizer:
    """A loaded tokenizer: `backend` does the work, this adds the model's special tokens and templates."""

    def __init__(self, backend: HFTokenizer, special: SpecialTokens, chat_templates: dict[str, str] | None = None):
        self.backend = backend
        self._special = special
        self.chat_templates: dict[str, str] = dict(chat_templates or {})
        self.chat_template: str | None = self.chat_templates.get("default")
        # Ids are looked up once: the engine asks for eos_token_id every step.
        self.bos_token_id = self._id(special.bos)
        self.eos_token_id = self._id(special.eos)
        self.unk_token_id = self._id(special.unk)
        self.pad_token_id = self._id(special.pad)
        added = backend.get_added_tokens_decoder()
        named = {self.bos_token_id, self.eos_token_id, self.unk_token_id, self.pad_token_id} - {None}
        self.all_special_ids: set[int] = {i for i, tok in added.items() if tok.special} | named

    # ---- loading --------------------------------------------------------------------------------

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> Tokenizer:
        """Load `tokenizer.json` and the special tokens / chat templates stored beside it."""
        path = os.fspath(path)
        tokenizer_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise ModelLoadError(
                f"{path}: no tokenizer.json. tokenmill loads only the fast-tokenizer file; make one with "
                "transformers: AutoTokenizer.from_pretrained(path).save_pretrained(path)"
            )
        try:
            backend = HFTokenizer.from_file(tokenizer_file)
        except Exception as e:  # the Rust side raises plain Exception on bad JSON or unknown components
            raise ModelLoadError(f"{tokenizer_file}: cannot be loaded ({e})") from e
        config = _read_json(os.path.join(path, "tokenizer_config.json"))
        special = SpecialTokens()
        # Like transformers, special_tokens_map.json (a legacy file) is read only when the config has no
        # `added_tokens_decoder`, and then wins over the config's values.
        legacy = {} if "added_tokens_decoder" in config else _read_json(os.path.join(path, "special_tokens_map.json"))
        for name in ("bos", "eos", "unk", "pad"):
            setattr(special, name, _token_text(legacy.get(f"{name}_token", config.get(f"{name}_token"))))
        # tokenizer.json's post-processor alone decides what encode adds. transformers 5 drops
        # tokenizer_config's add_bos_token/add_eos_token whenever a tokenizer.json exists, for every class,
        # Llama's included (4.x let LlamaTokenizerFast rebuild the post-processor from them); we match 5.
        special.add_bos, special.add_eos = _added_by_post_processor(backend, special)
        return cls(backend, special, _chat_templates(path, config.get("chat_template")))

    @classmethod
    def from_gguf_metadata(cls, meta: dict) -> Tokenizer:
        """Build the tokenizer a GGUF file describes, from `read_metadata(reader)`."""
        kind = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if not tokens:
            raise ModelLoadError("GGUF has no tokenizer.ggml.tokens: cannot build its tokenizer")
        if kind == "gpt2":
            backend, add_bos_default = _byte_level_backend(meta)
        elif kind == "llama":
            backend, add_bos_default = _sentencepiece_backend(meta), True
        else:
            raise ModelLoadError(
                f"GGUF tokenizer.ggml.model={kind!r} is not supported; tokenmill knows 'gpt2' and 'llama'"
            )
        _add_whole_tokens(backend, tokens, meta.get("tokenizer.ggml.token_type") or [])

        def text_of(key: str) -> str | None:
            token_id = meta.get(f"tokenizer.ggml.{key}")
            return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None

        special = SpecialTokens(
            bos=text_of("bos_token_id"),
            eos=text_of("eos_token_id"),
            unk=text_of("unknown_token_id"),
            pad=text_of("padding_token_id"),
        )
        special.add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)) and special.bos is not None
        special.add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and special.eos is not None
        templates = {"default": meta["tokenizer.chat_template"]} if meta.get("tokenizer.chat_template") else {}
        for name in meta.get("tokenizer.chat_templates") or []:  # llama.cpp writes named ones under their own key
            if f"tokenizer.chat_template.{name}" in meta:
                templates[name] = meta[f"tokenizer.chat_template.{name}"]
        backend.post_processor = _template(backend, special)
        return cls(backend, special, templates)

    # ---- encode / decode ------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        return [self.backend.id_to_token(i) for i in ids]

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return self._special.bos

    @property
    def eos_token(self) -> str | None:
        return self._special.eos

    @property
    def add_bos_token(self) -> bool:
        return self._special.add_bos

    @property
    def add_eos_token(self) -> bool:
        return self._special.add_eos

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)


# ---- folder helpers -----------------------------------------------------------------------------


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: not readable JSON ({e})") from e


def _token_text(value) -> str | None:
    """A special token as tokenizer_config writes it: a string, or an AddedToken dict `{"content": ...}`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_templates(path: str, from_config) -> dict[str, str]:
    """Named chat templates; the .jinja files win over the config's entry, as in transformers."""
    templates: dict[str, str] = {}
    if isinstance(from_config, str):
        templates["default"] = from_config
    elif isinstance(from_config, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        templates.update({t["name"]: t["template"] for t in from_config if "name" in t and "template" in t})
    default_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(default_file):
        with open(default_file, encoding="utf-8") as f:
            templates["default"] = f.read()
    extra_dir = os.path.join(path, "additional_chat_templates")
    if os.path.isdir(extra_dir):
        for name in sorted(os.listdir(extra_dir)):
            if name.endswith(".jinja"):
                with open(os.path.join(extra_dir, name), encoding="utf-8") as f:
                    templates[name.removesuffix(".jinja")] = f.read()
    return templates


def _added_by_post_processor(backend: HFTokenizer, special: SpecialTokens) -> tuple[bool, bool]:
    """Whether the saved post-processor adds BOS / EOS: encode nothing and look."""
    ids = backend.encode("", add_special_tokens=True).ids
    bos, eos = (backend.token_to_id(t) if t else None for t in (special.bos, special.eos))
    return bool(ids) and ids[0] == bos, bool(ids) and ids[-1] == eos


def _template(backend: HFTokenizer, special: SpecialTokens) -> processors.TemplateProcessing:
    """The post-processor transformers' `update_post_processor` builds from add_bos/add_eos."""
    bos = f"{special.bos}:0 " if special.add_bos else ""
    eos = f" {special.eos}:0" if special.add_eos else ""
    single = f"{bos}$A:0{eos}"
    pair = f"{single}{' ' + special.bos + ':1' if special.add_bos else ''} $B:1{eos.replace(':0', ':1')}"
    pairs = [(special.bos, special.add_bos), (special.eos, special.add_eos)]
    tokens = [(text, backend.token_to_id(text)) for text, on in pairs if on]
    missing = [text for text, token_id in tokens if token_id is None]
    if missing:
        raise ModelLoadError(f"special token(s) {missing} are not in the vocabulary")
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=tokens)


# ---- GGUF builders ------------------------------------------------------------------------------


def _byte_level_backend(meta: dict) -> tuple[HFTokenizer, bool]:
    """GPT-2 style byte-level BPE (`tokenizer.ggml.model == "gpt2"`); also says whether BOS is added by default."""
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _BYTE_LEVEL_PRE:
        raise ModelLoadError(
            f"GGUF tokenizer.ggml.pre={pre!r} is not supported; known: {', '.join(sorted(_BYTE_LEVEL_PRE))}"
        )
    make_pre, ignore_merges = _BYTE_LEVEL_PRE[pre]
    merges = meta.get("tokenizer.ggml.merges")
    if merges is None:
        raise ModelLoadError("GGUF byte-level vocabulary has no tokenizer.ggml.merges")
    vocab = {token: i for i, token in enumerate(meta["tokenizer.ggml.tokens"])}
    # A merge is "left right"; byte-level tokens spell a space as 'Ġ', so the only space is the separator.
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges))
    backend.pre_tokenizer = make_pre()
    backend.decoder = decoders.ByteLevel()
    # llama.cpp adds BOS by default for the Llama 3 family (its `ignore_merges` group), not for other BPE files.
    return backend, ignore_merges


def _sentencepiece_backend(meta: dict) -> HFTokenizer:
    """A SentencePiece vocabulary (`tokenizer.ggml.model == "llama"`) as transformers' Llama converter builds it:
    BPE with merges recovered from the scores, byte fallback, '▁' for spaces."""
    tokens = meta["tokenizer.ggml.tokens"]
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise ModelLoadError("GGUF SentencePiece vocabulary needs one tokenizer.ggml.scores entry per token")
    vocab = {token: i for i, token in enumerate(tokens)}
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    if meta.get("tokenizer.ggml.merges"):  # rare, but when the file lists merges they are the truth
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    else:
        merges = _merges_from_scores(vocab, dict(zip(tokens, scores, strict=True)))
    bpe = models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    backend = HFTokenizer(bpe)
    # llama.cpp's default is to prefix a space; transformers (legacy=False) prepends it to the first word only.
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:  # take back the space the pre-tokenizer added
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two tokens, best score first.

    The same order as transformers' `generate_merges` (ties: longer left, then longer right piece, then
    vocabulary order), so the two tokenizers agree merge for merge.
    """
    found = []
    for token, score in scores.items():
        local = [
            (token[:k], token[k:], score)
            for k in range(1, len(token))
            if token[:k] in vocab and token[k:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        found.extend(local)
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


def _add_whole_tokens(backend: HFTokenizer, tokens: list[str], types: list[int]) -> None:
    """Control tokens (`<|im_start|>`) become special added tokens and user-defined ones (`<think>`) plain
    added tokens, so each is matched whole in the text as llama.cpp does. Only control tokens are dropped
    by `decode(skip_special_tokens=True)`: llama.cpp also prints user-defined tokens as text."""
    typed = list(zip(tokens, types, strict=False))  # a file without token types has no such tokens
    control = [AddedToken(t, special=True, normalized=False) for t, k in typed if k == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, k in typed if k == _USER_DEFINED]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)
