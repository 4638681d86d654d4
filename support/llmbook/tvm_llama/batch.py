# Generated from notebooks/10_batching.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

"""Many sequences through one compiled model: a batched decode for chapter 6's tiled
model and for chapter 9's 4-bit one, both with chapter 9's attention kernels.
Chapter 6's runner drives them. Written in notebooks/10_batching.ipynb."""

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

from llmbook.tvm_llama.attention import AttentionKernels
from llmbook.tvm_llama.q4 import Q4LlamaForCausalLM
from llmbook.tvm_llama.tiled import TiledLlamaForCausalLM


class BatchDecode:
    """Two more functions for a TVM model. `batch_decode`: one new token for each
    of `batch_size` sequences, whatever their lengths, in one call; its matrix
    products see `[batch_size, 1, hidden]`, one token per sequence.
    `batch_prefill`: several sequences' new tokens, one after another in `x`, in
    one call (the weights are read once for all of them), and the logits of the
    positions `last`, each sequence's last token."""

    def batch_decode(self, input_ids: Tensor, cache: PagedKVCache):
        rows = self.model.embed_tokens.lookup(input_ids)
        x = op.reshape(rows, [input_ids.shape[0], 1, self.cfg.hidden_size])
        return self.logits(self.model(x, cache)), cache

    def batch_prefill(self, x: Tensor, last: Tensor, cache: PagedKVCache):
        h = op.take(self.model(x, cache), last, axis=1)  # [1, batch_size, hidden]
        # one row per sequence, as batch_decode's: the head's product for a few
        # tokens, not a dequantized copy of the whole table
        h = op.reshape(h, [last.shape[0], 1, self.cfg.hidden_size])
        return self.logits(h), cache

    def functions(self) -> dict:
        packed = {"param_mode": "packed", "effect_mode": "none"}
        cache = nn.spec.Object(object_type=PagedKVCache)
        ids = nn.spec.Tensor(["batch_size"], "int32")
        batch_decode = {"input_ids": ids, "cache": cache, "$": packed}
        batch_prefill = {
            "x": nn.spec.Tensor([1, "seq_len", self.cfg.hidden_size], "float32"),
            "last": ids, "cache": cache, "$": packed}
        return super().functions() | {"batch_decode": batch_decode,
                                      "batch_prefill": batch_prefill}


class BatchLlamaForCausalLM(BatchDecode, AttentionKernels, TiledLlamaForCausalLM):
    """The `tvm` engine on a CPU: chapter 6's tiled fp32 model, chapter 9's
    attention kernels, and a batched decode."""


class BatchQ4LlamaForCausalLM(BatchDecode, Q4LlamaForCausalLM):
    """The `tvm-q4` engine: chapter 9's 4-bit model (its attention kernels
    included) with a batched decode."""
