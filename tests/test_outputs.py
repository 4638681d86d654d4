"""The stored outputs that nbval compares hold on any device (book/devices.md).

A code cell whose output depends on the machine (device names, thread counts, versions, paths,
timings, words chosen from a measurement) is tagged `nbval-ignore-output`: it still runs and its
asserts still fail the test, but its printed text is not compared. Every other cell's stored
output must be free of such things; this test reads them all.
"""
import json
import re

import pytest

from llmbook.export import ROOT

IGNORE = "nbval-ignore-output"
DEVICE_SPECIFIC = {
    "a thread count": r"\b\d+ threads?\b",
    "a processor or GPU name": r"\b(EPYC|Xeon|Ryzen|Intel|AMD|Apple M\d|NVIDIA|GeForce|Tesla)\b",
    "a build tag of torch": r"\+(cpu|cu\d+|rocm)",
    "a path": r"(/home/|/root/|/Users/|/tmp/|\.cache/|results/)",
    "a word chosen from a measurement": r"\b(memory|compute)-bound\b|\bfastest\b|\bslowest\b",
    "the absence of a GPU": r"\bno (CUDA )?GPU\b",
}
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def text_of(output) -> str:
    if output["output_type"] == "stream":
        return "".join(output["text"])
    data = output.get("data", {})
    return "".join(data.get("text/plain", "")) + "".join(output.get("traceback", []))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_compared_outputs_are_device_independent(path):
    found = []
    for i, cell in enumerate(json.loads(path.read_text())["cells"]):
        if cell["cell_type"] != "code" or IGNORE in cell["metadata"].get("tags", []):
            continue
        text = "".join(text_of(o) for o in cell.get("outputs", []))
        found += [f"cell {i}: {what} ({m.group(0)!r})" for what, pattern in DEVICE_SPECIFIC.items()
                  if (m := re.search(pattern, text))]
    assert not found, f"{path.name}: untagged cells print device-specific text: {found}"


def test_the_rule_catches_what_it_should():
    assert re.search(DEVICE_SPECIFIC["a thread count"], "AMD EPYC, 1 thread")
    assert re.search(DEVICE_SPECIFIC["a word chosen from a measurement"], "-> compute-bound; at best")
    assert not any(re.search(p, "24 of 24 greedy tokens identical") for p in DEVICE_SPECIFIC.values())
