# Generated from notebooks/10_batching.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

"""Many sequences through one compiled model: chapter 6's tiled model with chapter 9's
attention kernels and a batched decode, and a runner that adds, forks, steps and removes
sequences in TVM's paged KV cache. Written in notebooks/10_batching.ipynb."""

import math

import numpy as np
import tvm
from tvm import relax
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache
from tvm.runtime import ShapeTuple

from llmbook.engine import check_tokens
from llmbook.tvm_llama.attention import with_attention_kernels
from llmbook.tvm_llama.tiled import TiledLlamaForCausalLM

PAGE_SIZE = 16  # tokens a page holds: TVM's CPU attention kernels need 16


class BatchLlamaForCausalLM(TiledLlamaForCausalLM):
    """Chapter 6's tiled model with chapter 9's attention kernels and one more
    function: `batch_decode`, one new token for each of `batch_size`
    sequences, whatever their lengths, in one call."""

    def batch_decode(self, input_ids: Tensor, cache: PagedKVCache):
        rows = self.model.embed_tokens.lookup(input_ids)
        x = op.reshape(rows, [input_ids.shape[0], 1, self.cfg.hidden_size])
        return self.logits(self.model(x, cache)), cache

    def export_tvm(self, spec, **kwargs):
        mod, *rest = super().export_tvm(spec, **kwargs)
        return (with_attention_kernels(mod, self.cfg), *rest)

    def functions(self) -> dict:
        packed = {"param_mode": "packed", "effect_mode": "none"}
        cache = nn.spec.Object(object_type=PagedKVCache)
        ids = nn.spec.Tensor(["batch_size"], "int32")
        batch_decode = {"input_ids": ids, "cache": cache, "$": packed}
        return super().functions() | {"batch_decode": batch_decode}


class CacheFull(ValueError):
    """The sequences asked for need more pages than the cache has free."""


class BatchRunner:
    """Sequences in one paged KV cache. `add` prefills a prompt, `fork` starts a
    sequence that shares another's tokens (and its full pages), `step` gives one
    new token to each of several sequences in one call, `remove` gives a
    sequence's pages back."""

    def __init__(self, module, params: list, dev, vocab_size: int,
                 max_batch: int = 32, max_tokens: int = 8192,
                 max_context: int = 2048, name: str = "tvm"):
        # max_tokens: all sequences together; max_context: one prefill call
        self.vm = relax.VirtualMachine(module, dev)
        self.params, self.dev, self.name = params, dev, name
        self.vocab_size, self.max_batch = vocab_size, max_batch
        self.max_context, self.page_size = max_context, PAGE_SIZE
        self._embed = self.vm["embed"]
        self._prefill = self.vm["prefill"]
        self._batch_decode = self.vm["batch_decode"]
        kv = ("add_sequence", "remove_sequence", "fork_sequence",
              "begin_forward", "end_forward")
        self.kv = {n: tvm.get_global_func("vm.builtin.kv_state_" + n)
                   for n in kv}
        self._available = tvm.get_global_func(
            "vm.builtin.attention_kv_cache_get_num_available_pages")
        sizes = (max_batch, max_tokens, max_context, PAGE_SIZE)
        self.cache = self.vm["create_tir_paged_kv_cache"](
            *(ShapeTuple([n]) for n in sizes))
        self.total_pages = self.free_pages()
        self.lengths: dict[int, int] = {}  # sequence id -> tokens in the cache

    def free_pages(self) -> int:
        return int(self._available(self.cache))

    def _need(self, pages: int):
        if pages > (free := self.free_pages()):
            raise CacheFull(f"{self.name}: the KV cache has {free} free pages "
                            f"of {PAGE_SIZE} tokens, and this needs {pages}")

    def _run(self, fn, x, new_tokens: dict[int, int]) -> np.ndarray:
        # the rows of x follow the order of the ids given to begin_forward:
        # nothing in TVM checks it
        self.kv["begin_forward"](self.cache, ShapeTuple(list(new_tokens)),
                                 ShapeTuple(list(new_tokens.values())))
        logits, _ = fn(x, self.cache, self.params)
        self.kv["end_forward"](self.cache)
        for seq, n in new_tokens.items():
            self.lengths[seq] += n
        return logits.numpy()

    def add(self, seq: int, ids: list[int]) -> np.ndarray:
        """A new sequence: prefill its prompt; the last position's logits."""
        if seq in self.lengths:
            raise ValueError(f"{self.name}: sequence {seq} is already cached")
        if len(self.lengths) >= self.max_batch:
            raise CacheFull(f"{self.name}: the cache holds at most "
                            f"{self.max_batch} sequences")
        ids = check_tokens(ids, self.vocab_size, 0, self.max_context, self.name)
        self._need(math.ceil(len(ids) / PAGE_SIZE))
        self.kv["add_sequence"](self.cache, seq)
        self.lengths[seq] = 0
        tokens = tvm.runtime.tensor(np.asarray([ids], dtype=np.int32), self.dev)
        x = self._embed(tokens, self.params)
        return self._run(self._prefill, x, {seq: len(ids)})[0, -1]

    def fork(self, parent: int, child: int):
        """`child` continues from all of `parent`'s tokens, sharing pages."""
        if parent not in self.lengths or child in self.lengths:
            raise ValueError(f"{self.name}: cannot fork {parent} into {child}")
        self.kv["fork_sequence"](self.cache, parent, child, -1)  # -1: all of it
        self.lengths[child] = self.lengths[parent]

    def step(self, tokens: dict[int, int]) -> dict[int, np.ndarray]:
        """One decode step for several sequences at once:
        {sequence: its next token} -> {sequence: logits}."""
        for seq, token in tokens.items():
            if seq not in self.lengths:
                raise ValueError(f"{self.name}: no sequence {seq} in the cache")
            check_tokens([token], self.vocab_size, self.lengths[seq],
                         self.max_context, self.name)
        # a sequence whose last page is full needs a fresh one
        self._need(sum(self.lengths[s] % PAGE_SIZE == 0 for s in tokens))
        ids = np.asarray(list(tokens.values()), dtype=np.int32)
        x = tvm.runtime.tensor(ids, self.dev)
        logits = self._run(self._batch_decode, x, {seq: 1 for seq in tokens})
        return {seq: logits[i, -1] for i, seq in enumerate(tokens)}

    def remove(self, seq: int):
        self.kv["remove_sequence"](self.cache, seq)
        del self.lengths[seq]
