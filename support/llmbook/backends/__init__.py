"""Engines behind one small interface, so the CLI, the comparisons and the benchmarks treat them alike.

Each backend is an `llmbook.engine.Backend` (chapter 3 writes it down): name, max_context,
quantized, reset(), prefill(ids), decode(token), each checking its input with
`llmbook.engine.check_tokens`. Each derives from `llmbook.engine.BackendBase`, which declares
the members only some engines have (device, path, source, own_weights, weight_bytes,
head_every_position, exact, text_logits, batch_runner) with their defaults.

The registry below is the one list of engines: what the command line accepts, what the
benchmarks open, what each needs installed, and the colour each has in every figure.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util

from ..checkpoint import Bundle
# re-exported: the backends, the chapters and the tests import them from here
from ..engine import Backend, BackendBase, BackendUnavailable, check_tokens  # noqa: F401


@dataclasses.dataclass(frozen=True)
class Entry:
    """One engine of the registry."""

    module: str  # the module that defines its class, imported on first use
    cls: str  # the class's name in that module
    needs: str  # what to install when it is missing, in words
    imports: tuple[str, ...]  # the top-level packages it imports: without one, it cannot run
    color: str  # its matplotlib colour in every figure
    options: dict = dataclasses.field(default_factory=dict)  # keyword arguments of its class


_TVM = "apache-tvm==0.26.0"
_LITERT = "litert-torch and ai-edge-litert"
_MLX = "mlx[cpu] (Linux) or mlx (macOS)"
_LLAMA_CPP = "llama-cpp-python==0.3.36 (make compiles it)"
# Modules import lazily: a reader without TVM can still run the MLX backend. LiteRT's engine
# is ai_edge_litert; litert_torch converts a checkpoint into its file.
REGISTRY = {
    "hf": Entry("llmbook.backends.hf", "HFBackend", "torch and transformers",
                ("torch", "transformers"), "tab:gray"),
    "torch-fused": Entry("llmbook.backends.fused", "TorchFusedBackend", "torch and transformers",
                         ("torch", "transformers"), "tab:orange"),
    "mlx": Entry("llmbook.backends.mlx", "MLXBackend", _MLX, ("mlx",), "tab:purple"),
    "mlx-q4": Entry("llmbook.backends.mlx", "MLXQ4Backend", _MLX, ("mlx",), "tab:pink"),
    "tvm": Entry("llmbook.backends.tvm", "TVMBackend", _TVM, ("tvm",), "tab:blue"),
    "tvm-q4": Entry("llmbook.backends.tvm", "TVMBackend", _TVM, ("tvm",), "tab:cyan",
                    options={"bits": 4}),
    "tflite": Entry("llmbook.backends.tflite", "TFLiteBackend", _LITERT,
                    ("ai_edge_litert", "litert_torch"), "tab:green"),
    "tflite-int8": Entry("llmbook.backends.tflite", "TFLiteInt8Backend", _LITERT,
                         ("ai_edge_litert", "litert_torch"), "tab:olive"),
    "tflite-int4": Entry("llmbook.backends.tflite", "TFLiteInt4Backend", _LITERT,
                         ("ai_edge_litert", "litert_torch"), "tab:brown"),
    "llama.cpp": Entry("llmbook.backends.llama_cpp", "LlamaCppBackend", _LLAMA_CPP, ("llama_cpp",),
                       "tab:red"),
    # the same file requantized by llama.cpp to Q4_0, which its repacked x86 kernels cover
    "llama.cpp-q4_0": Entry("llmbook.backends.llama_cpp", "LlamaCppBackend", _LLAMA_CPP,
                            ("llama_cpp",), "xkcd:dark red", options={"requantize": "Q4_0"}),
    "torch-tp": Entry("llmbook.backends.torch_tp", "TorchTPBackend", "torch", ("torch",), "xkcd:teal"),
}


class StepBackend(BackendBase):
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

    # an engine that can score several new tokens in one call and take tokens back out of its
    # cache (chapter 12) defines both: `_verify(ids)` -> logits [len(ids), vocab], and
    # `_rollback(n)`; the counting and the checks are here, once
    _verify = _rollback = None

    def verify(self, ids):
        if self._verify is None:
            return super().verify(ids)  # BackendUnavailable, with its reason
        ids = check_tokens(ids, self.vocab_size, self.length, self.max_context, self.name)
        logits = self._verify(ids)
        self.length += len(ids)
        return logits

    def rollback(self, n: int) -> None:
        if self._rollback is None:
            return super().rollback(n)
        if not 0 <= n <= self.length:
            raise ValueError(f"{self.name}: cannot take {n} of {self.length} tokens back")
        if n:
            self._rollback(n)
            self.length -= n


class RunnerBackend(BackendBase):
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
    the weights it computes with, which it multiplies in fp32: exactly."""

    _rounded = None
    exact = True

    @functools.cached_property
    def own_weights(self) -> dict | None:
        """The fp32 weights it computes with, under Hugging Face names, when it rounded them
        itself (None for a GGUF's blocks, which are the reference's weights): dequantized on
        first use, by `compare` and the tests, not at every start."""
        from ..quant import dequantize_all

        return None if self._rounded is None else dequantize_all(self._rounded)


def step_weight_bytes(held: int, table: int, vocab_size: int, tied: bool) -> int:
    """Bytes of weights one decode step reads, from the bytes an engine holds (`held`, a tied
    table once) and those of its embedding table (`table`): a step looks up one row of the
    table, and reads all of it only when it is tied, as the output head."""
    return held - (0 if tied else table) + table // vocab_size


def names() -> list[str]:
    return list(REGISTRY)


def entry(name: str) -> Entry:
    """The registry's entry for `name` (ValueError for a name it does not hold)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def color(name: str) -> str:
    """The engine's colour in every figure."""
    return entry(name).color


def missing(name: str) -> list[str]:
    """The packages the engine imports that are not installed here (found, not imported)."""
    return [p for p in entry(name).imports if importlib.util.find_spec(p) is None]


def check_installed(name: str) -> Entry:
    """The entry of `name` once its packages are known to be installed, before any is imported
    (BackendUnavailable names what to install). litert_torch, say, is imported only by the
    subprocess that converts a checkpoint: without this check a missing one would fail there,
    minutes later."""
    e = entry(name)
    if absent := missing(name):
        raise BackendUnavailable(f"backend {name!r} needs {e.needs}; not installed here: "
                                 f"{', '.join(absent)}")
    return e


def backend_class(name: str) -> type:
    """The class behind a registered name, imported (BackendUnavailable when its engine is not
    installed)."""
    e = check_installed(name)
    try:
        mod = importlib.import_module(e.module)
    except ImportError as err:
        # a package under the engine that is missing, or not the version it needs, makes the
        # engine unavailable here; an import that fails inside the book's own code is a bug
        if (err.name or "").split(".")[0] == __name__.split(".")[0]:
            raise
        raise BackendUnavailable(f"backend {name!r} needs {e.needs}: {err}") from err
    return getattr(mod, e.cls)


def get_backend(name: str, bundle: Bundle, **options):
    """The engine `name` on `bundle`, built with its entry's options and then `options`."""
    return backend_class(name)(bundle, **(entry(name).options | options))
