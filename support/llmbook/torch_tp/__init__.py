"""Tensor parallelism on torch.distributed (chapter 13): one model split over several
processes, the same code on CPUs (gloo) and CUDA GPUs (NCCL).

shard.py    the Megatron split of a checkpoint for rank r of n; the check that heads divide
model.py    one rank's forward: its heads and KV cache, two all-reduces a layer, the
            vocabulary-split head with an all-gather
group.py    the ranks as processes: rank 0 drives through broadcasts, spawned with
            torch.multiprocessing; workers exit with the engine
library.py  the same split with PyTorch's own API (DeviceMesh, parallelize_module)
run.py      what each rank runs under torchrun (the entry: python -m llmbook.torch_tp)
"""
