"""GGUF loading: the default SmolLM2 file against transformers, synthetic files per architecture,
and dequantization of each tensor type."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import assert_greedy_match
from tests.models.gguf_writer import write_gguf
from tokenmill.engine.greedy import greedy_generate
from tokenmill.layers.attention import AttentionMetadata
from tokenmill.models.gguf_weights import dequantize, hf_name, unpermute_rows
from tokenmill.models.loader import load_model

PROMPTS = {
    "english": "The history of the printing press begins",
    "chinese": "请用一句话介绍一下长城。",
    "code": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "digits": "Compute 12345 + 67890 = ",
    "chat": "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "emoji": "I love pizza 🍕 and",
}


@pytest.fixture(scope="module")
def smollm(default_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = AutoModelForCausalLM.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name,
                                               dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name)
    return load_model(None, dtype="float32"), ref, tok


def test_default_model_weights_equal_reference(smollm):
    ours, ref, _ = smollm
    reference = ref.state_dict()
    for name, param in ours.model.named_parameters():
        assert torch.equal(param, reference[name]), name
    assert ours.config.tie_word_embeddings and ours.config.num_key_value_heads == 3


@torch.inference_mode()
def test_default_model_greedy_matches_transformers(smollm):
    """Every prompt decoded together by us; each alone by transformers. 32 tokens, eos stops both."""
    ours, ref, tok = smollm
    prompts = [tok(p, add_special_tokens=False).input_ids for p in PROMPTS.values()]
    results = greedy_generate(ours.model, prompts, max_new_tokens=32, eos_token_ids=[2])
    diverged = []
    for name, prompt, res in zip(PROMPTS, prompts, results, strict=True):
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=2,
                           pad_token_id=2, output_logits=True, return_dict_in_generate=True)
        expected = out.sequences[0, len(prompt):].tolist()
        if assert_greedy_match(res.token_ids, expected, [step[0] for step in out.logits]) is not None:
            diverged.append(name)
    assert len(diverged) <= 1, f"near-tie divergences on {diverged}: expected at most one"


@pytest.mark.parametrize("arch,tiny,qtype", [
    ("llama", "llama", "F32"), ("llama", "llama3-tied", "Q8_0"), ("qwen2", "qwen2", "F16"), ("qwen3", "qwen3", "F32")])
@torch.inference_mode()
def test_synthetic_gguf_matches_safetensors(tmp_path, tiny_model_dirs, arch, tiny, qtype):
    """A file laid out like llama.cpp's converter writes it (permuted q/k for llama, biases, q/k norms,
    no output.weight when tied) loads every parameter exactly as quantize->dequantize of the original."""
    import gguf

    path = write_gguf(tiny_model_dirs[tiny], tmp_path / f"{tiny}.gguf", arch, qtype)
    from_gguf = load_model(path, dtype="float32")
    from_st = load_model(tiny_model_dirs[tiny], dtype="float32")
    assert from_gguf.config.tie_word_embeddings == from_st.config.tie_word_embeddings
    gguf_params = dict(from_gguf.model.named_parameters())
    q = gguf.GGMLQuantizationType[qtype]
    for name, original in from_st.model.named_parameters():
        x = original.numpy()
        # Quantization works within rows, so it commutes with the q/k row permutation.
        expected = x if x.ndim == 1 or qtype == "F32" else gguf.quants.dequantize(gguf.quants.quantize(x, q), q)
        assert np.array_equal(gguf_params[name].numpy(), expected), name
    if qtype == "F32":
        ids = torch.arange(3, 60)
        meta = AttentionMetadata.build([len(ids)])
        torch.testing.assert_close(from_gguf.model.compute_logits(from_gguf.model(ids, meta)),
                                   from_st.model.compute_logits(from_st.model(ids, meta)))


@pytest.mark.parametrize("name", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_dequantize_round_trip(name):
    import gguf

    qtype = gguf.GGMLQuantizationType[name]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 64)).astype(np.float32)
    raw = gguf.quants.quantize(x, qtype)
    tensor = _FakeTensor(raw, qtype, shape=np.array([64, 8]))
    y = dequantize(tensor)
    assert y.shape == (8, 64) and y.dtype == np.float32
    tol = {"F16": 1e-3, "BF16": 1e-2, "Q8_0": 0.05}.get(name, 0.35)
    assert np.abs(y - x).max() < tol


@pytest.mark.parametrize("name", ["Q4_K", "Q5_K", "Q6_K"])
def test_dequantize_k_quants_shapes(name):
    """K-quants: the `gguf` package dequantizes them (it has no quantizer); we check shape handling."""
    import gguf

    qtype = gguf.GGMLQuantizationType[name]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.zeros((4, (512 // block) * size), dtype=np.uint8)
    y = dequantize(_FakeTensor(raw, qtype, shape=np.array([512, 4])))
    assert y.shape == (4, 512) and np.all(y == 0)


def test_name_mapping_and_unpermute():
    assert hf_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert hf_name("blk.0.attn_k_norm.weight") == "model.layers.0.self_attn.k_norm.weight"
    assert hf_name("output.weight") == "lm_head.weight" and hf_name("blk.1.weird.weight") is None
    from tests.models.gguf_writer import permute

    w = np.arange(6 * 16 * 3, dtype=np.float32).reshape(6 * 16, 3)
    assert np.array_equal(unpermute_rows(permute(w, 6), 6), w)


class _FakeTensor:
    def __init__(self, data, qtype, shape):
        self.data, self.tensor_type, self.shape, self.name = data, qtype, shape, "t"
