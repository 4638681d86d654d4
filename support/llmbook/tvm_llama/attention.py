# Generated from notebooks/09_4bit.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

"""A decode attention kernel for TVM's paged KV cache on CPUs: the cache's own
kernel runs every head and position as scalar loops on one thread. Written in
notebooks/09_4bit.ipynb."""
import math

import tvm
from tvm.relax.frontend.nn.llm.position_embedding import switch_rope_freq_func
from tvm.script import tirx as T

from llmbook.engine import PAGE_SIZE  # chapter 3: the cache's page, 16 positions

CACHE_KERNEL = "batch_decode_paged_kv_cpu"  # the cache's decode kernel, by name
LOG2E = math.log2(math.e)  # exp(x) = exp2(x * log2 e)


@T.inline
def attend(Q, out, lse, i, head, sm_scale, blocks, size, key, value, block=16):
    """Chapter 1's online softmax for one query, Q[i, head], into out[i, head]
    and lse[i, head], over `blocks` blocks of keys: block c holds size(c) keys
    (at most `block`), and key(c, r, d), value(c, r, d) read its row r. Per
    block: its scores and their max; when the max rises, one rescale of the
    running sum and of the running output o; then the weighted values. The
    query holds log2 e, so that powers of 2 serve as exponentials."""
    # buffers of the default scope under 1 KB live on the stack ("local" ones
    # come from TVM's workspace allocator, a call per query and head)
    q = T.sblock_alloc_buffer((Q.shape[2],), "float32")
    o = T.sblock_alloc_buffer((Q.shape[2],), "float32")
    s = T.sblock_alloc_buffer((block,), "float32")  # a block's scores
    running_max = T.sblock_alloc_buffer((1,), "float32")
    running_sum = T.sblock_alloc_buffer((1,), "float32")
    block_max = T.sblock_alloc_buffer((1,), "float32")
    rescale = T.sblock_alloc_buffer((1,), "float32")
    for d in T.vectorized(Q.shape[2]):
        q[d] = Q[i, head, d] * sm_scale * T.float32(LOG2E)
        o[d] = T.float32(0)
    running_max[0] = T.float32(-3.0e38)
    running_sum[0] = T.float32(0)
    for c in range(blocks):
        block_max[0] = T.float32(-3.0e38)
        for r in range(size(c)):
            s[r] = T.float32(0)
            for d in range(Q.shape[2]):
                s[r] += q[d] * key(c, r, d)
            block_max[0] = T.max(block_max[0], s[r])
        rescale[0] = T.exp2(running_max[0] - T.max(running_max[0], block_max[0]))
        running_max[0] = T.max(running_max[0], block_max[0])
        running_sum[0] *= rescale[0]
        for d in T.vectorized(Q.shape[2]):
            o[d] *= rescale[0]
        for r in range(size(c)):
            s[r] = T.exp2(s[r] - running_max[0])
            running_sum[0] += s[r]
            for d in T.vectorized(Q.shape[2]):
                o[d] += s[r] * value(c, r, d)
    for d in T.vectorized(Q.shape[2]):
        out[i, head, d] = o[d] / running_sum[0]
    lse[i, head] = running_max[0] + T.log2(running_sum[0])


def decode_attention(num_kv_heads: int, num_heads: int, head_dim: int,
                     page_size: int = PAGE_SIZE) -> tvm.tirx.PrimFunc:
    """One new query per sequence against its cached keys and values, page by
    page, with the cache kernel's arguments. Threads take (sequence, head)
    pairs; the head dimension is vectorized. `attend` runs the online softmax
    of chapter 1 a page at a time."""
    H, D, group = num_heads, head_dim, num_heads // num_kv_heads

    @T.prim_func(s_tir=True)
    def decode(q_handle: T.handle, pages_handle: T.handle,
               indptr_handle: T.handle, values_handle: T.handle,
               last_len_handle: T.handle, k_rope_handle: T.handle,
               q_rope_handle: T.handle, out_handle: T.handle,
               lse_handle: T.handle, rotary_mode: T.int32,
               rope_scale: T.float32, rope_theta: T.float32,
               sm_scale: T.float32):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        B, n_pages, n_used = T.int32(), T.int32(), T.int32()
        off0, off1, off2, off3, off4 = (T.int32(), T.int32(), T.int32(),
                                        T.int32(), T.int32())
        Q = T.match_buffer(q_handle, (B, H, D), "float32")
        pages = T.match_buffer(
            pages_handle, (n_pages, 2, num_kv_heads, page_size, D), "float32")
        indptr = T.match_buffer(indptr_handle, (B + 1,), "int32",
                                elem_offset=off0)
        values = T.match_buffer(values_handle, (n_used,), "int32",
                                elem_offset=off1)
        last_len = T.match_buffer(last_len_handle, (B,), "int32",
                                  elem_offset=off2)
        T.match_buffer(k_rope_handle, (B,), "int32", elem_offset=off3)
        T.match_buffer(q_rope_handle, (B,), "int32", elem_offset=off4)
        out = T.match_buffer(out_handle, (B, H, D), "float32")
        lse = T.match_buffer(lse_handle, (B, H), "float32")
        # RopeMode.NORMAL (chapter 6) rotates q and k before they reach here
        T.Assert(rotary_mode == 0, "decode attention expects RoPE applied")
        for bh in T.parallel(B * H):
            with T.sblock("attention"):
                seq = T.axis.spatial(B, bh // H)
                head = T.axis.spatial(H, bh % H)
                # the sequence's pages: values[indptr[seq] : indptr[seq + 1]];
                # position t is row t % 16 of page t // 16
                attend(Q, out, lse, seq, head, sm_scale,
                       indptr[seq + 1] - indptr[seq],
                       # positions in a page: all 16 but in the last page
                       lambda p: T.if_then_else(
                           p == indptr[seq + 1] - indptr[seq] - 1,
                           last_len[seq], page_size),
                       lambda p, r, d: pages[values[indptr[seq] + p], 0,
                                             head // group, r, d],
                       lambda p, r, d: pages[values[indptr[seq] + p], 1,
                                             head // group, r, d],
                       page_size)

    return decode.with_attr("global_symbol", CACHE_KERNEL)


PREFILL_KERNEL = "batch_prefill_ragged_kv"  # the cache's prefill kernel


def prefill_attention(num_kv_heads: int, num_heads: int,
                      head_dim: int) -> tvm.tirx.PrimFunc:
    """The prompt's queries against the prompt's own keys and values (the
    cache's ragged prefill kernel, with its arguments). Threads take (token,
    head) pairs, and each pair visits only the keys the causal mask lets it
    see, 16 at a time, with decode_attention's `attend`. The cache's kernel
    runs every pair on one thread, masked keys included."""
    H, D, group, block = num_heads, head_dim, num_heads // num_kv_heads, 16

    @T.prim_func(s_tir=True)
    def prefill(q_handle: T.handle, q_indptr_handle: T.handle,
                k_handle: T.handle, v_handle: T.handle,
                kv_indptr_handle: T.handle, q_rope_handle: T.handle,
                k_rope_handle: T.handle, out_handle: T.handle,
                lse_handle: T.handle, causal: T.int32, rotary_mode: T.int32,
                rope_scale: T.float32, rope_theta: T.float32,
                sm_scale: T.float32):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        B, n_q, n_kv = T.int32(), T.int32(), T.int32()
        off0, off1, off2, off3 = T.int32(), T.int32(), T.int32(), T.int32()
        Q = T.match_buffer(q_handle, (n_q, H, D), "float32")
        q_indptr = T.match_buffer(q_indptr_handle, (B + 1,), "int32",
                                  elem_offset=off0)
        K = T.match_buffer(k_handle, (n_kv, num_kv_heads, D), "float32")
        V = T.match_buffer(v_handle, (n_kv, num_kv_heads, D), "float32")
        kv_indptr = T.match_buffer(kv_indptr_handle, (B + 1,), "int32",
                                   elem_offset=off1)
        T.match_buffer(q_rope_handle, (n_q,), "int32", elem_offset=off2)
        T.match_buffer(k_rope_handle, (B,), "int32", elem_offset=off3)
        out = T.match_buffer(out_handle, (n_q, H, D), "float32")
        lse = T.match_buffer(lse_handle, (n_q, H), "float32")
        T.Assert(rotary_mode == 0, "prefill attention expects RoPE applied")
        for th in T.parallel(n_q * H):
            with T.sblock("attention"):
                token = T.axis.spatial(n_q, th // H)
                head = T.axis.spatial(H, th % H)
                # the token's sequence, its first key, the keys it sees
                seq = T.sblock_alloc_buffer((1,), "int32")
                first = T.sblock_alloc_buffer((1,), "int32")
                seen = T.sblock_alloc_buffer((1,), "int32")
                seq[0] = 0
                for b in range(B):
                    if q_indptr[b + 1] <= token:
                        seq[0] = b + 1
                first[0] = kv_indptr[seq[0]]
                # causal: the sequence's earlier keys (a cached prefix, in the
                # kv lengths) and its own up to this token; else all of them
                seen[0] = kv_indptr[seq[0] + 1] - first[0]
                if causal > 0:  # less the keys of the prompt's later tokens
                    seen[0] -= q_indptr[seq[0] + 1] - token - 1
                attend(Q, out, lse, token, head, sm_scale,
                       (seen[0] + block - 1) // block,
                       lambda c: T.min(block, seen[0] - c * block),
                       lambda c, r, d: K[first[0] + c * block + r, head // group, d],
                       lambda c, r, d: V[first[0] + c * block + r, head // group, d],
                       block)

    return prefill.with_attr("global_symbol", PREFILL_KERNEL)


PAGED_PREFILL_KERNEL = "batch_prefill_paged_kv_cpu"  # the cache's, by name


def paged_prefill_attention(num_kv_heads: int, num_heads: int, head_dim: int,
                            page_size: int = PAGE_SIZE) -> tvm.tirx.PrimFunc:
    """New tokens' queries against their sequences' cached pages (the cache's
    paged prefill kernel, with its arguments). Threads take (token, head) pairs;
    each visits only its sequence's pages, with `attend`."""
    H, D, group = num_heads, head_dim, num_heads // num_kv_heads

    @T.prim_func(s_tir=True)
    def prefill(q_handle: T.handle, q_indptr_handle: T.handle,
                pages_handle: T.handle, indptr_handle: T.handle,
                values_handle: T.handle, last_len_handle: T.handle,
                k_rope_handle: T.handle, q_rope_handle: T.handle,
                out_handle: T.handle, lse_handle: T.handle, causal: T.int32,
                rotary_mode: T.int32, rope_scale: T.float32,
                rope_theta: T.float32, sm_scale: T.float32):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        B, n_q, n_pages, n_used = T.int32(), T.int32(), T.int32(), T.int32()
        off0, off1, off2, off3, off4, off5 = (T.int32(), T.int32(), T.int32(),
                                              T.int32(), T.int32(), T.int32())
        Q = T.match_buffer(q_handle, (n_q, H, D), "float32")
        q_indptr = T.match_buffer(q_indptr_handle, (B + 1,), "int32",
                                  elem_offset=off0)
        pages = T.match_buffer(
            pages_handle, (n_pages, 2, num_kv_heads, page_size, D), "float32")
        indptr = T.match_buffer(indptr_handle, (B + 1,), "int32",
                                elem_offset=off1)
        values = T.match_buffer(values_handle, (n_used,), "int32",
                                elem_offset=off2)
        last_len = T.match_buffer(last_len_handle, (B,), "int32",
                                  elem_offset=off3)
        T.match_buffer(k_rope_handle, (B,), "int32", elem_offset=off4)
        T.match_buffer(q_rope_handle, (n_q,), "int32", elem_offset=off5)
        out = T.match_buffer(out_handle, (n_q, H, D), "float32")
        lse = T.match_buffer(lse_handle, (n_q, H), "float32")
        T.Assert(rotary_mode == 0, "paged prefill attention expects RoPE applied")
        for th in T.parallel(n_q * H):
            with T.sblock("attention"):
                token = T.axis.spatial(n_q, th // H)
                head = T.axis.spatial(H, th % H)
                seq = T.sblock_alloc_buffer((1,), "int32")
                seen = T.sblock_alloc_buffer((1,), "int32")
                seq[0] = 0
                for b in range(B):
                    if q_indptr[b + 1] <= token:
                        seq[0] = b + 1
                seen[0] = 0  # the sequence's positions: full pages, then the last
                if indptr[seq[0] + 1] > indptr[seq[0]]:
                    seen[0] = ((indptr[seq[0] + 1] - indptr[seq[0]] - 1) * page_size
                               + last_len[seq[0]])
                if causal > 0:  # less the positions of its later new tokens
                    seen[0] -= q_indptr[seq[0] + 1] - token - 1
                if seen[0] > 0:
                    attend(Q, out, lse, token, head, sm_scale,
                           (seen[0] + page_size - 1) // page_size,
                           lambda p: T.min(page_size, seen[0] - p * page_size),
                           lambda p, r, d: pages[values[indptr[seq[0]] + p], 0,
                                                 head // group, r, d],
                           lambda p, r, d: pages[values[indptr[seq[0]] + p], 1,
                                                 head // group, r, d],
                           page_size)
                else:  # nothing to see: weight 0 when the cache merges the parts
                    for d in T.vectorized(D):
                        out[token, head, d] = T.float32(0)
                    lse[token, head] = T.float32(-5e4)

    return prefill.with_attr("global_symbol", PAGED_PREFILL_KERNEL)


ROPE_KERNEL = "fused_rope"  # the cache's RoPE kernel


def rope(cfg) -> tvm.tirx.PrimFunc:
    """RoPE for q and k as the cache applies it, with the cache kernel's
    arguments: split the fused q/k/v rows, rotate q and k. The cache's kernel
    computes a power, a cosine and a sine for every head and dimension of
    every token, on one thread; here threads take tokens, and each token's
    cosines and sines are computed once and serve all of its heads. The
    angles are TVM's own expressions (Llama 3's scaling included)."""
    H, KV, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    heads, half = H + 2 * KV, cfg.head_dim // 2
    scaling = {} if cfg.rope_scaling is None else cfg.rope_scaling.as_dict()
    frequency = switch_rope_freq_func(scaling)

    def angle(pos, d, which: int):  # cos (0) or sin (1) of position pos at dimension d
        cos, sin, lets = frequency(pos, d, D, cfg.rope_theta, "float32")
        value = (cos, sin)[which]
        for var, bound in lets.items():  # the inverse frequency, named once
            value = tvm.tirx.Let(var, bound, value)
        return value

    @T.prim_func(s_tir=True)
    def rotate(qkv_handle: T.handle, position_map_handle: T.handle,
               q_handle: T.handle, k_handle: T.handle, v_handle: T.handle,
               apply_rope: T.int64):
        T.func_attr({"op_pattern": 8, "tirx.is_scheduled": True,
                     "tirx.noalias": True})
        n, off = T.int32(), T.int32()
        qkv = T.match_buffer(qkv_handle, (n, heads, D), "float32")
        q = T.match_buffer(q_handle, (n, H, D), "float32")
        k = T.match_buffer(k_handle, (n, KV, D), "float32")
        v = T.match_buffer(v_handle, (n, KV, D), "float32")
        position_map = T.match_buffer(position_map_handle, (n,), "int32",
                                      elem_offset=off)
        for t in T.parallel(n):
            with T.sblock("rope"):
                i = T.axis.remap("S", [t])
                # dimensions d and d + half turn at the same frequency
                cs = T.sblock_alloc_buffer((2, half), "float32")  # on the stack
                for d in range(half):
                    cs[0, d] = T.if_then_else(apply_rope > 0, angle(
                        T.Cast("float32", position_map[i]), d, 0), T.float32(1))
                    cs[1, d] = T.if_then_else(apply_rope > 0, angle(
                        T.Cast("float32", position_map[i]), d, 1), T.float32(0))
                for h in range(H + KV):
                    for d in T.vectorized(half):  # rotate-half: (x1, x2) -> (-x2, x1)
                        if h < H:
                            q[i, h, d] = (cs[0, d] * qkv[i, h, d]
                                          - cs[1, d] * qkv[i, h, d + half])
                            q[i, h, d + half] = (cs[0, d] * qkv[i, h, d + half]
                                                 + cs[1, d] * qkv[i, h, d])
                        else:
                            k[i, h - H, d] = (cs[0, d] * qkv[i, h, d]
                                              - cs[1, d] * qkv[i, h, d + half])
                            k[i, h - H, d + half] = (cs[0, d] * qkv[i, h, d + half]
                                                     + cs[1, d] * qkv[i, h, d])
                for h in range(KV):
                    for d in T.vectorized(D):
                        v[i, h, d] = qkv[i, H + KV + h, d]

    return rotate.with_attr("global_symbol", ROPE_KERNEL)


def with_attention_kernels(mod: tvm.IRModule, cfg) -> tvm.IRModule:
    """`mod` (an exported model with a TIR paged KV cache) with the cache's
    RoPE, decode attention and both prefill attention kernels replaced by ours."""
    heads = cfg.num_kv_heads, cfg.num_heads, cfg.head_dim
    for name, kernel in ((ROPE_KERNEL, rope(cfg)),
                         (CACHE_KERNEL, decode_attention(*heads)),
                         (PREFILL_KERNEL, prefill_attention(*heads)),
                         (PAGED_PREFILL_KERNEL, paged_prefill_attention(*heads))):
        mod[mod.get_global_var(name)] = kernel
    return mod


class AttentionKernels:
    """A TVM model mixin: its exported module has this section's kernels in
    place of the cache's. The 4-bit model of section 4 and chapter 10's fp32
    model use it."""

    def export_tvm(self, spec, **kwargs):
        mod, *rest = super().export_tvm(spec, **kwargs)
        return (with_attention_kernels(mod, self.cfg), *rest)
