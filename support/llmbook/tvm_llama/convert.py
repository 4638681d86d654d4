# Generated from notebooks/06_tvm.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

"""Hugging Face Llama weights -> the parameters of the TVM model (fused q/k/v and
gate/up). Written in notebooks/06_tvm.ipynb."""

import numpy as np
import tvm
from tqdm import tqdm

from llmbook.checkpoint import LlamaConfig, require_shapes


# each fused matrix of the TVM model, and the checkpoint's matrices it stacks
FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def fuse(weights: dict, layers, stack) -> dict:
    """Weights under Hugging Face names -> under the TVM model's: each of `layers`'
    q/k/v and gate/up stacked by `stack` (a list of matrices -> one matrix), the
    rest as they are. Chapter 9 stacks 4-bit blocks with it."""
    w = dict(weights)
    out = {}
    for i in layers:
        p = f"model.layers.{i}."
        for fused, parts in FUSED.items():
            out[f"{p}{fused}.weight"] = stack([w.pop(f"{p}{x}.weight") for x in parts])
    return out | w


def hf_to_tvm(
    state_dict: dict, cfg: LlamaConfig, progress: bool = True, **bar
) -> dict[str, np.ndarray]:
    """TVM parameter name -> fp32 array. `bar` goes to tqdm (e.g. file=sys.stdout)."""
    sd = {k: np.asarray(v, dtype=np.float32) for k, v in state_dict.items()}
    layers = tqdm(range(cfg.num_layers), desc="converting", unit="layer",
                  disable=not progress, **bar)
    out = fuse(sd, layers, np.concatenate)
    if unused := sorted(out.keys() - tvm_shapes(cfg).keys()):
        raise ValueError(f"weights not used by the TVM model: {unused[:3]}")
    return out


def tvm_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every TVM parameter and its shape."""
    h, d, kv = (
        cfg.hidden_size,
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
    )
    shapes = {
        "model.embed_tokens.weight": (cfg.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.qkv_proj.weight": (d + 2 * kv, h),
            p + "self_attn.o_proj.weight": (h, d),
            p + "mlp.gate_up_proj.weight": (2 * cfg.intermediate_size, h),
            p + "mlp.down_proj.weight": (h, cfg.intermediate_size),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    return shapes


def to_device(
    weights: dict[str, np.ndarray], names: list[str], cfg: LlamaConfig, dev
) -> list:
    """The parameters in the compiled functions' order, checked, as tvm.runtime.Tensors
    on `dev`."""
    require_shapes({k: v.shape for k, v in weights.items()}, tvm_shapes(cfg))
    return [tvm.runtime.tensor(weights[n], dev) for n in names]
