# Generated from notebooks/05_fused.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

"""The fused operation swapped into transformers' LlamaForCausalLM, layer by layer."""

import torch
from torch import nn
from transformers import LlamaForCausalLM

from llmbook.checkpoint import LlamaConfig
from llmbook.fused_llama.layer import (
    fuse_weights,
    fused_decoder_layer,
    project,
    rope_tables,
)
from llmbook.rope import inv_freq


class StaticKVCache:
    """Every layer's K and V, allocated once for max_len positions: decoding writes one
    row in place instead of growing (and copying) the cache as transformers'
    DynamicCache does."""

    def __init__(self, config, max_len: int):
        head_dim = (
            getattr(config, "head_dim", None)
            or config.hidden_size // config.num_attention_heads
        )
        shape = (1, config.num_key_value_heads, max_len, head_dim)
        self.k = [torch.zeros(shape) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape) for _ in range(config.num_hidden_layers)]
        self.max_len = max_len
        cfg = LlamaConfig.from_hf(config)
        # Llama 3's frequencies
        scaled = None if cfg.rope_scaling is None else inv_freq(cfg)
        self.cos, self.sin = rope_tables(head_dim, cfg.rope_theta, max_len, scaled)


class FusedDecoderLayer(nn.Module):
    """Stands where a LlamaDecoderLayer stood and takes the same call. transformers also
    hands it its mask, cos/sin and cache object; the fused operation uses its own, from
    the position ids."""

    def __init__(self, layer, index: int, cache: StaticKVCache, decode_op):
        super().__init__()
        cfg = layer.self_attn.config
        self.w = fuse_weights(layer)
        self.index, self.cache, self.decode_op = index, cache, decode_op
        self.n_heads, self.n_kv_heads, self.eps = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.rms_norm_eps,
        )

    def forward(self, hidden_states, position_ids=None, **unused):
        pos = position_ids[0]
        end = int(pos[-1]) + 1
        if end > self.cache.max_len:
            raise ValueError(
                f"position {end - 1} is beyond the static KV cache of "
                f"{self.cache.max_len}"
            )
        mask = torch.arange(end) <= pos[:, None]
        k, v = (
            self.cache.k[self.index][:, :, :end],
            self.cache.v[self.index][:, :, :end],
        )
        op = fused_decoder_layer  # a prompt: eager, its matmuls are compute-bound
        # decode: compiled once for every cache length, not once per length
        if len(pos) == 1:
            op = self.decode_op
            for t, dim in ((mask, 1), (k, 2), (v, 2)):
                torch._dynamo.mark_dynamic(t, dim)
        x, _, _ = op(
            hidden_states,
            self.w,
            self.cache.cos[pos],
            self.cache.sin[pos],
            mask,
            k,
            v,
            pos,
            self.n_heads,
            self.n_kv_heads,
            self.eps,
        )
        return x


class FusedHead(nn.Module):
    """The output projection (the tied embedding for SmolLM2) with the same
    matrix-vector kernel."""

    def __init__(self, weight, compile: bool):
        super().__init__()
        self.weight = weight
        self.op = torch.compile(project, dynamic=False) if compile else project

    def forward(self, x):
        return self.op(x, self.weight)


def swap_in(hf_model, max_len: int = 1024, compile: bool = True) -> LlamaForCausalLM:
    """A LlamaForCausalLM sharing hf_model's embeddings, final norm and rotary module,
    with every decoder layer and the head replaced by the fused operation; hf_model
    itself is not changed. Call it with explicit position_ids and use_cache=False: the
    KV cache lives in `.static_cache`."""
    cfg = hf_model.config
    # a skeleton: every part that holds weights is replaced below
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model.model.embed_tokens = hf_model.model.embed_tokens
    model.model.norm = hf_model.model.norm
    model.model.rotary_emb = hf_model.model.rotary_emb
    cache = StaticKVCache(cfg, max_len)
    op = (
        torch.compile(fused_decoder_layer, dynamic=False)
        if compile
        else fused_decoder_layer
    )
    model.model.layers = nn.ModuleList(
        FusedDecoderLayer(layer, i, cache, op)
        for i, layer in enumerate(hf_model.model.layers)
    )
    model.lm_head = FusedHead(hf_model.lm_head.weight.detach(), compile)
    model.static_cache = cache
    return model.eval()
