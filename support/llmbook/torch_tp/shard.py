# Generated from notebooks/13_tensor_parallel.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

"""The Megatron split of a Llama checkpoint: which rows and columns of each weight
rank r of n holds, and the check that the heads divide among the ranks. Written in
notebooks/13_tensor_parallel.ipynb."""
import torch


def heads_text(cfg) -> str:
    return f"{cfg.num_heads} query heads and {cfg.num_kv_heads} key/value heads"


def rank_counts(cfg) -> list[int]:
    """The rank counts that divide both head counts: each rank then holds whole
    query heads and the key/value heads they read."""
    return [n for n in range(1, cfg.num_kv_heads + 1)
            if cfg.num_heads % n == 0 and cfg.num_kv_heads % n == 0]


def check_ranks(cfg, ranks) -> int:
    """`ranks` once it is known to split the model (ValueError naming the heads)."""
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"tensor parallelism needs at least 1 rank, got {ranks!r}")
    if ranks not in rank_counts(cfg):
        counts = ", ".join(map(str, rank_counts(cfg)))
        raise ValueError(f"{ranks} ranks do not divide the model's {heads_text(cfg)}; "
                         f"rank counts that do: {counts}")
    return ranks


def default_ranks(cfg, cores: int) -> int:
    """The most ranks that divide the heads and have a core each (at least 1)."""
    return max([n for n in rank_counts(cfg) if n <= cores] or [1])


def bounds(size: int, rank: int, ranks: int) -> slice:
    """Rank's share of a dimension of `size`: equal parts when `ranks` divides it,
    parts one apart otherwise (an MLP width need not divide; heads must)."""
    return slice(size * rank // ranks, size * (rank + 1) // ranks)


def shard(weights: dict, cfg, rank: int, ranks: int) -> dict:
    """Rank `rank`'s part of `weights` (Hugging Face names, fp32 tensors).

    * q, k, v and gate, up are split by output rows (column parallel): the rank
      computes its own heads and its own slice of the MLP's width, with no
      communication; its q, k, v rows sit in one matrix, as do gate and up.
    * o and down are split by input columns (row parallel): each rank's product
      is a partial sum of the full output, and one all-reduce adds them.
    * the head is split by vocabulary rows, padded to equal parts for the
      all-gather; the embedding table is whole on every rank (a step reads one
      row of it) and so are the norms.
    """
    check_ranks(cfg, ranks)
    hd, L = cfg.head_dim, "model.layers"
    q = bounds(cfg.num_heads * hd, rank, ranks)
    kv = bounds(cfg.num_kv_heads * hd, rank, ranks)
    ffn = bounds(cfg.intermediate_size, rank, ranks)
    part = {"embed": weights["model.embed_tokens.weight"],
            "norm": weights["model.norm.weight"]}
    for i in range(cfg.num_layers):
        w = {k[len(f"{L}.{i}."):]: v for k, v in weights.items()
             if k.startswith(f"{L}.{i}.")}
        part[f"{i}.ln1"] = w["input_layernorm.weight"]
        part[f"{i}.ln2"] = w["post_attention_layernorm.weight"]
        part[f"{i}.qkv"] = torch.cat([w["self_attn.q_proj.weight"][q],
                                      w["self_attn.k_proj.weight"][kv],
                                      w["self_attn.v_proj.weight"][kv]])
        part[f"{i}.o"] = w["self_attn.o_proj.weight"][:, q].contiguous()
        part[f"{i}.gate_up"] = torch.cat([w["mlp.gate_proj.weight"][ffn],
                                          w["mlp.up_proj.weight"][ffn]])
        part[f"{i}.down"] = w["mlp.down_proj.weight"][:, ffn].contiguous()
    head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
    rows = -(-cfg.vocab_size // ranks)  # ceil: every rank's block the same size
    mine = head[rank * rows: (rank + 1) * rows]
    part["head"] = torch.cat([mine, mine.new_zeros(rows - len(mine), mine.shape[1])])
    part["head_rows"] = torch.tensor(len(mine))  # real rows, before the padding
    return part


def step_bytes(parts: list[dict], cfg) -> int:
    """Bytes of weights one decode step reads, all ranks together, each weight of the
    checkpoint counted once: every rank's share of the split matrices and real head
    rows, one copy of the norms, and one row of the embedding table."""
    split = sum(t.nbytes for p in parts for k, t in p.items()
                if k.split(".")[-1] in ("qkv", "o", "gate_up", "down"))
    head = sum(int(p["head_rows"]) * p["head"][0].nbytes for p in parts)
    norms = sum(t.nbytes for k, t in parts[0].items() if k.split(".")[-1] in
                ("ln1", "ln2", "norm"))
    return split + head + norms + parts[0]["embed"][0].nbytes
