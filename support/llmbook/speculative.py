# Generated from notebooks/12_speculative.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

"""Speculative decoding: a drafter guesses the next tokens, the engine scores all of
them in one `verify` call, the guesses it agrees with are kept with its own next token,
and the rest are taken back out of its cache. Written in
notebooks/12_speculative.ipynb."""
import time
from typing import Iterator

import numpy as np

from llmbook.generation import check_context, matching_prefix
from llmbook.sampling import Sampler


def verify_cost(engine, ids: list[int], k_max: int, repeats: int = 5) -> list[float]:
    """[T(k+1) / T(1) for k = 0 .. k_max]: the time of one verify call over k + 1
    tokens against one decode step, after the prompt `ids`; interleaved rounds,
    medians. Every call is taken back, so the cache ends as the prompt left it."""
    engine.prefill(ids)
    times = [[] for _ in range(k_max + 1)]
    for _ in range(repeats):
        for k in range(k_max + 1):
            start = time.perf_counter()
            if k == 0:
                engine.decode(ids[-1])
            else:
                engine.verify([ids[-1]] * (k + 1))
            times[k].append(time.perf_counter() - start)
            engine.rollback(k + 1)
    medians = [float(np.median(t)) for t in times]
    return [m / medians[0] for m in medians]


class PromptLookup:
    """A drafter with no model: the context's last n tokens (n from `max_ngram`
    down to `min_ngram`) are looked up where they last occurred earlier in the
    prompt or the text so far, and the tokens that followed there are the guess.
    An index from each n-gram to the position after its latest occurrence keeps
    a lookup O(1) however long the context grows."""

    free = True  # a guess costs no engine call

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"n-gram sizes must be 1 <= min <= max, got "
                             f"{min_ngram}..{max_ngram}")
        self.sizes = range(max_ngram, min_ngram - 1, -1)  # the longest match first

    def start(self, ids: list[int]):
        self.context, self.after = [], {}
        self.accept(ids)

    def accept(self, tokens: list[int]):
        """Tokens that joined the sequence (the prompt, kept drafts, the engine's)."""
        for t in tokens:
            # n-grams that end just before the new token now have a continuation
            end = len(self.context)
            for n in self.sizes:
                if end >= n:
                    self.after[tuple(self.context[end - n:end])] = end
            self.context.append(int(t))

    def propose(self, k: int, sample: Sampler) -> tuple[list[int], None]:
        """Up to k tokens, and no distribution: the guess is certain (one-hot)."""
        for n in self.sizes:
            if len(self.context) >= n:
                at = self.after.get(tuple(self.context[-n:]))
                if at is not None:
                    return self.context[at:at + k], None
        return [], None


class LayersDrafter:
    """Self-speculation: the same model cut after its first layers
    (`Bundle.first_layers`), with the shared final norm and head, run by an engine
    of its own with its own cache. It keeps the tokens it has cached, and before
    each guess takes back the ones the sequence did not keep."""

    free = False

    def __init__(self, engine):
        self.engine = engine

    def start(self, ids: list[int]):
        self.context, self.cached = list(ids), []
        self.engine.reset()

    def accept(self, tokens: list[int]):
        self.context += [int(t) for t in tokens]

    def propose(self, k: int, sample: Sampler):
        """k guesses, each drawn from the small model (greedy: its argmax), and
        the distributions they were drawn from (None when greedy)."""
        keep = matching_prefix(self.cached, self.context)
        new = self.context[keep:]
        if keep == 0:
            logits = self.engine.prefill(new)
        else:
            self.engine.rollback(len(self.cached) - keep)
            logits = self.engine.verify(new)[-1]
        drafts, dists = [], []
        for i in range(k):
            if sample.temperature == 0:
                drafts.append(int(np.argmax(logits)))
            else:
                dists.append(sample.probabilities(logits))
                drafts.append(draw(dists[-1], sample.rng))
            if i < k - 1:
                logits = self.engine.decode(drafts[-1])
        self.cached = self.context + drafts[:-1]
        return drafts, dists or None


def draw(p: np.ndarray, rng: np.random.Generator) -> int:
    """A token drawn from the distribution p."""
    cdf = np.cumsum(p)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"),
                   cdf.size - 1))


def accept_or_resample(p: np.ndarray, q: np.ndarray | None, token: int,
                       rng: np.random.Generator) -> tuple[bool, int]:
    """The rule that keeps sampling exact (Leviathan et al., Chen et al., 2023):
    keep the guess `token`, drawn from q, with probability min(1, p/q); else draw
    from what p has beyond q, max(p - q, 0), normalized. Whatever q is, the token
    that comes out is distributed as p. q None: a certain guess (one-hot)."""
    q_token = 1.0 if q is None else q[token]
    if rng.random() * q_token < p[token]:  # r < p / q, without dividing by 0
        return True, token
    residual = p.copy()
    if q is None:
        residual[token] = 0.0
    else:
        residual = np.maximum(p - q, 0.0)
    return False, draw(residual / residual.sum(), rng)


def speculative_stream(engine, drafter, ids: list[int], sample: Sampler,
                       max_tokens: int, eos: int | None = None, k: int = 4,
                       policy: "Policy | None" = None,
                       stats: dict | None = None) -> Iterator[int]:
    """`llmbook.generation.stream` with guesses: the same tokens (greedy) or the
    same distribution (sampling), in fewer engine calls when guesses are kept.
    Each round verifies the pending token (sampled, not yet cached) and up to k
    guesses after it in one call; `policy` (optional) chooses k each round."""
    check_context(engine, len(ids), max_tokens)
    stats = {} if stats is None else stats
    for key in ("calls", "proposed", "accepted"):
        stats[key] = 0
    if max_tokens <= 0:
        return
    drafter.start(ids)
    pending = sample(engine.prefill(ids))
    produced = 1
    while True:
        yield pending
        drafter.accept([pending])
        if pending == eos or produced == max_tokens:
            return
        want = k if policy is None else policy.k()
        room = max_tokens - produced - 1  # a round yields its guesses + 1
        drafts, dists = drafter.propose(min(want, room), sample) if want and room \
            else ([], None)
        stats["calls"] += 1
        if not drafts:  # plain decoding: one token
            logits = engine.decode(pending)
            token = sample(logits)
            if policy is not None and drafter.free and room:
                # what the free guess would have been, checked at no cost
                guess, _ = drafter.propose(1, sample)
                if guess:
                    policy.update(guess[0] == token, guess[0] != token)
            pending, produced = token, produced + 1
            continue
        scores = engine.verify([pending] + drafts)  # row i scores drafts[i]
        stats["proposed"] += len(drafts)
        kept = []
        for i, d in enumerate(drafts):
            if sample.temperature == 0:
                token = int(np.argmax(scores[i]))
                ok = token == d
            else:
                ok, token = accept_or_resample(sample.probabilities(scores[i]),
                                               None if dists is None else dists[i],
                                               d, sample.rng)
            if not ok:
                break
            kept.append(d)
            if d == eos:
                break
        stats["accepted"] += len(kept)
        if policy is not None:
            policy.update(len(kept), len(kept) < len(drafts))
        engine.rollback(len(drafts) - len(kept))
        for d in kept:
            yield d
        drafter.accept(kept)
        produced += len(kept)
        if kept and kept[-1] == eos:
            return
        if len(kept) == len(drafts):  # every guess kept: the engine's next, free
            token = sample(scores[len(drafts)])
        pending, produced = token, produced + 1


class Policy:
    """How many guesses to verify next. With per-token acceptance a, k guesses
    yield 1 + a + ... + a^k tokens for a call that costs `cost[k]` (T(k+1)/T(1),
    measured) plus k guesses at `draft_cost` each: the k with the most tokens per
    unit of time wins, and k = 0 is plain decoding. a is estimated from the
    guesses so far, older rounds weighing less."""

    def __init__(self, cost: list[float], draft_cost: float = 0.0,
                 prior: float = 0.5, decay: float = 0.9):
        self.cost, self.draft_cost, self.decay = cost, draft_cost, decay
        self.kept, self.missed = prior, 1 - prior  # a = kept / (kept + missed)

    @property
    def acceptance(self) -> float:
        return self.kept / (self.kept + self.missed)

    def k(self) -> int:
        a = self.acceptance
        speed = [sum(a ** i for i in range(k + 1)) / (c + k * self.draft_cost)
                 for k, c in enumerate(self.cost)]
        return int(np.argmax(speed))

    def update(self, kept: int, missed: bool):
        """One round: how many guesses were kept, and whether one was rejected."""
        self.kept = self.decay * self.kept + kept
        self.missed = self.decay * self.missed + missed
