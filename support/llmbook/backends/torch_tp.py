"""Chapter 13's tensor-parallel engine: the Megatron split of the checkpoint over `tp`
processes on torch.distributed (gloo on the CPU, NCCL on CUDA GPUs), driven by rank 0."""
import os
import sys
import weakref

from .. import device
from ..torch_tp.group import FORWARD, RESET, Group, backend_and_device
from ..torch_tp.shard import check_ranks, default_ranks, heads_text, shard, step_bytes
from . import StepBackend


class TorchTPBackend(StepBackend):
    """`tp` ranks (default: the most that divide the heads and have a core each), each
    with `threads_per_rank` torch threads (default: the engines' thread count shared
    out, at least 1). `weight_bytes` counts all ranks together."""

    name = "torch-tp"

    def __init__(self, bundle, tp: int | None = None, threads_per_rank: int | None = None,
                 max_context: int = 2048):
        cfg = bundle.config
        cores = os.cpu_count() or 1
        self.ranks = default_ranks(cfg, cores) if tp is None else check_ranks(cfg, tp)
        if self.ranks > cores:
            print(f"warning: torch-tp: {self.ranks} ranks on {cores} cores share them; "
                  f"expect it slower than {cores}", file=sys.stderr)
        self.threads_per_rank = threads_per_rank or max(1, device.threads() // self.ranks)
        self.device = backend_and_device(0, self.ranks)[1].type  # "cuda" with NCCL
        self.vocab_size = cfg.vocab_size
        self.max_context = min(max_context, cfg.max_position_embeddings)
        self.heads = heads_text(cfg)
        parts = [shard(bundle.state_dict, cfg, r, self.ranks) for r in range(self.ranks)]
        self.weight_bytes = step_bytes(parts, cfg)
        self.group = Group(parts, cfg, self.max_context, self.threads_per_rank)
        # the ranks stop when this engine is closed, collected or its interpreter exits;
        # the finalizer holds the group, not the engine, or the engine would never be collected
        self._close = weakref.finalize(self, self.group.close)
        self.reset()

    def _reset(self):
        self.group.call(RESET)

    def _forward(self, ids: list[int]):
        return self.group.call(FORWARD, ids)

    def close(self):
        """Stop the ranks now (after this, the engine refuses every call)."""
        self._close()
