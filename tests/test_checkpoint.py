import json
import re
import shutil

import pytest
from safetensors.numpy import load_file, save_file

from llmbook.checkpoint import TOY_GQA, CheckpointError, LlamaConfig, expected_shapes, load_model


def copy_with(toy_dir, tmp_path, edit_weights=None, edit_config=None):
    """A copy of the toy checkpoint with its weights or config edited."""
    dest = tmp_path / "ckpt"
    shutil.copytree(toy_dir, dest)
    if edit_weights:
        weights = load_file(dest / "model.safetensors")
        edit_weights(weights)
        save_file(weights, dest / "model.safetensors")
    if edit_config:
        cfg = json.loads((dest / "config.json").read_text())
        edit_config(cfg)
        (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def test_random_checkpoint_round_trips_its_config(toy):
    assert toy.config == TOY_GQA
    assert toy.tokenizer is None
    assert set(toy.state_dict) == set(expected_shapes(TOY_GQA))


def test_smollm2_config(smollm2):
    c = smollm2.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 576, 9, 3, 64)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0 and c.vocab_size == 49152
    assert "lm_head.weight" not in smollm2.state_dict
    assert smollm2.eos_token_id == 2


def test_load_is_cached_within_a_process(toy_dir):
    assert load_model(toy_dir) is load_model(toy_dir)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="is not a directory"):
        load_model(tmp_path / "nothing")


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_model(tmp_path)


def test_not_a_llama(toy_dir, tmp_path):
    def gpt2(cfg):
        cfg["model_type"] = "gpt2"
    with pytest.raises(CheckpointError, match="not a Llama checkpoint"):
        load_model(copy_with(toy_dir, tmp_path, edit_config=gpt2))


def test_unsupported_rope_scaling(toy_dir, tmp_path):
    def scaled(cfg):
        cfg["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(CheckpointError, match="rope_type 'linear' is not supported"):
        load_model(copy_with(toy_dir, tmp_path, edit_config=scaled))


def test_missing_key(toy_dir, tmp_path):
    def drop(w):
        del w["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"missing keys: model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(copy_with(toy_dir, tmp_path, edit_weights=drop))


def test_unexpected_key(toy_dir, tmp_path):
    def add(w):
        w["model.layers.9.mlp.up_proj.weight"] = w["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"unexpected keys: model\.layers\.9\.mlp\.up_proj\.weight"):
        load_model(copy_with(toy_dir, tmp_path, edit_weights=add))


def test_wrong_shape(toy_dir, tmp_path):
    def shrink(w):
        w["model.layers.0.self_attn.k_proj.weight"] = w["model.layers.0.self_attn.k_proj.weight"][:32]
    with pytest.raises(CheckpointError, match=r"shape mismatch: model\.layers\.0\.self_attn\.k_proj\.weight has shape \(32, 128\), expected \(64, 128\)"):
        load_model(copy_with(toy_dir, tmp_path, edit_weights=shrink))


def test_no_weights(toy_dir, tmp_path):
    dest = copy_with(toy_dir, tmp_path)
    (dest / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_model(dest)


def test_truncated_weights(toy_dir, tmp_path):
    dest = copy_with(toy_dir, tmp_path)
    weights = dest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])
    message = f"{re.escape(str(weights))} is not a valid safetensors file"
    with pytest.raises(CheckpointError, match=message):
        load_model(dest)


def test_config_not_json(toy_dir, tmp_path):
    dest = copy_with(toy_dir, tmp_path)
    (dest / "config.json").write_text('{"model_type": "llama",')
    message = f"{re.escape(str(dest / 'config.json'))} is not valid JSON"
    with pytest.raises(CheckpointError, match=message):
        load_model(dest)


def test_expected_shapes_count():
    cfg = LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2,
                      num_kv_heads=1, head_dim=4, tie_word_embeddings=False)
    shapes = expected_shapes(cfg)
    assert len(shapes) == 2 * 9 + 3
    assert shapes["model.layers.1.self_attn.k_proj.weight"] == (4, 8)
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (8, 8)
