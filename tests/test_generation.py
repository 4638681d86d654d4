import numpy as np
import pytest

from llmbook.backends import BackendUnavailable, get_backend, names
from llmbook.backends.hf import HFBackend
from llmbook.generation import ContextError, greedy, matching_prefix, stream


def test_matching_prefix():
    assert matching_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert matching_prefix([1, 2], [1, 2, 3]) == 2
    assert matching_prefix([], [1]) == 0


def test_prompt_longer_than_context(toy):
    engine = HFBackend(toy)
    with pytest.raises(ContextError, match="prompt of 250 tokens \\+ 10 new tokens exceeds the context of 256"):
        list(stream(engine, [1] * 250, lambda z: 0, 10))


def test_empty_prompt(toy):
    with pytest.raises(ContextError, match="empty"):
        list(stream(HFBackend(toy), [], lambda z: 0, 1))


def test_stream_stops_at_eos(toy):
    engine = HFBackend(toy)
    first = greedy(engine, [3, 4, 5], 1)[0]
    assert list(stream(engine, [3, 4, 5], lambda z: int(np.argmax(z)), 10, eos=first)) == [first]


def test_hf_backend_prefill_then_decode_equals_longer_prefill(toy):
    engine = HFBackend(toy)
    engine.prefill([1, 2, 3])
    stepped = engine.decode(4)
    assert np.abs(stepped - engine.prefill([1, 2, 3, 4])).max() < 1e-5


def test_unknown_backend(toy):
    with pytest.raises(ValueError, match="unknown backend 'nope'; known backends: hf, torch-fused, mlx"):
        get_backend("nope", toy)
    assert {"hf", "mlx"} <= set(names())


def test_missing_engine_is_reported(toy, monkeypatch):
    from llmbook import backends
    ghost = backends.Entry("llmbook.backends.hf", "HFBackend", "the ghost engine",
                           ("llmbook_no_such_engine",), "k")
    monkeypatch.setitem(backends.REGISTRY, "ghost", ghost)
    with pytest.raises(BackendUnavailable, match="backend 'ghost' needs the ghost engine; "
                                                 "not installed here: llmbook_no_such_engine"):
        get_backend("ghost", toy)
