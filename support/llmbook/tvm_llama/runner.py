# Generated from notebooks/06_tvm.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

"""Sequences in the compiled model's paged KV cache, and one sequence as a batch of
one: the cache's life cycle around embed / prefill / decode. Written in
notebooks/06_tvm.ipynb."""

import numpy as np
import tvm
from tvm import relax
from tvm.runtime import ShapeTuple

from llmbook.engine import PAGE_SIZE, CacheFull, check_tokens, pages_for


class TVMRunner:
    """Sequences, by id, in one paged KV cache. `add` prefills a new sequence's
    prompt, `step` gives one new token to each of several sequences, `fork` starts a
    sequence that shares another's tokens (and its full pages), `verify` scores
    several new tokens of each of several sequences and `popn` takes tokens back
    (chapter 12), `remove` gives a sequence's pages back. `prefill`, `decode` and
    `reset` are the book's Backend interface: one sequence (id 0), a batch of one."""

    def __init__(self, module, params: list, dev, vocab_size: int,
                 max_context: int = 2048, max_batch: int = 1,
                 max_tokens: int | None = None, name: str = "tvm"):
        # max_context: one sequence, and one prefill call; max_tokens: all of the
        # sequences together (default: one full context)
        self.vm = relax.VirtualMachine(module, dev)
        self.params, self.dev, self.name = params, dev, name
        self.vocab_size, self.max_context = vocab_size, max_context
        self.max_batch, self.page_size = max_batch, PAGE_SIZE
        self._embed, self._prefill = self.vm["embed"], self.vm["prefill"]
        self._decode = self.vm["decode"]  # one token of one sequence
        # one token for each of many sequences: chapter 10's models export it
        has_batch = self.vm.module.implements_function("batch_decode")
        self._batch_decode = self.vm["batch_decode"] if has_batch else None
        # several sequences' new tokens in one call: chapter 10's models export it
        has_many = self.vm.module.implements_function("batch_prefill")
        self._batch_prefill = self.vm["batch_prefill"] if has_many else None
        kv = ("add_sequence", "remove_sequence", "fork_sequence", "popn",
              "begin_forward", "end_forward")
        self.kv = {n: tvm.get_global_func("vm.builtin.kv_state_" + n) for n in kv}
        self._available = tvm.get_global_func(
            "vm.builtin.attention_kv_cache_get_num_available_pages")
        sizes = (max_batch, max_tokens or max_context, max_context, PAGE_SIZE)
        self.cache = self.vm["create_tir_paged_kv_cache"](
            *(ShapeTuple([n]) for n in sizes))
        self.total_pages = self.free_pages()
        self.lengths: dict[int, int] = {}  # sequence id -> tokens in the cache

    @property
    def batched(self) -> bool:
        """Whether the library decodes many sequences in one step (batch_decode)."""
        return self._batch_decode is not None

    def free_pages(self) -> int:
        return int(self._available(self.cache))

    def _need(self, pages: int):
        if pages > (free := self.free_pages()):
            raise CacheFull(f"{self.name}: the KV cache has {free} free pages "
                            f"of {PAGE_SIZE} tokens, and this needs {pages}")

    def _run(self, fn, x, new_tokens: dict[int, int]) -> np.ndarray:
        # the rows of x follow the order of the ids given to begin_forward:
        # nothing in TVM checks it
        self.kv["begin_forward"](self.cache, ShapeTuple(list(new_tokens)),
                                 ShapeTuple(list(new_tokens.values())))
        logits, _ = fn(x, self.cache, self.params)
        self.kv["end_forward"](self.cache)
        for seq, n in new_tokens.items():
            self.lengths[seq] += n
        return logits.numpy()

    def _embedded(self, ids: list[int]):
        tokens = tvm.runtime.tensor(np.asarray([ids], dtype=np.int32), self.dev)
        return self._embed(tokens, self.params)

    def add(self, seq: int, ids) -> np.ndarray:
        """A new sequence: prefill its prompt; the last position's logits."""
        if seq in self.lengths:
            raise ValueError(f"{self.name}: sequence {seq} is already cached")
        if len(self.lengths) >= self.max_batch:
            raise CacheFull(f"{self.name}: the cache holds at most "
                            f"{self.max_batch} sequences")
        # checked before the sequence exists: a bad prompt leaves nothing behind
        check_tokens(ids, self.vocab_size, 0, self.max_context, self.name)
        self._need(pages_for(len(ids)))
        self.kv["add_sequence"](self.cache, seq)
        self.lengths[seq] = 0
        return self.extend(seq, ids)

    def extend(self, seq: int, ids) -> np.ndarray:
        """More tokens for a cached sequence in one prefill call: the next chunk
        of a long prompt, or a prompt's rest after a prefix it shares. The
        prefill's attention sees the cached tokens before the new ones."""
        if seq not in self.lengths:
            raise ValueError(f"{self.name}: no sequence {seq} in the cache")
        # checked first: `embed` would clip an id past the vocabulary to its
        # last row, silently
        ids = check_tokens(ids, self.vocab_size, self.lengths[seq],
                           self.max_context, self.name)
        n = self.lengths[seq]
        self._need(pages_for(n + len(ids)) - pages_for(n))
        return self._run(self._prefill, self._embedded(ids), {seq: len(ids)})[0, -1]

    def extend_many(self, chunks: dict[int, list[int]]) -> dict[int, np.ndarray]:
        """New tokens for several sequences ({sequence: ids}; one not yet cached
        is added) in one prefill call when the library has `batch_prefill`, the
        weights read once for all of them: each sequence's last logits."""
        if self._batch_prefill is None or len(chunks) == 1:
            return {seq: self.extend(seq, ids) if seq in self.lengths
                    else self.add(seq, ids) for seq, ids in chunks.items()}
        new = [seq for seq in chunks if seq not in self.lengths]
        if len(self.lengths) + len(new) > self.max_batch:
            raise CacheFull(f"{self.name}: the cache holds at most "
                            f"{self.max_batch} sequences")
        for seq, ids in chunks.items():
            check_tokens(ids, self.vocab_size, self.lengths.get(seq, 0),
                         self.max_context, self.name)
        if sum(map(len, chunks.values())) > self.max_context:
            raise ValueError(f"{self.name}: one prefill call takes at most "
                             f"{self.max_context} tokens")
        self._need(sum(pages_for(self.lengths.get(s, 0) + len(ids))
                       - pages_for(self.lengths.get(s, 0))
                       for s, ids in chunks.items()))
        for seq in new:
            self.kv["add_sequence"](self.cache, seq)
            self.lengths[seq] = 0
        ids = [int(t) for chunk in chunks.values() for t in chunk]
        last = np.cumsum([len(chunk) for chunk in chunks.values()]) - 1
        last = tvm.runtime.tensor(last.astype(np.int32), self.dev)
        x = (self._embedded(ids), last)
        self.kv["begin_forward"](self.cache, ShapeTuple(list(chunks)),
                                 ShapeTuple([len(c) for c in chunks.values()]))
        logits, _ = self._batch_prefill(*x, self.cache, self.params)
        self.kv["end_forward"](self.cache)
        for seq, chunk in chunks.items():
            self.lengths[seq] += len(chunk)
        logits = logits.numpy()
        return {seq: logits[i, -1] for i, seq in enumerate(chunks)}

    def fork(self, parent: int, child: int, at: int | None = None):
        """`child` continues from `parent`'s first `at` tokens (all of them by
        default): it shares their full pages, and the cache copies a part-filled
        last page."""
        if parent not in self.lengths or child in self.lengths:
            raise ValueError(f"{self.name}: cannot fork {parent} into {child}")
        at = self.lengths[parent] if at is None else at
        if not 0 < at <= self.lengths[parent]:
            raise ValueError(f"{self.name}: cannot fork {parent} at {at} of its "
                             f"{self.lengths[parent]} tokens")
        self._need(at % PAGE_SIZE > 0)  # a copy of a part-filled page
        self.kv["fork_sequence"](self.cache, parent, child, at)
        self.lengths[child] = at

    def step(self, tokens: dict[int, int]) -> dict[int, np.ndarray]:
        """One decode step for several sequences at once:
        {sequence: its next token} -> {sequence: logits}."""
        for seq, token in tokens.items():
            if seq not in self.lengths:
                raise ValueError(f"{self.name}: no sequence {seq} in the cache")
            check_tokens([token], self.vocab_size, self.lengths[seq],
                         self.max_context, self.name)
        # a sequence whose last page is full needs a fresh one
        self._need(sum(self.lengths[s] % PAGE_SIZE == 0 for s in tokens))
        if len(tokens) == 1:  # the compiled decode: its shapes fixed at one token
            (seq, token), = tokens.items()
            logits = self._run(self._decode, self._embedded([token]), {seq: 1})
            return {seq: logits[0, -1]}
        if self._batch_decode is None:
            raise ValueError(f"{self.name}: this library decodes one sequence at a "
                             "time (it has no batch_decode)")
        x = tvm.runtime.tensor(np.asarray(list(tokens.values()), np.int32), self.dev)
        logits = self._run(self._batch_decode, x, {seq: 1 for seq in tokens})
        return {seq: logits[i, -1] for i, seq in enumerate(tokens)}

    def verify(self, chunks: dict[int, list[int]]) -> dict[int, np.ndarray]:
        """New tokens for cached sequences ({sequence: ids}) in one call, and the
        logits after every one of them: {sequence: [len(ids), vocab]}.
        `batch_decode`'s graph takes a list of token rows; what makes a
        sequence's rows one causal chunk, and not separate sequences, is only
        what `begin_forward` tells the cache (chapter 12)."""
        if self._batch_decode is None:
            raise ValueError(f"{self.name}: this library has no batch_decode "
                             "(chapter 10) to score several tokens with")
        for seq, ids in chunks.items():
            if seq not in self.lengths:
                raise ValueError(f"{self.name}: no sequence {seq} in the cache")
            check_tokens(ids, self.vocab_size, self.lengths[seq],
                         self.max_context, self.name)
        self._need(sum(pages_for(self.lengths[s] + len(ids))
                       - pages_for(self.lengths[s]) for s, ids in chunks.items()))
        ids = [int(t) for chunk in chunks.values() for t in chunk]
        x = tvm.runtime.tensor(np.asarray(ids, np.int32), self.dev)
        logits = self._run(self._batch_decode, x,
                           {seq: len(c) for seq, c in chunks.items()})[:, -1]
        ends = np.cumsum([len(c) for c in chunks.values()])
        return {seq: logits[end - len(c):end]
                for (seq, c), end in zip(chunks.items(), ends)}

    def popn(self, seq: int, n: int):
        """Take the last `n` tokens of a sequence back out of the cache: a page
        they alone filled is freed (chapter 12's rejected drafts)."""
        if seq not in self.lengths:
            raise ValueError(f"{self.name}: no sequence {seq} in the cache")
        if not 0 <= n <= self.lengths[seq]:
            raise ValueError(f"{self.name}: cannot take {n} of sequence {seq}'s "
                             f"{self.lengths[seq]} tokens back")
        if n:
            self.kv["popn"](self.cache, seq, n)
            self.lengths[seq] -= n

    def remove(self, seq: int):
        if seq not in self.lengths:
            raise ValueError(f"{self.name}: no sequence {seq} in the cache")
        self.kv["remove_sequence"](self.cache, seq)
        del self.lengths[seq]

    # one sequence: the Backend interface
    def reset(self):
        """Forget sequence 0; a decode then starts it anew."""
        if 0 in self.lengths:
            self.remove(0)
        self.kv["add_sequence"](self.cache, 0)
        self.lengths[0] = 0

    def prefill(self, ids) -> np.ndarray:
        """Forget the sequence, run the prompt, return the last position's logits."""
        # before forgetting
        check_tokens(ids, self.vocab_size, 0, self.max_context, self.name)
        if 0 in self.lengths:
            self.remove(0)
        return self.add(0, ids)

    def decode(self, token) -> np.ndarray:
        if 0 not in self.lengths:
            self.reset()  # a decode with nothing cached starts the sequence
        return self.step({0: token})[0]
