"""ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases
d'Ascoli, Touvron, Leavitt, Morcos, Biroli, Sagun — ICML 2021, arXiv:2103.10697

The idea. A vision transformer (ViT/DeiT) has no notion of locality: it must learn from data that nearby patches
matter, which is why it is sample-hungry. A convolution has locality hard-wired, which makes it sample-efficient but
caps what it can express. ConViT replaces the first self-attention layers by GATED POSITIONAL SELF-ATTENTION (GPSA):
each head computes two attention maps with two separate softmaxes, a content map softmax(q.k/sqrt(d_h)) and a
positional map softmax(v_pos . r_ij) that only depends on the relative position r_ij of the two patches, and mixes
them with a learned gate sigma(lambda_h) (eq. 7-8). The positional part is initialised so that head h attends to one
patch at offset Delta_h from the query, the heads' offsets tiling a sqrt(N_h) x sqrt(N_h) grid: with the value
projection set to the identity the layer then IS a convolution (eq. 5; `tests/` proves it with allclose). Training
can make each head more or less local (v_pos) and more or less content-based (the gate): a "soft" convolutional
inductive bias. The class token is only concatenated after the last GPSA layer (GPSA needs a square grid of
patches), then ordinary multi-head self-attention (MHSA) layers follow. `local_up_to_layer=0` gives DeiT on the
same code path: that is our baseline.

Run (from the repo root; --experiment sample|ablation|locality|maps|all, default all):
    python 03_gpsa_convit.py --quick --data ../shared/data/cifar10                      # CPU, <= ~5 min per experiment
    python 03_gpsa_convit.py --quick --data ../shared/data/cifar10 --experiment sample   # one experiment
    python 03_gpsa_convit.py --data ../shared/data/cifar10                              # full preset, meant for one GPU
    python 03_gpsa_convit.py --bench                                                    # train-step img/s ConViT vs DeiT

Experiments (each prints a table and writes runs/03_gpsa_convit/<experiment>.json + <experiment>.png):
  sample    paper Table 2: ConViT vs DeiT on fractions f of the training set, epochs scaled by 1/f
            (constant number of optimiser steps, i.e. images seen); --low-seeds seeds at the smallest f;
  ablation  paper Table 3 at one low-data fraction: full ConViT, frozen gate, no conv init, neither, DeiT;
  locality  paper Fig. 5-6: non-locality per layer over training for ConViT and DeiT, gate sigma(lambda_h) per head;
  maps      paper Fig. 7: attention maps of one query patch in an early and a late layer of the trained models.

Sizes, mapped from the paper (224x224 ImageNet, patch 16 -> 14x14 = 196 tokens) to 32x32 CIFAR-10:
  patch 4 -> 8x8 = 64 tokens. Full preset = ConViT-Ti: embed 192 = 4 heads x 48, depth 12, GPSA in the first 10
  blocks (local_up_to_layer=10), MLP ratio 4, locality strength alpha=1, AdamW (DeiT recipe without its heavy
  augmentation, mixup and drop-path: only crop+flip and label smoothing 0.1). Quick preset = a shrunk ConViT-Ti:
  embed 48 = 4 heads x 12, depth 4, GPSA in the first 3 blocks (3/4 local, as 10/12 in the paper), MLP ratio 2,
  batch 32, on a 250-per-class CIFAR-10 pool (its "100%" is 2 500 images), 200 test images per class, 1 CPU thread.
  Why this quick preset: the paper trains 300/f epochs, long enough that DeiT over-fits small data and the soft
  convolutional prior can pay off. A few hundred steps on thousands of images under-fits both models and cannot show
  that, so the quick preset spends its ~780 steps per run on a data-starved 10% point (25 images per class, 111
  epochs) with 2 seeds, plus the 100% point (10 epochs, still compute-limited) for contrast.

RESULTS (quick preset, real CIFAR-10, 1 thread on a shared 2-core CPU, torch 2.15, 2 000 test images; measured once,
`python 03_gpsa_convit.py --quick --data ../shared/data/cifar10`, 528 s for all four; runs/03_gpsa_convit/):
  sample (231 s): ~780 optimiser steps per run (~25k images seen); train % = last epoch, on augmented batches
    fraction  images  epochs  seeds  DeiT train/test %  ConViT train/test %  gain (per seed)
      0.10      250     111     2      88.8 / 25.8         71.2 / 25.9       +0.1 (+0.7, -0.4)
      1.00     2500      10     1      35.5 / 34.2         35.7 / 33.9       -0.4
  ablation at 10% = 250 images, seed 0, 777 steps (199 s):   train %  test %
    ConViT (gated, conv init)                                  75.0    25.3
    frozen gate lambda=0                                       71.9    28.1
    no conv init                                               76.3    27.6
    frozen gate + no conv init                                 77.2    28.4
    DeiT                                                       94.2    24.6
  locality (97 s, 936 steps on 2 500 images): non-locality (mean attention distance, patches) of the GPSA layers
    starts at 1.80 vs 4.14 for DeiT and ends at 1.85-1.98 (DeiT 4.07-4.17); gates sigma(lambda_h) stay at 0.72-0.75
    (start 0.73). maps (1 s): ConViT heads look at a 2x2 neighbourhood of the query, DeiT heads everywhere.
  HONEST READING: the regime is now the paper's in one respect: at 10% both models are trained long on few images and
  DeiT over-fits much more (train 88.8% vs 71.2%), i.e. the GPSA prior does regularise. But it does NOT turn into
  better test accuracy here: ConViT and DeiT tie at 10% (25.9 vs 25.8, the two seeds disagree in sign) and at 100%
  (33.9 vs 34.2); the std of one accuracy on 2 000 test images is ~1 point, and seed-to-seed spread is ~1-2 points.
  In the ablation every GPSA variant is ahead of DeiT (+0.7 to +3.8), but the full gated, conv-initialised ConViT
  is the weakest of them, the opposite of the paper's Table 3 ordering; one seed, so treat +-2 points as noise.
  The paper's effect (gains that grow as the data shrinks, largest at 5-10% of ImageNet with 300/f epochs) needs far
  more compute than 780 steps of a 4-layer, 48-wide model on 25 images per class; run the full preset.
  PREVIOUS quick preset (pool 500/class, fractions 0.1/0.25/0.5/1.0, ~468 steps, 1 000 test images; kept in
  runs/03_gpsa_convit/previous_quick_preset/): both models under-fit (train 40-50%) and DeiT led at 10% (32.1 vs
  27.2), -0.5/-0.9/+0.2 at 25/50/100%; with 4x the steps at 10% (1 875 steps) DeiT over-fit (train 89.8%, test
  31.5%) and ConViT got 33.1%.
  bench (batch 128, fwd+bwd, 1 CPU thread): ConViT/DeiT train img/s = 519/695 = 0.75 at the quick size,
  30.5/30.1 = 1.01 at ConViT-Ti size (where the linear layers dominate); no GPU was available to time.
The full preset was NOT measured: no GPU was available in this task.

Notation used in shape comments: B batch, C embedding dim, H, W image size, P patch size, G = H/P patches per side,
N = G*G patch tokens, h heads (N_h in the paper), d = C/h dims per head, L depth.
"""
import argparse
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import utils

# ------------------------------------------------------------------------------------------------ config

PRESETS = {
    # quick: CPU minutes. 250 images per class form the pool ("100%"); fractions are taken from it. ~780 optimiser
    # steps per run: at 10% (25 images per class, ~110 epochs) the models are trained long on few images, the
    # paper's data-starved regime; at 100% (10 epochs) they are still compute-limited. 2 seeds at the low-data point.
    "quick": dict(embed_dim=48, depth=4, num_heads=4, local_up_to_layer=3, patch_size=4, mlp_ratio=2.0,
                  train_per_class=250, test_per_class=200, fractions=[0.1, 1.0], base_epochs=10, low_seeds=2,
                  ablation_fraction=0.1, track_epochs=12, batch_size=32, lr=2e-3, warmup_epochs=0.5, snapshots=10,
                  threads=1),  # 1 thread: on a shared 2-core box, 2 OpenMP threads collapsed to ~20 img/s (measured)
    # full: ConViT-Ti on all of CIFAR-10, for one GPU (not measured in this task).
    "full": dict(embed_dim=192, depth=12, num_heads=4, local_up_to_layer=10, patch_size=4, mlp_ratio=4.0,
                 train_per_class=None, test_per_class=None, fractions=[0.05, 0.1, 0.25, 0.5, 1.0], base_epochs=100,
                 ablation_fraction=0.1, track_epochs=100, batch_size=128, lr=1e-3, warmup_epochs=5.0, snapshots=20,
                 threads=None, low_seeds=1),
}
EXPERIMENTS = ("sample", "ablation", "locality", "maps")


def get_args(argv=None):
    p = utils.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Presets (a flag you pass wins over its preset value):\n" +
                                       "\n".join(f"  {k}: {v}" for k, v in PRESETS.items()))
    p.add_argument("--experiment", default="all", choices=EXPERIMENTS + ("all",), help="which experiment to run")
    p.add_argument("--quick", action="store_true", help="CPU-sized preset (<= ~5 min per experiment on 2 cores)")
    p.add_argument("--bench", action="store_true", help="only measure train-step img/s of ConViT vs DeiT at batch 128")
    p.add_argument("--embed-dim", type=utils.positive_int, help="C, the token width")
    p.add_argument("--depth", type=utils.positive_int, help="L, number of blocks")
    p.add_argument("--num-heads", type=utils.positive_int, help="h; a square number tiles a sqrt(h) x sqrt(h) grid of head centres")
    p.add_argument("--local-up-to-layer", type=utils.nonneg_int, help="number of GPSA blocks before the class token (0 = DeiT)")
    p.add_argument("--patch-size", type=utils.positive_int, help="P; the image size must be divisible by it")
    p.add_argument("--mlp-ratio", type=utils.positive_float)
    p.add_argument("--locality-strength", type=utils.positive_float, default=1.0, help="alpha of eq. 5 (sharpness of the local init)")
    p.add_argument("--fractions", type=utils.positive_float, nargs="+", help="training-set fractions for the sample experiment")
    p.add_argument("--base-epochs", type=utils.positive_int, help="epochs at fraction 1; fraction f trains ~base/f epochs")
    p.add_argument("--low-seeds", type=utils.positive_int, help="seeds (--seed, --seed+1, ...) for the smallest fraction of the "
                   "sample experiment, where the variance is largest; the table reports their mean")
    p.add_argument("--ablation-fraction", type=utils.positive_float, help="low-data fraction used by the ablation")
    p.add_argument("--batch-size", type=utils.positive_int)
    p.add_argument("--lr", type=utils.positive_float)
    p.add_argument("--weight-decay", type=utils.nonneg_float, default=0.05)
    p.add_argument("--warmup-epochs", type=utils.positive_float, help="warmup at fraction 1 (scaled by 1/f like the epochs)")
    p.add_argument("--track-epochs", type=utils.positive_int, help="epochs of the two runs the locality and maps experiments analyse")
    p.add_argument("--snapshots", type=utils.positive_int, help="how many times the locality experiment measures during training")
    utils.add_common_args(p)
    args = p.parse_args(argv)
    utils.apply_preset(args, PRESETS["quick" if args.quick else "full"])
    if args.image_size % args.patch_size:
        p.error(f"--image-size {args.image_size} is not divisible by --patch-size {args.patch_size}")
    if args.embed_dim % args.num_heads:
        p.error(f"--embed-dim {args.embed_dim} is not divisible by --num-heads {args.num_heads}")
    if not 0 <= args.local_up_to_layer < args.depth:
        p.error(f"--local-up-to-layer must be in [0, depth={args.depth}): the class token needs >= 1 MHSA block")
    if args.low_seeds < 1:
        p.error(f"--low-seeds must be >= 1, got {args.low_seeds}")
    if not all(0 < f <= 1 for f in args.fractions + [args.ablation_fraction]):
        p.error("--fractions and --ablation-fraction must lie in (0, 1]")
    return args


# ------------------------------------------------------------------------------------------------ building blocks

def relative_indices(grid_size, device=None):
    """r_ij = (dx, dy, dx^2 + dy^2) for every (query i, key j) pair of a grid_size x grid_size patch grid (Sec. 3),
    with delta = key position - query position. Tokens are in raster order: token = y * G + x. -> (N, N, 3)"""
    ys, xs = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    pos = torch.stack([xs.flatten(), ys.flatten()], dim=1)  # (N, 2) as (x, y)
    delta = pos[None, :, :] - pos[:, None, :]               # (N_query, N_key, 2), key minus query
    return torch.cat([delta, (delta ** 2).sum(-1, keepdim=True)], dim=-1).float().to(device)  # (N, N, 3)


def head_centres(num_heads):
    """Attention centres Delta_h = (dx, dy) of the convolutional init (eq. 5), one per head, in patch units.

    A square head count h = k^2 gives the paper's k x k grid centred on the query, as in the official code: integer
    offsets {-1, 0, 1}^2 for 9 heads (a 3x3 conv), half-integer offsets {-1/2, 1/2}^2 for 4 heads (each head then
    spreads evenly over a 2x2 block: together a 3x3 receptive field). A NON-square h (the official code leaves the
    extra heads random) takes the h cells nearest the centre of a ceil(sqrt(h)) x ceil(sqrt(h)) grid (ties in raster
    order), e.g. h=5 -> centre + 4 neighbours, so every head still gets its own local centre. -> list of (dx, dy)"""
    k = math.ceil(math.sqrt(num_heads))
    c = (k - 1) / 2
    cells = [(x - c, y - c) for y in range(k) for x in range(k)]           # raster order (y outer)
    keep = sorted(range(len(cells)), key=lambda i: cells[i][0] ** 2 + cells[i][1] ** 2)[:num_heads]  # stable sort
    return [cells[i] for i in sorted(keep)]


class GPSA(nn.Module):
    """Gated positional self-attention (paper Sec. 3, eq. 7-8), for the N patch tokens of a square grid.

    A_h = normalise( (1 - sigma(lambda_h)) softmax(q_i.k_j / sqrt(d)) + sigma(lambda_h) softmax(v_pos^h . r_ij) )
    The positional scores do not depend on the input, so they are computed once per forward, (h, N, N), and
    broadcast over the batch (the official code expands r_ij to B copies first)."""

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
        for m in (self.qk, self.v, self.proj, self.pos_proj):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        if use_local_init:
            self.local_init()

    @torch.no_grad()
    def local_init(self):
        """Eq. 5: W_val = I, and v_pos^h = alpha * (2 Delta_x, 2 Delta_y, -1) so that the positional score is
        -alpha |delta - Delta_h|^2 + alpha |Delta_h|^2: a softmax peaked at offset Delta_h, sharper for larger alpha."""
        self.v.weight.copy_(torch.eye(self.dim))
        if self.v.bias is not None:
            self.v.bias.zero_()
        for h, (dx, dy) in enumerate(head_centres(self.num_heads)):
            self.pos_proj.weight[h] = self.locality_strength * torch.tensor([2 * dx, 2 * dy, -1.0])
        self.pos_proj.bias.zero_()

    def _rel(self, N, device):
        G = math.isqrt(N)
        assert G * G == N, f"GPSA needs a square grid of patch tokens, got N={N}: do not include the class token"
        if self.rel_indices.shape[0] != N or self.rel_indices.device != device:
            self.rel_indices = relative_indices(G, device)  # (N, N, 3)
        return self.rel_indices

    def get_attention(self, x):
        """x (B, N, C) -> gated attention (B, h, N, N); every row sums to 1."""
        B, N, C = x.shape
        qk = self.qk(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (2, B, h, N, d)
        q, k = qk[0], qk[1]
        content = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)                      # (B, h, N, N)
        # positional scores v_pos^h . r_ij: once per forward, shared by all B images
        pos = self.pos_proj(self._rel(N, x.device)).permute(2, 0, 1).softmax(dim=-1)         # (h, N, N)
        gate = torch.sigmoid(self.gating_param).view(self.num_heads, 1, 1)                   # (h, 1, 1)
        attn = (1.0 - gate) * content + gate * pos                                           # eq. 7, (B, h, N, N)
        return attn / attn.sum(dim=-1, keepdim=True)  # eq. 8 renormalisation (exact already up to rounding)

    def forward(self, x):
        B, N, C = x.shape
        attn = self.get_attention(x)                                                          # (B, h, N, N)
        v = self.v(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)            # (B, h, N, d)
        out = (attn @ v).transpose(1, 2).reshape(B, N, C)                                     # (B, N, C)
        return self.proj(out)


class MHSA(nn.Module):
    """Plain multi-head self-attention (ViT/DeiT). Attention is written out (no fused kernel) so that its maps can be
    read and so that the ConViT-vs-DeiT speed comparison is like for like."""

    def __init__(self, dim, *, num_heads, qkv_bias=False):
        super().__init__()
        assert dim % num_heads == 0, f"dim={dim} must be divisible by num_heads={num_heads}"
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, x):
        B, T, C = x.shape  # T tokens (N patches + 1 class token)
        return self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, h, T, d)

    def get_attention(self, x):
        q, k, _ = self._qkv(x)
        return (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)  # (B, h, T, T)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self._qkv(x)
        attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)  # (B, h, T, T)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)). attn is GPSA or MHSA."""

    def __init__(self, dim, *, num_heads, mlp_ratio=4.0, use_gpsa=False, locality_strength=1.0, use_local_init=True):
        super().__init__()
        self.use_gpsa = use_gpsa
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
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
        self.norm = nn.LayerNorm(embed_dim)
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
        x = self.patch_embed(x)                        # (B, C, G, G)
        return x.flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, C)

    def forward(self, x, return_attention=False):
        """x (B, 3, H, W) -> logits (B, num_classes); with return_attention also a list, per block, of the
        patch-to-patch attention (B, h, N, N) (class token row/column dropped, rows renormalised)."""
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


def nonlocality(attn, grid_size):
    """Paper Sec. 4 (Fig. 5): D_h = 1/N sum_ij A^h_ij ||delta_ij||, averaged over the batch, in patch units.
    attn (B, h, N, N) -> (h,)"""
    dist = relative_indices(grid_size, attn.device)[..., 2].sqrt()  # (N, N)
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


def full_preset_models(num_classes=10):
    """Every model the full preset trains, at its real size: name -> (model, step_fn or None, image_size).
    tests/test_utils.py runs one bf16-autocast training step of each on a CPU, so a full GPU run is known to start."""
    args = get_args([])
    return {name: (build_model(args, num_classes, convit=convit), None, args.image_size)
            for name, convit in (("DeiT", False), ("ConViT", True))}


# ------------------------------------------------------------------------------------------------ data

def fraction_subset(y, frac, seed):
    """Stratified subset of a fraction of each class, nested: a smaller fraction is a subset of a larger one
    (the same seeded order per class, cut shorter). -> sorted indices"""
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        keep.append(idx[:max(1, round(frac * len(idx)))])
    return torch.cat(keep).sort().values


# ------------------------------------------------------------------------------------------------ train

def train_one(args, data, device, *, frac, convit=True, use_local_init=True, freeze_gate=False, name="",
              step_hook=None, base_epochs=None, seed=None):
    """Train one model on `frac` of the training pool with the number of optimiser steps kept constant (epochs ~ 1/f,
    paper Table 2) and return (model, test accuracy %, info dict)."""
    base_epochs = base_epochs or args.base_epochs
    seed = args.seed if seed is None else seed  # seeds the subset, the init and the batch order
    utils.set_seed(seed)
    idx = fraction_subset(data.y_train, frac, seed)
    x, y = data.x_train[idx], data.y_train[idx]
    bs = min(args.batch_size, len(x))
    steps_full = max(1, len(data.x_train) // min(args.batch_size, len(data.x_train))) * base_epochs
    epochs = max(1, round(steps_full / max(1, len(x) // bs)))  # same steps (= images seen) as base_epochs at f=1
    model = build_model(args, data.num_classes, convit=convit, use_local_init=use_local_init).to(device)
    if freeze_gate:  # ablation "no gating": lambda_h frozen at 0, a fixed 50/50 mix of content and position
        for b in model.blocks:
            if b.use_gpsa:
                b.attn.gating_param.data.zero_()
                b.attn.gating_param.requires_grad_(False)
    loader = utils.DeviceLoader(x, y, batch_size=bs, device=device, train=True, mean=data.mean, std=data.std, seed=seed)
    test = utils.DeviceLoader(data.x_test, data.y_test, batch_size=256, device=device, train=False, mean=data.mean, std=data.std)
    every, seen = max(1, epochs // 4), [0]

    def log(line):  # print epoch 1, every `every`-th epoch and the last one
        seen[0] += 1
        if seen[0] == 1 or seen[0] % every == 0 or seen[0] == epochs:
            print("  " + line, flush=True)

    t0 = time.time()
    hist = utils.train(model, loader, epochs=epochs, lr=args.lr, weight_decay=args.weight_decay,
                warmup_epochs=args.warmup_epochs * epochs / base_epochs, label_smoothing=0.1, grad_clip=1.0,
                step_fn=step_hook, log=log, name=name)
    acc = utils.evaluate(model, test).acc
    info = {"train_images": len(x), "epochs": epochs, "steps": epochs * len(loader), "test_acc": acc,
            "train_acc": hist[-1]["train_acc"],  # last epoch, on augmented batches: how well it fits its images
            "params": utils.count_params(model), "train_s": round(time.time() - t0, 1)}
    print(f"  {name}-> test {acc:.1f}% ({len(x)} images, {epochs} epochs, {info['steps']} steps, {info['train_s']}s)", flush=True)
    return model, acc, info


# ------------------------------------------------------------------------------------------------ experiments

def print_table(header, rows):
    w = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    for r in [header] + rows:
        print("  " + " | ".join(str(c).rjust(w[i]) for i, c in enumerate(r)), flush=True)


def exp_sample(args, data, device, out):
    """Paper Table 2: accuracy vs training fraction for ConViT and DeiT, constant images seen."""
    print(f"\n== sample efficiency: fractions {args.fractions} of {len(data.x_train)} images ==", flush=True)
    rows = []
    for f in args.fractions:
        seeds = [args.seed + i for i in range(args.low_seeds if f == min(args.fractions) else 1)]
        r = {"fraction": f, "seeds": seeds}
        for kind in ("deit", "convit"):
            accs, fits = [], []
            for s in seeds:
                _, acc, info = train_one(args, data, device, frac=f, convit=kind == "convit", seed=s,
                                         name=f"{kind} f={f} seed={s} ")
                accs.append(acc), fits.append(info["train_acc"])
            r[kind], r[kind + "_per_seed"] = sum(accs) / len(accs), accs   # test % (mean over seeds)
            r[kind + "_train"] = sum(fits) / len(fits)                      # train % of the last epoch (mean)
            r["train_images"], r["epochs"], r["steps"] = info["train_images"], info["epochs"], info["steps"]
        r["gain_per_seed"] = [c - d for c, d in zip(r["convit_per_seed"], r["deit_per_seed"])]
        rows.append(r)
    print_table(["fraction", "images", "epochs", "steps", "seeds", "DeiT train/test %", "ConViT train/test %", "gain",
                 "gain per seed"],
                [[r["fraction"], r["train_images"], r["epochs"], r["steps"], len(r["seeds"]),
                  f"{r['deit_train']:.1f} / {r['deit']:.1f}", f"{r['convit_train']:.1f} / {r['convit']:.1f}",
                  f"{r['convit'] - r['deit']:+.1f}", " ".join(f"{g:+.1f}" for g in r["gain_per_seed"])] for r in rows])
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for kind, lab in (("deit", "DeiT"), ("convit", "ConViT")):
        line, = ax.plot([r["fraction"] for r in rows], [r[kind] for r in rows], "o-", label=lab + " (mean)")
        ax.plot([r["fraction"] for r in rows for _ in r["seeds"]], [a for r in rows for a in r[kind + "_per_seed"]],
                "x", color=line.get_color(), alpha=0.6)  # one cross per seed
    ax.set(xscale="log", xlabel="fraction of training set (epochs x 1/f)", ylabel="test accuracy %",
           title="Sample efficiency (paper Table 2)")
    ax.legend(), fig.tight_layout(), fig.savefig(os.path.join(out, "sample.png"), dpi=120), plt.close(fig)
    return {"rows": rows}


def exp_ablation(args, data, device, out):
    """Paper Table 3 at one low-data fraction."""
    f = args.ablation_fraction
    print(f"\n== ablation at fraction {f} ==", flush=True)
    variants = [("ConViT (gated, conv init)", dict()), ("frozen gate lambda=0", dict(freeze_gate=True)),
                ("no conv init", dict(use_local_init=False)), ("frozen gate + no conv init", dict(freeze_gate=True, use_local_init=False)),
                ("DeiT", dict(convit=False))]
    rows = []
    for label, kw in variants:
        _, acc, info = train_one(args, data, device, frac=f, name=f"[{label}] ", **kw)
        rows.append({"variant": label, "test_acc": acc,
                     **{k: info[k] for k in ("train_acc", "train_images", "epochs", "steps", "params")}})
    print_table(["variant", "train %", "test %"], [[r["variant"], f"{r['train_acc']:.1f}", f"{r['test_acc']:.1f}"] for r in rows])
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh([r["variant"] for r in rows][::-1], [r["test_acc"] for r in rows][::-1], color="tab:blue")
    ax.set(xlabel="test accuracy %", title=f"Ablation at {f:.0%} of the training pool (paper Table 3)")
    fig.tight_layout(), fig.savefig(os.path.join(out, "ablation.png"), dpi=120), plt.close(fig)
    return {"fraction": f, "rows": rows}


def train_tracked(args, data, device):
    """Train ConViT and DeiT on the whole pool, measuring non-locality per layer (and the gates) `snapshots` times
    on a fixed batch of 128 test images (analysis only, nothing is selected on it)."""
    probe = (data.x_test[:128].float() - torch.tensor(data.mean).view(1, 3, 1, 1) * 255) / (torch.tensor(data.std).view(1, 3, 1, 1) * 255)
    probe = probe.to(device)
    tracks, models = {}, {}
    for kind in ("convit", "deit"):
        steps_total = (len(data.x_train) // min(args.batch_size, len(data.x_train))) * args.track_epochs
        every = max(1, steps_total // args.snapshots)
        track = {"step": [], "nonlocality": [], "gates": []}

        @torch.no_grad()
        def measure(model, step):
            model.eval()
            _, maps = model(probe, return_attention=True)
            model.train()
            track["step"].append(step)
            track["nonlocality"].append([nonlocality(a, model.grid_size).mean().item() for a in maps])  # per layer
            track["gates"].append(gates(model).tolist())  # (layers, heads)

        counter = [0]

        def step_fn(model, x, y):  # the default step (forward, CE, backward) + a measurement every `every` steps
            if counter[0] % every == 0:
                measure(model, counter[0])
            counter[0] += 1
            with utils.autocast(x.device):
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=0.1)
            loss.backward()
            return loss, logits

        model, acc, info = train_one(args, data, device, frac=1.0, convit=kind == "convit", name=f"{kind} ",
                                     step_hook=step_fn, base_epochs=args.track_epochs)
        measure(model, counter[0])
        tracks[kind], models[kind] = {**track, "test_acc": acc}, model
    return tracks, models


def exp_locality(args, data, device, out, trained):
    print("\n== locality: non-locality per layer (Fig. 5) and gates per head (Fig. 6) over training ==", flush=True)
    tracks, _ = trained
    L, nl = args.depth, args.local_up_to_layer
    rows = []
    for l in range(L):
        kind = "GPSA" if l < nl else "MHSA"
        rows.append([l + 1, kind] + [f"{tracks[k]['nonlocality'][i][l]:.2f}" for k in ("deit", "convit") for i in (0, -1)])
    print_table(["layer", "ConViT type", "DeiT start", "DeiT end", "ConViT start", "ConViT end"], rows)
    g = tracks["convit"]["gates"]
    if nl:
        print("  gate sigma(lambda_h) at the end (rows: GPSA layer, columns: head; 1 = positional):")
        for l, row in enumerate(g[-1]):
            print(f"    layer {l + 1}: " + " ".join(f"{v:.2f}" for v in row))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[1].sharey(axes[0])  # same scale, so DeiT's and ConViT's non-locality compare at a glance
    cmap = plt.get_cmap("viridis")
    for ax, k in zip(axes[:2], ("deit", "convit")):
        t = torch.tensor(tracks[k]["nonlocality"])  # (snapshots, L)
        for l in range(L):
            ax.plot(tracks[k]["step"], t[:, l], color=cmap(l / max(1, L - 1)), label=f"layer {l + 1}")
        ax.set(xlabel="optimiser step", ylabel="non-locality (patches)", title=f"{k} ({tracks[k]['test_acc']:.1f}%)")
    axes[1].legend(fontsize=7)
    if nl:
        gt = torch.tensor(g)  # (snapshots, nl, h)
        for l in range(nl):
            for h in range(gt.shape[2]):
                axes[2].plot(tracks["convit"]["step"], gt[:, l, h], color=cmap(l / max(1, nl - 1)), alpha=0.8,
                             label=f"layer {l + 1}" if h == 0 else None)
        axes[2].legend(fontsize=7)
    axes[2].set(xlabel="optimiser step", ylabel="sigma(lambda_h)", title="ConViT gates, one line per head")
    fig.tight_layout(), fig.savefig(os.path.join(out, "locality.png"), dpi=120), plt.close(fig)
    return {"deit": tracks["deit"], "convit": tracks["convit"], "gpsa_layers": nl}


def exp_maps(args, data, device, out, trained):
    """Fig. 7: attention of one query patch (the centre of the grid) in the first and the last block."""
    print("\n== attention maps of a query patch, early vs late layer ==", flush=True)
    _, models = trained
    G = models["convit"].grid_size
    q = (G // 2) * G + G // 2  # query patch at the grid centre, raster index
    img = data.x_test[:1]
    x = ((img.float() - torch.tensor(data.mean).view(1, 3, 1, 1) * 255) / (torch.tensor(data.std).view(1, 3, 1, 1) * 255)).to(device)
    layers = [0, args.local_up_to_layer - 1 if args.local_up_to_layer > 1 else args.depth - 1]
    maps, rows = {}, []
    for k, m in models.items():
        m.eval()
        with torch.no_grad():
            _, att = m(x, return_attention=True)
        maps[k] = {l: att[l][0, :, q].reshape(-1, G, G).cpu() for l in layers}  # (h, G, G)
        for l in layers:
            a = att[l][0:1]
            d = nonlocality(a, G)  # (h,)
            rows.append([k, l + 1, " ".join(f"{v:.2f}" for v in d.tolist()),
                         " ".join(f"{v:.2f}" for v in maps[k][l].flatten(1).max(1).values.tolist())])
    print_table(["model", "layer", "non-locality per head", "max attention of the query per head"], rows)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    h = args.num_heads
    fig, axes = plt.subplots(4, h + 1, figsize=(1.8 * (h + 1), 7.4), squeeze=False)
    for r, (k, l) in enumerate([(k, l) for k in ("convit", "deit") for l in layers]):
        axes[r, 0].imshow(img[0].permute(1, 2, 0).numpy())
        axes[r, 0].add_patch(plt.Rectangle(((q % G) * args.patch_size - .5, (q // G) * args.patch_size - .5),
                                           args.patch_size, args.patch_size, fill=False, color="red"))
        axes[r, 0].set_title(f"{k} layer {l + 1}", fontsize=8)
        for hh in range(h):
            axes[r, hh + 1].imshow(maps[k][l][hh].numpy(), cmap="magma")
            axes[r, hh + 1].plot(q % G, q // G, "c+")
            axes[r, hh + 1].set_title(f"head {hh + 1}", fontsize=8)
    for a in axes.flat:
        a.axis("off")
    fig.tight_layout(), fig.savefig(os.path.join(out, "maps.png"), dpi=120), plt.close(fig)
    return {"query_patch": q, "layers": [l + 1 for l in layers], "rows": rows,
            "maps": {k: {str(l + 1): v.tolist() for l, v in mk.items()} for k, mk in maps.items()}}


def bench(args, device):
    """Train-step throughput (forward + backward) of ConViT vs DeiT of the same size: the price of GPSA."""
    rows, out = [], {}
    for size, cfg in (("quick", PRESETS["quick"]), ("Ti (full)", PRESETS["full"])):
        ns = argparse.Namespace(**{**vars(args), **{k: v for k, v in cfg.items() if k in
                                                    ("embed_dim", "depth", "num_heads", "local_up_to_layer", "patch_size", "mlp_ratio")}})
        r = {}
        for kind in ("deit", "convit"):
            utils.set_seed(0)
            m = build_model(ns, 10, convit=kind == "convit").to(device)
            img_s, mem = utils.measure_step(m, (3, args.image_size, args.image_size), batch_size=128, device=device,
                                            steps=3, warmup=1)
            r[kind] = {"img_per_s": img_s, "act_MB": mem, "params": utils.count_params(m),
                       "gflops": utils.count_flops(m, (3, args.image_size, args.image_size), device) / 1e9}
            print(f"  {size:10s} {kind:6s} {img_s:8.1f} img/s  {mem:7.1f} MB  {r[kind]['params'] / 1e6:.2f} M params  "
                  f"{r[kind]['gflops']:.3f} GFLOPs/img", flush=True)
        r["convit_over_deit"] = r["convit"]["img_per_s"] / r["deit"]["img_per_s"]
        rows.append([size, f"{r['deit']['img_per_s']:.0f}", f"{r['convit']['img_per_s']:.0f}", f"{r['convit_over_deit']:.2f}"])
        out[size] = r
    print_table(["size", "DeiT img/s", "ConViT img/s", "ConViT/DeiT"], rows)
    return out


# ------------------------------------------------------------------------------------------------ main

def main(argv=None):
    args = get_args(argv)
    print(utils.reproduce_command(), flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = utils.get_device(args.device)
    out = args.out or os.path.join("runs", "03_gpsa_convit")
    os.makedirs(out, exist_ok=True)
    config = {k: v for k, v in vars(args).items()}
    if args.bench:
        print(f"== bench: train step (fwd+bwd) at batch 128 on {device} ==", flush=True)
        res = bench(args, device)
        utils.save_results(os.path.join(out, "bench.json"), config, res)
        return res
    data = utils.data_from_args(args)
    print(f"data: {len(data.x_train)} train / {len(data.x_test)} test images, {data.num_classes} classes, "
          f"device {device}, model C={args.embed_dim} L={args.depth} h={args.num_heads} GPSA blocks={args.local_up_to_layer}", flush=True)
    todo = EXPERIMENTS if args.experiment == "all" else (args.experiment,)
    results, trained = {}, None
    for name in todo:
        t0 = time.time()
        if name in ("locality", "maps") and trained is None:
            trained = train_tracked(args, data, device)  # shared by both experiments
        fn = {"sample": lambda: exp_sample(args, data, device, out), "ablation": lambda: exp_ablation(args, data, device, out),
              "locality": lambda: exp_locality(args, data, device, out, trained),
              "maps": lambda: exp_maps(args, data, device, out, trained)}[name]
        results[name] = fn()
        results[name]["wall_s"] = round(time.time() - t0, 1)
        utils.save_results(os.path.join(out, f"{name}.json"), config, results[name])
        print(f"== {name} done in {results[name]['wall_s']:.0f}s -> {out}/{name}.json, {out}/{name}.png ==", flush=True)
    utils.save_results(os.path.join(out, "results.json"), config, results)
    return results


if __name__ == "__main__":
    utils.run_main(main)
