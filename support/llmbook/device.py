"""What machine the numbers come from: named on every figure and in every results file.

A description has the CPU (its model name), the thread count the engines are given, and the
accelerator when there is one: a CUDA GPU's name, or Apple's Metal GPU when MLX runs on it (on a
Mac, `mx.default_device()` is the GPU, so the MLX timings there are GPU timings).
"""
from __future__ import annotations

import functools
import os
import platform
import re
import shutil
import subprocess


@functools.cache
def cpu_name() -> str:
    """The processor's model name: /proc/cpuinfo on Linux, sysctl on macOS ("Apple M2 Pro")."""
    try:
        with open("/proc/cpuinfo") as f:
            if m := re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M):
                return m.group(1).strip()
    except OSError:  # not Linux
        pass
    if platform.system() == "Darwin":
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    return platform.processor() or platform.machine()


def threads() -> int:
    """Threads the engines are told to use: LLMBOOK_THREADS, else every core this process may use."""
    if "LLMBOOK_THREADS" in os.environ:
        n = int(os.environ["LLMBOOK_THREADS"])
        if n < 1:
            raise ValueError(f"LLMBOOK_THREADS must be at least 1, got {n}")
        return n
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def threads_text(n: int | None = None) -> str:
    """'1 thread', '2 threads'."""
    n = threads() if n is None else n
    return f"{n} thread{'' if n == 1 else 's'}"


def use_threads(n: int | None = None) -> int:
    """Set the thread count of every engine: torch now; TVM's runtime and OpenMP through their
    variables; and LLMBOOK_THREADS, which `threads()` reads, so the engines opened later (TVM's
    compile target, LiteRT's interpreter, llama.cpp) and a later use_threads() with no count
    (as bench.run makes) get the same count."""
    import torch

    n = n or threads()
    os.environ["LLMBOOK_THREADS"] = str(n)
    torch.set_num_threads(n)
    os.environ["TVM_NUM_THREADS"] = str(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    return n


@functools.cache
def gpu_name() -> str | None:
    """The first CUDA GPU, if any: as torch sees it, else as the driver's nvidia-smi names it (the
    CPU build of torch sees no GPU, but TVM and others may still use it)."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.splitlines()[0].strip()
    return None


@functools.cache
def mlx_device() -> str | None:
    """'gpu' when MLX computes on a GPU by default (Metal on a Mac), 'cpu', or None without MLX."""
    try:
        import mlx.core as mx
    except ImportError:
        return None
    return "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"


def accelerator() -> str | None:
    """The GPU the book's engines can use here, in words: a CUDA GPU's name, or Metal."""
    if name := gpu_name():
        return name
    if mlx_device() == "gpu":
        return f"{cpu_name()} GPU (Metal)" if platform.system() == "Darwin" else "MLX GPU"
    return None


def describe(kind: str = "cpu") -> dict:
    """kind 'cpu' or 'cuda': name, thread count, accelerator and a file-name slug for results.

    A 'cpu' description still names the accelerator when there is one: on a Mac the MLX engine
    in a CPU results file ran on the Metal GPU, and the label says so."""
    n = threads()
    gpu = accelerator()
    if kind == "cuda":
        name = gpu_name()
        if name is None:
            raise RuntimeError("no CUDA device on this machine")
        label = name
    else:
        name = cpu_name()
        label = f"{name}, {threads_text(n)}" + (f" + {gpu}" if gpu else "")
    slug = re.sub(r"[^a-z0-9]+", "-", f"{kind}-{name}".lower()).strip("-")
    if kind == "cpu":
        slug += f"-{n}t"
    return {"kind": kind, "name": name, "threads": n, "accelerator": gpu, "label": label,
            "slug": slug, "system": f"{platform.system()} {platform.machine()}"}
