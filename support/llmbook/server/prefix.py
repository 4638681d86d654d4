# Generated from notebooks/11_serving.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

"""Prompt prefixes kept in the paged cache, so that a request that starts the same way
(the system prompt every chat request carries) forks them instead of prefilling them.
Written in notebooks/11_serving.ipynb."""
from collections import OrderedDict

import numpy as np


class PrefixCache:
    """Cached prefixes, each a sequence of the runner holding a prompt's full pages.

    A new prompt forks the entry it shares the most full pages with and prefills only
    the rest: the fork shares those pages, nothing is copied. Entries are few, so a
    lookup compares the prompt with each of them; the least recently used one goes
    first when there are too many, or when a request needs its pages."""

    def __init__(self, runner, max_entries: int, first_id: int):
        self.runner, self.max_entries = runner, max_entries
        self.entries: OrderedDict[int, np.ndarray] = OrderedDict()  # seq -> tokens
        self.next_id = first_id  # entry ids live apart from the requests' ids

    def _shared(self, tokens: np.ndarray, ids: np.ndarray, limit: int) -> int:
        """Leading tokens the two share, in whole pages, at most `limit`."""
        n = min(len(tokens), len(ids), limit)
        differ = np.flatnonzero(tokens[:n] != ids[:n])
        same = int(differ[0]) if differ.size else n
        return same - same % self.runner.page_size

    def shared(self, a: list[int], b: list[int]) -> int:
        """The leading tokens of prompt `a` that `b` has too, in full pages (at most
        all of `a` but its last token)."""
        return self._shared(np.asarray(a), np.asarray(b), len(a) - 1)

    def lookup(self, prompt: list[int]) -> tuple[int | None, int]:
        """(entry, tokens) to fork for `prompt`: the longest shared run of full
        pages. At least the prompt's last token is left to prefill: its logits give
        the first new token."""
        ids = np.asarray(prompt)
        best, best_n = None, 0
        for seq, tokens in self.entries.items():
            if (n := self._shared(tokens, ids, len(ids) - 1)) > best_n:
                best, best_n = seq, n
        if best is not None:
            self.entries.move_to_end(best)  # recently used
        return best, best_n

    def insert(self, seq: int, prompt: list[int]):
        """Keep the full pages of `prompt`, which sequence `seq` has just prefilled."""
        ids = np.asarray(prompt)
        n = len(ids) - len(ids) % self.runner.page_size
        if n == 0 or self.max_entries == 0:
            return
        for entry, tokens in list(self.entries.items()):
            shared = self._shared(tokens, ids, n)
            if shared == n:  # already kept, as much or more
                self.entries.move_to_end(entry)
                return
            if shared == len(tokens):  # the new one covers this one
                self.remove(entry)
        while len(self.entries) >= self.max_entries:
            self.evict()
        entry, self.next_id = self.next_id, self.next_id + 1
        self.runner.fork(seq, entry, at=n)
        self.entries[entry] = ids[:n].copy()

    def evict(self) -> bool:
        """Forget the least recently used entry; False when there is none. Its
        pages return to the cache unless a running request still shares them."""
        if not self.entries:
            return False
        self.remove(next(iter(self.entries)))
        return True

    def remove(self, entry: int):
        self.runner.remove(entry)
        del self.entries[entry]
