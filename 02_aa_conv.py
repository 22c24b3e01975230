"""Attention Augmented Convolutional Networks -- Bello, Zoph, Vaswani, Shlens & Le, ICCV 2019
(arXiv:1904.09925).

Run:
    python 02_aa_conv.py --demo                  # no data, seconds: the checks and figures
    python 02_aa_conv.py --quick --data cifar10  # 2-core CPU, minutes (--data DIR: ImageFolder)
    python 02_aa_conv.py --data cifar10          # full preset: one GPU (not measured here)
"""
import copy
import math
import os
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import utils

# %% [markdown]
# # Attention-augmented convolution
#
# A $K \times K$ convolution mixes each pixel with its neighbours only; to relate two regions
# far apart, a network has to stack many of them. Self-attention relates every pixel to
# every other in one step, but on its own it does not know where pixels are. Bello et al. run
# both on the same input and stack their outputs on the channel axis (Sec. 3.2):
#
# $$\mathrm{AAConv}(X) = \mathrm{Concat}\big[\mathrm{Conv}(X),\ \mathrm{MHA}(X)\big]$$
#
# The attention part gets *relative* positions: one learned vector per row offset and one per
# column offset, added to the keys, so the layer still treats every position alike (a shift
# of the image shifts its output).
#
# **What you will learn**
# - how 2-D relative position logits are computed for all $N^2$ pairs from two small tables,
#   with the pad-and-reshape trick `rel_to_abs` instead of an $N \times N$ gather;
# - how the layer splits its $C_{out}$ output channels between a convolution and
#   multi-head attention ($d_k = \kappa C_{out}$, $d_v = \upsilon C_{out}$);
# - why only the query bias survives the BatchNorm that follows the layer;
# - on a generated task, that attention lets a ResNet decide from two cues farther apart than
#   its receptive field, and on CIFAR-10 at CPU scale, how much that buys there.

# %% [markdown]
# ## 1. Relative position logits (Sec. 3.1.2, eq. 3)
#
# Head $h$ compares query pixel $q$ with key pixel $k$ (both (row, column) positions, as in
# the README's notation) by
#
# $$A^h_{qk} = \frac{q_q^\top}{\sqrt{d_k^h}}\left(k_k + r^W_{\delta_2} + r^H_{\delta_1}\right),
# \qquad \delta = k - q,$$
#
# where $q_q$ and $k_k$ are the query and key vectors ($d_k^h = d_k / N_h$ entries each),
# $r^H$ has one learned vector per row offset $\delta_1 \in \{-(H-1), \dots, H-1\}$ and $r^W$
# one per column offset. The position terms depend on the offset only.
#
# Along one axis of length $L$ a query has $2L-1$ possible offsets. The product of every
# query with every offset vector is an $(L, 2L-1)$ table indexed by (query, offset); the
# logits need an $(L, L)$ table indexed by (query, key), where entry $(i, j)$ is the table's
# entry at offset $j - i$. `rel_to_abs` moves every row by its own amount with one pad and
# two reshapes (the "skewing" of Music Transformer): no index tensor, no loop.

# %%
def rel_to_abs(x):
    """(..., L, 2L-1) logits by offset -> (..., L, L) logits by key position:
    out[..., i, j] = x[..., i, (j - i) + L - 1]. Column m of x is the offset m - (L - 1)."""
    *lead, L, M = x.shape
    if M != 2 * L - 1:
        raise ValueError(f"rel_to_abs expects (..., L, 2L-1) logits, got ({L}, {M})")
    # one zero column per row: (..., L, 2L)
    x = F.pad(x, (0, 1))
    # the rows laid end to end: (..., 2L * L)
    x = x.reshape(*lead, L * 2 * L)
    # L - 1 more zeros, so the length factors as (L + 1) rows of 2L - 1
    x = F.pad(x, (0, L - 1))
    # read back with rows one shorter: row i now starts i entries later, i.e. shifted left
    # by i, which puts offset j - i under column j + L - 1. (..., L + 1, 2L - 1)
    x = x.reshape(*lead, L + 1, 2 * L - 1)
    # keep the first L rows and the last L columns: (..., L, L)
    return x[..., :L, L - 1:]


# %% [markdown]
# **A worked example.** Take $L = 3$ and fill the $(3, 5)$ table with numbers that say which
# query and which offset they belong to: entry (query $i$, offset $\delta$) $= 10 i + \delta$.
# After `rel_to_abs`, entry $(i, j)$ must be $10 i + (j - i)$: the diagonal holds offset 0,
# the entry right of it offset $+1$, and so on. The cell below prints both tables.

# %%
def demo_rel_to_abs(L=3):
    """The (L, 2L-1) table by offset, and the (L, L) table by key from rel_to_abs."""
    offsets = torch.arange(-(L - 1), L)                        # (2L-1,): -(L-1) .. L-1
    queries = torch.arange(L)[:, None]                         # (L, 1)
    by_offset = 10 * queries + offsets                         # (L, 2L-1)
    by_key = rel_to_abs(by_offset.float()).long()              # (L, L)
    expected = 10 * queries + (torch.arange(L) - queries)      # 10 i + (j - i)
    print(f"by offset {offsets.tolist()} (rows: query i = 0..{L - 1}):")
    print(by_offset)
    print(f"by key position j = 0..{L - 1} (entry = 10 i + offset j - i):")
    print(by_key)
    print(f"matches 10 i + (j - i) everywhere: {torch.equal(by_key, expected)}")
    return {"rel_to_abs_correct": torch.equal(by_key, expected)}


if utils.in_notebook():
    demo_rel_to_abs()

# %% [markdown]
# With `rel_to_abs`, the position logits along one axis cost one matrix product with the
# $2L-1$ offset vectors: $O(L^2 d)$ instead of building an $(L, L, d)$ tensor of offset
# vectors. `relative_logits_1d` does it for the last axis of a grid of queries.

# %%
def relative_logits_1d(q, rel):
    """q: (..., W, d) queries along one axis; rel: (2W-1, d) offset vectors, offsets
    -(W-1)..W-1. -> (..., W, W): out[..., x, x'] = q_x . rel[x' - x]."""
    # every query against every offset: (..., W, 2W-1)
    by_offset = q @ rel.t()
    return rel_to_abs(by_offset)


# %% [markdown]
# In 2-D, a query at $(y, x)$ and a key at $(y', x')$ get $q^\top r^W_{x'-x}$, which depends on
# the key's column only, plus $q^\top r^H_{y'-y}$, which depends on its row only. So the
# position logits of one query are an $H$-vector plus a $W$-vector, not an $N$-vector: we
# keep `rel_h` of shape $(B, N_h, N, H)$ and `rel_w` of shape $(B, N_h, N, W)$, and broadcast
# them onto the $(H, W)$ key grid only when the logits are formed. For the row offsets we
# swap the grid's axes, so that rows become the last axis, and swap back.
#
# The tables are made for the largest grid (`max_size`); a smaller grid uses their centre
# rows, the offsets it can have.

# %%
def centre_rows(table, side):
    """The rows of a (2M-1, d) offset table for offsets -(side-1)..side-1, side <= M."""
    M = (table.shape[0] + 1) // 2
    return table[M - side:M + side - 1]


def relative_logits_2d(q, rel_h, rel_w, H, W):
    """q: (B, Nh, N, d) scaled queries of an H x W grid; rel_h: (2H-1, d), rel_w: (2W-1, d).
    -> rel_h: (B, Nh, N, H) with [..., i, y'] = q_i . r^H_{y'-y_i}; rel_w: (B, Nh, N, W)."""
    B, Nh, N, d = q.shape
    grid = q.reshape(B, Nh, H, W, d)                       # (B, Nh, H, W, d)
    # columns: the last spatial axis already is x. (B, Nh, H, W, W)
    logits_w = relative_logits_1d(grid, centre_rows(rel_w, W))
    # rows: make y the last spatial axis, then swap back. (B, Nh, H, W, H)
    by_column = grid.transpose(2, 3)                       # (B, Nh, W, H, d)
    logits_h = relative_logits_1d(by_column, centre_rows(rel_h, H)).transpose(2, 3)
    return logits_h.reshape(B, Nh, N, H), logits_w.reshape(B, Nh, N, W)


# %% [markdown]
# ## 2. The attention-augmented convolution (Sec. 3.1-3.2, eq. 1-2)
#
# The layer has $C_{out}$ output channels. $C_{out} - d_v$ of them come from an ordinary
# $K \times K$ convolution, $d_v$ from attention. The attention branch projects the input with
# a $1 \times 1$ convolution into queries and keys ($d_k$ channels each) and values ($d_v$),
# and splits each into $N_h$ heads of $d_k^h = d_k / N_h$ and $d_v^h = d_v / N_h$ channels.
# The paper writes the split as fractions of $C_{out}$: $\kappa = d_k / C_{out}$ and
# $\upsilon = d_v / C_{out}$; $\upsilon = 0$ is a plain convolution.
#
# `split_heads` and `merge_heads` are the reshapes between the image layout $(B, C, H, W)$
# and the attention layout $(B, N_h, N, d)$: head $h$ owns channels $h d .. (h+1) d - 1$.

# %%
def split_heads(t, num_heads):
    """(B, C, H, W) -> (B, Nh, N, C / Nh): one row of channels per pixel, per head."""
    B, C, H, W = t.shape
    t = t.reshape(B, num_heads, C // num_heads, H * W)    # (B, Nh, d, N)
    return t.transpose(2, 3)                               # (B, Nh, N, d)


def merge_heads(o, H, W):
    """(B, Nh, N, d) -> (B, Nh * d, H, W): the heads' outputs side by side."""
    B, Nh, N, d = o.shape
    o = o.transpose(2, 3)                                  # (B, Nh, d, N)
    return o.reshape(B, Nh * d, H, W)


# %% [markdown]
# The logits of eq. 3 for every (query, key) pair: the content term $q_q^\top k_k$, an
# $(N, N)$ matrix per head, plus the position terms. Viewing the key axis as the $(H, W)$
# grid, the row term `rel_h` broadcasts over the key's column and `rel_w` over its row. The
# queries come in already divided by $\sqrt{d_k^h}$, which scales all three terms alike.
# Softmax over the keys and a weighted sum of the values is eq. 1:
# $O_h = \mathrm{softmax}_k(A^h)\, V_h$.

# %%
def attention_logits(q, k, rel_h=None, rel_w=None, H=None, W=None):
    """Eq. 3 for every pair: (B, Nh, N, N), row = query pixel, column = key pixel. Without
    rel_h and rel_w: the content term only."""
    B, Nh, N, _ = q.shape
    content = q @ k.transpose(2, 3)                        # (B, Nh, N, N): q_q . k_k
    if rel_h is None:
        return content
    keys = content.view(B, Nh, N, H, W)                    # the key axis as the grid
    keys = keys + rel_h[..., :, None] + rel_w[..., None, :]
    return keys.reshape(B, Nh, N, N)


# %% [markdown]
# The layer itself now only wires these pieces together. Its `forward` reads as the paper:
# queries, keys and values from one $1 \times 1$ convolution; the attention of each head
# (eq. 1 with eq. 3); the heads concatenated and mixed by the $1 \times 1$ convolution $W^O$
# (eq. 2); that concatenated with the convolution's output (Sec. 3.2). Two methods do nothing
# here, `attention_input` and `attention_output`: Section 3 uses them to add a stride and the
# paper's pooled attention, which a first reading can skip.
#
# Biases: the paper's code makes all three convolutions with TensorFlow's default bias, whose
# initial value is 0; we do the same. Section 4 shows which of them matter.

# %%
def check_split(out_channels, kernel_size, dk, dv, num_heads):
    """Raise ValueError for a channel split the layer cannot build."""
    if kernel_size % 2 != 1:
        raise ValueError(f"kernel_size {kernel_size} must be odd (padding k//2)")
    if not 0 <= dv <= out_channels:
        raise ValueError(f"dv={dv} must be in [0, out_channels={out_channels}]")
    if dk < 0 or (dk > 0 and dv == 0):
        raise ValueError(f"dk={dk} > 0 needs attention values: dv > 0")
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    if dk % num_heads or dv % num_heads:
        raise ValueError(f"dk={dk} and dv={dv} must be divisible by "
                         f"num_heads={num_heads} (dims per head)")


def relative_tables(max_size, dkh):
    """r^H, r^W of eq. 3 for grids up to max_size (int or (H, W)): one row per offset
    -(M-1)..M-1, std dkh^-1/2. -> two (2M-1, dkh) parameters."""
    h, w = (max_size, max_size) if isinstance(max_size, int) else max_size
    scale = max(dkh, 1) ** -0.5
    r_h = nn.Parameter(torch.randn(2 * h - 1, dkh) * scale)
    r_w = nn.Parameter(torch.randn(2 * w - 1, dkh) * scale)
    return r_h, r_w


# %%
class AugmentedConv2d(nn.Module):
    """Concat[Conv(X), MHA(X)] (Sec. 3.2): a k x k conv for out_channels - dv channels,
    attention over all pixels for dv channels (dk query/key channels, num_heads heads), with
    eq. 3's relative logits (relative=True) from tables for grids up to max_size."""

    def __init__(self, in_channels, out_channels, kernel_size, *, dk, dv, num_heads,
                 relative=True, max_size=32, bias=True):
        super().__init__()
        check_split(out_channels, kernel_size, dk, dv, num_heads)
        self.dk = dk
        self.dv = dv
        self.num_heads = num_heads
        self.relative = relative
        self.conv = None                       # Conv(X); none when dv = out_channels
        if out_channels > dv:
            self.conv = nn.Conv2d(in_channels, out_channels - dv, kernel_size,
                                  padding=kernel_size // 2, bias=bias)
        if dv == 0:
            return                             # upsilon = 0: a plain convolution
        self.qkv = nn.Conv2d(in_channels, 2 * dk + dv, 1, bias=bias)  # W_Q, W_K, W_V
        self.attn_out = nn.Conv2d(dv, dv, 1, bias=bias)               # W^O (eq. 2)
        for m in (self.conv, self.qkv, self.attn_out):
            if bias and m is not None:
                nn.init.zeros_(m.bias)         # as tf.layers.conv2d in the paper's code
        if relative:
            self.key_rel_h, self.key_rel_w = relative_tables(max_size, dk // num_heads)

    def queries_keys_values(self, a):
        """a: (B, C, H, W) -> q (scaled), k: (B, Nh, N, dkh); v: (B, Nh, N, dvh)."""
        q, k, v = self.qkv(a).split([self.dk, self.dk, self.dv], dim=1)
        dkh = self.dk // self.num_heads
        q = split_heads(q, self.num_heads) * (dkh ** -0.5 if dkh else 1.0)
        return q, split_heads(k, self.num_heads), split_heads(v, self.num_heads)

    def relative_logits(self, q, H, W):
        """The position terms of eq. 3: rel_h (B, Nh, N, H) and rel_w (B, Nh, N, W)."""
        if H > len(self.key_rel_h) // 2 + 1 or W > len(self.key_rel_w) // 2 + 1:
            raise ValueError(f"grid {H}x{W} exceeds the relative tables: raise max_size")
        return relative_logits_2d(q, self.key_rel_h, self.key_rel_w, H, W)

    def logits(self, q, k, H, W):
        """Eq. 3 for every pair: (B, Nh, N, N)."""
        if not self.relative:
            return attention_logits(q, k)
        return attention_logits(q, k, *self.relative_logits(q, H, W), H, W)

    def attention(self, q, k, v, H, W):
        """Eq. 1 for every head: softmax over the keys, then the weighted values."""
        return self.logits(q, k, H, W).softmax(dim=-1) @ v      # (B, Nh, N, dvh)

    def attention_input(self, x):
        return x                               # the paper's layer: X itself (see Sec. 3)

    def attention_output(self, o, x):
        return o                               # the paper's layer: X's grid (see Sec. 3)

    def forward(self, x):
        if self.dv == 0:
            return self.conv(x)
        a = self.attention_input(x)
        B, _, H, W = a.shape
        q, k, v = self.queries_keys_values(a)            # (B, Nh, N, dkh | dkh | dvh)
        o = merge_heads(self.attention(q, k, v, H, W), H, W)  # (B, dv, H, W)
        o = self.attention_output(self.attn_out(o), x)   # W^O (eq. 2)
        if self.conv is None:
            return o
        return torch.cat([self.conv(x), o], dim=1)       # Concat[Conv(X), MHA(X)]


# %% [markdown]
# **What one query pixel sees.** `positional_map` takes one query pixel of an input and
# returns its content logits $q_q^\top k_k / \sqrt{d_k^h}$, its position logits
# $q_q^\top (r^W + r^H) / \sqrt{d_k^h}$ and its attention weights, per head, as $(H, W)$ maps.
# `naive_logits` writes eq. 3 out one pair at a time, the check the demo prints. At random
# initialisation the position map is a row profile plus a column profile (a "plaid"), and
# the weights are nearly uniform: the logits are small.

# %%
def positional_map(layer, x, query):
    """For one query pixel (y, x) of x (1, C, H, W): content logits, position logits and
    attention weights of every head, each (Nh, H, W)."""
    with torch.no_grad():
        a = layer.attention_input(x)
        H, W = a.shape[2:]
        q, k, _ = layer.queries_keys_values(a)
        i = query[0] * W + query[1]                            # the query's flat index
        content = (q @ k.transpose(2, 3))[0, :, i].view(-1, H, W)
        position = torch.zeros_like(content)
        if layer.relative:
            rel_h, rel_w = layer.relative_logits(q, H, W)
            # the row term varies down the key grid, the column term across it
            position = rel_h[0, :, i, :, None] + rel_w[0, :, i, None, :]
        weights = layer.logits(q, k, H, W).softmax(-1)[0, :, i].view(-1, H, W)
    return content, position, weights


def naive_logits(layer, q, k, H, W):
    """Eq. 3 written out, one (query, key) pair at a time: (B, Nh, N, N)."""
    out = torch.zeros(*q.shape[:2], H * W, H * W, dtype=q.dtype)
    for i in range(H * W):
        for j in range(H * W):
            key = k[:, :, j]
            if layer.relative:
                dy = j // W - i // W                           # delta_1, rows
                dx = j % W - i % W                             # delta_2, columns
                key = key + centre_rows(layer.key_rel_h, H)[dy + H - 1]
                key = key + centre_rows(layer.key_rel_w, W)[dx + W - 1]
            out[:, :, i, j] = (q[:, :, i] * key).sum(-1)
    return out


# %%
def demo_relative_logits(query=(2, 5), relative=True, x=None, query_bias=None):
    """What one query pixel of a random 8x8 input sees, per head: content logits, position
    logits (r^H + r^W) and weights; and eq. 3 by rel_to_abs against the per-pair loop."""
    from matplotlib.figure import Figure
    torch.manual_seed(0)
    layer = AugmentedConv2d(8, 16, 3, dk=16, dv=8, num_heads=4, relative=relative,
                            max_size=8)
    x = torch.randn(1, 8, 8, 8) if x is None else x
    if query_bias is not None:
        layer.qkv.bias.data[:16] = query_bias
    content, position, weights = positional_map(layer, x, query)
    with torch.no_grad():
        q, k, _ = layer.queries_keys_values(x)
        diff = layer.logits(q, k, 8, 8) - naive_logits(layer, q, k, 8, 8)
    err = diff.abs().max().item()
    print(f"eq. 3 by rel_to_abs vs a per-pair loop: max |difference| {err:.1e}")
    panels = [("content q.k", content), ("position q.(r^H+r^W)", position),
              ("attention weights", weights)]
    fig = Figure(figsize=(7.5, 9))
    axes = fig.subplots(layer.num_heads, 3, squeeze=False)
    for h in range(layer.num_heads):
        for c, (name, m) in enumerate(panels):
            axes[h, c].imshow(m[h].numpy(), cmap="viridis")
            axes[h, c].plot([query[1]], [query[0]], "rx", ms=8, mew=2)
            axes[h, c].set_title(f"head {h + 1}: {name}", fontsize=8)
            axes[h, c].axis("off")
    fig.suptitle(f"query pixel {query} (x) of an 8x8 input, random init", fontsize=10)
    utils.show(fig, "demo_relative_logits")
    return {"eq3_max_abs_error": err, "position_spread": position.std().item()}


if utils.in_notebook():
    demo_relative_logits()

# %% [markdown]
# **The two branches.** On a simple grey image (a disc and a bar), the first $C_{out} - d_v$
# output channels are exactly `Conv(X)`. At initialisation the attention is nearly uniform, so
# each attention channel is close to one value everywhere: a summary of the whole image. This
# is the "global context" the paper adds; training makes it depend on where the query is.

# %%
def demo_branches(dk=8):
    """The layer's output on a simple image: its conv and its attention channels."""
    from matplotlib.figure import Figure
    torch.manual_seed(0)
    layer = AugmentedConv2d(3, 12, 3, dk=dk, dv=6, num_heads=2, max_size=16)
    yy, xx = torch.meshgrid(torch.arange(16.), torch.arange(16.), indexing="ij")
    disc = ((yy - 5) ** 2 + (xx - 5) ** 2 < 12).float()
    bar = ((yy > 10) & (xx > 3)).float() * 0.6
    img = disc + bar
    x = img.expand(1, 3, 16, 16)                             # grey: 3 equal channels
    with torch.no_grad():
        out = layer(x)
        same = torch.equal(out[0, :6], layer.conv(x)[0])
    # spatial spread of each channel: near-uniform attention gives near-constant maps
    spread = {"conv": out[0, :6].flatten(1).std(1).mean().item(),
              "attention": out[0, 6:].flatten(1).std(1).mean().item()}
    print(f"output channels 0-5 == Conv(X): {same}; mean spatial std of a channel: conv "
          f"{spread['conv']:.3f}, attention {spread['attention']:.3f}")
    fig = Figure(figsize=(9, 3.4))
    vmax = out.abs().max().item()
    axes = fig.subplots(2, 4)
    axes[0, 0].imshow(img.numpy(), cmap="gray")
    axes[0, 0].set_title("input", fontsize=8)
    for c in range(3):
        for r, name in enumerate(("Conv(X)", "MHA(X)")):
            axes[r, c + 1].imshow(out[0, 6 * r + c].numpy(), cmap="RdBu_r", vmin=-vmax,
                                  vmax=vmax)
            axes[r, c + 1].set_title(f"{name} channel {c + 1}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("AAConv(X) = Concat[Conv(X), MHA(X)], 6 + 6 channels, one colour scale",
                 fontsize=9)
    utils.show(fig, "demo_branches")
    return {"conv_channels_equal_conv": same, "spatial_std": spread}


if utils.in_notebook():
    demo_branches()

# %% [markdown]
# ## 3. Stride and pooled attention (for the ResNet; skip on a first reading)
#
# Two things the paper's layer does not have, which its ResNet needs:
#
# - **A stride.** A ResNet halves the grid in the first conv of a stage. The paper's code has
#   no stride; ours runs the conv branch with the stride and the attention on the output
#   grid: its input is first averaged over $K \times K$ windows with the same stride (padding
#   not counted, as TensorFlow's 'SAME' pooling).
# - **Pooled attention (Sec. 4.2).** To save memory on large grids the paper attends on a
#   $3 \times 3$ / stride-2 average-pooled input and upsamples the result bilinearly.
#   `upsample_pooled` puts pooled pixel $i$ back at pixel $2i$, the centre of the window it
#   averaged. $W^O$ is a $1 \times 1$ conv and bilinear weights sum to 1, so upsampling before
#   or after $W^O$ is the same.
#
# `StridedAugmentedConv2d` fills in the two empty methods of Section 2 and sizes the tables
# for the grid attention sees; with stride 1 and no pooling it is the paper's layer.

# %%
def upsample_pooled(x, size):
    """Undo a 3x3 / stride-2 average pooling: (B, C, h, w) -> (B, C, H, W). Pixel i goes back
    to 2i (align_corners onto 2h - 1 points); an even side repeats its last row/column."""
    H, W = size
    h, w = x.shape[-2:]
    if H not in (2 * h - 1, 2 * h) or W not in (2 * w - 1, 2 * w):
        raise ValueError(f"{h}x{w} is not {H}x{W} / 2")
    grid = (2 * h - 1, 2 * w - 1)
    x = F.interpolate(x, size=grid, mode="bilinear", align_corners=True)
    return F.pad(x, (0, W - (2 * w - 1), 0, H - (2 * h - 1)), mode="replicate")


def attention_side(n, stride, pooled):
    """The side of the grid attention works on, for an input side n."""
    n = (n - 1) // stride + 1                                # the conv's output side
    return (n + 1) // 2 if pooled else n


class StridedAugmentedConv2d(AugmentedConv2d):
    """AugmentedConv2d with a stride (attention on the k x k average-pooled input) and,
    with pool_attention, the paper's pooled attention (Sec. 4.2)."""

    def __init__(self, in_channels, out_channels, kernel_size, *, stride=1,
                 pool_attention=False, max_size=32, **kw):
        sides = (max_size, max_size) if isinstance(max_size, int) else max_size
        grid = tuple(attention_side(n, stride, pool_attention) for n in sides)
        super().__init__(in_channels, out_channels, kernel_size, max_size=grid, **kw)
        self.kernel_size = kernel_size
        self.stride = stride
        self.pool_attention = pool_attention
        if self.conv is not None:
            self.conv.stride = (stride, stride)              # the conv branch downsamples

    def attention_input(self, x):
        if self.stride > 1:
            k = self.kernel_size
            x = F.avg_pool2d(x, k, self.stride, k // 2, count_include_pad=False)
        if self.pool_attention:
            x = F.avg_pool2d(x, 3, 2, 1, count_include_pad=False)
        return x

    def attention_output(self, o, x):
        if not self.pool_attention:
            return o
        size = [attention_side(n, self.stride, False) for n in x.shape[2:]]
        return upsample_pooled(o, size)


# %% [markdown]
# ## 4. The paper's CIFAR model: an augmented pre-activation ResNet (Sec. 4.1)
#
# On CIFAR the paper augments "the first convolution of all residual blocks" of a
# Wide-ResNet. Its blocks are *pre-activation* (He et al. 2016): BatchNorm and ReLU come
# before each convolution, and the shortcut adds the block's input back,
#
# $$a = \mathrm{ReLU}(\mathrm{BN}_1(x)), \qquad
# y = x + \mathrm{conv}_2\big(\mathrm{ReLU}(\mathrm{BN}_2(\mathrm{conv}_1(a)))\big).$$
#
# `conv1` is where the augmented convolution goes. When the block changes the grid or the
# width, the shortcut is a $1 \times 1$ convolution of the pre-activated input.

# %%
class PreActBlock(nn.Module):
    """BN-ReLU-conv1-BN-ReLU-conv3x3 + shortcut (the Wide-ResNet's block). conv1: an
    nn.Conv2d, or an augmented conv for the AA-ResNet."""

    def __init__(self, conv1, in_ch, out_ch, *, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = conv1
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_ch != out_ch:          # a 1x1 projection, as the WRN's
            self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)

    def forward(self, x):
        a = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(a)
        return self.conv2(F.relu(self.bn2(self.conv1(a)))) + skip


# %% [markdown]
# **Which biases matter.** `bn2` follows `conv1`. In training mode BatchNorm subtracts each
# channel's mean over the batch and the grid, so a constant added to a whole channel
# disappears. That cancels the bias of the conv branch and the bias of $W^O$ (both add one
# constant per channel); the key bias adds $q_q^\top b_k$, the same for every key of a query,
# which softmax ignores; the value bias adds $b_v$ to every value, and since a query's
# weights sum to 1 it reaches the output as a constant. The **query bias** survives: it adds
# $b_q^\top (k_k + r_{k-q})$, a preference for some keys and some offsets that holds for every
# image. The tests check each of these; the lab measures whether the biases matter.

# %% [markdown]
# **The channel split.** The paper's CIFAR rule is $N_h = 8$, $\kappa = 2\upsilon = 0.2$, and
# at least 20 key channels per head. `aa_channels` turns $\kappa$ and $\upsilon$ into
# $(d_k, d_v)$ for a layer of $C_{out}$ channels: each rounded to a multiple of $N_h$ (at
# least one per head), $d_k$ raised to the minimum per head.

# %%
def heads_multiple(c, num_heads):
    """c rounded to a multiple of num_heads, at least num_heads when c > 0."""
    if c <= 0:
        return 0
    return num_heads * max(1, round(c / num_heads))


def aa_channels(f_out, *, num_heads, kappa, upsilon, min_dkh=0):
    """(dk, dv) of a layer with f_out output channels: kappa f_out and upsilon f_out, as
    multiples of num_heads; dk at least min_dkh per head (the paper's CIFAR runs: 20)."""
    dv = min(heads_multiple(upsilon * f_out, num_heads), f_out // num_heads * num_heads)
    if dv == 0:
        return 0, 0
    dk = max(heads_multiple(kappa * f_out, num_heads), min_dkh * num_heads)
    return dk, dv


# %% [markdown]
# **The network.** A $3 \times 3$ stem, three stages of pre-activation blocks (the first
# block of stages 2 and 3 halves the grid), BN-ReLU, global average pooling and a linear
# classifier. Stages listed in `aa_stages` get an augmented `conv1` in every block; none gives
# the baseline ResNet. `layer` picks the augmented conv: the reference form of Section 3 by
# default (the lab switches to the blockwise path of the next section, which computes the
# same function).

# %%
class ResNet(nn.Module):
    """CIFAR pre-activation ResNet: stem, three stages (stride 1, 2, 2), BN-ReLU, average
    pool, linear head; an augmented first conv in every block of the aa_stages."""

    def __init__(self, *, num_classes, widths, blocks, aa_stages=(), pool_stages=(),
                 num_heads=8, kappa=0.2, upsilon=0.1, min_dkh=0, relative=True,
                 bias=True, image_size=32, layer=None, channels_last=True):
        super().__init__()
        if len(widths) != 3 or len(blocks) != 3:
            raise ValueError(f"widths {widths}, blocks {blocks}: three stages")
        layer = layer or StridedAugmentedConv2d
        self.stem = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        layers = []
        in_ch = widths[0]
        size = image_size
        for stage, (w, n) in enumerate(zip(widths, blocks), start=1):
            for b in range(n):
                stride = 2 if stage > 1 and b == 0 else 1
                conv1 = nn.Conv2d(in_ch, w, 3, stride=stride, padding=1, bias=False)
                if stage in aa_stages:
                    dk, dv = aa_channels(w, num_heads=num_heads, kappa=kappa,
                                         upsilon=upsilon, min_dkh=min_dkh)
                    conv1 = layer(in_ch, w, 3, dk=dk, dv=dv, num_heads=num_heads,
                                  stride=stride, relative=relative, max_size=size,
                                  pool_attention=stage in pool_stages, bias=bias)
                layers.append(PreActBlock(conv1, in_ch, w, stride=stride))
                in_ch = w
                size = (size - 1) // stride + 1
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(in_ch)
        self.head = nn.Linear(in_ch, num_classes)
        # channels-last storage: the same numbers, faster on this CPU (--bench)
        self.memory_format = torch.contiguous_format
        if channels_last:
            self.memory_format = torch.channels_last
        self.to(memory_format=self.memory_format)

    def forward(self, x):
        x = self.blocks(self.stem(x.contiguous(memory_format=self.memory_format)))
        return self.head(F.relu(self.bn(x)).mean(dim=(2, 3)))   # (B, num_classes)


# %% [markdown]
# ## Optional: speed (blockwise attention, the same function)
#
# `AugmentedConv2d.attention` builds the $(B, N_h, N, N)$ logits and autograd keeps the
# softmax weights for the backward pass: memory grows as $N^2$, and on a CPU moving those
# tensors through memory, not the arithmetic, is the cost. `BlockwiseAttention` computes
# blocks of complete query rows (all $N$ keys of a few queries) while they fit in the cache,
# keeps only $q$, $k$, $v$, the position terms and the output, and recomputes each block's
# weights in a hand-written backward pass. It is plain PyTorch with whole rows per block: no
# fused kernel, and no running softmax over tiles of keys. The tests check that it equals the
# reference form (values, every gradient, a float64 gradcheck with split rows).

# %%
def wide_matmul(a, b):
    """a @ b with a narrow result (..., N, d), computed as (b^T a^T)^T: the same sums, with
    the wide (..., d, N) result that CPU BLAS libraries compute faster."""
    return (b.transpose(-2, -1) @ a.transpose(-2, -1)).transpose(-2, -1)


def row_blocks(G, N, block_elements):
    """(head slice, row slice) pairs over G x N query rows, ~block_elements logits."""
    heads = max(1, block_elements // (N * N))
    rows = min(N, max(1, block_elements // N))
    out = []
    for g in range(0, G, heads):
        for r in range(0, N, rows):
            out.append((slice(g, g + heads), slice(r, r + rows)))
    return out


def block_weights(q, k, rel_h, rel_w, H, W):
    """Softmax weights of one block: q (g, r, d) against all keys k (g, N, d)."""
    s = q @ k.transpose(1, 2)                                   # (g, r, N)
    if rel_h is not None:
        g, r, N = s.shape
        s = s.view(g, r, H, W) + rel_h[..., None] + rel_w[..., None, :]
        s = s.view(g, r, N)
    return s.softmax(dim=-1)


def block_rel(rel_h, rel_w, hs, rs):
    """The position terms of one block, or (None, None) without relative logits."""
    if rel_h is None:
        return None, None
    return rel_h[hs, rs], rel_w[hs, rs]


# %% [markdown]
# **The backward pass by hand.** For one query row with weights $p = \mathrm{softmax}(s)$ and
# output $o = p V$, the chain rule gives $\partial L / \partial V = p^\top \partial L / \partial o$
# and $\partial L / \partial p_j = (\partial L / \partial o) \cdot v_j$. Through the softmax,
#
# $$\frac{\partial L}{\partial s_j} = p_j \Big(\frac{\partial L}{\partial p_j}
# - \sum_{j'} p_{j'} \frac{\partial L}{\partial p_{j'}}\Big),
# \qquad \sum_{j'} p_{j'} \frac{\partial L}{\partial p_{j'}}
# = \frac{\partial L}{\partial o} \cdot o,$$
#
# so the correction term needs only the saved output $o$, not the weights (`delta` below).
# The logits $s = q k^\top + $ `rel_h` $+$ `rel_w` then pass the gradient on: to $q$ and $k$
# through the product, and to `rel_h` (`rel_w`) as the sum over the key columns (rows) they
# were broadcast over.

# %%
class BlockwiseAttention(torch.autograd.Function):
    """softmax(q k^T + position logits) v, block by block. q, k: (G, N, dkh), q scaled;
    v: (G, N, dvh); rel_h: (G, N, H), rel_w: (G, N, W) or None. Returns (G, N, dvh)."""

    BLOCK_ELEMENTS = 2 ** 18  # logits per block: 1 MiB of float32, about one L2 cache

    @staticmethod
    def blocks(G, N):
        return row_blocks(G, N, BlockwiseAttention.BLOCK_ELEMENTS)

    @staticmethod
    def forward(ctx, q, k, v, rel_h, rel_w, H, W):
        G, N, _ = q.shape
        o = v.new_empty(G, N, v.shape[-1])
        for hs, rs in BlockwiseAttention.blocks(G, N):
            p = block_weights(q[hs, rs], k[hs], *block_rel(rel_h, rel_w, hs, rs), H, W)
            o[hs, rs] = wide_matmul(p, v[hs])                   # (g, r, dvh)
        ctx.save_for_backward(q, k, v, rel_h, rel_w, o)
        ctx.HW = (H, W)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, rel_h, rel_w, o = ctx.saved_tensors
        H, W = ctx.HW
        do = do.to(o.dtype)
        dq = torch.zeros_like(q)
        dk = torch.zeros_like(k)
        dv = torch.zeros_like(v)
        drel_h = None if rel_h is None else torch.empty_like(rel_h)
        drel_w = None if rel_w is None else torch.empty_like(rel_w)
        # sum_j p_ij dL/dp_ij = do_i . o_i: the softmax backward's correction, (G, N, 1)
        delta = (do * o).sum(-1, keepdim=True)
        for hs, rs in BlockwiseAttention.blocks(*q.shape[:2]):
            p = block_weights(q[hs, rs], k[hs], *block_rel(rel_h, rel_w, hs, rs), H, W)
            dv[hs] += wide_matmul(p.transpose(1, 2), do[hs, rs])            # o = p v
            ds = p * (do[hs, rs] @ v[hs].transpose(1, 2) - delta[hs, rs])   # softmax
            if rel_h is not None:
                d = ds.view(*ds.shape[:2], H, W)        # (g, r, H, W): the key's (y', x')
                drel_h[hs, rs] = d.sum(3)               # rel_h was broadcast over x'
                drel_w[hs, rs] = d.sum(2)               # rel_w over y'
            dq[hs, rs] = wide_matmul(ds, k[hs])                              # s = q k^T
            dk[hs] += wide_matmul(ds.transpose(1, 2), q[hs, rs])
        return dq, dk, dv, drel_h, drel_w, None, None


class BlockwiseAugmentedConv2d(StridedAugmentedConv2d):
    """StridedAugmentedConv2d whose attention runs through BlockwiseAttention: the same
    weights and function, O(N (d + H + W)) memory per head instead of O(N^2)."""

    def attention(self, q, k, v, H, W):
        B, Nh, N, _ = q.shape
        rel_h = None
        rel_w = None
        if self.relative:
            rel_h, rel_w = self.relative_logits(q, H, W)
            rel_h = rel_h.reshape(B * Nh, N, H)                  # (G, N, H)
            rel_w = rel_w.reshape(B * Nh, N, W)                  # (G, N, W)
        flat_q = q.reshape(B * Nh, N, -1)                        # (G, N, dkh)
        flat_k = k.reshape(B * Nh, N, -1)
        flat_v = v.reshape(B * Nh, N, -1)                        # (G, N, dvh)
        o = BlockwiseAttention.apply(flat_q, flat_k, flat_v, rel_h, rel_w, H, W)
        return o.view(B, Nh, N, -1)                              # (B, Nh, N, dvh)


# %%
def saved_mb(fn):
    """MB that autograd keeps for the backward pass while fn() runs."""
    nbytes = [0]

    def pack(t):
        nbytes[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return nbytes[0] / 2**20


def outputs_and_grads(layer, x):
    """Output, input gradient and r^H gradient of one layer for the loss sum(y^2)."""
    xx = x.clone().requires_grad_()
    y = layer(xx)
    y.square().sum().backward()
    return y, xx.grad, layer.key_rel_h.grad


def demo_blockwise(grids=(8, 16, 24, 32), block_elements=100):
    """The blockwise path equals the reference form (blocks of block_elements logits: 2 query
    rows of the 6x7 grid), and what each keeps for the backward pass as the grid grows."""
    from matplotlib.figure import Figure
    torch.manual_seed(0)
    simple = StridedAugmentedConv2d(4, 16, 3, dk=8, dv=8, num_heads=2, max_size=32)
    fast = BlockwiseAugmentedConv2d(4, 16, 3, dk=8, dv=8, num_heads=2, max_size=32)
    fast.load_state_dict(simple.state_dict())
    x = torch.randn(2, 4, 6, 7)
    block = BlockwiseAttention.BLOCK_ELEMENTS
    BlockwiseAttention.BLOCK_ELEMENTS = block_elements
    try:
        ref = outputs_and_grads(simple, x)
        got = outputs_and_grads(fast, x)
        n_blocks = len(BlockwiseAttention.blocks(4, 42))
    finally:
        BlockwiseAttention.BLOCK_ELEMENTS = block
    errs = [(a - b).abs().max().item() for a, b in zip(ref, got)]
    print(f"reference vs blockwise, {n_blocks} blocks of query rows: max |difference| "
          f"output {errs[0]:.1e}, input gradient {errs[1]:.1e}, "
          f"r^H gradient {errs[2]:.1e}")
    saved = {"reference": [], "blockwise": []}
    for side in grids:
        x = torch.randn(1, 4, side, side, requires_grad=True)
        saved["reference"].append(saved_mb(lambda: simple(x)))
        saved["blockwise"].append(saved_mb(lambda: fast(x)))
    print(f"saved for backward (MB) at grids {list(grids)}: reference "
          f"{[round(v, 2) for v in saved['reference']]}, blockwise "
          f"{[round(v, 2) for v in saved['blockwise']]}")
    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    for name, mb in saved.items():
        ax.plot([g * g for g in grids], mb, "o-", label=name)
    ax.set_xlabel("pixels N = H x W (batch 1, 2 heads)")
    ax.set_ylabel("MB saved for backward")
    ax.legend()
    ax.set_title("the reference form keeps O(N^2), blockwise O(N)", fontsize=9)
    utils.show(fig, "demo_blockwise")
    return {"max_abs_error": errs, "blocks": n_blocks, "saved_mb": saved,
            "grids": list(grids)}


if utils.in_notebook():
    demo_blockwise()

# %% [markdown]
# ## What the lab measures
#
# Two experiments, both paired (one seed gives both networks the same images, batches and
# every shared initial weight), both with an $n$ fixed by a pilot on held-out validation data
# before the run (`runs/02_aa_conv/pilot.log`); the numbers are in
# `runs/02_aa_conv/RESULTS.md`.
#
# - **Long-range** (`--experiment longrange`, generated images, no download): two black or
#   white squares in opposite corners, label "they match". The plain ResNet's last feature
#   map sees 25 rows, a unit needs 26 to touch both squares, so its entry check asks that it
#   stays near chance; the AA-ResNet of the same depth and width can attend across.
#
#   *Why 25.* A $3 \times 3$ convolution widens what a unit sees by 2 steps of its input
#   grid, and a stride-2 convolution doubles the step for the layers after it. The stem sees
#   3 pixels; stage 1 (two convolutions, 1-pixel steps) 7; stage 2 9 after its strided
#   convolution, then 13 (steps of 2 pixels); stage 3 17, then 25 (steps of 4 pixels). The
#   $1 \times 1$ shortcuts add nothing. The lab's `receptive_field` measures it by autograd.
#
#   *Why chance.* The head averages the last feature map over the grid and applies a linear
#   map, so the ResNet's logit is a sum over units, and each unit sees at most one square:
#   logit $= a(\text{first square}) + b(\text{second square}) + $ terms of the noise. For the
#   label "the squares match" the four cases (black, black), (white, white), (black, white),
#   (white, black) are equally likely; the cross-entropy of such a sum is smallest when
#   $a$ and $b$ are constants (the loss is convex and symmetric under swapping black and
#   white in both squares at once), which is a constant guess. An attention layer puts the
#   two squares into one unit, and the ReLUs after it can compare them.
# - **CIFAR-10** (`--experiment compare`): the same comparison on real images at CPU scale,
#   plus the trained AA-ResNet against itself with uniform attention (is attention used?).
#
# What `--quick` measured (`runs/02_aa_conv/quick.log`, a 2-core CPU): on the long-range
# task the ResNet stays at chance (50.8% held out) and AA-ResNet − ResNet is +49.2 points
# [+48.2, +50.2] (n = 3); the trained heads do not point at the other square, they spread
# over the grid, and uniform weights do nearly as well (not decided), so what the layer
# adds is global context. On CIFAR-10 (ResNet-10, 312 steps) AA-ResNet − ResNet is −0.5
# points [−1.4, +0.4] (n = 9, not decided), while uniform attention costs 3.7 points.

# %% [markdown]
# ## Exercises
#
# Each exercise says how to check your answer; `solutions/02_aa_conv.py` computes and asserts
# every answer (`python solutions/02_aa_conv.py` runs the ones that need no data).
#
# 1. ★ **upsilon = 0** (no data, seconds). Build `AugmentedConv2d(3, 12, 3, dk=0, dv=0,
#    num_heads=1)`. Before you print it: how many parameters does it have, and what is it?
#    Check: compare its parameter count and its output (weights copied) with
#    `nn.Conv2d(3, 12, 3, padding=1)`.
# 2. ★★ **kappa = 0** (no data, seconds). With `dk=0` there are no queries or keys. Predict
#    what the attention channels of `demo_branches(dk=0)` look like, then run it. Check: the
#    printed spatial std of the attention channels, and what a constant channel means.
# 3. ★★ **Implement `rel_to_abs`** (no data, seconds). Fill in `my_rel_to_abs` below without
#    looking at `rel_to_abs`: index, loop, or pad-and-reshape, as you like. Check:
#    `python -m pytest tests/test_02_aa_conv.py -k implement`.
# 4. ★★ **The query bias** (no data, seconds). Run
#    `demo_relative_logits(x=torch.zeros(1, 8, 8, 8), query_bias=torch.randn(16))`, then the
#    same with `query=(5, 2)`. Predict the content maps and how the position maps of the two
#    queries relate. Check: compare the position maps of both queries, shifted by the offset
#    between the queries, where both are defined.
# 5. ★★ **Receptive field** (no data, seconds). `receptive_field` (in the lab) measures how
#    many rows one unit of a network's last feature map sees. Predict it for the long-range
#    task's plain ResNet (3x3 stem, one pre-activation block per stage, strides 1, 2, 2), then
#    measure it, and find the smallest image side at which a unit can no longer touch both
#    4x4 squares. Check: `receptive_field(build_model(long_range_args(quick_args()), 2,
#    aa=False), 32)` and the span `side - 2 * 4 + 2`.

# %%
def my_rel_to_abs(x):
    """Exercise 3: (..., L, 2L-1) logits by offset -> (..., L, L) logits by key position,
    out[..., i, j] = x[..., i, (j - i) + L - 1]."""
    raise NotImplementedError("exercise 3: fill in my_rel_to_abs (Exercises cell)")


# %% [markdown]
# ---
# # The lab
#
# Presets and command line, paired training runs, `exp_*` (one per claim), figures, `main`.
# Paired arms: one seed gives both arms the same training images, batch order, augmentation
# and initial value of every shared weight.

# %%
# The long-range task (generated, no download): a ResNet-8 (widths 8/16/32, one block per
# stage), AA in stage 3. long_seeds: fixed from the pilot (--experiment pilot, pilot.log).
LONG_RANGE = dict(long_widths=(8, 16, 32), long_blocks=(1, 1, 1), long_train=2000,
                  long_epochs=4, long_seeds=3)
SHARED = dict(image_size=32, val_per_class=0, test_per_class=None, measure_batch=128,
              bench_sizes=(32, 64), bench_batch=128, bench_steps=3, no_relative=False)
PRESETS = {
    # quick, 2-core CPU: a pre-activation ResNet-10 (widths 16/32/64, blocks 1/1/2), attention
    # in stage 3 (8x8 grid; two AA layers: the strided first conv and the next block's).
    # The paper's rule (Nh 8, kappa = 2 upsilon = 0.2, >= 20 key dims per head) gives a
    # 64-channel layer 0.8 value dims per head; we keep >= 20 key dims per head and take
    # Nh = 2 and upsilon = 0.25, so each head has 8 value dims: dk = 40, dv = 16 (kappa = 0.2
    # alone would give 12 key channels; the minimum sets dk). seeds: from the pilot.
    "quick": dict(SHARED, widths=(16, 32, 64), blocks=(1, 1, 2), aa_stages=(3,),
                  pool_stages=(), num_heads=2, kappa=0.2, upsilon=0.25, min_dkh=20,
                  epochs=4, batch_size=64, lr=3e-3, weight_decay=0.05, optimizer="adamw",
                  warmup_epochs=1.0, seeds=9, train_per_class=500, workers=2, threads=1,
                  **LONG_RANGE, experiments=["longrange", "compare", "maps"]),
    # full, one GPU: the paper's CIFAR rule (Nh 8, kappa 0.2, upsilon 0.1, >= 20 key dims)
    # in every block of a wide ResNet-14; the 32x32 stage pools its attention. Not measured.
    "full": dict(SHARED, widths=(128, 256, 512), blocks=(2, 2, 2), aa_stages=(1, 2, 3),
                 pool_stages=(1,), num_heads=8, kappa=0.2, upsilon=0.1, min_dkh=20,
                 epochs=100, batch_size=128, lr=0.1, weight_decay=5e-4, optimizer="sgd",
                 warmup_epochs=5.0, seeds=5, train_per_class=None, workers=1, threads=None,
                 **LONG_RANGE, experiments=["longrange", "compare", "maps"]),
}
FLAGS = {
    "seeds": "paired seeds --seed, --seed+1, ...; every arm trains on each",
    "epochs": "epochs per run",
    "batch_size": "training batch",
    "lr": "peak learning rate",
    "weight_decay": ("on kernels only (no biases, norms, r^H, r^W)", utils.nonneg_float),
    "warmup_epochs": ("linear warmup, then cosine", utils.nonneg_float),
    "optimizer": ("adamw, or sgd (Nesterov)", {"choices": ("adamw", "sgd")}),
    "widths": "channels of the 3 stages",
    "blocks": "residual blocks per stage",
    "aa_stages": "stages (1-3) whose blocks get an augmented first conv",
    "pool_stages": ("AA stages that pool attention (Sec. 4.2)", utils.comma_list(int)),
    "num_heads": "Nh",
    "kappa": "dk / F_out",
    "upsilon": "dv / F_out",
    "min_dkh": ("at least this many key dims per head", utils.nonneg_int),
    "no_relative": ("AA layers without relative logits", {"action": "store_true"}),
    "measure_batch": "batch of the memory column",
    "bench_sizes": "--bench grids (square)",
    "bench_batch": "--bench batch (lowered where the reference logits would not fit)",
    "bench_steps": "--bench timed steps per row",
    "long_widths": "long-range task: channels of the 3 stages",
    "long_blocks": "long-range task: residual blocks per stage",
    "long_train": "long-range task: generated training images per seed",
    "long_epochs": "long-range task: epochs per run",
    "long_seeds": "long-range task: paired seeds",
}
EXPERIMENTS = ("longrange", "compare", "maps", "bias", "pilot")
AA = "AA-ResNet"
BASE = "ResNet"
NO_BIAS = "AA-ResNet (no bias)"
PILOT_VAL_PER_CLASS = 500  # the pilot's validation split, carved from the training images
EVAL_BATCH = 128           # images per evaluation batch


def check(args):
    if len(args.widths) != 3 or len(args.blocks) != 3:
        raise utils.InputError(f"--widths {args.widths} and --blocks {args.blocks} need 3 "
                               f"values")
    stages_ok = set(args.aa_stages) <= {1, 2, 3}
    if not stages_ok or not set(args.pool_stages) <= set(args.aa_stages):
        raise utils.InputError(f"--aa-stages {list(args.aa_stages)} must name stages 1-3 and "
                               f"--pool-stages {list(args.pool_stages)} a subset of them")
    if args.upsilon > 1:
        raise utils.InputError(f"--upsilon {args.upsilon}: at most 1 (all attention)")
    no_val = args.val_per_class == 0 and "val_per_class" not in args.preset_keys
    if "pilot" in args.experiments and no_val:
        raise utils.InputError("--experiment pilot needs a validation split: "
                               "--val-per-class >= 1")


def quick_args(*argv):
    """The --quick settings (and any flags given), as main() sees them."""
    return utils.cli(__doc__, PRESETS, FLAGS, ["--quick", *argv], experiments=EXPERIMENTS,
                     check=check)


def build_model(args, num_classes, *, aa, bias=True, **kw):
    """The lab's ResNet: AA layers take the blockwise path (equal, faster on a CPU)."""
    kw.setdefault("layer", BlockwiseAugmentedConv2d)
    return ResNet(num_classes=num_classes, widths=args.widths, blocks=args.blocks,
                  aa_stages=args.aa_stages if aa else (), pool_stages=args.pool_stages,
                  num_heads=args.num_heads, kappa=args.kappa, upsilon=args.upsilon,
                  min_dkh=args.min_dkh, relative=not args.no_relative, bias=bias,
                  image_size=args.image_size, **kw)


@torch.no_grad()
def make_arm(args, num_classes, seed, arm):
    """One arm of a seed. The ResNet is drawn first, so every weight the arms share starts
    equal: the AA-ResNet copies each same-named tensor, and in each augmented conv the
    ResNet conv's first F_out - dv filters for its conv branch; only q, k, v, W^O, r^H, r^W
    are its own. The no-bias arm copies the AA-ResNet's weights: with the biases at their
    initial 0, both compute the same function at step 0 and differ only in what the biases
    learn."""
    torch.manual_seed(seed)
    base = build_model(args, num_classes, aa=False)
    if arm == BASE:
        return base
    model = build_model(args, num_classes, aa=True)  # attention weights: after the ResNet's
    utils.copy_shared_init(base, model)
    for name, m in model.named_modules():
        if isinstance(m, AugmentedConv2d) and m.conv is not None:
            m.conv.weight.copy_(base.get_submodule(name).weight[:m.conv.out_channels])
    if arm == NO_BIAS:
        no_bias = build_model(args, num_classes, aa=True, bias=False)
        utils.copy_shared_init(model, no_bias)
        return no_bias
    return model


def full_preset_models(num_classes=10):
    """The full preset's models at full size: name -> (model, None, image_size)."""
    args = utils.cli(__doc__, PRESETS, FLAGS, [], experiments=EXPERIMENTS)
    models = {}
    for arm in (BASE, AA):
        models[arm] = (make_arm(args, num_classes, 0, arm), None, args.image_size)
    return models


def pin_counts(args, data):
    """Fix the preset's image counts at what this dataset gave (utils fits them to a small
    dataset, with one note), so every worker loads the same counts without printing again."""
    counts = {"train_per_class": data.y_train, "val_per_class": data.y_val,
              "test_per_class": data.y_test}
    for key, y in counts.items():
        if key in args.preset_keys and getattr(args, key):
            setattr(args, key, int(torch.bincount(y).min()))
    args.preset_keys = [k for k in args.preset_keys if k not in utils.COUNT_FLAGS]


def count_flops(model, input_shape, device="cpu"):
    """Forward FLOPs of one (C, H, W) input, by FlopCounterMode (1 MAC = 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(torch.zeros(1, *input_shape, device=device))
    model.train(was_training)
    return fc.get_total_flops()


# %%
def uniform_attention(q, k, v, H, W):
    """Every head's weights replaced by 1/N: each pixel gets the mean value vector."""
    return v.mean(dim=2, keepdim=True).expand_as(v)


def evaluate_uniform(model, loader):
    """The trained network with every attention weight set to 1/N: is attention used?"""
    layers = [m for m in model.modules() if isinstance(m, AugmentedConv2d) and m.dv]
    for m in layers:
        m.attention = uniform_attention
    try:
        return utils.evaluate(model, loader)
    finally:
        for m in layers:
            del m.attention


def loaders(args, data, seed, pad):
    """(train, val or None, test) loaders of one run; pad = 0: no random crop."""
    kw = dict(device=utils.get_device(args.device), mean=data.mean, std=data.std)
    train = utils.DeviceLoader(data.x_train, data.y_train, batch_size=args.batch_size,
                               train=True, seed=seed, pad=pad, **kw)
    val = None
    if len(data.y_val):
        val = utils.DeviceLoader(data.x_val, data.y_val, batch_size=EVAL_BATCH,
                                 train=False, **kw)
    test = utils.DeviceLoader(data.x_test, data.y_test, batch_size=EVAL_BATCH, train=False,
                              **kw)
    return train, val, test


def no_log(line):
    """Epoch lines of every seed but the first are not printed."""


def train_arm(args, data, seed, arm, split="test", pad=4):
    """Train and score one arm of one seed (on test, or on validation for the pilot). The
    seed fixes the data subset (already in `data`), the initial weights (make_arm) and the
    batches. The AA-ResNet is also scored with uniform attention; seed args.seed keeps its
    weights."""
    t0 = time.time()
    device = utils.get_device(args.device)
    model = make_arm(args, data.num_classes, seed, arm).to(device)
    train, val, test = loaders(args, data, seed, pad)
    hist = utils.train(model, train, epochs=args.epochs, lr=args.lr, optimizer=args.optimizer,
                       weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                       name=f"{arm} seed {seed} ", log=print if seed == args.seed else no_log)
    t1 = time.time()
    loader = val if split == "val" and val is not None else test
    score = utils.evaluate(model, loader)
    res = dict(seed=seed, arm=arm, acc=score.acc, nll=score.nll, train_loss=hist[-1]["loss"],
               train_acc=hist[-1]["train_acc"], steps=args.epochs * len(train),
               img_per_s=statistics.median(h["img_per_s"] for h in hist),
               images=len(data.y_train), train_s=round(t1 - t0, 1))
    if arm == AA:
        res["acc_uniform"], res["nll_uniform"] = evaluate_uniform(model, loader)
        if seed == args.seed:
            res["state"] = {k: v.cpu() for k, v in model.state_dict().items()}
    res["seconds"] = round(time.time() - t0, 1)
    print(f"  [{arm} seed {seed}] {split} {score.acc:.2f}% NLL {score.nll:.4f} | train loss "
          f"{res['train_loss']:.3f} | {res['steps']} steps, {res['seconds']:.0f}s", flush=True)
    return res


def run_seed(args, seed, arms, split):
    """One job for utils.run_jobs: the seed's data subset, every arm trained on it."""
    data = utils.data_from_args(args, seed=seed)
    return [train_arm(args, data, seed, arm, split) for arm in arms]


def train_all(args, arms, split="test", job=run_seed):
    """Every arm on args.seeds paired seeds, args.workers at a time. -> ({(arm, seed): run},
    seeds, the first seed's trained AA-ResNet weights or None)."""
    seeds = list(range(args.seed, args.seed + args.seeds))
    print(f"== {len(seeds)} paired seeds x {len(arms)} arms ({', '.join(arms)}), "
          f"{args.epochs} epochs, {args.workers} worker(s), scored on {split} ==", flush=True)
    jobs = [(args, s, arms, split) for s in seeds]
    runs = []
    for seed_runs in utils.run_jobs(job, jobs, workers=args.workers):
        runs.extend(seed_runs)
    state = next((r.pop("state") for r in runs if "state" in r), None)
    return {(r["arm"], r["seed"]): r for r in runs}, seeds, state


def verdicts(runs_a, runs_b, name_a, name_b, keys_b=("acc", "nll")):
    """compare_paired on accuracy and NLL of two arms' runs (paired by seed), and the
    accuracy verdict without the last 2 pairs: one that flips with 2 pairs fewer is
    borderline."""
    a = {k: [r[k] for r in runs_a] for k in ("acc", "nll")}
    b = {k: [r[kb] for r in runs_b] for k, kb in zip(("acc", "nll"), keys_b)}
    kw = dict(name_a=name_a, name_b=name_b)
    out = {"acc": utils.compare_paired(a["acc"], b["acc"], bound=1.0, **kw),
           "nll": utils.compare_paired(a["nll"], b["nll"], unit="nats", digits=3,
                                       higher_is_better=False, bound=0.02, **kw)}
    if len(runs_a) > 3:
        n = len(runs_a) - 2
        out["acc_minus_2"] = utils.compare_paired(a["acc"][:n], b["acc"][:n], bound=1.0,
                                                  log=None, **kw)
        print(f"  with the first {n} pairs only: {out['acc_minus_2']['line']}")
    return out


# %%
def table(args, data, device, by, seeds, arms, split):
    """Size, cost and scores of each arm: one row per arm."""
    shape = (3, args.image_size, args.image_size)
    rows = []
    for arm in arms:
        model = make_arm(args, data.num_classes, args.seed, arm).to(device)
        _, mem = utils.measure_step(model, shape, batch_size=args.measure_batch, steps=1,
                                    warmup=1, num_classes=data.num_classes, device=device)
        runs = [by[arm, s] for s in seeds]
        rows.append(dict(model=arm, params=utils.count_params(model), memory_mb=mem,
                         mflops=count_flops(model, shape, device) / 1e6,
                         img_per_s=statistics.median(r["img_per_s"] for r in runs),
                         acc=utils.mean_ci([r["acc"] for r in runs]),
                         nll=utils.mean_ci([r["nll"] for r in runs]), n=len(runs)))
    lines = [f"{'model':20s} {'params':>8s} {'MFLOPs':>6s} {'act. MB':>7s} {'img/s':>5s}  "
             f"{split + ' acc % [95% CI]':22s} {split + ' NLL [95% CI]':25s} n"]
    for r in rows:
        lines.append(f"{r['model']:20s} {r['params']:8,d} {r['mflops']:6.1f} "
                     f"{r['memory_mb']:7.0f} {r['img_per_s']:5.0f}  "
                     f"{utils.fmt_ci(r['acc'], 2):22s} {utils.fmt_ci(r['nll'], 4):25s} "
                     f"{r['n']}")
    print("\n".join(lines), flush=True)
    return rows, "\n".join(lines)


def compare_arms(args, data, device, a, b):
    """Arms a and b trained on paired seeds: the table and the verdicts of a - b."""
    by, seeds, state = train_all(args, (a, b))
    rows, text = table(args, data, device, by, seeds, (b, a), "test")
    runs_a = [by[a, s] for s in seeds]
    v = verdicts(runs_a, [by[b, s] for s in seeds], a, b)
    res = dict(seeds=seeds, rows=rows, table=text, verdicts=v, runs=list(by.values()))
    return res, state


def exp_compare(args, data, device, out):
    """Claim: AA-ResNet beats ResNet (paper: +1.3 points on CIFAR-100). Paired seeds, all
    test images, accuracy and NLL; and the trained AA-ResNet against itself with uniform
    attention."""
    res, state = compare_arms(args, data, device, AA, BASE)
    print("is attention used? the trained AA-ResNet against itself, uniform attention:")
    aa_runs = [r for r in res["runs"] if r["arm"] == AA]
    res["uniform"] = verdicts(aa_runs, aa_runs, AA, "uniform attention",
                              ("acc_uniform", "nll_uniform"))
    return res, state


def exp_bias(args, data, device, out):
    """Claim: the paper's biases (the query bias; the others cancel under BatchNorm) matter.
    AA-ResNet against the same network without biases, from the same initial function."""
    return compare_arms(args, data, device, AA, NO_BIAS)[0]


# %% [markdown]
# ### The long-range task: two cues farther apart than a convolution sees
#
# Grey noise with a 4x4 square in two opposite corners, each black or white; the label is
# "the two squares match". Each square alone says nothing about the label. A plain ResNet's
# last feature map sees at most `receptive_field` pixels in each direction, fewer than the
# distance between the squares: its logit is a sum of a term that sees one square and a term
# that sees the other, and for this label the cross-entropy-optimal such sum is a constant
# (chance). An AA layer lets every pixel attend to the opposite corner.

# %%
LONG_TEST_SEED = 10 ** 6       # the held-out images of the long-range task
LONG_VAL_SEED = 10 ** 6 + 1    # its validation images, for the pilot only
LONG_CUE = 4                   # side of a cue square, in pixels


def long_range_images(n, *, seed, size=32, cue=LONG_CUE):
    """n uint8 images (n, 3, size, size) and labels (n,): grey noise in [64, 192), a black or
    white cue x cue square in two opposite corners (either diagonal); label 1: they match."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(64, 192, (n, 3, size, size), generator=g, dtype=torch.uint8)
    first = torch.randint(0, 2, (n,), generator=g)           # 0 black, 1 white
    label = torch.randint(0, 2, (n,), generator=g)           # 1: the two squares match
    second = torch.where(label == 1, first, 1 - first)
    anti = torch.randint(0, 2, (n,), generator=g).bool()     # top-right to bottom-left
    far = size - cue
    for i in range(n):
        top = far if anti[i] else 0                          # column of the top square
        bottom = far - top                                   # column of the bottom square
        x[i, :, :cue, top:top + cue] = 255 * first[i]
        x[i, :, far:, bottom:bottom + cue] = 255 * second[i]
    return x, label


def long_range_data(args, seed, split):
    """A Data of generated images: training images from `seed`, and the held-out set (test,
    or the pilot's validation set, put in the test slot) from a seed no training run uses."""
    x_tr, y_tr = long_range_images(args.long_train, seed=seed, size=args.image_size)
    held_seed = LONG_VAL_SEED if split == "val" else LONG_TEST_SEED
    x_te, y_te = long_range_images(LONG_HELD_OUT, seed=held_seed, size=args.image_size)
    empty = x_te[:0]
    return utils.Data(x_tr, y_tr, empty, y_te[:0], x_te, y_te, ["different", "same"],
                      mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))


LONG_HELD_OUT = 2000           # held-out images of the long-range task


def long_range_args(args):
    """The settings of the long-range runs: its network, data size, epochs and seeds."""
    return type(args)(**{**vars(args), "widths": args.long_widths, "blocks": args.long_blocks,
                         "epochs": args.long_epochs, "seeds": args.long_seeds})


def run_long_seed(args, seed, arms, split):
    """One job: the seed's generated training images, every arm trained on them (no random
    crop: it would push the squares out of the image; flips keep them in opposite corners)."""
    data = long_range_data(args, seed, split)
    return [train_arm(args, data, seed, arm, split, pad=0) for arm in arms]


def receptive_field(model, size):
    """The largest height (pixels) of input that one unit of the last feature map depends on,
    measured by autograd on a float64 copy of the model in eval mode."""
    net = copy.deepcopy(model).double().eval()
    x = torch.randn(1, 3, size, size, dtype=torch.float64, requires_grad=True)
    feat = net.blocks(net.stem(x.contiguous(memory_format=net.memory_format)))
    largest = 0
    for i in range(feat.shape[2]):
        grad = torch.autograd.grad(feat[0, :, i].sum(), x, retain_graph=True)[0]
        rows = torch.nonzero(grad[0].abs().sum(dim=(0, 2)) > 0).flatten()
        largest = max(largest, int(rows.max() - rows.min()) + 1)
    return largest


def exp_longrange(args, device, out):
    """Claim: attention adds global context. The plain ResNet cannot see both cues (entry
    check: it stays near chance on held-out images); then AA-ResNet - ResNet, paired."""
    largs = long_range_args(args)
    rf = receptive_field(build_model(largs, 2, aa=False), args.image_size)
    span = args.image_size - 2 * LONG_CUE + 2  # rows from one square's edge to the other's
    print(f"long-range task: {LONG_CUE}x{LONG_CUE} squares in opposite corners of a "
          f"{args.image_size}x{args.image_size} image; a unit must see {span} rows to touch "
          f"both, one of the ResNet's last feature map sees at most {rf}", flush=True)
    by, seeds, state = train_all(largs, (AA, BASE), job=run_long_seed)
    base = [by[BASE, s]["acc"] for s in seeds]
    base_acc = statistics.mean(base)
    met = "met" if base_acc <= LONG_CHANCE_MAX else "not met"
    print(f"entry check: AA-ResNet beats ResNet on the long-range task: ResNet held-out "
          f"accuracy (chance 50%) = {base_acc:.1f}% (needs \u2264 {LONG_CHANCE_MAX:g}%) "
          f"\u2192 {met}", flush=True)
    runs_a = [by[AA, s] for s in seeds]
    v = verdicts(runs_a, [by[BASE, s] for s in seeds], AA, BASE)
    print("is attention used? the trained AA-ResNet against itself, uniform attention:")
    uni = verdicts(runs_a, runs_a, AA, "uniform attention", ("acc_uniform", "nll_uniform"))
    maps = long_range_maps(largs, state, out)
    return dict(receptive_field=rf, seeds=seeds, entry_check=dict(
        resnet_acc=base_acc, threshold=LONG_CHANCE_MAX, met=met == "met"), verdicts=v,
        uniform=uni, runs=list(by.values()), maps=maps)


LONG_CHANCE_MAX = 55.0  # the entry check: the ResNet's held-out accuracy at most this (%)


def long_range_maps(largs, state, out, num_images=3):
    """Where the trained heads of the first AA layer look from the top-left corner, for
    held-out images whose squares lie on that diagonal; and the same network at init."""
    init = make_arm(largs, 2, largs.seed, AA)
    trained = copy.deepcopy(init)
    trained.load_state_dict(state)
    x_u8, y = long_range_images(200, seed=LONG_TEST_SEED, size=largs.image_size)
    corner = x_u8[:, 0, 0, 0]
    pick = torch.nonzero((corner == 0) | (corner == 255)).flatten()[:num_images]
    x = (x_u8[pick].float() / 255 - 0.5) / 0.2
    maps_t = attention_weights(trained, x)[0][1]          # (n, Nh, N, N)
    maps_i = attention_weights(init, x)[0][1]
    side = math.isqrt(maps_t.shape[-1])
    query = (0, 0)                                         # the top-left cell of the grid
    row_t = maps_t[:, :, 0].reshape(len(pick), -1, side, side)
    row_i = maps_i[:, :, 0].reshape(len(pick), -1, side, side)
    titles = [["different", "same"][int(y[i])] for i in pick]
    fig = plot_attention(row_t, row_i, x_u8[pick], titles, query)
    path = os.path.join(out, "long_range_maps.png")
    fig.savefig(path, dpi=90, bbox_inches="tight")
    corner_weight = row_t[:, :, -1, -1].mean(0).tolist()  # weight on the opposite corner
    print(f"trained heads, query in the top-left cell: mean weight on the bottom-right cell "
          f"{', '.join(f'{w:.3f}' for w in corner_weight)} (uniform 1/N = {1 / side ** 2:.3f})")
    print(f"wrote {path}")
    return dict(figure=path, opposite_corner_weight=corner_weight)


# %%
def pilot_plan(by, seeds, name):
    """The SD of a pilot's per-seed differences AA-ResNet - ResNet (accuracy points)."""
    d = [by[AA, s]["acc"] - by[BASE, s]["acc"] for s in seeds]
    sd = statistics.stdev(d)
    print(f"pilot, {name}: AA-ResNet - ResNet per seed {' '.join(f'{x:+.2f}' for x in d)}; "
          f"mean {statistics.mean(d):+.2f}, SD {sd:.2f} points", flush=True)
    return dict(diffs=d, mean=statistics.mean(d), sd=sd)


def half_width(sd, n):
    """The expected 95% CI half-width of a mean of n paired differences with this SD."""
    return utils.t95(n - 1) * sd / math.sqrt(n)


def exp_pilot(args, data, device, out, budget_s=450):
    """Power planning, never on test. The long-range task on generated validation images: n =
    the fewest pairs (>= 3) whose 95% CI half-width is <= 5 points. CIFAR-10 on a validation
    split carved from train: n = the pairs that fit what --quick has left of budget_s."""
    largs = long_range_args(args)
    by, seeds, _ = train_all(largs, (AA, BASE), split="val", job=run_long_seed)
    long_plan = pilot_plan(by, seeds, "long-range")
    n_long = next(n for n in range(3, 100) if half_width(long_plan["sd"], n) <= 5)
    pair_s = [by[AA, s]["seconds"] + by[BASE, s]["seconds"] for s in seeds]
    long_cost = statistics.mean(pair_s)
    long_s = n_long * long_cost / args.workers
    print(f"pilot, long-range: n = {n_long} pairs (the fewest >= 3 with a 95% CI half-width "
          f"<= 5 points: +-{half_width(long_plan['sd'], n_long):.2f}); one pair ~{long_cost:.0f}"
          f" s, so ~{long_s:.0f} s of --quick on {args.workers} worker(s)", flush=True)
    val_per_class = args.val_per_class or PILOT_VAL_PER_CLASS
    pargs = type(args)(**{**vars(args), "val_per_class": val_per_class})
    by, seeds, _ = train_all(pargs, (AA, BASE), split="val")
    plan = pilot_plan(by, seeds, "CIFAR-10")
    n_val = pargs.val_per_class * data.num_classes
    # the --quick run's cost per seed: training, plus scoring on 10,000 test images (the AA
    # arm twice: with uniform attention too), on `workers` cores
    per_seed = 0.0
    for s in seeds:
        for arm in (AA, BASE):
            r = by[arm, s]
            per_seed += r["train_s"] + (r["seconds"] - r["train_s"]) * 10000 / n_val
    per_seed = per_seed / len(seeds) / args.workers
    n_cifar = max(2, int((budget_s - 30 - long_s) // max(per_seed, 0.1)))
    print(f"pilot, CIFAR-10: one pair of --quick ~{per_seed:.0f} s of wall time on "
          f"{args.workers} worker(s); {budget_s} s - 30 s to start - {long_s:.0f} s long-range "
          f"-> n = {n_cifar} pairs, a 95% CI half-width of +-"
          f"{half_width(plan['sd'], n_cifar):.2f} points", flush=True)
    return dict(long_range=dict(long_plan, n=n_long, seconds_per_pair=long_cost, seeds=seeds),
                cifar=dict(plan, n=n_cifar, seconds_per_pair=per_seed), budget_s=budget_s)


# %%
def attention_weights(model, x):
    """[(layer name, (B, Nh, N, N) softmax weights)] of every AA layer for inputs x."""
    layers = []
    for name, m in model.named_modules():
        if isinstance(m, AugmentedConv2d) and m.dv:
            layers.append((name, m))
    inputs = {}

    def keep_input(name):
        def hook(module, args):
            inputs[name] = args[0]
        return hook
    hooks = [m.register_forward_pre_hook(keep_input(name)) for name, m in layers]
    model.eval()
    with torch.no_grad():
        model(x)
        for h in hooks:
            h.remove()
        out = []
        for name, m in layers:
            a = m.attention_input(inputs[name])
            q, k, _ = m.queries_keys_values(a)
            out.append((name, m.logits(q, k, *a.shape[2:]).softmax(-1)))
    return out


def head_summary(maps):
    """Per head: the mean over images and queries of the top weight and entropy (nats)."""
    top = maps.amax(-1).mean(dim=(0, 2))                                       # (Nh,)
    entropy = -(maps * maps.clamp_min(1e-12).log()).sum(-1).mean(dim=(0, 2))  # (Nh,)
    return top.tolist(), entropy.tolist()


def plot_attention(trained, init, x_u8, titles, query):
    """Rows: images with the trained heads' weights for one query cell, then the first image
    at init; one colour scale for all panels, so a near-uniform map looks flat."""
    from matplotlib.figure import Figure
    n, nh, H, W = trained.shape
    rows = [(trained[r], x_u8[r], titles[r]) for r in range(n)]
    rows.append((init[0], x_u8[0], f"{titles[0]}, at init"))
    vmax = float(max(trained.max(), init.max()))
    side = x_u8.shape[-1]
    cy = (query[0] + 0.5) * side / H - 0.5         # the query cell's centre, image pixels
    cx = (query[1] + 0.5) * side / W - 0.5
    fig = Figure(figsize=(1.6 * (nh + 1) + 0.8, 1.6 * len(rows)))
    axes = fig.subplots(len(rows), nh + 1, squeeze=False)
    for r, (maps, img, title) in enumerate(rows):
        axes[r, 0].imshow(img.permute(1, 2, 0).numpy())
        axes[r, 0].plot([cx], [cy], "rx", ms=8, mew=2)
        axes[r, 0].set_title(title, fontsize=8)
        for h in range(nh):
            ax = axes[r, h + 1]
            im = ax.imshow(maps[h].numpy(), cmap="inferno", vmin=0, vmax=vmax,
                           extent=(-0.5, side - 0.5, side - 0.5, -0.5))
            ax.plot([cx], [cy], "cx", ms=7, mew=1.5)
            ax.set_title(f"head {h + 1}: max {float(maps[h].max()):.3f}", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.6, label="attention weight")
    fig.suptitle(f"first AA layer ({H}x{W} grid), query cell {query} (x); uniform = 1/N = "
                 f"{1 / (H * W):.3f}", fontsize=9)
    return fig


def exp_maps(args, data, device, out, state=None, num_images=64):
    """Where the trained heads look, against the same network at init: per head the mean
    largest weight (uniform: 1/N) and entropy (uniform: log N), and the figure."""
    if state is None:  # --experiment maps alone: train the first seed's AA-ResNet
        state = train_all(type(args)(**{**vars(args), "seeds": 1}), (AA,))[2]
    init = make_arm(args, data.num_classes, args.seed, AA).to(device)
    trained = copy.deepcopy(init)
    trained.load_state_dict(state)
    per_class = max(1, num_images // data.num_classes)  # the first test images of each class
    pick = torch.cat([torch.nonzero(data.y_test == c).flatten()[:per_class]
                      for c in range(data.num_classes)])
    x_u8 = data.x_test[pick]
    y = data.y_test[pick]
    loader = utils.DeviceLoader(x_u8, y, batch_size=len(y), device=device, train=False,
                                mean=data.mean, std=data.std)
    x = next(iter(loader))[0]
    maps_t = attention_weights(trained, x)
    maps_i = attention_weights(init, x)
    stats = []
    print(f"{'layer':16s} head  max weight trained / init  1/N    entropy trained / init  "
          f"log N")
    for (name, mt), (_, mi) in zip(maps_t, maps_i):
        N = mt.shape[-1]
        top_t, ent_t = head_summary(mt)
        top_i, ent_i = head_summary(mi)
        for h in range(mt.shape[1]):
            print(f"{name:16s} {h + 1:4d}  {top_t[h]:10.3f} / {top_i[h]:.3f} {1 / N:12.3f}"
                  f"{ent_t[h]:12.2f} / {ent_i[h]:.2f} {math.log(N):12.2f}")
        stats.append(dict(layer=name, N=N, max_weight=top_t, max_weight_init=top_i,
                          entropy=ent_t, entropy_init=ent_i))
    side = math.isqrt(maps_t[0][1].shape[-1])
    idx = [int(torch.nonzero(y == c)[0]) for c in range(min(4, data.num_classes))]
    centre = (side // 2) * side + side // 2                 # the grid's centre query
    rows_t = maps_t[0][1][idx][:, :, centre].reshape(len(idx), -1, side, side).cpu()
    rows_i = maps_i[0][1][idx][:, :, centre].reshape(len(idx), -1, side, side).cpu()
    titles = [data.classes[int(y[i])] for i in idx]
    fig = plot_attention(rows_t, rows_i, x_u8[idx], titles, (side // 2, side // 2))
    path = os.path.join(out, "attention_maps.png")
    fig.savefig(path, dpi=90, bbox_inches="tight")
    print(f"wrote {path}")
    return dict(stats=stats, figure=path, images=len(y))


# %%
def time_step(step, steps):
    """Milliseconds per call of step(), after one warm-up call."""
    step()
    t0 = time.time()
    for _ in range(steps):
        step()
    return 1000 * (time.time() - t0) / steps


def layer_step(m, x):
    """One forward + backward of layer m on x."""
    def step():
        m(x).mean(dim=(2, 3)).sum().backward()
    return step


def exp_bench(args, device):
    """One 64-channel AA layer, forward + backward: the reference form and the blockwise path
    on the same weights, the paper's pooled attention and a plain 3x3 conv; then one training
    step of the quick AA-ResNet with and without channels-last storage."""
    C = 64
    kw = dict(dk=32, dv=16, num_heads=4)
    print(f"== bench: {C}->{C} channels, 3x3, {kw}; forward + backward; memory = what "
          f"autograd saves for the backward pass ==", flush=True)
    rows = []
    for size in args.bench_sizes:
        N = size * size
        # the reference form holds several (B, Nh, N, N) tensors: one <= 0.5 GiB (CPU)
        budget = 2 ** 29
        if device.type == "cuda":
            budget = torch.cuda.get_device_properties(device).total_memory // 8
        batch = max(1, min(args.bench_batch, budget // (kw["num_heads"] * N * N * 4)))
        torch.manual_seed(args.seed)
        simple = StridedAugmentedConv2d(C, C, 3, max_size=size, **kw).to(device)
        fast = BlockwiseAugmentedConv2d(C, C, 3, max_size=size, **kw).to(device)
        fast.load_state_dict(simple.state_dict())
        pooled = BlockwiseAugmentedConv2d(C, C, 3, pool_attention=True, max_size=size,
                                          **kw).to(device)
        conv = nn.Conv2d(C, C, 3, padding=1).to(device)
        x = torch.randn(batch, C, size, size, device=device)
        layers = {"reference form": simple, "blockwise": fast, "blockwise + pooled": pooled,
                  "plain 3x3 conv": conv}
        for name, m in layers.items():
            ms = time_step(layer_step(m, x), args.bench_steps)
            mb = saved_mb(lambda: m(x))
            rows.append(dict(size=size, batch=batch, layer=name, ms_per_step=ms, saved_mb=mb))
            print(f"  {size}x{size} batch {batch:3d} {name:20s} {ms:8.1f} ms/step  saved "
                  f"{mb:7.1f} MB", flush=True)
        s = rows[-4]
        f = rows[-3]
        print(f"  {size}x{size}: blockwise {s['ms_per_step'] / f['ms_per_step']:.2f}x faster "
              f"than the reference form, saves {f['saved_mb']:.0f} vs {s['saved_mb']:.0f} MB")
    fmt = {}
    for cl in (False, True):
        torch.manual_seed(args.seed)
        model = build_model(args, 10, aa=True, channels_last=cl).to(device)
        x = torch.randn(64, 3, args.image_size, args.image_size, device=device)
        y = torch.randint(0, 10, (64,), device=device)

        def train_step():
            F.cross_entropy(model(x), y).backward()
        fmt[cl] = time_step(train_step, 3 * args.bench_steps)
        print(f"  quick AA-ResNet train step, batch 64, channels-last={cl}: {fmt[cl]:.1f} ms")
    print(f"  channels-last: {fmt[False] / fmt[True]:.2f}x the speed of the default layout")
    return dict(rows=rows, train_step_ms={"default": fmt[False], "channels_last": fmt[True]})


# %%
def describe(args, data):
    """One line: the data and the quick model's AA layers."""
    stages = []
    for stage, width in zip((1, 2, 3), args.widths):
        if stage in args.aa_stages:
            dk, dv = aa_channels(width, num_heads=args.num_heads, kappa=args.kappa,
                                 upsilon=args.upsilon, min_dkh=args.min_dkh)
            stages.append((stage, width, dk, dv))
    print(f"data: {len(data.y_train)} train / {len(data.y_val)} val / {len(data.y_test)} "
          f"test, {data.num_classes} classes; widths {args.widths}, blocks {args.blocks}; AA "
          f"(stage, F_out, dk, dv): {stages}, Nh={args.num_heads}, relative="
          f"{not args.no_relative}, pooled stages {args.pool_stages}", flush=True)


def main(argv=None):
    args = utils.cli(__doc__, PRESETS, FLAGS, argv, experiments=EXPERIMENTS, check=check,
                     bench="time and memory of the reference and blockwise AA layer")
    device, out = utils.start(args, "02_aa_conv")
    config = {k: v for k, v in vars(args).items() if k != "preset_values"}
    if args.mode == "demo":
        demos = [demo_rel_to_abs, demo_relative_logits, demo_branches, demo_blockwise]
        return utils.run_demos(out, demos)
    if args.mode == "bench":
        res = exp_bench(args, device)
        utils.save_results(os.path.join(out, "bench.json"), config, res)
        return res
    results = {}
    state = None
    data = None
    for name in args.experiments:
        t0 = time.time()
        if name != "longrange" and data is None:
            data = utils.data_from_args(args)
            pin_counts(args, data)
            describe(args, data)
        if name == "longrange":
            results[name] = exp_longrange(args, device, out)
        elif name == "compare":
            results[name], state = exp_compare(args, data, device, out)
        elif name == "maps":
            results[name] = exp_maps(args, data, device, out, state)
        elif name == "bias":
            results[name] = exp_bias(args, data, device, out)
        else:
            results[name] = exp_pilot(args, data, device, out)
        results[name]["wall_s"] = round(time.time() - t0, 1)
        utils.save_results(os.path.join(out, f"{name}.json"), config, results[name])
        print(f"== {name} done in {results[name]['wall_s']:.0f} s -> {out}/{name}.json ==",
              flush=True)
    return results


# %%
if __name__ == "__main__":
    utils.run_main(main)
