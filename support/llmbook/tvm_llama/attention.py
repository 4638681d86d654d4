# Generated from notebooks/09_4bit.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

"""A decode attention kernel for TVM's paged KV cache on CPUs: the cache's own
kernel runs every head and position as scalar loops on one thread. Written in
notebooks/09_4bit.ipynb."""
import math

import tvm
from tvm.relax.frontend.nn.llm.position_embedding import switch_rope_freq_func
from tvm.script import tirx as T

CACHE_KERNEL = "batch_decode_paged_kv_cpu"  # the cache's decode kernel, by name


def decode_attention(num_kv_heads: int, num_heads: int, head_dim: int,
                     page_size: int = 16) -> tvm.tirx.PrimFunc:
    """One new query per sequence against its cached keys and values, page by
    page, with the cache kernel's arguments. Threads take (sequence, head)
    pairs; the head dimension is vectorized. Per page: 16 scores, their max,
    one rescale of the running output, then the weighted values (the online
    softmax of chapter 1, a page at a time)."""
    H, D, group = num_heads, head_dim, num_heads // num_kv_heads
    log2e = math.log2(math.e)  # exp(x) = exp2(x * log2 e)

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
                i = T.axis.remap("S", [bh])
                q = T.sblock_alloc_buffer((D,), "float32", scope="local")
                o = T.sblock_alloc_buffer((D,), "float32", scope="local")
                s = T.sblock_alloc_buffer((page_size,), "float32",
                                          scope="local")
                # running max, running sum, this page's max, rescale factor
                st = T.sblock_alloc_buffer((4,), "float32", scope="local")
                rows = T.sblock_alloc_buffer((1,), "int32", scope="local")
                for d in T.vectorized(D):
                    q[d] = Q[i // H, i % H, d] * sm_scale * T.float32(log2e)
                    o[d] = T.float32(0)
                st[0] = T.float32(-3.0e38)
                st[1] = T.float32(0)
                # the sequence's pages: values[indptr[seq] : indptr[seq + 1]]
                for p in range(indptr[i // H + 1] - indptr[i // H]):
                    # positions in this page: all 16 but in the last page
                    rows[0] = T.if_then_else(
                        p == indptr[i // H + 1] - indptr[i // H] - 1,
                        last_len[i // H], page_size)
                    st[2] = T.float32(-3.0e38)
                    for r in range(rows[0]):
                        s[r] = T.float32(0)
                        for d in range(D):
                            s[r] += q[d] * pages[values[indptr[i // H] + p], 0,
                                                 i % H // group, r, d]
                        st[2] = T.max(st[2], s[r])
                    st[3] = T.exp2(st[0] - T.max(st[0], st[2]))
                    st[0] = T.max(st[0], st[2])
                    st[1] *= st[3]
                    for d in T.vectorized(D):
                        o[d] *= st[3]
                    for r in range(rows[0]):
                        s[r] = T.exp2(s[r] - st[0])
                        st[1] += s[r]
                        for d in T.vectorized(D):
                            o[d] += s[r] * pages[values[indptr[i // H] + p], 1,
                                                 i % H // group, r, d]
                for d in T.vectorized(D):
                    out[i // H, i % H, d] = o[d] / st[1]
                lse[i // H, i % H] = st[0] + T.log2(st[1])

    return decode.with_attr("global_symbol", CACHE_KERNEL)


PREFILL_KERNEL = "batch_prefill_ragged_kv"  # the cache's prefill kernel


def prefill_attention(num_kv_heads: int, num_heads: int,
                      head_dim: int) -> tvm.tirx.PrimFunc:
    """The prompt's queries against the prompt's own keys and values (the
    cache's ragged prefill kernel, with its arguments). Threads take (token,
    head) pairs, and each pair visits only the keys the causal mask lets it
    see, 16 at a time, with the same online softmax as decode_attention. The
    cache's kernel runs every pair on one thread, masked keys included."""
    H, D, group, block = num_heads, head_dim, num_heads // num_kv_heads, 16
    log2e = math.log2(math.e)

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
                i = T.axis.remap("S", [th])
                q = T.sblock_alloc_buffer((D,), "float32", scope="local")
                o = T.sblock_alloc_buffer((D,), "float32", scope="local")
                s = T.sblock_alloc_buffer((block,), "float32", scope="local")
                st = T.sblock_alloc_buffer((4,), "float32", scope="local")
                # [0] the token's sequence, [1] its first key, [2] keys it sees
                at = T.sblock_alloc_buffer((3,), "int32", scope="local")
                at[0] = 0
                for b in range(B):
                    if q_indptr[b + 1] <= i // H:
                        at[0] = b + 1
                at[1] = kv_indptr[at[0]]
                # causal: the sequence's earlier keys (a cached prefix, in the
                # kv lengths) plus its own up to this token
                at[2] = T.if_then_else(
                    causal > 0,
                    kv_indptr[at[0] + 1] - kv_indptr[at[0]]
                    - (q_indptr[at[0] + 1] - i // H) + 1,
                    kv_indptr[at[0] + 1] - kv_indptr[at[0]])
                for d in T.vectorized(D):
                    q[d] = Q[i // H, i % H, d] * sm_scale * T.float32(log2e)
                    o[d] = T.float32(0)
                st[0] = T.float32(-3.0e38)
                st[1] = T.float32(0)
                for c in range((at[2] + block - 1) // block):
                    st[2] = T.float32(-3.0e38)
                    for r in range(T.min(block, at[2] - c * block)):
                        s[r] = T.float32(0)
                        for d in range(D):
                            s[r] += q[d] * K[at[1] + c * block + r,
                                             i % H // group, d]
                        st[2] = T.max(st[2], s[r])
                    st[3] = T.exp2(st[0] - T.max(st[0], st[2]))
                    st[0] = T.max(st[0], st[2])
                    st[1] *= st[3]
                    for d in T.vectorized(D):
                        o[d] *= st[3]
                    for r in range(T.min(block, at[2] - c * block)):
                        s[r] = T.exp2(s[r] - st[0])
                        st[1] += s[r]
                        for d in T.vectorized(D):
                            o[d] += s[r] * V[at[1] + c * block + r,
                                             i % H // group, d]
                for d in T.vectorized(D):
                    out[i // H, i % H, d] = o[d] / st[1]
                lse[i // H, i % H] = st[0] + T.log2(st[1])

    return prefill.with_attr("global_symbol", PREFILL_KERNEL)


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
                cs = T.sblock_alloc_buffer((2, half), "float32", scope="local")
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
    RoPE, decode attention and prefill attention kernels replaced by ours."""
    heads = cfg.num_kv_heads, cfg.num_heads, cfg.head_dim
    for name, kernel in ((ROPE_KERNEL, rope(cfg)),
                         (CACHE_KERNEL, decode_attention(*heads)),
                         (PREFILL_KERNEL, prefill_attention(*heads))):
        mod[mod.get_global_var(name)] = kernel
    return mod
