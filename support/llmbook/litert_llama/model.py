# Generated from notebooks/07_tflite.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

"""A Llama-family decoder (SmolLM2 or any LlamaConfig) re-authored from litert-torch's
building blocks."""

import functools

import litert_torch.generative.layers.model_config as lcfg
import torch
from litert_torch.generative.layers import attention, builder
from litert_torch.generative.layers import kv_cache as kv_utils
from litert_torch.generative.layers.attention_utils import build_causal_mask_cache
from litert_torch.generative.utilities import model_builder
from litert_torch.generative.utilities.loader import ModelLoader
from torch import nn

from llmbook.checkpoint import LlamaConfig
from llmbook.rope import inv_freq


def scaled_rope(input_pos, n_elem: int, base: int, inv_freq: torch.Tensor):
    """cos and sin like litert-torch's build_rope, from given frequencies (Llama 3's
    scaled ones) instead of a base: ModelConfig.build_rope takes any such function."""
    radians = input_pos.float()[None, :, None] * inv_freq[None, None, :]
    return torch.cos(radians), torch.sin(radians)


def model_config(cfg: LlamaConfig, max_seq_len: int) -> lcfg.ModelConfig:
    """The litert-torch ModelConfig of a Llama decoder (what the library's SmolLM2
    example writes by hand)."""
    if cfg.num_heads % cfg.num_kv_heads:
        raise ValueError(
            f"{cfg.num_heads} query heads cannot share {cfg.num_kv_heads} KV heads "
            "evenly"
        )
    if cfg.rope_theta != int(cfg.rope_theta):
        raise ValueError(
            f"litert-torch takes an integer RoPE base, got {cfg.rope_theta}"
        )
    norm = lcfg.NormalizationConfig(
        type=lcfg.NormalizationType.RMS_NORM, epsilon=cfg.rms_norm_eps
    )
    rope = {}  # plain RoPE: litert-torch's own build_rope, from rotary_base
    # Llama 3: the scaled frequencies, traced as constants
    if cfg.rope_scaling is not None:
        scaled = torch.tensor(inv_freq(cfg), dtype=torch.float32)
        rope = {"build_rope": functools.partial(scaled_rope, inv_freq=scaled)}
    block = lcfg.TransformerBlockConfig(
        attn_config=lcfg.AttentionConfig(
            num_heads=cfg.num_heads,
            head_dim=cfg.head_dim,
            num_query_groups=cfg.num_kv_heads,  # grouped-query attention: KV heads
            rotary_base=int(cfg.rope_theta),
            rotary_percentage=1.0,  # RoPE on the whole head
        ),
        ff_config=lcfg.FeedForwardConfig(
            type=lcfg.FeedForwardType.GATED,  # SwiGLU: down(silu(gate(x)) * up(x))
            activation=lcfg.ActivationConfig(lcfg.ActivationType.SILU),
            intermediate_size=cfg.intermediate_size,
        ),
        pre_attention_norm_config=norm,
        post_attention_norm_config=norm,
    )
    return lcfg.ModelConfig(
        vocab_size=cfg.vocab_size,
        num_layers=cfg.num_layers,
        max_seq_len=max_seq_len,
        embedding_dim=cfg.hidden_size,
        block_configs=block,  # one config shared by every layer
        final_norm_config=norm,
        lm_head_share_weight_with_embedding=cfg.tie_word_embeddings,
        **rope,
    )


def tensor_names(cfg: LlamaConfig) -> ModelLoader.TensorNames:
    """Where each weight of the re-authored model lives in a Hugging Face Llama
    checkpoint."""
    if cfg.tie_word_embeddings:
        return model_builder.TENSOR_NAMES
    return model_builder.TENSOR_NAMES_WITH_SEPARATE_LM_HEAD  # adds lm_head = "lm_head"


class Layer(nn.Module):
    """One decoder layer from the library's parts. The attribute names are the ones
    its loader fills (`transformer_blocks.{i}.atten_func.qkv_projection`, ...)."""

    def __init__(self, block: lcfg.TransformerBlockConfig, mcfg: lcfg.ModelConfig):
        super().__init__()
        dim = mcfg.embedding_dim
        self.pre_atten_norm = builder.build_norm(dim, block.pre_attention_norm_config)
        # q, k and v in one matrix; RoPE, then the cache write and the attention in
        # one call that the converter keeps as a single scaled-dot-product op
        self.atten_func = attention.CausalSelfAttention(
            dim, block.attn_config, mcfg.enable_hlfb
        )
        self.post_atten_norm = builder.build_norm(dim, block.post_attention_norm_config)
        self.ff = builder.build_ff(dim, block.ff_config)  # SwiGLU

    def forward(self, x, rope, mask, input_pos, kv: kv_utils.KVCacheEntry):
        h, kv = self.atten_func(self.pre_atten_norm(x), rope, mask, input_pos, kv)
        x = x + h
        return x + self.ff(self.post_atten_norm(x)), kv


class Decoder(nn.Module):
    """The whole model, with its forward written out: embedding, RoPE angles, the
    causal mask for these positions, the layers with their cache entries, the head.
    The cache is an argument and a result, never state: that is what lets the
    converter trace it as the file's inputs and outputs."""

    def __init__(self, mcfg: lcfg.ModelConfig, kv_len: int):
        super().__init__()
        self.config = mcfg
        self.tok_embedding = nn.Embedding(mcfg.vocab_size, mcfg.embedding_dim)
        self.transformer_blocks = nn.ModuleList(
            Layer(mcfg.block_config(i), mcfg) for i in range(mcfg.num_layers)
        )
        self.final_norm = builder.build_norm(mcfg.embedding_dim, mcfg.final_norm_config)
        self.lm_head = nn.Linear(mcfg.embedding_dim, mcfg.vocab_size, bias=False)
        if mcfg.lm_head_share_weight_with_embedding:
            self.lm_head.weight = self.tok_embedding.weight  # tied: one matrix
        # row p: 0 for the cache positions <= p, -inf after; a call takes its rows
        self.mask_cache = build_causal_mask_cache(kv_len)

    def forward(self, tokens, input_pos, kv_cache: kv_utils.KVCache) -> dict:
        attn = self.config.block_config(0).attn_config
        rope = self.config.build_rope(input_pos, attn.head_dim, attn.rotary_base)
        mask = self.mask_cache.index_select(2, input_pos)
        x, entries = self.tok_embedding(tokens), []
        for layer, kv in zip(self.transformer_blocks, kv_cache.caches, strict=True):
            x, kv = layer(x, rope, mask, input_pos, kv)
            entries.append(kv)
        logits = self.lm_head(self.final_norm(x))  # every position of the call
        return {"logits": logits, "kv_cache": kv_utils.KVCache(tuple(entries))}


def build_model(cfg: LlamaConfig, state_dict: dict, kv_len: int) -> Decoder:
    """The re-authored model with the checkpoint's weights mapped in, from an in-memory
    state dict.

    The loader pops every weight it maps; left-over or missing weights raise (strict for
    untied heads, and for tied ones too: a missing tensor fails in load_state_dict's
    size check or in `pop`)."""
    return model_builder.build_decoder_only_model(
        checkpoint_path="in-memory",  # not read: custom_loader hands over the weights
        config=model_config(cfg, kv_len),
        tensor_names=tensor_names(cfg),
        model_class=Decoder,  # built as Decoder(config, kv_len)
        custom_loader=lambda _path: dict(state_dict),  # a copy: the loader pops from it
        mask_cache_size=kv_len,
    )
