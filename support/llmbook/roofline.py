"""The decode roofline: a decode step must read every weight (and the KV cache so far) once, so
tokens/s can be at most (memory read bandwidth) / (bytes read per token)."""
from __future__ import annotations

import time

from .checkpoint import LlamaConfig


def read_bandwidth_gbs(megabytes: int = 1024, repeats: int = 7, threads: int | None = None) -> float:
    """Measured memory read bandwidth in GB/s: the fastest of `repeats` torch sums over a buffer
    much larger than any cache, with the thread count the engines use (device.use_threads).

    The fastest, as STREAM reports: other work on a shared machine only slows a run down (a
    neighbour's memory traffic took the median from 46 to 32 GB/s on the machine that wrote the
    book), and a roofline is the limit, so the least disturbed run is the nearest to it."""
    import torch

    from .device import threads as default_threads

    if megabytes < 512:
        raise ValueError("use a buffer of at least 512 MB, so caches do not inflate the figure")
    old = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads())
    try:
        x = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
        x.sum()  # warm-up: pages touched, threads started
        rates = []
        for _ in range(repeats):
            t = time.perf_counter()
            x.sum()
            rates.append(x.numel() * 4 / (time.perf_counter() - t) / 1e9)
    finally:
        torch.set_num_threads(old)
    return max(rates)


def weight_bytes_per_token(cfg: LlamaConfig, dtype_bytes: int = 4) -> int:
    """Weights read by one decode step: every layer, the final norm, the output head (with tied
    embeddings the table is read once, as the head) and one embedding row."""
    h, d, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layer = h * (d + 2 * kv) + d * h + 3 * h * cfg.intermediate_size + 2 * h
    n = cfg.num_layers * layer + h + cfg.vocab_size * h + h
    return n * dtype_bytes


def kv_bytes_per_token(cfg: LlamaConfig, context: int, dtype_bytes: int = 4) -> int:
    """KV cache read by one decode step at position `context`: keys and values of every layer."""
    return context * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * dtype_bytes


def decode_bytes_per_token(cfg: LlamaConfig, dtype_bytes: int = 4, context: int = 0) -> int:
    return weight_bytes_per_token(cfg, dtype_bytes) + kv_bytes_per_token(cfg, context, dtype_bytes)


def decode_roofline(cfg: LlamaConfig, bandwidth_gbs: float, dtype_bytes: int = 4, context: int = 0) -> float:
    """Most decode tokens per second the memory bandwidth allows."""
    return bandwidth_gbs * 1e9 / decode_bytes_per_token(cfg, dtype_bytes, context)


def matmul_gflops(n: int = 1024, repeats: int = 5, threads: int | None = None) -> float:
    """Measured fp32 matrix-multiply throughput in GFLOP/s (torch, n x n x n, the fastest of
    `repeats`, as for the bandwidth): the compute roof that prefill, unlike decode, can approach."""
    import torch

    from .device import threads as default_threads

    old = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads())
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b  # warm-up
        rates = []
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            rates.append(2 * n**3 / (time.perf_counter() - t) / 1e9)
    finally:
        torch.set_num_threads(old)
    return max(rates)


def flops_per_token(cfg: LlamaConfig, context: int = 0) -> int:
    """Floating-point operations for one token at position `context`: two per weight of every
    matrix (the tied head counted once as the head, the embedding lookup as none), plus attention's
    q·k and p·v over the context."""
    h, d, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    matrix = cfg.num_layers * (h * (d + 2 * kv) + d * h + 3 * h * cfg.intermediate_size) + cfg.vocab_size * h
    return 2 * matrix + cfg.num_layers * 4 * context * d
