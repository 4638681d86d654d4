# Generated from notebooks/03_generation.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

"""The interface every engine of the book implements, and the one check of what goes
into it. Written in notebooks/03_generation.ipynb."""
from typing import Protocol, runtime_checkable

import numpy as np

from llmbook.generation import ContextError


@runtime_checkable
class Backend(Protocol):
    """One sequence through one engine: the model and its KV cache."""

    name: str  # what the CLI, the benchmarks and the error messages call it
    max_context: int  # most tokens (prompt + generated) the cache holds
    quantized: bool  # weights rounded below fp32: close to the reference, not equal

    def reset(self) -> None:
        """Forget the sequence."""

    def prefill(self, ids) -> np.ndarray:
        """Start a new sequence with the prompt; logits [vocab] of its last position."""

    def decode(self, token: int) -> np.ndarray:
        """Append one token to the sequence; its logits [vocab]."""


def check_tokens(ids, vocab_size: int, cached: int, max_context: int, name: str):
    """`ids` as a list of ints, once they are known to fit the engine `name`: at least
    one, each in [0, vocab_size), and `cached` + len(ids) within max_context."""
    arr = np.asarray(ids).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name}: no token ids")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name}: token ids must be integers, got {arr.dtype}")
    if bad := [int(t) for t in arr if not 0 <= t < vocab_size]:
        raise ValueError(f"{name}: token ids {bad[:5]} out of range [0, {vocab_size})")
    if cached + arr.size > max_context:
        raise ContextError(f"{name}: {cached} cached + {arr.size} new tokens exceed "
                           f"the context of {max_context}")
    return [int(t) for t in arr]
