"""A Llama-family checkpoint exported to LiteRT with litert-torch, behind the backend interface:
fp32, and int8 with Hadamard rotation (the int8 recipe of chapter 7 that keeps top-1 agreement above 90%).

The fp32 .tflite file is converted on first use (in a subprocess: about 2 minutes and 4 GB for SmolLM2
on the 2-core machine), the int8 one rewritten from it by ai_edge_quantizer (seconds); both are cached
on disk keyed by model, config, weights, shapes and recipe (llmbook.litert_llama.build).
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile

from . import RunnerBackend

BANNER = "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."


@contextlib.contextmanager
def without_delegate_banner():
    """LiteRT's C++ side prints BANNER to file descriptor 2 the first time a process runs a model.
    Jupyter forwards such output asynchronously, so it lands in whichever cell happens to be running
    and the stored outputs would differ run to run. Inside this block fd 2 goes to a file; every other
    line is written back to stderr afterwards, so nothing but the banner is dropped."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            rest = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip() != BANNER]
            if rest:
                print("\n".join(rest), file=sys.stderr)


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
        with without_delegate_banner():  # the first run creates the XNNPACK delegate
            self.runner.decode(0)
        self.runner.reset()
        self.max_context = self.runner.kv_len
        self.prefill_len = self.runner.prefill_len


class TFLiteInt8Backend(TFLiteBackend):
    """int8 weights (per channel) and activations quantized per call, both after a Hadamard rotation of
    each matrix product's input dimension, which spreads outliers before they are rounded."""

    name = "tflite-int8"
    recipe = "int8-hadamard"
