# Generated from notebooks/06_tvm.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

"""Chapter 6's model with its matrix products in one hand-written kernel: every
weight matrix in tiles of 16 rows, one row per vector lane, and a register
tile of 4 tokens x 4 tiles. Written in notebooks/06_tvm.ipynb."""

import functools

import numpy as np
from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.script import tirx as T

from llmbook.tvm_llama.model import LlamaForCausalLM

TILE = 16  # weight rows side by side: 16 fp32 lanes fill one 512-bit vector
TILES = 4  # tiles a thread takes at once: four streams of weights from memory
TOKENS = 4  # tokens per register tile: 4 tokens x 4 tiles = 16 vector sums


def tiles(rows: int) -> int:
    """Tiles for `rows` rows, rounded up to whole groups of TILES."""
    return -(-rows // (TILE * TILES)) * TILES


def tile_matrix(w: np.ndarray) -> np.ndarray:
    """[rows, cols] -> [tiles, cols, 16]: row i is lane i % 16 of tile i // 16,
    and rows past the matrix's end are zeros."""
    rows, cols = w.shape
    w = np.concatenate([w, np.zeros((tiles(rows) * TILE - rows, cols), w.dtype)])
    return np.ascontiguousarray(w.reshape(-1, TILE, cols).transpose(0, 2, 1))


@functools.cache
def tiled_matmul(n: int, cols: int) -> tirx.PrimFunc:
    """y = x W^T for any number of tokens m, W in n tiles of 16 rows. A thread
    takes 4 tiles (64 rows) at a time, and a register tile covers 4 tokens:
    per column k, 4 vector loads of weights and 4 broadcasts of x[t, k] feed
    16 multiply-adds into 16 registers of sums. Tokens left over (all of them
    in decode, m = 1) go one at a time, 4 sums, one per tile."""
    if n % TILES:
        raise ValueError(f"{n} tiles: tiled_matmul takes whole groups of {TILES}")

    @T.prim_func(s_tir=True)
    def tiled_matmul(
        x_handle: T.handle, w: T.Buffer((n, cols, TILE), "float32"), y_handle: T.handle
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(x_handle, (m, cols), "float32")
        y = T.match_buffer(y_handle, (m, n * TILE), "float32")
        for p in T.parallel(n // TILES):
            for g in range(m // TOKENS):
                with T.sblock("tile"):
                    vp, vg = T.axis.remap("SS", [p, g])
                    acc = T.sblock_alloc_buffer(
                        (TOKENS, TILES, TILE), "float32", scope="local"
                    )
                    for t, r in T.grid(TOKENS, TILES):
                        for i in T.vectorized(TILE):
                            acc[t, r, i] = T.float32(0)
                    for k in range(cols):
                        for r in T.unroll(TILES):
                            for t in T.unroll(TOKENS):
                                for i in T.vectorized(TILE):
                                    acc[t, r, i] += (
                                        x[vg * TOKENS + t, k] * w[vp * TILES + r, k, i]
                                    )
                    for t, r in T.grid(TOKENS, TILES):
                        for i in T.vectorized(TILE):
                            y[vg * TOKENS + t, (vp * TILES + r) * TILE + i] = acc[
                                t, r, i
                            ]
            for t in range(m % TOKENS):
                with T.sblock("token"):
                    vp, vt = T.axis.remap("SS", [p, t])
                    acc = T.sblock_alloc_buffer((TILES, TILE), "float32", scope="local")
                    for r in T.unroll(TILES):
                        for i in T.vectorized(TILE):
                            acc[r, i] = T.float32(0)
                    for k in range(cols):
                        for r in T.unroll(TILES):
                            for i in T.vectorized(TILE):
                                acc[r, i] += (
                                    x[m - m % TOKENS + vt, k] * w[vp * TILES + r, k, i]
                                )
                    for r in T.unroll(TILES):
                        for i in T.vectorized(TILE):
                            y[m - m % TOKENS + vt, (vp * TILES + r) * TILE + i] = acc[
                                r, i
                            ]

    return tiled_matmul.with_attr("global_symbol", f"tiled_matmul_{n}x{cols}")


def tile_product(kernel: tirx.PrimFunc, x: Tensor, weights: list, rows: int) -> Tensor:
    """x [..., cols] times a matrix in tiles of 16 rows by `kernel`, which takes x as
    [tokens, cols] and the matrix as `weights` (its tiles first), and gives [tokens,
    tiles * 16] -> [..., rows]: a last tile's zero rows are cut off. Chapter 9's 4-bit
    kernels run through it too."""
    *lead, cols = x.shape
    padded = weights[0].shape[0] * TILE
    flat = op.reshape(x, [-1, cols])
    y = Tensor.placeholder([flat.shape[0], padded], "float32")
    y = op.tensor_ir_op(kernel, kernel.attrs["global_symbol"], [flat, *weights], y)
    y = op.reshape(y, [*lead, padded])
    return y if padded == rows else op.split(y, [rows], axis=-1)[0]


def tiled_product(x: Tensor, weight: Tensor, rows: int) -> Tensor:
    """x [..., cols] times a tiled [tiles, cols, 16] fp32 matrix -> [..., rows]."""
    return tile_product(tiled_matmul(weight.shape[0], x.shape[-1]), x, [weight], rows)


class TiledLinear(nn.Module):
    """x W^T with W in tiles of 16 rows."""

    def __init__(self, in_features: int, out_features: int):
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter((tiles(out_features), in_features, TILE), "float32")

    def forward(self, x: Tensor) -> Tensor:
        return tiled_product(x, self.weight, self.out_features)


class TiledEmbedding(nn.Module):
    """The embedding table in tiles: a lookup reads a row's 16-strided lane,
    and (tied) the head is a tiled product."""

    def __init__(self, rows: int, cols: int):
        self.rows, self.cols = rows, cols
        self.weight = nn.Parameter((tiles(rows), cols, TILE), "float32")

    def lookup(self, ids: Tensor) -> Tensor:  # [n] int32 -> [n, cols]
        def rows(table: te.Tensor, ids: te.Tensor):
            return te.compute(
                (ids.shape[0], self.cols),
                lambda i, k: table[ids[i] // TILE, k, ids[i] % TILE],
                name="rows",
            )

        return op.tensor_expr_op(rows, "embed_rows", [self.weight, ids])

    def forward(self, x: Tensor) -> Tensor:  # x @ table.T: the tied head
        return tiled_product(x, self.weight, self.rows)


class TiledLlamaForCausalLM(LlamaForCausalLM):
    """Chapter 6's model with every matrix tiled and multiplied by tiled_matmul
    (CPU only: the kernel is written for 16-lane vectors and threads)."""

    # what each matrix and the embedding table become (chapter 9 swaps in 4-bit ones)
    linear, table = TiledLinear, TiledEmbedding

    def __init__(self, cfg, target):
        super().__init__(cfg, target)
        h, ffn = cfg.hidden_size, cfg.intermediate_size
        d, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        for layer in self.model.layers:
            layer.self_attn.qkv_proj = self.linear(h, d + 2 * kv)
            layer.self_attn.o_proj = self.linear(d, h)
            layer.mlp.gate_up_proj = self.linear(h, 2 * ffn)
            layer.mlp.down_proj = self.linear(ffn, h)
        self.model.embed_tokens = self.table(cfg.vocab_size, h)
        # an untied head: a second table, used as the tied one
        if not cfg.tie_word_embeddings:
            self.lm_head = self.table(cfg.vocab_size, h)

    def logits(self, x: Tensor) -> Tensor:
        tied = self.cfg.tie_word_embeddings
        return (self.model.embed_tokens if tied else self.lm_head)(x)

    def embed(self, input_ids: Tensor) -> Tensor:
        rows = self.model.embed_tokens.lookup(op.reshape(input_ids, [-1]))
        return op.reshape(rows, [1, input_ids.shape[1], self.cfg.hidden_size])

    def weights_from(self, bundle) -> dict:
        """Section 3's parameters with every matrix in tiles (the norms are vectors
        and stay)."""
        weights = super().weights_from(bundle)
        return {n: tile_matrix(w) if w.ndim == 2 else w for n, w in weights.items()}
