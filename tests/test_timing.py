"""Timings: engines compared in turn, results saved outside the checkout, device labels."""
import json

import numpy as np

from llmbook import device, timing
from llmbook.export import ROOT


class Ticker:
    """An engine that logs its calls into a shared list."""

    max_context = 1000

    def __init__(self, name, log):
        self.name, self.log = name, log

    def prefill(self, ids):
        self.log.append((self.name, "prefill"))
        return np.zeros(4, np.float32)

    def decode(self, token):
        self.log.append((self.name, "decode"))
        return np.zeros(4, np.float32)


def test_decode_rates_take_turns():
    log = []
    rates = timing.decode_rates({"a": Ticker("a", log), "b": Ticker("b", log)}, [1, 2], tokens=2, rounds=3)
    assert set(rates) == {"a", "b"} and all(r["n"] == 3 for r in rates.values())
    decodes = [name for name, what in log if what == "decode"]
    # one warm-up round and three timed rounds, two steps of each engine per round, in turn
    assert decodes == ["a", "a", "b", "b"] * 4
    assert log[:2] == [("a", "prefill"), ("b", "prefill")]


def test_results_go_outside_the_checkout(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMBOOK_RESULTS", str(tmp_path / "mine"))
    path = timing.record("section", {"x": 1.5})
    assert path.parent == tmp_path / "mine" and not path.is_relative_to(ROOT)
    doc = json.loads(path.read_text())
    assert doc["section"] == {"x": 1.5} and doc["device"]["slug"] == path.stem
    every = timing.load_results()
    assert path.stem in every and every[path.stem]["section"] == {"x": 1.5}
    shipped = {p.name.removesuffix(".json") for p in timing.shipped_results().iterdir()
               if p.name.endswith(".json")}
    assert shipped and shipped <= set(every)  # the contributed devices are plotted too
    copied = timing.contribute(tmp_path / "book")
    assert [p.name for p in copied] == [path.name] and json.loads(copied[0].read_text()) == doc


def test_thread_counts_read_right(monkeypatch):
    monkeypatch.setenv("LLMBOOK_THREADS", "1")
    assert device.threads_text() == "1 thread" and device.threads_text(2) == "2 threads"
    d = device.describe()
    assert d["threads"] == 1 and "1 thread" in d["label"] and "1 threads" not in d["label"]
    assert d["slug"].endswith("-1t")
