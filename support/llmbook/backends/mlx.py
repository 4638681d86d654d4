"""The book's own MLX Llama (chapters 1-3) behind the backend interface."""
import mlx.core as mx
import numpy as np

from ..device import mlx_device
from ..mlx_llama.convert import hf_to_mlx, load_weights
from ..mlx_llama.model import Llama
from . import StepBackend


class MLXBackend(StepBackend):
    name = "mlx"
    device = mlx_device()  # "gpu" on a Mac: MLX computes on Metal by default

    def __init__(self, bundle):
        self.model = load_weights(Llama(bundle.config), hf_to_mlx(bundle.state_dict))
        self.vocab_size = bundle.config.vocab_size
        self.max_context = bundle.config.max_position_embeddings
        self.reset()

    def _reset(self):
        self.cache = None

    def _forward(self, ids):
        logits, self.cache = self.model(mx.array([ids]), self.cache)
        return np.array(logits[0, -1])
