# Generated from notebooks/01_attention.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

import mlx.core as mx
import mlx.nn as nn

from llmbook.rope import inv_freq


class ScaledRoPE(nn.Module):
    """RoPE with given inverse frequencies (Llama 3's scaled ones): mx.fast.rope takes
    them as periods 1 / theta_i, nn.RoPE only as a base."""

    def __init__(self, dims: int, inv_freq, traditional: bool = False):
        super().__init__()
        self.dims, self.traditional = dims, traditional
        # the leading underscore keeps the periods out of the parameters: not weights
        self._periods = mx.array(1.0 / inv_freq, dtype=mx.float32)

    def __call__(self, x, offset: int = 0):
        return mx.fast.rope(
            x,
            self.dims,
            traditional=self.traditional,
            base=None,
            scale=1.0,
            offset=offset,
            freqs=self._periods,
        )


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads, RoPE and a concatenating KV
    cache."""

    def __init__(self, cfg, rope_traditional: bool = False):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.scale = cfg.head_dim**-0.5
        self.query_proj = nn.Linear(
            cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False
        )
        self.key_proj = nn.Linear(
            cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False
        )
        self.value_proj = nn.Linear(
            cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False
        )
        self.out_proj = nn.Linear(
            cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False
        )
        # Hugging Face checkpoints pair dimension i with i + d/2
        # (rotate-half): traditional=False
        self.rope = nn.RoPE(
            cfg.head_dim, traditional=rope_traditional, base=cfg.rope_theta
        )
        if cfg.rope_scaling is not None:  # Llama 3: other frequencies, same rotation
            self.rope = ScaledRoPE(cfg.head_dim, inv_freq(cfg), rope_traditional)

    def __call__(self, x, mask=None, cache=None):
        B, L, _ = x.shape
        q = self.query_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.key_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.value_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        # positions continue after the cache
        offset = 0 if cache is None else cache[0].shape[2]
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k = mx.concatenate([cache[0], k], axis=2)
            v = mx.concatenate([cache[1], v], axis=2)
        # the fused kernel handles GQA (fewer k/v heads) without repeating them
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1)), (k, v)
