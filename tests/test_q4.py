"""Chapter 9's block formats (llmbook.quant) and the 4-bit engine's inputs: GGUF blocks read as
stored, rounding to nearest, and the one-line errors for what the engine does not handle."""
import dataclasses
import re
import subprocess
import sys

import gguf
import numpy as np
import pytest

from llmbook.checkpoint import CheckpointError, TOY_GQA
from llmbook.quant import (GROUP, Q4Matrix, bits_per_weight, quantize_q4, quantize_q8,
                           quantize_state_dict, read_gguf)
from llmbook.tvm_llama.q4 import TILE, tile_rows, to_tvm_q4


def write_gguf(path, tensors: dict):
    """A GGUF file holding `tensors`: name -> (fp32 array, block type)."""
    w = gguf.GGUFWriter(str(path), arch="llama")
    for name, (a, kind) in tensors.items():
        data = a if kind == gguf.GGMLQuantizationType.F32 else gguf.quants.quantize(a, kind)
        w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=kind)  # bytes per row
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_q4_rounds_to_the_nearest_step():
    w = np.random.default_rng(0).standard_normal((48, 96)).astype(np.float32)
    q = quantize_q4(w)
    assert q.codes.shape == (48, 48) and q.scale.shape == q.minimum.shape == (48, 3)
    err = np.abs(q.dequantize() - w).reshape(48, 3, GROUP)
    step = q.scale.astype(np.float32)[..., None]
    assert (err <= step / 2 + 2e-3 * np.abs(w).max()).all()  # half a step (fp16 scales aside)
    assert bits_per_weight(q) == 5.0 and bits_per_weight(quantize_q8(w)) == 8.5
    again = quantize_q4(q.dequantize())  # rounding the blocks' own values gives them back
    assert np.array_equal(again.codes, q.codes) and np.array_equal(again.scale, q.scale)


def test_q4_1_blocks_read_as_llama_cpp_writes_them(tmp_path):
    """gguf-py's own Q4_1 quantizer writes the file; read_gguf returns its values exactly."""
    w = np.random.default_rng(1).standard_normal((32, 64)).astype(np.float32)
    path = write_gguf(tmp_path / "m.gguf", {"blk.0.attn_v.weight": (w, gguf.GGMLQuantizationType.Q4_1)})
    cfg = TOY_GQA
    got = read_gguf(path, cfg)["model.layers.0.self_attn.v_proj.weight"]
    want = gguf.quants.dequantize(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_1),
                                  gguf.GGMLQuantizationType.Q4_1)
    assert isinstance(got, Q4Matrix) and np.array_equal(got.dequantize(), want)


@pytest.mark.parametrize("name, kind, message", [
    ("blk.0.attn_q.weight", gguf.GGMLQuantizationType.Q5_0, "blk.0.attn_q.weight is Q5_0"),
    ("blk.0.ffn_up.weight", gguf.GGMLQuantizationType.Q8_0, "blk.0.ffn_up.weight is Q8_0"),
    ("token_embd.weight", gguf.GGMLQuantizationType.Q4_1, "token_embd.weight is Q4_1"),
    ("rope_freqs.weight", gguf.GGMLQuantizationType.F32, "'rope_freqs.weight' is not part"),
])
def test_unhandled_gguf_tensors_are_named(tmp_path, name, kind, message):
    a = np.ones((32, 64), np.float32) if kind != gguf.GGMLQuantizationType.F32 else np.ones(32, np.float32)
    path = write_gguf(tmp_path / "m.gguf", {name: (a, kind)})
    with pytest.raises(CheckpointError, match=message):
        read_gguf(path, TOY_GQA)


def test_columns_must_fill_blocks():
    with pytest.raises(CheckpointError, match="40 columns; 4-bit blocks need a multiple of 32"):
        quantize_state_dict({"model.layers.0.mlp.up_proj.weight": np.zeros((8, 40), np.float32)})


def test_tiles_put_16_rows_side_by_side():
    w = np.random.default_rng(2).standard_normal((40, 64)).astype(np.float32)
    q = quantize_q4(w)
    t = tile_rows(q)  # 40 rows padded to 64: chapter 6's kernel takes tiles 4 at a time
    assert t["codes"].shape == (4, 2, 16, TILE) and t["scale"].shape == (4, 2, TILE)
    assert np.array_equal(t["codes"][2, 1, :, 3], q.codes[35, 16:])  # row 35: tile 2, lane 3
    assert not t["codes"][2, :, :, 8:].any() and not t["scale"][2, :, 8:].any()  # padding rows
    assert not t["codes"][3].any() and not t["scale"][3].any()
    with pytest.raises(TypeError, match="Q8 blocks expected"):
        to_tvm_q4({"model.norm.weight": np.ones(4), "model.embed_tokens.weight": q},
                  dataclasses.replace(TOY_GQA, num_layers=0, tie_word_embeddings=True))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "llmbook", *args], capture_output=True, text=True)


@pytest.mark.parametrize("make, message", [
    (lambda p: p, "is not a file"),
    (lambda p: (p.write_bytes(b"not a gguf at all"), p)[1], "transformers cannot load it"),
])
def test_a_bad_gguf_is_one_line(tmp_path, make, message):
    path = make(tmp_path / "bad.gguf")
    r = run_cli("compare", "--backend", "tvm-q4", "--model", str(path), "--token-ids", "1,2", "--steps", "2")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_products_equal_numpy(bits):
    """Chapter 9's kernels on the tiles of a Q4_1 (bits=4) or a Q8_0 matrix whose last
    tile is padded: quant_gemv for one token, and quant_gemm for a few (in passes of 16,
    8, 4, 2 and 1 tokens), give NumPy's product with the dequantized blocks."""
    import tvm

    from llmbook.tvm_llama.pipeline import cpu_target
    from llmbook.tvm_llama.q4 import quant_gemm, quant_gemv

    rng = np.random.default_rng(5)
    rows, cols = 40, 96  # 40 rows in 4 tiles of 16
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    q = quantize_q4(w) if bits == 4 else quantize_q8(w)
    dev = tvm.cpu()
    weights = [tvm.runtime.tensor(a, dev) for a in tile_rows(q).values()]
    for kernel, tokens in ((quant_gemv(rows, cols, bits), [1]),
                           (quant_gemm(rows, cols, bits), [1, 3, 16, 17, 31])):
        module = tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")})
        run = tvm.compile(module, cpu_target(threads=2))["main"]
        for m in tokens:
            x = rng.standard_normal((m, cols)).astype(np.float32)
            y = tvm.runtime.empty((m, 4 * TILE), "float32", dev)
            run(tvm.runtime.tensor(x, dev), *weights, y)
            np.testing.assert_allclose(
                y.numpy()[:, :rows], x @ q.dequantize().T, rtol=1e-4, atol=1e-4,
                err_msg=f"{kernel.attrs['global_symbol']}: {m} tokens")


@pytest.mark.parametrize("bits", [4, 8])
def test_prefetch_changes_no_bit_and_is_emitted(bits):
    """quant_gemv asks for the next tile's block ahead (chapter 9, "From memory"): the
    compiled kernel holds prefetch instructions, the one without (ahead=0) none, and both
    give the same bits, the last tile's prefetch pointing past the matrix included."""
    import tvm

    from llmbook.tvm_llama.pipeline import cpu_target
    from llmbook.tvm_llama.q4 import quant_gemv

    rng = np.random.default_rng(6)
    rows, cols = 40, 96
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    q = quantize_q4(w) if bits == 4 else quantize_q8(w)
    dev = tvm.cpu()
    weights = [tvm.runtime.tensor(a, dev) for a in tile_rows(q).values()]
    x = tvm.runtime.tensor(rng.standard_normal((1, cols)).astype(np.float32), dev)
    out = {}
    for ahead in (0, 1):
        kernel = quant_gemv(rows, cols, bits, ahead).with_attr("global_symbol", "main")
        built = tvm.compile(tvm.IRModule({"main": kernel}), cpu_target(threads=2))
        asm = built.mod.inspect_source("asm")
        # x86 prefetcht0, AArch64 prfm
        assert (re.search(r"\b(prefetch\w*|prfm)\b", asm) is not None) == (ahead > 0), ahead
        out[ahead] = tvm.runtime.empty((1, 4 * TILE), "float32", dev)
        built["main"](x, *weights, out[ahead])
    assert np.array_equal(out[0].numpy(), out[1].numpy())
