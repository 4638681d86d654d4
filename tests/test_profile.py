"""Chapter 6's profile of a TVM decode step (llmbook.tvm_llama.profile), on a random
checkpoint: the replay runs the step's own kernels and leaves the cache as it found it."""
import numpy as np
import pytest

from llmbook.backends import BackendUnavailable, get_backend
from llmbook.tvm_llama.profile import CAUSES, record_step, step_profile

PROMPT = [5, 17, 3, 250, 41, 99, 7, 180]


@pytest.fixture(scope="module", params=["tvm", "tvm-q4"])
def engine(request, toy):
    try:
        return get_backend(request.param, toy)
    except BackendUnavailable as e:
        pytest.skip(str(e))


def test_profile_counts_every_matrix_once(engine, toy):
    engine.prefill(PROMPT)
    p = step_profile(engine.runner, 3, rounds=3)
    assert list(p["causes"]) == list(CAUSES)
    weights = p["causes"]["weight matrices"]
    # every matrix of every layer and the head: 4 fused products a layer, plus the head
    assert weights["calls"] == 4 * toy.config.num_layers + 1
    assert 0.9 * engine.weight_bytes < weights["weight_bytes"] < engine.weight_bytes
    assert p["causes"]["attention (KV cache)"]["calls"] == toy.config.num_layers
    assert p["step_s"] > 0 and 0 < p["replay_s"] and p["vm_calls"] > p["bookkeeping_calls"]
    total = sum(k["seconds"] for k in p["kernels"].values())
    assert total == pytest.approx(sum(c["seconds"] for c in p["causes"].values()))


def test_replay_leaves_the_sequence_as_it_was(engine):
    """After the profile's replays, decoding goes on as if they never ran."""
    engine.prefill(PROMPT)
    steps = [int(np.argmax(engine.decode(t))) for t in (3, 9, 4)]
    engine.prefill(PROMPT)
    engine.decode(3)
    calls = record_step(engine.runner, 9)  # a real step, recorded
    from llmbook.tvm_llama.profile import replay

    replay(engine.runner, calls)
    replay(engine.runner, calls)
    assert int(np.argmax(engine.decode(4))) == steps[2]
    assert engine.runner.lengths[0] == len(PROMPT) + 3
