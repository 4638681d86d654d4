# Generated from notebooks/06_tvm.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

"""Section 1's model before its projections were fused: q, k, v, gate and up each
have their own matrix, as in the checkpoint. Written in notebooks/06_tvm.ipynb, to
measure what fusing them buys."""

import numpy as np
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

from llmbook.checkpoint import LlamaConfig
from llmbook.tvm_llama.model import LlamaForCausalLM


class UnfusedFFN(nn.Module):
    """SwiGLU as written: gate and up are two matrix products over the same input."""

    def __init__(self, cfg: LlamaConfig):
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(op.silu(self.gate_proj(x)) * self.up_proj(x))


class UnfusedAttention(nn.Module):
    """q, k and v from three matrix products, joined only for the paged cache (which
    takes them as one tensor)."""

    def __init__(self, cfg: LlamaConfig):
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        q_rows, kv_rows = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_rows, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_rows, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_rows, bias=False)
        self.o_proj = nn.Linear(q_rows, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor, cache: PagedKVCache, layer_id: int) -> Tensor:
        b, s, _ = x.shape
        qkv = op.concat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        heads = self.num_heads + 2 * self.num_kv_heads
        out = cache.attention_with_fused_qkv(
            layer_id,
            op.reshape(qkv, (b, s, heads, self.head_dim)),
            self.num_heads,
            sm_scale=self.head_dim**-0.5,
        )
        return self.o_proj(op.reshape(out, (b, s, self.num_heads * self.head_dim)))


class UnfusedLlamaForCausalLM(LlamaForCausalLM):
    """Section 1's model with every layer's attention and feed-forward unfused: its
    parameters carry the checkpoint's own names."""

    def __init__(self, cfg: LlamaConfig, target):
        super().__init__(cfg, target)
        for layer in self.model.layers:
            layer.self_attn, layer.mlp = UnfusedAttention(cfg), UnfusedFFN(cfg)

    def weights_from(self, bundle) -> dict:
        """The checkpoint's own tensors, by their names in the file."""
        return {n: np.asarray(w, np.float32) for n, w in bundle.state_dict.items()}
