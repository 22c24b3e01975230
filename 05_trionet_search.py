"""Searching for TrioNet: Combining Convolution with Local and Global Self-Attention -- Pi, Wang,
Li, Li and Yuille, BMVC 2021 (arXiv:2111.07547).

Every block of a ResNet picks its own spatial operator (convolution, local windowed self-attention
or global axial self-attention) with its kernel or window, width and heads. One weight-sharing
supernet holds every candidate; each step trains a few sampled sub-networks (the sandwich rule),
then an evolutionary search under a FLOPs budget ranks sub-networks by their validation accuracy
with inherited weights. The paper adds two ways of training that supernet:
    Hierarchical Sampling  P(type) = 1/3, then P(candidate | type) = 1/|C_type|
                           (flat sampling: P(type) = |C_type| / |C|, most candidates win)
    Multi-head Sharing     head i of a narrow layer (h heads of d channels) takes channels
                           i*d_max .. i*d_max+d-1, the leading d of supernet head i
                           (plain sharing: channels i*d .. i*d+d-1, the first h*d)
Run:
    python 05_trionet_search.py --demo                  # no data, ~3 s: checks and figures
    python 05_trionet_search.py --quick --data cifar10  # 2-core CPU, ~7 min (or --data DIR)
    python 05_trionet_search.py --data cifar10          # full preset: one GPU (not measured here)
Results (--quick on a 2-core AMD EPYC CPU, torch 2.15 float32, all 10,000 test images):
    multi-head - plain sharing, inherited val accuracy: -0.1 points [-1.0, +0.8], n=8 paired
        seeds (58% of trained attention in layers where they differ) -> equivalent within +-1
    searched - all-conv, test accuracy: -2.3 points [-5.5, +0.9], n=5 replicates (supernet,
        search, retrain) -> not decided: 4 searches within 3 points, 1 chose all-attention (-6.4)
Details: runs/05_trionet_search/RESULTS.md (full tables, logs).
"""
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
# ## 1. Three spatial operators
# "The result architecture is named TrioNet for combining convolution, local self-attention, and
# global (axial) self-attention operators" (abstract). Each maps a feature map (B, c, H, W) to
# (B, c, H, W) inside a ResNet bottleneck; convolution is `nn.Conv2d(c, c, K, padding=K // 2)`.
#
# **Local self-attention** (SASA, Ramachandran et al. 2019, eq. 2-3): pixel i attends to the
# K x K window around it, in each of h heads of d = c / h channels,
#
#     y_i = sum_{j in window(i)} softmax_j( q_i . (k_j + r_{j-i}) / sqrt(d) ) v_j,
#
# with q = W_q x, k = W_k x, v = W_v x and a learned relative embedding r per window offset.
# Letters: B batch, c channels, h heads, d = c / h, H x W map, N = H W pixels, K window.

# %%
@lru_cache(maxsize=64)
def inside_window(H, W, K, device=None):
    """(K*K, H, W) bool: whether window cell o of pixel (y, x) is inside the image (cells outside
    are zero padding, not pixels: no attention). Cells in raster order, as F.unfold."""
    return F.unfold(torch.ones(1, 1, H, W, device=device), K, padding=K // 2).view(K * K, H, W) > 0

def local_attention(q, k, v, rel, *, heads):
    """SASA local self-attention, reference form. q, k, v: (B, c, H, W); rel: (c, K, K), the
    relative embedding r of each window offset. -> (B, c, H, W)."""
    B, c, H, W = q.shape
    K, d = rel.shape[-1], c // heads
    assert K % 2 == 1, f"the window must be odd, so that it has a centre pixel; got {K}"
    assert c % heads == 0, f"{c} channels cannot be split into {heads} heads"
    # every K x K window of keys and values, zeros outside the image: (B, h, d, K*K, N)
    keys = F.unfold(k, K, padding=K // 2).view(B, heads, d, K * K, H * W)
    values = F.unfold(v, K, padding=K // 2).view(B, heads, d, K * K, H * W)
    q = q.reshape(B, heads, d, H * W) * d ** -0.5                         # (B, h, d, N)
    # logits q_i . (k_j + r_{j-i}) / sqrt(d) of every query i and window cell j: (B, h, K*K, N)
    logits = torch.einsum("bhdn,bhdkn->bhkn", q, keys + rel.reshape(1, heads, d, K * K, 1))
    inside = inside_window(H, W, K, q.device).view(1, 1, K * K, H * W)
    attn = logits.masked_fill(~inside, float("-inf")).softmax(dim=2)     # softmax over the window
    out = torch.einsum("bhkn,bhdkn->bhdn", attn, values)                 # y_i = sum_j a_ij v_j
    return out.reshape(B, c, H, W)

# %% [markdown]
# **Global (axial) self-attention** (Axial-DeepLab, Wang et al. 2020, eq. 2): global attention
# costs O(N^2); a layer along every column, then one along every row, costs O(N (H + W)) and lets
# every output pixel see every input pixel. Along a line, pixel i attends to every pixel j:
#
#     y_i = sum_j softmax_j( (q_i . k_j + q_i . r_{j-i}) / sqrt(d) + b_{j-i} ) v_j.
#
# We keep the query-side position term q . r only (no key- and value-side terms, no batch-normed
# logits) and add a per-head bias b_{j-i} (ours, see `AxialSelfAttention`).

# %%
def axial_attention(q, k, v, rel, *, heads, axis, bias=None, weights=False):
    """One axial layer along columns ('height') or rows ('width'). q, k, v: (B, c, H, W); rel:
    (c, 2*span-1), bias: (h, 2*span-1), per offset -(span-1)..span-1. -> (B, c, H, W), or with
    weights=True the attention weights (B, h, L, L, M): head, query i, key j, line."""
    assert axis in ("height", "width"), f"axis must be 'height' or 'width', got {axis!r}"
    if axis == "width":                     # along a row = along a column of the transposed map
        q, k, v = (t.transpose(2, 3) for t in (q, k, v))
    B, c, L, M = q.shape                                                 # L along, M lines
    span, d = (rel.shape[-1] + 1) // 2, c // heads
    assert L <= span, f"axial layer built for maps up to {span} pixels, got {L}: use span >= {L}"
    assert c % heads == 0, f"{c} channels cannot be split into {heads} heads"
    pos = torch.arange(L, device=q.device)
    delta = pos[None, :] - pos[:, None] + span - 1                       # [i, j] -> index of j - i
    q = q.reshape(B, heads, d, L, M) * d ** -0.5
    logits = torch.einsum("bhdim,bhdjm->bhijm", q, k.reshape(B, heads, d, L, M))     # q_i . k_j
    logits = logits + torch.einsum("bhdim,hdij->bhijm", q, rel[:, delta].reshape(heads, d, L, L))
    if bias is not None:
        logits = logits + bias[:, delta][None, :, :, :, None]            # + b_{j-i}
    attn = logits.softmax(dim=3)                                         # (B, h, L, L, M)
    if weights:
        return attn
    out = torch.einsum("bhijm,bhdjm->bhdim", attn, v.reshape(B, heads, d, L, M))
    out = out.reshape(B, c, L, M)                                        # (B, h, d, L, M) -> ...
    return out.transpose(2, 3) if axis == "width" else out

# %% [markdown]
# ### Optional: a fast local attention
# `local_attention` copies keys and values K*K times (`unfold`); reading one shifted slice of the
# padded map per window cell gives the same sums faster on a CPU (`--bench`): training uses it,
# and a test shows it equals the reference, values and gradients.

# %%
def local_attention_fast(q, k, v, rel, *, heads):
    """local_attention (same maths), by shifted slices. q, k, v: (B, c, H, W) -> (B, c, H, W)."""
    B, c, H, W = q.shape
    K, d, p = rel.shape[-1], c // heads, rel.shape[-1] // 2
    cells = [(i, j) for i in range(K) for j in range(K)]                # raster order, as unfold
    q = q.reshape(B, heads, d, H, W) * d ** -0.5                         # (B, h, d, H, W)
    kp, vp = (F.pad(t, (p, p, p, p)).reshape(B, heads, d, H + 2 * p, W + 2 * p) for t in (k, v))
    content = torch.stack([(q * kp[..., i:i + H, j:j + W]).sum(2) for i, j in cells], 2)
    logits = content + torch.einsum("bhdyx,hdo->bhoyx", q, rel.reshape(heads, d, K * K))
    attn = logits.masked_fill(~inside_window(H, W, K, q.device), float("-inf")).softmax(dim=2)
    out = sum(attn[:, :, o, None] * vp[..., i:i + H, j:j + W] for o, (i, j) in enumerate(cells))
    return out.reshape(B, c, H, W)                                       # (B, h, d, H, W) -> ...

# %% [markdown]
# The attention layers end in an output projection W_o, as multi-head attention does (ours:
# SASA and Axial-DeepLab in a bottleneck have none). With Multi-head Sharing (section 4) a narrow
# layer's channels come out in head order; W_o maps them back to the next 1x1 conv's order.

# %%
class LocalSelfAttention(nn.Module):
    """SASA local self-attention: q, k, v from one 1x1 conv, K x K windows, then W_o.
    fast=False runs the reference form (`--bench` times both)."""

    def __init__(self, dim, *, heads, window, rel_std=0.1, fast=True):
        super().__init__()
        assert dim % heads == 0 and window % 2, "need dim % heads == 0 and an odd window"
        self.heads, self.fast = heads, fast
        self.qkv = nn.Conv2d(dim, 3 * dim, 1, bias=False)                # rows [W_q; W_k; W_v]
        self.rel = nn.Parameter(torch.randn(dim, window, window) * rel_std)  # r per offset
        self.proj = nn.Conv2d(dim, dim, 1, bias=False)                    # W_o

    def forward(self, x, heads=None):                                     # (B, c, H, W) -> same
        attend = local_attention_fast if self.fast else local_attention
        return self.proj(attend(*self.qkv(x).chunk(3, dim=1), self.rel, heads=heads or self.heads))

class AxialSelfAttention(nn.Module):
    """Global self-attention as a height-axis layer, then a width-axis layer, then W_o. The bias
    b_{j-i} (ours) starts at -locality (j - i)^2: at initialisation q.k and q.r are ~0, so without
    it a layer starts as the MEAN of its column or row and wipes out each pixel's own features
    (q.r, multiplied by the query, cannot prefer near pixels for every query). The bias starts it
    as a 3-tap smoothing, ~half the weight on the pixel itself; locality=0: the uniform start."""

    def __init__(self, dim, *, heads, span, locality=1.0, rel_std=0.1):
        super().__init__()
        assert dim % heads == 0, f"dim {dim} must be divisible by heads {heads}"
        self.heads = heads
        offsets = torch.arange(-(span - 1), span, dtype=torch.float32)   # j - i
        self.qkv_h, self.qkv_w = (nn.Conv2d(dim, 3 * dim, 1, bias=False) for _ in range(2))
        self.rel_h, self.rel_w = (nn.Parameter(torch.randn(dim, 2 * span - 1) * rel_std)
                                  for _ in range(2))                      # r_{j-i} per channel
        self.rel_bias_h, self.rel_bias_w = (nn.Parameter(-locality * offsets.square().repeat(
            heads, 1)) for _ in range(2))                                 # b_{j-i}: (h, 2span-1)
        self.proj = nn.Conv2d(dim, dim, 1, bias=False)                    # W_o

    def forward(self, x, heads=None):                                     # (B, c, H, W) -> same
        h = heads or self.heads
        x = axial_attention(*self.qkv_h(x).chunk(3, dim=1), self.rel_h, heads=h, axis="height",
                            bias=self.rel_bias_h)
        x = axial_attention(*self.qkv_w(x).chunk(3, dim=1), self.rel_w, heads=h, axis="width",
                            bias=self.rel_bias_w)
        return self.proj(x)

# %% [markdown]
# ## 2. The search space: one operator per block
# TrioNet searches at two levels (sec. 3.1): per block an operator type, then its architecture
# (kernel or window, width, heads). The block is a ResNet bottleneck whose 3x3 conv is the
# searched operator: 1x1 reduce (C -> c), operator (c -> c), 1x1 expand (c -> C), plus the
# shortcut. A `Choice` names one block's candidate; a config is one Choice per block.

# %%
class Choice(NamedTuple):
    """op; size: kernel or window (0: axial, global); width: middle channels c; heads h."""
    op: str
    size: int
    width: int
    heads: int

    def __str__(self):
        name = {"conv": f"conv{self.size}", "local": f"local{self.size}", "axial": "axial"}
        return name[self.op] + f"-c{self.width}" + (f"h{self.heads}" if self.op != "conv" else "")

class TrioBlock(nn.Module):
    """1x1 reduce -> operator -> 1x1 expand, + shortcut. A stage's first block pools 2x2 at its
    input (attention models pool instead of striding): all operators of a stage see one size."""

    def __init__(self, in_channels, out_channels, *, choice, resolution, downsample):
        super().__init__()
        c, self.downsample = choice.width, downsample
        self.reduce, self.bn_reduce = nn.Conv2d(in_channels, c, 1, bias=False), nn.BatchNorm2d(c)
        if choice.op == "conv":
            self.op = nn.Conv2d(c, c, choice.size, padding=choice.size // 2, bias=False)
        elif choice.op == "local":
            self.op = LocalSelfAttention(c, heads=choice.heads, window=choice.size)
        else:
            self.op = AxialSelfAttention(c, heads=choice.heads, span=resolution)
        self.bn_op, self.bn_out = nn.BatchNorm2d(c), nn.BatchNorm2d(out_channels)
        self.expand = nn.Conv2d(c, out_channels, 1, bias=False)
        self.shortcut = nn.Identity() if in_channels == out_channels else nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x):                                   # (B, C_in, ., .) -> (B, C_out, R, R)
        x = F.avg_pool2d(x, 2) if self.downsample else x
        y = F.relu(self.bn_reduce(self.reduce(x)))                        # (B, c, R, R)
        y = F.relu(self.bn_op(self.op(y)))
        return F.relu(self.bn_out(self.expand(y)) + self.shortcut(x))    # (B, C_out, R, R)

# %% [markdown]
# `SearchSpace` lists each block's candidates per type: kernels, windows (axial is global),
# widths, and head counts where a head can shrink to them (section 4): h divides c and
# d = c / h <= d_max = c_max / h_max. FLOPs are counted analytically (2 per multiply-add, as
# torch's FlopCounterMode counts the reference forms; a test checks it).

# %%
class SearchSpace:
    """Per block {op: [Choice, ...]}; widths = round(ratio * c_max), c_max = mid_channels[stage]."""

    def __init__(self, *, image_size, stem_channels, stage_channels, mid_channels, depths,
                 max_heads, head_choices, width_ratios, conv_kernels, local_windows,
                 ops=("conv", "local", "axial")):
        assert image_size % 4 == 0, f"--image-size {image_size} must be divisible by 4 (2 pools)"
        assert len(stage_channels) == len(depths) == 3 and min(depths), "3 stages, >= 1 block"
        stages = [(s, i) for s, n in enumerate(depths) for i in range(n)]
        cins = [stem_channels] + [stage_channels[s] for s, _ in stages]
        # (in_channels, out_channels, resolution, downsample) per block: stages at S, S/2, S/4 px
        self.layout = [(cins[b], cins[b + 1], image_size >> s, s > 0 and i == 0)
                       for b, (s, i) in enumerate(stages)]
        self.image_size, self.stem_channels, self.max_heads = image_size, stem_channels, max_heads
        self.stage_channels, self.ops = tuple(stage_channels), tuple(ops)
        assert self.ops and set(ops) <= {"conv", "local", "axial"}, f"unknown ops in {ops}"
        assert len(mid_channels) == 3, "give one widest middle width per stage (3 values)"
        assert all(k % 2 for k in (*conv_kernels, *local_windows)), "kernels/windows must be odd"
        assert max(head_choices) <= max_heads, f"head choices {head_choices} > {max_heads} heads"
        self.mid, self.candidates = [], []
        for s, _ in stages:
            cmax = mid_channels[s]
            assert cmax % max_heads == 0, f"middle width {cmax} must be divisible by max_heads " \
                                          f"{max_heads}"
            widths = sorted({round(ratio * cmax) for ratio in width_ratios})
            assert all(0 < w <= cmax for w in widths), f"width ratios {width_ratios} not in (0, 1]"
            attn = [(w, h) for w in widths for h in sorted(head_choices)      # fewest heads first
                    if w % h == 0 and w // h <= cmax // max_heads]
            for w in set(widths) - {w for w, _ in attn}:
                raise AssertionError(f"width {w} fits no head choice {head_choices} (needs w % h "
                                     f"== 0 and w / h <= {cmax // max_heads})")
            every = {"conv": [Choice("conv", k, w, 1) for k in sorted(conv_kernels)
                              for w in widths],
                     "local": [Choice("local", k, w, h) for k in sorted(local_windows)
                               for w, h in attn],
                     "axial": [Choice("axial", 0, w, h) for w, h in attn]}
            self.mid.append(cmax)
            self.candidates.append({op: every[op] for op in self.ops})
        self.max_kernel, self.max_window = max(conv_kernels), max(local_windows)
        self.num_blocks = len(self.layout)

    def check(self, config):
        """Raise ValueError, saying what is wrong, if `config` is not in the space."""
        if len(config) != self.num_blocks:
            raise ValueError(f"config has {len(config)} blocks, the space has {self.num_blocks}")
        for b, ch in enumerate(config):
            if ch not in self.candidates[b].get(getattr(ch, "op", None), ()):
                ok = ", ".join(str(c) for cs in self.candidates[b].values() for c in cs)
                raise ValueError(f"block {b}: {ch!r} is not a candidate; the candidates are: {ok}")

    def block_flops(self, b, ch):
        """Forward FLOPs of block b (1 multiply-add = 2 FLOPs)."""
        cin, cout, r, _ = self.layout[b]
        c, n = ch.width, r * r
        f = 2 * n * (cin * c + c * cout + (cin * cout if cin != cout else 0))  # 1x1s, shortcut
        if ch.op == "conv":
            return f + 2 * n * c * c * ch.size ** 2
        if ch.op == "local":   # W_q,k,v and W_o; then q.(k + r) and a.v over K*K window cells
            return f + 2 * n * (4 * c * c + 2 * c * ch.size ** 2)
        # two axial layers (W_q,k,v; q.k and q.r logits, a.v along R pixels), then W_o
        return f + 2 * n * (2 * (3 * c * c + 3 * c * r) + c * c)

    def flops(self, config, num_classes=10):
        stem, fc = 2 * 27 * self.stem_channels * self.image_size ** 2, 2 * self.stage_channels[-1]
        return stem + sum(self.block_flops(b, ch) for b, ch in enumerate(config)) + fc * num_classes

    def resnet_config(self):
        """The plain ResNet of the space (smallest conv kernel, full width): the search's budget."""
        k = min(c.size for c in self.candidates[0]["conv"])
        return tuple(Choice("conv", k, self.mid[b], 1) for b in range(self.num_blocks))

    def build(self, config, num_classes):
        """The stand-alone TrioNet of `config`: stem, one TrioBlock per block, pool, linear."""
        self.check(config)
        return nn.Sequential(
            nn.Conv2d(3, self.stem_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(self.stem_channels), nn.ReLU(),
            *(TrioBlock(cin, cout, choice=ch, resolution=r, downsample=ds)
              for ch, (cin, cout, r, ds) in zip(config, self.layout)),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(self.stage_channels[-1], num_classes))

# The space --quick searches and the demos draw: 16 px images, one block per stage; per block
# 6 conv candidates (2 kernels x 3 widths), 8 local (2 windows x 4 (width, heads)), 4 axial.
QUICK_SPACE = dict(image_size=16, stem_channels=16, stage_channels=(32, 64, 128),
                   mid_channels=(8, 16, 32), depths=(1, 1, 1), max_heads=2, head_choices=(1, 2),
                   width_ratios=(0.5, 0.75, 1.0), conv_kernels=(3, 5), local_windows=(3, 5))

# %% [markdown]
# ## 3. Hierarchical Sampling and the sandwich rule (sec. 3.2)
# "In order to effectively search in this huge architecture space, we propose Hierarchical
# Sampling for better training of the supernet" (abstract). Uniform draws from the flat list of
# candidates pick a type in proportion to its candidates, so the type with the most (here local
# attention: windows x widths x heads) trains most. Hierarchical Sampling draws the TYPE first:
#
#     hierarchical  P(type) = 1 / 3              flat  P(type) = |C_type| / |C|
#
# Training follows the sandwich rule (BigNAS): each step sums the gradients of the largest, the
# smallest and n random sub-networks. We sample the operator assignment FIRST and take the ends
# WITHIN it, so every trained sub-network follows the sampler. Attention FLOPs do not depend on
# the heads, so head counts tie; ties go to a random one (the first, fewest heads, would make the
# smallest end a 1-head layer every time, where both sharing schemes of section 4 agree).

# %%
def _randint(n, generator):
    return int(torch.randint(n, (1,), generator=generator))

def sample_ops(space, generator, scheme="hierarchical"):
    """One type per block: uniformly ('hierarchical'), or as a flat-list candidate's ('flat')."""
    if scheme not in ("hierarchical", "flat"):
        raise ValueError(f"scheme must be 'hierarchical' or 'flat', got {scheme!r}")
    types = [space.ops if scheme == "hierarchical" else [op for op in space.ops for _ in c[op]]
             for c in space.candidates]
    return tuple(t[_randint(len(t), generator)] for t in types)

def sample_candidates(space, ops, generator):
    """Given each block's type, one of its candidates, uniformly (architecture level)."""
    return tuple(space.candidates[b][op][_randint(len(space.candidates[b][op]), generator)]
                 for b, op in enumerate(ops))

def sample_config(space, generator, scheme="hierarchical"):
    return sample_candidates(space, sample_ops(space, generator, scheme), generator)

def extreme(space, ops, *, largest, generator=None):
    """Per block, type ops[b]'s candidate with the most (fewest) FLOPs; ties: random or first."""
    config = []
    for b, op in enumerate(ops):
        flops = {c: space.block_flops(b, c) for c in space.candidates[b][op]}
        tied = [c for c, f in flops.items() if f == (max if largest else min)(flops.values())]
        config.append(tied[_randint(len(tied), generator)] if generator else tied[0])
    return tuple(config)

def sandwich_configs(space, generator, *, scheme, n_random, ties="random"):
    """One step's sub-networks: an assignment, then its largest, smallest and n_random random."""
    ops, tie_gen = sample_ops(space, generator, scheme), generator if ties == "random" else None
    return [extreme(space, ops, largest=True, generator=tie_gen),
            extreme(space, ops, largest=False, generator=tie_gen)] + \
        [sample_candidates(space, ops, generator) for _ in range(n_random)]

def replay(space, *, seed, steps, scheme, n_random, ties="random"):
    """The sub-networks `sandwich_step_fn` trains with this seed, in order (same generator)."""
    g = torch.Generator().manual_seed(seed)
    return [cfg for _ in range(steps)
            for cfg in sandwich_configs(space, g, scheme=scheme, n_random=n_random, ties=ties)]

def type_probs(space, scheme):
    """P(type) under a sampler, averaged over blocks."""
    return {op: float(np.mean([1 / len(space.ops) if scheme == "hierarchical" else
                               len(c[op]) / sum(map(len, c.values())) for c in space.candidates]))
            for op in space.ops}

COLOURS = {"conv": "#4C72B0", "local": "#55A868", "axial": "#C44E52"}

def demo_sampling(steps=1000):
    """Hierarchical vs flat sampling: the operator types the sandwich rule trains in the quick
    space, replayed (no training), as two histograms."""
    space, out = SearchSpace(**QUICK_SPACE), {}
    fig = Figure(figsize=(8, 2.8))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, scheme in zip(axes, ("hierarchical", "flat")):
        got = Counter(ch.op for cfg in replay(space, seed=0, steps=steps, scheme=scheme,
                                              n_random=1) for ch in cfg)
        mix, p = {op: got[op] / sum(got.values()) for op in space.ops}, type_probs(space, scheme)
        out[scheme] = mix
        ax.bar(space.ops, [100 * mix[op] for op in space.ops], color=list(COLOURS.values()))
        ax.scatter(space.ops, [100 * p[op] for op in space.ops], marker="_", s=900, color="k",
                   label="P(type) of the sampler")
        ax.set_title(f"{scheme} sampling", fontsize=10)
        print(f"  {scheme:12s}: trained " + ", ".join(f"{op} {100 * mix[op]:.1f}% (P = "
                                                       f"{100 * p[op]:.1f}%)" for op in space.ops))
    axes[0].set_ylabel(f"% of trained blocks, {steps} steps"), axes[0].legend(fontsize=8)
    utils.show(fig, "demo_sampling")
    return out

if utils.in_notebook():
    demo_sampling()

# %% [markdown]
# ## 4. The supernet and Multi-head Sharing (sec. 3.3)
# The supernet holds the widest weights of every type; a sub-network runs a slice of them (its
# "inherited weights"). Types never share weights; within a type a smaller kernel or window takes
# the CENTRE of the largest, a narrower layer a subset of the channels. Which subset? "We propose
# a novel weight-sharing strategy, Multi-head Sharing, specifically for multi-head self-attention
# operators" (abstract). The widest layer has h_max heads of d_max channels, head i owning
# channels [i d_max, (i+1) d_max). A narrow layer's head i takes
#
#     multi-head: channels i * d_max + s,   s = 0 .. d-1   (the leading d of supernet head i)
#     plain:      channels i * d + s                        (the first h d, cut into heads)
#
# With Multi-head Sharing a channel always serves the same head; with plain sharing channel 4 is
# in head 1 of a (16 channels, 4 heads) layer, in head 2 of an (8, 4) one. They agree when
# d = d_max or h = 1. Only the attention's own channels are indexed so (rows of W_q, W_k, W_v and
# the position tables, columns of W_o); the 1x1 convs around it use their first c channels.

# %%
def channel_index(choice, *, max_width, max_heads, sharing):
    """Which of the supernet's `max_width` attention channels a sub-layer uses, in its order."""
    c, h = choice.width, choice.heads
    if choice.op == "conv" or sharing == "plain":
        return torch.arange(c)
    assert sharing == "multihead", f"sharing must be 'multihead' or 'plain', got {sharing!r}"
    d, d_max = c // h, max_width // max_heads
    assert c % h == 0 and d <= d_max and h <= max_heads, \
        f"{choice}: {h} heads of {d} channels do not fit in {max_heads} heads of {d_max}"
    return (torch.arange(h)[:, None] * d_max + torch.arange(d)[None, :]).flatten()  # (h*d,)

def sharing_differs(choice, *, max_width, max_heads):
    """Whether Multi-head and plain sharing give this choice different channels (a test checks
    it against channel_index): attention with several heads narrower than d_max."""
    return choice.op != "conv" and 1 < choice.heads and choice.width < choice.heads * (
        max_width // max_heads)

def head_mix(space, configs):
    """Of the attention blocks in `configs`: the share of each head count, and the share whose
    channels differ between the two sharing schemes."""
    attn = [(b, ch) for cfg in configs for b, ch in enumerate(cfg) if ch.op != "conv"]
    heads, n = Counter(ch.heads for _, ch in attn), max(len(attn), 1)
    differs = sum(sharing_differs(ch, max_width=space.mid[b], max_heads=space.max_heads)
                  for b, ch in attn)
    return {"heads": {h: heads[h] / n for h in sorted(heads)}, "differs": differs / n,
            "n": len(attn)}

def sliced_batch_norm(x, bn):
    """BatchNorm over the FIRST x.shape[1] channels of a wider BatchNorm2d; only their running
    statistics update (F.batch_norm updates the copies it is given: they are written back)."""
    c, momentum = x.shape[1], bn.momentum
    mean, var = bn.running_mean[:c].clone(), bn.running_var[:c].clone()
    if bn.training:
        bn.num_batches_tracked += 1
        if momentum is None:       # cumulative average: re-estimating one sub-network's statistics
            momentum = 1.0 / float(bn.num_batches_tracked)
    y = F.batch_norm(x, mean, var, bn.weight[:c], bn.bias[:c], bn.training, momentum, bn.eps)
    if bn.training:
        with torch.no_grad():
            bn.running_mean[:c], bn.running_var[:c] = mean, var
    return y

class SuperBlock(nn.Module):
    """TrioBlock with weight sharing: the widest weights of each type in `ops`, sliced per Choice;
    1x1 convs and shortcut shared by all types, a BatchNorm per type after the operator."""

    def __init__(self, in_channels, out_channels, *, mid, resolution, downsample, max_heads,
                 max_kernel, max_window, ops):
        super().__init__()
        self.mid, self.max_heads, self.downsample = mid, max_heads, downsample
        self.reduce = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn_reduce = nn.BatchNorm2d(mid)
        if "conv" in ops:
            self.conv = nn.Conv2d(mid, mid, max_kernel, bias=False)      # only .weight is used
        if "local" in ops:
            self.local = LocalSelfAttention(mid, heads=max_heads, window=max_window)
        if "axial" in ops:
            self.axial = AxialSelfAttention(mid, heads=max_heads, span=resolution)
        self.bn_op = nn.ModuleDict({op: nn.BatchNorm2d(mid) for op in ops})
        self.expand = nn.Conv2d(mid, out_channels, 1, bias=False)
        self.bn_out = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity() if in_channels == out_channels else nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))

    def sliced_weights(self, choice, sharing):
        """{name in the stand-alone layer: slice of the widest weight} for `choice`."""
        c, mid, size = choice.width, self.mid, choice.size
        if choice.op == "conv":
            o = (self.conv.weight.shape[-1] - size) // 2                 # the centre K x K
            return {"weight": self.conv.weight[:c, :c, o:o + size, o:o + size]}
        idx = channel_index(choice, max_width=mid, max_heads=self.max_heads, sharing=sharing)
        idx, first = idx.to(self.reduce.weight.device), torch.arange(c, device=idx.device)

        def qkv(w, cols):   # rows idx of each of W_q, W_k, W_v; input columns cols: (3c, ., 1, 1)
            return w.view(3, mid, mid)[:, idx][:, :, cols].reshape(3 * c, len(cols), 1, 1)
        if choice.op == "local":
            att, o = self.local, (self.local.rel.shape[-1] - size) // 2
            return {"qkv.weight": qkv(att.qkv.weight, first),            # reads the 1x1 reduce
                    "rel": att.rel[idx][:, o:o + size, o:o + size],
                    "proj.weight": att.proj.weight[:c][:, idx]}          # W_o: idx -> first c
        att = self.axial                 # the width layer reads the height layer's channels idx
        return {"qkv_h.weight": qkv(att.qkv_h.weight, first), "rel_h": att.rel_h[idx],
                "qkv_w.weight": qkv(att.qkv_w.weight, idx), "rel_w": att.rel_w[idx],
                "rel_bias_h": att.rel_bias_h[:choice.heads],             # head i: bias row i
                "rel_bias_w": att.rel_bias_w[:choice.heads],
                "proj.weight": att.proj.weight[:c][:, idx]}

    def operator(self, y, choice, sharing):                              # (B, c, R, R) -> same
        """The stand-alone layer's own forward, run on the sliced (inherited) weights."""
        w = self.sliced_weights(choice, sharing)
        if choice.op == "conv":
            return F.conv2d(y, w["weight"], padding=choice.size // 2)
        layer = self.local if choice.op == "local" else self.axial
        return torch.func.functional_call(layer, w, (y,), {"heads": choice.heads})

    def forward(self, x, choice, sharing):
        c, x = choice.width, F.avg_pool2d(x, 2) if self.downsample else x
        y = F.relu(sliced_batch_norm(F.conv2d(x, self.reduce.weight[:c]), self.bn_reduce))
        y = F.relu(sliced_batch_norm(self.operator(y, choice, sharing), self.bn_op[choice.op]))
        y = self.bn_out(F.conv2d(y, self.expand.weight[:, :c]))         # (B, C_out, R, R)
        return F.relu(y + self.shortcut(x))

class TrioNetSupernet(nn.Module):
    """Every sub-network of a SearchSpace in one set of weights; forward(x, config) runs one."""

    def __init__(self, space, *, num_classes, sharing="multihead"):
        super().__init__()
        assert sharing in ("multihead", "plain"), f"sharing {sharing!r}: 'multihead' or 'plain'"
        self.space, self.sharing = space, sharing
        self.stem = nn.Sequential(nn.Conv2d(3, space.stem_channels, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(space.stem_channels), nn.ReLU())
        self.blocks = nn.ModuleList(
            SuperBlock(cin, cout, mid=m, resolution=r, downsample=ds, max_heads=space.max_heads,
                       max_kernel=space.max_kernel, max_window=space.max_window, ops=space.ops)
            for m, (cin, cout, r, ds) in zip(space.mid, space.layout))
        self.fc = nn.Linear(space.stage_channels[-1], num_classes)

    def forward(self, x, config):                                         # (B, 3, S, S) -> (B, n)
        self.space.check(config)
        x = self.stem(x)
        for block, choice in zip(self.blocks, config):
            x = block(x, choice, self.sharing)
        return self.fc(x.mean((2, 3)))

def demo_sharing():
    """Which supernet channels a narrow attention layer's heads take (16 channels in 4 heads of
    d_max = 4) under Multi-head and plain sharing, drawn."""
    from matplotlib.colors import ListedColormap
    rows = [(Choice("local", 3, w, h), s) for w, h in ((8, 4), (12, 4), (8, 2))
            for s in ("multihead", "plain")]
    taken, out = np.zeros((len(rows), 16)), {}            # 0: unused, else 1 + the narrow head
    for r, (ch, sharing) in enumerate(rows):
        idx = channel_index(ch, max_width=16, max_heads=4, sharing=sharing)
        head = torch.arange(len(idx)) // (ch.width // ch.heads)        # idx[n] serves head[n]
        taken[r, idx] = 1 + head.numpy()
        out[f"c={ch.width} h={ch.heads} {sharing}"] = 100 * (idx // 4 == head).float().mean().item()
        print(f"  c={ch.width:2d} h={ch.heads} {sharing:9s}: channels {idx.tolist()}: "
              f"{out[f'c={ch.width} h={ch.heads} {sharing}']:.0f}% in supernet head i")
    fig = Figure(figsize=(8, 3))
    ax = fig.subplots()
    ax.imshow(taken, cmap=ListedColormap(["#eeeeee", *COLOURS.values(), "#8172B3"]), vmin=0,
              vmax=4)
    ax.set_yticks(range(len(rows)), [f"c={c.width}, h={c.heads}, {s}" for c, s in rows])
    ax.set_xticks([1.5, 5.5, 9.5, 13.5], [f"supernet head {i}" for i in range(4)])
    for x in (3.5, 7.5, 11.5):
        ax.axvline(x, color="k", lw=1)
    ax.set_title("the 16 supernet channels each narrow head i takes (colour: i)", fontsize=9)
    utils.show(fig, "demo_sharing")
    return out

if utils.in_notebook():
    demo_sharing()

# %% [markdown]
# ## 5. Training the supernet, then searching it
# A sandwich step sums the gradients of `sandwich_configs`' sub-networks, then steps once. The
# trained supernet scores a sub-network with inherited weights on a VALIDATION split carved from
# the training images, after re-estimating its BatchNorm statistics (BigNAS, OFA). Evolution (as
# in SPOS, OFA) keeps the best configs seen and breeds children by crossover and mutation under
# a FLOPs budget (the space's plain ResNet). The winner is retrained from scratch; its search
# score is the best of many noisy scores (optimistic), so it is never compared with anything.

# %%
def sandwich_step_fn(space, *, scheme, n_random, generator, ties="random", label_smoothing=0.1):
    """utils.train step_fn: sums the gradients of one sandwich_configs draw on the batch."""
    def step(model, x, y):
        out = None
        for cfg in sandwich_configs(space, generator, scheme=scheme, n_random=n_random, ties=ties):
            with utils.autocast(x.device):
                logits = model(x, cfg)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
            loss.backward()
            out = out or (loss.detach(), logits.detach())
        return out
    return step

@torch.no_grad()
def inherited_score(supernet, config, val_loader, calib_loader):
    """utils.Score (accuracy %, NLL) of a sub-network with inherited weights, after resetting the
    BatchNorm statistics and averaging its own batch statistics over calib_loader."""
    bns = [m for m in supernet.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None                                               # cumulative average
    supernet.train()
    for x, _ in calib_loader:
        supernet(x, config)
    for bn in bns:
        bn.momentum = 0.1                                                # PyTorch's default
    return utils.evaluate(supernet, val_loader, forward=lambda model, x: model(x, config))

def evolutionary_search(space, fitness, *, budget, population, generations, parents, mutate_prob,
                        generator, num_classes=10):
    """Maximise fitness(config) under `budget` FLOPs: children mutate one of the `parents` best
    configs seen (every other one a crossover of two); children over budget or already scored
    are redrawn. -> (best config, {config: score} in scoring order)."""
    scores = {}

    def coin(p):
        return torch.rand(1, generator=generator).item() < p

    def child(i, top):
        a, b = top[_randint(len(top), generator)], top[_randint(len(top), generator)]
        a = tuple(x if coin(0.5) else y for x, y in zip(a, b)) if i % 2 else a   # crossover
        fresh = sample_config(space, generator)                          # mutation
        return tuple(f if coin(mutate_prob) else ch for f, ch in zip(fresh, a))

    pop, top = [], None
    for gen in range(generations):
        while len(pop) < population:
            for _ in range(2000):
                c = sample_config(space, generator) if top is None else child(len(pop), top)
                if space.flops(c, num_classes) <= budget and c not in scores and c not in pop:
                    break
            else:
                raise RuntimeError(f"no new config under {budget / 1e6:.2f} MFLOPs: raise it")
            pop.append(c)
        scores.update((c, fitness(c)) for c in pop)
        top, pop = sorted(scores, key=scores.get, reverse=True)[:parents], []
    return top[0], scores

def draw_blocks(ax, space, config, row=0.0, label=""):
    """A network as its block sequence: one box per searched block, coloured by operator."""
    for b, ch in enumerate(config):
        ax.add_patch(Rectangle((b, row), 0.94, 0.8, color=COLOURS[ch.op]))
        ax.text(b + 0.47, row + 0.4, f"{ch}\n{space.layout[b][2]} px", ha="center", va="center",
                color="white", fontsize=7)
    ax.text(-0.1, row + 0.4, label, ha="right", va="center", fontsize=8)

def demo_search():
    """The search on a fitness with a known optimum: the number of blocks (of 6) equal to a
    hidden target config under the budget."""
    space = SearchSpace(**{**QUICK_SPACE, "depths": (2, 2, 2)})
    budget, g = space.flops(space.resnet_config()), torch.Generator().manual_seed(7)
    target = next(c for c in (sample_config(space, g) for _ in range(1000))
                  if space.flops(c) <= 0.8 * budget)

    def fitness(c):
        return float(sum(a == b for a, b in zip(c, target)))
    best, scores = evolutionary_search(space, fitness, budget=budget, population=16,
                                       generations=30, parents=4, mutate_prob=0.3,
                                       generator=torch.Generator().manual_seed(0))
    fig = Figure(figsize=(8, 1.7))
    ax = fig.subplots()
    for r, (name, c) in enumerate((("hidden target", target), ("evolution found", best))):
        draw_blocks(ax, space, c, row=-r, label=f"{name}\n{space.flops(c) / 1e6:.2f} MFLOPs")
    ax.set_xlim(-2.2, space.num_blocks), ax.set_ylim(-1.1, 0.9), ax.axis("off")
    utils.show(fig, "demo_search")
    print(f"  budget {budget / 1e6:.2f} MFLOPs; evolution found the target: {best == target} "
          f"({len(scores)} of {math.prod(sum(map(len, c.values())) for c in space.candidates):,} "
          f"configs scored)")
    return {"found_target": best == target, "scored": len(scores)}

if utils.in_notebook():
    demo_search()

# %% [markdown]
# ## Exercises
# 1. **Flat sampling.** Give `demo_sampling`'s space a third window (`local_windows=(3, 5, 7)`)
#    and predict both trained mixes first. Expect hierarchical 1/3 each still, flat 6/22, 12/22,
#    4/22 = 27/55/18% (conv/local/axial): each window takes training from the other two types.
# 2. **The FLOPs budget of all-axial.** In `SearchSpace(**QUICK_SPACE)` compare the budget,
#    `space.flops(space.resnet_config())`, with the widest all-axial net's FLOPs
#    (`tuple(c["axial"][-1] for c in space.candidates)`). Expect 2.48 vs 2.80 MFLOPs: the search
#    never scores it, as attention along a 16-pixel column costs more than a 3x3 conv.
# 3. **Remove the sandwich rule.** Train random members only (no ends, `n_random=3`) and count
#    with `replay` the steps that train the widest candidate in every block: every step with the
#    sandwich rule, about 1 in 55 without it. The largest sub-network's inherited score lags.
# 4. **Ties.** `head_mix(space, replay(..., ties="first"))` in the quick space: expect the 1-head
#    share of attention training to rise from 25% to 42% (the smallest end is always 1 head)
#    and the share where the two sharing schemes differ to fall from 33% to 16%.

# %% [markdown]
# ---
# # The lab
# Presets and flags, then one `exp_*` per claim (`--experiment`), each writing runs/05_trionet_
# search/<experiment>.json and .png. Arms of one seed share the data, batches, the initial value
# of every weight they share and the sampled sub-networks' seed; `utils.compare_paired` compares
# their per-seed differences. Nothing is chosen on the test split.

# %%
PRESETS = {
    # quick: 2 CPU cores; per class 250 training and 200 validation images (carved from the
    # training split); the full 10,000-image test split
    "quick": dict(**QUICK_SPACE, sharing_mid_channels=(16, 16, 32), sharing_max_heads=4,
                  sharing_head_choices=(2, 4), sharing_width_ratios=(0.25, 0.75, 1.0),
                  sharing_local_windows=(3,), train_per_class=250, val_per_class=200,
                  test_per_class=None, batch_size=64, lr=3e-3, supernet_epochs=3,
                  standalone_epochs=8, n_random=1, calib_batches=4, seeds=8, replicates=5, probes=3,
                  population=10, generations=4, parents=4, mutate_prob=0.3, margin=2.0,
                  margin_nll=0.05, workers=2, threads=1),
    # full: CIFAR-10 at 32 px, two searched blocks per stage; one GPU (not measured)
    "full": dict(image_size=32, stem_channels=32, stage_channels=(64, 128, 256),
                 mid_channels=(32, 64, 128), depths=(2, 2, 2), max_heads=8, head_choices=(4, 8),
                 width_ratios=(0.5, 0.75, 1.0), conv_kernels=(3, 5), local_windows=(3, 5, 7),
                 sharing_mid_channels=(32, 64, 128), sharing_max_heads=8,
                 sharing_head_choices=(4, 8), sharing_width_ratios=(0.25, 0.75, 1.0),
                 sharing_local_windows=(3, 5, 7), train_per_class=None, val_per_class=500,
                 test_per_class=None, batch_size=128, lr=2e-3, supernet_epochs=100, seeds=5,
                 standalone_epochs=100, n_random=2, calib_batches=8, replicates=5, probes=8,
                 population=32, generations=10, parents=8, mutate_prob=0.2, margin=1.0,
                 margin_nll=0.02, workers=1, threads=None)}
SHARED = ("mid_channels", "max_heads", "head_choices", "width_ratios", "local_windows")
FLAGS = {"stem_channels": "stem width", "stage_channels": "block output channels per stage",
         "mid_channels": "c_max, the widest middle width per stage", "depths": "blocks per stage",
         "max_heads": "heads of the widest attention layer", "head_choices": "head counts",
         "width_ratios": "widths = ratio x c_max", "conv_kernels": "conv kernels (odd)",
         "local_windows": "local windows (odd)", "batch_size": "training batch",
         **{f"sharing_{k}": f"the sharing experiment's {k.replace('_', ' ')}" for k in SHARED},
         "lr": "peak AdamW learning rate", "supernet_epochs": "epochs per supernet",
         "standalone_epochs": "epochs per retrained net", "calib_batches": "batches that "
         "re-estimate a sub-network's BatchNorm statistics", "n_random": (
             "sandwich: random sub-networks per step", utils.nonneg_int),
         "seeds": "paired supernet seeds of the sharing experiment", "replicates": "search "
         "replicates (seeds): supernet, search, retraining", "probes": "sharing: sub-networks "
         "scored", "population": "search population", "generations": "search generations",
         "parents": "search: configs kept as parents", "mutate_prob": "search: P(block resampled)",
         "margin": "'matches' margin, accuracy points", "margin_nll": "'matches' margin, nats"}
EXPERIMENTS = ("sharing", "search")

def check(args):
    """Settings that do not fit together: one line, exit 2."""
    for bad, why in ((not args.val_per_class, "--val-per-class 0 leaves no validation split; the "
                      "search and the choice of the best operator need one: use >= 1"),
                     (args.parents > args.population, "--parents must not exceed --population"),
                     (args.mutate_prob > 1, f"--mutate-prob {args.mutate_prob} must be <= 1"),
                     (min(args.seeds, args.replicates) < 2, "--seeds and --replicates must be "
                      ">= 2: an interval needs two pairs")):
        if bad:
            raise utils.InputError(why)
    try:
        space_from_args(args), space_from_args(args, sharing=True)
    except AssertionError as e:
        raise utils.InputError(str(e)) from None

def space_from_args(args, sharing=False):
    """The main search space, or the attention-only space of the sharing experiment."""
    kw = {k: getattr(args, ("sharing_" if sharing and k in SHARED else "") + k) for k in
          ("image_size", "stem_channels", "stage_channels", "depths", "conv_kernels") + SHARED}
    return SearchSpace(**kw, ops=("local", "axial") if sharing else ("conv", "local", "axial"))

def single_operator_config(space, op, budget, num_classes=10):
    """The all-`op` net (the same candidate in every block) with the most FLOPs under budget."""
    nets = [tuple(c[op][i] for c in space.candidates) for i in range(len(space.candidates[0][op]))]
    fits = [c for c in nets if space.flops(c, num_classes) <= budget] or nets[:1]
    return max(fits, key=lambda c: space.flops(c, num_classes))

def loaders(args, data, device, seed):
    """Seeded train, val and test loaders, and a fixed calibration set (calib_batches training
    batches, not augmented) that re-estimates a sub-network's BatchNorm statistics."""
    pick = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(seed))
    pick = pick[:args.calib_batches * args.batch_size]
    return (*utils.make_loaders(data, batch_size=args.batch_size, device=device, seed=seed),
            utils.DeviceLoader(data.x_train[pick], data.y_train[pick], batch_size=args.batch_size,
                               train=False, device=device, mean=data.mean, std=data.std))

# %%
# Jobs for utils.run_jobs: each seeds all it uses (weights, batches, sampled sub-networks) and
# returns numbers, so results do not depend on --workers or on what ran before.
def supernet_job(args, data, seed, *, sharing, which="main", probes=(), search=False):
    """Train a supernet; score each group of probe configs with inherited weights on validation;
    search it if asked (fitness: inherited validation accuracy)."""
    device, t0 = utils.get_device(args.device), time.time()
    space = space_from_args(args, sharing=which == "sharing")
    utils.set_seed(seed)
    net = TrioNetSupernet(space, num_classes=data.num_classes, sharing=sharing).to(device)
    train, val, _, calib = loaders(args, data, device, seed)
    step = sandwich_step_fn(space, scheme="hierarchical", n_random=args.n_random,
                            generator=torch.Generator().manual_seed(seed))
    loss = utils.train(net, train, epochs=args.supernet_epochs, lr=args.lr, step_fn=step,
                       log=lambda s: None)[-1]["loss"]
    out = {"train_s": time.time() - t0, "scores": [[tuple(inherited_score(net, c, val, calib))
                                                    for c in group] for group in probes]}
    if search:
        best, scores = evolutionary_search(
            space, lambda c: inherited_score(net, c, val, calib).acc, parents=args.parents,
            budget=space.flops(space.resnet_config(), data.num_classes),
            population=args.population, generations=args.generations, num_classes=data.num_classes,
            mutate_prob=args.mutate_prob, generator=torch.Generator().manual_seed(seed + 1))
        out["search"] = {"best": best, "score": scores[best], "scored": len(scores)}
    print(f"[supernet {which} {sharing} seed {seed}] {out['train_s']:.0f}s train, loss "
          f"{loss:.3f}" + (f", searched {' '.join(map(str, best))}" if search else "") +
          f" ({time.time() - t0:.0f}s)", flush=True)
    return out

def standalone_job(args, data, config, seed):
    """Train a net from scratch; score it on validation and test. It starts from the plain
    ResNet's weights of its seed wherever the two share one: the nets of a seed are paired."""
    device, space, t0, nets = utils.get_device(args.device), space_from_args(args), time.time(), []
    for c in (space.resnet_config(), config):
        utils.set_seed(seed)
        nets.append(space.build(c, data.num_classes))
    utils.copy_shared_init(*nets)
    train, val, test, _ = loaders(args, data, device, seed)
    utils.train(nets[1].to(device), train, epochs=args.standalone_epochs, lr=args.lr,
                log=lambda s: None)
    out = {"val": tuple(utils.evaluate(nets[1], val)), "train_s": time.time() - t0,
           "test": tuple(utils.evaluate(nets[1], test))}
    print(f"[stand-alone {' '.join(map(str, config))} seed {seed}] {out['train_s']:.0f}s, val "
          f"{out['val'][0]:.1f}%, test {out['test'][0]:.1f}%", flush=True)
    return out

def run_job(kind, kwargs):
    return {"supernet": supernet_job, "standalone": standalone_job}[kind](**kwargs)

def run_supernets(args, seeds, arms, **job):
    """Paired supernets, {(seed, arm): result}; arms: {name: that arm's job keywords}."""
    keys = [(s, a) for s in seeds for a in arms]
    jobs = [("supernet", dict(args=args, seed=s, **job, **arms[a])) for s, a in keys]
    return dict(zip(keys, utils.run_jobs(run_job, jobs, workers=args.workers)))

def verdicts(a, b, name_a, name_b, pairs="paired seeds", margins=(1.0, 0.02)):
    """Accuracy and NLL of arm a - arm b (per-seed (acc, NLL)), in the one verdict wording."""
    return {unit: utils.compare_paired([x[m] for x in a], [x[m] for x in b], name_a=name_a,
                                       name_b=name_b, unit=unit, digits=1 + 2 * m, pairs=pairs,
                                       higher_is_better=m == 0, bound=margins[m])
            for m, unit in enumerate(("points", "nats"))}

def table(rows, header):
    rows = [header] + [[f"{x:.1f}" if isinstance(x, float) else str(x) for x in r] for r in rows]
    w = [max(len(str(x)) for x in col) for col in zip(*rows)]
    lines = ["| " + " | ".join(str(x).ljust(n) for x, n in zip(r, w)) + " |" for r in rows]
    return "\n".join(lines[:1] + ["|" + "|".join("-" * (n + 2) for n in w) + "|"] + lines[1:])

def setup(args, data, sharing=False):             # the space, the seeds, a supernet's steps
    n = args.seeds if sharing else args.replicates
    return (space_from_args(args, sharing=sharing), list(range(args.seed, args.seed + n)),
            args.supernet_epochs * max(len(data.y_train) // args.batch_size, 1))


# %%
def exp_sharing(args, data, out):
    """Multi-head vs plain sharing in an attention-only space whose narrow layers have heads
    narrower than the supernet's (where the schemes differ): the trained head-count mix
    (replayed), then paired supernets per scheme, scored on probes that differ in every block."""
    space, seeds, steps = setup(args, data, sharing=True)
    mixes = {t: head_mix(space, [c for s in seeds for c in replay(
        space, seed=s, steps=steps, scheme="hierarchical", n_random=args.n_random, ties=t)])
        for t in ("first", "random")}
    heads = sorted(mixes["random"]["heads"])
    pairs = [(c.width, c.heads) for c in space.candidates[0]["axial"]]
    print(f"\n[sharing] (width, heads) of block 1: {pairs}; trained attention blocks ({len(seeds)} "
          f"seeds x {steps} steps, replayed): % per head count, % where the schemes differ")
    print(table([[f"FLOPs ties: {t}" + " (trains)" * (t == "random"),
                  *(100 * m["heads"].get(h, 0.0) for h in heads), 100 * m["differs"]]
                 for t, m in mixes.items()], ["sandwich", *(f"{h} heads" for h in heads),
                                              "schemes differ"]))
    pool = [[c for cs in space.candidates[b].values() for c in cs
             if sharing_differs(c, max_width=space.mid[b], max_heads=space.max_heads)]
            for b in range(space.num_blocks)]
    assert all(pool), "the sharing space has no layer whose heads are narrower than d_max"
    g = torch.Generator().manual_seed(args.seed + 100)
    probes = [tuple(p[_randint(len(p), g)] for p in pool) for _ in range(args.probes)]
    print(f"{len(seeds)} seeds x 2 schemes x {args.supernet_epochs} epochs; probes on "
          f"{len(data.y_val)} validation images: {[' '.join(map(str, c)) for c in probes]}",
          flush=True)
    res = run_supernets(args, seeds, {a: dict(sharing=a) for a in ("multihead", "plain")},
                        data=data, which="sharing", probes=[probes])
    score = {a: [tuple(np.mean(res[s, a]["scores"][0], 0)) for s in seeds]      # (acc, NLL)
             for a in ("multihead", "plain")}
    v = verdicts(score["multihead"], score["plain"], "multi-head", "plain")
    return {"head_mix": mixes, "probes": [list(map(str, c)) for c in probes], "scores": score,
            "verdicts": v}

def exp_search(args, data, out):
    """"TrioNet is still able to match the best operator" on small data (abstract). Per seed s:
    a supernet, its search, the winner retrained on s vs the best single operator (chosen on
    validation) retrained on s. So the interval covers what a rerun changes, not one network."""
    (space, seeds, _), nc = setup(args, data), data.num_classes
    budget = space.flops(space.resnet_config(), nc)
    single = {op: single_operator_config(space, op, budget, nc) for op in space.ops}
    print(f"\n[search] {len(seeds)} replicates: seed s's supernet, its search ({args.population} "
          f"x {args.generations} configs on {len(data.y_val)} validation images, <= "
          f"{budget / 1e6:.2f} MFLOPs = the plain ResNet), the winner retrained on s; the single "
          f"operator nets of seed {seeds[0]} choose the best operator on validation", flush=True)
    def job(c, s):                  # a stand-alone net, or the supernet and search of seed s
        return ("standalone", dict(args=args, data=data, config=c, seed=s)) if c else \
            ("supernet", dict(args=args, data=data, seed=s, sharing="multihead", search=True))
    keys = [(single[op], seeds[0]) for op in ("local", "axial", "conv")]  # slowest first
    keys += [(None, s) for s in seeds]
    runs = dict(zip(keys, utils.run_jobs(run_job, [job(*k) for k in keys], workers=args.workers)))
    best = max(space.ops, key=lambda op: runs[single[op], seeds[0]]["val"][0])
    found = {s: runs[None, s]["search"] for s in seeds}
    keys = [k for k in dict.fromkeys([(found[s]["best"], s) for s in seeds] +
                                     [(single[best], s) for s in seeds]) if k not in runs]
    runs.update(zip(keys, utils.run_jobs(run_job, [job(*k) for k in keys], workers=args.workers)))
    print(table([[f"all-{op}", " ".join(map(str, c)), f"{space.flops(c, nc) / 1e6:.2f}",
                  *(runs[c, seeds[0]][k][0] for k in ("val", "test"))] for op, c in single.items()],
                [f"seed {seeds[0]}", "blocks", "MFLOPs", "val %", "test %"]))
    a = [runs[found[s]["best"], s]["test"] for s in seeds]
    b = [runs[single[best], s]["test"] for s in seeds]
    print(f"best on validation: {best}\n" + table(
        [[s, " ".join(map(str, found[s]["best"])), f"{space.flops(found[s]['best'], nc) / 1e6:.2f}",
          found[s]["score"], x[0], y[0]] for s, x, y in zip(seeds, a, b)],
        ["seed", "searched", "MFLOPs", "search score (val)", "test %", f"all-{best} test %"]))
    v = verdicts(a, b, "searched", f"all-{best}", "replicates (supernet, search, retrain)",
                 (args.margin, args.margin_nll))
    for (unit, x), bound in zip(v.items(), (args.margin, args.margin_nll)):
        x["matches"] = bool(-bound <= x["ci"][0] and x["ci"][1] <= bound)
        print(f"'matches the best operator' (the whole 95% CI inside +-{bound:g} {unit}): "
              f"{'yes' if x['matches'] else 'no'}")
    fig = Figure(figsize=(9, 0.7 * len(seeds) + 0.6))
    ax, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2.5, 1]})
    for i, s in enumerate(seeds):
        draw_blocks(ax, space, found[s]["best"], row=-i, label=f"seed {s}")
        ax2.plot([b[i][0], a[i][0]], [0.4 - i] * 2, "-", color="grey")
        ax2.plot(b[i][0], 0.4 - i, "o", color=COLOURS[best]), ax2.plot(a[i][0], 0.4 - i, "k*")
    ax.set_xlim(-0.7, space.num_blocks), ax.set_ylim(0.8 - len(seeds), 0.9), ax.axis("off")
    ax.set_title("the network each replicate's search found", fontsize=9)
    ax2.set_ylim(0.8 - len(seeds), 0.9), ax2.set_yticks([])
    ax2.set_xlabel(f"test %: * searched, o all-{best}")
    fig.savefig(os.path.join(out, "search.png"), dpi=100, bbox_inches="tight")
    return {"best_op": best, "searched": {s: list(map(str, found[s]["best"])) for s in seeds},
            "search_score": {s: found[s]["score"] for s in seeds}, "verdicts": v,
            "runs": {f"{' '.join(map(str, c or ['supernet']))} seed {s}": r
                     for (c, s), r in runs.items()}}

# %%
def bench(args, device, out):
    """--bench: train img/s of the single-operator nets; all-local with both local attentions."""
    space, rows = space_from_args(args), []
    for op, fast in [(op, True) for op in space.ops] + [("local", False)]:
        net = space.build(single_operator_config(space, op, space.flops(space.resnet_config())), 10)
        for m in net.modules():
            if isinstance(m, LocalSelfAttention):
                m.fast = fast                                    # that layer's form, not a global
        ips, mem = utils.measure_step(net.to(device), (3, args.image_size, args.image_size),
                                      batch_size=args.batch_size, device=device)
        rows.append([f"all-{op}" + " (reference form)" * (not fast), f"{ips:.0f}", f"{mem:.1f}"])
    print(table(rows, ["net", "train img/s", "activations MB"]))
    utils.save_results(os.path.join(out, "bench.json"), vars(args), {"nets": rows})
    return rows

def full_preset_models(num_classes=10):
    """Every model the full preset trains, at its real size: name -> (model, step_fn or None,
    image_size); tests/test_utils.py takes one bf16 training step of each on a CPU."""
    args, models = utils.cli(__doc__, PRESETS, FLAGS, [], experiments=EXPERIMENTS), {}
    for name, sharing in (("sharing supernet", True), ("supernet", False)):
        space = space_from_args(args, sharing=sharing)
        step = sandwich_step_fn(space, scheme="hierarchical", n_random=args.n_random,
                                generator=torch.Generator().manual_seed(0))
        models[name] = (TrioNetSupernet(space, num_classes=num_classes), step, args.image_size)
    for op in space.ops:
        config = single_operator_config(space, op, space.flops(space.resnet_config()), num_classes)
        models[f"all-{op}"] = (space.build(config, num_classes), None, args.image_size)
    return models

def main(argv=None):
    args = utils.cli(__doc__, PRESETS, FLAGS, argv, experiments=EXPERIMENTS, check=check,
                     bench="train img/s of the single-operator nets, both local attentions")
    device, out = utils.start(args, "05_trionet_search")
    if args.mode == "demo":
        return utils.run_demos(out, [demo_sampling, demo_sharing, demo_search])
    if args.mode == "bench":
        return bench(args, device, out)
    data, results = utils.data_from_args(args), {}
    print(f"data: {len(data.y_train)} train / {len(data.y_val)} validation / {len(data.y_test)} "
          f"test images, {args.image_size}px; device {device}", flush=True)
    for name in args.experiments:
        t0 = time.time()
        results[name] = {"sharing": exp_sharing, "search": exp_search}[name](args, data, out)
        results[name]["wall_s"] = round(time.time() - t0)
        utils.save_results(os.path.join(out, f"{name}.json"), vars(args), results[name])
        print(f"== {name} done in {results[name]['wall_s']}s ==", flush=True)
    return results

# %%
if __name__ == "__main__":
    utils.run_main(main)
