"""Shared fixtures: tiny random-weight models built locally (never downloaded) and the default GGUF.

Each tiny model is created with transformers from a small config, seeded, saved with safetensors next
to a byte-level BPE `tokenizer.json` trained here on a few sentences. The same folder is then loaded by
tokenmill and by transformers (the reference). Weights use a larger init std than HF's 0.02 so logits
are spread out and greedy decoding rarely meets a near-tie.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

TINY_VOCAB = 384
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Tokenmill grinds tokens: 12 + 30 = 42, and 2026 is a year.",
    "def add(a, b):\n    return a + b\n",
    "Streaming text must never break a character: 你好，世界！ 🚀🔥",
    "A mill turns grain into flour; an engine turns prompts into tokens.",
] * 20

# name -> (transformers config class, config kwargs). Shapes are tiny but keep every feature:
# GQA (4 heads / 2 kv heads), q/k/v bias (Qwen2), q/k norm with head_dim != hidden/heads (Qwen3),
# llama3 rope scaling, tied and untied embeddings.
TINY_MODELS = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False, rope_theta=10000.0)),
    "llama3-tied": ("LlamaConfig", dict(
        tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64})),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False, rope_theta=1000000.0)),
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=True, head_dim=32, rope_theta=1000000.0)),
}


def build_tokenizer_json(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "add_bos_token": False, "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    }))


def build_tiny_model(folder: Path, name: str, seed: int = 0) -> Path:
    import transformers

    config_cls, extra = TINY_MODELS[name]
    config = getattr(transformers, config_cls)(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, config_cls.replace("Config", "ForCausalLM"))(config)
    if name == "qwen2":  # HF zero-initializes biases; random ones make the bias path matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.2)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    build_tokenizer_json(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {name: build_tiny_model(root / name, name) for name in TINY_MODELS}


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    from tokenmill.models.source import default_model_path

    return default_model_path()


def assert_greedy_match(
    ours: list[int], ref: list[int], ref_logits: list[torch.Tensor], tol: float = 1e-3
) -> int | None:
    """Our greedy tokens equal the reference's, except at a verified near-tie.

    CPU float32 kernels differ in the last bits across batch shapes, so two correct implementations may
    part ways where the reference's top-2 logits are within `tol`. Everything before the first divergence
    must be identical; at it, our token must be the reference's runner-up and the margin must be < tol.
    Returns the divergence index (None when identical).
    """
    for i, (a, b) in enumerate(zip(ours, ref, strict=False)):
        if a != b:
            top = ref_logits[i].float().topk(2)
            margin = (top.values[0] - top.values[1]).item()
            assert a == top.indices[1].item() and margin < tol, (
                f"diverged at step {i}: ours {a}, reference {b} (reference top-2 {top.indices.tolist()}, "
                f"margin {margin:.2e} >= {tol})")
            return i
    assert len(ours) == len(ref), f"lengths differ: ours {len(ours)}, reference {len(ref)}"
    return None


@pytest.fixture(scope="session")
def server():
    """One `tokenmill serve` process on the default model for every test that talks HTTP."""
    from tests.server.harness import Server

    s = Server("--max-num-seqs", "32")
    yield s
    s.stop()
