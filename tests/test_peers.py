"""The serving peers of chapter 11, started as subprocesses by llmbook.peers: llama.cpp's server on
SmolLM2, asked one question with the official openai client (skipped, with the reason, where it is
not installed), and everything it started ended afterwards.

vLLM is started by chapter 11 itself, through the same llmbook.peers.serve (its start costs half a
minute here): these tests start llama.cpp's server, and a stand-in whose child ignores SIGTERM.
"""
import os
import sys

import psutil
import pytest

from llmbook import peers
from llmbook.checkpoint import smollm2_gguf

openai = pytest.importorskip("openai")
QUESTION = "What is the capital of France?"


def ask(server) -> str:
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", timeout=120)
    r = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": QUESTION}],
                                       temperature=0, max_tokens=12)
    return r.choices[0].message.content


def running(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running (a zombie has ended: it only waits for its parent to collect it)."""
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            continue
    return alive


def check_serves_and_ends(make_server):
    """Ask one question, then check that the server and everything it started have ended."""
    with make_server() as server:
        answer = ask(server)
        started = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
    assert isinstance(answer, str) and answer.strip(), f"empty answer; log: {server.log_path}"
    assert running(started) == [], f"still running after the server's block: {running(started)}"
    assert peers.group_members(server.pid) == []
    return server, started


def test_llama_cpp_server():
    pytest.importorskip("llama_cpp.server.app", reason="llama-cpp-python or its [server] extra is not installed "
                        "(make could not compile it; see book/how_to_run.md)")
    server, started = check_serves_and_ends(lambda: peers.llama_cpp_server(smollm2_gguf(), threads=2, ctx=512))
    assert server.model == "SmolLM2-135M-Instruct"


def test_a_server_that_dies_is_reported_with_its_log(tmp_path):
    # a file that is no GGUF: the server exits at once, and the error quotes its log
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"not a gguf file")
    pytest.importorskip("llama_cpp.server.app", reason="llama-cpp-python or its [server] extra is not installed")
    with pytest.raises(peers.PeerError, match=r"exited with code \d+ before it was ready; .*\.log: .+"):
        with peers.llama_cpp_server(bad, threads=1):
            pass


def test_the_group_ends_even_when_the_block_raises(tmp_path):
    # a stand-in server that starts a child which ignores SIGTERM: stop() must SIGKILL it
    script = tmp_path / "server.py"
    script.write_text(
        "import http.server, json, signal, subprocess, sys\n"
        "subprocess.Popen([sys.executable, '-c', 'import signal, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'])\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        body = json.dumps({'data': [{'id': 'm'}]}).encode()\n"
        "        self.send_response(200); self.end_headers(); self.wfile.write(body)\n"
        "http.server.HTTPServer(('127.0.0.1', int(sys.argv[2])), H).serve_forever()\n")
    port = peers.free_port()
    cmd = [sys.executable, str(script), "--port", str(port)]
    with pytest.raises(KeyError, match="raised in the block"):
        with peers.serve("stand-in", cmd, dict(os.environ), timeout=30, stop_timeout=1) as server:
            children = psutil.Process(server.pid).children(recursive=True)
            assert len(children) == 1 and server.model == "m"
            raise KeyError("raised in the block")
    assert running(children) == []
    assert peers.group_members(server.pid) == []


def test_cpu_list():
    assert peers.cpu_list([0, 1]) == "0-1"
    assert peers.cpu_list([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert peers.cpu_list([3]) == "3"
