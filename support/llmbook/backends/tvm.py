"""The book's TVM-compiled model (chapter 6) behind the backend interface.

The compiled library is cached on disk (llmbook.tvm_llama.build), so only the first use of a
model on a target pays the build (seconds on a CPU).
"""
from __future__ import annotations

from . import BackendUnavailable, RunnerBackend
from ..device import gpu_name


class TVMBackend(RunnerBackend):
    name = "tvm"

    def __init__(self, bundle, device: str = "cpu", max_context: int = 2048, cache: bool = True,
                 root=None, progress: bool = False):
        import tempfile

        import tvm

        from ..device import threads
        from ..tvm_llama import build, pipeline
        from ..tvm_llama.convert import hf_to_tvm, to_device
        from ..tvm_llama.runner import TVMRunner

        if device == "cpu":
            target, dev = pipeline.cpu_target(threads=threads()), tvm.cpu()
        elif device == "cuda":
            if gpu_name() is None or not tvm.cuda(0).exist:
                raise BackendUnavailable("TVM backend: device 'cuda' requested but no CUDA GPU is visible")
            target, dev = pipeline.cuda_target(), tvm.cuda(0)
        else:
            raise ValueError(f"TVM backend: device must be 'cpu' or 'cuda', got {device!r}")
        cfg = bundle.config
        self.device, self.target = device, target
        self.module, names, self.build_info = build.load_or_build(
            bundle.name, cfg, target, root=root if cache else tempfile.mkdtemp(prefix="llmbook-tvm-"))
        params = to_device(hf_to_tvm(bundle.state_dict, cfg, progress=progress), names, cfg, dev)
        self.max_context = min(max_context, cfg.max_position_embeddings)
        self.runner = TVMRunner(self.module, params, dev, cfg.vocab_size, self.max_context, name=self.name)
        self._bundle, self._dev, self._root, self._names = bundle, dev, (root if cache else None), names

    def batch_runner(self, max_batch: int, max_tokens: int):
        """Chapter 9's runner on the same weights: many sequences in one paged cache, decoded
        together. Its library (chapter 6's model plus `batch_decode`) is built once and cached."""
        from ..tvm_llama import build
        from ..tvm_llama.batch import BatchLlamaForCausalLM, BatchRunner
        from ..tvm_llama.convert import hf_to_tvm, to_device

        cfg = self._bundle.config
        module, names, _ = build.load_or_build(self._bundle.name, cfg, self.target, root=self._root,
                                               model_cls=BatchLlamaForCausalLM)
        if names == self._names:  # the same parameters in the same order: share the device copy
            params = self.runner.params
        else:
            params = to_device(hf_to_tvm(self._bundle.state_dict, cfg, progress=False), names, cfg, self._dev)
        return BatchRunner(module, params, self._dev, cfg.vocab_size, max_batch, max_tokens,
                           self.max_context, name=self.name)
