"""The benchmarks harness (chapter 8 and `python -m llmbook bench`): every engine the machine has on
the same prompts; prefill time against prompt length, decode speed against generated length; the
median and spread of several repeats, and the machine's limits measured in the same run.

Prompts are cut from the public-domain text shipped in the package (llmbook/data), so every engine and every device
reads the same tokens. Engines that are not installed, or have no device here, are listed as skipped
with the reason, never silently left out.
"""
from __future__ import annotations

import statistics
import sys
import time
from importlib import resources

import numpy as np
from tqdm import tqdm

from . import backends, device, roofline, timing
from .generation import check_context

TEXT = resources.files("llmbook") / "data" / "public_domain.txt"  # package data: also in a wheel
ENGINES = backends.names()  # every engine the book has, in the registry's order


def text_ids(bundle, n: int | None = None) -> list[int]:
    """The shipped text as token ids (no chat template), repeated if `n` asks for more."""
    if bundle.tokenizer is None:  # a reader's checkpoint without tokenizer: fixed pseudo-text
        rng = np.random.default_rng(0)
        ids = [int(t) for t in rng.integers(0, bundle.config.vocab_size, max(n or 256, 1))]
    else:
        ids = bundle.tokenizer(TEXT.read_text(), add_special_tokens=False)["input_ids"]
    if n is not None:
        ids = (ids * (n // len(ids) + 1))[:n]
    return ids


def open_engines(bundle, names: list[str], log=print) -> tuple[dict, dict]:
    """{name: backend} for the engines that run here, {name: reason} for those that do not."""
    engines, skipped = {}, {}
    for name in names:
        try:
            engines[name] = backends.get_backend(name, bundle)
        except backends.BackendUnavailable as e:
            skipped[name] = str(e)
            log(f"skipped {name}: {e}")
    return engines, skipped


def prefill_curve(engine, ids: list[int], lengths: list[int], repeats: int = 3, budget_s: float = 5.0) -> list[dict]:
    """Seconds to prefill the first n tokens of `ids`, for each n in `lengths`: one warm-up run
    (first-call allocation, compilation), then `repeats` timed runs, median and spread. An engine
    whose warm-up alone takes longer than `budget_s` keeps that one run, marked n=1 and
    over_budget, and skips the longer prompts with the reason: MLX on Linux (reference BLAS)
    would otherwise take minutes."""
    out, slow = [], None
    for n in lengths:
        if n > engine.max_context:
            out.append({"tokens": n, "skipped": f"longer than the context of {engine.max_context}"})
            continue
        if slow is not None:
            out.append({"tokens": n, "skipped": f"{slow:.1f} s at a shorter prompt, over the {budget_s:.1f} s budget"})
            continue
        prompt = ids[:n]
        t = time.perf_counter()
        engine.prefill(prompt)
        samples = [time.perf_counter() - t]
        if samples[0] > budget_s:
            slow = samples[0]
        else:
            samples = timing.timeit(lambda: engine.prefill(prompt), repeats=repeats, warmup=0)
        med = statistics.median(samples)
        out.append({"tokens": n, "median_s": med, "min_s": min(samples), "max_s": max(samples),
                    "tokens_per_s": n / med, "n": len(samples)} | ({"over_budget": True} if slow else {}))
    return out


def decode_curve(engine, ids: list[int], tokens: int = 64, repeats: int = 3,
                 probes: tuple = (), warmup: bool = True) -> dict:
    """Greedy decode after a prefill of `ids`: the time of every step, `repeats` times (plus one
    warm-up run unless `warmup` is False: for an engine that has already run, whose runs
    take seconds). Returns, for each generated length g, the tokens/s over the first g
    tokens. Each of `probes` (roofline.ReadProbe) reads twice before every timed run: the
    roof is measured taking turns with the engine, under the same neighbours."""
    check_context(engine, len(ids), tokens)
    steps = []
    first = 0 if warmup else 1  # run 0 is the warm-up
    for run in range(first, repeats + 1):
        for probe in probes if run else ():
            probe(), probe()  # two reads a turn: the first may meet the engine's threads
        token = int(np.argmax(engine.prefill(ids)))
        times = []
        for _ in range(tokens):
            t = time.perf_counter()
            token = int(np.argmax(engine.decode(token)))
            times.append(time.perf_counter() - t)
        if run:
            steps.append(times)
    cumulative = np.cumsum(np.asarray(steps), axis=1)  # [repeats, tokens]
    rates = np.arange(1, tokens + 1) / cumulative
    return {"prompt_tokens": len(ids), "generated": list(range(1, tokens + 1)),
            "tok_s_median": np.median(rates, axis=0).tolist(), "tok_s_min": rates.min(0).tolist(),
            "tok_s_max": rates.max(0).tolist(), "tok_s": float(np.median(rates[:, -1])), "n": repeats}


# The chat row: what a user of a chat waits for. A system prompt and a question, about 100
# tokens with the chat template, then a reply of 64 tokens.
CHAT_SYSTEM = ("You are a patient assistant for engineers who are learning how language models "
               "run. Answer in plain words, give one short example, and say when you are not sure.")
CHAT_USER = ("I am reading a book on LLM inference and I run a 135M-parameter model on a laptop "
             "CPU with two threads. Why does generating each new token take about the same "
             "time, while reading a long prompt is much faster per token? Explain it in two or "
             "three sentences.")


def chat_prompt(bundle) -> list[int]:
    """The chat row's prompt as token ids: the checkpoint's own chat template; for a reader's
    checkpoint without tokenizer, as many pseudo-random ids as SmolLM2's template makes."""
    if bundle.tokenizer is None:
        rng = np.random.default_rng(1)
        return [int(t) for t in rng.integers(0, bundle.config.vocab_size, 100)]
    return bundle.chat_ids(CHAT_USER, system=CHAT_SYSTEM)


def chat_curve(engine, ids: list[int], tokens: int = 64, repeats: int = 3) -> dict:
    """Time to the first token of a chat reply (the prompt's prefill and the first pick), in
    each of `repeats` runs on a warm engine, and to `tokens` tokens in the last run only
    (greedy, as many as asked: an end-of-turn token does not stop the clock). The first token
    is a short measurement and needs the repeats; a whole reply is as long as a decode run and
    is timed once, which saves the test run most of this row. Median and spread in seconds."""
    check_context(engine, len(ids), tokens)
    first, whole = [], []
    for run in range(repeats):
        t = time.perf_counter()
        token = int(np.argmax(engine.prefill(ids)))
        first.append(time.perf_counter() - t)
        if run == repeats - 1:
            for _ in range(tokens - 1):
                token = int(np.argmax(engine.decode(token)))
            whole.append(time.perf_counter() - t)
    return {"prompt_tokens": len(ids), "tokens": tokens,
            "first_s": timing.summary(first), "all_s": timing.summary(whole)}


def context_curve(engines: dict, ids: list[int], contexts: list[int], tokens: int = 4,
                  rounds: int = 2) -> dict[str, dict]:
    """Decode time per token after contexts of each length in `contexts` (the first c tokens of
    `ids`): at each length every engine is prefilled, then decodes `tokens` steps per round in
    turn with the others (`timing.decode_rates`, one warm-up round). An engine whose context is
    too short for a length is measured once more at the longest it holds, and says so.

    The curve is the fastest round at each length: a neighbour's burst of work slows the rounds
    it falls on, and a slope fitted through three medians moved with such bursts by more than
    the cache's cost itself on the machine that wrote the book. The median and the slowest
    round are kept beside it. {name: {"contexts": [...], "ms_per_token": [fastest], "median":
    [...], "max": [...], "capped": reason or None}}."""
    need = timing.decode_steps(tokens, rounds)  # after the prompt, the warm-up round included
    if max(contexts) > len(ids):
        raise ValueError(f"{len(ids)} token ids cannot make a context of {max(contexts)}")
    out = {name: {"contexts": [], "ms_per_token": [], "median": [], "max": [], "capped": None}
           for name in engines}
    capped_at = {}
    for name, engine in engines.items():
        longest = engine.max_context - need
        if longest < max(contexts):
            capped_at[name] = longest
            out[name]["capped"] = f"its context of {engine.max_context} tokens"
    for c in sorted(set(contexts) | {n for n in capped_at.values() if n > 0}):
        # the lengths asked for that an engine holds, and once its own longest
        fit = {n: e for n, e in engines.items()
               if (c in contexts and c <= capped_at.get(n, c)) or capped_at.get(n) == c}
        if not fit:
            continue
        for name, rate in timing.decode_rates(fit, ids[:c], tokens, rounds).items():
            r = out[name]
            r["contexts"].append(c)
            # ms per token from tokens/s: the fastest round gives the smallest time
            r["ms_per_token"].append(1e3 / rate["max"])
            r["median"].append(1e3 / rate["median"])
            r["max"].append(1e3 / rate["min"])
    return out


def weight_bytes(engine) -> int:
    """Bytes of weights one decode step reads, as the engine counts them (every engine of the
    book does: fp32 arrays, blocks with their scales, a file's constants)."""
    if engine.weight_bytes is None:
        raise ValueError(f"engine {engine.name!r} does not count the bytes of weights it reads "
                         "(weight_bytes, llmbook.engine.BackendBase)")
    return int(engine.weight_bytes)


def run(bundle, names: list[str] | None = None, prompt_lengths=(16, 64, 256), decode_tokens: int = 64,
        decode_prompt: int = 32, repeats: int = 3, budget_s: float = 5.0, progress: bool = True,
        file=sys.stderr, opened: tuple[dict, dict] | None = None, chat_tokens: int | None = 64) -> dict:
    """Every engine on the same prompts; a JSON-ready document with the machine's limits.
    `opened`: (engines, skipped) from open_engines, to time engines already open;
    `chat_tokens`: the length of the chat row's reply (chat_curve), None for no chat row.

    Each engine's roof is the bandwidth of a read of its own step's bytes (roofline.ReadProbe),
    taken in turns with its decode runs; the fp32 step's probe reads in every engine's turns
    too and is the machine's `bandwidth_gbs`. A fraction is against the best read of the run,
    and each probe's spread is kept beside it."""
    names = list(names or ENGINES)
    unknown = [n for n in names if n not in backends.names()]
    if unknown:
        raise ValueError(f"unknown backend(s) {', '.join(unknown)}; known backends: {', '.join(backends.names())}")
    threads = device.use_threads()
    if opened is None:
        opened = open_engines(bundle, names, log=lambda m: print(m, file=file))
    engines = {n: e for n, e in opened[0].items() if n in names}
    skipped = {n: why for n, why in opened[1].items() if n in names}
    ids = text_ids(bundle, max(max(prompt_lengths), decode_prompt))
    chat = chat_prompt(bundle) if chat_tokens else []
    cfg = bundle.config
    context = decode_prompt + decode_tokens // 2  # mid-way through the timed decode
    kv = roofline.kv_bytes_per_token(cfg, context)
    step = {n: weight_bytes(e) + kv for n, e in engines.items()}
    fp32_step = roofline.weight_bytes_per_token(cfg) + kv
    # one probe per size: engines whose steps differ by under 1% share one (fp32's several)
    probes = {}

    def probe_for(nbytes):
        key = next((k for k in probes if abs(k - nbytes) < 0.01 * k), nbytes)
        return probes.setdefault(key, roofline.ReadProbe(nbytes, threads))

    reference = probe_for(fp32_step)
    own = {n: probe_for(b) for n, b in step.items()}
    limits = {"matmul_gflops": roofline.matmul_gflops()}
    doc = {"model": bundle.name, "threads": threads, "device": device.describe(), "limits": limits,
           "prompt_lengths": list(prompt_lengths), "decode_tokens": decode_tokens, "repeats": repeats,
           "chat_prompt_tokens": len(chat), "chat_tokens": chat_tokens,
           "skipped": skipped, "engines": {}}
    bar = tqdm(total=3 * len(engines), desc="bench", unit="run", disable=not progress, file=file)
    for name, engine in engines.items():
        bar.set_postfix_str(f"{name} prefill")
        pre = prefill_curve(engine, ids, list(prompt_lengths), repeats, budget_s)
        bar.update()
        bar.set_postfix_str(f"{name} decode")
        # every decode run prefills the prompt again: an engine over the prefill budget decodes
        # one timed run, not `repeats`, and no warm-up run (its prefill runs just warmed it)
        slow = any(p.get("over_budget") for p in pre)
        dec = decode_curve(engine, ids[:decode_prompt], decode_tokens, 1 if slow else repeats,
                           probes=tuple({id(p): p for p in (own[name], reference)}.values()),
                           warmup=not slow)
        bar.update()
        bar.set_postfix_str(f"{name} chat")
        if not chat_tokens:
            ttft = {"skipped": "no chat row asked for"}
        elif slow:  # a 100-token prompt and 64 tokens would take minutes
            ttft = {"skipped": f"prefill over the {budget_s:.1f} s budget"}
        elif len(chat) + chat_tokens > engine.max_context:
            ttft = {"skipped": f"longer than the context of {engine.max_context}"}
        else:
            ttft = chat_curve(engine, chat, chat_tokens, repeats)
        bar.update()
        doc["engines"][name] = {"device": engine.device, "prefill": pre, "decode": dec,
                                "chat": ttft, "decode_bytes_per_token": step[name]}
    bar.close()
    limits["matmul_gflops"] = max(limits["matmul_gflops"], roofline.matmul_gflops())
    if not engines:  # nothing ran: the machine's read, once
        reference()
    limits["read"] = reference.summary()
    limits["bandwidth_gbs"] = limits["read"]["best"]
    for name, r in doc["engines"].items():
        read = own[name].summary()
        roof = read["best"] * 1e9 / r["decode_bytes_per_token"]
        r |= {"read": read, "decode_roofline_tok_s": roof,
              "roofline_fraction": r["decode"]["tok_s"] / roof}
    return doc


# ---- figures: each engine in its registry colour (llmbook.backends) ---------------------------


def plot(doc: dict, axes=None):
    """Prefill seconds against prompt length, decode tokens/s against generated length, and decode
    as a fraction of the roofline: three panels for one device's document, the two curves side
    by side and the bars below them, so that each stays readable at a page's width."""
    import matplotlib.pyplot as plt

    if axes is None:
        fig = plt.figure(figsize=(10, 7.5))
        grid = fig.add_gridspec(2, 2, height_ratios=[1, 0.9])
        axes = (fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]),
                fig.add_subplot(grid[1, :]))
    pre_ax, dec_ax, roof_ax = axes
    for name, r in doc["engines"].items():
        pts = [p for p in r["prefill"] if "median_s" in p]
        if pts:
            x = [p["tokens"] for p in pts]
            pre_ax.errorbar(x, [p["median_s"] for p in pts], marker="o", color=backends.color(name), label=name,
                            yerr=[[p["median_s"] - p["min_s"] for p in pts], [p["max_s"] - p["median_s"] for p in pts]])
        d = r["decode"]
        dec_ax.plot(d["generated"], d["tok_s_median"], color=backends.color(name), label=name)
        dec_ax.fill_between(d["generated"], d["tok_s_min"], d["tok_s_max"], color=backends.color(name), alpha=0.2)
    pre_ax.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="prefill seconds (median, min-max)")
    # the prompt lengths themselves as the ticks: a log axis's minor labels overlap
    lengths = doc["prompt_lengths"]
    pre_ax.set_xticks(lengths, [str(n) for n in lengths])
    pre_ax.xaxis.set_minor_formatter(plt.NullFormatter())
    dec_ax.set(xlabel="tokens generated", ylabel="decode tokens / s (running mean)")
    dec_ax.set_ylim(bottom=0)
    names = list(doc["engines"])
    fractions = [doc["engines"][n]["roofline_fraction"] for n in names]
    roof_ax.barh(names, fractions, color=[backends.color(n) for n in names])
    roof_ax.axvline(1.0, color="tab:red", linestyle="--")
    roof_ax.set(xlabel="decode / memory roofline", xlim=(0, max(1.05, max(fractions, default=0) * 1.1)))
    roof_ax.invert_yaxis()
    for ax in (pre_ax, dec_ax):
        ax.legend(fontsize=8)
    label = doc["device"]["label"]
    pre_ax.figure.suptitle(f"{doc['model']} on {label} ({doc['limits']['bandwidth_gbs']:.0f} GB/s read)")
    pre_ax.figure.tight_layout()
    return axes
