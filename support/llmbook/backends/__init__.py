"""Engines behind one small interface, so the CLI, the comparisons and the benchmarks treat them alike.

A backend holds one sequence's KV cache:
    reset()            forget the cache
    prefill(ids)       run the prompt, fill the cache, return the last position's logits (np.float32 [vocab])
    decode(token)      run one token, extend the cache, return its logits
    max_context        most tokens (prompt + generated) the backend can hold
    device             where it computes: "cpu" (the default), or "gpu" (MLX on Metal); the
                       measured CPU bandwidth bounds only the engines on the CPU
"""
from __future__ import annotations

import importlib

from ..checkpoint import Bundle

# name -> (module, class, what to install when it is missing). Modules import lazily: a reader
# without TVM can still run the MLX backend.
REGISTRY = {
    "hf": ("llmbook.backends.hf", "HFBackend", "transformers"),
    "torch-fused": ("llmbook.backends.fused", "TorchFusedBackend", "torch and transformers"),
    "mlx": ("llmbook.backends.mlx", "MLXBackend", "mlx[cpu] (Linux) or mlx (macOS)"),
    "tvm": ("llmbook.backends.tvm", "TVMBackend", "apache-tvm==0.26.0"),
    "tflite": ("llmbook.backends.tflite", "TFLiteBackend", "litert-torch and ai-edge-litert"),
    "tflite-int8": ("llmbook.backends.tflite", "TFLiteInt8Backend", "litert-torch and ai-edge-litert"),
    "llama.cpp": ("llmbook.backends.llama_cpp", "LlamaCppBackend", "llama-cpp-python (optional, compiles llama.cpp)"),
}


class BackendUnavailable(RuntimeError):
    """The backend's engine or device is not present on this machine."""


class StepBackend:
    """A backend whose engine takes any number of new tokens in one `_forward(ids)` call and
    returns the last position's logits; `reset()` starts a new sequence."""

    def prefill(self, ids):
        self.reset()
        return self._forward(list(ids))

    def decode(self, token):
        return self._forward([int(token)])


class RunnerBackend:
    """A backend whose engine-side runner (TVM's, LiteRT's) already speaks prefill/decode for one
    sequence: the backend only builds or loads the engine and hands the calls on."""

    runner = None

    def reset(self):
        self.runner.reset()

    def prefill(self, ids):
        return self.runner.prefill(ids)

    def decode(self, token):
        return self.runner.decode(token)


def names() -> list[str]:
    return list(REGISTRY)


def get_backend(name: str, bundle: Bundle, **options):
    if name not in REGISTRY:
        raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(REGISTRY)}")
    module, cls, needs = REGISTRY[name]
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise BackendUnavailable(f"backend {name!r} needs {needs}: {e}") from e
    return getattr(mod, cls)(bundle, **options)
