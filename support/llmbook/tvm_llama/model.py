# Generated from notebooks/06_tvm.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

"""SmolLM2 (any Llama-family decoder) in TVM Relax's nn front end: fused q/k/v and
gate/up projections, attention and KV cache in TVM's paged KV cache. Written in
notebooks/06_tvm.ipynb."""

import tvm
from tvm import relax, te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache

from llmbook.checkpoint import LlamaConfig
from llmbook.tvm_llama.convert import hf_to_tvm  # section 3


class LlamaFFN(nn.Module):
    """SwiGLU with gate and up fused: one [2*ffn, hidden] matmul instead of two."""

    def __init__(self, cfg: LlamaConfig):
        self.gate_up_proj = nn.Linear(
            cfg.hidden_size, 2 * cfg.intermediate_size, bias=False
        )
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = op.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(op.silu(gate) * up)


class LlamaAttention(nn.Module):
    """q, k, v from one fused projection; RoPE, cache append and attention inside the
    paged cache."""

    def __init__(self, cfg: LlamaConfig):
        self.head_dim, self.num_heads, self.num_kv_heads = (
            cfg.head_dim,
            cfg.num_heads,
            cfg.num_kv_heads,
        )
        qkv_rows = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, qkv_rows, bias=False)
        self.o_proj = nn.Linear(
            cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False
        )

    def forward(self, x: Tensor, cache: PagedKVCache, layer_id: int) -> Tensor:
        b, s, _ = x.shape
        qkv = op.reshape(
            self.qkv_proj(x),
            (b, s, self.num_heads + 2 * self.num_kv_heads, self.head_dim),
        )
        out = cache.attention_with_fused_qkv(
            layer_id, qkv, self.num_heads, sm_scale=self.head_dim**-0.5
        )
        return self.o_proj(op.reshape(out, (b, s, self.num_heads * self.head_dim)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        self.input_layernorm = nn.RMSNorm(
            cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False
        )
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = nn.RMSNorm(
            cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False
        )
        self.mlp = LlamaFFN(cfg)

    def forward(self, x: Tensor, cache: PagedKVCache, layer_id: int) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cache, layer_id)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            [LlamaDecoderLayer(cfg) for _ in range(cfg.num_layers)]
        )
        self.norm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False)

    def forward(self, x: Tensor, cache: PagedKVCache) -> Tensor:
        for layer_id, layer in enumerate(self.layers):
            x = layer(x, cache, layer_id)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """The whole decoder as TVM functions: embed, prefill, decode,
    create_tir_paged_kv_cache."""

    quantized = False  # fp32: the reference's own numbers, to rounding
    source = None  # what it runs when not the checkpoint's weights (chapter 9)
    rounded = None  # weights it rounded itself, to check it against (chapter 9)

    def __init__(self, cfg: LlamaConfig, target: tvm.target.Target):
        self.cfg, self.target = cfg, target
        self.model = LlamaModel(cfg)
        # tied: the head *is* the embedding table (see logits)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def weights_from(self, bundle) -> dict:
        """This model's parameters, by name, from a checkpoint: each model class
        lays out its own weights. Here q/k/v and gate/up are stacked (section 3)."""
        return hf_to_tvm(bundle.state_dict, self.cfg, progress=False)

    def logits(self, x: Tensor) -> Tensor:
        if self.cfg.tie_word_embeddings:
            return op.matmul(x, op.permute_dims(self.model.embed_tokens.weight))
        return self.lm_head(x)

    def embed(self, input_ids: Tensor) -> Tensor:  # [1, n] int32 -> [1, n, hidden]
        table = self.model.embed_tokens.weight
        flat = relax.op.take(
            table._expr, op.reshape(input_ids, [-1])._expr, axis=0, mode="clip"
        )
        return op.reshape(
            op.wrap_nested(flat, name="embed"),
            [1, input_ids.shape[1], self.cfg.hidden_size],
        )

    def prefill(self, x: Tensor, cache: PagedKVCache):
        # keep only the last position: the only logits generation needs
        def last(h: te.Tensor):
            b, s, d = h.shape
            return te.compute((b, 1, d), lambda i, _, k: h[i, s - 1, k], name="last")

        h = op.tensor_expr_op(last, name_hint="last", args=[self.model(x, cache)])
        return self.logits(h), cache

    def decode(self, x: Tensor, cache: PagedKVCache):
        return self.logits(self.model(x, cache)), cache

    def create_tir_paged_kv_cache(
        self,
        max_batch_size: tirx.Var,
        max_total_seq_len: tirx.Var,
        prefill_chunk_size: tirx.Var,
        page_size: tirx.Var,
    ) -> PagedKVCache:
        c = self.cfg
        return TIRPagedKVCache(
            attn_kind="mha",
            max_batch_size=max_batch_size,
            max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size,
            page_size=page_size,
            support_sliding_window=0,
            layer_partition=relax.ShapeExpr([0, c.num_layers]),
            num_hidden_layers=c.num_layers,
            num_attention_heads=c.num_heads,
            num_key_value_heads=c.num_kv_heads,
            qk_head_dim=c.head_dim,
            v_head_dim=c.head_dim,
            mla_original_qk_head_dim=0,
            mla_original_v_head_dim=0,
            # Llama 3's scaling is applied by the cache's own RoPE kernel,
            # given its settings
            rope_mode=RopeMode.NORMAL,
            rope_scale=1,
            rope_theta=c.rope_theta,
            rope_scaling={} if c.rope_scaling is None else c.rope_scaling.as_dict(),
            rope_ext_factors=relax.prim_value(0),
            rotary_dim=c.head_dim,
            enable_disaggregation=False,
            dtype="float32",
            target=self.target,
        )

    def functions(self) -> dict:
        """What the compiled library exports: each function's arguments, with their
        shapes."""
        packed = {"param_mode": "packed", "effect_mode": "none"}
        cache = nn.spec.Object(object_type=PagedKVCache)
        h = self.cfg.hidden_size
        return {
            "embed": {
                "input_ids": nn.spec.Tensor([1, "seq_len"], "int32"),
                "$": packed,
            },
            "prefill": {
                "x": nn.spec.Tensor([1, "seq_len", h], "float32"),
                "cache": cache,
                "$": packed,
            },
            "decode": {
                "x": nn.spec.Tensor([1, 1, h], "float32"),
                "cache": cache,
                "$": packed,
            },
            "create_tir_paged_kv_cache": {
                "max_batch_size": int,
                "max_total_seq_len": int,
                "prefill_chunk_size": int,
                "page_size": int,
                "$": {"param_mode": "none", "effect_mode": "none"},
            },
        }

    def spec(self) -> nn.spec.ModuleSpec:
        return nn.spec.ModuleSpec.from_raw(self.functions(), self)
