# Generated from notebooks/13_tensor_parallel.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

"""Rank r's forward pass: its heads with a KV cache of its own, its slice of the
MLP, two all-reduces per layer, and its vocabulary rows of the head with an
all-gather. Written in notebooks/13_tensor_parallel.ipynb."""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from llmbook.rope import inv_freq


def rms_norm(x, weight, eps):
    # as transformers' LlamaRMSNorm computes it, so the logits agree to fp32 rounding
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate(x, cos, sin):
    """RoPE, rotate-half form: x is [heads, tokens, head_dim]."""
    half = x.shape[-1] // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + turned * sin


class RankModel:
    """Rank `rank` of `ranks`: `part` is its share of the weights (shard.shard).
    With one rank it is the whole model, and the collectives are skipped."""

    def __init__(self, part: dict, cfg, rank: int, ranks: int, max_context: int,
                 device="cpu"):
        self.cfg, self.rank, self.ranks = cfg, rank, ranks
        self.w = {k: v.to(device) for k, v in part.items()}
        self.heads, self.kv_heads = cfg.num_heads // ranks, cfg.num_kv_heads // ranks
        shape = (cfg.num_layers, self.kv_heads, max_context, cfg.head_dim)
        # this rank's heads only: the cache is split like the heads
        self.k = torch.zeros(shape, device=device)
        self.v = torch.zeros(shape, device=device)
        self.inv_freq = torch.tensor(inv_freq(cfg), dtype=torch.float32, device=device)
        self.device, self.length = device, 0

    def all_reduce(self, x):
        """The sum of every rank's partial product, on every rank."""
        if self.ranks > 1:
            dist.all_reduce(x)
        return x

    def all_gather(self, x):
        """Every rank's block of the logits, in rank order, on every rank."""
        if self.ranks == 1:
            return x
        blocks = [torch.empty_like(x) for _ in range(self.ranks)]
        dist.all_gather(blocks, x)
        return torch.cat(blocks, dim=-1)

    def reset(self):
        self.length = 0  # old rows stay; the attention never reaches past length

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Append the tokens `ids` [T] to the sequence: logits [vocab] of the last
        position, on every rank."""
        cfg, w, hd = self.cfg, self.w, self.cfg.head_dim
        start, n = self.length, len(ids)
        end = start + n
        pos = torch.arange(start, end, device=self.device, dtype=torch.float32)
        angles = pos[:, None] @ self.inv_freq[None, :]  # as transformers multiplies
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos(), angles.sin()
        # a new token sees every cached one; prompt tokens also see each other causally
        keys = torch.arange(end, device=self.device)
        mask = None if n == 1 else keys[None, :] <= (start + torch.arange(
            n, device=self.device))[:, None]
        x = w["embed"][ids]  # [T, hidden], the whole table is on every rank
        q_size, kv_size = self.heads * hd, self.kv_heads * hd
        for i in range(cfg.num_layers):
            h = rms_norm(x, w[f"{i}.ln1"], cfg.rms_norm_eps)
            q, k, v = F.linear(h, w[f"{i}.qkv"]).split([q_size, kv_size, kv_size], -1)
            q = rotate(q.view(n, self.heads, hd).transpose(0, 1), cos, sin)
            k = k.view(n, self.kv_heads, hd).transpose(0, 1)
            self.k[i, :, start:end] = rotate(k, cos, sin)
            self.v[i, :, start:end] = v.view(n, self.kv_heads, hd).transpose(0, 1)
            a = F.scaled_dot_product_attention(
                q[None], self.k[i, None, :, :end], self.v[i, None, :, :end],
                attn_mask=mask, enable_gqa=True)[0]
            a = a.transpose(0, 1).reshape(n, q_size)
            x = x + self.all_reduce(F.linear(a, w[f"{i}.o"]))  # all-reduce 1
            h = rms_norm(x, w[f"{i}.ln2"], cfg.rms_norm_eps)
            gate, up = F.linear(h, w[f"{i}.gate_up"]).chunk(2, dim=-1)
            x = x + self.all_reduce(F.linear(F.silu(gate) * up, w[f"{i}.down"]))  # 2
        self.length = end
        h = rms_norm(x[-1], w["norm"], cfg.rms_norm_eps)
        return self.all_gather(F.linear(h, w["head"]))[:cfg.vocab_size]
