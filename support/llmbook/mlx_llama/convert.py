# Generated from notebooks/03_generation.ipynb, notebooks/04_weights.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

import re

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from llmbook.checkpoint import CheckpointError, require_shapes

# Hugging Face name -> MLX example name
HF_TO_MLX = [
    (r"^model\.embed_tokens\.", "embedding."),
    (r"^model\.norm\.", "norm."),
    (r"^lm_head\.", "out_proj."),
    (r"^model\.layers\.(\d+)\.self_attn\.q_proj\.", r"layers.\1.attention.query_proj."),
    (r"^model\.layers\.(\d+)\.self_attn\.k_proj\.", r"layers.\1.attention.key_proj."),
    (r"^model\.layers\.(\d+)\.self_attn\.v_proj\.", r"layers.\1.attention.value_proj."),
    (r"^model\.layers\.(\d+)\.self_attn\.o_proj\.", r"layers.\1.attention.out_proj."),
    (r"^model\.layers\.(\d+)\.input_layernorm\.", r"layers.\1.norm1."),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"layers.\1.norm2."),
    (r"^model\.layers\.(\d+)\.mlp\.gate_proj\.", r"layers.\1.linear1."),
    (r"^model\.layers\.(\d+)\.mlp\.up_proj\.", r"layers.\1.linear2."),
    (r"^model\.layers\.(\d+)\.mlp\.down_proj\.", r"layers.\1.linear3."),
]


def mlx_name(hf_name: str) -> str:
    for pattern, replacement in HF_TO_MLX:
        name, n = re.subn(pattern, replacement, hf_name)
        if n:
            return name
    raise CheckpointError(
        f"unexpected key {hf_name!r}: no MLX parameter corresponds to it"
    )


def hf_to_mlx(state_dict) -> dict:
    """Hugging Face state dict (torch tensors) -> {MLX name: mx.array}; RoPE buffers are
    dropped."""
    return {
        mlx_name(k): mx.array(v.float().numpy())
        for k, v in state_dict.items()
        if not k.endswith("rotary_emb.inv_freq")
    }


def load_weights(model, weights: dict):
    """Put `weights` into `model`, refusing missing, unexpected or wrongly shaped
    tensors."""
    want = {k: v.shape for k, v in tree_flatten(model.parameters())}
    require_shapes({k: v.shape for k, v in weights.items()}, want)
    model.update(tree_unflatten(list(weights.items())))
    mx.eval(model.parameters())
    return model


from llmbook.gguf_names import hf_name  # the cell above


def unpermute_rope_rows(w, n_heads):
    """Undo llama.cpp's q/k row order (pairs 2i, 2i+1) back to rotate-half order (i, i +
    d/2)."""
    rows, cols = w.shape
    return (
        w.reshape(n_heads, rows // n_heads // 2, 2, cols)
        .swapaxes(1, 2)
        .reshape(rows, cols)
    )


def gguf_to_mlx(path) -> dict:
    """Dequantize a llama GGUF file to {MLX name: fp32 mx.array}, q/k rows still in the
    file's interleaved-RoPE order (see to_rotate_half)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    out = {}
    for t in GGUFReader(path).tensors:
        name = mlx_name(hf_name(t.name))  # GGUF -> Hugging Face -> MLX
        out[name] = mx.array(dequantize(t.data, t.tensor_type).astype("float32"))
    return out


def to_rotate_half(weights: dict, cfg) -> dict:
    """GGUF q/k layout -> Hugging Face layout, for nn.RoPE(traditional=False)."""
    out = dict(weights)
    for name, w in weights.items():
        if name.endswith(("query_proj.weight", "key_proj.weight")):
            heads = cfg.num_heads if "query" in name else cfg.num_kv_heads
            out[name] = unpermute_rope_rows(w, heads)
    return out
