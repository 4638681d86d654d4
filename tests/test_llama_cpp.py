"""The llama.cpp backend (llama-cpp-python on SmolLM2's own Q4_1 GGUF). `make` compiles it; where
it could not be compiled these tests are skipped, and the skip is reported."""
import numpy as np
import pytest

from llmbook import bench, quality
from llmbook.backends import BackendUnavailable, get_backend
from llmbook.backends.hf import HFBackend
from llmbook.generation import ContextError

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make could not compile it; see book/how_to_run.md)")


@pytest.fixture(scope="module")
def engine(smollm2):
    return get_backend("llama.cpp", smollm2, n_ctx=256)


def test_agrees_with_the_reference_on_text(smollm2, engine):
    # The fp32 reference is the GGUF's Q4_1 weights dequantized, so llama.cpp holds the very same
    # weights; only its 8-bit activations in the dot products differ: close, not equal.
    text = bench.text_ids(smollm2)[:100]
    s = quality.compare_on_text(quality.teacher_forced(engine, text), quality.teacher_forced(HFBackend(smollm2), text), text)
    assert s["top1_agreement"] >= 0.9 and s["kl_divergence"] < 0.05, s
    assert abs(s["perplexity"] / s["ref_perplexity"] - 1) < 0.05, s


def test_prefill_starts_afresh(smollm2, engine):
    ids = smollm2.chat_ids("What is the capital of France?")
    first = engine.prefill(ids)
    engine.decode(int(np.argmax(first)))
    assert np.array_equal(engine.prefill(ids), first)  # the cache of the earlier request is gone


def test_bad_input(smollm2, engine):
    with pytest.raises(ContextError, match="exceed the context of 256"):
        engine.prefill([1] * 257)
    with pytest.raises(ValueError, match="out of range"):
        engine.prefill([smollm2.config.vocab_size])


def test_only_for_the_model_with_a_gguf(toy):
    with pytest.raises(BackendUnavailable, match="was not loaded from a GGUF file"):
        get_backend("llama.cpp", toy)
