# Generated from notebooks/10_batching.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

"""Serving many requests on one engine: a batched step checked against solo
runs, and continuous batching over a batch runner (free_pages, add, step,
remove). Written in notebooks/10_batching.ipynb."""
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np


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
    arrives."""
    id: int
    prompt: list[int]
    max_new_tokens: int
    arrival: int = 0
    tokens: list[int] = field(default_factory=list)
    admitted: int | None = None  # the step it was prefilled at
    finished: int | None = None  # the step it left at


def serve(runner, requests: list[Request], max_batch: int,
          eos: int | None = None) -> dict:
    """Continuous batching, greedy. At every step: finished requests leave and
    free their pages; waiting requests that have arrived are admitted in arrival
    order while fewer than `max_batch` run and the free pages cover every
    admitted request's whole budget; then one batched decode step for all that
    run. Returns the step count, each batched step's seconds and batch size, and
    the prefill seconds."""
    def pages(tokens: int) -> int:
        return -(-tokens // runner.page_size)

    def budget(r: Request) -> int:  # pages for its prompt and all its tokens
        return pages(len(r.prompt) + r.max_new_tokens)

    waiting = deque(sorted(requests, key=lambda r: (r.arrival, r.id)))
    running: dict[int, Request] = {}
    log = {"step_seconds": [], "batch_sizes": [], "prefill_seconds": []}
    step = 0
    while waiting or running:
        for seq, r in list(running.items()):
            if len(r.tokens) >= r.max_new_tokens or r.tokens[-1] == eos:
                r.finished = step
                runner.remove(seq)
                del running[seq]
        # pages the running requests will still take: none can ever run out
        reserved = sum(budget(r) - pages(runner.lengths[r.id])
                       for r in running.values())
        while (waiting and waiting[0].arrival <= step
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
        step += 1
    return {"steps": step} | log
