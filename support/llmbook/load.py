# Generated from notebooks/11_serving.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

"""A load generator for OpenAI-compatible servers: requests sent at
Poisson arrival times, every one streamed, and the latencies summarized with the
definitions of vLLM's own benchmark (`vllm bench serve`), so that the numbers of
the book's server, llama.cpp's and vLLM's mean the same thing.

    requests = text_prompts(bundle, n=8, tokens=32)
    run = await run_load("http://127.0.0.1:8123/v1", "smollm2", requests,
                         max_tokens=32, rate=2.0, seed=0, tokenizer=bundle.tokenizer)
    summarize(run["requests"], run["duration_s"])

It only targets a server on this machine: it is a tool to measure one's own
server, not to send load to somebody else's. Written in notebooks/11_serving.ipynb.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from urllib.parse import urlsplit

import numpy as np
import openai

from llmbook import bench

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
PERCENTILES = (50, 90, 99)


def check_local(base_url: str) -> None:
    """Refuse any server that is not on this machine (one-line error)."""
    parts = urlsplit(base_url)
    if parts.scheme != "http" or parts.hostname not in LOCAL_HOSTS:
        raise ValueError(f"{base_url!r}: the load generator only targets http:// on "
                         f"{', '.join(LOCAL_HOSTS)}")


def poisson_arrivals(rate: float, n: int, seed: int) -> list[float]:
    """Send times in seconds from the start of a run, for `n` requests arriving as a
    Poisson process of `rate` requests per second; rate=inf sends them all at once.

    As vLLM's `get_request` (vllm/benchmarks/serve.py) does with burstiness 1: every
    request, the first included, waits an exponential gap after the one before, and
    the times are then scaled so that the last one falls at exactly n / rate. The
    arrivals stay random, but the offered load is the same for every seed, so runs
    with different seeds differ in their bursts, not in their average rate."""
    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests per second (or inf), not {rate}")
    if n < 0:
        raise ValueError(f"cannot send {n} requests")
    if math.isinf(rate) or n == 0:
        return [0.0] * n
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, n)
    times = np.cumsum(gaps)
    return (times * (n / rate) / times[-1]).tolist()


def text_prompts(bundle, n: int, tokens: int,
                 template: str = "Continue this text: {}") -> list[str]:
    """`n` prompts, each `template` around a passage of `tokens` tokens: consecutive
    slices of the public-domain text shipped with the package (`bench.text_ids`,
    repeated when n * tokens asks for more than it has). The same for every run."""
    if bundle.tokenizer is None:
        raise ValueError(f"{bundle.name} has no tokenizer to cut text passages with")
    if n < 1 or tokens < 1:
        raise ValueError(f"need n >= 1 prompts of tokens >= 1, not {n} of {tokens}")
    ids = bench.text_ids(bundle, n * tokens)
    passages = [ids[i * tokens:(i + 1) * tokens] for i in range(n)]
    return [template.format(bundle.tokenizer.decode(p)) for p in passages]


def new_record(index: int, at: float) -> dict:
    """What run_load keeps of one request; times are seconds from the run's start.

    at: when it was due; send: when it was sent; chunks: the arrival time of every
    chunk that carried text; end: when the stream closed; output_tokens and
    tokens_from ("usage" from the server's last chunk, or "tokenizer");
    error: None when the request completed."""
    return {"index": index, "at": at, "send": None, "chunks": [], "text": "",
            "end": None, "finish_reason": None, "prompt_tokens": None,
            "output_tokens": None, "tokens_from": None, "error": None}


async def open_stream(client, model: str, prompt: str, max_tokens: int, chat: bool,
                      extra_body: dict | None):
    """One streamed request; the server is asked for a last chunk with the usage."""
    common = dict(model=model, max_tokens=max_tokens, stream=True,
                  stream_options={"include_usage": True}, extra_body=extra_body)
    if chat:
        messages = [{"role": "user", "content": prompt}]
        return await client.chat.completions.create(messages=messages, **common)
    return await client.completions.create(prompt=prompt, **common)


async def send_one(client, record: dict, start: float, prompt: str, model: str,
                   max_tokens: int, chat: bool, extra_body: dict | None,
                   tokenizer) -> None:
    """Wait until the record's send time, send, and time every chunk as it comes.

    Like vLLM's request functions (vllm/benchmarks/lib/endpoint_request_func.py),
    the clock starts just before the request goes out and each chunk is stamped as
    it is read; unlike them, only chunks that carry text count: a chunk with just
    the role, or just the finish_reason, is no token. A server error is recorded
    in the record, never raised, so one failed request does not end the run."""
    try:
        await asyncio.sleep(max(0.0, start + record["at"] - time.perf_counter()))
        record["send"] = time.perf_counter() - start
        stream = await open_stream(client, model, prompt, max_tokens, chat,
                                   extra_body)
        async with stream:
            async for chunk in stream:
                now = time.perf_counter() - start
                if chunk.usage is not None:
                    record["prompt_tokens"] = chunk.usage.prompt_tokens
                    record["output_tokens"] = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    text = choice.delta.content if chat else choice.text
                    if text:
                        record["chunks"].append(now)
                        record["text"] += text
                    if choice.finish_reason is not None:
                        record["finish_reason"] = choice.finish_reason
        record["end"] = time.perf_counter() - start
    except openai.APIError as e:
        record["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return
    except asyncio.CancelledError:
        record["error"] = "cancelled at the run's time limit"
        raise
    if not record["chunks"]:
        record["error"] = "no chunk carried text"
    elif record["finish_reason"] is None:
        # llama.cpp's server, for one, cuts a stream short this way when another
        # request comes in (unless started with --interrupt_requests False)
        record["error"] = "the stream ended without a finish_reason"
    if record["output_tokens"]:  # vLLM too falls back when usage is 0 or missing
        record["tokens_from"] = "usage"
    elif tokenizer is not None:
        ids = tokenizer(record["text"], add_special_tokens=False)["input_ids"]
        record["output_tokens"], record["tokens_from"] = len(ids), "tokenizer"


async def run_load(base_url: str, model: str, prompts: list[str], max_tokens: int,
                   rate: float, seed: int, chat: bool = True, timeout_s: float = 300.0,
                   extra_body: dict | None = None, tokenizer=None) -> dict:
    """Send one streamed request per prompt, at Poisson arrival times of `rate`
    requests per second (`poisson_arrivals`), to the server at `base_url` (up to
    /v1): chat completions, or plain completions with chat=False.

    The run is bounded: len(prompts) requests and at most `timeout_s` seconds, after
    which what is still running or unsent is cancelled and recorded as such.
    `extra_body` is sent with every request (vLLM's {"ignore_eos": True}, say).
    `tokenizer` (a Hugging Face one) counts the output tokens of a server that sends
    no usage chunk. Returns {"requests": [new_record, ...], "duration_s": wall time
    from the first send to the last response, "rate", "seed", "max_tokens"}."""
    check_local(base_url)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings")
    if max_tokens < 1 or not timeout_s > 0:
        raise ValueError(f"need max_tokens >= 1 and timeout_s > 0, "
                         f"not {max_tokens} and {timeout_s}")
    records = [new_record(i, at)
               for i, at in enumerate(poisson_arrivals(rate, len(prompts), seed))]
    # no retries: a retried request would be timed as one slow request. No proxy
    # from the environment: the server is on this machine, nothing stands between.
    http = openai.DefaultAsyncHttpxClient(trust_env=False)
    async with openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0,
                                  timeout=timeout_s, http_client=http) as client:
        start = time.perf_counter()
        tasks = [asyncio.create_task(send_one(client, r, start, p, model, max_tokens,
                                              chat, extra_body, tokenizer))
                 for r, p in zip(records, prompts)]
        _, late = await asyncio.wait(tasks, timeout=timeout_s)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late)
        duration = time.perf_counter() - start
    for task in tasks:
        if not task.cancelled():
            task.result()  # a bug in send_one is raised here, not lost
    return {"requests": records, "duration_s": duration, "rate": rate, "seed": seed,
            "max_tokens": max_tokens}


def stats_ms(seconds: list[float]) -> dict | None:
    """Mean and percentiles in milliseconds (numpy's linear interpolation, as vLLM);
    None when there is nothing to summarize (vLLM would print 0)."""
    if not seconds:
        return None
    ms = np.asarray(seconds) * 1e3
    return {"mean": float(ms.mean())} | {f"p{p}": float(np.percentile(ms, p))
                                        for p in PERCENTILES}


def summarize(requests: list[dict], duration_s: float) -> dict:
    """The metrics of `vllm bench serve`, as its `calculate_metrics` computes them
    (vllm/benchmarks/serve.py), over the requests that completed:

    - TTFT: from sending to the first chunk with text;
    - E2EL: from sending to the last chunk with text;
    - TPOT: (E2EL - TTFT) / (output tokens - 1), per request with more than one
      output token; the mean of TPOT is over requests, not over tokens;
    - ITL: the gaps between successive chunks with text, all requests pooled. A gap
      is per chunk, not per token: a chunk that carries several tokens is one gap;
    - request throughput: completed requests / duration_s; output token throughput:
      all their output tokens / duration_s, the wall time of the whole run.

    Output tokens are the server's usage count, else the tokenizer's count of the
    text (vLLM does the same; where it has neither it counts 1, here it is an error).
    Failed requests (errors, cancellations) count only in `failed` and `errors`."""
    if not duration_s > 0:
        raise ValueError(f"duration_s must be > 0, not {duration_s}")
    done = [r for r in requests if r["error"] is None]
    uncounted = [r["index"] for r in done if r["output_tokens"] is None]
    if uncounted:
        raise ValueError(f"requests {uncounted} have no token count: the server sent "
                         "no usage, and run_load was given no tokenizer")
    ttft, e2el, tpot, itl = [], [], [], []
    for r in done:
        ttft.append(r["chunks"][0] - r["send"])
        e2el.append(r["chunks"][-1] - r["send"])
        if r["output_tokens"] > 1:
            tpot.append((e2el[-1] - ttft[-1]) / (r["output_tokens"] - 1))
        itl += np.diff(r["chunks"]).tolist()
    output_tokens = sum(r["output_tokens"] for r in done)
    return {
        "completed": len(done), "failed": len(requests) - len(done),
        "duration_s": duration_s,
        "request_throughput": len(done) / duration_s,
        "output_throughput": output_tokens / duration_s,
        "output_tokens": output_tokens,
        "tokens_from": dict(Counter(r["tokens_from"] for r in done)),
        "ttft_ms": stats_ms(ttft), "tpot_ms": stats_ms(tpot),
        "itl_ms": stats_ms(itl), "e2el_ms": stats_ms(e2el),
        "errors": dict(Counter(r["error"] for r in requests if r["error"])),
    }


async def sweep(base_url: str, model: str, prompts: list[str], max_tokens: int,
                rates: list[float], seed: int, chat: bool = True,
                timeout_s: float = 300.0, extra_body: dict | None = None,
                tokenizer=None) -> list[dict]:
    """run_load at each rate in turn, on the same prompts and seed: one summary per
    rate, with the rate in it."""
    out = []
    for rate in rates:
        run = await run_load(base_url, model, prompts, max_tokens, rate, seed, chat,
                             timeout_s, extra_body, tokenizer)
        out.append({"rate": rate} | summarize(run["requests"], run["duration_s"]))
    return out
