"""The bandwidth probe behind every roofline of the book (llmbook.roofline.ReadProbe)."""
import os
import statistics
import time
from pathlib import Path

import pytest

from llmbook import roofline

STEP = 540 * 2**20  # about an fp32 SmolLM2 decode step's bytes


def busy_jiffies() -> int | None:
    """Jiffies every process has run on every core (Linux's /proc/stat; None elsewhere)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq = map(int, fields[:7])
    return user + nice + system + irq + softirq


def agreement(threads: int) -> tuple[float, list[float], float | None]:
    """The probe (eight buffers) and one plain buffer of the same bytes, read by the same
    kernel, taking turns: the ratio of their best reads, every turn's ratio, and the cores
    that other processes kept busy meanwhile (None where unknown). Two figures, each robust
    to a neighbour in its own way: the best reads are the least disturbed ones, and a turn's
    two reads share its moment. The turns go on, up to 60 (a few seconds), until one agrees."""
    probe = roofline.ReadProbe(STEP, threads)
    plain = roofline.ReadProbe(STEP, threads, buffers=1)
    assert abs(probe.nbytes - plain.nbytes) < 0.01 * STEP
    ratios = []
    start, t0, own0 = busy_jiffies(), time.perf_counter(), time.process_time()
    for turn in range(60):
        ratios.append(probe() / plain())
        best = probe.summary()["best"] / plain.summary()["best"]
        if turn >= 8 and max(best, statistics.median(ratios)) >= 0.9:
            break
    foreign = None
    if start is not None:
        ticks = os.sysconf("SC_CLK_TCK")
        others = (busy_jiffies() - start) / ticks - (time.process_time() - own0)
        foreign = max(0.0, others / (time.perf_counter() - t0))
    return best, ratios, foreign


def test_probe_is_within_ten_percent_of_a_plain_streaming_read():
    """Splitting the read into several buffers, as a model has several matrices, must not
    lower the roof. With the engines' thread count the check needs a quiet machine: while
    another process holds a core, every one of the probe's eight calls waits for the thread
    that shares it (the machine that wrote the book read 0.7 of the plain figure then, and
    more buffers read less), so there the check is skipped, saying so. With one thread it
    holds on a busy machine too, and is always made."""
    best, ratios, _ = agreement(threads=1)
    assert max(best, statistics.median(ratios)) >= 0.9, (best, ratios)
    best, ratios, foreign = agreement(threads=None)
    if foreign is not None and foreign > 0.25:
        pytest.skip(f"not a quiet machine: other processes kept {foreign:.2f} cores busy "
                    f"during the reads (the probe read {best:.2f} of the plain read)")
    assert max(best, statistics.median(ratios)) >= 0.9, (best, ratios, foreign)


def test_summary_and_bad_sizes():
    probe = roofline.ReadProbe(64 * 2**20, threads=1)
    with pytest.raises(ValueError, match="no samples"):
        probe.summary()
    rates = [probe() for _ in range(3)]
    s = probe.summary()
    assert s["n"] == 3 and s["best"] == max(rates) and s["min"] == min(rates)
    assert 0 < s["spread"] <= 1 and s["min"] <= s["median"] <= s["best"]
    assert s["bytes"] == probe.nbytes and probe.nbytes <= 64 * 2**20
    small = roofline.ReadProbe(4000)  # a toy model's step: 8 rows of 125 floats
    assert small.nbytes == 4000 and small() > 0
    # a 7B model's fp32 step (28 GB) is read as MAX_BYTES, not allocated again whole
    big = roofline.ReadProbe(28 * 2**30, threads=1)
    assert 0.99 * roofline.MAX_BYTES < big.nbytes <= roofline.MAX_BYTES
    with pytest.raises(ValueError, match="smaller than 8 rows"):
        roofline.ReadProbe(500)
