"""MLX on Linux with a tuned BLAS (chapter 4), the way a reader can do it.

The `mlx[cpu]` wheel's libmlx.so calls one BLAS function for fp32 products, `cblas_sgemm`,
from the netlib reference BLAS it bundles (plain loops, one thread). The dynamic linker lets
a library loaded first (LD_PRELOAD) define that symbol instead. Two such routes:

- the MKL inside torch: torch's libtorch_cpu.so exports MKL's Fortran `sgemm_`, and a shim
  of a few lines (`data/mlx_blas_shim.c`, compiled here with the system's C compiler) hands
  MLX's row-major calls to it; no download;
- MKL from PyPI (`pip install mkl`, about a gigabyte), whose libmkl_rt.so exports
  `cblas_sgemm` itself: `LD_PRELOAD=<venv>/lib/libmkl_rt.so.3 MKL_NUM_THREADS=2`.

The symbol binds when libmlx.so loads, so a route applies to a whole process: `measure` runs
each one in a process of its own."""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

SHIM = resources.files("llmbook") / "data" / "mlx_blas_shim.c"

# run in a fresh process: which library MLX's cblas_sgemm binds to, MLX's (or transformers')
# decode speed, and MLX's prefill logits against transformers'
_PROBE = r"""
import ctypes, json, os, sys
import numpy as np
from llmbook import device, timing
from llmbook.backends import get_backend
from llmbook.checkpoint import load_smollm2
name, tokens = sys.argv[1], int(sys.argv[2])
device.use_threads()
bundle = load_smollm2()
engine = get_backend(name, bundle)
ids = bundle.chat_ids("What is the capital of France?")
out = {"engine": name}
if name == "mlx":
    import mlx.core  # noqa: F401  libmlx.so is loaded: its cblas_sgemm is bound

    class Info(ctypes.Structure):
        _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p),
                    ("sname", ctypes.c_char_p), ("saddr", ctypes.c_void_p)]

    lib = ctypes.CDLL(None)
    try:  # the global scope (LD_PRELOAD), where libmlx.so looks first
        fn = lib.cblas_sgemm
    except AttributeError:  # else its own dependencies: the bundled BLAS
        fn = ctypes.CDLL(os.path.join(os.path.dirname(mlx.core.__file__), "lib",
                                      "libmlx.so")).cblas_sgemm
    info = Info()
    lib.dladdr(ctypes.cast(fn, ctypes.c_void_p), ctypes.byref(info))
    out["cblas_sgemm"] = os.path.basename(info.fname.decode())
# timed first: transformers' threads, once started, would share the cores with MLX's
out["tok_s"] = timing.decode_tokens_per_s(engine, ids, tokens=tokens, repeats=3)["median"]
if name == "mlx":
    want = get_backend("hf", bundle).prefill(ids)
    out["max_abs_diff"] = float(np.abs(engine.prefill(ids) - want).max())
print(json.dumps(out))
"""


def unavailable() -> str | None:
    """Why the routes cannot be measured here, or None."""
    if platform.system() != "Linux":
        return f"MLX on {platform.system()} does not use the Linux wheel's bundled BLAS"
    import importlib.util

    if importlib.util.find_spec("mlx") is None:
        return "mlx is not installed"
    if shutil.which("cc") is None:
        return "no C compiler (cc) to build the shim"
    return None


def torch_lib() -> Path:
    import torch

    return Path(torch.__file__).parent / "lib"


def build_shim(dest: Path) -> Path:
    """Compile data/mlx_blas_shim.c into dest/libllmbook_mlx_blas.so, linked against torch's
    libtorch_cpu.so (its sgemm_) and its OpenMP runtime."""
    dest.mkdir(parents=True, exist_ok=True)
    src, lib = dest / "mlx_blas_shim.c", dest / "libllmbook_mlx_blas.so"
    src.write_text(SHIM.read_text())
    tl = torch_lib()
    gomp = sorted(tl.glob("libgomp*.so*"))  # torch's own OpenMP, the one its MKL uses
    omp = [str(gomp[0])] if gomp else ["-lgomp"]
    cmd = ["cc", "-O2", "-shared", "-fPIC", str(src), "-o", str(lib), f"-L{tl}", "-ltorch_cpu",
           *omp, f"-Wl,-rpath,{tl}"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"cc could not build the MLX BLAS shim: {run.stderr.strip()[-300:]}")
    return lib


def measure(engine: str, preload: Path | None = None, blas_threads: int | None = None,
            tokens: int = 8, timeout: float = 300, env: dict | None = None) -> dict:
    """`engine` ("mlx" or "hf") decoding SmolLM2 in a process of its own, with `preload`
    (a library defining cblas_sgemm) loaded first: {"tok_s", and for MLX "cblas_sgemm" (the
    library it binds to) and "max_abs_diff" against transformers}."""
    env = os.environ | (env or {})
    if preload is not None:
        env["LD_PRELOAD"] = str(preload)
    if blas_threads is not None:
        env["LLMBOOK_MLX_BLAS_THREADS"] = str(blas_threads)
    run = subprocess.run([sys.executable, "-c", _PROBE, engine, str(tokens)], env=env,
                         capture_output=True, text=True, timeout=timeout)
    if run.returncode:
        raise RuntimeError(f"{engine} with {preload or 'the bundled BLAS'} failed: "
                           f"{run.stderr.strip().splitlines()[-1][:300]}")
    return json.loads(run.stdout.strip().splitlines()[-1])
