"""The load generator of chapter 11 (llmbook.load): the metrics on hand-built timings
with vLLM's definitions, the arrival process, the refusal of remote servers, and a run
against llama.cpp's OpenAI-compatible server on SmolLM2's GGUF."""
import asyncio
import math
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from llmbook import load
from llmbook.load import poisson_arrivals, summarize


def record(index, send, chunks, tokens, error=None, tokens_from="usage"):
    return load.new_record(index, send) | {
        "send": send, "chunks": chunks, "output_tokens": tokens,
        "tokens_from": tokens_from, "error": error}


# A: 4 tokens in 4 chunks. B: 5 tokens in 2 chunks (a chunk carried 4 of them).
# C: a single token. D: failed after one chunk, so it counts nowhere but in `failed`.
REQUESTS = [
    record(0, 0.0, [0.5, 0.6, 0.8, 1.1], 4),
    record(1, 1.0, [1.2, 1.6], 5, tokens_from="tokenizer"),
    record(2, 2.0, [2.3], 1),
    record(3, 2.5, [2.9], None, error="APIConnectionError: Connection error."),
]


def test_summarize_has_vllms_definitions():
    s = summarize(REQUESTS, duration_s=4.0)
    assert (s["completed"], s["failed"], s["output_tokens"]) == (3, 1, 10)
    assert s["request_throughput"] == pytest.approx(3 / 4)
    assert s["output_throughput"] == pytest.approx(10 / 4)  # tokens / wall time
    assert s["tokens_from"] == {"usage": 2, "tokenizer": 1}
    assert s["errors"] == {"APIConnectionError: Connection error.": 1}
    # TTFT 500, 200, 300 ms; np.percentile interpolates: p90 at rank 1.8 of 3
    assert s["ttft_ms"] == pytest.approx(
        {"mean": 1000 / 3, "p50": 300, "p90": 460, "p99": 496})
    # TPOT (E2EL - TTFT) / (tokens - 1): A 600/3, B 400/4; C has one token, no TPOT
    assert s["tpot_ms"] == pytest.approx(
        {"mean": 150, "p50": 150, "p90": 190, "p99": 199})
    # ITL per chunk, pooled: A's 100, 200, 300 and B's one gap of 400 (4 tokens)
    assert s["itl_ms"] == pytest.approx(
        {"mean": 250, "p50": 250, "p90": 370, "p99": 397})
    assert s["e2el_ms"] == pytest.approx(
        {"mean": 2000 / 3, "p50": 600, "p90": 1000, "p99": 1090})


def test_summarize_without_enough_data():
    s = summarize(REQUESTS[2:], duration_s=1.0)  # one single-token request, one failure
    assert s["tpot_ms"] is None and s["itl_ms"] is None  # None, where vLLM prints 0
    assert s["ttft_ms"]["p99"] == pytest.approx(300)
    s = summarize(REQUESTS[3:], duration_s=1.0)
    assert s["completed"] == 0 and s["ttft_ms"] is None and s["output_throughput"] == 0
    with pytest.raises(ValueError, match=r"requests \[0\] have no token count"):
        summarize([record(0, 0.0, [0.5], None, tokens_from=None)], duration_s=1.0)
    with pytest.raises(ValueError, match="duration_s must be > 0"):
        summarize(REQUESTS, duration_s=0.0)


def test_poisson_arrivals():
    times = poisson_arrivals(4.0, 2000, seed=1)
    assert times == poisson_arrivals(4.0, 2000, seed=1)
    assert times != poisson_arrivals(4.0, 2000, seed=2)
    gaps = np.diff([0.0] + times)
    assert (gaps > 0).all() and times[-1] == pytest.approx(2000 / 4.0)  # as vLLM scales
    assert gaps.mean() == pytest.approx(1 / 4.0)
    # exponential gaps: their spread equals their mean (evenly spaced sends would have
    # none), and 1 - 1/e of them are shorter than the mean
    assert 0.9 < gaps.std() / gaps.mean() < 1.1
    assert 0.60 < (gaps < gaps.mean()).mean() < 0.66
    assert poisson_arrivals(math.inf, 3, seed=0) == [0.0, 0.0, 0.0]
    assert poisson_arrivals(1.0, 0, seed=0) == []
    with pytest.raises(ValueError, match="rate must be > 0"):
        poisson_arrivals(0.0, 3, seed=0)


@pytest.mark.parametrize("url", ["http://example.com/v1", "https://127.0.0.1:8000/v1",
                                 "http://10.0.0.1:8000/v1", "127.0.0.1:8000"])
def test_only_local_servers(url):
    with pytest.raises(ValueError, match="only targets http:// on 127.0.0.1"):
        asyncio.run(load.run_load(url, "m", ["hi"], 4, rate=1.0, seed=0))
    load.check_local("http://localhost:8000/v1")
    load.check_local("http://127.0.0.1:8000/v1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_failures_are_recorded_not_raised():
    # nothing listens on this port: every request fails, the run goes on and reports
    url = f"http://127.0.0.1:{free_port()}/v1"
    run = asyncio.run(load.run_load(url, "m", ["a", "b"], 4, rate=math.inf, seed=0))
    s = summarize(run["requests"], run["duration_s"])
    assert (s["completed"], s["failed"]) == (0, 2)
    assert s["errors"] == {"APIConnectionError: Connection error.": 2}


def test_the_time_limit_cancels_what_is_left():
    # at 1 request/s (seed 0) the first is due after 1.6 s: at 0.3 s none was sent
    url = f"http://127.0.0.1:{free_port()}/v1"
    run = asyncio.run(load.run_load(url, "m", ["a"] * 4, 4, rate=1.0, seed=0,
                                    timeout_s=0.3))
    assert run["duration_s"] < 1.0
    assert [r["send"] for r in run["requests"]] == [None] * 4
    assert summarize(run["requests"], run["duration_s"])["errors"] == {
        "cancelled at the run's time limit": 4}


def test_text_prompts(smollm2):
    prompts = load.text_prompts(smollm2, n=3, tokens=16)
    assert prompts == load.text_prompts(smollm2, n=3, tokens=16)
    assert len(set(prompts)) == 3
    assert prompts[0].startswith("Continue this text: Four score and seven years ago")
    passages = [p.removeprefix("Continue this text: ") for p in prompts]
    ids = smollm2.tokenizer("".join(passages), add_special_tokens=False)["input_ids"]
    assert abs(len(ids) - 48) <= 2  # 3 x 16 tokens, give or take a merge at a seam


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """llama.cpp's OpenAI-compatible server on SmolLM2's GGUF, on a free local port.
    --interrupt_requests False: by default it ends a stream whenever another request
    arrives, which a load test would see as truncated answers."""
    try:
        import llama_cpp.server.app  # noqa: F401
    except ImportError as e:
        pytest.skip(f"llama_cpp.server cannot import: {e}")
    from llmbook.checkpoint import smollm2_gguf

    port = free_port()
    log = tmp_path_factory.mktemp("llama_server") / "server.log"
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2_gguf()),
           "--host", "127.0.0.1", "--port", str(port), "--n_threads", "2",
           "--n_ctx", "1024", "--interrupt_requests", "False"]
    # its settings come from the environment first: a PORT there would win over --port
    env = {k: v for k, v in os.environ.items()
           if k not in ("HOST", "PORT", "CONFIG_FILE")}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited: {log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1)
                break
            except (urllib.error.URLError, ConnectionError):  # not listening yet
                if time.monotonic() > deadline:
                    pytest.fail("llama_cpp.server not up in 60 s: "
                                f"{log.read_text()[-2000:]}")
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_against_llama_cpp(llama_server, smollm2, chat):
    prompts = load.text_prompts(smollm2, n=4, tokens=16)
    run = asyncio.run(load.run_load(llama_server, "smollm2", prompts, max_tokens=8,
                                    rate=math.inf, seed=0, chat=chat, timeout_s=60,
                                    tokenizer=smollm2.tokenizer))
    s = summarize(run["requests"], run["duration_s"])
    assert (s["completed"], s["failed"]) == (4, 0), s["errors"]
    # llama-cpp-python sends no usage chunk: the tokens are counted by the tokenizer
    assert s["tokens_from"] == {"tokenizer": 4}
    for r in run["requests"]:
        assert r["finish_reason"] == "length" and abs(r["output_tokens"] - 8) <= 1, r
        assert 0 <= r["send"] < r["chunks"][0] and (np.diff(r["chunks"]) > 0).all(), r
        assert r["chunks"][-1] <= r["end"] <= run["duration_s"]
    assert s["ttft_ms"]["p50"] > 0 and s["itl_ms"]["p50"] > 0
    assert s["tpot_ms"]["p50"] > 0
    # it serves one request at a time: the last first token comes after a whole answer
    firsts = [r["chunks"][0] for r in run["requests"]]
    assert max(firsts) > min(r["chunks"][-1] for r in run["requests"])
