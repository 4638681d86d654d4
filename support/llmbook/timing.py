"""Honest timings: wall clock, warm-up excluded, several repeats, median and spread kept; saved
per device under book/results/ so the benchmarks chapter can plot every machine that ran the book."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np

from .device import describe
from .generation import check_context

RESULTS = Path(__file__).resolve().parents[2] / "book" / "results"


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


def decode_tokens_per_s(backend, ids: list[int], tokens: int = 32, repeats: int = 3) -> dict:
    """Greedy decode speed after one prefill of `ids` (not timed): `tokens` warm-up steps, then
    `repeats` timed runs of `tokens` steps each."""
    token = int(np.argmax(backend.prefill(ids)))
    check_context(backend, len(ids), tokens * (repeats + 1))
    rates = []
    for run in range(repeats + 1):
        t = time.perf_counter()
        for _ in range(tokens):
            token = int(np.argmax(backend.decode(token)))
        if run:  # run 0 is the warm-up
            rates.append(tokens / (time.perf_counter() - t))
    return summary(rates)


def record(section: str, data: dict, kind: str = "cpu") -> Path:
    """Merge `data` under `section` into book/results/<device>.json (the device named inside)."""
    dev = describe(kind)
    path = RESULTS / f"{dev['slug']}.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc["device"] = dev
    doc[section] = data
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return path


def load_results() -> dict[str, dict]:
    """Every device's results in the repository: slug -> document."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))}
