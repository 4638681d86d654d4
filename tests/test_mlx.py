"""The MLX model of chapters 1-4 against the Hugging Face reference, and its weight conversion."""
import mlx.core as mx
import numpy as np
import pytest
import torch

from llmbook.backends import get_backend
from llmbook.backends.hf import HFBackend
from llmbook.checkpoint import CheckpointError
from llmbook.generation import compare
from llmbook.mlx_llama.convert import hf_to_mlx, load_weights, mlx_name, unpermute_rope_rows
from llmbook.mlx_llama.model import Llama


@pytest.mark.parametrize("shape", ["toy", "toy_mha"])
def test_random_checkpoints_match_hf(shape, request):
    bundle = request.getfixturevalue(shape)
    result = compare(get_backend("mlx", bundle), HFBackend(bundle), list(range(5, 45)), steps=20)
    assert result["max_abs_diff"] < 1e-4
    assert result["greedy_match"] == 20


# SmolLM2 on mlx against transformers: chapter 8 checks it (every exact engine, < 1e-3,
# 8 of 8 greedy tokens), so it is not run twice here


def test_all_positions_match_hf(toy):
    model = load_weights(Llama(toy.config), hf_to_mlx(toy.state_dict))
    ids = list(range(1, 60))
    ours, _ = model(mx.array([ids]))
    with torch.inference_mode():
        ref = toy.hf_model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(np.array(ours[0]) - ref).max() < 1e-4


def test_chunked_prefill_equals_one_pass(toy):
    model = load_weights(Llama(toy.config), hf_to_mlx(toy.state_dict))
    ids = list(range(1, 30))
    full, _ = model(mx.array([ids]))
    _, cache = model(mx.array([ids[:17]]))
    rest, _ = model(mx.array([ids[17:]]), cache)
    assert np.abs(np.array(rest[0]) - np.array(full[0, 17:])).max() < 1e-5


def test_name_map_covers_every_hf_key(smollm2, toy):
    for bundle in (smollm2, toy):
        model = Llama(bundle.config)
        names = {mlx_name(k) for k in bundle.state_dict}
        assert names == set(dict(_flat(model.parameters())))


def _flat(params):
    from mlx.utils import tree_flatten
    return tree_flatten(params)


def test_unknown_hf_key_is_refused():
    with pytest.raises(CheckpointError, match="unexpected key 'model.layers.0.self_attn.rotary.weight'"):
        mlx_name("model.layers.0.self_attn.rotary.weight")


def test_load_weights_refuses_bad_sets(toy):
    weights = hf_to_mlx(toy.state_dict)
    missing = {k: v for k, v in weights.items() if k != "out_proj.weight"}
    with pytest.raises(CheckpointError, match="missing keys: out_proj.weight"):
        load_weights(Llama(toy.config), missing)
    wrong = weights | {"norm.weight": mx.zeros((3,))}
    with pytest.raises(CheckpointError, match=r"norm.weight has shape \(3,\), expected \(128,\)"):
        load_weights(Llama(toy.config), wrong)


def llama_cpp_permute(w, n_heads):
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (written from its description)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.random.default_rng(0).normal(size=(3 * 64, 10)).astype(np.float32)
    back = unpermute_rope_rows(mx.array(llama_cpp_permute(w, 3)), 3)
    assert np.array_equal(np.array(back), w)


# the GGUF path against the Hugging Face path, every weight bit for bit: chapter 4,
# "Straight from the GGUF file"
