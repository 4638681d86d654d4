"""llama.cpp (through llama-cpp-python) on the model's GGUF file: the engine most people run on a
CPU, as a yardstick. Optional: the book does not install it (it compiles llama.cpp on install).

It runs the GGUF's own quantized weights (SmolLM2: Q4_1), with activations quantized to 8 bits for
the dot products, so its logits are close to, not equal to, the fp32 reference's."""
from __future__ import annotations

import numpy as np
from llama_cpp import Llama, llama_get_logits_ith  # not installed: get_backend reports it unavailable

from . import BackendUnavailable
from ..generation import ContextError


class LlamaCppBackend:
    name = "llama.cpp"

    def __init__(self, bundle, n_ctx: int = 2048, threads: int | None = None):
        from ..checkpoint import smollm2_gguf
        from ..device import threads as default_threads

        if bundle.name != "SmolLM2-135M-Instruct":
            raise BackendUnavailable(f"llama.cpp backend: no GGUF file known for {bundle.name!r}")
        self.path = smollm2_gguf()
        self.max_context = min(n_ctx, bundle.config.max_position_embeddings)
        n = threads or default_threads()
        self.llm = Llama(model_path=str(self.path), n_ctx=self.max_context, n_threads=n, n_threads_batch=n,
                         n_batch=512, logits_all=False, verbose=False)
        self.vocab_size = bundle.config.vocab_size

    def reset(self):
        self.llm.reset()

    def _eval(self, ids: list[int]) -> np.ndarray:
        if not ids:
            raise ValueError("no token ids")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise ValueError(f"token id out of range [0, {self.vocab_size})")
        if self.llm.n_tokens + len(ids) > self.max_context:
            raise ContextError(f"{self.llm.n_tokens} + {len(ids)} tokens exceed the context of {self.max_context}")
        self.llm.eval(ids)
        # without logits_all, llama-cpp-python keeps no scores: read the last position's logits
        # from the context (valid until the next eval, hence the copy)
        last = llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(last, shape=(self.vocab_size,)).astype(np.float32)

    def prefill(self, ids):
        self.reset()
        return self._eval([int(t) for t in ids])

    def decode(self, token):
        return self._eval([int(token)])
