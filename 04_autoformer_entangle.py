"""AutoFormer: Searching Transformers for Visual Recognition (Chen, Peng, Fu, Ling; ICCV 2021) -- arXiv 2107.00651.

The idea. Instead of training every candidate Vision Transformer (ViT) separately, train ONE supernet that holds
the weights of the largest candidate and let every smaller candidate ("subnet") use the *leading slice* of those
weights: a layer with embedding dim D and qkv dim I uses W[:I, :D], b[:I], LayerNorm[:D], a depth-L subnet uses
the first L blocks. This is "weight entanglement" (paper sec. 3.1, Fig. 2 right). Compared with classic one-shot
weight sharing (every choice of a layer has its OWN weights, Fig. 2 left), each training step updates weights that
every subnet shares, so all subnets train faster and inherit better weights (paper Fig. 3/4). After supernet
training (one uniformly sampled subnet per step, sec. 3.2) an evolutionary search (sec. 3.3) finds the best subnet
under a parameter budget, scoring each candidate with the weights it inherits from the supernet -- no retraining.
That only works if the inherited score ranks candidates the way their real (retrained) accuracy does: this script
measures whether it does, and whether the search beats random search, instead of assuming it.

Code: the entangled supernet `SuperViT` (forward(x, config)), `extract_subnet` (a plain standalone `ViT` with the
sliced weights copied in), the classic weight-sharing baseline `ClassicSuperViT`, `score_configs` (many subnets'
inherited scores at once, sharing common layers), `mutate` / `crossover` / `evolution_search` / `random_search`.
Experiments (--experiment NAME, default all; each prints its tables and writes runs/04_autoformer_entangle/NAME.json):
  entangle  paper Fig. 3/4: entangled vs classic supernet with the same steps, sampled subnets and batches, then the
            same 20 random subnets scored with inherited weights (entangle.png);
  fitness   can the search's fitness rank candidates? Kendall tau between two random halves of the validation set,
            and between validation and test, for accuracy and for NLL (fitness.png);
  tabular   a tabular benchmark in miniature (as NAS-Bench-201): all 960 subnets of a sub-space scored once with
            inherited weights, then evolution and random search 100 times each on the cached scores: regret against
            the number of evaluations, the test accuracy of the picks, and a larger space (tabular.png);
  ranking   do inherited weights rank subnets as retraining does? 8 in-range subnets retrained from scratch,
            Kendall tau with a bootstrap CI (ranking.png);
  inherit   paper Table 3: the chosen subnet inherited vs inherited + fine-tuned vs retrained, 4 paired seeds.

Run:
    python 04_autoformer_entangle.py --quick --data ../shared/data/cifar10                       # CPU, 2 cores: 481 s
    python 04_autoformer_entangle.py --quick --data ../shared/data/cifar10 --experiment tabular  # one experiment
    python 04_autoformer_entangle.py --data ../shared/data/cifar10                               # full preset, one GPU
    python 04_autoformer_entangle.py --quick --bench --data ../shared/data/cifar10               # slicing overhead
--quick runs independent jobs (supernets, retrained subnets, batches of scores) in 2 worker processes with 1 torch
thread each (--workers; results do not depend on it: each job seeds itself, a test checks it).

Search space (paper Table 1, AutoFormer-T: embed (192, 216, 240), depth (12, 13, 14), heads (3, 4), MLP ratio
(3.5, 4), head dim 64, 224px images / patch 16). The full preset uses exactly AutoFormer-T on 32x32 CIFAR with patch 4
(64 tokens). The quick preset scales it down for a CPU: embed (48, 56, 64), depth (3, 4, 5), heads (2, 3, 4) x head
dim 16, MLP ratio (2, 3, 4), patch 8 (16 tokens); 199k subnets of 58k..274k parameters. The tabular sub-space:
embed (48, 56, 64) x depth (3, 4) x per layer heads (2, 4) x MLP ratio (2, 4) = 960 subnets, 422 of them inside the
search's parameter range (137k..211k = the middle 35%-70% of the space).
Selection rules, fixed before any result was seen: every choice is made on the validation split carved from train
(250 images per class), never on test. The fitness is validation NLL (continuous) unless a table says accuracy; the
chosen subnet is the table's best in-range subnet by validation NLL; the ranked subnets sit at evenly spaced ranks of
that list; the 30 candidates also scored on test are a seeded random sample.

RESULTS, quick preset, measured (real CIFAR-10: 450 train images per class, 250 val per class carved from train,
the full 10,000 test images; 2 shared CPU cores, 2 workers x 1 torch thread, torch 2.15; 481 s end to end from a
clean clone under `/work/bin/cpu --both`; 12 epochs = 840 steps per supernet and per retrained subnet). 95% CIs;
full tables in README.md and runs/04_autoformer_entangle/ (*.json, *.png, quick.log).
  entangle: entangled - classic = +7.3 points [+6.9, +7.7] inherited val acc (31.7 vs 24.4%), -0.205 nats
            [-0.209, -0.202], n=20 paired subnets, 20/20 wins; final train loss 1.894 vs 2.078 (paper Fig. 3/4).
  fitness:  422 in-range candidates, val acc 30.2..32.8%: split-half Kendall tau 0.23 [0.18, 0.30] for accuracy,
            0.68 [0.64, 0.71] for NLL; val vs test (30 candidates) 0.47 [0.21, 0.69] accuracy, 0.81 [0.67, 0.91]
            NLL. Accuracy on 2,500 images barely ranks these candidates; NLL does.
  tabular:  in range, fitness = val NLL, mean regret (millinats) +- SE over 100 runs each, evolution vs random:
            10 evaluations 5.1+-0.3 vs 4.5+-0.3; 50: 0.6+-0.1 vs 1.7+-0.1; 100: 0.0+-0.0 vs 1.0+-0.1 (optimum found
            in 99% vs 20% of runs). Evolution is more sample-efficient past ~30 evaluations, not before. But the regret
            it removes is below the fitness noise (SE of a val NLL difference 2.8 millinats): its picks are +0.24
            points [+0.20, +0.28] better on test here, and -0.07 / +0.02 in the 16- and 14-epoch runs (a CI over
            search runs given ONE supernet). Larger space (all 960, no constraint): at 50 evaluations 0.3+-0.1 vs
            1.8+-0.2 (found 84% vs 14%): random search struggles more, evolution does not.
  ranking:  8 in-range subnets retrained from scratch: Kendall tau (inherited vs retrained test acc) -0.04 [-0.71,
            +0.60] -> no evidence that inheritance ranks them (-0.57 and -0.22 in the 16/14-epoch runs); retrained
            beats inherited by 2.2 points [1.6, 2.8].
  inherit:  chosen D=56 L=4 (141k): inherited - retrained = -1.0 points [-1.8, -0.3], +0.031 nats [+0.012, +0.049],
            n=4 paired seeds -> retrained better (paper Table 3: inherited ~ retrained; not at this scale);
            inherited + 2-epoch fine-tune - retrained = -1.1 points [-2.3, +0.1] (not decided).
  bench:    a train step through the supernet takes 1.07x the time of the extracted standalone ViT (target <= 1.15x).
Runs are bit-identical when repeated on one machine (checked on the whole quick run); another CPU gives slightly
different floats, i.e. another supernet: expect entangle, fitness and the regret curves to hold within their CIs, and
the sub-point test differences between search methods and the ranking tau to move as they did across our three runs.
The full preset was NOT measured: no GPU was available for this task.

Deviations from the paper and the official code (github.com/microsoft/Cream, AutoFormer), with reasons:
  - Sizes, data and steps (above): a CPU budget. The supernet trains 840 steps on 4,500 images, not hundreds of
    ImageNet epochs; subnets are retrained for as many steps as the supernet had.
  - Training recipe: crop + flip + label smoothing 0.1 + AdamW, warmup + cosine, no mixup / CutMix / RandAugment /
    drop-path / EMA (the same recipe for every arm, so comparisons stay paired).
  - Mutation: the paper's Pd = 0.2 (depth) and Pm = 0.4 (each layer's heads and MLP ratio); the official code swaps
    them (s_prob 0.4, m_prob 0.2). Like the official code we re-draw the embedding dim with the depth's probability.
    Crossover may mix parents of different depths (the official code only crosses equal depths).
  - Evolution on the table: population 10, top-5 parents, up to 100 evaluations (paper: 50 x 20 generations, top-10).
  - q/k/v slicing: weight rows and bias entries of the same units (the official qkv_super slices them
    inconsistently; a test shows it). --change_qk (q/k/v sized heads x head dim) is how this code always works.
  - --gp and --relative_position are implemented and on in both presets, as in the official commands: the head
    reads the mean of the patch tokens; every block has row and column tables for keys and for values
    (RelativePosition2D, entry 0 for the class token, distances clipped at 14). The official tables are
    super_embed_dim // num_heads wide and sliced to the sampled head dim; ours are head_dim wide (head dim is fixed).
  - One supernet seed for entangle, fitness, tabular and ranking: their CIs are over subnets or search runs given
    that supernet, not over supernet trainings; inherit pairs 4 supernet seeds.

Shape letters used in comments: B batch, C image channels, S image side, P patch side, N tokens (patches + class
token), D embedding dim of the sampled subnet (Dmax: of the supernet), h heads, hd head dim (fixed), I = h*hd qkv dim
of one of q/k/v, M MLP hidden dim, K classes, V validation images, R max relative distance.
"""
import argparse
import itertools
import math
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import utils

# ------------------------------------------------------------------------------------------------ config

# Everything a preset changes, in one place. Flags left at None take their preset's value.
PRESETS = {
    # quick: a CPU-sized AutoFormer space (embed ~1/4 of AutoFormer-T, depth 12-14 -> 3-5, patch 8 -> 16 tokens).
    # The budget is spent where it buys statistical power: 2,500 validation images (to rank candidates), the full
    # 10,000 test images, an exhaustive table of 960 subnets, 100 search repeats, 8 retrained subnets, 4 paired seeds.
    # Supernets and retrained subnets get 12 epochs of 4,500 images (840 steps): what fits 10 minutes on 2 busy cores.
    "quick": dict(train_per_class=450, val_per_class=250, test_per_class=None,
                  embed_dims=[48, 56, 64], depths=[3, 4, 5], num_heads=[2, 3, 4], mlp_ratios=[2.0, 3.0, 4.0],
                  head_dim=16, patch_size=8, gp=True, max_rel_pos=14,
                  batch_size=64, epochs=12, lr=2e-3, weight_decay=0.05, n_compare=20,
                  table_embed_dims=[48, 56, 64], table_depths=[3, 4], table_num_heads=[2, 4], table_mlp_ratios=[2.0, 4.0],
                  n_val_test=30, population=10, parents=5, budgets=[10, 20, 30, 50, 100], repeats=100,
                  n_rank=8, inherit_seeds=4, finetune_epochs=2, finetune_lr=4e-4, retrain_epochs=12,
                  workers=2, threads=1),  # 1 torch thread per process: 2 OpenMP threads on a shared CPU ran ~10x slower
    # full: the AutoFormer-T space (paper Table 1) on 32x32 CIFAR with patch 4 (64 tokens), for one GPU. Not measured.
    "full": dict(train_per_class=None, val_per_class=500, test_per_class=None,
                 embed_dims=[192, 216, 240], depths=[12, 13, 14], num_heads=[3, 4], mlp_ratios=[3.5, 4.0],
                 head_dim=64, patch_size=4, gp=True, max_rel_pos=14,
                 batch_size=256, epochs=100, lr=1e-3, weight_decay=0.05, n_compare=50,
                 table_embed_dims=[192, 216, 240], table_depths=[12], table_num_heads=[3, 4], table_mlp_ratios=[4.0],
                 n_val_test=200, population=50, parents=10, budgets=[50, 100, 200, 500, 1000], repeats=100,
                 n_rank=12, inherit_seeds=3, finetune_epochs=10, finetune_lr=1e-4, retrain_epochs=100,
                 workers=1, threads=None),
}
EXPERIMENTS = ("entangle", "fitness", "tabular", "ranking", "inherit")


def get_args(argv=None):
    p = utils.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                             epilog="Presets (a flag you pass wins over its preset value):\n" +
                                    "\n".join(f"  {k}: {v}" for k, v in PRESETS.items()))
    utils.add_common_args(p)
    p.add_argument("--experiment", default="all", choices=EXPERIMENTS + ("all",), help="which experiment to run")
    p.add_argument("--quick", action="store_true", help="small CPU preset (<= 10 min on 2 cores); default: full GPU preset")
    p.add_argument("--bench", action="store_true", help="only time a train step: supernet(x, cfg) vs extracted standalone ViT")
    g = p.add_argument_group("search space (paper Table 1) and the official model options")
    g.add_argument("--embed-dims", type=utils.positive_int, nargs="+", help="embedding dim choices (one per network)")
    g.add_argument("--depths", type=utils.positive_int, nargs="+", help="depth choices")
    g.add_argument("--num-heads", type=utils.positive_int, nargs="+", help="heads choices (per layer)")
    g.add_argument("--mlp-ratios", type=utils.positive_float, nargs="+", help="MLP ratio choices (per layer)")
    g.add_argument("--head-dim", type=utils.positive_int, help="fixed head dim: q/k/v have heads x head_dim units (--change_qk)")
    g.add_argument("--patch-size", type=utils.positive_int, help="patch side in pixels")
    g.add_argument("--gp", action=argparse.BooleanOptionalAction, default=None,
                   help="classify the global average of the patch tokens (official --gp) instead of the class token")
    g.add_argument("--max-rel-pos", type=utils.nonneg_int,
                   help="2-D relative position embeddings on keys and values, distances clipped at this (official "
                        "--relative_position, 14); 0 = absolute positions only")
    g = p.add_argument_group("training: supernet (sec. 3.2), fine-tuning and retraining from scratch")
    g.add_argument("--batch-size", type=utils.positive_int)
    g.add_argument("--epochs", type=utils.positive_int, help="supernet epochs (the classic supernet gets the same)")
    g.add_argument("--lr", type=utils.positive_float)
    g.add_argument("--weight-decay", type=utils.nonneg_float)
    g.add_argument("--finetune-epochs", type=utils.positive_int)
    g.add_argument("--finetune-lr", type=utils.positive_float)
    g.add_argument("--retrain-epochs", type=utils.positive_int, help="epochs to retrain a subnet from scratch")
    g = p.add_argument_group("experiments")
    g.add_argument("--n-compare", type=utils.positive_int, help="entangle: random subnets scored by both supernets")
    for name in ("embed-dims", "depths", "num-heads", "mlp-ratios"):
        g.add_argument(f"--table-{name}", type=utils.positive_float if name == "mlp-ratios" else utils.positive_int,
                       nargs="+", help=f"tabular: the {name.replace('-', ' ')} of the sub-space scored exhaustively")
    g.add_argument("--n-val-test", type=utils.positive_int, help="fitness: in-range candidates also scored on test")
    g.add_argument("--population", type=utils.positive_int, help="evolution: candidates per generation (paper 50)")
    g.add_argument("--parents", type=utils.positive_int, help="evolution: top-k kept as parents (paper 10)")
    g.add_argument("--p-depth", type=utils.nonneg_float, default=0.2,
                   help="Pd: probability to re-draw each network-level gene, depth and embed dim (paper: 0.2)")
    g.add_argument("--p-layer", type=utils.nonneg_float, default=0.4,
                   help="Pm: probability to re-draw each per-layer gene, heads and MLP ratio (paper: 0.4)")
    g.add_argument("--param-range", type=utils.nonneg_float, nargs=2, metavar=("LO", "HI"),
                   help="allowed subnet size in millions of parameters (default: the middle 35%%-70%% of the space)")
    g.add_argument("--budgets", type=utils.positive_int, nargs="+", help="tabular: evaluation budgets reported")
    g.add_argument("--repeats", type=utils.positive_int, help="tabular: runs of each search method")
    g.add_argument("--n-rank", type=utils.positive_int, help="ranking: subnets retrained from scratch (>= 3)")
    g.add_argument("--inherit-seeds", type=utils.positive_int, help="inherit: paired seeds (supernet + retrain each)")
    args = p.parse_args(argv)
    utils.apply_preset(args, PRESETS["quick" if args.quick else "full"])
    check_args(p, args)
    return args


def check_args(p, args):
    """Script-level flag checks, each a one-line error."""
    if args.val_per_class <= 0:
        p.error("--val-per-class must be > 0: the search scores candidates on a validation split carved from train")
    if args.parents > args.population:
        p.error(f"--parents {args.parents} must be <= --population {args.population}")
    if args.image_size % args.patch_size:
        p.error(f"--image-size {args.image_size} must be divisible by --patch-size {args.patch_size}")
    if args.p_depth > 1 or args.p_layer > 1:
        p.error("--p-depth and --p-layer are probabilities: use values in [0, 1]")
    if args.param_range and args.param_range[0] >= args.param_range[1]:
        p.error(f"--param-range {args.param_range[0]:g} {args.param_range[1]:g}: LO must be < HI")
    if args.n_rank < 3:
        p.error("--n-rank must be >= 3: Kendall's tau of fewer subnets cannot rank anything")
    for name in ("embed_dims", "depths", "num_heads", "mlp_ratios"):
        extra = sorted(set(getattr(args, "table_" + name)) - set(getattr(args, name)))
        if extra:
            p.error(f"--table-{name.replace('_', '-')} {extra} must be a subset of --{name.replace('_', '-')} "
                    f"{getattr(args, name)}: the table is a sub-space of the supernet's space")


# ------------------------------------------------------------------------------------------------ building blocks

@dataclass(frozen=True)
class SearchSpace:
    """The choices of paper Table 1. A config is a dict:
    {"embed_dim": D, "depth": L, "num_heads": (h_1..h_L), "mlp_ratio": (r_1..r_L)} -- one D per network, heads and
    MLP ratio per layer. head_dim is fixed (not searched): q, k and v each have num_heads * head_dim units."""
    embed_dims: tuple
    depths: tuple
    num_heads: tuple
    mlp_ratios: tuple
    head_dim: int

    def __post_init__(self):
        for name in ("embed_dims", "depths", "num_heads", "mlp_ratios"):
            vals = getattr(self, name)
            assert len(vals) > 0 and all(v > 0 for v in vals), f"{name} must be a non-empty list of positive values, got {vals}"
            object.__setattr__(self, name, tuple(sorted(set(vals))))
        assert self.head_dim > 0, f"head_dim must be positive, got {self.head_dim}"


def space_str(space):
    return (f"embed {'/'.join(map(str, space.embed_dims))}, depth {'/'.join(map(str, space.depths))}, heads "
            f"{'/'.join(map(str, space.num_heads))} x {space.head_dim}, MLP ratio {'/'.join(f'{r:g}' for r in space.mlp_ratios)}")


def mlp_hidden_dim(mlp_ratio, embed_dim):
    """MLP hidden width M = round(ratio * D); used by the supernet, the extraction and the parameter count alike."""
    return int(round(mlp_ratio * embed_dim))


def _init_vit_weights(module):
    """ViT init (truncated normal std 0.02, zero biases, unit LayerNorm). Std independent of fan-in, so the largest
    supernet weights sliced to any subnet have the same statistics as a freshly built subnet."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def relative_position_index(grid, max_rel):
    """(2, N, N) indices into the relative-position tables, N = grid*grid + 1 tokens (class token first), as the
    official RelativePosition2D_super: query patch i at (row_i, col_i) and key patch j use row table entry
    clip(row_j - row_i, -R, R) + R + 1 and column entry clip(col_j - col_i) + R + 1; every pair that involves the
    class token uses entry 0. Tables therefore have 2R + 2 rows."""
    n = torch.arange(grid * grid)
    row, col = n // grid, n % grid
    d_row = (row[None, :] - row[:, None]).clamp(-max_rel, max_rel) + max_rel + 1  # (N-1, N-1): key row - query row
    d_col = (col[None, :] - col[:, None]).clamp(-max_rel, max_rel) + max_rel + 1
    return torch.stack([F.pad(d_row, (1, 0, 1, 0)), F.pad(d_col, (1, 0, 1, 0))])  # (2, N, N), 0 on the class token


class RelativePosition2D(nn.Module):
    """r_ij = E_row[dr_ij] + E_col[dc_ij] (N, N, hd): one embedding per relative row offset plus one per relative
    column offset, shared by all heads of the layer (Shaw et al. 2018 in 2-D, AutoFormer's --relative_position)."""

    def __init__(self, *, head_dim, grid, max_rel):
        super().__init__()
        self.rel_rows = nn.Parameter(torch.zeros(2 * max_rel + 2, head_dim))
        self.rel_cols = nn.Parameter(torch.zeros(2 * max_rel + 2, head_dim))
        nn.init.trunc_normal_(self.rel_rows, std=0.02)
        nn.init.trunc_normal_(self.rel_cols, std=0.02)
        self.register_buffer("index", relative_position_index(grid, max_rel), persistent=False)

    def forward(self):
        return self.rel_rows[self.index[0]] + self.rel_cols[self.index[1]]  # (N, N, hd)


def attend(q, k, v, rel_k=None, rel_v=None):
    """Multi-head attention on q, k, v (B, h, N, hd). Without relative positions: softmax(q k^T / sqrt(hd)) v.
    With them (official --relative_position), r^K and r^V (N, N, hd) enter keys and values:
        logit_ij = q_i . (k_j + r^K_ij) / sqrt(hd),    out_i = sum_j softmax_j(logit_ij) (v_j + r^V_ij)."""
    if rel_k is None:
        return F.scaled_dot_product_attention(q, k, v)
    logits = (q @ k.transpose(-2, -1) + torch.einsum("bhid,ijd->bhij", q, rel_k)) * q.shape[-1] ** -0.5  # (B, h, N, N)
    a = logits.softmax(-1)
    return a @ v + torch.einsum("bhij,ijd->bhid", a, rel_v)  # (B, h, N, hd)


# --- the plain (standalone) ViT that extract_subnet returns and that is retrained from scratch

class Attention(nn.Module):
    """Multi-head self-attention with `num_heads` heads of fixed width `head_dim` (AutoFormer's q/k/v are sized
    heads x head_dim, not embed_dim -- the official --change_qk -- so the head count can change without changing D).
    max_rel > 0 adds 2-D relative position embeddings on keys and values."""

    def __init__(self, dim, *, num_heads, head_dim, grid=None, max_rel=0):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.qkv = nn.Linear(dim, 3 * inner)  # rows [0:I) = q, [I:2I) = k, [2I:3I) = v
        self.proj = nn.Linear(inner, dim)
        self.rel_k = RelativePosition2D(head_dim=head_dim, grid=grid, max_rel=max_rel) if max_rel else None
        self.rel_v = RelativePosition2D(head_dim=head_dim, grid=grid, max_rel=max_rel) if max_rel else None

    def forward(self, x):  # x (B, N, D)
        B, N, _ = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, h, N, hd)
        rel = (self.rel_k(), self.rel_v()) if self.rel_k is not None else ()
        out = attend(qkv[0], qkv[1], qkv[2], *rel)  # (B, h, N, hd)
        return self.proj(out.transpose(1, 2).reshape(B, N, -1))  # (B, N, I) -> (B, N, D)


class Block(nn.Module):
    """Pre-norm transformer block: x + MSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim, *, num_heads, head_dim, mlp_hidden, grid=None, max_rel=0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=num_heads, head_dim=head_dim, grid=grid, max_rel=max_rel)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, mlp_hidden), nn.Linear(mlp_hidden, dim)

    def forward(self, x):  # (B, N, D)
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def pool(x, norm, dim, gp):
    """Final LayerNorm[:dim], then the classifier's input (B, D): the class token, or with gp (official --gp) the
    mean of the patch tokens (the class token stays in the sequence either way, as upstream)."""
    if gp:
        return F.layer_norm(x, (dim,), norm.weight[:dim], norm.bias[:dim], norm.eps)[:, 1:].mean(1)
    return F.layer_norm(x[:, 0], (dim,), norm.weight[:dim], norm.bias[:dim], norm.eps)


# ------------------------------------------------------------------------------------------------ model

class ViT(nn.Module):
    """A plain ViT whose layers may differ in heads and MLP width (what a searched AutoFormer subnet is)."""

    def __init__(self, *, image_size, patch_size, num_classes, embed_dim, num_heads, mlp_hidden, head_dim,
                 gp=False, max_rel=0, in_chans=3):
        super().__init__()
        assert image_size % patch_size == 0, f"image size {image_size} must be divisible by patch size {patch_size}"
        assert len(num_heads) == len(mlp_hidden), f"one heads value per layer and one MLP width per layer: {num_heads} vs {mlp_hidden}"
        grid = image_size // patch_size
        self.gp = gp
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads=h, head_dim=head_dim, mlp_hidden=m, grid=grid, max_rel=max_rel)
                                    for h, m in zip(num_heads, mlp_hidden))
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_vit_weights)

    def forward(self, x):  # x (B, C, S, S)
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, D, S/P, S/P) -> (B, N-1, D)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed  # (B, N, D)
        for blk in self.blocks:
            x = blk(x)
        return self.head(pool(x, self.norm, x.shape[-1], self.gp))  # (B, K)


# --- the weight-entangled supernet (paper sec. 3.1)

class SuperAttention(nn.Module):
    """Attention holding the largest weights: qkv (3*Imax, Dmax), proj (Dmax, Imax). A subnet with embedding D and h
    heads (I = h*hd) uses, for EACH of q, k and v, its first I output units and first D inputs -- weight rows AND bias
    entries of the same units. (The official qkv_super takes the weight rows interleaved, `w[i:I3:3]`, but the bias as
    the leading block `b[:I3]`, so a subnet's row j and bias j belong to different units: we do not copy that.)
    The relative-position tables are hd wide and hd is fixed, so every subnet uses all of them."""

    def __init__(self, max_dim, *, max_heads, head_dim, grid=None, max_rel=0):
        super().__init__()
        self.head_dim, self.max_inner = head_dim, max_heads * head_dim
        self.qkv = nn.Linear(max_dim, 3 * self.max_inner)
        self.proj = nn.Linear(self.max_inner, max_dim)
        self.rel_k = RelativePosition2D(head_dim=head_dim, grid=grid, max_rel=max_rel) if max_rel else None
        self.rel_v = RelativePosition2D(head_dim=head_dim, grid=grid, max_rel=max_rel) if max_rel else None

    def qkv_slice(self, dim, inner):
        """(weight (3I, D), bias (3I,)) of a subnet, laid out like a plain Attention.qkv: q, k, v blocks of I rows."""
        w = self.qkv.weight.view(3, self.max_inner, -1)[:, :inner, :dim].reshape(3 * inner, dim)  # (3, Imax, Dmax) -> (3I, D)
        b = self.qkv.bias.view(3, self.max_inner)[:, :inner].reshape(3 * inner)  # (3, Imax) -> (3I,)
        return w, b

    def forward(self, x, *, num_heads):  # x (B, N, D)
        B, N, D = x.shape
        inner = num_heads * self.head_dim
        w, b = self.qkv_slice(D, inner)
        qkv = F.linear(x, w, b).view(B, N, 3, num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, h, N, hd)
        rel = (self.rel_k(), self.rel_v()) if self.rel_k is not None else ()
        out = attend(qkv[0], qkv[1], qkv[2], *rel).transpose(1, 2).reshape(B, N, inner)  # (B, N, I)
        return F.linear(out, self.proj.weight[:D, :inner], self.proj.bias[:D])  # (B, N, D)


class SuperBlock(nn.Module):
    """Pre-norm block with entangled weights: LayerNorm[:D], fc1 W[:M, :D], fc2 W[:D, :M]."""

    def __init__(self, max_dim, *, max_heads, head_dim, max_mlp_hidden, grid=None, max_rel=0):
        super().__init__()
        self.norm1 = nn.LayerNorm(max_dim)
        self.attn = SuperAttention(max_dim, max_heads=max_heads, head_dim=head_dim, grid=grid, max_rel=max_rel)
        self.norm2 = nn.LayerNorm(max_dim)
        self.fc1, self.fc2 = nn.Linear(max_dim, max_mlp_hidden), nn.Linear(max_mlp_hidden, max_dim)

    def forward(self, x, *, num_heads, mlp_hidden):  # x (B, N, D)
        D, n1, n2 = x.shape[-1], self.norm1, self.norm2
        x = x + self.attn(F.layer_norm(x, (D,), n1.weight[:D], n1.bias[:D], n1.eps), num_heads=num_heads)
        h = F.layer_norm(x, (D,), n2.weight[:D], n2.bias[:D], n2.eps)
        h = F.gelu(F.linear(h, self.fc1.weight[:mlp_hidden, :D], self.fc1.bias[:mlp_hidden]))  # (B, N, M)
        return x + F.linear(h, self.fc2.weight[:D, :mlp_hidden], self.fc2.bias[:D])


class SuperViT(nn.Module):
    """AutoFormer supernet with weight entanglement. forward(x, config) runs the subnet `config` on the leading
    slices of the largest weights: patch embedding / class token / position embedding [..., :D], first `depth`
    blocks, per-layer heads and MLP width, final norm and head [:D]. embed() and classify() are its two ends, so
    score_configs can run shared layers once for many subnets."""

    def __init__(self, space, *, image_size, patch_size, num_classes, gp=False, max_rel=0, in_chans=3):
        super().__init__()
        assert image_size % patch_size == 0, f"image size {image_size} must be divisible by patch size {patch_size}"
        self.space, self.image_size, self.patch_size, self.num_classes = space, image_size, patch_size, num_classes
        self.gp, self.max_rel, self.in_chans = gp, max_rel, in_chans
        D, grid = max(space.embed_dims), image_size // patch_size
        max_hidden = max(mlp_hidden_dim(r, d) for r in space.mlp_ratios for d in space.embed_dims)
        self.patch_embed = nn.Conv2d(in_chans, D, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, D))
        self.blocks = nn.ModuleList(SuperBlock(D, max_heads=max(space.num_heads), head_dim=space.head_dim,
                                               max_mlp_hidden=max_hidden, grid=grid, max_rel=max_rel)
                                    for _ in range(max(space.depths)))
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_vit_weights)

    def check_config(self, config):
        """Raise ValueError (saying what is allowed) unless `config` is a member of the search space."""
        s = self.space
        D, L = config["embed_dim"], config["depth"]
        if D > max(s.embed_dims):
            raise ValueError(f"embed_dim {D} is larger than the supernet's {max(s.embed_dims)}; choose from {s.embed_dims}")
        if D not in s.embed_dims:
            raise ValueError(f"embed_dim {D} is not in the search space {s.embed_dims}")
        if L not in s.depths:
            raise ValueError(f"depth {L} is not in the search space {s.depths}")
        if len(config["num_heads"]) != L or len(config["mlp_ratio"]) != L:
            raise ValueError(f"depth {L} needs {L} num_heads and {L} mlp_ratio values, got {len(config['num_heads'])} "
                             f"and {len(config['mlp_ratio'])}")
        bad = [h for h in config["num_heads"] if h not in s.num_heads]
        if bad:
            raise ValueError(f"num_heads {bad} not in the search space {s.num_heads}")
        bad = [r for r in config["mlp_ratio"] if r not in s.mlp_ratios]
        if bad:
            raise ValueError(f"mlp_ratio {bad} not in the search space {s.mlp_ratios}")

    def subnet_params(self, config):
        """Parameter count of the standalone subnet (what extract_subnet builds), computed from the config alone;
        the search's parameter-range constraint uses this."""
        D, hd, K = config["embed_dim"], self.space.head_dim, self.num_classes
        n = self.in_chans * self.patch_size ** 2 * D + D  # patch embedding
        n += D + self.pos_embed.shape[1] * D  # class token + position embedding
        rel = 4 * (2 * self.max_rel + 2) * hd if self.max_rel else 0  # row + column tables for keys and values
        for h, r in zip(config["num_heads"], config["mlp_ratio"]):
            inner, M = h * hd, mlp_hidden_dim(r, D)
            n += 4 * D  # norm1 + norm2
            n += D * 3 * inner + 3 * inner + inner * D + D + rel  # qkv + proj (+ relative positions)
            n += D * M + M + M * D + D  # fc1 + fc2
        return n + 2 * D + D * K + K  # final norm + head

    def embed(self, x, D):  # x (B, C, S, S) -> tokens (B, N, D)
        x = F.conv2d(x, self.patch_embed.weight[:D], self.patch_embed.bias[:D], stride=self.patch_size)  # (B, D, S/P, S/P)
        x = x.flatten(2).transpose(1, 2)  # (B, N-1, D)
        return torch.cat([self.cls_token[..., :D].expand(len(x), -1, -1), x], 1) + self.pos_embed[..., :D]  # (B, N, D)

    def classify(self, x):  # tokens (B, N, D) -> logits (B, K)
        D = x.shape[-1]
        return F.linear(pool(x, self.norm, D, self.gp), self.head.weight[:, :D], self.head.bias)

    def forward(self, x, config):  # x (B, C, S, S)
        self.check_config(config)
        D = config["embed_dim"]
        x = self.embed(x, D)
        for blk, h, r in zip(self.blocks[:config["depth"]], config["num_heads"], config["mlp_ratio"]):  # first `depth` blocks
            x = blk(x, num_heads=h, mlp_hidden=mlp_hidden_dim(r, D))
        return self.classify(x)  # (B, K)


# --- the baseline: classic one-shot weight sharing (paper Fig. 2 left), same space, no entanglement

class ClassicSuperViT(nn.Module):
    """Every choice has its own independent weights: per embedding dim its own patch embedding, tokens, norm and
    head; per layer and per (D, heads) its own LayerNorm+attention, per (D, MLP ratio) its own LayerNorm+MLP.
    A step only trains the modules its subnet picked, so each module sees a fraction of the steps."""

    def __init__(self, space, *, image_size, patch_size, num_classes, gp=False, max_rel=0, in_chans=3):
        super().__init__()
        assert image_size % patch_size == 0, f"image size {image_size} must be divisible by patch size {patch_size}"
        self.space, self.patch_size, self.gp = space, patch_size, gp
        grid = image_size // patch_size
        E = space.embed_dims
        self.patch_embed = nn.ModuleDict({f"e{d}": nn.Conv2d(in_chans, d, patch_size, stride=patch_size) for d in E})
        self.cls_token = nn.ParameterDict({f"e{d}": nn.Parameter(torch.zeros(1, 1, d)) for d in E})
        self.pos_embed = nn.ParameterDict({f"e{d}": nn.Parameter(torch.zeros(1, grid * grid + 1, d)) for d in E})
        self.norm = nn.ModuleDict({f"e{d}": nn.LayerNorm(d) for d in E})
        self.head = nn.ModuleDict({f"e{d}": nn.Linear(d, num_classes) for d in E})
        attn = lambda d, h: Attention(d, num_heads=h, head_dim=space.head_dim, grid=grid, max_rel=max_rel)
        self.attn = nn.ModuleList(nn.ModuleDict({f"e{d}_h{h}": nn.Sequential(nn.LayerNorm(d), attn(d, h))
                                                 for d in E for h in space.num_heads}) for _ in range(max(space.depths)))
        self.mlp = nn.ModuleList(nn.ModuleDict({  # ratio by index: ModuleDict keys may not contain "."
            f"e{d}_r{i}": nn.Sequential(nn.LayerNorm(d), nn.Linear(d, mlp_hidden_dim(r, d)), nn.GELU(), nn.Linear(mlp_hidden_dim(r, d), d))
            for d in E for i, r in enumerate(space.mlp_ratios)}) for _ in range(max(space.depths)))
        for p in list(self.cls_token.values()) + list(self.pos_embed.values()):
            nn.init.trunc_normal_(p, std=0.02)
        self.apply(_init_vit_weights)

    def forward(self, x, config):  # x (B, C, S, S)
        D = config["embed_dim"]
        e = f"e{D}"
        x = self.patch_embed[e](x).flatten(2).transpose(1, 2)  # (B, N-1, D)
        x = torch.cat([self.cls_token[e].expand(len(x), -1, -1), x], 1) + self.pos_embed[e]  # (B, N, D)
        for i, (h, r) in enumerate(zip(config["num_heads"], config["mlp_ratio"])):
            x = x + self.attn[i][f"{e}_h{h}"](x)
            x = x + self.mlp[i][f"{e}_r{self.space.mlp_ratios.index(r)}"](x)
        return self.head[e](pool(x, self.norm[e], D, self.gp))  # (B, K)


# ------------------------------------------------------------------------------------------------ model helpers

def sample_config(space, rng):
    """A random subnet as the paper samples it (sec. 3.2): D and depth uniform, then heads and MLP ratio uniform per
    layer. `rng` is a random.Random: seeded, fast, and the same sequence on every machine."""
    D, L = rng.choice(space.embed_dims), rng.choice(space.depths)
    return {"embed_dim": D, "depth": L, "num_heads": tuple(rng.choice(space.num_heads) for _ in range(L)),
            "mlp_ratio": tuple(rng.choice(space.mlp_ratios) for _ in range(L))}


def largest_config(space):
    L = max(space.depths)
    return {"embed_dim": max(space.embed_dims), "depth": L, "num_heads": (max(space.num_heads),) * L,
            "mlp_ratio": (max(space.mlp_ratios),) * L}


def smallest_config(space):
    L = min(space.depths)
    return {"embed_dim": min(space.embed_dims), "depth": L, "num_heads": (min(space.num_heads),) * L,
            "mlp_ratio": (min(space.mlp_ratios),) * L}


def all_configs(space):
    """Every config of `space` (the tabular benchmark's sub-space), D, then depth, then per-layer genes."""
    genes = list(itertools.product(space.num_heads, space.mlp_ratios))  # one layer's (heads, MLP ratio)
    return [{"embed_dim": D, "depth": L, "num_heads": tuple(h for h, _ in layers), "mlp_ratio": tuple(r for _, r in layers)}
            for D in space.embed_dims for L in space.depths for layers in itertools.product(genes, repeat=L)]


def config_key(config):
    """Hashable identity of a config (to de-duplicate candidates and to index the table)."""
    return (config["embed_dim"], config["depth"], tuple(config["num_heads"]), tuple(config["mlp_ratio"]))


def config_from_key(key):
    return {"embed_dim": key[0], "depth": key[1], "num_heads": tuple(key[2]), "mlp_ratio": tuple(key[3])}


def config_str(config):
    return (f"D={config['embed_dim']} L={config['depth']} heads={''.join(map(str, config['num_heads']))} "
            f"mlp={','.join(f'{r:g}' for r in config['mlp_ratio'])}")


def build_subnet(supernet, config):
    """A freshly initialised plain ViT with the architecture of `config` and the supernet's model options."""
    D = config["embed_dim"]
    return ViT(image_size=supernet.image_size, patch_size=supernet.patch_size, num_classes=supernet.num_classes,
               embed_dim=D, num_heads=list(config["num_heads"]), head_dim=supernet.space.head_dim,
               mlp_hidden=[mlp_hidden_dim(r, D) for r in config["mlp_ratio"]], gp=supernet.gp,
               max_rel=supernet.max_rel, in_chans=supernet.in_chans).to(supernet.head.weight.device)


@torch.no_grad()
def extract_subnet(supernet, config):
    """A standalone plain `ViT` with the leading-slice weights of `config` copied out of an entangled `SuperViT`.
    extract_subnet(sn, cfg)(x) == sn(x, cfg); it has exactly sn.subnet_params(cfg) parameters."""
    supernet.check_config(config)
    D, hd = config["embed_dim"], supernet.space.head_dim
    vit = build_subnet(supernet, config)
    vit.patch_embed.weight.copy_(supernet.patch_embed.weight[:D])
    vit.patch_embed.bias.copy_(supernet.patch_embed.bias[:D])
    vit.cls_token.copy_(supernet.cls_token[..., :D])
    vit.pos_embed.copy_(supernet.pos_embed[..., :D])
    for blk, sblk, h in zip(vit.blocks, supernet.blocks, config["num_heads"]):
        inner, M = h * hd, blk.fc1.out_features
        for n in ("norm1", "norm2"):
            getattr(blk, n).weight.copy_(getattr(sblk, n).weight[:D])
            getattr(blk, n).bias.copy_(getattr(sblk, n).bias[:D])
        w, b = sblk.attn.qkv_slice(D, inner)
        blk.attn.qkv.weight.copy_(w)
        blk.attn.qkv.bias.copy_(b)
        blk.attn.proj.weight.copy_(sblk.attn.proj.weight[:D, :inner])
        blk.attn.proj.bias.copy_(sblk.attn.proj.bias[:D])
        if sblk.attn.rel_k is not None:  # hd is fixed, so the whole tables
            blk.attn.rel_k.load_state_dict(sblk.attn.rel_k.state_dict())
            blk.attn.rel_v.load_state_dict(sblk.attn.rel_v.state_dict())
        blk.fc1.weight.copy_(sblk.fc1.weight[:M, :D])
        blk.fc1.bias.copy_(sblk.fc1.bias[:M])
        blk.fc2.weight.copy_(sblk.fc2.weight[:D, :M])
        blk.fc2.bias.copy_(sblk.fc2.bias[:D])
    vit.norm.weight.copy_(supernet.norm.weight[:D])
    vit.norm.bias.copy_(supernet.norm.bias[:D])
    vit.head.weight.copy_(supernet.head.weight[:, :D])
    vit.head.bias.copy_(supernet.head.bias)
    return vit


@torch.no_grad()
def score_configs(supernet, configs, loader):
    """Per-image scores of many subnets with inherited weights: {config_key: (correct (V,) bool, nll (V,) float)}.
    Subnets with the same D and the same genes in their first layers compute the same activations there, so the
    configs form a trie and each shared prefix runs once, walked depth-first (an exhaustive table costs about one
    block per config instead of `depth` blocks). Equals utils.evaluate(supernet(x, cfg)) per config (tests)."""
    parts = {config_key(c): ([], []) for c in configs}
    for x, y in loader:
        for D in sorted({c["embed_dim"] for c in configs}):
            with utils.autocast(x.device):
                _walk_trie(supernet, supernet.embed(x, D), y, [c for c in configs if c["embed_dim"] == D], 0, parts)
    return {k: (torch.cat(c), torch.cat(n)) for k, (c, n) in parts.items()}


def _walk_trie(supernet, x, y, configs, layer, parts):
    """x (B, N, D): the tokens after `layer` blocks, shared by every config in `configs`."""
    for c in configs:
        if c["depth"] == layer:  # this subnet ends here: classify
            logits = supernet.classify(x).float()  # (B, K)
            parts[config_key(c)][0].append(logits.argmax(-1) == y)
            parts[config_key(c)][1].append(F.cross_entropy(logits, y, reduction="none"))
    deeper = [c for c in configs if c["depth"] > layer]
    for h, r in sorted({(c["num_heads"][layer], c["mlp_ratio"][layer]) for c in deeper}):  # this layer's genes
        x_next = supernet.blocks[layer](x, num_heads=h, mlp_hidden=mlp_hidden_dim(r, x.shape[-1]))
        same = [c for c in deeper if (c["num_heads"][layer], c["mlp_ratio"][layer]) == (h, r)]
        _walk_trie(supernet, x_next, y, same, layer + 1, parts)


# ------------------------------------------------------------------------------------------------ data

def make_loaders(data, args, device, seed):
    """(train, val, test) loaders; the training batches (order + augmentation) are fixed by `seed`."""
    return utils.make_loaders(data, batch_size=args.batch_size, device=device, seed=seed)


# ------------------------------------------------------------------------------------------------ train

def supernet_step_fn(space, rng, step_losses, sample=sample_config):
    """utils.train step_fn: one subnet `sample(space, rng)` per step, trained on the batch (paper sec. 3.2)."""
    def step_fn(m, x, y):
        with utils.autocast(x.device):
            logits = m(x, sample(space, rng))
            loss = F.cross_entropy(logits.float(), y, label_smoothing=0.1)
        loss.backward()
        step_losses.append(loss.item())
        return loss, logits
    return step_fn


def build_supernet(args, num_classes, *, kind="entangled", seed=0):
    """The entangled (`SuperViT`) or classic (`ClassicSuperViT`) supernet of the args' space, initialised by `seed`."""
    torch.manual_seed(seed)
    cls = {"entangled": SuperViT, "classic": ClassicSuperViT}[kind]
    return cls(space_from_args(args), image_size=args.image_size, patch_size=args.patch_size, num_classes=num_classes,
               gp=args.gp, max_rel=args.max_rel_pos)


def space_from_args(args, prefix=""):
    """The supernet's search space, or with prefix='table_' the tabular benchmark's sub-space."""
    get = lambda name: getattr(args, prefix + name)
    return SearchSpace(get("embed_dims"), get("depths"), get("num_heads"), get("mlp_ratios"), args.head_dim)


def train_supernet(model, space, train_loader, args, *, seed, name, log=print):
    """Paper sec. 3.2: every step samples ONE subnet uniformly and trains it on the batch. The config sequence comes
    from its own generator seeded by `seed`, so the entangled and the classic supernet see the same subnets on the
    same batches. Gradients are exactly zero outside the sampled slices (tests check it); AdamW's momentum still moves
    those weights a little, as in the official code -- blocks beyond the sampled depth get no gradient."""
    step_losses = []
    step_fn = supernet_step_fn(space, random.Random(seed + 1), step_losses)
    hist = utils.train(model, train_loader, epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                       step_fn=step_fn, log=log, name=name)
    return hist, step_losses


def full_preset_models(num_classes=10):
    """Every model the full preset trains, at its real size: name -> (model, step_fn or None, image_size).
    tests/test_utils.py runs one bf16-autocast training step of each on a CPU, so a full GPU run is known to start.
    The supernets step on their largest subnet (every weight in use); the retrained subnet is the largest one."""
    args = get_args([])
    space = space_from_args(args)
    models = {}
    for kind in ("entangled", "classic"):
        step_fn = supernet_step_fn(space, None, [], sample=lambda sp, rng: largest_config(sp))
        models[f"{kind} supernet"] = (build_supernet(args, num_classes, kind=kind), step_fn, args.image_size)
    sn = models["entangled supernet"][0]
    models["retrained subnet (largest)"] = (build_subnet(sn, largest_config(space)), None, args.image_size)
    return models


def sparse_log(epochs, every=4, log=print):
    """A utils.train log that prints only every (epochs // every)-th epoch line and the last: workers stay readable."""
    step, seen = max(1, epochs // every), [0]

    def out(line):
        seen[0] += 1
        if seen[0] % step == 0 or seen[0] == epochs:
            log(line, flush=True) if log is print else log(line)
    return out


# ------------------------------------------------------------------------------------------------ search (sec. 3.3)

def mutate(config, space, rng, *, p_depth, p_layer, constraint=lambda c: True, max_tries=50):
    """Paper sec. 3.3: re-draw the depth with probability Pd (new layers drawn at random, removed ones dropped), then
    each layer's heads and each layer's MLP ratio, each with probability Pm. The embedding dim, a network-level gene
    like depth, is re-drawn with Pd too (the official code re-draws both with its s_prob). The paper gives Pd = 0.2,
    Pm = 0.4; the official code swaps them (s_prob = 0.4, m_prob = 0.2). We follow the paper.
    Retries until the child satisfies `constraint`; returns the parent unchanged if no child does."""
    for _ in range(max_tries):
        L, heads, ratios = config["depth"], list(config["num_heads"]), list(config["mlp_ratio"])
        if rng.random() < p_depth:
            L = rng.choice(space.depths)
            while len(heads) < L:
                heads.append(rng.choice(space.num_heads))
                ratios.append(rng.choice(space.mlp_ratios))
            heads, ratios = heads[:L], ratios[:L]
        D = rng.choice(space.embed_dims) if rng.random() < p_depth else config["embed_dim"]
        for i in range(L):
            if rng.random() < p_layer:
                heads[i] = rng.choice(space.num_heads)
            if rng.random() < p_layer:
                ratios[i] = rng.choice(space.mlp_ratios)
        child = {"embed_dim": D, "depth": L, "num_heads": tuple(heads), "mlp_ratio": tuple(ratios)}
        if constraint(child):
            return child
    return config


def crossover(a, b, rng, *, constraint=lambda c: True, max_tries=50):
    """Paper sec. 3.3: a child takes each gene (embedding dim, depth, each layer's heads, each layer's MLP ratio)
    from one of its two parents at random. Layers that only the deeper parent has come from that parent.
    Retries until the child satisfies `constraint`; returns a parent if no child does."""
    for _ in range(max_tries):
        D = rng.choice((a["embed_dim"], b["embed_dim"]))
        L = rng.choice((a["depth"], b["depth"]))
        heads, ratios = [], []
        for i in range(L):
            donors = [p for p in (a, b) if i < p["depth"]]
            heads.append(rng.choice(donors)["num_heads"][i])
            ratios.append(rng.choice(donors)["mlp_ratio"][i])
        child = {"embed_dim": D, "depth": L, "num_heads": tuple(heads), "mlp_ratio": tuple(ratios)}
        if constraint(child):
            return child
    return rng.choice((a, b))


def sample_valid(space, rng, constraint, max_tries=10000):
    """Rejection-sample a random config (sample_config) that satisfies `constraint`."""
    for _ in range(max_tries):
        c = sample_config(space, rng)
        if constraint(c):
            return c
    raise utils.InputError(f"no random config out of {max_tries} satisfied the constraint: widen --param-range")


class Archive:
    """Every candidate scored so far, in the order scored: `fitness` is only ever called here, once per config,
    and only on configs that satisfy the constraint (an out-of-range config is never scored)."""

    def __init__(self, fitness, constraint):
        self.fitness, self.constraint, self.scored = fitness, constraint, {}

    def __len__(self):
        return len(self.scored)

    def add(self, config):
        """Score `config` unless it was scored before. Returns True if it was new."""
        key = config_key(config)
        if key in self.scored:
            return False
        assert self.constraint(config), f"{config_str(config)} violates the constraint and must not be scored"
        self.scored[key] = (self.fitness(config), config)
        return True

    def top(self, k):
        return [c for _, c in sorted(self.scored.values(), key=lambda fc: -fc[0])[:k]]

    def best_so_far(self):
        """[max fitness of the first n scored candidates for n = 1, 2, ...]."""
        return np.maximum.accumulate([f for f, _ in self.scored.values()]).tolist()


def evolution_search(fitness, space, *, constraint, budget, population, parents, p_depth, p_layer, rng,
                     max_tries=100):
    """Paper sec. 3.3 (and the official EvolutionSearcher): start from `population` random valid subnets; each next
    generation takes the top `parents` of everything scored so far and makes population/2 children by mutation and
    the rest by crossover of two random parents; only new valid children count, and if the neighbourhood runs dry
    the generation is filled up with random candidates. Stops after `budget` scored candidates. Returns the Archive."""
    arch = Archive(fitness, constraint)
    add_random(arch, space, rng, min(population, budget))
    while len(arch) < budget:
        top, goal = arch.top(parents), min(len(arch) + population, budget)
        n_mut, tries = len(arch) + population // 2, 0
        while len(arch) < goal and tries < max_tries * population:
            tries += 1
            if len(arch) < n_mut:
                child = mutate(rng.choice(top), space, rng, p_depth=p_depth, p_layer=p_layer, constraint=constraint)
            else:
                child = crossover(rng.choice(top), rng.choice(top), rng, constraint=constraint)
            arch.add(child)
        add_random(arch, space, rng, goal)  # if the neighbourhood ran dry: fill up with random candidates
    return arch


def random_search(fitness, space, *, constraint, budget, rng):
    """The baseline: `budget` distinct valid candidates drawn at random (sample_config), the best one wins."""
    arch = Archive(fitness, constraint)
    add_random(arch, space, rng, budget)
    return arch


def add_random(arch, space, rng, goal, max_tries=100000):
    """Add random valid candidates not scored yet until the archive holds `goal` of them."""
    for _ in range(max_tries):
        if len(arch) >= goal:
            return
        arch.add(sample_valid(space, rng, arch.constraint))
    raise utils.InputError(f"found only {len(arch)} distinct configs inside the constraint, fewer than the {goal} asked "
                           f"for: lower the budget or widen --param-range")


# ------------------------------------------------------------------------------------------------ jobs
# Independent pieces of work (a supernet, a retrained subnet, a batch of scores) run as utils.run_jobs jobs: each
# seeds everything it uses and returns numbers or CPU tensors, so results do not depend on --workers.

def run_job(args, data, spec, state=None):
    """One job. spec is a hashable tuple:
      ("supernet", kind, seed, probe_keys, finetune_key)  train a supernet; score the probe subnets on val; optionally
                                                          score and fine-tune one subnet (inherit experiment)
      ("subnet", key, seed, mode)                          mode "retrain" or "finetune" (needs `state`), see train_subnet
      ("score", split, seed, keys)                         per-image val/test scores of subnets inheriting from `state`"""
    device = utils.get_device(args.device)
    if spec[0] == "supernet":
        _, kind, seed, probe_keys, finetune_key = spec
        model = build_supernet(args, data.num_classes, kind=kind, seed=seed).to(device)
        train_loader, val, _ = make_loaders(data, args, device, seed)
        hist, losses = train_supernet(model, model.space, train_loader, args, seed=seed,
                                      name=f"{kind} supernet seed {seed} ", log=sparse_log(args.epochs))
        probes = [tuple(utils.evaluate(model, val, forward=lambda m, x: m(x, config_from_key(k)))) for k in probe_keys]
        out = {"state": {k: v.cpu() for k, v in model.state_dict().items()}, "history": hist, "losses": losses,
               "probes": probes}
        if finetune_key is not None:
            out["finetune"] = train_subnet(args, data, config_from_key(finetune_key), seed, "finetune", model, device)
        return out
    sn = build_supernet(args, data.num_classes, seed=spec[2])
    if state is not None:
        sn.load_state_dict(state)
    if spec[0] == "subnet":
        return train_subnet(args, data, config_from_key(spec[1]), spec[2], spec[3], sn, device)
    _, val, test = make_loaders(data, args, device, spec[2])
    res = score_configs(sn.to(device), [config_from_key(k) for k in spec[3]], val if spec[1] == "val" else test)
    return {k: (c.cpu(), n.cpu()) for k, (c, n) in res.items()}


def train_subnet(args, data, config, seed, mode, supernet, device):
    """A standalone subnet extracted from `supernet`, trained and scored. mode "retrain": `supernet` is the seed's
    INITIAL supernet, so the subnet starts from the same initial values as its slice of the supernet of that seed and
    sees the same batches (paired seeds), and trains retrain_epochs from scratch. mode "finetune": `supernet` is
    trained; the inherited weights are scored, then fine-tuned finetune_epochs at finetune_lr without warmup."""
    sub = extract_subnet(supernet.cpu(), config).to(device)
    train_loader, val, test = make_loaders(data, args, device, seed)
    out = {"inherited": {"val": tuple(utils.evaluate(sub, val)), "test": tuple(utils.evaluate(sub, test))}} if mode == "finetune" else {}
    epochs, lr, warmup = ((args.retrain_epochs, args.lr, 1.0) if mode == "retrain" else
                          (args.finetune_epochs, args.finetune_lr, 0.0))
    hist = utils.train(sub, train_loader, epochs=epochs, lr=lr, weight_decay=args.weight_decay, warmup_epochs=warmup,
                       log=sparse_log(epochs), name=f"{mode} {config_str(config)} seed {seed} ")
    out.update({"val": tuple(utils.evaluate(sub, val)), "test": tuple(utils.evaluate(sub, test)), "train_loss": hist[-1]["loss"]})
    return out


class Lab:
    """What the experiments share, each computed once, when first needed: supernets (by kind and seed), the
    exhaustive validation table of the seed's entangled supernet, test scores, trained subnets. `run(specs)` computes
    every missing job at once in parallel, so main() asks for what several experiments need in one go."""

    def __init__(self, args, data, device):
        self.args, self.data, self.device, self.done = args, data, device, {}
        self.space, self.table_space = space_from_args(args), space_from_args(args, "table_")
        self.count = build_supernet(args, data.num_classes).subnet_params  # parameters of a config, from the config alone
        lo_all, hi_all = self.count(smallest_config(self.space)), self.count(largest_config(self.space))
        self.param_range = (tuple(1e6 * v for v in args.param_range) if args.param_range else
                            (lo_all + 0.35 * (hi_all - lo_all), lo_all + 0.70 * (hi_all - lo_all)))
        rng = random.Random(args.seed + 2)
        self.probes = tuple(config_key(sample_config(self.space, rng)) for _ in range(args.n_compare))
        self.table_configs = all_configs(self.table_space)
        self.params = {config_key(c): self.count(c) for c in self.table_configs}
        self._val, self._test = {}, {}  # key -> per-image (correct, nll) on val / test, seed args.seed
        self._search_runs = None  # the tabular benchmark's searches (search_runs)

    def in_range(self, config):
        return self.param_range[0] <= self.count(config) <= self.param_range[1]

    def supernet_spec(self, kind="entangled", seed=None, finetune_key=None):
        return ("supernet", kind, self.args.seed if seed is None else seed, self.probes, finetune_key)

    def run(self, specs):
        """Compute every spec not done yet, as parallel jobs (supernets first, then by size: longest first)."""
        todo = sorted({s for s in specs if s not in self.done}, key=self.cost, reverse=True)  # longest first
        needs = {self.supernet_spec(seed=s[2]) for s in todo if s[0] == "score" or s[-1] == "finetune"}
        if needs - set(self.done):  # a supernet these jobs inherit from: train it first
            self.run(list(needs))
        if not todo:
            return [self.done[s] for s in specs]
        kinds = {k: sum(s[0] == k for s in todo) for k in ("supernet", "subnet", "score")}
        print(f"[jobs] {', '.join(f'{n} {k}' for k, n in kinds.items() if n)} job(s) on {self.args.workers} worker(s)", flush=True)
        t0 = time.time()
        states = [self.done[self.supernet_spec(seed=s[2])]["state"] if s[0] == "score" or s[-1] == "finetune" else None
                  for s in todo]
        for spec, res in zip(todo, utils.run_jobs(run_job, [(self.args, self.data, s, st) for s, st in zip(todo, states)],
                                                  workers=self.args.workers)):
            self.done[spec] = res
            if spec[0] == "score" and spec[2] == self.args.seed:  # per-image scores of the seed's supernet
                (self._val if spec[1] == "val" else self._test).update(res)
        print(f"[jobs] done in {time.time() - t0:.0f}s", flush=True)
        return [self.done[s] for s in specs]

    def cost(self, spec):
        """Rough cost of a job in epochs of an average subnet, to start the longest jobs first."""
        a, mean_params = self.args, np.mean(list(self.params.values()))
        if spec[0] == "supernet":
            return a.epochs + (a.finetune_epochs if spec[4] is not None else 0)
        if spec[0] == "subnet":
            return (a.retrain_epochs if spec[3] == "retrain" else a.finetune_epochs) * self.params.get(spec[1], mean_params) / mean_params
        return len(spec[3]) * len(self.data.y_val if spec[1] == "val" else self.data.y_test) / (3 * len(self.data.y_train))

    def supernet(self, kind="entangled"):
        return self.run([self.supernet_spec(kind)])[0]

    def score_specs(self, split, configs):
        """Score jobs for the configs not scored yet on `split`, chunked by (D, first layer genes): trie-friendly."""
        have = self._val if split == "val" else self._test
        keys = sorted({config_key(c) for c in configs} - set(have))
        groups = {}
        for k in keys:
            groups.setdefault((k[0], k[2][:1], k[3][:1]), []).append(k)
        return [("score", split, self.args.seed, tuple(g)) for g in groups.values()]

    def scores(self, split, configs):
        """{key: Score(acc, nll)} of configs inheriting from the entangled supernet of args.seed, on val or test."""
        self.supernet()
        self.run(self.score_specs(split, configs))
        have = self._val if split == "val" else self._test
        return {config_key(c): summarize(*have[config_key(c)]) for c in configs}

    def per_image(self, split, configs):
        self.scores(split, configs)
        return [(self._val if split == "val" else self._test)[config_key(c)] for c in configs]

    def table(self):
        """The tabular benchmark: {key: Score} on val for every config of the table's sub-space."""
        return self.scores("val", self.table_configs)

    def candidates(self):
        """The table's configs inside the parameter range, best validation NLL first."""
        val = self.table()
        return sorted((c for c in self.table_configs if self.in_range(c)), key=lambda c: val[config_key(c)].nll)


def summarize(correct, nll):
    return utils.Score(100.0 * correct.sum().item() / len(correct), nll.double().mean().item())


# ------------------------------------------------------------------------------------------------ experiments
def kendall_tau(a, b):
    """Kendall's tau-b rank correlation of two equally long sequences (ties counted, as scipy
    does): (concordant - discordant pairs) / sqrt(pairs not tied in a * pairs not tied in b)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    assert len(a) == len(b) >= 2, "kendall_tau needs two sequences of the same length >= 2"
    i, j = np.triu_indices(len(a), 1)                      # every pair i < j once
    sa, sb = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])    # (pairs,) +1 / -1 / 0 for a tie
    denom = math.sqrt(float((sa != 0).sum()) * float((sb != 0).sum()))
    return float((sa * sb).sum() / denom) if denom else float("nan")


def bootstrap_ci(stat, *samples, n_boot=2000, seed=0):
    """(value, low, high): stat(*samples) and its 95% percentile-bootstrap interval, resampling
    rows (the same indices in every sample, so pairs stay pairs)."""
    g = np.random.default_rng(seed)
    n = len(samples[0])
    vals = []
    for _ in range(n_boot):
        idx = g.integers(0, n, n)
        v = stat(*[[s[i] for i in idx] for s in samples])
        if not math.isnan(v):
            vals.append(v)
    lo, hi = np.percentile(vals, [2.5, 97.5]) if vals else (float("nan"), float("nan"))
    return stat(*samples), float(lo), float(hi)



def print_table(header, rows):
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(v) for v in r) + " |")


def tau_ci(a, b, seed=0):
    """(tau, low, high): Kendall's tau of a and b and its 95% bootstrap interval, resampling the items."""
    return bootstrap_ci(kendall_tau, list(a), list(b), n_boot=1000, seed=seed)


def fmt_ci(v, digits=2):
    return f"{v[0]:+.{digits}f} [{v[1]:+.{digits}f}, {v[2]:+.{digits}f}]".replace("-", "\u2212")


def paired_se(per, index, rng, n_pairs=200):
    """Median standard error of the difference between two candidates' scores on the same images: the noise a
    fitness comparison has to beat. per: per-image (correct, nll) of each candidate; index 0 = accuracy in points,
    1 = NLL in nats."""
    vals = []
    for _ in range(n_pairs):
        i, j = rng.sample(range(len(per)), 2)
        d = per[i][index].double() - per[j][index].double()  # (V,) per-image differences
        vals.append((100 if index == 0 else 1) * d.std().item() / math.sqrt(len(d)))
    return float(np.median(vals))


def mean_se(xs):
    xs = np.asarray(xs, dtype=float)
    return float(xs.mean()), float(xs.std(ddof=1) / math.sqrt(len(xs))) if len(xs) > 1 else float("nan")


def exp_entangle(lab, out):
    """Paper Fig. 3/4: weight entanglement vs classic weight sharing under one budget -- the same steps, the same
    sampled subnets on the same batches -- then the same random subnets scored with inherited weights on val."""
    ent, cla = lab.run([lab.supernet_spec("entangled"), lab.supernet_spec("classic")])
    n = len(lab.probes)
    print(f"\n== entangle: both supernets {len(ent['losses'])} steps, the same sampled subnets and batches; {n} random "
          f"subnets scored with inherited weights on {len(lab.data.y_val)} val images ==", flush=True)
    rows = [{"config": config_str(config_from_key(k)), "params": lab.count(config_from_key(k)), "entangled": e,
             "classic": c} for k, e, c in zip(lab.probes, ent["probes"], cla["probes"])]
    (e_acc, e_nll), (c_acc, c_nll) = ([[r[arm][i] for r in rows] for i in (0, 1)] for arm in ("entangled", "classic"))
    size = lambda res: sum(v.numel() for v in res["state"].values()) / 1e3
    print_table(["", "entangled", "classic"], [
        ["final train loss (last epoch)", f"{ent['history'][-1]['loss']:.3f}", f"{cla['history'][-1]['loss']:.3f}"],
        [f"inherited val acc, mean of {n} subnets (%)", f"{np.mean(e_acc):.1f}", f"{np.mean(c_acc):.1f}"],
        ["inherited val acc, worst / best subnet (%)", f"{min(e_acc):.1f} / {max(e_acc):.1f}", f"{min(c_acc):.1f} / {max(c_acc):.1f}"],
        ["inherited val NLL, mean (nats)", f"{np.mean(e_nll):.3f}", f"{np.mean(c_nll):.3f}"],
        ["supernet parameters (k)", f"{size(ent):.0f}", f"{size(cla):.0f}"]])
    wins = sum(e > c for e, c in zip(e_acc, c_acc))
    print(f"entangled > classic on {wins}/{n} of the same subnets (one training seed; the interval is over subnets)")
    v_acc = utils.compare_paired(e_acc, c_acc, name_a="entangled", name_b="classic", pairs="paired subnets", bound=1.0)
    v_nll = utils.compare_paired(e_nll, c_nll, name_a="entangled", name_b="classic", pairs="paired subnets",
                                 unit="nats", digits=3, higher_is_better=False, bound=0.02)
    plot_entangle(os.path.join(out, "entangle.png"), ent["losses"], cla["losses"], rows,
                  len(ent["losses"]) // lab.args.epochs)
    return {"rows": rows, "wins": wins, "verdict_acc": v_acc, "verdict_nll": v_nll,
            "final_loss": {"entangled": ent["history"][-1]["loss"], "classic": cla["history"][-1]["loss"]},
            "supernet_params_k": {"entangled": size(ent), "classic": size(cla)},
            "history": {"entangled": ent["history"], "classic": cla["history"]}}


def fitness_sample(lab):
    """The in-range candidates that are also scored on test (fitness experiment): a seeded random sample."""
    cands = sorted(lab.candidates(), key=config_key)
    return random.Random(lab.args.seed + 6).sample(cands, min(lab.args.n_val_test, len(cands)))


def exp_fitness(lab, out):
    """Can the fitness rank candidates at all? The search compares in-range candidates by their inherited score on
    the validation split. Two random halves of the validation images: if they order the candidates alike (Kendall
    tau near 1) the score measures the candidates, not the images; near 0 any search is a lottery. Then validation
    against test on a random sample of candidates, for accuracy and for NLL."""
    cands = lab.candidates()
    per = lab.per_image("val", cands)
    V = len(lab.data.y_val)
    half = torch.zeros(V, dtype=torch.bool)
    half[torch.randperm(V, generator=torch.Generator().manual_seed(lab.args.seed + 5))[:V // 2]] = True
    s1, s2 = ([summarize(c[m], n[m]) for c, n in per] for m in (half, ~half))
    split = {k: tau_ci([s[i] for s in s1], [s[i] for s in s2]) for i, k in enumerate(("acc", "nll"))}
    sample = fitness_sample(lab)
    val, test = lab.scores("val", sample), lab.scores("test", sample)
    keys = [config_key(c) for c in sample]
    vt = {k: tau_ci([val[q][i] for q in keys], [test[q][i] for q in keys]) for i, k in enumerate(("acc", "nll"))}
    full = [summarize(c, n) for c, n in per]
    accs = np.array([s.acc for s in full])
    p = accs.mean() / 100
    pair_se, pair_se_nll = (paired_se(per, i, random.Random(lab.args.seed + 7)) for i in (0, 1))
    print(f"\n== fitness: {len(cands)} candidates in {lab.param_range[0]/1e3:.0f}k..{lab.param_range[1]/1e3:.0f}k params "
          f"(the table's), inherited weights, {V} val images ==", flush=True)
    print_table(["Kendall tau, 95% bootstrap CI", "accuracy", "NLL"], [
        [f"split-half: two random halves of val ({V // 2} images each), {len(cands)} candidates", fmt_ci(split["acc"]), fmt_ci(split["nll"])],
        [f"val ({V}) vs test ({len(lab.data.y_test)}), {len(sample)} random candidates", fmt_ci(vt["acc"]), fmt_ci(vt["nll"])]])
    for k, name in (("acc", "accuracy"), ("nll", "NLL")):
        print(f"{name}: two halves order a random pair of candidates the same way {50 * (1 + split[k][0]):.0f}% of the time; "
              f"val and test {50 * (1 + vt[k][0]):.0f}% (tau = 2 P(same order) - 1; 50% = a coin)")
    print(f"candidates' val accuracy spans {accs.min():.1f}..{accs.max():.1f}% (SD {accs.std(ddof=1):.2f}); one val accuracy "
          f"has a binomial SE of {100 * math.sqrt(p * (1 - p) / V):.2f} points, the difference of two candidates on the same "
          f"images a median SE of {pair_se:.2f} points ({1000 * pair_se_nll:.1f} millinats in NLL)")
    plot_fitness(os.path.join(out, "fitness.png"), s1, s2, [val[q] for q in keys], [test[q] for q in keys])
    return {"n_candidates": len(cands), "val_images": V, "split_half_tau": split, "val_test_tau": vt,
            "n_val_test": len(sample), "val_acc_range": [float(accs.min()), float(accs.max())],
            "val_acc_sd": float(accs.std(ddof=1)), "se_one_acc": 100 * math.sqrt(p * (1 - p) / V), "se_pair_acc": pair_se, "se_pair_nll": pair_se_nll}


def simulate(lab, val, constraint, kind):
    """`repeats` runs of evolution and of random search on the cached table (no model runs: fitness is a look-up).
    kind "nll": fitness = -val NLL (regret in nats); "acc": fitness = val accuracy (regret in points).
    Returns {method: {"regret": (repeats, max budget) array, "picks": [best config after max budget per repeat]}}."""
    a, n_max = lab.args, max(lab.args.budgets)
    fit = (lambda c: -val[config_key(c)].nll) if kind == "nll" else (lambda c: val[config_key(c)].acc)
    best = max(fit(c) for c in lab.table_configs if constraint(c))
    res = {}
    for method in ("evolution", "random"):
        regret, picks = [], []
        for r in range(a.repeats):
            rng = random.Random(f"{a.seed}/{method}/{kind}/{r}")  # a string seed: the same stream on every machine
            if method == "evolution":
                arch = evolution_search(fit, lab.table_space, constraint=constraint, budget=n_max, population=a.population,
                                        parents=a.parents, p_depth=a.p_depth, p_layer=a.p_layer, rng=rng)
            else:
                arch = random_search(fit, lab.table_space, constraint=constraint, budget=n_max, rng=rng)
            regret.append(best - np.array(arch.best_so_far()))
            picks.append(arch.top(1)[0])
        res[method] = {"regret": np.stack(regret), "picks": picks}
    return res


def search_runs(lab):
    """The tabular benchmark's searches, run once (prefetch needs their picks early, to score them on test with the
    other jobs): {(setting, fitness kind): simulate(...)}. Two settings: the parameter range (as the real search),
    and the whole table without a constraint -- a larger space, where random search should struggle more."""
    if lab._search_runs is None:
        a, val = lab.args, lab.table()
        lab.settings = {"in range": lambda c: lab.in_range(c) and config_key(c) in val,
                        "whole table": lambda c: config_key(c) in val}
        lab.setting_sizes = {s: sum(ok(c) for c in lab.table_configs) for s, ok in lab.settings.items()}
        if max(a.budgets) > min(lab.setting_sizes.values()):
            raise utils.InputError(f"--budgets up to {max(a.budgets)} but only {min(lab.setting_sizes.values())} table "
                                   f"configs are in range: use smaller budgets or a larger table (--table-*)")
        lab._search_runs = {(s, k): simulate(lab, val, ok, k) for s, ok in lab.settings.items() for k in ("nll", "acc")}
    return lab._search_runs


def search_picks(lab):
    return [c for sim in search_runs(lab).values() for m in sim.values() for c in m["picks"]]


def exp_tabular(lab, out):
    """A tabular NAS benchmark in miniature (as NAS-Bench-201): every config of a sub-space is scored once with
    inherited weights, then evolution and random search run `repeats` times each on the cached scores (search_runs).
    Evolution's advantage, if any, lives in sample efficiency: regret (optimum - best found so far) against the number
    of evaluations, averaged over repeats; then the test accuracy of what each method picked."""
    a, val = lab.args, lab.table()
    print(f"\n== tabular: all {len(val)} configs of the sub-space {space_str(lab.table_space)} scored on val; {a.repeats} "
          f"runs per method; evolution: population {a.population}, top-{a.parents}, Pd={a.p_depth}, Pm={a.p_layer} ==", flush=True)
    sims, picks = search_runs(lab), search_picks(lab)
    test = lab.scores("test", picks)
    noise = 1000 * paired_se(lab.per_image("val", lab.candidates()), 1, random.Random(a.seed + 7))
    print(f"noise scale: two candidates' val NLLs differ by a median SE of {noise:.1f} millinats (same images)")
    sizes, report = lab.setting_sizes, {}
    for (s, kind), sim in sims.items():
        report[f"{s}/{kind}"] = report_search(sim, test, kind, f"{s} ({sizes[s]} configs), fitness = val {kind}", a.budgets)
    plot_tabular(os.path.join(out, "tabular.png"), sims, sizes, noise)
    return {"table_size": len(val), "noise_millinats": noise, "setting_sizes": sizes, "report": report,
            "distinct_picks": len({config_key(c) for c in picks}), "table": {str(k): tuple(v) for k, v in val.items()}}


def report_search(sim, test, kind, title, budgets):
    """Print mean regret +- SE and hit rate per budget, the test accuracy of the picks, and the paired verdicts."""
    unit, scale, digits = ("millinats", 1000, 1) if kind == "nll" else ("points", 1, 2)
    print(f"\n{title}: mean regret ({unit}) +- SE over runs; 'hit' = share of runs that found the optimum")
    rows, out = [], {}
    for n in budgets:
        cells = []
        for m in ("evolution", "random"):
            reg = sim[m]["regret"][:, n - 1] * scale
            mu, se = mean_se(reg)
            cells += [f"{mu:.{digits}f} \u00b1 {se:.{digits}f}", f"{100 * np.mean(reg <= 1e-12):.0f}%"]
            out.setdefault(m, {})[n] = {"regret": mu, "se": se, "hit": float(np.mean(reg <= 1e-12))}
        rows.append([n] + cells)
    print_table(["evaluations", "evolution regret", "hit", "random regret", "hit"], rows)
    n = max(budgets)
    ea, rs = (sim[m]["regret"][:, n - 1] * scale for m in ("evolution", "random"))
    out["verdict_regret"] = utils.compare_paired(ea, rs, name_a="evolution", name_b="random", unit=unit, digits=digits,
                                                 higher_is_better=False, bound=1.0 if kind == "nll" else 0.1, pairs="runs each")
    t = {m: [test[config_key(c)].acc for c in sim[m]["picks"]] for m in ("evolution", "random")}
    print(f"test accuracy of the picks after {n} evaluations: evolution {np.mean(t['evolution']):.2f}%, random "
          f"{np.mean(t['random']):.2f}% ({len({config_key(c) for m in sim for c in sim[m]['picks']})} distinct picks)")
    out["verdict_test"] = utils.compare_paired(t["evolution"], t["random"], name_a="evolution picks", name_b="random picks",
                                               unit="points", digits=2, bound=0.5, pairs="runs each")
    return out


def ranking_picks(lab):
    """n_rank in-range candidates spread evenly over the validation-NLL ranking (best, ..., worst): chosen a priori."""
    cands, n = lab.candidates(), lab.args.n_rank
    return [cands[i] for i in sorted({round(j * (len(cands) - 1) / (n - 1)) for j in range(n)})]


def exp_ranking(lab, out):
    """The claim that makes one-shot search meaningful: inherited weights rank subnets as retraining does. Retrain
    n_rank subnets spread over the in-range ranking from scratch and compare the two orders on the test set."""
    a, picks = lab.args, ranking_picks(lab)
    retrained = lab.run([("subnet", config_key(c), a.seed, "retrain") for c in picks])
    val, test = lab.scores("val", picks), lab.scores("test", picks)
    keys = [config_key(c) for c in picks]
    print(f"\n== ranking: {len(picks)} in-range subnets spread over the inherited val-NLL ranking, retrained from scratch "
          f"for {a.retrain_epochs} epochs (seed {a.seed}); test on {len(lab.data.y_test)} images ==")
    print_table(["subnet", "params (k)", "inherited val NLL", "inherited test %", "retrained test %", "retrained test NLL"],
                [[config_str(c), f"{lab.count(c)/1e3:.0f}", f"{val[k].nll:.3f}", f"{test[k].acc:.1f}", f"{r['test'][0]:.1f}",
                  f"{r['test'][1]:.3f}"] for c, k, r in zip(picks, keys, retrained)])
    tau = {name: tau_ci([test[k][i] for k in keys], [r["test"][i] for r in retrained]) for i, name in enumerate(("acc", "nll"))}
    print(f"Kendall tau, inherited vs retrained test accuracy: {fmt_ci(tau['acc'])} (95% bootstrap CI, n={len(picks)} subnets); "
          f"test NLL: {fmt_ci(tau['nll'])}")
    v = utils.compare_paired([test[k].acc for k in keys], [r["test"][0] for r in retrained], name_a="inherited",
                             name_b="retrained", pairs="paired subnets", bound=1.0)
    plot_ranking(os.path.join(out, "ranking.png"), [test[k] for k in keys], [r["test"] for r in retrained], tau)
    return {"subnets": [{"config": config_str(c), "params": lab.count(c), "inherited_val": tuple(val[k]),
                         "inherited_test": tuple(test[k]), "retrained": r} for c, k, r in zip(picks, keys, retrained)],
            "tau": tau, "verdict_inherited_vs_retrained": v}


def inherit_specs(lab):
    """Jobs of the inherit experiment: per seed, its supernet (scoring and fine-tuning the chosen subnet) and the
    chosen subnet retrained from scratch from the same initial values."""
    a, key = lab.args, config_key(lab.candidates()[0])
    seeds = [a.seed + i for i in range(a.inherit_seeds)]
    return ([("subnet", key, a.seed, "finetune")] + [lab.supernet_spec(seed=s, finetune_key=key) for s in seeds[1:]] +
            [("subnet", key, s, "retrain") for s in seeds])


def exp_inherit(lab, out):
    """Paper Table 3: the searched subnet with inherited weights vs the same architecture retrained from scratch
    (and vs a short fine-tune), over paired seeds: seed s = the supernet of seed s and the retrain of seed s, which
    share the data, the batch order and every initial weight value. The subnet is chosen on val NLL (seed 0's table)."""
    a, chosen = lab.args, lab.candidates()[0]
    specs = inherit_specs(lab)
    res = lab.run(specs)
    n = a.inherit_seeds
    ft = [res[0]] + [r["finetune"] for r in res[1:n]]
    arms = {"inherited": [r["inherited"]["test"] for r in ft], "inherited + fine-tune": [r["test"] for r in ft],
            "retrained": [r["test"] for r in res[n:]]}
    print(f"\n== inherit: {config_str(chosen)} ({lab.count(chosen)/1e3:.0f}k params, best in range by val NLL), {n} paired "
          f"seeds; fine-tune {a.finetune_epochs} epochs, retrain {a.retrain_epochs} epochs; test on {len(lab.data.y_test)} images ==")
    print_table(["seed"] + [f"{k} test % / NLL" for k in arms],
                [[a.seed + i] + [f"{arms[k][i][0]:.1f} / {arms[k][i][1]:.3f}" for k in arms] for i in range(n)])
    verdicts = {}
    for arm in ("inherited", "inherited + fine-tune"):
        verdicts[arm] = [utils.compare_paired([s[0] for s in arms[arm]], [s[0] for s in arms["retrained"]], name_a=arm,
                                              name_b="retrained", bound=1.0),
                         utils.compare_paired([s[1] for s in arms[arm]], [s[1] for s in arms["retrained"]], name_a=arm,
                                              name_b="retrained", unit="nats", digits=3, higher_is_better=False, bound=0.03)]
    return {"chosen": chosen, "params": lab.count(chosen), "seeds": [a.seed + i for i in range(n)], "arms": arms,
            "verdicts": verdicts}


def bench(args, device, num_classes=10, n_configs=3, repeats=3):
    """Train-step time (forward + backward) of a sampled subnet run through the supernet vs the same architecture
    extracted as a standalone ViT. Repeats are interleaved and the best of each is kept, to damp CPU noise."""
    sn = build_supernet(args, num_classes).to(device)
    rng, rows, shape = random.Random(args.seed), [], (3, args.image_size, args.image_size)
    for cfg in [sample_config(sn.space, rng) for _ in range(n_configs)] + [largest_config(sn.space)]:
        sub = extract_subnet(sn, cfg)
        t_super, t_plain = [], []
        for _ in range(repeats):
            ips, _ = utils.measure_step(sn, shape, batch_size=args.batch_size, device=device, num_classes=num_classes,
                                        forward=lambda m, x: m(x, cfg))
            t_super.append(1000 * args.batch_size / ips)
            ips, _ = utils.measure_step(sub, shape, batch_size=args.batch_size, device=device, num_classes=num_classes)
            t_plain.append(1000 * args.batch_size / ips)
        rows.append({"config": config_str(cfg), "params": sn.subnet_params(cfg), "supernet_ms": min(t_super),
                     "standalone_ms": min(t_plain), "ratio": min(t_super) / min(t_plain)})
    print(f"\ntrain step (forward+backward, batch {args.batch_size}, {shape}) on {device}; best of {repeats}")
    print_table(["subnet", "params", "supernet ms", "standalone ms", "ratio"],
                [[r["config"], f"{r['params']/1e3:.0f}k", f"{r['supernet_ms']:.1f}", f"{r['standalone_ms']:.1f}",
                  f"{r['ratio']:.2f}x"] for r in rows])
    mean_ratio = float(np.mean([r["ratio"] for r in rows]))
    print(f"mean slicing overhead {mean_ratio:.2f}x (target <= 1.15x)")
    return {"rows": rows, "mean_ratio": mean_ratio}


# ------------------------------------------------------------------------------------------------ figures

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_entangle(path, ent_losses, cls_losses, rows, steps_per_epoch):
    plt = _plt()
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    w = max(1, steps_per_epoch)  # moving average over one epoch of steps
    for v, lab in ((ent_losses, "weight entanglement"), (cls_losses, "classic weight sharing")):
        s = np.convolve(np.array(v), np.ones(w) / w, mode="valid")
        ax[0].plot(np.arange(len(s)) + w, s, label=lab)
    ax[0].set(xlabel="supernet training step (one random subnet per step)", ylabel=f"train loss (moving avg, {w} steps)",
              title="supernet training loss (paper Fig. 4)")
    ax[0].legend()
    p = [r["params"] / 1e3 for r in rows]
    ax[1].scatter(p, [r["entangled"][0] for r in rows], label="weight entanglement")
    ax[1].scatter(p, [r["classic"][0] for r in rows], marker="x", label="classic weight sharing")
    ax[1].set(xlabel="subnet parameters (k)", ylabel="val top-1 % with inherited weights",
              title="the same random subnets, inherited weights")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_fitness(path, half1, half2, val, test):
    plt = _plt()
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    ax[0].scatter([s.acc for s in half1], [s.acc for s in half2], s=8)
    ax[0].set(xlabel="val half 1: top-1 %", ylabel="val half 2: top-1 %", title="split-half: accuracy")
    ax[1].scatter([s.nll for s in half1], [s.nll for s in half2], s=8)
    ax[1].set(xlabel="val half 1: NLL", ylabel="val half 2: NLL", title="split-half: NLL")
    ax[2].scatter([s.nll for s in val], [s.nll for s in test], s=12)
    ax[2].set(xlabel="val NLL", ylabel="test NLL", title="validation vs test (random candidates)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tabular(path, sims, sizes, noise):
    plt = _plt()
    settings = list(sizes)
    fig, ax = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4), squeeze=False)
    for a, s in zip(ax[0], settings):
        for m, c in (("evolution", "C0"), ("random", "C1")):
            reg = sims[(s, "nll")][m]["regret"] * 1000  # (repeats, budget), millinats
            mu, se = reg.mean(0), reg.std(0, ddof=1) / math.sqrt(len(reg))
            n = np.arange(1, len(mu) + 1)
            a.plot(n, mu, color=c, label=f"{m} search")
            a.fill_between(n, mu - se, mu + se, color=c, alpha=0.25)
        a.axhline(noise, color="gray", ls=":", label="SE of a val NLL difference (noise)")
        a.set(xlabel="evaluations (candidates scored)", ylabel="val NLL regret, millinats (mean \u00b1 SE)",
              title=f"{s}: {sizes[s]} configs, {len(reg)} runs each", yscale="symlog")
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ranking(path, inherited, retrained, tau):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter([s[0] for s in inherited], [s[0] for s in retrained])
    ax.set(xlabel="inherited weights: test top-1 %", ylabel="retrained from scratch: test top-1 %",
           title=f"Kendall tau {tau['acc'][0]:.2f} [{tau['acc'][1]:.2f}, {tau['acc'][2]:.2f}]")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main

def prefetch(lab, todo):
    """Ask for what the chosen experiments need, phase by phase, so that each phase's jobs run in parallel:
    supernets, then the validation table, then test scores, retrained subnets and the other seeds together."""
    lab.run([lab.supernet_spec()] + ([lab.supernet_spec("classic")] if "entangle" in todo else []))
    if not todo & {"fitness", "tabular", "ranking", "inherit"}:
        return
    lab.table()
    later = []
    if "fitness" in todo:
        later += lab.score_specs("test", fitness_sample(lab))
    if "tabular" in todo:
        later += lab.score_specs("test", search_picks(lab))
    if "ranking" in todo:
        later += lab.score_specs("test", ranking_picks(lab))
        later += [("subnet", config_key(c), lab.args.seed, "retrain") for c in ranking_picks(lab)]
    if "inherit" in todo:
        later += inherit_specs(lab)
    lab.run(later)


EXPERIMENT_FNS = {"entangle": exp_entangle, "fitness": exp_fitness, "tabular": exp_tabular, "ranking": exp_ranking,
                  "inherit": exp_inherit}


def main(argv=None):
    args = get_args(argv)
    device, out = utils.start(args, "04_autoformer_entangle")
    if args.bench:
        res = bench(args, device)
        utils.save_results(os.path.join(out, "bench.json"), vars(args), res)
        return res
    t0, data = time.time(), utils.data_from_args(args)
    lab = Lab(args, data, device)
    print(f"data: {len(data.y_train)} train / {len(data.y_val)} val (carved from train: every choice is made on it) / "
          f"{len(data.y_test)} test images, {data.num_classes} classes; space {space_str(lab.space)}; gp={args.gp}, relative "
          f"positions {'clipped at ' + str(args.max_rel_pos) if args.max_rel_pos else 'off'}; param range "
          f"{lab.param_range[0]/1e3:.0f}k..{lab.param_range[1]/1e3:.0f}k; {args.workers} worker(s)", flush=True)
    todo = EXPERIMENTS if args.experiment == "all" else (args.experiment,)
    prefetch(lab, set(todo))
    print(f"== training and scoring done in {time.time() - t0:.0f}s ==", flush=True)
    results = {}
    for name in todo:
        t = time.time()
        results[name] = EXPERIMENT_FNS[name](lab, out)
        results[name]["wall_s"] = round(time.time() - t, 1)
        utils.save_results(os.path.join(out, f"{name}.json"), vars(args), results[name])
    results["wall_s"] = round(time.time() - t0, 1)
    print(f"\n== done in {results['wall_s']:.0f}s; results and figures in {out} ==")
    utils.save_results(os.path.join(out, "results.json"), vars(args), results)
    return results


if __name__ == "__main__":
    utils.run_main(main)
