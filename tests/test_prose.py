"""Every number in the prose comes from the run (book/devices.md, "The rule for prose").

Prose is typed by hand and is not re-executed, so a measured number written in a markdown cell
goes stale the next time the chapter runs, and then contradicts the output above it. The rule:
a measured quantity appears only in what a cell prints (a sentence, a table, a figure); the prose
around it points at that output ("the table above") and states no number of its own.

This test reads every markdown cell of every chapter and every page of book/, and fails on a
number written with the unit of a measurement: a ratio (`3.4×`, `3 times faster`), a speed
(tok/s, GB/s, GFLOP/s), a time (ms, µs, s), a percentage, or a fraction of a roof.

How it tells a measurement from a constant of the model or the format:
* a product of numbers (`2 × 4 outputs`, `256 × 15 × 64`) is arithmetic on shapes, not a ratio;
* text inside inline code or math (`` `2 * 30 * 576 * 4` ``, `$d \cdot q + m$`) is a formula;
* every other number with such a unit is a measurement, unless CONSTANTS below lists the exact
  phrase with where it comes from (an assert's threshold, a format's size, a published figure).
  A listed phrase that no longer occurs in its file fails the test too, so the list stays true.
"""
import json
import re

import pytest

from llmbook.export import ROOT

NUMBER = r"(?<![\w.])\d+(?:,\d{3})*(?:\.\d+)?(?:\s*(?:[–-]|to)\s*\d+(?:\.\d+)?)?"
MEASURED = {
    "a ratio": NUMBER + r" ?[×x](?!\s*[\d(])(?![\w])",
    "a ratio in words": NUMBER
    + r"\s+times\s+(?:faster|slower|as\s+(?:fast|many|much)|the\s+(?:speed|tokens|rate))",
    "a speed": NUMBER + r" ?(?:tok(?:en)?s?/s|tokens per second|[GMT]B/s|[GT]FLOP/s)",
    "a time": NUMBER + r" ?(?:ms|µs|us|ns|s|seconds?|minutes?|milliseconds?)\b",
    "a percentage": NUMBER + r" ?(?:%|per ?cent)",
    "a fraction of a roof": r"\b(?:\d+\.\d+|(?:a|one|two)\s+(?:half|third|quarter|fifth)s?)"
                            r"\s+of\s+(?:its|the|their)\s+(?:own\s+)?(?:memory\s+)?roof",
}

# Phrases that state a constant with a measured quantity's unit: (file, phrase) -> its source.
CONSTANTS = {
    ("07_tflite.ipynb", "perplexity within 10% of fp32's"):
        "the int8-dynamic threshold that the chapter's assert uses",
    ("07_tflite.ipynb", "within 5%"):
        "the int8 weight-only and Hadamard threshold that the chapter's assert uses",
    ("08_benchmarks.ipynb", "agree at 99% of the"):
        "the fp32 control's threshold that the chapter's assert uses",
    ("08_benchmarks.ipynb", "are 90% top-1 agreement"): "the int8 threshold asserted below it",
    ("08_benchmarks.ipynb", "a perplexity within 5% of fp32's"): "the same assert",
    ("08_benchmarks.ipynb", "exceeds 1.0 s"): "the budget_s=1.0 that the chapter passes to bench.run",
    ("devices.md", "more than 1.5× as fast"): "chapter 6's assert on fast-math",
    ("devices.md", "margin is 1.5×"): "the bandwidth bounds' margin in the chapters' asserts",
    ("how_to_run.md", "about 5 minutes"): "how long pip takes to compile llama.cpp (the Makefile)",
}


def prose_files():
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        for i, cell in enumerate(cells):
            if cell["cell_type"] == "markdown":
                yield path.name, f"cell {i}", "".join(cell["source"])
    for path in sorted((ROOT / "book").glob("*.md")):
        yield path.name, "page", path.read_text()


def without_formulas(text: str) -> str:
    """Blank out fenced code, inline code and math, keeping offsets for the error message."""
    blank = lambda m: " " * len(m.group(0))  # noqa: E731
    for pattern in (r"```.*?```", r"`[^`]*`", r"\$\$.*?\$\$", r"\$[^$\n]+\$"):
        text = re.sub(pattern, blank, text, flags=re.S)
    return text


def as_pattern(phrase: str) -> str:
    """A listed phrase matches wherever the text breaks its lines."""
    return r"\s+".join(map(re.escape, phrase.split()))


def measured_numbers(name: str, text: str) -> list[str]:
    text = without_formulas(text)
    for (where, phrase) in CONSTANTS:
        if where == name:
            text = re.sub(as_pattern(phrase), lambda m: " " * len(m.group(0)), text)
    found = []
    for what, pattern in MEASURED.items():
        for m in re.finditer(pattern, text, flags=re.I):
            before = text[max(0, m.start() - 3):m.start()]
            if what == "a ratio" and re.search(r"\d\s*×\s*$", before):
                continue  # the last factor of a product of shapes, "4 × 64"
            context = " ".join(text[max(0, m.start() - 40):m.end() + 10].split())
            found.append(f"{what}: {m.group(0)!r} in '…{context}…'")
    return found


CELLS = list(prose_files())


@pytest.mark.parametrize("name", sorted({name for name, _, _ in CELLS}))
def test_prose_states_no_measured_number(name):
    found = [f"{where}: {hit}" for file, where, text in CELLS if file == name
             for hit in measured_numbers(name, text)]
    assert not found, (f"{name} states measured numbers in its prose; print them from the cell "
                       "that measures them and point at the output (book/devices.md):\n"
                       + "\n".join(found))


def test_every_listed_constant_still_occurs():
    texts = {}
    for name, _, text in CELLS:
        texts[name] = texts.get(name, "") + "\n" + text
    stale = [key for key in CONSTANTS if not re.search(as_pattern(key[1]), texts.get(key[0], ""))]
    assert not stale, f"CONSTANTS lists phrases that are gone; remove them: {stale}"


def test_the_rule_tells_measurements_from_constants():
    caught = ["7.0× at 16 sequences", "decodes about 3 times faster", "58.1 tok/s",
              "1984 tokens/s", "33.9 GB/s", "about 210 GFLOP/s", "took 0.52 s", "55–62 ms",
              "about 11%", "0.54 of its roof", "a third of its roof", "4–5×", "2x faster",
              "1.6 to 2 times the speed"]
    for text in caught:
        assert measured_numbers("any", text), text
    kept = ["each of its 2 × 4 outputs", "the 4 × 64 outputs", "256 × 15 × 64 × 30",
            "32 weights per block", "30 layers", "16-token pages", "`2 * 30 * 576 * 4` bytes",
            "$1/\\sqrt{d}$", "chapter 6's table", "in 2 rounds", "the 1024 × 1024 × 1024 product",
            "256 × (FLOPs per token)", "(7 `matmul`s + 2 norms)", "section 5 times the model"]
    for text in kept:
        assert not measured_numbers("any", text), text
