# Generated from notebooks/02_encoder_layer.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

import mlx.core as mx
import mlx.nn as nn

from llmbook.mlx_llama.attention import Attention


class EncoderLayer(nn.Module):
    """Pre-norm Llama decoder layer: attention and a SwiGLU feed-forward, each added to
    the residual."""

    def __init__(self, cfg, rope_traditional: bool = False):
        super().__init__()
        self.attention = Attention(cfg, rope_traditional)
        self.norm1 = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.norm2 = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        # gate
        self.linear1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        # up
        self.linear2 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        # down
        self.linear3 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def __call__(self, x, mask=None, cache=None):
        y, cache = self.attention(self.norm1(x), mask, cache)
        x = x + y
        y = self.norm2(x)
        a, b = self.linear1(y), self.linear2(y)
        return x + self.linear3(a * mx.sigmoid(a) * b), cache
