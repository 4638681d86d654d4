"""Speculative decoding (chapter 12): the verify step and rollback of each engine that has them,
the drafters, the acceptance rule, and the command line. Chapter 12 measures the speed and
checks SmolLM2; these tests check the same guarantees on random checkpoints and at the edges."""
import json

import numpy as np
import pytest

from llmbook import backends
from llmbook.backends.hf import HFBackend
from llmbook.cli import main
from llmbook.generation import stream
from llmbook.sampling import Sampler
from llmbook.speculative import (LayersDrafter, Policy, PromptLookup, accept_or_resample,
                                 speculative_stream)


def engine_on(name, bundle):
    return backends.get_backend(name, bundle)


@pytest.fixture(scope="module", params=["hf", "tvm", "mlx"])
def engines(request, toy, toy_mha):
    if backends.missing(request.param):
        pytest.skip(f"{request.param} is not installed here")
    return request.param, {b.name: (b, engine_on(request.param, b)) for b in (toy, toy_mha)}


def repeating_prompt(vocab: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    phrase = [int(t) for t in rng.integers(0, vocab, 5)]
    return phrase * 3 + [int(t) for t in rng.integers(0, vocab, 4)]


def test_verify_rows_equal_decode_steps_and_rollback_restores(engines):
    for bundle, engine in engines[1].values():
        ids = repeating_prompt(bundle.config.vocab_size, 1)
        engine.prefill(ids)
        guesses = ids[:6]
        rows = engine.verify(guesses)
        assert rows.shape == (6, bundle.config.vocab_size)
        engine.rollback(6)
        steps = np.stack([engine.decode(t) for t in guesses])
        assert np.abs(rows - steps).max() < 1e-4
        with pytest.raises(ValueError):
            engine.rollback(len(ids) + 7)  # more than the sequence holds


@pytest.mark.parametrize("k", [1, 3, 8])
def test_greedy_speculation_gives_the_greedy_tokens(engines, k):
    name, pairs = engines
    for bundle, engine in pairs.values():
        small = engine_on(name, bundle.first_layers(1))
        for seed in (2, 3):
            ids = repeating_prompt(bundle.config.vocab_size, seed)
            plain = list(stream(engine, ids, Sampler(), 30))
            for drafter in (PromptLookup(max_ngram=2, min_ngram=1), LayersDrafter(small)):
                stats = {}
                spec = list(speculative_stream(engine, drafter, ids, Sampler(), 30, k=k,
                                               stats=stats))
                assert spec == plain, (name, bundle.name, type(drafter).__name__, k)
                assert stats["calls"] < 30 or stats["accepted"] == 0


def test_eos_and_max_tokens_end_a_round_early(toy):
    engine = HFBackend(toy)
    ids = repeating_prompt(toy.config.vocab_size, 4)
    plain = list(stream(engine, ids, Sampler(), 40))
    for n in (1, 2, 5, 17):
        got = list(speculative_stream(engine, PromptLookup(2, 1), ids, Sampler(), n, k=8))
        assert got == plain[:n]
    eos = plain[6]  # a token the answer reaches: stop there, as plain decoding does
    with_eos = list(stream(engine, ids, Sampler(), 40, eos=eos))
    got = list(speculative_stream(engine, PromptLookup(2, 1), ids, Sampler(), 40, eos=eos, k=8))
    assert got == with_eos and got[-1] == eos


def test_prompt_lookup_guesses_what_followed_the_latest_match():
    lookup = PromptLookup(max_ngram=3, min_ngram=2)
    lookup.start([5, 6, 7, 8, 1, 5, 6, 9, 4, 5, 6])
    guess, dist = lookup.propose(3, Sampler())
    assert guess == [9, 4, 5] and dist is None  # the latest "5 6", not the first
    lookup.accept([9])
    assert lookup.propose(2, Sampler())[0] == [4, 5]  # "5 6 9" matched, the longest first
    lookup.start([1, 2, 3, 4])
    assert lookup.propose(4, Sampler()) == ([], None)
    with pytest.raises(ValueError):
        PromptLookup(max_ngram=1, min_ngram=2)


def chi_square(counts, p):
    expected = p * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("certain", [False, True])
def test_the_acceptance_rule_keeps_the_model_distribution(certain):
    rng = np.random.default_rng(5)
    p, q = rng.dirichlet(np.ones(5)), rng.dirichlet(np.ones(5) * 0.5)
    counts = np.zeros(5)
    for _ in range(12000):
        guess = 3 if certain else int(rng.choice(5, p=q))
        counts[accept_or_resample(p, None if certain else q, guess, rng)[1]] += 1
    assert chi_square(counts, p) < 18.47  # 4 degrees of freedom, p = 0.001
    # and the rule is not plain sampling from q: a q far from p would fail the same test
    wrong = np.bincount(rng.choice(5, size=12000, p=q), minlength=5)
    assert chi_square(wrong, p) > 18.47


def test_policy_turns_guessing_off_when_guesses_are_not_kept():
    cost = [1.0, 1.1, 1.2, 1.3, 1.4, 1.5]
    policy = Policy(cost)
    for _ in range(10):
        policy.update(5, False)
    assert policy.k() == 5 and policy.acceptance > 0.9
    for _ in range(60):  # recent rounds weigh most: the old ones fade out
        policy.update(0, True)
    assert policy.k() == 0 and policy.acceptance < 0.1
    assert Policy(cost, draft_cost=1.0, prior=0.5).k() == 0  # guesses as dear as steps


def test_tvm_verify_of_several_sequences_in_one_call(toy):
    if backends.missing("tvm"):
        pytest.skip("tvm is not installed here")
    engine = engine_on("tvm", toy)
    runner = engine.batch_runner(max_batch=3, max_tokens=512)
    prompts = {s: repeating_prompt(toy.config.vocab_size, 10 + s) for s in range(3)}
    runner.extend_many(prompts)
    free = runner.free_pages()
    chunks = {0: [1, 2, 3], 2: [4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]}
    rows = runner.verify(chunks)
    for seq, ids in chunks.items():
        assert rows[seq].shape == (len(ids), toy.config.vocab_size)
        runner.popn(seq, len(ids))
    assert runner.free_pages() == free  # the pages the chunks took are back
    for seq, ids in chunks.items():
        steps = np.stack([runner.step({seq: t})[seq] for t in ids])
        assert np.abs(rows[seq] - steps).max() < 1e-4
    with pytest.raises(ValueError, match="no sequence 7"):
        runner.verify({7: [1]})


def test_cli_generate_and_compare_with_speculation(toy_dir, capsys):
    ids = ",".join(map(str, repeating_prompt(256, 6)))
    base = ["generate", "--backend", "hf", "--model", str(toy_dir), "--token-ids", ids,
            "--max-tokens", "24"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    for spec in ("ngram:4", "layers:1:3"):
        assert main([*base, "--speculate", spec]) == 0
        out = capsys.readouterr()
        assert out.out == plain and out.err.startswith("speculation: ")
    args = ["compare", "--backend", "hf", "--model", str(toy_dir), "--token-ids", ids,
            "--steps", "16", "--speculate", "ngram:3"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["greedy_match"] == 16 and result["speculate"] == "ngram:3"


@pytest.mark.parametrize("value, message", [
    ("ngram:0", "argument --speculate: must be ngram:K or layers:N[:K]"),
    ("ngram", "argument --speculate"),
    ("ngram:x", "argument --speculate"),
    ("layers:2:0", "argument --speculate"),
    ("tree:3", "argument --speculate"),
    ("layers:9", "--speculate layers:9"),  # the toy checkpoint has 3 layers
])
def test_bad_speculate_values_are_one_line(toy_dir, value, message, capsys):
    args = ["generate", "--backend", "hf", "--model", str(toy_dir), "--token-ids", "1,2,3",
            "--speculate", value]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_an_engine_without_verify_is_one_line(toy_dir, capsys):
    if backends.missing("llama.cpp"):
        pytest.skip("llama.cpp is not installed here")
    # llama.cpp runs GGUF files only: the shipped model; it has no verify call
    args = ["generate", "--backend", "llama.cpp", "--prompt", "hi", "--speculate", "ngram:2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cannot score several new tokens in one call" in err
    assert len(err.strip().splitlines()) == 1


def test_sampled_speculation_keeps_the_distribution(tmp_path):
    """The whole loop, sampling at temperature 1 on a random checkpoint of 4 tokens: for each
    first token seen often enough, the counts of the second token (the one a verify call
    decides) fit the model's distribution after it."""
    import dataclasses

    from llmbook.checkpoint import TOY_GQA, load_model, random_checkpoint

    config = dataclasses.replace(TOY_GQA, vocab_size=4, num_layers=2)
    bundle = load_model(random_checkpoint(tmp_path, config, seed=8))
    engine, prompt = HFBackend(bundle), [1, 2, 3, 1, 2]
    stats, pairs, guessed = {}, np.zeros((4, 4)), 0
    for seed in range(500):
        # 3 tokens: the round after the first verifies it with one guess
        run = speculative_stream(engine, PromptLookup(1, 1), prompt,
                                 Sampler(temperature=1.0, seed=seed), 3, k=1, stats=stats)
        a, b, _ = run
        pairs[a, b] += 1
        guessed += stats["proposed"]
    tested = 0
    for a in np.flatnonzero(pairs.sum(1) >= 80):
        p = Sampler(temperature=1.0).probabilities(engine.prefill(prompt + [int(a)]))
        assert chi_square(pairs[a], p) < 16.27, (a, pairs[a], p)  # 3 d.o.f., p = 0.001
        tested += 1
    assert tested >= 2 and guessed > 200  # and most second tokens came from a verify call
