"""AutoFormer: Searching Transformers for Visual Recognition -- Chen, Peng, Fu, Ling, ICCV 2021
(arXiv:2107.00651).

One supernet holds the weights of the largest Vision Transformer of a search space; every smaller
candidate (a "subnet": embedding dim D, depth L, heads and MLP ratio per layer) runs on the
leading slice of those weights (weight entanglement, sec. 3.1, Fig. 2). A layer with d inputs
and o outputs computes y = x W[:o, :d]^T + b[:o] in every subnet (W, b: the largest weight and
bias), so a step on one subnet trains every subnet that shares its slices. The supernet trains
one random subnet per step (sec. 3.2); an evolutionary search (sec. 3.3) then picks the best
subnet under a parameter budget, each candidate scored with the weights it inherits.

Run:
    python 04_autoformer_entangle.py --demo                  # no data, ~5 s: checks and figures
    python 04_autoformer_entangle.py --quick --data cifar10  # 2-core CPU, ~5 min (--data DIR: an
                                                             # ImageFolder copy, no download)
    python 04_autoformer_entangle.py --data cifar10          # full preset: one GPU (not measured)

Results (--quick, 279 s on a 2-core AMD EPYC CPU, torch 2.15 float32; n=4 supernet seeds, arms
paired on the same batches; validation carved from train; all 10,000 test images):
    entangled - classic: +6.9 points [+4.9, +9.0] inherited val acc (Fig. 3/4): entangled better
    evolution - random, regret after 100 evaluations: -0.61 millinats [-1.54, +0.32]: not decided
    evolution picks - random picks: +0.01 test points [-0.05, +0.06]: equivalent within +-0.5
    inherited - retrained (Table 3): -0.7 test points [-1.6, +0.3]: not decided
Details: runs/04_autoformer_entangle/RESULTS.md (tables, deviations from the official code, logs).
"""
import itertools
import os
import random
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import utils

# %% [markdown]
# ## 1. Weight entanglement: one matrix, many layers (sec. 3.1, Fig. 2)
# A layer of the supernet keeps only its largest weight $W$. A subnet that feeds it $d$ features
# and asks for $o$ outputs uses the top-left corner:
# $$y = x\, W[{:}o,\ {:}d]^\top + b[{:}o]$$
# Classic one-shot weight sharing (Fig. 2, left) gives every choice its own matrix. Here the
# choices overlap, so a step on a small subnet moves a corner that every larger subnet uses too.
# LayerNorm is entangled the same way ($\gamma[{:}d]$, $\beta[{:}d]$).
#
# Letters: B batch, C channels, S image side, P patch side, N tokens, D embedding dim, L depth,
# h heads, hd head dim (fixed), I = h hd, M MLP hidden dim, K classes.

# %%
class SuperLinear(nn.Linear):
    """nn.Linear(in_max, out_max) holding the largest weight. forward(x, o) uses W[:o, :d] and
    b[:o] with d = x.shape[-1]: the same leading corner in every subnet."""

    def forward(self, x, out_features=None):  # x (..., d) -> (..., o)
        o = out_features or self.out_features
        return F.linear(x, self.weight[:o, :x.shape[-1]], self.bias[:o])


class SuperLayerNorm(nn.LayerNorm):
    """LayerNorm over the first d = x.shape[-1] features, with gamma[:d] and beta[:d]."""

    def forward(self, x):  # (..., d)
        d = x.shape[-1]
        return F.layer_norm(x, (d,), self.weight[:d], self.bias[:d], self.eps)


# %%
def demo_entangled_weights():
    """Fig. 2 as a picture: one entangled weight (an MLP's first layer, 64 -> 256), the slices
    three subnets use, and what one training step on the smallest subnet changes."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    torch.manual_seed(0)
    fc1, x = SuperLinear(64, 256), torch.randn(8, 64)
    subnets = {"D=48, ratio 2": (48, 96), "D=56, ratio 3": (56, 168), "D=64, ratio 4": (64, 256)}
    w0, (d, o) = fc1.weight.detach().clone(), subnets["D=48, ratio 2"]
    y = fc1(x[:, :d], o)  # the smallest subnet's layer
    # the same written with explicit index lists instead of the slice
    err = (y - x[:, :d] @ w0[torch.arange(o)][:, torch.arange(d)].T - fc1.bias[:o]).abs().max()
    y.square().mean().backward()  # a loss on the smallest subnet only
    with torch.no_grad():
        fc1.weight -= fc1.weight.grad  # one SGD step
    changed = fc1.weight.detach() != w0
    print(f"  slice == explicit index lists (max error {err:.1e}); one step on the smallest subnet "
          f"changed {int(changed.sum())} entries of W, all in W[:{o}, :{d}], inside every slice")
    fig = Figure(figsize=(10, 3.4))
    for i, (img, title) in enumerate([(w0, "one entangled weight W (256 x 64)"),
                                      (changed, "changed by one step on the smallest subnet")]):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.imshow(img.T.float().numpy(), cmap="gray", aspect="auto")
        for (name, (dd, oo)), c in zip(subnets.items(), ("C0", "C2", "C3")):
            ax.add_patch(Rectangle((-0.5, -0.5), oo, dd, fill=False, lw=2, ec=c,
                                   label=f"{name}: W[:{oo}, :{dd}]"))
        ax.set(xlabel="output unit o", ylabel="input feature d", title=title)
    ax.legend(loc="lower right", fontsize=8)
    utils.show(fig, "demo_entangled_weights")
    return {"slice_error": err.item(), "changed": int(changed.sum()),
            "changed_outside": int(changed[o:].sum() + changed[:, d:].sum())}


if utils.in_notebook():
    demo_entangled_weights()

# %% [markdown]
# ## 2. Entangled attention with relative positions
# $q$, $k$ and $v$ are three entangled linears: a layer with $h$ heads of fixed width $h_d$ uses
# the first $I = h\,h_d$ output units of each (the official `--change_qkv`). The official runs
# also add 2-D relative positions (`--relative_position`) to keys and values:
# $$\text{logit}_{ij} = \frac{q_i \cdot (k_j + r^K_{ij})}{\sqrt{h_d}},\qquad
#   o_i = \sum_j \text{softmax}_j(\text{logit}_{ij})\,(v_j + r^V_{ij}),\qquad
#   r_{ij} = E_{row}[\Delta row_{ij}] + E_{col}[\Delta col_{ij}]$$
# with offsets clipped at $R$ and entry 0 for every pair that involves the class token. The
# tables are $h_d$ wide and $h_d$ is fixed, so every subnet uses them whole.

# %%
def relative_position_index(grid, max_rel):
    """(2, N, N) row and column table entries, N = grid^2 + 1 tokens (class token first): key j
    from query i uses clip(row_j - row_i, -R, R) + R + 1 (columns alike), the class token 0."""
    n = torch.arange(grid * grid)
    row, col = n // grid, n % grid
    d_row = (row[None, :] - row[:, None]).clamp(-max_rel, max_rel) + max_rel + 1  # (N-1, N-1)
    d_col = (col[None, :] - col[:, None]).clamp(-max_rel, max_rel) + max_rel + 1
    return torch.stack([F.pad(d_row, (1, 0, 1, 0)), F.pad(d_col, (1, 0, 1, 0))])  # (2, N, N)


class RelativePosition2D(nn.Module):
    """r_ij = E_row[index_row(i, j)] + E_col[index_col(i, j)], (N, N, hd), shared by the heads."""

    def __init__(self, *, head_dim, grid, max_rel):
        super().__init__()
        self.rel_rows, self.rel_cols = (nn.Parameter(nn.init.trunc_normal_(
            torch.empty(2 * max_rel + 2, head_dim), std=0.02)) for _ in range(2))
        self.register_buffer("index", relative_position_index(grid, max_rel), persistent=False)

    def forward(self):
        return self.rel_rows[self.index[0]] + self.rel_cols[self.index[1]]  # (N, N, hd)


def attend(q, k, v, rel_k=None, rel_v=None):
    """Attention on q, k, v (B, h, N, hd), with relative positions r^K, r^V (N, N, hd) if given."""
    if rel_k is None:
        return F.scaled_dot_product_attention(q, k, v)
    # logit_ij = q_i . (k_j + r^K_ij) / sqrt(hd)
    logits = (q @ k.transpose(-2, -1) + torch.einsum("bhid,ijd->bhij", q, rel_k))
    a = (logits * q.shape[-1] ** -0.5).softmax(-1)  # (B, h, N, N)
    # o_i = sum_j a_ij (v_j + r^V_ij)
    return a @ v + torch.einsum("bhij,ijd->bhid", a, rel_v)  # (B, h, N, hd)


class SuperAttention(nn.Module):
    """Entangled multi-head attention: q, k, v each take their first I = h*hd units (weight rows
    and bias entries of the same units; the official fused qkv_super slices the rows interleaved
    but the bias as a leading block, so its row j and bias j can belong to different units);
    the output projection takes W[:D, :I]."""

    def __init__(self, *, max_dim, max_heads, head_dim, grid, max_rel):
        super().__init__()
        self.head_dim = head_dim
        self.q, self.k, self.v = (SuperLinear(max_dim, max_heads * head_dim) for _ in range(3))
        self.proj = SuperLinear(max_heads * head_dim, max_dim)
        self.rel_k, self.rel_v = ((RelativePosition2D(head_dim=head_dim, grid=grid,
                                                      max_rel=max_rel) for _ in range(2))
                                  if max_rel else (None, None))

    def forward(self, x, *, num_heads):  # x (B, N, D)
        B, N, D = x.shape
        inner = num_heads * self.head_dim  # I
        # (B, N, I) -> (B, h, N, hd) for each of q, k, v
        q, k, v = (f(x, inner).view(B, N, num_heads, self.head_dim).transpose(1, 2)
                   for f in (self.q, self.k, self.v))
        rel = (self.rel_k(), self.rel_v()) if self.rel_k is not None else ()
        out = attend(q, k, v, *rel).transpose(1, 2).reshape(B, N, inner)
        return self.proj(out, D)  # (B, N, D)

# %% [markdown]
# ## 3. The supernet (sec. 3.1-3.2)
# A block is pre-norm, $x + \text{MSA}(\text{LN}(x))$ then $x + \text{MLP}(\text{LN}(x))$, with
# every layer entangled; a subnet of depth $L$ runs the first $L$ blocks. The patch embedding,
# class token and position embedding take their first $D$ channels, and the classifier reads
# $W_{head}[:, {:}D]$. The search space is paper Table 1: one $D$ and one $L$ per network, the
# heads and the MLP ratio $r$ per layer, $M = \text{round}(r D)$.

# %%
def mlp_hidden_dim(ratio, dim):
    return int(round(ratio * dim))


class SuperBlock(nn.Module):
    """Pre-norm block with entangled weights: LN[:D], attention, fc1 W[:M, :D], fc2 W[:D, :M]."""

    def __init__(self, *, max_dim, max_heads, head_dim, max_hidden, grid, max_rel):
        super().__init__()
        self.norm1, self.norm2 = SuperLayerNorm(max_dim), SuperLayerNorm(max_dim)
        self.attn = SuperAttention(max_dim=max_dim, max_heads=max_heads, head_dim=head_dim,
                                   grid=grid, max_rel=max_rel)
        self.fc1, self.fc2 = SuperLinear(max_dim, max_hidden), SuperLinear(max_hidden, max_dim)

    def forward(self, x, *, num_heads, mlp_hidden):  # x (B, N, D)
        D = x.shape[-1]
        x = x + self.attn(self.norm1(x), num_heads=num_heads)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x), mlp_hidden)), D)


@dataclass(frozen=True)
class SearchSpace:
    """The choices of Table 1. A config (one subnet) is a dict {"embed_dim": D, "depth": L,
    "num_heads": (h_1..h_L), "mlp_ratio": (r_1..r_L)}; the head dim hd is fixed."""
    embed_dims: tuple
    depths: tuple
    num_heads: tuple
    mlp_ratios: tuple
    head_dim: int

    def check(self, c):
        """ValueError, saying what is allowed, unless config `c` belongs to the space."""
        if not (c["embed_dim"] in self.embed_dims and c["depth"] in self.depths
                and len(c["num_heads"]) == len(c["mlp_ratio"]) == c["depth"]
                and set(c["num_heads"]) <= set(self.num_heads)
                and set(c["mlp_ratio"]) <= set(self.mlp_ratios)):
            raise ValueError(f"{c} is not in the search space {self} (one D and one depth L; "
                             f"L heads and L MLP ratios)")


def init_vit(model):
    """The official init: trunc_normal(0.02) linear weights, zero biases, LayerNorm 1 and 0. The
    patch embedding keeps PyTorch's default (official too)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def token_param(*shape):  # class token or position embedding, trunc_normal(0.02) as officially
    return nn.Parameter(nn.init.trunc_normal_(torch.empty(*shape), std=0.02))


class SuperViT(nn.Module):
    """The AutoFormer supernet: forward(x, config) runs subnet `config` on the leading slices of
    the largest weights. embed() and classify() are its two ends (score_configs uses them)."""

    def __init__(self, space, *, image_size, patch_size, num_classes, max_rel):
        super().__init__()
        assert image_size % patch_size == 0, \
            f"image size {image_size} must be divisible by patch size {patch_size}"
        self.space, self.image_size, self.patch_size = space, image_size, patch_size
        self.num_classes, self.max_rel = num_classes, max_rel
        D, grid = max(space.embed_dims), image_size // patch_size
        self.n_tokens = grid * grid + 1
        hidden = max(mlp_hidden_dim(r, d) for r in space.mlp_ratios for d in space.embed_dims)
        self.patch_embed = nn.Conv2d(3, D, patch_size, stride=patch_size)  # RGB images
        self.cls_token, self.pos_embed = token_param(1, 1, D), token_param(1, self.n_tokens, D)
        self.blocks = nn.ModuleList(
            SuperBlock(max_dim=D, max_heads=max(space.num_heads), head_dim=space.head_dim,
                       max_hidden=hidden, grid=grid, max_rel=max_rel)
            for _ in range(max(space.depths)))
        self.norm, self.head = SuperLayerNorm(D), SuperLinear(D, num_classes)
        init_vit(self)

    def embed(self, x, D):  # images (B, C, S, S) -> tokens (B, N, D)
        x = F.conv2d(x, self.patch_embed.weight[:D], self.patch_embed.bias[:D],
                     stride=self.patch_size)  # (B, D, S/P, S/P)
        x = x.flatten(2).transpose(1, 2)  # (B, N-1, D)
        return (torch.cat([self.cls_token[..., :D].expand(len(x), -1, -1), x], 1)
                + self.pos_embed[..., :D])

    def classify(self, x):  # tokens (B, N, D) -> logits (B, K)
        # the head reads the mean of the patch tokens (the official --gp; the class token stays)
        return self.head(self.norm(x)[:, 1:].mean(1))

    def forward(self, x, config):
        self.space.check(config)
        D = config["embed_dim"]
        x = self.embed(x, D)
        for blk, h, r in zip(self.blocks, config["num_heads"], config["mlp_ratio"]):  # first L
            x = blk(x, num_heads=h, mlp_hidden=mlp_hidden_dim(r, D))
        return self.classify(x)

    def block_params(self, D, h, M):
        """Parameters of one block of a subnet: 2 norms, q/k/v, projection, tables, MLP."""
        hd = self.space.head_dim
        rel = 4 * (2 * self.max_rel + 2) * hd if self.max_rel else 0
        return 4 * D + 3 * (D + 1) * h * hd + (h * hd + 1) * D + rel + (D + 1) * M + (M + 1) * D

    def subnet_params(self, config):
        """Parameters of the standalone subnet (extract_subnet), from the config alone: patch
        embedding, class token, positions, blocks, final norm, head. The search's constraint."""
        D = config["embed_dim"]
        stem = (3 * self.patch_size ** 2 + 1) * D + (1 + self.n_tokens + 2) * D
        return stem + (D + 1) * self.num_classes + sum(
            self.block_params(D, h, mlp_hidden_dim(r, D))
            for h, r in zip(config["num_heads"], config["mlp_ratio"]))

# %% [markdown]
# ## 4. Subnets: sampling, extraction, scoring
# Training samples one subnet per step: $D$ and $L$ uniform, then heads and MLP ratio uniform per
# layer (sec. 3.2). A subnet leaves the supernet as a plain ViT holding copies of its slices:
# each of its parameters is the leading slice, in every dimension, of the supernet's parameter of
# the same name. The baseline, classic one-shot weight sharing (Fig. 2, left), has the same space
# without entanglement: every choice has its own weights, so a step trains only the modules its
# subnet picked, and each module sees a fraction of the steps.

# %%
class Attention(nn.Module):
    """Plain multi-head self-attention: h heads of width hd; q, k, v have I = h*hd units each."""

    def __init__(self, *, dim, num_heads, head_dim, grid, max_rel):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.q, self.k, self.v = (nn.Linear(dim, num_heads * head_dim) for _ in range(3))
        self.proj = nn.Linear(num_heads * head_dim, dim)
        self.rel_k, self.rel_v = ((RelativePosition2D(head_dim=head_dim, grid=grid,
                                                      max_rel=max_rel) for _ in range(2))
                                  if max_rel else (None, None))

    def forward(self, x):  # (B, N, D)
        B, N, _ = x.shape
        q, k, v = (f(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
                   for f in (self.q, self.k, self.v))  # (B, h, N, hd)
        rel = (self.rel_k(), self.rel_v()) if self.rel_k is not None else ()
        return self.proj(attend(q, k, v, *rel).transpose(1, 2).reshape(B, N, -1))


class Block(nn.Module):
    """Pre-norm transformer block: x + MSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, *, dim, num_heads, head_dim, mlp_hidden, grid, max_rel):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim=dim, num_heads=num_heads, head_dim=head_dim, grid=grid,
                              max_rel=max_rel)
        self.fc1, self.fc2 = nn.Linear(dim, mlp_hidden), nn.Linear(mlp_hidden, dim)

    def forward(self, x):  # (B, N, D)
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """A plain ViT whose layers may differ in heads and MLP width: what a searched subnet is."""

    def __init__(self, *, image_size, patch_size, num_classes, embed_dim, num_heads, mlp_hidden,
                 head_dim, max_rel):
        super().__init__()
        grid = image_size // patch_size
        self.patch_embed = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)
        self.cls_token = token_param(1, 1, embed_dim)
        self.pos_embed = token_param(1, grid * grid + 1, embed_dim)
        self.blocks = nn.ModuleList(
            Block(dim=embed_dim, num_heads=h, head_dim=head_dim, mlp_hidden=m, grid=grid,
                  max_rel=max_rel) for h, m in zip(num_heads, mlp_hidden))
        self.norm, self.head = nn.LayerNorm(embed_dim), nn.Linear(embed_dim, num_classes)
        init_vit(self)

    def forward(self, x):  # (B, C, S, S)
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N-1, D)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 1:].mean(1))  # (B, K)


def sample_config(space, rng):
    """A random subnet as training samples it (sec. 3.2); rng: a seeded random.Random."""
    D, L = rng.choice(space.embed_dims), rng.choice(space.depths)
    return {"embed_dim": D, "depth": L,
            "num_heads": tuple(rng.choice(space.num_heads) for _ in range(L)),
            "mlp_ratio": tuple(rng.choice(space.mlp_ratios) for _ in range(L))}


def largest_config(space, pick=max):  # pick=min: the smallest
    L = pick(space.depths)
    return {"embed_dim": pick(space.embed_dims), "depth": L,
            "num_heads": (pick(space.num_heads),) * L, "mlp_ratio": (pick(space.mlp_ratios),) * L}


def smallest_config(space):
    return largest_config(space, pick=min)


def all_configs(space):
    """Every config of `space` (an exhaustive table): by D, then depth, then per-layer genes."""
    genes = list(itertools.product(space.num_heads, space.mlp_ratios))  # one layer's choices
    return [{"embed_dim": D, "depth": L, "num_heads": tuple(h for h, _ in layers),
             "mlp_ratio": tuple(r for _, r in layers)}
            for D in space.embed_dims for L in space.depths
            for layers in itertools.product(genes, repeat=L)]


def config_key(c):  # a config as a hashable tuple, to index tables and archives
    return (c["embed_dim"], c["depth"], tuple(c["num_heads"]), tuple(c["mlp_ratio"]))


def config_from_key(key):
    return {"embed_dim": key[0], "depth": key[1], "num_heads": key[2], "mlp_ratio": key[3]}


def config_str(c):
    return (f"D={c['embed_dim']} L={c['depth']} heads={''.join(map(str, c['num_heads']))} "
            f"mlp={','.join(f'{r:g}' for r in c['mlp_ratio'])}")


def build_subnet(sn, config):
    """A freshly initialised plain ViT with the architecture of `config`."""
    D, ratios = config["embed_dim"], config["mlp_ratio"]
    return ViT(image_size=sn.image_size, patch_size=sn.patch_size, num_classes=sn.num_classes,
               embed_dim=D, num_heads=config["num_heads"], head_dim=sn.space.head_dim,
               mlp_hidden=[mlp_hidden_dim(r, D) for r in ratios],
               max_rel=sn.max_rel).to(sn.head.weight.device)


@torch.no_grad()
def extract_subnet(supernet, config):
    """A standalone ViT holding copies of the slices `config` uses: every parameter is the
    leading slice of the supernet's parameter of the same name. extract(sn, c)(x) == sn(x, c)."""
    supernet.space.check(config)
    vit, src = build_subnet(supernet, config), supernet.state_dict()
    for name, t in vit.state_dict().items():
        t.copy_(src[name][tuple(slice(0, n) for n in t.shape)])
    return vit


# %%
QUICK_SPACE = SearchSpace((48, 56, 64), (3, 4, 5), (2, 3, 4), (2.0, 3.0, 4.0), 16)  # --quick's
QUICK_TABLE = SearchSpace((48, 56, 64), (3, 4), (2, 4), (2.0, 4.0), 16)  # and its search table


def demo_space_params(space=QUICK_SPACE, max_rel=14):
    """How large is the space? The parameter count of every subnet of the --quick space (32x32
    images, patch 8, 10 classes) from the closed-form count, as a histogram."""
    from matplotlib.figure import Figure
    sn = SuperViT(space, image_size=32, patch_size=8, num_classes=10, max_rel=max_rel)
    counts = []
    for D in space.embed_dims:
        stem = sn.subnet_params({"embed_dim": D, "num_heads": (), "mlp_ratio": ()})
        layer = np.array([sn.block_params(D, h, mlp_hidden_dim(r, D))  # one layer's choices
                          for h in space.num_heads for r in space.mlp_ratios])
        for L in space.depths:  # every combination of L layers: a sum over an L-dim grid
            counts.append(stem + sum(np.ix_(*[layer] * L)).ravel())
    counts = np.concatenate(counts)
    lo, hi = counts.min() + np.array([0.35, 0.70]) * (counts.max() - counts.min())
    inside = float(np.mean((counts >= lo) & (counts <= hi)))
    print(f"  {len(counts):,} subnets of {counts.min() / 1e3:.1f}k..{counts.max() / 1e3:.1f}k "
          f"parameters; {100 * inside:.0f}% in the search's range {lo / 1e3:.0f}k..{hi / 1e3:.0f}k")
    ax = (fig := Figure(figsize=(6, 3.4))).add_subplot()
    ax.hist(counts / 1e3, bins=60)
    ax.axvspan(lo / 1e3, hi / 1e3, color="C1", alpha=0.2, label="the search's parameter range")
    ax.set(xlabel="subnet parameters (k)", ylabel="subnets", title=f"{len(counts):,} subnets")
    ax.legend()
    utils.show(fig, "demo_space_params")
    return {"n_subnets": int(len(counts)), "min": int(counts.min()), "max": int(counts.max()),
            "share_in_range": inside}


if utils.in_notebook():
    demo_space_params()

# %% [markdown]
# ### Optional: scoring many subnets at once
# The search scores thousands of subnets on the validation split. Subnets with the same $D$ and
# the same genes in their first layers compute the same activations there, so the configs form
# a trie and each shared prefix runs once. A test shows this equals scoring each subnet alone.

# %%
@torch.no_grad()
def score_configs(supernet, configs, loader):
    """{config_key: (correct (V,) bool, nll (V,))}: per-image scores of subnets with inherited
    weights, walking the trie of shared layer prefixes depth-first."""
    parts = {config_key(c): ([], []) for c in configs}

    def walk(x, y, group, layer):  # x (B, N, D): tokens after `layer` blocks, shared by group
        for c in group:
            if c["depth"] == layer:  # this subnet ends here
                logits = supernet.classify(x).float()  # (B, K)
                parts[config_key(c)][0].append(logits.argmax(-1) == y)
                parts[config_key(c)][1].append(F.cross_entropy(logits, y, reduction="none"))
        deeper = [c for c in group if c["depth"] > layer]
        for h, r in sorted({(c["num_heads"][layer], c["mlp_ratio"][layer]) for c in deeper}):
            nxt = supernet.blocks[layer](x, num_heads=h, mlp_hidden=mlp_hidden_dim(r, x.shape[-1]))
            walk(nxt, y, [c for c in deeper
                          if (c["num_heads"][layer], c["mlp_ratio"][layer]) == (h, r)], layer + 1)

    for x, y in loader:
        for D in sorted({c["embed_dim"] for c in configs}):
            with utils.autocast(x.device):
                walk(supernet.embed(x, D), y, [c for c in configs if c["embed_dim"] == D], 0)
    return {k: (torch.cat(c), torch.cat(n)) for k, (c, n) in parts.items()}


def summarize(correct, nll):
    return utils.Score(100.0 * correct.sum().item() / len(correct), nll.double().mean().item())

# %%
class ClassicSuperViT(nn.Module):
    """Own weights per choice: per D a patch embedding, tokens, norm and head; per layer and per
    (D, heads) a LayerNorm + attention, per (D, MLP ratio) a LayerNorm + MLP."""

    def __init__(self, space, *, image_size, patch_size, num_classes, max_rel):
        super().__init__()
        self.space, grid, E = space, image_size // patch_size, space.embed_dims
        self.patch_embed = nn.ModuleDict({f"e{d}": nn.Conv2d(3, d, patch_size, stride=patch_size)
                                          for d in E})
        self.cls_token = nn.ParameterDict({f"e{d}": token_param(1, 1, d) for d in E})
        self.pos_embed = nn.ParameterDict({f"e{d}": token_param(1, grid**2 + 1, d) for d in E})
        self.norm = nn.ModuleDict({f"e{d}": nn.LayerNorm(d) for d in E})
        self.head = nn.ModuleDict({f"e{d}": nn.Linear(d, num_classes) for d in E})
        self.attn = nn.ModuleList(nn.ModuleDict({
            f"e{d}_h{h}": nn.Sequential(nn.LayerNorm(d), Attention(
                dim=d, num_heads=h, head_dim=space.head_dim, grid=grid, max_rel=max_rel))
            for d in E for h in space.num_heads}) for _ in range(max(space.depths)))
        self.mlp = nn.ModuleList(nn.ModuleDict({  # ratio by index: keys may not contain "."
            f"e{d}_r{i}": nn.Sequential(nn.LayerNorm(d), nn.Linear(d, mlp_hidden_dim(r, d)),
                                        nn.GELU(), nn.Linear(mlp_hidden_dim(r, d), d))
            for d in E for i, r in enumerate(space.mlp_ratios)}) for _ in range(max(space.depths)))
        init_vit(self)

    def forward(self, x, config):
        e = f"e{config['embed_dim']}"
        x = self.patch_embed[e](x).flatten(2).transpose(1, 2)  # (B, N-1, D)
        x = torch.cat([self.cls_token[e].expand(len(x), -1, -1), x], 1) + self.pos_embed[e]
        for i, (h, r) in enumerate(zip(config["num_heads"], config["mlp_ratio"])):
            x = x + self.attn[i][f"{e}_h{h}"](x)
            x = x + self.mlp[i][f"{e}_r{self.space.mlp_ratios.index(r)}"](x)
        return self.head[e](self.norm[e](x)[:, 1:].mean(1))

# %% [markdown]
# ## 5. Evolutionary search (sec. 3.3)
# Find $\arg\max_s \text{fitness}(s; W[s])$ over subnets $s$ whose parameter count lies in a
# range, each scored with its inherited weights $W[s]$. Start from a random population; each
# generation keeps the top-$k$ of everything scored so far as parents and makes children by
# **mutation** (re-draw the depth with probability $P_d$, then each layer's heads and each layer's
# MLP ratio with probability $P_m$) and **crossover** (each gene from one of two parents).
# Random search, the baseline, scores random subnets. A search is judged by its *regret*
# after $n$ evaluations: the best fitness in the space minus the best it has scored so far.

# %%
def mutate(config, space, rng, *, p_depth, p_layer):
    """Re-draw depth and D with probability Pd (new layers random, removed ones dropped), then each
    layer's heads and each layer's MLP ratio with probability Pm."""
    L, heads, ratios = config["depth"], list(config["num_heads"]), list(config["mlp_ratio"])
    if rng.random() < p_depth:
        L = rng.choice(space.depths)
        while len(heads) < L:
            heads.append(rng.choice(space.num_heads))
            ratios.append(rng.choice(space.mlp_ratios))
        heads, ratios = heads[:L], ratios[:L]
    # D is a network-level gene like depth (the official code re-draws both with one probability)
    D = rng.choice(space.embed_dims) if rng.random() < p_depth else config["embed_dim"]
    for i in range(L):
        if rng.random() < p_layer:
            heads[i] = rng.choice(space.num_heads)
        if rng.random() < p_layer:
            ratios[i] = rng.choice(space.mlp_ratios)
    return {"embed_dim": D, "depth": L, "num_heads": tuple(heads), "mlp_ratio": tuple(ratios)}


def crossover(a, b, rng):
    """Each gene (D, depth, each layer's heads and MLP ratio) from one of the two parents; layers
    only the deeper parent has come from it."""
    L = rng.choice((a["depth"], b["depth"]))
    donors = [[p for p in (a, b) if i < p["depth"]] for i in range(L)]
    return {"embed_dim": rng.choice((a["embed_dim"], b["embed_dim"])), "depth": L,
            "num_heads": tuple(rng.choice(d)["num_heads"][i] for i, d in enumerate(donors)),
            "mlp_ratio": tuple(rng.choice(d)["mlp_ratio"][i] for i, d in enumerate(donors))}


class Archive(dict):
    """Every subnet scored so far, in order: config_key -> (fitness, config). `fitness` runs once
    per subnet, and only on subnets that satisfy the constraint: the others are never scored."""

    def __init__(self, fitness, constraint):
        super().__init__()
        self.fitness, self.constraint = fitness, constraint

    def offer(self, config):
        if config_key(config) not in self and self.constraint(config):
            self[config_key(config)] = (self.fitness(config), config)

    def top(self, k):
        return [c for _, c in sorted(self.values(), key=lambda fc: -fc[0])[:k]]

    def best_so_far(self):
        """[max fitness of the first n scored subnets for n = 1, 2, ...]."""
        return np.maximum.accumulate([f for f, _ in self.values()]).tolist()

    def fill(self, space, rng, goal, max_tries=100000):
        """Offer random subnets until `goal` are scored."""
        for _ in range(max_tries):
            if len(self) >= goal:
                return self
            self.offer(sample_config(space, rng))
        raise utils.InputError(f"found only {len(self)} distinct subnets in the parameter range, "
                               f"fewer than {goal}: lower --budget or widen --param-range")


def evolution_search(fitness, space, *, constraint, budget, population, parents, p_depth,
                     p_layer, rng, max_tries=100):
    """Sec. 3.3: `population` random subnets; then per generation, from the top `parents` so
    far, population/2 children by mutation and the rest by crossover (only new ones in range
    count; random ones fill up if the neighbourhood runs dry), until `budget` are scored."""
    arch = Archive(fitness, constraint).fill(space, rng, min(population, budget))
    while len(arch) < budget:
        top, goal = arch.top(parents), min(len(arch) + population, budget)
        n_mutants, tries = len(arch) + population // 2, 0
        while len(arch) < goal and tries < max_tries * population:
            tries += 1
            arch.offer(mutate(rng.choice(top), space, rng, p_depth=p_depth, p_layer=p_layer)
                       if len(arch) < n_mutants else
                       crossover(rng.choice(top), rng.choice(top), rng))
        arch.fill(space, rng, goal)
    return arch


def random_search(fitness, space, *, constraint, budget, rng):
    """The baseline: `budget` distinct random subnets in range; the best one wins."""
    return Archive(fitness, constraint).fill(space, rng, budget)


def in_range(supernet, fractions):
    """The search's constraint: a subnet's parameter count lies between two fractions of the way
    from the space's smallest to its largest subnet (bounds in .bounds)."""
    lo, hi = (supernet.subnet_params(f(supernet.space)) for f in (smallest_config, largest_config))
    bounds, known = tuple(lo + f * (hi - lo) for f in fractions), {}

    def ok(config):  # remembers each answer: a search asks about the same subnets many times
        key = config_key(config)
        if key not in known:
            known[key] = bounds[0] <= supernet.subnet_params(config) <= bounds[1]
        return known[key]
    ok.bounds = bounds
    return ok


def search_curves(table, space, *, constraint, budget, runs, seed, **evolution):
    """Both searches `runs` times on a table {config_key: fitness} (higher is better): {method:
    (regret (runs, budget) array, [each run's pick])}. The optimum is known: the table's best."""
    best = max(f for k, f in table.items() if constraint(config_from_key(k)))
    out = {}
    for method in ("evolution", "random"):
        regret, picks = [], []
        for r in range(runs):
            rng = random.Random(f"{seed}/{method}/{r}")  # a string seed: the same on any machine
            kw = dict(constraint=constraint, budget=budget, rng=rng)
            arch = (evolution_search(lambda c: table[config_key(c)], space, **kw, **evolution)
                    if method == "evolution" else
                    random_search(lambda c: table[config_key(c)], space, **kw))
            regret.append(best - np.array(arch.best_so_far()))
            picks.append(arch.top(1)[0])
        out[method] = (np.stack(regret), picks)
    return out

# %%
def demo_search(runs=100, budget=100, p_depth=0.2, p_layer=0.4, param_range=(0.35, 0.70)):
    """Evolution vs random search on a synthetic table with a known optimum (the --quick table's
    960 subnets; fitness: a random effect per gene plus a smaller one per subnet), as regret."""
    from matplotlib.figure import Figure
    # the parameter range is relative to the whole --quick space, as in the lab
    sn = SuperViT(QUICK_SPACE, image_size=32, patch_size=8, num_classes=10, max_rel=14)
    g, configs = random.Random(0), all_configs(QUICK_TABLE)
    genes = [[("D", c["embed_dim"]), ("L", c["depth"])] + list(enumerate(zip(
        c["num_heads"], c["mlp_ratio"]))) for c in configs]
    effect = {k: g.gauss(0, 1) for gs in genes for k in gs}
    table = {config_key(c): sum(map(effect.get, gs)) + 0.3 * g.gauss(0, 1)
             for c, gs in zip(configs, genes)}
    ok = in_range(sn, param_range)
    curves = search_curves(table, QUICK_TABLE, constraint=ok, budget=budget, runs=runs, seed=0,
                           population=10, parents=5, p_depth=p_depth, p_layer=p_layer)
    res = {m: {"regret": float(reg[:, -1].mean()), "found": float(np.mean(reg[:, -1] == 0))}
           for m, (reg, _) in curves.items()}
    print(f"  {sum(map(ok, configs))} of {len(configs)} subnets in range; after {budget} "
          f"evaluations, mean regret (share of runs that found the optimum): " + ", ".join(
              f"{m} {r['regret']:.3f} ({100 * r['found']:.0f}%)" for m, r in res.items()))
    ax, n = (fig := Figure(figsize=(6, 3.4))).add_subplot(), np.arange(1, budget + 1)
    for m, (reg, _) in curves.items():
        mu, se = reg.mean(0), reg.std(0, ddof=1) / np.sqrt(len(reg))
        ax.plot(n, mu, label=f"{m} search")
        ax.fill_between(n, mu - se, mu + se, alpha=0.3)
    ax.set(xlabel="evaluations (subnets scored)", ylabel="regret (mean ± SE)", yscale="symlog",
           title=f"synthetic table, known optimum, {runs} runs each")
    ax.legend()
    utils.show(fig, "demo_search")
    return res


if utils.in_notebook():
    demo_search()

# %% [markdown]
# ## Exercises
# 1. **Pd and Pm.** The official code swaps the paper's values (depth 0.4, each layer gene 0.2).
#    Run `demo_search(p_depth=0.4, p_layer=0.2)`, then `demo_search(p_layer=0.0)`. Expect the
#    swap to change little (87% vs 85% of 100 runs find the optimum, within the noise of 100
#    runs), and no layer mutations to cut it to 53%: the per-layer genes carry the search.
# 2. **A smaller parameter budget.** `demo_search(param_range=(0.0, 0.2))` keeps 156 of the 960
#    subnets. Expect random search to catch up (38% of runs find the optimum, 24% in the default
#    range) while evolution stays ahead (93%): the smaller the space, the less a search adds.
# 3. **Where the tables go.** `demo_space_params(max_rel=0)` counts the space without relative
#    positions. Expect 58.2k..264.2k instead of 64.0k..273.8k parameters: each block's four
#    30 x 16 tables (keys and values, rows and columns) hold 1,920 parameters.
# 4. **Classic sharing as a ranking tool.** `r = main(["--quick", "--data", "cifar10",
#    "--experiment", "entangle", "--seeds", "1"])` trains one seed's two supernets (~1 min);
#    `r["entangle"]["probes"][0]` lists 20 subnets with their inherited val accuracy in each. Do
#    both rank them alike (`np.corrcoef`)? Expect no: 0.15 (-0.25 to +0.26 over our 4 seeds), as
#    accuracy on 1,000 images cannot rank subnets this close (the fitness-reliability line).

# %% [markdown]
# ---
# # The lab
# Presets and the command line, one job per supernet seed, the three experiments (each decides
# a claim of the paper), the figure and `main`.

# %%
def space_flags(space, table):  # the flags of a space and of its table (a sub-space)
    return {**vars(space), **{"table_" + k: v for k, v in vars(table).items() if k != "head_dim"}}


PRESETS = {  # the full preset: the AutoFormer-T space (Table 1) on 32x32 CIFAR, patch 4
    "quick": dict(train_per_class=450, val_per_class=100, patch_size=8, batch_size=64, epochs=10,
                  lr=2e-3, seeds=4, probes=20, rank_k=8, budget=100, population=10, parents=5,
                  workers=2, threads=1, **space_flags(QUICK_SPACE, QUICK_TABLE)),
    "full": dict(train_per_class=None, val_per_class=500, patch_size=4, batch_size=256, epochs=100,
                 lr=1e-3, seeds=3, probes=50, rank_k=8, budget=1000, population=50, parents=10,
                 workers=1, threads=None, **space_flags(
                     SearchSpace((192, 216, 240), (12, 13, 14), (3, 4), (3.5, 4.0), 64),
                     SearchSpace((192, 216, 240), (12,), (3, 4), (4.0,), 64)))}
for preset in PRESETS.values():  # the same in both
    preset.update(test_per_class=None, image_size=32, max_rel_pos=14, weight_decay=0.05,
                  param_range=(0.35, 0.70), runs=100, p_depth=0.2, p_layer=0.4)
EXPERIMENTS = ("rank", "entangle", "search", "inherit")
ZERO_OK = {"type": utils.nonneg_float}
FLAGS = {
    "embed_dims": "embedding dims D (Table 1)", "depths": "depths L", "patch_size": "patch side",
    "num_heads": "heads per layer", "mlp_ratios": "MLP ratios per layer",
    "head_dim": "head width hd (fixed: q, k, v have heads x hd units)",
    "max_rel_pos": ("relative positions clipped at this distance; 0: none",
                    {"type": utils.nonneg_int}),
    "batch_size": "batch size", "epochs": "epochs of every supernet and retrained subnet",
    "lr": "peak learning rate (AdamW, warmup + cosine)", "weight_decay": ("AdamW", ZERO_OK),
    "seeds": "supernet seeds, the n of every verdict (each seed trains its own supernets)",
    "probes": "entangle: random subnets scored with both supernets of a seed",
    "rank_k": "rank: subnets per seed, spread over the space, each trained alone",
    "table_embed_dims": "search: D of the sub-space scored exhaustively (the table)",
    "table_depths": "search: the table's depths", "table_num_heads": "search: its heads",
    "table_mlp_ratios": "search: its MLP ratios", "budget": "evaluations per search run",
    "param_range": ("search: LO,HI, the allowed subnet size as fractions of the way from the "
                    "space's smallest to its largest subnet", {"type": utils.comma_list(float)}),
    "runs": "search runs per method and table", "parents": "evolution: top-k kept (paper 10)",
    "population": "evolution: candidates per generation (paper 50)",
    "p_depth": ("Pd: probability to re-draw depth and D (paper 0.2)", ZERO_OK),
    "p_layer": ("Pm: probability to re-draw each layer's heads, its MLP ratio (paper 0.4)",
                ZERO_OK)}


def check(a):
    """Settings that do not fit together: one line each."""
    for bad, text in [
            (a.val_per_class <= 0, "--val-per-class must be > 0: the search scores on it"),
            (a.parents > a.population, "--parents must be <= --population"),
            (a.image_size % a.patch_size, "--image-size must be divisible by --patch-size"),
            (max(a.p_depth, a.p_layer) > 1, "--p-depth and --p-layer are probabilities: use "
                                            "values in [0, 1]"),
            (len(a.param_range) != 2 or not 0 <= a.param_range[0] < a.param_range[1] <= 1,
             "--param-range takes LO,HI with 0 <= LO < HI <= 1")] + [
            (set(getattr(a, "table_" + n)) - set(getattr(a, n)), f"--table-{n.replace('_', '-')} "
             f"must be a subset of --{n.replace('_', '-')}: the table is part of the space")
            for n in ("embed_dims", "depths", "num_heads", "mlp_ratios")]:
        if bad:
            raise utils.InputError(text)


def space_of(a, prefix=""):  # the search space, or with prefix="table_" the table's
    return SearchSpace(*(getattr(a, prefix + n) for n in
                         ("embed_dims", "depths", "num_heads", "mlp_ratios")), a.head_dim)


def build_supernet(a, num_classes, kind="entangled"):
    return {"entangled": SuperViT, "classic": ClassicSuperViT}[kind](
        space_of(a), image_size=a.image_size, patch_size=a.patch_size, num_classes=num_classes,
        max_rel=a.max_rel_pos)


def supernet_step(sample):  # utils.train step_fn: subnet sample() trained on the batch
    def step(model, x, y):
        with utils.autocast(x.device):
            logits = model(x, sample())
            loss = F.cross_entropy(logits.float(), y, label_smoothing=0.1)
        loss.backward()
        return loss, logits
    return step


def run_seed(a, data, kind, seed, todo):
    """One job (a worker process): the `kind` supernet of `seed`, trained, then measured for the
    experiments in `todo`. It seeds all it uses, so results do not depend on --workers."""
    device, t0 = utils.get_device(a.device), time.time()
    log = (lambda line: print(line, flush=True)) if seed == a.seed else (lambda line: None)
    torch.manual_seed(seed)
    model = build_supernet(a, data.num_classes, kind).to(device)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    train, val, test = utils.make_loaders(data, batch_size=a.batch_size, device=device, seed=seed)
    # both kinds of a seed train the same subnet on the same batch at every step (paired arms);
    # no gradient clipping, as in the official runs
    steps, rng = random.Random(seed + 1), random.Random(f"probes/{seed}")
    hist = utils.train(model, train, epochs=a.epochs, lr=a.lr, weight_decay=a.weight_decay,
                       step_fn=supernet_step(lambda: sample_config(model.space, steps)),
                       grad_clip=0, log=log, name=f"{kind} supernet seed {seed} ")
    out = {"history": hist, "params": sum(p.numel() for p in model.parameters()), "probes": [
        (config_key(c), tuple(utils.evaluate(model, val, lambda m, x, c=c: m(x, c))))
        for c in [sample_config(model.space, rng) for _ in range(a.probes)]]}
    if kind == "entangled" and "rank" in todo:
        spread = spread_configs(model, a.rank_k, seed)
        per = score_configs(model, spread, val)
        out["rank"] = [tuple(summarize(*per[config_key(c)])) for c in spread]
    if kind == "classic" or not {"search", "inherit"} & set(todo):
        return out
    # the table: every subnet of the table's sub-space, scored per image on validation
    ok, table_space = in_range(model, a.param_range), space_of(a, "table_")
    per = score_configs(model, all_configs(table_space), val)
    inside = [k for k in per if ok(config_from_key(k))]
    # split-half reliability of the fitness: do two random halves of the validation images
    # order the in-range subnets alike? (the correlation of their scores on the two halves)
    half = torch.rand(len(data.y_val), generator=torch.Generator().manual_seed(seed)) < 0.5
    halves = np.array([[summarize(per[k][0][m], per[k][1][m]) for k in inside]
                       for m in (half, ~half)])  # (2 halves, subnets, accuracy and NLL)
    with np.errstate(invalid="ignore"):    # constant scores (a tiny dataset): nan, no warning
        out["split_half"] = {s: float(np.corrcoef(halves[:, :, i])[0, 1])
                             for i, s in enumerate(("acc", "nll"))}
    # fitness: minus the validation NLL (RESULTS.md says why not accuracy)
    fitness = {k: -n.double().mean().item() for k, (_, n) in per.items()}
    chosen = max(inside, key=fitness.get)  # the optimum: what a search that finds it returns
    curves = search_curves(fitness, table_space, constraint=ok, budget=a.budget, runs=a.runs,
                           seed=seed, population=a.population, parents=a.parents,
                           p_depth=a.p_depth, p_layer=a.p_layer)
    picks = {config_key(c) for _, ps in curves.values() for c in ps} | {chosen}
    test_scores = {k: summarize(*v) for k, v in score_configs(
        model, [config_from_key(k) for k in picks], test).items()}
    out.update(table=len(per), in_range=len(inside), chosen=chosen, search={
        m: {"regret": (1000 * reg.mean(0)).tolist(), "found": float(np.mean(reg[:, -1] == 0)),
            "picks_test_acc": float(np.mean([test_scores[config_key(c)].acc for c in ps]))}
        for m, (reg, ps) in curves.items()})
    if "inherit" in todo:  # the chosen subnet from the supernet's initial values, same batches
        model.load_state_dict(init)
        sub = extract_subnet(model, config_from_key(chosen))
        hist = utils.train(sub, train, epochs=a.epochs, lr=a.lr, weight_decay=a.weight_decay,
                           grad_clip=0, log=log, name=f"retrain seed {seed} ")
        out["inherit"] = {"inherited": tuple(test_scores[chosen]),
                          "retrained": tuple(utils.evaluate(sub, test)), "loss": hist[-1]["loss"]}
    print(f"[seed {seed}] entangled supernet trained and measured in {time.time() - t0:.0f} s")
    return out


def spread_configs(supernet, k, seed):
    """k subnets spread over the whole space: the smallest, the largest, and between them the
    random subnets (of 400) whose parameter counts lie nearest k - 2 evenly spaced targets."""
    rng = random.Random(f"spread/{seed}")
    space = supernet.space
    ends = [smallest_config(space), largest_config(space)]
    lo, hi = (supernet.subnet_params(c) for c in ends)
    pool = [sample_config(space, rng) for _ in range(400)]
    inner = []
    for i in range(1, k - 1):
        target = lo + i * (hi - lo) / (k - 1)
        inner.append(min(pool, key=lambda c: abs(supernet.subnet_params(c) - target)))
    return [ends[0]] + inner + [ends[1]]


def kendall_tau(a, b):
    """Kendall's tau-a of two lists: (concordant - discordant pairs) / all pairs."""
    s = 0
    for i, j in itertools.combinations(range(len(a)), 2):
        s += np.sign(a[i] - a[j]) * np.sign(b[i] - b[j])
    return float(s / (len(a) * (len(a) - 1) / 2))


def run_alone(a, data, seed, i):
    """Subnet i of spread_configs(seed) trained alone from its slice of the seed's initial
    supernet, on the supernet's batches and steps; scored on validation."""
    device = utils.get_device(a.device)
    torch.manual_seed(seed)
    model = build_supernet(a, data.num_classes).to(device)
    config = spread_configs(model, a.rank_k, seed)[i]
    sub = extract_subnet(model, config)
    train, val, _ = utils.make_loaders(data, batch_size=a.batch_size, device=device, seed=seed)
    utils.train(sub, train, epochs=a.epochs, lr=a.lr, weight_decay=a.weight_decay, grad_clip=0,
                log=lambda line: None)
    return {"config": config_key(config), "params": model.subnet_params(config),
            "val": tuple(utils.evaluate(sub, val))}


def run_linear(a, data, seed):
    """The control: a linear classifier on the pixels, the same recipe and batches."""
    device = utils.get_device(a.device)
    torch.manual_seed(seed)
    pixels = a.image_size * a.image_size * 3
    model = nn.Sequential(nn.Flatten(), nn.Linear(pixels, data.num_classes)).to(device)
    train, val, test = utils.make_loaders(data, batch_size=a.batch_size, device=device, seed=seed)
    utils.train(model, train, epochs=a.epochs, lr=a.lr, weight_decay=a.weight_decay,
                grad_clip=0, log=lambda line: None)
    return {"val": tuple(utils.evaluate(model, val)), "test": tuple(utils.evaluate(model, test))}


def run_job(a, data, kind, seed, todo):
    """One job of a worker process: a supernet, a subnet trained alone ("alone3"), or the
    linear control."""
    if kind == "linear":
        return run_linear(a, data, seed)
    if kind.startswith("alone"):
        return run_alone(a, data, seed, int(kind[5:]))
    return run_seed(a, data, kind, seed, todo)


def exp_rank(res, a):
    """The premise of one-shot search: do inherited scores order subnets as training each alone
    would? k subnets per supernet seed, spread from the smallest to the largest, on validation."""
    seeds = sorted(s for k, s in res if k == "linear")
    rows, taus, tau_acc, gaps, beat = [], [], [], [], []
    for s in seeds:
        alone = [res[(f"alone{i}", s)] for i in range(a.rank_k)]
        inh = res[("entangled", s)]["rank"]
        lin = res[("linear", s)]["val"]
        # tau by NLL (the search's fitness; lower is better on both sides)
        taus.append(kendall_tau([x[1] for x in inh], [x["val"][1] for x in alone]))
        tau_acc.append(kendall_tau([x[0] for x in inh], [x["val"][0] for x in alone]))
        gaps.append(alone[-1]["val"][0] - alone[0]["val"][0])
        beat.append(sum(x["val"][0] > lin[0] for x in alone))
        for x, y in zip(alone, inh):
            name = config_str(config_from_key(x["config"]))
            alone_score = f"{x['val'][0]:.1f} / {x['val'][1]:.3f}"
            rows.append([s, name, f"{x['params'] / 1e3:.1f}k", alone_score,
                         f"{y[0]:.1f} / {y[1]:.3f}"])
        rows.append([s, "linear on pixels (control)", "", f"{lin[0]:.1f} / {lin[1]:.3f}", ""])
    print(f"\n== rank: {len(seeds)} supernet seeds x {a.rank_k} subnets spread over the space, "
          f"each trained alone for the supernet's {a.epochs} epochs; validation ==")
    print_table(["seed", "subnet", "params", "alone val % / NLL", "inherited val % / NLL"], rows)
    gap = utils.mean_ci(gaps)
    tau = utils.mean_ci(taus)
    print(f"Kendall tau(inherited, alone) by accuracy: {utils.fmt_ci(utils.mean_ci(tau_acc))}; "
          f"per seed by NLL: {', '.join(f'{t:+.2f}' for t in taus)}")
    linear = utils.mean_ci([res[("linear", s)]["val"][0] for s in seeds])
    print(f"control: linear classifier on pixels, val acc {utils.fmt_ci(linear, 1)}; "
          f"subnets trained alone that beat it: {sum(beat)} of {len(seeds) * a.rank_k}")
    checks = [
        f"entry check: capacity matters: largest \u2212 smallest sub-network trained alone = "
        f"{gap[0]:+.1f} points [{gap[1]:+.1f}, {gap[2]:+.1f}] (needs \u2265 3) \u2192 "
        f"{'met' if gap[0] >= 3 else 'not met'}",
        f"entry check: the supernet ranks sub-networks: Kendall \u03c4(inherited, stand-alone) = "
        f"{tau[0]:+.2f} [{tau[1]:+.2f}, {tau[2]:+.2f}] (needs > 0, aim \u2265 0.5) \u2192 "
        f"{'met' if tau[1] > 0 else 'not met'}"]
    for line in checks:
        print(line)
    return {"tau_nll": taus, "tau_acc": tau_acc, "gap": gaps, "beat_linear": beat,
            "checks": checks, "rows": rows}


def print_table(header, rows):
    print("| " + " | ".join(header) + " |\n" + "|---" * len(header) + "|")
    for r in rows:
        print("| " + " | ".join(map(str, r)) + " |")


def exp_entangle(res, a):
    """Paper Fig. 3/4: the entangled vs the classic supernet, the same steps, subnets and batches,
    then the same random subnets scored with inherited weights on validation. n = seeds."""
    seeds = sorted(s for k, s in res if k == "classic")
    arms = {k: [[p[1] for p in res[(k, s)]["probes"]] for s in seeds]
            for k in ("entangled", "classic")}
    mean = {k: [[np.mean([p[i] for p in ps]) for ps in v] for i in (0, 1)] for k, v in arms.items()}
    print(f"\n== entangle: {len(seeds)} seeds x {a.probes} random subnets, inherited weights ==")
    print_table(["seed", "final train loss ent / cls", "val acc % ent / cls (mean of subnets)",
                 "val NLL ent / cls"], [[s] + [" / ".join(f"{v:.{d}f}" for v in vs) for vs, d in (
                     ([res[(k, s)]["history"][-1]["loss"] for k in arms], 3),
                     ([mean[k][0][j] for k in arms], 1), ([mean[k][1][j] for k in arms], 3))]
                     for j, s in enumerate(seeds)])
    wins = sum(e[0] > c[0] for es, cs in zip(*arms.values()) for e, c in zip(es, cs))
    print(f"entangled > classic on {wins}/{len(seeds) * a.probes} (seed, subnet) pairs; supernet "
          f"parameters: " + " vs ".join(f"{res[(k, seeds[0])]['params']:,}" for k in arms))
    kw = dict(name_a="entangled", name_b="classic", pairs="paired supernet seeds")
    probes = {s: [[config_str(config_from_key(e[0])), e[1][0], c[1][0]] for e, c in zip(
        res[("entangled", s)]["probes"], res[("classic", s)]["probes"])] for s in seeds}
    return {"wins": wins, "per_seed": mean, "probes": probes, "verdicts": [
        utils.compare_paired(mean["entangled"][0], mean["classic"][0], **kw),
        utils.compare_paired(mean["entangled"][1], mean["classic"][1], unit="nats", digits=3,
                             higher_is_better=False, bound=0.02, **kw)]}


def exp_search(res, a):
    """Sec. 3.3: evolution vs random search, `runs` times each on each seed's exhaustive table
    (fitness: validation NLL). n = tables: the interval covers what changes between supernets."""
    seeds = sorted(s for k, s in res if k == "entangled")
    x, r = res[("entangled", seeds[0])], [res[("entangled", s)]["search"] for s in seeds]
    marks = sorted({10, 30, a.budget} & set(range(1, a.budget + 1)))
    print(f"\n== search: {len(seeds)} tables (one per supernet seed) of {x['table']} subnets, "
          f"{x['in_range']} in range; {a.runs} runs per method and table; population "
          f"{a.population}, top-{a.parents}, Pd={a.p_depth}, Pm={a.p_layer} ==")
    print_table(["seed"] + [f"regret @{n} evo / rnd (millinats)" for n in marks]
                + ["found the optimum evo / rnd", "picks' test % evo / rnd"],
                [[s] + [f"{ev['regret'][n - 1]:.2f} / {rn['regret'][n - 1]:.2f}" for n in marks]
                 + [f"{100 * ev['found']:.0f}% / {100 * rn['found']:.0f}%",
                    f"{ev['picks_test_acc']:.2f} / {rn['picks_test_acc']:.2f}"]
                 for s, ev, rn in zip(seeds, *([x[m] for x in r] for m in ("evolution",
                                                                            "random")))])
    rel = {k: utils.mean_ci([res[("entangled", s)]["split_half"][k] for s in seeds])
           for k in ("nll", "acc")}
    print(f"fitness reliability: correlation of the in-range subnets' scores on two random halves "
          f"of the validation images, mean over tables: NLL {utils.fmt_ci(rel['nll'])}, accuracy "
          f"{utils.fmt_ci(rel['acc'])}")
    get = {m: {k: [x[m][k] for x in r] for k in r[0][m]} for m in r[0]}
    kw = dict(name_a="evolution", name_b="random", pairs="tables (supernet seeds)")
    return {"split_half": rel, "per_seed": dict(zip(seeds, r)), "verdicts": [
        utils.compare_paired([g[-1] for g in get["evolution"]["regret"]],
                             [g[-1] for g in get["random"]["regret"]], unit="millinats of regret",
                             digits=2, higher_is_better=False, bound=0.5, **kw),
        utils.compare_paired(get["evolution"]["picks_test_acc"], get["random"]["picks_test_acc"],
                             digits=2, bound=0.5, **{**kw, "name_a": "evolution picks",
                                                     "name_b": "random picks"})]}


def exp_inherit(res, a):
    """Paper Table 3: the searched subnet with inherited weights vs the same subnet retrained
    from the supernet's initial values on the same batches. n = seeds."""
    seeds = sorted(s for k, s in res if k == "entangled")
    r = [res[("entangled", s)] for s in seeds]
    print(f"\n== inherit: each seed's best in-range subnet by val NLL, inherited vs retrained "
          f"{a.epochs} epochs, on the test set ==")
    print_table(["seed", "subnet", "inherited test % / NLL", "retrained test % / NLL"],
                [[s, config_str(config_from_key(x["chosen"]))] + [
                    f"{x['inherit'][k][0]:.1f} / {x['inherit'][k][1]:.3f}"
                    for k in ("inherited", "retrained")] for s, x in zip(seeds, r)])
    arm = {k: list(zip(*[x["inherit"][k] for x in r])) for k in ("inherited", "retrained")}
    kw = dict(name_a="inherited", name_b="retrained", pairs="paired supernet seeds")
    return {"chosen": [x["chosen"] for x in r], "arms": arm, "verdicts": [
        utils.compare_paired(arm["inherited"][0], arm["retrained"][0], **kw),
        utils.compare_paired(arm["inherited"][1], arm["retrained"][1], unit="nats", digits=3,
                             higher_is_better=False, bound=0.03, **kw)]}


def plot(res, path):
    """The run's figure: the same subnets in both supernets, and the regret curves over tables."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(10, 3.6))
    ax = fig.add_subplot(1, 2, 1)
    pairs = [(e[1][0], c[1][0]) for (k, s), x in res.items() if k == "classic"
             for e, c in zip(res[("entangled", s)]["probes"], x["probes"])]
    lim = (min(map(min, pairs)) - 1, max(map(max, pairs)) + 1)
    ax.scatter(*zip(*pairs), s=12)
    ax.plot(lim, lim, "k:", label="equal")
    ax.set(xlim=lim, ylim=lim, xlabel="entangled supernet", ylabel="classic supernet",
           title="val top-1 % of the same subnets, inherited weights")
    ax.legend()
    ax = fig.add_subplot(1, 2, 2)
    for m in ("evolution", "random"):
        reg = np.array([x["search"][m]["regret"] for x in res.values() if "search" in x])
        mu, se, n = reg.mean(0), reg.std(0) / np.sqrt(len(reg)), np.arange(1, reg.shape[-1] + 1)
        ax.plot(n, mu, label=f"{m} search")
        ax.fill_between(n, mu - se, mu + se, alpha=0.3)
    ax.set(xlabel="evaluations", ylabel="val NLL regret (millinats)", yscale="symlog",
           title="search on each supernet's table, mean ± SE")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def full_preset_models(num_classes=10):
    """Every model the full preset trains, at its real size: name -> (model, step_fn, size).
    The supernets step on their largest subnet (every weight in use)."""
    a = SimpleNamespace(**PRESETS["full"])
    sn = {k: build_supernet(a, num_classes, k) for k in ("entangled", "classic")}
    big = largest_config(sn["entangled"].space)
    return {**{f"{k} supernet": (m, supernet_step(lambda: big), a.image_size)
               for k, m in sn.items()},
            "retrained subnet (largest)": (build_subnet(sn["entangled"], big), None, a.image_size)}


def main(argv=None):
    a = utils.cli(__doc__, PRESETS, FLAGS, argv, experiments=EXPERIMENTS, check=check)
    device, out = utils.start(a, "04_autoformer_entangle")
    if a.mode == "demo":
        return utils.run_demos(out, [demo_entangled_weights, demo_space_params, demo_search])
    t0, data = time.time(), utils.data_from_args(a)
    ok = in_range(build_supernet(a, data.num_classes), a.param_range)
    n_in = sum(map(ok, all_configs(space_of(a, "table_"))))
    if {"search", "inherit"} & set(a.experiments) and a.budget > n_in:
        raise utils.InputError(f"--budget {a.budget} is more than the {n_in} table subnets in "
                               f"the parameter range: lower it or widen --param-range")
    print(f"data: {len(data.y_train)} train / {len(data.y_val)} val (carved from train) / "
          f"{len(data.y_test)} test images; {space_of(a)}, relative positions clipped at "
          f"{a.max_rel_pos}; parameter range {ok.bounds[0] / 1e3:.0f}k..{ok.bounds[1] / 1e3:.0f}k; "
          f"{a.seeds} seeds, {a.workers} worker(s)", flush=True)
    kinds = ["entangled"] + (["classic"] if "entangle" in a.experiments else [])
    if "rank" in a.experiments:  # the largest first: long jobs first balance the workers
        kinds += [f"alone{i}" for i in reversed(range(a.rank_k))] + ["linear"]
    jobs = [(a, data, k, a.seed + i, tuple(a.experiments)) for k in kinds for i in range(a.seeds)]
    res = dict(zip([j[2:4] for j in jobs], utils.run_jobs(run_job, jobs, workers=a.workers)))
    results = {name: {"rank": exp_rank, "entangle": exp_entangle, "search": exp_search,
                      "inherit": exp_inherit}[name](res, a) for name in a.experiments}
    if {"entangle", "search"} <= set(a.experiments):
        plot(res, os.path.join(out, "results.png"))
    results["wall_s"] = round(time.time() - t0, 1)
    print(f"\n== done in {results['wall_s']:.0f} s; results in {out} ==")
    utils.save_results(os.path.join(out, "results.json"), vars(a), results)
    return results


if __name__ == "__main__":
    utils.run_main(main)
