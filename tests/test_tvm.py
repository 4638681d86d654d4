"""The TVM-compiled model (chapter 6): weight conversion, the backend against the reference on
random checkpoints of two shapes, the on-disk library cache, bad input, and the roofline sums."""
import dataclasses

import numpy as np
import pytest

from llmbook.backends import BackendUnavailable, get_backend
from llmbook.backends.hf import HFBackend
from llmbook.checkpoint import TOY_GQA, CheckpointError, LlamaConfig
from llmbook.device import gpu_name
from llmbook.generation import ContextError, greedy
from llmbook import roofline
from llmbook.tvm_llama.convert import hf_to_tvm, tvm_shapes

TOL = 1e-3


@pytest.fixture(scope="module")
def toy_tvm(toy):
    # the machine's cache, as the command line uses it (test_batching has built it in this
    # run, or an earlier run has): chapter 6 builds SmolLM2 afresh and then loads it again
    return get_backend("tvm", toy)


def test_convert_fuses_qkv_and_gate_up(toy):
    cfg, sd = toy.config, toy.state_dict
    w = hf_to_tvm(sd, cfg, progress=False)
    assert {k: v.shape for k, v in w.items()} == tvm_shapes(cfg)
    q, k, v = (sd[f"model.layers.1.self_attn.{x}_proj.weight"].numpy() for x in "qkv")
    assert np.array_equal(w["model.layers.1.self_attn.qkv_proj.weight"], np.concatenate([q, k, v]))
    gate, up = (sd[f"model.layers.2.mlp.{x}_proj.weight"].numpy() for x in ("gate", "up"))
    assert np.array_equal(w["model.layers.2.mlp.gate_up_proj.weight"], np.concatenate([gate, up]))
    assert np.array_equal(w["lm_head.weight"], sd["lm_head.weight"].numpy())


def test_convert_tied_head_has_no_copy(toy_mha):
    w = hf_to_tvm(toy_mha.state_dict, toy_mha.config, progress=False)
    assert "lm_head.weight" not in w and {k: v.shape for k, v in w.items()} == tvm_shapes(toy_mha.config)


def test_convert_rejects_unknown_weights(toy):
    sd = dict(toy.state_dict) | {"model.extra.weight": np.zeros(3, np.float32)}
    with pytest.raises(ValueError, match="not used"):
        hf_to_tvm(sd, toy.config, progress=False)


def test_to_device_checks_shapes(toy):
    import tvm

    from llmbook.tvm_llama.convert import to_device

    w = hf_to_tvm(toy.state_dict, toy.config, progress=False)
    w["model.norm.weight"] = w["model.norm.weight"][:-1]
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        to_device(w, list(w), toy.config, tvm.cpu())


def test_tvm_matches_reference_gqa(toy, toy_tvm):
    ids = [5, 17, 300, 42, 7, 99, 250, 1, 64]
    ref = HFBackend(toy)
    assert float(np.max(np.abs(toy_tvm.prefill(ids) - ref.prefill(ids)))) < TOL
    assert greedy(toy_tvm, ids, 16) == greedy(ref, ids, 16)


def test_tvm_matches_reference_tied_mha(toy_mha):
    backend = get_backend("tvm", toy_mha)  # the machine's cache: this test is not about building
    ref = HFBackend(toy_mha)
    ids = [3, 8, 200, 11, 45]
    assert float(np.max(np.abs(backend.prefill(ids) - ref.prefill(ids)))) < TOL
    assert greedy(backend, ids, 12) == greedy(ref, ids, 12)


@pytest.mark.parametrize("cls", ["model.LlamaForCausalLM", "unfused.UnfusedLlamaForCausalLM",
                                 "tiled.TiledLlamaForCausalLM"])
def test_backend_builds_each_chapter_6_model(toy, cls):
    """TVMBackend(model_cls=...) builds chapter 6's other fp32 models, each with its weights in
    the layout it takes, and each computes the reference's function."""
    import importlib

    from llmbook.backends.tvm import TVMBackend

    module, name = cls.split(".")
    model_cls = getattr(importlib.import_module(f"llmbook.tvm_llama.{module}"), name)
    engine = TVMBackend(toy, model_cls=model_cls)  # the machine's cache
    ref, ids = HFBackend(toy), [4, 90, 13, 300, 2, 77]
    assert float(np.max(np.abs(engine.prefill(ids) - ref.prefill(ids)))) < TOL
    assert greedy(engine, ids, 8) == greedy(ref, ids, 8)


def test_backend_refuses_a_class_that_is_not_a_tvm_model(toy):
    from llmbook.backends.tvm import TVMBackend

    for cls in (HFBackend, "LlamaForCausalLM"):
        with pytest.raises(ValueError, match="is not a TVM model"):
            TVMBackend(toy, model_cls=cls)
    with pytest.raises(ValueError, match="bits must be 32 or 4"):
        TVMBackend(toy, bits=8)


def test_library_cache_reused(toy, toy_tvm):
    again = get_backend("tvm", toy)
    assert not again.build_info["built"] and again.build_info["path"] == toy_tvm.build_info["path"]
    ids = [9, 8, 7]
    assert np.array_equal(again.prefill(ids), toy_tvm.prefill(ids))


def test_library_key_depends_on_config_and_target(toy):
    from llmbook.tvm_llama.build import library_path
    from llmbook.tvm_llama.pipeline import cpu_target

    base = library_path("m", toy.config, cpu_target())
    assert base == library_path("m", toy.config, cpu_target())
    assert base != library_path("m", dataclasses.replace(toy.config, rope_theta=1e4), cpu_target())
    assert base != library_path("m", toy.config, cpu_target(fast_math=False))
    assert base != library_path("m", toy.config, cpu_target(), schedule=False)


def test_bad_input(toy_tvm):
    with pytest.raises(ValueError, match="out of range"):
        toy_tvm.prefill([1, TOY_GQA.vocab_size])
    with pytest.raises(ValueError, match="out of range"):
        toy_tvm.prefill([-1])
    with pytest.raises(ValueError, match="no token ids"):
        toy_tvm.prefill([])
    with pytest.raises(ContextError):
        toy_tvm.prefill([1] * (toy_tvm.max_context + 1))
    toy_tvm.prefill([1] * (toy_tvm.max_context - 1))
    toy_tvm.decode(2)
    with pytest.raises(ContextError):
        toy_tvm.decode(3)


def test_bad_device(toy):
    with pytest.raises(ValueError, match="device"):
        get_backend("tvm", toy, device="tpu")
    if gpu_name() is None:
        with pytest.raises(BackendUnavailable, match="cuda"):
            get_backend("tvm", toy, device="cuda")


def test_roofline_bytes():
    smollm2 = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                          num_kv_heads=3, head_dim=64, tie_word_embeddings=True)
    weights = roofline.weight_bytes_per_token(smollm2)
    assert weights == 4 * (134_515_008 + 576)  # every parameter once, plus the embedding row looked up
    assert roofline.kv_bytes_per_token(smollm2, 100) == 100 * 30 * 2 * 3 * 64 * 4
    assert roofline.decode_bytes_per_token(smollm2, 2, context=10) == weights // 2 + 10 * 30 * 2 * 3 * 64 * 2
    untied = dataclasses.replace(smollm2, tie_word_embeddings=False)  # the table is not read, the head is
    assert roofline.weight_bytes_per_token(untied) == weights
    assert roofline.decode_roofline(smollm2, 50.0) == pytest.approx(50e9 / weights)


def notebook_module(monkeypatch, name="notebook_cell"):
    """A module without a file, as a Jupyter kernel's __main__ is."""
    import sys
    import types

    module = types.ModuleType(name)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def define_in_cell(module, src: str, cell: str, scope: dict | None = None):
    """Run `src` as a notebook cell would: its code kept in linecache, as IPython keeps it."""
    import linecache

    linecache.cache[cell] = (len(src), None, src.splitlines(True), cell)
    module.__dict__.update(scope or {})
    module.__dict__["__name__"] = module.__name__
    exec(compile(src, cell, "exec"), module.__dict__)


def test_library_key_holds_a_notebook_class_source(toy, monkeypatch):
    """A model class written in a notebook has no file: the key holds its methods' source."""
    from llmbook.tvm_llama.build import library_path
    from llmbook.tvm_llama.pipeline import cpu_target

    keys = []
    for i, body in enumerate(("return x", "return x", "return -x")):
        module = notebook_module(monkeypatch, f"notebook_{i}")
        define_in_cell(module, "from llmbook.tvm_llama.model import LlamaForCausalLM\n"
                               "class Variant(LlamaForCausalLM):\n"
                               f"    def logits(self, x):\n        {body}\n", f"<cell-{i}>")
        keys.append(library_path("m", toy.config, cpu_target(), model_cls=module.Variant))
    assert keys[0] == keys[1] != keys[2]


def test_an_exported_class_shares_the_package_library(toy, monkeypatch):
    """A chapter's export cell defines the same class as the package module it is exported to:
    both get one key, so the chapter and the backends share one compiled library."""
    import inspect

    from llmbook.tvm_llama import tiled
    from llmbook.tvm_llama.build import library_path
    from llmbook.tvm_llama.pipeline import cpu_target

    module = notebook_module(monkeypatch)
    define_in_cell(module, inspect.getsource(tiled.TiledLlamaForCausalLM), "<export-cell>",
                   scope=dict(vars(tiled)))
    twin = module.TiledLlamaForCausalLM
    assert twin is not tiled.TiledLlamaForCausalLM
    assert (library_path("m", toy.config, cpu_target(), model_cls=twin)
            == library_path("m", toy.config, cpu_target(), model_cls=tiled.TiledLlamaForCausalLM))
