"""Command line: generate text with any backend, or compare a backend with the Hugging Face reference.

    python -m llmbook generate --backend mlx --prompt "What is the capital of France?" --max-tokens 32
    python -m llmbook compare --backend mlx --token-ids 1,2,3 --steps 20 --model path/to/checkpoint
    python -m llmbook bench --model path/to/checkpoint --backends hf,tvm --out bench-results
    python -m llmbook batch --backend tvm --sequences 16 --steps 32
    python -m llmbook serve --backend tvm-q4 --port 8000
"""
from __future__ import annotations

import argparse
import json
import sys

from . import backends, device
from .checkpoint import CheckpointError, load_model
from .engine import PAGE_SIZE, pages_for
from .generation import ContextError, compare, stream


# argparse types; their messages leave out the flag: argparse puts "argument --flag: " before them.
def int_in(low: int, high: int | None = None, what: str = "an integer"):
    """An argparse type: an integer from `low` (to `high`)."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if n < low or (high is not None and n > high):
            bounds = f"at least {low}" if high is None else f"{what} ({low} to {high})"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {n}")
        return n
    return parse


positive_int = int_in(1)
non_negative_int = int_in(0)
port_number = int_in(0, 65535, "a port number")


def int_list(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        msg = f"must be comma-separated integers, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not values:
        raise argparse.ArgumentTypeError("is empty")
    return values


def speculation(text: str) -> tuple[str, int, int]:
    """--speculate: ngram:K (prompt lookup, up to K guesses) or layers:N[:K] (the model's
    first N layers guess, K at a time, 4 by default) -> (kind, N or 0, K)."""
    kind, _, rest = text.partition(":")
    try:
        numbers = [int(n) for n in rest.split(":")]
    except ValueError:
        numbers = []
    ok = (kind == "ngram" and len(numbers) == 1) or (kind == "layers" and len(numbers) in (1, 2))
    if not ok or min(numbers) < 1:
        raise argparse.ArgumentTypeError(
            f"must be ngram:K or layers:N[:K] with whole numbers K, N >= 1, got {text!r}")
    if kind == "ngram":
        return kind, 0, numbers[0]
    return kind, numbers[0], numbers[1] if len(numbers) == 2 else 4


def token_ids(text: str) -> list[int]:
    return int_list(text)  # the range is checked against the vocabulary once the model is loaded


def prompt_lengths(text: str) -> list[int]:
    lengths = int_list(text)
    if bad := [n for n in lengths if n < 1]:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {', '.join(map(str, bad))}")
    return lengths


class UsageError(Exception):
    """Bad command-line arguments; main() prints it as one line, like every other error."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def parser() -> argparse.ArgumentParser:
    ap = Parser(prog="python -m llmbook", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--backend", required=True, help=f"one of: {', '.join(backends.names())}")
    common.add_argument("--model", default=None, help="Hugging Face Llama checkpoint directory (default: SmolLM2-135M-Instruct)")
    common.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: all cores)")
    common.add_argument("--tp", type=positive_int, default=None,
                        help="ranks of --backend torch-tp (default: the most that divide the heads and fit the cores)")

    g = sub.add_parser("generate", parents=[common], help="generate text")
    g.add_argument("--prompt", help="user message, rendered with the chat template")
    g.add_argument("--token-ids", type=token_ids, help="raw prompt token ids, e.g. 1,2,3 (for checkpoints without tokenizer)")
    g.add_argument("--max-tokens", type=positive_int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--speculate", type=speculation, default=None, metavar="ngram:K|layers:N[:K]",
                   help="speculative decoding (chapter 12): prompt lookup guesses up to K tokens, "
                        "or the model's first N layers guess K; the same tokens (greedy) or the "
                        "same distribution (sampling)")

    c = sub.add_parser("compare", parents=[common], help="compare a backend with the Hugging Face reference")
    group = c.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt")
    group.add_argument("--token-ids", type=token_ids)
    c.add_argument("--steps", type=positive_int, default=20, help="greedy tokens to compare")
    c.add_argument("--speculate", type=speculation, default=None, metavar="ngram:K|layers:N[:K]",
                   help="compare the engine's speculative greedy tokens with the reference's")

    b = sub.add_parser("bench", help="time every engine (or --backends) on one checkpoint; writes JSON and figures")
    b.add_argument("--model", default=None, help="Hugging Face Llama checkpoint directory (default: SmolLM2-135M-Instruct)")
    b.add_argument("--backends", type=lambda s: [x for x in s.split(",") if x], default=None,
                   help=f"comma-separated, default: all of {','.join(backends.names())} that run here")
    b.add_argument("--prompt-lengths", type=prompt_lengths, default=[16, 64, 256], help="prefill lengths, e.g. 16,64,256")
    b.add_argument("--tokens", type=positive_int, default=64, help="decode steps per timed run")
    b.add_argument("--repeats", type=positive_int, default=3)
    b.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: all cores)")
    b.add_argument("--out", default=None, help="output directory (default: bench-<model name>)")

    bt = sub.add_parser("batch", parents=[common],
                        help="decode many sequences together; check each against its solo run")
    bt.add_argument("--sequences", type=positive_int, default=16, help="sequences decoded together")
    bt.add_argument("--steps", type=positive_int, default=32, help="decode steps per sequence")
    bt.add_argument("--cache-tokens", type=positive_int, default=None,
                    help="tokens the paged KV cache holds (default: just enough for all sequences)")

    sv = sub.add_parser("serve", parents=[common],
                        help="an OpenAI-compatible HTTP server (chapter 11)")
    sv.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default: this machine only)")
    sv.add_argument("--port", type=port_number, default=8000)
    sv.add_argument("--max-batch", type=positive_int, default=16,
                    help="requests decoded together (engines without a batched decode: 1)")
    sv.add_argument("--cache-tokens", type=positive_int, default=16384,
                    help="tokens the paged KV cache holds, all requests together")
    sv.add_argument("--prefill-chunk", type=non_negative_int, default=0,
                    help="prompt tokens prefilled per step, in chunks (0: each prompt whole)")
    sv.add_argument("--prefix-entries", type=non_negative_int, default=8,
                    help="prompt prefixes kept in the cache for reuse (0: no prefix cache)")
    sv.add_argument("--static", action="store_true",
                    help="static batching: admit requests only when the batch is empty")
    sv.add_argument("--max-waiting", type=positive_int, default=256,
                    help="requests queued beyond the batch; more get 503 with Retry-After")
    sv.add_argument("--served-name", default=None,
                    help="the model name requests must give (default: the checkpoint's)")
    sv.add_argument("--shutdown-timeout", type=float, default=30.0,
                    help="seconds the requests in flight get to finish after SIGTERM")

    sub.add_parser("prepare", help="convert SmolLM2 from its GGUF into the on-disk cache")
    return ap


def bench(args) -> int:
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    from . import bench as harness

    if args.backends is not None and (unknown := [n for n in args.backends if n not in backends.names()]):
        raise ValueError(f"unknown backend(s) {', '.join(unknown)}; known backends: {', '.join(backends.names())}")
    bundle = load_model(args.model)
    doc = harness.run(bundle, args.backends, args.prompt_lengths, args.tokens, repeats=args.repeats)
    if not doc["engines"]:
        raise ValueError(f"no engine ran: {doc['skipped']}")
    out = Path(args.out or f"bench-{bundle.name}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(doc, indent=1) + "\n")
    axes = harness.plot(doc)
    axes[0].figure.savefig(out / "bench.png", dpi=120)
    read = doc["limits"]["read"]
    print(f"read over an fp32 step's {read['bytes'] / 1e6:.0f} MB: {read['best']:.1f} GB/s at best, "
          f"the lowest read {read['spread']:.2f} of that")
    for name, r in doc["engines"].items():
        pre = ", ".join(f"{p['tokens']}: {p['median_s'] * 1e3:.1f} ms" for p in r["prefill"] if "median_s" in p)
        chat = r["chat"]
        ttft = (chat["skipped"] if "skipped" in chat else
                f"first token {chat['first_s']['median'] * 1e3:.1f} ms, "
                f"{doc['chat_tokens']} tokens {chat['all_s']['median']:.2f} s")
        print(f"{name:14s} decode {r['decode']['tok_s']:6.1f} tok/s, {r['roofline_fraction']:.2f} of its roof "
              f"({r['read']['bytes'] / 1e6:.0f} MB read at {r['read']['best']:.1f} GB/s)")
        print(f"{'':14s} prefill {pre}")
        print(f"{'':14s} chat of {doc['chat_prompt_tokens']} tokens: {ttft}")
    for name, why in doc["skipped"].items():
        print(f"{name:14s} skipped: {why}")
    print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")
    return 0


def engine_options(args) -> dict:
    """The backend's options from the flags: --tp is torch-tp's rank count."""
    if args.tp is None:
        return {}
    if args.backend != "torch-tp":
        raise ValueError(f"--tp applies to --backend torch-tp only, not {args.backend!r}")
    if args.command == "serve":
        raise ValueError("serve does not take --tp; it opens torch-tp with its default ranks")
    return {"tp": args.tp}


def batch(args) -> int:
    from .bench import text_ids
    from .serving import batch_vs_solo

    bundle = load_model(args.model)
    engine = backends.get_backend(args.backend, bundle, **engine_options(args))
    if (room := engine.max_context - args.steps) < 1:
        raise ValueError(f"--steps {args.steps} leaves no room for a prompt in the context of "
                         f"{engine.max_context} tokens")
    # prompts of different lengths (8 to 64 tokens, shorter if the context is short) cut from the
    # shipped text, or fixed pseudo-text for a checkpoint without a tokenizer
    lengths = [min(8 + (13 * i) % 57, room) for i in range(args.sequences)]
    text = text_ids(bundle, 64 * args.sequences + 64)
    prompts = [text[64 * i: 64 * i + n] for i, n in enumerate(lengths)]
    pages = sum(pages_for(n + args.steps) for n in lengths)
    cache_tokens = args.cache_tokens or pages * PAGE_SIZE
    if pages > cache_tokens // PAGE_SIZE:
        raise ValueError(f"{args.sequences} sequences of prompt + {args.steps} steps need {pages} pages of "
                         f"{PAGE_SIZE} tokens, but a cache of {cache_tokens} tokens holds "
                         f"{cache_tokens // PAGE_SIZE}")
    # an engine without a batched decode raises BackendUnavailable: main prints its one line
    runner = engine.batch_runner(max_batch=args.sequences, max_tokens=cache_tokens)
    result = batch_vs_solo(engine, runner, prompts, args.steps)
    print(f"{args.backend} on {bundle.name}: {args.sequences} sequences x {args.steps} steps, "
          f"{result['aggregate_tok_s']:.1f} tok/s together vs {result['single_tok_s']:.1f} tok/s alone "
          f"({result['speedup']:.2f}x); tokens equal to the solo runs: {result['all_match']}")
    print(json.dumps({"backend": args.backend} | result))
    return 0 if result["all_match"] else 1


def serve(args) -> int:
    import logging

    from .server.api import ServerConfig, run

    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    if args.cache_tokens < PAGE_SIZE:
        raise ValueError(f"--cache-tokens {args.cache_tokens} is less than one page of "
                         f"{PAGE_SIZE} tokens")
    bundle = load_model(args.model)  # a bad checkpoint is one line now, not in a thread
    config = ServerConfig(args.backend, args.max_batch, args.cache_tokens, args.prefill_chunk,
                          args.prefix_entries, args.static, args.max_waiting)
    return run(bundle, config, args.host, args.port, args.served_name, args.shutdown_timeout)


def speculative_tokens(engine, bundle, args, ids, sample, max_tokens, eos):
    """--speculate's tokens (a generator) and the dict it counts guesses in. The policy turns
    guessing down, or off, when the guesses so far would not pay for their verify calls."""
    from . import speculative

    kind, layers, k = args.speculate
    if kind == "ngram":
        drafter, draft_cost = speculative.PromptLookup(), 0.0
    else:
        try:
            small = bundle.first_layers(layers)
        except ValueError as e:
            raise ValueError(f"--speculate layers:{layers}: {e}") from None
        drafter = speculative.LayersDrafter(
            backends.get_backend(args.backend, small, **engine_options(args)))
        # a guess costs what its model reads, against a decode step (chapter 12, section 6)
        draft_cost = drafter.engine.weight_bytes / engine.weight_bytes
    # T(k+1)/T(1) on this machine, now: an engine without a verify call fails here, in one line
    cost = speculative.verify_cost(engine, ids, k)
    stats = {}
    tokens = speculative.speculative_stream(engine, drafter, ids, sample, max_tokens, eos=eos,
                                            k=k, policy=speculative.Policy(cost, draft_cost),
                                            stats=stats)
    return tokens, stats


def prompt_ids(bundle, args) -> list[int]:
    if (args.prompt is None) == (args.token_ids is None):
        raise ValueError("give exactly one of --prompt and --token-ids")
    ids = bundle.chat_ids(args.prompt) if args.prompt is not None else args.token_ids
    if bad := [t for t in ids if not 0 <= t < bundle.config.vocab_size]:
        raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (0..{bundle.config.vocab_size - 1})")
    return ids


def run(args) -> int:
    if args.command == "prepare":
        bundle = load_model(None)
        print(f"{bundle.name} ready in {bundle.path}")
        return 0
    if args.command != "bench":
        # before loading anything (or importing an engine before use_threads sets the thread
        # count): an unknown backend, or one whose engine is not installed, is one line now
        backends.check_installed(args.backend)
        engine_options(args)  # a misplaced --tp is one line now, before any loading
    device.use_threads(args.threads)
    if args.command == "bench":
        return bench(args)
    if args.command == "batch":
        return batch(args)
    if args.command == "serve":
        return serve(args)
    bundle = load_model(args.model)
    ids = prompt_ids(bundle, args)
    engine = backends.get_backend(args.backend, bundle, **engine_options(args))
    if args.command == "generate":
        from .sampling import Sampler

        sample = Sampler(args.temperature, args.top_k, args.top_p, args.seed)
        if args.speculate:
            run, stats = speculative_tokens(engine, bundle, args, ids, sample,
                                            args.max_tokens, bundle.eos_token_id)
        else:
            run, stats = stream(engine, ids, sample, args.max_tokens, eos=bundle.eos_token_id), None
        tokens, shown = [], ""
        for token in run:
            tokens.append(token)
            text = bundle.detokenize(tokens)
            print(text[len(shown):], end="", flush=True)
            shown = text
        print()
        if stats is not None:
            print(f"speculation: {stats['accepted']} of {stats['proposed']} guesses kept; "
                  f"{len(tokens)} tokens from {stats['calls'] + 1} engine calls", file=sys.stderr)
        return 0
    from .backends.hf import HFBackend

    reference, against = HFBackend(bundle), "hf"
    if (own := engine.own_weights) is not None:
        # an engine that rounded the weights itself is checked against the reference model on
        # those rounded weights: the difference left is the engine's, not the rounding's
        reference, against = HFBackend(bundle.with_weights(own)), f"hf on {args.backend}'s rounded weights"
        print(f"{args.backend} runs {engine.source}")
    if args.speculate:
        from .sampling import Sampler

        stats = {}

        def speculative_run(backend, ids, steps):
            first = backend.prefill(ids)  # the prefill logits compare() reports
            tokens, counts = speculative_tokens(backend, bundle, args, ids, Sampler(), steps, None)
            tokens = list(tokens)
            stats.update(counts)
            return first, tokens

        kind, layers, k = args.speculate
        result = compare(engine, reference, ids, args.steps, run=speculative_run) | {
            "speculate": f"ngram:{k}" if kind == "ngram" else f"layers:{layers}:{k}",
            "accepted": stats["accepted"], "proposed": stats["proposed"]}
    else:
        result = compare(engine, reference, ids, args.steps)
    result |= {"reference": against}
    print(f"{args.backend} vs {against} on {bundle.name}, prompt of {len(ids)} tokens: "
          f"max |Δ prefill logits| = {result['max_abs_diff']:.3g}, greedy tokens equal: {result['greedy_match']}/{result['steps']}")
    print(json.dumps(result))
    return 0


def main(argv=None) -> int:
    try:
        return run(parser().parse_args(argv))
    except (UsageError, CheckpointError, ContextError, backends.BackendUnavailable, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
