"""Compiled libraries cached on disk, keyed by model, config, target and the code that made them.

A library lives in `cache_dir()/tvm/<model>-<kind>-<key>.so` with a `.json` beside it (parameter
names, build time, what the key was made of). The key hashes the model config, the target, the
schedule flag, the TVM version, VERSION, the model class (chapter 6's, or chapter 10's with a
batched decode) and the source of pipeline.py and of every module that class is written in, so
editing a chapter's model or pipeline rebuilds instead of loading a stale library. A class a
notebook defines has no module file: an export cell's class counts as the package class it is
exported to (the chapter and the backends share its library), any other by its methods' source.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import json
import os
import pkgutil
import re
import sys
import tempfile
import time
from pathlib import Path

import tvm

from ..checkpoint import LlamaConfig, cache_dir
from ..quiet import dropping_stderr
from . import model as model_py
from . import pipeline as pipeline_py

VERSION = "1"  # bump when what is compiled changes in a way the key cannot see


def _package_twin(c: type) -> type | None:
    """The llmbook.tvm_llama class a notebook's class was exported to (same name, same source),
    if any: a chapter's export cell and the package then share one library."""
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        module = importlib.import_module(f"{__package__}.{info.name}")
        twin = getattr(module, c.__qualname__, None)
        if isinstance(twin, type) and twin.__module__ == module.__name__:
            try:
                same = inspect.getsource(twin) == inspect.getsource(c)
            except (OSError, TypeError, KeyError):  # KeyError: TVM's getfile, a module it cannot see
                return None
            return twin if same else None
    return None


def _sources(model_cls: type) -> bytes:
    """pipeline.py and the files the model class and its bases are written in; for a class written
    in a notebook (its module has no file) that is not an exported twin of a package class, the
    source of its methods, which IPython keeps for each cell. (Not inspect.getfile: TVM replaces
    it with one that names a cell's file, which ipykernel never writes.)"""
    files, methods = set(), b""
    for c in model_cls.__mro__:
        if c.__module__.split(".")[0] in ("builtins", "tvm"):  # TVM's version is in the key
            continue
        path = getattr(sys.modules.get(c.__module__), "__file__", None)
        if not (path and Path(path).is_file()) and (twin := _package_twin(c)) is not None:
            path = sys.modules[twin.__module__].__file__
        if path and Path(path).is_file():
            files.add(path)
        else:
            methods += b"".join(inspect.getsource(f).encode() for _, f in sorted(vars(c).items())
                                if inspect.isfunction(f))
    return b"".join(Path(f).read_bytes() for f in [pipeline_py.__file__, *sorted(files)]) + methods


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


FAST_TAKE = (r"\[[\d:]+\] \S*topi/transform\.h:\d+: Warning: Fast mode segfaults when there "
             r"are out-of-bounds indices\. Make sure input indices are in bound")


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
    # TOPI warns at build time, from C++ on fd 2, that `take` in fast mode does not check its
    # indices; the models' indices (token ids, last positions) are checked before every call.
    # Jupyter would put the line in whichever cell happens to run, so it is dropped here.
    with dropping_stderr(FAST_TAKE):
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
