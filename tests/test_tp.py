"""Chapter 13's tensor-parallel engine (llmbook.torch_tp, backend torch-tp): the split's
checks, parity with the reference at 2 ranks (random GQA checkpoint), workers that never
outlive their engine, and the command line's one-line errors. The generic interface tests run
in tests/test_backends.py; SmolLM2 at 3 ranks, torchrun and parallelize_module run in the
chapter."""
import gc
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from llmbook import cli
from llmbook.backends.hf import HFBackend
from llmbook.backends.torch_tp import TorchTPBackend
from llmbook.checkpoint import TOY_GQA
from llmbook.generation import greedy
from llmbook.torch_tp.shard import check_ranks, default_ranks, rank_counts, shard, step_bytes

PROMPT = [5, 17, 3, 250, 41, 99, 7, 180, 64, 12, 33, 201]


def alive(pid: int) -> bool:
    """The process exists and is not a zombie waiting for its parent to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_heads_decide_the_rank_counts(smollm2):
    assert rank_counts(smollm2.config) == [1, 3]  # 9 query heads, 3 key/value heads
    assert rank_counts(TOY_GQA) == [1, 2]  # 8 and 2
    assert default_ranks(smollm2.config, cores=2) == 1
    assert default_ranks(smollm2.config, cores=8) == 3 and default_ranks(TOY_GQA, 8) == 2
    with pytest.raises(ValueError, match="2 ranks do not divide the model's 9 query heads "
                                         "and 3 key/value heads; rank counts that do: 1, 3"):
        check_ranks(smollm2.config, 2)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="at least 1 rank"):
            check_ranks(TOY_GQA, bad)


def test_the_parts_hold_every_weight_once(toy):
    """Every rank's share of a split matrix together is the whole matrix, in order; the
    step's bytes are the checkpoint's (a padded head row is not counted)."""
    sd, cfg = toy.state_dict, toy.config
    parts = [shard(sd, cfg, r, 2) for r in range(2)]
    down = torch.cat([p["0.down"] for p in parts], dim=1)
    assert torch.equal(down, sd["model.layers.0.mlp.down_proj.weight"])
    q_rows = cfg.num_heads * cfg.head_dim // 2
    q = torch.cat([p["1.qkv"][:q_rows] for p in parts])
    assert torch.equal(q, sd["model.layers.1.self_attn.q_proj.weight"])
    odd = [shard(sd, cfg, r, 1) for r in range(1)]
    assert step_bytes(parts, cfg) == step_bytes(odd, cfg)


@pytest.fixture(scope="module")
def toy_tp(toy):
    engine = TorchTPBackend(toy, tp=2)
    yield engine
    engine.close()


def test_two_ranks_match_the_reference(toy_tp, toy):
    ref = HFBackend(toy)
    got, want = toy_tp.prefill(PROMPT), ref.prefill(PROMPT)
    assert toy_tp.ranks == 2 and toy_tp.device == "cpu"
    assert np.abs(got - want).max() <= 1e-4
    assert greedy(toy_tp, PROMPT, 8) == greedy(ref, PROMPT, 8)


# SmolLM2 at 3 ranks against the reference (1e-3, greedy tokens): chapter 13, section 3


# the same split launched by torchrun at 2 ranks (greedy tokens equal the reference's) and
# built by parallelize_module (placement, local shape, logits within 1e-4 of this engine's):
# chapter 13, sections 3 and 4, on this random checkpoint


def test_close_and_collection_end_the_workers(toy):
    engine = TorchTPBackend(toy, tp=1)
    pids = [p.pid for p in engine.group.procs]
    engine.close()
    assert not any(alive(p) for p in pids)
    with pytest.raises(RuntimeError, match="the engine is closed"):
        engine.decode(1)
    engine = TorchTPBackend(toy, tp=1)
    pids = [p.pid for p in engine.group.procs]
    del engine
    gc.collect()
    assert not any(alive(p) for p in pids)


def test_workers_die_with_their_parent(toy_dir):
    """SIGKILL leaves the engine's process no time to close anything: its ranks still go."""
    script = textwrap.dedent(f"""\
        import time
        from llmbook.backends.torch_tp import TorchTPBackend
        from llmbook.checkpoint import load_model

        if __name__ == "__main__":
            engine = TorchTPBackend(load_model({str(toy_dir)!r}), tp=2)
            print(*[p.pid for p in engine.group.procs], flush=True)
            time.sleep(120)
        """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2 and all(alive(p) for p in pids)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids)


def test_more_ranks_than_cores_is_a_warning(toy_mha, capfd):
    ranks = 4  # the toy's 4 heads split 4 ways; more than this machine's cores
    if (os.cpu_count() or 1) >= ranks:
        pytest.skip(f"this machine has {os.cpu_count()} cores, not fewer than {ranks}")
    engine = TorchTPBackend(toy_mha, tp=ranks)
    try:
        err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
        assert err == [f"warning: torch-tp: {ranks} ranks on {os.cpu_count()} cores share "
                       f"them; expect it slower than {os.cpu_count()}"]
        assert engine.threads_per_rank == 1
        assert np.abs(engine.prefill(PROMPT) - HFBackend(toy_mha).prefill(PROMPT)).max() <= 1e-4
    finally:
        engine.close()


def test_compare_on_the_command_line(toy_dir, capsys):
    argv = ["compare", "--backend", "torch-tp", "--tp", "2", "--model", str(toy_dir),
            "--token-ids", "5,17,3,250", "--steps", "4"]
    assert cli.main(argv) == 0
    assert "greedy tokens equal: 4/4" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--backend", "torch-tp", "--tp", "0"], "argument --tp: must be at least 1, got 0"),
    (["--backend", "torch-tp", "--tp", "2"],
     "2 ranks do not divide the model's 9 query heads and 3 key/value heads"),
    (["--backend", "hf", "--tp", "3"], "--tp applies to --backend torch-tp only, not 'hf'"),
])
def test_bad_tp_is_one_line(argv, message, capsys):
    assert cli.main(["compare", *argv, "--token-ids", "1,2,3", "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="the NCCL path needs a CUDA GPU for each of 2 ranks")
def test_nccl_on_gpus(toy):
    engine = TorchTPBackend(toy, tp=2)
    try:
        assert engine.device == "cuda"
        assert np.abs(engine.prefill(PROMPT) - HFBackend(toy).prefill(PROMPT)).max() <= 1e-4
    finally:
        engine.close()
