"""SmolLM2's GGUF requantized by llama.cpp to Q4_0 (the format its repacked x86 kernels cover):
the cached file, its blocks as llmbook.quant reads them, tvm-q4 on them, and the backend
`llama.cpp-q4_0`. Everything but the gguf-py test needs llama-cpp-python, which makes the file;
where it is not installed those tests are skipped, and the skip is reported."""
import dataclasses

import gguf
import numpy as np
import pytest

from llmbook import bench, quality
from llmbook.backends import BackendUnavailable, get_backend
from llmbook.backends.hf import HFBackend
from llmbook.checkpoint import TOY_GQA, CheckpointError, load_model, smollm2_gguf
from llmbook.generation import greedy
from llmbook.gguf_names import hf_name
from llmbook.quant import Q4Matrix, Q8Matrix, halves_order, read_gguf

Q4_0 = gguf.GGMLQuantizationType.Q4_0


def needs_llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make could "
                               "not compile it; see book/how_to_run.md)")


@pytest.fixture(scope="module")
def path():
    needs_llama_cpp()
    from llmbook.backends.llama_cpp import requantized

    return requantized(smollm2_gguf())


@pytest.fixture(scope="module")
def bundle(path):
    return load_model(str(path))  # the Q4_0 file dequantized: its own fp32 reference


@pytest.fixture(scope="module")
def reader(path):
    return gguf.GGUFReader(path)


def test_q4_0_blocks_read_as_gguf_writes_them(tmp_path):
    """gguf-py's own Q4_0 quantizer writes the file: the blocks read as Q4_1's form (minimum
    -8 times the scale) give its values exactly."""
    w = np.random.default_rng(5).standard_normal((32, 64)).astype(np.float32)
    raw = gguf.quants.quantize(w, Q4_0)
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), arch="llama")
    writer.add_tensor("blk.0.attn_v.weight", raw, raw_shape=raw.shape, raw_dtype=Q4_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    got = read_gguf(tmp_path / "m.gguf", TOY_GQA)["model.layers.0.self_attn.v_proj.weight"]
    assert isinstance(got, Q4Matrix)
    assert np.array_equal(got.minimum, -8 * got.scale)
    assert np.array_equal(got.dequantize(), gguf.quants.dequantize(raw, Q4_0))


def test_requantized_once_to_the_types_read(path, reader):
    from llmbook.backends.llama_cpp import requantized

    made = path.stat().st_mtime_ns
    assert requantized(smollm2_gguf()) == path and path.stat().st_mtime_ns == made  # not rewritten
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types.pop("token_embd.weight") == "Q8_0"  # kept as the file has it, the tied head
    assert {n.rsplit(".", 2)[-2] for n, k in types.items() if k == "F32"} == {
        "attn_norm", "ffn_norm", "output_norm"}
    assert {k for k in types.values() if k != "F32"} == {"Q4_0"}
    with pytest.raises(ValueError, match="cannot requantize to 'Q4_K'; known kinds: Q4_0"):
        requantized(smollm2_gguf(), "Q4_K")


def test_a_failed_requantization_is_one_line(tmp_path, monkeypatch):
    needs_llama_cpp()
    from llmbook.backends.llama_cpp import requantized

    monkeypatch.setenv("LLMBOOK_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a GGUF file")
    with pytest.raises(CheckpointError, match="could not requantize .*bad.gguf to Q4_0: ") as e:
        requantized(bad)
    assert "\n" not in str(e.value)
    assert not any((tmp_path / "cache").iterdir())  # no half file left, under any name


def test_blocks_equal_gguf_dequantization(reader, bundle):
    cfg = bundle.config
    blocks = read_gguf(reader, cfg)
    heads = {"attn_q": cfg.num_heads, "attn_k": cfg.num_kv_heads}
    for t in reader.tensors:
        if t.tensor_type.name == "F32":
            continue
        got = blocks[hf_name(t.name)]
        assert isinstance(got, Q8Matrix if t.name == "token_embd.weight" else Q4Matrix), t.name
        want = gguf.quants.dequantize(t.data, t.tensor_type)
        if (kind := t.name.split(".")[-2]) in heads:  # read_gguf puts q, k in Hugging Face's order
            want = want[halves_order(len(want), heads[kind])]
        assert np.array_equal(got.dequantize(), want), t.name


def test_tvm_q4_runs_the_q4_0_blocks(bundle, smollm2):
    pytest.importorskip("tvm", reason="apache-tvm is not installed")
    # the compiled library depends on the config only, not on the weights: under SmolLM2's name
    # it is the one already in the cache, not another build
    engine = get_backend("tvm-q4", dataclasses.replace(bundle, name=smollm2.name))
    assert engine.source.startswith("the Q4_0 and Q8_0 blocks of ") and engine.own_weights is None
    # held as test_backends holds tvm-q4, to the reference model on the weights it runs
    ref, ids = HFBackend(bundle), smollm2.chat_ids("What is the capital of France?")
    assert np.abs(engine.prefill(ids) - ref.prefill(ids)).max() <= 1e-3
    assert greedy(engine, ids, 4) == greedy(ref, ids, 4)


def test_llama_cpp_q4_0(smollm2, path, bundle):
    engine = get_backend("llama.cpp-q4_0", smollm2, n_ctx=256)
    assert engine.name == "llama.cpp-q4_0" and engine.quantized and engine.path == path
    # llama.cpp's count of the requantized tensors: fewer bytes than the file's Q4_1 (18 bytes a
    # block, not 20), the Q8_0 table as it was
    q4_1 = get_backend("llama.cpp", smollm2, n_ctx=256).weight_bytes
    assert 0.85 * q4_1 < engine.weight_bytes < q4_1
    text = bench.text_ids(smollm2)[:33]
    logits = quality.teacher_forced(engine, text)
    # against the reference on the requantized weights it runs: only its 8-bit activations
    # differ, held as test_llama_cpp holds llama.cpp on the file's own weights
    own = quality.compare_on_text(logits, quality.teacher_forced(HFBackend(bundle), text), text)
    assert own["top1_agreement"] >= 0.9 and own["kl_divergence"] < 0.05, own
    # against the file's Q4_1 reference: another model, each block rounded again to a symmetric
    # one, which on this small model changes the top token at about half the positions (a wrong
    # weight or layer order agrees almost nowhere, and its perplexity is in the thousands)
    fp32 = quality.compare_on_text(logits, quality.teacher_forced(HFBackend(smollm2), text), text)
    assert fp32["top1_agreement"] > 0.3 and fp32["perplexity"] < 1.5 * fp32["ref_perplexity"], fp32


def test_only_for_a_model_with_a_gguf(toy):
    needs_llama_cpp()
    with pytest.raises(BackendUnavailable, match="llama.cpp-q4_0 backend: .* not loaded from a GGUF"):
        get_backend("llama.cpp-q4_0", toy)
