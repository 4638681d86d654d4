"""What machine the numbers come from: named on every figure and in every results file."""
from __future__ import annotations

import functools
import os
import platform
import re


def cpu_name() -> str:
    try:
        text = open("/proc/cpuinfo").read()
        if m := re.search(r"^model name\s*:\s*(.+)$", text, re.M):
            return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def threads() -> int:
    """Threads the engines are told to use: LLMBOOK_THREADS, else every core this process may use."""
    if "LLMBOOK_THREADS" in os.environ:
        return int(os.environ["LLMBOOK_THREADS"])
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def use_threads(n: int | None = None) -> int:
    """Set the thread count of every engine that reads one (torch now; TVM and MLX via env)."""
    import torch

    n = n or threads()
    torch.set_num_threads(n)
    os.environ["TVM_NUM_THREADS"] = str(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    return n


@functools.cache
def gpu_name() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return None


def describe(kind: str = "cpu") -> dict:
    """kind 'cpu' or 'cuda': name, thread count and a file-name slug for results."""
    if kind == "cuda":
        name = gpu_name()
        if name is None:
            raise RuntimeError("no CUDA device on this machine")
        label = name
    else:
        name = cpu_name()
        label = f"{name}, {threads()} threads"
    slug = re.sub(r"[^a-z0-9]+", "-", f"{kind}-{name}".lower()).strip("-")
    if kind == "cpu":
        slug += f"-{threads()}t"
    return {"kind": kind, "name": name, "threads": threads(), "label": label, "slug": slug}
