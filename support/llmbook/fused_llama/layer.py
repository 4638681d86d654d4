# Generated from notebooks/05_fused.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

"""One Llama decoder layer as one operation: hidden states, the layer's weights,
position ids, cos/sin tables, mask and past K/V in; new hidden states and present K/V
out."""

from typing import NamedTuple

import torch
import torch.nn.functional as F


class LayerWeights(NamedTuple):
    """One decoder layer's weights laid out for the fused operation: q/k/v stacked into
    one matrix and gate/up into another, so each is a single pass over the input."""

    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [(heads + 2 * kv_heads) * head_dim, hidden]
    o: torch.Tensor  # [hidden, heads * head_dim]
    post_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    down: torch.Tensor  # [hidden, intermediate]


def fuse_weights(layer) -> LayerWeights:
    """A transformers LlamaDecoderLayer's weights, concatenated (new tensors; the layer
    is untouched)."""
    a, m = layer.self_attn, layer.mlp
    return LayerWeights(
        input_norm=layer.input_layernorm.weight.detach(),
        qkv=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach(),
        o=a.o_proj.weight.detach(),
        post_norm=layer.post_attention_layernorm.weight.detach(),
        gate_up=torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach(),
        down=m.down_proj.weight.detach(),
    )


def rope_tables(
    head_dim: int, theta: float, n: int, inv_freq=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [n, head_dim] for positions 0..n-1, in the rotate-half layout of HF
    checkpoints. inv_freq: other frequencies than theta's (Llama 3's scaled ones, from
    llmbook.rope)."""
    if inv_freq is None:
        inv_freq = 1.0 / theta ** (
            torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
        )
    else:
        inv_freq = torch.as_tensor(inv_freq, dtype=torch.float32)
    angles = torch.outer(torch.arange(n, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rms_norm(x, weight, eps: float):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def project(x, w):
    """x @ w.T. For one token this is a matrix-vector product whose cost is reading w.
    Compiled, the multiply-and-sum below becomes one vectorised loop that streams w
    once, faster here than the BLAS call; run eagerly it would build an [out, in]
    temporary, so eager code and prompts (many rows: compute-bound, BLAS is right) keep
    F.linear."""
    if x.shape[-2] == 1 and torch.compiler.is_compiling():
        return (w * x.unsqueeze(-2)).sum(-1)
    return F.linear(x, w)


def fused_decoder_layer(
    x,
    w: LayerWeights,
    cos,
    sin,
    mask,
    k_cache,
    v_cache,
    pos,
    n_heads: int,
    n_kv_heads: int,
    eps: float,
):
    """x [batch, seq, hidden] at positions pos [seq] -> (new x, k_cache, v_cache).

    cos/sin [seq, head_dim] are the RoPE rows of pos; mask [seq, cache_len] (bool) says
    which cache rows each new token may attend to; k_cache/v_cache [batch, kv_heads,
    cache_len, head_dim] are preallocated and written in place at pos, so the present
    K/V are the caches themselves."""
    b, n, _ = x.shape
    hd = k_cache.shape[-1]
    h = rms_norm(x, w.input_norm, eps)
    q, k, v = project(h, w.qkv).split(
        [n_heads * hd, n_kv_heads * hd, n_kv_heads * hd], dim=-1
    )
    q = q.view(b, n, n_heads, hd).transpose(1, 2)
    k = k.view(b, n, n_kv_heads, hd).transpose(1, 2)
    v = v.view(b, n, n_kv_heads, hd).transpose(1, 2)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    k_cache.index_copy_(2, pos, k)
    v_cache.index_copy_(2, pos, v)
    # enable_gqa: each K/V head serves n_heads / n_kv_heads query heads without
    # being copied
    att = F.scaled_dot_product_attention(
        q, k_cache, v_cache, attn_mask=mask, enable_gqa=True
    )
    x = x + project(att.transpose(1, 2).reshape(b, n, n_heads * hd), w.o)
    h = rms_norm(x, w.post_norm, eps)
    gate, up = project(h, w.gate_up).chunk(2, dim=-1)
    return x + project(F.silu(gate) * up, w.down), k_cache, v_cache
