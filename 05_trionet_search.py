"""Searching for TrioNet: Combining Convolution with Local and Global Self-Attention
Pi, Wang, Li, Li, Yuille (BMVC 2021), arXiv:2111.07547.

The idea. Vision models are usually built by stacking ONE spatial operator (3x3 convolution in ResNet, local
self-attention in SASA, axial self-attention in Axial-DeepLab). TrioNet lets every block of a ResNet-like network
choose its own operator - convolution, local (windowed) self-attention or global (axial) self-attention - plus its
kernel/window size, width and number of heads, and finds a good mix with weight-sharing NAS: ONE supernet holds
the weights of all candidates, every training step trains a few sampled sub-networks (sandwich rule), and a search
then ranks sub-networks by their accuracy with inherited weights, without retraining each one. Two things are
new in the paper and are what this file is about:
  * Hierarchical Sampling (sec. 3.2): the operator TYPE is sampled uniformly first, then a candidate of that type.
    Sampling the flat candidate list instead over-trains whichever type has the most candidates (here: local
    attention, with 3 windows x 4 width/heads choices).
  * Multi-head Sharing (sec. 3.3): a narrower attention layer keeps the leading channels WITHIN each head of the
    widest one, so a shared channel always belongs to the same head; plain "first c channels" sharing lets one
    channel serve head 0 in one sub-network and head 1 in another.
The paper's result: on ImageNet the searched TrioNet beats every single-operator model at fewer FLOPs; on small
datasets, where self-attention models are worse than convolution, TrioNet still matches convolution.

The official repository (github.com/phj128/TrioNet) has no code, so this file is the reference. Design choices,
against the paper's text ("paper" = stated there; "OURS" = left open by the paper or shrunk for a CPU):
  1. Space (paper sec. 3.1): per block an operator-level choice {convolution, local self-attention, axial
     self-attention} and architecture-level choices (width, heads). OURS: conv kernel {3, 5}, local window
     {3, 5, 7}, axial = global; width ratios {0.5, 0.75, 1} of the stage's widest middle width; head counts where
     Multi-head Sharing can slice them (a head can shrink, never grow).
  2. Network: a ResNet bottleneck (1x1 reduce -> operator -> 1x1 expand + shortcut) whose 3x3 conv is the searched
     operator, as in the paper's ResNet-based space; CIFAR stages at 32/16/8 pixels. OURS: 2x2 average pooling at the
     first block of a stage (attention models pool instead of striding); 1x1 convs shared by all operator types.
  3. Weight sharing within one operator type (paper): smaller kernels / windows take the CENTRE of the largest
     kernel / relative-embedding table; narrower widths take channel slices. Different types never share weights.
  4. Multi-head Sharing (paper sec. 3.3) vs plain first-c-channel sharing: channel_index().
  5. Hierarchical Sampling (paper sec. 3.2) vs uniform sampling of the flat list: sample_hierarchical / sample_uniform.
  6. Sandwich rule (BigNAS, which TrioNet's supernet training follows): largest + smallest + n random sub-networks per
     step, gradients accumulated. OURS: "largest/smallest" = most/fewest FLOPs per block (with three operator types
     the paper's notion is not unique); no in-place distillation, to keep the step readable.
  7. Scoring a sub-network with inherited weights after re-estimating its BatchNorm statistics (BigNAS/OFA practice),
     on a VALIDATION split carved from the training set; evolutionary search under a FLOPs budget, as one-shot NAS
     does after supernet training (SPOS, OFA). OURS: budget = FLOPs of the all-conv3 ResNet of the same space.
  8. FLOPs = 2 x multiply-accumulates of convolutions and matmuls (attention included, written as einsum), i.e. what
     torch's FlopCounterMode counts; SearchSpace.flops() computes it analytically and the tests check it within 2%.
  9. The searched network and the single-operator baselines are retrained from scratch with one recipe (paper).

Run:
    python 05_trionet_search.py --quick --data ../shared/data/cifar10     # <= 10 min on a 2-core CPU
    python 05_trionet_search.py --data ../shared/data/cifar10             # full preset, meant for one GPU
    python 05_trionet_search.py --bench --data ../shared/data/cifar10     # img/s of the four stand-alone nets

Results of `--quick` (measured 2026-11-21 on this task's 2 shared CPU cores, torch 2.15 CPU, one thread, 293 s end to
end; SHRUNK: 16 px images so stages are 16/8/4 px, 3 searched blocks, 2500 train / 500 val / 2000 test images,
7 supernet and 10 stand-alone epochs). The full preset (32 px, 6 blocks, all of CIFAR-10) was NOT measured: no GPU.
  [1] operator type per block     conv    local   axial
      uniform (flat list)         27.2%   54.9%   17.9%   (expected 6/22, 12/22, 4/22)
      hierarchical                33.5%   33.1%   33.5%
  [2] searched under 2.5 MFLOPs (32 sub-networks scored on VAL): conv3-c6 axial-c8h2 conv5-c16, 1.8 MFLOPs
  [3] stand-alone, same recipe    params  MFLOPs  train img/s  test %
      all-conv                    34k     2.5     2120         42.0
      all-local                   27k     2.3      379         34.5
      all-axial                   25k     2.2      964         31.1
      searched TrioNet            25k     1.8     1655         40.4
  [4] inherited val % of 8 sharing-sensitive attention-only sub-networks: multi-head sharing 24.3, plain sharing
      26.8 (paired difference +2.5 +- 1.3 s.e.), multi-head + uniform sampling 24.1 (-0.2 +- 1.1); uniform sampling
      trains local attention more and axial less (inherited all-local 29.6 vs 27.4, all-axial 20.4 vs 22.6).
What this shows, honestly: the samplers behave as sec. 3.2 says; convolution is the best single operator on this small
data, and the searched mix (conv + axial + conv, at 72% of the budget) comes within 1.6 points of it (= 1 s.e. of
the difference; the paper reports "matches" on small datasets). We do NOT reproduce the Multi-head Sharing advantage
at this scale (one supernet seed, 7 epochs): plain sharing scored higher here.

Shapes: B batch, C block input/output channels, c sampled middle width (channels the spatial operator sees),
h heads, d = c / h channels per head, H, W height and width, R a stage's resolution (H = W = R), N = H * W
positions, K kernel or window size, L the length of the axis an axial layer attends along, M the other axis.
"""
import argparse
import os
import time
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import utils

# ------------------------------------------------------------------------------------------------ config


@dataclass
class Preset:
    image_size: int = 32
    stem_channels: int = 32
    stage_channels: tuple = (64, 128, 256)   # block output channels of the stages at 32 / 16 / 8 pixels
    mid_channels: tuple = (32, 64, 128)      # widest middle (bottleneck) width per stage: what the operator sees
    depths: tuple = (2, 2, 2)                # searched blocks per stage
    max_heads: int = 8                       # heads of the widest attention layer
    head_choices: tuple = (4, 8)
    width_ratios: tuple = (0.5, 0.75, 1.0)   # architecture-level space: sampled width = ratio * mid_channels
    conv_kernels: tuple = (3, 5)             # operator-level space
    local_windows: tuple = (3, 5, 7)
    train_per_class: float = None            # None = all 5000 - val
    val_per_class: int = 500                 # search split, carved from TRAIN (never the test split)
    test_per_class: int = None
    batch_size: int = 128
    supernet_epochs: int = 100
    n_random: int = 2                        # sandwich rule: largest + smallest + n_random random sub-networks
    lr: float = 2e-3
    calib_batches: int = 8                   # batches used to re-estimate BatchNorm statistics of a sub-network
    population: int = 32
    generations: int = 10
    parents: int = 8
    mutate_prob: float = 0.2
    ablation_subnets: int = 20               # attention-only sub-networks scored in the sharing/sampling ablation
    standalone_epochs: int = 100
    threads: int = 0                         # torch CPU threads (0 = torch's default); 1 is fastest for tiny nets on a shared CPU


FULL = Preset()
# --quick: everything shrunk so the five experiments fit in 10 minutes on 2 CPU cores (stated in the output)
QUICK = Preset(image_size=16, stem_channels=16, stage_channels=(32, 64, 128), mid_channels=(8, 16, 32),
               depths=(1, 1, 1), max_heads=2, head_choices=(1, 2), train_per_class=250, val_per_class=50,
               test_per_class=200, batch_size=64, supernet_epochs=7, n_random=1, lr=3e-3, calib_batches=2,
               population=8, generations=4, parents=4, ablation_subnets=8, standalone_epochs=10, threads=1)


def get_args(argv=None):
    p = utils.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    utils.add_common_args(p)
    # the data-size flags default to the preset's values (utils' defaults mean "all data, no validation split")
    p.set_defaults(image_size=None, val_per_class=None)
    p.add_argument("--quick", action="store_true", help="CPU preset: small subsets, small supernet, few epochs")
    p.add_argument("--bench", action="store_true", help="only measure train img/s of the stand-alone models")
    p.add_argument("--no-ablation", action="store_true", help="skip experiment 4 (two extra supernets)")
    # any other Preset field can be overridden, e.g. --supernet-epochs 2 --depths 1 1 1
    for name, default in asdict(FULL).items():
        if name in ("image_size", "train_per_class", "val_per_class", "test_per_class", "threads"):
            continue  # those come from utils.add_common_args
        kw = dict(nargs="+", type=type(default[0])) if isinstance(default, tuple) else dict(type=type(default))
        p.add_argument("--" + name.replace("_", "-"), default=None, help=f"full {default}, quick {getattr(QUICK, name)}", **kw)
    args = p.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    overrides = {k: tuple(v) if isinstance(v, list) else v for k in asdict(cfg) if (v := getattr(args, k)) is not None}
    cfg = Preset(**{**asdict(cfg), **overrides})
    args.preset_keys = [k for k in ("train_per_class", "val_per_class", "test_per_class") if getattr(args, k) is None]
    for k in ("image_size", "train_per_class", "val_per_class", "test_per_class"):
        setattr(args, k, getattr(cfg, k))  # so utils.data_from_args loads what the preset says
    return args, cfg


# ------------------------------------------------------------------------------------------------ building blocks
# The three operator types. Each is a plain function of (q, k, v) so the stand-alone modules below and the supernet
# (which slices its widest weights) run exactly the same arithmetic - that is what makes extract_subnet exact.
# Matmuls are written as einsum so torch's FlopCounterMode counts them (it ignores elementwise multiply + sum; the
# elementwise form of local_attention would run ~2.5x faster on a CPU, but its FLOPs would then be invisible).

def local_attention(q, k, v, rel, *, heads):
    """SASA local self-attention (Ramachandran et al. 2019), the paper's "local self-attention" operator.
    For every pixel i and each head:  y_i = sum_{j in KxK window of i} softmax_j(q_i . (k_j + r_{j-i})) v_j,
    where r_{j-i} is a learned relative-position embedding per offset (rel: (c, K, K)).
    q, k, v: (B, c, H, W) -> (B, c, H, W)."""
    B, c, H, W = q.shape
    K = rel.shape[-1]
    assert K % 2 == 1, f"window must be odd so it has a centre pixel, got {K}"
    assert c % heads == 0, f"{c} channels cannot be split into {heads} heads"
    d = c // heads
    keys = F.unfold(k, K, padding=K // 2).view(B, heads, d, K * K, H * W)   # every KxK window: (B, h, d, K*K, N)
    keys = keys + rel.reshape(1, heads, d, K * K, 1)                       # k_j + r_{j-i}
    values = F.unfold(v, K, padding=K // 2).view(B, heads, d, K * K, H * W)
    q = q.reshape(B, heads, d, H * W) * d ** -0.5                          # (B, h, d, N)
    logits = torch.einsum("bhdn,bhdkn->bhkn", q, keys)                     # (B, h, K*K, N)
    # window cells outside the image are zero padding, not pixels: mask them so they get no attention weight
    inside = F.unfold(q.new_ones(1, 1, H, W), K, padding=K // 2).view(1, 1, K * K, H * W) > 0
    attn = logits.masked_fill(~inside, float("-inf")).softmax(dim=2)       # (B, h, K*K, N)
    out = torch.einsum("bhkn,bhdkn->bhdn", attn, values)                   # (B, h, d, N)
    return out.reshape(B, c, H, W)


def axial_attention(q, k, v, rel, *, heads, axis):
    """One axial self-attention layer (Wang et al. 2020, Axial-DeepLab): every pixel attends to ALL pixels of its
    column (axis='height') or row (axis='width'), with a relative-position term:
        y_i = sum_j softmax_j(q_i . k_j + q_i . r_{j-i}) v_j,   rel: (c, 2*span - 1), offsets -(span-1)..span-1.
    (Axial-DeepLab also adds key- and value-side position terms; we keep only the query term, as SASA does.)
    q, k, v: (B, c, H, W) -> (B, c, H, W)."""
    assert axis in ("height", "width"), f"axis must be 'height' or 'width', got {axis!r}"
    if axis == "width":  # attend along W = attend along H of the transposed map
        q, k, v = (t.transpose(2, 3) for t in (q, k, v))
    B, c, L, M = q.shape                                                   # attend along L, M independent lines
    span = (rel.shape[-1] + 1) // 2
    assert L <= span, f"axial layer built for maps up to {span} pixels, got {L}: rebuild it with span >= {L}"
    assert c % heads == 0, f"{c} channels cannot be split into {heads} heads"
    d = c // heads
    offsets = torch.arange(L, device=q.device)
    r = rel[:, offsets[None, :] - offsets[:, None] + span - 1]             # r[:, i, j] = r_{j-i}: (c, L, L)
    q = q.reshape(B, heads, d, L, M) * d ** -0.5                           # (B, h, d, L, M)
    k, v = k.reshape(B, heads, d, L, M), v.reshape(B, heads, d, L, M)
    logits = (torch.einsum("bhdim,bhdjm->bhijm", q, k)                     # content term   (B, h, L, L, M)
              + torch.einsum("bhdim,hdij->bhijm", q, r.view(heads, d, L, L)))  # position term
    out = torch.einsum("bhijm,bhdjm->bhdim", logits.softmax(dim=3), v)     # (B, h, d, L, M)
    out = out.reshape(B, c, L, M)
    return out.transpose(2, 3) if axis == "width" else out


class LocalSelfAttention(nn.Module):
    """Local self-attention over KxK windows with relative embeddings; q, k, v come from one 1x1 conv (SASA)."""

    def __init__(self, dim, *, heads, window):
        super().__init__()
        assert dim % heads == 0, f"dim {dim} must be divisible by heads {heads}"
        assert window % 2 == 1, f"window {window} must be odd"
        self.heads = heads
        self.qkv = nn.Conv2d(dim, 3 * dim, 1, bias=False)                  # rows: [W_q; W_k; W_v]
        self.rel = nn.Parameter(torch.randn(dim, window, window) * 0.1)    # r_{offset}, per channel

    def forward(self, x):                                                  # (B, c, H, W) -> (B, c, H, W)
        q, k, v = self.qkv(x).chunk(3, dim=1)
        return local_attention(q, k, v, self.rel, heads=self.heads)


class AxialSelfAttention(nn.Module):
    """Global self-attention factorised as a height-axis layer followed by a width-axis layer (Axial-DeepLab):
    after both passes every output pixel has seen every input pixel, at O(N * (H + W)) instead of O(N^2)."""

    def __init__(self, dim, *, heads, span):
        super().__init__()
        assert dim % heads == 0, f"dim {dim} must be divisible by heads {heads}"
        self.heads = heads
        self.qkv_h = nn.Conv2d(dim, 3 * dim, 1, bias=False)
        self.qkv_w = nn.Conv2d(dim, 3 * dim, 1, bias=False)
        self.rel_h = nn.Parameter(torch.randn(dim, 2 * span - 1) * 0.1)
        self.rel_w = nn.Parameter(torch.randn(dim, 2 * span - 1) * 0.1)

    def forward(self, x):                                                  # (B, c, H, W) -> (B, c, H, W)
        x = axial_attention(*self.qkv_h(x).chunk(3, dim=1), self.rel_h, heads=self.heads, axis="height")
        return axial_attention(*self.qkv_w(x).chunk(3, dim=1), self.rel_w, heads=self.heads, axis="width")


class Choice(NamedTuple):
    """One block's candidate: op in {'conv', 'local', 'axial'}; size = kernel (conv) or window (local), 0 for axial
    (global); width = middle channels c; heads = h (1 for conv)."""
    op: str
    size: int
    width: int
    heads: int

    def __str__(self):
        return {"conv": f"conv{self.size}", "local": f"local{self.size}", "axial": "axial"}[self.op] + \
            f"-c{self.width}" + (f"h{self.heads}" if self.op != "conv" else "")


def stage_layout(*, stem_channels, stage_channels, depths, image_size):
    """(in_channels, out_channels, resolution, downsample) of every block: stages at S, S/2, S/4 pixels."""
    assert image_size % 4 == 0, f"--image-size {image_size} must be divisible by 4 (two 2x2 downsamplings)"
    assert len(stage_channels) == len(depths) == 3, "three stages (32/16/8 on CIFAR): give 3 channels and 3 depths"
    blocks, cin = [], stem_channels
    for s, (cout, depth) in enumerate(zip(stage_channels, depths)):
        assert depth >= 1, f"stage {s} needs at least one block, got depth {depth}"
        for i in range(depth):
            blocks.append((cin, cout, image_size >> s, s > 0 and i == 0))
            cin = cout
    return blocks


class TrioBlock(nn.Module):
    """ResNet bottleneck with a chosen spatial operator: 1x1 reduce -> operator (c -> c) -> 1x1 expand, + shortcut.
    design: the operator replaces the bottleneck's 3x3 conv, as SASA, Axial-DeepLab and TrioNet do on ResNet-50.
    design: downsampling is a 2x2 average pool at the block input (SASA/Axial-DeepLab pool instead of striding;
    pooling at the input - OURS - means every operator of a stage works at that stage's resolution, so an axial
    layer's span is fixed per stage)."""

    def __init__(self, in_channels, out_channels, *, choice, resolution, downsample):
        super().__init__()
        c = choice.width
        self.downsample = downsample
        self.reduce, self.bn_reduce = nn.Conv2d(in_channels, c, 1, bias=False), nn.BatchNorm2d(c)
        if choice.op == "conv":
            self.op = nn.Conv2d(c, c, choice.size, padding=choice.size // 2, bias=False)
        elif choice.op == "local":
            self.op = LocalSelfAttention(c, heads=choice.heads, window=choice.size)
        elif choice.op == "axial":
            self.op = AxialSelfAttention(c, heads=choice.heads, span=resolution)
        else:
            raise ValueError(f"unknown operator {choice.op!r}: use 'conv', 'local' or 'axial'")
        self.bn_op = nn.BatchNorm2d(c)
        self.expand, self.bn_out = nn.Conv2d(c, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity() if in_channels == out_channels else \
            nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x):                                                  # (B, C_in, 2R or R, ...) -> (B, C_out, R, R)
        if self.downsample:
            x = F.avg_pool2d(x, 2)
        y = F.relu(self.bn_reduce(self.reduce(x)))                         # (B, c, R, R)
        y = F.relu(self.bn_op(self.op(y)))                                 # (B, c, R, R)
        y = self.bn_out(self.expand(y))                                    # (B, C_out, R, R)
        return F.relu(y + self.shortcut(x))


# ------------------------------------------------------------------------------------------------ model

class TrioNet(nn.Module):
    """A stand-alone network with one fixed Choice per block (a sub-network of the search space).
    config: a sequence of Choice, one per block (depths[0] + depths[1] + depths[2] of them)."""

    def __init__(self, config, *, stem_channels, stage_channels, depths, image_size, num_classes):
        super().__init__()
        layout = stage_layout(stem_channels=stem_channels, stage_channels=stage_channels, depths=depths,
                              image_size=image_size)
        assert len(config) == len(layout), f"config has {len(config)} blocks but the network has {len(layout)}"
        self.image_size = image_size
        self.stem = nn.Sequential(nn.Conv2d(3, stem_channels, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(stem_channels), nn.ReLU())
        self.blocks = nn.ModuleList(TrioBlock(cin, cout, choice=ch, resolution=r, downsample=ds)
                                    for ch, (cin, cout, r, ds) in zip(config, layout))
        self.fc = nn.Linear(stage_channels[-1], num_classes)

    def forward(self, x):                                                  # (B, 3, S, S) -> (B, classes)
        assert x.shape[-1] == x.shape[-2] == self.image_size, \
            f"built for {self.image_size}px inputs (axial spans depend on it), got {tuple(x.shape[-2:])}"
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.fc(x.mean((2, 3)))                                     # global average pool: (B, C)


class SearchSpace:
    """The TrioNet space: per block an operator (sec. 3.1, operator level) and a width / heads (architecture level).
    design: conv kernels {3, 5}, local windows {3, 5, 7}, axial = global; widths are ratios of the stage's widest
    middle width; heads are only allowed where Multi-head Sharing can slice them: d = c / h must not exceed the
    widest layer's per-head width d_max = c_max / h_max (a head can shrink, not grow). OURS: CIFAR-sized values
    (the paper searches ResNet-50-sized stages on ImageNet)."""

    OPS = ("conv", "local", "axial")

    def __init__(self, *, image_size, stem_channels, stage_channels, mid_channels, depths, max_heads, head_choices,
                 width_ratios, conv_kernels, local_windows):
        self.layout = stage_layout(stem_channels=stem_channels, stage_channels=stage_channels, depths=depths,
                                   image_size=image_size)
        self.image_size, self.stem_channels, self.max_heads = image_size, stem_channels, max_heads
        self.stage_channels, self.depths = tuple(stage_channels), tuple(depths)
        assert len(mid_channels) == 3, "give one widest middle width per stage (3 values)"
        assert all(k % 2 == 1 for k in conv_kernels + local_windows), "kernels and windows must be odd"
        assert max(head_choices) <= max_heads, f"head choices {head_choices} exceed max_heads {max_heads}"
        self.mid = []   # widest middle width per block
        self.candidates = []  # per block: {op: [Choice, ...]}
        for b, (cin, cout, r, ds) in enumerate(self.layout):
            stage = sum(b >= sum(depths[:s + 1]) for s in range(3))
            cmax = mid_channels[stage]
            assert cmax % max_heads == 0, f"middle width {cmax} must be divisible by max_heads {max_heads}"
            widths = sorted({round(ratio * cmax) for ratio in width_ratios})
            assert all(0 < w <= cmax for w in widths), f"width ratios {width_ratios} must lie in (0, 1]"
            attn = [(w, h) for w in widths for h in sorted(head_choices) if w % h == 0 and w // h <= cmax // max_heads]
            for w in widths:
                assert any(a[0] == w for a in attn), \
                    f"width {w} fits no head choice {head_choices} (needs w % h == 0 and w / h <= {cmax // max_heads})"
            self.mid.append(cmax)
            self.candidates.append({
                "conv": [Choice("conv", k, w, 1) for k in sorted(conv_kernels) for w in widths],
                "local": [Choice("local", k, w, h) for k in sorted(local_windows) for w, h in attn],
                "axial": [Choice("axial", 0, w, h) for w, h in attn]})
        self.max_window, self.max_kernel = max(local_windows), max(conv_kernels)

    @property
    def num_blocks(self):
        return len(self.layout)

    def check(self, config):
        """Raise ValueError saying what is wrong if `config` is not in the space."""
        if len(config) != self.num_blocks:
            raise ValueError(f"config has {len(config)} blocks, the space has {self.num_blocks}")
        for b, ch in enumerate(config):
            if not isinstance(ch, Choice):
                raise ValueError(f"block {b}: expected a Choice(op, size, width, heads), got {ch!r}")
            if ch.op not in self.OPS:
                raise ValueError(f"block {b}: unknown operator {ch.op!r}; use one of {self.OPS}")
            if ch not in self.candidates[b][ch.op]:
                allowed = ", ".join(str(c) for c in self.candidates[b][ch.op])
                raise ValueError(f"block {b}: {ch} is not a candidate of this block; {ch.op} candidates are: {allowed}")

    def block_flops(self, b, ch):
        """Analytical forward FLOPs (1 MAC = 2 FLOPs, matmuls/convs only, as FlopCounterMode counts) of block b."""
        cin, cout, r, _ = self.layout[b]
        c, n = ch.width, r * r
        f = 2 * cin * c * n + 2 * c * cout * n + (2 * cin * cout * n if cin != cout else 0)  # reduce, expand, shortcut
        if ch.op == "conv":
            f += 2 * c * c * ch.size ** 2 * n
        elif ch.op == "local":   # qkv projection + logits (q . (k + r)) + weighted sum of values, over K*K cells
            f += 2 * 3 * c * c * n + 2 * 2 * c * ch.size ** 2 * n
        else:                    # two axial layers: qkv + content logits + position logits + values, along R
            f += 2 * (2 * 3 * c * c * n + 3 * 2 * c * r * n)
        return f

    def flops(self, config, num_classes=10):
        s = self.image_size
        stem = 2 * 3 * self.stem_channels * 9 * s * s
        return stem + sum(self.block_flops(b, ch) for b, ch in enumerate(config)) + 2 * self.stage_channels[-1] * num_classes

    def extreme(self, largest):
        """Per block, the candidate with the most (largest=True) or fewest FLOPs: the sandwich rule's two ends.
        design: with three operator types "largest" is ambiguous; we define it by FLOPs (OURS)."""
        pick = max if largest else min
        return tuple(pick((c for cs in self.candidates[b].values() for c in cs), key=lambda c: self.block_flops(b, c))
                     for b in range(self.num_blocks))

    def build(self, config, num_classes):
        """A fresh stand-alone TrioNet for `config`."""
        self.check(config)
        return TrioNet(config, stem_channels=self.stem_channels, stage_channels=self.stage_channels,
                       depths=self.depths, image_size=self.image_size, num_classes=num_classes)


def _randint(n, generator):
    return int(torch.randint(n, (1,), generator=generator))


def sample_hierarchical(space, generator, ops=SearchSpace.OPS):
    """Hierarchical Sampling (sec. 3.2): per block, pick the operator TYPE uniformly, then one of its candidates."""
    config = []
    for cands in space.candidates:
        op = ops[_randint(len(ops), generator)]
        config.append(cands[op][_randint(len(cands[op]), generator)])
    return tuple(config)


def sample_uniform(space, generator, ops=SearchSpace.OPS):
    """The naive sampler: uniform over the flat candidate list, so P(type) = (#candidates of type) / (#all)."""
    config = []
    for cands in space.candidates:
        flat = [c for op in ops for c in cands[op]]
        config.append(flat[_randint(len(flat), generator)])
    return tuple(config)


def channel_index(choice, *, max_width, max_heads, sharing):
    """Which of the supernet's `max_width` middle channels a sub-network block uses, in the sub-network's order.
    Multi-head Sharing (sec. 3.3): the widest attention layer has max_heads heads of d_max channels each (head i
    owns channels [i*d_max, (i+1)*d_max)); a sub-layer with h heads of d channels gives its head i the LEADING d
    channels of supernet head i. So a shared channel always serves the same head.
    Plain sharing: the first c channels, cut into h heads afterwards - channel j serves head j // d, which changes
    with the sampled width (e.g. channel 4 is head 1 at c=16, h=4 but head 2 at c=8, h=4).
    Convolution has no heads: it always uses the first c channels."""
    c, h = choice.width, choice.heads
    if choice.op == "conv" or sharing == "plain":
        return torch.arange(c)
    assert sharing == "multihead", f"sharing must be 'multihead' or 'plain', got {sharing!r}"
    d, d_max = c // h, max_width // max_heads
    assert c % h == 0 and d <= d_max and h <= max_heads, \
        f"{choice}: {h} heads of {d} channels do not fit in {max_heads} heads of {d_max} channels"
    return (torch.arange(h)[:, None] * d_max + torch.arange(d)[None, :]).flatten()  # (h*d,): head-major


def sliced_batch_norm(x, bn, idx):
    """BatchNorm over the channels `idx` of a wider BatchNorm2d: uses and (in training) updates only their
    statistics. (Indexing copies the buffers, so the updated statistics are written back by hand.)"""
    mean, var = bn.running_mean[idx], bn.running_var[idx]
    momentum = bn.momentum
    if bn.training:
        bn.num_batches_tracked += 1
        if momentum is None:  # cumulative average, used when re-estimating statistics of one sub-network
            momentum = 1.0 / float(bn.num_batches_tracked)
    y = F.batch_norm(x, mean, var, bn.weight[idx], bn.bias[idx], bn.training, momentum, bn.eps)
    if bn.training:
        with torch.no_grad():
            bn.running_mean[idx], bn.running_var[idx] = mean, var
    return y


class SuperBlock(nn.Module):
    """The weight-sharing version of TrioBlock: holds the widest weights of every operator type and runs the
    sub-block a Choice names by slicing them.
    design (sec. 3.1/3.3 + OURS where noted):
      * operator types do NOT share weights with each other (a conv kernel and an attention projection mean
        different things); the 1x1 reduce/expand convs and the shortcut ARE shared by all types (OURS: they are
        the ResNet bottleneck around the searched operator).
      * within a type: smaller conv kernels / local windows use the CENTRE of the largest kernel / relative-embedding
        table (as OFA / BigNAS do for kernels); narrower widths use channel slices (channel_index).
      * each type has its own BatchNorm after the operator (its output statistics differ per type)."""

    def __init__(self, in_channels, out_channels, *, mid, resolution, downsample, max_heads, max_kernel, max_window):
        super().__init__()
        self.mid, self.max_heads, self.resolution, self.downsample = mid, max_heads, resolution, downsample
        self.reduce, self.bn_reduce = nn.Conv2d(in_channels, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv = nn.Conv2d(mid, mid, max_kernel, bias=False)            # only .weight is used, sliced
        self.local = LocalSelfAttention(mid, heads=max_heads, window=max_window)
        self.axial = AxialSelfAttention(mid, heads=max_heads, span=resolution)
        self.bn_op = nn.ModuleDict({op: nn.BatchNorm2d(mid) for op in SearchSpace.OPS})
        self.expand, self.bn_out = nn.Conv2d(mid, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity() if in_channels == out_channels else \
            nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))

    def sliced_weights(self, choice, idx):
        """The operator's weights for `choice`, cut out of the widest ones (what extract_subnet copies)."""
        if choice.op == "conv":
            o = (self.conv.weight.shape[-1] - choice.size) // 2            # centre of the largest kernel
            return {"weight": self.conv.weight[idx][:, idx, o:o + choice.size, o:o + choice.size]}
        qkv = lambda w: w.view(3, self.mid, self.mid, 1, 1)[:, idx][:, :, idx].reshape(3 * len(idx), len(idx), 1, 1)
        if choice.op == "local":
            o = (self.local.rel.shape[-1] - choice.size) // 2              # centre of the largest embedding table
            return {"qkv.weight": qkv(self.local.qkv.weight),
                    "rel": self.local.rel[idx][:, o:o + choice.size, o:o + choice.size]}
        return {"qkv_h.weight": qkv(self.axial.qkv_h.weight), "rel_h": self.axial.rel_h[idx],
                "qkv_w.weight": qkv(self.axial.qkv_w.weight), "rel_w": self.axial.rel_w[idx]}

    def forward(self, x, choice, sharing):
        if self.downsample:
            x = F.avg_pool2d(x, 2)
        idx = channel_index(choice, max_width=self.mid, max_heads=self.max_heads, sharing=sharing).to(x.device)
        y = F.relu(sliced_batch_norm(F.conv2d(x, self.reduce.weight[idx]), self.bn_reduce, idx))  # (B, c, R, R)
        w = self.sliced_weights(choice, idx)
        if choice.op == "conv":
            y = F.conv2d(y, w["weight"], padding=choice.size // 2)
        elif choice.op == "local":
            y = local_attention(*F.conv2d(y, w["qkv.weight"]).chunk(3, dim=1), w["rel"], heads=choice.heads)
        else:
            y = axial_attention(*F.conv2d(y, w["qkv_h.weight"]).chunk(3, dim=1), w["rel_h"], heads=choice.heads,
                                axis="height")
            y = axial_attention(*F.conv2d(y, w["qkv_w.weight"]).chunk(3, dim=1), w["rel_w"], heads=choice.heads,
                                axis="width")
        y = F.relu(sliced_batch_norm(y, self.bn_op[choice.op], idx))       # (B, c, R, R)
        y = self.bn_out(F.conv2d(y, self.expand.weight[:, idx]))           # (B, C_out, R, R)
        return F.relu(y + self.shortcut(x))


class TrioNetSupernet(nn.Module):
    """All sub-networks of a SearchSpace in one set of weights; forward(x, config) runs one of them."""

    def __init__(self, space, *, num_classes, sharing="multihead"):
        super().__init__()
        assert sharing in ("multihead", "plain"), f"sharing must be 'multihead' or 'plain', got {sharing!r}"
        self.space, self.sharing = space, sharing
        self.stem = nn.Sequential(nn.Conv2d(3, space.stem_channels, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(space.stem_channels), nn.ReLU())
        self.blocks = nn.ModuleList(
            SuperBlock(cin, cout, mid=m, resolution=r, downsample=ds, max_heads=space.max_heads,
                       max_kernel=space.max_kernel, max_window=space.max_window)
            for m, (cin, cout, r, ds) in zip(space.mid, space.layout))
        self.fc = nn.Linear(space.stage_channels[-1], num_classes)

    def forward(self, x, config):                                          # (B, 3, S, S) -> (B, classes)
        self.space.check(config)
        x = self.stem(x)
        for block, choice in zip(self.blocks, config):
            x = block(x, choice, self.sharing)
        return self.fc(x.mean((2, 3)))


def extract_subnet(supernet, config):
    """A stand-alone TrioNet whose weights (and BatchNorm statistics) are copied out of the supernet: it computes
    exactly what supernet(x, config) computes, but owns its (small) weights - e.g. to deploy a searched net."""
    space = supernet.space
    net = space.build(config, supernet.fc.out_features).to(supernet.fc.weight.device)

    def copy_bn(dst, src, idx=None):
        idx = slice(None) if idx is None else idx
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(dst, name).data.copy_(getattr(src, name).data[idx])
        dst.num_batches_tracked.copy_(src.num_batches_tracked)

    with torch.no_grad():
        net.stem.load_state_dict(supernet.stem.state_dict())
        net.fc.load_state_dict(supernet.fc.state_dict())
        for blk, sup, choice in zip(net.blocks, supernet.blocks, config):
            idx = channel_index(choice, max_width=sup.mid, max_heads=sup.max_heads, sharing=supernet.sharing)
            idx = idx.to(supernet.fc.weight.device)
            blk.reduce.weight.copy_(sup.reduce.weight[idx])
            copy_bn(blk.bn_reduce, sup.bn_reduce, idx)
            for name, w in sup.sliced_weights(choice, idx).items():
                blk.op.get_parameter(name).copy_(w)
            copy_bn(blk.bn_op, sup.bn_op[choice.op], idx)
            blk.expand.weight.copy_(sup.expand.weight[:, idx])
            copy_bn(blk.bn_out, sup.bn_out)
            blk.shortcut.load_state_dict(sup.shortcut.state_dict())
    return net


# ------------------------------------------------------------------------------------------------ data

def make_loaders(data, batch_size, device, seed, calib_batches):
    """Train (augmented), validation (search), test (final numbers only) and a FIXED calibration set (the first
    calib_batches * batch_size training images, un-augmented) for re-estimating BatchNorm statistics."""
    kw = dict(device=device, mean=data.mean, std=data.std)
    train = utils.DeviceLoader(data.x_train, data.y_train, batch_size=batch_size, train=True, seed=seed, **kw)
    val = utils.DeviceLoader(data.x_val, data.y_val, batch_size=256, train=False, **kw)
    test = utils.DeviceLoader(data.x_test, data.y_test, batch_size=256, train=False, **kw)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(data.x_train), generator=g)[:calib_batches * batch_size]
    calib = utils.DeviceLoader(data.x_train[pick], data.y_train[pick], batch_size=batch_size, train=False, **kw)
    return train, val, test, calib


# ------------------------------------------------------------------------------------------------ train

def sandwich_step_fn(space, *, sampler, n_random, generator, label_smoothing=0.1, visited=None):
    """utils.train step_fn implementing the sandwich rule (Yu et al., BigNAS, which TrioNet's supernet training follows): every step
    back-propagates the largest, the smallest and n_random sampled sub-networks on the same batch; their gradients
    ACCUMULATE in the shared weights and the loop then takes one optimizer step. `visited` (a list) records the
    configs, for tests. Returns the largest sub-network's loss/logits for the loop's log."""
    largest, smallest = space.extreme(largest=True), space.extreme(largest=False)

    def step(model, x, y):
        configs = [largest, smallest] + [sampler(space, generator) for _ in range(n_random)]
        out = None
        for cfg in configs:
            if visited is not None:
                visited.append(cfg)
            with utils.autocast(x.device):
                logits = model(x, cfg)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
            loss.backward()
            out = out or (loss.detach(), logits.detach())
        return out
    return step


def full_preset_models(num_classes=10):
    """Every model the full preset trains, at its real size: name -> (model, step_fn or None, image_size).
    tests/test_utils.py runs one bf16-autocast training step of each on a CPU, so a full GPU run is known to start."""
    args, cfg = get_args([])
    space = SearchSpace(image_size=cfg.image_size, stem_channels=cfg.stem_channels, stage_channels=cfg.stage_channels,
                        mid_channels=cfg.mid_channels, depths=cfg.depths, max_heads=cfg.max_heads,
                        head_choices=cfg.head_choices, width_ratios=cfg.width_ratios, conv_kernels=cfg.conv_kernels,
                        local_windows=cfg.local_windows)
    step = sandwich_step_fn(space, sampler=sample_hierarchical, n_random=cfg.n_random, generator=torch.Generator().manual_seed(0))
    return {"supernet": (TrioNetSupernet(space, num_classes=num_classes), step, cfg.image_size)}


def train_supernet(space, data_loaders, *, num_classes, sharing, sampler, cfg, seed, log, name):
    train_loader = data_loaders[0]
    utils.set_seed(seed)
    supernet = TrioNetSupernet(space, num_classes=num_classes, sharing=sharing).to(train_loader.device)
    step = sandwich_step_fn(space, sampler=sampler, n_random=cfg.n_random, generator=torch.Generator().manual_seed(seed))
    t0 = time.time()
    hist = utils.train(supernet, train_loader, epochs=cfg.supernet_epochs, lr=cfg.lr, step_fn=step, log=log,
                       name=f"[{name}] ")
    return supernet, {"train_s": round(time.time() - t0, 1), "final_loss": hist[-1]["loss"]}


# ------------------------------------------------------------------------------------------------ eval / search / experiments

@torch.no_grad()
def recalibrate_bn(model, forward, calib_loader):
    """Re-estimate BatchNorm statistics for one sub-network (BigNAS/OFA practice): the running statistics of a
    supernet mix many sub-networks, so before scoring a sub-network we reset them and average its own batch
    statistics over a fixed set of training batches."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    model.train()
    for x, _ in calib_loader:
        forward(model, x)
    for bn, m in zip(bns, saved):
        bn.momentum = m
    model.eval()


def inherited_accuracy(supernet, config, val_loader, calib_loader):
    """Validation accuracy (%) of a sub-network with inherited weights (after BN re-estimation)."""
    fwd = lambda m, x: m(x, config)
    recalibrate_bn(supernet, fwd, calib_loader)
    return utils.evaluate(supernet, val_loader, forward=fwd).acc


def evolutionary_search(space, fitness, *, budget, population, generations, parents, mutate_prob, generator, log,
                        num_classes=10):
    """Evolutionary search under a FLOPs budget (as in SPOS/OFA, the search TrioNet runs on its trained supernet): keep the
    `parents` best configs seen, make children by per-block mutation (resample a block hierarchically) and
    uniform crossover, reject children over budget or already scored. Returns (best config, {config: score})."""
    scores = {}
    flops = lambda c: space.flops(c, num_classes)

    def under_budget(make):
        for _ in range(2000):
            c = make()
            if flops(c) <= budget and c not in scores and c not in pop:
                return c
        raise RuntimeError(f"could not find a new config under {budget / 1e6:.1f} MFLOPs: raise the budget")

    def mutate(c):
        fresh = sample_hierarchical(space, generator)
        return tuple(fresh[b] if torch.rand(1, generator=generator).item() < mutate_prob else ch for b, ch in enumerate(c))

    def crossover(a, b):
        return tuple(x if torch.rand(1, generator=generator).item() < 0.5 else y for x, y in zip(a, b))

    pop = []
    for _ in range(population):
        pop.append(under_budget(lambda: sample_hierarchical(space, generator)))
    for gen in range(generations):
        for c in pop:
            scores[c] = fitness(c)
        top = sorted(scores, key=scores.get, reverse=True)[:parents]
        log(f"  generation {gen + 1}/{generations}: scored {len(scores)} sub-networks, best val {scores[top[0]]:.1f}% "
            f"({flops(top[0]) / 1e6:.1f} MFLOPs) {' '.join(str(ch) for ch in top[0])}")
        if gen == generations - 1:
            break
        pop = []
        for i in range(population):
            a = top[_randint(len(top), generator)]
            b = top[_randint(len(top), generator)]
            pop.append(under_budget((lambda a=a: mutate(a)) if i % 2 == 0 else (lambda a=a, b=b: mutate(crossover(a, b)))))
    return max(scores, key=scores.get), scores


def single_operator_config(space, op, budget, num_classes=10):
    """The all-`op` network with the most FLOPs under the budget, every block using the same candidate position
    (same size/width/heads ratios), so the single-operator baselines sit at FLOPs similar to the search's budget."""
    n = len(space.candidates[0][op])
    configs = [tuple(cands[op][i] for cands in space.candidates) for i in range(n)]
    fits = [c for c in configs if space.flops(c, num_classes) <= budget]
    return max(fits, key=lambda c: space.flops(c, num_classes)) if fits else min(configs, key=lambda c: space.flops(c, num_classes))


def sharing_sensitive_attention_configs(space, n, generator):
    """Attention-only configs in which EVERY block has several heads narrower than the supernet's heads - exactly
    the sub-networks where Multi-head Sharing and plain sharing pick different channels (the ablation's subject)."""
    def sensitive(b, ch):
        return ch.heads > 1 and ch.width // ch.heads < space.mid[b] // space.max_heads
    out = []
    for _ in range(1000 * n):
        c = sample_hierarchical(space, generator, ops=("local", "axial"))
        if all(sensitive(b, ch) for b, ch in enumerate(c)) and c not in out:
            out.append(c)
            if len(out) == n:
                return out
    raise RuntimeError("the space has too few attention candidates whose heads can shrink: add head/width choices")


def sampling_frequencies(space, draws, seed):
    """Experiment 1: operator-type frequencies of both samplers over `draws` sampled networks (all blocks pooled)."""
    out = {}
    for name, sampler in (("uniform", sample_uniform), ("hierarchical", sample_hierarchical)):
        g = torch.Generator().manual_seed(seed)
        counts = {op: 0 for op in space.OPS}
        for _ in range(draws):
            for ch in sampler(space, g):
                counts[ch.op] += 1
        total = sum(counts.values())
        out[name] = {op: counts[op] / total for op in space.OPS}
    cands = space.candidates[0]
    n = sum(len(v) for v in cands.values())
    out["expected_uniform"] = {op: len(cands[op]) / n for op in space.OPS}
    return out


def spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1]) if len(a) > 2 else float("nan")


def plot_architecture(path, space, config, scores, budget, single, num_classes):
    """Experiment 5: the searched architecture (operator per block) and the search's FLOPs-vs-accuracy scatter."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colours = {"conv": "#4C72B0", "local": "#55A868", "axial": "#C44E52"}
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(max(7, 1.3 * len(config) + 2), 6.5),
                                  gridspec_kw={"height_ratios": [1, 1.4]})
    for b, ch in enumerate(config):
        cin, cout, r, _ = space.layout[b]
        ax.add_patch(plt.Rectangle((b, 0), 0.9, 1, color=colours[ch.op]))
        ax.text(b + 0.45, 0.5, f"{ch.op}\n{'k=%d' % ch.size if ch.op == 'conv' else ('win %d' % ch.size if ch.op == 'local' else 'global')}"
                f"\nc={ch.width}" + (f" h={ch.heads}" if ch.op != "conv" else "") + f"\n{r}x{r}",
                ha="center", va="center", color="white", fontsize=8)
    ax.set_xlim(-0.1, len(config)), ax.set_ylim(0, 1), ax.axis("off")
    ax.set_title(f"searched TrioNet: operator per block ({space.flops(config, num_classes) / 1e6:.1f} MFLOPs)")
    fl = np.array([space.flops(c, num_classes) for c in scores]) / 1e6
    acc = np.array(list(scores.values()))
    rgb = {op: np.array(matplotlib.colors.to_rgb(c)) for op, c in colours.items()}
    mix = [sum(rgb[ch.op] for ch in c) / len(c) for c in scores]  # colour = the blocks' operator colours, averaged
    ax2.scatter(fl, acc, c=np.array(mix), s=25, edgecolor="k", linewidth=0.3)
    ax2.scatter([space.flops(config, num_classes) / 1e6], [scores[config]], marker="*", s=250, c="gold", edgecolor="k",
                label="searched")
    for op, c in single.items():
        ax2.axvline(space.flops(c, num_classes) / 1e6, color=colours[op], ls=":", lw=1, label=f"all-{op} FLOPs")
    ax2.axvline(budget / 1e6, color="k", ls="--", lw=1, label="budget (= all-conv3 ResNet)")
    ax2.set_xlabel("MFLOPs (analytical)"), ax2.set_ylabel("inherited val acc (%)")
    ax2.set_title("search: every scored sub-network (colour = mix of its blocks' operator colours)", fontsize=9)
    for op, c in colours.items():  # legend entries for the operator colours
        ax2.scatter([], [], c=c, s=25, label=op)
    ax2.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows, header):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = lambda r: "| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |"
    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in rows])


# ------------------------------------------------------------------------------------------------ main

def main(argv=None):
    threads = torch.get_num_threads()
    try:
        return run(argv)
    finally:
        torch.set_num_threads(threads)  # --threads must not leak into a caller (e.g. the test process)


def run(argv=None):
    args, cfg = get_args(argv)
    t_start = time.time()
    print(utils.reproduce_command())
    device = utils.get_device(args.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "runs", "05_trionet_search")
    os.makedirs(out_dir, exist_ok=True)
    if args.quick:
        print(f"preset --quick, SHRUNK to fit 10 minutes on a 2-core CPU: {cfg.image_size}px images (stages at "
              f"{cfg.image_size}/{cfg.image_size // 2}/{cfg.image_size // 4} px instead of 32/16/8), "
              f"{sum(cfg.depths)} searched blocks, middle widths {cfg.mid_channels}, {cfg.train_per_class} train images "
              f"per class, {cfg.supernet_epochs} supernet / {cfg.standalone_epochs} stand-alone epochs")
    print(f"config: {asdict(cfg)}")
    utils.set_seed(args.seed)
    space = SearchSpace(image_size=cfg.image_size, stem_channels=cfg.stem_channels, stage_channels=cfg.stage_channels,
                        mid_channels=cfg.mid_channels, depths=cfg.depths, max_heads=cfg.max_heads,
                        head_choices=cfg.head_choices, width_ratios=cfg.width_ratios, conv_kernels=cfg.conv_kernels,
                        local_windows=cfg.local_windows)
    counts = {op: len(v) for op, v in space.candidates[0].items()}
    print(f"search space: {space.num_blocks} blocks, candidates per block {counts} "
          f"-> {sum(counts.values())}^{space.num_blocks} = {sum(counts.values()) ** space.num_blocks:.2e} networks")

    data = utils.data_from_args(args)
    nc = data.num_classes
    shape = (3, cfg.image_size, cfg.image_size)
    print(f"data: {len(data.x_train)} train / {len(data.x_val)} val (search) / {len(data.x_test)} test images, {nc} classes")
    loaders = make_loaders(data, cfg.batch_size, device, args.seed, cfg.calib_batches)
    _, val_loader, test_loader, calib_loader = loaders

    # budget: the FLOPs of the plain ResNet of this space (every block conv 3x3 at full width)
    resnet = tuple(next(c for c in cands["conv"] if c.size == min(cfg.conv_kernels) and c.width == space.mid[b])
                   for b, cands in enumerate(space.candidates))
    budget = space.flops(resnet, nc)
    single = {op: single_operator_config(space, op, budget, nc) for op in space.OPS}

    if args.bench:
        rows = []
        for op, c in single.items():
            net = space.build(c, nc).to(device)
            ips, mem = utils.measure_step(net, shape, batch_size=cfg.batch_size, num_classes=nc, device=device)
            rows.append([f"all-{op}", f"{utils.count_flops(net, shape, device) / 1e6:.1f}", f"{ips:.0f}", f"{mem:.0f}"])
        sup = TrioNetSupernet(space, num_classes=nc).to(device)
        ips, mem = utils.measure_step(sup, shape, batch_size=cfg.batch_size, num_classes=nc, device=device,
                                      forward=lambda m, x: m(x, space.extreme(largest=True)))
        rows.append(["supernet (largest sub-net)", f"{space.flops(space.extreme(True), nc) / 1e6:.1f}", f"{ips:.0f}", f"{mem:.0f}"])
        print(table(rows, ["model", "MFLOPs", "train img/s", "activation MB"]))
        utils.save_results(os.path.join(out_dir, "bench.json"), asdict(cfg), {"bench": rows})
        return {"bench": rows}

    # 1. sampling frequencies ----------------------------------------------------------------------------------
    freq = sampling_frequencies(space, draws=2000, seed=args.seed)
    print("\n[1] operator-type frequency per block (2000 sampled networks):")
    print(table([[name] + [f"{100 * freq[name][op]:.1f}%" for op in space.OPS]
                 for name in ("expected_uniform", "uniform", "hierarchical")], ["sampler"] + list(space.OPS)))

    # 2. supernet training + evolutionary search on the VALIDATION split ----------------------------------------
    print(f"\n[2] supernet: hierarchical sampling + sandwich (largest, smallest, {cfg.n_random} random) + multi-head sharing")
    supernet, sup_info = train_supernet(space, loaders, num_classes=nc, sharing="multihead", sampler=sample_hierarchical,
                                        cfg=cfg, seed=args.seed, log=print, name="supernet")
    print(f"evolutionary search under {budget / 1e6:.1f} MFLOPs (= all-conv3 ResNet), fitness = inherited VAL accuracy")
    t0 = time.time()
    fitness = lambda c: inherited_accuracy(supernet, c, val_loader, calib_loader)
    best, scores = evolutionary_search(space, fitness, budget=budget, population=cfg.population,
                                       generations=cfg.generations, parents=cfg.parents, mutate_prob=cfg.mutate_prob,
                                       generator=torch.Generator().manual_seed(args.seed + 1), log=print, num_classes=nc)
    search_s = time.time() - t0
    print(f"searched: {' '.join(str(c) for c in best)}  val {scores[best]:.1f}%  "
          f"{space.flops(best, nc) / 1e6:.1f} MFLOPs  ({len(scores)} sub-networks scored in {search_s:.0f}s)")
    recalibrate_bn(supernet, lambda m, x: m(x, best), calib_loader)
    sub = extract_subnet(supernet, best)
    sub_val = utils.evaluate(sub, val_loader).acc
    print(f"extract_subnet(best): stand-alone copy with inherited weights gets val {sub_val:.1f}% "
          f"(supernet forward: {utils.evaluate(supernet, val_loader, forward=lambda m, x: m(x, best)).acc:.1f}%)")

    # 4. ablation: multi-head vs plain sharing, hierarchical vs uniform sampling --------------------------------
    g = torch.Generator().manual_seed(args.seed + 2)
    attn_set = sharing_sensitive_attention_configs(space, cfg.ablation_subnets, g)
    variants = {"multihead + hierarchical": supernet}
    if not args.no_ablation:
        print("\n[4] ablation supernets (same recipe, one change each)")
        for name, sharing, sampler in (("plain + hierarchical", "plain", sample_hierarchical),
                                       ("multihead + uniform", "multihead", sample_uniform)):
            variants[name], _ = train_supernet(space, loaders, num_classes=nc, sharing=sharing, sampler=sampler,
                                               cfg=cfg, seed=args.seed, log=print, name=name)
    ablation = {}
    for name, net in variants.items():
        accs = [inherited_accuracy(net, c, val_loader, calib_loader) for c in attn_set]
        per_op = {op: inherited_accuracy(net, single[op], val_loader, calib_loader) for op in space.OPS}
        ablation[name] = {"attention_only_mean": float(np.mean(accs)), "attention_only_std": float(np.std(accs)),
                          "attention_only": accs, **{f"all_{op}": a for op, a in per_op.items()}}
        # the same sub-networks are scored on every supernet, so compare them PAIRED: mean difference +- std. error
        diff = np.array(accs) - np.array(ablation["multihead + hierarchical"]["attention_only"])
        ablation[name]["paired_diff_vs_multihead_hierarchical"] = (float(diff.mean()),
                                                                   float(diff.std(ddof=1) / np.sqrt(len(diff))))

    # 3. stand-alone comparison at similar FLOPs ----------------------------------------------------------------
    print(f"\n[3] stand-alone training from scratch, same recipe ({cfg.standalone_epochs} epochs), test split used only here")
    standalone = {}
    for name, c in [(f"all-{op}", single[op]) for op in space.OPS] + [("searched TrioNet", best)]:
        utils.set_seed(args.seed)
        net = space.build(c, nc).to(device)
        hist = utils.train(net, loaders[0], epochs=cfg.standalone_epochs, lr=cfg.lr, log=print, name=f"[{name}] ")
        standalone[name] = {"config": [str(ch) for ch in c], "params": utils.count_params(net),
                            "flops": utils.count_flops(net, shape, device), "flops_analytical": space.flops(c, nc),
                            "val_acc": utils.evaluate(net, val_loader).acc, "test_acc": utils.evaluate(net, test_loader).acc,
                            "train_s": hist[-1]["elapsed_s"]}
        standalone[name]["img_per_s"], _ = utils.measure_step(net, shape, batch_size=min(cfg.batch_size, 64),
                                                              num_classes=nc, steps=2, warmup=1, device=device)

    # rank correlation between inherited and stand-alone accuracy for the four nets, per supernet variant
    names = list(standalone)
    for name, net in variants.items():
        inh = [ablation[name][f"all_{n[4:]}"] if n.startswith("all-") else inherited_accuracy(net, best, val_loader, calib_loader)
               for n in names]
        ablation[name]["spearman_vs_standalone_val_4nets"] = spearman(inh, [standalone[n]["val_acc"] for n in names])

    # 5. figure + tables + results ----------------------------------------------------------------------------
    fig_path = os.path.join(out_dir, "searched_architecture.png")
    plot_architecture(fig_path, space, best, scores, budget, single, nc)
    print("\n[1] operator-type frequency per block:")
    print(table([[name] + [f"{100 * freq[name][op]:.1f}%" for op in space.OPS]
                 for name in ("expected_uniform", "uniform", "hierarchical")], ["sampler"] + list(space.OPS)))
    print(f"\n[3] stand-alone, trained from scratch the same way ({cfg.standalone_epochs} epochs, "
          f"{len(data.x_train)} train images), test = {len(data.x_test)} test images:")
    print(table([[n, " ".join(s["config"]), f"{s['params'] / 1e3:.0f}k", f"{s['flops'] / 1e6:.1f}", f"{s['img_per_s']:.0f}",
                  f"{s['val_acc']:.1f}", f"{s['test_acc']:.1f}"] for n, s in standalone.items()],
                ["model", "blocks", "params", "MFLOPs", "train img/s", "val %", "test %"]))
    print(f"\n[4] ablation: inherited val accuracy (BN re-estimated; {len(data.x_val)} val images) of {len(attn_set)} "
          f"attention-only sub-networks whose heads are all narrower than the supernet's (where the two sharing "
          f"schemes differ), of the single-operator nets, and Spearman(inherited, stand-alone val) over the 4 nets of [3]:")
    paired = lambda n, a: "(reference)" if n == "multihead + hierarchical" else \
        "{:+.1f} +- {:.1f}".format(*a["paired_diff_vs_multihead_hierarchical"])
    print(table([[n, f"{a['attention_only_mean']:.1f} +- {a['attention_only_std']:.1f}", paired(n, a)]
                 + [f"{a[f'all_{op}']:.1f}" for op in space.OPS] + [f"{a['spearman_vs_standalone_val_4nets']:+.2f}"]
                 for n, a in ablation.items()],
                ["supernet", "attention-only (mean +- std)", "paired diff (+- s.e.)", "all-conv", "all-local",
                 "all-axial", "Spearman (n=4)"]))
    conv, searched = standalone["all-conv"]["test_acc"], standalone["searched TrioNet"]["test_acc"]
    best_single = max((n for n in standalone if n.startswith("all-")), key=lambda n: standalone[n]["test_acc"])
    se = 100 * np.sqrt(2 * 0.25 / len(data.x_test))  # std. error of a difference of two accuracies, worst case p=0.5
    print(f"\npaper's small-data claim (TrioNet matches the best single operator): searched {searched:.1f}% vs "
          f"{best_single} {standalone[best_single]['test_acc']:.1f}% (all-conv {conv:.1f}%); difference "
          f"{searched - standalone[best_single]['test_acc']:+.1f} points, noise level ~{se:.1f} points (1 s.e.)")
    print(f"\n[5] figure: {fig_path}")
    wall = time.time() - t_start
    print(f"wall time {wall:.0f}s")
    metrics = {"sampling_frequencies": freq, "budget_flops": budget, "supernet": sup_info,
               "searched": [str(c) for c in best], "searched_val_inherited": scores[best],
               "searched_val_extracted": sub_val, "search_scored": len(scores), "search_s": search_s,
               "standalone": standalone, "ablation": ablation, "wall_s": wall}
    utils.save_results(os.path.join(out_dir, "results.json"), {**asdict(cfg), "quick": args.quick, "seed": args.seed}, metrics)
    return metrics


if __name__ == "__main__":
    utils.run_main(main)
