# Generated from notebooks/09_4bit.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

"""Block quantization as GGUF stores it: Q4_1 (or Q4_0) matrices and a Q8_0
embedding, read from the file as they are, dequantized, or made from fp32
weights by rounding to nearest. Written in notebooks/09_4bit.ipynb."""
import dataclasses

import numpy as np

from llmbook.checkpoint import CheckpointError

GROUP = 32  # weights per block: one scale (and in Q4_1 one minimum) each


@dataclasses.dataclass
class Q4Matrix:
    """A [rows, cols] matrix in Q4_1 blocks: weight = scale * q + minimum.
    codes: uint8 [rows, cols/2]; in each group of 32, byte j holds weight j
    (low nibble) and weight j + 16 (high nibble). scale, minimum: float16
    [rows, cols/32]. Q4_0 blocks (weight = scale * (q - 8)) are the same form
    with minimum = -8 * scale."""

    codes: np.ndarray
    scale: np.ndarray
    minimum: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1] * 2

    def dequantize(self) -> np.ndarray:
        rows = self.codes.shape[0]
        c = self.codes.reshape(rows, -1, 16)
        q = np.concatenate([c & 15, c >> 4], axis=-1).astype(np.float32)
        d = self.scale.astype(np.float32)[..., None]
        m = self.minimum.astype(np.float32)[..., None]
        return (d * q + m).reshape(rows, -1)

    def take_rows(self, order) -> "Q4Matrix":
        return Q4Matrix(self.codes[order], self.scale[order],
                        self.minimum[order])


@dataclasses.dataclass
class Q8Matrix:
    """A [rows, cols] matrix in Q8_0 blocks: weight = scale * q.
    codes: int8 [rows, cols]; scale: float16 [rows, cols/32]."""

    codes: np.ndarray
    scale: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    def dequantize(self) -> np.ndarray:
        rows = self.codes.shape[0]
        q = self.codes.reshape(rows, -1, GROUP).astype(np.float32)
        d = self.scale.astype(np.float32)[..., None]
        return (d * q).reshape(rows, -1)


def q4_1_blocks(raw: np.ndarray) -> Q4Matrix:
    """GGUF's Q4_1 bytes, [rows, blocks * 20] uint8. A block: d (fp16),
    m (fp16), 16 code bytes."""
    blocks = raw.reshape(raw.shape[0], -1, 20)
    halves = blocks[..., :4].copy().view(np.float16)  # [rows, blocks, 2]
    codes = blocks[..., 4:].reshape(raw.shape[0], -1).copy()
    return Q4Matrix(codes, halves[..., 0].copy(), halves[..., 1].copy())


def q4_0_blocks(raw: np.ndarray) -> Q4Matrix:
    """GGUF's Q4_0 bytes, [rows, blocks * 18] uint8. A block: d (fp16), 16
    code bytes in Q4_1's order; weight = d * (q - 8), Q4_1's form with the
    minimum -8 d, exact in fp16 (a multiply by a power of two)."""
    blocks = raw.reshape(raw.shape[0], -1, 18)
    scale = blocks[..., :2].copy().view(np.float16)[..., 0]
    codes = blocks[..., 2:].reshape(raw.shape[0], -1).copy()
    minimum = -8 * scale.astype(np.float32)
    if np.abs(minimum).max() > np.finfo(np.float16).max:
        raise CheckpointError("a Q4_0 scale too large for its minimum, -8 "
                              "times the scale, to fit in fp16")
    return Q4Matrix(codes, scale, minimum.astype(np.float16))


def q8_0_blocks(raw: np.ndarray) -> Q8Matrix:
    """GGUF's Q8_0 bytes, [rows, blocks * 34] uint8. A block: d (fp16),
    32 int8 codes."""
    blocks = raw.reshape(raw.shape[0], -1, 34)
    scale = blocks[..., :2].copy().view(np.float16)[..., 0]
    codes = blocks[..., 2:].copy().view(np.int8).reshape(raw.shape[0], -1)
    return Q8Matrix(codes, scale)


from llmbook.gguf_names import hf_name  # chapter 4

TABLES = ("model.embed_tokens.weight", "lm_head.weight")


def halves_order(rows: int, n_head: int) -> np.ndarray:
    """llama.cpp stores q and k rows for interleaved RoPE (chapter 4): this
    order of the file's rows gives Hugging Face's rotate-half rows. It moves
    whole rows, so the blocks are untouched."""
    order = np.arange(rows).reshape(n_head, rows // n_head // 2, 2)
    return order.swapaxes(1, 2).reshape(rows)


def read_gguf(path, cfg) -> dict:
    """Hugging Face name -> Q4Matrix (the layers' matrices), Q8Matrix
    (embedding, head) or fp32 array (norms), from the GGUF's blocks as they
    are: nothing is re-quantized. `path` may be a gguf.GGUFReader open on
    the file."""
    import gguf

    kinds = gguf.GGMLQuantizationType
    four_bits = {kinds.Q4_1: q4_1_blocks, kinds.Q4_0: q4_0_blocks}
    reader = path if isinstance(path, gguf.GGUFReader) else gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        name, kind = hf_name(t.name), t.tensor_type
        if name.endswith("norm.weight") and kind == kinds.F32:
            out[name] = np.array(t.data, np.float32)
        elif name.endswith("_proj.weight") and kind in four_bits:
            out[name] = four_bits[kind](t.data)
        elif name in TABLES and kind == kinds.Q8_0:
            out[name] = q8_0_blocks(t.data)
        else:
            raise CheckpointError(
                f"GGUF tensor {t.name} is {kind.name}; the 4-bit engine reads "
                "Q4_1 or Q4_0 matrices, a Q8_0 embedding and head, F32 norms")
    for i in range(cfg.num_layers):
        for proj, n_head in (("q", cfg.num_heads), ("k", cfg.num_kv_heads)):
            name = f"model.layers.{i}.self_attn.{proj}_proj.weight"
            if name in out:
                order = halves_order(out[name].shape[0], n_head)
                out[name] = out[name].take_rows(order)
    return out


def dequantize_all(weights: dict) -> dict:
    """fp32 arrays under the same names: what an fp32 engine computes with."""
    return {k: v if isinstance(v, np.ndarray) else v.dequantize()
            for k, v in weights.items()}


def bits_per_weight(m) -> float:
    """Stored bits per weight: codes and scales (and minimums) together."""
    parts = [m.codes, m.scale] + ([m.minimum] if hasattr(m, "minimum") else [])
    return 8 * sum(p.nbytes for p in parts) / (m.shape[0] * m.shape[1])


def quantize_q4(w: np.ndarray) -> Q4Matrix:
    """Round to nearest, as llama.cpp makes Q4_1: per group of 32, minimum =
    min(w), scale = (max(w) - min(w)) / 15, q = round((w - minimum) / scale)."""
    rows, cols = w.shape
    g = np.asarray(w, np.float32).reshape(rows, -1, GROUP)
    lo, hi = g.min(-1), g.max(-1)
    scale, minimum = ((hi - lo) / 15).astype(np.float16), lo.astype(np.float16)
    d = scale.astype(np.float32)[..., None]
    m = minimum.astype(np.float32)[..., None]
    q = np.rint((g - m) / np.where(d == 0, 1, d))
    q = np.clip(q, 0, 15).astype(np.uint8)
    codes = q[..., :16] | (q[..., 16:] << 4)  # GGUF's order
    return Q4Matrix(codes.reshape(rows, -1), scale, minimum)


def quantize_q8(w: np.ndarray) -> Q8Matrix:
    """Round to nearest, as Q8_0: per group of 32, scale = max |w| / 127."""
    rows, cols = w.shape
    g = np.asarray(w, np.float32).reshape(rows, -1, GROUP)
    scale = (np.abs(g).max(-1) / 127).astype(np.float16)
    d = scale.astype(np.float32)[..., None]
    q = np.clip(np.rint(g / np.where(d == 0, 1, d)), -127, 127)
    return Q8Matrix(q.astype(np.int8).reshape(rows, -1), scale)


def quantize_state_dict(state_dict: dict) -> dict:
    """read_gguf's structure from fp32 weights, rounded to nearest: matrices
    to Q4_1 blocks; the embedding and head to Q8_0 blocks, as llama.cpp's
    converter keeps them at 8 bits or more."""
    out = {}
    for name, w in state_dict.items():
        w = np.asarray(w, np.float32)
        if w.ndim == 1:
            out[name] = w
        elif w.shape[1] % GROUP:
            raise CheckpointError(f"{name} has {w.shape[1]} columns; 4-bit "
                                  f"blocks need a multiple of {GROUP}")
        else:
            out[name] = quantize_q8(w) if name in TABLES else quantize_q4(w)
    return out


def four_bit(bundle) -> tuple[dict, str]:
    """The blocks a 4-bit engine runs for `bundle`, and where they come from:
    the GGUF's own blocks when the checkpoint was loaded from one, else its
    fp32 weights rounded to nearest."""
    if bundle.gguf is not None:
        import gguf

        reader = gguf.GGUFReader(bundle.gguf)
        blocks = read_gguf(reader, bundle.config)
        # the file's block types, as read_gguf accepted them: "Q4_1 and Q8_0"
        types = sorted({t.tensor_type.name for t in reader.tensors} - {"F32"})
        named = types[-1] if len(types) == 1 else (
            ", ".join(types[:-1]) + " and " + types[-1])
        return blocks, f"the {named} blocks of {bundle.gguf.name}, as stored"
    source = ("fp32 weights rounded to nearest: 4-bit matrices, 8-bit "
              "embedding and head, groups of 32")
    return quantize_state_dict(bundle.state_dict), source
