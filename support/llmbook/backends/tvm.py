"""The book's TVM-compiled models (chapters 6, 9 and 10) behind the backend interface.

One backend class builds any of them: the model class says how its weights are laid out
(`weights_from`), so the backend knows no class by name. `tvm` and `tvm-q4` are two registry
lines over it. The compiled library is cached on disk (llmbook.tvm_llama.build), so only the
first use of a model on a target pays the build.
"""
from __future__ import annotations

import tempfile

# at import, so that a machine without TVM gets BackendUnavailable from the registry
import tvm
from tvm.relax.frontend import nn

from . import BackendUnavailable, RoundedWeights, RunnerBackend, step_weight_bytes
from ..checkpoint import require_shapes
from ..device import gpu_name, threads
from ..tvm_llama import build, pipeline
from ..tvm_llama.batch import BatchLlamaForCausalLM, BatchQ4LlamaForCausalLM
from ..tvm_llama.model import LlamaForCausalLM
from ..tvm_llama.runner import TVMRunner


def target_and_device(device: str, fast_math: bool = True):
    """(TVM target, TVM device) for "cpu" or "cuda"."""
    if device == "cpu":
        return pipeline.cpu_target(fast_math=fast_math, threads=threads()), tvm.cpu()
    if device == "cuda":
        if gpu_name() is None or not tvm.cuda(0).exist:
            raise BackendUnavailable("TVM backend: device 'cuda' requested but no CUDA GPU is visible")
        return pipeline.cuda_target(), tvm.cuda(0)
    raise ValueError(f"TVM backend: device must be 'cpu' or 'cuda', got {device!r}")


def default_model(device: str, bits: int) -> type:
    """The book's fastest model for the device: on a CPU chapter 6's tiled model with chapter
    9's attention kernels and chapter 10's batched decode, in fp32 or in the GGUF's 4 bits; on
    CUDA chapter 6's model under dlight's GPU rules (fp32 only)."""
    if bits not in (32, 4):
        raise ValueError(f"TVM backend: bits must be 32 or 4, got {bits}")
    if device == "cpu":
        return BatchLlamaForCausalLM if bits == 32 else BatchQ4LlamaForCausalLM
    if bits == 4:
        raise BackendUnavailable(f"tvm-q4 backend: its kernels are CPU loops (threads and 16-lane "
                                 f"vectors); there is no {device!r} schedule")
    return LlamaForCausalLM


class TVMBackend(RoundedWeights, RunnerBackend):
    """One of the book's TVM models, compiled for `device`, its weights laid out as the model
    class takes them.

    model_cls  any TVM model of chapters 6, 9 and 10, or a reader's subclass of one (default:
               the fastest for the device and `bits`)
    bits       32 (fp32) or 4 (a GGUF's own Q4_1 and Q8_0 blocks, or a Hugging Face checkpoint's
               weights rounded to them); chooses the default model
    schedule   False leaves the naive loops (chapter 6, section 5)
    fast_math  False keeps LLVM's strict floating point (chapter 6, section 5)
    """

    def __init__(self, bundle, device: str = "cpu", max_context: int = 2048, cache: bool = True,
                 root=None, model_cls: type | None = None, bits: int = 32, schedule: bool = True,
                 fast_math: bool = True, name: str | None = None):
        model_cls = model_cls or default_model(device, bits)
        # by what it does, not by its class: a chapter's cell defines its own copy of the
        # package's classes
        if not (isinstance(model_cls, type) and issubclass(model_cls, nn.Module)
                and callable(getattr(model_cls, "weights_from", None))):
            raise ValueError(f"TVM backend: {getattr(model_cls, '__name__', model_cls)} is not a "
                             f"TVM model (an nn.Module with weights_from, as chapter 6's "
                             f"LlamaForCausalLM)")
        target, dev = target_and_device(device, fast_math)
        cfg = bundle.config
        model = model_cls(cfg, target)
        self.name = name or ("tvm-q4" if model.quantized else "tvm")
        self.quantized, self.device, self.target = model.quantized, device, target
        # the weights before the build: a bad checkpoint or GGUF fails fast
        params = model.weights_from(bundle)
        self.source, self._rounded = model.source, model.rounded
        want = {n: tuple(p.shape) for n, p in model.named_parameters()}
        require_shapes({n: params[n].shape for n in want.keys() & params.keys()}, want)
        self.module, names, self.build_info = build.load_or_build(
            bundle.name, cfg, target, schedule=schedule,
            root=root if cache else tempfile.mkdtemp(prefix="llmbook-tvm-"), model_cls=model_cls)
        self.param_names = names  # the order the compiled functions take the weights in
        table = sum(params[n].nbytes for n in names if n.startswith("model.embed_tokens."))
        self.weight_bytes = step_weight_bytes(sum(params[n].nbytes for n in names), table,
                                              cfg.vocab_size, cfg.tie_word_embeddings)
        self.max_context = min(max_context, cfg.max_position_embeddings)
        self.runner = TVMRunner(self.module, [tvm.runtime.tensor(params[n], dev) for n in names],
                                dev, cfg.vocab_size, self.max_context, name=self.name)

    def verify(self, ids):
        """Several new tokens of the sequence in one call, and every one's logits
        (chapter 12): chapter 10's batched decode, told they are one sequence's."""
        if not self.runner.batched:
            return super().verify(ids)  # BackendUnavailable, with its reason
        return self.runner.verify({0: ids})[0]  # sequence 0: the Backend interface's

    def rollback(self, n: int) -> None:
        self.runner.popn(0, n)

    def batch_runner(self, max_batch: int, max_tokens: int) -> TVMRunner:
        """Many sequences in one paged cache, decoded together (chapter 10), on the same
        library and weights."""
        if not self.runner.batched:
            raise BackendUnavailable(f"{self.name}: this model has no batched decode (chapter "
                                     f"10's models have; this one runs one sequence at a time)")
        r = self.runner
        return TVMRunner(self.module, r.params, r.dev, r.vocab_size, self.max_context,
                         max_batch=max_batch, max_tokens=max_tokens, name=self.name)
