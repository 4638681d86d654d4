"""Honest timings: wall clock, warm-up excluded, several repeats, median and spread kept.

Engines that are compared are timed *interleaved*: round after round, each engine once per round,
so that a burst of other work on a shared machine slows every engine alike instead of deciding
the comparison; the median over rounds is kept.

Each run saves its timings to this device's file in the local results directory (outside the
repository: LLMBOOK_RESULTS, default `<cache>/results`), never into the checkout. `make results`
copies that file into the package's `data/results/`, where the files of the devices readers
contributed ship with the book; the benchmarks chapter plots them all.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from importlib import resources
from pathlib import Path

import numpy as np

from .checkpoint import cache_dir
from .device import describe, gpu_name
from .generation import check_context


def timeit(fn, repeats: int = 5, warmup: int = 1) -> list[float]:
    """Seconds per call of fn(), after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def summary(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def prefill_seconds(backend, ids: list[int], repeats: int = 3) -> dict:
    return summary(timeit(lambda: backend.prefill(ids), repeats=repeats))


def interleaved(fns: dict, rounds: int = 5, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each fn in `fns`, timed round-robin: `warmup` untimed rounds, then
    `rounds` rounds that call every fn once. {name: [seconds per round]}."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t)
    return samples


def decode_steps(tokens: int, rounds: int) -> int:
    """Decode steps decode_rates takes from each engine after the prompt: a warm-up round, then
    `rounds` timed ones, `tokens` each."""
    return tokens * (rounds + 1)


def decode_rates(engines: dict, ids: list[int], tokens: int = 32, rounds: int = 3) -> dict[str, dict]:
    """Greedy decode speed of several engines, interleaved: each is prefilled with `ids` (not
    timed), then every round runs `tokens` decode steps of each engine in turn (one warm-up round
    first). {name: summary of tokens/s over the rounds}."""
    state = {}
    for name, engine in engines.items():
        check_context(engine, len(ids), decode_steps(tokens, rounds))
        state[name] = int(np.argmax(engine.prefill(ids)))

    def steps(name):
        def run():
            token = state[name]
            for _ in range(tokens):
                token = int(np.argmax(engines[name].decode(token)))
            state[name] = token
        return run

    samples = interleaved({name: steps(name) for name in engines}, rounds=rounds, warmup=1)
    return {name: summary([tokens / s for s in secs]) for name, secs in samples.items()}


def decode_tokens_per_s(backend, ids: list[int], tokens: int = 32, repeats: int = 3) -> dict:
    """Greedy decode speed of one engine after one prefill of `ids` (not timed): `tokens` warm-up
    steps, then `repeats` timed runs of `tokens` steps each."""
    return decode_rates({"engine": backend}, ids, tokens, rounds=repeats)["engine"]


# ---- results files ----------------------------------------------------------------------------

def results_dir() -> Path:
    """This machine's results: LLMBOOK_RESULTS, default <cache>/results (outside the checkout)."""
    path = Path(os.environ["LLMBOOK_RESULTS"]) if "LLMBOOK_RESULTS" in os.environ else cache_dir() / "results"
    path.mkdir(parents=True, exist_ok=True)
    return path


def shipped_results():
    """The results files that ship with the book (package data): one per contributed device."""
    return resources.files("llmbook") / "data" / "results"


def record(section: str, data: dict, kind: str = "cpu") -> Path:
    """Merge `data` under `section` into this device's file, <results_dir>/<slug>.json."""
    dev = describe(kind)
    path = results_dir() / f"{dev['slug']}.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc["device"] = dev
    doc[section] = data
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return path


def load_results() -> dict[str, dict]:
    """Every device's results, slug -> document: the shipped files, then this machine's own
    (which replace a shipped file of the same device)."""
    found = {p.name: p for p in shipped_results().iterdir() if p.name.endswith(".json")}
    found.update({p.name: p for p in results_dir().glob("*.json")})
    return {name.removesuffix(".json"): json.loads(found[name].read_text()) for name in sorted(found)}


SHIPPED_IN_CHECKOUT = Path(__file__).resolve().parent / "data" / "results"  # where `make results` copies


def contribute(dest: Path) -> list[Path]:
    """Copy this device's results files (its CPU's and, with a CUDA GPU, the GPU's) into `dest`,
    for `make results`: the reader's device then ships with the book."""
    kinds = ["cpu"] + (["cuda"] if gpu_name() else [])
    found = [p for k in kinds if (p := results_dir() / f"{describe(k)['slug']}.json").exists()]
    if not found:
        raise SystemExit(f"no results for this device in {results_dir()}: run `make test` or `make book` first")
    dest.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy2(p, dest / p.name)) for p in found]
