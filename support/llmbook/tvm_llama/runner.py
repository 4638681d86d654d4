# Generated from notebooks/06_tvm.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

"""One sequence through the compiled model: the paged KV cache's life cycle around embed
/ prefill / decode. Written in notebooks/06_tvm.ipynb."""

import numpy as np
import tvm
from tvm import relax
from tvm.runtime import ShapeTuple

from llmbook.engine import check_tokens


class TVMRunner:
    def __init__(
        self,
        module,
        params: list,
        dev,
        vocab_size: int,
        max_context: int = 2048,
        page_size: int = 16,
        name: str = "tvm",
    ):
        self.name = name  # what its errors call it
        self.vm = relax.VirtualMachine(module, dev)
        self.params, self.dev, self.vocab_size, self.max_context = (
            params,
            dev,
            vocab_size,
            max_context,
        )
        self._embed, self._prefill, self._decode = (
            self.vm["embed"],
            self.vm["prefill"],
            self.vm["decode"],
        )
        self.kv = {
            name: tvm.get_global_func(f"vm.builtin.kv_state_{name}")
            for name in (
                "add_sequence",
                "remove_sequence",
                "begin_forward",
                "end_forward",
            )
        }
        # one sequence; the whole context may be prefilled in one chunk
        self.cache = self.vm["create_tir_paged_kv_cache"](
            ShapeTuple([1]),
            ShapeTuple([max_context]),
            ShapeTuple([max_context]),
            ShapeTuple([page_size]),
        )
        self.length = None
        self.reset()

    def reset(self):
        if self.length is not None:
            self.kv["remove_sequence"](self.cache, 0)
        self.kv["add_sequence"](self.cache, 0)
        self.length = 0

    def _forward(self, fn, ids: list[int]) -> np.ndarray:
        # checked first: `embed` would clip an id past the vocabulary to its
        # last row, silently
        ids = check_tokens(
            ids, self.vocab_size, self.length, self.max_context, self.name
        )
        x = self._embed(
            tvm.runtime.tensor(np.asarray([ids], dtype=np.int32), self.dev), self.params
        )
        self.kv["begin_forward"](self.cache, ShapeTuple([0]), ShapeTuple([len(ids)]))
        logits, _ = fn(x, self.cache, self.params)
        self.kv["end_forward"](self.cache)
        self.length += len(ids)
        return logits.numpy()[0, -1]

    def prefill(self, ids) -> np.ndarray:
        """Forget the sequence, run the prompt, return the last position's logits."""
        # before forgetting
        check_tokens(ids, self.vocab_size, 0, self.max_context, self.name)
        self.reset()
        return self._forward(self._prefill, ids)

    def decode(self, token) -> np.ndarray:
        return self._forward(self._decode, [token])
