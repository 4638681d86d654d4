# Generated from notebooks/13_tensor_parallel.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

"""Greedy generation with the split model, one process per rank, launched by torchrun:

    torchrun --standalone --nproc-per-node 3 -m llmbook.torch_tp --prompt "Hi"

torchrun starts the processes and gives each its RANK, WORLD_SIZE, LOCAL_RANK and
the rendezvous address; every rank loads the checkpoint and keeps its own part.
Rank 0 runs the generation loop; the others follow it. Written in
notebooks/13_tensor_parallel.ipynb."""
import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

from llmbook.torch_tp.group import FORWARD, STOP, Rank, backend_and_device
from llmbook.torch_tp.model import RankModel
from llmbook.torch_tp.shard import check_ranks, shard


def generate(rank: Rank, ids: list[int], steps: int) -> list[int]:
    """Rank 0's loop: greedy tokens after the prompt `ids`."""
    tokens = [int(rank.drive(FORWARD, ids).argmax())]
    while len(tokens) < steps:
        tokens.append(int(rank.drive(FORWARD, tokens[-1:]).argmax()))
    rank.drive(STOP)
    return tokens


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="torchrun ... -m llmbook.torch_tp",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: SmolLM2)")
    ap.add_argument("--prompt", help="user message, rendered with the chat template")
    ap.add_argument("--token-ids", help="raw prompt token ids, e.g. 1,2,3")
    ap.add_argument("--steps", type=int, default=20, help="greedy tokens")
    args = ap.parse_args(argv)
    from llmbook.checkpoint import load_model

    rank, ranks = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    bundle = load_model(args.model)
    try:  # bad input is one line, from rank 0 only
        check_ranks(bundle.config, ranks)
        if (args.prompt is None) == (args.token_ids is None):
            raise ValueError("give exactly one of --prompt and --token-ids")
    except ValueError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    ids = (bundle.chat_ids(args.prompt) if args.prompt is not None
           else [int(t) for t in args.token_ids.split(",")])
    backend, device = backend_and_device(int(os.environ["LOCAL_RANK"]),
                                         int(os.environ["LOCAL_WORLD_SIZE"]))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks))
    dist.init_process_group(backend)  # the address and ranks come from torchrun
    part = shard(bundle.state_dict, bundle.config, rank, ranks)
    r = Rank(RankModel(part, bundle.config, rank, ranks, len(ids) + args.steps, device))
    if rank == 0:
        tokens = generate(r, ids, args.steps)
        print(json.dumps({"ranks": ranks, "backend": backend, "tokens": tokens,
                          "text": bundle.detokenize(tokens)}))
    else:
        r.follow()
    dist.destroy_process_group()
    return 0
