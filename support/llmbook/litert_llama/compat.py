# Generated from notebooks/07_tflite.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

"""Importing litert-torch's Generative API without TensorFlow (the one workaround, in
one place).

litert-torch 0.10 does not depend on TensorFlow (its own `_convert/converter_v2.py` says
so and imports it lazily), but `litert_torch/generative/layers/lora.py` still does, at
module level, `from tensorflow.lite.python import schema_py_generated as schema_fb`:
every import of the Generative API (`layers.attention`, `utilities.converter`, ...)
fails with `ModuleNotFoundError: No module named 'tensorflow'`. The module it wants is
the flatbuffer schema of the .tflite format, generated code that `ai-edge-litert`
(already a dependency) ships as `ai_edge_litert.schema_py_generated`; LoRA uses it only
to write adapter files. So while that one module is imported we register the LiteRT copy
under the TensorFlow name, then remove the stand-in packages again, so nothing else
(litert-torch's own `converter_v2.is_supported()`, transformers) mistakes them for a
real TensorFlow. Installing TensorFlow (~600 MB) would also work.

Importing litert_torch also loads its MLIR converter library, which logs two lines
through absl (oneDNN is on) straight to file descriptor 2; they are dropped there
(llmbook.quiet says why)."""

import importlib
import importlib.machinery
import importlib.util
import sys
import types

from llmbook.quiet import ABSL_PREAMBLE, ONEDNN_ON, dropping_stderr

_SCHEMA = "tensorflow.lite.python.schema_py_generated"


def import_generative():
    """Import litert_torch.generative's LoRA module (and so the whole API) with or
    without TensorFlow."""
    with dropping_stderr(ABSL_PREAMBLE, ONEDNN_ON):
        # first: its __init__ must not see the stand-ins
        import litert_torch  # noqa: F401

    if (
        "litert_torch.generative.layers.lora" in sys.modules
        or importlib.util.find_spec("tensorflow")
    ):
        return importlib.import_module("litert_torch.generative")
    from ai_edge_litert import schema_py_generated

    added = []
    for name in ("tensorflow", "tensorflow.lite", "tensorflow.lite.python"):
        pkg = types.ModuleType(name)
        pkg.__spec__ = importlib.machinery.ModuleSpec(
            name, loader=None, is_package=True
        )
        pkg.__path__ = []
        sys.modules[name] = pkg
        added.append(name)
    sys.modules[_SCHEMA] = schema_py_generated
    added.append(_SCHEMA)
    try:
        importlib.import_module("litert_torch.generative.layers.lora")
    finally:
        for name in added:
            del sys.modules[name]
    return importlib.import_module("litert_torch.generative")
