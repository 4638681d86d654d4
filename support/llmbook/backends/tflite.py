"""A Llama-family checkpoint exported to LiteRT with litert-torch, behind the backend interface:
fp32 and int8 dynamic.

The .tflite file is converted on first use (in a subprocess: about 2 minutes and 4 GB for SmolLM2
on the 2-core machine) and cached on disk keyed by model, config, weights, shapes and recipe
(llmbook.litert_llama.build).
"""
from __future__ import annotations

from . import RunnerBackend


class TFLiteBackend(RunnerBackend):
    name = "tflite"
    recipe = "fp32"

    def __init__(self, bundle, prefill_len: int = 64, kv_len: int = 256, threads: int | None = None, root=None):
        from ..device import threads as default_threads
        from ..litert_llama.build import load_or_convert
        from ..litert_llama.runner import LiteRTRunner

        kv_len = min(kv_len, bundle.config.max_position_embeddings)
        prefill_len = min(prefill_len, kv_len)
        self.path, self.info = load_or_convert(bundle, self.recipe, prefill_len, kv_len, root)
        self.threads = threads or default_threads()
        self.runner = LiteRTRunner(self.path, num_threads=self.threads)
        self.max_context = self.runner.kv_len
        self.prefill_len = self.runner.prefill_len


class TFLiteInt8Backend(TFLiteBackend):
    """int8 weights (per channel), activations quantized per call: litert-torch's dynamic recipe."""

    name = "tflite-int8"
    recipe = "int8-dynamic"
