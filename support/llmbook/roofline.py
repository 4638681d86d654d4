"""The decode roofline: a decode step must read every weight (and the KV cache so far) once, so
tokens/s can be at most (memory read bandwidth) / (bytes read per token)."""
from __future__ import annotations

import statistics
import time

from .checkpoint import LlamaConfig


MAX_BYTES = 2 * 2**30  # the largest read a probe makes


class ReadProbe:
    """A read that looks like a decode step's: `nbytes` in `buffers` weight-like matrices, each
    multiplied by one vector (BLAS's x @ W, the decode matmul), by the engines' thread count.
    Each call reads every matrix once and returns GB/s; the samples are kept, so that a caller
    can take turns with the engines and report the spread (llmbook.bench does).

    Why these choices, measured on the machines that wrote the book:
    - the same bytes as the engine's step, not a fixed 1 GB: a CPU with a large last-level
      cache (480 MB on one of them) serves a 100 MB 4-bit step at twice the rate of a 540 MB
      fp32 one, so each engine has its own roof;
    - x @ W rather than a sum: a 2-thread torch sum read 25 GB/s where x @ W read 33 and the
      fp32 engines themselves 31, and a roof must not sit below what an engine reaches;
    - several buffers, as a model has several matrices; tests/test_roofline.py checks that
      this costs under 10% against one plain streaming read of the same bytes;
    - at most MAX_BYTES: far past the caches the rate no longer depends on the size, and a
      7B model's fp32 step (28 GB) would need as much memory again;
    - each sample is the better of two reads, by `threads` threads and by one fewer: while
      another process holds a core, every product waits for the thread that shares it, and
      on 2 cores two threads then read 14 GB/s where one read 16 (29 on a quiet machine),
      below what an engine whose small products use one thread reaches; a roof must not
      fall under the engines because a neighbour woke up."""

    def __init__(self, nbytes: int, threads: int | None = None, buffers: int = 8,
                 cols: int = 1024):
        import torch

        from .device import threads as default_threads

        if nbytes < buffers * 64:
            raise ValueError(f"a read probe of {nbytes} bytes is smaller than {buffers} rows "
                             f"of 16 floats")
        self.threads = threads or default_threads()
        nbytes = min(nbytes, MAX_BYTES)
        cols = min(cols, nbytes // (buffers * 4))  # a small model's step: one row a buffer
        rows = nbytes // (buffers * cols * 4)
        # ones, written now: every page is touched before the first timed read
        self.matrices = [torch.ones(rows, cols) for _ in range(buffers)]
        self.vector = torch.ones(rows)
        self.nbytes = buffers * rows * cols * 4
        self.samples: list[float] = []
        self()  # warm-up: the threads started, the kernel chosen
        self.samples.clear()

    def __call__(self) -> float:
        import torch

        old, rates = torch.get_num_threads(), []
        try:
            for n in sorted({self.threads, max(1, self.threads - 1)}, reverse=True):
                torch.set_num_threads(n)
                t = time.perf_counter()
                for w in self.matrices:
                    self.vector @ w
                rates.append(self.nbytes / (time.perf_counter() - t) / 1e9)
        finally:
            torch.set_num_threads(old)
        self.samples.append(max(rates))
        return self.samples[-1]

    def summary(self) -> dict:
        """GB/s: the best sample (the roof: other work only slows a read), the median, the
        slowest, and the spread (slowest / best)."""
        s = self.samples
        if not s:
            raise ValueError("the probe has no samples yet: call it first")
        return {"bytes": self.nbytes, "best": max(s), "median": statistics.median(s),
                "min": min(s), "spread": min(s) / max(s), "n": len(s)}


def read_bandwidth_gbs(megabytes: int = 1024, repeats: int = 7, threads: int | None = None,
                       nbytes: int | None = None) -> float:
    """Measured memory read bandwidth in GB/s: ReadProbe over `nbytes` (default `megabytes`
    MB), the fastest of `repeats` reads, as STREAM reports: other work on a shared machine
    only slows a read down (a neighbour's memory traffic took the median from 46 to 32 GB/s
    on the machine that wrote the book), and a roofline is the limit, so the least disturbed
    read is the nearest to it. Pass a decode step's bytes to get that step's roof."""
    probe = ReadProbe(nbytes or megabytes * 2**20, threads)
    for _ in range(repeats):
        probe()
    return probe.summary()["best"]


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
