"""One source for code that chapters teach and later chapters reuse.

A notebook code cell whose first line is

    #| export llmbook/mlx_llama/attention.py

is copied, in notebook order, into that module of the package (the marker line dropped). The
notebooks are the source; `python -m llmbook.export` regenerates the modules and
`python -m llmbook.export --check` (run by the tests) fails when a module and its notebooks differ.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

MARKER = "#| export "
ROOT = Path(__file__).resolve().parents[2]  # the repository: support/llmbook/export.py


def header(sources: list[str]) -> str:
    return (f"# Generated from {', '.join(sources)} by `python -m llmbook.export`.\n"
            "# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.\n")


def collect(notebooks: list[Path]) -> dict[str, str]:
    """Module path (relative to support/) -> generated text."""
    cells, sources = defaultdict(list), defaultdict(list)
    for nb in sorted(notebooks):
        for cell in json.loads(nb.read_text())["cells"]:
            src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            if cell["cell_type"] != "code" or not src.startswith(MARKER):
                continue
            first, _, body = src.partition("\n")
            target = first[len(MARKER):].strip()
            if not target.startswith("llmbook/") or not target.endswith(".py"):
                raise ValueError(f"{nb.name}: export target {target!r} must be llmbook/<module>.py")
            cells[target].append(body.strip("\n"))
            if (name := f"notebooks/{nb.name}") not in sources[target]:
                sources[target].append(name)
    return {t: header(sources[t]) + "\n" + "\n\n\n".join(body) + "\n" for t, body in cells.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only report modules that differ")
    args = ap.parse_args(argv)
    stale = []
    for target, text in collect(list((ROOT / "notebooks").glob("*.ipynb"))).items():
        path = ROOT / "support" / target
        if path.exists() and path.read_text() == text:
            continue
        stale.append(target)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote support/{target}")
    if args.check and stale:
        print("out of date with the notebooks (run `python -m llmbook.export`): " + ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
