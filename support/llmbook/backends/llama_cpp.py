"""llama.cpp (through llama-cpp-python) on the model's GGUF file: the engine most people run on a
CPU, as a yardstick. `make` compiles it (PyPI ships only its source); where that fails, the backend
is unavailable and says why.

It runs the GGUF's own quantized weights (SmolLM2: Q4_1), with activations quantized to 8 bits for
the dot products, so its logits are close to, not equal to, the fp32 reference's."""
from __future__ import annotations

import numpy as np
from llama_cpp import Llama, llama_get_logits_ith, llama_model_size  # not installed: get_backend reports it unavailable

from . import BackendBase, BackendUnavailable
from ..engine import check_tokens


class LlamaCppBackend(BackendBase):
    name = "llama.cpp"
    quantized = True  # the GGUF's 4-bit weights

    def __init__(self, bundle, n_ctx: int = 2048, threads: int | None = None):
        from ..device import threads as default_threads

        if bundle.gguf is None:
            raise BackendUnavailable(f"llama.cpp backend: {bundle.name!r} was not loaded from a GGUF file")
        self.path = bundle.gguf
        self.max_context = min(n_ctx, bundle.config.max_position_embeddings)
        n = threads or default_threads()
        self.llm = Llama(model_path=str(self.path), n_ctx=self.max_context, n_threads=n, n_threads_batch=n,
                         n_batch=512, logits_all=False, verbose=False)
        # llama.cpp's own count: the bytes of the GGUF's tensors as stored, its blocks and scales
        # (not the file's header and vocabulary); the tied table counted once, as the head
        self.weight_bytes = llama_model_size(self.llm.model)
        self.vocab_size = bundle.config.vocab_size

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
