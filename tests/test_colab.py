"""The Colab path, proved on this machine.

Every chapter's first cell comes from one template (`llmbook.setup_cell`): the repository URL is
set once, in _config.yml. And a chapter that reads package data runs from the support package
built as a wheel and installed outside the checkout, from a directory that holds only that
notebook (as Colab opens it), with the checkout's own package not importable: chapter 5 is
executed under nbval here, not in the run over notebooks/ (the Makefile leaves it out there).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from llmbook import setup_cell
from llmbook.checkpoint import cache_dir
from llmbook.export import ROOT

CHAPTER = "05_fused.ipynb"  # reads the shipped text (bench.text_ids) and records timings


def test_first_cells_agree_with_the_template():
    assert setup_cell.main(["--check"]) == 0


def test_the_repository_url_is_set_in_one_place(tmp_path):
    for name in ("notebooks", "support"):
        (tmp_path / name).mkdir()
    for path in (ROOT / "notebooks").glob("*.ipynb"):
        shutil.copy(path, tmp_path / "notebooks")
    for name in ("requirements.txt", "Makefile"):
        shutil.copy(ROOT / name, tmp_path)
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    config["repository"]["url"] = "https://example.org/fork/of-the-book"
    (tmp_path / "_config.yml").write_text(yaml.safe_dump(config))
    assert setup_cell.main(["--check"], root=tmp_path) == 1
    assert setup_cell.main([], root=tmp_path) == 0
    for path in (tmp_path / "notebooks").glob("*.ipynb"):
        cell = setup_cell.first_code_cell(json.loads(path.read_text()))
        assert "git+https://example.org/fork/of-the-book@main#subdirectory=support" in "".join(cell["source"])
    assert setup_cell.main(["--check"], root=tmp_path) == 0


def test_first_cells_pin_what_they_install():
    pins = setup_cell.pins()
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        source = "".join(setup_cell.first_code_cell(json.loads(path.read_text()))["source"])
        assert '"huggingface_hub>=1.31,<2"' in source and pins["transformers"] in source, path.name
        if "apache-tvm" in source:
            assert pins["apache-tvm-ffi"] in source, path.name
        assert all(len(line) <= 88 or "git+" in line for line in source.splitlines()), path.name


def run(cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))}\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out


def test_a_chapter_runs_from_the_wheel(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT / "support", src, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__", "build"))
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", tmp_path / "dist", src])
    wheel = next((tmp_path / "dist").glob("llmbook-*.whl"))
    # installed afresh, but always at one place: torch.compile's cache keys hold the
    # compiled code's file paths, and a new directory each run would recompile the
    # chapter's fused model (over a minute on 2 cores)
    site = cache_dir() / "colab-site"
    shutil.rmtree(site, ignore_errors=True)
    run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, wheel])
    assert (site / "llmbook" / "data" / "public_domain.txt").exists()
    assert any((site / "llmbook" / "data" / "results").glob("*.json"))

    work = tmp_path / "colab"
    work.mkdir()
    shutil.copy(ROOT / "notebooks" / CHAPTER, work)
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = run([sys.executable, "-c", "import llmbook; print(llmbook.__file__)"], cwd=work, env=env)
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout  # not the checkout's

    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval",
                          "--nbval-current-env", "--nbval-sanitize-with",
                          str(ROOT / "tests" / "nbval_sanitize.cfg"), CHAPTER],
                         cwd=work, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "failed" not in out.stdout
