"""Compiled libraries cached on disk, keyed by model, config, target and the code that made them.

A library lives in `cache_dir()/tvm/<model>-<kind>-<key>.so` with a `.json` beside it (parameter
names, build time, what the key was made of). The key hashes the model config, the target, the
schedule flag, the TVM version, VERSION, the model class (chapter 6's, or chapter 10's with a
batched decode) and the source of pipeline.py and of every module that class is written in, so
editing a chapter's model or pipeline rebuilds instead of loading a stale library.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import re
import tempfile
import time
from pathlib import Path

import tvm

from ..checkpoint import LlamaConfig, cache_dir
from . import model as model_py
from . import pipeline as pipeline_py

VERSION = "1"  # bump when what is compiled changes in a way the key cannot see


def _sources(model_cls: type) -> bytes:
    """pipeline.py and the files the model class and its bases are written in."""
    files = {inspect.getfile(c) for c in model_cls.__mro__ if c.__module__.startswith("llmbook.")}
    return b"".join(Path(f).read_bytes() for f in [pipeline_py.__file__, *sorted(files)])


def cache_key(name: str, cfg: LlamaConfig, target: tvm.target.Target, schedule: bool = True,
              model_cls: type = model_py.LlamaForCausalLM) -> dict:
    return {"model": name, "config": dataclasses.asdict(cfg), "target": str(target.export()),
            "schedule": schedule, "tvm": tvm.__version__, "version": VERSION,
            "class": model_cls.__qualname__, "source": hashlib.sha256(_sources(model_cls)).hexdigest()[:16]}


def library_path(name: str, cfg: LlamaConfig, target: tvm.target.Target, schedule: bool = True,
                 root: Path | None = None, model_cls: type = model_py.LlamaForCausalLM) -> Path:
    key = cache_key(name, cfg, target, schedule, model_cls)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-")
    return Path(root or cache_dir() / "tvm") / f"{slug}-{target.kind.name}-{digest}.so"


def load_or_build(name: str, cfg: LlamaConfig, target: tvm.target.Target, schedule: bool = True,
                  root: Path | None = None, model_cls: type = model_py.LlamaForCausalLM):
    """(runtime module, parameter names, info) with info = {"built": bool, "seconds": float, "path": Path}:
    built = True when it was compiled now (seconds = build time), False when loaded (seconds = load time)."""
    path = library_path(name, cfg, target, schedule, root, model_cls)
    meta = path.with_suffix(".json")
    t0 = time.perf_counter()
    if path.exists() and meta.exists():
        names = json.loads(meta.read_text())["param_names"]
        module = tvm.runtime.load_module(str(path))
        return module, names, {"built": False, "seconds": time.perf_counter() - t0, "path": path}
    executable, names = pipeline_py.compile_model(model_cls(cfg, target), target, schedule)
    seconds = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    # write under temporary names, then rename: a concurrent reader sees all of it or none
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".so")
    os.close(fd)
    executable.export_library(tmp)
    tmp_meta = Path(tmp).with_suffix(".json")
    tmp_meta.write_text(json.dumps({"param_names": names, "build_seconds": seconds,
                                    "key": cache_key(name, cfg, target, schedule, model_cls)}, indent=1))
    os.replace(tmp, path)
    os.replace(tmp_meta, meta)
    return executable, names, {"built": True, "seconds": seconds, "path": path}
