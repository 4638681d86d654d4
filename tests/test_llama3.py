"""Llama 3's RoPE scaling (rope_type "llama3") in every engine, through the CLI's compare.

The toy checkpoint's original context is 32 tokens and the prompts are 60, so the positions the
scaling exists for (beyond the original context) are exercised, and most of its frequencies are
divided by the factor: an engine that ignored the scaling would be far off (test_scaling_matters).
"""
import dataclasses
import json
import random

import numpy as np
import pytest
import torch

from llmbook import backends
from llmbook.backends.hf import HFBackend
from llmbook.checkpoint import (TOY_GQA, TOY_LLAMA3, CheckpointError, Llama3RoPE, LlamaConfig, load_model,
                                random_checkpoint)
from llmbook.cli import main
from llmbook.rope import default_inv_freq, inv_freq

_rng = random.Random(1)
PROMPT = [_rng.randrange(TOY_LLAMA3.vocab_size) for _ in range(60)]  # distinct tokens: a repeated
# token makes every key and value alike, and then no RoPE, right or wrong, changes the output
STEPS = 20
FP32 = ["hf", "mlx", "torch-fused", "tvm", "tflite"]


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("toy_llama3"), TOY_LLAMA3, seed=5)


def cli_compare(capsys, backend, model, ids=PROMPT, steps=STEPS) -> dict:
    args = ["compare", "--backend", backend, "--model", str(model),
            "--token-ids", ",".join(map(str, ids)), "--steps", str(steps)]
    code = main(args)
    out, err = capsys.readouterr()
    if code == 2 and f"backend {backend!r} needs" in err:  # the engine is not installed here
        pytest.skip(err.strip())
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("scaling", [
    TOY_LLAMA3.rope_scaling,
    Llama3RoPE(32.0, 1.0, 4.0, 8192),  # Llama 3.2's settings
    Llama3RoPE(8.0, 1.0, 4.0, 8192),  # Llama 3.1's
    Llama3RoPE(2.0, 0.5, 3.0, 100),
])
@pytest.mark.parametrize("head_dim, theta", [(32, 500000.0), (64, 500000.0), (128, 10000.0)])
def test_inv_freq_matches_transformers(scaling, head_dim, theta):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = dataclasses.replace(TOY_LLAMA3, head_dim=head_dim, rope_theta=theta, rope_scaling=scaling)
    theirs = ROPE_INIT_FUNCTIONS["llama3"](cfg.to_hf())[0].double().numpy()
    ours = inv_freq(cfg)
    assert ours.shape == theirs.shape == (head_dim // 2,)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    plain = LlamaRotaryEmbedding(dataclasses.replace(cfg, rope_scaling=None).to_hf()).inv_freq
    np.testing.assert_allclose(default_inv_freq(head_dim, theta), plain.double().numpy(), rtol=1e-6)


def test_config_reads_the_scaling(llama3_dir):
    bundle = load_model(llama3_dir)
    assert bundle.config == TOY_LLAMA3
    assert bundle.hf_model.config.rope_parameters["rope_type"] == "llama3"
    assert LlamaConfig.from_hf(TOY_LLAMA3.to_hf()) == TOY_LLAMA3
    assert LlamaConfig.from_hf(TOY_GQA.to_hf()).rope_scaling is None


@pytest.mark.parametrize("rope, message", [
    ({"rope_type": "yarn", "factor": 2.0}, "rope_type 'yarn' is not supported"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
     "needs original_max_position_embeddings"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
      "original_max_position_embeddings": 32}, "out of range"),
])
def test_bad_rope_settings_are_refused(rope, message):
    hf = TOY_GQA.to_hf()
    hf.rope_parameters = {"rope_theta": 10000.0, **rope}
    with pytest.raises(CheckpointError, match=message):
        LlamaConfig.from_hf(hf)


def test_scaling_matters(llama3_dir, tmp_path):
    """The same weights with plain RoPE give other logits: the parity tests below can fail."""
    config = json.loads((llama3_dir / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": TOY_LLAMA3.rope_theta}
    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    (plain_dir / "config.json").write_text(json.dumps(config))
    (plain_dir / "model.safetensors").symlink_to(llama3_dir / "model.safetensors")
    scaled, plain = HFBackend(load_model(llama3_dir)), HFBackend(load_model(plain_dir))
    assert np.abs(scaled.prefill(PROMPT) - plain.prefill(PROMPT)).max() > 0.05


@pytest.mark.parametrize("backend", FP32)
def test_compare_matches_the_reference(backend, llama3_dir, capsys):
    result = cli_compare(capsys, backend, llama3_dir)
    assert result["max_abs_diff"] <= 1e-3 and result["greedy_match"] == STEPS, result


def test_int8_applies_the_scaling(llama3_dir, tmp_path):
    """tflite-int8 cannot match to 1e-3 (its weights are int8): it must be much closer to the
    llama3 reference than that reference is to the same weights run with plain RoPE."""
    bundle = load_model(llama3_dir)
    try:
        int8 = backends.get_backend("tflite-int8", bundle)
    except backends.BackendUnavailable as e:
        pytest.skip(str(e))
    ref = HFBackend(bundle).prefill(PROMPT)
    plain = load_model(random_checkpoint(tmp_path / "plain", TOY_GQA, seed=5))
    assert torch.equal(plain.state_dict["model.layers.0.self_attn.q_proj.weight"],
                       bundle.state_dict["model.layers.0.self_attn.q_proj.weight"])
    off_plain = np.abs(HFBackend(plain).prefill(PROMPT) - ref).max()
    off_int8 = np.abs(int8.prefill(PROMPT) - ref).max()
    assert off_int8 < off_plain / 2, (off_int8, off_plain)


def test_bf16_sharded_checkpoint(tmp_path, capsys):
    """A Llama 3-shaped download: bf16 weights in several safetensors shards with an index."""
    import transformers

    torch.manual_seed(7)
    model = transformers.LlamaForCausalLM(TOY_LLAMA3.to_hf(initializer_range=0.1)).to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").exists()
    bundle = load_model(tmp_path)
    assert bundle.config == TOY_LLAMA3
    assert next(bundle.hf_model.parameters()).dtype == torch.float32
    for backend in ("mlx", "tvm"):
        result = cli_compare(capsys, backend, tmp_path)
        assert result["max_abs_diff"] <= 1e-3 and result["greedy_match"] == STEPS, result
