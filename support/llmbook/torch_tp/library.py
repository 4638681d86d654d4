# Generated from notebooks/13_tensor_parallel.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

"""The same split with PyTorch's own tensor-parallel API on transformers' model: a
DeviceMesh of the ranks and a plan of ColwiseParallel / RowwiseParallel styles
for parallelize_module. Written in notebooks/13_tensor_parallel.ipynb."""
import dataclasses

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                               parallelize_module)


def plan(num_layers: int) -> dict:
    """Module name -> how it is split: the Megatron layout again. Colwise: the
    weight's output rows are split and the output stays split (each rank's own
    heads); Rowwise: input columns split, partial sums all-reduced. The head's
    output is replicated, which PyTorch does with an all-gather."""
    layer = {"self_attn.q_proj": ColwiseParallel(),
             "self_attn.k_proj": ColwiseParallel(),
             "self_attn.v_proj": ColwiseParallel(),
             "self_attn.o_proj": RowwiseParallel(),
             "mlp.gate_proj": ColwiseParallel(),
             "mlp.up_proj": ColwiseParallel(),
             "mlp.down_proj": RowwiseParallel()}
    styles = {f"model.layers.{i}.{name}": style
              for i in range(num_layers) for name, style in layer.items()}
    return styles | {"lm_head": ColwiseParallel(output_layouts=Replicate())}


def hf_model(cfg, weights: dict):
    """transformers' LlamaForCausalLM on `weights`, built without random init, with
    its own head matrix (a tied one would be split under the embedding too)."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = dataclasses.replace(cfg, tie_word_embeddings=False).to_hf()
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
    model.load_state_dict(weights | {"lm_head.weight": head.clone()}, assign=True)
    model.model.rotary_emb = LlamaRotaryEmbedding(config)  # its buffers were on meta
    return model.eval()


def _rank(rank, ranks, port, cfg, weights, ids, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=ranks)
    mesh = init_device_mesh("cpu", (ranks,))  # one dimension: every rank in one group
    model = parallelize_module(hf_model(cfg, weights), mesh, plan(cfg.num_layers))
    q = model.model.layers[0].self_attn.q_proj.weight  # a DTensor now
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, -1]
    if rank == 0:
        results.put((str(q.placements), tuple(q.to_local().shape), logits.numpy()))
    dist.destroy_process_group()


def parallelize_and_run(bundle, ranks: int, ids) -> tuple[str, tuple, np.ndarray]:
    """Prefill `ids` with transformers' model split by parallelize_module over
    `ranks` processes (torch.multiprocessing.spawn): rank 0's q_proj placement
    and local shape, and the last position's logits."""
    from llmbook.torch_tp.group import free_port
    from llmbook.torch_tp.shard import check_ranks

    check_ranks(bundle.config, ranks)
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_rank, args=(ranks, free_port(), bundle.config, bundle.state_dict,
                          list(ids), results), nprocs=ranks)
    return results.get()
