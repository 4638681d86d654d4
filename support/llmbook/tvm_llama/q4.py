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

from llmbook.quant import GROUP, Q4Matrix, four_bit
from llmbook.tvm_llama.attention import AttentionKernels  # section 5
from llmbook.tvm_llama.convert import fuse  # chapter 6
from llmbook.tvm_llama.tiled import (TILE, TiledLlamaForCausalLM,  # chapter 6
                                     tile_product, tiled_product, tiles)

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


def stack_rows(ms: list[Q4Matrix]) -> Q4Matrix:
    """Matrices on top of each other (q, k, v; gate, up), blocks as they are."""
    return Q4Matrix(*(np.concatenate([getattr(m, f) for m in ms])
                      for f in ("codes", "scale", "minimum")))


def to_tvm_q4(weights: dict, cfg) -> dict[str, np.ndarray]:
    """llmbook.quant's blocks under Hugging Face names -> the parameters of
    the 4-bit model: q/k/v and gate/up stacked by chapter 6's `fuse`, every
    matrix and table in tiles (the norms are vectors and stay)."""
    for table in ("model.embed_tokens.weight", "lm_head.weight"):
        m = weights.get(table)
        if m is not None and (hasattr(m, "minimum") or not hasattr(m, "scale")):
            raise TypeError(f"{table}: Q8 blocks expected, got {m!r:.40}")
    out = {}
    for name, w in fuse(weights, range(cfg.num_layers), stack_rows).items():
        if isinstance(w, np.ndarray):
            out[name] = w
        else:
            prefix = name.removesuffix(".weight")
            out |= {f"{prefix}.{k}": v for k, v in tile_rows(w).items()}
    return out


def code(codes: tirx.Buffer, t, b, j, r, high: bool = False) -> tirx.Expr:
    """Column j of block b (j + 16 if `high`) in lane r of tile t, as fp32. A
    Q4_1 byte (uint8 codes) holds both columns, j in its low 4 bits; Q8_0
    (int8 codes) has a byte for each."""
    if codes.dtype == "uint8":
        byte = codes[t, b, j, r]
        return T.Cast("float32", byte >> T.uint8(4) if high else byte & T.uint8(15))
    return T.Cast("float32", codes[t, b, j + 16 if high else j, r])


def prefetch(buffer: tirx.Buffer, *index) -> tirx.Expr:
    """Ask the CPU for the cache line that holds buffer[index], and go on
    without waiting for it (llvm.prefetch: a read, kept in every cache level,
    data). An address past the buffer's end is harmless: a prefetch never
    faults."""
    return T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(buffer[index]),
                              T.int32(0), T.int32(3), T.int32(1))


@T.inline
def fetch_block(codes, scale, minimum, t, b):
    """Prefetch block b of tile t: its codes (4 code bytes j of 16 rows fill a
    64-byte line: 4 lines for Q4_1, 8 for Q8_0), its scales and minimums."""
    for line in T.unroll(codes.shape[2] // 4):
        T.evaluate(prefetch(codes, t, b, line * 4, 0))
    T.evaluate(prefetch(scale, t, b, 0))
    if minimum is not None:
        T.evaluate(prefetch(minimum, t, b, 0))


def with_weights(product, rows: int, cols: int, bits: int, name: str) -> tirx.PrimFunc:
    """A kernel that runs `product(x, codes, scale, minimum, y)` on the tiles
    of a Q4_1 matrix (bits=4: codes, scale, minimum) or of a Q8_0 one (bits=8:
    codes, scale; `minimum` is None). x and y come as handles: `product`
    gives them their shapes."""
    n, g = tiles(rows), cols // GROUP
    if bits == 4:  # a byte holds two 4-bit codes: 16 bytes per block of 32

        @T.prim_func(s_tir=True)
        def kernel(x: T.handle, codes: T.Buffer((n, g, 16, TILE), "uint8"),
                   scale: T.Buffer((n, g, TILE), "float16"),
                   minimum: T.Buffer((n, g, TILE), "float16"), y: T.handle):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
            product(x, codes, scale, minimum, y)

    elif bits == 8:

        @T.prim_func(s_tir=True)
        def kernel(x: T.handle, codes: T.Buffer((n, g, GROUP, TILE), "int8"),
                   scale: T.Buffer((n, g, TILE), "float16"), y: T.handle):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
            product(x, codes, scale, None, y)

    else:
        raise ValueError(f"{bits}-bit blocks: the kernels take Q4_1 (4) or Q8_0 (8)")
    return kernel.with_attr("global_symbol", f"q{bits}_{name}_{rows}x{cols}")


@functools.cache
def quant_gemv(rows: int, cols: int, bits: int, ahead: int = 1) -> tirx.PrimFunc:
    """y = W x for one token, W in tiles of Q4_1 (bits=4) or Q8_0 (bits=8)
    blocks. Threads take whole tiles. For each block of 32 columns, 16 vector
    steps add q * x for the 16 rows of a tile (columns j and j + 16 in two
    registers), then one step applies the 16 scales. Q4_1's minimums need
    only the block sums of x: sum(m * x) = m * sum(x). Meanwhile the same
    block of the tile `ahead` tiles on is asked for (section 3's "from
    memory"); ahead=0 asks for nothing."""
    n, g = tiles(rows), cols // GROUP

    @T.inline
    def one_token(x_handle, codes, scale, minimum, y_handle):
        x = T.match_buffer(x_handle, (1, g * GROUP), "float32")
        y = T.match_buffer(y_handle, (1, n * TILE), "float32")
        if minimum is not None:
            xsum = T.sblock_alloc_buffer((g,), "float32")
            for b in range(g):
                with T.sblock("xsum"):
                    vb = T.axis.remap("S", [b])
                    xsum[vb] = T.float32(0)
                    for j in range(GROUP):
                        xsum[vb] = xsum[vb] + x[0, vb * GROUP + j]
        for t in T.parallel(n):
            with T.sblock("tile"):
                vt = T.axis.remap("S", [t])
                # sums in buffers of the default scope under 1 KB: TVM puts
                # them on the stack, and LLVM keeps them in registers ("local"
                # ones come from TVM's workspace allocator, a call per tile)
                acc = T.sblock_alloc_buffer((TILE,), "float32")
                lo = T.sblock_alloc_buffer((TILE,), "float32")
                hi = T.sblock_alloc_buffer((TILE,), "float32")
                for r in T.vectorized(TILE):
                    acc[r] = T.float32(0)
                for b in range(g):
                    if ahead > 0:
                        fetch_block(codes, scale, minimum, vt + ahead, b)
                    for r in T.vectorized(TILE):
                        lo[r] = T.float32(0)
                        hi[r] = T.float32(0)
                    for j in T.unroll(16):
                        for r in T.vectorized(TILE):
                            lo[r] += code(codes, vt, b, j, r) * x[0, b * GROUP + j]
                            hi[r] += (code(codes, vt, b, j, r, high=True)
                                      * x[0, b * GROUP + 16 + j])
                    for r in T.vectorized(TILE):
                        acc[r] += T.Cast("float32", scale[vt, b, r]) * (lo[r] + hi[r])
                    if minimum is not None:
                        for r in T.vectorized(TILE):
                            acc[r] += T.Cast("float32", minimum[vt, b, r]) * xsum[b]
                for r in T.vectorized(TILE):
                    y[0, vt * TILE + r] = acc[r]

    return with_weights(one_token, rows, cols, bits, f"gemv{ahead}")


TOKENS = 16  # tokens a pass of quant_gemm takes: 16 sums in 16 vector registers


@functools.cache
def quant_gemm(rows: int, cols: int, bits: int) -> tirx.PrimFunc:
    """y = x W^T for a few tokens, x [m, cols] with m known at run time (a
    batch of decodes: one token per sequence), W in Q4_1 or Q8_0 tiles.
    Threads take whole tiles. A tile's weights are unpacked once per pass
    and serve every token of the pass: passes of 16 tokens, one vector of
    16 sums each, then the tokens left over (m % 16) in passes of 8, 4, 2
    and 1, the binary digits of the rest."""
    n, g = tiles(rows), cols // GROUP

    @T.inline
    def tokens(x, codes, scale, minimum, y, vt, first, width, sums):
        # x's rows first .. first + width - 1 against tile vt. A multiply-add
        # waits for the one before it on the same sum, so a pass of fewer
        # than 8 tokens keeps the sums of columns j and j + 16 apart (sums=2):
        # 8 or more chains of multiply-adds then overlap
        with T.sblock(f"tokens{width}"):
            # 1 KB at 16 tokens: from the workspace allocator, once per pass,
            # but within a block LLVM keeps the sums in registers all the same
            acc = T.sblock_alloc_buffer((sums, width, TILE), "float32")
            d = T.sblock_alloc_buffer((2, TILE), "float32")  # scales, minimums
            w = T.sblock_alloc_buffer((2, TILE), "float32")  # columns j, j + 16
            for s, i in T.grid(sums, width):
                for r in T.vectorized(TILE):
                    acc[s, i, r] = T.float32(0)
            for b in range(g):
                fetch_block(codes, scale, minimum, vt + 1, b)  # as quant_gemv
                for r in T.vectorized(TILE):
                    d[0, r] = T.Cast("float32", scale[vt, b, r])
                    if minimum is not None:
                        d[1, r] = T.Cast("float32", minimum[vt, b, r])
                    else:  # Q8_0: w = d q, and a multiply-add costs a multiply
                        d[1, r] = T.float32(0)
                for j in T.unroll(16):
                    # the weights, unpacked once for all the pass's tokens:
                    # d q + m is the reference's value (d q is exact in fp32)
                    for r in T.vectorized(TILE):
                        w[0, r] = d[0, r] * code(codes, vt, b, j, r) + d[1, r]
                        w[1, r] = d[0, r] * code(codes, vt, b, j, r, True) + d[1, r]
                    for i in T.unroll(width):
                        for r in T.vectorized(TILE):
                            acc[0, i, r] += w[0, r] * x[first + i, b * GROUP + j]
                            acc[sums - 1, i, r] += (
                                w[1, r] * x[first + i, b * GROUP + 16 + j])
            for i in T.unroll(width):
                for r in T.vectorized(TILE):
                    y[first + i, vt * TILE + r] = acc[0, i, r]
                    if sums == 2:
                        y[first + i, vt * TILE + r] += acc[1, i, r]

    @T.inline
    def few_tokens(x_handle, codes, scale, minimum, y_handle):
        m = T.int64()
        x = T.match_buffer(x_handle, (m, g * GROUP), "float32")
        y = T.match_buffer(y_handle, (m, n * TILE), "float32")
        for t in T.parallel(n):
            with T.sblock("tile"):
                vt = T.axis.remap("S", [t])
                for p in range(m // TOKENS):
                    tokens(x, codes, scale, minimum, y, vt, p * TOKENS, TOKENS, 1)
                if m % TOKENS >= 8:
                    tokens(x, codes, scale, minimum, y, vt, m - m % TOKENS, 8, 1)
                if m % 8 >= 4:
                    tokens(x, codes, scale, minimum, y, vt, m - m % 8, 4, 2)
                if m % 4 >= 2:
                    tokens(x, codes, scale, minimum, y, vt, m - m % 4, 2, 2)
                if m % 2 == 1:
                    tokens(x, codes, scale, minimum, y, vt, m - 1, 1, 2)

    return with_weights(few_tokens, rows, cols, bits, "gemm")


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


def q8_rows(codes: te.Tensor, scale: te.Tensor, ids: te.Tensor):
    """Rows `ids` of a Q8 table in fp32: the embedding lookup."""

    def weight(i, k):
        t, r, b = ids[i] // TILE, ids[i] % TILE, k // GROUP
        return (scale[t, b, r].astype("float32")
                * codes[t, b, k % GROUP, r].astype("float32"))

    return te.compute((ids.shape[0], codes.shape[1] * GROUP), weight, name="q8_rows")


def one_token(x: Tensor) -> bool:
    """[1, 1, cols]: decode, one new token of one sequence."""
    return all(isinstance(n, int) and n == 1 for n in x.shape[:-1])


def one_per_sequence(x: Tensor) -> bool:
    """[sequences, 1, cols]: a batch of decodes, one new token of each."""
    return len(x.shape) == 3 and isinstance(x.shape[1], int) and x.shape[1] == 1


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
        rows, cols = self.out_features, self.in_features
        if one_token(x):  # decode: 4-bit weights, dequantized in the product
            return tile_product(quant_gemv(rows, cols, 4), x, w, rows)
        if one_per_sequence(x):  # a batch of decodes: each weight unpacked once
            return tile_product(quant_gemm(rows, cols, 4), x, w, rows)
        # prefill, many tokens of one sequence: dequantize once into fp32
        # tiles, then multiply
        dense = op.tensor_expr_op(q4_dequantize, "q4_dequantize", w)
        return tiled_product(x, dense, rows)


class Q8Table(nn.Module):
    """The embedding table (and the head) in 8-bit tiles."""

    def __init__(self, rows: int, cols: int):
        self.rows, self.cols = rows, cols
        shape = (tiles(rows), cols // GROUP)
        self.codes = nn.Parameter((*shape, GROUP, TILE), "int8")
        self.scale = nn.Parameter((*shape, TILE), "float16")

    def lookup(self, ids: Tensor) -> Tensor:
        return op.tensor_expr_op(q8_rows, "q8_rows", [self.codes, self.scale, ids])

    def forward(self, x: Tensor) -> Tensor:
        # x @ table.T, the head: one position per sequence (prefill keeps only
        # the last), so one token or a few
        kernel = (quant_gemv if one_token(x) else quant_gemm)(self.rows, self.cols, 8)
        return tile_product(kernel, x, [self.codes, self.scale], self.rows)


class Q4LlamaForCausalLM(AttentionKernels, TiledLlamaForCausalLM):
    """Chapter 6's tiled model with every matrix in 4 bits, the embedding and
    the head in 8, and the attention kernels of section 5."""

    linear, table = Q4Linear, Q8Table
    quantized = True

    def weights_from(self, bundle) -> dict:
        """A GGUF's own blocks, or a Hugging Face checkpoint's fp32 weights
        rounded to nearest into the same blocks (`source` says which), stacked
        and in tiles."""
        weights, self.source = four_bit(bundle)
        # a GGUF's blocks dequantized *are* the fp32 reference; rounded weights
        # are not, and are kept to check the model against
        self.rounded = None if bundle.gguf is not None else weights
        return to_tvm_q4(weights, self.cfg)
