import dataclasses

import pytest

from llmbook import device
from llmbook.checkpoint import TOY_GQA, load_model, random_checkpoint

device.use_threads()

# A third shape: full multi-head attention, head_dim 16, tied embeddings, another rope_theta.
TOY_MHA = dataclasses.replace(
    TOY_GQA, num_heads=4, num_kv_heads=4, head_dim=16, hidden_size=64, intermediate_size=96,
    rope_theta=10000.0, tie_word_embeddings=True, num_layers=2,
)


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("toy_gqa"), TOY_GQA, seed=3)


@pytest.fixture(scope="session")
def toy(toy_dir):
    return load_model(toy_dir)


@pytest.fixture(scope="session")
def toy_mha(tmp_path_factory):
    return load_model(random_checkpoint(tmp_path_factory.mktemp("toy_mha"), TOY_MHA, seed=4))


@pytest.fixture(scope="session")
def smollm2():
    return load_model(None)
