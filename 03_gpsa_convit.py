"""ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases -- d'Ascoli,
Touvron, Leavitt, Morcos, Biroli & Sagun, ICML 2021 (arXiv:2103.10697).

A vision transformer (DeiT) must learn from data that nearby patches matter; a convolution has
it built in. ConViT replaces the first attention layers by gated positional self-attention
(GPSA): each head h mixes a content softmax with a positional softmax over the relative position
r_ij of patches i and j, weighted by a learned gate sigma(lambda_h), and normalises (eq. 6-7):
    A^h = (1 - sigma(lambda_h)) softmax(Q K^T / sqrt d) + sigma(lambda_h) softmax(v_pos^h . r)
    GPSA_h(X) = normalize[A^h] X W_val^h
The positional half starts as a soft convolution (eq. 5: each head looks around its own offset
Delta_h), and training decides, head by head, how much of it to keep.

Run:
    python 03_gpsa_convit.py --demo                  # no data, ~5 s: checks and figures
    python 03_gpsa_convit.py --quick --data cifar10  # 2-core CPU, ~9 min (--data DIR: ImageFolder)
    python 03_gpsa_convit.py --data cifar10          # ConViT-Ti, one GPU (not measured here)
Results (--quick, 542 s on a 2-core AMD EPYC CPU, torch 2.15 float32, n=4 paired seeds, all
10,000 test images; 24 x 24 CIFAR-10, patch 4 = 36 tokens, ~1,560 steps of 64 images a run):
    DeiT learns: DeiT - linear on pixels = +7.4 [+6.7, +8.0] points at 200 images per class,
      +8.5 [+6.1, +10.9] at 1000; a small CNN is +9.5 [+8.2, +10.7] points above DeiT.
    ConViT - DeiT = -0.5 [-2.2, +1.1] points at 200/class (not decided), -1.6 [-2.3, -0.8] at
      1000/class (DeiT better): the paper's gain does not appear at this budget. The gates stay
      at 0.71-0.74 (start 0.73): in 1,560 steps no head chooses between position and content.
Details: runs/03_gpsa_convit/RESULTS.md (full tables, the pilots that chose the regime, logs).
"""
import dataclasses
import math
import os
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.figure import Figure

import utils

# %% [markdown]
# ## 1. Patches and their relative positions (Sec. 2)
#
# A P x P patch embedding cuts an image into a G x G grid of N = G^2 patch tokens, in raster
# order (token = y * G + x). GPSA's positional attention depends only on the offset
# delta_ij = (position of key j) - (position of query i), through a FIXED encoding (eq. 5)
#
#     r_ij = (delta_x, delta_y, |delta_ij|^2)      (the official code's order of the entries)
#
# Letters in shape comments: B batch, C width, N = G*G patch tokens, T = N + 1 tokens with the
# class token, h heads (N_h in the paper), d = C / h per head, L depth.

# %%
def relative_indices(grid_size, device=None, dtype=torch.float32):
    """r_ij for every (query i, key j) pair of a grid_size x grid_size grid. -> (N, N, 3)"""
    ys, xs = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    pos = torch.stack([xs.flatten(), ys.flatten()], dim=1)  # (N, 2) as (x, y)
    delta = pos[None, :, :] - pos[:, None, :]               # (N query, N key, 2): key - query
    r = torch.cat([delta, (delta ** 2).sum(-1, keepdim=True)], dim=-1)
    return r.to(device=device, dtype=dtype)                 # (N, N, 3)


# %% [markdown]
# How far attention looks (paper eq. 8, Sec. 4): the non-locality of head h is the attention-
# weighted distance between query and key patches, averaged over the queries (and the batch),
#
#     D^h = 1/N sum_ij A^h_ij |delta_ij|      (in patches; a layer's D is the mean over heads)
#
# Uniform attention on a 6 x 6 grid gives D = 3.08; a head that looks at its own patch gives 0.

# %%
def nonlocality(attn, grid_size):
    """Eq. 8 per head, averaged over the batch. attn (B, h, N, N) -> (h,)"""
    dist = relative_indices(grid_size, attn.device, attn.dtype)[..., 2].sqrt()  # (N, N)
    return (attn * dist).sum(-1).mean(dim=(0, 2))


# %% [markdown]
# ## 2. Gated positional self-attention (GPSA, Sec. 3)
#
# ### Eq. 7: two softmaxes per head, mixed by a learned gate
#
#     A^h_ij = (1 - sigma(lambda_h)) softmax_j(q_i . k_j / sqrt(d))    content: reads the image
#            +      sigma(lambda_h)  softmax_j(v_pos^h . r_ij)        positional: only i - j
#
# Every head h has its own gate lambda_h (initialised to 1: sigma(1) = 0.73) and its own
# v_pos^h in R^3, which sets the centre and the span of its positional attention. The two
# softmaxes are taken SEPARATELY and added afterwards: inside one softmax (eq. 4, PSA) the sharp
# positional scores of the convolutional init would drown the content scores.

# %% [markdown]
# ### Eq. 6: normalise, then read the values
#
#     GPSA_h(X) = normalize[A^h] X W_val^h,        normalize[A]_ij = A_ij / sum_k A_ik
#
# The heads are concatenated and projected by W_out, as in any multi-head layer (eq. 2). The
# class below is the reference form: it writes the (B, h, N, N) map out, as the equations do.

# %%
class GPSA(nn.Module):
    """Gated positional self-attention over the N patch tokens of a square grid (eq. 6-7, the
    reference form). x (B, N, C) -> (B, N, C)."""

    def __init__(self, dim, *, num_heads, locality_strength=1.0, use_local_init=True,
                 qkv_bias=False, gate_scale=1.0):
        super().__init__()
        assert dim % num_heads == 0, (f"dim={dim} must be divisible by num_heads={num_heads}: "
                                      f"pick e.g. {num_heads * max(1, dim // num_heads)}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.locality_strength = locality_strength           # alpha of eq. 5
        self.qk = nn.Linear(dim, 2 * dim, bias=qkv_bias)     # W_qry and W_key, stacked
        self.v = nn.Linear(dim, dim, bias=qkv_bias)          # W_val, read by both maps
        self.proj = nn.Linear(dim, dim)                      # W_out (eq. 2)
        self.pos_proj = nn.Linear(3, num_heads)              # row h = v_pos^h (its bias cancels)
        self.gate_scale = gate_scale                         # lambda_h = gate_scale * theta_h
        self.gating_param = nn.Parameter(torch.full((num_heads,), 1.0 / gate_scale))  # lambda=1
        self.register_buffer("rel_indices", torch.zeros(0, 0, 3), persistent=False)  # r_ij cache
        for m in (self.qk, self.v, self.proj, self.pos_proj):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        if use_local_init:
            self.local_init()

    @torch.no_grad()
    def local_init(self):
        """Eq. 5: W_val = I and v_pos^h = alpha (2 Delta_x, 2 Delta_y, -1), so that
        v_pos^h . r_ij = -alpha |delta_ij - Delta_h|^2 + const: a softmax peaked at the head's
        offset Delta_h, sharper for larger alpha. (Eq. 5's W_qry = W_key = 0 is not needed: the
        content scores live in their own softmax.)"""
        self.v.weight.copy_(torch.eye(self.dim))
        if self.v.bias is not None:
            self.v.bias.zero_()
        for h, (dx, dy) in enumerate(head_centres(self.num_heads)):
            self.pos_proj.weight[h] = self.locality_strength * torch.tensor([2 * dx, 2 * dy, -1.0])
        self.pos_proj.bias.zero_()

    def gate(self):
        """sigma(lambda_h) per head. -> (h,)"""
        return torch.sigmoid(self.gate_scale * self.gating_param)

    def rel(self, N):
        """r_ij for N tokens, built once in the weights' device and dtype. -> (N, N, 3)"""
        G, w, r = math.isqrt(N), self.pos_proj.weight, self.rel_indices
        assert G * G == N, f"GPSA needs a square grid of patches, got N={N}: no class token"
        if r.shape[0] != N or r.dtype != w.dtype or r.device != w.device:
            self.rel_indices = relative_indices(G, w.device, w.dtype)
        return self.rel_indices

    def positional_attention(self, N):
        """Eq. 7, second softmax: softmax_j(v_pos^h . r_ij), the same for every image.
        -> (h, N, N)"""
        return self.pos_proj(self.rel(N)).permute(2, 0, 1).softmax(dim=-1)

    def content_attention(self, x):
        """Eq. 7, first softmax: softmax_j(q_i . k_j / sqrt(d)). x (B, N, C) -> (B, h, N, N)"""
        B, N, C = x.shape
        qk = self.qk(x).reshape(B, N, 2, self.num_heads, self.head_dim)
        q, k = qk.permute(2, 0, 3, 1, 4)                                  # (2, B, h, N, d)
        return (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)     # (B, h, N, N)

    def get_attention(self, x):
        """normalize[A^h] for every head (eq. 7, then eq. 6). x (B, N, C) -> (B, h, N, N)"""
        gate = self.gate().view(-1, 1, 1)                                # (h, 1, 1): per head
        # eq. 7: content (B, h, N, N) and positional (h, N, N) maps, mixed head by head
        attn = (1 - gate) * self.content_attention(x) + gate * self.positional_attention(x.shape[1])
        return attn / attn.sum(dim=-1, keepdim=True)                      # eq. 6: normalize

    def forward(self, x):
        """Eq. 6 for every head, the heads concatenated, then W_out. (B, N, C) -> (B, N, C)"""
        B, N, C = x.shape
        v = self.v(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, N, d)
        out = self.get_attention(x) @ v                                             # (B, h, N, d)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))                     # (B, N, C)


# %% [markdown]
# ### Eq. 5: the convolutional initialisation
#
# Cordonnier et al. (2020) showed that h heads of positional attention can express a
# sqrt(h) x sqrt(h) convolution: head h attends to the single patch at offset Delta_h. ConViT
# starts each GPSA layer there, softly: `local_init` sets W_val = I and
#
#     v_pos^h = alpha (2 Delta^h_x, 2 Delta^h_y, -1),
#     so  v_pos^h . r_ij = -alpha |delta_ij - Delta_h|^2 + alpha |Delta_h|^2:
#
# a Gaussian bump around Delta_h whose sharpness is the locality strength alpha (1 in the paper).
# The centres Delta_h tile a sqrt(h) x sqrt(h) grid around the query: {-1, 0, 1}^2 for 9 heads (a
# 3 x 3 kernel), {-1/2, 1/2}^2 for 4 heads (each head spread over a 2 x 2 block).

# %%
def head_centres(num_heads):
    """Delta_h = (dx, dy) per head, in patches. A square h = k^2 gives the official code's k x k
    grid of offsets centred on the query, numbered row by row (the official code goes column by
    column: heads are interchangeable, only the labels differ). A non-square h takes the h cells
    nearest the centre of a ceil(sqrt(h))-sided grid (the official code leaves those heads
    random), so that every head still starts local. -> list of (dx, dy)"""
    k = math.ceil(math.sqrt(num_heads))
    c = (k - 1) / 2
    cells = [(x - c, y - c) for y in range(k) for x in range(k)]           # raster order
    near = sorted(range(len(cells)), key=lambda i: cells[i][0] ** 2 + cells[i][1] ** 2)
    return [cells[i] for i in sorted(near[:num_heads])]                     # stable: ties in order


def demo_conv_init(grid=6, alpha=1.0):
    """Each head's positional attention at init for one query, on the patch grid: the soft
    kernel it starts as (4 heads: a 2 x 2 block each; 9 heads: one patch each)."""
    G, q = grid, (grid // 2) * grid + grid // 2
    fig = Figure(figsize=(12, 3.2))
    axes = fig.subplots(2, 9)
    for row, h in enumerate((9, 4)):
        P = GPSA(4 * h, num_heads=h, locality_strength=alpha).positional_attention(G * G).detach()
        for j, ax in enumerate(axes[row]):
            ax.axis("off")
            if j < h:
                ax.imshow(P[j, q].view(G, G).numpy(), cmap="magma", vmin=0)
                ax.plot(q % G, q // G, "c+")                                 # the query patch
                ax.set_title("head {}: ({:+g}, {:+g})".format(j + 1, *head_centres(h)[j]),
                             fontsize=7)
    fig.suptitle(f"Positional attention of one query (+) at init, alpha={alpha:g}: each head a "
                 f"shifted kernel (top: 9 heads, bottom: 4 heads)", fontsize=9)
    utils.show(fig, "demo_conv_init")
    # 4 heads: the share of each query's positional attention on the 2 x 2 block nearest
    # query + Delta_h (the 4 keys nearest it), for every head and query
    delta = relative_indices(G)[..., :2]                                       # (N, N, 2)
    near = torch.stack([P[h].gather(1, ((delta - torch.tensor(c)) ** 2).sum(-1).argsort(
        dim=-1, stable=True)[:, :4]).sum(-1) for h, c in enumerate(head_centres(4))])  # (h, N)
    print(f"  4 heads, alpha={alpha:g}, {G}x{G} grid: {100 * near.min():.1f}% of a query's "
          f"positional attention on the head's 2x2 block far from the borders, "
          f"{100 * near.mean():.1f}% on average over all queries, {100 * near.max():.1f}% at a "
          f"corner (the borders cut the Gaussian's tail)")
    return {"mean": near.mean().item(),
            "min": near.min().item(), "max": near.max().item()}


if utils.in_notebook():
    demo_conv_init()


# %% [markdown]
# The locality strength alpha sets how sharp the kernel is. At alpha = 1 (the paper's choice)
# a 4-head layer puts about 77% of each interior query's positional attention on the head's
# 2 x 2 block; with the gate at sigma(1) = 0.73 and a near-uniform content map at init, the layer
# starts as ~73% soft local attention + ~27% global average. Only in the sharp limit (alpha large,
# gate -> 1) is it exactly a convolution:

# %%
def demo_locality_strength(alphas=(0.1, 1.0, 4.0, 50.0), grid=6, lam=30.0):
    """Eq. 5's alpha in a 9-head layer with every gate at lam (30: sigma = 1, fully positional)
    and W_out = I: one head's kernel, its weight on its own patch, and the distance to the 3 x 3
    depthwise convolution that is one-hot at Delta_h (interior patches; borders renormalise)."""
    G, C, h, q = grid, 36, 9, (grid // 2) * grid + grid // 2
    x = torch.randn(2, G * G, C, generator=torch.Generator().manual_seed(0))   # (B, N, C)
    kernel = torch.zeros(C, 1, 3, 3)                                         # (C, 1, 3, 3)
    for c in range(C):
        dx, dy = head_centres(h)[c // (C // h)]
        kernel[c, 0, 1 + int(dy), 1 + int(dx)] = 1.0
    conv = F.conv2d(x.transpose(1, 2).reshape(2, C, G, G), kernel, padding=1, groups=C)
    fig, checks = Figure(figsize=(2.3 * len(alphas), 2.6)), {}
    for i, alpha in enumerate(alphas):
        layer = GPSA(C, num_heads=h, locality_strength=alpha)
        with torch.no_grad():
            layer.gating_param.fill_(lam)
            layer.proj.weight.copy_(torch.eye(C))
            layer.proj.bias.zero_()
            out = layer(x).transpose(1, 2).reshape(2, C, G, G)                # (B, C, G, G)
            P = layer.positional_attention(G * G)[5]                         # head 6: (+1, 0)
        err = (out - conv)[..., 1:-1, 1:-1].abs().max().item()
        checks[f"alpha={alpha:g}"] = {"on_its_patch": P[q, q + 1].item(), "conv_error": err,
                                      "nonlocality": nonlocality(P[None, None], G).item()}
        print(f"  alpha={alpha:<5g} head 6 puts {100 * P[q, q + 1]:5.1f}% on its patch, "
              f"non-locality {checks[f'alpha={alpha:g}']['nonlocality']:.2f} patches, "
              f"max |GPSA - 3x3 conv| {err:.1e}")
        ax = fig.add_subplot(1, len(alphas), i + 1)
        ax.imshow(P[q].view(G, G).numpy(), cmap="magma", vmin=0, vmax=1)
        ax.plot(q % G, q // G, "c+")
        ax.set_title(f"alpha={alpha:g}: {100 * P[q, q + 1]:.0f}% at (+1, 0)", fontsize=8)
        ax.axis("off")
    utils.show(fig, "demo_locality_strength")
    return checks


if utils.in_notebook():
    demo_locality_strength()


# %% [markdown]
# The gate sigma(lambda_h) slides each head between the two maps of eq. 7. Below, for one query
# of one head: its content softmax (weights drawn larger than at init, so that it has a shape to
# show), its positional softmax, and their mix for several gates. Each mix is a convex
# combination of two row-stochastic maps, so its rows already sum to 1 and eq. 6's normalize
# divides by 1.

# %%
def demo_gate_mix(grid=6, lambdas=(-3.0, 0.0, 1.0, 3.0)):
    """Eq. 7 for one query of head 1: content, positional, and the gated mix for each lambda."""
    G, q = grid, (grid // 2) * grid + grid // 2
    torch.manual_seed(0)
    layer, x = GPSA(16, num_heads=4), torch.randn(1, G * G, 16)             # conv init; (B, N, C)
    maps, err, raw = [], 0.0, 0.0
    with torch.no_grad():
        layer.qk.weight.normal_(std=0.5)
        c, p = layer.content_attention(x)[0, 0, q], layer.positional_attention(G * G)[0, q]
        for lam in lambdas:
            layer.gating_param[0] = lam
            s = torch.sigmoid(torch.tensor(lam))
            maps.append((f"lambda={lam:g}: sigma={s:.2f}", layer.get_attention(x)[0, 0, q]))
            err = max(err, (maps[-1][1] - ((1 - s) * c + s * p)).abs().max().item())
            raw = max(raw, ((1 - s) * c.sum() + s * p.sum() - 1).abs().item())
    fig = Figure(figsize=(2.2 * (len(maps) + 2), 2.6))
    for i, (title, a) in enumerate([("content softmax", c), ("positional softmax", p)] + maps):
        ax = fig.add_subplot(1, len(maps) + 2, i + 1)
        ax.imshow(a.view(G, G).numpy(), cmap="magma", vmin=0)
        ax.plot(q % G, q // G, "c+")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    print(f"  head 1, query {q}: mix = (1 - sigma) content + sigma positional up to {err:.1e}; "
          f"|row sum - 1| before normalising: {raw:.1e} (lambda=1: the init; 0: the ablation)")
    utils.show(fig, "demo_gate_mix")
    return {"mix_error": err, "row_sum_error": raw}


if utils.in_notebook():
    demo_gate_mix()


# %% [markdown]
# ### Optional: a faster GPSA (the same numbers)
#
# Each row of A^h already sums to 1, so A^h V = (1 - g_h) softmax(Q K^T / sqrt d) V + g_h P^h V.
# The content half is then one fused `F.scaled_dot_product_attention` (the (B, h, N, N) map is
# never stored), and the positional map P^h does not depend on the image: ONE (h, N, N) matrix
# for the whole batch, applied in one matmul per head (the official code expands r_ij to B
# copies). The models train with this class; the tests check it equals GPSA, outputs and
# gradients, with a different gate in every head. On a 2-core CPU the two train at the same
# speed (`--bench`: 0.96-1.04x): the gain is memory, and the fused kernel a GPU has.

# %%
class FastGPSA(GPSA):
    """GPSA computed as (1 - g) SDPA(q, k, v) + g P v with a batch-shared P. Same parameters."""

    def forward(self, x):
        B, N, C = x.shape
        h, d = self.num_heads, self.head_dim
        q, k = self.qk(x).reshape(B, N, 2, h, d).permute(2, 0, 3, 1, 4)      # (2, B, h, N, d)
        v = self.v(x).reshape(B, N, h, d)                                    # (B, N, h, d)
        content = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), scale=self.scale)
        v_cols = v.permute(2, 1, 0, 3).reshape(h, N, B * d)    # (h, N, B*d): batch in columns
        positional = self.positional_attention(N) @ v_cols     # (h, N, B*d): a matmul per head
        positional = positional.view(h, N, B, d).permute(2, 1, 0, 3)        # (B, N, h, d)
        gate = self.gate().view(h, 1)                          # (h, 1): over (B, N, h, d)
        out = (1 - gate) * content.transpose(1, 2) + gate * positional       # (B, N, h, d)
        return self.proj(out.reshape(B, N, C))                               # (B, N, C)


# %% [markdown]
# ## 3. ConViT (Sec. 3, Fig. 4)
#
# Patch embedding + a learned absolute position embedding -> `local_up_to_layer` blocks with GPSA
# on the N patch tokens -> the class token joins (GPSA needs a square grid of patches) -> blocks
# with plain multi-head self-attention (MHSA, eq. 1-3) -> LayerNorm -> a linear head on the class
# token. With local_up_to_layer = 0 the same code is DeiT, the baseline.

# %%
class MHSA(nn.Module):
    """Multi-head self-attention (eq. 1-3). x (B, T, C) -> (B, T, C)."""

    def __init__(self, dim, *, num_heads, qkv_bias=False):
        super().__init__()
        assert dim % num_heads == 0, f"dim={dim} must be divisible by num_heads={num_heads}"
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, x):
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim)
        return qkv.permute(2, 0, 3, 1, 4)                                  # (3, B, h, T, d)

    def get_attention(self, x):
        """Eq. 1: softmax(Q K^T / sqrt(d)). x (B, T, C) -> (B, h, T, T)"""
        q, k, _ = self._qkv(x)
        return (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)

    def forward(self, x):
        """get_attention(x) @ V per head (the fused kernel computes it), then W_out."""
        B, T, C = x.shape
        q, k, v = self._qkv(x)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)   # (B, h, T, d)
        return self.proj(out.transpose(1, 2).reshape(B, T, C))            # (B, T, C)


class Block(nn.Module):
    """Pre-norm block, x + attn(LN(x)) then x + MLP(LN(x)); attn is GPSA (its fast form unless
    fast=False, with **gpsa_kw) or MHSA. LayerNorm eps 1e-6 as in the official code."""

    def __init__(self, dim, *, num_heads, mlp_ratio=4.0, gpsa=False, fast=True, **gpsa_kw):
        super().__init__()
        self.use_gpsa = gpsa
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = ((FastGPSA if fast else GPSA)(dim, num_heads=num_heads, **gpsa_kw) if gpsa
                     else MHSA(dim, num_heads=num_heads))
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ConViT(nn.Module):
    """ConViT (Fig. 4); local_up_to_layer=0 is DeiT. x (B, 3, H, W) -> logits (B, classes)."""

    def __init__(self, *, img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=192,
                 depth=12, num_heads=4, mlp_ratio=4.0, local_up_to_layer=10,
                 locality_strength=1.0, use_local_init=True, fast=True, gate_scale=1.0):
        super().__init__()
        assert img_size % patch_size == 0, f"img_size={img_size} is not divisible by " \
                                           f"patch_size={patch_size}: change one of them"
        assert 0 <= local_up_to_layer < depth, f"local_up_to_layer={local_up_to_layer} must be " \
            f"in [0, depth={depth}): the class token needs an MHSA block after the GPSA blocks"
        self.local_up_to_layer, self.grid_size = local_up_to_layer, img_size // patch_size
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size ** 2, embed_dim))  # patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, gpsa=i < local_up_to_layer,
                  fast=fast, locality_strength=locality_strength, use_local_init=use_local_init,
                  gate_scale=gate_scale)
            for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():      # the ViT init of every linear layer ...
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for b in self.blocks:         # ... then eq. 5 in the GPSA blocks (as the official code)
            if b.use_gpsa and use_local_init:
                b.attn.local_init()

    def forward(self, x, return_attention=False):
        """With return_attention also, per block, the patch-to-patch attention (B, h, N, N) (in
        MHSA blocks the class token's row and column dropped and the rows renormalised)."""
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, C)
        maps = []
        for i, blk in enumerate(self.blocks):
            if i == self.local_up_to_layer:   # the class token joins after the last GPSA block
                x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, T, C)
            if return_attention:
                a = blk.attn.get_attention(blk.norm1(x))
                if not blk.use_gpsa:
                    a = a[:, :, 1:, 1:] / a[:, :, 1:, 1:].sum(-1, keepdim=True)    # (B, h, N, N)
                maps.append(a)
            x = blk(x)
        logits = self.head(self.norm(x)[:, 0])                          # (B, classes)
        return (logits, maps) if return_attention else logits


def gates(model):
    """sigma(lambda_h) of every GPSA block: (GPSA blocks, h); 1 = positional, 0 = content."""
    g = [b.attn.gate().detach() for b in model.blocks if b.use_gpsa]
    return torch.stack(g) if g else torch.zeros(0)


# %% [markdown]
# At init, how far does each layer look (eq. 8)? DeiT's attention starts near-uniform (q.k ~ 0),
# so it looks as far as a random patch; ConViT's GPSA blocks start local. The paper (Fig. 5)
# follows both over training: DeiT's layers become more local, ConViT's escape locality.

# %%
def demo_nonlocality_at_init(alpha=1.0, image_size=24, patch_size=4):
    """Non-locality (eq. 8) per layer at init: ConViT (2 GPSA blocks, then MHSA) vs DeiT."""
    torch.manual_seed(0)
    x, G = torch.randn(8, 3, image_size, image_size), image_size // patch_size
    kw = dict(img_size=image_size, patch_size=patch_size, embed_dim=48, depth=3, num_heads=4,
              mlp_ratio=2.0, locality_strength=alpha)      # the quick preset's models
    res = {}
    with torch.no_grad():
        for name, local in (("ConViT", 2), ("DeiT", 0)):
            _, maps = ConViT(local_up_to_layer=local, **kw).eval()(x, return_attention=True)
            res[name] = [nonlocality(a, G).mean().item() for a in maps]
            print(f"  {name:6s} non-locality per layer at init (patches): "
                  + ", ".join(f"{v:.2f}" for v in res[name]))
    fig = Figure(figsize=(5, 2.8))
    ax = fig.add_subplot(111)
    for i, (name, vals) in enumerate(res.items()):
        ax.bar([j + 1 + (i - 0.5) * 0.38 for j in range(3)], vals, width=0.38, label=name)
    ax.set(xlabel="layer (ConViT: 1-2 GPSA, 3 MHSA)", ylabel="non-locality (patches)",
           title=f"At init, {G}x{G} patches, alpha={alpha:g}")
    ax.legend()
    utils.show(fig, "demo_nonlocality_at_init")
    return res


if utils.in_notebook():
    demo_nonlocality_at_init()


# %% [markdown]
# ## What differs from the paper and the official code, and why
#
# - Data and recipe: CIFAR-10 at 24 x 24 (quick: patch 4, 36 tokens) or 32 x 32 (full: 64
#   tokens) instead of ImageNet at 224 (196 tokens), and DeiT's recipe without RandAugment,
#   mixup, CutMix, repeated augmentation and drop-path (random crop + flip and label smoothing
#   0.1 only): they are separate regularisers that would blur the comparison of the two
#   inductive biases, and they cost CPU time.
# - Gradients are clipped at norm 1.0 (`utils.train`'s default, the same in every arm); the
#   official code does not clip. Its effect on either model was not measured here.
# - The conv init is soft: at alpha = 1 a 4-head layer puts 77.2% of a query's positional
#   attention on the head's 2 x 2 block far from the borders, 84.3% on average over the queries
#   of a 6 x 6 grid (82.5% on 8 x 8), 99.6% at a corner (`--demo`, demo_conv_init). With the
#   gate at sigma(1) = 0.73 and a near-uniform content map, a GPSA layer starts as ~73% soft
#   local attention + ~27% global average; it is a convolution only in the sharp limit.
# - "No gating" in the ablation (Table 3, rows b and d) freezes lambda_h = 0, i.e. sigma = 0.5:
#   equal weight on content and position. That is the paper's own reading (its footnote 4: the
#   gates are frozen at lambda = 0 "so that the same amount of attention is paid to content and
#   position"); the other reading, sigma = 0, would delete the positional half and with it GPSA.
# - `FastGPSA` computes (1 - g) SDPA + g P V with one batch-shared P instead of the official
#   normalised sum of two (B, h, N, N) maps: the same numbers (tests).
# - Head centres: the official set of offsets in another order; a non-square head count gets
#   local centres too. r_ij is built in the weights' dtype.

# %% [markdown]
# ## Exercises
#
# 1. **The sharp limit is a convolution.** Run `demo_locality_strength(alphas=(6, 8, 10, 12))`
#    and find the smallest alpha at which the layer is within 1e-3 of the 3 x 3 convolution.
#    Expect the error to shrink about e-fold per unit of alpha (the neighbours of a head's patch
#    weigh e^-alpha relative to it): 7e-4 at alpha = 10. Then pass `lam=1.0`, the real init:
#    the error stays near 0.9 whatever alpha, since 27% of every row is content attention.
# 2. **Lower alpha.** `demo_nonlocality_at_init(alpha=0.1)`: expect the GPSA blocks to start
#    almost as non-local as DeiT (2.40 patches against 3.08), a ConViT without its prior. Then
#    train it: `--quick --experiment sample --locality-strength 0.1`. The paper (Fig. 8a) found
#    accuracy rising with alpha; here ConViT at alpha = 1 is already below DeiT (RESULTS.md).
# 3. **Freeze the gates at 1** (purely positional: a learnable soft convolution in every GPSA
#    block): `--quick --experiment ablation` trains it beside ConViT and the paper's Table 3
#    variants (24 runs, ~11 min). Expect little change: ConViT's learned gates barely leave
#    their start in these runs (0.73 -> 0.65-0.76 per head; the sample experiment prints them).
# 4. **Give DeiT 5x the data.** The sample experiment has it: compare DeiT at 1000 images per
#    class with DeiT and ConViT at 200 (runs/03_gpsa_convit/sample.json, paired by seed).
#    Expect +2.0 [+0.4, +3.7] points for DeiT from 5x the data, and DeiT at 1000 to beat
#    ConViT at 200 by +2.6 [+0.5, +4.7]: here data helps DeiT more than ConViT's prior does.


# %% [markdown]
# ---
# # The lab
#
# Presets and the command line, the paired runs (jobs), one `exp_*` per claim, the bench of the
# fast path, and `main`: every number in the docstring and in RESULTS.md comes from here.

# %%
PRESETS = {  # every setting of both presets; the common flags' too
    # 2-core CPU, <= 8 min on 2 workers; how the regime was chosen: runs/03_gpsa_convit/RESULTS.md
    "quick": dict(image_size=24, patch_size=3, embed_dim=36, num_heads=9, depth=4,
                  local_up_to_layer=2, mlp_ratio=2.0, gate_scale=10.0, cnn_widths=(16, 32, 64),
                  sizes=(50, 500), steps=400, batch_size=64, lr=2e-3, warmup_frac=0.05, seeds=4,
                  ablation_seeds=4, workers=2, threads=1, experiments=["sample"]),
    # ConViT-Ti (embed 192 = 4 heads x 48, 10 GPSA + 2 MHSA blocks) on 32 x 32 CIFAR-10, one GPU
    # (not measured here): 1000 epochs of 500 images per class, 100 of 5000
    "full": dict(image_size=32, patch_size=4, embed_dim=192, num_heads=4, depth=12,
                 local_up_to_layer=10, mlp_ratio=4.0, gate_scale=1.0, cnn_widths=(64, 128, 256),
                 sizes=(500, 5000), steps=39000, batch_size=128, lr=1e-3, warmup_frac=0.02,
                 seeds=3, ablation_seeds=3, workers=1, threads=None,
                 experiments=["sample", "controls", "ablation"]),
}
for _p in PRESETS.values():  # the same in both
    _p.update(locality_strength=1.0, weight_decay=0.05, eval_split="test", train_per_class=None,
              val_per_class=0, test_per_class=None)
FLAGS = {
    "embed_dim": "C, the token width", "depth": "L, the number of blocks",
    "num_heads": "h; a square number tiles a sqrt(h) x sqrt(h) grid of head centres",
    "local_up_to_layer": ("GPSA blocks before the class token joins (0: DeiT)", utils.nonneg_int),
    "patch_size": "P; the image size must be divisible by it", "mlp_ratio": "MLP width / C",
    "locality_strength": "alpha of eq. 5", "cnn_widths": "channels of the control CNN's stages",
    "sizes": "training images per class of the sample experiment (the smallest: the other ones')",
    "steps": "optimiser steps of every run, whatever its size (Table 2: same images seen)",
    "batch_size": "images per step", "lr": "AdamW peak learning rate (warmup, then cosine to 0)",
    "weight_decay": ("AdamW weight decay (not on biases, norms, gates, the position embedding "
                     "and class token; v_pos decays, as in the official code)",
                     utils.nonneg_float),
    "gate_scale": ("s in lambda_h = s theta_h: under Adam, the gates' learning rate times s "
                   "(1: the paper)", utils.positive_float),
    "warmup_frac": ("linear warmup, a fraction of each run's steps", utils.nonneg_float),
    "seeds": "paired seeds (--seed, --seed+1, ...) of every experiment but the ablation",
    "ablation_seeds": "paired seeds of the ablation (the first of --seeds)",
    "eval_split": ("score on the test set, or on --val-per-class images per class carved from the "
                   "training split (how the quick regime was chosen)",
                   {"choices": ("test", "val")}),
}
EXPERIMENTS = ("sample", "controls", "ablation")


def check(args):
    """Settings that do not fit together -> one line (utils.cli prints it and exits 2)."""
    if "ablation_seeds" in args.preset_keys:        # the preset's count follows a smaller --seeds
        args.ablation_seeds = min(args.ablation_seeds, args.seeds)
    for bad, msg in [
            (args.image_size % args.patch_size, f"--image-size {args.image_size} is not divisible "
                                                f"by --patch-size {args.patch_size}"),
            (args.embed_dim % args.num_heads, f"--embed-dim {args.embed_dim} is not divisible by "
                                              f"--num-heads {args.num_heads}"),
            (args.local_up_to_layer >= args.depth, f"--local-up-to-layer must be < --depth "
                                                   f"{args.depth}: the class token needs a block"),
            (args.warmup_frac >= 1, f"--warmup-frac must be < 1, got {args.warmup_frac}"),
            (args.eval_split == "val" and not args.val_per_class,
             "--eval-split val needs a validation set: add e.g. --val-per-class 500"),
            (args.ablation_seeds > args.seeds, f"--ablation-seeds {args.ablation_seeds} is more "
                                               f"than --seeds {args.seeds}: they are its first")]:
        if bad:
            raise utils.InputError(msg)
    args.sizes = tuple(sorted(set(args.sizes)))


def cli_args(argv=None):
    return utils.cli(__doc__, PRESETS, FLAGS, argv, experiments=EXPERIMENTS, check=check,
                     bench="train-step speed of GPSA's fast path and of the reference form")


def fit_sizes(args, data):
    """The preset's sizes shrink to a small dataset by ONE factor (they stay as far apart, and
    every run keeps its --steps); a size the user asked for that does not exist is an error."""
    smallest, old = int(torch.bincount(data.y_train).min()), args.sizes
    if max(old) <= smallest:
        return
    if "sizes" not in args.preset_keys:
        raise utils.InputError(f"--sizes {max(old)} is more than the {smallest} training images "
                               f"of the smallest class; use at most {smallest}")
    args.sizes = tuple(sorted({max(1, round(n * smallest / max(old))) for n in old}))
    print(f"note: this dataset is smaller than the preset (smallest class: {smallest} training "
          f"images), so --sizes {','.join(map(str, old))} -> {','.join(map(str, args.sizes))} "
          f"(same ratio; every run keeps its {args.steps} steps)", flush=True)


# %% [markdown]
# ### The arms, paired: one seed = one data subset, one batch order, one augmentation, and
# DeiT's initial value for every weight an arm shares with DeiT. The arms differ only by design.

# %%
def small_cnn(widths, num_classes):
    """Control with locality and weight sharing hard-wired: stages of conv3x3, BatchNorm, GELU
    with 2x2 max-pooling between them, global average pooling, a linear head."""
    layers, c = [], 3
    for i, w in enumerate(widths):
        layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.GELU()]
        layers += [nn.MaxPool2d(2)] * (i < len(widths) - 1)
        c = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))


ARMS = {"deit": "DeiT", "convit": "ConViT", "cnn": "small CNN", "linear": "linear on pixels",
        "positional": "ConViT, gates frozen at 1 (positional)",
        "frozen_gate": "ConViT, gates frozen at lambda=0", "no_conv_init": "ConViT, no conv init",
        "frozen_gate_no_conv_init": "ConViT, frozen gates + no conv init"}


def build_model(args, num_classes, *, convit=True, use_local_init=True, fast=True):
    return ConViT(img_size=args.image_size, patch_size=args.patch_size, num_classes=num_classes,
                  embed_dim=args.embed_dim, depth=args.depth, num_heads=args.num_heads,
                  mlp_ratio=args.mlp_ratio, local_up_to_layer=args.local_up_to_layer * convit,
                  locality_strength=args.locality_strength, use_local_init=use_local_init,
                  fast=fast, gate_scale=args.gate_scale)


@torch.no_grad()
def pair_init(deit, model, *, copy_values=False):
    """Give `model` DeiT's initial value of every weight they share: same-named tensors, and in
    GPSA blocks DeiT's query/key rows (and value rows when W_val = I is off). -> tensors copied"""
    n = len(utils.copy_shared_init(deit, model))
    for bd, bm in zip(deit.blocks, model.blocks):
        if bm.use_gpsa:
            C = bm.attn.dim
            bm.attn.qk.weight.copy_(bd.attn.qkv.weight[:2 * C])   # rows: [queries; keys; values]
            if copy_values:
                bm.attn.v.weight.copy_(bd.attn.qkv.weight[2 * C:])
            n += 1 + copy_values
    return n


def build_arm(args, arm, num_classes, seed):
    """The model of one arm, seeded: the same seed gives every arm the same shared weights."""
    assert arm in ARMS, f"unknown arm {arm!r}: one of {list(ARMS)}"
    torch.manual_seed(seed)
    if arm in ("cnn", "linear"):
        return (small_cnn(args.cnn_widths, num_classes) if arm == "cnn"
                else nn.Sequential(nn.Flatten(), nn.Linear(3 * args.image_size ** 2, num_classes)))
    deit = build_model(args, num_classes, convit=False)
    if arm == "deit":
        return deit
    model = build_model(args, num_classes, use_local_init="no_conv_init" not in arm)
    pair_init(deit, model, copy_values="no_conv_init" in arm)
    if arm == "positional" or "frozen_gate" in arm:
        # lambda_h fixed: +inf = sigma 1, purely positional; 0 = the paper's "no gating" (sigma
        # 0.5, its footnote 4)
        for blk in model.blocks[:args.local_up_to_layer]:
            blk.attn.gating_param.data.fill_(math.inf if arm == "positional" else 0.0)
            blk.attn.gating_param.requires_grad_(False)
    return model


def full_preset_models(num_classes=10):
    """Every model the full preset trains, at its real size: name -> (model, step_fn, image
    size). tests/test_utils.py takes one bf16 step of each, so a GPU run is known to start."""
    args = cli_args([])
    return {ARMS[a]: (build_arm(args, a, num_classes, seed=0), None, args.image_size)
            for a in ("deit", "convit", "positional", "cnn", "linear")}


# %% [markdown]
# ### Runs as jobs: `run_job(args, ref, arm, n, seed)` is seeded throughout, so `utils.run_jobs`
# may train it in any worker process with the same result. Every run takes `--steps` steps
# whatever its size n: a smaller set is seen for more epochs (paper Table 2).

# %%
_DATA = {}  # the dataset, loaded once per process: {reference: utils.Data}


def share_data(data, workers):
    """Register `data` here and, for workers, write it to a temporary file. -> reference"""
    fd, ref = tempfile.mkstemp(prefix="gpsa_convit_data_", suffix=".pt")
    os.close(fd)
    if workers > 1:
        torch.save({f.name: getattr(data, f.name) for f in dataclasses.fields(data)}, ref)
    _DATA[ref] = data
    return ref


def nested_subset(y, n, seed):
    """n images per class, cut from one seeded order: a smaller size is part of a larger one."""
    g, keep = torch.Generator().manual_seed(seed), []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        keep.append(idx[torch.randperm(len(idx), generator=g)][:n])
    return torch.cat(keep).sort().values


def eval_split(args, data):
    return (data.x_val, data.y_val) if args.eval_split == "val" else (data.x_test, data.y_test)


@torch.no_grad()
def locality(model, probe):
    """Eq. 8 per layer and the gates on a fixed batch (no random numbers: changes no run)."""
    model.eval()
    _, maps = model(probe, return_attention=True)
    model.train()
    return {"nonlocality": [nonlocality(a, model.grid_size).mean().item() for a in maps],
            "gates": gates(model).tolist()}                     # (GPSA blocks, h)


def run_job(args, ref, arm, n, seed):
    """One run: `arm` on n images per class drawn with `seed`, the batches of `seed`, about
    --steps steps, scored on the whole evaluation split. -> dict of numbers"""
    t0 = time.time()
    if ref not in _DATA:                                        # a worker: read main's copy
        _DATA[ref] = utils.Data(**torch.load(ref))
    data, device = _DATA[ref], utils.get_device(args.device)
    idx = nested_subset(data.y_train, n, seed)
    kw = dict(device=device, mean=data.mean, std=data.std)
    loader = utils.DeviceLoader(data.x_train[idx], data.y_train[idx], batch_size=args.batch_size,
                                train=True, seed=seed, **kw)
    epochs = max(1, round(args.steps / len(loader)))
    model = build_arm(args, arm, data.num_classes, seed).to(device)
    x_ev, y_ev = eval_split(args, data)
    evl = utils.DeviceLoader(x_ev, y_ev, batch_size=500, train=False, **kw)
    spread = torch.linspace(0, len(y_ev) - 1, min(128, len(y_ev))).long()  # every class, in order
    probe = utils.DeviceLoader(x_ev[spread], y_ev[spread], batch_size=128, train=False, **kw)
    is_vit, probe = isinstance(model, ConViT), next(iter(probe))[0]
    start = locality(model, probe) if is_vit else None
    hist = utils.train(model, loader, epochs=epochs, lr=args.lr, weight_decay=args.weight_decay,
                       warmup_epochs=args.warmup_frac * epochs, label_smoothing=0.1,
                       grad_clip=1.0, log=lambda line: None)
    score = utils.evaluate(model, evl)
    # the training images themselves, un-augmented: what the model has fitted
    seen = utils.DeviceLoader(data.x_train[idx], data.y_train[idx], batch_size=500, train=False,
                              **kw)
    fitted = utils.evaluate(model, seen)
    res = {"arm": arm, "n": n, "seed": seed, "acc": score.acc, "nll": score.nll,
           "train_acc": fitted.acc, "gap": fitted.acc - score.acc,
           "train_acc_augmented": hist[-1]["train_acc"], "images": len(idx), "epochs": epochs,
           "steps": epochs * len(loader), "params": utils.count_params(model),
           "locality": {"start": start, "end": locality(model, probe)} if is_vit else None,
           "seconds": round(time.time() - t0, 1)}
    print(f"  [{ARMS[arm]}, {n}/class, seed {seed}] {args.eval_split} {score.acc:.1f}% nll "
          f"{score.nll:.3f} | train {res['train_acc']:.1f}% | {res['steps']} steps, "
          f"{res['seconds']:.0f}s", flush=True)
    return res


def train_runs(args, ref, keys):
    """Every run (arm, n, seed) in `keys` once, on --workers processes. -> {key: result}"""
    todo = sorted(dict.fromkeys(keys), key=lambda k: k[0] in ("cnn", "linear"))  # stable
    print(f"  training {len(todo)} runs on {min(args.workers, len(todo))} worker(s) ...",
          flush=True)
    return dict(zip(todo, utils.run_jobs(run_job, [(args, ref, *k) for k in todo],
                                         workers=args.workers)))


# The experiments, one per claim: each reads its runs, prints its table and verdicts, returns JSON.
NEEDS = {  # experiment -> the runs (arm, images per class, seed) it reads
    "sample": lambda a: [(arm, n, s) for n in a.sizes for s in seeds(a)
                         for arm in ("deit", "convit", "linear")],
    "controls": lambda a: [(arm, n, s) for n in a.sizes for s in seeds(a)
                           for arm in ("deit", "linear") + ("cnn",) * (n == min(a.sizes))],
    "ablation": lambda a: [(arm, min(a.sizes), s) for s in seeds(a, a.ablation_seeds)
                           for arm in ("convit", "positional", "frozen_gate", "no_conv_init",
                                       "frozen_gate_no_conv_init", "deit")],
}


def seeds(args, k=None):
    return [args.seed + i for i in range(k or args.seeds)]


def get(runs, arm, n, args, k=None):  # the runs of one arm and size, in seed order
    return [runs[arm, n, s] for s in seeds(args, k)]


def ci(rs, key, digits=1):
    return utils.fmt_ci(utils.mean_ci([r[key] for r in rs]), digits)


def per_seed(rs):
    return [{k: r[k] for k in ("seed", "acc", "nll", "train_acc", "gap")} for r in rs]


def verdicts(a, b, name_a, name_b):
    """The paired verdicts of arm A against arm B over the same seeds: accuracy and NLL."""
    kw = dict(name_a=name_a, name_b=name_b)
    return {"acc": utils.compare_paired([r["acc"] for r in a], [r["acc"] for r in b], **kw,
                                        log=lambda s: print("    accuracy: " + s, flush=True)),
            "nll": utils.compare_paired([r["nll"] for r in a], [r["nll"] for r in b], **kw,
                                        unit="nats", digits=3, higher_is_better=False, bound=0.02,
                                        log=lambda s: print("    NLL:      " + s, flush=True))}


def print_table(header, rows):
    w = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    for r in [header] + rows:
        print("  " + " | ".join(str(c).rjust(w[i]) for i, c in enumerate(r)), flush=True)


def save_figure(fig, out, name):
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"{name}.png"), dpi=100)


def entry_checks(args, runs):
    """The regime's preconditions, printed before any verdict: DeiT overfits the small set (the
    claim is about data as the limit), and DeiT beats a linear classifier on pixels at every
    size (it learned features). -> {name: met}"""
    n, held = min(args.sizes), "held-out" if args.eval_split == "test" else "validation"
    deit = get(runs, "deit", n, args)
    gap = sum(r["gap"] for r in deit) / len(deit)
    met = {f"gap@{n}": gap >= 15}
    print(f"entry check: sample efficiency: DeiT train \u2212 {held} accuracy at {n}/class = "
          f"{gap:.1f} points (needs \u2265 15) \u2192 {'met' if gap >= 15 else 'not met'}",
          flush=True)
    for m in args.sizes:
        v = utils.compare_paired([r["acc"] for r in get(runs, "deit", m, args)],
                                 [r["acc"] for r in get(runs, "linear", m, args)],
                                 name_a="DeiT", name_b="linear on pixels", log=None)
        met[f"deit>linear@{m}"] = v["ci"][0] > 0
        print(f"entry check: sample efficiency: DeiT \u2212 linear on pixels at {m}/class = "
              f"{_signed(v['diff'])} points, 95% CI [{_signed(v['ci'][0])}, "
              f"{_signed(v['ci'][1])}] (needs CI above 0) \u2192 "
              f"{'met' if met[f'deit>linear@{m}'] else 'not met'}", flush=True)
    return met


def _signed(v):
    return f"{v:+.1f}".replace("-", "\u2212")


def gate_report(args, runs, n):
    """The gates sigma(lambda_h) after training at n images per class, mean over seeds, per
    GPSA block and head; a head has left position when its gate is below 0.5. -> (L', h)"""
    g = torch.tensor([r["locality"]["end"]["gates"] for r in get(runs, "convit", n, args)])
    mean = g.mean(0)                                                       # (L', h)
    for i, row in enumerate(mean.tolist()):
        content = [h + 1 for h, v in enumerate(row) if v < 0.5]
        print(f"  gates after training, {n}/class, GPSA block {i + 1} (start 0.73): "
              + " ".join(f"{v:.2f}" for v in row)
              + f" | heads mostly content (< 0.5): {content or 'none'}", flush=True)
    return g


def exp_sample(args, runs, out):
    """Paper Table 2: ConViT vs DeiT at each training-set size, the same steps, paired seeds;
    each arm's train - held-out gap; the change of the gain; the gates after training."""
    print(f"\n== sample efficiency (paper Table 2): ConViT vs DeiT at {args.sizes} images per "
          f"class, {args.seeds} paired seeds, scored on {args.eval_split} ==", flush=True)
    res = {"entry": entry_checks(args, runs), "sizes": []}
    rows = []
    for n in args.sizes:
        d = get(runs, "deit", n, args)
        c = get(runs, "convit", n, args)
        lin = get(runs, "linear", n, args)
        print(f"  {n} images per class ({d[0]['images']} images, {d[0]['epochs']} epochs, "
              f"{d[0]['steps']} steps): ConViT vs DeiT")
        size = {"n": n, "images": d[0]["images"], "epochs": d[0]["epochs"],
                "steps": d[0]["steps"], "deit": per_seed(d), "convit": per_seed(c),
                "linear": per_seed(lin), "verdict": verdicts(c, d, "ConViT", "DeiT")}
        print("    gap:      ", end="")
        size["gap_verdict"] = utils.compare_paired(
            [r["gap"] for r in c], [r["gap"] for r in d], name_a="ConViT's gap",
            name_b="DeiT's gap", higher_is_better=False, log=print)
        res["sizes"].append(size)
        rows.append([n, d[0]["epochs"], d[0]["steps"], ci(lin, "acc"), ci(d, "acc"),
                     ci(c, "acc"), ci(d, "nll", 3), ci(c, "nll", 3), ci(d, "train_acc"),
                     ci(c, "train_acc"), ci(d, "gap"), ci(c, "gap")])
    print_table(["img/class", "epochs", "steps", "linear %", "DeiT %", "ConViT %", "DeiT NLL",
                 "ConViT NLL", "DeiT train %", "ConViT train %", "DeiT gap", "ConViT gap"],
                rows)
    if len(args.sizes) > 1:  # does the gain shrink as the data grow (paper Table 2)?
        lo, hi = res["sizes"][0], res["sizes"][-1]
        print(f"  the change of the gain from {lo['n']} to {hi['n']} images per class (same "
              f"seeds: paired):")
        res["gain_change"] = {}
        for key, unit, digits, better in (("acc", "points", 1, True), ("nll", "nats", 3, False)):
            gain = [s["verdict"][key]["per_pair"] for s in (lo, hi)]
            res["gain_change"][key] = utils.compare_paired(
                *gain, name_a=f"gain at {lo['n']}/class", name_b=f"gain at {hi['n']}/class",
                unit=unit, digits=digits, higher_is_better=better,
                bound=1.0 if key == "acc" else 0.02,
                log=lambda line: print(f"    {'accuracy' if key == 'acc' else 'NLL':9s} " + line,
                                       flush=True))
    res["locality"] = {}
    for n in args.sizes:  # where the attention looks (eq. 8, Fig. 5) and the gates (Fig. 6)
        res["locality"][n] = {a: [x["locality"] for x in get(runs, a, n, args)]
                              for a in ("deit", "convit")}
        nl = {a: torch.tensor([[x[w]["nonlocality"] for w in ("start", "end")] for x in v]).mean(0)
              for a, v in res["locality"][n].items()}                       # (2, L)
        print(f"  non-locality per layer (patches), start -> end, {n}/class: "
              + "; ".join(f"{ARMS[a]} " + ", ".join(f"{s:.2f} -> {e:.2f}" for s, e in v.T.tolist())
                          for a, v in nl.items()), flush=True)
        gate_report(args, runs, n)
    sample_figure(args, res, out)
    return res


def sample_figure(args, res, out):
    fig = Figure(figsize=(9, 3.4))
    ax, bx = fig.subplots(1, 2)

    def bars(a, cis, **kw):
        means = [m for m, _, _ in cis]
        yerr = [[m - lo for m, lo, _ in cis], [hi - m for m, _, hi in cis]]
        a.errorbar(args.sizes, means, yerr=yerr, capsize=4, **kw)

    for kind in ("linear", "deit", "convit"):
        bars(ax, [utils.mean_ci([r["acc"] for r in s[kind]]) for s in res["sizes"]], fmt="o-",
             label=ARMS[kind])
    bars(bx, [(s["verdict"]["acc"]["diff"], *s["verdict"]["acc"]["ci"]) for s in res["sizes"]],
         fmt="o", color="tab:green")
    bx.axhline(0, color="grey", lw=0.8)
    ax.set(ylabel=f"{args.eval_split} accuracy % (mean, 95% CI)", title="Sample efficiency")
    bx.set(ylabel="ConViT - DeiT, points", title=f"paired gain, 95% CI, n={args.seeds}")
    for a in (ax, bx):
        a.set(xscale="log", xlabel=f"training images per class ({args.steps} steps each)")
        a.set_xticks(args.sizes, [str(n) for n in args.sizes])
        a.minorticks_off()
    ax.legend()
    save_figure(fig, out, "sample")


def exp_controls(args, runs, out):
    """Does DeiT learn here (it must beat a linear classifier on pixels), and what is a
    hard-wired locality prior worth at this budget (a small CNN)?"""
    n = min(args.sizes)
    print(f"\n== controls: linear classifier on pixels, small CNN, {args.seeds} paired seeds ==",
          flush=True)
    r = {(a, m): get(runs, a, m, args) for a, m, _ in dict.fromkeys(
        (a, m, 0) for a, m, _ in NEEDS["controls"](args))}
    print_table(["model", "img/class", "params", f"{args.eval_split} % [95% CI]", "NLL",
                 "train %"], [[ARMS[a], m, rs[0]["params"], ci(rs, "acc"), ci(rs, "nll", 3),
                               ci(rs, "train_acc")] for (a, m), rs in r.items()])
    res = {"arms": {f"{a}@{m}": per_seed(rs) for (a, m), rs in r.items()}, "verdicts": {}}
    for m in args.sizes:
        print(f"  DeiT vs linear on pixels at {m}/class (does DeiT learn?):")
        res["verdicts"][f"deit-linear@{m}"] = verdicts(r["deit", m], r["linear", m], "DeiT",
                                                       "linear on pixels")
    print(f"  small CNN vs DeiT at {n}/class:")
    res["verdicts"][f"cnn-deit@{n}"] = verdicts(r["cnn", n], r["deit", n], "small CNN", "DeiT")
    return res


def exp_ablation(args, runs, out):
    """Paper Table 3 at the small size: which of the gates and the conv init carries the gain?
    Also the gates frozen at 1 (purely positional)."""
    n, k = min(args.sizes), args.ablation_seeds
    print(f"\n== ablation (paper Table 3) at {n} images per class, {k} paired seeds ==",
          flush=True)
    arms = [a for a, _, s in NEEDS["ablation"](args) if s == args.seed]
    r = {a: get(runs, a, n, args, k) for a in arms}
    diff = lambda a, b: utils.fmt_ci(utils.mean_ci(  # noqa: E731
        [x["acc"] - y["acc"] for x, y in zip(r[a], r[b])]), 1) if a != b else ""
    print_table(["variant", f"{args.eval_split} % [95% CI]", "NLL", "- DeiT", "- ConViT"],
                [[ARMS[a], ci(r[a], "acc"), ci(r[a], "nll", 3), diff(a, "deit"),
                  diff(a, "convit")] for a in arms])
    res = {"n": n, "variants": {a: per_seed(r[a]) for a in arms}, "verdicts": {}}
    for a, b in [(a, "convit") for a in arms[1:-1]] + [(a, "deit") for a in arms[:-1]]:
        print(f"  {ARMS[a]} vs {ARMS[b]}:")
        res["verdicts"][f"{a}-{b}"] = verdicts(r[a], r[b], ARMS[a], ARMS[b])
    return res


EXPERIMENT_FNS = {"sample": exp_sample, "controls": exp_controls, "ablation": exp_ablation}


# %% [markdown]
# ### Bench: the optional fast path against the reference form

# %%
def bench(args, device, out):
    """Train-step images/s (forward + backward, batch 128) of ConViT with GPSA in the reference
    and in the fast form, at the quick and the full (ConViT-Ti) sizes."""
    res = {}
    for size, cfg in (("quick", PRESETS["quick"]), ("ConViT-Ti", PRESETS["full"])):
        ns = type(args)(**{**vars(args), **cfg})
        for form in ("reference", "fast"):
            torch.manual_seed(0)
            res[f"{size}, {form}"] = utils.measure_step(
                build_model(ns, 10, fast=form == "fast").to(device), (3, ns.image_size,
                                                                     ns.image_size),
                batch_size=128, device=device, steps=3, warmup=1)[0]
        ref, fast = res[f"{size}, reference"], res[f"{size}, fast"]
        print(f"  {size} ({(ns.image_size // ns.patch_size) ** 2} tokens, C={ns.embed_dim}): "
              f"ConViT train step {ref:.0f} -> {fast:.0f} img/s ({fast / ref:.2f}x)", flush=True)
    utils.save_results(os.path.join(out, "bench.json"), vars(args), res)
    return res


# %%
DEMOS = [demo_conv_init, demo_locality_strength, demo_gate_mix, demo_nonlocality_at_init]


def main(argv=None):
    args = cli_args(argv)
    device, out = utils.start(args, "03_gpsa_convit")
    if args.mode == "demo":
        return utils.run_demos(out, DEMOS)
    if args.mode == "bench":
        print(f"== bench on {device}, {torch.get_num_threads()} thread(s) ==", flush=True)
        return bench(args, device, out)
    data = utils.data_from_args(args)
    fit_sizes(args, data)
    print(f"data: {len(data.x_train)} training images to draw from, "
          f"{len(eval_split(args, data)[1])} {args.eval_split} images, "
          f"{(args.image_size // args.patch_size) ** 2} patches per image; {device}", flush=True)
    ref, results, t0 = share_data(data, args.workers), {}, time.time()
    try:
        runs = train_runs(args, ref, [k for e in args.experiments for k in NEEDS[e](args)])
        for name in args.experiments:
            results[name] = EXPERIMENT_FNS[name](args, runs, out)
            results[name]["train_core_s"] = round(sum(runs[k]["seconds"] for k in
                                                      dict.fromkeys(NEEDS[name](args))), 1)
            utils.save_results(os.path.join(out, f"{name}.json"), vars(args), results[name])
    finally:
        os.remove(ref)
        _DATA.pop(ref)
    print(f"\n== {', '.join(args.experiments)} done in {time.time() - t0:.0f}s -> {out} ==",
          flush=True)
    utils.save_results(os.path.join(out, "results.json"), vars(args), results)
    return results


if __name__ == "__main__":
    utils.run_main(main)
