# Generated from notebooks/04_weights.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

"""GGUF tensor names -> Hugging Face names, for a Llama decoder. Written in
notebooks/04_weights.ipynb; chapter 9 reads the GGUF's blocks with it."""
from llmbook.checkpoint import CheckpointError

LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
             "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}


def hf_name(gguf_name: str) -> str:
    """The Hugging Face name of a GGUF tensor of a Llama decoder."""
    if gguf_name in TOP_NAMES:
        return TOP_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if (len(parts) == 4 and parts[0] == "blk" and parts[2] in LAYER_NAMES
            and parts[3] == "weight"):
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.weight"
    raise CheckpointError(f"GGUF tensor {gguf_name!r} is not part of a "
                          "Llama decoder")
