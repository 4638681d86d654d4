# Generated from notebooks/09_4bit.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

"""The GGUF's blocks in MLX's own quantized layers: MLX's affine format is
scale * q + bias per group, which is Q4_1 with the minimum as the bias, so the
blocks move over without re-quantizing. Written in notebooks/09_4bit.ipynb."""
import mlx.core as mx
import mlx.nn  # not `as nn`: this chapter's `nn` is TVM's
import numpy as np

from llmbook.mlx_llama.convert import load_weights, mlx_name
from llmbook.mlx_llama.model import Llama
from llmbook.quant import GROUP


def mlx_affine(m) -> dict[str, mx.array]:
    """A Q4Matrix or Q8Matrix in MLX's affine format: `weight` (codes packed
    into uint32, the first in the lowest bits), `scales` and `biases` per
    group of 32, so that weight = scales * q + biases."""
    if hasattr(m, "minimum"):  # Q4_1: byte j of a block holds codes j and j + 16
        c = m.codes.reshape(m.codes.shape[0], -1, 16)
        q = np.concatenate([c & 15, c >> 4], axis=-1).reshape(c.shape[0], -1)
        bits, bias = 4, m.minimum.astype(np.float32)
    else:  # Q8_0: signed codes, MLX's are unsigned: q + 128, and a bias of -128 d
        q = (m.codes.astype(np.int16) + 128).astype(np.uint8)
        bits, bias = 8, -128 * m.scale.astype(np.float32)
    per_word = 32 // bits
    q = q.astype(np.uint32).reshape(q.shape[0], -1, per_word)
    packed = np.bitwise_or.reduce([q[..., i] << (bits * i) for i in range(per_word)])
    return {"weight": mx.array(packed), "scales": mx.array(m.scale.astype(np.float32)),
            "biases": mx.array(bias)}


def bits_of(m) -> int:
    return 4 if hasattr(m, "minimum") else 8


def quantized_llama(cfg, weights: dict) -> Llama:
    """The chapters' MLX Llama with each matrix as MLX's QuantizedLinear (and
    the embedding as QuantizedEmbedding) holding `weights`' blocks as they are:
    4 bits where the block is Q4_1, 8 where it is Q8_0."""
    blocks = {mlx_name(k).removesuffix(".weight"): m
              for k, m in weights.items() if hasattr(m, "codes")}
    model = Llama(cfg)

    def layer_bits(path, module):
        if path not in blocks:
            return False
        return {"group_size": GROUP, "bits": bits_of(blocks[path])}

    mlx.nn.quantize(model, class_predicate=layer_bits)
    params = {}
    for name, w in weights.items():
        if hasattr(w, "codes"):
            path = mlx_name(name).removesuffix("weight")
            params |= {path + k: v for k, v in mlx_affine(w).items()}
        else:
            params[mlx_name(name)] = mx.array(np.asarray(w, np.float32))
    return load_weights(model, params)
