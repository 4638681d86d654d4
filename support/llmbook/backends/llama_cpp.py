"""llama.cpp (through llama-cpp-python) on the model's GGUF file: the engine most people run on a
CPU, as a yardstick. `make` compiles it (PyPI ships only its source); where that fails, the backend
is unavailable and says why.

`llama.cpp` runs the GGUF's own quantized weights (SmolLM2: Q4_1), with activations quantized to
8 bits for the dot products, so its logits are close to, not equal to, the fp32 reference's.

`llama.cpp-q4_0` runs the same file requantized by llama.cpp's own quantizer to Q4_0, the format
its repacked x86 kernels cover (they do not cover Q4_1): llama.cpp at its best on a CPU, on other
weights than the reference's (each Q4_1 block rounded again, to a symmetric one)."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import os
import tempfile
from pathlib import Path

import numpy as np
import llama_cpp  # not installed: get_backend reports it unavailable
from llama_cpp import Llama, llama_get_logits_ith, llama_model_size

from . import BackendBase, BackendUnavailable
from ..checkpoint import CheckpointError, cache_dir, file_key
from ..engine import check_tokens

# the kinds `requantized` makes: llama.cpp's file type for each
REQUANTIZE = {"Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}


def requantized(gguf: Path, kind: str = "Q4_0") -> Path:
    """`gguf` requantized by llama.cpp's quantizer to `kind`, made once and kept in the cache
    (keyed, like the fp32 export, by the source's path, size and time, and by llama.cpp's
    version, whose quantizer may round otherwise)."""
    from ..device import threads

    if kind not in REQUANTIZE:
        raise ValueError(f"cannot requantize to {kind!r}; known kinds: {', '.join(REQUANTIZE)}")
    gguf = Path(gguf)
    if not gguf.is_file():
        raise CheckpointError(f"{gguf} is not a file")
    dest = cache_dir() / f"{gguf.stem}-as-{kind}-{file_key(gguf, kind, llama_cpp.__version__)}.gguf"
    if dest.exists():
        return dest
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = REQUANTIZE[kind]
    params.allow_requantize = True  # the source is quantized already
    params.nthread = threads()
    # The embedding (SmolLM2's tied head) stays Q8_0: llama.cpp would pick Q6_K for a head, whose
    # blocks need rows of 256 weights, and for SmolLM2's 576 falls back to Q8_0 with a warning.
    # Asked for Q8_0, it copies the file's Q8_0 table as it is, a type llmbook.quant reads.
    params.token_embedding_type = params.output_tensor_type = llama_cpp.GGML_TYPE_Q8_0
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name, suffix=".tmp")
    os.close(fd)
    # llama-cpp-python hands llama.cpp's log to Python's sys.stderr: a page per file, kept
    # here, and only its reason shown when the quantizer fails
    log = io.StringIO()
    try:
        with contextlib.redirect_stderr(log):
            failed = llama_cpp.llama_model_quantize(str(gguf).encode(), tmp.encode(), ctypes.byref(params))
        if failed:
            lines = [ln for ln in log.getvalue().splitlines() if ln.strip()]
            reason = next((ln.split("failed to quantize: ", 1)[1] for ln in reversed(lines)
                           if "failed to quantize: " in ln), lines[-1] if lines else "no reason given")
            raise CheckpointError(f"llama.cpp could not requantize {gguf} to {kind}: {reason}")
        if not dest.exists():  # another process may have made it meanwhile: keep that one
            os.replace(tmp, dest)  # atomic: the cache never holds half a file under its name
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


class LlamaCppBackend(BackendBase):
    name = "llama.cpp"
    quantized = True  # the GGUF's 4-bit weights

    def __init__(self, bundle, n_ctx: int = 2048, threads: int | None = None,
                 requantize: str | None = None):
        from ..device import threads as default_threads

        if requantize is not None:
            self.name = f"llama.cpp-{requantize.lower()}"  # the registry's name
        if bundle.gguf is None:
            raise BackendUnavailable(f"{self.name} backend: {bundle.name!r} was not loaded from a GGUF file")
        self.bundle = bundle
        self.path = bundle.gguf if requantize is None else requantized(bundle.gguf, requantize)
        if requantize is not None:
            self.source = f"{bundle.gguf.name} requantized to {requantize} by llama.cpp ({self.path.name})"
        self.max_context = min(n_ctx, bundle.config.max_position_embeddings)
        n = threads or default_threads()
        self.llm = Llama(model_path=str(self.path), n_ctx=self.max_context, n_threads=n, n_threads_batch=n,
                         n_batch=512, logits_all=False, verbose=False)
        # llama.cpp's own count: the bytes of the GGUF's tensors as stored, its blocks and scales
        # (not the file's header and vocabulary); the tied table counted once, as the head
        self.weight_bytes = llama_model_size(self.llm.model)
        self.vocab_size = bundle.config.vocab_size

    @functools.cached_property
    def own_weights(self) -> dict | None:
        """The requantized weights in fp32 under Hugging Face names (None for the file's own,
        which are the reference's): `compare` holds the engine to the reference model on them.
        Read on first use, not at every start."""
        if self.path == self.bundle.gguf:
            return None
        from ..quant import dequantize_all, read_gguf

        return dequantize_all(read_gguf(self.path, self.bundle.config))

    def reset(self):
        self.llm.reset()

    def _eval(self, ids: list[int]) -> np.ndarray:
        self.llm.eval(ids)
        # without logits_all, llama-cpp-python keeps no scores: read the last position's logits
        # from the context (valid until the next eval, hence the copy)
        last = llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(last, shape=(self.vocab_size,)).astype(np.float32)

    def prefill(self, ids):
        ids = check_tokens(ids, self.vocab_size, 0, self.max_context, self.name)
        self.reset()
        return self._eval(ids)

    def decode(self, token):
        return self._eval(check_tokens([token], self.vocab_size, self.llm.n_tokens, self.max_context, self.name))
