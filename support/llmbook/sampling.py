# Generated from notebooks/03_generation.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

import numpy as np


class Sampler:
    """logits -> token id: greedy (temperature 0) or seeded sampling with temperature,
    top-k, top-p."""

    def __init__(
        self,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
    ):
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.rng = np.random.default_rng(seed)

    def probabilities(self, logits) -> np.ndarray:
        """The distribution the next token is drawn from (after temperature, top-k and
        top-p)."""
        z = np.asarray(logits, dtype=np.float64) / self.temperature
        if self.top_k and self.top_k < z.size:
            kth = np.partition(z, -self.top_k)[-self.top_k]
            z = np.where(z >= kth, z, -np.inf)
        p = np.exp(z - z.max())
        p /= p.sum()
        if self.top_p < 1:
            order = np.argsort(-p, kind="stable")
            before = np.cumsum(p[order]) - p[order]  # mass of the more likely tokens
            p[order[before >= self.top_p]] = 0.0  # always keeps the most likely token
            p /= p.sum()
        return p

    def __call__(self, logits) -> int:
        if self.temperature == 0:
            return int(np.argmax(logits))
        cdf = np.cumsum(self.probabilities(logits))
        return int(
            min(
                np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"),
                cdf.size - 1,
            )
        )
