# Generated from notebooks/07_tflite.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

"""PyTorch -> one .tflite with a `prefill` and a `decode` signature (fp32); int8 files
are rewritten from it."""

from pathlib import Path

import litert_torch
import torch
from ai_edge_quantizer import recipe as aeq_recipes
from ai_edge_quantizer.algorithm_manager import AlgorithmName
from litert_torch.generative.layers import kv_cache as kv_utils
from litert_torch.generative.quantize import quant_attrs, quant_recipes
from litert_torch.quantize import translate_recipe

# this chapter's
RECIPES = ("fp32", "int8-dynamic", "int8-weight-only", "int8-hadamard")
INT4 = "int4-blockwise"  # LiteRT's 4-bit recipe, measured in chapter 9


def quant_recipe(recipe: str, mcfg):
    """The ai_edge_quantizer recipe for a quantized recipe's name."""
    # int8 weights per channel; activations quantized on the fly
    if recipe == "int8-dynamic":
        generative = quant_recipes.full_dynamic_recipe(mcfg=mcfg).generative_recipe
    # int8 weights per channel; the arithmetic stays fp32
    elif recipe == "int8-weight-only":
        generative = quant_recipes.full_weight_only_recipe(mcfg=mcfg).generative_recipe
    elif recipe == INT4:  # int4 weights, a scale per 32; int8 activations per call
        generative = quant_recipes.full_dynamic_recipe(
            mcfg=mcfg,
            weight_dtype=quant_attrs.Dtype.INT4,
            granularity=quant_attrs.Granularity.BLOCKWISE_32,
        ).generative_recipe
    # int8 dynamic after a Hadamard rotation; litert-torch has no name for it
    elif recipe == "int8-hadamard":
        return aeq_recipes.dynamic_wi8_afp32(
            algorithm_key=AlgorithmName.DECOMPOSED_HADAMARD_ROTATION
        )
    else:
        raise ValueError(
            f"unknown quantization recipe {recipe!r}; known: "
            f"{', '.join((*RECIPES[1:], INT4))}"
        )
    return translate_recipe.translate_to_ai_edge_recipe(generative)


def convert(model, path, prefill_len: int, kv_len: int) -> str:
    """Trace `model` twice (prefill of `prefill_len` tokens, decode of one) into one
    fp32 .tflite file.

    Both signatures take tokens, positions and the whole KV cache (one input per layer
    for k and v) and return logits plus the updated cache: the caller holds the cache
    and feeds it back."""
    mcfg, module = model.config, model.eval()
    # the prefill signature returns logits too (Decoder.forward always does): the
    # runner needs the last prompt position's, and the teacher-forced checks all
    kv = kv_utils.KVCache.from_model_config(kv_len, mcfg)
    prefill = dict(
        tokens=torch.zeros((1, prefill_len), dtype=torch.int),
        input_pos=torch.arange(prefill_len, dtype=torch.int),
        kv_cache=kv,
    )
    decode = dict(
        tokens=torch.zeros((1, 1), dtype=torch.int),
        input_pos=torch.tensor([0], dtype=torch.int),
        kv_cache=kv,
    )
    edge = (
        litert_torch.signature("prefill", module, sample_kwargs=prefill)
        .signature("decode", module, sample_kwargs=decode)
        .convert()
    )
    edge.export(str(path))
    return str(path)


def quantize(fp32_path, path, recipe: str, mcfg) -> str:
    """Rewrite a converted fp32 file into an int8 one. `convert(quant_config=...)` does
    the same after its fp32 conversion; done here, one conversion serves every recipe
    and each costs seconds."""
    data = translate_recipe.quantize_model(
        Path(fp32_path).read_bytes(), quant_recipe(recipe, mcfg)
    )
    Path(path).write_bytes(data)
    return str(path)
