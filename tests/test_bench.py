"""The benchmarks harness and `python -m llmbook bench`: curves on a random checkpoint, the budget
and context rules, skipped engines reported, the roofline sums, and bad input."""
import json

import numpy as np
import pytest

from llmbook import bench, roofline
from llmbook.backends.hf import HFBackend
from llmbook.checkpoint import TOY_GQA
from llmbook.cli import main


class SlowEngine:
    """Pretends to be an engine whose prefill takes 0.05 s per token and decode 0.01 s."""

    name, max_context = "slow", 40

    def __init__(self):
        self.calls = []

    def prefill(self, ids):
        self.calls.append(len(ids))
        import time

        time.sleep(0.05 * len(ids) / 16)
        return np.zeros(8, np.float32)

    def decode(self, token):
        return np.zeros(8, np.float32)


def test_prefill_curve_budget_and_context():
    engine = SlowEngine()
    out = bench.prefill_curve(engine, list(range(64)), [16, 32, 64], repeats=2, budget_s=0.075)
    assert [p["tokens"] for p in out] == [16, 32, 64]
    assert out[0]["n"] == 2 and out[0]["min_s"] <= out[0]["median_s"] <= out[0]["max_s"]
    assert out[1]["n"] == 1  # the warm-up at 32 tokens (0.1 s) was over budget: one run kept
    assert out[1]["over_budget"] and "over_budget" not in out[0]
    assert "longer than the context of 40" in out[2]["skipped"]
    assert engine.calls == [16, 16, 16, 32]


def test_prefill_curve_skips_after_budget():
    out = bench.prefill_curve(SlowEngine(), list(range(40)), [32, 36], repeats=2, budget_s=0.01)
    assert out[0]["n"] == 1 and "over the 0.0 s budget" in out[1]["skipped"]


class ContextEngine:
    """Pretends to be an engine whose decode takes 1 ms plus 20 µs per cached position."""

    name = "ctx"

    def __init__(self, max_context):
        self.max_context, self.length = max_context, 0

    def prefill(self, ids):
        self.length = len(ids)
        return np.zeros(8, np.float32)

    def decode(self, token):
        import time

        time.sleep(0.001 + 20e-6 * self.length)
        self.length += 1
        return np.zeros(8, np.float32)


def test_context_curve_grows_and_caps():
    engines = {"long": ContextEngine(400), "short": ContextEngine(120)}
    out = bench.context_curve(engines, list(range(300)), [1, 100, 300], tokens=2, rounds=2)
    assert out["long"]["contexts"] == [1, 100, 300] and out["long"]["capped"] is None
    # 2 tokens x (2 rounds + a warm-up) must fit after the prompt: 120 - 6 = 114
    assert out["short"]["contexts"] == [1, 100, 114] and "120 tokens" in out["short"]["capped"]
    for r in out.values():
        assert all(lo <= m <= hi for lo, m, hi in zip(r["ms_per_token"], r["median"], r["max"]))
    ms = out["long"]["ms_per_token"]
    assert ms[2] > 3 * ms[0]  # 7 ms against 1 ms, by construction
    with pytest.raises(ValueError, match="cannot make a context of 300"):
        bench.context_curve(engines, list(range(200)), [1, 300])


def test_decode_curve_on_random_checkpoint(toy):
    d = bench.decode_curve(HFBackend(toy), [1, 2, 3, 4], tokens=8, repeats=2)
    assert d["generated"] == list(range(1, 9)) and d["n"] == 2 and d["prompt_tokens"] == 4
    assert all(lo <= med <= hi for lo, med, hi in zip(d["tok_s_min"], d["tok_s_median"], d["tok_s_max"]))
    assert d["tok_s"] == pytest.approx(d["tok_s_median"][-1])
    # without a warm-up run: one prefill per timed run, and nothing else
    engine = HFBackend(toy)
    prefills = []
    prefill = engine.prefill
    engine.prefill = lambda ids: prefills.append(ids) or prefill(ids)
    d = bench.decode_curve(engine, [1, 2, 3, 4], tokens=3, repeats=1, warmup=False)
    assert d["n"] == 1 and len(prefills) == 1


def test_chat_prompt_and_curve(smollm2, toy):
    ids = bench.chat_prompt(smollm2)
    text = smollm2.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\n" + bench.CHAT_SYSTEM)
    assert bench.CHAT_USER in text and text.endswith("<|im_start|>assistant\n")
    assert 90 <= len(ids) <= 120  # about 100 tokens, as the row promises
    c = bench.chat_curve(HFBackend(toy), bench.chat_prompt(toy), tokens=5, repeats=2)
    # the first token in each run, the whole reply in the last run only
    assert c["first_s"]["n"] == 2 and c["all_s"]["n"] == 1 and c["tokens"] == 5
    assert c["first_s"]["min"] < c["all_s"]["max"]


def test_text_ids(toy, smollm2):
    ids = bench.text_ids(smollm2, 300)
    assert len(ids) == 300 and smollm2.detokenize(ids[:5]).startswith("Four score")
    assert len(bench.text_ids(toy, 50)) == 50 and max(bench.text_ids(toy, 50)) < TOY_GQA.vocab_size


def test_run_reports_skipped_and_unknown(toy):
    doc = bench.run(toy, ["hf", "llama.cpp"], prompt_lengths=(4, 8), decode_tokens=4, decode_prompt=4,
                    repeats=1, progress=False)
    assert set(doc["engines"]) == {"hf"} and "llama.cpp" in doc["skipped"]
    r = doc["engines"]["hf"]
    assert [p["tokens"] for p in r["prefill"]] == [4, 8] and 0 < r["roofline_fraction"]
    assert r["decode_bytes_per_token"] == roofline.decode_bytes_per_token(toy.config, context=6)
    # the roof: reads of the step's own bytes, two before each timed decode run (one here)
    read = r["read"]
    assert abs(read["bytes"] - r["decode_bytes_per_token"]) < 0.01 * read["bytes"]
    assert read["n"] == 2 and r["decode_roofline_tok_s"] == pytest.approx(
        read["best"] * 1e9 / r["decode_bytes_per_token"])
    assert doc["limits"]["bandwidth_gbs"] == doc["limits"]["read"]["best"]
    # the chat row: 100 pseudo-ids for a checkpoint without tokenizer, then 64 tokens
    chat = r["chat"]
    assert doc["chat_prompt_tokens"] == chat["prompt_tokens"] == 100 and chat["tokens"] == 64
    assert 0 < chat["first_s"]["median"] < chat["all_s"]["median"] and chat["all_s"]["n"] == 1
    with pytest.raises(ValueError, match="unknown backend"):
        bench.run(toy, ["hf", "onnx"], progress=False)


def test_flops_per_token():
    cfg = TOY_GQA
    h, d, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = h * d + 2 * h * kv + d * h + 3 * h * cfg.intermediate_size
    assert roofline.flops_per_token(cfg) == 2 * (cfg.num_layers * per_layer + cfg.vocab_size * h)
    assert roofline.flops_per_token(cfg, 10) - roofline.flops_per_token(cfg) == cfg.num_layers * 4 * 10 * d


def test_cli_bench(toy_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["bench", "--model", str(toy_dir), "--backends", "hf,mlx", "--prompt-lengths", "4,8",
                 "--tokens", "4", "--repeats", "1", "--out", str(out)]) == 0
    doc = json.loads((out / "bench.json").read_text())
    assert set(doc["engines"]) == {"hf", "mlx"} and (out / "bench.png").stat().st_size > 0
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--backends", "hf,onnx"], "unknown backend(s) onnx"),
    (["--tokens", "0"], "at least 1"),
])
def test_cli_bench_bad_arguments(toy_dir, args, message, capsys):
    assert main(["bench", "--model", str(toy_dir), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
