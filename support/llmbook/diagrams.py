"""Concept diagrams for the chapters, drawn with matplotlib so a reader can change them.

Each function returns a `matplotlib.figure.Figure` made with pyplot, so a notebook shows it at the
end of the cell (or with `plt.show()`), and `fig.savefig(...)` writes it out. Nothing here reads
a checkpoint: the numbers shown come from the `cfg` argument (a `LlamaConfig`, or anything with
hidden_size, num_layers, num_heads, num_kv_heads, head_dim, intermediate_size, vocab_size).

The block diagrams share one colour code: weights blue, activations sand, the KV cache green,
operations (norms, RoPE, softmax) lavender. They are drawn on a canvas whose data units are
inches, with (0, 0) at the bottom left, so every coordinate below can be read as a sketch on
paper: a box at (2, 3) is two inches from the left edge and three from the bottom.
"""
from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch

# ---- the shared look -------------------------------------------------------------------------

WEIGHT = "#b4cce8"      # a matrix read from the checkpoint
ACTIVATION = "#f4dcae"  # a tensor computed in this call
CACHE = "#bcdcb6"       # keys and values kept between calls
OPERATION = "#e2dcef"   # a computation without weights of its own (norm, RoPE, softmax)
PANEL = "#f6f6f4"       # the background of a group of boxes
EDGE = "#4d4d4d"        # box outlines and arrows
NOTE = "#555555"        # explanatory text
GROUPS = ("#8fb4dc", "#e6b27a", "#93c793", "#d9a0c0", "#b6a4d8", "#a9c9c4")  # GQA head groups

FONT = 10   # text in boxes
SMALL = 9   # notes and labels; nothing is drawn smaller, so it stays readable at page width
TITLE = 13


@dataclasses.dataclass(frozen=True)
class _Rect:
    """Where a box was drawn (centre and size, inches), so arrows can start at its edges."""

    x: float
    y: float
    w: float
    h: float

    @property
    def top(self) -> tuple[float, float]:
        return self.x, self.y + self.h / 2

    @property
    def bottom(self) -> tuple[float, float]:
        return self.x, self.y - self.h / 2

    @property
    def left(self) -> tuple[float, float]:
        return self.x - self.w / 2, self.y

    @property
    def right(self) -> tuple[float, float]:
        return self.x + self.w / 2, self.y


def _canvas(width: float, height: float, title: str):
    """A figure with one borderless axes covering it, in inches: the layout code places boxes in
    the same units as the figure size, so nothing is stretched."""
    fig = plt.figure(figsize=(width, height))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.axis("off")
    ax.text(width / 2, height - 0.3, title, ha="center", va="center", fontsize=TITLE,
            weight="bold")
    return fig, ax


def _round(radius: float) -> str:
    """A rounded-corner box style whose outline is exactly the given rectangle (no padding)."""
    return f"round,pad=0,rounding_size={radius}"


def _box(ax, x, y, w, h, text, color, *, fontsize=FONT, family=None, edge=EDGE, ls="-",
         hatch=None, ha="center") -> _Rect:
    """A rounded box centred at (x, y) with its text centred inside."""
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle=_round(0.06),
                                facecolor=color, edgecolor=edge, linewidth=1.1, linestyle=ls,
                                hatch=hatch))
    tx = x if ha == "center" else x - w / 2 + 0.12
    ax.text(tx, y, text, ha=ha, va="center", fontsize=fontsize, family=family,
            linespacing=1.3)
    return _Rect(x, y, w, h)


def _panel(ax, x0, y0, w, h, label=None, color=PANEL):
    """A light background grouping boxes, with its label at the top left."""
    ax.add_patch(FancyBboxPatch((x0, y0), w, h, boxstyle=_round(0.12),
                                facecolor=color, edgecolor="#cfcfcf", linewidth=1.0))
    if label:
        ax.text(x0 + 0.15, y0 + h - 0.2, label, ha="left", va="center", fontsize=FONT,
                weight="bold", color="#333333")


def _arrow(ax, start, end, *, color=EDGE, lw=1.3, ls="-", rad=0.0, head=True):
    """An arrow from `start` to `end` that touches both points (no gap at the box edges);
    `rad` bends it, for loops and for arrows that must go around something."""
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>" if head else "-",
                                 connectionstyle=f"arc3,rad={rad}", mutation_scale=13,
                                 shrinkA=0, shrinkB=0, color=color, linewidth=lw, linestyle=ls))


def _path(ax, points, *, color=EDGE, lw=1.3):
    """A right-angled path through `points` ending in an arrowhead: the residual bypasses."""
    xs, ys = zip(*points[:-1])
    ax.plot(xs, ys, color=color, linewidth=lw, solid_capstyle="butt")
    _arrow(ax, points[-2], points[-1], color=color, lw=lw)


def _note(ax, x, y, text, *, ha="left", va="center", size=SMALL, color=NOTE, **kw):
    """Explanatory text, in the notes' grey."""
    ax.text(x, y, text, ha=ha, va=va, fontsize=size, color=color, linespacing=1.35, **kw)


def _add(ax, x, y, r=0.2) -> _Rect:
    """The residual addition: a circled plus."""
    ax.add_patch(Circle((x, y), r, facecolor="white", edgecolor=EDGE, linewidth=1.3))
    ax.text(x, y, "+", ha="center", va="center", fontsize=14, weight="bold")
    return _Rect(x, y, 2 * r, 2 * r)


def _legend(ax, x, y, entries, *, gap=0.25):
    """A row of colour swatches with their meaning, starting at (x, y)."""
    for label, color in entries:
        ax.add_patch(FancyBboxPatch((x, y - 0.1), 0.3, 0.2, boxstyle=_round(0.04),
                                    facecolor=color, edgecolor=EDGE, linewidth=0.8))
        ax.text(x + 0.4, y, label, ha="left", va="center", fontsize=SMALL)
        x += 0.4 + 0.075 * len(label) + gap  # about 0.075 inch a character at 9 points


# ---- 1. the decoder layer --------------------------------------------------------------------

def decoder_layer(cfg) -> Figure:
    """The Llama decoder layer as a block diagram with `cfg`'s shapes: the attention sublayer
    (left column) feeds the feed-forward sublayer (right column), each around a residual add."""
    h, hd, ff = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    nq, nkv = cfg.num_heads, cfg.num_kv_heads
    fig, ax = _canvas(10, 8.2, f"One Llama decoder layer (the model stacks {cfg.num_layers})")
    # Two columns read like a page: attention on the left, then feed-forward on the right.
    _panel(ax, 0.15, 0.55, 5.05, 6.95, "attention sublayer")
    _panel(ax, 5.75, 0.55, 4.1, 6.95, "feed-forward sublayer (SwiGLU)")

    # Attention: the three projections side by side, because they read the same normed input.
    c1 = 2.75
    x_in = _box(ax, c1, 6.7, 2.4, 0.48, f"x   [T, {h}]", ACTIVATION)
    norm1 = _box(ax, c1, 5.95, 2.4, 0.42, "RMSNorm", OPERATION)
    proj = {name: _box(ax, cx, 5.1, 1.1, 0.62, f"{name}_proj\n{h} → {n}×{hd}", WEIGHT)
            for name, cx, n in (("q", 1.55, nq), ("k", 2.75, nkv), ("v", 3.95, nkv))}
    rope_q = _box(ax, 1.55, 4.25, 1.1, 0.4, "RoPE", OPERATION)
    rope_k = _box(ax, 2.75, 4.25, 1.1, 0.4, "RoPE", OPERATION)
    cache = _box(ax, 3.45, 3.4, 2.5, 0.62,
                 f"KV cache: append this call's k, v;\nread all t positions [t, {nkv}×{hd}]",
                 CACHE)
    attn = _box(ax, 2.85, 2.42, 3.7, 0.72,
                f"scores $q\\,k^\\top/\\sqrt{{{hd}}}$, causal mask,\n"
                f"softmax, × v   →   [T, {nq}×{hd}]", OPERATION)
    o_proj = _box(ax, c1, 1.6, 2.4, 0.48, f"o_proj   {nq * hd} → {h}", WEIGHT)
    add1 = _add(ax, c1, 0.95)

    _arrow(ax, x_in.bottom, norm1.top)
    for p in proj.values():  # one normed input fans out to three matrices
        _arrow(ax, norm1.bottom, p.top)
    _arrow(ax, proj["q"].bottom, rope_q.top)
    _arrow(ax, proj["k"].bottom, rope_k.top)
    _arrow(ax, rope_k.bottom, (rope_k.x, cache.top[1]))
    _arrow(ax, proj["v"].bottom, (proj["v"].x, cache.top[1]))
    _arrow(ax, rope_q.bottom, (rope_q.x, attn.top[1]))
    _note(ax, rope_q.x + 0.08, 3.4, "q", ha="left")
    _arrow(ax, cache.bottom, (cache.x, attn.top[1]))
    _note(ax, cache.x + 0.08, 2.92, "k, v", ha="left")
    _arrow(ax, (c1, attn.bottom[1]), o_proj.top)
    _arrow(ax, o_proj.bottom, add1.top)
    # The residual: x skips the whole sublayer and is added back, so the sublayer learns a change.
    _path(ax, [x_in.left, (0.45, x_in.y), (0.45, add1.y), add1.left])
    _note(ax, 0.62, 3.7, "residual", rotation=90, ha="center")

    # The sum h goes on to the right column; its path runs in the gap between the columns.
    c2 = 7.75
    h_in = _box(ax, c2, 6.7, 2.2, 0.48, f"h   [T, {h}]", ACTIVATION)
    _path(ax, [add1.right, (5.47, add1.y), (5.47, h_in.y), h_in.left])
    _note(ax, 4.3, add1.y + 0.15, f"h = x + attention   [T, {h}]", ha="center", va="bottom")

    norm2 = _box(ax, c2, 5.95, 2.2, 0.42, "RMSNorm", OPERATION)
    gate = _box(ax, 7.1, 5.1, 1.2, 0.62, f"gate_proj\n{h} → {ff}", WEIGHT)
    up = _box(ax, 8.4, 5.1, 1.2, 0.62, f"up_proj\n{h} → {ff}", WEIGHT)
    act = _box(ax, c2, 4.05, 2.4, 0.58, f"SiLU(gate) × up\n[T, {ff}]", OPERATION)
    down = _box(ax, c2, 3.0, 2.4, 0.6, f"down_proj\n{ff} → {h}", WEIGHT)
    add2 = _add(ax, c2, 2.15)
    out = _box(ax, c2, 1.3, 2.6, 0.5, f"output [T, {h}] → next layer", ACTIVATION)

    _arrow(ax, h_in.bottom, norm2.top)
    _arrow(ax, norm2.bottom, gate.top)
    _arrow(ax, norm2.bottom, up.top)
    _arrow(ax, gate.bottom, (c2 - 0.5, act.top[1]))
    _arrow(ax, up.bottom, (c2 + 0.5, act.top[1]))
    _arrow(ax, act.bottom, down.top)
    _arrow(ax, down.bottom, add2.top)
    _arrow(ax, add2.bottom, out.top)
    # The second residual runs on the right, where the column has room.
    _path(ax, [h_in.right, (9.55, h_in.y), (9.55, add2.y), add2.right])
    _note(ax, 9.38, 3.7, "residual", rotation=90, ha="center")

    _legend(ax, 0.3, 0.25, [("weights", WEIGHT), ("activations", ACTIVATION),
                            ("operations", OPERATION), ("KV cache", CACHE)])
    _note(ax, 9.8, 0.25, "T: tokens in this call (the prompt, or 1 in decode)", ha="right")
    return fig


# ---- 2. grouped-query attention --------------------------------------------------------------

def gqa(cfg) -> Figure:
    """Grouped-query attention: the query heads in colour groups, each group reading one key/value
    head, and what that saves in the KV cache against multi-head attention."""
    nq, nkv, hd, layers = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_layers
    group = nq // nkv
    fig, ax = _canvas(10, 5.2, f"Grouped-query attention: {nq} query heads share {nkv} "
                               "key/value heads")
    # Lay the heads out group by group: a small gap inside a group, a wider one between groups.
    x0, x1, inner, outer = 2.1, 9.7, 0.1, 0.35
    w = (x1 - x0 - nkv * (group - 1) * inner - (nkv - 1) * outer) / nq
    q_y, kv_y = 4.0, 2.15

    _note(ax, 0.25, q_y, f"query heads\n{nq} × {hd}, from q_proj", color="black", size=FONT)
    _panel(ax, 1.9, kv_y - 0.55, 8.0, 1.1, color=CACHE + "55")  # the cache, behind the KV heads
    _note(ax, 0.25, kv_y, f"key/value heads\n{nkv} × ({hd} + {hd}),\nkept in the KV cache",
          color="black", size=FONT)

    x = x0
    for g in range(nkv):
        color = GROUPS[g % len(GROUPS)]
        heads = []
        for i in range(group):
            heads.append(_box(ax, x + w / 2, q_y, w, 0.6, f"q{g * group + i}", color + "99"))
            x += w + inner
        x += outer - inner
        kv = _box(ax, (heads[0].x + heads[-1].x) / 2, kv_y, group * w, 0.6,
                  f"k{g}, v{g}", color)
        for head in heads:  # each query head scores against its group's keys and values
            _arrow(ax, head.bottom, (head.x * 0.4 + kv.x * 0.6, kv.top[1]), color="#555555")
    _note(ax, (x0 + x1) / 2, q_y + 0.55, f"{group} query heads share each key/value head",
          ha="center")

    fp32_bytes = 4
    per_layer = 2 * nkv * hd * fp32_bytes  # keys and values, one position, one layer
    mha = 2 * nq * hd * fp32_bytes
    _note(ax, 0.25, 0.95,
          f"The KV cache holds {nkv} heads per layer, not {nq}: {Fraction(nkv, nq)} of the bytes, "
          f"{per_layer:,} instead of {mha:,} bytes per position and layer in fp32\n"
          f"({per_layer * layers / 1024:.0f} KiB instead of {mha * layers / 1024:.0f} KiB "
          f"per token over all {layers} layers). Multi-head attention would keep {nq} "
          f"key/value heads,\none for each query head.", color="black")
    return fig


# ---- 3. three ways to keep a KV cache --------------------------------------------------------

def kv_cache_three_ways() -> Figure:
    """The concatenating cache of chapters 1-3 (MLX), TFLite's static buffer and TVM's paged
    cache, one panel each."""
    fig, ax = _canvas(10, 9.0, "Three ways to keep the KV cache")
    cell = 0.5

    # (a) Each step builds a new, longer array: the old rows are copied every time.
    _panel(ax, 0.15, 6.15, 9.7, 2.3, "(a) concatenating (chapters 1-3, MLX)")
    for t in (1, 2, 3):
        y = 7.85 - (t - 1) * 0.5
        _note(ax, 0.5, y, f"t = {t}", color="black", size=FONT)
        for i in range(t):
            new = i == t - 1
            _box(ax, 1.4 + i * (cell + 0.04), y, cell, 0.4, "new" if new else "copy",
                 ACTIVATION if new else CACHE, fontsize=SMALL)
        _note(ax, 3.2, y, f"K = concatenate([K, k_{t}])  →  a new array [{t}, 192]",
              family="monospace")
    _note(ax, 0.5, 6.38, "copies the cache every step: step t moves t rows, so n steps move "
          "about n²/2 rows", color="black")

    # (b) One buffer as long as the longest sequence; input_pos says where this call writes.
    _panel(ax, 0.15, 3.65, 9.7, 2.3, "(b) static buffer (TFLite)")
    slots, filled, w = 16, 5, 0.46
    for i in range(slots):
        color = CACHE if i < filled else ACTIVATION if i == filled else "white"
        r = _box(ax, 1.4 + i * (w + 0.04), 4.75, w, 0.42, str(i), color, fontsize=SMALL,
                 ls="-" if i <= filled else "--")
        if i == filled:
            _arrow(ax, (r.x, r.y + 0.62), r.top)
            _note(ax, r.x + 0.1, r.y + 0.55, f"input_pos = {filled}: this step writes k, v here",
                  color="black")
    _note(ax, 0.5, 4.75, "slot", color="black", size=FONT)
    end = 1.4 + (slots - 1) * (w + 0.04) + w / 2
    ax.annotate("", (1.4 - w / 2, 4.35), (end, 4.35),
                arrowprops=dict(arrowstyle="<->", color=NOTE, shrinkA=0, shrinkB=0))
    _note(ax, (1.4 + end) / 2 - w / 2, 4.18, "max length: allocated once", ha="center", va="top")
    _note(ax, 0.5, 3.85, "fixed shapes, room for max length; the empty slots are masked out of "
          "attention", color="black")

    # (c) A pool of fixed-size pages; each sequence lists its pages in a page table.
    _panel(ax, 0.15, 0.15, 9.7, 3.3, "(c) paged (TVM's PagedKVCache): a pool of pages of 16 "
           "positions")
    seqs = {"A": ([1, 4, 2], 37, GROUPS[0]), "B": ([1, 6], 25, GROUPS[1]),
            "C": ([8, 5], 20, GROUPS[2])}
    owner = {}
    for name, (pages, _, color) in seqs.items():
        for p in pages:
            owner.setdefault(p, []).append(color)
    page_w, pool_y = 0.78, 2.5
    pool = {}
    _note(ax, 0.5, pool_y, "pool", color="black", size=FONT)
    for p in range(10):
        colors = owner.get(p)
        pool[p] = _box(ax, 1.4 + p * (page_w + 0.1), pool_y, page_w, 0.5, f"page {p}",
                       colors[0] if colors else "white", fontsize=SMALL,
                       ls="-" if colors else "--", hatch="//" if colors and len(colors) > 1
                       else None)
    _note(ax, pool[1].x, pool_y + 0.33, "shared by A and B (a fork)", ha="left", va="bottom")

    # Page tables below the pool; arrows go up from each entry to its page.
    for k, (name, (pages, length, color)) in enumerate(seqs.items()):
        tx = 1.4 + k * 2.9
        _note(ax, tx - 0.25, 1.05, f"{name}", color="black", size=FONT, weight="bold",
              ha="right")
        for j, p in enumerate(pages):
            entry = _box(ax, tx + j * 0.5 + 0.2, 1.05, 0.42, 0.4, str(p), color, fontsize=SMALL)
            _arrow(ax, entry.top, pool[p].bottom, color="#6b6b6b", lw=1.0)
        _note(ax, tx - 0.05, 0.65, f"page table, {length} positions", ha="left")
    _note(ax, 9.75, 0.32, "pages need not be contiguous; free pages (dashed) return to the pool",
          ha="right")
    return fig


# ---- 4. prefill and decode -------------------------------------------------------------------

def prefill_decode() -> Figure:
    """Prefill (every prompt position in one call) and decode (one position a call, in a loop),
    and the same split as two signatures of one .tflite file."""
    fig, ax = _canvas(10, 8.0, "Prefill, then decode")
    _panel(ax, 0.15, 5.45, 9.7, 1.95)
    _panel(ax, 0.15, 2.85, 9.7, 2.4)
    _note(ax, 0.35, 6.45, "Prefill", color="black", size=12, weight="bold")
    _note(ax, 0.35, 4.3, "Decode", color="black", size=12, weight="bold")

    p_in = _box(ax, 2.3, 6.45, 1.55, 0.75, "prompt:\nall n tokens,\none call", ACTIVATION)
    p_model = _box(ax, 4.55, 6.45, 2.3, 0.95, "every position computed\nin parallel: "
                   "matrix × matrix,\ncompute-bound", OPERATION)
    p_cache = _box(ax, 6.85, 6.45, 1.7, 0.75, "KV cache filled\nfor all n positions", CACHE)
    p_out = _box(ax, 8.85, 6.45, 1.7, 0.75, "logits of the\nlast position", ACTIVATION)
    for a, b in ((p_in, p_model), (p_model, p_cache), (p_cache, p_out)):
        _arrow(ax, a.right, b.left)

    d_in = _box(ax, 2.3, 4.35, 1.55, 0.75, "1 token\n+ the cache", ACTIVATION)
    d_model = _box(ax, 4.55, 4.35, 2.3, 1.15, "one position: matrix × vector,\nmemory-bound: "
                   "every weight\nread for one token", OPERATION)
    d_cache = _box(ax, 6.85, 4.35, 1.7, 0.75, "cache gets\none more row", CACHE)
    d_out = _box(ax, 8.85, 4.35, 1.7, 0.75, "logits →\nnext token", ACTIVATION)
    for a, b in ((d_in, d_model), (d_model, d_cache), (d_cache, d_out)):
        _arrow(ax, a.right, b.left)
    # The loop: each new token is the next call's input, until end-of-text or a length limit.
    _arrow(ax, d_out.bottom, d_in.bottom, rad=-0.22)
    _note(ax, 5.6, 3.05, "next token fed back, one call per token", ha="center")
    # The prefilled cache is what the first decode step reads.
    _arrow(ax, (p_cache.x - 0.3, p_cache.bottom[1]), (d_model.right[0] - 0.2, d_model.top[1]),
           color=EDGE, ls="--")
    _note(ax, 6.05, 5.3, "the cache carries over", ha="left", va="center")

    # TFLite: the two phases are two signatures of one file; the caller owns the cache.
    _panel(ax, 0.15, 0.15, 9.7, 2.55, "The TFLite view: one .tflite file, two signatures; the "
           "caller holds the cache and feeds it back")
    caller = _box(ax, 1.0, 1.15, 1.5, 1.1, "caller\nholds kv_cache,\nfeeds it back", CACHE)
    ax.add_patch(FancyBboxPatch((3.1, 0.35), 6.6, 1.85, boxstyle=_round(0.08),
                                facecolor="white", edgecolor=EDGE, linewidth=1.0))
    _note(ax, 3.25, 1.98, "model.tflite", color="black", family="monospace")
    sigs = [("prefill(tokens[1,64], input_pos[64], kv_cache) -> logits, kv_cache'", 1.5),
            ("decode(tokens[1,1], input_pos[1], kv_cache) -> logits, kv_cache'", 0.8)]
    for text, y in sigs:
        sig = _box(ax, 6.45, y, 6.3, 0.5, text, OPERATION, fontsize=SMALL, family="monospace")
        # One arrow in, one back: the cache is an input and an output of every call.
        _arrow(ax, (caller.right[0], y + 0.1), (sig.left[0], y + 0.1), color="#3b7a3b")
        _arrow(ax, (sig.left[0], y - 0.1), (caller.right[0], y - 0.1), color="#3b7a3b")
    _note(ax, 2.42, 1.95, "kv_cache in / out", ha="center", va="center")
    return fig


# ---- 5. layers, operations, kernels ----------------------------------------------------------

def hierarchy() -> Figure:
    """Three levels of one model: the layer, the fused operations inside it and the kernels that
    run on the hardware, with the tools of the book that work at each level."""
    fig, ax = _canvas(10, 6.0, "Layer, operations, kernels")
    layer_y, ops_y, kernel_y = 4.35, 2.65, 0.9
    levels = [  # (y, name, what it is, who works there)
        (layer_y, "Layer", "model level", "transformers:\nlayers (modules)"),
        (ops_y, "Operations", "fused sub-graphs: the\nunit a vendor swaps in\nas one object",
         "chapter 5's fused layer:\noperations"),
        (kernel_y, "Kernels", "basic operators that\nrun on the hardware",
         "TVM / TFLite / llama.cpp:\nkernels (compiled\nor hand-written)"),
    ]
    _note(ax, 8.8, 5.35, "who works here", ha="center", color="black", weight="bold")
    for y, name, what, who in levels:
        _panel(ax, 0.15, y - 0.72, 9.7, 1.44)
        _note(ax, 0.3, y + 0.32, name, color="black", size=12, weight="bold")
        _note(ax, 0.3, y - 0.22, what)
        _box(ax, 8.8, y, 2.0, 1.05, who, "white")

    # Here the colours mark the level (cool to warm, top to bottom), not weights or activations.
    layer = _box(ax, 4.8, layer_y, 4.9, 0.8, "one decoder layer\n(what transformers calls a "
                 "module: LlamaDecoderLayer)", "#d3dce8")
    # Operations and kernels are ordered so that the lines between them do not cross.
    norm, ffn, attn = "RMSNorm\n+ residual", "feed-forward\n(SwiGLU)", "attention"
    ops = {name: _box(ax, x, ops_y, 1.5, 0.75, name, OPERATION)
           for name, x in ((norm, 3.1), (ffn, 4.8), (attn, 6.5))}
    reduce, elementwise = "reductions\n(sum, max)", "elementwise\n(SiLU ×, +)"
    matmul = "matmul /\nGEMV"
    kernels = {name: _box(ax, x, kernel_y, 1.0, 0.8, name, "#efe2c6", fontsize=SMALL)
               for name, x in ((reduce, 2.55), (elementwise, 3.67), (matmul, 4.8),
                               ("softmax", 5.93), ("RoPE", 7.05))}
    for op in ops.values():
        _arrow(ax, layer.bottom, op.top, color="#777777", lw=1.0)
    uses = {norm: [reduce, elementwise], ffn: [elementwise, matmul],
            attn: [matmul, "softmax", "RoPE"]}
    for op, names in uses.items():
        for name in names:
            _arrow(ax, ops[op].bottom, kernels[name].top, color="#777777", lw=1.0)
    return fig


# ---- 6. the roofline -------------------------------------------------------------------------

def roofline(bandwidth_gbs: float, compute_gflops: float, points: list[dict]) -> Figure:
    """A log-log roofline: attainable GFLOP/s = min(compute, bandwidth × intensity), with measured
    `points` ({"label", "intensity", "gflops", "kind": "decode" | "prefill"}) on it."""
    fig, ax = plt.subplots(figsize=(9.5, 5.4))
    fig.subplots_adjust(left=0.09, right=0.97, bottom=0.12, top=0.9)  # fixed, for the text angle
    ridge = compute_gflops / bandwidth_gbs  # FLOP per byte where the two limits meet
    lowest = min([p["gflops"] for p in points] + [compute_gflops])
    right = max(1000, 20 * max(p["intensity"] for p in points))  # room for the labels
    ax.set(xscale="log", yscale="log", xlim=(0.1, right), ylim=(lowest / 10, 2 * compute_gflops),
           xlabel="arithmetic intensity (FLOP per byte read)", ylabel="attainable GFLOP/s",
           title="Roofline: memory-bound left of the ridge, compute-bound right of it")
    xs = [0.1, ridge, right]
    ax.plot(xs, [min(compute_gflops, bandwidth_gbs * x) for x in xs], color=EDGE, lw=2)
    ax.axvline(ridge, color="#999999", ls=":", lw=1)
    ax.plot([ridge], [compute_gflops], "o", color=EDGE, ms=6)
    ax.annotate(f"ridge: {ridge:.1f} FLOP/byte", (ridge, compute_gflops), xytext=(8, -16),
                textcoords="offset points", fontsize=SMALL, color=NOTE)

    # The slope's label follows the line: its angle on screen depends on the axes' size. It
    # starts at the first place along the slope (half a decade long) with no point near it.
    x_lo = max(0.1, lowest / 10 / bandwidth_gbs) * 1.3
    starts = [x_lo * 10 ** (k / 4) for k in range(8) if x_lo * 10 ** (k / 4 + 0.5) <= ridge]
    near = [p["intensity"] for p in points]
    x_text = next((x for x in starts if not any(x / 1.4 < i < x * 10 ** 0.65 for i in near)),
                  x_lo)
    a, b = ax.transData.transform([(x_text, bandwidth_gbs * x_text),
                                   (10 * x_text, bandwidth_gbs * 10 * x_text)])
    angle = math.degrees(math.atan2(b[1] - a[1], b[0] - a[0]))
    ax.annotate(f"memory: {bandwidth_gbs:.0f} GB/s", (x_text, bandwidth_gbs * x_text),
                xytext=(-4, 6), textcoords="offset points", rotation=angle,
                rotation_mode="anchor", ha="left", fontsize=FONT)
    ax.annotate(f"compute: {compute_gflops:.0f} GFLOP/s", (ridge, compute_gflops),
                xytext=(-8, 6), textcoords="offset points", ha="right", fontsize=FONT)

    style = {"decode": dict(marker="o", color="#3f7fbf"), "prefill": dict(marker="s",
                                                                        color="#d0803a")}
    # Each label takes the first of a few places around its point (right, left, above, below,
    # further out) where its box, estimated from its length, overlaps no label placed before it
    # and no point: measured engines bunch up, and overlapping names cannot be read.
    px = fig.dpi / 72  # pixels per typographic point
    char_w, line_h = 0.55 * SMALL * px, 1.25 * SMALL * px
    xy = {id(p): ax.transData.transform((p["intensity"], p["gflops"])) for p in points}
    taken = [(x - 5, y - 5, x + 5, y + 5) for x, y in xy.values()]  # the markers
    offsets = [(9, 4), (9, -12), (-9, 4), (-9, -12), (9, 16), (9, -24), (-9, 16), (-9, -24),
               (9, 28), (9, -36), (-9, 28), (-9, -36)]

    def box(p, dx, dy):
        x, y = xy[id(p)]
        w = char_w * len(p["label"])
        left = x + dx * px if dx > 0 else x + dx * px - w
        return left, y + dy * px, left + w, y + dy * px + line_h

    def free(b):
        return not any(b[0] < t[2] and t[0] < b[2] and b[1] < t[3] and t[1] < b[3] for t in taken)

    for p in sorted(points, key=lambda p: (p["intensity"], -p["gflops"])):
        ax.plot(p["intensity"], p["gflops"], ls="none", ms=8, **style[p["kind"]])
        dx, dy = next(((dx, dy) for dx, dy in offsets if free(box(p, dx, dy))), offsets[0])
        taken.append(box(p, dx, dy))
        ax.annotate(p["label"], (p["intensity"], p["gflops"]), xytext=(dx, dy),
                    textcoords="offset points", ha="left" if dx > 0 else "right",
                    va="bottom", fontsize=SMALL)
    handles = [Line2D([], [], ls="none", ms=8, label=kind, **s) for kind, s in style.items()]
    ax.legend(handles=handles, loc="lower right", fontsize=SMALL)
    ax.grid(True, which="major", color="#e4e4e4", lw=0.8)
    return fig


# ---- 11. a request's life in the server ------------------------------------------------------

def speculation(words=("The", "capital", "of", "France", "is"),
                drafts=("Paris", ".", "It", "has"), engine=("Paris", ".", "The", "…", "…"),
                kept: int = 2) -> Figure:
    """One round of speculative decoding (chapter 12): a drafter guesses the next tokens, the
    engine scores the pending token and every guess in one call, the guesses that match its
    own choices are kept with its token after them, and the rest leave the cache (popn)."""
    fig, ax = _canvas(10, 5.6, "One round of speculative decoding")
    w, gap, x0, n = 0.92, 0.12, 0.3, len(words)

    def left(i):
        return x0 + i * (w + gap)

    def cell(i, y, text, color, **kw):
        return _box(ax, left(i) + w / 2, y, w, 0.5, text, color, fontsize=SMALL, **kw)

    _note(ax, x0, 4.95, "1. the sequence so far; its last token is pending (sampled, not yet "
          "in the cache)")
    _note(ax, x0, 4.65, "2. the drafter guesses k = 4 tokens cheaply (prompt lookup, or a "
          "smaller model)")
    for i, word in enumerate(words):
        cell(i, 4.1, word, CACHE if i < n - 1 else ACTIVATION)
    for j, word in enumerate(drafts):
        cell(n + j, 4.1, word, "white", ls="--")
    _panel(ax, left(n - 1) - 0.1, 2.2, (len(drafts) + 1) * (w + gap) + 0.08, 1.0)
    _note(ax, x0, 2.7, "3. one verify call scores\nall k + 1 positions: below\neach token, "
          "the engine's\nchoice for the next one")
    for j, word in enumerate(engine):
        color = "#bfe3b4" if j < kept else ("#f2c1b6" if j == kept else "white")
        cell(n - 1 + j, 2.55, word, color, ls="-" if j <= kept else ":")
        _arrow(ax, (left(n - 1 + j) + w / 2, 3.85), (left(n - 1 + j) + w / 2, 2.8), lw=0.9)
        if j <= kept and j < len(drafts):  # its choice against the next guess
            same = j < kept
            _arrow(ax, (left(n - 1 + j) + w, 2.55), (left(n + j) + w / 2 - 0.05, 3.85),
                   lw=0.8, ls="-" if same else ":", color="#3b7a3b" if same else "#b04a3a",
                   head=False)
    _note(ax, x0, 1.45, f"4. keep the {kept} guesses the engine agrees with, then its own "
          f"token where they first differ: {kept + 1} tokens from one call.\n"
          "    The rejected guesses leave the KV cache (TVM's kv_state_popn). With sampling, "
          "a guess is kept with\n    probability min(1, p/q) and a rejected one redrawn from "
          "max(p − q, 0): the output keeps the model's distribution.")
    _legend(ax, x0, 0.45, [("in the cache", CACHE), ("pending", ACTIVATION),
                           ("guess", "white"), ("agrees: kept", "#bfe3b4"),
                           ("the engine's token", "#f2c1b6")])
    return fig


def request_life() -> Figure:
    """One request through chapter 11's server: the HTTP side checks it and queues it, the
    engine loop admits it when its pages are free, prefills it (forking a cached prefix), gives
    it a slot in every decode step, streams each piece of text out, and returns its pages."""
    fig, ax = _canvas(10, 6.6, "A request's life in the server")
    # the HTTP side: the event loop of uvicorn, one coroutine per request
    _panel(ax, 0.15, 3.9, 2.75, 2.2, "HTTP (FastAPI, asyncio)")
    client = _box(ax, 1.5, 5.35, 2.3, 0.5, "client: openai, stream=True", ACTIVATION,
                  fontsize=SMALL)
    check = _box(ax, 1.5, 4.45, 2.3, 0.85, "parse and check:\nbad → 400 / 404\nqueue full → 503",
                 OPERATION, fontsize=SMALL)
    _arrow(ax, client.bottom, check.top)
    # the engine's thread
    _panel(ax, 3.15, 1.75, 6.7, 4.35, "the engine loop (one thread owns the engine)")
    queue = _box(ax, 4.1, 4.95, 1.4, 0.75, "queue\n(arrival order)", ACTIVATION, fontsize=SMALL)
    admit = _box(ax, 6.05, 4.95, 2.1, 0.75, "admit: batch has room,\npages for its budget",
                 OPERATION, fontsize=SMALL)
    prefill = _box(ax, 8.6, 4.95, 2.15, 0.75, "prefill: whole or in\nchunks; a cached\n"
                   "prefix is forked", OPERATION, fontsize=SMALL)
    decode = _box(ax, 7.3, 3.2, 3.0, 0.95, "decode slot: one token per step,\nin one batched "
                  "step with every\nother running request", OPERATION, fontsize=SMALL)
    done = _box(ax, 4.5, 2.35, 2.1, 0.8, "finished: EOS, stop,\nlength or client gone\n"
                "→ pages back", CACHE, fontsize=SMALL)
    _arrow(ax, check.right, queue.left)
    _arrow(ax, queue.right, admit.left)
    _arrow(ax, admit.right, prefill.left)
    _arrow(ax, prefill.bottom, (decode.x + 1.0, decode.top[1]))
    _arrow(ax, (decode.right[0] - 0.2, decode.bottom[1]), (decode.right[0] - 0.7,
                                                            decode.bottom[1]), rad=-2.2)
    _note(ax, 9.15, 2.35, "next step", ha="center")
    _arrow(ax, decode.left, done.top, rad=0.25)
    # what goes back to the client
    _path(ax, [(6.2, decode.top[1]), (6.2, 3.8), (0.3, 3.8), (0.3, client.y),
               client.left], color="#3b7a3b")
    _note(ax, 3.3, 3.98, "each piece of text as an SSE chunk, then [DONE]", color="#3b7a3b")
    # the cache's pages
    _panel(ax, 0.15, 0.15, 9.7, 1.4, "the paged KV cache")
    for i in range(18):
        kind = CACHE if i < 7 else ("#d9e8d5" if i < 10 else "white")
        ax.add_patch(FancyBboxPatch((0.4 + i * 0.5, 0.45), 0.4, 0.4, boxstyle=_round(0.04),
                                    facecolor=kind, edgecolor=EDGE, linewidth=0.8))
    _note(ax, 0.4, 1.08, "held by running requests", size=SMALL)
    _note(ax, 3.9, 1.08, "a cached prefix (shared)", size=SMALL)
    _note(ax, 5.4 + 0.2, 1.08, "free: what admission counts", size=SMALL)
    return fig


# ---- 13. tensor parallelism ------------------------------------------------------------------

def tensor_parallel(cfg, ranks: int) -> Figure:
    """The Megatron split of one decoder layer and the head over `ranks` ranks (one column
    each): what rows or columns of each weight a rank holds, its own key/value heads in its
    cache, and the collectives that join the columns (two all-reduces a layer, an all-gather)."""
    if ranks < 1 or cfg.num_heads % ranks or cfg.num_kv_heads % ranks:
        raise ValueError(f"{ranks} ranks do not divide {cfg.num_heads} query heads and "
                         f"{cfg.num_kv_heads} key/value heads")
    nq, nkv, ffn, vocab = (cfg.num_heads // ranks, cfg.num_kv_heads // ranks,
                           cfg.intermediate_size, cfg.vocab_size)
    fig, ax = _canvas(11, 7.6, f"Tensor parallelism over {ranks} ranks: one decoder layer "
                               "and the head")
    x0, x1 = 2.5, 10.8
    col = (x1 - x0) / ranks
    w = min(2.9, col - 0.25)
    rows = {"x": 6.75, "qkv": 6.0, "attn": 5.2, "o": 4.4, "ar1": 3.75, "gu": 3.1,
            "down": 2.35, "ar2": 1.7, "head": 1.05, "ag": 0.4}
    labels = {"qkv": "q, k, v: split by\noutput rows (column)",
              "attn": "attention on its\nown heads",
              "o": "o: split by input\ncolumns (row)", "gu": "gate, up: split by\nrows (column)",
              "down": "down: split by\ncolumns (row)", "head": "head: split by\nvocabulary rows"}
    for key, text in labels.items():
        _note(ax, 0.2, rows[key], text, color="black")
    _note(ax, 0.2, rows["x"], "x [tokens, hidden]\non every rank", color="black")
    def span_text(a, b):  # an inclusive range, or one number
        return f"{a}" if a == b else f"{a}–{b}"

    for r in range(ranks):
        cx = x0 + col * (r + 0.5)
        f0, f1 = ffn * r // ranks, ffn * (r + 1) // ranks
        v = -(-vocab // ranks)
        boxes = [
            _box(ax, cx, rows["x"], w, 0.5, f"rank {r}: x (whole)", ACTIVATION),
            _box(ax, cx, rows["qkv"], w, 0.6, f"q heads {span_text(r * nq, (r + 1) * nq - 1)}\n"
                 f"k, v heads {span_text(r * nkv, (r + 1) * nkv - 1)}", WEIGHT),
            _box(ax, cx, rows["attn"], w, 0.6, f"attention, KV cache of\nk, v heads "
                 f"{span_text(r * nkv, (r + 1) * nkv - 1)} only", CACHE),
            _box(ax, cx, rows["o"], w, 0.6, "o columns of its heads\n→ partial sum [hidden]",
                 WEIGHT),
        ]
        for a, b in zip(boxes, boxes[1:]):
            _arrow(ax, a.bottom, b.top)
        _arrow(ax, boxes[-1].bottom, (cx, rows["ar1"] + 0.22))
        mlp = [_box(ax, cx, rows["gu"], w, 0.6, f"gate, up rows {f0}–{f1 - 1}\nSwiGLU", WEIGHT),
               _box(ax, cx, rows["down"], w, 0.6, f"down columns {f0}–{f1 - 1}\n"
                    "→ partial sum [hidden]", WEIGHT)]
        _arrow(ax, (cx, rows["ar1"] - 0.22), mlp[0].top)
        _arrow(ax, mlp[0].bottom, mlp[1].top)
        _arrow(ax, mlp[1].bottom, (cx, rows["ar2"] + 0.22))
        head = _box(ax, cx, rows["head"], w, 0.5,
                    f"head rows {r * v}–{min(vocab, (r + 1) * v) - 1}", WEIGHT)
        _arrow(ax, (cx, rows["ar2"] - 0.22), head.top)
        _arrow(ax, head.bottom, (cx, rows["ag"] + 0.2))
    span = (x1 - x0 - 0.1, x0 + (x1 - x0) / 2)
    for key, text in (("ar1", "all-reduce: x + Σ partial sums, on every rank"),
                      ("ar2", "all-reduce: x + Σ partial sums, on every rank"),
                      ("ag", "all-gather: the vocabulary blocks side by side → logits")):
        _box(ax, span[1], rows[key], span[0], 0.44 if key != "ag" else 0.4, text, OPERATION)
    return fig
