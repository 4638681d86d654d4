"""Chapter 10: many sequences in TVM's paged KV cache. Batched decode against each sequence alone,
fork and remove against the cache's page count, continuous batching, a full cache, and the
`batch` command line, on random checkpoints (one whose sizes are not multiples of 16, so the
schedule rule's fallback without the register tile runs too)."""
import dataclasses
import json

import numpy as np
import pytest

from llmbook.backends import get_backend
from llmbook.backends.hf import HFBackend
from llmbook.checkpoint import TOY_GQA, load_model, random_checkpoint
from llmbook.cli import main
from llmbook.generation import greedy
from llmbook.serving import Request, StepModel, batch_vs_solo, latencies, serve
from llmbook.engine import PAGE_SIZE, CacheFull

# hidden 40 and ffn 72: the matrix products' sums are not a multiple of 16 lanes
TOY_ODD = dataclasses.replace(TOY_GQA, hidden_size=40, intermediate_size=72, num_heads=4,
                              num_kv_heads=2, head_dim=10, num_layers=2)


@pytest.fixture(scope="module", params=["tvm", "tvm-q4"])
def engine(request, toy):
    # libraries from the on-disk cache (built on the first run), as the command line uses them;
    # tvm-q4 rounds the toy's weights to 4 bits and batches with its few-token product
    return get_backend(request.param, toy)


def prompts(n, vocab, seed=0):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, vocab, 3 + 7 * i % 23)] for i in range(n)]


@pytest.mark.parametrize("n", [6, 19])  # 4-bit passes of 16 tokens, then 8, 4, 2 and 1
def test_batched_tokens_equal_solo_runs(engine, toy, n):
    result = batch_vs_solo(engine, engine.batch_runner(n, 1024), prompts(n, toy.config.vocab_size), 9)
    assert result["all_match"] and result["sequences"] == n and result["steps"] == 9


def test_odd_sizes_match_the_reference(tmp_path):
    odd = load_model(random_checkpoint(tmp_path / "odd", TOY_ODD, seed=5))
    engine = get_backend("tvm", odd)
    ids = [4, 99, 7, 300, 12, 5, 61]
    assert float(np.max(np.abs(engine.prefill(ids) - HFBackend(odd).prefill(ids)))) < 1e-3
    assert greedy(engine, ids, 8) == greedy(HFBackend(odd), ids, 8)
    assert batch_vs_solo(engine, engine.batch_runner(4, 256), prompts(4, odd.config.vocab_size), 6)["all_match"]


def test_pages_follow_add_fork_step_remove(engine):
    runner = engine.batch_runner(4, 256)
    used = lambda: runner.total_pages - runner.free_pages()  # noqa: E731
    runner.add(0, list(range(1, PAGE_SIZE + 1)))  # exactly one full page
    assert used() == 1
    runner.fork(0, 1)
    assert used() == 1 and runner.lengths == {0: PAGE_SIZE, 1: PAGE_SIZE}  # the page is shared
    logits = runner.step({0: 5, 1: 5})
    assert used() == 3  # each appended into a page of its own
    assert np.array_equal(logits[0], logits[1])  # same tokens so far: same next-token logits
    runner.remove(0)
    runner.remove(1)
    assert used() == 0 and runner.lengths == {}


def test_extend_fork_at_and_extend_many_give_the_logits_of_one_prefill(engine, toy):
    # chapter 11's server prefills prompts in chunks, after a forked prefix, and several
    # prompts in one call: each must give what one prefill of the whole prompt gives
    ids = prompts(4, toy.config.vocab_size, 3)[3] + list(range(40))  # 64 tokens
    runner = engine.batch_runner(8, 1024)
    whole = runner.add(0, ids)
    runner.add(1, ids[:20])
    assert np.abs(runner.extend(1, ids[20:]) - whole).max() < 1e-4
    for at in (PAGE_SIZE, 20, len(ids)):  # a full page, a part-filled one, all of it
        free = runner.free_pages()
        runner.fork(0, 2, at=at)
        assert runner.lengths[2] == at
        # shared full pages; a part-filled last page is copied
        assert free - runner.free_pages() == (at % PAGE_SIZE > 0)
        if at < len(ids):
            assert np.abs(runner.extend(2, ids[at:]) - whole).max() < 1e-4
        runner.remove(2)
    many = runner.extend_many({3: ids, 4: ids[:30], 1: [5]})  # new, new and cached
    assert np.abs(many[3] - whole).max() < 1e-4
    alone = engine.batch_runner(2, 256)
    assert np.abs(many[4] - alone.add(0, ids[:30])).max() < 1e-4
    assert np.abs(many[1] - alone.add(1, ids + [5])).max() < 1e-4
    assert runner.lengths == {0: 64, 1: 65, 3: 64, 4: 30}
    with pytest.raises(ValueError, match="cannot fork 0 at 65"):
        runner.fork(0, 9, at=65)


def test_full_cache_and_bad_ids_are_refused(engine, toy):
    runner = engine.batch_runner(2, 2 * PAGE_SIZE)
    runner.add(0, list(range(1, runner.total_pages * PAGE_SIZE + 1)))  # every page
    with pytest.raises(CacheFull, match="free pages"):
        runner.step({0: 3})
    with pytest.raises(CacheFull, match="free pages"):
        runner.add(1, [1, 2, 3])
    with pytest.raises(ValueError, match="no sequence 7"):
        runner.step({7: 1})
    with pytest.raises(ValueError, match="out of range"):
        runner.step({0: toy.config.vocab_size})


def test_continuous_batching(engine, toy):
    vocab = toy.config.vocab_size
    requests = [Request(i, p, 2 + (5 * i) % 9, arrival=3 * i) for i, p in enumerate(prompts(7, vocab, 1))]
    # a cache too small for all of them at once: admission must wait for pages
    log = serve(engine.batch_runner(3, 6 * PAGE_SIZE), requests, max_batch=3)
    assert max(log["batch_sizes"]) <= 3
    for r in requests:
        assert len(r.tokens) == r.max_new_tokens and r.admitted >= r.arrival and r.finished > r.admitted
        assert r.tokens == greedy(engine, r.prompt, r.max_new_tokens)
    assert sorted(log["batch_sizes"]) != log["batch_sizes"] or len(set(log["batch_sizes"])) > 1
    # each request's latencies, on serve's one clock
    for r in requests:
        assert 0 <= r.arrived_s <= r.first_token_s <= r.last_token_s <= log["seconds"]
        assert r.ttft_s > 0 and (r.tpot_s is None) == (r.max_new_tokens == 1)
    lat = latencies(requests)
    assert 0 < lat["ttft_s"][50] <= lat["ttft_s"][90] and 0 < lat["tpot_s"][50] <= lat["tpot_s"][90]
    too_big = [Request(0, list(range(1, 200)), 10)]
    with pytest.raises(ValueError, match="more pages than the whole cache"):
        serve(engine.batch_runner(2, 4 * PAGE_SIZE), too_big, max_batch=2)


def test_static_batching(engine, toy):
    vocab = toy.config.vocab_size
    workload = lambda: [Request(i, p, 2 + (5 * i) % 9, arrival=i)  # noqa: E731
                        for i, p in enumerate(prompts(7, vocab, 2))]
    continuous, static = workload(), workload()
    steps = serve(engine.batch_runner(3, 512), continuous, max_batch=3)["steps"]
    log = serve(engine.batch_runner(3, 512), static, max_batch=3, static=True)
    assert max(log["batch_sizes"]) <= 3 and log["steps"] > steps
    for r in static:
        assert r.tokens == greedy(engine, r.prompt, r.max_new_tokens)
        # a group is admitted only when every request admitted before it has left
        assert all(q.finished <= r.admitted for q in static if q.admitted < r.admitted)
    served_again = serve(engine.batch_runner(3, 512), static, max_batch=3, static=True)
    assert served_again["steps"] == log["steps"]  # the same requests, their clocks reset
    assert all(r.arrived_s <= r.first_token_s for r in static)


def test_step_model_crossover():
    # 1 GB of weights at 10 GB/s: 0.1 s a step; a sequence adds 0.1 GB of keys and values
    # (0.01 s) and 2 GFLOP at 100 GFLOP/s (0.02 s): the terms meet at 0.1 / (0.02 - 0.01) = 10
    model = StepModel(weight_bytes=1e9, kv_bytes=1e8, flops=2e9, bandwidth_gbs=10, gflops=100)
    b = model.crossover()
    assert b == pytest.approx(10)
    assert model.compute_s(b) == pytest.approx(model.memory_s(b))  # flops/rate == bytes/bw
    assert model.step_s(9) == model.memory_s(9) > model.compute_s(9)
    assert model.step_s(11) == model.compute_s(11) > model.memory_s(11)
    # the step grows from batch 2 on, by the keys and values alone: growth is not compute
    assert model.step_s(2) > 1.01 * model.step_s(1) and model.step_s(2) == model.memory_s(2)
    # no keys and values: B* = (W / BW) / (F / C)
    assert StepModel(1e9, 0, 2e9, 10, 100).crossover() == pytest.approx(5)
    # a sequence that adds more reading than arithmetic never turns the step compute-bound
    assert StepModel(1e9, 3e8, 2e9, 10, 100).crossover() == float("inf")


def test_cli_batch(toy_dir, capsys):
    assert main(["batch", "--backend", "tvm", "--model", str(toy_dir), "--sequences", "3",
                 "--steps", "5"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) == {"backend", "sequences", "steps", "aggregate_tok_s", "single_tok_s",
                           "speedup", "all_match"}
    assert result["all_match"] is True and result["sequences"] == 3 and result["steps"] == 5
    assert result["aggregate_tok_s"] > 0 and result["single_tok_s"] > 0


@pytest.mark.parametrize("args, words", [
    (["--sequences", "0"], ["--sequences", "at least 1"]),
    (["--steps", "-2"], ["--steps", "at least 1"]),
    (["--cache-tokens", "32"], ["pages", "holds 2"]),
    (["--steps", "256"], ["--steps 256", "no room", "256 tokens"]),
])
def test_cli_batch_bad_input(toy_dir, capsys, args, words):
    assert main(["batch", "--backend", "tvm", "--model", str(toy_dir), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and all(w in err for w in words)


def test_cli_batch_fits_prompts_to_a_short_context(toy_dir, capsys):
    # the toy's context is 256: 250 steps leave 6 tokens for each prompt
    assert main(["batch", "--backend", "tvm", "--model", str(toy_dir), "--sequences", "2",
                 "--steps", "250"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["all_match"] is True


def test_cli_batch_needs_a_batched_backend(toy_dir, capsys):
    assert main(["batch", "--backend", "hf", "--model", str(toy_dir)]) == 2
    assert "has no batched decode" in capsys.readouterr().err
