# Generated from notebooks/11_serving.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

"""The engine loop: one thread owns the engine and serves every request with continuous
batching (chapter 10's `serve`, now fed by a queue instead of a list of arrivals).
Written in notebooks/11_serving.ipynb."""
import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from llmbook.engine import PAGE_SIZE, CacheFull, pages_for
from llmbook.server.prefix import PrefixCache
from llmbook.server.text import TextStream

log = logging.getLogger("llmbook.server")


@dataclass
class Job:
    """One request as the loop sees it: the prompt's tokens, how many to make, how to
    pick each one, and `emit`, which takes the events for the client: {"text": piece}
    as the answer grows, then {"done": finish reason, "usage": ...} or {"error": ...}.
    `emit` is called from the loop's thread."""
    prompt: list[int]
    max_tokens: int
    sample: Callable[[np.ndarray], int]
    text: TextStream
    emit: Callable[[dict], None]
    eos: int | None = None  # None: run to max_tokens (vLLM's ignore_eos)
    id: int = -1  # given by submit
    arrived: float = field(default_factory=time.perf_counter)
    # the loop's bookkeeping
    pending: list[int] = field(default_factory=list)  # prompt tokens to prefill
    tokens: list[int] = field(default_factory=list)  # generated so far
    started: bool = False  # its prefill has begun (a prefix forked, maybe)
    cached_tokens: int = 0  # prompt tokens forked from the prefix cache
    first_token_s: float | None = None  # seconds from arrival to the first token

    @property
    def budget(self) -> int:
        """Tokens it may hold in the cache: its prompt and every token it may make."""
        return len(self.prompt) + self.max_tokens


class OneAtATime:
    """A backend with only the single-sequence interface (prefill, decode, reset)
    as the loop's runner: one sequence at a time, no fork."""

    page_size, max_batch = PAGE_SIZE, 1

    def __init__(self, backend):
        self.backend, self.name = backend, backend.name
        self.max_context = backend.max_context
        self.total_pages = pages_for(backend.max_context)
        self.lengths: dict[int, int] = {}

    def free_pages(self) -> int:
        return self.total_pages - sum(map(pages_for, self.lengths.values()))

    def add(self, seq: int, ids) -> np.ndarray:
        if self.lengths:
            raise CacheFull(f"{self.name} runs one sequence at a time")
        logits = self.backend.prefill(list(ids))
        self.lengths[seq] = len(ids)
        return logits

    def extend(self, seq: int, ids) -> np.ndarray:
        for token in ids:  # the single-sequence interface takes one token a call
            logits = self.backend.decode(int(token))
        self.lengths[seq] += len(ids)
        return logits

    def extend_many(self, chunks: dict[int, list[int]]) -> dict[int, np.ndarray]:
        return {seq: (self.extend if seq in self.lengths else self.add)(seq, ids)
                for seq, ids in chunks.items()}

    def step(self, tokens: dict[int, int]) -> dict[int, np.ndarray]:
        (seq, token), = tokens.items()
        logits = self.backend.decode(int(token))
        self.lengths[seq] += 1
        return {seq: logits}

    def fork(self, parent: int, child: int, at: int | None = None):
        raise ValueError(f"{self.name} cannot fork a sequence")

    def remove(self, seq: int):
        del self.lengths[seq]
        self.backend.reset()


class EngineLoop:
    """Continuous batching in one thread. Every iteration:
    1. take new requests and cancellations from the queue;
    2. free the pages of finished and cancelled requests;
    3. admit waiting requests in arrival order while the batch has room and the free
       pages cover each one's whole budget (so no running request ever runs out);
       a request that starts like a cached prefix forks it;
    4. prefill: every admitted prompt whole (`prefill_chunk` 0), or at most
       `prefill_chunk` prompt tokens in all, in chunks (vLLM's chunked prefill);
       a prompt's last chunk gives its first token;
    5. one batched decode step for every request that has its first token.
    With `static`, requests are admitted only when none runs (static batching)."""

    def __init__(self, runner, max_batch: int, prefill_chunk: int = 0,
                 prefix_entries: int = 0, static: bool = False, metrics=None):
        self.runner, self.max_batch = runner, max_batch
        self.prefill_chunk, self.static, self.metrics = prefill_chunk, static, metrics
        self.prefix = (PrefixCache(runner, prefix_entries, first_id=1 << 40)
                       if prefix_entries else None)
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.waiting: deque[Job] = deque()
        self.prefilling: list[Job] = []  # admitted, prompt not all in the cache yet
        self.decoding: dict[int, Job] = {}
        self.ids = itertools.count()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name="engine", daemon=True)

    # called from other threads ----------------------------------------------------
    def submit(self, job: Job) -> Job:
        job.id = next(self.ids)
        self.inbox.put(("add", job))
        return job

    def cancel(self, job: Job):
        self.inbox.put(("cancel", job))

    def start(self):
        self.thread.start()

    def stop(self, timeout: float = 10.0):
        self.stopping.set()
        self.inbox.put(("wake", None))
        self.thread.join(timeout)

    @property
    def queued(self) -> int:
        """Requests not yet admitted (read without a lock: a gauge, not a count
        anything depends on)."""
        return len(self.waiting) + self.inbox.qsize()

    # the loop's thread ------------------------------------------------------------
    def run(self):
        while not self.stopping.is_set():
            busy = self.waiting or self.prefilling or self.decoding
            self._take(block=not busy)
            self._admit()
            self._prefill()
            self._decode()
            if self.metrics:
                self.metrics.update(self)
        for job in [*self.waiting, *self.prefilling, *self.decoding.values()]:
            job.emit({"error": "the server is shutting down"})

    def _take(self, block: bool):
        while True:
            try:
                kind, job = self.inbox.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            block = False
            if kind == "add":
                self.waiting.append(job)
            elif kind == "cancel":
                self._finish(job, None)

    def _finish(self, job: Job, reason: str | None):
        """Take a job out of the loop and free its pages; tell the client why
        (reason None: the client has gone)."""
        if job in self.waiting:
            self.waiting.remove(job)
        if job in self.prefilling:
            self.prefilling.remove(job)
        self.decoding.pop(job.id, None)
        if job.id in self.runner.lengths:
            self.runner.remove(job.id)
        if reason is None:
            return
        if piece := job.text.flush():
            job.emit({"text": piece})
        job.emit({"done": reason, "usage": {
            "prompt_tokens": len(job.prompt), "completion_tokens": len(job.tokens),
            "total_tokens": len(job.prompt) + len(job.tokens),
            "prompt_tokens_details": {"cached_tokens": job.cached_tokens}}})

    def _reserved(self) -> int:
        """Pages the admitted requests will still take, up to their budgets."""
        page, held = self.runner.page_size, self.runner.lengths
        return sum(pages_for(j.budget, page) - pages_for(held.get(j.id, 0), page)
                   for j in [*self.prefilling, *self.decoding.values()])

    def _admit(self):
        if self.static and (self.prefilling or self.decoding):
            return  # a static batch runs to its end
        page = self.runner.page_size
        while (self.waiting
               and len(self.prefilling) + len(self.decoding) < self.max_batch):
            job = self.waiting[0]
            # its whole budget, as if it shared no page: a prefix it forks later
            # only leaves pages unused
            need = pages_for(job.budget, page)
            while (need > self.runner.free_pages() - self._reserved()
                   and self.prefix and self.prefix.evict()):
                pass
            if need > self.runner.free_pages() - self._reserved():
                if not (self.prefilling or self.decoding):
                    # the server checks budgets against the whole cache first
                    self.waiting.popleft()
                    job.emit({"error": f"the request needs {need} pages of the KV "
                                       "cache, more than it has"})
                    continue
                return  # wait for running requests to give pages back
            self.waiting.popleft()
            self.prefilling.append(job)

    def _start(self, job: Job):
        """A job's first prefill: fork the longest cached prefix of its prompt (looked
        up now, not at admission, so that it finds the prompts prefilled just before
        it)."""
        entry, shared = self.prefix.lookup(job.prompt) if self.prefix else (None, 0)
        if entry is not None:
            self.runner.fork(entry, job.id, at=shared)
        job.started, job.cached_tokens, job.pending = True, shared, job.prompt[shared:]
        if self.metrics:
            self.metrics.prompt_tokens.inc(len(job.prompt))
            self.metrics.cached_tokens.inc(shared)

    def _prefill(self):
        """One prefill call for the admitted prompts that fit in it: each prompt
        whole (prefill_chunk 0; at most a context's tokens a call), or at most
        prefill_chunk prompt tokens in all, the last prompt cut short."""
        budget = self.prefill_chunk or self.runner.max_context
        chunks, jobs = {}, []
        for job in self.prefilling:
            if not job.started:
                # a prompt that shares more full pages with one in this call than
                # with the cache waits for the next call, and forks them then
                if self.prefix:
                    cached = self.prefix.lookup(job.prompt)[1]
                    if any(self.prefix.shared(job.prompt, other.prompt) > cached
                           for other in jobs):
                        continue
                self._start(job)
            n = min(len(job.pending), budget)
            if n == 0 or (n < len(job.pending) and not self.prefill_chunk):
                break
            chunks[job.id], budget = job.pending[:n], budget - n
            jobs.append(job)
        if not chunks:
            return
        try:
            logits = self.runner.extend_many(chunks)
        except Exception as e:  # these requests fail; the others go on
            log.exception("prefill of requests %s failed", list(chunks))
            for job in jobs:
                job.emit({"error": f"prefill failed: {e}"})
                self._finish(job, None)
            return
        for job in jobs:
            job.pending = job.pending[len(chunks[job.id]):]
            if job.pending:
                continue
            self.prefilling.remove(job)
            if self.prefix:
                self.prefix.insert(job.id, job.prompt)
            self.decoding[job.id] = job
            self._add_token(job, logits[job.id])

    def _decode(self):
        if not self.decoding:
            return
        try:
            logits = self.runner.step({seq: job.tokens[-1]
                                       for seq, job in self.decoding.items()})
        except Exception as e:  # the whole step failed: every request in it fails
            log.exception("decode step failed")
            for job in list(self.decoding.values()):
                job.emit({"error": f"decode failed: {e}"})
                self._finish(job, None)
            return
        for seq, row in logits.items():
            self._add_token(self.decoding[seq], row)

    def _add_token(self, job: Job, logits: np.ndarray):
        token = job.sample(logits)
        if job.first_token_s is None:
            job.first_token_s = time.perf_counter() - job.arrived
            if self.metrics:
                self.metrics.first_token(job.first_token_s)
        if token == job.eos:
            self._finish(job, "stop")
            return
        job.tokens.append(token)
        if self.metrics:
            self.metrics.generated.inc()
        if piece := job.text.push(token):
            job.emit({"text": piece})
        if job.text.stopped:
            self._finish(job, "stop")
        elif len(job.tokens) >= job.max_tokens:
            self._finish(job, "length")
