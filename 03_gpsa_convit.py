"""ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases
d'Ascoli, Touvron, Leavitt, Morcos, Biroli, Sagun — ICML 2021, arXiv:2103.10697

The idea. A vision transformer (ViT/DeiT) has no notion of locality: it must learn from data that nearby patches
matter, which is why it is sample-hungry. A convolution has locality hard-wired, which makes it sample-efficient but
caps what it can express. ConViT replaces the first self-attention layers by GATED POSITIONAL SELF-ATTENTION (GPSA):
each head computes two attention maps with two separate softmaxes, a content map softmax(q.k/sqrt(d_h)) and a
positional map softmax(v_pos . r_ij) that only depends on the relative position r_ij of the two patches, and mixes
them with a learned gate sigma(lambda_h) (eq. 7-8). The positional part is initialised so that head h attends to one
patch at offset Delta_h from the query, the heads' offsets tiling a sqrt(N_h) x sqrt(N_h) grid, and the value
projection is set to the identity (eq. 5). In the sharp, fully positional limit (alpha -> infinity, gate -> 1) the
layer then IS a convolution (`tests/` proves it with allclose). At the real init (alpha = 1, sigma(1) = 0.73) it is
about 73% soft local attention plus 27% near-uniform content attention. Training
can make each head more or less local (v_pos) and more or less content-based (the gate): a "soft" convolutional
inductive bias. The class token is only concatenated after the last GPSA layer (GPSA needs a square grid of
patches), then ordinary multi-head self-attention (MHSA) layers follow. `local_up_to_layer=0` gives DeiT on the
same code path: that is our baseline.

Run (from the repo root; --experiment sample|controls|ablation|locality|maps|all, default all):
    python 03_gpsa_convit.py --quick --data ../shared/data/cifar10                      # 2 cores: 499-547 s
    python 03_gpsa_convit.py --quick --data ../shared/data/cifar10 --experiment sample   # one experiment
    python 03_gpsa_convit.py --bench --threads 1                                        # GPSA fast vs explicit
    python 03_gpsa_convit.py --data ../shared/data/cifar10                              # full preset, one GPU

Experiments (each prints a table and verdicts and writes runs/03_gpsa_convit/<experiment>.json, and a .png):
  sample    paper Table 2: ConViT vs DeiT at two training-set sizes 5x apart, epochs scaled so every run takes the
            same number of optimiser steps; paired seeds; does the gain shrink as the data grows?
  controls  at the small size: a linear classifier on pixels, a small CNN (locality hard-wired), and ConViT with its
            gate frozen fully positional (a learnable soft convolution): what a locality prior is worth at this budget;
  ablation  paper Table 3 at the small size: full ConViT, frozen gate (lambda=0), no conv init, neither, DeiT;
  locality  paper Fig. 5-6: non-locality per layer over training for ConViT and DeiT, gate sigma(lambda_h) per head;
  maps      paper Fig. 7: attention maps of one query patch in an early and a late layer of the trained models.
All runs are jobs on --workers processes; one seed = one data subset, one batch order, and DeiT's initial value for
every weight the two arms share (pair_init). Every run is scored on the full 10,000-image test set.

Sizes, mapped from the paper (224x224 ImageNet, patch 16 -> 14x14 = 196 tokens) to 32x32 CIFAR-10. Full preset =
ConViT-Ti: embed 192 = 4 heads x 48, depth 12, GPSA in the first 10 blocks, MLP ratio 4, patch 4 (8x8 = 64 tokens),
alpha = 1, AdamW. Quick preset = a shrunk ConViT-Ti: embed 48 = 4 heads x 12, depth 4, GPSA in the first 3 blocks
(3/4 local, as 10/12 in the paper), MLP ratio 2, patch 8 (4x4 = 16 tokens), batch 32, lr 2e-3, 775-780 steps per run
(25 epochs of 100 images per class, 5 epochs of 500 per class), 8 paired seeds (controls 8, ablation 6), 2 workers.
Patch 8 makes a run 4x cheaper than patch 4, which bought the seeds; with 4 heads the conv init still covers a 3x3
patch neighbourhood. Settings were fixed from run time and a validation split (--eval-split val), never from test.

RESULTS of `--quick` (this 2-core AMD EPYC CPU, torch 2.15 float32, 2 workers x 1 thread: 499 s wall, 547 s from a
clean clone, for all five experiments, 74 training runs; mean [95% CI] over paired seeds, all 10,000 test images;
full tables in the README):
    sample      img/class  DeiT %  ConViT %   ConViT - DeiT, points   NLL, nats                n
                   100      30.4     31.0     +0.7 [-0.3, +1.6]       -0.020 [-0.037, -0.002]  8   ConViT better (NLL)
                   500      31.2     31.5     +0.4 [-0.9, +1.7]       -0.012 [-0.026, +0.003]  8   not decided
      the gain at 100 - the gain at 500: +0.3 [-1.5, +2.1] points: not decided.
    controls at 100/class (8 seeds): linear on pixels 32.9%, small CNN 44.2%, DeiT 30.4%, positional-only ConViT 31.6%,
      ConViT 31.0%. CNN - DeiT = +13.9 [+12.9, +14.9]; positional-only - DeiT = +1.2 [+0.3, +2.2] (NLL -0.024
      [-0.040, -0.007]); ConViT - positional-only = -0.6 [-1.0, -0.1]; DeiT - linear = -2.5 [-3.3, -1.7] points but
      -0.056 [-0.068, -0.044] nats.
    ablation at 100/class (6 seeds), vs full ConViT: frozen gate -0.5 [-1.4, +0.4] (not decided); no conv init -1.4
      [-2.1, -0.6] (ConViT better); neither -1.6 [-2.5, -0.8] (ConViT better). ConViT - DeiT +0.5 [-0.6, +1.6].
    locality: GPSA non-locality 1.14 -> 1.19-1.27 patches over training, DeiT 2.01 -> 1.99-2.04; the gates stay at
      0.73-0.75 (start 0.73).
    bench (--bench --threads 1, fwd+bwd, batch 128, two runs): GPSA fast / explicit = 0.81-0.86x at the quick size (16
      tokens), 1.56-1.70x at 64 tokens (embed 48), 0.97-1.05x at ConViT-Ti size, where the linear projections alone
      take 64% of the layer: the issue's 1.5x target is not met at the quick and Ti sizes on this CPU (README).
  READING: the design resolves about +-1.5 points. A locality prior is worth +13.9 points at this budget, but only
  when it is hard-wired (the CNN). GPSA's soft prior gains +0.7 points (undecided) and 0.020 nats (shown) at 100 images
  per class. The conv init is what helps (ablation); the learned gate does not: the gates never move in 775 steps,
  and freezing them fully positional does better than learning them. The paper's +13 points (10% of ImageNet, 300/f
  epochs) needs a regime where DeiT learns much more than it does here; at 780 steps neither transformer beats a
  linear classifier on pixels in accuracy (they do in NLL). The full preset was NOT measured: no GPU in this task.

Deviations from the paper and the official code (github.com/facebookresearch/convit), and why:
  - Scale and recipe: CIFAR-10 at 32x32 with patch 4 (full) or 8 (quick, see above), a few hundred to a thousand
    epochs instead of 300 on ImageNet; DeiT's recipe without RandAugment, mixup, CutMix, repeated augmentation and
    drop-path (only random crop + flip and label smoothing 0.1): they are separate regularisers that would blur the
    comparison of the two inductive biases, and they cost CPU time.
  - The fast path computes (1 - g) SDPA(q, k, v) + g P v with one batch-shared P instead of the official normalised
    mix of two (B, h, N, N) maps: the same numbers (tests), because both maps are row-stochastic.
  - Head offsets: the official code's set of offsets in another order (head_centres); non-square head counts get
    local centres too (the official code leaves them random).
  - r_ij is built in the weights' dtype (the official code builds it in float32 and casts).

Notation used in shape comments: B batch, C embedding dim, H, W image size, P patch size, G = H/P patches per side,
N = G*G patch tokens, h heads (N_h in the paper), d = C/h dims per head, L depth.
"""
import argparse
import dataclasses
import math
import os
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import utils

# ------------------------------------------------------------------------------------------------ config

PRESETS = {
    # quick: CPU minutes (see the docstring for how the budget was planned).
    "quick": dict(embed_dim=48, depth=4, num_heads=4, local_up_to_layer=3, patch_size=8, mlp_ratio=2.0,
                  cnn_widths=[16, 32, 64], sizes=[100, 500], epochs=25, seeds=8, control_seeds=8, ablation_seeds=6,
                  batch_size=32, lr=2e-3, warmup_frac=0.05, snapshots=10, train_per_class=None, val_per_class=0,
                  test_per_class=None, workers=2, threads=1),
    # full: ConViT-Ti on CIFAR-10 for one GPU (not measured in this task: no GPU was available).
    "full": dict(embed_dim=192, depth=12, num_heads=4, local_up_to_layer=10, patch_size=4, mlp_ratio=4.0,
                 cnn_widths=[64, 128, 256], sizes=[500, 5000], epochs=1000, seeds=3, control_seeds=3, ablation_seeds=3,
                 batch_size=128, lr=1e-3, warmup_frac=0.02, snapshots=20, train_per_class=None, val_per_class=0,
                 test_per_class=None, workers=1, threads=None),
}


def get_args(argv=None):
    p = utils.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                             epilog="Presets (a flag you pass wins over its preset value):\n" +
                                    "\n".join(f"  {k}: {v}" for k, v in PRESETS.items()))
    p.add_argument("--experiment", default="all", choices=("sample", "controls", "ablation", "locality", "maps", "all"),
                   help="which experiment to run (default all; they share their training runs)")
    p.add_argument("--quick", action="store_true", help="CPU-sized preset (all experiments <= 10 min on 2 cores)")
    p.add_argument("--bench", action="store_true", help="only time GPSA's fast path against the explicit eq. 7-8 form")
    p.add_argument("--embed-dim", type=utils.positive_int, help="C, the token width")
    p.add_argument("--depth", type=utils.positive_int, help="L, number of blocks")
    p.add_argument("--num-heads", type=utils.positive_int, help="h; a square number tiles a sqrt(h) x sqrt(h) grid of head centres")
    p.add_argument("--local-up-to-layer", type=utils.nonneg_int, help="number of GPSA blocks before the class token (0 = DeiT)")
    p.add_argument("--patch-size", type=utils.positive_int, help="P; the image size must be divisible by it")
    p.add_argument("--mlp-ratio", type=utils.positive_float)
    p.add_argument("--locality-strength", type=utils.positive_float, default=1.0, help="alpha of eq. 5 (sharpness of the local init)")
    p.add_argument("--cnn-widths", type=utils.positive_int, nargs="+", help="channels of the control CNN's stages")
    p.add_argument("--sizes", type=utils.positive_int, nargs="+",
                   help="training images per class of the sample experiment; the smallest is also the size of the "
                        "controls, the ablation and the locality runs")
    p.add_argument("--epochs", type=utils.positive_int, help="epochs at the smallest size; a size k times larger trains "
                   "k times fewer epochs, so every run sees the same number of images (paper Table 2)")
    p.add_argument("--seeds", type=utils.positive_int, help="paired seeds (--seed, --seed+1, ...) of every comparison")
    p.add_argument("--control-seeds", type=utils.positive_int, help="paired seeds of the controls (the first ones)")
    p.add_argument("--ablation-seeds", type=utils.positive_int, help="paired seeds of the ablation (the first ones)")
    p.add_argument("--batch-size", type=utils.positive_int)
    p.add_argument("--lr", type=utils.positive_float)
    p.add_argument("--weight-decay", type=utils.nonneg_float, default=0.05)
    p.add_argument("--warmup-frac", type=utils.nonneg_float, help="linear warmup, as a fraction of each run's steps")
    p.add_argument("--snapshots", type=utils.positive_int, help="how many times the locality experiment measures during training")
    p.add_argument("--eval-split", default="test", choices=("test", "val"),
                   help="score runs on the test set, or on --val-per-class images per class carved from train "
                        "(how the quick preset's regime was checked without looking at the test set)")
    utils.add_common_args(p)
    args = p.parse_args(argv)
    utils.apply_preset(args, PRESETS["quick" if args.quick else "full"])
    if args.image_size % args.patch_size:
        p.error(f"--image-size {args.image_size} is not divisible by --patch-size {args.patch_size}")
    if args.embed_dim % args.num_heads:
        p.error(f"--embed-dim {args.embed_dim} is not divisible by --num-heads {args.num_heads}")
    if not 0 <= args.local_up_to_layer < args.depth:
        p.error(f"--local-up-to-layer must be in [0, depth={args.depth}): the class token needs >= 1 MHSA block")
    for flag in ("control_seeds", "ablation_seeds"):
        if flag in args.preset_keys:  # the preset's count follows a smaller --seeds
            setattr(args, flag, min(getattr(args, flag), args.seeds))
        if getattr(args, flag) > args.seeds:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)} is more than --seeds {args.seeds}: they are the "
                    f"first of the paired seeds")
    if args.eval_split == "val" and not args.val_per_class:
        p.error("--eval-split val needs a validation set: add e.g. --val-per-class 500")
    if args.warmup_frac >= 1:
        p.error(f"--warmup-frac must be < 1 (a fraction of each run's steps), got {args.warmup_frac}")
    args.sizes = sorted(set(args.sizes))
    return args


def fit_sizes(args, data):
    """The preset's --sizes shrink to the smallest class of a small dataset (one printed line); a size the user asked
    for that does not exist is an error."""
    smallest = int(torch.bincount(data.y_train).min())
    if max(args.sizes) <= smallest:
        return
    if "sizes" not in args.preset_keys:
        raise utils.InputError(f"--sizes {max(args.sizes)} is more than the {smallest} training images of the smallest "
                               f"class (after --val-per-class); use at most {smallest}")
    args.sizes = sorted({min(n, smallest) for n in args.sizes})
    print(f"note: this dataset is smaller than the preset, so --sizes -> {args.sizes}", flush=True)


# ------------------------------------------------------------------------------------------------ building blocks

def relative_indices(grid_size, device=None, dtype=torch.float32):
    """r_ij = (dx, dy, dx^2 + dy^2) for every (query i, key j) pair of a grid_size x grid_size patch grid (Sec. 3),
    with delta = key position - query position. Tokens are in raster order: token = y * G + x. -> (N, N, 3)"""
    ys, xs = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    pos = torch.stack([xs.flatten(), ys.flatten()], dim=1)  # (N, 2) as (x, y)
    delta = pos[None, :, :] - pos[:, None, :]               # (N_query, N_key, 2), key minus query
    return torch.cat([delta, (delta ** 2).sum(-1, keepdim=True)], dim=-1).to(device=device, dtype=dtype)  # (N, N, 3)


def head_centres(num_heads):
    """Attention centres Delta_h = (dx, dy) of the convolutional init (eq. 5), one per head, in patch units.

    A square head count h = k^2 gives the paper's k x k grid centred on the query: integer offsets {-1, 0, 1}^2 for
    9 heads (a 3x3 conv), half-integer offsets {-1/2, 1/2}^2 for 4 heads (each head then spreads evenly over a 2x2
    block: together a 3x3 receptive field). This is the official code's SET of offsets, in another ORDER: it numbers
    head i + k*j with Delta = (j - c, i - c), column by column; we number them row by row (raster order, dx fastest).
    Heads are interchangeable, so the order changes nothing but the head labels of the figures. A NON-square h (the
    official code leaves the extra heads randomly initialised) takes the h cells nearest the centre of a
    ceil(sqrt(h)) x ceil(sqrt(h)) grid (ties in raster order), e.g. h=5 -> centre + 4 neighbours, so every head
    still gets its own local centre. -> list of (dx, dy)"""
    k = math.ceil(math.sqrt(num_heads))
    c = (k - 1) / 2
    cells = [(x - c, y - c) for y in range(k) for x in range(k)]           # raster order (y outer)
    keep = sorted(range(len(cells)), key=lambda i: cells[i][0] ** 2 + cells[i][1] ** 2)[:num_heads]  # stable sort
    return [cells[i] for i in sorted(keep)]


class GPSA(nn.Module):
    """Gated positional self-attention (paper Sec. 3, eq. 7-8), for the N patch tokens of a square grid.

        A_h = normalise( (1 - sigma(lambda_h)) softmax(q_i.k_j / sqrt(d)) + sigma(lambda_h) softmax(v_pos^h . r_ij) )

    Two forms of the same layer, equal up to float rounding (tests):
      forward_explicit / get_attention   eq. 7-8 as written: both softmaxes, the gated sum, the renormalisation,
                                         then A @ V. The reference, and what the attention maps are read from.
      forward                            the fast path. The gated sum is linear in the two maps, and both are
                                         row-stochastic, so every row of the mix already sums to 1 (eq. 8 divides
                                         by 1) and A V = (1 - g) softmax(QK^T/sqrt d) V + g softmax(v_pos.r) V. The
                                         content half is one fused F.scaled_dot_product_attention (the B x h x N x N
                                         map is never stored); the positional map does not depend on the image, so
                                         it is ONE (h, N, N) matrix applied to the whole batch in one matmul per
                                         head (the official code expands r_ij to B copies)."""

    def __init__(self, dim, *, num_heads, locality_strength=1.0, use_local_init=True, qkv_bias=False):
        super().__init__()
        assert dim % num_heads == 0, f"dim={dim} must be divisible by num_heads={num_heads}: pick e.g. {num_heads * max(1, dim // num_heads)}"
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.locality_strength = locality_strength
        self.qk = nn.Linear(dim, 2 * dim, bias=qkv_bias)  # content: queries and keys
        self.v = nn.Linear(dim, dim, bias=qkv_bias)        # values, shared by both attention maps
        self.proj = nn.Linear(dim, dim)
        self.pos_proj = nn.Linear(3, num_heads)            # row h = v_pos^h, dotted with r_ij (bias: softmax-invariant)
        self.gating_param = nn.Parameter(torch.ones(num_heads))  # lambda_h, initialised to 1 (paper Sec. 3)
        self.register_buffer("rel_indices", torch.zeros(0, 0, 3), persistent=False)  # r_ij, rebuilt when N changes
        self.fast = True  # False: forward runs the explicit eq. 7-8 form (the bench times both)
        for m in (self.qk, self.v, self.proj, self.pos_proj):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        if use_local_init:
            self.local_init()

    @torch.no_grad()
    def local_init(self):
        """Eq. 5: W_val = I, and v_pos^h = alpha * (2 Delta_x, 2 Delta_y, -1) so that the positional score is
        -alpha |delta - Delta_h|^2 + alpha |Delta_h|^2: a softmax peaked at offset Delta_h, sharper for larger alpha.
        At alpha = 1 the peak is soft (about half the mass on the nearest patches), and the gate sigma(1) = 0.73
        leaves 27% to the content softmax, which is near-uniform at init (q.k ~ 0): the layer starts as ~73% soft
        local attention + ~27% global average. It IS a convolution only in the sharp limit (alpha -> infinity, gate
        -> 1, see tests)."""
        self.v.weight.copy_(torch.eye(self.dim))
        if self.v.bias is not None:
            self.v.bias.zero_()
        for h, (dx, dy) in enumerate(head_centres(self.num_heads)):
            self.pos_proj.weight[h] = self.locality_strength * torch.tensor([2 * dx, 2 * dy, -1.0])
        self.pos_proj.bias.zero_()

    def rel(self, N):
        """r_ij for N tokens, (N, N, 3), cached; built on the weights' device and in their dtype (float32, float64,
        bfloat16 all work, also for a model cast before its first forward)."""
        G = math.isqrt(N)
        assert G * G == N, f"GPSA needs a square grid of patch tokens, got N={N}: do not include the class token"
        w = self.pos_proj.weight
        if self.rel_indices.shape[0] != N or self.rel_indices.device != w.device or self.rel_indices.dtype != w.dtype:
            self.rel_indices = relative_indices(G, w.device, w.dtype)
        return self.rel_indices

    def positional_attention(self, N):
        """softmax_j(v_pos^h . r_ij): the same (h, N, N) map for every image of the batch."""
        return self.pos_proj(self.rel(N)).permute(2, 0, 1).softmax(dim=-1)                # (h, N, N)

    def get_attention(self, x):
        """Eq. 7-8 as written: x (B, N, C) -> gated attention (B, h, N, N); every row sums to 1."""
        B, N, C = x.shape
        qk = self.qk(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (2, B, h, N, d)
        q, k = qk[0], qk[1]
        content = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)                      # (B, h, N, N)
        pos = self.positional_attention(N)                                                   # (h, N, N)
        gate = torch.sigmoid(self.gating_param).view(self.num_heads, 1, 1)                   # (h, 1, 1)
        attn = (1.0 - gate) * content + gate * pos                                           # eq. 7, (B, h, N, N)
        return attn / attn.sum(dim=-1, keepdim=True)                                         # eq. 8 renormalisation

    def forward_explicit(self, x):
        """The reference form (eq. 7-8 with the B x h x N x N map materialised): what `forward` must equal."""
        B, N, C = x.shape
        attn = self.get_attention(x)                                                          # (B, h, N, N)
        v = self.v(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)            # (B, h, N, d)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))                         # (B, N, C)

    def forward(self, x):
        """Fast path: (1 - g) * SDPA(q, k, v) + g * P v, with P the batch-shared positional map (see class doc)."""
        if not self.fast:
            return self.forward_explicit(x)
        B, N, C = x.shape
        h, d = self.num_heads, self.head_dim
        q, k = self.qk(x).reshape(B, N, 2, h, d).permute(2, 0, 3, 1, 4)                     # (2, B, h, N, d)
        v = self.v(x).reshape(B, N, h, d)                                                    # (B, N, h, d)
        content = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), scale=self.scale)  # (B, h, N, d)
        v_cols = v.permute(2, 1, 0, 3).reshape(h, N, B * d)           # (h, N, B*d): the batch folded into columns
        positional = self.positional_attention(N) @ v_cols            # (h, N, B*d): one matmul per head
        positional = positional.view(h, N, B, d).permute(2, 1, 0, 3)  # (B, N, h, d)
        gate = torch.sigmoid(self.gating_param).view(h, 1)           # (h, 1), broadcast over (B, N, h, d)
        out = (1.0 - gate) * content.transpose(1, 2) + gate * positional                    # (B, N, h, d)
        return self.proj(out.reshape(B, N, C))                                              # (B, N, C)


class MHSA(nn.Module):
    """Plain multi-head self-attention (ViT/DeiT). forward uses the fused F.scaled_dot_product_attention, like
    GPSA's fast path, so ConViT and DeiT are timed like for like; get_attention writes the softmax out for the maps."""

    def __init__(self, dim, *, num_heads, qkv_bias=False):
        super().__init__()
        assert dim % num_heads == 0, f"dim={dim} must be divisible by num_heads={num_heads}"
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.fast = True  # False: forward writes the softmax out (the bench times both)

    def _qkv(self, x):
        B, T, C = x.shape  # T tokens (N patches + 1 class token)
        return self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, h, T, d)

    def get_attention(self, x):
        q, k, _ = self._qkv(x)
        return (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)  # (B, h, T, T)

    def forward_explicit(self, x):
        B, T, C = x.shape
        v = self._qkv(x)[2]
        return self.proj((self.get_attention(x) @ v).transpose(1, 2).reshape(B, T, C))  # (B, T, C)

    def forward(self, x):
        if not self.fast:
            return self.forward_explicit(x)
        B, T, C = x.shape
        q, k, v = self._qkv(x)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (B, h, T, d)
        return self.proj(out.transpose(1, 2).reshape(B, T, C))           # (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)). attn is GPSA or MHSA. LayerNorm eps 1e-6
    as the official code (timm's ViT default)."""

    def __init__(self, dim, *, num_heads, mlp_ratio=4.0, use_gpsa=False, locality_strength=1.0, use_local_init=True):
        super().__init__()
        self.use_gpsa = use_gpsa
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = (GPSA(dim, num_heads=num_heads, locality_strength=locality_strength, use_local_init=use_local_init)
                     if use_gpsa else MHSA(dim, num_heads=num_heads))
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# ------------------------------------------------------------------------------------------------ model

class ConViT(nn.Module):
    """Patch embedding + absolute position embedding -> `local_up_to_layer` GPSA blocks on the N patch tokens ->
    concatenate the class token -> MHSA blocks -> LayerNorm -> linear head on the class token (paper Fig. 4).
    local_up_to_layer=0 is DeiT: the class token joins before block 0 and every block is MHSA."""

    def __init__(self, *, img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=192, depth=12, num_heads=4,
                 mlp_ratio=4.0, local_up_to_layer=10, locality_strength=1.0, use_local_init=True):
        super().__init__()
        assert img_size % patch_size == 0, f"img_size={img_size} is not divisible by patch_size={patch_size}: change one of them"
        assert embed_dim % num_heads == 0, f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}"
        assert 0 <= local_up_to_layer < depth, (f"local_up_to_layer={local_up_to_layer} must be in [0, depth={depth}): "
                                                f"the class token needs at least one MHSA block after the GPSA blocks")
        self.local_up_to_layer, self.grid_size = local_up_to_layer, img_size // patch_size
        num_patches = self.grid_size ** 2
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, embed_dim))  # absolute, patches only
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, use_gpsa=i < local_up_to_layer,
                  locality_strength=locality_strength, use_local_init=use_local_init) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():  # ViT init of every linear layer ...
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for b in self.blocks:     # ... then the convolutional init of the GPSA layers on top (as the official code)
            if b.use_gpsa and use_local_init:
                b.attn.local_init()

    def tokens(self, x):
        x = self.patch_embed(x)                                # (B, C, G, G)
        return x.flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, C)

    def forward(self, x, return_attention=False):
        """x (B, 3, H, W) -> logits (B, num_classes); with return_attention also a list, per block, of the
        patch-to-patch attention (B, h, N, N) from the explicit form (class token row/column dropped, rows
        renormalised)."""
        x, maps = self.tokens(x), []
        for i, blk in enumerate(self.blocks):
            if i == self.local_up_to_layer:  # class token concatenated AFTER the last GPSA block
                x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N, C)
            if return_attention:
                a = blk.attn.get_attention(blk.norm1(x))
                if not blk.use_gpsa:
                    a = a[:, :, 1:, 1:]
                    a = a / a.sum(-1, keepdim=True)    # (B, h, N, N)
                maps.append(a)
            x = blk(x)
        logits = self.head(self.norm(x)[:, 0])        # class token, (B, num_classes)
        return (logits, maps) if return_attention else logits


class SmallCNN(nn.Module):
    """Control: a small CNN, locality and weight sharing hard-wired. Three stages of conv3x3 -> BatchNorm -> GELU,
    with 2x2 max-pooling between them, global average pooling, linear head."""

    def __init__(self, *, in_chans=3, num_classes=10, widths=(32, 64, 128)):
        super().__init__()
        layers, c = [], in_chans
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.GELU()]
            layers += [nn.MaxPool2d(2)] if i < len(widths) - 1 else []
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))  # (B, C, h, w) -> (B, C) -> (B, num_classes)


def nonlocality(attn, grid_size):
    """Paper Sec. 4 (Fig. 5): D_h = 1/N sum_ij A^h_ij ||delta_ij||, averaged over the batch, in patch units.
    attn (B, h, N, N) -> (h,)"""
    dist = relative_indices(grid_size, attn.device, attn.dtype)[..., 2].sqrt()  # (N, N)
    return (attn * dist).sum(-1).mean(dim=(0, 2))


def gates(model):
    """sigma(lambda_h) per GPSA layer: (local_up_to_layer, h); 1 = purely positional, 0 = purely content."""
    return torch.stack([torch.sigmoid(b.attn.gating_param.detach()) for b in model.blocks if b.use_gpsa]) \
        if model.local_up_to_layer else torch.zeros(0)


def build_model(args, num_classes, *, convit=True, use_local_init=True):
    return ConViT(img_size=args.image_size, patch_size=args.patch_size, num_classes=num_classes,
                  embed_dim=args.embed_dim, depth=args.depth, num_heads=args.num_heads, mlp_ratio=args.mlp_ratio,
                  local_up_to_layer=args.local_up_to_layer if convit else 0,
                  locality_strength=args.locality_strength, use_local_init=use_local_init)


@torch.no_grad()
def pair_init(deit, model, *, copy_values=False):
    """Paired arms: give `model` DeiT's initial value of every weight the two share. Same-named tensors (patch and
    position embeddings, class token, norms, MLPs, attention output projections, head) via utils.copy_shared_init;
    in GPSA blocks also the query/key rows of DeiT's qkv matrix and, for a GPSA without the conv init
    (copy_values=True), its value rows. The arms then differ only by design: the positional part, the gate, and
    W_val = I of the conv init. Returns the number of tensors copied."""
    n = len(utils.copy_shared_init(deit, model))
    for bd, bm in zip(deit.blocks, model.blocks):
        if bm.use_gpsa:
            C = bm.attn.dim
            bm.attn.qk.weight.copy_(bd.attn.qkv.weight[:2 * C])   # qkv rows: [queries; keys; values]
            n += 1
            if copy_values:
                bm.attn.v.weight.copy_(bd.attn.qkv.weight[2 * C:])
                n += 1
    return n


def freeze_gates(model, lam):
    """Fix lambda_h of every GPSA block at `lam` and stop training it: lam = 0 is the paper's "no gating" ablation
    (a fixed 50/50 mix), lam = +inf makes the layer purely positional (sigma = 1: a learnable soft convolution)."""
    for b in model.blocks:
        if b.use_gpsa:
            b.attn.gating_param.data.fill_(lam)
            b.attn.gating_param.requires_grad_(False)


# Every model the experiments train: arm -> (label, what it changes). Transformer arms start from the same seed's
# DeiT init for every weight they share (pair_init); the CNN and the linear model share only data and batches.
ARMS = {
    "deit": "DeiT",
    "convit": "ConViT",
    "positional": "ConViT, gate frozen fully positional",
    "frozen_gate": "ConViT, gate frozen (lambda=0)",
    "no_conv_init": "ConViT, no conv init",
    "frozen_gate_no_conv_init": "ConViT, frozen gate + no conv init",
    "cnn": "small CNN",
    "linear": "linear on pixels",
}


def build_arm(args, arm, num_classes, seed):
    """The model of one arm, seeded: same seed -> same initial values for every weight the arms share."""
    assert arm in ARMS, f"unknown arm {arm!r}: one of {list(ARMS)}"
    torch.manual_seed(seed)
    if arm == "cnn":
        return SmallCNN(num_classes=num_classes, widths=tuple(args.cnn_widths))
    if arm == "linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * args.image_size ** 2, num_classes))
    deit = build_model(args, num_classes, convit=False)
    if arm == "deit":
        return deit
    local_init = "no_conv_init" not in arm
    model = build_model(args, num_classes, convit=True, use_local_init=local_init)
    pair_init(deit, model, copy_values=not local_init)
    if arm == "positional":
        freeze_gates(model, math.inf)
    elif "frozen_gate" in arm:
        freeze_gates(model, 0.0)
    return model


def full_preset_models(num_classes=10):
    """Every model the full preset trains, at its real size: name -> (model, step_fn or None, image_size).
    tests/test_utils.py runs one bf16-autocast training step of each on a CPU, so a full GPU run is known to start."""
    args = get_args([])
    return {ARMS[arm]: (build_arm(args, arm, num_classes, seed=0), None, args.image_size)
            for arm in ("deit", "convit", "positional", "cnn", "linear")}  # the other arms: ConViT's architecture


# ------------------------------------------------------------------------------------------------ data

def nested_subset(y, n, seed):
    """n images per class (the smallest class if fewer), the same seeded order per class cut shorter: a smaller size
    is a subset of a larger one with the same seed. -> sorted indices"""
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        keep.append(idx[torch.randperm(len(idx), generator=g)][:n])
    return torch.cat(keep).sort().values


_DATA = {}  # the dataset, loaded once per process: {reference: utils.Data}


def job_data(ref):
    """Worker processes read the main process's dataset from the file `ref` (written once by main: every run then
    trains and evaluates on exactly the same images)."""
    if ref not in _DATA:
        _DATA[ref] = utils.Data(**torch.load(ref))
    return _DATA[ref]


def share_data(data, workers):
    """Register `data` for this process and, when runs go to worker processes, write it to a temporary file for
    them (main removes it). -> reference"""
    fd, ref = tempfile.mkstemp(prefix="gpsa_convit_data_", suffix=".pt")
    os.close(fd)
    if workers > 1:
        torch.save({f.name: getattr(data, f.name) for f in dataclasses.fields(data)}, ref)
    _DATA[ref] = data
    return ref


# ------------------------------------------------------------------------------------------------ train

def eval_split(args, data):
    """(x, y) the runs are scored on: the test set, or with --eval-split val a validation set carved from train."""
    return (data.x_val, data.y_val) if args.eval_split == "val" else (data.x_test, data.y_test)


def locality_tracker(model, probe, every):
    """A training step (forward, cross-entropy, backward; utils.train's default) that first measures, every `every`
    steps, the non-locality per layer and the gates on a fixed probe batch. Measuring runs under no_grad in eval mode
    and draws no random numbers, so a tracked run trains exactly like an untracked one (tests)."""
    track = {"step": [], "nonlocality": [], "gates": []}

    @torch.no_grad()
    def measure(step):
        model.eval()
        _, maps = model(probe, return_attention=True)
        model.train()
        track["step"].append(step)
        track["nonlocality"].append([nonlocality(a, model.grid_size).mean().item() for a in maps])  # per layer
        track["gates"].append(gates(model).tolist())  # (GPSA layers, heads)

    def step_fn(model, x, y):
        if step_fn.count % every == 0:
            measure(step_fn.count)
        step_fn.count += 1
        with utils.autocast(x.device):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=0.1)
        loss.backward()
        return loss, logits

    step_fn.count = 0
    return step_fn, track, measure


def run_job(args, ref, arm, n, seed, track=False):
    """One training run: `arm` on n images per class drawn with `seed`, with the batches of `seed`, for the epochs
    that keep the number of images seen constant across sizes (paper Table 2). Module-level and seeded throughout,
    so utils.run_jobs can run it in any worker process with the same result. -> dict of numbers (+ track, state)"""
    t0 = time.time()
    data, device = job_data(ref), utils.get_device(args.device)
    idx = nested_subset(data.y_train, n, seed)
    x, y = data.x_train[idx], data.y_train[idx]
    epochs = max(1, round(args.epochs * min(args.sizes) / n))
    model = build_arm(args, arm, data.num_classes, seed).to(device)
    loader = utils.DeviceLoader(x, y, batch_size=args.batch_size, device=device, train=True, mean=data.mean,
                                std=data.std, seed=seed)
    x_ev, y_ev = eval_split(args, data)
    evl = utils.DeviceLoader(x_ev, y_ev, batch_size=128, device=device, train=False, mean=data.mean, std=data.std)
    step_fn = tracked = None
    if track:
        probe = next(iter(utils.DeviceLoader(x_ev[:128], y_ev[:128], batch_size=128, device=device, train=False,
                                             mean=data.mean, std=data.std)))[0]
        step_fn, tracked, measure = locality_tracker(model, probe, max(1, epochs * len(loader) // args.snapshots))
    hist = utils.train(model, loader, epochs=epochs, lr=args.lr, weight_decay=args.weight_decay,
                       warmup_epochs=args.warmup_frac * epochs, label_smoothing=0.1, grad_clip=1.0, step_fn=step_fn,
                       log=lambda line: None)
    if track:
        measure(step_fn.count)
    score = utils.evaluate(model, evl)
    res = {"arm": arm, "n": n, "seed": seed, "acc": score.acc, "nll": score.nll, "train_acc": hist[-1]["train_acc"],
           "images": len(x), "epochs": epochs, "steps": epochs * len(loader), "params": utils.count_params(model),
           "seconds": round(time.time() - t0, 1)}
    print(f"  [{ARMS[arm]}, {n}/class, seed {seed}] {args.eval_split} {score.acc:.1f}% nll {score.nll:.3f} | train "
          f"{res['train_acc']:.1f}% | {res['steps']} steps, {res['seconds']:.0f}s", flush=True)
    if track:
        res["track"] = tracked
        res["state"] = {k: v.cpu() for k, v in model.state_dict().items()}
    return res


class Runs:
    """The training runs of one invocation, by (arm, n, seed). Experiments ask for the runs they need and share the
    ones another experiment already trained (the ablation reuses the sample experiment's ConViT and DeiT runs).
    Missing runs are trained in one batch by utils.run_jobs (--workers processes), longest first."""

    def __init__(self, args, ref):
        self.args, self.ref, self.done = args, ref, {}

    def tracked(self, arm, n, seed):  # the runs whose locality is tracked and whose weights the maps use
        return arm in ("deit", "convit") and n == min(self.args.sizes) and seed == self.args.seed

    def get(self, keys):
        todo = [k for k in dict.fromkeys(keys) if k not in self.done]
        todo.sort(key=lambda k: (k[0] in ("cnn", "linear"), k[0] == "linear"))  # stable: transformers first
        if todo:
            print(f"  training {len(todo)} runs on {min(self.args.workers, len(todo))} worker(s) ...", flush=True)
            jobs = [(self.args, self.ref, *k, self.tracked(*k)) for k in todo]
            self.done.update(zip(todo, utils.run_jobs(run_job, jobs, workers=self.args.workers)))
        return [self.done[k] for k in keys]


# ------------------------------------------------------------------------------------------------ experiments

def seeds(args, k=None):
    return [args.seed + i for i in range(k or args.seeds)]


def ci_text(runs, key, digits=1, sign=""):
    """'mean [low, high]': the mean of runs[i][key] and its 95% t-interval (sign="+" for differences)."""
    m, lo, hi = utils.mean_ci([r[key] for r in runs])
    f = lambda v: f"{v:{sign}.{digits}f}"
    return f"{f(m)} [{f(lo)}, {f(hi)}]" if len(runs) > 1 else f(m)


def verdicts(a, b, name_a, name_b):
    """The paired verdicts of arm A against arm B over the same seeds: accuracy (points) and NLL (nats)."""
    return {"acc": utils.compare_paired([r["acc"] for r in a], [r["acc"] for r in b], name_a=name_a, name_b=name_b,
                                        log=lambda s: print("    accuracy: " + s, flush=True)),
            "nll": utils.compare_paired([r["nll"] for r in a], [r["nll"] for r in b], name_a=name_a, name_b=name_b,
                                        unit="nats", digits=3, higher_is_better=False, bound=0.02,
                                        log=lambda s: print("    NLL:      " + s, flush=True))}


def print_table(header, rows):
    w = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    for r in [header] + rows:
        print("  " + " | ".join(str(c).rjust(w[i]) for i, c in enumerate(r)), flush=True)


def plot(path, draw, figsize):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=figsize)
    draw(fig, plt)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def per_seed(rs):
    return [{k: r[k] for k in ("seed", "acc", "nll", "train_acc")} for r in rs]


NEEDS = {  # experiment -> the runs (arm, images per class, seed) it reads
    "sample": lambda a: [(arm, n, s) for n in a.sizes for s in seeds(a) for arm in ("deit", "convit")],
    "controls": lambda a: [(arm, min(a.sizes), s) for s in seeds(a, a.control_seeds)
                           for arm in ("deit", "convit", "positional", "cnn", "linear")],
    "ablation": lambda a: [(arm, min(a.sizes), s) for s in seeds(a, a.ablation_seeds)
                           for arm in ("deit", "convit", "frozen_gate", "no_conv_init", "frozen_gate_no_conv_init")],
    "locality": lambda a: [(arm, min(a.sizes), a.seed) for arm in ("deit", "convit")],
    "maps": lambda a: [(arm, min(a.sizes), a.seed) for arm in ("deit", "convit")],
}
EXPERIMENTS = tuple(NEEDS)


def exp_sample(args, runs, data, out):
    """Paper Table 2: ConViT vs DeiT at each training-set size, the same number of images seen, paired seeds."""
    print(f"\n== sample efficiency: ConViT vs DeiT at {args.sizes} images per class, {args.seeds} paired seeds, "
          f"scored on {args.eval_split} ==", flush=True)
    res, rows = {"sizes": []}, []
    for n in args.sizes:
        d, c = (runs.get([(arm, n, s) for s in seeds(args)]) for arm in ("deit", "convit"))
        print(f"  {n} images per class ({d[0]['images']} images, {d[0]['epochs']} epochs, {d[0]['steps']} steps):")
        res["sizes"].append({"n": n, "images": d[0]["images"], "epochs": d[0]["epochs"], "steps": d[0]["steps"],
                             "deit": per_seed(d), "convit": per_seed(c), "verdict": verdicts(c, d, "ConViT", "DeiT")})
        rows.append([n, d[0]["epochs"], d[0]["steps"], ci_text(d, "acc"), ci_text(c, "acc"), ci_text(d, "nll", 3),
                     ci_text(c, "nll", 3), f"{ci_text(d, 'train_acc')} / {ci_text(c, 'train_acc')}"])
    print(f"  mean [95% CI] over {args.seeds} seeds, {args.eval_split} set of {len(eval_split(args, data)[1])} images:")
    print_table(["img/class", "epochs", "steps", "DeiT %", "ConViT %", "DeiT NLL", "ConViT NLL", "train % DeiT / ConViT"], rows)
    if len(args.sizes) > 1:  # does the gain shrink as the data grows (paper Table 2)?
        lo, hi = res["sizes"][0], res["sizes"][-1]
        gain = lambda s: [c["acc"] - d["acc"] for c, d in zip(s["convit"], s["deit"])]
        print("  does the gain shrink with more data? (same seeds: paired)")
        res["gain_shrinks"] = utils.compare_paired(gain(lo), gain(hi), name_a=f"gain at {lo['n']}/class",
                                                   name_b=f"gain at {hi['n']}/class",
                                                   log=lambda s: print("    accuracy: " + s, flush=True))

    def draw(fig, plt):
        ax, bx = fig.subplots(1, 2)
        for kind, label in (("deit", "DeiT"), ("convit", "ConViT")):
            ms = [utils.mean_ci([r["acc"] for r in s[kind]]) for s in res["sizes"]]
            ax.errorbar(args.sizes, [m[0] for m in ms], yerr=[[m[0] - m[1] for m in ms], [m[2] - m[0] for m in ms]],
                        fmt="o-", capsize=4, label=f"{label} (mean, 95% CI)")
        gains = [(s["verdict"]["acc"]["diff"], *s["verdict"]["acc"]["ci"]) for s in res["sizes"]]
        bx.errorbar(args.sizes, [g[0] for g in gains], yerr=[[g[0] - g[1] for g in gains], [g[2] - g[0] for g in gains]],
                    fmt="o", capsize=4, color="tab:green")
        bx.axhline(0, color="grey", lw=0.8)
        ax.set(xscale="log", xlabel="training images per class (same images seen)", ylabel=f"{args.eval_split} accuracy %",
               title="Sample efficiency (paper Table 2)")
        bx.set(xscale="log", xlabel="training images per class", ylabel="ConViT - DeiT, points",
               title=f"paired gain, 95% CI, n={args.seeds}")
        for a in (ax, bx):
            a.set_xticks(args.sizes, [str(n) for n in args.sizes])
            a.minorticks_off()
        ax.legend()
    plot(os.path.join(out, "sample.png"), draw, (9, 3.5))
    return res


def exp_controls(args, runs, data, out):
    """Controls at the low-data size: is locality worth anything at this budget (CNN), and what does GPSA's positional
    half do alone (gate frozen at sigma = 1)? The linear model on pixels shows what needs no representation at all."""
    n, k = min(args.sizes), args.control_seeds
    print(f"\n== controls at {n} images per class, {k} paired seeds ==", flush=True)
    arms = ("linear", "cnn", "deit", "positional", "convit")
    r = {arm: runs.get([(arm, n, s) for s in seeds(args, k)]) for arm in arms}
    print_table(["model", "params", f"{args.eval_split} % [95% CI]", "NLL", "train %"],
                [[ARMS[a], r[a][0]["params"], ci_text(r[a], "acc"), ci_text(r[a], "nll", 3), ci_text(r[a], "train_acc")]
                 for a in arms])
    res = {"n": n, "arms": {a: per_seed(r[a]) for a in arms}, "params": {a: r[a][0]["params"] for a in arms}, "verdicts": {}}
    for a, b in (("deit", "linear"), ("cnn", "deit"), ("positional", "deit"), ("convit", "positional")):
        print(f"  {ARMS[a]} vs {ARMS[b]}:")
        res["verdicts"][f"{a}-{b}"] = verdicts(r[a], r[b], ARMS[a], ARMS[b])
    return res


def exp_ablation(args, runs, data, out):
    """Paper Table 3 at the low-data size: which of the learned gate and the conv init carries ConViT's gain?"""
    n, k = min(args.sizes), args.ablation_seeds
    print(f"\n== ablation (paper Table 3) at {n} images per class, {k} paired seeds ==", flush=True)
    variants = (("convit", "yes", "yes"), ("frozen_gate", "no (lambda=0)", "yes"), ("no_conv_init", "yes", "no"),
                ("frozen_gate_no_conv_init", "no (lambda=0)", "no"), ("deit", "-", "-"))
    r = {v: runs.get([(v, n, s) for s in seeds(args, k)]) for v, _, _ in variants}
    diff = lambda a, b: ci_text([{"d": x["acc"] - y["acc"]} for x, y in zip(r[a], r[b])], "d", sign="+")
    print_table(["variant", "train gating", "conv init", f"{args.eval_split} % [95% CI]", "NLL", "- DeiT", "- ConViT"],
                [[ARMS[v], g, c, ci_text(r[v], "acc"), ci_text(r[v], "nll", 3), diff(v, "deit") if v != "deit" else "",
                  diff(v, "convit") if v != "convit" else ""] for v, g, c in variants])
    res = {"n": n, "variants": {v: per_seed(r[v]) for v, _, _ in variants}, "verdicts": {}}
    for v, _, _ in variants[1:-1]:
        print(f"  {ARMS[v]} vs ConViT:")
        res["verdicts"][f"{v}-convit"] = verdicts(r[v], r["convit"], ARMS[v], "ConViT")
    for v, _, _ in variants[:-1]:
        print(f"  {ARMS[v]} vs DeiT:")
        res["verdicts"][f"{v}-deit"] = verdicts(r[v], r["deit"], ARMS[v], "DeiT")

    def draw(fig, plt):
        ax = fig.add_subplot(111)
        ms = [utils.mean_ci([x["acc"] for x in r[v]]) for v, _, _ in variants][::-1]
        ax.barh([ARMS[v] for v, _, _ in variants][::-1], [m[0] for m in ms], color="tab:blue",
                xerr=[[m[0] - m[1] for m in ms], [m[2] - m[0] for m in ms]], capsize=4)
        ax.set(xlabel=f"{args.eval_split} accuracy % (mean, 95% CI, {k} seeds)", title=f"Ablation at {n} images per class (paper Table 3)")
    plot(os.path.join(out, "ablation.png"), draw, (7, 3))
    return res


def exp_locality(args, runs, data, out):
    """Paper Fig. 5-6: non-locality per layer over training for ConViT and DeiT, and the gates sigma(lambda_h)."""
    print(f"\n== locality: non-locality per layer (Fig. 5) and gates per head (Fig. 6) over training "
          f"(seed {args.seed}, {min(args.sizes)} images per class) ==", flush=True)
    tracks = {arm: r["track"] for arm, r in zip(("deit", "convit"), runs.get(NEEDS["locality"](args)))}
    L, nl = args.depth, args.local_up_to_layer
    print_table(["layer", "ConViT type", "DeiT start", "DeiT end", "ConViT start", "ConViT end"],
                [[l + 1, "GPSA" if l < nl else "MHSA"] + [f"{tracks[k]['nonlocality'][i][l]:.2f}"
                                                          for k in ("deit", "convit") for i in (0, -1)] for l in range(L)])
    g = tracks["convit"]["gates"]
    if nl:
        print("  gate sigma(lambda_h) at the end (rows: GPSA layer, columns: head; 1 = positional, start 0.73):")
        for l, row in enumerate(g[-1]):
            print(f"    layer {l + 1}: " + " ".join(f"{v:.2f}" for v in row))

    def draw(fig, plt):
        axes = fig.subplots(1, 3)
        axes[1].sharey(axes[0])  # same scale, so DeiT's and ConViT's non-locality compare at a glance
        cmap = plt.get_cmap("viridis")
        for ax, k in zip(axes[:2], ("deit", "convit")):
            t = torch.tensor(tracks[k]["nonlocality"])  # (snapshots, L)
            for l in range(L):
                ax.plot(tracks[k]["step"], t[:, l], color=cmap(l / max(1, L - 1)), label=f"layer {l + 1}")
            ax.set(xlabel="optimiser step", ylabel="non-locality (patches)", title=ARMS[k])
        axes[1].legend(fontsize=7)
        for l in range(nl):
            gt = torch.tensor(g)[:, l]  # (snapshots, h)
            for h in range(gt.shape[1]):
                axes[2].plot(tracks["convit"]["step"], gt[:, h], color=cmap(l / max(1, nl - 1)), alpha=0.8,
                             label=f"layer {l + 1}" if h == 0 else None)
        axes[2].legend(fontsize=7)
        axes[2].set(xlabel="optimiser step", ylabel="sigma(lambda_h)", title="ConViT gates, one line per head")
    plot(os.path.join(out, "locality.png"), draw, (13, 3.6))
    return {"deit": tracks["deit"], "convit": tracks["convit"], "gpsa_layers": nl}


def exp_maps(args, runs, data, out):
    """Paper Fig. 7: attention of one query patch (the centre of the grid) in the first and a late block."""
    print("\n== attention maps of a query patch, early vs late layer ==", flush=True)
    models = {}
    for arm, r in zip(("deit", "convit"), runs.get(NEEDS["maps"](args))):
        models[arm] = build_arm(args, arm, data.num_classes, r["seed"]).eval()
        models[arm].load_state_dict(r["state"])
    G = models["convit"].grid_size
    q = (G // 2) * G + G // 2  # query patch at the grid centre, raster index
    img = data.x_test[:1]
    x = (img.float() - torch.tensor(data.mean).view(1, 3, 1, 1) * 255) / (torch.tensor(data.std).view(1, 3, 1, 1) * 255)
    layers = [0, args.local_up_to_layer - 1 if args.local_up_to_layer > 1 else args.depth - 1]
    maps, rows = {}, []
    for k, m in models.items():
        with torch.no_grad():
            _, att = m(x, return_attention=True)
        maps[k] = {l: att[l][0, :, q].reshape(-1, G, G) for l in layers}  # (h, G, G)
        rows += [[ARMS[k], l + 1, " ".join(f"{v:.2f}" for v in nonlocality(att[l], G).tolist()),
                  " ".join(f"{v:.2f}" for v in maps[k][l].flatten(1).max(1).values.tolist())] for l in layers]
    print_table(["model", "layer", "non-locality per head", "max attention of the query per head"], rows)

    def draw(fig, plt):
        h = args.num_heads
        axes = fig.subplots(4, h + 1, squeeze=False)
        for r, (k, l) in enumerate([(k, l) for k in ("convit", "deit") for l in layers]):
            axes[r, 0].imshow(img[0].permute(1, 2, 0).numpy())
            axes[r, 0].add_patch(plt.Rectangle(((q % G) * args.patch_size - .5, (q // G) * args.patch_size - .5),
                                               args.patch_size, args.patch_size, fill=False, color="red"))
            axes[r, 0].set_title(f"{ARMS[k]} layer {l + 1}", fontsize=8)
            for hh in range(h):
                axes[r, hh + 1].imshow(maps[k][l][hh].numpy(), cmap="magma")
                axes[r, hh + 1].plot(q % G, q // G, "c+")
                axes[r, hh + 1].set_title(f"head {hh + 1}", fontsize=8)
        for a in axes.flat:
            a.axis("off")
    plot(os.path.join(out, "maps.png"), draw, (1.8 * (args.num_heads + 1), 7.4))
    return {"query_patch": q, "layers": [l + 1 for l in layers], "rows": rows,
            "maps": {k: {str(l + 1): v.tolist() for l, v in mk.items()} for k, mk in maps.items()}}


EXPERIMENT_FNS = {"sample": exp_sample, "controls": exp_controls, "ablation": exp_ablation, "locality": exp_locality,
                  "maps": exp_maps}


# ------------------------------------------------------------------------------------------------ bench

def set_fast(model, fast):
    """Switch every attention layer between the fast path (True) and the explicit eq. 7-8 form (False)."""
    for m in model.modules():
        if isinstance(m, (GPSA, MHSA)):
            m.fast = fast
    return model


def time_layer(layers, x, *, rounds, steps):
    """Median ms of one forward + backward of each layer on x, the layers interleaved round by round so that a
    passing load on the machine hits them alike."""
    times = {k: [] for k in layers}
    for _ in range(rounds):
        for k, f in layers.items():
            f(x).sum().backward()  # warm-up
            t0 = time.perf_counter()
            for _ in range(steps):
                f(x).sum().backward()
            times[k].append((time.perf_counter() - t0) / steps * 1e3)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def bench(args, device):
    """GPSA's fast path vs the explicit eq. 7-8 form, fwd + bwd at batch 128: one layer alone, and a whole training
    step (forward + backward) of ConViT and DeiT with every attention layer in either form."""
    out, rows = {}, []
    sizes = (("quick", PRESETS["quick"]), ("quick, patch 4", {**PRESETS["quick"], "patch_size": 4}),
             ("ConViT-Ti", PRESETS["full"]))  # quick with patch 4: the size the fast path was asked for (64 tokens)
    for size, cfg in sizes:
        C, h, N = cfg["embed_dim"], cfg["num_heads"], (args.image_size // cfg["patch_size"]) ** 2
        torch.manual_seed(0)
        layer = GPSA(C, num_heads=h).to(device)
        x = torch.randn(128, N, C, device=device, requires_grad=True)
        err = (layer(x) - layer.forward_explicit(x)).abs().max().item()
        # "linears": the layer's four projections alone (qk: 2C, v: C, proj: C outputs), the part no attention
        # rewrite can speed up; explicit - linears is the attention-side time
        linears = lambda x: layer.proj(layer.v(x) + layer.qk(x)[..., :C])
        ms = time_layer({"explicit": layer.forward_explicit, "fast": layer.forward, "linears": linears}, x, rounds=7,
                        steps=3)
        r = {"gpsa_ms": ms, "gpsa_speedup": ms["explicit"] / ms["fast"], "max_abs_diff": err}
        ns = argparse.Namespace(**{**vars(args), **{k: cfg[k] for k in ("embed_dim", "depth", "num_heads",
                                                                       "local_up_to_layer", "patch_size", "mlp_ratio")}})
        for kind in ("convit", "deit"):
            utils.set_seed(0)
            m = build_model(ns, 10, convit=kind == "convit").to(device)
            for form, fast in (("explicit", False), ("fast", True)):
                r[f"{kind}_{form}_img_s"] = utils.measure_step(set_fast(m, fast), (3, args.image_size, args.image_size),
                                                               batch_size=128, device=device, steps=2, warmup=1)[0]
        out[size] = r
        print(f"  {size}: GPSA layer (C={C}, h={h}, N={N}) explicit {ms['explicit']:.1f} ms, fast {ms['fast']:.1f} ms "
              f"-> {r['gpsa_speedup']:.2f}x (max |diff| {err:.1e}), its linear projections alone {ms['linears']:.1f} ms; "
              f"train step img/s explicit -> fast: ConViT "
              f"{r['convit_explicit_img_s']:.0f} -> {r['convit_fast_img_s']:.0f}, DeiT {r['deit_explicit_img_s']:.0f} "
              f"-> {r['deit_fast_img_s']:.0f}", flush=True)
        rows.append([size, f"{ms['explicit']:.1f}", f"{ms['fast']:.1f}", f"{r['gpsa_speedup']:.2f}x", f"{ms['linears']:.1f}",
                     f"{r['convit_explicit_img_s']:.0f} -> {r['convit_fast_img_s']:.0f}",
                     f"{r['deit_explicit_img_s']:.0f} -> {r['deit_fast_img_s']:.0f}",
                     f"{r['convit_fast_img_s'] / r['deit_fast_img_s']:.2f}"])
    print_table(["size", "GPSA explicit ms", "GPSA fast ms", "speed-up", "linears ms", "ConViT img/s", "DeiT img/s", "ConViT/DeiT"], rows)
    return out


# ------------------------------------------------------------------------------------------------ main

def main(argv=None):
    args = get_args(argv)
    device, out = utils.start(args, "03_gpsa_convit")
    if args.bench:
        print(f"== bench: GPSA fast path vs explicit eq. 7-8, fwd+bwd at batch 128 on {device} "
              f"({torch.get_num_threads()} thread(s)) ==", flush=True)
        res = bench(args, device)
        utils.save_results(os.path.join(out, "bench.json"), vars(args), res)
        return res
    data = utils.data_from_args(args)
    fit_sizes(args, data)
    print(f"data: pool of {len(data.x_train)} train images, {len(eval_split(args, data)[1])} {args.eval_split} images, "
          f"{data.num_classes} classes; model C={args.embed_dim} L={args.depth} h={args.num_heads} "
          f"GPSA blocks={args.local_up_to_layer}; device {device}, {args.workers} worker(s)", flush=True)
    todo = EXPERIMENTS if args.experiment == "all" else (args.experiment,)
    ref, results, t0 = share_data(data, args.workers), {}, time.time()
    try:
        runs = Runs(args, ref)
        runs.get([k for name in todo for k in NEEDS[name](args)])  # one batch, so that every worker stays busy
        for name in todo:
            results[name] = EXPERIMENT_FNS[name](args, runs, data, out)
            results[name]["train_core_s"] = round(sum(r["seconds"] for r in runs.get(NEEDS[name](args))), 1)
            utils.save_results(os.path.join(out, f"{name}.json"), vars(args), results[name])
    finally:
        os.remove(ref)
        _DATA.pop(ref)
    print(f"\n== {', '.join(todo)} done in {time.time() - t0:.0f}s -> {out}/*.json, *.png ==", flush=True)
    utils.save_results(os.path.join(out, "results.json"), vars(args), results)
    return results


if __name__ == "__main__":
    utils.run_main(main)
