"""Code taught in the chapters has one source: the notebooks. The package modules must be exactly
what `python -m llmbook.export` generates from them."""
import json
import shutil

from llmbook import export


def test_package_agrees_with_notebooks():
    assert export.main(["--check"]) == 0


def test_every_exported_module_is_imported_from_the_package():
    targets = export.collect(list((export.ROOT / "notebooks").glob("*.ipynb")))
    assert "llmbook/mlx_llama/attention.py" in targets and "llmbook/sampling.py" in targets
    for target, text in targets.items():
        assert (export.ROOT / "support" / target).read_text() == text


def test_an_edited_notebook_is_detected(tmp_path, monkeypatch):
    root = tmp_path / "repo"
    shutil.copytree(export.ROOT / "notebooks", root / "notebooks")
    shutil.copytree(export.ROOT / "support" / "llmbook", root / "support" / "llmbook")
    nb_path = root / "notebooks" / "01_attention.ipynb"
    nb = json.loads(nb_path.read_text())
    cell = next(c for c in nb["cells"] if "".join(c["source"]).startswith(export.MARKER)
                and "self.scale = " in "".join(c["source"]))
    cell["source"] = "".join(cell["source"]).replace("self.scale = ", "self.scale = 2 * ")
    nb_path.write_text(json.dumps(nb))
    monkeypatch.setattr(export, "ROOT", root)
    assert export.main(["--check"]) == 1
    assert export.main([]) == 0  # regenerates
    assert "self.scale = 2 * " in (root / "support/llmbook/mlx_llama/attention.py").read_text()
    assert export.main(["--check"]) == 0


def test_chapter_code_fits_the_page():
    """The rendered page shows 88 columns of code: every code line of every chapter fits,
    URLs aside (the first cell's install line)."""
    wide = []
    for path in sorted((export.ROOT / "notebooks").glob("*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] == "code":
                wide += [f"{path.name}: {line}" for line in "".join(cell["source"]).splitlines()
                         if len(line) > 88 and "://" not in line]
    assert not wide, "\n".join(wide[:10])


def test_chapter_outputs_fit_the_page():
    """Printed lines (tables, checks) as stored fit the same 88 columns, so no table is cut
    at the page's edge."""
    wide = []
    for path in sorted((export.ROOT / "notebooks").glob("*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            for out in cell.get("outputs", []):
                text = "".join(out.get("text", "")) or "".join(
                    out.get("data", {}).get("text/plain", ""))
                wide += [f"{path.name}: {line}" for line in text.splitlines() if len(line) > 88]
    assert not wide, "\n".join(wide[:10])
