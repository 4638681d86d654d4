"""Converted .tflite files cached on disk, keyed by model, config, weights, shapes, recipe, code and environment.

A file lives in `cache_dir()/tflite/<model>-<recipe>-p<prefill>-kv<kv>-<key>.tflite` with a `.json`
beside it: what the key was made of, and the wall time and peak memory of the step that made it,
measured in the subprocess that ran it (conversion holds ~4 GB for SmolLM2; a subprocess gives it
back and lets getrusage report its peak alone). The fp32 file is converted from PyTorch; an int8
file is rewritten from the cached fp32 one by ai_edge_quantizer (`step` says which).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..checkpoint import cache_dir

VERSION = "2"  # bump when what is converted changes in a way the key cannot see
HERE = Path(__file__).resolve().parent
RECIPES = ("fp32", "int8-dynamic", "int8-weight-only", "int8-hadamard", "int4-blockwise")  # convert.RECIPES and
# convert.INT4, without importing litert-torch


def weights_digest(state_dict) -> str:
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k].contiguous()
        h.update(k.encode() + str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


@functools.cache  # reading ~170 distributions' metadata costs 0.1 s (seconds on a cold disk); once per process
def environment_digest() -> str:
    """Every installed distribution and its version, hashed. The converter's output depends on more
    than litert-torch and the quantizer (a fresh environment two days later, those two unchanged,
    wrote a different int8 file), so any change of the environment makes a new key."""
    from importlib.metadata import distributions

    pins = sorted({f"{d.metadata['Name'].lower()}=={d.version}" for d in distributions()})
    return hashlib.sha256("\n".join(pins).encode()).hexdigest()[:16]


def cache_key(bundle, recipe: str, prefill_len: int, kv_len: int) -> dict:
    from importlib.metadata import version  # not `import litert_torch`: that loads the converter library

    source = hashlib.sha256(b"".join((HERE / f).read_bytes() for f in ("model.py", "convert.py"))).hexdigest()[:16]
    return {"model": bundle.name, "config": dataclasses.asdict(bundle.config), "weights": weights_digest(bundle.state_dict),
            "recipe": recipe, "prefill_len": prefill_len, "kv_len": kv_len,
            "litert_torch": version("litert-torch"), "ai_edge_quantizer": version("ai-edge-quantizer"),
            "environment": environment_digest(), "version": VERSION, "source": source}


def model_path(bundle, recipe: str, prefill_len: int, kv_len: int, root: Path | None = None) -> tuple[Path, dict]:
    key = cache_key(bundle, recipe, prefill_len, kv_len)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", bundle.name).strip("-")
    return Path(root or cache_dir() / "tflite") / f"{slug}-{recipe}-p{prefill_len}-kv{kv_len}-{digest}.tflite", key


def load_or_convert(bundle, recipe: str, prefill_len: int, kv_len: int, root: Path | None = None) -> tuple[Path, dict]:
    """(path, info): info has the key, `step` (conversion or quantization), `seconds` and `peak_rss_gb`
    of that step, `bytes` and `converted_now`."""
    if prefill_len > kv_len:
        raise ValueError(f"prefill length {prefill_len} exceeds the KV cache of {kv_len}")
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
    path, key = model_path(bundle, recipe, prefill_len, kv_len, root)
    meta = path.with_suffix(".json")
    converted_now = not (path.exists() and meta.exists())
    if converted_now:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tflite")
        os.close(fd)
        log = path.with_suffix(".log")
        cmd = [sys.executable, "-m", "llmbook.litert_llama.build", "--checkpoint", str(bundle.path),
               "--out", tmp, "--recipe", recipe, "--prefill", str(prefill_len), "--kv", str(kv_len)]
        if recipe != "fp32":
            cmd += ["--from-fp32", str(load_or_convert(bundle, "fp32", prefill_len, kv_len, root)[0])]
        with open(log, "w") as f:  # the converter's progress lines go to the log, not the reader's screen
            done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
        if done.returncode:
            os.unlink(tmp)
            raise RuntimeError(f"{recipe} build failed (exit {done.returncode}); last lines of {log}:\n"
                               + "".join(log.read_text().splitlines(True)[-20:]))
        info = json.loads(Path(tmp + ".json").read_text()) | {"key": key}
        Path(tmp + ".json").unlink()
        meta.write_text(json.dumps(info, indent=1))
        os.replace(tmp, path)
    info = json.loads(meta.read_text())
    return path, info | {"converted_now": converted_now, "bytes": path.stat().st_size}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="convert one checkpoint to .tflite (run by load_or_convert)")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--prefill", type=int, required=True)
    ap.add_argument("--kv", type=int, required=True)
    ap.add_argument("--from-fp32", help="quantize this converted fp32 file instead of converting")
    args = ap.parse_args(argv)
    from .compat import import_generative

    import_generative()
    from ..checkpoint import load_model
    from .convert import convert, quantize
    from .model import build_model, model_config

    t0 = time.perf_counter()
    bundle = load_model(args.checkpoint)
    t1 = time.perf_counter()
    if args.from_fp32:
        quantize(args.from_fp32, args.out, args.recipe, model_config(bundle.config, args.kv))
    else:
        convert(build_model(bundle.config, bundle.state_dict, args.kv), args.out, args.prefill, args.kv)
    t2 = time.perf_counter()
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: kilobytes
    Path(args.out + ".json").write_text(json.dumps({
        "step": "quantization" if args.from_fp32 else "conversion",
        "load_seconds": t1 - t0, "seconds": t2 - t1, "peak_rss_gb": peak_kb / 2**20}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
