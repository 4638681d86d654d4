# Generated from notebooks/06_tvm.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

"""Where a TVM decode step's time goes, by cause (chapter 6; chapter 9 profiles its
4-bit step the same way).

The VM's instrument hook sees every call a step makes: each kernel with its
arguments, and the VM's own bookkeeping (allocations, tuples, shape checks). Timing
the calls through the hook would distort them: the hook runs Python between every two
calls, long enough for the thread pool's workers to stop spinning, so each kernel
would pay for waking them. So the hook only records one step's calls, and the profile
*replays* them: the step's kernels, attention included, called back to back from
Python in the step's order on the same tensors, inside a forward of the paged cache
that is then taken back (popn), each call timed. What the plain step spends beyond
the replay is the VM's work between the kernels: its interpreter, its bookkeeping
calls, and the runner's Python around the call."""

import dataclasses
import statistics
import time

import numpy as np
from tvm.runtime import ShapeTuple, Tensor

# the VM's own calls: tensors allocated, tuples unpacked, shapes checked
BOOKKEEPING = ("vm.builtin.", "compute_symbolic_expr", "shape_func")
CAUSES = ("weight matrices", "attention (KV cache)", "other kernels")


@dataclasses.dataclass
class Call:
    name: str
    func: object
    args: tuple
    weight_bytes: int  # bytes of the model's matrices it reads (a lookup: one row)


def _nbytes(t) -> int:
    return int(np.prod(t.shape)) * np.dtype(str(t.dtype)).itemsize


def cause(name: str, weight_bytes: int) -> str:
    if "attention" in name:  # the paged cache's kernels, called through a builtin
        return "attention (KV cache)"
    if name.startswith(BOOKKEEPING):
        return "VM bookkeeping"
    return "weight matrices" if weight_bytes else "other kernels"


def record_step(runner, token: int) -> list[Call]:
    """Every call one decode step of `runner` (a TVMRunner with sequence 0 in it)
    makes, with its arguments, in order."""
    params, calls = runner.params, []

    def hook(func, name, before, ret, *args):
        if before:
            # the matrices' tensors (a 4-bit one is codes and scales), not the norms'
            weights = sum(_nbytes(a) for a in args
                          if isinstance(a, Tensor) and len(a.shape) > 1
                          and any(a.same_as(p) for p in params))
            if "rows" in name or "take" in name:  # an embedding lookup: one row of it
                weights = 0
            calls.append(Call(name, func, args, weights))
        return 0  # VMInstrumentReturnKind.NO_OP: go on as usual

    runner.vm.set_instrument(hook)
    try:
        runner.decode(token)
    finally:
        # None takes the hook away; a Python function that does nothing would still
        # be called before and after every VM call, milliseconds a step
        runner.vm.set_instrument(None)
    return calls


def kernels(calls: list[Call]) -> list[Call]:
    """The calls that compute: every call but the VM's bookkeeping."""
    return [c for c in calls if cause(c.name, c.weight_bytes) != "VM bookkeeping"]


def replay(runner, calls: list[Call]) -> list[float]:
    """The step's kernels again, back to back, one token of sequence 0 in the paged
    cache (its keys and values appended, then taken back): seconds of each call."""
    work = kernels(calls)
    runner.kv["begin_forward"](runner.cache, ShapeTuple([0]), ShapeTuple([1]))
    seconds = []
    try:
        for c in work:
            t = time.perf_counter()
            c.func(*c.args)
            seconds.append(time.perf_counter() - t)
    finally:
        runner.kv["end_forward"](runner.cache)
        runner.kv["popn"](runner.cache, 0, 1)
    return seconds


def step_profile(runner, token: int, rounds: int = 16) -> dict:
    """A decode step and its kernels, in turns for `rounds` rounds (medians):
    {"step_s": the plain step, "replay_s": its kernels back to back, "between_s": the
    difference, "causes": {cause: {"seconds", "calls", "weight_bytes"}}, "kernels":
    {name: the same}}."""
    for _ in range(3):  # warm
        runner.decode(token)
    calls = record_step(runner, token)
    work = kernels(calls)
    plain, replays = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        runner.decode(token)
        plain.append(time.perf_counter() - t)
        replays.append(replay(runner, calls))
    per_call = [statistics.median(r[i] for r in replays) for i in range(len(work))]

    def grouped(key):
        out = {}
        for c, s in zip(work, per_call):
            g = out.setdefault(key(c), {"seconds": 0.0, "calls": 0,
                                        "weight_bytes": 0})
            g["seconds"] += s
            g["calls"] += 1
            g["weight_bytes"] += c.weight_bytes
        return out

    causes = grouped(lambda c: cause(c.name, c.weight_bytes))
    for name in CAUSES:  # every cause, in a fixed order
        causes.setdefault(name, {"seconds": 0.0, "calls": 0, "weight_bytes": 0})
    step_s = statistics.median(plain)
    replay_s = statistics.median(sum(r) for r in replays)
    return {"step_s": step_s, "replay_s": replay_s, "between_s": step_s - replay_s,
            "vm_calls": len(calls), "bookkeeping_calls": len(calls) - len(work),
            "causes": {n: causes[n] for n in CAUSES},
            "kernels": grouped(lambda c: c.name)}
