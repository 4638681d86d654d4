"""Every registered backend against the interface of chapter 3 (llmbook.engine.Backend), on
random checkpoints of two shapes (GQA 8/2 with an untied head; full multi-head, tied): parity
with the reference, reset, the context error and bad token ids. An engine that cannot run here
is skipped with the reason its backend gives."""
import os

import numpy as np
import pytest

from llmbook import backends, device, roofline
from llmbook.backends.hf import HFBackend
from llmbook.engine import Backend, BackendBase, BatchRunner
from llmbook.generation import ContextError, check_context, greedy

PROMPT = [5, 17, 3, 250, 41, 99, 7, 180, 64, 12, 33, 201]
STEPS = 8


@pytest.fixture(scope="module", params=["gqa", "mha"])
def bundle(request, toy, toy_mha):
    return {"gqa": toy, "mha": toy_mha}[request.param]


@pytest.fixture(scope="module", params=backends.names())
def engine(request, bundle):
    try:
        return backends.get_backend(request.param, bundle)
    except backends.BackendUnavailable as e:
        pytest.skip(str(e))


def test_interface(engine, request):
    name = request.node.callspec.params["engine"]
    # the optional members come from BackendBase, with its defaults where the engine has none
    assert isinstance(engine, Backend) and isinstance(engine, BackendBase)
    assert engine.name == name and isinstance(engine.quantized, bool)
    assert engine.quantized == (name in ("tflite-int8", "tflite-int4", "tvm-q4", "mlx-q4", "llama.cpp",
                                         "llama.cpp-q4_0"))
    assert 0 < engine.max_context <= 2048


def test_parity_with_the_reference(engine, bundle):
    own = engine.own_weights
    # an engine that rounds the weights itself (tvm-q4, mlx-q4) is held to the reference model on
    # those rounded weights, exactly; the others to the fp32 one
    ref = HFBackend(bundle if own is None else bundle.with_weights(own))
    got, want = engine.prefill(PROMPT), ref.prefill(PROMPT)
    assert got.shape == want.shape == (bundle.config.vocab_size,) and got.dtype == np.float32
    if not engine.exact:  # weights or activations rounded again: the same function, roughly
        # logits correlate at 0.998 or more after int8 rounding of these random toys, at 0.8 to
        # 0.96 after int4 rounding (LiteRT's symmetric blocks, with int8 activations); a wrong
        # layer or weight order gives about 0. test_tflite holds int8 to its own bounds.
        assert np.corrcoef(got, want)[0, 1] > 0.75
    else:
        assert np.abs(got - want).max() <= 1e-3
        assert greedy(engine, PROMPT, STEPS) == greedy(ref, PROMPT, STEPS)


def test_weight_bytes(engine, bundle):
    """Every engine counts the bytes of weights one decode step reads (chapter 8 divides the
    bandwidth by them). The engines that compute from their own fp32 arrays count what the
    roofline's formula does; a LiteRT file's constants hold them and its own tables (the
    file holds those and its graph); rounded weights are fewer bytes than fp32's (in a
    LiteRT file of a random toy, its fp32 causal mask is a large part of them)."""
    fp32 = roofline.weight_bytes_per_token(bundle.config)
    assert isinstance(engine.weight_bytes, int)
    if not engine.quantized and engine.path is None:
        assert engine.weight_bytes == fp32
    elif not engine.quantized:
        assert fp32 <= engine.weight_bytes < engine.path.stat().st_size
    elif engine.path is None:  # 4 or 8 bits a weight with their scales
        assert 0 < engine.weight_bytes < 0.5 * fp32
    else:
        assert 0 < engine.weight_bytes < min(fp32, engine.path.stat().st_size)


def test_text_logits(engine):
    """Every position's logits in one pass, equal to decoding the text token by token; or None,
    and then llmbook.quality decodes it."""
    rows = engine.text_logits(PROMPT)
    if rows is None:
        pytest.skip(f"{engine.name} has no one-pass text_logits")
    steps = [engine.prefill(PROMPT[:1])] + [engine.decode(t) for t in PROMPT[1:]]
    np.testing.assert_allclose(rows, np.stack(steps), atol=1e-4)


def test_batch_runner_or_unavailable(engine):
    """An engine without a batched decode says so with BackendUnavailable (the CLI's one line);
    one with it returns a llmbook.engine.BatchRunner."""
    if type(engine).batch_runner is BackendBase.batch_runner:
        message = f"backend {engine.name!r} has no batched decode"
        with pytest.raises(backends.BackendUnavailable, match=message):
            engine.batch_runner(2, 64)
    else:
        assert isinstance(engine.batch_runner(2, 64), BatchRunner)


def test_reset(engine):
    fresh = engine.prefill(PROMPT)
    engine.prefill(PROMPT[:5])
    engine.decode(9)
    engine.decode(10)
    np.testing.assert_allclose(engine.prefill(PROMPT), fresh, atol=1e-5)  # prefill starts anew
    first = engine.prefill(PROMPT[:1])
    engine.decode(9)
    engine.reset()  # after reset, a decode is the first token of a new sequence
    np.testing.assert_allclose(engine.decode(PROMPT[0]), first, atol=1e-5)


def test_context_error(engine):
    n = engine.max_context
    with pytest.raises(ContextError, match=f"exceed the context of {n}"):
        engine.prefill([1] * (n + 1))
    engine.prefill([1] * (n - 1))
    engine.decode(2)  # the last free position
    with pytest.raises(ContextError, match=f"{n} cached \\+ 1 new tokens exceed the context of {n}"):
        engine.decode(3)


@pytest.mark.parametrize("ids, message", [
    ([], "no token ids"),
    ([-1], r"token ids \[-1\] out of range"),
    ("vocab", r"token ids \[\d+\] out of range \[0, \d+\)"),
    ([1.5, 2.0], "token ids must be integers"),
])
def test_bad_ids(engine, bundle, ids, message):
    if ids == "vocab":
        ids = [3, bundle.config.vocab_size]
    with pytest.raises(ValueError, match=f"^{engine.name}: {message}"):
        engine.prefill(ids)


def test_a_refused_decode_changes_nothing(engine, bundle):
    engine.prefill(PROMPT)
    want = engine.decode(7)
    engine.prefill(PROMPT)
    with pytest.raises(ValueError, match="out of range"):
        engine.decode(bundle.config.vocab_size)
    np.testing.assert_allclose(engine.decode(7), want, atol=1e-5)


def test_runner_errors_name_the_engine(engine):
    """TVM's and LiteRT's runners are used on their own in chapters 6 and 7: they carry a name,
    so the generation loop's context check reports a ContextError, not an AttributeError."""
    runner = getattr(engine, "runner", None)
    if runner is None:
        pytest.skip(f"{engine.name} has no separate runner")
    assert runner.name == engine.name
    with pytest.raises(ContextError, match=f"backend {engine.name!r}"):
        check_context(runner, runner.max_context, 1)


def test_threads_reach_every_engine(toy, monkeypatch):
    """--threads (device.use_threads) reaches the engines opened after it, and bench.run's own
    use_threads() keeps it."""
    import torch

    monkeypatch.setenv("LLMBOOK_THREADS", os.environ.get("LLMBOOK_THREADS", str(device.threads())))
    before = torch.get_num_threads()
    try:
        assert device.use_threads(1) == 1 and device.use_threads() == 1 and torch.get_num_threads() == 1
        # llama.cpp reads the same device.threads(), but runs only SmolLM2's GGUF: not here
        tvm = backends.get_backend("tvm", toy)
        assert int(tvm.target.attrs["num-cores"]) == 1  # the compile target
        assert backends.get_backend("tflite", toy).threads == 1  # LiteRT's interpreter
    finally:
        torch.set_num_threads(before)
