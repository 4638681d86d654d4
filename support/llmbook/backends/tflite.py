"""A Llama-family checkpoint exported to LiteRT with litert-torch, behind the backend interface:
fp32, int8 with Hadamard rotation (the int8 recipe of chapter 7 that keeps top-1 agreement above 90%),
and LiteRT's int4 recipe (chapter 9).

The fp32 .tflite file is converted on first use (in a subprocess: about 2 minutes and 4 GB for SmolLM2
on the 2-core machine), the quantized ones rewritten from it by ai_edge_quantizer (seconds); all are cached
on disk keyed by model, config, weights, shapes, recipe and environment (llmbook.litert_llama.build).
"""
from __future__ import annotations

import mmap

# at import, so that a machine without LiteRT gets BackendUnavailable from the registry
from ai_edge_litert import schema_py_generated as schema  # the .tflite format

from . import RunnerBackend
from ..litert_llama.runner import LiteRTRunner
from ..quiet import XNNPACK_DELEGATE, dropping_stderr


def constant_bytes(path) -> int:
    """Bytes of every constant a .tflite file holds, each once (its prefill and decode signatures
    share them): the weights with their scales, and the graph's own tables (the causal mask, of
    kv_len x kv_len). A decode step reads all of it but one row of the mask, and one row of an
    untied embedding table (SmolLM2's is tied: the head, read whole): beside a real model's
    weights, the rest of the mask is a fraction of a percent. Not the file's size: the file also
    holds the graph (operators, tensor names, signatures), megabytes beside a quantized file's
    weights."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        model = schema.Model.GetRootAs(data, 0)
        buffers = (model.Buffers(i) for i in range(model.BuffersLength()))
        # large buffers sit after the flatbuffer (their offset and size), small ones inside it
        return sum(b.Size() or b.DataLength() for b in buffers)


def without_delegate_banner():
    """LiteRT's C++ side prints its XNNPACK banner to fd 2 the first time a process runs a model;
    inside this block it is dropped, every other line of stderr kept (llmbook.quiet says why)."""
    return dropping_stderr(XNNPACK_DELEGATE)


class TFLiteBackend(RunnerBackend):
    name = "tflite"
    recipe = "fp32"
    # the prefill signature outputs every position of its chunk (chapter 7)
    head_every_position = True

    def __init__(self, bundle, prefill_len: int = 64, kv_len: int = 256, threads: int | None = None, root=None):
        from ..device import threads as default_threads
        from ..litert_llama.build import load_or_convert

        kv_len = min(kv_len, bundle.config.max_position_embeddings)
        prefill_len = min(prefill_len, kv_len)
        self.path, self.info = load_or_convert(bundle, self.recipe, prefill_len, kv_len, root)
        self.weight_bytes = constant_bytes(self.path)
        self.threads = threads or default_threads()
        self.runner = LiteRTRunner(self.path, num_threads=self.threads, name=self.name)
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
    quantized = True


class TFLiteInt4Backend(TFLiteBackend):
    """LiteRT's 4-bit recipe (chapter 9): int4 weights in blocks of 32 with one scale each
    (symmetric: the fp32 weights are rounded again, LiteRT has no minimum per block), and int8
    activations quantized per call."""

    name = "tflite-int4"
    recipe = "int4-blockwise"
    quantized = True
