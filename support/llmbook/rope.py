# Generated from notebooks/01_attention.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

"""RoPE's inverse frequencies theta_i, plain and with Llama 3's scaling: the one place
every engine of the book gets them from. Written in notebooks/01_attention.ipynb."""
import math

import numpy as np


def default_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """theta_i = base^(-2i/d) for i = 0 .. d/2 - 1, in float64."""
    return float(theta) ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def llama3_inv_freq(head_dim: int, theta: float, factor: float, low_freq_factor: float,
                    high_freq_factor: float, original_max_position_embeddings: int):
    """Llama 3's frequencies: by wavelength 2 pi / theta_i against the original context
    L, kept below L / high_freq_factor, divided by factor above L / low_freq_factor,
    and blended linearly in L / wavelength between the two."""
    inv_freq = default_inv_freq(head_dim, theta)
    context = original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    g = (context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - g) * inv_freq / factor + g * inv_freq
    low = np.where(wavelen > context / low_freq_factor, inv_freq / factor, blended)
    return np.where(wavelen < context / high_freq_factor, inv_freq, low)


def inv_freq(cfg) -> np.ndarray:
    """A LlamaConfig's inverse frequencies, scaled when it has Llama 3's scaling."""
    s = cfg.rope_scaling
    if s is None:
        return default_inv_freq(cfg.head_dim, cfg.rope_theta)
    return llama3_inv_freq(cfg.head_dim, cfg.rope_theta, s.factor, s.low_freq_factor,
                           s.high_freq_factor, s.original_max_position_embeddings)
