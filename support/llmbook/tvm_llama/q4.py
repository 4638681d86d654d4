# Generated from notebooks/09_4bit.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

"""Chapter 6's model in the GGUF's own bits: 4-bit matrices, an 8-bit
embedding and head, repacked into tiles of 16 rows, and decode kernels that
dequantize as they multiply. Written in notebooks/09_4bit.ipynb."""
import functools

import numpy as np
from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.script import tirx as T

from llmbook.quant import GROUP, Q4Matrix
from llmbook.tvm_llama.attention import with_attention_kernels  # section 5
from llmbook.tvm_llama.tiled import (TILE, TiledLlamaForCausalLM,  # chapter 6
                                     tiled_product, tiles)

def tile_rows(m) -> dict[str, np.ndarray]:
    """A Q4Matrix or Q8Matrix in tiles of 16 rows, one row per vector lane:
    codes [tiles, groups, byte, 16], scales [tiles, groups, 16]. A last tile
    past the matrix's end is padded with zero rows (to a multiple of 4 tiles,
    as chapter 6's tiled_matmul takes them for prefill)."""
    pad = tiles(m.shape[0]) * TILE - m.shape[0]

    def tiled(a, per_group):
        a = np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)])
        a = a.reshape(-1, TILE, a.shape[1] // per_group, per_group)
        return np.ascontiguousarray(a.transpose(0, 2, 3, 1).squeeze(2)
                                    if per_group == 1 else
                                    a.transpose(0, 2, 3, 1))

    four_bit = hasattr(m, "minimum")  # Q4_1; Q8_0 blocks have none
    out = {"codes": tiled(m.codes, 16 if four_bit else GROUP),
           "scale": tiled(m.scale, 1)}
    if four_bit:
        out["minimum"] = tiled(m.minimum, 1)
    return out


def stack_rows(*ms: Q4Matrix) -> Q4Matrix:
    """Matrices on top of each other (q, k, v; gate, up), blocks as they are."""
    return Q4Matrix(*(np.concatenate([getattr(m, f) for m in ms])
                      for f in ("codes", "scale", "minimum")))


def to_tvm_q4(weights: dict, cfg) -> dict[str, np.ndarray]:
    """llmbook.quant's blocks under Hugging Face names -> the parameters of
    the 4-bit model: q/k/v and gate/up stacked as in chapter 6, in tiles."""
    w = dict(weights)
    out = {"model.norm.weight": w.pop("model.norm.weight")}
    tables = {"model.embed_tokens": w.pop("model.embed_tokens.weight")}
    if not cfg.tie_word_embeddings:
        tables["lm_head"] = w.pop("lm_head.weight")
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        attn, mlp = p + "self_attn.", p + "mlp."
        mats = {
            "self_attn.qkv_proj": stack_rows(
                *[w.pop(f"{attn}{x}_proj.weight") for x in "qkv"]),
            "self_attn.o_proj": w.pop(attn + "o_proj.weight"),
            "mlp.gate_up_proj": stack_rows(
                w.pop(mlp + "gate_proj.weight"), w.pop(mlp + "up_proj.weight")),
            "mlp.down_proj": w.pop(mlp + "down_proj.weight"),
        }
        for name, m in mats.items():
            out |= {f"{p}{name}.{k}": v for k, v in tile_rows(m).items()}
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"{p}{norm}.weight"] = w.pop(f"{p}{norm}.weight")
    for name, m in tables.items():
        if hasattr(m, "minimum") or not hasattr(m, "scale"):
            raise TypeError(f"{name}: Q8 blocks expected, got {m!r:.40}")
        out |= {f"{name}.{k}": v for k, v in tile_rows(m).items()}
    if w:
        raise ValueError(f"weights the 4-bit model lacks: {sorted(w)[:3]}")
    return out


@functools.cache
def q4_gemv(rows: int, cols: int) -> tirx.PrimFunc:
    """y = W x for one token, W in Q4 tiles. Threads take whole tiles. For
    each block of 32 columns, 16 vector steps add q * x for the 16 rows of a
    tile (low and high nibbles in two registers), then one step applies the
    16 scales. The minimums need only the block sums of x:
    sum(m * x) = m * sum(x)."""
    # TVMScript looks up names used only in these annotations among the
    # module's globals: the shapes use n and g, which the bodies use too
    n, g = tiles(rows), cols // GROUP

    @T.prim_func(s_tir=True)
    def q4_gemv(x: T.Buffer((1, 1, g * GROUP), "float32"),
                codes: T.Buffer((n, g, 16, TILE), "uint8"),
                scale: T.Buffer((n, g, TILE), "float16"),
                minimum: T.Buffer((n, g, TILE), "float16"),
                y: T.Buffer((1, 1, n * TILE), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        xsum = T.sblock_alloc_buffer((g,), "float32")
        for b in range(g):
            with T.sblock("xsum"):
                vb = T.axis.remap("S", [b])
                xsum[vb] = T.float32(0)
                for j in range(GROUP):
                    xsum[vb] = xsum[vb] + x[0, 0, vb * GROUP + j]
        for t in T.parallel(n):
            with T.sblock("tile"):
                vt = T.axis.remap("S", [t])
                acc = T.sblock_alloc_buffer((TILE,), "float32", scope="local")
                lo = T.sblock_alloc_buffer((TILE,), "float32", scope="local")
                hi = T.sblock_alloc_buffer((TILE,), "float32", scope="local")
                for r in T.vectorized(TILE):
                    acc[r] = T.float32(0)
                for b in range(g):
                    for r in T.vectorized(TILE):
                        lo[r] = T.float32(0)
                        hi[r] = T.float32(0)
                    for j in T.unroll(16):
                        for r in T.vectorized(TILE):
                            # one byte, two codes: column j low, j + 16 high
                            lo[r] += T.Cast(
                                "float32", codes[vt, b, j, r] & T.uint8(15)
                            ) * x[0, 0, b * GROUP + j]
                            hi[r] += T.Cast(
                                "float32", codes[vt, b, j, r] >> T.uint8(4)
                            ) * x[0, 0, b * GROUP + 16 + j]
                    for r in T.vectorized(TILE):
                        acc[r] += (
                            T.Cast("float32", scale[vt, b, r]) * (lo[r] + hi[r])
                            + T.Cast("float32", minimum[vt, b, r]) * xsum[b])
                for r in T.vectorized(TILE):
                    y[0, 0, vt * TILE + r] = acc[r]

    return q4_gemv.with_attr("global_symbol", f"q4_gemv_{rows}x{cols}")


@functools.cache
def q8_gemv(rows: int, cols: int) -> tirx.PrimFunc:
    """y = W x for one token, W in Q8 tiles (the head): the same plan, with
    int8 codes and no minimum."""
    n, g = tiles(rows), cols // GROUP

    @T.prim_func(s_tir=True)
    def q8_gemv(x: T.Buffer((1, 1, g * GROUP), "float32"),
                codes: T.Buffer((n, g, GROUP, TILE), "int8"),
                scale: T.Buffer((n, g, TILE), "float16"),
                y: T.Buffer((1, 1, n * TILE), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        for t in T.parallel(n):
            with T.sblock("tile"):
                vt = T.axis.remap("S", [t])
                acc = T.sblock_alloc_buffer((TILE,), "float32", scope="local")
                lo = T.sblock_alloc_buffer((TILE,), "float32", scope="local")
                hi = T.sblock_alloc_buffer((TILE,), "float32", scope="local")
                for r in T.vectorized(TILE):
                    acc[r] = T.float32(0)
                for b in range(g):
                    for r in T.vectorized(TILE):
                        lo[r] = T.float32(0)
                        hi[r] = T.float32(0)
                    for j in T.unroll(16):
                        for r in T.vectorized(TILE):
                            lo[r] += T.Cast(
                                "float32", codes[vt, b, j, r]
                            ) * x[0, 0, b * GROUP + j]
                            hi[r] += T.Cast(
                                "float32", codes[vt, b, 16 + j, r]
                            ) * x[0, 0, b * GROUP + 16 + j]
                    for r in T.vectorized(TILE):
                        acc[r] += T.Cast("float32", scale[vt, b, r]) * (
                            lo[r] + hi[r])
                for r in T.vectorized(TILE):
                    y[0, 0, vt * TILE + r] = acc[r]

    return q8_gemv.with_attr("global_symbol", f"q8_gemv_{rows}x{cols}")


def q4_dequantize(codes: te.Tensor, scale: te.Tensor, minimum: te.Tensor):
    """The whole matrix in fp32 for prefill, in chapter 6's tiles of 16 rows,
    [tiles, cols, 16]: its products then run as chapter 6's tiled_matmul.
    The 4-bit tiles already hold 16 rows side by side, so lane r of tile t is
    row 16 t + r in both."""
    n, g, _, lanes = codes.shape

    def weight(t, k, r):
        b, j = k // GROUP, k % GROUP
        shift = (j // 16 * 4).astype("uint8")
        q = (codes[t, b, j % 16, r] >> shift) & te.const(15, "uint8")
        return (scale[t, b, r].astype("float32") * q.astype("float32")
                + minimum[t, b, r].astype("float32"))

    return te.compute((n, g * GROUP, lanes), weight, name="q4_dequantize")


def q8_dequantize(codes: te.Tensor, scale: te.Tensor, ids=None):
    """Rows `ids` of a Q8 table in fp32 (the embedding lookup), or all rows."""
    n, g, _, lanes = codes.shape

    def weight(i, k):
        row = i if ids is None else ids[i]
        t, r, b = row // TILE, row % TILE, k // GROUP
        return (scale[t, b, r].astype("float32")
                * codes[t, b, k % GROUP, r].astype("float32"))

    rows = n * lanes if ids is None else ids.shape[0]
    return te.compute((rows, g * GROUP), weight, name="q8_dequantize")


def one_token(x: Tensor) -> bool:
    return all(isinstance(n, int) and n == 1 for n in x.shape[:-1])


def unpad(y: Tensor, rows: int) -> Tensor:
    """The first `rows` outputs (a last tile may hold zero rows past them)."""
    return y if y.shape[-1] == rows else op.split(y, [rows], axis=-1)[0]


class Q4Linear(nn.Module):
    """x W^T with W in 4-bit tiles."""

    def __init__(self, in_features: int, out_features: int):
        self.in_features, self.out_features = in_features, out_features
        shape = (tiles(out_features), in_features // GROUP)
        self.codes = nn.Parameter((*shape, 16, TILE), "uint8")
        self.scale = nn.Parameter((*shape, TILE), "float16")
        self.minimum = nn.Parameter((*shape, TILE), "float16")

    def forward(self, x: Tensor) -> Tensor:
        w = [self.codes, self.scale, self.minimum]
        if one_token(x):  # decode: 4-bit weights, dequantized in the products
            kernel = q4_gemv(self.out_features, self.in_features)
            y = Tensor.placeholder([1, 1, tiles(self.out_features) * TILE],
                                   "float32")
            y = op.tensor_ir_op(kernel, "q4_gemv", [x, *w], y)
        else:  # many tokens: dequantize once into fp32 tiles, then multiply
            dense = op.tensor_expr_op(q4_dequantize, "q4_dequantize", w)
            return tiled_product(x, dense, self.out_features)
        return unpad(y, self.out_features)


class Q8Table(nn.Module):
    """The embedding table (and the head) in 8-bit tiles."""

    def __init__(self, rows: int, cols: int):
        self.rows, self.cols = rows, cols
        shape = (tiles(rows), cols // GROUP)
        self.codes = nn.Parameter((*shape, GROUP, TILE), "int8")
        self.scale = nn.Parameter((*shape, TILE), "float16")

    def lookup(self, ids: Tensor) -> Tensor:
        return op.tensor_expr_op(lambda c, s, i: q8_dequantize(c, s, i),
                                 "q8_rows", [self.codes, self.scale, ids])

    def forward(self, x: Tensor) -> Tensor:  # x @ table.T: the head
        w = [self.codes, self.scale]
        if one_token(x):
            y = Tensor.placeholder([1, 1, tiles(self.rows) * TILE], "float32")
            y = op.tensor_ir_op(q8_gemv(self.rows, self.cols), "q8_gemv",
                                [x, *w], y)
        else:
            dense = op.tensor_expr_op(q8_dequantize, "q8_dequantize", w)
            y = op.matmul(x, op.permute_dims(dense))
        return unpad(y, self.rows)


class Q4LlamaForCausalLM(TiledLlamaForCausalLM):
    """Chapter 6's tiled model with every matrix in 4 bits, the embedding and
    the head in 8, and the attention kernels of section 5."""

    linear, table = Q4Linear, Q8Table

    def export_tvm(self, spec, **kwargs):
        mod, *rest = super().export_tvm(spec, **kwargs)
        return (with_attention_kernels(mod, self.cfg), *rest)
