"""The book's TVM-compiled model (chapter 6) behind the backend interface.

The compiled library is cached on disk (llmbook.tvm_llama.build), so only the first use of a
model on a target pays the build (seconds on a CPU).
"""
from __future__ import annotations

from . import BackendUnavailable, RoundedWeights, RunnerBackend
from ..device import gpu_name


def target_and_device(device: str):
    """(TVM target, TVM device) for "cpu" or "cuda"."""
    import tvm

    from ..device import threads
    from ..tvm_llama import pipeline

    if device == "cpu":
        return pipeline.cpu_target(threads=threads()), tvm.cpu()
    if device == "cuda":
        if gpu_name() is None or not tvm.cuda(0).exist:
            raise BackendUnavailable("TVM backend: device 'cuda' requested but no CUDA GPU is visible")
        return pipeline.cuda_target(), tvm.cuda(0)
    raise ValueError(f"TVM backend: device must be 'cpu' or 'cuda', got {device!r}")


class TVMBackend(RunnerBackend):
    """On a CPU, the book's fastest fp32 TVM model: chapter 6's model with its matrices tiled
    (section 6), chapter 9's attention kernels and chapter 10's batched decode: one
    library for one sequence and for many. On CUDA, chapter 6's model under dlight's GPU rules.

    `model_cls` builds another of chapter 6's fp32 models instead (the fused one of section 1,
    the unfused one, the tiled one, or a reader's subclass of them); its weights are laid out
    the way that class takes them."""

    name = "tvm"

    def __init__(self, bundle, device: str = "cpu", max_context: int = 2048, cache: bool = True,
                 root=None, progress: bool = False, model_cls=None):
        import tempfile

        import tvm

        from ..tvm_llama import build
        from ..tvm_llama.batch import BatchLlamaForCausalLM
        from ..tvm_llama.convert import hf_to_tvm, to_device
        from ..tvm_llama.model import LlamaForCausalLM
        from ..tvm_llama.q4 import Q4LlamaForCausalLM
        from ..tvm_llama.runner import TVMRunner
        from ..tvm_llama.tiled import TiledLlamaForCausalLM, to_device_tiled
        from ..tvm_llama.unfused import UnfusedLlamaForCausalLM

        target, dev = target_and_device(device)
        cfg = bundle.config
        self.device, self.target = device, target
        if model_cls is None:
            model_cls = BatchLlamaForCausalLM if device == "cpu" else LlamaForCausalLM
        # the weights' layout, by the classes it derives from; by name, so that a class
        # written (or edited) in a chapter's cell counts as the package's class it copies
        kinds = {c.__name__ for c in model_cls.__mro__}
        if Q4LlamaForCausalLM.__name__ in kinds or LlamaForCausalLM.__name__ not in kinds:
            raise ValueError(f"TVM backend: {model_cls.__name__} is not one of chapter 6's fp32 "
                             f"models (the 4-bit one is the tvm-q4 backend)")
        self.module, names, self.build_info = build.load_or_build(
            bundle.name, cfg, target, root=root if cache else tempfile.mkdtemp(prefix="llmbook-tvm-"),
            model_cls=model_cls)
        self.param_names = names  # the order the compiled functions take the weights in
        if UnfusedLlamaForCausalLM.__name__ in kinds:  # the checkpoint's own matrices
            params = [tvm.runtime.tensor(bundle.state_dict[n].numpy(), dev) for n in names]
        else:
            weights = hf_to_tvm(bundle.state_dict, cfg, progress=progress)
            tiled = TiledLlamaForCausalLM.__name__ in kinds
            params = (to_device_tiled if tiled else to_device)(weights, names, cfg, dev)
        self.max_context = min(max_context, cfg.max_position_embeddings)
        self.runner = TVMRunner(self.module, params, dev, cfg.vocab_size, self.max_context, name=self.name)

    def batch_runner(self, max_batch: int, max_tokens: int):
        """Chapter 10's runner on the same library and weights: many sequences in one paged
        cache, decoded together."""
        from ..tvm_llama.batch import BatchRunner

        if self.device != "cpu":
            raise BackendUnavailable(f"TVM backend: the batched model's kernels are CPU loops; "
                                     f"there is no {self.device!r} batch")
        return BatchRunner(self.module, self.runner.params, self.runner.dev, self.runner.vocab_size,
                           max_batch, max_tokens, self.max_context, name=self.name)


class TVMQ4Backend(RoundedWeights, RunnerBackend):
    """Chapter 9's 4-bit model: a GGUF's own Q4_1 and Q8_0 blocks (SmolLM2, or any `--model
    file.gguf`), or a Hugging Face checkpoint's fp32 weights rounded to nearest into the same
    blocks (`source` says which). Its decode kernels are written for CPUs."""

    name = "tvm-q4"
    quantized = True

    def __init__(self, bundle, device: str = "cpu", max_context: int = 2048, cache: bool = True,
                 root=None):
        import tempfile

        import tvm

        from ..checkpoint import require_shapes
        from ..quant import four_bit
        from ..tvm_llama import build
        from ..tvm_llama.q4 import Q4LlamaForCausalLM, to_tvm_q4
        from ..tvm_llama.runner import TVMRunner

        if device != "cpu":
            raise BackendUnavailable(f"tvm-q4 backend: its kernels are CPU loops (threads and 16-lane "
                                     f"vectors); there is no {device!r} schedule")
        target, dev = target_and_device(device)
        cfg = bundle.config
        weights, self.source = four_bit(bundle)  # before the build: a bad GGUF fails fast
        # a GGUF's blocks dequantized *are* the fp32 reference; rounded weights are not, and are
        # kept (as blocks) for own_weights
        self._rounded = None if bundle.gguf is not None else weights
        params = to_tvm_q4(weights, cfg)
        self.device, self.target = device, target
        self.module, names, self.build_info = build.load_or_build(
            bundle.name, cfg, target, root=root if cache else tempfile.mkdtemp(prefix="llmbook-tvm-"),
            model_cls=Q4LlamaForCausalLM)
        want = {n: tuple(p.shape) for n, p in Q4LlamaForCausalLM(cfg, target).named_parameters()}
        require_shapes({n: a.shape for n, a in params.items()}, want)
        self.weight_bytes = sum(params[n].nbytes for n in names)  # what one decode step reads
        self.max_context = min(max_context, cfg.max_position_embeddings)
        self.runner = TVMRunner(self.module, [tvm.runtime.tensor(params[n], dev) for n in names], dev,
                                cfg.vocab_size, self.max_context, name=self.name)
