"""AutoFormer: Searching Transformers for Visual Recognition (Chen, Peng, Fu, Ling; ICCV 2021) -- arXiv 2107.00651.

The idea. Instead of training every candidate Vision Transformer (ViT) separately, train ONE supernet that holds
the weights of the largest candidate and let every smaller candidate ("subnet") use the *leading slice* of those
weights: a layer with embedding dim D and qkv dim I uses W[:I, :D], b[:I], LayerNorm[:D], a depth-L subnet uses
the first L blocks. This is "weight entanglement" (paper sec. 3.1, Fig. 2 right). Compared with classic one-shot
weight sharing (every choice of a layer has its OWN weights, Fig. 2 left), each training step updates weights that
every subnet shares, so all subnets train faster and inherit better weights (paper Fig. 3/4). After supernet
training (one uniformly sampled subnet per step, sec. 3.2) an evolutionary search (sec. 3.3) finds the best subnet
under a parameter budget, scoring each candidate with the weights it inherits from the supernet -- no retraining.

This script: the entangled supernet `SuperViT` (forward(x, config)), `sample_config`, `extract_subnet` (a plain
standalone `ViT` with the sliced weights copied in), a classic weight-sharing baseline `ClassicSuperViT` with the
same space, a controlled entanglement-vs-classic comparison (same steps, same sampled subnets, same batches),
evolutionary search vs random search with the same number of evaluated candidates, and for the best subnet:
inherited vs briefly fine-tuned vs retrained-from-scratch accuracy (paper Table 3).

Run:
    python 04_autoformer_entangle.py --quick --threads 1 --data ../shared/data/cifar10   # ~3.5 min on a 2-core CPU
    python 04_autoformer_entangle.py --data ../shared/data/cifar10                      # full preset, meant for one GPU
    python 04_autoformer_entangle.py --quick --bench --threads 1 --data ../shared/data/cifar10  # supernet vs standalone
(--threads 1 because the CPU was shared with other jobs: two OpenMP threads waiting on busy cores ran ~10x slower.)

Search space (paper Table 1, AutoFormer-T: embed (192, 216, 240), depth (12, 13, 14), heads (3, 4), MLP ratio
(3.5, 4), head dim 64, 224px images / patch 16). The full preset uses exactly AutoFormer-T on 32x32 CIFAR with patch 4
(64 tokens). The quick preset scales it down for a CPU: embed dims ~1/4 with three choices (48, 56, 64),
depth 12-14 -> (3, 4, 5), heads (2, 3, 4) x head dim 16 (64/4), MLP ratio (2, 3, 4), patch 8 (16 tokens).
Three choices per dimension so the search space (and the parameter range) has something to search.

RESULTS, quick preset, measured (real CIFAR-10 subset: 500 train images per class, 100 val per class carved from
train, 200 test per class; 2 shared CPU cores, 1 torch thread, torch 2.15; 205 s end to end, measured under the
shared-CPU lock; 16 epochs = 1248 steps per supernet). See runs/04_autoformer_entangle/results.json, entangle_vs_classic.png, search.png, bench.json.

    | entanglement vs classic sharing (same 1248 steps, same subnets, same batches) | entangled | classic |
    | final train loss (last epoch)                      | 1.840 | 2.062 |
    | inherited val acc, mean of 10 random subnets (%)    | 31.9  | 23.2  |
    | inherited val acc, worst / best subnet (%)          | 30.5 / 34.0 | 22.5 / 23.9 |
    | supernet parameters (k)                             | 264   | 1409  |
    entangled > classic on 10/10 of the same subnets (paper Fig. 3/4: reproduced).

    search under 130k..202k params, 128 candidates each (population 16 x 8 generations, top-5 parents; the paper
    uses 50 x 20, top-10): EA best val 34.5% vs random search 34.3% -- a tie within noise at this scale (the
    candidates inside the range all score 30.5-34.5% on 1000 val images, so there is little for the EA to find).

    | best subnet (D=64 L=5, 177k params)           | val top-1 % | test top-1 % |
    | random search best, inherited                 | 34.3 | 35.9 |
    | EA best, inherited                            | 34.5 | 36.2 |
    | EA best, inherited + 2-epoch fine-tune        | 33.4 | 36.3 |
    | EA best, retrained from scratch (16 epochs)   | 35.2 | 36.7 |
    Inherited weights come within 0.5-0.7 points of retraining the subnet from scratch for 16 epochs (paper Table 3:
    inherited ~ retrained); the short fine-tune changes little. Absolute accuracy is low because a tiny ViT sees only 5000 images for 16 epochs.

    --bench (batch 64, 1 thread, 3 random subnets + the largest): a train step through the supernet takes
    1.02-1.10x the time of the extracted standalone ViT, mean 1.06x (target <= 1.15x).
The full preset was NOT measured: no GPU was available for this task.

Shape letters used in comments: B batch, C image channels, S image side, P patch side, N tokens (patches + class
token), D embedding dim of the sampled subnet (Dmax: of the supernet), h heads, hd head dim (fixed), I = h*hd qkv dim
of one of q/k/v, M MLP hidden dim, K classes.
"""
import argparse
import os
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
    "quick": dict(train_per_class=500, val_per_class=100, test_per_class=200,
                  embed_dims=[48, 56, 64], depths=[3, 4, 5], num_heads=[2, 3, 4], mlp_ratios=[2.0, 3.0, 4.0],
                  head_dim=16, patch_size=8, batch_size=64, epochs=16, lr=2e-3, weight_decay=0.05,
                  n_compare=10, population=16, generations=8, parents=5,
                  finetune_epochs=2, finetune_lr=4e-4, retrain_epochs=16),
    "full": dict(train_per_class=None, val_per_class=500, test_per_class=None,
                 embed_dims=[192, 216, 240], depths=[12, 13, 14], num_heads=[3, 4], mlp_ratios=[3.5, 4.0],
                 head_dim=64, patch_size=4, batch_size=256, epochs=100, lr=1e-3, weight_decay=0.05,
                 n_compare=50, population=50, generations=20, parents=10,
                 finetune_epochs=10, finetune_lr=1e-4, retrain_epochs=100),
}


def get_args(argv=None):
    p = utils.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    utils.add_common_args(p)
    p.set_defaults(val_per_class=None)  # None -> the preset's value (the search needs a validation split)
    p.add_argument("--quick", action="store_true", help="small CPU preset (<= 10 min on 2 cores); default: full GPU preset")
    p.add_argument("--bench", action="store_true", help="only time a train step: supernet(x, cfg) vs extracted standalone ViT")
    g = p.add_argument_group("search space (paper Table 1)")
    g.add_argument("--embed-dims", type=utils.positive_int, nargs="+", help="embedding dim choices (one per network)")
    g.add_argument("--depths", type=utils.positive_int, nargs="+", help="depth choices")
    g.add_argument("--num-heads", type=utils.positive_int, nargs="+", help="heads choices (per layer)")
    g.add_argument("--mlp-ratios", type=utils.positive_float, nargs="+", help="MLP ratio choices (per layer)")
    g.add_argument("--head-dim", type=utils.positive_int, help="fixed head dim: q/k/v have heads x head_dim units")
    g.add_argument("--patch-size", type=utils.positive_int, help="patch side in pixels")
    g = p.add_argument_group("supernet training (sec. 3.2) and retraining")
    g.add_argument("--batch-size", type=utils.positive_int)
    g.add_argument("--epochs", type=utils.positive_int, help="supernet epochs (each supernet of the comparison gets the same)")
    g.add_argument("--lr", type=utils.positive_float)
    g.add_argument("--weight-decay", type=utils.nonneg_float)
    g.add_argument("--n-compare", type=utils.positive_int, help="random subnets scored with inherited weights, entangled vs classic")
    g.add_argument("--finetune-epochs", type=utils.positive_int)
    g.add_argument("--finetune-lr", type=utils.positive_float)
    g.add_argument("--retrain-epochs", type=utils.positive_int, help="epochs to retrain the best subnet from scratch")
    g = p.add_argument_group("evolutionary search (sec. 3.3)")
    g.add_argument("--population", type=utils.positive_int, help="candidates evaluated per generation (paper 50)")
    g.add_argument("--generations", type=utils.positive_int, help="generations, the initial random one included (paper 20)")
    g.add_argument("--parents", type=utils.positive_int, help="top-k kept as parents (paper 10)")
    g.add_argument("--p-depth", type=utils.nonneg_float, default=0.2, help="depth mutation probability Pd (paper: 0.2)")
    g.add_argument("--p-layer", type=utils.nonneg_float, default=0.4, help="per-layer mutation probability Pm (paper: 0.4)")
    g.add_argument("--param-range", type=float, nargs=2, metavar=("LO", "HI"),
                   help="allowed subnet size in millions of parameters (default: the middle 35%%-70%% of the space)")
    args = p.parse_args(argv)
    utils.apply_preset(args, PRESETS["quick" if args.quick else "full"])
    if args.val_per_class <= 0:
        p.error("--val-per-class must be > 0: the search scores candidates on a validation split carved from train")
    if args.parents > args.population:
        p.error(f"--parents {args.parents} must be <= --population {args.population}")
    return args


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


# --- the plain (standalone) ViT that extract_subnet returns and that is retrained from scratch

class Attention(nn.Module):
    """Multi-head self-attention with `num_heads` heads of fixed width `head_dim` (AutoFormer's q/k/v are sized
    heads x head_dim, not embed_dim, so the head count can change without changing D)."""

    def __init__(self, dim, *, num_heads, head_dim):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.qkv = nn.Linear(dim, 3 * inner)  # rows [0:I) = q, [I:2I) = k, [2I:3I) = v
        self.proj = nn.Linear(inner, dim)

    def forward(self, x):  # x (B, N, D)
        B, N, _ = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, h, N, hd)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # softmax(q k^T / sqrt(hd)) v: (B, h, N, hd)
        return self.proj(out.transpose(1, 2).reshape(B, N, -1))  # (B, N, I) -> (B, N, D)


class Block(nn.Module):
    """Pre-norm transformer block: x + MSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim, *, num_heads, head_dim, mlp_hidden):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=num_heads, head_dim=head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, mlp_hidden), nn.Linear(mlp_hidden, dim)

    def forward(self, x):  # (B, N, D)
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """A plain ViT whose layers may differ in heads and MLP width (what a searched AutoFormer subnet is)."""

    def __init__(self, *, image_size, patch_size, num_classes, embed_dim, num_heads, mlp_hidden, head_dim, in_chans=3):
        super().__init__()
        assert image_size % patch_size == 0, f"image size {image_size} must be divisible by patch size {patch_size}"
        assert len(num_heads) == len(mlp_hidden), f"one heads value per layer and one MLP width per layer: {num_heads} vs {mlp_hidden}"
        n_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches + 1, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads=h, head_dim=head_dim, mlp_hidden=m)
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
        return self.head(self.norm(x[:, 0]))  # class token -> (B, K)


# --- the weight-entangled supernet (paper sec. 3.1)

class SuperAttention(nn.Module):
    """Attention holding the largest weights: qkv (3*Imax, Dmax), proj (Dmax, Imax). A subnet with embedding D and h
    heads (I = h*hd) uses, for EACH of q, k and v, its first I output units and first D inputs -- weight rows AND bias
    entries of the same units. (The official qkv_super takes the weight rows interleaved, `w[i:I3:3]`, but the bias as
    the leading block `b[:I3]`, so a subnet's row j and bias j belong to different units: we do not copy that.)"""

    def __init__(self, max_dim, *, max_heads, head_dim):
        super().__init__()
        self.head_dim, self.max_inner = head_dim, max_heads * head_dim
        self.qkv = nn.Linear(max_dim, 3 * self.max_inner)
        self.proj = nn.Linear(self.max_inner, max_dim)

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
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(B, N, inner)  # (B, N, I)
        return F.linear(out, self.proj.weight[:D, :inner], self.proj.bias[:D])  # (B, N, D)


class SuperBlock(nn.Module):
    """Pre-norm block with entangled weights: LayerNorm[:D], fc1 W[:M, :D], fc2 W[:D, :M]."""

    def __init__(self, max_dim, *, max_heads, head_dim, max_mlp_hidden):
        super().__init__()
        self.norm1 = nn.LayerNorm(max_dim)
        self.attn = SuperAttention(max_dim, max_heads=max_heads, head_dim=head_dim)
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
    blocks, per-layer heads and MLP width, final norm and head [:D]."""

    def __init__(self, space, *, image_size, patch_size, num_classes, in_chans=3):
        super().__init__()
        assert image_size % patch_size == 0, f"image size {image_size} must be divisible by patch size {patch_size}"
        self.space, self.image_size, self.patch_size, self.num_classes, self.in_chans = space, image_size, patch_size, num_classes, in_chans
        D, n_patches = max(space.embed_dims), (image_size // patch_size) ** 2
        max_hidden = max(int(round(r * d)) for r in space.mlp_ratios for d in space.embed_dims)
        self.patch_embed = nn.Conv2d(in_chans, D, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches + 1, D))
        self.blocks = nn.ModuleList(SuperBlock(D, max_heads=max(space.num_heads), head_dim=space.head_dim, max_mlp_hidden=max_hidden)
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
        for h, r in zip(config["num_heads"], config["mlp_ratio"]):
            inner, M = h * hd, int(round(r * D))
            n += 2 * D  # norm1
            n += D * 3 * inner + 3 * inner + inner * D + D  # qkv + proj
            n += 2 * D  # norm2
            n += D * M + M + M * D + D  # fc1 + fc2
        return n + 2 * D + D * K + K  # final norm + head

    def forward(self, x, config):  # x (B, C, S, S)
        self.check_config(config)
        D = config["embed_dim"]
        x = F.conv2d(x, self.patch_embed.weight[:D], self.patch_embed.bias[:D], stride=self.patch_size)  # (B, D, S/P, S/P)
        x = x.flatten(2).transpose(1, 2)  # (B, N-1, D)
        x = torch.cat([self.cls_token[..., :D].expand(len(x), -1, -1), x], 1) + self.pos_embed[..., :D]  # (B, N, D)
        for blk, h, r in zip(self.blocks[:config["depth"]], config["num_heads"], config["mlp_ratio"]):  # first `depth` blocks
            x = blk(x, num_heads=h, mlp_hidden=int(round(r * D)))
        x = F.layer_norm(x[:, 0], (D,), self.norm.weight[:D], self.norm.bias[:D], self.norm.eps)  # class token (B, D)
        return F.linear(x, self.head.weight[:, :D], self.head.bias)  # (B, K)


# --- the baseline: classic one-shot weight sharing (paper Fig. 2 left), same space, no entanglement

class ClassicSuperViT(nn.Module):
    """Every choice has its own independent weights: per embedding dim its own patch embedding, tokens, norm and
    head; per layer and per (D, heads) its own LayerNorm+attention, per (D, MLP ratio) its own LayerNorm+MLP.
    A step only trains the modules its subnet picked, so each module sees a fraction of the steps."""

    def __init__(self, space, *, image_size, patch_size, num_classes, in_chans=3):
        super().__init__()
        assert image_size % patch_size == 0, f"image size {image_size} must be divisible by patch size {patch_size}"
        self.space, self.patch_size = space, patch_size
        n_tokens = (image_size // patch_size) ** 2 + 1
        E = space.embed_dims
        self.patch_embed = nn.ModuleDict({f"e{d}": nn.Conv2d(in_chans, d, patch_size, stride=patch_size) for d in E})
        self.cls_token = nn.ParameterDict({f"e{d}": nn.Parameter(torch.zeros(1, 1, d)) for d in E})
        self.pos_embed = nn.ParameterDict({f"e{d}": nn.Parameter(torch.zeros(1, n_tokens, d)) for d in E})
        self.norm = nn.ModuleDict({f"e{d}": nn.LayerNorm(d) for d in E})
        self.head = nn.ModuleDict({f"e{d}": nn.Linear(d, num_classes) for d in E})
        self.attn = nn.ModuleList(nn.ModuleDict({
            f"e{d}_h{h}": nn.Sequential(nn.LayerNorm(d), Attention(d, num_heads=h, head_dim=space.head_dim))
            for d in E for h in space.num_heads}) for _ in range(max(space.depths)))
        self.mlp = nn.ModuleList(nn.ModuleDict({  # ratio by index: ModuleDict keys may not contain "."
            f"e{d}_r{i}": nn.Sequential(nn.LayerNorm(d), nn.Linear(d, int(round(r * d))), nn.GELU(), nn.Linear(int(round(r * d)), d))
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
        return self.head[e](self.norm[e](x[:, 0]))  # (B, K)


# ------------------------------------------------------------------------------------------------ model helpers

def sample_config(space, generator):
    """A uniformly random subnet: D and depth uniform, then heads and MLP ratio uniform per layer (sec. 3.2)."""
    pick = lambda choices: choices[int(torch.randint(len(choices), (), generator=generator))]
    D, L = pick(space.embed_dims), pick(space.depths)
    return {"embed_dim": D, "depth": L, "num_heads": tuple(pick(space.num_heads) for _ in range(L)),
            "mlp_ratio": tuple(pick(space.mlp_ratios) for _ in range(L))}


def largest_config(space):
    L = max(space.depths)
    return {"embed_dim": max(space.embed_dims), "depth": L, "num_heads": (max(space.num_heads),) * L,
            "mlp_ratio": (max(space.mlp_ratios),) * L}


def smallest_config(space):
    L = min(space.depths)
    return {"embed_dim": min(space.embed_dims), "depth": L, "num_heads": (min(space.num_heads),) * L,
            "mlp_ratio": (min(space.mlp_ratios),) * L}


def config_key(config):
    """Hashable identity of a config (to de-duplicate candidates in the search)."""
    return (config["embed_dim"], config["depth"], tuple(config["num_heads"]), tuple(config["mlp_ratio"]))


def config_str(config):
    return (f"D={config['embed_dim']} L={config['depth']} heads={''.join(map(str, config['num_heads']))} "
            f"mlp={','.join(f'{r:g}' for r in config['mlp_ratio'])}")


@torch.no_grad()
def extract_subnet(supernet, config):
    """A standalone plain `ViT` with the leading-slice weights of `config` copied out of an entangled `SuperViT`.
    extract_subnet(sn, cfg)(x) == sn(x, cfg); it has exactly sn.subnet_params(cfg) parameters."""
    supernet.check_config(config)
    D, hd = config["embed_dim"], supernet.space.head_dim
    vit = ViT(image_size=supernet.image_size, patch_size=supernet.patch_size, num_classes=supernet.num_classes,
              embed_dim=D, num_heads=list(config["num_heads"]), head_dim=hd, in_chans=supernet.in_chans,
              mlp_hidden=[mlp_hidden_dim(r, D) for r in config["mlp_ratio"]]).to(supernet.head.weight.device)
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
        blk.fc1.weight.copy_(sblk.fc1.weight[:M, :D])
        blk.fc1.bias.copy_(sblk.fc1.bias[:M])
        blk.fc2.weight.copy_(sblk.fc2.weight[:D, :M])
        blk.fc2.bias.copy_(sblk.fc2.bias[:D])
    vit.norm.weight.copy_(supernet.norm.weight[:D])
    vit.norm.bias.copy_(supernet.norm.bias[:D])
    vit.head.weight.copy_(supernet.head.weight[:, :D])
    vit.head.bias.copy_(supernet.head.bias)
    return vit


# ------------------------------------------------------------------------------------------------ data

def make_loaders(data, args, device):
    kw = dict(device=device, mean=data.mean, std=data.std)
    return (utils.DeviceLoader(data.x_train, data.y_train, batch_size=args.batch_size, train=True, seed=args.seed, **kw),
            utils.DeviceLoader(data.x_val, data.y_val, batch_size=500, train=False, **kw),
            utils.DeviceLoader(data.x_test, data.y_test, batch_size=500, train=False, **kw))


# ------------------------------------------------------------------------------------------------ train

def supernet_step_fn(space, generator, step_losses, sample=sample_config):
    """utils.train step_fn: one subnet `sample(space, generator)` per step, trained on the batch."""
    def step_fn(m, x, y):
        with utils.autocast(x.device):
            logits = m(x, sample(space, generator))
            loss = F.cross_entropy(logits.float(), y, label_smoothing=0.1)
        loss.backward()
        step_losses.append(loss.item())
        return loss, logits
    return step_fn


def train_supernet(model, space, train_loader, args, *, name, log=print):
    """Paper sec. 3.2: every step samples ONE subnet uniformly and trains it on the batch. The config sequence comes
    from its own seeded generator, so the entangled and the classic supernet see the same subnets on the same batches.
    Gradients are exactly zero outside the sampled slices (tests check it); note that AdamW's momentum still moves
    those weights a little, as in the official code -- blocks beyond the sampled depth get no gradient and stay put."""
    step_losses = []
    step_fn = supernet_step_fn(space, torch.Generator().manual_seed(args.seed + 1), step_losses)
    hist = utils.train(model, train_loader, epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                       step_fn=step_fn, log=log, name=name)
    return hist, step_losses


def full_preset_models(num_classes=10):
    """Every model the full preset trains, at its real size: name -> (model, step_fn or None, image_size).
    tests/test_utils.py runs one bf16-autocast training step of each on a CPU, so a full GPU run is known to start."""
    args = get_args([])
    space = SearchSpace(args.embed_dims, args.depths, args.num_heads, args.mlp_ratios, args.head_dim)
    models = {}
    for name, cls in (("entangled supernet", SuperViT), ("classic supernet", ClassicSuperViT)):
        step_fn = supernet_step_fn(space, None, [], sample=lambda sp, g: largest_config(sp))
        models[name] = (cls(space, image_size=args.image_size, patch_size=args.patch_size, num_classes=num_classes),
                        step_fn, args.image_size)
    return models


def train_plain(model, train_loader, *, epochs, lr, args, warmup_epochs=1.0, name="", log=print):
    return utils.train(model, train_loader, epochs=epochs, lr=lr, weight_decay=args.weight_decay,
                       warmup_epochs=warmup_epochs, log=log, name=name)


# ------------------------------------------------------------------------------------------------ search (sec. 3.3)

def _coin(p, generator):
    return float(torch.rand((), generator=generator)) < p


def _pick(choices, generator):
    return choices[int(torch.randint(len(choices), (), generator=generator))]


def mutate(config, space, generator, *, p_depth, p_layer, constraint=lambda c: True, max_tries=50):
    """Paper sec. 3.3: with probability Pd re-draw the depth (new layers drawn at random, removed ones dropped), then
    re-draw each layer's heads and MLP ratio, and the embedding dim, each with probability Pm. The paper gives
    Pd = 0.2, Pm = 0.4; the official code swaps them (depth re-drawn with s_prob = 0.4, each layer with
    m_prob = 0.2). We follow the paper.
    Retries until the child satisfies `constraint`; returns the parent unchanged if no child does."""
    for _ in range(max_tries):
        L, heads, ratios = config["depth"], list(config["num_heads"]), list(config["mlp_ratio"])
        if _coin(p_depth, generator):
            L = _pick(space.depths, generator)
            while len(heads) < L:
                heads.append(_pick(space.num_heads, generator))
                ratios.append(_pick(space.mlp_ratios, generator))
            heads, ratios = heads[:L], ratios[:L]
        for i in range(L):
            if _coin(p_layer, generator):
                heads[i] = _pick(space.num_heads, generator)
            if _coin(p_layer, generator):
                ratios[i] = _pick(space.mlp_ratios, generator)
        D = _pick(space.embed_dims, generator) if _coin(p_layer, generator) else config["embed_dim"]
        child = {"embed_dim": D, "depth": L, "num_heads": tuple(heads), "mlp_ratio": tuple(ratios)}
        if constraint(child):
            return child
    return config


def crossover(a, b, generator, *, constraint=lambda c: True, max_tries=50):
    """Paper sec. 3.3: a child takes each gene (embedding dim, depth, each layer's heads, each layer's MLP ratio)
    from one of two parents at random. Layers that only the deeper parent has come from that parent.
    Retries until the child satisfies `constraint`; returns a parent if no child does."""
    for _ in range(max_tries):
        D = _pick((a["embed_dim"], b["embed_dim"]), generator)
        L = _pick((a["depth"], b["depth"]), generator)
        heads, ratios = [], []
        for i in range(L):
            donors = [p for p in (a, b) if i < p["depth"]]
            heads.append(_pick(donors, generator)["num_heads"][i])
            ratios.append(_pick(donors, generator)["mlp_ratio"][i])
        child = {"embed_dim": D, "depth": L, "num_heads": tuple(heads), "mlp_ratio": tuple(ratios)}
        if constraint(child):
            return child
    return _pick((a, b), generator)


def sample_valid(space, generator, constraint, max_tries=10000):
    """Rejection-sample a uniformly random config that satisfies `constraint`."""
    for _ in range(max_tries):
        c = sample_config(space, generator)
        if constraint(c):
            return c
    raise ValueError(f"no random config out of {max_tries} satisfied the constraint: widen --param-range")


class _Archive:
    """Every candidate evaluated so far (fitness cached by config), and the per-generation summary."""

    def __init__(self, fitness, top_k):
        self.fitness, self.top_k, self.seen, self.history = fitness, top_k, {}, []

    def add(self, configs):
        for c in configs:
            if config_key(c) not in self.seen:
                self.seen[config_key(c)] = (self.fitness(c), c)

    def top(self, k):
        return [c for _, c in sorted(self.seen.values(), key=lambda fc: -fc[0])[:k]]

    def record(self):
        fits = sorted((f for f, _ in self.seen.values()), reverse=True)
        self.history.append({"evaluated": len(fits), "best": fits[0], "topk_mean": float(np.mean(fits[:self.top_k]))})


def evolution_search(fitness, space, *, constraint, population, generations, parents, p_depth, p_layer,
                     generator, log=print):
    """Paper sec. 3.3: start from `population` random valid subnets; each next generation takes the top `parents`
    of everything evaluated so far and makes population/2 children by mutation and the rest by crossover of two
    random parents. Only new (not yet evaluated) valid children count, so every generation evaluates exactly
    `population` new candidates. Returns (best config, per-generation history, archive of (fitness, config))."""
    arch = _Archive(fitness, parents)
    first = {}
    while len(first) < population:
        c = sample_valid(space, generator, constraint)
        first[config_key(c)] = c
    arch.add(first.values())
    arch.record()
    log(f"  EA gen  1/{generations}: best {arch.history[-1]['best']:5.1f}%  top-{parents} mean {arch.history[-1]['topk_mean']:5.1f}%")
    for g in range(2, generations + 1):
        top, children, tries = arch.top(parents), {}, 0
        n_mut = population // 2
        while len(children) < population and tries < 100 * population:
            tries += 1
            if len(children) < n_mut:
                c = mutate(_pick(top, generator), space, generator, p_depth=p_depth, p_layer=p_layer, constraint=constraint)
            else:
                c = crossover(_pick(top, generator), _pick(top, generator), generator, constraint=constraint)
            if config_key(c) not in arch.seen:
                children[config_key(c)] = c
        while len(children) < population:  # the neighbourhood is exhausted: fill up with random candidates
            c = sample_valid(space, generator, constraint)
            if config_key(c) not in arch.seen:
                children[config_key(c)] = c
        arch.add(children.values())
        arch.record()
        log(f"  EA gen {g:2d}/{generations}: best {arch.history[-1]['best']:5.1f}%  top-{parents} mean {arch.history[-1]['topk_mean']:5.1f}%")
    return arch.top(1)[0], arch.history, list(arch.seen.values())


def random_search(fitness, space, *, constraint, population, generations, parents, generator):
    """The baseline: the same number of evaluated candidates (population x generations), drawn uniformly."""
    arch = _Archive(fitness, parents)
    for _ in range(generations):
        batch = {}
        while len(batch) < population:
            c = sample_valid(space, generator, constraint)
            if config_key(c) not in arch.seen:
                batch[config_key(c)] = c
        arch.add(batch.values())
        arch.record()
    return arch.top(1)[0], arch.history, list(arch.seen.values())


# ------------------------------------------------------------------------------------------------ experiments

def inherited_acc(supernet, config, loader):
    """Accuracy of a subnet with the weights it inherits from the supernet (no retraining)."""
    return utils.evaluate(supernet, loader, forward=lambda m, x: m(x, config)).acc


def bench(args, device, num_classes=10, n_configs=3, repeats=3):
    """Train-step time (forward + backward) of a sampled subnet run through the supernet vs the same architecture
    extracted as a standalone ViT. Repeats are interleaved and the best of each is kept, to damp CPU noise."""
    space = SearchSpace(args.embed_dims, args.depths, args.num_heads, args.mlp_ratios, args.head_dim)
    sn = SuperViT(space, image_size=args.image_size, patch_size=args.patch_size, num_classes=num_classes).to(device)
    gen, rows = torch.Generator().manual_seed(args.seed), []
    shape = (3, args.image_size, args.image_size)
    for cfg in [sample_config(space, gen) for _ in range(n_configs)] + [largest_config(space)]:
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
    print(f"| subnet | params | supernet ms | standalone ms | ratio |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['params']/1e3:.0f}k | {r['supernet_ms']:.1f} | {r['standalone_ms']:.1f} | {r['ratio']:.2f}x |")
    mean_ratio = float(np.mean([r["ratio"] for r in rows]))
    print(f"mean slicing overhead {mean_ratio:.2f}x (target <= 1.15x)")
    return {"rows": rows, "mean_ratio": mean_ratio}


def plot_comparison(path, ent_losses, cls_losses, compare_rows, steps_per_epoch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    w = max(1, steps_per_epoch)  # moving average over one epoch of steps
    smooth = lambda v: np.convolve(v, np.ones(w) / w, mode="valid")
    for v, lab in ((ent_losses, "weight entanglement"), (cls_losses, "classic weight sharing")):
        s = smooth(np.array(v))
        ax[0].plot(np.arange(len(s)) + w, s, label=lab)
    ax[0].set(xlabel="supernet training step (one random subnet per step)", ylabel=f"train loss (moving avg, {w} steps)",
              title="supernet training loss (paper Fig. 4)")
    ax[0].legend()
    p = [r["params"] / 1e3 for r in compare_rows]
    ax[1].scatter(p, [r["entangled"] for r in compare_rows], label="weight entanglement")
    ax[1].scatter(p, [r["classic"] for r in compare_rows], marker="x", label="classic weight sharing")
    ax[1].set(xlabel="subnet parameters (k)", ylabel="val top-1 % with inherited weights",
              title="the same random subnets, inherited weights")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_search(path, ea_hist, rs_hist, ea_all, rs_all, param_range, parents, count):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    g = np.arange(1, len(ea_hist) + 1)
    for hist, lab, c in ((ea_hist, "evolution", "C0"), (rs_hist, "random search", "C1")):
        ax[0].plot(g, [h["best"] for h in hist], "-o", color=c, label=f"{lab}: top-1")
        ax[0].plot(g, [h["topk_mean"] for h in hist], "--", color=c, label=f"{lab}: top-{parents} mean")
    ax[0].set(xlabel=f"generation (same number of evaluated candidates)", ylabel="val top-1 % (inherited weights)",
              title="evolutionary vs random search")
    ax[0].set_xticks(g)
    ax[0].legend(fontsize=8)
    for arch, lab, m, c in ((rs_all, "random search", "x", "C1"), (ea_all, "evolution", ".", "C0")):
        ax[1].scatter([count(x) / 1e3 for _, x in arch], [f for f, _ in arch], marker=m, color=c, label=lab, alpha=0.7)
    for v in param_range:
        ax[1].axvline(v / 1e3, color="gray", ls=":")
    ax[1].set(xlabel="subnet parameters (k); dotted: constraint", ylabel="val top-1 %", title="every evaluated candidate")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main

def main(argv=None):
    args = get_args(argv)
    print(utils.reproduce_command())
    if args.threads:
        torch.set_num_threads(args.threads)
    utils.set_seed(args.seed)
    device = utils.get_device(args.device)
    out = args.out or os.path.join("runs", "04_autoformer_entangle")
    os.makedirs(out, exist_ok=True)
    t_start = time.time()
    if args.bench:
        res = bench(args, device)
        utils.save_results(os.path.join(out, "bench.json"), vars(args), res)
        return res

    preset = "quick" if args.quick else "full"
    space = SearchSpace(args.embed_dims, args.depths, args.num_heads, args.mlp_ratios, args.head_dim)
    data = utils.data_from_args(args)
    K = data.num_classes
    train_loader, val_loader, test_loader = make_loaders(data, args, device)
    print(f"data: {len(data.x_train)} train / {len(data.x_val)} val (carved from train; the search uses it) / "
          f"{len(data.x_test)} test (final report only) images, {K} classes, {args.image_size}px")
    build = lambda cls: cls(space, image_size=args.image_size, patch_size=args.patch_size, num_classes=K).to(device)

    # --- 1. the same budget, the same subnets, the same batches: entangled vs classic supernet (paper Fig. 3/4)
    utils.set_seed(args.seed)
    entangled = build(SuperViT)
    utils.set_seed(args.seed)
    classic = build(ClassicSuperViT)
    count = entangled.subnet_params
    print(f"search space: embed {space.embed_dims}, depth {space.depths}, heads {space.num_heads} x head dim "
          f"{space.head_dim}, MLP ratio {space.mlp_ratios}; subnets {count(smallest_config(space))/1e3:.0f}k.."
          f"{count(largest_config(space))/1e3:.0f}k params; entangled supernet {utils.count_params(entangled)/1e3:.0f}k, "
          f"classic supernet {utils.count_params(classic)/1e3:.0f}k params")
    print(f"\n[1/4] supernet training, {args.epochs} epochs each, one uniform random subnet per step")
    ent_hist, ent_losses = train_supernet(entangled, space, train_loader, args, name="entangled ")
    fresh_loader = make_loaders(data, args, device)[0]  # same seed -> the same batches again for the classic supernet
    cls_hist, cls_losses = train_supernet(classic, space, fresh_loader, args, name="classic   ")
    gen = torch.Generator().manual_seed(args.seed + 2)
    compare_rows = []
    for _ in range(args.n_compare):
        c = sample_config(space, gen)
        compare_rows.append({"config": config_str(c), "params": count(c), "entangled": inherited_acc(entangled, c, val_loader),
                             "classic": inherited_acc(classic, c, val_loader)})
    ent_acc, cls_acc = (np.array([r[k] for r in compare_rows]) for k in ("entangled", "classic"))
    wins = int((ent_acc > cls_acc).sum())
    plot_comparison(os.path.join(out, "entangle_vs_classic.png"), ent_losses, cls_losses, compare_rows, len(train_loader))
    cmp_table = [("final train loss (last epoch)", ent_hist[-1]["loss"], cls_hist[-1]["loss"], "{:.3f}"),
                 (f"inherited val acc, mean of {args.n_compare} subnets (%)", ent_acc.mean(), cls_acc.mean(), "{:.1f}"),
                 ("inherited val acc, worst subnet (%)", ent_acc.min(), cls_acc.min(), "{:.1f}"),
                 ("inherited val acc, best subnet (%)", ent_acc.max(), cls_acc.max(), "{:.1f}"),
                 ("supernet parameters (k)", utils.count_params(entangled) / 1e3, utils.count_params(classic) / 1e3, "{:.0f}")]
    print(f"\n| entanglement vs classic sharing (same {len(ent_losses)} steps) | entangled | classic |\n|---|---:|---:|")
    for name, a, b, fmt in cmp_table:
        print(f"| {name} | {fmt.format(a)} | {fmt.format(b)} |")
    print(f"entangled > classic on {wins}/{args.n_compare} of the same subnets")

    # --- 2. evolutionary search vs random search on the VALIDATION split, under a parameter range (sec. 3.3)
    lo_all, hi_all = count(smallest_config(space)), count(largest_config(space))
    if args.param_range:
        param_range = (args.param_range[0] * 1e6, args.param_range[1] * 1e6)
    else:
        param_range = (lo_all + 0.35 * (hi_all - lo_all), lo_all + 0.70 * (hi_all - lo_all))
    constraint = lambda c: param_range[0] <= count(c) <= param_range[1]
    fitness = lambda c: inherited_acc(entangled, c, val_loader)
    print(f"\n[2/4] evolutionary search ({preset} preset: population {args.population}, {args.generations} generations, "
          f"top-{args.parents} parents, Pd={args.p_depth}, Pm={args.p_layer}; the paper uses 50/20/10) "
          f"under {param_range[0]/1e3:.0f}k..{param_range[1]/1e3:.0f}k params, fitness = val accuracy")
    kw = dict(constraint=constraint, population=args.population, generations=args.generations, parents=args.parents)
    t0 = time.time()
    ea_best, ea_hist, ea_all = evolution_search(fitness, space, p_depth=args.p_depth, p_layer=args.p_layer,
                                                generator=torch.Generator().manual_seed(args.seed + 3), **kw)
    t_ea = time.time() - t0
    rs_best, rs_hist, rs_all = random_search(fitness, space, generator=torch.Generator().manual_seed(args.seed + 4), **kw)
    plot_search(os.path.join(out, "search.png"), ea_hist, rs_hist, ea_all, rs_all, param_range, args.parents, count)
    print(f"| generation | evaluated | EA top-1 | EA top-{args.parents} mean | random top-1 | random top-{args.parents} mean |\n|---:|---:|---:|---:|---:|---:|")
    for g, (e, r) in enumerate(zip(ea_hist, rs_hist), 1):
        print(f"| {g} | {e['evaluated']} | {e['best']:.1f} | {e['topk_mean']:.1f} | {r['best']:.1f} | {r['topk_mean']:.1f} |")
    print(f"EA best:     {config_str(ea_best)} ({count(ea_best)/1e3:.0f}k params), search took {t_ea:.0f}s")
    print(f"random best: {config_str(rs_best)} ({count(rs_best)/1e3:.0f}k params)")

    # --- 3. best subnet: inherited vs short fine-tune vs retrained from scratch (paper Table 3)
    print(f"\n[3/4] best subnet: fine-tune {args.finetune_epochs} epochs (lr {args.finetune_lr}) and retrain from scratch "
          f"{args.retrain_epochs} epochs")
    rows = {"random search best, inherited": (inherited_acc(entangled, rs_best, val_loader), inherited_acc(entangled, rs_best, test_loader)),
            "EA best, inherited": (inherited_acc(entangled, ea_best, val_loader), inherited_acc(entangled, ea_best, test_loader))}
    sub = extract_subnet(entangled, ea_best)
    train_plain(sub, train_loader, epochs=args.finetune_epochs, lr=args.finetune_lr, args=args, warmup_epochs=0, name="fine-tune ")
    rows["EA best, inherited + fine-tune"] = (utils.evaluate(sub, val_loader).acc, utils.evaluate(sub, test_loader).acc)
    utils.set_seed(args.seed)
    scratch = ViT(image_size=args.image_size, patch_size=args.patch_size, num_classes=K, embed_dim=ea_best["embed_dim"],
                  num_heads=list(ea_best["num_heads"]), head_dim=args.head_dim,
                  mlp_hidden=[mlp_hidden_dim(r, ea_best["embed_dim"]) for r in ea_best["mlp_ratio"]]).to(device)
    train_plain(scratch, train_loader, epochs=args.retrain_epochs, lr=args.lr, args=args, name="scratch   ")
    rows[f"EA best, retrained from scratch ({args.retrain_epochs} ep)"] = (utils.evaluate(scratch, val_loader).acc, utils.evaluate(scratch, test_loader).acc)
    print(f"\n| best subnet ({config_str(ea_best)}, {count(ea_best)/1e3:.0f}k params) | val top-1 % | test top-1 % |\n|---|---:|---:|")
    for k, (v, t) in rows.items():
        print(f"| {k} | {v:.1f} | {t:.1f} |")

    # --- 4. results
    wall = time.time() - t_start
    print(f"\n[4/4] done in {wall:.0f}s; figures and results.json in {out}")
    metrics = {"preset": preset, "wall_s": wall, "space": vars(space), "param_range": param_range,
               "compare": {"rows": compare_rows, "entangled_mean": ent_acc.mean(), "classic_mean": cls_acc.mean(),
                           "entangled_wins": wins, "entangled_final_loss": ent_hist[-1]["loss"],
                           "classic_final_loss": cls_hist[-1]["loss"], "entangled_history": ent_hist, "classic_history": cls_hist},
               "search": {"ea_history": ea_hist, "random_history": rs_hist, "ea_best": ea_best, "random_best": rs_best,
                          "ea_best_params": count(ea_best), "random_best_params": count(rs_best)},
               "best_subnet": {k: {"val": v, "test": t} for k, (v, t) in rows.items()}}
    utils.save_results(os.path.join(out, "results.json"), vars(args), metrics)
    return metrics


if __name__ == "__main__":
    utils.run_main(main)
