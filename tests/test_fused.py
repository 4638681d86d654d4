"""The fused decoder layer (chapter 5): the operation against transformers' LlamaDecoderLayer on
random weights of several shapes, prefill then decode with past K/V; the swapped model and the
`torch-fused` backend against the reference; bad input."""
import json

import numpy as np
import pytest
import torch
import transformers
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from llmbook.backends import get_backend
from llmbook.backends.hf import HFBackend
from llmbook.cli import main
from llmbook.fused_llama.layer import fuse_weights, fused_decoder_layer, rope_tables
from llmbook.generation import ContextError, greedy

SHAPES = [  # heads, kv_heads, head_dim, hidden, rope_theta
    (4, 4, 16, 64, 1e4),
    (8, 2, 32, 192, 5e5),
    (9, 3, 64, 576, 1e5),  # SmolLM2's attention
    (6, 1, 24, 120, 1e6),  # multi-query, head_dim * heads != hidden
]


def random_layer(heads, kv_heads, head_dim, hidden, theta, seed=0):
    torch.manual_seed(seed)
    c = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=3 * hidden, num_attention_heads=heads,
                                 num_key_value_heads=kv_heads, head_dim=head_dim, num_hidden_layers=1,
                                 rope_parameters={"rope_type": "default", "rope_theta": theta}, rms_norm_eps=1e-5)
    c._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(c, layer_idx=0).eval()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return c, layer


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-{s[1]}-{s[2]}-{s[3]}")
@torch.inference_mode()
def test_operation_matches_llama_decoder_layer(shape):
    c, layer = random_layer(*shape)
    hd, max_len = shape[2], 32
    rotary = LlamaRotaryEmbedding(c)
    cos_t, sin_t = rope_tables(hd, shape[4], max_len)
    w = fuse_weights(layer)
    assert w.qkv.shape == ((shape[0] + 2 * shape[1]) * hd, shape[3]) and w.gate_up.shape == (6 * shape[3], shape[3])
    k_cache, v_cache = torch.zeros(1, shape[1], max_len, hd), torch.zeros(1, shape[1], max_len, hd)
    dyn, start = DynamicCache(config=c), 0
    for n in (7, 1, 1, 3):  # a prompt, two decode steps, then a chunk on top of the cache
        x = torch.randn(1, n, shape[3])
        pos = torch.arange(start, start + n)
        mask = torch.arange(start + n) <= pos[:, None]
        ref = layer(x, attention_mask=torch.where(mask, 0.0, float("-inf"))[None, None], position_ids=pos[None],
                    past_key_values=dyn, use_cache=True, position_embeddings=rotary(x, pos[None]))
        out, k, v = fused_decoder_layer(x, w, cos_t[pos], sin_t[pos], mask, k_cache[:, :, :start + n],
                                        v_cache[:, :, :start + n], pos, shape[0], shape[1], 1e-5)
        start += n
        assert float((out - ref).abs().max()) < 1e-4
        assert torch.allclose(k, dyn.layers[0].keys, atol=1e-5) and torch.allclose(v, dyn.layers[0].values, atol=1e-5)
    assert k_cache[:, :, start:].abs().max() == 0  # written in place, nothing beyond the sequence


@pytest.mark.parametrize("compile", [False, True])
def test_backend_matches_reference(toy, compile):
    ids = [5, 17, 300, 42, 7, 99, 250, 1, 64]
    fused, ref = get_backend("torch-fused", toy, max_len=64, compile=compile), HFBackend(toy)
    assert float(np.max(np.abs(fused.prefill(ids) - ref.prefill(ids)))) < 1e-3
    assert greedy(fused, ids, 20) == greedy(ref, ids, 20)
    assert fused.prefill(ids[:3]) == pytest.approx(ref.prefill(ids[:3]), abs=1e-3)  # reset: a new sequence


def test_backend_tied_mha(toy_mha):
    fused, ref = get_backend("torch-fused", toy_mha, max_len=64), HFBackend(toy_mha)
    ids = [3, 8, 200, 11, 45]
    assert float(np.max(np.abs(fused.prefill(ids) - ref.prefill(ids)))) < 1e-3
    assert greedy(fused, ids, 12) == greedy(ref, ids, 12)


def test_original_model_untouched(toy):
    before = {k: v.clone() for k, v in toy.hf_model.state_dict().items()}
    get_backend("torch-fused", toy, max_len=16)
    assert type(toy.hf_model.model.layers[0]) is LlamaDecoderLayer
    after = toy.hf_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bad_input(toy):
    fused = get_backend("torch-fused", toy, max_len=16, compile=False)
    with pytest.raises(ValueError, match="out of range"):
        fused.prefill([1, toy.config.vocab_size])
    with pytest.raises(ValueError, match="no token ids"):
        fused.prefill([])
    with pytest.raises(ContextError, match="torch-fused: 0 cached \\+ 17 new tokens exceed the context of 16"):
        fused.prefill([1] * 17)
    fused.prefill([1] * 15)
    fused.decode(2)
    with pytest.raises(ContextError):
        fused.decode(3)


def test_cli_compare(toy_dir, capsys):
    assert main(["compare", "--backend", "torch-fused", "--model", str(toy_dir), "--token-ids", "1,2,3,4,5",
                 "--steps", "20"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["backend"] == "torch-fused" and result["greedy_match"] == 20 and result["max_abs_diff"] < 1e-3
