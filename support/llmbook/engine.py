# Generated from notebooks/03_generation.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

"""The interface every engine of the book implements, the one check of what goes into
it, and the interface of many sequences in one cache (chapter 10 implements it).
Written in notebooks/03_generation.ipynb."""
from typing import Protocol, runtime_checkable

import numpy as np

PAGE_SIZE = 16  # tokens a KV-cache page holds: TVM's CPU attention kernels need 16


class ContextError(ValueError):
    """Prompt plus requested tokens do not fit in the backend's context."""


class BackendUnavailable(RuntimeError):
    """The backend's engine or device is not present on this machine."""


class CacheFull(ValueError):
    """The sequences asked for need more pages than the cache has free."""


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


class BackendBase:
    """The members only some engines have, each with the value an engine without it
    gets. Every backend of the book derives from this class and overrides what applies
    to it, so that the CLI, the benchmarks and the metrics ask every engine alike."""

    device = "cpu"  # where it computes: "cpu", else "gpu" (MLX on Metal) or "cuda"
    path = None  # the file it loaded (a .tflite, a GGUF), if it loaded one
    source = None  # the weights it runs, when not the checkpoint's ("rounded to Q4_1")
    own_weights = None  # those weights in fp32, when it rounded them itself
    weight_bytes = None  # bytes of weights one decode step reads, counted by the engine
    head_every_position = False  # its prefill computes every position's logits

    @property
    def exact(self) -> bool:
        """Its logits equal the reference model's, to fp32 rounding, on the weights it
        computes with (`own_weights`, else the checkpoint's): else close, not equal."""
        return not self.quantized

    def text_logits(self, ids) -> np.ndarray | None:
        """Logits [len(ids), vocab] of every position of a new sequence from one forward
        pass; None when the engine has no such call: decode the text token by token."""
        return None

    def batch_runner(self, max_batch: int, max_tokens: int) -> "BatchRunner":
        """Up to `max_batch` sequences in one paged cache of `max_tokens` tokens,
        decoded together."""
        raise BackendUnavailable(f"backend {self.name!r} has no batched decode "
                                 f"({type(self).__name__} has no batch_runner)")

    def verify(self, ids) -> np.ndarray:
        """Append several tokens to the sequence in one pass; logits [len(ids), vocab],
        row i after token i (chapter 12's speculative decoding scores drafts so)."""
        raise BackendUnavailable(f"backend {self.name!r} cannot score several new "
                                 f"tokens in one call and take them back (chapter 12)")

    def rollback(self, n: int) -> None:
        """Forget the sequence's last `n` tokens (rejected drafts, chapter 12)."""
        raise BackendUnavailable(f"backend {self.name!r} cannot score several new "
                                 f"tokens in one call and take them back (chapter 12)")


@runtime_checkable
class BatchRunner(Protocol):
    """Many sequences in one paged KV cache. A sequence is an id the caller chooses."""

    name: str  # the engine's name, for the error messages
    page_size: int  # tokens a page of the cache holds
    max_batch: int  # most sequences in the cache at once
    max_context: int  # most tokens of one sequence, and of one prefill call
    lengths: dict[int, int]  # sequence id -> tokens it has in the cache

    def free_pages(self) -> int:
        """Pages of the cache that no sequence holds."""

    def add(self, seq: int, ids) -> np.ndarray:
        """A new sequence: prefill its prompt; logits [vocab] of its last position."""

    def extend(self, seq: int, ids) -> np.ndarray:
        """More tokens for a cached sequence in one call (the next chunk of a long
        prompt, or a prompt's rest after a shared prefix); logits of the last."""

    def step(self, tokens: dict[int, int]) -> dict[int, np.ndarray]:
        """One decode step for several sequences in one call: {sequence: its next
        token} -> {sequence: logits [vocab]}."""

    def extend_many(self, chunks: dict[int, list[int]]) -> dict[int, np.ndarray]:
        """`extend` (or `add`, for a sequence not yet cached) for several sequences,
        in one call where the engine can: {sequence: ids} -> {sequence: logits}."""

    def fork(self, parent: int, child: int, at: int | None = None) -> None:
        """`child` continues from `parent`'s first `at` tokens (all by default),
        sharing their full pages."""

    def remove(self, seq: int) -> None:
        """Forget the sequence and free its pages."""


def pages_for(tokens: int, page_size: int = PAGE_SIZE) -> int:
    """Pages `tokens` tokens of one sequence take (the last one maybe in part)."""
    return -(-tokens // page_size)


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
