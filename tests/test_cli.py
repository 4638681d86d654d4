import json
import random
import shutil
import subprocess
import sys

import pytest

from llmbook.cli import main


def last_json(out):
    return json.loads(out.strip().splitlines()[-1])


def test_compare_mlx_on_random_checkpoint(toy_dir, capsys):
    assert main(["compare", "--backend", "mlx", "--model", str(toy_dir), "--token-ids", "1,2,3,4,5", "--steps", "20"]) == 0
    result = last_json(capsys.readouterr().out)
    assert set(result) == {"backend", "max_abs_diff", "greedy_match", "steps", "reference"}
    assert result["reference"] == "hf"
    assert result["backend"] == "mlx" and result["steps"] == 20 and result["greedy_match"] == 20
    assert result["max_abs_diff"] < 1e-4


def test_generate_is_reproducible_with_a_seed(toy_dir, capsys):
    args = ["generate", "--backend", "mlx", "--model", str(toy_dir), "--token-ids", "7,8,9", "--max-tokens", "12",
            "--temperature", "0.9", "--top-k", "50", "--top-p", "0.9", "--seed", "11"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and len(first.split()) == 12


@pytest.mark.parametrize("args, message", [
    (["--backend", "nope", "--token-ids", "1"], "unknown backend 'nope'"),
    (["--backend", "hf", "--model", "/", "--token-ids", "1"], "config.json is missing"),
])
def test_bad_arguments(args, message, capsys):
    assert main(["compare", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_malformed_token_ids(capsys):
    assert main(["compare", "--backend", "hf", "--token-ids", "1,x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: argument --token-ids: must be comma-separated integers")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "llmbook", *args], capture_output=True, text=True)


def assert_one_line_error(proc, name):
    """Non-zero exit, one `error: ...` line on stderr that names `name`, no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and name in lines[0], lines[0]


def truncate(file):
    data = file.read_bytes()
    file.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("name, corrupt", [
    ("model.safetensors", truncate),
    ("model.safetensors", lambda f: f.write_bytes(random.Random(0).randbytes(4096))),
    ("model.safetensors", lambda f: f.write_bytes(b"")),
    ("config.json", lambda f: f.write_text('{"model_type": "llama",')),
    ("config.json", lambda f: f.write_bytes(b"\xff\xfe{}")),
    ("config.json", lambda f: f.write_text("[1, 2]")),
    ("config.json", lambda f: f.write_text("{}")),
], ids=["truncated", "random-bytes", "empty", "invalid-json", "not-utf8", "json-list",
        "no-model-type"])
def test_corrupt_checkpoint_file(toy_dir, tmp_path, capfd, name, corrupt):
    dest = tmp_path / "ckpt"
    shutil.copytree(toy_dir, dest)
    corrupt(dest / name)
    # in this process (a new interpreter per case costs seconds of imports): main's return code
    # and everything written to file descriptors 1 and 2, as the command line would show them
    code = main(["compare", "--backend", "hf", "--model", str(dest), "--token-ids", "1,2"])
    out, err = capfd.readouterr()
    assert_one_line_error(subprocess.CompletedProcess([], code, out, err), str(dest / name))


@pytest.mark.parametrize("args, flag", [
    (["compare", "--backend", "hf", "--token-ids", "1", "--steps", "0"], "--steps"),
    (["compare", "--backend", "hf", "--token-ids", "1", "--steps", "-5"], "--steps"),
    (["compare", "--backend", "hf", "--token-ids", "1", "--steps", "x"], "--steps"),
    (["generate", "--backend", "hf", "--token-ids", "1", "--max-tokens", "0"], "--max-tokens"),
    (["generate", "--backend", "hf", "--token-ids", "1", "--max-tokens", "-1"], "--max-tokens"),
    (["compare", "--backend", "hf", "--token-ids", "1", "--threads", "0"], "--threads"),
    (["generate", "--backend", "hf", "--token-ids", "1", "--threads", "-2"], "--threads"),
    (["bench", "--threads", "0"], "--threads"),
    (["bench", "--tokens", "0"], "--tokens"),
    (["bench", "--repeats", "-1"], "--repeats"),
    (["bench", "--prompt-lengths", "16,x"], "--prompt-lengths"),
    (["bench", "--prompt-lengths", "16,0"], "--prompt-lengths"),
    (["compare", "--backend", "hf", "--token-ids", "1,x"], "--token-ids"),
])
def test_bad_flag_value(args, flag):
    proc = run_cli(*args)
    assert_one_line_error(proc, f"argument {flag}: ")
    assert "must be" in proc.stderr and proc.stderr.count("--") == 2  # the flag and `--help`


def test_prompt_longer_than_context(toy_dir, capsys):
    ids = ",".join(["5"] * 250)
    assert main(["generate", "--backend", "hf", "--model", str(toy_dir), "--token-ids", ids, "--max-tokens", "10"]) == 2
    assert "exceeds the context of 256 tokens" in capsys.readouterr().err


def test_text_prompt_needs_a_tokenizer(toy_dir, capsys):
    assert main(["compare", "--backend", "hf", "--model", str(toy_dir), "--prompt", "hello"]) == 2
    assert "has no tokenizer" in capsys.readouterr().err


def test_token_outside_vocabulary(toy_dir, capsys):
    assert main(["compare", "--backend", "hf", "--model", str(toy_dir), "--token-ids", "1,512"]) == 2
    assert "outside the vocabulary (0..511)" in capsys.readouterr().err


# `python -m llmbook` on SmolLM2 runs in chapter 12 (generate --speculate, checked against
# plain decoding); compare's command line is checked on random checkpoints above


@pytest.mark.parametrize("backend", ["tvm", "tflite", "torch-fused"])
def test_stderr_carries_no_library_noise(backend, toy_dir):
    """torchao's "Failed to load" lines, torch's pytree deprecation, LiteRT's and absl's banners:
    silenced where they start (llmbook/__init__.py, llmbook.quiet), so a clean run's stderr is
    empty, and an error's is its one line."""
    run = subprocess.run([sys.executable, "-m", "llmbook", "compare", "--backend", backend, "--model",
                          str(toy_dir), "--token-ids", "1,2,3,4,5", "--steps", "3", "--threads", "1"],
                         capture_output=True, text=True)
    assert run.returncode == 0 and run.stderr == "", run.stderr
    assert last_json(run.stdout)["greedy_match"] == 3
