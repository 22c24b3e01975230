"""Searching for TrioNet: Combining Convolution with Local and Global Self-Attention -- Pi, Wang,
Li, Li and Yuille, BMVC 2021 (arXiv:2111.07547).

Run:
    python 05_trionet_search.py --demo                  # no data, ~4 s: checks and figures
    python 05_trionet_search.py --quick --data cifar10  # 2-core CPU, ~4.5 min: hierarchical/flat
    python 05_trionet_search.py --quick --data cifar10 --experiment search
                                      # ~7.5 min: TrioNet vs the CNN, with its controls
    python 05_trionet_search.py --quick --data cifar10 --experiment sharing
                                      # ~1 min, after search: multi-head vs plain sharing
    python 05_trionet_search.py --data cifar10          # full preset: one GPU (not measured)
"""
import itertools
import json
import math
import os
import time
from collections import Counter
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

import utils

# %% [markdown]
# # TrioNet: let every block choose convolution, local or global attention
#
# A ResNet block has one spatial operator, the 3x3 convolution. TrioNet lets **each block
# choose** among three: a convolution, local self-attention over a $K \times K$ window, or
# global (axial) self-attention; and, within the chosen type, its kernel or window, its width
# and its number of heads. One **weight-sharing supernet** holds every candidate; each training
# step trains a few sampled sub-networks; an evolutionary search then ranks sub-networks by
# their validation accuracy with *inherited* weights under a FLOPs budget, and the winner is
# retrained from scratch. The paper adds two ways of training that supernet well:
#
# - **Hierarchical Sampling**: draw the operator *type* first, uniformly, then a candidate
#   of that type; flat sampling over all candidates would train the type with the most
#   candidates most.
# - **Multi-head Sharing**: a narrow attention layer's head $h$ takes its channels from
#   head $h$ of the widest layer, so a channel always serves the same head.
#
# **What you will learn**
# 1. The three operators as one block interface, and what each costs in FLOPs.
# 2. Why flat sampling starves an operator type, and how Hierarchical Sampling fixes it.
# 3. How a supernet slices one set of weights into many networks, and what Multi-head Sharing
#    changes in that slicing.
# 4. How to tell whether a one-shot search works: does the supernet *rank* sub-networks as
#    stand-alone training does, and does the search beat its controls?

# %% [markdown]
# ## 1. Three spatial operators
# Each operator maps a feature map $(B, C, H, W)$ to $(B, C, H, W)$ inside a ResNet bottleneck.
# The first is the convolution, `nn.Conv2d(C, C, K, padding=K // 2)`. The second is **local
# self-attention** (SASA, Ramachandran et al. 2019, eq. 2-3): query pixel $q$ attends to the
# $K \times K$ window around it, in each of $N_h$ heads of $d = C / N_h$ channels,
#
# $$y_q = \sum_{k \in \mathcal{N}_K(q)} \mathrm{softmax}_k\!\left(
#   \frac{q_q^\top (k_k + r_{k-q})}{\sqrt{d}}\right) v_k ,$$
#
# with $q = W_Q x$, $k = W_K x$, $v = W_V x$ (per head) and a learned embedding $r_\delta$ per
# window offset $\delta = k - q$. Near the border part of the window lies outside the image:
# those cells are zero padding, not pixels, so they get no attention. `inside_window` marks the
# cells that are real pixels, in the raster order `F.unfold` uses.

# %%
@lru_cache(maxsize=64)
def inside_window(H, W, K, device=None):
    """(K*K, H, W) bool: whether window cell o of pixel (y, x) lies inside the image."""
    ones = torch.ones(1, 1, H, W, device=device)
    # F.unfold of an all-ones map: 1 where the cell is a pixel, 0 where it is padding
    cells = F.unfold(ones, K, padding=K // 2)                  # (1, K*K, H*W)
    return cells.view(K * K, H, W) > 0

# %% [markdown]
# The reference form gathers every $K \times K$ window of keys and values with `F.unfold`
# (a copy $K^2$ times the size of the map), adds the relative embedding to the keys, and takes
# the softmax over the window. Shapes: $N = HW$ queries, $K^2$ window cells per query.

# %%
def local_attention(q, k, v, rel, *, num_heads):
    """SASA local self-attention, reference form. q, k, v: (B, C, H, W); rel: (C, K, K), the
    relative embedding r of each window offset. -> (B, C, H, W)."""
    B, C, H, W = q.shape
    K = rel.shape[-1]
    if K % 2 == 0:
        raise ValueError(f"the window must be odd (a centre pixel); got {K}")
    if C % num_heads:
        raise ValueError(f"{C} channels cannot be split into {num_heads} heads")
    d = C // num_heads
    # F.unfold lists, for every pixel, its K*K window cells in raster order (zero padding
    # outside the image): keys and values per window cell, (B, N_h, d, K*K, N)
    keys = F.unfold(k, K, padding=K // 2).view(B, num_heads, d, K * K, H * W)
    values = F.unfold(v, K, padding=K // 2).view(B, num_heads, d, K * K, H * W)
    q = q.reshape(B, num_heads, d, H * W) * d ** -0.5                 # (B, N_h, d, N)
    rel = rel.reshape(1, num_heads, d, K * K, 1)                       # r_{k-q} per cell
    # logits q . (k + r) / sqrt(d) of every query and window cell: (B, N_h, K*K, N)
    logits = torch.einsum("bhdn,bhdkn->bhkn", q, keys + rel)
    inside = inside_window(H, W, K, q.device).view(1, 1, K * K, H * W)
    # softmax over the window; padding cells get weight 0
    attn = logits.masked_fill(~inside, float("-inf")).softmax(dim=2)
    out = torch.einsum("bhkn,bhdkn->bhdn", attn, values)              # y_q = sum_k a_qk v_k
    return out.reshape(B, C, H, W)

# %% [markdown]
# The third operator is **global self-attention**, made affordable as axial attention
# (Axial-DeepLab, Wang et al. 2020): attention over all $N$ pixels costs $O(N^2)$; a layer along
# every column, then one along every row, costs $O(N(H + W))$ and still lets every output pixel
# see every input pixel. Along one line, query $q$ attends to every key $k$ of the line:
#
# $$y_q = \sum_k \mathrm{softmax}_k\!\left(\frac{q_q^\top k_k + q_q^\top r_{k-q}}{\sqrt{d}}
#   + b^h_{k-q}\right) v_k .$$
#
# **How this differs from 01's `AxialAttention1d`** (the full Axial-DeepLab layer). 01 keeps
# the paper's three position terms (query-, key- and value-side $r$) and batch-normalises each
# logit term and each output term. Here we keep the query-side term only, with no BatchNorm
# inside the layer, and add a per-head bias $b^h_{k-q}$. Why: in a supernet one layer is run at
# many widths and head counts, and BatchNorm over the logits would need running statistics per
# sub-network for channels that the two sharing schemes of section 4 index differently; the
# bias replaces what those norms do at initialisation (see `AxialSelfAttention`). The offset
# $k - q$ runs over $-(S-1) \ldots S-1$ for a layer built for lines of up to $S$ pixels.

# %%
def axial_logits(q, k, rel, bias, delta, num_heads):
    """Logits of one axial pass. q, k: (B, C, L, M), L pixels along each of M lines; rel:
    (C, 2S-1); bias: (N_h, 2S-1) or None; delta: (L, L) index of k - q. -> (B, N_h, L, L, M)."""
    B, C, L, M = q.shape
    d = C // num_heads
    # heads split the channels: (B, C, L, M) -> (B, N_h, d, L, M); 1 / sqrt(d) on q
    q = q.reshape(B, num_heads, d, L, M) * d ** -0.5
    k = k.reshape(B, num_heads, d, L, M)
    logits = torch.einsum("bhdim,bhdjm->bhijm", q, k)                  # q_q . k_k
    r = rel[:, delta].reshape(num_heads, d, L, L)                      # r_{k-q}: (N_h, d, L, L)
    logits = logits + torch.einsum("bhdim,hdij->bhijm", q, r)          # + q_q . r_{k-q}
    if bias is not None:
        logits = logits + bias[:, delta][None, :, :, :, None]          # + b_{k-q}
    return logits

# %% [markdown]
# `axial_attention` runs one pass: along columns (`axis="height"`) or, after swapping the two
# spatial axes, along rows. `weights=True` returns the attention weights instead, which the
# tests and exercise 4 read.

# %%
def axial_attention(q, k, v, rel, *, num_heads, axis, bias=None, weights=False):
    """One axial pass along columns ('height') or rows ('width'). q, k, v: (B, C, H, W); rel:
    (C, 2S-1), bias: (N_h, 2S-1). -> (B, C, H, W), or the weights (B, N_h, L, L, M)."""
    if axis not in ("height", "width"):
        raise ValueError(f"axis must be 'height' or 'width', got {axis!r}")
    if axis == "width":              # along a row = along a column of the transposed map
        q = q.transpose(2, 3)
        k = k.transpose(2, 3)
        v = v.transpose(2, 3)
    B, C, L, M = q.shape                                               # L along, M lines
    S = (rel.shape[-1] + 1) // 2
    if L > S:
        raise ValueError(f"axial layer built for lines up to {S} pixels, got {L}")
    if C % num_heads:
        raise ValueError(f"{C} channels cannot be split into {num_heads} heads")
    pos = torch.arange(L, device=q.device)
    delta = pos[None, :] - pos[:, None] + S - 1                        # [q, k] -> index of k - q
    attn = axial_logits(q, k, rel, bias, delta, num_heads).softmax(dim=3)
    if weights:
        return attn
    v = v.reshape(B, num_heads, C // num_heads, L, M)
    out = torch.einsum("bhijm,bhdjm->bhdim", attn, v)                  # (B, N_h, d, L, M)
    out = out.reshape(B, C, L, M)
    return out.transpose(2, 3) if axis == "width" else out

# %% [markdown]
# ### The attention layers
# Both attention layers compute $q, k, v$ with one 1x1 convolution (rows $[W_Q; W_K; W_V]$) and
# end in an output projection $W_O$, as multi-head attention does. SASA and Axial-DeepLab
# inside a bottleneck have no $W_O$; we add it because with Multi-head Sharing (section 4) a
# narrow layer's channels come out in head order, and $W_O$ maps them back to the order the
# next 1x1 conv reads. `LocalSelfAttention` runs the reference form; section "Optional: speed"
# swaps in a faster, tested-equal form.

# %%
class LocalSelfAttention(nn.Module):
    """SASA local self-attention: q, k, v from one 1x1 conv, K x K windows, then W_O."""

    def __init__(self, dim, *, num_heads, window, rel_std=0.1):
        super().__init__()
        if dim % num_heads or window % 2 == 0:
            raise ValueError(f"need dim % num_heads == 0 and an odd window, got dim "
                             f"{dim}, num_heads {num_heads}, window {window}")
        self.num_heads = num_heads
        self.attend = local_attention                             # the reference form
        self.qkv = nn.Conv2d(dim, 3 * dim, 1, bias=False)          # rows [W_Q; W_K; W_V]
        # r_delta, one per window offset and channel
        self.rel = nn.Parameter(torch.randn(dim, window, window) * rel_std)
        self.proj = nn.Conv2d(dim, dim, 1, bias=False)             # W_O

    def forward(self, x, num_heads=None):                          # (B, C, H, W) -> same
        # one 1x1 conv gives [q; k; v], 3C channels: split into three (B, C, H, W) maps
        q, k, v = self.qkv(x).chunk(3, dim=1)
        # num_heads: a supernet runs this layer's sliced weights with fewer heads
        y = self.attend(q, k, v, self.rel, num_heads=num_heads or self.num_heads)
        return self.proj(y)

# %% [markdown]
# The axial layer stacks a height pass and a width pass, each with its own $W_Q, W_K, W_V$, its
# own $r$ and its own bias $b$, then $W_O$. **Why the bias.** At initialisation $q \cdot k$ and
# $q \cdot r$ are near 0, so without a bias the softmax is uniform: the layer starts as the
# *mean* of its column and row, which wipes out each pixel's own features (and $q \cdot r$,
# multiplied by the query, cannot prefer near pixels for every query at once). Starting the bias
# at $b_\delta = -\lambda \delta^2$ makes the layer start as a 3-tap smoothing with about half
# the weight on the pixel itself; `locality=0` gives the uniform start. (01's layer reaches a
# similar start through its BatchNorms.)

# %%
class AxialSelfAttention(nn.Module):
    """Global self-attention: a height-axis pass, a width-axis pass, then W_O."""

    def __init__(self, dim, *, num_heads, span, locality=1.0, rel_std=0.1):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        offsets = torch.arange(-(span - 1), span, dtype=torch.float32)      # k - q
        start = -locality * offsets.square().repeat(num_heads, 1)            # (N_h, 2S-1)
        self.qkv_h = nn.Conv2d(dim, 3 * dim, 1, bias=False)
        self.qkv_w = nn.Conv2d(dim, 3 * dim, 1, bias=False)
        self.rel_h = nn.Parameter(torch.randn(dim, 2 * span - 1) * rel_std)  # r_{k-q}
        self.rel_w = nn.Parameter(torch.randn(dim, 2 * span - 1) * rel_std)
        self.rel_bias_h = nn.Parameter(start.clone())                        # b_{k-q}
        self.rel_bias_w = nn.Parameter(start.clone())
        self.proj = nn.Conv2d(dim, dim, 1, bias=False)                       # W_O

    def forward(self, x, num_heads=None):                           # (B, C, H, W) -> same
        # num_heads: a supernet runs this layer's sliced weights with fewer heads
        n = num_heads or self.num_heads
        # pass 1, along every column: pixel (y, x) mixes the pixels (., x)
        q, k, v = self.qkv_h(x).chunk(3, dim=1)
        x = axial_attention(q, k, v, self.rel_h, num_heads=n, axis="height",
                            bias=self.rel_bias_h)
        # pass 2, along every row of pass 1's output: now every pixel has seen every pixel
        q, k, v = self.qkv_w(x).chunk(3, dim=1)
        x = axial_attention(q, k, v, self.rel_w, num_heads=n, axis="width",
                            bias=self.rel_bias_w)
        return self.proj(x)

# %% [markdown]
# ## 2. The search space: one operator per block
# TrioNet searches at two levels (sec. 3.1): per block an operator *type*, then its
# *architecture* (kernel or window $K$, width $C$, heads $N_h$). The block is a ResNet
# bottleneck whose 3x3 conv is the searched operator: a 1x1 conv reduces $C_{in}$ to $C$, the
# operator maps $C$ to $C$, a 1x1 conv expands $C$ to $C_{out}$, and the shortcut adds the input.
# A `Choice` names one block's candidate; a *config* is one `Choice` per block.

# %%
class Choice(NamedTuple):
    """op; size: kernel or window K (0: axial, global); width: channels C; heads N_h."""
    op: str
    size: int
    width: int
    heads: int

    def __str__(self):
        names = {"conv": f"conv{self.size}", "local": f"local{self.size}",
                 "axial": "axial"}
        heads = f"h{self.heads}" if self.op != "conv" else ""
        return f"{names[self.op]}-c{self.width}{heads}"

# %% [markdown]
# A stand-alone block builds only its own operator. A stage's first block pools 2x2 at its
# input (attention models pool instead of striding), so every operator of a stage sees maps of
# one size $R \times R$, and the axial layer is built for lines of $R$ pixels.

# %%
def make_operator(choice, resolution):
    """The operator of one Choice, at its own width C (a stand-alone layer). An axial
    layer is built for lines of `resolution` pixels: its position tables have one entry
    per offset k - q in -(R-1) .. R-1."""
    c = choice.width
    if choice.op == "conv":
        return nn.Conv2d(c, c, choice.size, padding=choice.size // 2, bias=False)
    if choice.op == "local":
        return LocalSelfAttention(c, num_heads=choice.heads, window=choice.size)
    return AxialSelfAttention(c, num_heads=choice.heads, span=resolution)


class TrioBlock(nn.Module):
    """1x1 reduce -> operator -> 1x1 expand, + shortcut; pools 2x2 first if
    `downsample`."""

    def __init__(self, in_channels, out_channels, *, choice, resolution, downsample):
        super().__init__()
        c = choice.width
        self.downsample = downsample
        self.reduce = nn.Conv2d(in_channels, c, 1, bias=False)
        self.bn_reduce = nn.BatchNorm2d(c)
        self.op = make_operator(choice, resolution)
        self.bn_op = nn.BatchNorm2d(c)
        self.bn_out = nn.BatchNorm2d(out_channels)
        self.expand = nn.Conv2d(c, out_channels, 1, bias=False)
        # the shortcut: identity, or a 1x1 projection where the widths differ
        self.shortcut = nn.Identity()
        if in_channels != out_channels:
            projection = nn.Conv2d(in_channels, out_channels, 1, bias=False)
            self.shortcut = nn.Sequential(projection, nn.BatchNorm2d(out_channels))

    def forward(self, x):                                # (B, C_in, ., .) -> (B, C_out, R, R)
        x = F.avg_pool2d(x, 2) if self.downsample else x
        y = F.relu(self.bn_reduce(self.reduce(x)))                        # (B, C, R, R)
        # the searched operator: the only part of the block that differs between candidates
        y = F.relu(self.bn_op(self.op(y)))
        return F.relu(self.bn_out(self.expand(y)) + self.shortcut(x))    # (B, C_out, R, R)

# %% [markdown]
# **The candidates of one block.** Widths are fractions of the widest, $C = \rho\,C_{max}$.
# Convolutions take every kernel and width. An attention candidate of width $C$ with $N_h$
# heads has heads of $d = C / N_h$ channels; section 4 lets a narrow head take its channels
# from one wide head, so a candidate is kept only if $N_h$ divides $C$ and
# $d \le d_{max} = C_{max} / N_h^{max}$. Fewest heads come first.

# %%
def block_candidates(c_max, *, max_heads, head_choices, width_ratios, conv_kernels,
                     local_windows, ops):
    """{op: [Choice, ...]} of one block whose widest middle width is c_max."""
    if c_max % max_heads:
        raise ValueError(f"middle width {c_max} must be divisible by max_heads "
                         f"{max_heads}")
    # C = rho C_max for each width ratio rho, rounded, duplicates dropped
    widths = sorted({round(ratio * c_max) for ratio in width_ratios})
    if not all(0 < w <= c_max for w in widths):
        raise ValueError(f"width ratios {width_ratios} must lie in (0, 1]")
    d_max = c_max // max_heads
    attn = []                                              # (C, N_h) pairs: d <= d_max
    for w in widths:
        fits = [h for h in sorted(head_choices) if w % h == 0 and w // h <= d_max]
        if not fits:
            raise ValueError(f"width {w} fits no head choice {head_choices} (needs "
                             f"C % N_h == 0 and C / N_h <= {d_max})")
        attn += [(w, h) for h in fits]
    every = {"conv": [], "local": [], "axial": []}
    for k in sorted(conv_kernels):
        every["conv"] += [Choice("conv", k, w, 1) for w in widths]
    for k in sorted(local_windows):
        every["local"] += [Choice("local", k, w, h) for w, h in attn]
    every["axial"] = [Choice("axial", 0, w, h) for w, h in attn]
    return {op: every[op] for op in ops}

# %% [markdown]
# **FLOPs, counted analytically** (2 per multiply-add, as torch's `FlopCounterMode` counts the
# reference forms; a test checks it). A block of $R^2$ pixels pays for its 1x1 convs, then its
# operator: a $K \times K$ convolution $2R^2C^2K^2$; local attention $2R^2(4C^2 + 2CK^2)$ for
# $W_Q, W_K, W_V, W_O$ and for $q \cdot (k + r)$ and $a \cdot v$ over $K^2$ cells; axial
# attention $2R^2(2(3C^2 + 3CR) + C^2)$ for two passes of projections, logits and sums along $R$
# pixels, then $W_O$. Attention FLOPs do not depend on $N_h$.

# %%
def block_flops(layout, choice):
    """Forward FLOPs of one block; layout = (C_in, C_out, R, downsample)."""
    c_in, c_out, r, _ = layout
    c = choice.width
    n = r * r                                     # pixels: every term below is per pixel
    shortcut = c_in * c_out if c_in != c_out else 0
    f = 2 * n * (c_in * c + c * c_out + shortcut)                     # 1x1s and shortcut
    if choice.op == "conv":
        return f + 2 * n * c * c * choice.size ** 2
    if choice.op == "local":
        return f + 2 * n * (4 * c * c + 2 * c * choice.size ** 2)
    return f + 2 * n * (2 * (3 * c * c + 3 * c * r) + c * c)

# %% [markdown]
# **The layout.** The network is a stem (a 3x3 conv to `stem_channels`), three stages of
# blocks, a global average pool and a linear classifier. Stage $s$ works at $S / 2^s$ pixels
# for $S \times S$ images, so its first block (after the first stage) pools 2x2. Each block
# is described by $(C_{in}, C_{out}, R, \text{downsample})$: its FLOPs and its axial layer's
# line length $R$ follow from it.

# %%
def block_layout(image_size, stem_channels, stage_channels, depths):
    """[(C_in, C_out, R, downsample)] per block, and the stage of each block."""
    stages = []                                          # the stage of each block
    for s, n in enumerate(depths):
        stages += [s] * n
    c_ins = [stem_channels] + [stage_channels[s] for s in stages]
    layout = []
    for b, s in enumerate(stages):
        first = b == 0 or stages[b - 1] != s             # a stage's first block pools
        # stages at S, S/2, S/4 pixels: R = S >> s
        layout.append((c_ins[b], c_ins[b + 1], image_size >> s, s > 0 and first))
    return layout, stages

# %% [markdown]
# `SearchSpace` holds the layout and each block's candidates; it checks a config, counts its
# FLOPs, names the plain ResNet (smallest conv kernel, full width; its FLOPs are the search's
# budget) and builds a stand-alone net.

# %%
class SearchSpace:
    """Per block {op: [Choice, ...]}; widths = round(ratio * c_max), c_max =
    mid_channels[stage]."""

    def __init__(self, *, image_size, stem_channels, stage_channels, mid_channels,
                 depths, max_heads, head_choices, width_ratios, conv_kernels,
                 local_windows, ops=("conv", "local", "axial")):
        check_space(image_size, stage_channels, mid_channels, depths, max_heads,
                    head_choices, conv_kernels, local_windows, ops)
        self.layout, stages = block_layout(image_size, stem_channels, stage_channels,
                                           depths)
        self.image_size = image_size
        self.stem_channels = stem_channels
        self.stage_channels = tuple(stage_channels)
        self.max_heads = max_heads
        self.ops = tuple(ops)
        self.mid = [mid_channels[s] for s in stages]
        kw = dict(max_heads=max_heads, head_choices=head_choices, ops=ops,
                  width_ratios=width_ratios, conv_kernels=conv_kernels,
                  local_windows=local_windows)
        self.candidates = [block_candidates(c, **kw) for c in self.mid]
        self.max_kernel = max(conv_kernels)
        self.max_window = max(local_windows)
        self.num_blocks = len(self.layout)

    def check(self, config):
        """Raise ValueError, saying what is wrong, if `config` is not in the space."""
        # a config is one Choice per block, each one of that block's candidates
        if len(config) != self.num_blocks:
            raise ValueError(f"config has {len(config)} blocks, the space has "
                             f"{self.num_blocks}")
        for b, ch in enumerate(config):
            if ch not in self.candidates[b].get(getattr(ch, "op", None), ()):
                names = [str(c) for c in itertools.chain(*self.candidates[b].values())]
                raise ValueError(f"block {b}: {ch!r} is not a candidate; the candidates "
                                 f"are: {', '.join(names)}")

    def block_flops(self, b, choice):
        return block_flops(self.layout[b], choice)

    def flops(self, config, num_classes=10):
        stem = 2 * 27 * self.stem_channels * self.image_size ** 2         # 3x3 conv, 3 -> stem
        # the pooled features -> class logits; the pooling itself is negligible
        fc = 2 * self.stage_channels[-1] * num_classes
        return stem + sum(self.block_flops(b, ch) for b, ch in enumerate(config)) + fc

    def resnet_config(self):
        """The plain ResNet of the space (smallest conv kernel, full width): the
        budget."""
        k = min(c.size for c in self.candidates[0]["conv"])
        return tuple(Choice("conv", k, self.mid[b], 1) for b in range(self.num_blocks))

    def build(self, config, num_classes):
        """The stand-alone TrioNet of `config`: stem, one TrioBlock per block, pool,
        linear."""
        self.check(config)
        blocks = [TrioBlock(c_in, c_out, choice=ch, resolution=r, downsample=ds)
                  for ch, (c_in, c_out, r, ds) in zip(config, self.layout)]
        stem = [nn.Conv2d(3, self.stem_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(self.stem_channels), nn.ReLU()]
        head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                nn.Linear(self.stage_channels[-1], num_classes)]
        return nn.Sequential(*stem, *blocks, *head)

# %% [markdown]
# The checks on a space's settings, as errors a user can act on.

# %%
def check_space(image_size, stage_channels, mid_channels, depths, max_heads,
                head_choices, conv_kernels, local_windows, ops):
    """Raise ValueError if these settings do not make a search space."""
    if image_size % 4:
        raise ValueError(f"--image-size {image_size} must be divisible by 4 (2 pools)")
    three = len(stage_channels) == len(depths) == len(mid_channels) == 3
    if not three or min(depths) < 1:
        raise ValueError("give 3 stages (channels, middle widths, depths), each with "
                         ">= 1 block")
    if not ops or not set(ops) <= {"conv", "local", "axial"}:
        raise ValueError(f"ops must be a subset of conv, local, axial; got {ops}")
    if not all(k % 2 for k in (*conv_kernels, *local_windows)):
        raise ValueError("conv kernels and local windows must be odd")
    if max(head_choices) > max_heads:
        raise ValueError(f"head choices {head_choices} exceed max_heads {max_heads}")


# The space --quick searches and the demos draw: 16 px images, one block per stage; per block
# 6 conv candidates (2 kernels x 3 widths), 8 local (2 windows x 4 (width, heads)), 4 axial.
QUICK_SPACE = dict(image_size=16, stem_channels=16, stage_channels=(32, 64, 128),
                   mid_channels=(8, 16, 32), depths=(1, 1, 1), max_heads=2,
                   head_choices=(1, 2), width_ratios=(0.5, 0.75, 1.0),
                   conv_kernels=(3, 5), local_windows=(3, 5))

# %% [markdown]
# ## 3. Hierarchical Sampling and the sandwich rule (sec. 3.2)
# "In order to effectively search in this huge architecture space, we propose Hierarchical
# Sampling for better training of the supernet" (abstract). A uniform draw from the flat list
# of a block's candidates $\mathcal{C} = \mathcal{C}_{conv} \cup \mathcal{C}_{local} \cup
# \mathcal{C}_{axial}$ picks a type in proportion to its number of candidates, so the type with
# the most candidates (here local attention: windows x widths x heads) trains most and the one
# with the fewest (axial) least. Hierarchical Sampling draws the **type first**:
#
# $$\text{hierarchical: } P(\text{type}) = \tfrac{1}{3},\quad
#   P(c \mid \text{type}) = \tfrac{1}{|\mathcal{C}_\text{type}|}
#   \qquad\qquad
#   \text{flat: } P(\text{type}) = \tfrac{|\mathcal{C}_\text{type}|}{|\mathcal{C}|} .$$
#
# Each block draws its own type: a network mixes operators. `sample_ops` draws the types,
# `sample_candidates` a candidate of each drawn type.

# %%
def randint(n, generator):
    """One integer in [0, n) from a seeded generator."""
    return int(torch.randint(n, (1,), generator=generator))


def sample_ops(space, generator, scheme="hierarchical"):
    """One type per block, drawn independently: uniformly over the types ('hierarchical'), or
    as the type of a uniformly drawn candidate ('flat')."""
    if scheme not in ("hierarchical", "flat"):
        raise ValueError(f"scheme must be 'hierarchical' or 'flat', got {scheme!r}")
    ops = []
    # one independent draw per block: a network mixes operator types
    for cands in space.candidates:
        if scheme == "hierarchical":
            types = list(space.ops)                              # P(type) = 1 / 3
        else:                                                    # one entry per candidate
            types = []
            for op in space.ops:
                types += [op] * len(cands[op])
        ops.append(types[randint(len(types), generator)])
    return tuple(ops)


def sample_candidates(space, ops, generator):
    """Given each block's type, one of its candidates, uniformly (architecture level)."""
    config = []
    for b, op in enumerate(ops):
        # P(c | type) = 1 / |C_type|: within its type every candidate is equally likely
        cands = space.candidates[b][op]
        config.append(cands[randint(len(cands), generator)])
    return tuple(config)


def sample_config(space, generator, scheme="hierarchical"):
    return sample_candidates(space, sample_ops(space, generator, scheme), generator)

# %% [markdown]
# **The sandwich rule** (BigNAS): each step sums the gradients of the largest, the smallest and
# `n_random` random sub-networks. We draw the operator assignment *first* and take the ends
# *within* it, so every trained sub-network follows the sampler. Attention FLOPs do not depend
# on the heads, so head counts tie for "largest" and "smallest"; ties go to a random one (the
# first, fewest heads, would make the smallest end a 1-head layer every time, where the two
# sharing schemes of section 4 agree). `replay` lists the sub-networks a training run trains,
# from the same seeded generator, without training: the demo and the lab count them.

# %%
def extreme(space, ops, *, largest, generator=None):
    """Per block, type ops[b]'s candidate with the most (fewest) FLOPs; ties: random
    or first."""
    config = []
    for b, op in enumerate(ops):
        flops = {c: space.block_flops(b, c) for c in space.candidates[b][op]}
        best = max(flops.values()) if largest else min(flops.values())
        # attention candidates of one width tie: their FLOPs do not depend on N_h
        tied = [c for c, f in flops.items() if f == best]
        config.append(tied[randint(len(tied), generator)] if generator else tied[0])
    return tuple(config)


def sandwich_configs(space, generator, *, scheme, n_random, ties="random"):
    """One step's sub-networks: an assignment, then its largest, smallest and n_random
    random."""
    # the types first: every sub-network of this step uses the same assignment
    ops = sample_ops(space, generator, scheme)
    tie_generator = generator if ties == "random" else None
    ends = [extreme(space, ops, largest=True, generator=tie_generator),
            extreme(space, ops, largest=False, generator=tie_generator)]
    # the largest and the smallest bound what the step trains; the random members fill in
    return ends + [sample_candidates(space, ops, generator) for _ in range(n_random)]


def replay(space, *, seed, steps, scheme, n_random, ties="random"):
    """The sub-networks `sandwich_step_fn` trains with this seed, in order (same
    generator)."""
    g = torch.Generator().manual_seed(seed)
    configs = []
    for _ in range(steps):
        configs += sandwich_configs(space, g, scheme=scheme, n_random=n_random,
                                    ties=ties)
    return configs


def type_probs(space, scheme):
    """P(type) under a sampler, averaged over blocks (the equation above: 1 / 3 each, or
    |C_type| / |C|), the line demo_sampling draws beside the trained shares."""
    probs = {op: 0.0 for op in space.ops}
    for cands in space.candidates:
        total = sum(len(c) for c in cands.values())
        for op in space.ops:
            p = len(cands[op]) / total                            # flat
            if scheme == "hierarchical":
                p = 1 / len(space.ops)
            probs[op] += p / len(space.candidates)
    return probs

# %% [markdown]
# `demo_sampling` replays 1,000 sandwich steps of the quick space under each sampler and counts
# the operator type of every trained block, beside the sampler's $P(\text{type})$.

# %%
COLOURS = {"conv": "#4C72B0", "local": "#55A868", "axial": "#C44E52"}


def demo_sampling(steps=1000):
    """Hierarchical vs flat sampling: the operator types the sandwich rule trains in the quick
    space, replayed (no training), as two histograms."""
    space = SearchSpace(**QUICK_SPACE)
    out = {}
    fig = Figure(figsize=(8, 2.8))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, scheme in zip(axes, ("hierarchical", "flat")):
        trained = Counter()
        for cfg in replay(space, seed=0, steps=steps, scheme=scheme, n_random=1):
            trained.update(ch.op for ch in cfg)
        mix = {op: trained[op] / sum(trained.values()) for op in space.ops}
        p = type_probs(space, scheme)
        out[scheme] = mix
        trained_pct = [100 * mix[op] for op in space.ops]
        sampler_pct = [100 * p[op] for op in space.ops]
        ax.bar(space.ops, trained_pct, color=list(COLOURS.values()))
        ax.scatter(space.ops, sampler_pct, marker="_", s=900, color="k",
                   label="P(type) of the sampler")
        ax.set_title(f"{scheme} sampling", fontsize=10)
        shares = [f"{op} {t:.1f}% (P = {q:.1f}%)"
                  for op, t, q in zip(space.ops, trained_pct, sampler_pct)]
        print(f"  {scheme:12s}: trained " + ", ".join(shares))
    axes[0].set_ylabel(f"% of trained blocks, {steps} steps")
    axes[0].legend(fontsize=8)
    utils.show(fig, "demo_sampling")
    return out


if utils.in_notebook():
    demo_sampling()

# %% [markdown]
# **What to look for.** Per block the quick space has 6 conv, 8 local and 4 axial candidates.
# Flat sampling gives local attention $8/18 = 44\%$ of the training and axial attention
# $4/18 = 22\%$: axial layers get half the updates of local ones, and their inherited scores
# will lag for that reason alone, not because axial attention is worse. Hierarchical sampling
# trains each type a third. Section "The lab" measures what this does to the inherited
# quality of the all-conv, all-local and all-axial sub-networks.

# %% [markdown]
# ## 4. The supernet and Multi-head Sharing (sec. 3.3)
# The supernet holds the widest weights of every type; a sub-network runs a slice of them, its
# *inherited weights*. Types never share weights. Within a type a smaller kernel or window
# takes the **centre** of the largest, and a narrower layer takes a **subset of the channels**.
# Which subset? "We propose a novel weight-sharing strategy, Multi-head Sharing, specifically
# for multi-head self-attention operators" (abstract). The widest layer has $N_h^{max}$ heads of
# $d_{max}$ channels, head $h$ owning channels $[h\,d_{max}, (h+1)\,d_{max})$. A narrow layer
# of $C$ channels in $N_h$ heads of $d = C / N_h$ gives its head $h$ the channels
#
# $$\text{multi-head: } h\,d_{max} + s, \qquad \text{plain: } h\,d + s,
#   \qquad s = 0, \ldots, d - 1 .$$
#
# With Multi-head Sharing a channel always serves the **same head**: narrow head $h$ takes the
# leading $d$ channels of wide head $h$. With plain sharing it takes the first $N_h d$ channels
# cut into heads, so channel 4 is in head 1 of a (16 channels, 4 heads) layer but in head 2 of
# an (8, 4) one, and must serve two heads' roles. The schemes agree when $d = d_{max}$ or
# $N_h = 1$. `channel_index` returns the channels a sub-layer takes, in its own order.

# %%
def channel_index(choice, *, max_width, max_heads, sharing):
    """Which of the supernet's `max_width` attention channels a sub-layer uses, in its
    order."""
    c = choice.width
    n_h = choice.heads
    if sharing not in ("multihead", "plain"):
        raise ValueError(f"sharing must be 'multihead' or 'plain', got {sharing!r}")
    if choice.op == "conv" or sharing == "plain":
        return torch.arange(c)                                  # the first C channels
    d = c // n_h
    d_max = max_width // max_heads
    if c % n_h or d > d_max or n_h > max_heads:
        raise ValueError(f"{choice}: {n_h} heads of {d} channels do not fit in "
                         f"{max_heads} heads of {d_max}")
    # narrow head h starts where wide head h starts, at h * d_max, and takes d channels
    heads = torch.arange(n_h)[:, None]                          # (N_h, 1)
    within = torch.arange(d)[None, :]                           # (1, d)
    # channel h * d_max + s of head h, s < d: (N_h, d) -> (N_h * d,)
    return (heads * d_max + within).flatten()

# %% [markdown]
# **A worked example** (`demo_sharing` below draws it). The widest layer has 16 channels in 4
# heads of $d_{max} = 4$. A narrow layer of 8 channels in 4 heads ($d = 2$) takes
#
# - multi-head: channels 0, 1 | 4, 5 | 8, 9 | 12, 13: narrow head $h$ reads the first two
#   channels of wide head $h$, so what wide head 1 learned about its channels 4-7 still
#   serves head 1;
# - plain: channels 0, 1 | 2, 3 | 4, 5 | 6, 7: narrow head 1 reads channels 2, 3, which
#   belong to wide head 0, and narrow heads 2 and 3 read wide head 1's channels.
#
# Under plain sharing one weight is trained to play a different head in different
# sub-networks; Multi-head Sharing avoids that conflict. Whether it matters is an empirical
# question: the lab asks whether it helps the supernet *rank* sub-networks.

# %% [markdown]
# Where do the schemes differ? Only for attention layers with several heads that are narrower
# than the supernet's ($1 < N_h$ and $C < N_h\,d_{max}$). `head_mix` counts, over a list of
# configs, the share of attention blocks per head count and the share where the schemes give
# different channels: the lab uses it to check that an experiment trains such layers at all.

# %%
def sharing_differs(choice, *, max_width, max_heads):
    # the schemes agree for one head (both take the first d channels) and for heads as wide
    # as the supernet's (both take every channel of the first N_h heads)
    """Whether Multi-head and plain sharing give this choice different channels."""
    d_max = max_width // max_heads
    narrow = choice.width < choice.heads * d_max
    return choice.op != "conv" and choice.heads > 1 and narrow


def head_mix(space, configs):
    """Of the attention blocks in `configs`: the share of each head count, and the share whose
    channels differ between the two sharing schemes."""
    heads = Counter()                              # attention blocks per head count
    differs = 0                                    # ... and where the schemes differ
    for cfg in configs:
        for b, ch in enumerate(cfg):
            if ch.op == "conv":
                continue
            heads[ch.heads] += 1
            differs += sharing_differs(ch, max_width=space.mid[b],
                                       max_heads=space.max_heads)
    n = sum(heads.values())
    shares = {h: heads[h] / max(n, 1) for h in sorted(heads)}
    return {"heads": shares, "differs": differs / max(n, 1), "n": n}

# %% [markdown]
# **BatchNorm of a narrow layer.** The 1x1 convs around the operator use their first $C$
# channels, and so do the BatchNorms after them. `sliced_batch_norm` normalises $C$ channels
# with the first $C$ entries of a wider BatchNorm and writes the updated running statistics of
# only those channels back (`F.batch_norm` updates the copies it is given).

# %%
def sliced_batch_norm(x, bn):
    """BatchNorm over the FIRST x.shape[1] channels of a wider BatchNorm2d."""
    c = x.shape[1]
    momentum = bn.momentum
    # copies of the first C running statistics: F.batch_norm updates these in place
    mean = bn.running_mean[:c].clone()
    var = bn.running_var[:c].clone()
    if bn.training:
        bn.num_batches_tracked += 1
        if momentum is None:    # cumulative average: re-estimating one sub-network's statistics
            momentum = 1.0 / float(bn.num_batches_tracked)
    y = F.batch_norm(x, mean, var, bn.weight[:c], bn.bias[:c], bn.training, momentum,
                     bn.eps)
    if bn.training:
        with torch.no_grad():
            bn.running_mean[:c] = mean
            bn.running_var[:c] = var
    return y

# %% [markdown]
# **Slicing the widest weights.** A convolution takes the centre $K \times K$ of the widest
# kernel and its first $C$ channels. An attention layer takes, with `idx` = `channel_index`:
# rows `idx` of each of $W_Q, W_K, W_V$ (they sit one above the other in the 1x1 conv's weight,
# $3 C_{max}$ rows), the embeddings $r$ of channels `idx`, and columns `idx` of $W_O$, whose
# first $C$ rows feed the next 1x1 conv. The input columns of $W_Q, W_K, W_V$ are the first $C$
# (the 1x1 reduce's output), except for the axial width pass, which reads the height pass's
# channels `idx`. Head $h$ of the narrow axial layer keeps bias row $h$.

# %%
def centre(weight, size):
    """The centre size x size of a (..., K_max, K_max) kernel or embedding."""
    o = (weight.shape[-1] - size) // 2
    return weight[..., o:o + size, o:o + size]


def qkv_rows(weight, idx, cols):
    """Rows idx of each of W_Q, W_K, W_V, input columns cols: (3C_max, C_max, 1, 1) ->
    (3C, len(cols), 1, 1)."""
    c_max = weight.shape[1]
    w = weight.view(3, c_max, c_max)                 # (3, rows, columns): [W_Q; W_K; W_V]
    w = w[:, idx]                                    # (3, C, C_max): rows idx of each
    w = w[:, :, cols]                                # (3, C, len(cols))
    return w.reshape(3 * len(idx), len(cols), 1, 1)


def local_slices(layer, idx, size):
    """{parameter name in a stand-alone LocalSelfAttention: inherited slice}."""
    first = torch.arange(len(idx), device=idx.device)
    return {"qkv.weight": qkv_rows(layer.qkv.weight, idx, first),     # reads the 1x1 reduce
            "rel": centre(layer.rel[idx], size),
            "proj.weight": layer.proj.weight[:len(idx)][:, idx]}        # W_O: idx -> first C


def axial_slices(layer, idx, num_heads):
    """{parameter name in a stand-alone AxialSelfAttention: inherited slice}."""
    first = torch.arange(len(idx), device=idx.device)
    return {"qkv_h.weight": qkv_rows(layer.qkv_h.weight, idx, first),
            "qkv_w.weight": qkv_rows(layer.qkv_w.weight, idx, idx),     # reads the height pass
            "rel_h": layer.rel_h[idx], "rel_w": layer.rel_w[idx],
            "rel_bias_h": layer.rel_bias_h[:num_heads],                 # head h: bias row h
            "rel_bias_w": layer.rel_bias_w[:num_heads],
            "proj.weight": layer.proj.weight[:len(idx)][:, idx]}

# %% [markdown]
# **The super block** holds the widest 1x1 convs (shared by all types), the widest operator of
# each type and one BatchNorm per type after the operator (types compute different features).
# `operator` runs the stand-alone layer's own `forward` on the inherited slices
# (`torch.func.functional_call`), so a sub-network computes exactly what its stand-alone net
# with those weights would; a test checks it.

# %%
class SuperBlock(nn.Module):
    """TrioBlock with weight sharing: the widest weights of each type in `ops`, sliced per
    Choice; 1x1 convs and shortcut shared by all types, a BatchNorm per type after the op.

    forward(x, choice, sharing) computes what TrioBlock(choice).forward computes with the
    inherited weights; gradients reach only the slices that choice used. The stand-alone
    layers' parameter names are kept, so `sliced_weights` maps straight onto them.
    """

    def __init__(self, in_channels, out_channels, *, mid, resolution, downsample,
                 max_heads, max_kernel, max_window, ops):
        super().__init__()
        self.mid = mid
        self.max_heads = max_heads
        self.downsample = downsample
        self.reduce = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn_reduce = nn.BatchNorm2d(mid)
        if "conv" in ops:
            self.conv = nn.Conv2d(mid, mid, max_kernel, bias=False)   # only .weight is used
        if "local" in ops:
            self.local = LocalSelfAttention(mid, num_heads=max_heads, window=max_window)
        if "axial" in ops:
            self.axial = AxialSelfAttention(mid, num_heads=max_heads, span=resolution)
        self.bn_op = nn.ModuleDict({op: nn.BatchNorm2d(mid) for op in ops})
        self.expand = nn.Conv2d(mid, out_channels, 1, bias=False)
        self.bn_out = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if in_channels != out_channels:
            projection = nn.Conv2d(in_channels, out_channels, 1, bias=False)
            self.shortcut = nn.Sequential(projection, nn.BatchNorm2d(out_channels))

    def sliced_weights(self, choice, sharing):
        """{parameter name in the stand-alone operator: inherited slice}."""
        if choice.op == "conv":
            c = choice.width
            return {"weight": centre(self.conv.weight[:c, :c], choice.size)}
        idx = channel_index(choice, max_width=self.mid, max_heads=self.max_heads,
                            sharing=sharing).to(self.reduce.weight.device)
        if choice.op == "local":
            return local_slices(self.local, idx, choice.size)
        return axial_slices(self.axial, idx, choice.heads)

    def operator(self, y, choice, sharing):                      # (B, C, R, R) -> same
        """The stand-alone layer's own forward, run on the sliced (inherited) weights."""
        weights = self.sliced_weights(choice, sharing)
        if choice.op == "conv":
            return F.conv2d(y, weights["weight"], padding=choice.size // 2)
        layer = self.local if choice.op == "local" else self.axial
        kwargs = {"num_heads": choice.heads}
        return torch.func.functional_call(layer, weights, (y,), kwargs)

    def forward(self, x, choice, sharing):
        """TrioBlock.forward of `choice`, on the inherited weights."""
        c = choice.width
        x = F.avg_pool2d(x, 2) if self.downsample else x
        # 1x1 reduce: the first C output channels of the widest reduce
        y = F.conv2d(x, self.reduce.weight[:c])                         # (B, C, R, R)
        y = F.relu(sliced_batch_norm(y, self.bn_reduce))
        y = self.operator(y, choice, sharing)
        # each type has its own BatchNorm: conv and attention outputs differ in scale
        y = F.relu(sliced_batch_norm(y, self.bn_op[choice.op]))
        # 1x1 expand: the first C input channels of the widest expand
        y = self.bn_out(F.conv2d(y, self.expand.weight[:, :c]))         # (B, C_out, R, R)
        return F.relu(y + self.shortcut(x))

# %% [markdown]
# The supernet is the stem, one `SuperBlock` per block and the classifier; `forward(x, config)`
# runs one sub-network. `sharing` picks the scheme for every attention layer.

# %%
class TrioNetSupernet(nn.Module):
    """Every sub-network of a SearchSpace in one set of weights.

    The stem and the classifier are shared by every sub-network; each block is a
    SuperBlock. `sharing` ('multihead' or 'plain') picks how narrow attention layers take
    their channels (section 4).
    """

    def __init__(self, space, *, num_classes, sharing="multihead"):
        super().__init__()
        if sharing not in ("multihead", "plain"):
            raise ValueError(f"sharing must be 'multihead' or 'plain', got {sharing!r}")
        self.space = space
        self.sharing = sharing
        stem = nn.Conv2d(3, space.stem_channels, 3, padding=1, bias=False)
        self.stem = nn.Sequential(stem, nn.BatchNorm2d(space.stem_channels), nn.ReLU())
        blocks = []
        for mid, (c_in, c_out, r, ds) in zip(space.mid, space.layout):
            blocks.append(SuperBlock(c_in, c_out, mid=mid, resolution=r, downsample=ds,
                                     max_heads=space.max_heads, ops=space.ops,
                                     max_kernel=space.max_kernel,
                                     max_window=space.max_window))
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(space.stage_channels[-1], num_classes)

    def forward(self, x, config):                                  # (B, 3, S, S) -> (B, classes)
        # a config outside the space would slice weights that do not exist: say so
        self.space.check(config)
        x = self.stem(x)
        for block, choice in zip(self.blocks, config):
            x = block(x, choice, self.sharing)
        # global average pool: (B, C_out, R, R) -> (B, C_out)
        return self.fc(x.mean((2, 3)))

# %% [markdown]
# `demo_sharing` draws which of 16 supernet channels (4 heads of $d_{max} = 4$) each head of a
# narrow layer takes under the two schemes: the figure the README shows.

# %%
def demo_sharing():
    """The supernet channels a narrow attention layer's heads take, both schemes,
    drawn."""
    from matplotlib.colors import ListedColormap
    rows = []
    for width, heads in ((8, 4), (12, 4), (8, 2)):
        for sharing in ("multihead", "plain"):
            rows.append((Choice("local", 3, width, heads), sharing))
    taken = np.zeros((len(rows), 16))                  # 0: unused, else 1 + the narrow head
    out = {}
    for r, (ch, sharing) in enumerate(rows):
        idx = channel_index(ch, max_width=16, max_heads=4, sharing=sharing)
        head = torch.arange(len(idx)) // (ch.width // ch.heads)      # idx[n] serves head[n]
        taken[r, idx] = 1 + head.numpy()
        key = f"c={ch.width} h={ch.heads} {sharing}"
        out[key] = 100 * (idx // 4 == head).float().mean().item()     # in wide head h
        print(f"  {key:18s}: channels {idx.tolist()}: {out[key]:.0f}% in supernet "
              f"head h")
    fig = Figure(figsize=(8, 3))
    ax = fig.subplots()
    colours = ListedColormap(["#eeeeee", *COLOURS.values(), "#8172B3"])
    ax.imshow(taken, cmap=colours, vmin=0, vmax=4)
    labels = [f"C={c.width}, N_h={c.heads}, {s}" for c, s in rows]
    ax.set_yticks(range(len(rows)), labels)
    ax.set_xticks([1.5, 5.5, 9.5, 13.5], [f"supernet head {i}" for i in range(4)])
    for x in (3.5, 7.5, 11.5):
        ax.axvline(x, color="k", lw=1)
    ax.set_title("the 16 supernet channels each narrow head h takes (colour: h)",
                 fontsize=9)
    utils.show(fig, "demo_sharing")
    return out


if utils.in_notebook():
    demo_sharing()

# %% [markdown]
# **What to look for.** In each multi-head row every colour stays inside its own supernet
# head (100% of a narrow head's channels in wide head $h$); in the plain rows the colours
# drift left, so narrow head $h$ reads other wide heads' channels (25% and 50% in place).
# With $d = d_{max}$ (8 channels in 2 heads) the two rows are the same.
#
# **Copying the supernet.** `SuperBlock` needs, besides torch: the two attention layers and
# their functions (`inside_window`, `local_attention`, `axial_logits`, `axial_attention`),
# `Choice`, `channel_index`, `sliced_batch_norm` and the four slicing functions (`centre`,
# `qkv_rows`, `local_slices`, `axial_slices`). A test executes exactly that list on its own.

# %% [markdown]
# ## 5. Training the supernet, then searching it
# A training step draws one `sandwich_configs` set, sums the gradients of its sub-networks on
# the same batch, then the optimiser steps once (`utils.train` calls this `step_fn`).

# %%
def sandwich_step_fn(space, *, scheme, n_random, generator, ties="random",
                     label_smoothing=0.1):
    """utils.train step_fn: sums the gradients of one sandwich_configs draw on the
    batch."""
    def step(model, x, y):
        # gradients accumulate over the sub-networks: every shared weight gets the sum of
        # what each sub-network that uses it asks of it
        out = None
        for cfg in sandwich_configs(space, generator, scheme=scheme, n_random=n_random,
                                    ties=ties):
            with utils.autocast(x.device):
                logits = model(x, cfg)
                loss = F.cross_entropy(logits.float(), y,
                                       label_smoothing=label_smoothing)
            loss.backward()
            out = out or (loss.detach(), logits.detach())      # report the largest's loss
        return out
    return step

# %% [markdown]
# **Scoring a sub-network with inherited weights.** The supernet's running BatchNorm statistics
# mix every sub-network it trained, so they fit none. Before scoring, we reset them and average
# the sub-network's own batch statistics over a few **training** batches (BigNAS, OFA): never
# over the images it is then scored on, or the score would have seen its own data. The score is
# the accuracy and NLL on a validation split carved from the training images.

# %%
@torch.no_grad()
def inherited_score(supernet, config, val_loader, calib_loader):
    """utils.Score (accuracy %, NLL) of a sub-network with inherited weights, after resetting the
    BatchNorm statistics and averaging its own batch statistics over calib_loader."""
    bns = [m for m in supernet.modules() if isinstance(m, nn.BatchNorm2d)]
    # forget the statistics of every other sub-network
    for bn in bns:
        bn.reset_running_stats()
        # momentum None: a plain average over the calibration batches, order-free
        bn.momentum = None
    # train mode, no gradients: BatchNorm updates its running statistics only
    supernet.train()
    for x, _ in calib_loader:
        supernet(x, config)
    for bn in bns:
        bn.momentum = 0.1                                    # PyTorch's default
    def forward(model, x):
        return model(x, config)
    return utils.evaluate(supernet, val_loader, forward=forward)

# %% [markdown]
# **Does the supernet rank sub-networks?** The whole one-shot method rests on one
# assumption: a sub-network that scores higher with inherited weights would also score higher
# if trained alone. If it fails, the search optimises the wrong thing, however good the
# search is. We measure it with **Kendall's $\tau$** between the inherited scores $a_i$ and the
# stand-alone scores $b_i$ of $k$ networks: over the $k(k-1)/2$ pairs,
#
# $$\tau = \frac{n_{concordant} - n_{discordant}}{\sqrt{(n_0 - n_a)(n_0 - n_b)}},
#   \qquad n_0 = \tfrac{k(k-1)}{2},$$
#
# where a pair is concordant if both lists order it the same way, and $n_a$, $n_b$ count
# the pairs tied in each list (tau-b). $\tau = 1$: the same order; $0$: no relation; $-1$:
# reversed. The lab's entry check asks for $\tau > 0$ before it reads any search verdict.

# %%
def kendall_tau(a, b):
    """Kendall's tau-b of two score lists: +1 same order, -1 reversed; a tie in either list
    counts neither way (nan if one list is constant)."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    i, j = np.triu_indices(len(a), k=1)                        # every pair once
    sa = np.sign(a[i] - a[j])
    sb = np.sign(b[i] - b[j])
    denominator = math.sqrt(np.count_nonzero(sa) * np.count_nonzero(sb))
    return float((sa * sb).sum() / denominator) if denominator else float("nan")

# %% [markdown]
# **Evolutionary search** (as in SPOS and OFA). A population of configs under the FLOPs budget
# is scored; the `parents` best configs seen so far breed the next population: each child
# copies a parent (every other child is a crossover of two parents, block by block) and then
# redraws each block with probability `mutate_prob`. Children over the budget or already scored
# are redrawn. The budget is the plain ResNet's FLOPs.

# %%
def breed(space, top, i, mutate_prob, generator):
    """Child i: a parent (odd i: a blockwise crossover of two), then per-block
    mutation."""
    # two parents drawn from the best configs so far (possibly the same one)
    a = top[randint(len(top), generator)]
    b = top[randint(len(top), generator)]
    # crossover: each block from parent a or b with probability 1/2
    if i % 2:
        coins = torch.rand(len(a), generator=generator) < 0.5
        a = tuple(x if keep else y for x, y, keep in zip(a, b, coins.tolist()))
    # mutation: each block redrawn (type and candidate) with probability mutate_prob
    fresh = sample_config(space, generator)
    coins = torch.rand(len(a), generator=generator) < mutate_prob
    return tuple(f if redraw else ch for f, ch, redraw in zip(fresh, a, coins.tolist()))


def evolutionary_search(space, fitness, *, budget, population, generations, parents,
                        mutate_prob, generator, num_classes=10):
    """Maximise fitness(config) under `budget` FLOPs. -> (best, {config: score} in
    order). Scores population x generations distinct configs; `generator` seeds every
    draw, so a search repeats exactly."""
    scores = {}
    top = None                              # the parents: the best configs scored so far
    for _ in range(generations):
        pop = []
        while len(pop) < population:
            for _ in range(2000):
                if top is None:
                    c = sample_config(space, generator)
                else:
                    c = breed(space, top, len(pop), mutate_prob, generator)
                new = c not in scores and c not in pop
                if new and space.flops(c, num_classes) <= budget:
                    break
            else:
                raise RuntimeError(f"no new config under {budget / 1e6:.2f} MFLOPs: "
                                   f"raise the budget")
            pop.append(c)
        # score the new population, then keep the best of everything scored so far
        for c in pop:
            scores[c] = fitness(c)
        top = sorted(scores, key=scores.get, reverse=True)[:parents]
    return top[0], scores

# %% [markdown]
# `demo_search` runs the search on a fitness with a known optimum, the number of blocks (of 6)
# equal to a hidden target config under the budget, and draws the target beside what it found.

# %%
def draw_blocks(ax, space, config, row=0.0, label=""):
    """A network as its block sequence: one box per searched block, coloured by
    operator."""
    for b, ch in enumerate(config):
        ax.add_patch(Rectangle((b, row), 0.94, 0.8, color=COLOURS[ch.op]))
        ax.text(b + 0.47, row + 0.4, f"{ch}\n{space.layout[b][2]} px", ha="center",
                va="center", color="white", fontsize=7)
    ax.text(-0.1, row + 0.4, label, ha="right", va="center", fontsize=8)


def demo_search():
    """Evolution finds a hidden target config (fitness: blocks equal to it)."""
    space = SearchSpace(**{**QUICK_SPACE, "depths": (2, 2, 2)})
    budget = space.flops(space.resnet_config())
    g = torch.Generator().manual_seed(7)
    target = sample_config(space, g)
    while space.flops(target) > 0.8 * budget:
        target = sample_config(space, g)

    def fitness(c):
        return float(sum(a == b for a, b in zip(c, target)))
    best, scores = evolutionary_search(space, fitness, budget=budget, population=16,
                                       generations=30, parents=4, mutate_prob=0.3,
                                       generator=torch.Generator().manual_seed(0))
    fig = Figure(figsize=(8, 1.7))
    ax = fig.subplots()
    rows = (("hidden target", target), ("evolution found", best))
    for r, (label, c) in enumerate(rows):
        text = f"{label}\n{space.flops(c) / 1e6:.2f} MFLOPs"
        draw_blocks(ax, space, c, row=-r, label=text)
    ax.set_xlim(-2.2, space.num_blocks)
    ax.set_ylim(-1.1, 0.9)
    ax.axis("off")
    utils.show(fig, "demo_search")
    size = math.prod(sum(len(c) for c in cands.values()) for cands in space.candidates)
    print(f"  budget {budget / 1e6:.2f} MFLOPs; evolution found the target: "
          f"{best == target} ({len(scores)} of {size:,} configs scored)")
    return {"found_target": best == target, "scored": len(scores)}


if utils.in_notebook():
    demo_search()

# %% [markdown]
# **What to look for.** Evolution finds the hidden 6-block config after scoring a few hundred
# of tens of millions of configs: on a fitness that rewards each correct block separately,
# keeping good parents and changing a few blocks at a time climbs quickly. A supernet's
# fitness is noisier and its blocks interact, which is why the lab compares the search with
# a random search given the same number of scores.

# %% [markdown]
# ## Optional: speed
# `local_attention` copies keys and values $K^2$ times (`unfold`). Reading one shifted slice of
# the padded map per window cell gives the same sums with less memory traffic, faster on a CPU
# (`--bench` times both). A test shows it equals the reference, values and gradients; the lab
# switches it on with `use_fast_local_attention`.

# %%
def local_attention_fast(q, k, v, rel, *, num_heads):
    """local_attention (same maths), by shifted slices. q, k, v: (B, C, H, W) -> same."""
    B, C, H, W = q.shape
    K = rel.shape[-1]
    d = C // num_heads
    p = K // 2
    q = q.reshape(B, num_heads, d, H, W) * d ** -0.5                   # (B, N_h, d, H, W)
    # keys and values zero-padded by p = K // 2 pixels on each side, as unfold pads them
    padded = (B, num_heads, d, H + 2 * p, W + 2 * p)
    kp = F.pad(k, (p, p, p, p)).reshape(padded)
    vp = F.pad(v, (p, p, p, p)).reshape(padded)
    cells = list(itertools.product(range(K), range(K)))               # raster order, as unfold
    # content term q . k of window cell (i, j): the key map shifted by (i - p, j - p)
    content = torch.stack([(q * kp[..., i:i + H, j:j + W]).sum(2) for i, j in cells], 2)
    # position term q . r_delta: one embedding per window cell, the same for every pixel
    position = torch.einsum("bhdyx,hdo->bhoyx", q, rel.reshape(num_heads, d, K * K))
    inside = inside_window(H, W, K, q.device)
    attn = (content + position).masked_fill(~inside, float("-inf")).softmax(dim=2)
    # y = sum over cells of a_cell * (the value map shifted to that cell)
    out = 0
    for o, (i, j) in enumerate(cells):
        out = out + attn[:, :, o, None] * vp[..., i:i + H, j:j + W]
    return out.reshape(B, C, H, W)                                     # (B, N_h, d, H, W) -> ...


def use_fast_local_attention(model, fast=True):
    """Switch every LocalSelfAttention in `model` to the fast form (or back). ->
    model."""
    for module in model.modules():
        if isinstance(module, LocalSelfAttention):
            module.attend = local_attention_fast if fast else local_attention
    return model

# %% [markdown]
# ## What the lab tests, and where the numbers are
# The lab below turns the paper's claims into paired experiments on CIFAR-10 at 16 pixels
# (2,500 training images, a 2,000-image validation split carved from them, all 10,000 test
# images). Each claim first prints an **entry check**, a precondition without which its
# verdict says more about our small regime than about the paper:
#
# - `sampling`: does Hierarchical Sampling give the all-conv, all-local and all-axial
#   sub-networks better inherited quality than flat sampling (worst type first)? Entry check:
#   the two samplers really train the types differently.
# - `search`: does the searched TrioNet match the CNN, while the all-local and all-axial nets
#   fall short? Beside it: the all-conv net with the searched net's FLOPs and the best of a
#   random search with as many scores. Entry check: the supernet ranks sub-networks,
#   Kendall's $\tau$ of inherited vs stand-alone accuracy $> 0$.
# - `sharing`: which scheme's inherited scores rank the search run's stand-alone nets better
#   ($\tau$, paired by seed), beside their mean inherited accuracy.
#
# The verdicts, their logs and the deviations from the paper are in
# `runs/05_trionet_search/RESULTS.md`; the README quotes the headline.

# %% [markdown]
# ## Exercises
# Answers: `solutions/05_trionet_search.py` (run it: `python solutions/05_trionet_search.py`).
#
# 1. **Flat sampling starves a type** (★, no data, seconds). Give the quick space a third
#    window, `SearchSpace(**{**QUICK_SPACE, "local_windows": (3, 5, 7)})`. Predict, before
#    running, the share of trained blocks per type under each sampler, from the candidate
#    counts. Check: count the types in `replay(space, seed=0, steps=2000, scheme=...,
#    n_random=1)` for both schemes; each share should be within 2 points of your prediction.
# 2. **Implement Multi-head Sharing** (★★, no data, seconds). Fill in `my_channel_index`
#    below: the channels a narrow attention layer takes from the supernet's, in its own order,
#    for `sharing="multihead"` and `"plain"` (section 4's equation). Check:
#    `python -m pytest tests/test_05_trionet_search.py -k implement`.
# 3. **Why the search never picks the widest axial net** (★, no data, seconds). In
#    `SearchSpace(**QUICK_SPACE)` compare the budget `space.flops(space.resnet_config())` with
#    the FLOPs of the widest all-axial net, `tuple(c["axial"][-1] for c in space.candidates)`.
#    Which term of section 2's FLOPs formula makes axial attention dearer than a 3x3 conv at
#    16 pixels, and at which image size would the widest all-axial net fit the budget? Check:
#    `space.flops` on a space built with that `image_size`.
# 4. **Ties and the sharing schemes** (★★, no data, seconds). In an attention-only space with
#    1-head candidates (`ops=("local", "axial")`, `mid_channels=(16, 16, 32)`, `max_heads=4`,
#    `head_choices=(1, 2, 4)`, `width_ratios=(0.25, 0.5, 1.0)`, `local_windows=(3,)`), use
#    `head_mix(space, replay(..., ties="first"))` and `ties="random"`. Predict first: with ties
#    to the fewest heads, what share of attention training reaches layers where the sharing
#    schemes differ? Check: the two `head_mix(...)["differs"]` values.
# 5. **Does longer supernet training rank better?** (★★★, CIFAR-10, about 6 min on 2 cores).
#    Run `python 05_trionet_search.py --quick --data cifar10 --experiment search
#    --supernet-epochs 6 --replicates 3` and compare its entry-check τ with the committed run's
#    (3 epochs). Check: both τ intervals, and whether the searched net's verdict changes.

# %%
def my_channel_index(choice, *, max_width, max_heads, sharing):
    """Exercise 2: the supernet channels (a LongTensor) a sub-layer of `choice` uses, in its
    order: multi-head, head h takes h * d_max + s; plain, the first C channels."""
    raise NotImplementedError("exercise 2: fill in my_channel_index (section 4)")


# %% [markdown]
# ---
# # The lab
# Presets and flags, then one `exp_*` per claim (`--experiment`), each writing
# runs/05_trionet_search/<experiment>.json and .png. Arms of one seed share the data, the
# batches, the initial value of every weight they share and the stream of sampled sub-networks;
# `utils.compare_paired` compares their per-seed differences. Nothing is chosen on the test split.
#
# - `sampling` (the `--quick` default): Hierarchical Sampling trains every operator type
#   fairly. Arms: hierarchical and flat supernets.
# - `search`: TrioNet matches the CNN on small data while stand-alone attention falls short.
#   Arms: a supernet, its evolutionary and random searches, stand-alone nets.
# - `sharing` (after `search`): Multi-head Sharing ranks sub-networks as stand-alone training
#   would. Arms: a plain-sharing supernet per seed beside the search run's multi-head one,
#   both scored against the search run's stand-alone nets.

# %%
PRESETS = {
    # quick: 2 CPU cores; per class 250 training and 200 validation images (carved from the
    # training split); the full 10,000-image test split
    "quick": dict(**QUICK_SPACE, train_per_class=250, val_per_class=200,
                  test_per_class=None, batch_size=64, lr=3e-3, supernet_epochs=3,
                  standalone_epochs=8, n_random=1, calib_batches=4, seeds=8,
                  replicates=4, probes=6, population=6, generations=3, parents=4,
                  mutate_prob=0.3, margin=2.0, margin_nll=0.05,
                  margin_inherited=1.0, margin_tau=0.2, workers=2, threads=1,
                  experiments=("sampling",)),
    # full: CIFAR-10 at 32 px, two searched blocks per stage; one GPU (not measured)
    "full": dict(image_size=32, stem_channels=32, stage_channels=(64, 128, 256),
                 mid_channels=(32, 64, 128), depths=(2, 2, 2), max_heads=8,
                 head_choices=(4, 8), width_ratios=(0.5, 0.75, 1.0), conv_kernels=(3, 5),
                 local_windows=(3, 5, 7), train_per_class=None, val_per_class=500,
                 test_per_class=None, batch_size=128,
                 lr=2e-3, supernet_epochs=100, standalone_epochs=100, n_random=2,
                 calib_batches=8, seeds=5, replicates=5, probes=8, population=32,
                 generations=10, parents=8, mutate_prob=0.2, margin=1.0, margin_nll=0.02,
                 margin_inherited=1.0, margin_tau=0.2, workers=1, threads=None,
                 experiments=("sampling", "search", "sharing"))}
FLAGS = {
    "stem_channels": "stem width", "stage_channels": "block output channels per stage",
    "mid_channels": "C_max, the widest middle width per stage",
    "depths": "blocks per stage",
    "max_heads": "heads of the widest attention layer", "head_choices": "head counts",
    "width_ratios": "widths = ratio x c_max", "conv_kernels": "conv kernels (odd)",
    "local_windows": "local windows (odd)", "batch_size": "training batch",
    "lr": "peak AdamW learning rate", "supernet_epochs": "epochs per supernet",
    "standalone_epochs": "epochs per stand-alone net",
    "calib_batches": "training batches that re-estimate a sub-network's BatchNorm "
                     "statistics",
    "n_random": ("sandwich: random sub-networks per step", utils.nonneg_int),
    "seeds": "paired supernet seeds of the sampling experiment",
    "replicates": "seeds of the search experiment (supernets, stand-alone nets)",
    "probes": "stand-alone nets per seed the rankings use (3 single-operator + mixed)",
    "population": "search population", "generations": "search generations",
    "parents": "search: configs kept as parents",
    "mutate_prob": "search: P(block resampled)",
    "margin": "search: 'matches' = equivalent within this many test accuracy points",
    "margin_nll": "search: 'matches' = equivalent within this many nats",
    "margin_inherited": "sampling and sharing: equivalence margin, inherited accuracy",
    "margin_tau": "sharing: equivalence margin of the Kendall tau difference"}
EXPERIMENTS = ("sampling", "search", "sharing")


def check(args):
    """Settings that do not fit together: one line, exit 2."""
    if not args.val_per_class:
        raise utils.InputError("--val-per-class 0 leaves no validation split; the "
                               "search and the rankings need one: use >= 1")
    if args.parents > args.population:
        raise utils.InputError("--parents must not exceed --population")
    if args.mutate_prob > 1:
        raise utils.InputError(f"--mutate-prob {args.mutate_prob} must be <= 1")
    if min(args.seeds, args.replicates) < 2:
        raise utils.InputError("--seeds and --replicates must be >= 2: an interval "
                               "needs two")
    if args.probes < 4:
        raise utils.InputError("--probes must be >= 4: 3 single-operator nets and >= 1 "
                               "mixed")
    try:
        space_from_args(args)
    except ValueError as e:
        raise utils.InputError(str(e)) from None


def space_from_args(args):
    keys = ("image_size", "stem_channels", "stage_channels", "mid_channels", "depths",
            "max_heads", "head_choices", "width_ratios", "conv_kernels", "local_windows")
    return SearchSpace(**{k: getattr(args, k) for k in keys})


def loaders(args, data, device, seed):
    """Seeded train, val and test loaders, and a fixed calibration set: calib_batches batches
    of TRAINING images, not augmented, that re-estimate a sub-network's BatchNorm statistics
    (never validation or test images: the scores would then have seen their own data)."""
    g = torch.Generator().manual_seed(seed)
    n = args.calib_batches * args.batch_size
    pick = torch.randperm(len(data.x_train), generator=g)[:n]
    train, val, test = utils.make_loaders(data, batch_size=args.batch_size,
                                          device=device, seed=seed)
    calib = utils.DeviceLoader(data.x_train[pick], data.y_train[pick],
                               batch_size=args.batch_size, train=False, device=device,
                               mean=data.mean, std=data.std)
    return train, val, test, calib


# %% [markdown]
# The nets the experiments name: the single-operator nets (the same candidate in every block,
# the most FLOPs under the budget), the probes the rankings use, the all-conv net whose FLOPs
# match a searched one, and a random search with as many scored configs as evolution.

# %%
def single_operator_config(space, op, budget, num_classes=10):
    """The all-`op` net (the same candidate in every block) with the most FLOPs under
    budget."""
    nets = []
    for i in range(len(space.candidates[0][op])):
        nets.append(tuple(c[op][i] for c in space.candidates))
    fits = [c for c in nets if space.flops(c, num_classes) <= budget] or nets[:1]
    return max(fits, key=lambda c: space.flops(c, num_classes))


def probe_configs(space, k, seed, num_classes=10):
    """k nets spread over the space, fixed before any training: all-conv (the plain ResNet),
    all-local, all-axial, then k - 3 configs drawn hierarchically under the budget that mix
    at least two operator types."""
    budget = space.flops(space.resnet_config(), num_classes)
    probes = [space.resnet_config()]
    for op in ("local", "axial"):
        probes.append(single_operator_config(space, op, budget, num_classes))
    g = torch.Generator().manual_seed(seed)
    while len(probes) < k:
        c = sample_config(space, g)
        mixed = len({ch.op for ch in c}) > 1
        if mixed and c not in probes and space.flops(c, num_classes) <= budget:
            probes.append(c)
    return probes


def flops_matched_conv(space, config, num_classes=10):
    """The all-conv config with the most FLOPs not above `config`'s (ties: the first)."""
    target = space.flops(config, num_classes)
    convs = [c["conv"] for c in space.candidates]
    every = itertools.product(*convs)
    fits = [c for c in every if space.flops(c, num_classes) <= target]
    if not fits:
        raise ValueError(f"no all-conv config has at most {target / 1e6:.2f} MFLOPs")
    return max(fits, key=lambda c: space.flops(c, num_classes))


def random_search(space, fitness, *, budget, evaluations, generator, num_classes=10):
    """The control of evolution: `evaluations` distinct configs drawn hierarchically under the
    budget, the best by the same fitness. -> (best config, {config: score})."""
    scores = {}
    for _ in range(100 * evaluations):
        if len(scores) == evaluations:
            break
        c = sample_config(space, generator)
        if c not in scores and space.flops(c, num_classes) <= budget:
            scores[c] = fitness(c)
    return max(scores, key=scores.get), scores


def entry_check(claim, precondition, measured, needs, met):
    """The line each claim prints before its verdict."""
    line = (f"entry check: {claim}: {precondition} = {measured} (needs {needs}) → "
            f"{'met' if met else 'not met'}")
    print(line, flush=True)
    return {"line": line, "met": bool(met)}


# %%
# Jobs for utils.run_jobs: each seeds all it uses (weights, batches, sampled sub-networks) and
# returns numbers, so results do not depend on --workers or on what ran before.
def init_supernet(space, num_classes, seed, sharing):
    """A supernet's initial weights depend on the seed only, never on the arm (sampler or
    sharing scheme): paired arms start from the same weights."""
    utils.set_seed(seed)
    return TrioNetSupernet(space, num_classes=num_classes, sharing=sharing)


def supernet_job(args, data, seed, *, sharing="multihead", scheme="hierarchical",
                 probes=(), on="val", search=False):
    """Train a supernet; score each probe config with inherited weights (on the validation or
    the test split); search it if asked (evolution, then random search with as many scores)."""
    device, t0 = utils.get_device(args.device), time.time()
    space = space_from_args(args)
    net = init_supernet(space, data.num_classes, seed, sharing).to(device)
    use_fast_local_attention(net)
    train, val, test, calib = loaders(args, data, device, seed)
    step = sandwich_step_fn(space, scheme=scheme, n_random=args.n_random,
                            generator=torch.Generator().manual_seed(seed))
    history = utils.train(net, train, epochs=args.supernet_epochs, lr=args.lr,
                          step_fn=step, log=print_nothing)
    split = val if on == "val" else test
    out = {"train_s": time.time() - t0, "loss": history[-1]["loss"], "scores": []}
    for c in probes:
        out["scores"].append(tuple(inherited_score(net, c, split, calib)))
    if search:
        out.update(search_supernet(args, space, net, val, calib, seed, data.num_classes))
    print(f"[supernet {scheme} {sharing} seed {seed}] {out['train_s']:.0f}s train, loss "
          f"{out['loss']:.3f} ({time.time() - t0:.0f}s)", flush=True)
    return out


def search_supernet(args, space, net, val, calib, seed, num_classes):
    """Evolution and random search on one trained supernet, fitness = inherited val
    accuracy."""
    budget = space.flops(space.resnet_config(), num_classes)

    def fitness(c):
        return inherited_score(net, c, val, calib).acc
    best, scores = evolutionary_search(
        space, fitness, budget=budget, population=args.population,
        generations=args.generations, parents=args.parents, mutate_prob=args.mutate_prob,
        generator=torch.Generator().manual_seed(seed + 1), num_classes=num_classes)
    pick, rand = random_search(space, fitness, budget=budget, evaluations=len(scores),
                               generator=torch.Generator().manual_seed(seed + 2),
                               num_classes=num_classes)
    return {"searched": best, "searched_score": scores[best], "scored": len(scores),
            "random": pick, "random_score": rand[pick]}


def standalone_job(args, data, config, seed, test=True):
    """Train a net from scratch; score it on validation (and test). It starts from the plain
    ResNet's weights of its seed wherever the two share one: the nets of a seed are paired."""
    device, space, t0 = utils.get_device(args.device), space_from_args(args), time.time()
    nets = []
    for c in (space.resnet_config(), config):
        utils.set_seed(seed)
        nets.append(space.build(c, data.num_classes))
    utils.copy_shared_init(*nets)
    use_fast_local_attention(nets[1])
    train, val, test_loader, _ = loaders(args, data, device, seed)
    utils.train(nets[1].to(device), train, epochs=args.standalone_epochs, lr=args.lr,
                log=print_nothing)
    out = {"val": tuple(utils.evaluate(nets[1], val)), "train_s": time.time() - t0}
    if test:
        out["test"] = tuple(utils.evaluate(nets[1], test_loader))
    scores = f"val {out['val'][0]:.1f}%"
    if test:
        scores += f", test {out['test'][0]:.1f}%"
    print(f"[stand-alone {name(config)} seed {seed}] {out['train_s']:.0f}s, {scores}",
          flush=True)
    return out


def print_nothing(line):
    """utils.train's log: the jobs print one line each instead."""


def run_job(kind, kwargs):
    return {"supernet": supernet_job, "standalone": standalone_job}[kind](**kwargs)


def run_all(args, jobs):
    """{key: result} of {key: (kind, keywords)}, `--workers` at a time, in the given
    order."""
    keys = list(jobs)
    results = utils.run_jobs(run_job, [jobs[k] for k in keys], workers=args.workers)
    return dict(zip(keys, results))


def verdicts(a, b, name_a, name_b, *, margins, pairs="paired seeds"):
    """Accuracy and NLL of arm a - arm b (per-seed (acc, NLL)), in the one verdict
    wording."""
    out = {}
    for m, unit in enumerate(("points", "nats")):
        out[unit] = utils.compare_paired(
            [x[m] for x in a], [x[m] for x in b], name_a=name_a, name_b=name_b,
            unit=unit, digits=1 + 2 * m, pairs=pairs, higher_is_better=m == 0,
            bound=margins[m])
    return out


def table(rows, header):
    cells = [header]
    for r in rows:
        cells.append([f"{x:.1f}" if isinstance(x, float) else str(x) for x in r])
    widths = [max(len(x) for x in col) for col in zip(*cells)]
    lines = []
    for r in cells:
        lines.append("| " + " | ".join(x.ljust(n) for x, n in zip(r, widths)) + " |")
    rule = "|" + "|".join("-" * (n + 2) for n in widths) + "|"
    return "\n".join([lines[0], rule] + lines[1:])


def name(config):
    return " ".join(map(str, config))


def steps_per_supernet(args, data):
    return args.supernet_epochs * max(len(data.y_train) // args.batch_size, 1)


# %%
def exp_sampling(args, data, out):
    """Hierarchical vs flat sampling, judged by what the paper says it improves: every operator
    type trained fairly. Paired supernets per seed (same init, batches, sampler seed); each
    scores its all-conv, all-local and all-axial sub-networks with inherited weights on test."""
    space, nc = space_from_args(args), data.num_classes
    seeds = list(range(args.seed, args.seed + args.seeds))
    steps = steps_per_supernet(args, data)
    singles = probe_configs(space, 3, args.seed, nc)              # all-conv, all-local, all-axial
    ops = ("conv", "local", "axial")
    mix = {}
    for scheme in ("hierarchical", "flat"):
        trained = Counter()
        for s in seeds:
            configs = replay(space, seed=s, steps=steps, scheme=scheme,
                             n_random=args.n_random)
            for cfg in configs:
                trained.update(ch.op for ch in cfg)
        mix[scheme] = {op: 100 * trained[op] / sum(trained.values()) for op in ops}
    print(f"\n[sampling] {len(seeds)} seeds x 2 samplers x {args.supernet_epochs} epochs "
          f"({steps} steps); % of trained blocks per type (replayed):")
    print(table([[s, *(mix[s][op] for op in ops)] for s in mix], ["sampler", *ops]))
    least = min(ops, key=lambda op: mix["flat"][op])              # the type flat trains least
    gap = mix["flat"][least] - mix["hierarchical"][least]
    entry = entry_check("hierarchical sampling trains the types more evenly",
                        f"flat - hierarchical share of {least} training",
                        f"{gap:+.1f} points", "<= -5", gap <= -5)
    jobs = {}
    for s in seeds:
        for scheme in ("hierarchical", "flat"):
            kw = dict(args=args, data=data, seed=s, scheme=scheme, probes=singles,
                      on="test")
            jobs[s, scheme] = ("supernet", kw)
    res = run_all(args, jobs)
    rows = []
    for s in seeds:
        rows.append([s, *(res[s, sc]["scores"][i][0] for sc in ("hierarchical", "flat")
                          for i in range(3))])
    header = ["seed"]
    for sc in ("hierarchical", "flat"):
        header += [f"{sc[:4]} all-{op} %" for op in ops]
    print(table(rows, header))
    margins = (args.margin_inherited, 0.02)
    v = {}
    for i, op in enumerate(ops):
        a = [res[s, "hierarchical"]["scores"][i] for s in seeds]
        b = [res[s, "flat"]["scores"][i] for s in seeds]
        v[op] = verdicts(a, b, f"hierarchical all-{op}", f"flat all-{op}",
                         margins=margins)
    worst = {}
    for sc in ("hierarchical", "flat"):
        worst[sc] = [min(res[s, sc]["scores"][i][0] for i in range(3)) for s in seeds]
    v["worst type"] = {"points": utils.compare_paired(
        worst["hierarchical"], worst["flat"], name_a="hierarchical worst type",
        name_b="flat worst type", bound=args.margin_inherited)}
    figure_sampling(res, seeds, ops, out)
    scores = {f"{sc} seed {s}": res[s, sc]["scores"] for s, sc in res}
    return {"trained_mix": mix, "entry_check": entry, "verdicts": v,
            "singles": [name(c) for c in singles], "scores": scores}


def figure_sampling(res, seeds, ops, out):
    fig = Figure(figsize=(7, 2.6))
    ax = fig.subplots()
    for i, op in enumerate(ops):
        for s in seeds:
            h = res[s, "hierarchical"]["scores"][i][0]
            f = res[s, "flat"]["scores"][i][0]
            ax.plot([i - 0.15, i + 0.15], [h, f], "-", color=COLOURS[op], alpha=0.6)
    ax.set_xticks(range(len(ops)), [f"all-{op}\nhierarchical | flat" for op in ops])
    ax.set_ylabel("inherited test accuracy %")
    ax.set_title("each line: one seed's paired supernets", fontsize=9)
    fig.savefig(os.path.join(out, "sampling.png"), dpi=100, bbox_inches="tight")


# %%
def exp_search(args, data, out):
    """"TrioNet is still able to match the best operator, convolution in this case" on small
    data (abstract), with its controls. Per seed s: a supernet (multi-head sharing), searched
    by evolution and by random search; stand-alone nets of s: the probes, the searched net, the
    random pick and the FLOPs-matched all-conv. Intervals cover what a rerun changes. The
    sharing experiment reuses the probes' stand-alone scores (saved in search.json)."""
    space, nc = space_from_args(args), data.num_classes
    seeds = list(range(args.seed, args.seed + args.replicates))
    probes = probe_configs(space, args.probes, args.seed + 100, nc)
    print(f"\n[search] {len(seeds)} seeds; probes (stand-alone nets the rankings use): "
          f"{[name(c) for c in probes]}", flush=True)
    jobs = {}
    for s in seeds:
        kw = dict(args=args, data=data, seed=s, probes=probes, search=True)
        jobs["multihead", s] = ("supernet", kw)
    for i, c in enumerate(probes):                           # single-operator nets get a test
        for s in seeds:
            kw = dict(args=args, data=data, config=c, seed=s, test=i < 3)
            jobs[c, s] = ("standalone", kw)
    runs = run_all(args, jobs)
    extra = {}
    for s in seeds:
        found = runs["multihead", s]
        matched = flops_matched_conv(space, found["searched"])
        for c in (found["searched"], found["random"], matched):
            if (c, s) not in runs or "test" not in runs[c, s]:
                kw = dict(args=args, data=data, config=c, seed=s)
                extra[c, s] = ("standalone", kw)
    runs.update(run_all(args, extra))
    result = judge_search(args, space, seeds, probes, runs, nc)
    result["ranking"] = {"seeds": seeds, "probes": [name(c) for c in probes],
                         "settings": ranking_settings(args),
                         "inherited": [runs["multihead", s]["scores"] for s in seeds],
                         "standalone": [[runs[c, s]["val"] for c in probes] for s in seeds]}
    figure_search(space, seeds, runs, probes, out)
    result["runs"] = {f"{k[0] if isinstance(k[0], str) else name(k[0])} seed {k[1]}": r
                      for k, r in runs.items()}
    return result


def ranking_taus(inherited, standalone):
    """Per seed: Kendall tau between a supernet's inherited val accuracies of the probes and
    the probes' stand-alone val accuracies (trained on the same seed). Both: [seed][probe]
    (acc, NLL)."""
    taus = []
    for a, b in zip(inherited, standalone):
        taus.append(kendall_tau([x[0] for x in a], [x[0] for x in b]))
    return taus


def ranking_settings(args):
    """The settings a saved search run must share with a sharing run that reuses it."""
    keys = ("image_size", "stem_channels", "stage_channels", "mid_channels", "depths",
            "max_heads", "head_choices", "width_ratios", "conv_kernels", "local_windows",
            "train_per_class", "val_per_class", "batch_size", "lr", "supernet_epochs",
            "standalone_epochs", "n_random", "calib_batches", "replicates", "probes", "seed")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()
            if k in keys}


def judge_search(args, space, seeds, probes, runs, nc):
    """The entry check (does the supernet rank?), then searched - all-conv beside its
    controls."""
    inherited = [runs["multihead", s]["scores"] for s in seeds]
    taus = ranking_taus(inherited, [[runs[c, s]["val"] for c in probes] for s in seeds])
    ci = utils.mean_ci(taus)
    entry = entry_check("the supernet ranks sub-networks",
                        "Kendall τ(inherited, stand-alone)", utils.fmt_ci(ci), "> 0",
                        ci[1] > 0)
    conv, local, axial = probes[:3]
    rows = []
    for s in seeds:
        f = runs["multihead", s]
        matched = flops_matched_conv(space, f["searched"])
        mflops = space.flops(f["searched"], nc) / 1e6
        rows.append([s, name(f["searched"]), f"{mflops:.2f}",
                     runs[f["searched"], s]["test"][0], runs[f["random"], s]["test"][0],
                     runs[matched, s]["test"][0], runs[conv, s]["test"][0],
                     runs[local, s]["test"][0], runs[axial, s]["test"][0],
                     f"{taus[seeds.index(s)]:+.2f}"])
    print(table(rows, ["seed", "searched", "MFLOPs", "searched %", "random pick %",
                       "matched conv %", "all-conv %", "all-local %", "all-axial %", "τ"]))
    for s in seeds:
        f = runs["multihead", s]
        print(f"seed {s}: random pick {name(f['random'])}; matched conv "
              f"{name(flops_matched_conv(space, f['searched']))}")

    def test_of(config_of):
        return [runs[config_of(s), s]["test"] for s in seeds]
    searched = test_of(lambda s: runs["multihead", s]["searched"])
    arms = {"all-conv": test_of(lambda s: conv),
            "FLOPs-matched all-conv": test_of(
                lambda s: flops_matched_conv(space, runs["multihead", s]["searched"])),
            "random-search pick": test_of(lambda s: runs["multihead", s]["random"])}
    margins = (args.margin, args.margin_nll)
    pairs = "paired seeds (supernet, search, retraining)"
    v = {}
    for arm, b in arms.items():
        v[f"searched - {arm}"] = verdicts(searched, b, "searched", arm, margins=margins,
                                          pairs=pairs)
    for op, c in (("local", local), ("axial", axial)):
        v[f"all-{op} - all-conv"] = verdicts(test_of(lambda s: c), arms["all-conv"],
                                             f"all-{op}", "all-conv", margins=margins)
    return {"probes": [name(c) for c in probes], "taus": taus, "entry_check": entry,
            "searched": {s: name(runs["multihead", s]["searched"]) for s in seeds},
            "random_pick": {s: name(runs["multihead", s]["random"]) for s in seeds},
            "verdicts": v}


def exp_sharing(args, data, out):
    """Multi-head vs plain sharing, judged by what a sharing scheme is for: how well inherited
    scores rank sub-networks as stand-alone training does. Per seed: a plain-sharing supernet,
    paired with the search run's multi-head supernet of that seed (same initial weights,
    batches and sampled sub-networks), scores the same probes; Kendall tau of each against the
    probes' stand-alone scores (from search.json), beside the mean inherited accuracy."""
    path = os.path.join(out, "search.json")
    if not os.path.exists(path):
        raise utils.InputError(f"{path} is missing: run --experiment search first (with the "
                               f"same flags and --out)")
    with open(path) as f:
        saved = json.load(f)["metrics"]["ranking"]
    if saved["settings"] != ranking_settings(args):
        raise utils.InputError(f"{path} was made with other settings: rerun --experiment "
                               f"search with these flags first")
    space = space_from_args(args)
    seeds = saved["seeds"]
    probes = probe_configs(space, args.probes, args.seed + 100, data.num_classes)
    if [name(c) for c in probes] != saved["probes"]:
        raise utils.InputError(f"{path} scored other probes: rerun --experiment search")
    print(f"\n[sharing] {len(seeds)} seeds: plain-sharing supernets paired with the search "
          f"run's multi-head ones, scoring its probes", flush=True)
    jobs = {}
    for s in seeds:
        kw = dict(args=args, data=data, seed=s, sharing="plain", probes=probes)
        jobs[s] = ("supernet", kw)
    plain = run_all(args, jobs)
    inherited = {"multihead": saved["inherited"],
                 "plain": [plain[s]["scores"] for s in seeds]}
    return judge_sharing(args, space, seeds, probes, inherited, saved["standalone"], data)


def judge_sharing(args, space, seeds, probes, inherited, standalone, data):
    """Multi-head vs plain sharing: how well each ranks the stand-alone probes (Kendall tau,
    paired by seed), beside the mean inherited val accuracy of the probes."""
    steps = steps_per_supernet(args, data)
    trained = []
    for s in seeds:
        trained += replay(space, seed=s, steps=steps, scheme="hierarchical",
                          n_random=args.n_random)
    mix = head_mix(space, trained)
    on_probes = head_mix(space, probes)
    print(f"attention blocks where the schemes differ: {100 * mix['differs']:.0f}% of those "
          f"trained (replayed), {100 * on_probes['differs']:.0f}% of the probes'")
    entry = entry_check("the sharing schemes differ where the supernet trains",
                        "share of trained attention blocks whose channels differ",
                        f"{100 * mix['differs']:.0f}%", ">= 10%", mix["differs"] >= 0.1)
    taus = {}
    mean = {}
    for arm in ("multihead", "plain"):
        taus[arm] = ranking_taus(inherited[arm], standalone)
        mean[arm] = [tuple(np.mean(x, 0)) for x in inherited[arm]]
    rows = []
    for i, s in enumerate(seeds):
        rows.append([s, f"{taus['multihead'][i]:+.2f}", f"{taus['plain'][i]:+.2f}",
                     mean["multihead"][i][0], mean["plain"][i][0]])
    print(table(rows, ["seed", "τ multi-head", "τ plain", "mean inherited % multi-head",
                       "mean inherited % plain"]))
    tau = utils.compare_paired(taus["multihead"], taus["plain"], name_a="multi-head τ",
                               name_b="plain τ", unit="τ", digits=2,
                               bound=args.margin_tau)
    v = verdicts(mean["multihead"], mean["plain"], "multi-head", "plain",
                 margins=(args.margin_inherited, 0.02))
    return {"trained_differs": mix["differs"], "probes_differ": on_probes["differs"],
            "entry_check": entry, "taus": taus, "tau_verdict": tau,
            "mean_inherited": mean, "verdicts": v, "inherited": inherited}


def figure_search(space, seeds, runs, probes, out):
    """Per seed: the searched network, and its test accuracy beside the controls'."""
    fig = Figure(figsize=(10, 0.7 * len(seeds) + 0.8))
    ax, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1.4]})
    marks = (("searched", "*"), ("random", "x"), ("conv", "o"))
    for i, s in enumerate(seeds):
        f = runs["multihead", s]
        draw_blocks(ax, space, f["searched"], row=-i, label=f"seed {s}")
        for key, mark in marks:
            c = probes[0] if key == "conv" else f[key]
            colour = COLOURS["conv"] if key == "conv" else "k"
            ax2.plot(runs[c, s]["test"][0], 0.4 - i, mark, color=colour)
        for c, op in zip(probes[1:3], ("local", "axial")):
            ax2.plot(runs[c, s]["test"][0], 0.4 - i, "s", color=COLOURS[op])
    ax.set_xlim(-0.7, space.num_blocks)
    ax.set_ylim(0.8 - len(seeds), 0.9)
    ax.axis("off")
    ax.set_title("the network each seed's search found", fontsize=9)
    ax2.set_ylim(0.8 - len(seeds), 0.9)
    ax2.set_yticks([])
    ax2.set_xlabel("test %: * searched, x random pick, o all-conv, "
                   "■ all-local / all-axial")
    fig.savefig(os.path.join(out, "search.png"), dpi=100, bbox_inches="tight")


# %%
def bench(args, device, out):
    """--bench: train img/s of the single-operator nets; all-local with both local
    attentions."""
    space, rows = space_from_args(args), []
    budget = space.flops(space.resnet_config())
    for op, fast in [(op, True) for op in space.ops] + [("local", False)]:
        net = space.build(single_operator_config(space, op, budget), 10)
        use_fast_local_attention(net, fast)
        shape = (3, args.image_size, args.image_size)
        ips, mem = utils.measure_step(net.to(device), shape,
                                      batch_size=args.batch_size, device=device)
        label = f"all-{op}" + " (reference form)" * (not fast)
        rows.append([label, f"{ips:.0f}", f"{mem:.1f}"])
    print(table(rows, ["net", "train img/s", "activations MB"]))
    utils.save_results(os.path.join(out, "bench.json"), vars(args), {"nets": rows})
    return rows


def full_preset_models(num_classes=10):
    """Every model the full preset trains, at its real size: name -> (model, step_fn or None,
    image_size); tests/test_utils.py takes one bf16 training step of each on a CPU."""
    args = utils.cli(__doc__, PRESETS, FLAGS, [], experiments=EXPERIMENTS)
    space = space_from_args(args)
    step = sandwich_step_fn(space, scheme="hierarchical", n_random=args.n_random,
                            generator=torch.Generator().manual_seed(0))
    models = {"supernet": (TrioNetSupernet(space, num_classes=num_classes), step,
                           args.image_size)}
    budget = space.flops(space.resnet_config(), num_classes)
    for op in space.ops:
        config = single_operator_config(space, op, budget, num_classes)
        models[f"all-{op}"] = (space.build(config, num_classes), None, args.image_size)
    return models


def main(argv=None):
    args = utils.cli(__doc__, PRESETS, FLAGS, argv, experiments=EXPERIMENTS, check=check,
                     bench="train img/s of the single-operator nets, both local "
                           "attentions")
    device, out = utils.start(args, "05_trionet_search")
    if args.mode == "demo":
        return utils.run_demos(out, [demo_sampling, demo_sharing, demo_search])
    if args.mode == "bench":
        return bench(args, device, out)
    data, results = utils.data_from_args(args), {}
    print(f"data: {len(data.y_train)} train / {len(data.y_val)} validation / "
          f"{len(data.y_test)} test images, {args.image_size}px; device {device}",
          flush=True)
    for exp in args.experiments:
        t0 = time.time()
        runs = {"sampling": exp_sampling, "search": exp_search, "sharing": exp_sharing}
        run = runs[exp]
        results[exp] = run(args, data, out)
        results[exp]["wall_s"] = round(time.time() - t0)
        utils.save_results(os.path.join(out, f"{exp}.json"), vars(args), results[exp])
        print(f"== {exp} done in {results[exp]['wall_s']}s ==", flush=True)
    return results


# %%
if __name__ == "__main__":
    utils.run_main(main)
