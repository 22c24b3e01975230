"""Attention can be a convolution: self-attention and convolutional layers, side by side.

Paper: On the Relationship between Self-Attention and Convolutional Layers, Jean-Baptiste
Cordonnier, Andreas Loukas and Martin Jaggi, ICLR 2020 (arXiv:1911.03584). Compared with
local self-attention (SASA: Ramachandran et al., NeurIPS 2019, arXiv:1906.05909) and axial
attention (Axial-DeepLab: Wang et al., ECCV 2020, arXiv:2003.07853).

Run:
    python 01_conv_vs_attention.py --demo                  # no data, seconds: checks, figures
    python 01_conv_vs_attention.py --quick --data cifar10  # 2-core CPU, ~8 min (or --data DIR)
    python 01_conv_vs_attention.py --data cifar10          # full preset: one GPU
    python 01_conv_vs_attention.py --bench --threads 1     # SASA: reference vs fast path
"""
import copy
import functools
import math
import os
import time
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

import utils

# %% [markdown]
# # Attention can be a convolution
#
# A convolution mixes each pixel with its $K \times K$ neighbours, with one fixed weight
# matrix per offset. Self-attention mixes each pixel with *every* pixel, with weights computed
# from the data. Cordonnier et al. prove that the second contains the first: a multi-head
# self-attention layer with $K^2$ heads and a relative positional encoding can compute any
# $K \times K$ convolution (their Theorem 1). Each head looks at one kernel offset, and its
# output projection carries the kernel's weights for that offset.
#
# This script builds that attention layer from any `nn.Conv2d` and checks that it *is* the
# convolution. Then it puts three spatial operators into one small ResNet and trains them on
# CIFAR-10: the $3 \times 3$ convolution, local self-attention over a window (SASA) and axial
# attention along columns and rows.
#
# **What you will learn**
# - how relative positions enter self-attention over pixels, and how the quadratic encoding
#   $r_\delta = (\lVert\delta\rVert^2, \delta_1, \delta_2)$ lets one head look at one offset;
# - Theorem 1 as code: a convolution rebuilt from $K^2$ attention heads, exact only in the
#   limit of a large locality strength $\alpha$, and how large is large enough in float32;
# - local (SASA) and axial attention in their plain form, and which input pixels one output
#   pixel of each layer depends on;
# - how to compare operators fairly: parameter-matched models, paired seeds, and a verdict
#   with its 95% confidence interval.
#
# Letters follow the README's notation table: $B$ batch, $C$ channels, $H \times W$ map,
# $N = HW$ queries, $M$ keys, $N_h$ heads of $d$ channels, $\delta = k - q$ the offset from a
# query pixel $q$ to a key pixel $k$.

# %% [markdown]
# ## 1. Self-attention over pixels, with relative positions (Cordonnier et al., sec. 2-3)
#
# An image is a grid of $N = HW$ pixels, each a vector $X_q \in \mathbb{R}^{C}$. Head $h$
# scores query pixel $q$ against key pixel $k$ by content and by their offset
# $\delta = k - q$:
#
# $$A^h_{qk} = \frac{(X_q W^h_Q)(X_k W^h_K)^\top}{\sqrt{d}} + v_h^\top r_\delta,\qquad
#   \mathrm{MHSA}(X)_q = \sum_h \sum_k \mathrm{softmax}_k(A^h_{qk})\, X_k W^h_V W^h_O.$$
#
# The positional term sees $q$ and $k$ only through $\delta$: it is the same at every place
# of the image, as a convolution's weights are. So the first building block is the table of
# offsets. Queries sit on the $H \times W$ grid; keys sit on the same grid padded by $P$
# pixels (`key_padding`), as a convolution with padding $P$ sees it (section 2 needs this).

# %%
def relative_offsets(H, W, key_padding=0, device=None):
    """The offset delta = k - q of every (query, key) pair, as two (N, M) int64 tensors:
    delta_1 in rows (down is +), delta_2 in columns (right is +). Keys live on the grid
    padded by P = key_padding pixels, so M = (H + 2P)(W + 2P)."""
    P = key_padding
    rows = torch.arange(H, device=device)
    cols = torch.arange(W, device=device)
    qy, qx = torch.meshgrid(rows, cols, indexing="ij")          # (H, W) query positions
    key_rows = torch.arange(-P, H + P, device=device)
    key_cols = torch.arange(-P, W + P, device=device)
    ky, kx = torch.meshgrid(key_rows, key_cols, indexing="ij")  # (H+2P, W+2P) key positions
    dy = ky.flatten()[None] - qy.flatten()[:, None]             # (N, M) delta_1
    dx = kx.flatten()[None] - qx.flatten()[:, None]             # (N, M) delta_2
    return dy, dx


# %% [markdown]
# ### Two encodings of the offset
#
# **Quadratic** (the paper's eq. 9): a fixed 3-vector
# $r_\delta = (\lVert\delta\rVert^2, \delta_1, \delta_2)$ and a learned $v_h \in \mathbb{R}^3$
# per head. The score $v_h^\top r_\delta$ is then a quadratic function of $\delta$: with
# $v_h = -\alpha(1, -2\Delta_{h,1}, -2\Delta_{h,2})$ it equals
# $-\alpha(\lVert\delta - \Delta_h\rVert^2 - \lVert\Delta_h\rVert^2)$, a bump centred on the
# offset $\Delta_h$ whose sharpness is $\alpha$. It does not depend on the image at all.
#
# **Learned** (SASA's): two tables of vectors, $r^{row}_{\delta_1}$ and $r^{col}_{\delta_2}$,
# of $d/2$ channels each, concatenated and scored against the query:
# $(X_q W_Q)^\top [r^{row}_{\delta_1}; r^{col}_{\delta_2}] / \sqrt{d}$. It depends on the
# image through the query. A table of side $S$ (`max_size`) holds the offsets
# $-(S-1) \dots S-1$, so row $i$ is offset $i - (S - 1)$.

# %%
def quadratic_logits(pos_v, dy, dx, dtype):
    """v_h . r_delta with r_delta = (|delta|^2, delta_1, delta_2) (eq. 9), for every head
    and pair. pos_v (N_h, 3); dy, dx (N, M) -> (N_h, N, M), the same for every image."""
    r = torch.stack([dy * dy + dx * dx, dy, dx], -1).to(dtype)  # (N, M, 3) r_delta
    return torch.einsum("nmc,hc->hnm", r, pos_v)


def learned_logits(q, rel_row, rel_col, dy, dx):
    """q . [r_row[delta_1]; r_col[delta_2]] / sqrt(d) for every pair. q (B, N_h, N, d);
    rel_row, rel_col (2S - 1, d/2); dy, dx (N, M) -> (B, N_h, N, M)."""
    B, heads, N, d = q.shape
    S = (rel_row.shape[0] + 1) // 2
    # score every query against every table row once: (B, N_h, N, 2S - 1) per half of q
    qr_row = q[..., : d // 2] @ rel_row.T
    qr_col = q[..., d // 2:] @ rel_col.T
    # then pick, for every pair, the row of its offset: (B, N_h, N, M)
    idx_row = (dy + S - 1).expand(B, heads, -1, -1)
    idx_col = (dx + S - 1).expand(B, heads, -1, -1)
    qr = qr_row.gather(-1, idx_row) + qr_col.gather(-1, idx_col)
    return qr / math.sqrt(d)


# %% [markdown]
# ### The layer
#
# `MultiHeadSelfAttention2d` puts the pieces together on a $(B, C, H, W)$ map: project every
# pixel to queries, keys and values ($N_h$ heads of $d$ channels), add the positional logits
# to the content logits, take the softmax over the keys, and project the concatenated heads
# with $W_O$. `positional=None` is content-only attention. The tests check both encodings
# against a loop over pixel pairs.

# %%
class MultiHeadSelfAttention2d(nn.Module):
    """Global multi-head self-attention over the pixels of a (B, C, H, W) map."""

    def __init__(self, dim, *, num_heads, head_dim=None, out_dim=None, positional=None,
                 max_size=32, key_padding=0, qkv_bias=True, proj_bias=True):
        super().__init__()
        if positional not in (None, "quadratic", "learned"):
            raise ValueError(f"positional: None, 'quadratic' or 'learned', not {positional!r}")
        if head_dim is None and dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}; "
                             f"pass head_dim")
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        self.positional = positional
        self.max_size = max_size
        self.key_padding = key_padding
        d = self.head_dim
        inner = num_heads * d
        self.query = nn.Linear(dim, inner, bias=qkv_bias)             # W_Q of all heads
        self.key = nn.Linear(dim, inner, bias=qkv_bias)               # W_K
        self.value = nn.Linear(dim, inner, bias=qkv_bias)             # W_V
        self.proj = nn.Linear(inner, out_dim or dim, bias=proj_bias)  # W_O: heads -> C_out
        if positional == "quadratic":
            self.pos_v = nn.Parameter(torch.randn(num_heads, 3) * 0.1)  # v_h per head
        if positional == "learned":
            if d % 2:
                raise ValueError(f"learned embeddings split d into rows and columns: "
                                 f"head_dim {d} must be even")
            rows = 2 * max_size - 1                      # offsets -(S-1) .. S-1
            self.rel_row = nn.Parameter(torch.randn(rows, d // 2) * d ** -0.5)
            self.rel_col = nn.Parameter(torch.randn(rows, d // 2) * d ** -0.5)

    def positional_logits(self, q, H, W):
        """The positional term of A^h_qk: (N_h, N, M), or (B, N_h, N, M) if learned."""
        P = self.key_padding
        dy, dx = relative_offsets(H, W, P, q.device)                  # (N, M) each
        if self.positional == "quadratic":
            return quadratic_logits(self.pos_v, dy, dx, q.dtype)
        if max(H, W) + P > self.max_size:
            raise ValueError(f"image {H}x{W} (+ key padding {P}) exceeds max_size "
                             f"{self.max_size}: build a larger max_size")
        return learned_logits(q, self.rel_row, self.rel_col, dy, dx)

    def forward(self, x, return_attn=False):
        B, C, H, W = x.shape
        heads = self.num_heads
        d = self.head_dim
        P = self.key_padding
        x_keys = F.pad(x, (P, P, P, P))                  # (B, C, H+2P, W+2P): zeros outside
        q_in = x.flatten(2).transpose(1, 2)              # (B, N, C)
        k_in = x_keys.flatten(2).transpose(1, 2)         # (B, M, C)
        q = self.query(q_in).view(B, -1, heads, d).transpose(1, 2)    # (B, N_h, N, d)
        k = self.key(k_in).view(B, -1, heads, d).transpose(1, 2)      # (B, N_h, M, d)
        v = self.value(k_in).view(B, -1, heads, d).transpose(1, 2)    # (B, N_h, M, d)
        logits = q @ k.transpose(-1, -2) / math.sqrt(d)  # (B, N_h, N, M) content term
        if self.positional is not None:
            logits = logits + self.positional_logits(q, H, W)
        attn = logits.softmax(-1)                        # (B, N_h, N, M)
        out = (attn @ v).transpose(1, 2).reshape(B, H * W, heads * d)  # heads concatenated
        out = self.proj(out).transpose(1, 2).reshape(B, -1, H, W)      # (B, C_out, H, W)
        return (out, attn) if return_attn else out


# %% [markdown]
# ## 2. Theorem 1, constructively: a $K \times K$ convolution as $K^2$ attention heads
#
# A convolution with weight $W \in \mathbb{R}^{C_{out} \times C_{in} \times K \times K}$
# computes $\mathrm{conv}(X)_q = \sum_{\Delta} W[:, :, \Delta]\, X_{q + \Delta}$ over the
# $K^2$ kernel offsets $\Delta \in \{-\lfloor K/2 \rfloor, \dots, \lfloor K/2 \rfloor\}^2$.
# Compare with MHSA: if head $h$ put all its attention on the one key $q + \Delta_h$, it
# would return $X_{q+\Delta_h} W^h_V W^h_O$, and the sum over heads would be the convolution
# as soon as $W^h_V W^h_O = W[:, :, \Delta_h]^\top$ (transposed, as $X_q$ is a row vector).
# That is the paper's Lemma 1.
# Its Lemma 2 shows that the quadratic encoding of section 1 can make each head attend to
# one offset. The recipe, with head $h = iK + j$ taking kernel tap $(i, j)$ at offset
# $\Delta_h = (i - \lfloor K/2 \rfloor, j - \lfloor K/2 \rfloor)$:
#
# - no content attention: $W_Q = W_K = 0$, so $A^h_{qk} = v_h^\top r_\delta$;
# - $v_h = -\alpha(1, -2\Delta_{h,1}, -2\Delta_{h,2})$, the bump of section 1 at
#   $\delta = \Delta_h$ (Lemma 2, eq. 9);
# - the values are the raw pixels: $W^h_V = I$ and $d = C_{in}$;
# - the output projection of head $h$ is the kernel slice $W[:, :, i, j]$ (Lemma 1).
#
# The next cell computes $v_h$ for all heads, one row per head in the order $h = iK + j$.

# %%
def conv_pos_v(kernel_size, alpha, *, device=None, dtype=None):
    """v_h = -alpha (1, -2 Delta_1, -2 Delta_2) (eq. 9) for the K^2 heads of a K x K kernel,
    row h = i K + j for the tap at offset Delta_h = (i - K//2, j - K//2). -> (K^2, 3)"""
    K = kernel_size
    taps = torch.arange(K, device=device, dtype=dtype) - K // 2  # (K,) offsets
    dy, dx = torch.meshgrid(taps, taps, indexing="ij")          # (K, K): Delta_h of tap (i, j)
    dy = dy.flatten()                                           # (K^2,) in head order i K + j
    dx = dx.flatten()
    ones = torch.ones_like(dy)
    return -alpha * torch.stack([ones, -2 * dy, -2 * dx], 1)    # (K^2, 3)


# %% [markdown]
# Which convolutions does the recipe cover? One head per tap needs a centre pixel, so the
# kernel is square with odd $K$; one key per tap needs stride 1, dilation 1 and one group;
# and the output keeps the input's size only with zero padding $\lfloor K/2 \rfloor$. The
# next cell checks these and names what to change.

# %%
def check_convertible(conv):
    """Raise TypeError / ValueError if attention_from_conv cannot express `conv`."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"attention_from_conv expects an nn.Conv2d, "
                        f"got {type(conv).__name__}")
    K, K2 = conv.kernel_size
    if K != K2 or K % 2 == 0:
        raise ValueError(f"attention_from_conv needs a square kernel of odd size (one "
                         f"centre pixel per query), got {conv.kernel_size}; "
                         f"use K = 1, 3, 5")
    if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1:
        raise ValueError(f"attention_from_conv needs stride 1, dilation 1, groups 1; "
                         f"got stride {conv.stride}, dilation {conv.dilation}, "
                         f"groups {conv.groups}")
    P = K // 2
    if conv.padding not in ((P, P), "same") or conv.padding_mode != "zeros":
        raise ValueError(f"attention_from_conv needs zero padding K//2 = {P} ('same' "
                         f"output); got padding {conv.padding} with padding_mode "
                         f"{conv.padding_mode!r}")


# %% [markdown]
# **Zero padding.** At the border the convolution reads $X_{q+\Delta} = 0$ outside the
# image. So the twin's keys live on the grid padded by $P = \lfloor K/2 \rfloor$ zero pixels
# (`key_padding=P`): a border query still finds the key at its offset, reads a zero pixel and
# gets value 0, as the convolution does. With keys inside the image only, the softmax would
# spread that head's weight over real pixels and the border would be wrong (a test shows it).
#
# **The output projection.** The heads are concatenated, so column $h C_{in} + c$ of $W_O$
# meets channel $c$ of head $h$; it must carry $W[:, c, i, j]$ for $h = iK + j$. Permuting
# the kernel to $(C_{out}, K, K, C_{in})$ and flattening gives exactly that order.

# %%
def attention_from_conv(conv, alpha=20.0):
    """An MHSA layer (K^2 heads, quadratic positions) that computes `conv` (section 2):
    odd square K, stride 1, zero padding K//2, any C_in / C_out, bias or not, any H x W.
    It follows the conv's dtype and device."""
    check_convertible(conv)
    K = conv.kernel_size[0]
    C_out = conv.out_channels
    C_in = conv.in_channels
    W = conv.weight.detach()                                      # (C_out, C_in, K, K)
    attn = MultiHeadSelfAttention2d(C_in, num_heads=K * K, head_dim=C_in, out_dim=C_out,
                                    positional="quadratic", key_padding=K // 2,
                                    qkv_bias=False, proj_bias=conv.bias is not None)
    attn = attn.to(device=W.device, dtype=W.dtype)
    with torch.no_grad():
        # W_Q = W_K = 0: no content attention, A^h_qk = v_h . r_delta
        attn.query.weight.zero_()
        attn.key.weight.zero_()
        # W_V = I for every head, (K^2 C_in, C_in): the values are the pixels themselves
        eye = torch.eye(C_in, device=W.device, dtype=W.dtype)
        attn.value.weight.copy_(eye.repeat(K * K, 1))
        # W_O: column (i K + j) C_in + c carries W[:, c, i, j] (Lemma 1)
        attn.proj.weight.copy_(W.permute(0, 2, 3, 1).reshape(C_out, K * K * C_in))
        # v_h: head h attends to the offset of tap h (Lemma 2)
        attn.pos_v.copy_(conv_pos_v(K, alpha, device=W.device, dtype=W.dtype))
        if conv.bias is not None:
            attn.proj.bias.copy_(conv.bias.detach())
    return attn


# %% [markdown]
# The demo builds the twin of a random $3 \times 3$ convolution, prints the largest
# difference between the two outputs, and draws where each of the 9 heads looks for the
# centre pixel: each head on its own kernel offset.

# %%
def demo_conv_twin(alpha=20.0):
    """A random 3x3 conv and its 9-head attention twin on a random image: the max error, and
    each head's attention for the centre query pixel, drawn where it lands."""
    from matplotlib.figure import Figure
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        out, probs = attention_from_conv(conv, alpha)(x, return_attn=True)  # (B, 9, N, M)
        err = (out - conv(x)).abs().max().item()
    print(f"  3x3 conv (4 -> 6 channels) vs its 9-head attention twin, alpha {alpha:g}: "
          f"max |attention - conv| = {err:.1e}")
    fig = Figure(figsize=(5.2, 5.6))
    axes = fig.subplots(3, 3)
    qy = 3                                                   # the centre query pixel
    qx = 3
    for h, ax in enumerate(axes.flat):
        # the padded 9 x 9 key grid of this query, cropped back to the 7 x 7 image
        grid = probs[0, h, qy * 7 + qx].view(9, 9)[1:-1, 1:-1]
        ax.imshow(grid.numpy(), cmap="viridis", vmin=0, vmax=1)
        ax.scatter([qx], [qy], c="red", s=12, marker="x")
        ax.set_title(f"head {h}: shift ({h // 3 - 1},{h % 3 - 1})", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"attention_from_conv: each head attends to one kernel shift "
                 f"(red x: query)\nmax |attention - conv| = {err:.1e}", fontsize=9)
    utils.show(fig, "demo_conv_twin")
    return {"alpha": alpha, "max_abs_err": err}


if utils.in_notebook():
    demo_conv_twin()


# %% [markdown]
# ### How exact is it? The locality strength $\alpha$
#
# The softmax is never exactly one-hot. Head $h$ keeps weight $1/(1+S)$ on its offset and
# leaks $S/(1+S)$ onto the other keys, with
# $S = \sum_{\delta \neq 0} e^{-\alpha\lVert\delta\rVert^2} \approx 4e^{-\alpha}$ (the four
# nearest neighbours dominate). Each head's output then moves by at most twice its leak times
# the largest pixel, so the twin differs from the convolution by at most
#
# $$\max_q \lvert \mathrm{MHSA}(X)_q - \mathrm{conv}(X)_q \rvert \le \frac{2S}{1+S}\,
#   \max\lvert X\rvert\, \max_o \sum_{c,i,j}\lvert W_{o,c,i,j}\rvert,$$
#
# a leak of 3e-2 of the scale at $\alpha = 5$, 2e-4 at $\alpha = 10$ and 8e-9 at
# $\alpha = 20$. The two layers also round differently: they add the same products in
# another order, in float32, which costs about
# $\varepsilon_{32} \max\lvert X\rvert \max_o \sum\lvert W_o\rvert$ with
# $\varepsilon_{32} = 1.2 \times 10^{-7}$ (the float32 floor). The bound the demo checks is
# the sum of both. Theorem 1 is the limit $\alpha \to \infty$; in float32, $\alpha = 20$ is
# already there.

# %%
def leak(alpha, reach=9):
    """S = sum over offsets delta != 0 of exp(-alpha |delta|^2), |delta_i| <= reach."""
    one_axis = sum(math.exp(-alpha * n * n) for n in range(-reach, reach + 1))
    return one_axis ** 2 - 1                     # exp(-a(n^2 + m^2)) factorises


def demo_alpha(alphas=(1, 2, 3, 5, 8, 12, 20)):
    """The twin's max error as alpha grows, against the leak bound plus the float32 floor:
    below the bound at every alpha; a blurred convolution at small alpha."""
    from matplotlib.figure import Figure
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 8, 8)
    errs = []
    with torch.no_grad():
        for a in alphas:
            errs.append((attention_from_conv(conv, a)(x) - conv(x)).abs().max().item())
    w_l1 = conv.weight.detach().abs().sum((1, 2, 3)).max().item()   # max_o sum |W_o|
    scale = x.abs().max().item() * w_l1
    floor = torch.finfo(torch.float32).eps * scale                  # float32 rounding
    leaks = [2 * leak(a) / (1 + leak(a)) * scale for a in alphas]
    bounds = [b + floor for b in leaks]
    for a, e, b in zip(alphas, errs, leaks):
        print(f"  alpha {a:>4g}: max error {e:.1e} <= bound {b + floor:.1e} "
              f"(leak {b:.1e} + float32 floor {floor:.1e})")
    fig = Figure(figsize=(4.5, 3.2))
    ax = fig.subplots()
    ax.semilogy(alphas, errs, "o-", label="max |twin - conv|")
    ax.semilogy(alphas, bounds, "--", label="leak bound + float32 floor")
    ax.set_xlabel("alpha")
    ax.set_ylabel("error")
    ax.legend(fontsize=8)
    ax.set_title("the twin is a conv in the limit alpha -> infinity", fontsize=9)
    utils.show(fig, "demo_alpha")
    return {"alphas": list(alphas), "max_abs_err": errs, "bound": bounds, "floor": floor}


if utils.in_notebook():
    demo_alpha()


# %% [markdown]
# ## 3. Local self-attention, SASA (Ramachandran et al. 2019, eq. 2-3)
#
# Global attention costs $O(N^2 d)$ and has no locality built in. SASA keeps attention but
# lets pixel $q$ see only the $K \times K$ window around it, the offsets
# $\mathcal{N}_K = \{\delta : \lvert\delta_1\rvert, \lvert\delta_2\rvert \le p\}$ with
# $p = \lfloor K/2 \rfloor$, and gives each offset a learned embedding:
#
# $$y_q = \sum_{\delta \in \mathcal{N}_K} \mathrm{softmax}_\delta\Big(
#   \frac{(X_q W_Q)^\top (X_{q+\delta} W_K + r_\delta)}{\sqrt{d}}\Big)\,
#   X_{q+\delta} W_V,\qquad r_\delta = [r^{row}_{\delta_1}; r^{col}_{\delta_2}],$$
#
# per head of $d$ channels: half of $r_\delta$'s channels encode the row offset, half the
# column offset. The window has $L = K^2$ slots; slot $l = (\delta_1 + p)K + (\delta_2 + p)$.
# Slots outside the image are no keys (score $-\infty$), so a window that covers the whole
# image from every pixel is global attention with learned embeddings (tested).
#
# Where we differ from the paper, and why: dense $W_Q, W_K, W_V$ shared by all heads (the
# paper gives each head its own group of input channels; dense maps let every head read
# every channel, as in MHSA); the $1/\sqrt{d}$, not in eq. 2, which makes a full window equal
# to MHSA exactly; one pair of tables per head. No output projection, as in the paper.

# %% [markdown]
# ### Every pixel's window
#
# The reference form gathers each pixel's window explicitly: pad the map with $p$ zero
# pixels and cut one $K \times K$ patch around every pixel (`Tensor.unfold`). This copies the
# map $L$ times, which is plain and slow; the "Optional: speed" section computes the same
# numbers without the copy. The same cut applied to a map of ones tells which slots lie
# inside the image.

# %%
def unfold_windows(t, window):
    """Every pixel's K x K window of the zero-padded map t (B, N_h, d, H, W)
    -> (B, N_h, H, W, L, d); slot l = a K + b holds pixel (y + a - p, x + b - p)."""
    B, heads, d, H, W = t.shape
    p = window // 2
    t = F.pad(t, (p, p, p, p))                           # (B, N_h, d, H+2p, W+2p)
    t = t.unfold(3, window, 1).unfold(4, window, 1)      # (B, N_h, d, H, W, K, K) view
    t = t.permute(0, 1, 3, 4, 5, 6, 2)                   # (B, N_h, H, W, K, K, d)
    return t.reshape(B, heads, H, W, window * window, d)  # a copy: L slots per pixel


def window_inside(H, W, window, device=None):
    """(H, W, L) bool: whether slot l of pixel (y, x) lies inside the image."""
    ones = torch.ones(1, 1, 1, H, W, device=device)
    return unfold_windows(ones, window)[0, 0, ..., 0] > 0


# %% [markdown]
# ### SASA's attention, reference form
#
# With the windows cut, eq. 2 is one product per slot: the query against key plus
# embedding, $(X_q W_Q)^\top (X_{q+\delta} W_K + r_\delta)$, with the query already divided
# by $\sqrt{d}$. Slots outside the image get $-\infty$, the softmax runs over the $L$ slots
# (eq. 3), and the output is the weighted sum of the window's values.

# %%
def local_attention(q, k, v, r, window):
    """SASA (eq. 2-3) for every pixel and head. q (already / sqrt d), k, v:
    (B, N_h, d, H, W); r: (N_h, L, d). Returns out (B, N_h, d, H, W), attn (B, N_h, N, L)."""
    B, heads, d, H, W = q.shape
    keys = unfold_windows(k, window)                       # (B, N_h, H, W, L, d)
    values = unfold_windows(v, window)                     # (B, N_h, H, W, L, d)
    query = q.permute(0, 1, 3, 4, 2).unsqueeze(-1)         # (B, N_h, H, W, d, 1)
    # eq. 2: q . (k + r_delta) for every slot delta of the window
    logits = ((keys + r[:, None, None]) @ query).squeeze(-1)  # (B, N_h, H, W, L)
    inside = window_inside(H, W, window, q.device)         # (H, W, L)
    logits = logits.masked_fill(~inside, float("-inf"))    # outside the image: no key
    attn = logits.softmax(-1)                              # eq. 3: over the L slots
    out = (attn.unsqueeze(-2) @ values).squeeze(-2)        # (B, N_h, H, W, d)
    out = out.permute(0, 1, 4, 2, 3)                       # (B, N_h, d, H, W)
    return out, attn.reshape(B, heads, H * W, -1)


# %% [markdown]
# ### The layer
#
# `LocalSelfAttention2d` holds $W_Q, W_K, W_V$ as one $1 \times 1$ convolution for all heads,
# and per head a row table and a column table of $K$ entries each. `relative_embeddings`
# assembles $r_\delta$ for the $L$ slots; `attend` is the one method a faster form replaces
# (section "Optional: speed"). To copy the layer, copy this cell and the three functions
# above: torch imports only.

# %%
class LocalSelfAttention2d(nn.Module):
    """SASA (section 3) on a (B, C, H, W) map, in its reference form."""

    def __init__(self, dim, *, num_heads, window=7, head_dim=None, qkv_bias=True):
        super().__init__()
        if window % 2 == 0:
            raise ValueError(f"window must be odd so it is centred on its pixel, "
                             f"got {window}")
        if head_dim is None and dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}; "
                             f"pass head_dim")
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        self.window = window
        d = self.head_dim
        if d % 2:
            raise ValueError(f"relative embeddings split d into rows and columns: "
                             f"head_dim {d} must be even")
        self.qkv = nn.Conv2d(dim, 3 * num_heads * d, 1, bias=qkv_bias)   # W_Q, W_K, W_V
        # r_row[head, delta_1 + p] and r_col[head, delta_2 + p], d/2 channels each
        self.rel_row = nn.Parameter(torch.randn(num_heads, window, d // 2) * d ** -0.5)
        self.rel_col = nn.Parameter(torch.randn(num_heads, window, d // 2) * d ** -0.5)

    def relative_embeddings(self):
        """r_delta = [r_row[delta_1]; r_col[delta_2]] for every slot l: (N_h, L, d)."""
        heads, K, half = self.rel_row.shape
        rows = self.rel_row[:, :, None].expand(heads, K, K, half)  # varies with delta_1
        cols = self.rel_col[:, None].expand(heads, K, K, half)     # varies with delta_2
        return torch.cat([rows, cols], -1).reshape(heads, K * K, 2 * half)

    def attend(self, q, k, v, r, need_attn=False):
        """The attention itself, (out, attn): here the reference, local_attention."""
        return local_attention(q, k, v, r, self.window)

    def forward(self, x, return_attn=False):
        B, C, H, W = x.shape
        heads = self.num_heads
        d = self.head_dim
        qkv = self.qkv(x).view(B, 3, heads, d, H, W)       # (B, 3, N_h, d, H, W)
        q, k, v = qkv.unbind(1)                            # (B, N_h, d, H, W) each
        q = q / math.sqrt(d)
        r = self.relative_embeddings()                     # (N_h, L, d)
        out, attn = self.attend(q, k, v, r, return_attn)   # attn (B, N_h, N, L)
        out = out.reshape(B, heads * d, H, W)              # heads concatenated
        if return_attn:
            return out, attn
        return out


# %% [markdown]
# ## 4. Axial attention (Axial-DeepLab, Wang et al. 2020, sec. 3.1, eq. 4)
#
# Axial attention is global along one axis only: a query pixel attends to every pixel of its
# column (`axis="height"`) or of its row (`axis="width"`). Height then width, two layers,
# reach every pixel at $O(N(H + W)d)$ instead of global attention's $O(N^2 d)$. Along the
# line, query $o$ attends to key $p$ with offset $\delta = p - o$ and three learned relative
# embeddings $r^q, r^k, r^v$ ("position-sensitive"):
#
# $$a_{op} = \mathrm{softmax}_p\big(\mathrm{BN}(q_o^\top k_p) + \mathrm{BN}(q_o^\top
#   r^q_{\delta}) + \mathrm{BN}(k_p^\top r^k_{\delta})\big),\qquad
#   y_o = \mathrm{BN}\Big(\sum_p a_{op} v_p\Big)
#       + \mathrm{BN}\Big(\sum_p a_{op} r^v_{\delta}\Big),$$
#
# with $q_o, k_p, v_p$ the projections of pixels $o$ and $p$ of the line. The batch norms
# (one per score term and head, one per output term and channel) are the official
# implementations': they give each score term unit spread from the first step, so position
# counts as much as content whatever the scale of $q$ and $k$. As in both official
# implementations, one set of tables $r^q, r^k, r^v$ is shared by the heads. Ours differs in
# one place: $q$, $k$ and $v$ all have $d$ channels per head (deeplab2 gives the values
# $2C$ inside its bottleneck block; our basic block keeps $C$).
#
# A map is cut into $S$ lines of $T$ pixels: for `axis="height"` the $S = W$ columns of
# $T = H$ pixels, for `"width"` the $S = H$ rows of $T = W$ pixels.

# %%
def lines_of(t, axis):
    """(B, N_h, d, H, W) -> (B, N_h, S, T, d): S lines of T pixels along `axis`."""
    if axis == "height":
        return t.permute(0, 1, 4, 3, 2)                  # S = W columns, T = H
    return t.permute(0, 1, 3, 4, 2)                      # S = H rows, T = W


def relative_rows(table, T, max_len):
    """table[delta + max_len - 1] with delta = p - o for every query o and key p of a line
    of T pixels. table (2 max_len - 1, d) -> (T, T, d)."""
    pos = torch.arange(T, device=table.device)
    delta = pos[None, :] - pos[:, None]                  # (T, T): p - o
    return table[delta + max_len - 1]


def norm_per_head(bn, t):
    """Batch norm with one channel per head of a score map (B, N_h, S, T, T)."""
    B, heads = t.shape[:2]
    return bn(t.reshape(B, heads, -1)).view(t.shape)


# %% [markdown]
# ### Eq. 4 in two steps
#
# First the weights $a_{op}$: the content score and the two positional scores, each
# batch-normed per head, summed, softmax over the keys $p$ of the line. Then the output: the
# weighted values and the weighted value embeddings $r^v_\delta$, each batch-normed per
# channel, summed.

# %%
def axial_weights(q, k, rq, rk, bn_qk, bn_qr, bn_kr):
    """a_op of eq. 4. q, k (B, N_h, S, T, d); rq, rk (T, T, d) -> (B, N_h, S, T, T)."""
    qk = q @ k.transpose(-1, -2)                         # q_o . k_p
    qr = torch.einsum("bhsod,opd->bhsop", q, rq)         # q_o . r^q_{p-o}
    kr = torch.einsum("bhspd,opd->bhsop", k, rk)         # k_p . r^k_{p-o}
    logits = norm_per_head(bn_qk, qk) + norm_per_head(bn_qr, qr)
    logits = logits + norm_per_head(bn_kr, kr)
    return logits.softmax(-1)


def axial_output(attn, v, rv, bn_sv, bn_sve):
    """y_o of eq. 4. attn (B, N_h, S, T, T); v (B, N_h, S, T, d); rv (T, T, d)
    -> (B, C, S, T) with channel c = head * d + channel of the head."""
    B, heads, S, T, d = v.shape
    sv = attn @ v                                        # sum_p a_op v_p
    sve = torch.einsum("bhsop,opd->bhsod", attn, rv)     # sum_p a_op r^v_{p-o}
    # (B, N_h, S, T, d) -> (B, C, S T): batch norm per channel
    sv = sv.permute(0, 1, 4, 2, 3).reshape(B, heads * d, S * T)
    sve = sve.permute(0, 1, 4, 2, 3).reshape(B, heads * d, S * T)
    out = bn_sv(sv) + bn_sve(sve)
    return out.view(B, heads * d, S, T)


# %% [markdown]
# ### The layers
#
# `AxialAttention1d` holds the projections (a $1 \times 1$ convolution, batch-normed as in
# the official code), the three tables of `2 max_len - 1` offsets each, and the five batch
# norms. `AxialAttention2d` is the height layer followed by the width layer: after both,
# every output pixel depends on every input pixel. No output projection, as in
# Axial-DeepLab.

# %%
class AxialAttention1d(nn.Module):
    """Position-sensitive axial attention (eq. 4) along one axis of a (B, C, H, W) map.
    Copy it with lines_of, relative_rows, norm_per_head, axial_weights, axial_output."""

    def __init__(self, dim, *, num_heads, max_len, axis, head_dim=None):
        super().__init__()
        if axis not in ("height", "width"):
            raise ValueError(f"axis must be 'height' or 'width', got {axis!r}")
        if head_dim is None and dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}; "
                             f"pass head_dim")
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        self.max_len = max_len
        self.axis = axis
        hd = num_heads * self.head_dim
        self.qkv = nn.Conv2d(dim, 3 * hd, 1, bias=False)      # W_Q, W_K, W_V
        self.bn_qkv = nn.BatchNorm2d(3 * hd)
        # r[delta + max_len - 1] for |delta| < max_len, shared by the heads; std 1
        self.rel_q = nn.Parameter(torch.randn(2 * max_len - 1, self.head_dim))
        self.rel_k = nn.Parameter(torch.randn(2 * max_len - 1, self.head_dim))
        self.rel_v = nn.Parameter(torch.randn(2 * max_len - 1, self.head_dim))
        # one batch norm per score term (a channel per head), per output term (per channel)
        self.bn_qk = nn.BatchNorm1d(num_heads)
        self.bn_qr = nn.BatchNorm1d(num_heads)
        self.bn_kr = nn.BatchNorm1d(num_heads)
        self.bn_sv = nn.BatchNorm1d(hd)
        self.bn_sve = nn.BatchNorm1d(hd)

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.bn_qkv(self.qkv(x))
        qkv = qkv.view(B, 3, self.num_heads, self.head_dim, H, W)
        q, k, v = [lines_of(t, self.axis) for t in qkv.unbind(1)]  # (B, N_h, S, T, d)
        T = q.shape[3]
        if T > self.max_len:
            raise ValueError(f"axis length {T} exceeds max_len {self.max_len}: "
                             f"build a larger max_len")
        rq = relative_rows(self.rel_q, T, self.max_len)    # (T, T, d) each
        rk = relative_rows(self.rel_k, T, self.max_len)
        rv = relative_rows(self.rel_v, T, self.max_len)
        attn = axial_weights(q, k, rq, rk, self.bn_qk, self.bn_qr, self.bn_kr)
        out = axial_output(attn, v, rv, self.bn_sv, self.bn_sve)  # (B, C, S, T)
        if self.axis == "height":
            return out.transpose(2, 3)                     # (B, C, H, W)
        return out


class AxialAttention2d(nn.Module):
    """Height-axis then width-axis attention (Axial-DeepLab's order)."""

    def __init__(self, dim, *, num_heads, max_size, head_dim=None):
        super().__init__()
        self.height = AxialAttention1d(dim, num_heads=num_heads, max_len=max_size,
                                       axis="height", head_dim=head_dim)
        self.width = AxialAttention1d(dim, num_heads=num_heads, max_len=max_size,
                                      axis="width", head_dim=head_dim)

    def forward(self, x):
        return self.width(self.height(x))


# %% [markdown]
# ### What each layer sees
#
# One output pixel depends on: for a $3 \times 3$ convolution, its $3 \times 3$
# neighbourhood; for SASA, its $K \times K$ window; for one axial layer, its whole column;
# for height then width, the whole image. The demo reads these receptive fields off
# autograd: the input pixels whose gradient is not zero.

# %%
def demo_receptive_fields(size=9, at=(4, 2)):
    """Conv, SASA's window and the axial line(s) of one pixel, read off autograd."""
    from matplotlib.figure import Figure
    torch.manual_seed(0)
    layers = {"3x3 conv": nn.Conv2d(8, 8, 3, padding=1),
              "SASA, 5x5 window": LocalSelfAttention2d(8, num_heads=2, window=5),
              "axial, height": AxialAttention1d(8, num_heads=2, max_len=size,
                                                axis="height"),
              "axial, height then width": AxialAttention2d(8, num_heads=2,
                                                            max_size=size)}
    fields = {}
    for name, layer in layers.items():
        x = torch.randn(2, 8, size, size, requires_grad=True)
        layer.eval()(x)[0, :, at[0], at[1]].sum().backward()
        fields[name] = x.grad[0].abs().sum(0) > 0        # (size, size): non-zero gradient
    for name, f in fields.items():
        print(f"  {name:<25} output pixel {at} depends on {int(f.sum()):3d} "
              f"of {size**2} pixels")
    fig = Figure(figsize=(9, 2.6))
    for ax, (name, f) in zip(fig.subplots(1, 4), fields.items()):
        ax.imshow(f.float().numpy(), cmap="Blues", vmin=0, vmax=1.3)
        ax.scatter([at[1]], [at[0]], c="red", s=15, marker="x")
        ax.set_title(name, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("input pixels one output pixel (red x) depends on", fontsize=9)
    utils.show(fig, "demo_receptive_fields")
    return {name: int(f.sum()) for name, f in fields.items()}


if utils.in_notebook():
    demo_receptive_fields()


# %% [markdown]
# ## 5. How far does a head look? Non-locality (ConViT, d'Ascoli et al. 2021, eq. 8)
#
# A receptive field says what a pixel *may* depend on; the attention weights say how much it
# does. ConViT's non-locality is the attention-weighted mean distance, in pixels, from a
# query to its keys, averaged over the queries:
#
# $$D^h = \frac{1}{N}\sum_q \sum_k \mathrm{softmax}_k(A^h_{qk})\,\lVert\delta\rVert,
#   \qquad \delta = k - q.$$
#
# A head of `attention_from_conv` has $D^h = \lVert\Delta_h\rVert$; uniform attention over
# an interior $3 \times 3$ window has $(4 + 4\sqrt2)/9 = 1.07$. The lab reads $D^h$ off a
# trained SASA layer; `window_nonlocality` is the same formula for attention over window
# slots.

# %%
def nonlocality(attn_probs, H, W, *, key_padding=0):
    """D^h of attention (..., N, M) with keys on the H x W grid padded by key_padding."""
    dy, dx = relative_offsets(H, W, key_padding, attn_probs.device)   # (N, M) each
    if attn_probs.shape[-2:] != dy.shape:
        raise ValueError(f"attn_probs ends in {tuple(attn_probs.shape[-2:])}, expected "
                         f"(N, M) = {tuple(dy.shape)}")
    dist = (dy * dy + dx * dx).to(attn_probs.dtype).sqrt()             # (N, M) |delta|
    return (attn_probs * dist).sum(-1).mean(-1)


def window_nonlocality(attn, window):
    """The same D^h for SASA attention (..., N, L) over each pixel's window slots."""
    off = torch.arange(window, device=attn.device, dtype=attn.dtype) - window // 2
    dist = (off[:, None] ** 2 + off[None, :] ** 2).sqrt().flatten()   # (L,) |delta|
    return (attn * dist).sum(-1).mean(-1)


# %% [markdown]
# ## 6. One backbone, three spatial operators
#
# To compare the operators, only the operator may differ. The backbone is a convolutional
# stem, three stages of one ResNet basic block each, global average pooling and a linear
# head. Both $3 \times 3$ convolutions of a block become SASA or axial attention in the
# attention models (SASA's ResNets replace them the same way, in bottleneck blocks).
# Downsampling between stages ($2 \times 2$ average pool and a $1 \times 1$ convolution) is
# shared. "hybrid" keeps convolutions early and attention late, as Ramachandran et al.
# (sec. 4.3) found best. Every layer is built in its reference form unless the caller
# passes another SASA class (`local_layer`); the lab passes the fast one of the last section.

# %%
MODELS = {  # the operator of each stage (resolution S/s, S/2s, S/4s for stem stride s)
    "all-conv": ("conv", "conv", "conv"),
    "all-local": ("local", "local", "local"),
    "all-axial": ("axial", "axial", "axial"),
    "hybrid": ("conv", "conv", "local"),
}


def spatial_op(kind, dim, *, head_dim, window, size, local_layer=LocalSelfAttention2d):
    """The one layer that differs between the models: 3x3 conv, SASA or axial."""
    if kind == "conv":
        return nn.Conv2d(dim, dim, 3, padding=1, bias=False)
    if kind == "local":
        return local_layer(dim, num_heads=dim // head_dim, window=window)
    if kind == "axial":
        return AxialAttention2d(dim, num_heads=dim // head_dim, max_size=size)
    raise ValueError(f"unknown operator {kind!r}: conv, local or axial")


class Block(nn.Module):
    """ResNet basic block whose two 3x3 convs are the operator `op`."""

    def __init__(self, dim, *, op, head_dim, window, size,
                 local_layer=LocalSelfAttention2d):
        super().__init__()
        kw = dict(head_dim=head_dim, window=window, size=size, local_layer=local_layer)
        self.op1 = spatial_op(op, dim, **kw)
        self.bn1 = nn.BatchNorm2d(dim)
        self.op2 = spatial_op(op, dim, **kw)
        self.bn2 = nn.BatchNorm2d(dim)

    def forward(self, x):
        out = F.relu(self.bn1(self.op1(x)))
        return F.relu(x + self.bn2(self.op2(out)))


# %% [markdown]
# The network. A stem stride $s$ of 2 halves every stage's resolution (four times less
# attention work); a stride of 4 turns the stem into $4 \times 4$ patches.

# %%
class Net(nn.Module):
    """Conv stem (stride s) -> 3 stages (one Block each) -> global mean -> linear."""

    def __init__(self, *, ops, widths=(16, 32, 64), head_dim=8, window=5, image_size=32,
                 stem_stride=1, num_classes=10, local_layer=LocalSelfAttention2d):
        super().__init__()
        if len(ops) != 3 or len(widths) != 3:
            raise ValueError(f"need 3 stage ops and 3 widths, got {ops}, {widths}")
        if image_size % (4 * stem_stride):
            raise ValueError(f"image_size {image_size} must be divisible by "
                             f"4 * stem_stride = {4 * stem_stride}")
        self.ops = tuple(ops)
        self.widths = tuple(widths)
        kernel = 3 if stem_stride <= 2 else stem_stride      # stride 4: 4x4 patches
        pad = 1 if stem_stride <= 2 else 0
        stem_conv = nn.Conv2d(3, widths[0], kernel, stride=stem_stride, padding=pad,
                              bias=False)
        self.stem = nn.Sequential(stem_conv, nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages = []
        prev = widths[0]
        size = image_size // stem_stride
        for i, (op, w) in enumerate(zip(ops, widths)):
            down = nn.Identity()
            if i > 0:                                        # stages 2, 3 halve the map
                size //= 2
                down = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(prev, w, 1, bias=False),
                                     nn.BatchNorm2d(w))
            block = Block(w, op=op, head_dim=head_dim, window=window, size=size,
                          local_layer=local_layer)
            stages.append(nn.Sequential(down, block))
            prev = w
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(prev, num_classes)

    def forward(self, x):
        x = self.stages(self.stem(x))         # (B, C, S/4s, S/4s)
        return self.head(x.mean((2, 3)))      # (B, classes)


# %% [markdown]
# ### Equal parameters, from counts alone
#
# A $3 \times 3$ convolution has $9C^2$ weights, SASA $3C^2$ (its $W_Q, W_K, W_V$) and an
# axial pair $6C^2$, so at equal widths the attention models would be far smaller. Before any
# training, `matched_widths` widens the attention models' stage 3 (it holds most weights), in
# multiples of $d$, to the width whose parameter count is closest to all-conv's. Stages 1-2
# keep their widths, so the layers two models share are the same layers (same initial
# weights, section "the lab"), and the costly high-resolution attention stays narrow.
# Multiples of $d$ cannot hit the count exactly: in the quick preset all-local has 0.4%
# fewer parameters than all-conv, hybrid 4.1% more and all-axial 7.7% more.

# %%
@functools.lru_cache(maxsize=None)
def matched_widths(ops, *, widths, head_dim, window, image_size, stem_stride,
                   num_classes):
    """The widths for `ops` whose parameter count is closest to all-conv's at `widths`.
    Returns (widths, params, target params)."""
    def count(ops, w):
        with torch.device("meta"):                       # shapes only: no memory
            net = Net(ops=ops, widths=w, head_dim=head_dim, window=window,
                      image_size=image_size, stem_stride=stem_stride,
                      num_classes=num_classes)
        return utils.count_params(net)
    target = count(("conv",) * 3, widths)
    steps = range(1, 4 * widths[2] // head_dim + 1)
    candidates = [(*widths[:2], head_dim * j) for j in steps]
    best = min(candidates, key=lambda w: abs(count(ops, w) - target))
    return best, count(ops, best), target


# %% [markdown]
# ## Optional: speed
#
# The reference SASA copies every window ($L$ copies of the map) and multiplies pixel by
# pixel. On a CPU that is slow, and the lab trains all-local models for minutes, so the lab
# switches on the forms below. They compute the same function: the tests compare their
# outputs, attention weights and gradients with `local_attention`, and `--bench` times both.
# Nothing above depends on this section.
#
# **Shifted slices** (large maps). The keys of every pixel at slot $(a, b)$ are one slice of
# the padded key map, `kp[..., a:a+H, b:b+W]`, a view. So the scores are $L$ elementwise
# products summed over $d$, and the output $L$ multiply-adds: $2L$ large operations instead
# of many small ones, and $O(Nd)$ memory instead of $O(NLd)$.

# %%
def local_attention_shifted(q, k, v, r, window):
    """SASA by shifted slices: as local_attention, but attn is (B, N_h, L, H, W)."""
    B, heads, d, H, W = q.shape
    p = window // 2
    kp = F.pad(k, (p, p, p, p))                          # (B, N_h, d, H+2p, W+2p)
    vp = F.pad(v, (p, p, p, p))
    slots = []
    for a in range(window):
        for b in range(window):
            slots.append((a, b))                         # slot l = a K + b
    scores = []
    for a, b in slots:                                   # q . k of slot (a, b): (B, N_h, H, W)
        scores.append((q * kp[..., a:a + H, b:b + W]).sum(2))
    content = torch.stack(scores, 2)                     # (B, N_h, L, H, W)
    logits = content + torch.einsum("bhdyx,hld->bhlyx", q, r)
    inside = window_inside(H, W, window, q.device).permute(2, 0, 1)  # (L, H, W)
    attn = logits.masked_fill(~inside, float("-inf")).softmax(2)
    out = 0
    for s, (a, b) in enumerate(slots):                   # sum_l a_l v_l: (B, N_h, d, H, W)
        out = out + attn[:, :, s, None] * vp[..., a:a + H, b:b + W]
    return out, attn


# %% [markdown]
# **One masked matmul** (small maps). All $N \times N$ scores in one product, pairs outside
# the window set to $-\infty$: $N^2 d$ work instead of $NLd$, but in a few large operations;
# on a CPU it wins while $N \le 4L$. Every pair needs its slot (to add $r_\delta$) and
# whether it is in the window: `window_pairs` computes both once per map size.

# %%
@functools.lru_cache(maxsize=64)
def window_pairs(H, W, window, device=None):
    """For every (query, key) pair of the grid: whether the key is in the query's window,
    and its slot (clamped to a valid slot outside the window). Each (N, N); cached."""
    p = window // 2
    dy, dx = relative_offsets(H, W, 0, device)           # (N, N): key - query
    slot = ((dy + p) * window + dx + p).clamp(0, window * window - 1)
    in_window = (dy.abs() <= p) & (dx.abs() <= p)
    return in_window, slot


def local_attention_dense(q, k, v, r, window):
    """SASA as masked global attention: as local_attention, attn (B, N_h, N, N)."""
    B, heads, d, H, W = q.shape
    N = H * W
    q = q.flatten(3)                                     # (B, N_h, d, N)
    k = k.flatten(3)
    v = v.flatten(3)
    in_window, slot = window_pairs(H, W, window, q.device)  # (N, N) each
    qr = torch.einsum("bhdn,hld->bhnl", q, r)            # (B, N_h, N, L): q . r_l
    index = slot.expand(B, heads, N, N)                  # the slot of every pair
    logits = q.transpose(-1, -2) @ k + qr.gather(-1, index)  # (B, N_h, N, N)
    attn = logits.masked_fill(~in_window, float("-inf")).softmax(-1)
    out = (attn @ v.transpose(-1, -2)).transpose(-1, -2)  # (B, N_h, d, N)
    return out.reshape(B, heads, d, H, W), attn


def dense_to_window(attn, H, W, window):
    """The dense path's attention (B, N_h, N, N) as the reference's (B, N_h, N, L)."""
    p = window // 2
    offsets = torch.arange(-p, p + 1, device=attn.device)
    dy, dx = torch.meshgrid(offsets, offsets, indexing="ij")      # (K, K) slot offsets
    y, x = torch.meshgrid(torch.arange(H, device=attn.device),
                          torch.arange(W, device=attn.device), indexing="ij")
    ky = y.reshape(-1, 1) + dy.reshape(1, -1)                     # (N, L) key row
    kx = x.reshape(-1, 1) + dx.reshape(1, -1)                     # (N, L) key column
    key = ky.clamp(0, H - 1) * W + kx.clamp(0, W - 1)             # clamped into the image
    inside = window_inside(H, W, window, attn.device).reshape(H * W, -1)
    B, heads = attn.shape[:2]
    return attn.gather(-1, key.expand(B, heads, -1, -1)).masked_fill(~inside, 0.0)


# %% [markdown]
# The fast layer: the same class, the same parameters (a state dict moves between the two),
# with `attend` choosing the faster path by map size.

# %%
class FastLocalSelfAttention2d(LocalSelfAttention2d):
    """LocalSelfAttention2d computed by the fast paths: one masked matmul while N <= 4 L,
    shifted slices otherwise. Same function, same parameters, same (B, N_h, N, L) attn."""

    def attend(self, q, k, v, r, need_attn=False):
        H, W = q.shape[-2:]
        K = self.window
        if H * W <= 4 * K * K:
            out, attn = local_attention_dense(q, k, v, r, K)     # attn (B, N_h, N, N)
            if need_attn:
                attn = dense_to_window(attn, H, W, K)
            return out, attn
        out, attn = local_attention_shifted(q, k, v, r, K)       # attn (B, N_h, L, H, W)
        return out, attn.flatten(3).transpose(2, 3)              # (B, N_h, N, L)


# %% [markdown]
# ## What the experiments found
#
# `--quick` (the lab below: 2-core CPU, about 312 optimiser steps per run, paired seeds,
# all 10,000 CIFAR-10 test images; `runs/01_conv_vs_attention/quick.log`):
#
# - Theorem 1 on a trained network: its first $3 \times 3$ convolution and the 9-head twin
#   differ by at most 2.4e-7 on real features, and the swapped network makes the same
#   prediction on all 2,000 test images scored.
# - At (nearly) equal parameters, all-local − all-conv = −6.0 points, 95% CI [−7.3, −4.7],
#   n=4, and all-axial − all-conv = −7.1 points, 95% CI [−12.1, −2.2], n=3: the
#   convolution is better at this budget.
# - hybrid − all-conv = +0.7 points, 95% CI [−0.8, +2.2], n=4: not decided at this budget;
#   hybrid − all-local = +6.7 points, 95% CI [+4.7, +8.7]: convolutions early help.
# - local's gap to conv at 100 and 1,000 images per class changes by +1.7 points, 95% CI
#   [−1.7, +5.1]: not decided.
#
# Full tables: `runs/01_conv_vs_attention/RESULTS.md`. The full preset (one GPU) was not
# measured.


# %% [markdown]
# ## Exercises
#
# The answers are in `solutions/01_conv_vs_attention.py`: one function per exercise, each
# asserting its answer (`python solutions/01_conv_vs_attention.py` runs them all). No
# exercise needs data.
#
# 1. **Predict, then measure $\alpha$** (★, no data, seconds). The twin's error is roughly
#    proportional to the leak $S \approx 4e^{-\alpha}$. Run `demo_alpha()`, read the
#    constant off its point at $\alpha = 8$, and predict at which $\alpha$ the max error of
#    `demo_alpha`'s convolution falls to 1e-3. Then measure it: bisect on $\alpha$ with
#    `attention_from_conv(conv, alpha)`. Check: your prediction is within 0.3 of the
#    measured $\alpha$.
# 2. **A 5x5 kernel** (★, no data, seconds). Build `attention_from_conv` for a $5 \times 5$
#    convolution. How many heads does it have, which head attends to the offset $(2, 2)$,
#    and what is that head's non-locality $D^h$
#    (`nonlocality(probs[0], H, W, key_padding=2)`)? Predict from sections 2 and 5, then
#    check.
# 3. **Implement $v_h$** (★★, no data, seconds). Fill in `my_conv_pos_v` below: the
#    positional query of every head of a $K \times K$ kernel, in head order $h = iK + j$
#    (section 2, eq. 9), without looking at `conv_pos_v`. Grade it with
#    `python -m pytest tests/test_01_conv_vs_attention.py -k implement`: the test builds the
#    twins of several convolutions with your $v_h$ and compares them with the convolutions.
# 4. **A window as large as the image** (★★, no data, seconds). Give
#    `LocalSelfAttention2d` a window of $2\max(H, W) - 1$ on an $H \times W$ map, and copy
#    its weights into a `MultiHeadSelfAttention2d(positional="learned")` (which tables go
#    where? the global layer needs $W_O = I$). Check that the two outputs agree within 1e-5:
#    local attention with a full window is global attention.
# 5. **Left from right** (★, no data, seconds). Zero `rel_q`, `rel_k` and `rel_v` of an
#    `AxialAttention2d` in eval mode, and mirror an input left to right. Predict what
#    happens to the output, then check it. What does this say about attention without
#    positions, and about the task "is the red pixel left of the blue one"?

# %%
def my_conv_pos_v(kernel_size, alpha):
    """Exercise 3: v_h = -alpha (1, -2 Delta_h1, -2 Delta_h2) for the K^2 heads of a K x K
    kernel, row h = i K + j for the tap at offset Delta_h = (i - K//2, j - K//2).
    Returns a float tensor of shape (K^2, 3)."""
    raise NotImplementedError("exercise 3: fill in my_conv_pos_v (section 2, eq. 9)")


# %% [markdown]
# ---
# # The lab: presets, runs, experiments, figures
#
# The experiments, one `exp_*` each: `compare` (section 6's models, parameter-matched,
# paired seeds), `scaling` (attention's gap to conv at two training-set sizes, same steps),
# `swap` (Theorem 1 on a trained network). The lab trains SASA with the fast path of
# "Optional: speed" (tested equal to the reference).

# %%
PRESETS = {
    # 2-core CPU, ~8 min with --workers 2; every run ~312 steps of batch 64, all test images
    "quick": dict(train_per_class=1000, val_per_class=0, test_per_class=None,
                  image_size=32, epochs=2, scaling_factor=10, widths=(16, 32, 128),
                  head_dim=16, window=3, stem_stride=2, batch_size=64, lr=3e-3, seeds=4,
                  axial_seeds=3, models=tuple(MODELS), scaling_models=("all-local",),
                  swap_images=2000, alpha=20.0, workers=2, threads=1),
    # one GPU: all of CIFAR-10, full resolution, SASA's 7x7 window (not measured)
    "full": dict(train_per_class=5000, val_per_class=0, test_per_class=None,
                 image_size=32, epochs=30, scaling_factor=10, widths=(64, 128, 256),
                 head_dim=16, window=7, stem_stride=1, batch_size=128, lr=2e-3, seeds=3,
                 axial_seeds=3, models=tuple(MODELS),
                 scaling_models=("all-local", "all-axial", "hybrid"),
                 swap_images=10000, alpha=20.0, workers=1, threads=None),
}
FLAGS = {
    "models": f"models to train, from {list(MODELS)} (all-conv always: the reference)",
    "epochs": "epochs at the large training set; every run gets the same steps",
    "scaling_factor": "the small training set has train-per-class / this many per class",
    "scaling_models": "attention models also trained at the small size",
    "widths": "all-conv's channels in the 3 stages; attention stage 3 widened to match",
    "head_dim": "channels per attention head d (heads = width / d)",
    "window": "SASA window side K (odd)",
    "stem_stride": ("2 halves every stage's resolution",
                    dict(type=int, choices=(1, 2, 4))),
    "batch_size": "training batch size",
    "lr": "peak AdamW learning rate",
    "seeds": "paired seeds seed, seed+1, ... for every model",
    "axial_seeds": "paired seeds of all-axial: the first of --seeds (6x conv's cost)",
    "swap_images": "test images (every n-th: all classes) scored with the twin",
    "alpha": "attention_from_conv's locality strength",
}
EXPERIMENTS = ("compare", "scaling", "swap")


def check_args(a):
    a.models = ("all-conv",) + tuple(m for m in a.models if m != "all-conv")
    a.axial_seeds = min(a.axial_seeds, a.seeds)
    unknown = sorted(set(a.models + a.scaling_models) - set(MODELS))
    checks = [
        (unknown, f"unknown --models / --scaling-models {unknown}; use {list(MODELS)}"),
        (len(a.widths) != 3,
         f"--widths needs 3 numbers (one per stage), got {a.widths}"),
        (any(w % a.head_dim for w in a.widths),
         f"every width in --widths {a.widths} must be a multiple of "
         f"--head-dim {a.head_dim}"),
        (a.window % 2 == 0,
         f"--window must be odd (centred on its pixel), got {a.window}"),
        (a.image_size % (4 * a.stem_stride),
         f"--image-size must be divisible by {4 * a.stem_stride} "
         f"(stem stride {a.stem_stride}, then two 2x poolings)"),
    ]
    for bad, message in checks:
        if bad:
            raise utils.InputError(message)
    a.scaling_models = tuple(m for m in a.scaling_models if m in a.models[1:])


def get_args(argv=None):
    bench = "time one SASA layer (reference vs fast path), axial and a conv"
    return utils.cli(__doc__, PRESETS, FLAGS, argv, experiments=EXPERIMENTS,
                     check=check_args, bench=bench)


def build_model(cfg, arm, num_classes):
    """The network of one arm (a key of MODELS) with its parameter-matched widths; SASA
    layers take the fast path (same function as the reference, tested)."""
    widths = matched_widths(MODELS[arm], widths=tuple(cfg.widths), head_dim=cfg.head_dim,
                            window=cfg.window, image_size=cfg.image_size,
                            stem_stride=cfg.stem_stride, num_classes=num_classes)[0]
    return Net(ops=MODELS[arm], widths=widths, head_dim=cfg.head_dim, window=cfg.window,
               image_size=cfg.image_size, stem_stride=cfg.stem_stride,
               num_classes=num_classes, local_layer=FastLocalSelfAttention2d)


def init_model(cfg, arm, num_classes, seed):
    """`arm`'s network with seed-`seed` initial weights, where every weight it shares with
    all-conv (same name and shape: stem, conv stages, downsampling, norms) starts equal."""
    utils.set_seed(seed)
    model = build_model(cfg, arm, num_classes)
    utils.set_seed(seed)
    utils.copy_shared_init(build_model(cfg, "all-conv", num_classes), model)
    return model


def full_preset_models(num_classes=10):
    """Every model the full preset trains, at its real size: name -> (model, None, S)."""
    a = get_args([])
    models = {}
    for name in MODELS:
        models[name] = (build_model(a, name, num_classes), None, a.image_size)
    return models


# %%
def train_job(cfg, arm, per_class, seed, keep_state=False):
    """One self-contained run (utils.run_jobs may send it to another process): `arm` trained
    from `seed` on `per_class` images per class for ~cfg["steps"] steps, scored on the test
    set. Paired by seed: same images (the small set is part of the large one), batches,
    shared initial weights."""
    a = SimpleNamespace(**cfg)
    device = torch.device(a.device)
    data = utils.load_data(a.data, image_size=a.image_size, train_per_class=per_class,
                           test_per_class=a.test_per_class, seed=seed)
    model = init_model(a, arm, data.num_classes, seed)
    train, _, test = utils.make_loaders(data, batch_size=a.batch_size, device=device,
                                        seed=seed)
    epochs = max(1, round(a.steps / len(train)))              # the same steps at every size
    t0 = time.time()
    hist = utils.train(model.to(device), train, epochs=epochs, lr=a.lr,
                       weight_decay=0.05, warmup_epochs=epochs / 8, log=lambda line: None)
    score = utils.evaluate(model, test)
    seconds = time.time() - t0
    print(f"  {arm:<9} {len(data.y_train):>6,d} images, seed {seed}: "
          f"{epochs:3d} epochs x {len(train)} steps, test {score.acc:5.2f}%  NLL {score.nll:.3f}  "
          f"({seconds:.0f} s)", flush=True)
    state = None
    if keep_state:
        state = {k: v.cpu() for k, v in model.state_dict().items()}
    return dict(arm=arm, per_class=per_class, seed=seed, acc=score.acc, nll=score.nll,
                test_images=len(data.y_test), epochs=epochs, steps=epochs * len(train),
                img_per_s=sum(h["img_per_s"] for h in hist) / len(hist), seconds=seconds,
                params=utils.count_params(model), widths=list(model.widths), state=state)


COST = {"all-conv": 1, "hybrid": 1.5, "all-local": 3, "all-axial": 6}  # time per step


def plan_runs(args, per_class, todo):
    """Every (arm, images per class, seed, keep_state) run the chosen experiments need, the
    most expensive first so that the workers finish together. all-axial gets the first
    --axial-seeds seeds."""
    small = max(1, per_class // args.scaling_factor)

    def seeds(arm):
        n = args.axial_seeds if arm == "all-axial" else args.seeds
        return range(args.seed, args.seed + n)
    runs = set()
    if "swap" in todo:
        for arm in ("all-conv", "all-local"):
            if arm in args.models:
                runs.add((arm, per_class, args.seed))
    if {"compare", "scaling"} & set(todo):
        for arm in args.models:
            runs |= {(arm, per_class, s) for s in seeds(arm)}
    if "scaling" in todo:
        for arm in ("all-conv", *args.scaling_models):
            runs |= {(arm, small, s) for s in seeds(arm)}

    def keep(arm, n, s):
        return ("swap" in todo and s == args.seed and n == per_class
                and arm in ("all-conv", "all-local"))
    order = sorted(runs, key=lambda r: (-COST[r[0]], r[0], -r[1], r[2]))
    return [(arm, n, s, keep(arm, n, s)) for arm, n, s in order]


def train_all(args, data, todo, device):
    """Run plan_runs' jobs (in parallel with --workers), by (arm, size, seed)."""
    per_class = int(torch.bincount(data.y_train).min())          # what the preset fitted to
    small = max(1, per_class // args.scaling_factor)
    steps = args.epochs * (len(data.y_train) // min(args.batch_size, len(data.y_train)))
    cfg = dict(vars(args), steps=steps, device=str(device))      # what every job needs
    jobs = plan_runs(args, per_class, todo)
    print(f"training {len(jobs)} runs (~{steps} steps each; {per_class} and {small} "
          f"images per class; {args.workers} at a time)", flush=True)
    t0 = time.time()
    job_args = [(cfg, *job) for job in jobs]
    results = utils.run_jobs(train_job, job_args, workers=args.workers)
    print(f"all runs done in {time.time() - t0:.0f} s", flush=True)
    runs = {(r["arm"], r["per_class"], r["seed"]): r for r in results}
    return {"per_class": per_class, "small": small, "runs": runs,
            "classes": data.num_classes}


# %%
def entry_check(claim, precondition, measured, needs, met):
    """Print whether the regime lets a claim act, before its verdict, in the one wording."""
    word = "met" if met else "not met"
    line = f"entry check: {claim}: {precondition} = {measured} (needs {needs}) → {word}"
    print(line, flush=True)
    return {"line": line, "met": bool(met)}


def paired(runs, arm_a, arm_b, per_class, key):
    """Per-seed values of metric `key` for two arms, over the seeds both have."""
    seeds = sorted(s for (a, n, s) in runs if a == arm_a and n == per_class
                   and (arm_b, n, s) in runs)
    values_a = [runs[(arm_a, per_class, s)][key] for s in seeds]
    values_b = [runs[(arm_b, per_class, s)][key] for s in seeds]
    return values_a, values_b


def compare_arms(runs, arm, ref, per_class, log=print):
    """Accuracy and NLL of `arm` against `ref` at one training size: two verdicts."""
    acc = utils.compare_paired(*paired(runs, arm, ref, per_class, "acc"), name_a=arm,
                               name_b=ref, unit="points", digits=1, bound=1.0, log=log)
    nll = utils.compare_paired(*paired(runs, arm, ref, per_class, "nll"), name_a=arm,
                               name_b=ref, unit="nats", digits=3, higher_is_better=False,
                               bound=0.02, log=log)
    return {"acc": acc, "nll": nll}


def exp_compare(args, trained):
    """Conv vs local vs axial vs hybrid at the large size: a table (mean [95% CI] over
    paired seeds, full test set) and every attention model against all-conv (and hybrid
    against all-local)."""
    runs = trained["runs"]
    n = trained["per_class"]
    header = (f"{'model':<10} {'widths':<10} {'params':>8} {'steps':>5} {'img/s':>6} "
              f"{'n':>2}  {'test acc % [95% CI]':<22} {'test NLL [95% CI]':<22}")
    lines = [header, "-" * len(header)]
    rows = {}
    for arm in args.models:
        rs = [r for (a, m, s), r in sorted(runs.items()) if a == arm and m == n]
        acc = utils.mean_ci([r["acc"] for r in rs])
        nll = utils.mean_ci([r["nll"] for r in rs])
        img_per_s = sum(r["img_per_s"] for r in rs) / len(rs)
        rows[arm] = dict(widths=rs[0]["widths"], params=rs[0]["params"], n=len(rs),
                         acc=acc, nll=nll, img_per_s=img_per_s)
        widths = ",".join(map(str, rs[0]["widths"]))
        lines.append(f"{arm:<10} {widths:<10} {rs[0]['params']:>8,d} "
                     f"{rs[0]['steps']:>5} {img_per_s:>6.0f} {len(rs):>2}  "
                     f"{utils.fmt_ci(acc):<22} {utils.fmt_ci(nll, 3):<22}")
    lines.append(f"{n} training images per class, batch {args.batch_size}; scored on "
                 f"{rs[0]['test_images']:,d} test images; img/s: one process, 1 thread")
    print("\n".join(lines), flush=True)
    # entry checks: the models are parameter-matched, and the reference learns here
    ratios = [rows[arm]["params"] / rows["all-conv"]["params"] for arm in args.models]
    checks = [entry_check("attention vs conv at matched parameters",
                          "parameters / all-conv's", f"{min(ratios):.3f} to {max(ratios):.3f}",
                          "0.90 to 1.10", 0.9 <= min(ratios) and max(ratios) <= 1.1)]
    floor = 200.0 / trained["classes"]                   # twice chance, in %
    checks.append(entry_check("attention vs conv at matched parameters",
                              "all-conv test accuracy", f"{rows['all-conv']['acc'][0]:.1f}%",
                              f">= {floor:.0f}%, twice chance",
                              rows["all-conv"]["acc"][0] >= floor))
    verdicts = {arm: compare_arms(runs, arm, "all-conv", n) for arm in args.models[1:]}
    if {"hybrid", "all-local"} <= set(args.models):    # conv early helps attention (4.3)
        verdicts["hybrid vs all-local"] = compare_arms(runs, "hybrid", "all-local", n)
    return {"table": lines, "models": rows, "verdicts": verdicts, "entry_checks": checks}


def exp_scaling(args, trained):
    """Attention's gap to all-conv at two training-set sizes (same optimiser steps), and
    whether it changes: per seed, (arm - conv) at the large size minus at the small size."""
    runs = trained["runs"]
    big = trained["per_class"]
    small = trained["small"]
    # entry check: more data helps the reference at this budget, so the sizes differ
    conv_big = paired(runs, "all-conv", "all-conv", big, "acc")[0]      # per seed
    conv_small = paired(runs, "all-conv", "all-conv", small, "acc")[0]
    gain = sum(conv_big) / len(conv_big) - sum(conv_small) / len(conv_small)
    check = entry_check("attention catches up with more data",
                        f"all-conv accuracy at {big}/class - at {small}/class",
                        f"{gain:+.1f} points", ">= +1 point", gain >= 1.0)
    result = {}
    for arm in args.scaling_models:
        print(f"-- {arm} vs all-conv: {small} -> {big} images per class", flush=True)
        at = {n: compare_arms(runs, arm, "all-conv", n) for n in (small, big)}
        change = {}
        for key, unit, digits, hib, bound in (("acc", "points", 1, True, 1.0),
                                              ("nll", "nats", 3, False, 0.02)):
            gaps = {}
            for n in (small, big):                       # arm - conv, per seed
                arm_values, conv_values = paired(runs, arm, "all-conv", n, key)
                gaps[n] = [x - y for x, y in zip(arm_values, conv_values)]
            k = min(len(gaps[small]), len(gaps[big]))
            change[key] = utils.compare_paired(
                gaps[big][:k], gaps[small][:k], name_a=f"({arm} - conv) at {big}/class",
                name_b=f"at {small}/class", unit=unit, digits=digits,
                higher_is_better=hib, bound=bound,
                pairs="paired seeds (difference of gaps)")
        result[arm] = {"small": at[small], "large": at[big], "change_of_gap": change}
    return {"per_class": [small, big], "models": result, "entry_check": check}


@torch.no_grad()
def exp_swap(args, out, trained, data, device):
    """Theorem 1 on a trained network: all-conv's first 3x3 conv swapped for its 9-head
    attention twin (error on real features; test accuracy, NLL, predictions); and the
    trained SASA heads' non-locality."""
    def trained_model(arm):                       # seed `args.seed`'s run at the large size
        model = build_model(args, arm, data.num_classes).to(device)
        run = trained["runs"][(arm, trained["per_class"], args.seed)]
        model.load_state_dict(run["state"])
        return model.eval()
    conv_net = trained_model("all-conv")
    every = max(1, math.ceil(len(data.y_test) / args.swap_images))   # every n-th: all classes
    test = utils.DeviceLoader(data.x_test[::every], data.y_test[::every], batch_size=50,
                              device=device, train=False, mean=data.mean, std=data.std)
    x, _ = next(iter(test))                                           # (50, 3, S, S)
    conv = conv_net.stages[0][1].op1
    feats = conv_net.stem(x[:16])                                     # (16, C, H, W)
    err = (attention_from_conv(conv, args.alpha)(feats) - conv(feats)).abs().max().item()
    swapped = copy.deepcopy(conv_net)
    swapped.stages[0][1].op1 = attention_from_conv(conv, args.alpha)
    conv_logits = []
    swap_logits = []
    labels = []
    for xb, yb in test:                                               # both nets, every batch
        conv_logits.append(conv_net(xb))
        swap_logits.append(swapped(xb))
        labels.append(yb)
    lc = torch.cat(conv_logits)
    ls = torch.cat(swap_logits)
    y = torch.cat(labels)
    s_conv = utils.Score(100.0 * (lc.argmax(-1) == y).float().mean().item(),
                         F.cross_entropy(lc, y).item())
    s_swap = utils.Score(100.0 * (ls.argmax(-1) == y).float().mean().item(),
                         F.cross_entropy(ls, y).item())
    same = 100.0 * (lc.argmax(-1) == ls.argmax(-1)).float().mean().item()
    res = {"max_abs_err": err, "alpha": args.alpha, "images": len(test.y),
           "test_acc_conv": s_conv.acc, "test_acc_attention": s_swap.acc,
           "nll_conv": s_conv.nll, "nll_attention": s_swap.nll,
           "same_predictions_pct": same}
    # entry check: at this alpha the softmax's leak is below float32 resolution (section 2)
    leak_share = 2 * leak(args.alpha) / (1 + leak(args.alpha))
    eps = torch.finfo(torch.float32).eps
    res["entry_check"] = entry_check("Theorem 1 on a trained network",
                                     f"the twin's leak 2S/(1+S) at alpha {args.alpha:g}",
                                     f"{leak_share:.1e}", f"< {eps:.1e}, float32 resolution",
                                     leak_share < eps)
    print(f"Theorem 1 on a trained network, alpha {args.alpha:g}: max |twin - conv| = "
          f"{err:.1e} on real features; {len(test.y):,d} test images: {s_swap.acc:.2f}% "
          f"with the twin, {s_conv.acc:.2f}% with the conv (NLL {s_swap.nll:.4f} vs "
          f"{s_conv.nll:.4f}), {same:.2f}% same predictions", flush=True)
    if ("all-local", trained["per_class"], args.seed) in trained["runs"]:
        local_net = trained_model("all-local")
        feats = local_net.stages[0][0](local_net.stem(x[:16]))       # stage 1's block input
        _, attn = local_net.stages[0][1].op1(feats, return_attn=True)  # (B, N_h, N, L)
        Hs, Ws = feats.shape[2:]
        res["local_nonlocality"] = window_nonlocality(attn, args.window).mean(0).tolist()
        mean = torch.tensor(data.mean).view(3, 1, 1)
        std = torch.tensor(data.std).view(3, 1, 1)
        images = [(im.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
                  for im in x[:4]]
        centre = attn[:4, :, (Hs // 2) * Ws + Ws // 2].cpu()         # (4, N_h, L)
        res["figure"] = plot_attention(out, images, centre, (Hs, Ws), args.window)
        print(f"trained all-local, stage-1 SASA heads' nonlocality (pixels): "
              f"{[round(v, 2) for v in res['local_nonlocality']]}; {res['figure']}",
              flush=True)
    return res


def plot_attention(out, images, attn, hw, window):
    """For a few test images: the image with its centre query pixel (red), then each head of
    the trained stage-1 SASA layer for that query: its window of weights on the map."""
    from matplotlib.figure import Figure
    H, W = hw
    p = window // 2
    heads = attn.shape[1]
    qy = H // 2
    qx = W // 2
    fig = Figure(figsize=(1.6 * (heads + 1), 1.6 * len(images)))
    axes = fig.subplots(len(images), heads + 1, squeeze=False)
    for i, image in enumerate(images):                          # image (S, S, 3) in [0, 1]
        s = image.shape[0] / H                                  # image px per feature px
        axes[i, 0].imshow(image)
        axes[i, 0].scatter([(qx + .5) * s - .5], [(qy + .5) * s - .5], c="red", s=20,
                           marker="x")
        for hd in range(heads):                                 # (L,) -> window on the map
            grid = torch.zeros(H + 2 * p, W + 2 * p)
            grid[qy:qy + window, qx:qx + window] = attn[i, hd].view(window, window)
            crop = grid[p:p + H, p:p + W].numpy()
            axes[i, hd + 1].imshow(crop, cmap="viridis", vmin=0)
            axes[i, hd + 1].set_title(f"head {hd}", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("trained all-local, stage 1: SASA attention of the centre pixel",
                 fontsize=8)
    path = os.path.join(out, "attention_maps.png")
    fig.savefig(path, dpi=80, bbox_inches="tight")
    return path


# %%
def time_step(layer, shape, *, batch_size, steps):
    """Median seconds of one forward + backward of `layer` (after one warm-up)."""
    x = torch.randn(batch_size, *shape, requires_grad=True)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        layer(x).square().mean().backward()
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[steps // 2]


def bench(args, device, *, steps=7):
    """SASA's reference and its fast path, side by side, with axial attention and a 3x3
    conv for scale, at the quick all-local model's stage sizes, K = 3 and 5 (fwd + bwd)."""
    q = SimpleNamespace(**PRESETS["quick"])
    widths = matched_widths(MODELS["all-local"], widths=q.widths, head_dim=q.head_dim,
                            window=q.window, image_size=q.image_size,
                            stem_stride=q.stem_stride, num_classes=10)[0]
    rows = []
    lines = []
    for window in (3, 5):
        for stage, C in enumerate(widths):
            S = q.image_size // q.stem_stride // 2 ** stage
            heads = C // q.head_dim
            utils.set_seed(0)
            sasa = LocalSelfAttention2d(C, num_heads=heads, window=window)
            fast_sasa = FastLocalSelfAttention2d(C, num_heads=heads, window=window)
            fast_sasa.load_state_dict(sasa.state_dict())
            fast = "dense" if S * S <= 4 * window ** 2 else "shifted"   # what it takes
            layers = {"SASA reference": sasa, "SASA fast": fast_sasa,
                      "axial": AxialAttention2d(C, num_heads=heads, max_size=S),
                      "conv 3x3": nn.Conv2d(C, C, 3, padding=1, bias=False)}
            ms = {}
            for name, layer in layers.items():
                seconds = time_step(layer.to(device), (C, S, S), batch_size=q.batch_size,
                                    steps=steps)
                ms[name] = 1e3 * seconds
            rows.append(dict(window=window, stage=stage + 1, size=S, width=C, fast=fast,
                             ms=ms))
            speedup = ms["SASA reference"] / ms["SASA fast"]
            lines.append(f"K={window} stage {stage + 1} ({S}x{S}, C={C}, batch "
                         f"{q.batch_size}): "
                         + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items())
                         + f" | fast ({fast}) {speedup:.1f}x faster than the reference, "
                         f"{ms['SASA fast'] / ms['conv 3x3']:.1f}x a conv's time")
            print(lines[-1], flush=True)
        total = {}
        for name in rows[-1]["ms"]:                              # the three stages together
            total[name] = sum(r["ms"][name] for r in rows if r["window"] == window)
        speedup = total["SASA reference"] / total["SASA fast"]
        vs_conv = total["SASA fast"] / total["conv 3x3"]
        lines.append(f"K={window}, three stages: SASA fast {speedup:.1f}x faster than the "
                     f"reference, {vs_conv:.1f}x a conv's time")
        print(lines[-1], flush=True)
    return {"rows": rows, "lines": lines}


def main(argv=None):
    args = get_args(argv)
    device, out = utils.start(args, "01_conv_vs_attention")
    if args.mode == "demo":
        return utils.run_demos(out, [demo_conv_twin, demo_alpha, demo_receptive_fields])
    config = dict(vars(args))
    if args.mode == "bench":
        res = bench(args, device)
        utils.save_results(os.path.join(out, "bench.json"), config, res)
        return res
    data = utils.data_from_args(args)
    print(f"data: {len(data.y_train):,d} train / {len(data.y_test):,d} test images, "
          f"{data.num_classes} classes, {args.image_size} px; device {device}",
          flush=True)
    trained = train_all(args, data, args.experiments, device)
    results = {}
    for name in args.experiments:
        print(f"== {name} ==", flush=True)
        if name == "compare":
            results[name] = exp_compare(args, trained)
        elif name == "scaling":
            results[name] = exp_scaling(args, trained)
        else:
            results[name] = exp_swap(args, out, trained, data, device)
        utils.save_results(os.path.join(out, f"{name}.json"), config, results[name])
    runs = []
    for r in trained["runs"].values():                   # the runs without their weights
        runs.append({k: v for k, v in r.items() if k != "state"})
    path = os.path.join(out, "results.json")
    utils.save_results(path, config, {**results, "runs": runs})
    print(f"results: {out}/results.json", flush=True)
    return {**results, "runs": runs}


# %%
if __name__ == "__main__":
    utils.run_main(main)
