"""How close a quantized (or otherwise changed) model stays to its reference, on a fixed text.

All three metrics are teacher-forced: both models read the same true tokens, and at every position
we compare what each predicts for the next one. Unlike comparing generated text, one early
disagreement does not make every later position differ.
"""
import numpy as np

from .engine import BackendBase


def log_softmax(logits) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def top1_agreement(logits, ref_logits) -> float:
    """Fraction of positions where both models' most likely next token is the same."""
    a, b = np.asarray(logits), np.asarray(ref_logits)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"expected two [positions, vocab] arrays of one shape, got {a.shape} and {b.shape}")
    return float(np.mean(a.argmax(-1) == b.argmax(-1)))


def kl_divergence(logits, ref_logits) -> float:
    """Mean over positions of KL(reference || model), in nats: the extra surprise, per token, of
    coding the reference's predictions with the model's distribution. 0 when they are equal."""
    lp, lq = log_softmax(ref_logits), log_softmax(logits)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))


def perplexity(logits, targets) -> float:
    """exp(mean negative log-likelihood) of `targets`, where logits[i] predicts targets[i]."""
    lp = log_softmax(logits)
    targets = np.asarray(targets)
    if lp.shape[0] != targets.shape[0]:
        raise ValueError(f"{lp.shape[0]} positions of logits for {targets.shape[0]} targets")
    return float(np.exp(-np.mean(lp[np.arange(targets.size), targets])))


def teacher_forced(backend, ids) -> np.ndarray:
    """Logits [len(ids), vocab] of any backend fed the true tokens: row i predicts ids[i+1].

    Uses only the backend interface (prefill of the first token, then decode of each next one), so
    every engine in the book is measured the same way; the text must fit in its context. A backend
    whose `text_logits` gives the rows (the transformers reference) computes them all in one
    forward pass instead: the same causal arithmetic, equal to the step-by-step rows to fp32
    rounding. Other backends' `text_logits` is llmbook.engine.BackendBase's: None; any other
    object with the Backend protocol's prefill and decode is fed token by token."""
    if len(ids) > backend.max_context:
        raise ValueError(f"{len(ids)} tokens exceed the context of {backend.max_context} of {backend.name!r}")
    # the optional member is declared by BackendBase; an engine-side runner used as a
    # backend (chapter 7's LiteRTRunner) has only the protocol's prefill and decode
    if isinstance(backend, BackendBase) and (rows := backend.text_logits(list(ids))) is not None:
        return np.asarray(rows, dtype=np.float32)
    rows = [backend.prefill(list(ids[:1]))]
    rows += [backend.decode(int(t)) for t in ids[1:]]
    return np.stack(rows).astype(np.float32)


def compare_on_text(logits, ref_logits, ids) -> dict:
    """The three metrics for logits from teacher_forced(model) and teacher_forced(reference)."""
    targets = np.asarray(ids[1:])
    return {"positions": int(targets.size),
            "top1_agreement": top1_agreement(logits[:-1], ref_logits[:-1]),
            "kl_divergence": kl_divergence(logits[:-1], ref_logits[:-1]),
            "perplexity": perplexity(logits[:-1], targets),
            "ref_perplexity": perplexity(ref_logits[:-1], targets)}
