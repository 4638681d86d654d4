"""Dropping the few lines native libraries log to the process's stderr at load time.

LiteRT's interpreter announces its XNNPACK delegate, and litert-torch's MLIR converter library
(loaded by `import litert_torch`) logs through absl that oneDNN is on. Both write to file
descriptor 2 from C++, which Python's `sys.stderr` never sees. Jupyter forwards such output
asynchronously, so it lands in whichever cell happens to be running (or in none) and the stored
chapter outputs would differ run to run. Inside `dropping_stderr(patterns)` fd 2 goes to a file;
afterwards every line that matches none of the patterns is written back to stderr, so nothing but
the known lines is hidden.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

XNNPACK_DELEGATE = r"INFO: Created TensorFlow Lite XNNPACK delegate for CPU\."
ABSL_PREAMBLE = r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
ONEDNN_ON = r"I\d{4} [\d:. ]+\d+ port\.cc:\d+\] oneDNN custom operations are on\..*"


@contextlib.contextmanager
def dropping_stderr(*patterns: str):
    """Run the block with fd 2 captured; write back the lines that fully match none of `patterns`."""
    known = [re.compile(p) for p in patterns]
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            lines = f.read().decode(errors="replace").splitlines()
            rest = [ln for ln in lines if ln.strip() and not any(k.fullmatch(ln.strip()) for k in known)]
            if rest:
                print("\n".join(rest), file=sys.stderr)
