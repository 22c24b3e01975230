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
    attention, with 3 windows x several width/head choices).
  * Multi-head Sharing (sec. 3.3): a narrower attention layer keeps the leading channels WITHIN each head of the
    widest one, so a shared channel always belongs to the same head; plain "first c channels" sharing lets one
    channel serve head 0 in one sub-network and head 1 in another.
The paper's result: on ImageNet the searched TrioNet beats every single-operator model at fewer FLOPs; on small
datasets, where self-attention models are worse than convolution, TrioNet still matches convolution.

Run (from the repo root; --experiment sampling|sharing|sampler|search|all, default all):
    python 05_trionet_search.py --quick --data ../shared/data/cifar10 --workers 2   # <= 10 min on 2 CPU cores
    python 05_trionet_search.py --quick --data ../shared/data/cifar10 --experiment sharing
    python 05_trionet_search.py --data ../shared/data/cifar10                       # full preset, meant for one GPU
    python 05_trionet_search.py --quick --bench                                     # img/s; fast vs einsum local attention

Experiments (each prints its table and verdicts and writes runs/05_trionet_search/<experiment>.json):
  sampling  what the supernet is trained on: each sampler's operator mix, and the mix of the sub-networks the sandwich
            rule actually back-propagates, with the chi-square test of sec. 3.2's "each type 1/3".
  sharing   Multi-head vs plain sharing (sec. 3.3) in an attention-only space with several head counts per width:
            paired supernet seeds, inherited accuracy and NLL of sharing-sensitive sub-networks on the validation
            split, and the mechanism: do a narrow layer's heads attend like the same heads of the full layer?
  sampler   Hierarchical vs uniform sampling (sec. 3.2): uniform sampling trains local attention ~55% of the time and
            axial ~18%, so it should favour all-local sub-networks over all-axial ones; paired supernet seeds.
  search    evolutionary search on the validation split, then the paper's small-data claim, "TrioNet matches the best
            single operator": the searched net, the best single-operator net (chosen on validation) and a
            FLOPs-matched single-operator net, retrained over paired seeds and tested on the full test set.

RESULTS of `--quick --workers 2` (measured 2026-11-21 on this task's 2 shared CPU cores, torch 2.15, one thread per
run, 460-500 s wall (460 s from a clean clone); 16 px images, 3 searched blocks, 2 500 train / 2 000 validation / 10 000 test images; the full
preset was NOT measured: no GPU). Full tables: README, runs/05_trionet_search/*.json, quick.log.
  [1] trained type mix conv/local/axial %: before issue 13 (fixed global sandwich ends) 44.4/44.4/11.1; now,
      hierarchical 33.0/33.7/33.2 (chi-square vs 1/3: 0.13, p = 0.94, n = 1 755), flat-list 32.7/44.5/22.8.
  [2] multi-head - plain sharing, 3 sharing-sensitive sub-networks, 5 paired supernet seeds x 3 epochs:
      val acc -0.4 points [-1.7, +0.8], NLL +0.027 [-0.001, +0.055] -> not decided; narrow heads attend like the
      same full heads under both schemes (TV difference -0.000 [-0.008, +0.007] local): the attention of these
      briefly trained supernets is near-uniform (local) or set by the per-head bias (axial).
  [3] flat - hierarchical sampling, 5 paired seeds: axial-minus-local NLL gap +0.041 [+0.010, +0.071] -> the
      predicted effect of over-training local / under-training axial holds (accuracy: +1.1 [-1.5, +3.6], undecided).
  [4] searched conv5-c4 local3-c16h2 conv3-c24 (1.99 MFLOPs) vs all-conv (2.48): -1.2 points [-1.5, -0.8], vs
      all-conv at 1.99 MFLOPs: -1.0 [-1.8, -0.2], n=4 paired seeds, full test set: within the +-2-point margin
      ("matches" at that tolerance), yet measurably below convolution. all-local 33.5%, all-axial 34.6%, all-conv 40.3%.
  [5] why all-axial learned badly (--experiment axial, 164 s, 4 paired seeds, 8 epochs, full test set): its attention
      hardly moves from where it starts. Started uniform (b = 0, before issue 13) each layer averages its whole
      column / row and keeps doing so (weight on the query pixel 0.15 -> 0.15, = 1/L): 29.8%. Started local
      (b = -(j-i)^2) it stays near the identity (0.61 -> 0.60): 35.0%, +5.2 points [+0.7, +9.8] (NLL -0.130
      [-0.208, -0.051]) over the uniform start, and level with the same net with no spatial operator at all (1x1
      convs only, 34.9%): +0.1 [-1.5, +1.7], NLL -0.006 [-0.016, +0.003] (equivalent within 0.02 nats). So the
      uniform start destroys spatial detail, and even the fixed axial layer adds no learned spatial mixing in 8 epochs.
  bench (--quick --bench, 1 thread, fwd+bwd, batch 64): elementwise local5 attention vs the einsum reference 2.95x
      (16x16, c=8), 2.12x (8x8, c=16), 0.72x (4x4, c=32); the all-local net trains at 664 vs 380 img/s (1.75x).

The official repository (github.com/phj128/TrioNet) has no code, so this file is the reference. Design choices,
against the paper's text ("paper" = stated there; "OURS" = left open by the paper or shrunk for a CPU):
  1. Space (paper sec. 3.1): per block an operator-level choice {convolution, local self-attention, axial
     self-attention} and architecture-level choices (width, heads). OURS: conv kernel {3, 5}, local window
     {3, 5, 7}, axial = global; width ratios of the stage's widest middle width; head counts where Multi-head
     Sharing can slice them: a head can shrink, never grow (d = c / h <= d_max = c_max / h_max). So several head
     counts exist only at the narrower widths: in the full preset 4 heads exist only at width 0.5 (the head search
     is nearly degenerate there); the `sharing` experiment uses its own space with more head counts per width.
  2. Network: a ResNet bottleneck (1x1 reduce -> operator -> 1x1 expand + shortcut) whose 3x3 conv is the searched
     operator, as in the paper's ResNet-based space; CIFAR stages at 32/16/8 pixels. OURS: 2x2 average pooling at the
     first block of a stage (attention models pool instead of striding); the 1x1 convs are shared by all operator
     types and always use their FIRST c channels (one nested order, as in slimmable / OFA networks).
  3. Weight sharing within one operator type (paper): smaller kernels / windows take the CENTRE of the largest
     kernel / relative-embedding table; narrower widths take channel slices. Different types never share weights.
  4. Multi-head Sharing (paper sec. 3.3) vs plain first-c-channel sharing: channel_index(). It indexes only the
     attention's OWN channels: the rows of its q/k/v projections and position tables and the columns of its output
     projection. OURS: each attention operator ends in an output projection W_o (c -> c, as in multi-head attention;
     SASA and Axial-DeepLab inside a bottleneck have none). Without it the head-ordered value channels would feed the
     shared 1x1 expand directly, which forces one of two biases: either the shared expand conv gets a second, head-
     strided channel order (the bug this file had before issue 13), or value channel j reaches a different expand
     column at each width, in the multi-head arm only.
  5. Hierarchical Sampling (paper sec. 3.2) vs uniform sampling of the flat list: sample_ops(scheme=...).
  6. Sandwich rule (BigNAS, which TrioNet's supernet training follows): per step the operator of each block is sampled
     FIRST (by the sampler under study), then the largest, the smallest and n_random random candidates WITHIN that
     operator assignment are back-propagated (sandwich_configs). So the sampler controls every trained sub-network.
     OURS: "largest/smallest" = most/fewest FLOPs (ties: fewest heads); no in-place distillation, to keep the step
     readable.
  7. Scoring a sub-network with inherited weights after re-estimating its BatchNorm statistics (BigNAS/OFA practice),
     on a VALIDATION split carved from the training set; evolutionary search under a FLOPs budget, as one-shot NAS
     does after supernet training (SPOS, OFA). OURS: budget = FLOPs of the all-conv3 ResNet of the same space. The
     winner's search score is the best of many noisy scores, hence optimistic: it is printed as such and never
     compared; only the retrained test scores are.
  8. FLOPs = 2 x multiply-accumulates of convolutions, matmuls and attention products, i.e. what torch's
     FlopCounterMode counts on the einsum reference forms; SearchSpace.flops() computes it analytically and the tests
     check it against the counter within 2%. Training uses the elementwise local attention (same arithmetic, but
     FlopCounterMode cannot see elementwise products), which is ~2-3x faster on a CPU (`--bench`).
  9. The searched network and the single-operator baselines are retrained from scratch with one recipe (paper).
 10. Operators, against their papers. Local (SASA): q, k and v share one width (SASA allows a different value width);
     the relative position table is one vector per window offset and channel (SASA splits each vector into a row half
     and a column half); logits are scaled by 1/sqrt(d). Axial (Axial-DeepLab): only the query-side position term
     q . r (no key- and value-side terms), no BatchNorm on the logits, one output projection after the height and
     width layers; OURS: a per-head relative bias b_{j-i} added to the logits, initialised to -(j - i)^2 (a locality
     prior, as ConViT's init is one): without it each axial layer starts as the mean of its column / row and all-axial
     nets learned worse than nets with no spatial operator at all (`--experiment axial`; AxialSelfAttention).

Statistics. Every comparison is over paired seeds (utils.compare_paired: mean difference, 95% t-interval, n): the
arms of one seed share the data split, the batches and augmentation (a fresh loader seeded with the seed), the
initial value of every weight they share and, for supernets, the stream of sampled operator assignments' seeds.
All runs use one data split (--seed); the seeds vary initial weights, batch order and sampled sub-networks.
Nothing is ever chosen on the test split: the search and the choice of the best single operator use validation.

Shapes: B batch, C block input/output channels, c sampled middle width (channels the spatial operator sees),
h heads, d = c / h channels per head, H, W height and width, R a stage's resolution (H = W = R), N = H * W
positions, K kernel or window size, L the length of the axis an axial layer attends along, M the other axis.
"""
import argparse
import functools
import itertools
import math
import os
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import utils

# ------------------------------------------------------------------------------------------------ config

PRESETS = {
    # quick: CPU minutes. 16 px images (stages at 16/8/4 px), one searched block per stage, 250 train images per class
    # and 200 per class of validation (2 000 images) carved from the training split; the full 10 000-image test set.
    "quick": dict(image_size=16, stem_channels=16, stage_channels=(32, 64, 128), mid_channels=(8, 16, 32),
                  depths=(1, 1, 1), max_heads=2, head_choices=(1, 2), width_ratios=(0.5, 0.75, 1.0),
                  conv_kernels=(3, 5), local_windows=(3, 5),
                  sharing_mid_channels=(16, 16, 32), sharing_max_heads=4, sharing_head_choices=(1, 2, 4),
                  sharing_width_ratios=(0.25, 0.5, 1.0), sharing_local_windows=(3,),
                  train_per_class=250, val_per_class=200, test_per_class=None, batch_size=64, lr=3e-3,
                  supernet_epochs=3, n_random=1, calib_batches=4, seeds=5, probes=3,
                  population=10, generations=4, parents=4, mutate_prob=0.3,
                  standalone_epochs=8, retrain_seeds=4, select_seeds=1, margin=2.0, margin_nll=0.05, workers=2, threads=1,
                  all_experiments=("sampling", "sharing", "sampler", "search")),  # axial: its own command (~4 min)
    # full: CIFAR-10 at 32 px, two searched blocks per stage, all training images but 500 per class of validation;
    # meant for one GPU (not measured in this task: no GPU was available).
    "full": dict(image_size=32, stem_channels=32, stage_channels=(64, 128, 256), mid_channels=(32, 64, 128),
                 depths=(2, 2, 2), max_heads=8, head_choices=(4, 8), width_ratios=(0.5, 0.75, 1.0),
                 conv_kernels=(3, 5), local_windows=(3, 5, 7),
                 sharing_mid_channels=(32, 64, 128), sharing_max_heads=8, sharing_head_choices=(2, 4, 8),
                 sharing_width_ratios=(0.25, 0.5, 1.0), sharing_local_windows=(3, 5, 7),
                 train_per_class=None, val_per_class=500, test_per_class=None, batch_size=128, lr=2e-3,
                 supernet_epochs=100, n_random=2, calib_batches=8, seeds=5, probes=8,
                 population=32, generations=10, parents=8, mutate_prob=0.2,
                 standalone_epochs=100, retrain_seeds=5, select_seeds=5, margin=1.0, margin_nll=0.02, workers=1, threads=None,
                 all_experiments=("sampling", "sharing", "sampler", "search", "axial")),
}
EXPERIMENTS = ("sampling", "sharing", "sampler", "search", "axial")
SPACE_KEYS = ("image_size", "stem_channels", "stage_channels", "mid_channels", "depths", "max_heads", "head_choices",
              "width_ratios", "conv_kernels", "local_windows")


def get_args(argv=None):
    p = utils.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                             epilog="Presets (a flag you pass wins over its preset value):\n" +
                                    "\n".join(f"  {k}: {v}" for k, v in PRESETS.items()))
    p.add_argument("--experiment", default="all", choices=EXPERIMENTS + ("all",), help="which experiment to run")
    p.add_argument("--quick", action="store_true", help="CPU preset: small images, small supernets, few epochs")
    p.add_argument("--bench", action="store_true", help="only measure train img/s (and fast vs einsum local attention)")
    utils.add_common_args(p)
    p.set_defaults(image_size=None)  # the preset's (16 quick, 32 full)
    ints, tuples = utils.positive_int, dict(nargs="+", type=utils.positive_int)
    flags = [("stem_channels", ints, "stem width"), ("stage_channels", tuples, "block output channels of the 3 stages"),
             ("mid_channels", tuples, "widest middle width per stage (what the operator sees)"),
             ("depths", tuples, "searched blocks per stage"), ("max_heads", ints, "heads of the widest attention layer"),
             ("head_choices", tuples, "head counts of the space"),
             ("width_ratios", dict(nargs="+", type=utils.positive_float), "widths = ratio x widest middle width"),
             ("conv_kernels", tuples, "conv kernel sizes (odd)"), ("local_windows", tuples, "local windows (odd)"),
             ("sharing_mid_channels", tuples, "sharing experiment: widest middle widths"),
             ("sharing_max_heads", ints, "sharing experiment: heads of the widest layer"),
             ("sharing_head_choices", tuples, "sharing experiment: head counts"),
             ("sharing_width_ratios", dict(nargs="+", type=utils.positive_float), "sharing experiment: width ratios"),
             ("sharing_local_windows", tuples, "sharing experiment: local windows"),
             ("batch_size", ints, None), ("lr", utils.positive_float, "peak AdamW learning rate"),
             ("supernet_epochs", ints, None), ("n_random", utils.nonneg_int, "sandwich: random sub-networks per step"),
             ("calib_batches", ints, "training batches that re-estimate a sub-network's BatchNorm statistics"),
             ("seeds", ints, "paired supernet seeds per arm (sharing, sampler)"),
             ("probes", ints, "sub-networks scored per probe set"),
             ("population", ints, None), ("generations", ints, None), ("parents", ints, None),
             ("mutate_prob", utils.positive_float, None), ("standalone_epochs", ints, "epochs of every retrained net"),
             ("retrain_seeds", ints, "paired seeds of the retrained nets (search, axial)"),
             ("select_seeds", ints, "seeds of every single-operator net, whose validation scores choose the best one"),
             ("margin", utils.positive_float, "equivalence margin in accuracy points for 'matches'"),
             ("margin_nll", utils.positive_float, "equivalence margin in test NLL (nats) for 'matches'")]
    for name, kind, text in flags:
        kw = kind if isinstance(kind, dict) else dict(type=kind)
        p.add_argument("--" + name.replace("_", "-"), help=text, **kw)
    args = p.parse_args(argv)
    utils.apply_preset(args, PRESETS["quick" if args.quick else "full"])
    for name in [f for f, _, _ in flags if isinstance(getattr(args, f), list)]:
        setattr(args, name, tuple(getattr(args, name)))
    if args.parents > args.population:
        p.error(f"--parents {args.parents} must not exceed --population {args.population}")
    if not 0 < args.mutate_prob <= 1:
        p.error(f"--mutate-prob must lie in (0, 1], got {args.mutate_prob}")
    if args.seeds < 2 or args.retrain_seeds < 2:
        p.error("--seeds and --retrain-seeds must be >= 2: a confidence interval needs two paired seeds")
    if args.select_seeds > args.retrain_seeds:
        p.error(f"--select-seeds {args.select_seeds} must not exceed --retrain-seeds {args.retrain_seeds}")
    try:  # a space that cannot be built (sizes that do not divide, ...) is a flag error, said in one line
        space_from_args(args), space_from_args(args, sharing=True)
    except AssertionError as e:
        p.error(str(e))
    return args


def space_from_args(args, sharing=False):
    """The main search space, or (sharing=True) the attention-only space of the sharing experiment."""
    kw = {k: getattr(args, k) for k in SPACE_KEYS}
    if sharing:
        kw.update(mid_channels=args.sharing_mid_channels, max_heads=args.sharing_max_heads,
                  head_choices=args.sharing_head_choices, width_ratios=args.sharing_width_ratios,
                  local_windows=args.sharing_local_windows, ops=("local", "axial"))
    return SearchSpace(**kw)


# ------------------------------------------------------------------------------------------------ building blocks
REL_STD = 0.1   # initial std of the relative-position tables
LOCALITY = 1.0  # axial attention's initial relative bias b_{j-i} = -LOCALITY * (j - i)^2 (AxialSelfAttention)

# The three operator types. Each is a plain function of (q, k, v) so the stand-alone modules below and the supernet
# (which slices its widest weights) run exactly the same arithmetic - that is what makes extract_subnet exact.

def window_cells(K):
    """The K*K cells (i, j) of a window in raster order; cell (i, j) is the offset (i - K//2, j - K//2)."""
    return [(i, j) for i in range(K) for j in range(K)]


@functools.lru_cache(maxsize=64)
def inside_window(H, W, K, device=None):
    """(K*K, H, W) bool: whether window cell o of pixel (y, x) lies inside the image (cells outside are zero padding,
    not pixels: they get no attention weight)."""
    p = K // 2
    ones = F.pad(torch.ones(H, W, device=device), (p, p, p, p))
    return torch.stack([ones[i:i + H, j:j + W] for i, j in window_cells(K)]) > 0


def local_attention_weights(q, k, rel, *, heads):
    """SASA's attention weights over each pixel's KxK window, per head (Ramachandran et al. 2019, eq. 2-3):
        a_ij = softmax_{j in window(i)} (q_i . (k_j + r_{j-i}) / sqrt(d)),  rel: (c, K, K), r per offset and channel.
    Elementwise form: one shifted slice of the zero-padded key map per window cell; no K*K copy of the keys.
    q, k: (B, c, H, W) -> (B, h, K*K, H, W)."""
    B, c, H, W = q.shape
    K = rel.shape[-1]
    assert K % 2 == 1, f"window must be odd so it has a centre pixel, got {K}"
    assert c % heads == 0, f"{c} channels cannot be split into {heads} heads"
    d, p = c // heads, K // 2
    q = q.reshape(B, heads, d, H, W) * d ** -0.5                          # (B, h, d, H, W)
    kp = F.pad(k, (p, p, p, p)).reshape(B, heads, d, H + 2 * p, W + 2 * p)
    content = torch.stack([(q * kp[..., i:i + H, j:j + W]).sum(2) for i, j in window_cells(K)], 2)  # q_i . k_j
    position = torch.einsum("bhdyx,hdo->bhoyx", q, rel.reshape(heads, d, K * K))                    # q_i . r_{j-i}
    logits = content + position                                           # (B, h, K*K, H, W)
    return logits.masked_fill(~inside_window(H, W, K, q.device), float("-inf")).softmax(dim=2)


def local_attention(q, k, v, rel, *, heads):
    """SASA local self-attention, the paper's "local self-attention" operator: y_i = sum_j a_ij v_j over the KxK
    window of pixel i (fast elementwise form). q, k, v: (B, c, H, W) -> (B, c, H, W)."""
    B, c, H, W = q.shape
    K, d = rel.shape[-1], c // heads
    p = K // 2
    attn = local_attention_weights(q, k, rel, heads=heads)                # (B, h, K*K, H, W)
    vp = F.pad(v, (p, p, p, p)).reshape(B, heads, d, H + 2 * p, W + 2 * p)
    out = sum(attn[:, :, o, None] * vp[..., i:i + H, j:j + W] for o, (i, j) in enumerate(window_cells(K)))
    return out.reshape(B, c, H, W)                                        # (B, h, d, H, W) -> (B, c, H, W)


def local_attention_einsum(q, k, v, rel, *, heads):
    """The reference form of local_attention (same maths): unfold every KxK window, then two einsums. Kept for the
    tests (the fast form must equal it) and for FLOP counting: FlopCounterMode counts einsums, not elementwise
    products. It is 2-3x slower on a CPU (it copies the keys and values K*K times). q, k, v: (B, c, H, W)."""
    B, c, H, W = q.shape
    K = rel.shape[-1]
    d = c // heads
    keys = F.unfold(k, K, padding=K // 2).view(B, heads, d, K * K, H * W)   # every KxK window: (B, h, d, K*K, N)
    keys = keys + rel.reshape(1, heads, d, K * K, 1)                       # k_j + r_{j-i}
    values = F.unfold(v, K, padding=K // 2).view(B, heads, d, K * K, H * W)
    q = q.reshape(B, heads, d, H * W) * d ** -0.5                          # (B, h, d, N)
    logits = torch.einsum("bhdn,bhdkn->bhkn", q, keys)                     # (B, h, K*K, N)
    inside = inside_window(H, W, K, q.device).view(1, 1, K * K, H * W)
    attn = logits.masked_fill(~inside, float("-inf")).softmax(dim=2)       # (B, h, K*K, N)
    out = torch.einsum("bhkn,bhdkn->bhdn", attn, values)                   # (B, h, d, N)
    return out.reshape(B, c, H, W)


def axial_attention_weights(q, k, rel, *, heads, bias=None):
    """Attention weights of one axial layer along the HEIGHT axis (Wang et al. 2020, Axial-DeepLab, eq. 2 with only
    the query-side position term) plus a per-head relative bias (OURS, see AxialSelfAttention): every pixel i of a
    column attends to ALL pixels j of that column,
        a_ij = softmax_j ((q_i . k_j + q_i . r_{j-i}) / sqrt(d) + b_{j-i}),   rel: (c, 2*span - 1), bias: (h, 2*span - 1),
    offsets -(span-1)..span-1. q, k: (B, c, L, M) -> (B, h, L, L, M) = (batch, head, query row i, key row j, column)."""
    B, c, L, M = q.shape
    span = (rel.shape[-1] + 1) // 2
    assert L <= span, f"axial layer built for maps up to {span} pixels, got {L}: rebuild it with span >= {L}"
    assert c % heads == 0, f"{c} channels cannot be split into {heads} heads"
    d = c // heads
    offsets = torch.arange(L, device=q.device)
    delta = offsets[None, :] - offsets[:, None] + span - 1                 # [i, j] -> index of offset j - i
    q = q.reshape(B, heads, d, L, M) * d ** -0.5                           # (B, h, d, L, M)
    k = k.reshape(B, heads, d, L, M)
    logits = (torch.einsum("bhdim,bhdjm->bhijm", q, k)                     # content term   (B, h, L, L, M)
              + torch.einsum("bhdim,hdij->bhijm", q, rel[:, delta].reshape(heads, d, L, L)))  # position term
    if bias is not None:
        logits = logits + bias[:, delta][None, :, :, :, None]              # b_{j-i}: (1, h, L, L, 1)
    return logits.softmax(dim=3)


def axial_attention(q, k, v, rel, *, heads, axis, bias=None):
    """One axial self-attention layer: y_i = sum_j a_ij v_j along a column (axis='height') or a row (axis='width').
    q, k, v: (B, c, H, W) -> (B, c, H, W)."""
    assert axis in ("height", "width"), f"axis must be 'height' or 'width', got {axis!r}"
    if axis == "width":  # attend along W = attend along H of the transposed map
        q, k, v = (t.transpose(2, 3) for t in (q, k, v))
    B, c, L, M = q.shape                                                   # attend along L, M independent lines
    attn = axial_attention_weights(q, k, rel, heads=heads, bias=bias)      # (B, h, L, L, M)
    out = torch.einsum("bhijm,bhdjm->bhdim", attn, v.reshape(B, heads, c // heads, L, M))  # (B, h, d, L, M)
    out = out.reshape(B, c, L, M)
    return out.transpose(2, 3) if axis == "width" else out


class LocalSelfAttention(nn.Module):
    """Local self-attention over KxK windows with relative embeddings (SASA): q, k, v from one 1x1 conv, then the
    output projection W_o (design note 4)."""

    def __init__(self, dim, *, heads, window):
        super().__init__()
        assert dim % heads == 0, f"dim {dim} must be divisible by heads {heads}"
        assert window % 2 == 1, f"window {window} must be odd"
        self.heads = heads
        self.qkv = nn.Conv2d(dim, 3 * dim, 1, bias=False)                  # rows: [W_q; W_k; W_v]
        self.rel = nn.Parameter(torch.randn(dim, window, window) * REL_STD)  # r_{offset}, per channel
        self.proj = nn.Conv2d(dim, dim, 1, bias=False)                     # W_o

    def forward(self, x):                                                  # (B, c, H, W) -> (B, c, H, W)
        q, k, v = self.qkv(x).chunk(3, dim=1)
        return self.proj(local_attention(q, k, v, self.rel, heads=self.heads))


class AxialSelfAttention(nn.Module):
    """Global self-attention factorised as a height-axis layer followed by a width-axis layer (Axial-DeepLab):
    after both passes every output pixel has seen every input pixel, at O(N * (H + W)) instead of O(N^2).
    Why the relative bias b_{j-i} with a locality init (OURS; see the README's axial section): at initialisation the
    logits q.k/sqrt(d) and q.r/sqrt(d) are ~0.1, so without it each layer starts as the MEAN of its column / row and
    the block wipes out the pixel's own features: all-axial nets then learned worse than nets with no spatial operator
    at all. The query-side term q.r cannot prefer nearby pixels for every query (it is multiplied by the query), a
    zero-initialised bias did not help either; b_{j-i} = -locality * (j - i)^2 starts each layer as a 3-tap smoothing
    (weight ~0.5 on the pixel itself) that training can widen."""

    def __init__(self, dim, *, heads, span, locality=LOCALITY):
        super().__init__()
        assert dim % heads == 0, f"dim {dim} must be divisible by heads {heads}"
        self.heads = heads
        self.qkv_h = nn.Conv2d(dim, 3 * dim, 1, bias=False)
        self.qkv_w = nn.Conv2d(dim, 3 * dim, 1, bias=False)
        self.rel_h = nn.Parameter(torch.randn(dim, 2 * span - 1) * REL_STD)
        self.rel_w = nn.Parameter(torch.randn(dim, 2 * span - 1) * REL_STD)
        self.rel_bias_h = nn.Parameter(torch.zeros(heads, 2 * span - 1))  # b_{j-i} per head (no weight decay: rel*)
        self.rel_bias_w = nn.Parameter(torch.zeros(heads, 2 * span - 1))
        self.proj = nn.Conv2d(dim, dim, 1, bias=False)                     # W_o
        self.init_locality(locality)

    @torch.no_grad()
    def init_locality(self, locality):
        """b_{j-i} = -locality * (j - i)^2 for every head; locality=0 gives the uniform start (before issue 13)."""
        span = (self.rel_h.shape[-1] + 1) // 2
        offsets = torch.arange(-(span - 1), span, dtype=torch.float32)
        for b in (self.rel_bias_h, self.rel_bias_w):
            b.copy_(-locality * offsets.square().expand_as(b))

    def forward(self, x):                                                  # (B, c, H, W) -> (B, c, H, W)
        x = axial_attention(*self.qkv_h(x).chunk(3, dim=1), self.rel_h, heads=self.heads, axis="height",
                            bias=self.rel_bias_h)
        x = axial_attention(*self.qkv_w(x).chunk(3, dim=1), self.rel_w, heads=self.heads, axis="width",
                            bias=self.rel_bias_w)
        return self.proj(x)


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
    design: conv kernels and local windows as given, axial = global; widths are ratios of the stage's widest middle
    width; heads are only allowed where Multi-head Sharing can slice them: d = c / h must not exceed the widest
    layer's per-head width d_max = c_max / h_max (a head can shrink, not grow). `ops` restricts the operator types
    (the sharing experiment uses an attention-only space). OURS: CIFAR-sized values (the paper searches
    ResNet-50-sized stages on ImageNet)."""

    OPS = ("conv", "local", "axial")

    def __init__(self, *, image_size, stem_channels, stage_channels, mid_channels, depths, max_heads, head_choices,
                 width_ratios, conv_kernels, local_windows, ops=OPS):
        self.layout = stage_layout(stem_channels=stem_channels, stage_channels=stage_channels, depths=depths,
                                   image_size=image_size)
        self.image_size, self.stem_channels, self.max_heads = image_size, stem_channels, max_heads
        self.stage_channels, self.depths, self.ops = tuple(stage_channels), tuple(depths), tuple(ops)
        assert set(self.ops) <= set(self.OPS) and self.ops, f"ops must be a non-empty subset of {self.OPS}, got {ops}"
        assert len(mid_channels) == 3, "give one widest middle width per stage (3 values)"
        assert all(k % 2 == 1 for k in tuple(conv_kernels) + tuple(local_windows)), "kernels and windows must be odd"
        assert max(head_choices) <= max_heads, f"head choices {head_choices} exceed max_heads {max_heads}"
        self.mid, self.candidates = [], []  # per block: widest middle width, {op: [Choice, ...]}
        for b, (cin, cout, r, ds) in enumerate(self.layout):
            cmax = mid_channels[sum(b >= sum(depths[:s + 1]) for s in range(3))]
            assert cmax % max_heads == 0, f"middle width {cmax} must be divisible by max_heads {max_heads}"
            widths = sorted({round(ratio * cmax) for ratio in width_ratios})
            assert all(0 < w <= cmax for w in widths), f"width ratios {width_ratios} must lie in (0, 1]"
            attn = [(w, h) for w in widths for h in sorted(head_choices) if w % h == 0 and w // h <= cmax // max_heads]
            for w in widths:
                assert any(a[0] == w for a in attn), \
                    f"width {w} fits no head choice {head_choices} (needs w % h == 0 and w / h <= {cmax // max_heads})"
            self.mid.append(cmax)
            every = {"conv": [Choice("conv", k, w, 1) for k in sorted(conv_kernels) for w in widths],
                     "local": [Choice("local", k, w, h) for k in sorted(local_windows) for w, h in attn],
                     "axial": [Choice("axial", 0, w, h) for w, h in attn]}
            self.candidates.append({op: every[op] for op in self.ops})
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
            if ch.op not in self.ops:
                raise ValueError(f"block {b}: unknown operator {ch.op!r}; use one of {self.ops}")
            if ch not in self.candidates[b][ch.op]:
                allowed = ", ".join(str(c) for c in self.candidates[b][ch.op])
                raise ValueError(f"block {b}: {ch} is not a candidate of this block; {ch.op} candidates are: {allowed}")

    def block_flops(self, b, ch):
        """Analytical forward FLOPs (1 MAC = 2 FLOPs: convs, matmuls and attention products, as FlopCounterMode counts
        them on the einsum forms) of block b."""
        cin, cout, r, _ = self.layout[b]
        c, n = ch.width, r * r
        f = 2 * cin * c * n + 2 * c * cout * n + (2 * cin * cout * n if cin != cout else 0)  # reduce, expand, shortcut
        if ch.op == "conv":
            f += 2 * c * c * ch.size ** 2 * n
        elif ch.op == "local":   # qkv + W_o projections, logits q . (k + r) and weighted values over K*K cells
            f += 2 * 4 * c * c * n + 2 * 2 * c * ch.size ** 2 * n
        else:                    # two axial layers (qkv, content + position logits, values along R) and W_o
            f += 2 * (2 * 3 * c * c * n + 3 * 2 * c * r * n) + 2 * c * c * n
        return f

    def flops(self, config, num_classes=10):
        s = self.image_size
        stem = 2 * 3 * self.stem_channels * 9 * s * s
        return stem + sum(self.block_flops(b, ch) for b, ch in enumerate(config)) + 2 * self.stage_channels[-1] * num_classes

    def extreme(self, largest, ops=None):
        """Per block, the candidate with the most (largest=True) or fewest FLOPs among the candidates of ops[b] (all
        types when ops is None): the sandwich rule's two ends. Ties go to the first candidate (fewest heads)."""
        pick = max if largest else min
        ops = ops or [None] * self.num_blocks
        return tuple(pick((c for o, cs in self.candidates[b].items() if op in (None, o) for c in cs),
                          key=lambda c: self.block_flops(b, c)) for b, op in enumerate(ops))

    def build(self, config, num_classes):
        """A fresh stand-alone TrioNet for `config`."""
        self.check(config)
        return TrioNet(config, stem_channels=self.stem_channels, stage_channels=self.stage_channels,
                       depths=self.depths, image_size=self.image_size, num_classes=num_classes)


def _randint(n, generator):
    return int(torch.randint(n, (1,), generator=generator))


def sample_ops(space, generator, scheme="hierarchical"):
    """The operator assignment of one sampled network: one type per block.
    'hierarchical' (Hierarchical Sampling, sec. 3.2): the TYPE uniformly, P(type) = 1 / #types.
    'uniform' (the naive sampler): a candidate uniformly from the flat list of all candidates, so a type is drawn
    with P(type) = #candidates of the type / #all candidates (local attention has the most)."""
    ops = []
    for cands in space.candidates:
        if scheme == "hierarchical":
            ops.append(space.ops[_randint(len(space.ops), generator)])
        elif scheme == "uniform":
            flat = [op for op in space.ops for _ in cands[op]]
            ops.append(flat[_randint(len(flat), generator)])
        else:
            raise ValueError(f"scheme must be 'hierarchical' or 'uniform', got {scheme!r}")
    return tuple(ops)


def sample_candidates(space, ops, generator):
    """Given each block's operator type, one of that type's candidates per block, uniformly (architecture level)."""
    return tuple(space.candidates[b][op][_randint(len(space.candidates[b][op]), generator)] for b, op in enumerate(ops))


def sample_config(space, generator, scheme="hierarchical"):
    """One random sub-network: types by `scheme`, then candidates uniformly. scheme='uniform' is exactly uniform
    sampling of the flat candidate list, block by block."""
    return sample_candidates(space, sample_ops(space, generator, scheme), generator)


def sandwich_configs(space, generator, *, scheme, n_random):
    """The sub-networks of one sandwich step (design note 6): sample the operator assignment FIRST, then its largest,
    its smallest and n_random random candidates WITHIN that assignment. So every trained sub-network follows the
    sampler: with hierarchical sampling each type is trained 1/3 of the time."""
    ops = sample_ops(space, generator, scheme)
    return [space.extreme(True, ops), space.extreme(False, ops)] + \
        [sample_candidates(space, ops, generator) for _ in range(n_random)]


def channel_index(choice, *, max_width, max_heads, sharing):
    """Which of the supernet's `max_width` ATTENTION channels (q/k/v rows, position-table rows, W_o columns) a
    sub-network's attention layer uses, in the sub-network's order.
    Multi-head Sharing (sec. 3.3): the widest attention layer has max_heads heads of d_max channels each (head i
    owns channels [i*d_max, (i+1)*d_max)); a sub-layer with h heads of d channels gives its head i the LEADING d
    channels of supernet head i. So a shared channel always serves the same head.
    Plain sharing: the first c channels, cut into h heads afterwards - channel j serves head j // d, which changes
    with the sampled width and head count (e.g. channel 4 is head 1 at c=16, h=4 but head 2 at c=8, h=4).
    Convolution has no heads: it always uses the first c channels, as the shared 1x1 convs do."""
    c, h = choice.width, choice.heads
    if choice.op == "conv" or sharing == "plain":
        return torch.arange(c)
    assert sharing == "multihead", f"sharing must be 'multihead' or 'plain', got {sharing!r}"
    d, d_max = c // h, max_width // max_heads
    assert c % h == 0 and d <= d_max and h <= max_heads, \
        f"{choice}: {h} heads of {d} channels do not fit in {max_heads} heads of {d_max} channels"
    return (torch.arange(h)[:, None] * d_max + torch.arange(d)[None, :]).flatten()  # (h*d,): head-major


def sliced_batch_norm(x, bn):
    """BatchNorm over the FIRST c = x.shape[1] channels of a wider BatchNorm2d: uses and (in training) updates only
    their statistics. F.batch_norm updates the running statistics it is given in place; they are copies of bn's
    slices here, so the updated values are written back by hand (a test checks it)."""
    c = x.shape[1]
    mean, var = bn.running_mean[:c].clone(), bn.running_var[:c].clone()
    momentum = bn.momentum
    if bn.training:
        bn.num_batches_tracked += 1
        if momentum is None:  # cumulative average, used when re-estimating statistics of one sub-network
            momentum = 1.0 / float(bn.num_batches_tracked)
    y = F.batch_norm(x, mean, var, bn.weight[:c], bn.bias[:c], bn.training, momentum, bn.eps)
    if bn.training:
        with torch.no_grad():
            bn.running_mean[:c], bn.running_var[:c] = mean, var
    return y


class SuperBlock(nn.Module):
    """The weight-sharing version of TrioBlock: holds the widest weights of every operator type and runs the
    sub-block a Choice names by slicing them.
    design (sec. 3.1/3.3 + OURS where noted):
      * operator types do NOT share weights with each other (a conv kernel and an attention projection mean
        different things); the 1x1 reduce/expand convs and the shortcut ARE shared by all types (OURS: they are
        the ResNet bottleneck around the searched operator) and always use their first c channels;
      * within a type: smaller conv kernels / local windows use the CENTRE of the largest kernel / relative-embedding
        table (as OFA / BigNAS do for kernels); narrower widths use channel slices: the first c channels, except the
        attention's own channels, which channel_index picks (multi-head or plain sharing);
      * each type has its own BatchNorm after the operator (its output statistics differ per type)."""

    def __init__(self, in_channels, out_channels, *, mid, resolution, downsample, max_heads, max_kernel, max_window,
                 ops=SearchSpace.OPS):
        super().__init__()
        self.mid, self.max_heads, self.resolution, self.downsample = mid, max_heads, resolution, downsample
        self.reduce, self.bn_reduce = nn.Conv2d(in_channels, mid, 1, bias=False), nn.BatchNorm2d(mid)
        if "conv" in ops:
            self.conv = nn.Conv2d(mid, mid, max_kernel, bias=False)        # only .weight is used, sliced
        if "local" in ops:
            self.local = LocalSelfAttention(mid, heads=max_heads, window=max_window)
        if "axial" in ops:
            self.axial = AxialSelfAttention(mid, heads=max_heads, span=resolution)
        self.bn_op = nn.ModuleDict({op: nn.BatchNorm2d(mid) for op in ops})
        self.expand, self.bn_out = nn.Conv2d(mid, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity() if in_channels == out_channels else \
            nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))

    def attention_index(self, choice, sharing):
        return channel_index(choice, max_width=self.mid, max_heads=self.max_heads, sharing=sharing).to(self.reduce.weight.device)

    def sliced_weights(self, choice, sharing):
        """The operator's weights for `choice`, cut out of the widest ones (what extract_subnet copies). The
        attention's own channels follow channel_index (idx); its input and output are the bottleneck's first c."""
        c, mid = choice.width, self.mid
        if choice.op == "conv":
            o = (self.conv.weight.shape[-1] - choice.size) // 2            # centre of the largest kernel
            return {"weight": self.conv.weight[:c, :c, o:o + choice.size, o:o + choice.size]}
        idx = self.attention_index(choice, sharing)
        cols_in = torch.arange(c, device=idx.device)

        def qkv(w, cols):  # rows idx of each of W_q, W_k, W_v; input columns `cols`: (3c, len(cols), 1, 1)
            return w.view(3, mid, mid)[:, idx][:, :, cols].reshape(3 * c, len(cols), 1, 1)
        if choice.op == "local":
            att = self.local
            o = (att.rel.shape[-1] - choice.size) // 2                     # centre of the largest embedding table
            return {"qkv.weight": qkv(att.qkv.weight, cols_in), "rel": att.rel[idx][:, o:o + choice.size, o:o + choice.size],
                    "proj.weight": att.proj.weight[:c][:, idx]}            # W_o: attention channels idx -> first c
        att = self.axial                                                   # the width layer reads the height layer's
        return {"qkv_h.weight": qkv(att.qkv_h.weight, cols_in), "rel_h": att.rel_h[idx],  # output: columns idx
                "qkv_w.weight": qkv(att.qkv_w.weight, idx), "rel_w": att.rel_w[idx],
                "rel_bias_h": att.rel_bias_h[:choice.heads], "rel_bias_w": att.rel_bias_w[:choice.heads],  # head i
                "proj.weight": att.proj.weight[:c][:, idx]}

    def operator(self, y, choice, sharing):                                # (B, c, R, R) -> (B, c, R, R)
        w = self.sliced_weights(choice, sharing)
        if choice.op == "conv":
            return F.conv2d(y, w["weight"], padding=choice.size // 2)
        if choice.op == "local":
            y = local_attention(*F.conv2d(y, w["qkv.weight"]).chunk(3, dim=1), w["rel"], heads=choice.heads)
        else:
            y = axial_attention(*F.conv2d(y, w["qkv_h.weight"]).chunk(3, dim=1), w["rel_h"], heads=choice.heads,
                                axis="height", bias=w["rel_bias_h"])
            y = axial_attention(*F.conv2d(y, w["qkv_w.weight"]).chunk(3, dim=1), w["rel_w"], heads=choice.heads,
                                axis="width", bias=w["rel_bias_w"])
        return F.conv2d(y, w["proj.weight"])

    def reduced(self, x, choice):                                          # (B, C_in, ., .) -> (B, c, R, R)
        if self.downsample:
            x = F.avg_pool2d(x, 2)
        return x, F.relu(sliced_batch_norm(F.conv2d(x, self.reduce.weight[:choice.width]), self.bn_reduce))

    def forward(self, x, choice, sharing):
        x, y = self.reduced(x, choice)                                     # shared bottleneck: first c channels
        y = F.relu(sliced_batch_norm(self.operator(y, choice, sharing), self.bn_op[choice.op]))  # (B, c, R, R)
        y = self.bn_out(F.conv2d(y, self.expand.weight[:, :choice.width]))  # (B, C_out, R, R)
        return F.relu(y + self.shortcut(x))

    def attention_weights(self, y, choice, sharing):
        """The attention weights of `choice` on the reduced input y (B, c, R, R), for the mechanism check: local ->
        (B, h, K*K, R, R); axial -> its height layer's (B, h, R, R, R)."""
        w = self.sliced_weights(choice, sharing)
        if choice.op == "local":
            q, k, _ = F.conv2d(y, w["qkv.weight"]).chunk(3, dim=1)
            return local_attention_weights(q, k, w["rel"], heads=choice.heads)
        q, k, _ = F.conv2d(y, w["qkv_h.weight"]).chunk(3, dim=1)
        return axial_attention_weights(q, k, w["rel_h"], heads=choice.heads, bias=w["rel_bias_h"])


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
                       max_kernel=space.max_kernel, max_window=space.max_window, ops=space.ops)
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
    net = supernet.space.build(config, supernet.fc.out_features).to(supernet.fc.weight.device)

    def copy_bn(dst, src, c=None):
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(dst, name).data.copy_(getattr(src, name).data[:c])
        dst.num_batches_tracked.copy_(src.num_batches_tracked)

    with torch.no_grad():
        net.stem.load_state_dict(supernet.stem.state_dict())
        net.fc.load_state_dict(supernet.fc.state_dict())
        for blk, sup, choice in zip(net.blocks, supernet.blocks, config):
            c = choice.width
            blk.reduce.weight.copy_(sup.reduce.weight[:c])
            copy_bn(blk.bn_reduce, sup.bn_reduce, c)
            for name, w in sup.sliced_weights(choice, supernet.sharing).items():
                blk.op.get_parameter(name).copy_(w)
            copy_bn(blk.bn_op, sup.bn_op[choice.op], c)
            blk.expand.weight.copy_(sup.expand.weight[:, :c])
            copy_bn(blk.bn_out, sup.bn_out)
            blk.shortcut.load_state_dict(sup.shortcut.state_dict())
    return net


# ------------------------------------------------------------------------------------------------ data

def make_loaders(data, batch_size, device, seed, calib_batches):
    """Fresh loaders for one run (seeded: same seed, same batches): train (augmented), validation (search and model
    choice), test (final numbers only) and a FIXED calibration set (calib_batches * batch_size training images,
    un-augmented) for re-estimating the BatchNorm statistics of a sub-network."""
    train, val, test = utils.make_loaders(data, batch_size=batch_size, device=device, seed=seed)
    pick = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(seed))[:calib_batches * batch_size]
    calib = utils.DeviceLoader(data.x_train[pick], data.y_train[pick], batch_size=batch_size, train=False,
                               device=device, mean=data.mean, std=data.std)
    return train, val, test, calib


# ------------------------------------------------------------------------------------------------ train

def sandwich_step_fn(space, *, scheme, n_random, generator, label_smoothing=0.1, visited=None):
    """utils.train step_fn implementing the sandwich rule (Yu et al., BigNAS, which TrioNet's supernet training
    follows), with the operator assignment sampled first (sandwich_configs): every step back-propagates the
    largest, the smallest and n_random random sub-networks of one assignment on the same batch; their gradients
    ACCUMULATE in the shared weights and the loop then takes one optimizer step. `visited` (a list) records the
    configs. Returns the largest sub-network's loss/logits for the loop's log."""

    def step(model, x, y):
        out = None
        for cfg in sandwich_configs(space, generator, scheme=scheme, n_random=n_random):
            if visited is not None:
                visited.append(cfg)
            with utils.autocast(x.device):
                logits = model(x, cfg)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
            loss.backward()
            out = out or (loss.detach(), logits.detach())
        return out
    return step


def single_operator_config(space, op, budget, num_classes=10):
    """The all-`op` network with the most FLOPs under the budget, every block using the same candidate position
    (same size/width/heads ratios), so the single-operator baselines sit at FLOPs similar to the search's budget."""
    n = len(space.candidates[0][op])
    configs = [tuple(cands[op][i] for cands in space.candidates) for i in range(n)]
    fits = [c for c in configs if space.flops(c, num_classes) <= budget]
    return max(fits, key=lambda c: space.flops(c, num_classes)) if fits else min(configs, key=lambda c: space.flops(c, num_classes))


def budget_of(space, num_classes):
    """The search's FLOPs budget: the plain ResNet of this space (every block conv, smallest kernel, full width)."""
    k = min(c.size for c in space.candidates[0]["conv"])
    return space.flops(tuple(Choice("conv", k, space.mid[b], 1) for b in range(space.num_blocks)), num_classes)


def full_preset_models(num_classes=10):
    """Every model the full preset trains, at its real size: name -> (model, step_fn or None, image_size).
    tests/test_utils.py runs one bf16-autocast training step of each on a CPU, so a full GPU run is known to start."""
    args = get_args([])
    models = {}
    for name, sharing in (("supernet", False), ("sharing supernet", True)):
        space = space_from_args(args, sharing=sharing)
        step = sandwich_step_fn(space, scheme="hierarchical", n_random=args.n_random,
                                generator=torch.Generator().manual_seed(0))
        models[name] = (TrioNetSupernet(space, num_classes=num_classes), step, args.image_size)
    space = space_from_args(args)
    for op in space.ops:
        models[f"all-{op}"] = (space.build(single_operator_config(space, op, budget_of(space, num_classes), num_classes),
                                           num_classes), None, args.image_size)
    return models


# ------------------------------------------------------------------------------------------------ eval / search

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


def inherited_score(supernet, config, val_loader, calib_loader):
    """utils.Score (accuracy %, NLL) on the validation split of a sub-network with inherited weights, after BN
    re-estimation."""
    fwd = lambda m, x: m(x, config)
    recalibrate_bn(supernet, fwd, calib_loader)
    return utils.evaluate(supernet, val_loader, forward=fwd)


def evolutionary_search(space, fitness, *, budget, population, generations, parents, mutate_prob, generator, log,
                        num_classes=10):
    """Evolutionary search under a FLOPs budget (as in SPOS/OFA, the search TrioNet runs on its trained supernet):
    keep the `parents` best configs seen, make children by per-block mutation (resample a block hierarchically) and
    uniform crossover, reject children over budget or already scored. Returns (best config, {config: score})."""
    scores = {}
    flops = lambda c: space.flops(c, num_classes)

    def under_budget(make, pop):
        for _ in range(2000):
            c = make()
            if flops(c) <= budget and c not in scores and c not in pop:
                return c
        raise RuntimeError(f"could not find a new config under {budget / 1e6:.2f} MFLOPs: raise the budget")

    def mutate(c):
        fresh = sample_config(space, generator)
        return tuple(fresh[b] if torch.rand(1, generator=generator).item() < mutate_prob else ch for b, ch in enumerate(c))

    def crossover(a, b):
        return tuple(x if torch.rand(1, generator=generator).item() < 0.5 else y for x, y in zip(a, b))

    pop = []
    for _ in range(population):
        pop.append(under_budget(lambda: sample_config(space, generator), pop))
    for gen in range(generations):
        for c in pop:
            scores[c] = fitness(c)
        top = sorted(scores, key=scores.get, reverse=True)[:parents]
        log(f"  generation {gen + 1}/{generations}: scored {len(scores)} sub-networks, best {scores[top[0]]:.2f} "
            f"({flops(top[0]) / 1e6:.2f} MFLOPs) {' '.join(str(ch) for ch in top[0])}")
        if gen == generations - 1:
            break
        pop = []
        for i in range(population):
            a, b = top[_randint(len(top), generator)], top[_randint(len(top), generator)]
            pop.append(under_budget((lambda a=a: mutate(a)) if i % 2 == 0 else (lambda a=a, b=b: mutate(crossover(a, b))), pop))
    return max(scores, key=scores.get), scores


def flops_matched_config(space, op, flops_target, num_classes=10):
    """The all-`op` network (any candidate of `op` per block) with the most FLOPs not above `flops_target`: the
    single-operator net to compare with a searched net at equal FLOPs."""
    best = None
    for c in itertools.product(*[cands[op] for cands in space.candidates]):
        f = space.flops(c, num_classes)
        if f <= flops_target and (best is None or f > best[0]):
            best = (f, c)
    assert best is not None, f"no all-{op} network has <= {flops_target / 1e6:.2f} MFLOPs"
    return best[1]


def sharing_sensitive(space, b, ch):
    """Whether Multi-head and plain sharing give block b's choice different channels: attention with several heads
    that are narrower than the supernet's heads."""
    return ch.op != "conv" and ch.heads > 1 and ch.width // ch.heads < space.mid[b] // space.max_heads


def sharing_sensitive_configs(space, n, generator):
    """n distinct attention-only configs in which EVERY block is sharing-sensitive - exactly the sub-networks where
    Multi-head Sharing and plain sharing pick different channels (the sharing experiment's subject). Per block the
    attention type is drawn uniformly, then one of its sensitive candidates."""
    pool = [{op: [ch for ch in space.candidates[b][op] if sharing_sensitive(space, b, ch)]
             for op in ("local", "axial") if op in space.ops} for b in range(space.num_blocks)]
    pool = [{op: cs for op, cs in p.items() if cs} for p in pool]
    assert all(pool), "the space has no attention candidate whose heads can shrink: add head or width choices"
    out = []
    for _ in range(1000 * n):
        ops = [list(p)[_randint(len(p), generator)] for p in pool]
        c = tuple(p[op][_randint(len(p[op]), generator)] for p, op in zip(pool, ops))
        if c not in out:
            out.append(c)
            if len(out) == n:
                break
    return out


def probe_configs(space, args, generator):
    """The sampler experiment's fixed probe sets, drawn once before any training: per operator type, args.probes
    distinct all-<type> sub-networks (candidates uniformly per block)."""
    sets = {op: [] for op in space.ops}
    for op in space.ops:
        for _ in range(100 * args.probes):
            c = sample_candidates(space, (op,) * space.num_blocks, generator)
            if c not in sets[op]:
                sets[op].append(c)
            if len(sets[op]) == args.probes:
                break
    return sets


@torch.no_grad()
def head_alignment(supernet, x, calib_loader):
    """Mechanism check of Multi-head Sharing (sec. 3.3): do a narrow layer's heads attend like the same heads of the
    full-width layer? For every attention type and block, the images x go through the all-<type> largest network;
    at each block every sharing-sensitive choice (same window) is compared with the full layer on the same input:
        TV = 1/2 sum_j |a_ij(narrow head i) - a_ij(full head i)|, averaged over heads, queries and images,
    0 = identical attention, 1 = disjoint. Local: KxK window weights; axial: the height layer's. Also the TV of the
    full layer's attention from uniform attention: how much there is to preserve. -> {op: TV, op_vs_uniform: TV}."""
    space, out = supernet.space, {}
    for op in [o for o in space.ops if o != "conv"]:
        full = space.extreme(True, (op,) * space.num_blocks)
        recalibrate_bn(supernet, lambda m, xb: m(xb, full), calib_loader)
        h, tvs, flat = supernet.stem(x), [], []
        dim = 2 if op == "local" else 3                                    # the keys' dimension
        tv = lambda a, b: 0.5 * (a - b).abs().sum(dim).mean().item()
        for b, block in enumerate(supernet.blocks):
            _, y = block.reduced(h, full[b])
            a_full = block.attention_weights(y, full[b], supernet.sharing)
            valid = (a_full > 0).float()                                   # the keys a query can attend to
            flat.append(tv(a_full, valid / valid.sum(dim, keepdim=True)))
            for ch in space.candidates[b][op]:
                if sharing_sensitive(space, b, ch) and ch.size == full[b].size:
                    a = block.attention_weights(y[:, :ch.width], ch, supernet.sharing)  # reduce: first c channels
                    tvs.append(tv(a, a_full[:, :ch.heads]))
            h = block(h, full[b], supernet.sharing)
        out[op], out[op + "_vs_uniform"] = float(np.mean(tvs)), float(np.mean(flat))
    return out


def chi_square(counts, probs):
    """Pearson's chi-square statistic of observed counts against expected probabilities, and its p-value for
    3 categories (2 degrees of freedom, where the chi-square survival function is exactly exp(-x / 2))."""
    n = sum(counts)
    x = sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs))
    assert len(counts) == 3, "the closed-form p-value below is for 3 categories (2 degrees of freedom)"
    return x, math.exp(-x / 2)


def type_probs(space, scheme):
    """P(type) per block under a sampler, averaged over blocks: {op: probability}."""
    per_block = [{op: (1 / len(space.ops) if scheme == "hierarchical" else
                       len(c[op]) / sum(len(v) for v in c.values())) for op in space.ops} for c in space.candidates]
    return {op: float(np.mean([p[op] for p in per_block])) for op in space.ops}


# ------------------------------------------------------------------------------------------------ jobs
# Every training run is a job for utils.run_jobs: it seeds everything it uses (initial weights, batches, sampled
# sub-networks) and returns numbers or CPU state_dicts, so results do not depend on --workers or on what ran before.

def supernet_job(args, data, seed, *, sharing, scheme, probes, space_name="main", mechanism=False, state=None,
                 search=False, keep_state=False):
    """Train one supernet (or load `state`), then score every probe config (a list of lists of configs) with
    inherited weights on the validation split. mechanism: also head_alignment before and after training.
    search: also run the evolutionary search. Returns a dict of numbers (and the state_dict if keep_state)."""
    device = utils.get_device(args.device)
    space = space_from_args(args, sharing=space_name == "sharing")
    utils.set_seed(seed)
    net = TrioNetSupernet(space, num_classes=data.num_classes, sharing=sharing).to(device)
    train_loader, val, _, calib = make_loaders(data, args.batch_size, device, seed, args.calib_batches)
    name, out, t0 = f"[{space_name} {sharing} {scheme} seed {seed}]", {}, time.time()
    x_probe = next(iter(val))[0][:256]
    if mechanism:
        out["tv_init"] = head_alignment(net, x_probe, calib)
    if state is None:
        visited = []
        step = sandwich_step_fn(space, scheme=scheme, n_random=args.n_random, visited=visited,
                                generator=torch.Generator().manual_seed(seed))
        hist = utils.train(net, train_loader, epochs=args.supernet_epochs, lr=args.lr, step_fn=step, log=lambda s: None)
        out.update(train_s=time.time() - t0, loss=hist[-1]["loss"], visited=len(visited))
    else:
        net.load_state_dict(state)
    out["scores"] = [[tuple(inherited_score(net, c, val, calib)) for c in group] for group in probes]
    if mechanism:
        out["tv"] = head_alignment(net, x_probe, calib)
    if search:
        out["search"] = run_search(args, net, val, calib, seed, data.num_classes)
    if keep_state:
        out["state"] = {k: v.cpu() for k, v in net.state_dict().items()}
    accs = [s[0] for g in out["scores"] for s in g]
    trained = f"{out['train_s']:.0f}s training, final loss {out['loss']:.3f}" if state is None else "trained state reused"
    print(f"{name} {trained}" + (f"; probes' mean val acc {np.mean(accs):.1f}%" if accs else "") +
          f" ({time.time() - t0:.0f}s)", flush=True)
    return out


def run_search(args, supernet, val, calib, seed, num_classes):
    """The evolutionary search on the VALIDATION split: fitness = inherited validation accuracy."""
    space = supernet.space
    budget = budget_of(space, num_classes)
    t0 = time.time()
    best, scores = evolutionary_search(space, lambda c: inherited_score(supernet, c, val, calib).acc, budget=budget,
                                       population=args.population, generations=args.generations, parents=args.parents,
                                       mutate_prob=args.mutate_prob, generator=torch.Generator().manual_seed(seed + 1),
                                       log=lambda s: print(s, flush=True), num_classes=num_classes)
    return {"best": best, "scores": [(c, s) for c, s in scores.items()], "budget": budget, "search_s": time.time() - t0}


def build_standalone(space, config, seed, ref_config, num_classes):
    """A fresh stand-alone net whose initial weights are those of `ref_config`'s net of the same seed wherever the two
    share a weight (same name and shape: stem, fc, identical blocks), so the arms of one seed differ only where
    their architectures differ."""
    utils.set_seed(seed)
    ref = space.build(ref_config, num_classes)
    utils.set_seed(seed)
    net = space.build(config, num_classes)
    utils.copy_shared_init(ref, net)
    return net


def standalone_job(args, data, config, seed, ref_config):
    """Train one stand-alone network from scratch (paired initial weights: build_standalone) and score it on the
    validation and test splits. Returns Scores and costs."""
    device = utils.get_device(args.device)
    space = space_from_args(args)
    net = build_standalone(space, config, seed, ref_config, data.num_classes).to(device)
    train_loader, val, test, _ = make_loaders(data, args.batch_size, device, seed, args.calib_batches)
    t0 = time.time()
    hist = utils.train(net, train_loader, epochs=args.standalone_epochs, lr=args.lr, log=lambda s: None)
    out = {"val": tuple(utils.evaluate(net, val)), "test": tuple(utils.evaluate(net, test)), "train_s": time.time() - t0,
           "train_acc": hist[-1]["train_acc"], "params": utils.count_params(net)}
    print(f"[stand-alone {' '.join(map(str, config))} seed {seed}] {out['train_s']:.0f}s, val {out['val'][0]:.1f}%, "
          f"test {out['test'][0]:.1f}%", flush=True)
    return out


def axial_arm(space, config, seed, arm, num_classes):
    """One arm of the axial experiment, paired with the others of its seed (build_standalone):
    'locality' = this file's axial attention; 'uniform start' = the same with b_{j-i} = 0 at initialisation (the
    behaviour before issue 13); 'no spatial operator' = each block's operator replaced by local attention over a
    1x1 window, i.e. out = W_o W_v x: the bottleneck of 1x1 convs without any spatial mixing (the control)."""
    if arm == "no spatial operator":
        utils.set_seed(seed)
        ref = space.build(config, num_classes)
        net = TrioNet([Choice("local", 1, ch.width, ch.heads) for ch in config], stem_channels=space.stem_channels,
                      stage_channels=space.stage_channels, depths=space.depths, image_size=space.image_size,
                      num_classes=num_classes)
        utils.copy_shared_init(ref, net)
        return net
    net = build_standalone(space, config, seed, config, num_classes)
    if arm == "uniform start":
        for mod in net.modules():
            if isinstance(mod, AxialSelfAttention):
                mod.init_locality(0.0)
    return net


@torch.no_grad()
def self_attention_share(net, x):
    """Mean attention weight a_ii that the height layers of a net's axial blocks put on the query pixel itself."""
    shares, hooks = [], []
    for mod in net.modules():
        if isinstance(mod, AxialSelfAttention):
            def hook(mod, inputs, output):
                q, k, _ = mod.qkv_h(inputs[0]).chunk(3, dim=1)
                a = axial_attention_weights(q, k, mod.rel_h, heads=mod.heads, bias=mod.rel_bias_h)  # (B, h, L, L, M)
                shares.append(a.diagonal(dim1=2, dim2=3).mean().item())
            hooks.append(mod.register_forward_hook(hook))
    was = net.training
    net.eval()
    net(x)
    net.train(was)
    for h in hooks:
        h.remove()
    return float(np.mean(shares)) if shares else float("nan")


def axial_job(args, data, seed, arm):
    """Train one arm of the axial experiment; test Score and the self-attention share before and after."""
    device = utils.get_device(args.device)
    space = space_from_args(args)
    config = single_operator_config(space, "axial", budget_of(space, data.num_classes), data.num_classes)
    net = axial_arm(space, config, seed, arm, data.num_classes).to(device)
    train_loader, val, test, _ = make_loaders(data, args.batch_size, device, seed, args.calib_batches)
    x = next(iter(val if val is not None else test))[0][:128]
    share0, t0 = self_attention_share(net, x), time.time()
    utils.train(net, train_loader, epochs=args.standalone_epochs, lr=args.lr, log=lambda s: None)
    out = {"test": tuple(utils.evaluate(net, test)), "self_share_init": share0, "self_share": self_attention_share(net, x),
           "train_s": time.time() - t0}
    print(f"[axial: {arm}, seed {seed}] {out['train_s']:.0f}s, test {out['test'][0]:.1f}%", flush=True)
    return out


def run_job(kind, kwargs):
    """utils.run_jobs entry point: ("supernet" | "standalone" | "axial", keyword arguments)."""
    return {"supernet": supernet_job, "standalone": standalone_job, "axial": axial_job}[kind](**kwargs)


# ------------------------------------------------------------------------------------------------ experiments

def table(rows, header):
    cell = lambda x: f"{x:.1f}" if isinstance(x, float) else str(x)
    rows = [[cell(x) for x in r] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = lambda r: "| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |"
    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in rows])


def seeds_of(args, n):
    return list(range(args.seed, args.seed + n))


def replay_mix(space, args, steps, scheme):
    """The sub-networks the sandwich step trains, replayed from its seeded generators (the supernets of the sampler
    experiment draw exactly these). -> (operator assignment counts per type, trained block-sample counts per type)."""
    assign, trained = [0] * len(space.ops), [0] * len(space.ops)
    for seed in seeds_of(args, args.seeds):
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            configs = sandwich_configs(space, g, scheme=scheme, n_random=args.n_random)
            for ch in configs[0]:
                assign[space.ops.index(ch.op)] += 1
            for ch in (ch for cfg in configs for ch in cfg):
                trained[space.ops.index(ch.op)] += 1
    return assign, trained


def exp_sampling(args, data, out):
    """Experiment [1]: each sampler's operator mix, and the mix the supernet is actually trained on."""
    space = space_from_args(args)
    steps = args.supernet_epochs * max(len(data.x_train) // args.batch_size, 1)
    expected = {s: type_probs(space, s) for s in ("uniform", "hierarchical")}
    rows = [[f"sampler alone, {s} (expected)"] + [100 * expected[s][op] for op in space.ops] for s in expected]
    # before issue 13 the sandwich's two ends were fixed, global configurations (all-conv5 and all-local3 here), so
    # the sampler chose only n_random of the 2 + n_random sub-networks of a step:
    ends = [ch.op for end in (space.extreme(True), space.extreme(False)) for ch in end]
    before = {op: (ends.count(op) / space.num_blocks + args.n_random * expected["hierarchical"][op]) / (2 + args.n_random)
              for op in space.ops}
    rows.append(["trained, global sandwich ends (before issue 13), hierarchical (expected)"]
                + [100 * before[op] for op in space.ops])
    tests = {}
    for scheme in ("hierarchical", "uniform"):
        assign, trained = replay_mix(space, args, steps, scheme)
        chi, p = chi_square(assign, [expected[scheme][op] for op in space.ops])
        tests[scheme] = {"assignments": assign, "trained": trained, "chi2": chi, "p": p,
                         "mix": {op: t / sum(trained) for op, t in zip(space.ops, trained)}}
        rows.append([f"trained now, {scheme} ({args.seeds} seeds x {steps} steps)"]
                    + [100 * t / sum(trained) for t in trained])
    print(f"\n[1] operator type of the trained sub-networks' blocks, % (sandwich: largest + smallest + {args.n_random} "
          f"random per step; candidates per block {[len(v) for v in space.candidates[0].values()]}):")
    print(table(rows, ["what", *space.ops]))
    n = sum(tests["hierarchical"]["assignments"])
    for scheme, t in tests.items():
        print(f"chi-square of the {n} sampled block types ({scheme}) against the sampler's probabilities: "
              f"{t['chi2']:.2f}, 2 df, p = {t['p']:.2f}")
    old = n * sum((before[op] - 1 / 3) ** 2 / (1 / 3) for op in space.ops)
    print(f"power: the old rule's mix gives an expected chi-square of {old:.0f} against 1/3 each on as many samples "
          f"(p ~ {math.exp(-old / 2):.0e}); the uniform sampler's mix gives "
          f"{n * sum((expected['uniform'][op] - 1 / 3) ** 2 / (1 / 3) for op in space.ops):.0f}")
    return {"expected": expected, "before_fix": before, "trained": tests, "steps_per_run": steps}


def exp_sharing(args, data, out):
    """Experiment [2]: Multi-head vs plain sharing (sec. 3.3), attention-only space, paired supernet seeds."""
    space = space_from_args(args, sharing=True)
    probes = sharing_sensitive_configs(space, args.probes, torch.Generator().manual_seed(args.seed + 100))
    seeds, arms = seeds_of(args, args.seeds), ("multihead", "plain")
    print(f"\n[2] Multi-head vs plain sharing: attention-only space, {len(space.candidates[0]['local'])} local + "
          f"{len(space.candidates[0]['axial'])} axial candidates per block (widths x heads "
          f"{sorted({(c.width, c.heads) for c in space.candidates[0]['axial']})} in block 1), {args.seeds} paired seeds "
          f"x 2 supernets x {args.supernet_epochs} epochs; {len(probes)} sharing-sensitive sub-networks scored on "
          f"{len(data.y_val)} validation images: {[' '.join(map(str, c)) for c in probes]}", flush=True)
    jobs = [("supernet", dict(args=args, data=data, seed=s, sharing=arm, scheme="hierarchical", probes=[probes],
                              space_name="sharing", mechanism=True)) for s in seeds for arm in arms]
    res = dict(zip([(s, arm) for s in seeds for arm in arms], utils.run_jobs(run_job, jobs, workers=args.workers)))
    acc = {a: [float(np.mean([x[0] for x in res[s, a]["scores"][0]])) for s in seeds] for a in arms}
    nll = {a: [float(np.mean([x[1] for x in res[s, a]["scores"][0]])) for s in seeds] for a in arms}
    tv = {(a, op, when): [res[s, a][when][op] for s in seeds] for a in arms for op in ("local", "axial")
          for when in ("tv_init", "tv")}
    tv_flat = {f"{a}/{op}": [res[s, a]["tv"][op + "_vs_uniform"] for s in seeds] for a in arms for op in ("local", "axial")}
    rows = [[s, *(acc[a][i] for a in arms), *(f"{nll[a][i]:.3f}" for a in arms),
             *(f"{tv[a, op, 'tv'][i]:.3f}" for op in ("local", "axial") for a in arms)] for i, s in enumerate(seeds)]
    print(table(rows, ["seed", "acc multi-head", "acc plain", "NLL multi-head", "NLL plain", "TV local mh",
                       "TV local plain", "TV axial mh", "TV axial plain"]))
    verdicts = {"acc": utils.compare_paired(acc["multihead"], acc["plain"], name_a="multi-head", name_b="plain", bound=1.0),
                "nll": utils.compare_paired(nll["multihead"], nll["plain"], name_a="multi-head", name_b="plain",
                                            unit="nats", digits=3, higher_is_better=False, bound=0.02)}
    flat = {op: np.mean([res[s, a]["tv"][op + "_vs_uniform"] for s in seeds for a in arms]) for op in ("local", "axial")}
    print(f"mechanism: TV distance between a narrow layer's head i and the full layer's head i (0 = same attention); "
          f"the trained full layers' attention is itself only {flat['local']:.3f} (local) / {flat['axial']:.3f} (axial) "
          f"TV away from uniform attention:")
    for op in ("local", "axial"):
        for when in ("tv_init", "tv"):
            verdicts[f"{op}_{when}"] = utils.compare_paired(
                tv["multihead", op, when], tv["plain", op, when], name_a=f"{op} multi-head",
                name_b=f"{op} plain", unit="TV", digits=3, higher_is_better=False, bound=0.02,
                pairs="paired seeds" + (" (untrained supernets)" if when == "tv_init" else ""))
    return {"probes": [[str(ch) for ch in c] for c in probes], "acc": acc, "nll": nll,
            "tv": {f"{a}/{op}/{w}": v for (a, op, w), v in tv.items()}, "tv_full_vs_uniform": tv_flat,
            "verdicts": verdicts,
            "train_s": [res[k]["train_s"] for k in res]}


def exp_sampler(args, data, out):
    """Experiment [3]: Hierarchical vs uniform sampling (sec. 3.2), paired supernet seeds. Uniform sampling trains
    local attention more and axial less than hierarchical sampling does, so it should widen the gap between
    all-local and all-axial sub-networks. Returns (results, the state of seed --seed's hierarchical supernet)."""
    space = space_from_args(args)
    sets = probe_configs(space, args, torch.Generator().manual_seed(args.seed + 200))
    names, seeds, arms = list(sets), seeds_of(args, args.seeds), ("hierarchical", "uniform")
    mix = {a: type_probs(space, a) for a in arms}
    pct = {a: "/".join(f"{100 * mix[a][o]:.0f}" for o in space.ops) for a in arms}
    print(f"\n[3] Hierarchical vs uniform sampling: {args.seeds} paired seeds x 2 supernets x {args.supernet_epochs} "
          f"epochs; trained {'/'.join(space.ops)} mix: hierarchical {pct['hierarchical']}%, uniform {pct['uniform']}%. "
          f"Probe sets of {args.probes} sub-networks each, scored on {len(data.y_val)} validation images: {names}",
          flush=True)
    jobs = [("supernet", dict(args=args, data=data, seed=s, sharing="multihead", scheme=a,
                              probes=[sets[n] for n in names], keep_state=(s, a) == (args.seed, "hierarchical")))
            for s in seeds for a in arms]
    res = dict(zip([(s, a) for s in seeds for a in arms], utils.run_jobs(run_job, jobs, workers=args.workers)))
    score = {(a, n, m): [float(np.mean([x[m] for x in res[s, a]["scores"][i]])) for s in seeds]
             for a in arms for i, n in enumerate(names) for m in (0, 1)}
    print(table([[n, *(np.mean(score[a, n, 0]) for a in arms), *(f"{np.mean(score[a, n, 1]):.3f}" for a in arms)]
                 for n in names], ["probe set", "acc hierarchical", "acc uniform", "NLL hierarchical", "NLL uniform"]))
    verdicts = {}
    for n in names:
        verdicts[f"{n}_acc"] = utils.compare_paired(score["uniform", n, 0], score["hierarchical", n, 0],
                                                    name_a=f"all-{n} uniform", name_b="hierarchical", bound=1.0)
        verdicts[f"{n}_nll"] = utils.compare_paired(score["uniform", n, 1], score["hierarchical", n, 1],
                                                    name_a=f"all-{n} uniform", name_b="hierarchical", unit="nats", digits=3,
                                                    higher_is_better=False, bound=0.02)
    if {"local", "axial"} <= set(names):
        print("prediction: uniform sampling widens the all-local minus all-axial gap (accuracy; NLL: axial minus local)")
        gap = {a: [l - x for l, x in zip(score[a, "local", 0], score[a, "axial", 0])] for a in arms}
        gap_nll = {a: [x - l for l, x in zip(score[a, "local", 1], score[a, "axial", 1])] for a in arms}
        verdicts["gap_acc"] = utils.compare_paired(gap["uniform"], gap["hierarchical"], name_a="gap uniform",
                                                   name_b="gap hierarchical", bound=1.0)
        verdicts["gap_nll"] = utils.compare_paired(gap_nll["uniform"], gap_nll["hierarchical"], name_a="gap uniform",
                                                   name_b="gap hierarchical", unit="nats", digits=3, bound=0.02)
        for k in ("gap_acc", "gap_nll"):
            lo, hi = verdicts[k]["ci"]
            verdicts[k]["prediction"] = "holds" if lo > 0 else "contradicted" if hi < 0 else "not decided at this budget"
        print(f"-> the prediction {verdicts['gap_acc']['prediction']} in accuracy, {verdicts['gap_nll']['prediction']} "
              f"in NLL (a gap difference > 0 = uniform sampling widened the gap)")
    state = res[args.seed, "hierarchical"].get("state")
    return {"probe_sets": {n: [[str(ch) for ch in c] for c in sets[n]] for n in names},
            "scores": {f"{a}/{n}/{'acc' if m == 0 else 'nll'}": v for (a, n, m), v in score.items()},
            "verdicts": verdicts, "train_s": [res[k]["train_s"] for k in res]}, state


def exp_search(args, data, out, state=None):
    """Experiment [4]: search on validation, then "TrioNet matches the best single operator" (paper, small data):
    the searched net, the best single-operator net (chosen on VALIDATION) and a FLOPs-matched single-operator net,
    retrained over paired seeds and scored on the full test set."""
    space, nc = space_from_args(args), data.num_classes
    budget = budget_of(space, nc)
    single = {op: single_operator_config(space, op, budget, nc) for op in space.ops}
    seeds, ref = seeds_of(args, args.retrain_seeds), single["conv"] if "conv" in single else single[space.ops[0]]
    print(f"\n[4] evolutionary search under {budget / 1e6:.2f} MFLOPs (= all-conv3 ResNet) on the hierarchical supernet "
          f"of seed {args.seed}, fitness = inherited accuracy on {len(data.y_val)} validation images; meanwhile the "
          f"single-operator nets train ({args.select_seeds} seeds each, {args.standalone_epochs} epochs), then the "
          f"searched, the best and the FLOPs-matched nets over {args.retrain_seeds} paired seeds", flush=True)
    stand = lambda c, ss: [("standalone", dict(args=args, data=data, config=c, seed=s, ref_config=ref)) for s in ss]
    select = seeds[:args.select_seeds]  # every single-operator net trains on these seeds: the choice of the best
    jobs = [j for op in space.ops for j in stand(single[op], select)]  # operator is made on their VALIDATION scores
    jobs.insert(len(select), ("supernet", dict(args=args, data=data, seed=args.seed, sharing="multihead",
                                               scheme="hierarchical", probes=[], state=state, search=True)))
    res = utils.run_jobs(run_job, jobs, workers=args.workers)
    search, runs = res.pop(len(select))["search"], {}
    for i, op in enumerate(space.ops):
        runs[f"all-{op}"] = res[i * len(select):(i + 1) * len(select)]
    best_op = max(space.ops, key=lambda op: np.mean([r["val"][0] for r in runs[f"all-{op}"]]))  # chosen on VALIDATION
    searched = search["best"]
    matched = flops_matched_config(space, best_op, space.flops(searched, nc), nc)
    print(f"searched: {' '.join(map(str, searched))} ({space.flops(searched, nc) / 1e6:.2f} MFLOPs; its search score "
          f"{dict(search['scores'])[searched]:.1f}% is the best of {len(search['scores'])} noisy validation scores, "
          f"hence optimistic); best single operator on validation ({len(select)} seeds): {best_op}; FLOPs-matched "
          f"all-{best_op}: {' '.join(map(str, matched))}", flush=True)
    rest, new_matched = seeds[len(select):], matched not in (searched, single[best_op])
    more = stand(searched, seeds) + stand(single[best_op], rest) + (stand(matched, seeds) if new_matched else [])
    res2 = utils.run_jobs(run_job, more, workers=args.workers)
    runs["searched"] = res2[:len(seeds)]
    runs[f"all-{best_op}"] = runs[f"all-{best_op}"] + res2[len(seeds):len(seeds) + len(rest)]
    runs[f"all-{best_op} FLOPs-matched"] = res2[len(seeds) + len(rest):] if new_matched else \
        runs["searched" if matched == searched else f"all-{best_op}"]  # the same network: its runs, not a re-run
    configs = {**{f"all-{op}": single[op] for op in space.ops}, "searched": searched,
               f"all-{best_op} FLOPs-matched": matched}
    verdicts = report_search(args, space, nc, runs, configs, best_op)
    plot_architecture(os.path.join(out, "searched_architecture.png"), space, searched, dict(search["scores"]), budget,
                      single, nc)
    return {"searched": [str(c) for c in searched], "best_op": best_op, "budget": budget,
            "search_scored": len(search["scores"]), "search_s": search["search_s"],
            "configs": {k: [str(c) for c in v] for k, v in configs.items()},
            "runs": {k: [{m: r[m] for m in ("val", "test", "train_s", "params")} for r in v] for k, v in runs.items()},
            "verdicts": verdicts}


def report_search(args, space, nc, runs, configs, best_op):
    """The table of retrained nets (mean over paired seeds, 95% CI of test accuracy) and the equivalence verdicts."""
    rows = []
    for name, rs in runs.items():
        acc = utils.mean_ci([r["test"][0] for r in rs])
        rows.append([name, " ".join(map(str, configs[name])), len(rs), f"{rs[0]['params'] / 1e3:.0f}k",
                     f"{space.flops(configs[name], nc) / 1e6:.2f}", np.mean([r["val"][0] for r in rs]),
                     f"{acc[0]:.1f} [{acc[1]:.1f}, {acc[2]:.1f}]" if len(rs) > 1 else f"{acc[0]:.1f}",
                     f"{np.mean([r['test'][1] for r in rs]):.3f}",
                     f"{np.mean([r['train_s'] for r in rs]):.0f}"])
    print(f"stand-alone nets, {args.standalone_epochs} epochs, paired seeds; test = full test split:")
    print(table(rows, ["model", "blocks", "seeds", "params", "MFLOPs", "val %", "test % [95% CI]", "test NLL", "train s"]))
    test = {k: ([r["test"][0] for r in v], [r["test"][1] for r in v]) for k, v in runs.items()}
    verdicts = {}
    print(f"'TrioNet matches the best single operator' = the searched net is equivalent within +-{args.margin:g} points:")
    for other in (f"all-{best_op}", f"all-{best_op} FLOPs-matched"):
        if configs[other] == configs["searched"]:
            print(f"the searched net is itself the {other} net: nothing to compare")
            continue
        verdicts[other] = utils.compare_paired(test["searched"][0], test[other][0], name_a="searched", name_b=other,
                                               bound=args.margin)
        lo, hi = verdicts[other]["ci"]  # equivalence = the whole interval inside the margin (two one-sided tests)
        verdicts[other]["within_margin"] = bool(-args.margin <= lo and hi <= args.margin)
        print(f"  equivalence with margin +-{args.margin:g} points: the 95% CI [{lo:+.1f}, {hi:+.1f}] "
              f"{'lies' if verdicts[other]['within_margin'] else 'does not lie'} inside it")
        verdicts[other + " NLL"] = utils.compare_paired(test["searched"][1], test[other][1], name_a="searched",
                                                        name_b=other, unit="nats", digits=3, higher_is_better=False,
                                                        bound=args.margin_nll)
    return verdicts


def exp_axial(args, data, out):
    """Experiment [5]: why all-axial nets learned badly (issue 13) - the uniform start. Paired seeds, full test split."""
    arms, seeds = ("locality", "uniform start", "no spatial operator"), seeds_of(args, args.retrain_seeds)
    print(f"\n[5] axial attention: all-axial net with the locality-initialised bias vs the uniform start vs no spatial "
          f"operator at all (1x1 convs only), {args.retrain_seeds} paired seeds, {args.standalone_epochs} epochs",
          flush=True)
    jobs = [("axial", dict(args=args, data=data, seed=s, arm=a)) for s in seeds for a in arms]
    res = dict(zip([(s, a) for s in seeds for a in arms], utils.run_jobs(run_job, jobs, workers=args.workers)))
    get = lambda a, f: [f(res[s, a]) for s in seeds]
    rows = [[a, utils.mean_ci(get(a, lambda r: r["test"][0]))[0], f"{np.mean(get(a, lambda r: r['test'][1])):.3f}",
             f"{np.mean(get(a, lambda r: r['self_share_init'])):.2f}", f"{np.mean(get(a, lambda r: r['self_share'])):.2f}"]
            for a in arms]
    print(table(rows, ["all-axial net", "test %", "test NLL", "weight on itself, init", "after training"]))
    verdicts = {}
    for a, b in (("locality", "uniform start"), ("no spatial operator", "uniform start"), ("locality", "no spatial operator")):
        verdicts[f"{a} - {b}"] = utils.compare_paired(get(a, lambda r: r["test"][0]), get(b, lambda r: r["test"][0]),
                                                      name_a=a, name_b=b, bound=1.0)
        verdicts[f"{a} - {b} NLL"] = utils.compare_paired(get(a, lambda r: r["test"][1]), get(b, lambda r: r["test"][1]),
                                                          name_a=a, name_b=b, unit="nats", digits=3,
                                                          higher_is_better=False, bound=0.02)
    return {"arms": {a: [res[s, a] for s in seeds] for a in arms}, "verdicts": verdicts}


def plot_architecture(path, space, config, scores, budget, single, num_classes):
    """The searched architecture (operator per block) and the search's FLOPs-vs-accuracy scatter."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colours = {"conv": "#4C72B0", "local": "#55A868", "axial": "#C44E52"}
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(max(7, 1.3 * len(config) + 2), 6.5),
                                  gridspec_kw={"height_ratios": [1, 1.4]})
    for b, ch in enumerate(config):
        r = space.layout[b][2]
        what = {"conv": f"k={ch.size}", "local": f"win {ch.size}", "axial": "global"}[ch.op]
        ax.add_patch(plt.Rectangle((b, 0), 0.9, 1, color=colours[ch.op]))
        ax.text(b + 0.45, 0.5, f"{ch.op}\n{what}\nc={ch.width}" + (f" h={ch.heads}" if ch.op != "conv" else "") +
                f"\n{r}x{r}", ha="center", va="center", color="white", fontsize=8)
    ax.set_xlim(-0.1, len(config)), ax.set_ylim(0, 1), ax.axis("off")
    ax.set_title(f"searched TrioNet: operator per block ({space.flops(config, num_classes) / 1e6:.2f} MFLOPs)")
    fl = np.array([space.flops(c, num_classes) for c in scores]) / 1e6
    rgb = {op: np.array(matplotlib.colors.to_rgb(c)) for op, c in colours.items()}
    mix = [sum(rgb[ch.op] for ch in c) / len(c) for c in scores]  # colour = the blocks' operator colours, averaged
    ax2.scatter(fl, list(scores.values()), c=np.array(mix), s=25, edgecolor="k", linewidth=0.3)
    ax2.scatter([space.flops(config, num_classes) / 1e6], [scores[config]], marker="*", s=250, c="gold",
                edgecolor="k", label="searched")
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


def time_fwd_bwd(fn, shape, K, heads, steps=5):
    """Milliseconds of one forward + backward of a local attention form on random (B, c, R, R) inputs."""
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    rel = torch.randn(shape[1], K, K, requires_grad=True)
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()
        fn(q, k, v, rel, heads=heads).square().sum().backward()
    return 1e3 * (time.perf_counter() - t0) / steps


def bench(args, device):
    """Local attention, fast vs einsum (fwd + bwd per stage size), and train img/s of the stand-alone nets."""
    global local_attention
    space, nc, shape = space_from_args(args), 10, (3, args.image_size, args.image_size)
    rows = []
    for b in sorted({b for b in range(space.num_blocks)}, key=lambda b: space.layout[b][2], reverse=True):
        c, R = space.mid[b], space.layout[b][2]
        size = (args.batch_size, c, R, R)
        ref, fast = (time_fwd_bwd(f, size, space.max_window, space.max_heads) for f in (local_attention_einsum, local_attention))
        rows.append([f"local{space.max_window} attention c={c} at {R}x{R}, batch {args.batch_size}", f"{ref:.1f} ms",
                     f"{fast:.1f} ms", f"{ref / fast:.2f}x"])
    print(table(rows, ["fwd + bwd", "einsum (reference)", "elementwise (trains)", "speed-up"]))
    budget = budget_of(space, nc)
    nets = {f"all-{op}": single_operator_config(space, op, budget, nc) for op in space.ops}
    rows2 = []
    for name, config in nets.items():
        for form in ((local_attention, local_attention_einsum) if "local" in name else (local_attention,)):
            fast, local_attention = local_attention, form  # the stand-alone nets call the module-level function
            try:
                net = space.build(config, nc).to(device)
                ips, mem = utils.measure_step(net, shape, batch_size=args.batch_size, num_classes=nc, device=device)
            finally:
                local_attention = fast
            rows2.append([name + (" (einsum)" if form is local_attention_einsum else ""), f"{space.flops(config, nc) / 1e6:.2f}",
                          f"{ips:.0f}", f"{mem:.1f}"])
    print(table(rows2, ["model", "MFLOPs", "train img/s", "activation MB"]))
    return {"local_attention": rows, "models": rows2}


# ------------------------------------------------------------------------------------------------ main

def main(argv=None):
    threads = torch.get_num_threads()
    try:
        return run(argv)
    finally:
        torch.set_num_threads(threads)  # --threads must not leak into a caller (e.g. the test process)


def run(argv=None):
    args = get_args(argv)
    device, out = utils.start(args, "05_trionet_search")
    config = {k: v for k, v in vars(args).items()}
    if args.bench:
        res = bench(args, device)
        utils.save_results(os.path.join(out, "bench.json"), config, res)
        return res
    data = utils.data_from_args(args)
    print(f"data: {len(data.y_train)} train / {len(data.y_val)} validation (search, model choice) / {len(data.y_test)} "
          f"test images, {data.num_classes} classes; {args.image_size}px; device {device}; workers {args.workers}", flush=True)
    todo = args.all_experiments if args.experiment == "all" else (args.experiment,)
    results, state = {}, None
    for name in todo:
        t0 = time.time()
        if name == "sampler":
            results[name], state = exp_sampler(args, data, out)
        else:
            results[name] = {"sampling": exp_sampling, "sharing": exp_sharing, "axial": exp_axial,
                             "search": lambda *a: exp_search(*a, state=state)}[name](args, data, out)
        results[name]["wall_s"] = round(time.time() - t0, 1)
        utils.save_results(os.path.join(out, f"{name}.json"), config, results[name])
        print(f"== {name} done in {results[name]['wall_s']:.0f}s -> {out}/{name}.json ==", flush=True)
    if args.experiment == "all":  # one experiment alone writes only its own <experiment>.json
        utils.save_results(os.path.join(out, "results.json"), config, results)
    return results


if __name__ == "__main__":
    utils.run_main(main)
