"""The engine-agnostic generation loop and the comparison against the reference.

Every backend exposes prefill/decode (see llmbook.backends), so one loop serves them all and the
sampler (llmbook.sampling) sees the same logits whatever computed them.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

# defined with the interface (chapter 3's llmbook.engine), which raises it; imported from here too
from llmbook.engine import ContextError  # noqa: F401


def check_context(backend, n_prompt: int, max_tokens: int) -> None:
    if n_prompt == 0:
        raise ContextError("the prompt is empty")
    if n_prompt + max_tokens > backend.max_context:
        raise ContextError(
            f"prompt of {n_prompt} tokens + {max_tokens} new tokens exceeds the context of "
            f"{backend.max_context} tokens of backend {backend.name!r}"
        )


def stream(backend, ids: list[int], sample: Callable[[np.ndarray], int], max_tokens: int,
           eos: int | None = None) -> Iterator[int]:
    """Prefill the prompt, then yield up to max_tokens sampled tokens (stopping after eos)."""
    check_context(backend, len(ids), max_tokens)
    if max_tokens <= 0:
        return
    logits = backend.prefill(ids)
    for i in range(max_tokens):
        token = sample(logits)
        yield token
        if token == eos or i == max_tokens - 1:
            return
        logits = backend.decode(token)


def greedy(backend, ids: list[int], steps: int) -> list[int]:
    """`steps` greedy tokens, never stopping at eos (so two engines are compared on equal length)."""
    return list(stream(backend, ids, lambda logits: int(np.argmax(logits)), steps))


def matching_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two sequences share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def greedy_run(backend, ids: list[int], steps: int) -> tuple[np.ndarray, list[int]]:
    """The prompt's logits and `steps` greedy tokens after them, from one prefill."""
    check_context(backend, len(ids), steps)
    logits = backend.prefill(ids)
    first, tokens = logits, []
    for i in range(steps):
        tokens.append(int(np.argmax(logits)))
        if i < steps - 1:
            logits = backend.decode(tokens[-1])
    return first, tokens


def compare(backend, reference, ids: list[int], steps: int = 20, run=greedy_run) -> dict:
    """Prefill logits max |difference| and leading greedy tokens equal, backend vs reference.
    `reference` is a backend, or its greedy_run(reference, ids, steps) when several engines are
    compared with one reference (its run is then computed once). `run(backend, ids, steps)`
    gives the backend's (prefill logits, tokens): greedy decoding, or another way to the same
    tokens (speculative decoding, `python -m llmbook compare --speculate`)."""
    check_context(backend, len(ids), steps)
    logits, tokens = run(backend, ids, steps)
    ref_logits, ref_tokens = reference if isinstance(reference, tuple) else greedy_run(reference, ids, steps)
    if len(ref_tokens) != steps:
        raise ValueError(f"the reference run has {len(ref_tokens)} tokens, not {steps}")
    diff = float(np.max(np.abs(logits - ref_logits)))
    return {"backend": backend.name, "max_abs_diff": diff,
            "greedy_match": matching_prefix(tokens, ref_tokens), "steps": steps}
