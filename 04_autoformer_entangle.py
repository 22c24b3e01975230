"""AutoFormer: Searching Transformers for Visual Recognition.

Chen, Peng, Fu, Ling, ICCV 2021 (arXiv:2107.00651): one weight-entangled Vision Transformer
supernet holds every candidate of a search space; an evolutionary search picks one.

Run:
    python 04_autoformer_entangle.py --demo                  # no data, seconds: checks, figures
    python 04_autoformer_entangle.py --quick --experiment rank --data cifar10
                                  # 2-core CPU, ~9 min: does the supernet rank subnets?
    python 04_autoformer_entangle.py --quick --data cifar10  # the paper's claims, ~6 min
    python 04_autoformer_entangle.py --data cifar10          # full preset: one GPU
"""
import itertools
import json
import math
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
# # AutoFormer: one supernet, many Vision Transformers
# A one-shot architecture search trains **one** network, the *supernet*, that contains every
# candidate of a search space. It then ranks the candidates (the *subnets*) by how well they do
# with the weights they **inherit** from the supernet, without training any of them again.
# AutoFormer's idea is **weight entanglement**: a smaller layer has no weights of its own; it
# uses the top-left corner of the largest layer's weight. Every subnet shares most of its weights
# with every other, so a training step on one subnet trains them all.
#
# The method rests on one premise: the inherited score orders subnets as training each of them
# alone would. This script builds the supernet, measures that premise, and only then judges the
# search that relies on it.
#
# **What you will learn**
# - how one weight matrix serves many layer sizes, and why a step on a small subnet moves every
#   larger one;
# - how a Vision Transformer with 2-D relative positions is made entangled, and how a subnet is
#   cut back out of it as a plain ViT;
# - how to count a subnet's parameters without building it, and why a search needs that count;
# - how evolutionary search works (mutation, crossover, an archive of scored subnets), and how a
#   test can show that it climbs the fitness and not down it;
# - how to check that a supernet ranks subnets (Kendall's $\tau$) before trusting its search.
#
# Letters follow the README's notation table: $B$ batch, $C$ embedding width, $N$ patches
# ($N + 1$ tokens with the class token), $N_h$ heads of width $d$, $p$ patch side. New here: $L$
# depth (blocks), $r$ MLP ratio and $M = \mathrm{round}(rC)$ the MLP's hidden width.

# %% [markdown]
# ## 1. Weight entanglement: one matrix, many layers (sec. 3.1, Fig. 2)
# A layer of the supernet keeps only its **largest** weight $W$ ($C^{max}_{out} \times
# C^{max}_{in}$) and bias $b$. A subnet that feeds it $C_{in}$ features and asks for $C_{out}$
# outputs uses their leading corner:
# $$y = x\, W[{:}C_{out},\ {:}C_{in}]^\top + b[{:}C_{out}]$$
# Classic one-shot weight sharing (Fig. 2, left) gives every choice its own matrix. Here the
# choices overlap: the corner a small subnet uses lies inside the corner of every larger one.
# `SuperLinear` is `nn.Linear` at its largest size; its `forward` takes the corner.
# `SuperLayerNorm` does the same for LayerNorm: it normalises the $C$ features it is given and
# scales them by $\gamma[{:}C]$, $\beta[{:}C]$.
#
# Why a corner and not any subset? Because every subnet must agree on *which* entries it shares.
# With leading slices, the first $C$ channels of the embedding mean the same thing in a subnet
# of width 48 as in one of width 64, so a block of the small subnet reads features that the
# large subnet's blocks were also trained to read. The paper credits entanglement with three
# effects (sec. 3.1): every weight is updated by many more steps than in classic sharing, so the
# supernet converges faster; the supernet is as small as its largest subnet; and the inherited
# weights are good enough that subnets need no retraining (the lab tests the last claim).

# %%
class SuperLinear(nn.Linear):
    """nn.Linear(C_in max, C_out max) holding the largest weight; forward(x, C_out) uses
    W[:C_out, :C_in] and b[:C_out], with C_in = x.shape[-1]."""

    def forward(self, x, out_features=None):  # x (..., C_in) -> (..., C_out)
        c_out = out_features or self.out_features
        c_in = x.shape[-1]
        # y = x W[:C_out, :C_in]^T + b[:C_out]: the same corner in every subnet
        return F.linear(x, self.weight[:c_out, :c_in], self.bias[:c_out])


class SuperLayerNorm(nn.LayerNorm):
    """LayerNorm over the C = x.shape[-1] features it gets, with gamma[:C], beta[:C]."""

    def forward(self, x):  # (..., C)
        C = x.shape[-1]
        return F.layer_norm(x, (C,), self.weight[:C], self.bias[:C], self.eps)

# %% [markdown]
# **What one step changes.** Take an MLP's first layer in a supernet of width $C = 64$ and MLP
# ratio up to 4: one weight of $256 \times 64$. Three subnets use three nested corners of it.
# Train the smallest ($C = 48$, $r = 2$: the corner $W[{:}96, {:}48]$) for one SGD step and
# compare $W$ before and after. The function also recomputes the layer with explicit index
# lists, a check that the slice is the corner we mean.

# %%
def one_step_on_the_smallest(seed=0):
    """One entangled weight (64 -> 256) and one SGD step on the smallest of three subnets.
    -> (W before the step, bool mask of the entries it changed, the subnets, slice error)."""
    torch.manual_seed(seed)
    fc1 = SuperLinear(64, 256)
    x = torch.randn(8, 64)
    # three subnets of a supernet with C up to 64 and r up to 4; this layer is W_1 of their
    # first block, so it maps C inputs to M = round(r C) outputs: (C_in, C_out) = (C, M)
    subnets = {"C=48, r=2": (48, 96), "C=56, r=3": (56, 168), "C=64, r=4": (64, 256)}
    c_in, c_out = subnets["C=48, r=2"]
    w0 = fc1.weight.detach().clone()
    y = fc1(x[:, :c_in], c_out)  # (8, C_out): the smallest subnet's layer
    # the same product with explicit index lists instead of the slice
    rows = w0[torch.arange(c_out)]
    corner = rows[:, torch.arange(c_in)]
    y_ref = x[:, :c_in] @ corner.T + fc1.bias[:c_out]
    error = (y - y_ref).abs().max().item()
    y.square().mean().backward()  # a loss on the smallest subnet only
    with torch.no_grad():
        fc1.weight -= fc1.weight.grad  # one SGD step, learning rate 1
    changed = fc1.weight.detach() != w0
    return w0, changed, subnets, error

# %% [markdown]
# The demo draws $W$ with the three corners, and the entries the step changed: all of them lie
# in $W[{:}96, {:}48]$, which is inside the corner of every larger subnet. That is entanglement
# in one picture: the small subnet's training moved weights that the large subnets use.
# With classic sharing the same step would have changed a matrix that no other subnet uses.

# %%
def demo_entangled_weights():
    """Fig. 2 as a picture: one entangled weight, the corners three subnets use, and what one
    training step on the smallest subnet changes."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    w0, changed, subnets, error = one_step_on_the_smallest()
    c_in, c_out = subnets["C=48, r=2"]
    outside = int(changed[c_out:].sum() + changed[:, c_in:].sum())
    print(f"  slice == explicit index lists (max error {error:.1e}); one step on the "
          f"smallest subnet changed {int(changed.sum())} entries of W, all in "
          f"W[:{c_out}, :{c_in}] ({outside} outside), inside every larger subnet's "
          f"corner")
    fig = Figure(figsize=(10, 3.4))
    panels = [(w0, "one entangled weight W (256 x 64)"),
              (changed, "changed by one step on the smallest subnet")]
    for i, (img, title) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.imshow(img.T.float().numpy(), cmap="gray", aspect="auto")
        for (name, (ci, co)), color in zip(subnets.items(), ("C0", "C2", "C3")):
            box = Rectangle((-0.5, -0.5), co, ci, fill=False, lw=2, ec=color,
                            label=f"{name}: W[:{co}, :{ci}]")
            ax.add_patch(box)
        ax.set(xlabel="output unit", ylabel="input feature", title=title)
    ax.legend(loc="lower right", fontsize=8)
    utils.show(fig, "demo_entangled_weights")
    n_changed = int(changed.sum())
    return {"slice_error": error, "changed": n_changed, "changed_outside": outside}


if utils.in_notebook():
    demo_entangled_weights()

# %% [markdown]
# ## 2. Entangled attention with 2-D relative positions
# The official runs (`--relative_position`) add learned 2-D relative positions to the keys and
# the values. For head $h$, query position $q$ and key position $k$, with offset
# $\delta = k - q$ clipped to $[-R, R]$ in each direction:
# $$A^h_{qk} = \frac{Q^h_q \cdot (K^h_k + r^K_\delta)}{\sqrt{d}},\qquad
#   o^h_q = \sum_k \mathrm{softmax}_k(A^h_{qk})\,(V^h_k + r^V_\delta),\qquad
#   r_\delta = E_{row}[\delta_1] + E_{col}[\delta_2]$$
# $E_{row}$ and $E_{col}$ are learned tables of width $d$, one pair for keys and one for values.
# The class token has no place on the grid: every pair that involves it looks up **row 0** of
# each table, a learned row of its own (initialised like the others, trained like them), shared
# by all such pairs. The offsets use rows $1 \ldots 2R + 1$.
#
# The next cell computes, once per grid, which table row every (query, key) pair reads.
# Clipping at $R$ makes the table's size independent of the image: offsets beyond $R$ share
# the last row. With $R = 14$ and a grid of 6 or 8 patches nothing is clipped; the full preset
# keeps the official $R = 14$ too.

# %%
def relative_position_index(grid, max_rel):
    """(2, N+1, N+1) table rows of every (query, key) pair; token 0 is the class token, then
    the N = grid^2 patches in row-major order. Row 0 of a table serves the class token.
    Entry [0, q, k] is the row of E_row for the pair, entry [1, q, k] the row of E_col."""
    n = torch.arange(grid * grid)
    row = n // grid  # (N,) each patch's row on the grid
    col = n % grid
    # delta = k - q per direction, clipped at +-R, shifted to rows 1 .. 2R+1
    d_row = (row[None, :] - row[:, None]).clamp(-max_rel, max_rel) + max_rel + 1  # (N, N)
    d_col = (col[None, :] - col[:, None]).clamp(-max_rel, max_rel) + max_rel + 1
    # a zero row and column in front: every pair with the class token reads row 0
    d_row = F.pad(d_row, (1, 0, 1, 0))  # (N+1, N+1)
    d_col = F.pad(d_col, (1, 0, 1, 0))
    return torch.stack([d_row, d_col])  # (2, N+1, N+1)

# %% [markdown]
# `RelativePosition2D` holds one pair of tables ($2R + 2$ rows each: the class token's row and
# the $2R + 1$ offsets) and returns $r_\delta$ for every pair, shared by the heads. Its width is
# the head width $d$, which the search space keeps fixed, so every subnet uses the tables whole.

# %%
class RelativePosition2D(nn.Module):
    """r_delta = E_row[delta_1] + E_col[delta_2] of every (query, key): (N+1, N+1, d)."""

    def __init__(self, *, head_dim, grid, max_rel):
        super().__init__()
        rows = 2 * max_rel + 2  # row 0: the class token's; rows 1..2R+1: the offsets
        rel_rows = nn.init.trunc_normal_(torch.empty(rows, head_dim), std=0.02)
        rel_cols = nn.init.trunc_normal_(torch.empty(rows, head_dim), std=0.02)
        self.rel_rows = nn.Parameter(rel_rows)
        self.rel_cols = nn.Parameter(rel_cols)
        index = relative_position_index(grid, max_rel)
        self.register_buffer("index", index, persistent=False)

    def forward(self):
        return self.rel_rows[self.index[0]] + self.rel_cols[self.index[1]]  # (N+1, N+1, d)

# %% [markdown]
# `attend` computes the two equations above for all heads at once. Without tables it is plain
# scaled dot-product attention. The $r^K$ term is $Q^h_q \cdot r^K_\delta$, an einsum over the
# head width for every pair; the $r^V$ term adds the attention-weighted tables to the output.

# %%
def attend(q, k, v, rel_k=None, rel_v=None):
    """Attention of q, k, v (B, N_h, N+1, d), with relative positions r^K, r^V (N+1, N+1, d)
    if given. -> (B, N_h, N+1, d).

    The tables are the same for every head and every image: the einsums broadcast them over
    the batch and the heads.
    """
    if rel_k is None:
        return F.scaled_dot_product_attention(q, k, v)
    # A_qk = Q_q . (K_k + r^K_delta) / sqrt(d)
    logits = q @ k.transpose(-2, -1) + torch.einsum("bhqd,qkd->bhqk", q, rel_k)
    attn = (logits * q.shape[-1] ** -0.5).softmax(-1)  # (B, N_h, N+1, N+1)
    # o_q = sum_k softmax_k(A_qk) (V_k + r^V_delta)
    return attn @ v + torch.einsum("bhqk,qkd->bhqd", attn, rel_v)  # (B, N_h, N+1, d)

# %% [markdown]
# **Entangled attention.** A layer with $N_h$ heads of the fixed width $d$ uses the first
# $N_h d$ output units of each of $W_Q$, $W_K$, $W_V$ (the official `--change_qkv`), and
# $W_O[{:}C, {:}N_h d]$. Here $q$, $k$, $v$ are three `SuperLinear`s, so a unit's weight row and
# its bias entry always go together (see the deviations in RESULTS.md for the official fused
# layer).

# %%
class SuperAttention(nn.Module):
    """Entangled attention: q, k, v take their first N_h d units; W_O[:C, :N_h d]."""

    def __init__(self, *, max_dim, max_heads, head_dim, grid, max_rel):
        super().__init__()
        self.head_dim = head_dim
        inner = max_heads * head_dim  # the largest N_h d
        self.q = SuperLinear(max_dim, inner)
        self.k = SuperLinear(max_dim, inner)
        self.v = SuperLinear(max_dim, inner)
        self.proj = SuperLinear(inner, max_dim)
        self.rel_k = None
        self.rel_v = None
        if max_rel:
            tables = dict(head_dim=head_dim, grid=grid, max_rel=max_rel)
            self.rel_k = RelativePosition2D(**tables)
            self.rel_v = RelativePosition2D(**tables)

    def heads(self, t, num_heads):  # (B, N+1, N_h d) -> (B, N_h, N+1, d)
        B, tokens, _ = t.shape
        return t.view(B, tokens, num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x, *, num_heads):  # x (B, N+1, C)
        B, tokens, C = x.shape
        # the first N_h d units of each projection: the heads beyond N_h are not computed
        inner = num_heads * self.head_dim
        q = self.heads(self.q(x, inner), num_heads)
        k = self.heads(self.k(x, inner), num_heads)
        v = self.heads(self.v(x, inner), num_heads)
        if self.rel_k is None:
            out = attend(q, k, v)
        else:
            out = attend(q, k, v, self.rel_k(), self.rel_v())
        out = out.transpose(1, 2).reshape(B, tokens, inner)  # (B, N+1, N_h d)
        return self.proj(out, C)  # (B, N+1, C)

# %% [markdown]
# ## 3. The supernet (sec. 3.1-3.2)
# A block is pre-norm, $x + \mathrm{MSA}(\mathrm{LN}(x))$ then $x + \mathrm{MLP}(\mathrm{LN}(x))$,
# with every layer entangled: the MLP is $W_2[{:}C, {:}M]\ \mathrm{GELU}(W_1[{:}M, {:}C]\,x)$ with
# $M = \mathrm{round}(rC)$. A subnet chooses $N_h$ and $r$ per block.

# %%
def mlp_hidden_dim(ratio, dim):
    """M = round(r C), the MLP's hidden width."""
    return int(round(ratio * dim))


class SuperBlock(nn.Module):
    """Pre-norm block, all entangled: LN[:C], attention, W_1[:M, :C], W_2[:C, :M]."""

    def __init__(self, *, max_dim, max_heads, head_dim, max_hidden, grid, max_rel):
        super().__init__()
        self.norm1 = SuperLayerNorm(max_dim)
        self.norm2 = SuperLayerNorm(max_dim)
        self.attn = SuperAttention(max_dim=max_dim, max_heads=max_heads,
                                   head_dim=head_dim, grid=grid, max_rel=max_rel)
        self.fc1 = SuperLinear(max_dim, max_hidden)
        self.fc2 = SuperLinear(max_hidden, max_dim)

    def forward(self, x, *, num_heads, mlp_hidden):  # x (B, N+1, C)
        C = x.shape[-1]
        x = x + self.attn(self.norm1(x), num_heads=num_heads)
        hidden = F.gelu(self.fc1(self.norm2(x), mlp_hidden))  # (B, N+1, M)
        return x + self.fc2(hidden, C)

# %% [markdown]
# **The search space** (paper Table 1): one embedding width $C$ and one depth $L$ per network;
# $N_h$ and $r$ per block. A subnet is a plain dict, its *config*:
# `{"embed_dim": C, "depth": L, "num_heads": (N_h per block), "mlp_ratio": (r per block)}`.
# `check` turns a config outside the space into a clear error instead of a silent wrong slice.
# Without it, a config asking for more heads than the supernet holds would not fail: the
# slice `W[:N_h d]` would silently stop at the weight's edge and the reshape would break later
# with an unhelpful message, or worse, a ratio not in the space would still run.

# %%
@dataclass(frozen=True)
class SearchSpace:
    """The choices of Table 1; the head width d is fixed.

    embed_dims: the widths C; depths: the depths L; num_heads: N_h per block; mlp_ratios: r
    per block; head_dim: d. Frozen, so a space can be a default argument and a dict key.
    """
    embed_dims: tuple
    depths: tuple
    num_heads: tuple
    mlp_ratios: tuple
    head_dim: int

    def check(self, c):
        """ValueError, saying what is allowed, unless config `c` belongs to the space."""
        ok = c["embed_dim"] in self.embed_dims and c["depth"] in self.depths
        ok = ok and len(c["num_heads"]) == len(c["mlp_ratio"]) == c["depth"]
        ok = ok and set(c["num_heads"]) <= set(self.num_heads)
        ok = ok and set(c["mlp_ratio"]) <= set(self.mlp_ratios)
        if not ok:
            raise ValueError(f"{c} is not in the search space {self} (one C and one "
                             f"depth L; L heads and L MLP ratios)")

# %% [markdown]
# **Initial values** as in the official code: linear weights truncated-normal with standard
# deviation 0.02 and zero biases, LayerNorms 1 and 0, class token and position embeddings
# truncated-normal too. The patch embedding keeps PyTorch's default (official as well).

# %%
def init_vit(model):
    """trunc_normal(0.02) linear weights, zero biases, LayerNorm 1 and 0.

    Small weights make every attention row start nearly uniform and every residual branch
    start small, so a deep ViT begins close to the identity plus an average over tokens.
    The supernet, the classic baseline and every plain ViT start from the same rule.
    """
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def token_param(*shape):
    """A class token or position embedding: trunc_normal(0.02)."""
    return nn.Parameter(nn.init.trunc_normal_(torch.empty(*shape), std=0.02))

# %% [markdown]
# **The supernet** holds the largest of everything: a $p \times p$ patch embedding to the largest
# $C$, the class token and $N + 1$ position embeddings, the largest depth of blocks, a final
# LayerNorm and the classifier. A subnet of width $C$ and depth $L$ runs the first $L$ blocks
# on the first $C$ channels of every token. Two ends are separate methods because the fast
# scorer (the "Optional: speed" section) calls them: `embed` (images to tokens) and `classify`
# (tokens to logits: the final norm, the **mean of the patch tokens**, the official `--gp`,
# then $W_{head}[:, {:}C]$; the class token is kept in the sequence but not read).
#
# Token by token, a subnet of width $C$ sees exactly what a plain ViT of width $C$ would: the
# first $C$ patch-embedding filters, the first $C$ entries of the class token and of each
# position embedding. That is what makes extraction (section 4) exact.

# %%
class SuperViT(nn.Module):
    """The AutoFormer supernet: forward(x, config) runs subnet `config` on the leading slices
    of the largest weights.

    space: the SearchSpace (its largest choices size every weight); image_size, patch_size:
    H = W and p; max_rel: R, or 0 for no relative positions. A config outside `space` raises
    ValueError.
    """

    def __init__(self, space, *, image_size, patch_size, num_classes, max_rel):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} must be divisible by patch size "
                             f"{patch_size}")
        self.space = space
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.max_rel = max_rel
        C = max(space.embed_dims)
        grid = image_size // patch_size
        self.n_tokens = grid * grid + 1  # N + 1
        hidden = max(mlp_hidden_dim(max(space.mlp_ratios), c) for c in space.embed_dims)
        self.patch_embed = nn.Conv2d(3, C, patch_size, stride=patch_size)  # RGB images
        self.cls_token = token_param(1, 1, C)
        self.pos_embed = token_param(1, self.n_tokens, C)
        block = dict(max_dim=C, max_heads=max(space.num_heads), head_dim=space.head_dim,
                     max_hidden=hidden, grid=grid, max_rel=max_rel)
        blocks = [SuperBlock(**block) for _ in range(max(space.depths))]
        self.blocks = nn.ModuleList(blocks)
        self.norm = SuperLayerNorm(C)
        self.head = SuperLinear(C, num_classes)
        init_vit(self)

    def embed(self, x, C):  # images (B, 3, H, W) -> tokens (B, N+1, C)
        w = self.patch_embed.weight[:C]  # (C, 3, p, p): the first C filters
        b = self.patch_embed.bias[:C]
        x = F.conv2d(x, w, b, stride=self.patch_size)  # (B, C, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, C)
        cls = self.cls_token[..., :C].expand(len(x), -1, -1)  # (B, 1, C)
        return torch.cat([cls, x], 1) + self.pos_embed[..., :C]

    def classify(self, x):  # tokens (B, N+1, C) -> logits (B, classes)
        # LN[:C], then the mean over the N patch tokens (index 0 is the class token)
        return self.head(self.norm(x)[:, 1:].mean(1))  # mean of the N patch tokens

    def forward(self, x, config):
        # fail loudly on a config outside the space: a slice would silently stop at the edge
        self.space.check(config)
        C = config["embed_dim"]
        x = self.embed(x, C)
        choices = zip(config["num_heads"], config["mlp_ratio"])
        for blk, (h, r) in zip(self.blocks, choices):  # the first L blocks
            x = blk(x, num_heads=h, mlp_hidden=mlp_hidden_dim(r, C))
        return self.classify(x)

# %% [markdown]
# **A parameter count in closed form.** The search keeps only subnets whose size lies in a
# range, and it asks about thousands of them; building each model to count its parameters would
# cost more than the search. A subnet's count follows from its config alone, as a sum over its
# parts. One block of width $C$ with $N_h$ heads ($I = N_h d$) and MLP width $M$ holds
# $$\underbrace{4C}_{\text{2 LayerNorms}}
#   + \underbrace{3(CI + I)}_{W_Q, W_K, W_V} + \underbrace{IC + C}_{W_O}
#   + \underbrace{4(2R + 2)\,d}_{\text{tables}} + \underbrace{(CM + M) + (MC + C)}_{\text{MLP}}$$
# and the network adds the patch embedding $3p^2C + C$, the class token and positions
# $(1 + N + 1)\,C$, the final LayerNorm $2C$ and the classifier $C \cdot \text{classes} +
# \text{classes}$. A test checks the sum against the extracted model's real count.
# The tables are the only part that does not grow with $C$ or $N_h$: the head width $d$ is
# fixed, so every block carries the same $4(2R + 2)d$ table entries.

# %%
def block_params(C, num_heads, M, head_dim, max_rel):
    """Parameters of one block of a subnet, part by part."""
    inner = num_heads * head_dim  # I = N_h d
    norms = 2 * 2 * C  # two LayerNorms: gamma and beta
    qkv = 3 * (C * inner + inner)  # W_Q, W_K, W_V and their biases
    proj = inner * C + C  # W_O and its bias
    tables = 0
    if max_rel:
        tables = 4 * (2 * max_rel + 2) * head_dim  # E_row, E_col for keys and for values
    mlp = (C * M + M) + (M * C + C)  # W_1 and W_2 with their biases
    return norms + qkv + proj + tables + mlp


def subnet_params(supernet, config):
    """Parameters of the standalone subnet (extract_subnet), from the config alone. A test
    checks it against the extracted model's count for many configs and spaces."""
    C = config["embed_dim"]
    classes = supernet.num_classes
    patch_embed = 3 * supernet.patch_size ** 2 * C + C  # conv kernel and bias
    tokens = C + supernet.n_tokens * C  # class token, N + 1 position embeddings
    final_norm = 2 * C
    head = C * classes + classes
    blocks = 0
    for h, r in zip(config["num_heads"], config["mlp_ratio"]):
        M = mlp_hidden_dim(r, C)
        blocks += block_params(C, h, M, supernet.space.head_dim, supernet.max_rel)
    return patch_embed + tokens + final_norm + head + blocks

# %% [markdown]
# ## 4. Subnets: a plain ViT, sampling, extraction
# A searched subnet leaves the supernet as an ordinary Vision Transformer whose blocks may differ
# in heads and MLP width. The next three cells are that ViT in its plainest form: they share
# `attend` and `RelativePosition2D` with the supernet, and use `nn.Linear` and `nn.LayerNorm`
# at their real sizes. The parameter names match the supernet's, so extraction is a copy by name.
# This is also the model a student would copy into another project: it needs none of the
# supernet's machinery, only the config that the search returned.

# %%
class Attention(nn.Module):
    """Plain multi-head self-attention: N_h heads of width d (N_h d units in q, k, v)."""

    def __init__(self, *, dim, num_heads, head_dim, grid, max_rel):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.q = nn.Linear(dim, num_heads * head_dim)
        self.k = nn.Linear(dim, num_heads * head_dim)
        self.v = nn.Linear(dim, num_heads * head_dim)
        self.proj = nn.Linear(num_heads * head_dim, dim)
        self.rel_k = None
        self.rel_v = None
        if max_rel:
            tables = dict(head_dim=head_dim, grid=grid, max_rel=max_rel)
            self.rel_k = RelativePosition2D(**tables)
            self.rel_v = RelativePosition2D(**tables)

    def heads(self, t):  # (B, N+1, N_h d) -> (B, N_h, N+1, d)
        B, tokens, _ = t.shape
        return t.view(B, tokens, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x):  # (B, N+1, C)
        B, tokens, _ = x.shape
        q = self.heads(self.q(x))
        k = self.heads(self.k(x))
        v = self.heads(self.v(x))
        if self.rel_k is None:
            out = attend(q, k, v)
        else:
            out = attend(q, k, v, self.rel_k(), self.rel_v())
        return self.proj(out.transpose(1, 2).reshape(B, tokens, -1))  # (B, N+1, C)

# %% [markdown]
# The block and the network, as in any ViT, except that each block has its own $N_h$ and $M$.

# %%
class Block(nn.Module):
    """Pre-norm transformer block: x + MSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, *, dim, num_heads, head_dim, mlp_hidden, grid, max_rel):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn = Attention(dim=dim, num_heads=num_heads, head_dim=head_dim, grid=grid,
                              max_rel=max_rel)
        self.fc1 = nn.Linear(dim, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, dim)

    def forward(self, x):  # (B, N+1, C)
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))

# %%
class ViT(nn.Module):
    """A plain ViT whose blocks may differ in heads and MLP width: what a subnet is.

    num_heads and mlp_hidden are per-block sequences (N_h and M of each block); their length
    is the depth L. The head reads the mean of the patch tokens, as in the supernet.
    """

    def __init__(self, *, image_size, patch_size, num_classes, embed_dim, num_heads,
                 mlp_hidden, head_dim, max_rel):
        super().__init__()
        grid = image_size // patch_size
        self.patch_embed = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)
        self.cls_token = token_param(1, 1, embed_dim)
        self.pos_embed = token_param(1, grid * grid + 1, embed_dim)
        shared = dict(dim=embed_dim, head_dim=head_dim, grid=grid, max_rel=max_rel)
        blocks = [Block(num_heads=h, mlp_hidden=m, **shared)
                  for h, m in zip(num_heads, mlp_hidden)]
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        init_vit(self)

    def forward(self, x):  # (B, 3, H, W)
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, C)
        cls = self.cls_token.expand(len(x), -1, -1)  # (B, 1, C)
        x = torch.cat([cls, x], 1) + self.pos_embed  # (B, N+1, C)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 1:].mean(1))  # (B, classes)

# %% [markdown]
# **Sampling** (sec. 3.2): each training step of the supernet trains one subnet drawn uniformly:
# $C$ and $L$ first, then $N_h$ and $r$ for each of the $L$ blocks. The smallest and the largest
# subnet take the smallest (largest) choice everywhere.
# Uniform sampling over genes is not uniform over parameter counts: deep, wide subnets are
# rare among the samples of a large space, and the first blocks are trained by every step while
# the last block only by the steps that sample the largest depth. Both shape what the supernet
# knows well, and so how well it ranks subnets at the edges of the space.

# %%
def sample_config(space, rng):
    """A random subnet as training samples it; rng: a seeded random.Random, so that the
    same seed gives the same sequence of subnets (the entangled and the classic supernet of
    a seed train the same subnet at every step)."""
    C = rng.choice(space.embed_dims)
    L = rng.choice(space.depths)
    heads = tuple(rng.choice(space.num_heads) for _ in range(L))
    ratios = tuple(rng.choice(space.mlp_ratios) for _ in range(L))
    return {"embed_dim": C, "depth": L, "num_heads": heads, "mlp_ratio": ratios}


def largest_config(space, pick=max):
    """The largest subnet; pick=min gives the smallest."""
    L = pick(space.depths)
    heads = (pick(space.num_heads),) * L
    ratios = (pick(space.mlp_ratios),) * L
    return {"embed_dim": pick(space.embed_dims), "depth": L, "num_heads": heads,
            "mlp_ratio": ratios}


def smallest_config(space):
    return largest_config(space, pick=min)

# %% [markdown]
# **Listing a space.** A small space can be listed whole: every $C$, every depth, and for a
# depth $L$ every sequence of $L$ block choices $(N_h, r)$. The lab scores every subnet of such a
# sub-space once (a *table*, as in the NAS benchmarks) and replays searches on it. A config is a
# dict; `config_key` makes it a tuple, to index tables and archives.
# Replaying on a table costs one scoring pass per subnet, after which every search run is free:
# a hundred runs of each method take a second, and the optimum of the table is known, so a
# search can be judged by its regret instead of by a noisy test score.

# %%
def all_configs(space):
    """Every config of `space`: by C, then depth, then the blocks' choices."""
    genes = list(itertools.product(space.num_heads, space.mlp_ratios))  # one block's choices
    configs = []
    for C in space.embed_dims:
        for L in space.depths:
            for blocks in itertools.product(genes, repeat=L):  # (N_h, r) per block
                heads = tuple(h for h, _ in blocks)
                ratios = tuple(r for _, r in blocks)
                configs.append({"embed_dim": C, "depth": L, "num_heads": heads,
                                "mlp_ratio": ratios})
    return configs


def make_config(C, heads, ratios):
    """A config from its genes: C, then N_h and r per block."""
    return {"embed_dim": C, "depth": len(heads), "num_heads": tuple(heads),
            "mlp_ratio": tuple(ratios)}


def config_key(c):
    """A config as a hashable tuple."""
    return (c["embed_dim"], c["depth"], tuple(c["num_heads"]), tuple(c["mlp_ratio"]))


def config_from_key(key):
    names = ("embed_dim", "depth", "num_heads", "mlp_ratio")
    return dict(zip(names, key))


def config_str(c):
    heads = "".join(map(str, c["num_heads"]))
    ratios = ",".join(f"{r:g}" for r in c["mlp_ratio"])
    return f"C={c['embed_dim']} L={c['depth']} heads={heads} mlp={ratios}"

# %% [markdown]
# **Extraction.** A subnet becomes a standalone ViT holding **copies** of its slices: each of its
# parameters is the leading slice, in every dimension, of the supernet's parameter with the same
# name (`blocks.2.attn.q.weight` of shape $(N_h d, C)$ is the supernet's
# `blocks.2.attn.q.weight[:N_h d, :C]`). So `extract_subnet(sn, c)(x)` equals `sn(x, c)`. The
# lab uses it to retrain a subnet from its slice of the supernet's *initial* weights.
# Exercise 3 asks you to write it yourself; the test that grades it compares your subnet with
# the supernet on several spaces.
#
# Two tests hold extraction to the paper's rule from two sides. One gathers every subnet weight
# with explicit index lists, written from the rule and not from this code, and compares. The
# other trains the supernet one step on one subnet and checks that the gradient touched only
# that subnet's corners: the entries outside them must stay exactly as they were.

# %%
def build_subnet(supernet, config):
    """A freshly initialised plain ViT with the architecture of `config`."""
    C = config["embed_dim"]
    hidden = [mlp_hidden_dim(r, C) for r in config["mlp_ratio"]]
    vit = ViT(image_size=supernet.image_size, patch_size=supernet.patch_size,
              num_classes=supernet.num_classes, embed_dim=C,
              num_heads=config["num_heads"], head_dim=supernet.space.head_dim,
              mlp_hidden=hidden, max_rel=supernet.max_rel)
    return vit.to(supernet.head.weight.device)


@torch.no_grad()
def extract_subnet(supernet, config):
    """A standalone ViT holding copies of the slices `config` uses.

    Every parameter and buffer of the plain ViT has a namesake in the supernet; its value is
    that tensor's leading slice in every dimension. The copy shares no storage with the
    supernet, so training it leaves the supernet as it was.
    """
    supernet.space.check(config)
    vit = build_subnet(supernet, config)
    source = supernet.state_dict()
    for name, t in vit.state_dict().items():
        leading = tuple(slice(0, n) for n in t.shape)  # [:n0, :n1, ...]
        t.copy_(source[name][leading])
    return vit

# %% [markdown]
# **How large is the space?** The `--quick` space below: $C \in \{16, 32, 48\}$, 1 to 3 blocks,
# $N_h \in \{1, 2, 3\}$ and $r \in \{1, 2, 4\}$ per block, on $24 \times 24$ images in $4 \times 4$
# patches (36 patches). Its table (the sub-space the search is replayed on) has 2 or 3 blocks
# and all heads but two MLP ratios per block.
# The demo counts every subnet's parameters from the closed form: for a depth $L$, the counts of
# all $9^L$ block sequences are a sum over an $L$-dimensional grid of one block's 9 counts.
# Most subnets are deep: there are $9^3$ three-block sequences and only 9 one-block ones for
# each width, so the histogram's mass sits with the deep subnets of each width.

# %%
QUICK_SPACE = SearchSpace((16, 32, 48), (1, 2, 3), (1, 2, 3), (1.0, 2.0, 4.0), 16)
QUICK_TABLE = SearchSpace((16, 32, 48), (2, 3), (1, 2, 3), (1.0, 4.0), 16)
QUICK_IMAGE = dict(image_size=24, patch_size=4, num_classes=10, max_rel=14)


def space_param_counts(space=QUICK_SPACE, max_rel=14):
    """The parameter count of every subnet of `space` (--quick images), an array."""
    sn = SuperViT(space, **{**QUICK_IMAGE, "max_rel": max_rel})
    counts = []
    for C in space.embed_dims:
        stem = subnet_params(sn, {"embed_dim": C, "num_heads": (), "mlp_ratio": ()})
        choices = itertools.product(space.num_heads, space.mlp_ratios)  # one block's 9
        one_block = []
        for h, r in choices:
            M = mlp_hidden_dim(r, C)
            one_block.append(block_params(C, h, M, space.head_dim, max_rel))
        one_block = np.array(one_block)
        for L in space.depths:
            grid = np.ix_(*[one_block] * L)  # L broadcastable axes of 9 counts each
            counts.append(stem + sum(grid).ravel())  # every sequence of L blocks
    return np.concatenate(counts)


def demo_space_params(space=QUICK_SPACE, max_rel=14, param_range=(0.35, 0.70)):
    """How large is the space? A histogram of every subnet's parameter count, with the range
    the search keeps (fractions of the way from the smallest to the largest subnet)."""
    from matplotlib.figure import Figure
    counts = space_param_counts(space, max_rel)
    span = counts.max() - counts.min()
    lo = counts.min() + param_range[0] * span
    hi = counts.min() + param_range[1] * span
    inside = float(np.mean((counts >= lo) & (counts <= hi)))
    small = counts.min() / 1e3
    large = counts.max() / 1e3
    print(f"  {len(counts):,} subnets of {small:.1f}k..{large:.1f}k parameters; "
          f"{100 * inside:.0f}% in the search's range {lo / 1e3:.0f}k..{hi / 1e3:.0f}k")
    fig = Figure(figsize=(6, 3.4))
    ax = fig.add_subplot()
    ax.hist(counts / 1e3, bins=60)
    ax.axvspan(lo / 1e3, hi / 1e3, color="C1", alpha=0.2,
               label="the search's parameter range")
    ax.set(xlabel="subnet parameters (k)", ylabel="subnets",
           title=f"{len(counts):,} subnets")
    ax.legend()
    utils.show(fig, "demo_space_params")
    return {"n_subnets": int(len(counts)), "min": int(counts.min()),
            "max": int(counts.max()), "share_in_range": inside}


if utils.in_notebook():
    demo_space_params()

# %% [markdown]
# **The baseline: classic weight sharing** (Fig. 2, left). Same space, no entanglement: every
# choice owns its weights. Per $C$ a patch embedding, tokens, final norm and head; per block and
# per $(C, N_h)$ a LayerNorm + attention; per block and per $(C, r)$ a LayerNorm + MLP. A step
# trains only the modules its subnet picked, so each module sees a fraction of the steps. The
# paper's Fig. 3/4 compares the two at equal training; the lab's `entangle` experiment does too.
# Its parameter count is several times the entangled supernet's: every width has its own copy
# of every choice. The paper's argument is that the copies, each trained by a fraction of the
# steps, stay undertrained, while entangled weights are trained by every step that uses them.

# %%
class ClassicSuperViT(nn.Module):
    """Own weights per choice; forward(x, config) runs the modules `config` picks.

    Same space, same init rules and the same plain layers (`Attention`) as the entangled
    supernet; a module is named by its choice, e.g. attn[2]["e48_h4"] is block 2's attention
    for C = 48 and 4 heads.
    """

    def __init__(self, space, *, image_size, patch_size, num_classes, max_rel):
        super().__init__()
        self.space = space
        grid = image_size // patch_size
        self.patch_embed = nn.ModuleDict()
        self.cls_token = nn.ParameterDict()
        self.pos_embed = nn.ParameterDict()
        self.norm = nn.ModuleDict()
        self.head = nn.ModuleDict()
        for C in space.embed_dims:  # the stem and the head of each width
            self.patch_embed[f"e{C}"] = nn.Conv2d(3, C, patch_size, stride=patch_size)
            self.cls_token[f"e{C}"] = token_param(1, 1, C)
            self.pos_embed[f"e{C}"] = token_param(1, grid * grid + 1, C)
            self.norm[f"e{C}"] = nn.LayerNorm(C)
            self.head[f"e{C}"] = nn.Linear(C, num_classes)
        depth = max(space.depths)
        attn = [self.attention_choices(grid, max_rel) for _ in range(depth)]
        self.attn = nn.ModuleList(attn)
        self.mlp = nn.ModuleList(self.mlp_choices() for _ in range(depth))
        init_vit(self)

    def attention_choices(self, grid, max_rel):  # one block's LayerNorm + MSA per (C, N_h)
        choices = nn.ModuleDict()
        for C, h in itertools.product(self.space.embed_dims, self.space.num_heads):
            msa = Attention(dim=C, num_heads=h, head_dim=self.space.head_dim, grid=grid,
                            max_rel=max_rel)
            choices[f"e{C}_h{h}"] = nn.Sequential(nn.LayerNorm(C), msa)
        return choices

    def mlp_choices(self):  # one block's LayerNorm + MLP per (C, r)
        choices = nn.ModuleDict()
        ratios = enumerate(self.space.mlp_ratios)  # r by its index: keys may not contain "."
        for C, (i, r) in itertools.product(self.space.embed_dims, ratios):
            M = mlp_hidden_dim(r, C)
            mlp = [nn.LayerNorm(C), nn.Linear(C, M), nn.GELU(), nn.Linear(M, C)]
            choices[f"e{C}_r{i}"] = nn.Sequential(*mlp)
        return choices

    def forward(self, x, config):
        e = f"e{config['embed_dim']}"
        x = self.patch_embed[e](x).flatten(2).transpose(1, 2)  # (B, N, C)
        cls = self.cls_token[e].expand(len(x), -1, -1)
        x = torch.cat([cls, x], 1) + self.pos_embed[e]  # (B, N+1, C)
        for i, (h, r) in enumerate(zip(config["num_heads"], config["mlp_ratio"])):
            x = x + self.attn[i][f"{e}_h{h}"](x)
            x = x + self.mlp[i][f"{e}_r{self.space.mlp_ratios.index(r)}"](x)
        return self.head[e](self.norm[e](x)[:, 1:].mean(1))

# %% [markdown]
# ## 5. Evolutionary search (sec. 3.3)
# Find $\arg\max_s \mathrm{fitness}(s;\ W[s])$ over the subnets $s$ whose parameter count lies in
# a range, each scored with the weights $W[s]$ it inherits. Evolution starts from a random
# population; each generation keeps the top-$k$ of everything scored so far as parents and makes
# children by **mutation** and **crossover**. Random search, the baseline, scores random subnets.
# Both are judged by their **regret** after $n$ evaluations: the best fitness in the space minus
# the best they have scored so far.
# Regret is zero once the search has scored the optimum; a search that never reaches it ends
# with the gap between the optimum and its best find. The parameter range is the paper's
# constraint (its Tiny, Small and Base models are searched under three parameter budgets).
#
# **Mutation** re-draws a network-level gene ($L$, and $C$) with probability $P_d$, then each
# block's $N_h$ and each block's $r$ with probability $P_m$. A deeper child gets random new
# blocks; a shallower one drops its last blocks.

# %%
def mutate(config, space, rng, *, p_depth, p_layer):
    """A child of `config`: depth and C re-drawn with probability Pd, then each block's N_h
    and each block's r with probability Pm. A re-drawn gene may come back unchanged (it is
    drawn from all its values), so a gene with c choices changes with probability P(1 - 1/c).
    """
    L = config["depth"]
    heads = list(config["num_heads"])
    ratios = list(config["mlp_ratio"])
    if rng.random() < p_depth:
        L = rng.choice(space.depths)
        while len(heads) < L:  # new blocks are random
            heads.append(rng.choice(space.num_heads))
            ratios.append(rng.choice(space.mlp_ratios))
        heads = heads[:L]
        ratios = ratios[:L]
    # C is a network-level gene like depth (the official code re-draws both with one probability)
    C = config["embed_dim"]
    if rng.random() < p_depth:
        C = rng.choice(space.embed_dims)
    for i in range(L):
        if rng.random() < p_layer:
            heads[i] = rng.choice(space.num_heads)
        if rng.random() < p_layer:
            ratios[i] = rng.choice(space.mlp_ratios)
    return make_config(C, heads, ratios)

# %% [markdown]
# **Crossover** takes each gene from one of two parents, drawn independently: $C$, the depth, and
# each block's $N_h$ and $r$. A block that only the deeper parent has comes from that parent.

# %%
def crossover(a, b, rng):
    """A child whose every gene is one of its parents' values at that position. Each gene is
    drawn independently, so a child mixes both parents in most of its genes."""
    L = rng.choice((a["depth"], b["depth"]))
    heads = []
    ratios = []
    for i in range(L):
        donors = [p for p in (a, b) if i < p["depth"]]  # parents that have block i
        heads.append(rng.choice(donors)["num_heads"][i])
        ratios.append(rng.choice(donors)["mlp_ratio"][i])
    C = rng.choice((a["embed_dim"], b["embed_dim"]))
    return make_config(C, heads, ratios)

# %% [markdown]
# **The archive** is the search's memory: every subnet scored so far, in the order it was
# scored, with its fitness. It scores a subnet at most once (a search often proposes the same
# child twice) and never scores one outside the parameter range (the constraint is checked
# first, from the closed-form count). From it come the parents (`top`), the regret curve
# (`best_so_far`), and a random fill when evolution runs out of new children.
# An evaluation in the paper's search costs a pass over the validation set, so "subnets
# scored" is the honest measure of a search's cost, and the archive counts exactly that.

# %%
class Archive(dict):
    """config_key -> (fitness, config) of every subnet scored so far, in order.

    A dict keeps insertion order, so the n-th entry is the n-th evaluation: `best_so_far`
    reads the search's history from it without a separate log.
    """

    def __init__(self, fitness, constraint):
        super().__init__()
        self.fitness = fitness
        self.constraint = constraint

    def offer(self, config):
        """Score `config` unless it was scored already or lies outside the constraint.
        The constraint comes first: an out-of-range subnet costs nothing."""
        if config_key(config) not in self and self.constraint(config):
            self[config_key(config)] = (self.fitness(config), config)

    def top(self, k):
        """The k configs of highest fitness: the parents."""
        ranked = sorted(self.values(), key=lambda fc: -fc[0])
        return [c for _, c in ranked[:k]]

    def best_so_far(self):
        """[max fitness of the first n scored subnets for n = 1, 2, ...]."""
        return np.maximum.accumulate([f for f, _ in self.values()]).tolist()

    def fill(self, space, rng, goal, max_tries=100000):
        """Offer random subnets until `goal` are scored."""
        for _ in range(max_tries):
            if len(self) >= goal:
                return self
            self.offer(sample_config(space, rng))
        raise utils.InputError(f"found only {len(self)} distinct subnets in the "
                               f"parameter range, fewer than {goal}: lower --budget or "
                               f"widen --param-range")

# %% [markdown]
# **The two searches.** Evolution: `population` random subnets, then per generation, from the
# top `parents` so far, `population / 2` children by mutation and the rest by crossover, until
# `budget` subnets are scored. Random search draws `budget` distinct subnets in range.
# With a population of 10 and top-5 parents, the first 10 evaluations of both searches are
# the same kind of random draws; evolution can only pull ahead after that.

# %%
def evolution_search(fitness, space, *, constraint, budget, population, parents, p_depth,
                     p_layer, rng, max_tries=100):
    """Sec. 3.3 -> the Archive of every subnet scored, in order.

    fitness(config) -> float, higher is better; constraint(config) -> bool; budget: subnets to
    score; population, parents: per generation, the children made and the top-k they come
    from; p_depth, p_layer: Pd and Pm of `mutate`. Only new children in range count; random
    subnets fill up a generation if the neighbourhood runs dry (after max_tries per child).
    """
    arch = Archive(fitness, constraint).fill(space, rng, min(population, budget))
    while len(arch) < budget:
        top = arch.top(parents)
        goal = min(len(arch) + population, budget)
        n_mutants = len(arch) + population // 2
        tries = 0
        while len(arch) < goal and tries < max_tries * population:
            tries += 1
            if len(arch) < n_mutants:
                parent = rng.choice(top)
                child = mutate(parent, space, rng, p_depth=p_depth, p_layer=p_layer)
            else:
                child = crossover(rng.choice(top), rng.choice(top), rng)
            arch.offer(child)
        arch.fill(space, rng, goal)
    return arch


def random_search(fitness, space, *, constraint, budget, rng):
    """The baseline: `budget` distinct random subnets in range."""
    return Archive(fitness, constraint).fill(space, rng, budget)

# %% [markdown]
# **The constraint.** A subnet is in range when its parameter count lies between two fractions of
# the way from the space's smallest to its largest subnet. A search asks about the same subnet
# many times, so the answer is remembered.

# %%
def in_range(supernet, fractions):
    """The search's constraint, a function config -> bool (its bounds in .bounds).
    fractions: (lo, hi), e.g. (0.35, 0.70): from 35% to 70% of the way between the sizes of
    the smallest and the largest subnet."""
    lo = subnet_params(supernet, smallest_config(supernet.space))
    hi = subnet_params(supernet, largest_config(supernet.space))
    bounds = (lo + fractions[0] * (hi - lo), lo + fractions[1] * (hi - lo))
    known = {}

    def ok(config):
        key = config_key(config)
        if key not in known:
            known[key] = bounds[0] <= subnet_params(supernet, config) <= bounds[1]
        return known[key]
    ok.bounds = bounds
    return ok

# %% [markdown]
# **The fitness.** Each subnet is scored with its inherited weights on the validation images;
# the lab's fitness is **minus the mean validation NLL** (higher is better), from per-image
# scores. The official code ranks by top-1 accuracy; the lab's runs show accuracy on 1,000
# validation images too coarse to order close subnets (RESULTS.md). The sign matters: a search
# maximises the fitness, and a test checks that it ends at the known best subnet of a table and
# fails when the sign is flipped.
# NLL is a better fitness than accuracy here for a plain reason: accuracy on 1,000 images moves
# in steps of 0.1 points and is noisy at the level that separates close subnets, while the mean
# NLL uses the probability of every image and is far less noisy for the same images.

# %%
def fitness_from_scores(per_image):
    """{config_key: fitness} from {config_key: (correct (V,), nll (V,))}: minus the mean
    validation NLL, so that the best subnet has the highest fitness."""
    fitness = {}
    for key, (_, nll) in per_image.items():
        # one number per subnet: every validation image counts equally; the minus sign
        # turns "lower NLL is better" into "higher fitness is better", as the search wants
        fitness[key] = -nll.double().mean().item()
    return fitness

# %% [markdown]
# **Replaying searches on a table.** Given a table {config: fitness} of a whole sub-space, both
# searches run `runs` times; each run's regret curve and pick are kept. The optimum is known:
# the table's best in-range subnet.
# Each run has its own seeded generator, named by seed, method and run (a string seed gives
# the same draws on any machine), so a rerun replays every search exactly.

# %%
def search_curves(table, space, *, constraint, budget, runs, seed, **evolution):
    """{method: (regret (runs, budget) array, [each run's pick])} on a table
    {config_key: fitness} (higher is better). `evolution`: the keyword arguments of
    evolution_search (population, parents, p_depth, p_layer)."""
    best = max(f for k, f in table.items() if constraint(config_from_key(k)))

    def fitness(c):
        return table[config_key(c)]
    out = {}
    for method in ("evolution", "random"):
        regret = []
        picks = []
        for r in range(runs):
            rng = random.Random(f"{seed}/{method}/{r}")  # a string seed: any machine
            kw = dict(constraint=constraint, budget=budget, rng=rng)
            if method == "evolution":
                arch = evolution_search(fitness, space, **kw, **evolution)
            else:
                arch = random_search(fitness, space, **kw)
            regret.append(best - np.array(arch.best_so_far()))
            picks.append(arch.top(1)[0])
        out[method] = (np.stack(regret), picks)
    return out

# %% [markdown]
# **Does evolution beat random search?** On a synthetic table whose optimum is known, with no
# supernet and no data: the `--quick` table's subnets, each with a fitness that is a sum of a
# random effect per gene plus a smaller random effect per subnet. Genes that help add up, so a
# search that recombines good genes should find the optimum sooner than random draws.
# This demo is a check of the search code, not of the paper's claim: the real question, taken
# up by the lab, is whether a supernet's inherited scores have such structure at all.

# %%
def synthetic_table(configs, seed=0):
    """{config_key: fitness}: a random effect per gene value (per position) plus 0.3 x a random
    effect per subnet.

    A gene is (C), (L) or (block i, (N_h, r)); its effect is drawn once, the first time a
    subnet has it, so subnets that share genes share their effects, as neighbouring subnets of
    a real supernet would share most of their weights.
    """
    g = random.Random(seed)
    effect = {}
    table = {}
    for c in configs:
        genes = [("C", c["embed_dim"]), ("L", c["depth"])]
        genes += list(enumerate(zip(c["num_heads"], c["mlp_ratio"])))  # (block, (N_h, r))
        for gene in genes:
            if gene not in effect:
                effect[gene] = g.gauss(0, 1)
        table[config_key(c)] = sum(effect[gene] for gene in genes) + 0.3 * g.gauss(0, 1)
    return table


def demo_search(runs=100, budget=100, p_depth=0.2, p_layer=0.4,
                param_range=(0.35, 0.70)):
    """Evolution vs random search on the synthetic table: regret, mean +- SE."""
    from matplotlib.figure import Figure
    sn = SuperViT(QUICK_SPACE, **QUICK_IMAGE)  # the range is relative to the whole space
    configs = all_configs(QUICK_TABLE)
    ok = in_range(sn, param_range)
    table = synthetic_table(configs)
    curves = search_curves(table, QUICK_TABLE, constraint=ok, budget=budget, runs=runs,
                           seed=0, population=10, parents=5, p_depth=p_depth,
                           p_layer=p_layer)
    res = {}
    parts = []
    for m, (reg, _) in curves.items():
        final = reg[:, -1]  # each run's regret after the whole budget
        res[m] = {"regret": float(final.mean()), "found": float(np.mean(final == 0))}
        parts.append(f"{m} {res[m]['regret']:.3f} ({100 * res[m]['found']:.0f}%)")
    n_in = sum(map(ok, configs))
    print(f"  {n_in} of {len(configs)} subnets in range; after {budget} evaluations, "
          f"mean regret (share of runs that found the optimum): {', '.join(parts)}")
    fig = Figure(figsize=(6, 3.4))
    ax = fig.add_subplot()
    n = np.arange(1, budget + 1)
    for m, (reg, _) in curves.items():
        mu = reg.mean(0)
        se = reg.std(0, ddof=1) / np.sqrt(len(reg))
        ax.plot(n, mu, label=f"{m} search")
        ax.fill_between(n, mu - se, mu + se, alpha=0.3)
    ax.set(xlabel="evaluations (subnets scored)", ylabel="regret (mean ± SE)",
           yscale="symlog", title=f"synthetic table, known optimum, {runs} runs each")
    ax.legend()
    utils.show(fig, "demo_search")
    return res


if utils.in_notebook():
    demo_search()

# %% [markdown]
# ## Optional: speed. Scoring many subnets at once
# The lab scores every subnet of a table on the validation images (hundreds of subnets).
# Subnets with the same $C$ and the same choices in their first blocks compute the same tokens
# there, so the configs form a trie and each shared prefix runs once. The reference is one
# `utils.evaluate(supernet, loader, lambda m, x: m(x, c))` per subnet; a test shows the two agree.
# With six choices per block and two or three blocks, the `--quick` table's 756 configs share
# most of their prefixes, so the walk runs 774 block passes instead of 2,160.
# The scores come back per image, not as means: the fitness, the split-half reliability check
# and the test scores of the picks are all computed from the same per-image tensors.

# %%
def block_choice(c, layer):
    """The (N_h, r) that config c picks for block `layer`."""
    return (c["num_heads"][layer], c["mlp_ratio"][layer])


@torch.no_grad()
def score_configs(supernet, configs, loader):
    """{config_key: (correct (V,) bool, nll (V,))}: per-image scores of subnets with inherited
    weights, walking the trie of shared block prefixes depth-first.

    A node of the trie is (C, the choices of the first `layer` blocks); its tokens are computed
    once and handed to every child. A subnet whose depth is `layer` is scored at that node.
    """
    parts = {config_key(c): ([], []) for c in configs}

    def walk(x, y, group, layer):  # x (B, N+1, C): tokens after `layer` blocks, shared by group
        for c in group:
            if c["depth"] == layer:  # this subnet ends here
                logits = supernet.classify(x).float()  # (B, classes)
                parts[config_key(c)][0].append(logits.argmax(-1) == y)
                nll = F.cross_entropy(logits, y, reduction="none")  # (B,)
                parts[config_key(c)][1].append(nll)
        deeper = [c for c in group if c["depth"] > layer]
        for h, r in sorted({block_choice(c, layer) for c in deeper}):  # a child per choice
            M = mlp_hidden_dim(r, x.shape[-1])
            nxt = supernet.blocks[layer](x, num_heads=h, mlp_hidden=M)
            same = [c for c in deeper if block_choice(c, layer) == (h, r)]
            walk(nxt, y, same, layer + 1)

    for x, y in loader:
        for C in sorted({c["embed_dim"] for c in configs}):
            same = [c for c in configs if c["embed_dim"] == C]
            with utils.autocast(x.device):
                walk(supernet.embed(x, C), y, same, 0)
    return {k: (torch.cat(c), torch.cat(n)) for k, (c, n) in parts.items()}


def summarize(correct, nll):
    """utils.Score(accuracy %, mean NLL) of per-image scores."""
    acc = 100.0 * correct.sum().item() / len(correct)
    return utils.Score(acc, nll.double().mean().item())

# %% [markdown]
# ## What the lab finds
# The lab (below the Exercises) trains these supernets on CIFAR-10, 24 x 24 images, 1,248 steps,
# 4 supernet seeds (`runs/04_autoformer_entangle/RESULTS.md` has the tables and logs):
# - **The premise first.** Trained alone, 8 subnets on a ladder from 5k to 95k parameters span
#   28-39% on validation: capacity matters (largest minus smallest +8.2 points [+5.6, +10.8]),
#   and every subnet of 28k parameters or more beats a linear classifier on pixels (34.0%).
#   The supernet orders the ladder as training alone does: Kendall's $\tau$(inherited, alone)
#   $= +0.66$ [$+0.52$, $+0.80$], an entry check that is met. But it orders sizes, not the
#   subnets among which the search chooses: among those of 30k parameters or more, its order
#   shows no agreement with training alone, and with inherited weights no subnet reaches the
#   linear classifier.
# - **Entanglement** trains every subnet better than classic sharing at the same budget: +6.0
#   points [+5.1, +6.9], 80 of 80 subnets.
# - **The search**, read against the entry checks: evolution finds the best inherited score in
#   95-100% of its runs, but what evolution and random search pick scores the same on test
#   (+0.01 points [$-0.04$, +0.05]), and retraining the chosen subnet beats its inherited
#   weights by 5.3 points [2.9, 7.8]. The search finds the size that helps (all picks have the
#   largest width) and the supernet's own favourite, not the subnet that would train best.

# %% [markdown]
# ## Exercises
# Answers: `solutions/04_autoformer_entangle.py` (one `exercise_<n>()` per exercise; it computes
# the answer and asserts it). Predict first, then check.
#
# 1. **Which operator finds the optimum?** (★, no data, seconds). The official code swaps the
#    paper's probabilities (Pd 0.4, Pm 0.2). Predict how often evolution ends at the synthetic
#    table's optimum with the swap, with no block mutations (`p_layer=0.0`), and with no
#    mutation at all (`p_depth=0.0, p_layer=0.0`: crossover alone). Check: `demo_search(...)`
#    with each setting against `demo_search()`, by the share of runs that find the optimum.
# 2. **Where the tables go** (★, no data, seconds). Predict how many parameters the largest
#    `--quick` subnet loses without relative positions ($R = 0$), from the closed-form count.
#    Check: `space_param_counts(max_rel=0).max()` against `space_param_counts().max()`.
# 3. **Implement extraction** (★★, no data, seconds). Write `my_extract_subnet` below: a plain
#    `ViT` (use `build_subnet`) holding copies of the leading slices of the supernet's
#    parameters. Check: `python -m pytest tests/test_04_autoformer_entangle.py -k implement`
#    compares your subnet with the supernet on several spaces and configs.
# 4. **The search's direction** (★★, no data, seconds). Flip the sign of the synthetic table's
#    fitness and run `evolution_search` on it. Predict where it ends. Check: compare its pick
#    with the table's worst in-range subnet, and say how a test of the lab's fitness would catch
#    such a sign error.
# 5. **Where does the supernet's order hold?** (★★, CIFAR-10, about 2.5 min). Run
#    `r = main(["--quick", "--data", "cifar10", "--experiment", "rank", "--seeds", "1"])`.
#    `r["rank"]["subnets"][0]` lists the ladder's 8 subnets with their parameter counts and
#    their (accuracy, NLL) trained alone and inherited. Compute Kendall's $\tau$ by NLL over the
#    whole ladder, then over the subnets of 30k parameters or more: the sizes among which the
#    search chooses (its range is 37k..68k). Predict which is higher, and say what that means
#    for a search inside the range. Check: the solution's `exercise_5(data_dir)`.

# %%
def my_extract_subnet(supernet, config):
    """Exercise 3: a standalone ViT (build_subnet(supernet, config)) whose every parameter is a
    copy of the leading slice of the supernet's parameter with the same name."""
    raise NotImplementedError("exercise 3: fill in my_extract_subnet")

# %% [markdown]
# ---
# # The lab
# Presets and the command line; one job per supernet, per subnet trained alone, and per linear
# control; then one `exp_*` per claim: `rank` (the premise: does the supernet order subnets as
# training them alone would?), `entangle` (Fig. 3/4), `search` (sec. 3.3) and `inherit`
# (Table 3); the figure and `main`.

# %%
def space_flags(space, table):
    """The flags of a space and of its table (a sub-space scored exhaustively)."""
    flags = dict(vars(space))
    for k, v in vars(table).items():
        if k != "head_dim":
            flags["table_" + k] = v
    return flags


AUTOFORMER_T = SearchSpace((192, 216, 240), (12, 13, 14), (3, 4), (3.5, 4.0), 64)  # Table 1
AUTOFORMER_T_TABLE = SearchSpace((192, 216, 240), (12,), (3, 4), (4.0,), 64)
PRESETS = {  # the full preset: the AutoFormer-T space on 32x32 CIFAR, patch 4
    "quick": dict(train_per_class=1000, val_per_class=100, image_size=24, patch_size=4,
                  batch_size=64, epochs=8, lr=2e-3, seeds=4, probes=20, rank_k=8,
                  rank_spacing="log", budget=100, population=10, parents=5, workers=2,
                  threads=1,
                  experiments=("entangle", "search", "inherit"),
                  **space_flags(QUICK_SPACE, QUICK_TABLE)),
    "full": dict(train_per_class=None, val_per_class=500, image_size=32, patch_size=4,
                 batch_size=256, epochs=100, lr=1e-3, seeds=3, probes=50, rank_k=8,
                 rank_spacing="log", budget=1000, population=50, parents=10, workers=1,
                 threads=None,
                 **space_flags(AUTOFORMER_T, AUTOFORMER_T_TABLE))}
for preset in PRESETS.values():  # the same in both
    preset.update(test_per_class=None, max_rel_pos=14, weight_decay=0.05,
                  param_range=(0.35, 0.70), runs=100, p_depth=0.2, p_layer=0.4)
EXPERIMENTS = ("rank", "entangle", "search", "inherit")
ZERO_OK = {"type": utils.nonneg_float}
FLAGS = {
    "embed_dims": "embedding widths C (Table 1)", "depths": "depths L",
    "patch_size": "patch side p", "num_heads": "heads N_h per block",
    "mlp_ratios": "MLP ratios r per block",
    "head_dim": "head width d (fixed: q, k, v have N_h d units)",
    "max_rel_pos": ("relative positions clipped at this distance R; 0: none",
                    {"type": utils.nonneg_int}),
    "batch_size": "batch size", "epochs": "epochs of every supernet and subnet trained",
    "lr": "peak learning rate (AdamW, warmup + cosine)",
    "weight_decay": ("AdamW", ZERO_OK),
    "seeds": "supernet seeds, the n of every verdict (each seed trains its own "
             "supernets)",
    "rank_k": "rank: subnets per seed, spread over the space, each trained alone",
    "rank_spacing": ("rank: the subnets' sizes evenly spaced in log(parameters) or in "
                     "parameters", {"choices": ("log", "linear")}),
    "probes": "entangle: random subnets scored with both supernets of a seed",
    "table_embed_dims": "search: C of the sub-space scored exhaustively (the table)",
    "table_depths": "search: the table's depths", "table_num_heads": "search: its heads",
    "table_mlp_ratios": "search: its MLP ratios", "budget": "evaluations per search run",
    "param_range": ("search: LO,HI, the allowed subnet size as fractions of the way "
                    "from the space's smallest to its largest subnet",
                    {"type": utils.comma_list(float)}),
    "runs": "search runs per method and table",
    "parents": "evolution: top-k kept (paper 10)",
    "population": "evolution: candidates per generation (paper 50)",
    "p_depth": ("Pd: probability to re-draw depth and C (paper 0.2)", ZERO_OK),
    "p_layer": ("Pm: probability to re-draw each block's heads, its MLP ratio "
                "(paper 0.4)", ZERO_OK)}


def check(a):
    """Settings that do not fit together: one line each."""
    rules = [
        (a.val_per_class <= 0, "--val-per-class must be > 0: the search scores on it"),
        (a.parents > a.population, "--parents must be <= --population"),
        (a.image_size % a.patch_size, "--image-size must be divisible by --patch-size"),
        (max(a.p_depth, a.p_layer) > 1,
         "--p-depth and --p-layer are probabilities: use values in [0, 1]"),
        (len(a.param_range) != 2 or not 0 <= a.param_range[0] < a.param_range[1] <= 1,
         "--param-range takes LO,HI with 0 <= LO < HI <= 1"),
        (a.rank_k < 2, "--rank-k must be >= 2: the smallest and the largest subnet")]
    for n in ("embed_dims", "depths", "num_heads", "mlp_ratios"):
        flag = n.replace("_", "-")
        extra = set(getattr(a, "table_" + n)) - set(getattr(a, n))
        text = (f"--table-{flag} must be a subset of --{flag}: the table is part of "
                f"the space")
        rules.append((extra, text))
    for bad, text in rules:
        if bad:
            raise utils.InputError(text)

# %% [markdown]
# **Data and training glue.** A supernet trains one sampled subnet per step with the repository's
# loop (`utils.train`: AdamW, warmup + cosine, label smoothing 0.1, crop + flip); no gradient
# clipping, as in the official runs.

# %%
def space_of(a, prefix=""):
    """The search space of the flags, or with prefix="table_" the table's."""
    names = ("embed_dims", "depths", "num_heads", "mlp_ratios")
    return SearchSpace(*(getattr(a, prefix + n) for n in names), a.head_dim)


def build_supernet(a, num_classes, kind="entangled"):
    cls = {"entangled": SuperViT, "classic": ClassicSuperViT}[kind]
    return cls(space_of(a), image_size=a.image_size, patch_size=a.patch_size,
               num_classes=num_classes, max_rel=a.max_rel_pos)


def supernet_step(sample):
    """A utils.train step_fn: the subnet sample() trained on the batch."""
    def step(model, x, y):
        with utils.autocast(x.device):
            logits = model(x, sample())
            loss = F.cross_entropy(logits.float(), y, label_smoothing=0.1)
        loss.backward()
        return loss, logits
    return step


def quiet(line):
    """A log that drops every line: the training of all but the first seed."""


def train_supernet(a, data, kind, seed, loaders, log):
    """The `kind` supernet of `seed`: built from the seed (so its initial values are the seed's),
    trained on the seed's batches, one sampled subnet per step. -> (model, initial state,
    history)."""
    torch.manual_seed(seed)
    device = loaders[0].device
    model = build_supernet(a, data.num_classes, kind).to(device)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    # both kinds of a seed train the same subnet on the same batch at every step (paired arms)
    steps = random.Random(seed + 1)
    step = supernet_step(lambda: sample_config(model.space, steps))
    hist = utils.train(model, loaders[0], epochs=a.epochs, lr=a.lr,
                       weight_decay=a.weight_decay, step_fn=step, grad_clip=0, log=log,
                       name=f"{kind} supernet seed {seed} ")
    return model, init, hist

# %% [markdown]
# **The premise, measured.** `spread_configs` picks $k$ subnets spread over the whole space by
# parameter count; each is trained alone from its slice of the seed's *initial* supernet, on the
# supernet's batches and for its steps (`run_alone`, one job each), and scored on validation.
# `kendall_tau` compares the two orders. The linear classifier on pixels is the control every
# subnet must beat.
#
# Why sizes evenly spaced in $\log$(parameters): accuracy grows roughly with the log of a
# model's size, and at a fixed number of steps it stops growing once a model is large enough.
# Evenly spaced *parameter counts* put most of the $k$ subnets among the large ones, whose
# stand-alone scores differ by less than the validation set can resolve; a ladder in which
# each subnet is a constant factor larger than the one before spreads them over the sizes
# where training alone tells them apart (RESULTS.md has the pilot that compared the two).

# %%
def spread_configs(supernet, k, seed, spacing="log"):
    """k subnets spread over the whole space: the smallest, the largest, and between them the
    random subnets (of 400) whose parameter counts lie nearest k - 2 targets, evenly spaced
    in log(parameters) (or, spacing="linear", in parameters)."""
    rng = random.Random(f"spread/{seed}")
    space = supernet.space
    ends = [smallest_config(space), largest_config(space)]
    lo = subnet_params(supernet, ends[0])
    hi = subnet_params(supernet, ends[1])
    pool = [sample_config(space, rng) for _ in range(400)]
    inner = []
    for i in range(1, k - 1):
        # a step of the ladder multiplies the size (log) or adds to it (linear)
        target = lo * (hi / lo) ** (i / (k - 1))
        if spacing == "linear":
            target = lo + i * (hi - lo) / (k - 1)
        inner.append(min(pool, key=lambda c: abs(subnet_params(supernet, c) - target)))
    return [ends[0]] + inner + [ends[1]]


def kendall_tau(a, b):
    """Kendall's tau-a of two lists: (concordant - discordant pairs) / all pairs."""
    s = 0
    for i, j in itertools.combinations(range(len(a)), 2):
        s += np.sign(a[i] - a[j]) * np.sign(b[i] - b[j])
    return float(s / (len(a) * (len(a) - 1) / 2))


def run_alone(a, data, seed, i):
    """Subnet i of spread_configs(seed), trained alone from its slice of the seed's initial
    supernet, on the supernet's batches and steps; scored on validation."""
    device = utils.get_device(a.device)
    torch.manual_seed(seed)
    supernet = build_supernet(a, data.num_classes).to(device)
    config = spread_configs(supernet, a.rank_k, seed, a.rank_spacing)[i]
    sub = extract_subnet(supernet, config)
    loaders = utils.make_loaders(data, batch_size=a.batch_size, device=device, seed=seed)
    train, val, _ = loaders
    utils.train(sub, train, epochs=a.epochs, lr=a.lr, weight_decay=a.weight_decay,
                grad_clip=0, log=quiet)
    return {"config": config_key(config), "params": subnet_params(supernet, config),
            "val": tuple(utils.evaluate(sub, val))}


def run_linear(a, data, seed):
    """The control: a linear classifier on the pixels, the same recipe and batches."""
    device = utils.get_device(a.device)
    torch.manual_seed(seed)
    pixels = 3 * a.image_size * a.image_size
    model = nn.Sequential(nn.Flatten(), nn.Linear(pixels, data.num_classes)).to(device)
    loaders = utils.make_loaders(data, batch_size=a.batch_size, device=device, seed=seed)
    train, val, test = loaders
    utils.train(model, train, epochs=a.epochs, lr=a.lr, weight_decay=a.weight_decay,
                grad_clip=0, log=quiet)
    val_score = tuple(utils.evaluate(model, val))
    return {"val": val_score, "test": tuple(utils.evaluate(model, test))}

# %% [markdown]
# **The search, measured on a table.** Every subnet of the table's sub-space is scored once on
# validation with inherited weights; both searches are replayed on those scores. The split-half
# reliability asks whether two random halves of the validation images order the in-range
# subnets alike.

# %%
def split_half(per, inside, seed, n_val):
    """Correlation of the in-range subnets' (accuracy, NLL) on two validation halves."""
    half = torch.rand(n_val, generator=torch.Generator().manual_seed(seed)) < 0.5
    halves = []
    for mask in (half, ~half):
        scores = [summarize(per[k][0][mask], per[k][1][mask]) for k in inside]
        halves.append(scores)
    halves = np.array(halves)  # (2 halves, subnets, accuracy and NLL)
    out = {}
    with np.errstate(invalid="ignore"):  # constant scores (a tiny dataset): nan, no warning
        for i, name in enumerate(("acc", "nll")):
            out[name] = float(np.corrcoef(halves[:, :, i])[0, 1])
    return out


def measure_search(a, model, loaders, seed):
    """The table of `model`, both searches replayed on it, test scores of their picks."""
    _, val, test = loaders
    ok = in_range(model, a.param_range)
    per = score_configs(model, all_configs(space_of(a, "table_")), val)
    inside = [k for k in per if ok(config_from_key(k))]
    fitness = fitness_from_scores(per)
    chosen = max(inside, key=fitness.get)  # the optimum: what a search that finds it returns
    curves = search_curves(fitness, space_of(a, "table_"), constraint=ok,
                           budget=a.budget, runs=a.runs, seed=seed,
                           population=a.population, parents=a.parents,
                           p_depth=a.p_depth, p_layer=a.p_layer)
    picks = {chosen}
    for _, run_picks in curves.values():
        picks |= {config_key(c) for c in run_picks}
    scored = score_configs(model, [config_from_key(k) for k in picks], test)
    test_scores = {k: summarize(*v) for k, v in scored.items()}
    search = {}
    for method, (reg, run_picks) in curves.items():
        pick_acc = [test_scores[config_key(c)].acc for c in run_picks]
        search[method] = {"regret": (1000 * reg.mean(0)).tolist(),
                          "found": float(np.mean(reg[:, -1] == 0)),
                          "picks_test_acc": float(np.mean(pick_acc))}
    n_val = len(next(iter(per.values()))[0])
    return {"table": len(per), "in_range": len(inside), "chosen": chosen,
            "search": search, "split_half": split_half(per, inside, seed, n_val),
            "chosen_test": tuple(test_scores[chosen])}

# %% [markdown]
# **One job per supernet.** `run_seed` trains the `kind` supernet of a seed and measures what the
# experiments in `todo` need from it. It seeds all it uses, so results do not depend on
# `--workers`; `run_job` sends each job to its function.

# %%
def run_seed(a, data, kind, seed, todo):
    """The `kind` supernet of `seed`, trained, then measured for the experiments."""
    device = utils.get_device(a.device)
    t0 = time.time()
    log = print if seed == a.seed else quiet
    loaders = utils.make_loaders(data, batch_size=a.batch_size, device=device, seed=seed)
    model, init, hist = train_supernet(a, data, kind, seed, loaders, log)
    out = {"history": hist, "params": sum(p.numel() for p in model.parameters())}
    probe_rng = random.Random(f"probes/{seed}")
    probes = [sample_config(model.space, probe_rng) for _ in range(a.probes)]
    out["probes"] = []
    for c in probes if "entangle" in todo else []:
        score = utils.evaluate(model, loaders[1], lambda m, x, c=c: m(x, c))
        out["probes"].append((config_key(c), tuple(score)))
    if kind == "classic":
        return out
    if "rank" in todo:  # inherited validation scores of the subnets trained alone
        spread = spread_configs(model, a.rank_k, seed, a.rank_spacing)
        per = score_configs(model, spread, loaders[1])
        out["rank"] = [tuple(summarize(*per[config_key(c)])) for c in spread]
    if {"search", "inherit"} & set(todo):
        out.update(measure_search(a, model, loaders, seed))
    if "inherit" in todo:  # the chosen subnet from the supernet's initial values, same batches
        model.load_state_dict(init)
        sub = extract_subnet(model, config_from_key(out["chosen"]))
        hist = utils.train(sub, loaders[0], epochs=a.epochs, lr=a.lr,
                           weight_decay=a.weight_decay, grad_clip=0, log=log,
                           name=f"retrain seed {seed} ")
        out["inherit"] = {"inherited": out["chosen_test"],
                          "retrained": tuple(utils.evaluate(sub, loaders[2])),
                          "loss": hist[-1]["loss"]}
    seconds = time.time() - t0
    print(f"[seed {seed}] entangled supernet trained and measured in {seconds:.0f} s",
          flush=True)
    return out


def run_job(a, data, kind, seed, todo):
    """One job of a worker process: a supernet ("entangled", "classic"), subnet i of the
    spread trained alone ("alone<i>"), or the linear control ("linear")."""
    if kind == "linear":
        return run_linear(a, data, seed)
    if kind.startswith("alone"):
        return run_alone(a, data, seed, int(kind[len("alone"):]))
    return run_seed(a, data, kind, seed, todo)

# %% [markdown]
# **The experiments.** Each prints its table, then its entry checks or verdicts. The rank
# experiment's two entry checks come first: they say whether the search verdicts after them
# are about the paper or about a regime where a search has nothing to find.

# %%
def print_table(header, rows):
    print("| " + " | ".join(header) + " |")
    print("|---" * len(header) + "|")
    for r in rows:
        print("| " + " | ".join(map(str, r)) + " |")


def rank_rows(res, a, s):
    """The rank table's rows of seed s: each subnet alone and inherited, the control."""
    alone = [res[(f"alone{i}", s)] for i in range(a.rank_k)]
    rows = []
    for x, inherited in zip(alone, res[("entangled", s)]["rank"]):
        name = config_str(config_from_key(x["config"]))
        rows.append([s, name, f"{x['params'] / 1e3:.1f}k",
                     f"{x['val'][0]:.1f} / {x['val'][1]:.3f}",
                     f"{inherited[0]:.1f} / {inherited[1]:.3f}"])
    lin = res[("linear", s)]["val"]
    lin_score = f"{lin[0]:.1f} / {lin[1]:.3f}"
    rows.append([s, "linear on pixels (control)", "", lin_score, ""])
    return rows


def entry_checks(gap, tau):
    """The two entry-check lines, from mean_ci tuples of the capacity gap and of tau."""
    # met: a mean of at least 3 points, and an interval (over supernet seeds) clear of 0
    # (one supernet has no interval: not met, and the line says why)
    met_gap = "met" if gap[0] >= 3 and gap[1] > 0 else "not met"
    met_tau = "met" if tau[1] > 0 else "not met"
    gap_ci = f"[{gap[1]:+.1f}, {gap[2]:+.1f}]"
    tau_ci = f"[{tau[1]:+.2f}, {tau[2]:+.2f}]"
    if math.isnan(tau[1]):
        gap_ci = "(one supernet: no interval)"
        tau_ci = gap_ci
    return [
        f"entry check: capacity matters: largest − smallest sub-network trained alone = "
        f"{gap[0]:+.1f} points {gap_ci} (needs ≥ 3) → {met_gap}",
        f"entry check: the supernet ranks sub-networks: Kendall τ(inherited, "
        f"stand-alone) = {tau[0]:+.2f} {tau_ci} (needs > 0, aim ≥ 0.5) → {met_tau}"]


def exp_rank(res, a):
    """The premise of one-shot search: do inherited scores order subnets as training each alone
    would? k subnets per supernet seed, spread from the smallest to the largest; validation."""
    seeds = sorted(s for kind, s in res if kind == "linear")
    rows = []
    taus = []
    taus_acc = []
    gaps = []
    beat = 0
    subnets = {}  # seed -> the table's subnets: parameters, (acc, NLL) alone and inherited
    for s in seeds:
        rows += rank_rows(res, a, s)
        alone = [res[(f"alone{i}", s)]["val"] for i in range(a.rank_k)]
        inherited = res[("entangled", s)]["rank"]
        params = [res[(f"alone{i}", s)]["params"] for i in range(a.rank_k)]
        subnets[s] = [{"params": n, "alone": tuple(x), "inherited": tuple(y)}
                      for n, x, y in zip(params, alone, inherited)]
        # tau by NLL, the search's fitness (by accuracy too, printed)
        taus.append(kendall_tau([x[1] for x in inherited], [x[1] for x in alone]))
        taus_acc.append(kendall_tau([x[0] for x in inherited], [x[0] for x in alone]))
        gaps.append(alone[-1][0] - alone[0][0])  # largest minus smallest, accuracy points
        beat += sum(x[0] > res[("linear", s)]["val"][0] for x in alone)
    print(f"\n== rank: {len(seeds)} supernet seeds x {a.rank_k} subnets spread over "
          f"the space, each trained alone for the supernet's {a.epochs} epochs; "
          f"validation ==")
    header = ["seed", "subnet", "params", "alone val % / NLL", "inherited val % / NLL"]
    print_table(header, rows)
    linear = utils.mean_ci([res[("linear", s)]["val"][0] for s in seeds])
    tau = utils.mean_ci(taus)
    tau_acc = utils.mean_ci(taus_acc)
    per_seed = ", ".join(f"{t:+.2f}" for t in taus)
    print(f"Kendall τ(inherited, alone) per seed, by NLL: {per_seed}; by accuracy: "
          f"{utils.fmt_ci(tau_acc)}")
    print(f"control: linear classifier on pixels, val acc {utils.fmt_ci(linear, 1)}; "
          f"subnets trained alone that beat it: {beat} of {len(seeds) * a.rank_k}")
    checks = entry_checks(utils.mean_ci(gaps), tau)
    for line in checks:
        print(line)
    out = os.path.join(a.out_dir, "rank.json")
    saved = {"fingerprint": supernet_fingerprint(a), "checks": checks}
    utils.save_results(out, vars(a), saved)
    return {"tau_nll": taus, "tau_acc": taus_acc, "gap": gaps, "beat_linear": beat,
            "linear_val": [res[("linear", s)]["val"] for s in seeds],
            "linear_test": [res[("linear", s)]["test"] for s in seeds],
            "checks": checks, "rows": rows, "subnets": subnets}


def exp_entangle(res, a):
    """Paper Fig. 3/4: the entangled vs the classic supernet, the same steps, subnets and
    batches, then the same random subnets scored with inherited weights. n = seeds."""
    seeds = sorted(s for kind, s in res if kind == "classic")
    mean = {}
    for kind in ("entangled", "classic"):
        acc = [np.mean([p[1][0] for p in res[(kind, s)]["probes"]]) for s in seeds]
        nll = [np.mean([p[1][1] for p in res[(kind, s)]["probes"]]) for s in seeds]
        mean[kind] = [acc, nll]
    print(f"\n== entangle: {len(seeds)} seeds x {a.probes} random subnets, inherited "
          f"weights ==")
    rows = []
    for j, s in enumerate(seeds):
        loss = [res[(k, s)]["history"][-1]["loss"] for k in mean]
        rows.append([s, f"{loss[0]:.3f} / {loss[1]:.3f}",
                     f"{mean['entangled'][0][j]:.1f} / {mean['classic'][0][j]:.1f}",
                     f"{mean['entangled'][1][j]:.3f} / {mean['classic'][1][j]:.3f}"])
    header = ["seed", "final train loss ent / cls",
              "val acc % ent / cls (mean of subnets)", "val NLL ent / cls"]
    print_table(header, rows)
    wins = 0
    probes = {}
    for s in seeds:
        pairs = list(zip(res[("entangled", s)]["probes"], res[("classic", s)]["probes"]))
        wins += sum(e[1][0] > c[1][0] for e, c in pairs)
        probes[s] = []
        for e, c in pairs:  # (config, inherited val acc entangled, classic)
            probes[s].append([config_str(config_from_key(e[0])), e[1][0], c[1][0]])
    sizes = [f"{res[(k, seeds[0])]['params']:,}" for k in mean]
    print(f"entangled > classic on {wins}/{len(seeds) * a.probes} (seed, subnet) pairs; "
          f"supernet parameters: {sizes[0]} vs {sizes[1]}")
    kw = dict(name_a="entangled", name_b="classic", pairs="paired supernet seeds")
    verdicts = [utils.compare_paired(mean["entangled"][0], mean["classic"][0], **kw),
                utils.compare_paired(mean["entangled"][1], mean["classic"][1],
                                     unit="nats", digits=3, higher_is_better=False,
                                     bound=0.02, **kw)]
    return {"wins": wins, "per_seed": mean, "probes": probes, "verdicts": verdicts}


def search_rows(seeds, per_seed, marks):
    """The search table's rows: regret at some budgets, optimum found, the picks."""
    rows = []
    for s, r in zip(seeds, per_seed):
        ev = r["evolution"]
        rn = r["random"]
        row = [s]
        for n in marks:
            row.append(f"{ev['regret'][n - 1]:.2f} / {rn['regret'][n - 1]:.2f}")
        row.append(f"{100 * ev['found']:.0f}% / {100 * rn['found']:.0f}%")
        row.append(f"{ev['picks_test_acc']:.2f} / {rn['picks_test_acc']:.2f}")
        rows.append(row)
    return rows


def supernet_fingerprint(a):
    """The settings that fix a run's supernets: same fingerprint, same supernets."""
    names = ("data", "image_size", "patch_size", "train_per_class", "val_per_class",
             "batch_size", "epochs", "lr", "weight_decay", "seed", "seeds",
             "max_rel_pos", "embed_dims", "depths", "num_heads", "mlp_ratios",
             "head_dim", "rank_k", "rank_spacing")
    return {n: str(getattr(a, n)) for n in names}


def saved_entry_checks(a):
    """The entry checks that `--experiment rank` saved for the same supernets, or ()."""
    path = os.path.join(a.out_dir, "rank.json")
    if not os.path.exists(path):
        return ()
    with open(path) as f:
        saved = json.load(f)["metrics"]
    if saved["fingerprint"] != supernet_fingerprint(a):
        return ()
    print(f"(the entry checks of these same supernets, from the rank run: {path})")
    return saved["checks"]


def exp_search(res, a, checks=()):
    """Sec. 3.3: evolution vs random search, `runs` times each on each seed's exhaustive table
    (fitness: validation NLL). n = tables: the interval covers what changes between supernets.
    `checks`: the rank experiment's entry checks, printed again before the verdicts."""
    seeds = sorted(s for kind, s in res if kind == "entangled")
    first = res[("entangled", seeds[0])]
    per_seed = [res[("entangled", s)]["search"] for s in seeds]
    marks = sorted({10, 30, a.budget} & set(range(1, a.budget + 1)))
    print(f"\n== search: {len(seeds)} tables (one per supernet seed) of "
          f"{first['table']} subnets, {first['in_range']} in range; {a.runs} runs per "
          f"method and table; population {a.population}, top-{a.parents}, "
          f"Pd={a.p_depth}, Pm={a.p_layer} ==")
    header = ["seed"] + [f"regret @{n} evo / rnd (millinats)" for n in marks]
    header += ["found the optimum evo / rnd", "picks' test % evo / rnd"]
    print_table(header, search_rows(seeds, per_seed, marks))
    rel = {}
    for k in ("nll", "acc"):
        rel[k] = utils.mean_ci([res[("entangled", s)]["split_half"][k] for s in seeds])
    print(f"fitness reliability: correlation of the in-range subnets' scores on two "
          f"random halves of the validation images, mean over tables: NLL "
          f"{utils.fmt_ci(rel['nll'])}, accuracy {utils.fmt_ci(rel['acc'])}")
    for line in checks:  # what the verdicts below rest on
        print(line)
    final = {m: [r[m]["regret"][-1] for r in per_seed] for m in ("evolution", "random")}
    picks = {}
    for m in ("evolution", "random"):
        picks[m] = [r[m]["picks_test_acc"] for r in per_seed]
    kw = dict(name_a="evolution", name_b="random", pairs="tables (supernet seeds)")
    verdicts = [utils.compare_paired(final["evolution"], final["random"],
                                     unit="millinats of regret", digits=2,
                                     higher_is_better=False, bound=0.5, **kw),
                utils.compare_paired(picks["evolution"], picks["random"], digits=2,
                                     bound=0.5, **{**kw, "name_a": "evolution picks",
                                                   "name_b": "random picks"})]
    return {"split_half": rel, "per_seed": dict(zip(seeds, per_seed)),
            "verdicts": verdicts}


def exp_inherit(res, a):
    """Paper Table 3: the searched subnet with inherited weights vs the same subnet retrained
    from the supernet's initial values on the same batches. n = seeds."""
    seeds = sorted(s for kind, s in res if kind == "entangled")
    runs = [res[("entangled", s)] for s in seeds]
    print(f"\n== inherit: each seed's best in-range subnet by val NLL, inherited vs "
          f"retrained {a.epochs} epochs, on the test set ==")
    rows = []
    for s, x in zip(seeds, runs):
        row = [s, config_str(config_from_key(x["chosen"]))]
        for k in ("inherited", "retrained"):
            row.append(f"{x['inherit'][k][0]:.1f} / {x['inherit'][k][1]:.3f}")
        rows.append(row)
    header = ["seed", "subnet", "inherited test % / NLL", "retrained test % / NLL"]
    print_table(header, rows)
    arm = {}
    for k in ("inherited", "retrained"):
        arm[k] = list(zip(*[x["inherit"][k] for x in runs]))  # ([acc per seed], [nll ...])
    kw = dict(name_a="inherited", name_b="retrained", pairs="paired supernet seeds")
    verdicts = [utils.compare_paired(arm["inherited"][0], arm["retrained"][0], **kw),
                utils.compare_paired(arm["inherited"][1], arm["retrained"][1],
                                     unit="nats", digits=3, higher_is_better=False,
                                     bound=0.03, **kw)]
    return {"chosen": [x["chosen"] for x in runs], "arms": arm, "verdicts": verdicts}

# %% [markdown]
# **The run's figure**: each rank seed's subnets, inherited against alone (a supernet that ranks
# puts them on a rising line), and the search's regret curves over tables.

# %%
def plot(res, path):
    """Left: inherited vs alone val NLL of the rank subnets; right: regret curves."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(10, 3.6))
    ax = fig.add_subplot(1, 2, 1)
    seeds = sorted(s for kind, s in res if kind == "linear")
    for s in seeds:
        inherited = [x[1] for x in res[("entangled", s)]["rank"]]
        alone = [res[(f"alone{i}", s)]["val"][1] for i in range(len(inherited))]
        ax.scatter(alone, inherited, s=14, label=f"seed {s}")
    ax.set(xlabel="trained alone: val NLL", ylabel="inherited: val NLL",
           title="the same subnets, alone vs inherited")
    ax.legend(fontsize=8)
    ax = fig.add_subplot(1, 2, 2)
    for m in ("evolution", "random"):
        reg = np.array([x["search"][m]["regret"] for x in res.values() if "search" in x])
        if not len(reg):
            continue
        mu = reg.mean(0)
        se = reg.std(0) / np.sqrt(len(reg))
        n = np.arange(1, reg.shape[-1] + 1)
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
    out = {}
    for kind in ("entangled", "classic"):
        model = build_supernet(a, num_classes, kind)
        big = largest_config(model.space)
        step = supernet_step(lambda big=big: big)
        out[f"{kind} supernet"] = (model, step, a.image_size)
    big = largest_config(out["entangled supernet"][0].space)
    sub = build_subnet(out["entangled supernet"][0], big)
    out["retrained subnet (largest)"] = (sub, None, a.image_size)
    return out

# %% [markdown]
# **`main`**: parse, load the data once, make one job per (kind, seed), run the jobs on
# `--workers` processes, then the experiments in order (rank first: its entry checks are printed
# again before the search verdicts).

# %%
def make_jobs(a, data):
    """(a, data, kind, seed, todo) of every job the experiments need, longest first."""
    kinds = ["entangled"]
    if "entangle" in a.experiments:
        kinds.append("classic")
    if "rank" in a.experiments:  # the largest subnet first: long jobs first balance workers
        kinds += [f"alone{i}" for i in reversed(range(a.rank_k))] + ["linear"]
    todo = tuple(a.experiments)
    jobs = []
    for kind in kinds:
        for i in range(a.seeds):
            jobs.append((a, data, kind, a.seed + i, todo))
    return jobs


def main(argv=None):
    a = utils.cli(__doc__, PRESETS, FLAGS, argv, experiments=EXPERIMENTS, check=check)
    device, out = utils.start(a, "04_autoformer_entangle")
    a.out_dir = out
    if a.mode == "demo":
        demos = [demo_entangled_weights, demo_space_params, demo_search]
        return utils.run_demos(out, demos)
    t0 = time.time()
    data = utils.data_from_args(a)
    ok = in_range(build_supernet(a, data.num_classes), a.param_range)
    n_in = sum(map(ok, all_configs(space_of(a, "table_"))))
    if {"search", "inherit"} & set(a.experiments) and a.budget > n_in:
        raise utils.InputError(f"--budget {a.budget} is more than the {n_in} table "
                               f"subnets in the parameter range: lower it or widen "
                               f"--param-range")
    lo = ok.bounds[0] / 1e3
    hi = ok.bounds[1] / 1e3
    print(f"data: {len(data.y_train)} train / {len(data.y_val)} val (carved from train) "
          f"/ {len(data.y_test)} test images of {a.image_size}x{a.image_size}, patch "
          f"{a.patch_size}; {space_of(a)}, relative positions clipped at "
          f"{a.max_rel_pos}; parameter range {lo:.0f}k..{hi:.0f}k; {a.seeds} seeds, "
          f"{a.workers} worker(s)", flush=True)
    jobs = make_jobs(a, data)
    done = utils.run_jobs(run_job, jobs, workers=a.workers)
    res = {(j[2], j[3]): r for j, r in zip(jobs, done)}
    results = {}
    order = [e for e in EXPERIMENTS if e in a.experiments]
    for name in order:
        if name == "search":
            if "rank" in results:
                checks = results["rank"]["checks"]
            else:
                checks = saved_entry_checks(a)
            results[name] = exp_search(res, a, checks)
        else:
            results[name] = {"rank": exp_rank, "entangle": exp_entangle,
                             "inherit": exp_inherit}[name](res, a)
    if {"rank", "search"} <= set(a.experiments):
        plot(res, os.path.join(out, "results.png"))
    results["wall_s"] = round(time.time() - t0, 1)
    print(f"\n== done in {results['wall_s']:.0f} s; results in {out} ==")
    utils.save_results(os.path.join(out, "results.json"), vars(a), results)
    return results


if __name__ == "__main__":
    utils.run_main(main)
