import os

from llmbook.quiet import ABSL_PREAMBLE, ONEDNN_ON, XNNPACK_DELEGATE, dropping_stderr

# the lines as the native libraries write them (litert-converter 0.5.0, ai-edge-litert 2.3.0)
ABSL = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
ONEDNN = ("I0000 00:00:1795555582.977906    5177 port.cc:153] oneDNN custom operations are on. You may see "
          "slightly different numerical results due to floating-point round-off errors.")
XNN = "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."


def test_drops_only_the_known_native_lines(capfd):
    with dropping_stderr(ABSL_PREAMBLE, ONEDNN_ON, XNNPACK_DELEGATE):
        os.write(2, f"{ABSL}\n{ONEDNN}\nsomething else went wrong\n{XNN}\n".encode())
    err = capfd.readouterr().err
    assert err == "something else went wrong\n"


def test_keeps_everything_it_was_not_told_about(capfd):
    with dropping_stderr(XNNPACK_DELEGATE):
        os.write(2, f"{ONEDNN}\n{XNN}\n".encode())
    assert capfd.readouterr().err == ONEDNN + "\n"


def test_restores_stderr_after_an_exception(capfd):
    try:
        with dropping_stderr(ONEDNN_ON):
            os.write(2, b"kept\n")
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "kept\nafter\n"


def test_importing_litert_torch_is_quiet():
    import subprocess
    import sys

    code = "from llmbook.litert_llama.compat import import_generative; import_generative()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "oneDNN" not in done.stderr and "absl::InitializeLog" not in done.stderr, done.stderr
