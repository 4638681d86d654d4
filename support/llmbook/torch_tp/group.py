# Generated from notebooks/13_tensor_parallel.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

"""The ranks as processes on torch.distributed: gloo on the CPU, NCCL on CUDA GPUs,
the same code. Rank 0 drives (its calls broadcast an order first), the others
follow; `Group` spawns the ranks with torch.multiprocessing and hands them the
engine's calls over a pipe; workers exit when the group closes or the engine's
process dies. Written in notebooks/13_tensor_parallel.ipynb."""
import ctypes
import os
import signal
import socket
import sys
import threading
import time
import traceback

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llmbook.torch_tp.model import RankModel

RESET, FORWARD, STOP = 0, 1, 2  # the orders rank 0 broadcasts


def backend_and_device(local_rank: int, local_ranks: int) -> tuple[str, torch.device]:
    """NCCL and a GPU of its own for each rank when there are that many CUDA GPUs
    (NCCL cannot put two ranks on one GPU), else gloo on the CPU."""
    if torch.cuda.is_available() and torch.cuda.device_count() >= local_ranks:
        return "nccl", torch.device("cuda", local_rank)
    return "gloo", torch.device("cpu")


class Rank:
    """One rank's loop. Rank 0 calls `drive`: it broadcasts the order (and the new
    tokens), then computes its share like every rank. The others sit in `follow`,
    receive each order and compute theirs, until STOP."""

    def __init__(self, model: RankModel):
        self.model = model
        self.order = torch.zeros(2, dtype=torch.int64, device=model.device)

    def _broadcast(self, op: int, ids) -> tuple[int, torch.Tensor]:
        if self.model.ranks > 1:
            self.order[:] = torch.tensor([op, len(ids)])
            dist.broadcast(self.order, src=0)  # every rank learns what comes next
        op, n = self.order.tolist() if self.model.ranks > 1 else (op, len(ids))
        tokens = torch.tensor(ids, dtype=torch.int64, device=self.model.device)
        if self.model.ranks > 1 and op == FORWARD:
            if self.model.rank != 0:
                tokens = torch.empty(n, dtype=torch.int64, device=self.model.device)
            dist.broadcast(tokens, src=0)
        return op, tokens

    def _do(self, op: int, tokens):
        if op == RESET:
            self.model.reset()
        elif op == FORWARD:
            return self.model.forward(tokens)
        return None

    def drive(self, op: int, ids=()):
        """Rank 0: the order `op` on every rank; the logits for FORWARD."""
        op, tokens = self._broadcast(op, list(ids))
        return self._do(op, tokens)

    def follow(self):
        """Ranks 1..n-1: do what rank 0 orders until it says STOP."""
        while True:
            op, tokens = self._broadcast(STOP, [])
            if op == STOP:
                return
            self._do(op, tokens)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with(parent: int, pdeathsig: bool):
    """Exit when the process `parent` does, however it ends (even SIGKILL).
    Linux's prctl(PR_SET_PDEATHSIG) has the kernel send SIGKILL when the thread
    that started this process ends, so it is set only when that was the main
    thread; a watchdog thread that polls the parent's pid covers the rest (and
    other systems)."""
    if pdeathsig and sys.platform == "linux":
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before prctl was set
        os._exit(1)

    def watch():
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def worker(rank, ranks, port, part, cfg, max_context, threads, conn, parent, pdeathsig):
    """One spawned rank: join the group, build its model, then rank 0 serves the
    engine's calls from `conn` and the others follow rank 0."""
    # Ctrl-C (or Jupyter stopping its kernel) signals the whole process group: the
    # engine's process decides when the ranks stop, through the pipe
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with(parent, pdeathsig)
    torch.set_num_threads(threads)
    backend, device = backend_and_device(rank, ranks)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=ranks)
    r = Rank(RankModel(part, cfg, rank, ranks, max_context, device))
    dist.barrier()  # every rank is ready
    if rank != 0:
        r.follow()
    else:
        conn.send(("ready", None))
        serve(r, conn)
    dist.destroy_process_group()


def serve(r: Rank, conn):
    """Rank 0: each call from the engine becomes an order for every rank. A failure
    goes back to the engine as its traceback, and ends the group."""
    while True:
        try:
            op, ids = conn.recv()
        except EOFError:  # the engine's end of the pipe closed: stop every rank
            op, ids = STOP, ()
        try:
            logits = r.drive(op, ids)
        except Exception:
            conn.send(("error", traceback.format_exc()))
            raise
        if op == STOP:
            return
        conn.send(("ok", None if logits is None else logits.cpu().numpy()))


class Group:
    """`len(parts)` ranks, each a process spawned with torch.multiprocessing and
    given its part of the weights (through shared memory); `call` hands an order
    to rank 0 and returns what it answers."""

    def __init__(self, parts: list[dict], cfg, max_context: int, threads: int,
                 timeout: float = 300.0):
        ctx = mp.get_context("spawn")  # a fresh interpreter: no threads forked
        self.conn, child = ctx.Pipe()
        port, ranks = free_port(), len(parts)
        main = threading.current_thread() is threading.main_thread()
        self.procs = [ctx.Process(target=worker, daemon=True, args=(
            r, ranks, port, parts[r], cfg, max_context, threads,
            child if r == 0 else None, os.getpid(), main)) for r in range(ranks)]
        for p in self.procs:
            p.start()
        child.close()  # only rank 0 holds that end now: its exit reads as EOF here
        deadline = time.monotonic() + timeout
        while not self.conn.poll(0.2):  # until rank 0 says ready; a rank that died
            codes = [p.exitcode for p in self.procs]  # would leave the rest waiting
            if any(c is not None for c in codes) or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"torch-tp: the {ranks} ranks did not start "
                                   f"(exit codes {codes}, {timeout} s allowed)")
        self._answer()

    def _answer(self):
        try:
            status, value = self.conn.recv()
        except EOFError:
            codes = [p.exitcode for p in self.procs]
            raise RuntimeError(f"torch-tp: rank 0 exited (exit codes {codes})") \
                from None
        if status == "error":
            raise RuntimeError(f"torch-tp: a rank failed:\n{value}")
        return value

    def call(self, op: int, ids=()) -> np.ndarray | None:
        if not self.procs:
            raise RuntimeError("torch-tp: the engine is closed")
        self.conn.send((op, list(ids)))
        return self._answer()

    def close(self, timeout: float = 10.0):
        """Stop every rank: STOP through rank 0, then SIGKILL for any still there."""
        if not self.procs:
            return
        try:
            self.conn.send((STOP, []))
        except (BrokenPipeError, OSError):
            pass  # rank 0 has already gone; the others are killed below
        for p in self.procs:
            p.join(timeout)
            if p.is_alive():
                p.kill()
                p.join()
        self.conn.close()
        self.procs = []


def _time_collective(rank, ranks, port, sizes, repeats, results):
    torch.set_num_threads(1)
    backend, device = backend_and_device(rank, ranks)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=ranks)
    seconds = {}
    for numel, n in zip(sizes, repeats):
        x = torch.ones(numel, device=device)
        times = []
        for _ in range(n + 10):  # the first 10 warm the connections up
            dist.barrier()  # the ranks start together: the time is the collective's
            start = time.perf_counter()
            dist.all_reduce(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        seconds[numel] = times[10:]
    if rank == 0:
        results.put(seconds)
    dist.destroy_process_group()


def time_all_reduce(ranks: int, sizes: list[int], repeats: list[int]) -> dict:
    """{numel: seconds of each all-reduce} of `numel` fp32 values, `repeats` times
    each, over `ranks` fresh processes (torch.multiprocessing.spawn), as rank 0
    saw them."""
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_time_collective, args=(ranks, free_port(), sizes, repeats, results),
             nprocs=ranks)
    return results.get()
