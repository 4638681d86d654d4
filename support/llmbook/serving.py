# Generated from notebooks/10_batching.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

"""Serving many requests on one engine: a batched step checked against solo
runs, continuous and static batching over a batch runner (free_pages, add,
step, remove) with each request's latencies, and the roofline model of a
batched step. Written in notebooks/10_batching.ipynb."""
import math
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from llmbook.engine import pages_for


def batch_vs_solo(engine, runner, prompts: list[list[int]], steps: int) -> dict:
    """Each prompt alone on `engine` (prefill, then `steps` greedy decode
    steps), then all of them together on `runner`, one `step` call per step.
    Decode rates (prefill left out of both) and whether every sequence's tokens
    equal its solo run."""
    solo, alone_s = [], 0.0
    for prompt in prompts:
        tokens = [int(np.argmax(engine.prefill(prompt)))]
        t = time.perf_counter()
        for _ in range(steps):
            tokens.append(int(np.argmax(engine.decode(tokens[-1]))))
        alone_s += time.perf_counter() - t
        solo.append(tokens)
    batched = [[int(np.argmax(runner.add(i, prompt)))]
               for i, prompt in enumerate(prompts)]
    together_s = 0.0
    for _ in range(steps):
        t = time.perf_counter()
        logits = runner.step({i: seq[-1] for i, seq in enumerate(batched)})
        together_s += time.perf_counter() - t
        for i, row in logits.items():
            batched[i].append(int(np.argmax(row)))
    for i in range(len(prompts)):
        runner.remove(i)
    aggregate = len(prompts) * steps / together_s
    single = len(prompts) * steps / alone_s
    return {"sequences": len(prompts), "steps": steps,
            "aggregate_tok_s": aggregate, "single_tok_s": single,
            "speedup": aggregate / single, "all_match": batched == solo}


@dataclass
class Request:
    """A prompt, how many tokens to generate, and the decode step at which it
    arrives. `serve` fills in the rest: its tokens, the steps it was admitted
    and finished at, and on one clock (seconds since `serve` began) when its
    arrival step began and when its first and its last token came out."""
    id: int
    prompt: list[int]
    max_new_tokens: int
    arrival: int = 0
    tokens: list[int] = field(default_factory=list)
    admitted: int | None = None  # the step it was prefilled at
    finished: int | None = None  # the step it left at
    arrived_s: float | None = None
    first_token_s: float | None = None
    last_token_s: float | None = None

    @property
    def ttft_s(self) -> float:
        """Time to first token: waiting for admission, then its prefill."""
        return self.first_token_s - self.arrived_s

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first (None for a single token)."""
        n = len(self.tokens) - 1
        return (self.last_token_s - self.first_token_s) / n if n else None


def serve(runner, requests: list[Request], max_batch: int,
          eos: int | None = None, static: bool = False) -> dict:
    """Continuous batching, greedy. At every step: finished requests leave and
    free their pages; waiting requests that have arrived are admitted in arrival
    order while fewer than `max_batch` run and the free pages cover every
    admitted request's whole budget; then one batched decode step for all that
    run. With `static`, a new group is admitted only when every request of the
    previous one has finished (static batching). Returns the step count, the
    seconds in all, each batched step's seconds and batch size, and the prefill
    seconds."""
    def pages(tokens: int) -> int:
        return pages_for(tokens, runner.page_size)

    def budget(r: Request) -> int:  # pages for its prompt and all its tokens
        return pages(len(r.prompt) + r.max_new_tokens)

    waiting = deque(sorted(requests, key=lambda r: (r.arrival, r.id)))
    running: dict[int, Request] = {}
    log = {"step_seconds": [], "batch_sizes": [], "prefill_seconds": []}
    for r in requests:  # served before: its clock starts again
        r.arrived_s = None
    start = time.perf_counter()
    step = 0
    while waiting or running:
        now = time.perf_counter() - start
        for r in waiting:  # in arrival order: those whose step has come
            if r.arrival > step:
                break
            if r.arrived_s is None:
                r.arrived_s = now
        for seq, r in list(running.items()):
            if len(r.tokens) >= r.max_new_tokens or r.tokens[-1] == eos:
                r.finished = step
                runner.remove(seq)
                del running[seq]
        # pages the running requests will still take: none can ever run out
        reserved = sum(budget(r) - pages(runner.lengths[r.id])
                       for r in running.values())
        admit = not static or not running  # a static batch waits for all
        while (admit and waiting and waiting[0].arrival <= step
               and len(running) < max_batch):
            r = waiting[0]
            if budget(r) > runner.free_pages() - reserved:
                if not running:  # it would wait for ever
                    raise ValueError(f"request {r.id} needs more pages than "
                                     "the whole cache has")
                break
            t = time.perf_counter()
            r.tokens = [int(np.argmax(runner.add(r.id, r.prompt)))]
            log["prefill_seconds"].append(time.perf_counter() - t)
            r.first_token_s = r.last_token_s = time.perf_counter() - start
            r.admitted = step
            reserved += budget(r) - pages(len(r.prompt))
            running[waiting.popleft().id] = r
        active = {seq: r.tokens[-1] for seq, r in running.items()
                  if len(r.tokens) < r.max_new_tokens and r.tokens[-1] != eos}
        if active:
            t = time.perf_counter()
            logits = runner.step(active)
            log["step_seconds"].append(time.perf_counter() - t)
            log["batch_sizes"].append(len(active))
            for seq, row in logits.items():
                running[seq].tokens.append(int(np.argmax(row)))
                running[seq].last_token_s = time.perf_counter() - start
        step += 1
    return {"steps": step, "seconds": time.perf_counter() - start} | log


def latencies(requests: list[Request], percentiles=(50, 90)) -> dict:
    """Percentiles of the served requests' time to first token and time per
    output token, in seconds: {"ttft_s": {50: ..., 90: ...}, "tpot_s": ...}."""
    ttft = [r.ttft_s for r in requests]
    tpot = [t for r in requests if (t := r.tpot_s) is not None]
    return {name: {p: float(np.percentile(values, p)) for p in percentiles}
            for name, values in (("ttft_s", ttft), ("tpot_s", tpot))}


@dataclass
class StepModel:
    """The roofline model of one decode step of a batch: the weights are read
    once per step, each sequence's keys and values once, and the arithmetic
    grows with every sequence."""
    weight_bytes: float  # W, read once per step, whatever the batch
    kv_bytes: float  # K, one sequence's cached keys and values
    flops: float  # F, one sequence's floating-point operations
    bandwidth_gbs: float  # BW
    gflops: float  # C, the rate of the matrix products

    def memory_s(self, b: float) -> float:
        return (self.weight_bytes + b * self.kv_bytes) / (self.bandwidth_gbs * 1e9)

    def compute_s(self, b: float) -> float:
        return b * self.flops / (self.gflops * 1e9)

    def step_s(self, b: float) -> float:
        """Seconds for a step of b sequences: at least the larger term."""
        return max(self.memory_s(b), self.compute_s(b))

    def crossover(self) -> float:
        """The batch at which the compute term reaches the memory term,
        B F / C = (W + B K) / BW; infinite if they never meet."""
        per_sequence = (self.flops / (self.gflops * 1e9)
                        - self.kv_bytes / (self.bandwidth_gbs * 1e9))
        if per_sequence <= 0:  # each sequence adds more reading than arithmetic
            return math.inf
        return self.weight_bytes / (self.bandwidth_gbs * 1e9) / per_sequence
