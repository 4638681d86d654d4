"""The LiteRT export (chapter 7): name mapping, quality metrics on known inputs, a tiny random model
converted and run against the reference, the on-disk cache, and errors for bad input."""
import dataclasses

import numpy as np
import pytest

from llmbook import quality
from llmbook.backends import get_backend
from llmbook.backends.hf import HFBackend
from llmbook.checkpoint import TOY_GQA
from llmbook.generation import ContextError, greedy
from llmbook.litert_llama.compat import import_generative

import_generative()

from llmbook.litert_llama import build  # noqa: E402
from llmbook.litert_llama.model import build_model, model_config, tensor_names  # noqa: E402

TOL = 1e-4


def test_config_and_names():
    mcfg = model_config(TOY_GQA, 64)
    attn = mcfg.block_config(0).attn_config
    assert (attn.num_heads, attn.num_query_groups, attn.head_dim, attn.rotary_base) == (8, 2, 32, 500000)
    assert mcfg.final_norm_config.epsilon == TOY_GQA.rms_norm_eps and not mcfg.lm_head_share_weight_with_embedding
    names = tensor_names(TOY_GQA)
    assert names.attn_query_proj.format(2) == "model.layers.2.self_attn.q_proj" and names.lm_head == "lm_head"
    assert tensor_names(dataclasses.replace(TOY_GQA, tie_word_embeddings=True)).lm_head is None
    with pytest.raises(ValueError, match="integer"):
        model_config(dataclasses.replace(TOY_GQA, rope_theta=1e4 + 0.5), 64)


def test_mapping_copies_weights(toy):
    sd = toy.state_dict
    model = build_model(toy.config, sd, 64)
    got = model.state_dict()
    assert np.array_equal(got["tok_embedding.weight"].numpy(), sd["model.embed_tokens.weight"].numpy())
    assert np.array_equal(got["lm_head.weight"].numpy(), sd["lm_head.weight"].numpy())
    assert np.array_equal(got["final_norm.weight"].numpy(), sd["model.norm.weight"].numpy())
    assert len(sd) == len(toy.state_dict)  # the loader popped from a copy, not from the bundle's dict


@pytest.mark.parametrize("tied", [False, True])
def test_forward_equals_the_librarys_decoder(toy, tied):
    """Chapter 7's hand-written forward computes what litert-torch's DecoderOnlyModel does,
    bit for bit, with a separate head and with a tied one, over a prefill and a decode call."""
    import torch
    from litert_torch.generative.layers import kv_cache as kv_utils
    from litert_torch.generative.utilities import model_builder

    cfg, sd = toy.config, dict(toy.state_dict)
    if tied:
        cfg = dataclasses.replace(cfg, tie_word_embeddings=True)
        sd.pop("lm_head.weight")
    ours = build_model(cfg, sd, 64).eval()
    theirs = model_builder.build_decoder_only_model(
        "in-memory", model_config(cfg, 64), tensor_names(cfg),
        custom_loader=lambda _path: dict(sd), mask_cache_size=64).eval()
    assert type(ours) is not type(theirs)
    kv_a = kv_b = kv_utils.KVCache.from_model_config(64, ours.config)
    calls = [([5, 9, 2, 7, 1], range(5)), ([3], [5]), ([8], [6])]
    with torch.inference_mode():
        for tokens, positions in calls:
            t = torch.tensor([tokens], dtype=torch.int)
            p = torch.tensor(list(positions), dtype=torch.int)
            a, b = ours(t, p, kv_a), theirs(t, p, kv_b)
            assert torch.equal(a["logits"], b["logits"])
            kv_a, kv_b = a["kv_cache"], b["kv_cache"]
        assert all(torch.equal(x.k_cache, y.k_cache) for x, y in zip(kv_a.caches, kv_b.caches))


def test_mapping_rejects_leftover_weights(toy):
    sd = dict(toy.state_dict) | {"model.extra.weight": toy.state_dict["model.norm.weight"]}
    with pytest.raises(ValueError, match="model.extra.weight"):
        build_model(toy.config, sd, 64)


def test_metrics_on_known_inputs():
    a = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]))
    assert quality.top1_agreement(a, a) == 1.0 and quality.kl_divergence(a, a) == pytest.approx(0.0, abs=1e-12)
    b = np.log(np.array([[0.2, 0.7, 0.1], [0.1, 0.3, 0.6]]))
    assert quality.top1_agreement(b, a) == 0.5
    kl0 = 0.7 * np.log(0.7 / 0.2) + 0.2 * np.log(0.2 / 0.7)  # KL(a || b) at position 0, 0 at position 1
    assert quality.kl_divergence(b, a) == pytest.approx(kl0 / 2)
    assert quality.perplexity(a, [0, 2]) == pytest.approx(np.exp(-(np.log(0.7) + np.log(0.6)) / 2))
    assert quality.perplexity(np.zeros((4, 10)), [1, 2, 3, 4]) == pytest.approx(10.0)  # uniform: vocab size
    with pytest.raises(ValueError):
        quality.perplexity(a, [0])
    with pytest.raises(ValueError):
        quality.top1_agreement(a, a[:1])


@pytest.fixture(scope="module")
def tfl_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tflite")


@pytest.fixture(scope="module")
def toy_tfl(toy, tfl_root):
    return get_backend("tflite", toy, prefill_len=16, kv_len=48, root=tfl_root)


def test_tflite_matches_reference(toy, toy_tfl):
    ref = HFBackend(toy)
    assert toy_tfl.info["converted_now"] and toy_tfl.max_context == 48 and toy_tfl.prefill_len == 16
    for ids in ([5, 17, 300, 42, 7, 99, 250, 1, 64], list(range(1, 40))):  # one chunk; chunks + decode tail
        assert float(np.max(np.abs(toy_tfl.prefill(ids) - ref.prefill(ids)))) < TOL
    ids = [5, 17, 300, 42, 7]
    assert greedy(toy_tfl, ids, 12) == greedy(ref, ids, 12)
    tf_rows, ref_rows = quality.teacher_forced(toy_tfl, list(range(3, 40))), quality.teacher_forced(ref, list(range(3, 40)))
    assert quality.top1_agreement(tf_rows, ref_rows) == 1.0


def test_cache_reused_and_keyed(toy, toy_tfl, tfl_root):
    again = get_backend("tflite", toy, prefill_len=16, kv_len=48, root=tfl_root)
    assert not again.info["converted_now"] and again.path == toy_tfl.path
    assert again.info["peak_rss_gb"] > 0 and again.info["seconds"] > 0 and again.info["step"] == "conversion"
    base = build.model_path(toy, "fp32", 16, 48)[0]
    assert base == build.model_path(toy, "fp32", 16, 48)[0]
    assert base != build.model_path(toy, "int8-dynamic", 16, 48)[0]
    assert base != build.model_path(toy, "fp32", 32, 48)[0]


def test_cache_keyed_by_environment(toy, monkeypatch):
    base = build.model_path(toy, "fp32", 16, 48)[0]
    monkeypatch.setattr(build, "environment_digest", lambda: "another-env")
    assert build.model_path(toy, "fp32", 16, 48)[0] != base  # an upgraded dependency converts anew


def test_int8_rewritten_from_the_cached_fp32_file(toy, toy_tfl, tfl_root):
    fp32_written = toy_tfl.path.stat().st_mtime_ns
    int8 = get_backend("tflite-int8", toy, prefill_len=16, kv_len=48, root=tfl_root)
    assert int8.recipe == "int8-hadamard" and int8.info["step"] == "quantization" and int8.info["seconds"] > 0
    assert toy_tfl.path.stat().st_mtime_ns == fp32_written  # the fp32 file was reused, not converted again
    assert int8.path.stat().st_size < 0.5 * toy_tfl.path.stat().st_size
    ids = list(range(3, 40))
    a, b = quality.teacher_forced(int8, ids), quality.teacher_forced(toy_tfl, ids)
    assert quality.top1_agreement(a, b) >= 0.8


def test_recipes(toy, tfl_root):
    from llmbook.litert_llama import convert

    assert build.RECIPES == (*convert.RECIPES, convert.INT4)
    with pytest.raises(ValueError, match="unknown recipe 'int4'"):
        build.load_or_convert(toy, "int4", 16, 48, root=tfl_root)


def test_bad_input(toy_tfl):
    with pytest.raises(ContextError):
        toy_tfl.prefill([1] * 49)  # longer than the KV cache: refused, not truncated
    with pytest.raises(ValueError, match="out of range"):
        toy_tfl.prefill([1, TOY_GQA.vocab_size])
    with pytest.raises(ValueError, match="no token ids"):
        toy_tfl.prefill([])
    toy_tfl.prefill([1] * 47)
    toy_tfl.decode(2)
    with pytest.raises(ContextError):
        toy_tfl.decode(3)
