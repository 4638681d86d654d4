"""Engines behind one small interface, so the CLI, the comparisons and the benchmarks treat them alike.

Each backend is an `llmbook.engine.Backend` (chapter 3 writes it down): name, max_context,
quantized, reset(), prefill(ids), decode(token), each checking its input with
`llmbook.engine.check_tokens`. Optional members:
    device             where it computes: "cpu" (the default), or "gpu" (MLX on Metal); the
                       measured CPU bandwidth bounds only the engines on the CPU
    text_logits(ids)   logits of every position of a new sequence from one forward pass (the
                       reference has it, so llmbook.quality need not decode it token by token)
    batch_runner(max_batch, max_tokens)
                       many sequences in one cache, decoded together (chapter 10; `batch` in the
                       command line runs the backends that have it)
"""
from __future__ import annotations

import functools
import importlib

from ..checkpoint import Bundle
from ..engine import Backend, check_tokens  # noqa: F401  (Backend: re-exported for the backends)

# name -> (module, class, what to install when it is missing). Modules import lazily: a reader
# without TVM can still run the MLX backend.
REGISTRY = {
    "hf": ("llmbook.backends.hf", "HFBackend", "transformers"),
    "torch-fused": ("llmbook.backends.fused", "TorchFusedBackend", "torch and transformers"),
    "mlx": ("llmbook.backends.mlx", "MLXBackend", "mlx[cpu] (Linux) or mlx (macOS)"),
    "mlx-q4": ("llmbook.backends.mlx", "MLXQ4Backend", "mlx[cpu] (Linux) or mlx (macOS)"),
    "tvm": ("llmbook.backends.tvm", "TVMBackend", "apache-tvm==0.26.0"),
    "tvm-q4": ("llmbook.backends.tvm", "TVMQ4Backend", "apache-tvm==0.26.0"),
    "tflite": ("llmbook.backends.tflite", "TFLiteBackend", "litert-torch and ai-edge-litert"),
    "tflite-int8": ("llmbook.backends.tflite", "TFLiteInt8Backend", "litert-torch and ai-edge-litert"),
    "tflite-int4": ("llmbook.backends.tflite", "TFLiteInt4Backend", "litert-torch and ai-edge-litert"),
    "llama.cpp": ("llmbook.backends.llama_cpp", "LlamaCppBackend", "llama-cpp-python==0.3.36 (make compiles it)"),
}


class BackendUnavailable(RuntimeError):
    """The backend's engine or device is not present on this machine."""


class StepBackend:
    """A backend whose engine takes any number of new tokens in one `_forward(ids)` call and
    returns the last position's logits; `_reset()` empties the engine's cache. This class
    counts the tokens cached (`length`) and checks every input before the engine sees it."""

    quantized = False
    length = 0

    def reset(self):
        self._reset()
        self.length = 0

    def prefill(self, ids):
        ids = check_tokens(ids, self.vocab_size, 0, self.max_context, self.name)
        self.reset()
        return self._step(ids)

    def decode(self, token):
        return self._step(check_tokens([token], self.vocab_size, self.length, self.max_context, self.name))

    def _step(self, ids: list[int]):
        logits = self._forward(ids)
        self.length += len(ids)
        return logits


class RunnerBackend:
    """A backend whose engine-side runner (TVM's, LiteRT's) already speaks prefill/decode for one
    sequence: the backend only builds or loads the engine and hands the calls on (the runner
    checks the input with llmbook.engine.check_tokens)."""

    runner = None
    quantized = False

    def reset(self):
        self.runner.reset()

    def prefill(self, ids):
        return self.runner.prefill(ids)

    def decode(self, token):
        return self.runner.decode(token)


class RoundedWeights:
    """A 4-bit backend that runs a GGUF's own blocks, or rounds a Hugging Face checkpoint's fp32
    weights itself (then `_rounded` holds those blocks). `compare` and the tests judge it against
    the weights it computes with."""

    _rounded = None

    @functools.cached_property
    def own_weights(self) -> dict | None:
        """The fp32 weights it computes with, under Hugging Face names, when it rounded them
        itself (None for a GGUF's blocks, which are the reference's weights): dequantized on
        first use, by `compare` and the tests, not at every start."""
        from ..quant import dequantize_all

        return None if self._rounded is None else dequantize_all(self._rounded)


def names() -> list[str]:
    return list(REGISTRY)


def backend_class(name: str) -> type:
    """The class behind a registered name, imported (BackendUnavailable when its engine is not
    installed)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(REGISTRY)}")
    module, cls, needs = REGISTRY[name]
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise BackendUnavailable(f"backend {name!r} needs {needs}: {e}") from e
    return getattr(mod, cls)


def get_backend(name: str, bundle: Bundle, **options):
    return backend_class(name)(bundle, **options)
