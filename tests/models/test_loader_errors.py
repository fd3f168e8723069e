"""Every way a model path can be wrong gives one clear ModelLoadError, never a traceback from deep inside."""

from __future__ import annotations

import json
import shutil

import pytest

from tokenmill.errors import ModelLoadError
from tokenmill.models.loader import load_model


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="no model weights found"):
        load_model(tmp_path)


def test_pytorch_bin_is_explained(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match="convert them to safetensors"):
        load_model(tmp_path)


def test_not_a_model_file(tmp_path):
    f = tmp_path / "weights.txt"
    f.write_text("hello")
    with pytest.raises(ModelLoadError, match="Hugging Face folder or a .gguf file"):
        load_model(f)


def test_unsupported_architecture_lists_supported(tmp_path, tiny_model_dirs):
    folder = _copy(tiny_model_dirs["llama"], tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="'GPT2LMHeadModel' is not supported.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        load_model(folder)


def test_missing_config_json(tmp_path, tiny_model_dirs):
    folder = _copy(tiny_model_dirs["llama"], tmp_path / "m")
    (folder / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(folder)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(tmp_path, tiny_model_dirs, damage):
    folder = _copy(tiny_model_dirs["llama"], tmp_path / "m")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x13\x37" * 500)
    with pytest.raises(ModelLoadError, match="cannot read safetensors file"):
        load_model(folder)


def test_missing_shard(tmp_path, tiny_model_dirs):
    folder = _copy(tiny_model_dirs["llama"], tmp_path / "m")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ModelLoadError, match="shards listed in the index are missing"):
        load_model(folder)


def test_missing_tensor(tmp_path, tiny_model_dirs):
    from safetensors.torch import load_file, save_file

    folder = _copy(tiny_model_dirs["llama"], tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ModelLoadError, match="missing weights: model.layers.1.mlp.down_proj.weight"):
        load_model(folder)


def test_sharded_checkpoint_loads(tmp_path, tiny_model_dirs):
    from safetensors.torch import load_file, save_file

    folder = _copy(tiny_model_dirs["qwen2"], tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, folder / shard)
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = load_model(folder)
    assert loaded.source.kind == "hf" and len(loaded.source.weight_files) == 2


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_gguf(tmp_path, default_gguf, damage):
    bad = tmp_path / "bad.gguf"
    with open(default_gguf, "rb") as f:
        head = f.read(3_000_000)
    bad.write_bytes(head if damage == "truncate" else b"GGUF" + b"\xff" * 4096)
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        load_model(bad)


def test_unsupported_gguf_architecture(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match="GGUF architecture 'gpt2' is not supported.*llama.*qwen2.*qwen3"):
        load_model(path)
