# Generated from notebooks/07_tflite.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

"""PyTorch -> one .tflite with a `prefill` and a `decode` signature, fp32 or int8 (dynamic or weight-only)."""
import litert_torch
import torch
from litert_torch.generative.layers import kv_cache as kv_utils
from litert_torch.generative.quantize import quant_recipes
from litert_torch.generative.utilities.converter import ExportableModule
from litert_torch.generative.utilities.export_config import ExportConfig

RECIPES = ("fp32", "int8-dynamic", "int8-weight-only")


def quant_config(recipe: str, mcfg):
    """litert-torch's quantization recipe for a name (None: keep fp32)."""
    if recipe == "fp32":
        return None
    if recipe == "int8-dynamic":  # int8 weights per channel; activations quantized on the fly
        return quant_recipes.full_dynamic_recipe(mcfg=mcfg)
    if recipe == "int8-weight-only":  # int8 weights per channel; the arithmetic stays fp32
        return quant_recipes.full_weight_only_recipe(mcfg=mcfg)
    raise ValueError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")


def convert(model, path, prefill_len: int, kv_len: int, recipe: str = "fp32") -> str:
    """Trace `model` twice (prefill of `prefill_len` tokens, decode of one) into one .tflite file.

    Both signatures take tokens, positions and the whole KV cache (one input per layer for k and v)
    and return logits plus the updated cache: the caller holds the cache and feeds it back."""
    mcfg = model.config
    # logits on prefill too: the runner needs the last prompt position's, and teacher-forced checks all
    module = ExportableModule(model, export_config=ExportConfig(output_logits_on_prefill=True)).eval()
    kv = kv_utils.KVCache.from_model_config(kv_len, mcfg)
    prefill = dict(tokens=torch.zeros((1, prefill_len), dtype=torch.int),
                   input_pos=torch.arange(prefill_len, dtype=torch.int), kv_cache=kv)
    decode = dict(tokens=torch.zeros((1, 1), dtype=torch.int),
                  input_pos=torch.tensor([0], dtype=torch.int), kv_cache=kv)
    edge = (litert_torch.signature("prefill", module, sample_kwargs=prefill)
            .signature("decode", module, sample_kwargs=decode)
            .convert(quant_config=quant_config(recipe, mcfg)))
    edge.export(str(path))
    return str(path)
