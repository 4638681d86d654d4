"""The book's own MLX Llama (chapters 1-3) behind the backend interface, in fp32 and (mlx-q4) on
chapter 9's 4-bit blocks."""

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..device import mlx_device
from ..mlx_llama.convert import hf_to_mlx, load_weights
from ..mlx_llama.model import Llama
from . import RoundedWeights, StepBackend, step_weight_bytes


class MLXBackend(StepBackend):
    name = "mlx"
    device = mlx_device()  # "gpu" on a Mac: MLX computes on Metal by default
    head_every_position = True  # the model returns every position's logits (chapter 3)

    def __init__(self, bundle):
        self.model = load_weights(Llama(bundle.config), hf_to_mlx(bundle.state_dict))
        self.vocab_size = bundle.config.vocab_size
        self.max_context = bundle.config.max_position_embeddings
        self.weight_bytes = self._weight_bytes()
        self.reset()

    def _weight_bytes(self) -> int:
        """What one decode step reads of the model's arrays (codes, scales and biases too,
        once quantized); a tied table is the `embedding` alone, with no `out_proj`."""
        arrays = tree_flatten(self.model.parameters())
        table = sum(v.nbytes for k, v in arrays if k.startswith("embedding."))
        return step_weight_bytes(sum(v.nbytes for _, v in arrays), table, self.vocab_size,
                                 "out_proj" not in self.model)

    def _reset(self):
        self.cache = None

    def _forward(self, ids):
        logits, self.cache = self.model(mx.array([ids]), self.cache)
        return np.array(logits[0, -1])

    def _verify(self, ids: list[int]) -> np.ndarray:
        """Several new tokens in one call, every position's logits (chapter 12). The causal
        mask of `mx.fast.scaled_dot_product_attention` lines the queries up with the last
        keys, so each new token sees the cache and the new tokens before it."""
        logits, self.cache = self.model(mx.array([ids]), self.cache)
        return np.array(logits[0])

    def _rollback(self, n: int) -> None:
        # each layer's keys and values are [batch, heads, positions, head_dim]
        self.cache = [(k[:, :, :-n], v[:, :, :-n]) for k, v in self.cache]


class MLXQ4Backend(RoundedWeights, MLXBackend):
    """The same MLX Llama with chapter 9's blocks in MLX's quantized layers: the GGUF's own Q4_1
    and Q8_0 blocks, or a Hugging Face checkpoint's fp32 weights rounded to nearest into them
    (`source` says which)."""

    name = "mlx-q4"
    quantized = True

    def __init__(self, bundle):
        from ..mlx_llama.q4 import quantized_llama
        from ..quant import four_bit

        weights, self.source = four_bit(bundle)
        self._rounded = None if bundle.gguf is not None else weights
        self.model = quantized_llama(bundle.config, weights)
        self.vocab_size = bundle.config.vocab_size
        self.max_context = bundle.config.max_position_embeddings
        self.weight_bytes = self._weight_bytes()
        self.reset()
