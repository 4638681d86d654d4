"""The registry (llmbook.backends): one entry per engine, and an engine whose packages are not
installed reported as BackendUnavailable, naming what to install, by the registry and as one
`error:` line by the command line.

A missing package is simulated in a fresh interpreter: `sys.modules[name] = None` makes every
later `import name` (and `import name.sub`) fail as if it were not installed."""
import json
import subprocess
import sys
import textwrap

import pytest

from llmbook import backends

HIDER = textwrap.dedent("""\
    import sys
    def hide(packages):
        for pkg in packages:
            for module in [m for m in sys.modules if m == pkg or m.startswith(pkg + ".")]:
                sys.modules[module] = None
            sys.modules[pkg] = None
""")
HIDE = HIDER + "hide({packages!r})\n"


def test_every_entry_names_its_class_and_colour():
    colors = [backends.color(n) for n in backends.names()]
    assert len(set(colors)) == len(colors)  # no two engines drawn alike
    for name in backends.names():
        e = backends.entry(name)
        assert e.imports and all("." not in p for p in e.imports), name  # top-level packages
        assert e.module.startswith("llmbook.backends.") and e.needs, name
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        backends.color("nope")


def test_options_reach_the_class(toy, monkeypatch):
    """get_backend builds the class with its entry's options, then the caller's."""
    entry = backends.Entry("llmbook.backends.hf", "HFBackend", "transformers", ("transformers",),
                           "k", options={"unknown_option": 1})
    monkeypatch.setitem(backends.REGISTRY, "hf-with-options", entry)
    with pytest.raises(TypeError, match="unknown_option"):
        backends.get_backend("hf-with-options", toy)
    with pytest.raises(TypeError, match="another_option"):
        backends.get_backend("hf", toy, another_option=2)


ON_TORCH = [n for n in backends.names() if "torch" in backends.entry(n).imports]


@pytest.fixture(scope="module")
def torch_refusals(toy_dir) -> dict[str, str | None]:
    """The engines on torch, asked in one fresh interpreter (importing torch takes seconds):
    the bundle is loaded first (it imports torch and transformers), then for each engine
    its entry's packages are hidden, the registry is asked, and the modules are put back.
    What each call raised, as the last line of a traceback would name it (None: nothing)."""
    script = HIDER + textwrap.dedent(f"""\
        import json
        from llmbook import backends
        from llmbook.checkpoint import load_model
        bundle = load_model({str(toy_dir)!r})
        for name in sys.argv[1:]:
            kept = dict(sys.modules)
            hide(backends.entry(name).imports)
            try:
                backends.get_backend(name, bundle)
                raised = None
            except Exception as e:  # reported: the test asserts what it is
                raised = f"{{type(e).__module__}}.{{type(e).__name__}}: {{e}}"
            for module in [m for m in sys.modules if m not in kept]:
                del sys.modules[module]
            sys.modules.update(kept)
            print(json.dumps([name, raised]))
    """)
    run = subprocess.run([sys.executable, "-c", script, *ON_TORCH], capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    return dict(json.loads(line) for line in run.stdout.splitlines())


@pytest.mark.parametrize("name", backends.names())
def test_a_missing_package_is_backend_unavailable(name, toy_dir, request):
    """For an engine on torch, the registry must see its packages missing even once they are
    imported (torch_refusals). The others are asked with no bundle (the check comes before
    any use of it), which spares each run importing torch."""
    e = backends.entry(name)
    if name in ON_TORCH:
        last = request.getfixturevalue("torch_refusals")[name]
    else:
        script = "\n".join([
            HIDE.format(packages=e.imports),
            "from llmbook import backends",
            f"backends.get_backend({name!r}, None)",
        ])
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        assert run.returncode != 0, run.stdout
        last = run.stderr.strip().splitlines()[-1]
    assert last and last.startswith("llmbook.engine.BackendUnavailable: "), last
    assert e.needs in last and all(p in last for p in e.imports), last


@pytest.mark.parametrize("name", backends.names())
def test_a_missing_package_is_one_line_on_the_command_line(name, toy_dir):
    e = backends.entry(name)
    wrapper = HIDE.format(packages=e.imports) + "import runpy\nrunpy.run_module('llmbook', run_name='__main__')\n"
    run = subprocess.run([sys.executable, "-c", wrapper, "compare", "--backend", name, "--model",
                          str(toy_dir), "--token-ids", "1,2,3", "--steps", "2"],
                         capture_output=True, text=True)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr[-2000:]
    assert f"backend {name!r} needs {e.needs}" in lines[0], lines[0]


def test_an_import_error_under_the_engine_or_in_the_book(toy, tmp_path, monkeypatch):
    """A package the engine's module imports but its entry does not list is reported as
    unavailable too; an import that fails in the book's own code is a bug, and is raised."""
    (tmp_path / "ghost_engine.py").write_text("import llmbook_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(backends.REGISTRY, "ghost", backends.Entry(
        "ghost_engine", "Ghost", "the ghost engine", (), "k"))
    with pytest.raises(backends.BackendUnavailable, match="backend 'ghost' needs the ghost "
                                                          "engine: No module named 'llmbook_no"):
        backends.get_backend("ghost", toy)
    monkeypatch.setitem(backends.REGISTRY, "broken", backends.Entry(
        "llmbook.backends.no_such_module", "Broken", "nothing", (), "k"))
    with pytest.raises(ModuleNotFoundError, match="llmbook.backends.no_such_module"):
        backends.get_backend("broken", toy)
