# Generated from notebooks/03_generation.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from llmbook.mlx_llama.layer import EncoderLayer


class Llama(nn.Module):
    def __init__(self, cfg, rope_traditional: bool = False):
        super().__init__()
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [
            EncoderLayer(cfg, rope_traditional) for _ in range(cfg.num_layers)
        ]
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            self.out_proj = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def __call__(self, tokens, cache=None):
        mask = "causal" if tokens.shape[1] > 1 else None
        x = self.embedding(tokens)
        cache = cache or [None] * len(self.layers)
        for i, layer in enumerate(self.layers):
            x, cache[i] = layer(x, mask, cache[i])
        x = self.norm(x)
        # tied embeddings
        head = self.out_proj if "out_proj" in self else self.embedding.as_linear
        return head(x), cache


def generate(model, prompt_ids, sample, max_tokens, eos=None):
    """Yield up to max_tokens tokens: the prompt in one forward pass, then one token per
    pass."""
    tokens, cache = mx.array([prompt_ids]), None
    for _ in range(max_tokens):
        logits, cache = model(tokens, cache)
        # np.array forces MLX to evaluate the graph
        token = sample(np.array(logits[0, -1]))
        yield token
        if token == eos:
            return
        tokens = mx.array([[token]])
