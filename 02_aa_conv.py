"""Attention Augmented Convolutional Networks -- Bello, Zoph, Vaswani, Shlens & Le, ICCV 2019
(arXiv:1904.09925).

A convolution sees a k x k neighbourhood; self-attention sees every pixel but, alone, ignores
where they are. An attention-augmented convolution runs both on the same input and concatenates
their outputs on the channel axis (Sec. 3.2), with 2-D relative positions inside the attention:

    AAConv(X) = Concat[Conv(X), MHA(X)]       Conv: F_out - d_v channels, MHA: d_v channels
    l_ij = q_i . (k_j + r^W_{j_x - i_x} + r^H_{j_y - i_y}) / sqrt(d_k^h)                (eq. 3)

kappa = d_k / F_out and upsilon = d_v / F_out set the split; upsilon = 0 is a plain convolution.
Below: `rel_to_abs` and `AugmentedConv2d` (the paper's appendix code, biases included), an optional
blockwise attention that never stores the N x N logits (tested equal), and the paper's CIFAR
model: pre-activation ResNets whose first conv of every block is augmented.

Run:
    python 02_aa_conv.py --demo                  # no data, seconds: relative logits, branches
    python 02_aa_conv.py --quick --data cifar10  # 2-core CPU, ~6 min (--data DIR: an ImageFolder)
    python 02_aa_conv.py --data cifar10          # full preset: one GPU (not measured here)
Results (--quick on a 2-core AMD EPYC CPU, torch 2.15 float32, all 10,000 test images; a
pre-activation ResNet-10 with two AA layers on its 8x8 stage, 4 epochs of 5,000 images; n = 10
paired seeds, fixed in advance from a pilot on a validation split):
    AA-ResNet - ResNet = -0.0 points [-0.7, +0.7]: equivalent within +-1 (so with 8 and 12 pairs);
      +0.003 nats [-0.014, +0.019]: equivalent within +-0.02, borderline (12 pairs: not decided)
    AA-ResNet - the same net with uniform attention = +5.0 points [+3.7, +6.3]: the heads are used
    with the paper's biases - without = -0.0 points [-0.6, +0.5]: equivalent within +-1 point
Details: runs/02_aa_conv/RESULTS.md (full tables, the pilot that fixed n, logs).
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
# ## 1. Relative position logits (Sec. 3.1.2, eq. 3)
#
# Self-attention compares every query pixel $i$ with every key pixel $j$. To know *where* $j$
# lies relative to $i$, the paper adds one learned embedding per relative column offset
# ($r^W$) and one per relative row offset ($r^H$) to the key:
#
# $$\ell_{ij} = \frac{q_i^\top}{\sqrt{d_k^h}}\left(k_j + r^W_{j_x-i_x} + r^H_{j_y-i_y}\right)$$
#
# The position terms depend on the offset $j - i$ only, so the layer stays translation
# equivariant. Along one axis of length $L$ a query has $2L-1$ possible offsets: $q \cdot r$ for
# all of them is an $(L, 2L-1)$ table of *relative* logits, and `rel_to_abs` moves it to the
# $(L, L)$ *absolute* key positions by padding and reshaping (the "skewing" of Music Transformer),
# with no $(L, L, 2L-1)$ gather.

# %%
def rel_to_abs(x):
    """(..., L, 2L-1) relative logits -> (..., L, L): y[..., i, j] = x[..., i, j - i + L - 1],
    where column m of x holds the offset m - (L-1). Pure padding + reshapes."""
    *lead, L, M = x.shape
    assert M == 2 * L - 1, f"rel_to_abs expects (..., L, 2L-1) logits, got ({L}, {M})"
    x = F.pad(x, (0, 1))                      # (..., L, 2L): one zero column per row
    x = x.reshape(*lead, L * 2 * L)           # (..., 2L*L): rows laid end to end
    x = F.pad(x, (0, L - 1))                  # (..., (L+1)(2L-1))
    x = x.reshape(*lead, L + 1, 2 * L - 1)    # rows one shorter: row i is shifted left by i
    return x[..., :L, L - 1:]                 # (..., L, L)


def relative_logits_1d(q, rel_k):
    """Position logits along the last spatial axis. q: (..., W, dkh) queries; rel_k: (2W-1, dkh)
    embeddings of offsets -(W-1)..W-1. -> (..., W, W): out[..., x, x'] = q_x . rel_k[x' - x]."""
    return rel_to_abs(q @ rel_k.t())         # (..., W, 2W-1): every query against every offset


# %% [markdown]
# ## 2. The attention-augmented convolution (Sec. 3.1-3.2, eq. 1-2)
#
# Each head $h$ attends over all $N = HW$ pixels, $O_h = \mathrm{Softmax}(\ell)\,V_h$ (eq. 1,
# with the logits $\ell$ of eq. 3); the heads are concatenated and mixed by a 1x1 conv $W^O$
# (eq. 2), and the result is concatenated with an ordinary convolution (Sec. 3.2):
#
# $$\mathrm{AAConv}(X) = \mathrm{Concat}\left[\mathrm{Conv}(X),\ \mathrm{MHA}(X)\right]$$
#
# Letters in shape comments: B batch, C channels, H x W the grid attention works on, N = H*W,
# Nh heads, dk / dv key / value depth (dkh = dk/Nh, dvh = dv/Nh per head), G = B*Nh.
#
# Biases: the paper's code makes all three convolutions with TensorFlow's default bias (initial
# value 0). Followed by a BatchNorm, the biases of the conv branch, of $W^O$, of the keys (a
# constant per query row: softmax ignores it) and of the values (the weights sum to 1) are
# cancelled; the **query bias** is not: $b_q \cdot (k_j + r_{j-i})$ is a preference for
# salient keys and for relative positions that holds for every image.

# %%
def upsample_pooled(x, size):
    """Undo a 3x3 / stride-2 average pooling (Sec. 4.2: "bilinear interpolation"): pooled pixel
    i averaged a window centred on pixel 2i, so it goes back there (align_corners=True onto 2h-1
    points); an even-sized grid repeats its last row/column. (B, C, h, w) -> (B, C, H, W)."""
    (H, W), (h, w) = size, x.shape[-2:]
    assert H in (2 * h - 1, 2 * h) and W in (2 * w - 1, 2 * w), f"{h}x{w} is not {H}x{W} / 2"
    x = F.interpolate(x, size=(2 * h - 1, 2 * w - 1), mode="bilinear", align_corners=True)
    return F.pad(x, (0, W - (2 * w - 1), 0, H - (2 * h - 1)), mode="replicate")


class AugmentedConv2d(nn.Module):
    """Concat[Conv(X), MHA(X)]: a k x k conv gives out_channels - dv channels, multi-head
    self-attention over all pixels dv channels (dk query/key channels, num_heads heads).
    relative: eq. 3's tables, sized for inputs up to max_size (int or (H, W)); smaller grids use
    their centre rows; all heads share them, as in the paper's code. pool_attention: the paper's
    memory saver (Sec. 4.2), attention on the 3x3/2 average-pooled input, upsampled back.
    stride > 1 is not in the paper: attention then works on the conv's output grid, its input
    k x k average pooled with the same stride. dk = dv = 0 is nn.Conv2d(padding=k//2)."""

    def __init__(self, in_channels, out_channels, kernel_size, *, dk, dv, num_heads,
                 relative=True, stride=1, pool_attention=False, max_size=32, bias=True):
        super().__init__()
        assert kernel_size % 2 == 1, f"kernel_size {kernel_size} must be odd (padding k//2)"
        assert 0 <= dv <= out_channels, f"dv={dv} must be in [0, out_channels={out_channels}]"
        assert dk >= 0 and (dv > 0 or dk == 0), f"dk={dk} > 0 needs attention values: dv > 0"
        assert num_heads >= 1, f"num_heads must be >= 1, got {num_heads}"
        assert dk % num_heads == 0 and dv % num_heads == 0, (
            f"dk={dk} and dv={dv} must be divisible by num_heads={num_heads} (dims per head)")
        self.dk, self.dv, self.num_heads, self.relative = dk, dv, num_heads, relative
        self.kernel_size, self.stride, self.pool_attention = kernel_size, stride, pool_attention
        # Conv(X): out_channels - dv channels (no conv branch when upsilon = 1)
        self.conv = (nn.Conv2d(in_channels, out_channels - dv, kernel_size, stride,
                               kernel_size // 2, bias=bias) if out_channels > dv else None)
        if dv == 0:
            return
        self.qkv = nn.Conv2d(in_channels, 2 * dk + dv, 1, bias=bias)  # W_q, W_k, W_v (eq. 1)
        self.attn_out = nn.Conv2d(dv, dv, 1, bias=bias)                 # W^O (eq. 2)
        for m in (self.conv, self.qkv, self.attn_out):
            if bias and m is not None:
                nn.init.zeros_(m.bias)  # as tf.layers.conv2d in the paper's code
        if relative:
            h, w = (max_size, max_size) if isinstance(max_size, int) else max_size
            self.max_h, self.max_w = self.grid(h), self.grid(w)
            dkh = dk // num_heads
            # r^H, r^W of eq. 3: one row per offset -(H-1)..H-1, -(W-1)..W-1; std dkh^-1/2
            self.key_rel_h = nn.Parameter(torch.randn(2 * self.max_h - 1, dkh) * max(dkh, 1)**-.5)
            self.key_rel_w = nn.Parameter(torch.randn(2 * self.max_w - 1, dkh) * max(dkh, 1)**-.5)

    def grid(self, n):  # the side of the attention grid for an input side n
        n = (n - 1) // self.stride + 1                   # the conv's output side
        return (n + 1) // 2 if self.pool_attention else n

    def attention_input(self, x):
        if self.stride > 1:  # padding not counted, as TensorFlow's 'SAME' pooling
            k = self.kernel_size
            x = F.avg_pool2d(x, k, self.stride, k // 2, count_include_pad=False)
        if self.pool_attention:
            x = F.avg_pool2d(x, 3, 2, 1, count_include_pad=False)
        return x

    def queries_keys_values(self, a):
        """a: (B, C, H, W) -> q (scaled), k: (B, Nh, N, dkh) and v: (B, Nh, N, dvh)."""
        B, _, H, W = a.shape
        q, k, v = self.qkv(a).split([self.dk, self.dk, self.dv], dim=1)  # (B, dk|dk|dv, H, W)
        q, k, v = (t.reshape(B, self.num_heads, -1, H * W).transpose(2, 3) for t in (q, k, v))
        dkh = self.dk // self.num_heads
        return q * (dkh ** -0.5 if dkh else 1.0), k, v  # 1/sqrt(dkh) scales eq. 3's three terms

    def relative_logits(self, q, H, W):
        """The position terms of eq. 3, q: (B, Nh, N, dkh) -> rel_h: (B, Nh, N, H) with
        rel_h[..., i, y'] = q_i . r^H_{y' - i_y}, and rel_w: (B, Nh, N, W) likewise."""
        B, Nh, N, dkh = q.shape
        assert H <= self.max_h and W <= self.max_w, (
            f"grid {H}x{W} exceeds the tables ({self.max_h}x{self.max_w}): raise max_size")
        q = q.reshape(B, Nh, H, W, dkh)
        r_h = self.key_rel_h[self.max_h - H:self.max_h + H - 1]          # (2H-1, dkh)
        r_w = self.key_rel_w[self.max_w - W:self.max_w + W - 1]          # (2W-1, dkh)
        rel_w = relative_logits_1d(q, r_w)                                # (B, Nh, H, W, W)
        rel_h = relative_logits_1d(q.transpose(2, 3), r_h).transpose(2, 3)  # (B, Nh, H, W, H)
        return rel_h.reshape(B, Nh, N, H), rel_w.reshape(B, Nh, N, W)

    def logits(self, q, k, H, W):
        """Eq. 3 for every pair: (B, Nh, N, N), row i = query pixel, column j = key pixel."""
        B, Nh, N, _ = q.shape
        s = q @ k.transpose(2, 3)                                         # content: q_i . k_j
        if self.relative:
            rel_h, rel_w = self.relative_logits(q, H, W)
            # key axis as (H, W): r^H terms broadcast over the key's column, r^W over its row
            s = s.view(B, Nh, N, H, W) + rel_h[..., :, None] + rel_w[..., None, :]
        return s.reshape(B, Nh, N, N)

    def attention(self, q, k, v, H, W):
        """Eq. 1 for all heads: softmax(logits) v -> (B, Nh, N, dvh)."""
        return self.logits(q, k, H, W).softmax(dim=-1) @ v

    def forward(self, x):
        if self.dv == 0:
            return self.conv(x)                                    # upsilon = 0: a plain conv
        a = self.attention_input(x)
        B, _, H, W = a.shape
        o = self.attention(*self.queries_keys_values(a), H, W)    # (B, Nh, N, dvh)
        o = self.attn_out(o.transpose(2, 3).reshape(B, self.dv, H, W))  # concat heads, W^O
        if self.pool_attention:  # W^O is 1x1 and bilinear weights sum to 1: they commute
            o = upsample_pooled(o, [(n - 1) // self.stride + 1 for n in x.shape[2:]])
        return o if self.conv is None else torch.cat([self.conv(x), o], dim=1)


# %%
def positional_map(layer, x, query):
    """For one query pixel (y, x) of input x (1, C, H, W): its content logits q_i . k_j, its
    position logits q_i . (r^H + r^W), and its attention weights, each (Nh, H, W)."""
    with torch.no_grad():
        a = layer.attention_input(x)
        H, W = a.shape[2:]
        q, k, _ = layer.queries_keys_values(a)
        i = query[0] * W + query[1]
        content = (q @ k.transpose(2, 3))[0, :, i].view(-1, H, W)
        position = torch.zeros_like(content)
        if layer.relative:
            rel_h, rel_w = layer.relative_logits(q, H, W)
            position = rel_h[0, :, i, :, None] + rel_w[0, :, i, None, :]  # (Nh, H, W)
        weights = layer.logits(q, k, H, W).softmax(-1)[0, :, i].view(-1, H, W)
    return content, position, weights


def naive_logits(layer, q, k, H, W):
    """Eq. 3 written out, one (query, key) pair at a time, for checks: (B, Nh, N, N)."""
    out = torch.zeros(*q.shape[:2], H * W, H * W, dtype=q.dtype)
    for i, j in ((i, j) for i in range(H * W) for j in range(H * W)):
        (iy, ix), (jy, jx), key = divmod(i, W), divmod(j, W), k[:, :, j]
        if layer.relative:  # table row = offset + (max - 1)
            key = key + layer.key_rel_w[jx - ix + layer.max_w - 1] + layer.key_rel_h[
                jy - iy + layer.max_h - 1]
        out[:, :, i, j] = (q[:, :, i] * key).sum(-1)
    return out


def demo_relative_logits(query=(2, 5), relative=True, x=None, query_bias=None):
    """What one query pixel of a random image x sees, per head: content logits, position logits
    (a row profile plus a column profile: r^H + r^W) and the attention weights."""
    from matplotlib.figure import Figure
    torch.manual_seed(0)
    layer = AugmentedConv2d(8, 16, 3, dk=16, dv=8, num_heads=4, relative=relative, max_size=8)
    x = torch.randn(1, 8, 8, 8) if x is None else x
    if query_bias is not None:
        layer.qkv.bias.data[:16] = query_bias
    content, position, weights = positional_map(layer, x, query)
    with torch.no_grad():
        q, k, _ = layer.queries_keys_values(x)
        err = (layer.logits(q, k, 8, 8) - naive_logits(layer, q, k, 8, 8)).abs().max().item()
    print(f"eq. 3 by rel_to_abs vs a per-pair loop: max |difference| {err:.1e}")
    fig = Figure(figsize=(7.5, 9))
    axes = fig.subplots(layer.num_heads, 3, squeeze=False)
    for h in range(layer.num_heads):
        for c, (name, m) in enumerate((("content q.k", content), ("position q.(r^H+r^W)",
                                        position), ("attention weights", weights))):
            ax = axes[h, c]
            ax.imshow(m[h].numpy(), cmap="viridis")
            ax.plot([query[1]], [query[0]], "rx", ms=8, mew=2)
            ax.set_title(f"head {h + 1}: {name}", fontsize=8)
            ax.axis("off")
    fig.suptitle(f"query pixel {query} (x) of an 8x8 input, random init", fontsize=10)
    utils.show(fig, "demo_relative_logits")
    return {"eq3_max_abs_error": err, "position_spread": position.std().item()}


if utils.in_notebook():
    demo_relative_logits()

# %%
def demo_branches(dk=8):
    """The layer's output on a simple image, split into its conv and its attention channels."""
    from matplotlib.figure import Figure
    torch.manual_seed(0)
    layer = AugmentedConv2d(3, 12, 3, dk=dk, dv=6, num_heads=2, max_size=16)
    yy, xx = torch.meshgrid(torch.arange(16.), torch.arange(16.), indexing="ij")
    img = ((yy - 5) ** 2 + (xx - 5) ** 2 < 12).float() + ((yy > 10) & (xx > 3)).float() * 0.6
    x = img.expand(1, 3, 16, 16)                                  # a disc and a bar, grey
    with torch.no_grad():
        out = layer(x)
        conv_part, attn_part = out[0, :6], out[0, 6:]
        same = torch.equal(conv_part, layer.conv(x)[0])
    # spatial spread of each channel: at init attention is near uniform, so its maps are smooth
    spread = {"conv": conv_part.flatten(1).std(1).mean().item(),
              "attention": attn_part.flatten(1).std(1).mean().item()}
    print(f"output channels 0-5 == Conv(X): {same}; mean spatial std of a channel: conv "
          f"{spread['conv']:.3f}, attention {spread['attention']:.3f} (near-uniform at init)")
    fig, vmax = Figure(figsize=(9, 3.4)), out.abs().max().item()
    axes = fig.subplots(2, 4)
    axes[0, 0].imshow(img.numpy(), cmap="gray")
    axes[0, 0].set_title("input", fontsize=8)
    axes[1, 0].axis("off")
    for c in range(3):
        for r, (name, part) in enumerate((("Conv(X)", conv_part), ("MHA(X)", attn_part))):
            axes[r, c + 1].imshow(part[c].numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax)
            axes[r, c + 1].set_title(f"{name} channel {c + 1}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle("AAConv(X) = Concat[Conv(X), MHA(X)], 6 + 6 channels, one colour scale: at "
                 "init attention is near uniform, its channels near constant", fontsize=9)
    utils.show(fig, "demo_branches")
    return {"conv_channels_equal_conv": same, "spatial_std": spread}


if utils.in_notebook():
    demo_branches()

# %% [markdown]
# ### Optional: blockwise attention (the same function, no N x N tensor kept)
#
# `AugmentedConv2d.attention` materialises the (B, Nh, N, N) logits and keeps the softmax
# weights for the backward pass: memory grows as $N^2$, and on a CPU the traffic through
# memory, not the arithmetic, is the cost. `BlockwiseAttention` (the idea of FlashAttention,
# Dao et al. 2022, in plain PyTorch) computes blocks of complete query rows while they sit in
# the cache, keeps only q, k, v, the position terms and the output, and recomputes each block's
# weights in its hand-written backward. Skip this section on a first reading: the tests check
# that it equals the simple form (values, every gradient, a float64 gradcheck with split rows).

# %%
def wide_matmul(a, b):
    """a @ b with a narrow result (..., N, d), computed as (b^T a^T)^T: the same sums, with the
    wide (..., d, N) result that CPU BLAS libraries compute faster."""
    return (b.transpose(-2, -1) @ a.transpose(-2, -1)).transpose(-2, -1)


class BlockwiseAttention(torch.autograd.Function):
    """softmax(q k^T + position logits) v, block by block. q, k: (G, N, dkh), q scaled;
    v: (G, N, dvh); rel_h: (G, N, H), rel_w: (G, N, W) as AugmentedConv2d.relative_logits gives
    them (None, None without relative logits). Returns (G, N, dvh)."""

    BLOCK_ELEMENTS = 2 ** 18  # logits per block: 1 MiB of float32, about one core's L2 cache

    @staticmethod
    def blocks(G, N):
        """(head slice, row slice) pairs covering the G x N query rows, ~BLOCK_ELEMENTS each."""
        heads = max(1, BlockwiseAttention.BLOCK_ELEMENTS // (N * N))
        rows = min(N, max(1, BlockwiseAttention.BLOCK_ELEMENTS // N))
        return [(slice(g, g + heads), slice(r, r + rows))
                for g in range(0, G, heads) for r in range(0, N, rows)]

    @staticmethod
    def weights(q, k, rel_h, rel_w, HW):
        """Softmax weights of one block (g, r, N): eq. 1 with the logits of eq. 3."""
        s = q @ k.transpose(1, 2)                                         # (g, r, N)
        if rel_h is not None:
            g, r, N = s.shape
            s = (s.view(g, r, *HW) + rel_h[..., None] + rel_w[..., None, :]).view(g, r, N)
        return s.softmax(dim=-1)

    @staticmethod
    def forward(ctx, q, k, v, rel_h, rel_w, H, W):
        G, N, _ = q.shape
        o = v.new_empty(G, N, v.shape[-1])
        for hs, rs in BlockwiseAttention.blocks(G, N):
            rh, rw = (None, None) if rel_h is None else (rel_h[hs, rs], rel_w[hs, rs])
            p = BlockwiseAttention.weights(q[hs, rs], k[hs], rh, rw, (H, W))  # (g, r, N)
            o[hs, rs] = wide_matmul(p, v[hs])                                 # (g, r, dvh)
        ctx.save_for_backward(q, k, v, rel_h, rel_w, o)
        ctx.HW = (H, W)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, rel_h, rel_w, o = ctx.saved_tensors
        do = do.to(o.dtype)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        drel_h = None if rel_h is None else torch.empty_like(rel_h)
        drel_w = None if rel_w is None else torch.empty_like(rel_w)
        delta = (do * o).sum(-1, keepdim=True)                  # (G, N, 1) = sum_j p_ij dp_ij
        for hs, rs in BlockwiseAttention.blocks(*q.shape[:2]):
            rh, rw = (None, None) if rel_h is None else (rel_h[hs, rs], rel_w[hs, rs])
            p = BlockwiseAttention.weights(q[hs, rs], k[hs], rh, rw, ctx.HW)  # recomputed
            dv[hs] += wide_matmul(p.transpose(1, 2), do[hs, rs])              # o = p v
            ds = p * (do[hs, rs] @ v[hs].transpose(1, 2) - delta[hs, rs])     # softmax backward
            if rel_h is not None:
                d = ds.view(*ds.shape[:2], *ctx.HW)             # (g, r, H, W): the key's (y', x')
                drel_h[hs, rs], drel_w[hs, rs] = d.sum(3), d.sum(2)  # each was broadcast
            dq[hs, rs] = wide_matmul(ds, k[hs])                 # s = q k^T
            dk[hs] += wide_matmul(ds.transpose(1, 2), q[hs, rs])
        return dq, dk, dv, drel_h, drel_w, None, None


class BlockwiseAugmentedConv2d(AugmentedConv2d):
    """AugmentedConv2d whose attention runs through BlockwiseAttention: same weights, same
    function, O(N (d + H + W)) memory per head instead of O(N^2)."""

    def attention(self, q, k, v, H, W):
        B, Nh, N, _ = q.shape
        flat = lambda t: t.reshape(B * Nh, N, t.shape[-1])                # noqa: E731 (G, N, d)
        rel_h, rel_w = map(flat, self.relative_logits(q, H, W)) if self.relative else (None,) * 2
        o = BlockwiseAttention.apply(flat(q), flat(k), flat(v), rel_h, rel_w, H, W)
        return o.view(B, Nh, N, -1)                                         # (B, Nh, N, dvh)


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


def demo_blockwise(grids=(8, 16, 24, 32), block_elements=100):
    """The blockwise path equals the simple one (blocks of block_elements logits: 2 query rows
    of the 6x7 grid), and what each keeps for the backward pass as the grid grows."""
    from matplotlib.figure import Figure
    torch.manual_seed(0)
    simple = AugmentedConv2d(4, 16, 3, dk=8, dv=8, num_heads=2, max_size=32)
    fast = BlockwiseAugmentedConv2d(4, 16, 3, dk=8, dv=8, num_heads=2, max_size=32)
    fast.load_state_dict(simple.state_dict())
    x = torch.randn(2, 4, 6, 7)
    block = BlockwiseAttention.BLOCK_ELEMENTS
    BlockwiseAttention.BLOCK_ELEMENTS = block_elements
    try:
        outs = []
        for layer in (simple, fast):
            xx = x.clone().requires_grad_()
            y = layer(xx)
            y.square().sum().backward()
            outs.append((y, xx.grad, layer.key_rel_h.grad))
        n_blocks = len(BlockwiseAttention.blocks(4, 42))
    finally:
        BlockwiseAttention.BLOCK_ELEMENTS = block
    errs = [(a - b).abs().max().item() for a, b in zip(*outs)]
    print(f"simple vs blockwise, {n_blocks} blocks of query rows: max |difference| output "
          f"{errs[0]:.1e}, input gradient {errs[1]:.1e}, r^H gradient {errs[2]:.1e}")
    saved = {"simple": [], "blockwise": []}
    for side in grids:
        x = torch.randn(1, 4, side, side, requires_grad=True)
        for name, layer in (("simple", simple), ("blockwise", fast)):
            saved[name].append(saved_mb(lambda: layer(x)))
    print("saved for backward (MB) at grids", grids, {k: [round(v, 2) for v in vs]
                                                     for k, vs in saved.items()})
    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    for name, mb in saved.items():
        ax.plot([g * g for g in grids], mb, "o-", label=name)
    ax.set_xlabel("pixels N = H x W (batch 1, 2 heads)")
    ax.set_ylabel("MB saved for backward")
    ax.legend()
    ax.set_title("simple form keeps O(N^2), blockwise O(N)", fontsize=9)
    utils.show(fig, "demo_blockwise")
    return {"max_abs_error": errs, "blocks": n_blocks, "saved_mb": saved, "grids": list(grids)}


if utils.in_notebook():
    demo_blockwise()

# %% [markdown]
# ## 3. The paper's CIFAR model: an augmented pre-activation ResNet (Sec. 4.1)
#
# On CIFAR the paper augments "the first convolution of all residual blocks" of a Wide-ResNet,
# whose blocks are pre-activation (BN-ReLU-conv-BN-ReLU-conv, plus the shortcut). Its rule for
# the split is $N_h = 8$, $\kappa = 2\upsilon = 0.2$ and at least 20 key dims per head;
# `aa_channels` turns $\kappa$, $\upsilon$ into $(d_k, d_v)$ for a layer of $F_{out}$ channels.

# %%
def aa_channels(f_out, *, num_heads, kappa, upsilon, min_dkh=0):
    """(dk, dv): kappa*F_out and upsilon*F_out rounded to a multiple of Nh (at least one per
    head when > 0); dk at least min_dkh per head (the paper's CIFAR runs: 20)."""
    to_heads = lambda c: num_heads * max(1, round(c / num_heads)) if c > 0 else 0  # noqa: E731
    dv = min(to_heads(upsilon * f_out), f_out // num_heads * num_heads)
    dk = max(to_heads(kappa * f_out), min_dkh * num_heads) if dv else 0
    return dk, dv


class PreActBlock(nn.Module):
    """BN-ReLU-conv1-BN-ReLU-conv3x3 + shortcut (He et al. 2016, the Wide-ResNet's block).
    conv1 is the block's first 3x3 conv: nn.Conv2d, or an AugmentedConv2d for AA."""

    def __init__(self, conv1, in_ch, out_ch, *, stride):
        super().__init__()
        self.bn1, self.conv1, self.bn2 = nn.BatchNorm2d(in_ch), conv1, nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        # a 1x1 projection of the pre-activated input when the shape changes (as the WRN)
        self.shortcut = (nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)
                         if stride != 1 or in_ch != out_ch else None)

    def forward(self, x):
        a = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(a)
        return self.conv2(F.relu(self.bn2(self.conv1(a)))) + skip


class ResNet(nn.Module):
    """CIFAR pre-activation ResNet: 3x3 stem, three stages (stride 1, 2, 2), BN-ReLU, global
    average pool, linear head. Stages in aa_stages get an augmented first conv in every block
    (pooled attention in pool_stages); none: the baseline."""

    def __init__(self, *, num_classes, widths, blocks, aa_stages=(), pool_stages=(), num_heads=8,
                 kappa=0.2, upsilon=0.1, min_dkh=0, relative=True, bias=True, image_size=32,
                 layer=AugmentedConv2d, channels_last=True):
        super().__init__()
        assert len(widths) == len(blocks) == 3, f"widths {widths}, blocks {blocks}: 3 stages"
        assert set(aa_stages) | set(pool_stages) <= {1, 2, 3}, "stages are 1, 2 or 3"
        self.stem = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        layers, in_ch, size = [], widths[0], image_size
        for stage, (w, n) in enumerate(zip(widths, blocks), start=1):
            for b in range(n):
                stride = 2 if stage > 1 and b == 0 else 1
                if stage in aa_stages:
                    dk, dv = aa_channels(w, num_heads=num_heads, kappa=kappa, upsilon=upsilon,
                                         min_dkh=min_dkh)
                    conv1 = layer(in_ch, w, 3, dk=dk, dv=dv, num_heads=num_heads, stride=stride,
                                  relative=relative, pool_attention=stage in pool_stages,
                                  max_size=size, bias=bias)
                else:
                    conv1 = nn.Conv2d(in_ch, w, 3, stride=stride, padding=1, bias=False)
                layers.append(PreActBlock(conv1, in_ch, w, stride=stride))
                in_ch, size = w, (size - 1) // stride + 1
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(in_ch)
        self.head = nn.Linear(in_ch, num_classes)
        # channels-last storage: the same numbers; see --bench for its speed on this machine
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.to(memory_format=self.memory_format)

    def forward(self, x):
        x = self.blocks(self.stem(x.contiguous(memory_format=self.memory_format)))
        return self.head(F.relu(self.bn(x)).mean(dim=(2, 3)))  # (B, num_classes)


# %% [markdown]
# ## Exercises
#
# 1. **upsilon = 0.** Build `AugmentedConv2d(3, 12, 3, dk=0, dv=0, num_heads=1)` and predict
#    what it is before you print it. *Expect:* exactly `nn.Conv2d(3, 12, 3, padding=1)`: the
#    same parameter count, the same output with copied weights: the ResNet baseline's layer.
# 2. **kappa = 0.** Run `demo_branches(dk=0)` (no queries or keys, still 6 value channels) and
#    predict the attention channels. *Expect:* every logit is 0, every weight 1/N, so each
#    attention channel is one constant, W^O of the image's mean value vector: the global context
#    of squeeze-and-excitation, with no spatial structure (its printed spatial std is ~0).
# 3. **No relative positions.** Run `demo_relative_logits(relative=False)`. *Expect:* the position
#    column is 0 and the weights follow the content logits alone. Then build a layer with no conv
#    branch (`dv` = `out_channels`) and shuffle the pixels of its input: without relative logits
#    the output is the old output, shuffled the same way (the layer does not know where a pixel
#    is); with them it is not.
# 4. **The query bias.** Run `demo_relative_logits(x=torch.zeros(1, 8, 8, 8),
#    query_bias=torch.randn(16))`, then again with `query=(5, 2)`. *Expect:* q_i = b_q at every
#    pixel, so the content logits are flat and the position map is the same pattern, moved with
#    the query: a preference by relative position that holds for every image. With
#    `query_bias=None` (the initial 0) every logit is 0 and the weights are uniform.
# 5. **Blocks.** Run `demo_blockwise(block_elements=42)`: one query row of the 6x7 grid per
#    block, and `block_elements=10**6`: one block for all. *Expect:* 168 and 1 blocks and the
#    same tiny differences (~1e-7, float rounding): the block size (`BLOCK_ELEMENTS`, 1 MiB of
#    logits in training) trades speed and memory, never the result.

# %% [markdown]
# ---
# # The lab
#
# Presets and command line, paired training runs, `exp_*` (one per claim), figures, `main`.
# Paired arms: one seed gives both arms the same training images, batch order, augmentation
# and initial value of every shared weight.

# %%

# the long-range task (generated, no download): a ResNet-8 (widths 8/16/32, one block per
# stage), AA in stage 3; long_seeds: fixed from the pilot (--experiment pilot, pilot.log)
LONG_RANGE = dict(long_widths=(8, 16, 32), long_blocks=(1, 1, 1), long_train=2000,
                  long_epochs=4, long_seeds=3)
SHARED = dict(image_size=32, val_per_class=0, test_per_class=None, measure_batch=128,
              bench_sizes=(32, 64), bench_batch=128, bench_steps=3, no_relative=False)
PRESETS = {
    # quick, 2-core CPU: a pre-activation ResNet-10 (widths 16/32/64, blocks 1/1/2), attention in
    # stage 3 (8x8 grid, two AA layers: the strided first conv and the next block's). The paper's
    # kappa = 2 upsilon = 0.2 with 8 heads gives a 64-channel layer 1.6 key and 0.8 value dims per
    # head; we keep its >= 20 key dims per head and cut the heads: Nh = 2, dk = 40, dv = 16.
    # seeds: fixed from the pilot (--experiment pilot) and the 10-minute budget (RESULTS.md).
    "quick": dict(SHARED, widths=(16, 32, 64), blocks=(1, 1, 2), aa_stages=(3,), pool_stages=(),
                  num_heads=2, kappa=0.2, upsilon=0.25, min_dkh=20, epochs=4, batch_size=64,
                  lr=3e-3, weight_decay=0.05, optimizer="adamw", warmup_epochs=1.0, seeds=10,
                  train_per_class=500, workers=2, threads=1, **LONG_RANGE,
                  experiments=["longrange", "compare", "maps"]),
    # full, one GPU: the paper's CIFAR rule (Nh 8, kappa 0.2, upsilon 0.1, >= 20 key dims) in
    # every block of a wide ResNet-14; the 32x32 stage pools its attention input. Not measured.
    "full": dict(SHARED, widths=(128, 256, 512), blocks=(2, 2, 2), aa_stages=(1, 2, 3),
                 pool_stages=(1,), num_heads=8, kappa=0.2, upsilon=0.1, min_dkh=20, epochs=100,
                 batch_size=128, lr=0.1, weight_decay=5e-4, optimizer="sgd", warmup_epochs=5.0,
                 seeds=5, train_per_class=None, workers=1, threads=None, **LONG_RANGE,
                 experiments=["longrange", "compare", "maps"]),
}
FLAGS = {
    "seeds": "paired seeds --seed, --seed+1, ...; every arm trains on each",
    "epochs": "epochs per run", "batch_size": "training batch", "lr": "peak learning rate",
    "weight_decay": ("on kernels only (not biases, norms, r^H, r^W)", utils.nonneg_float),
    "warmup_epochs": ("linear warmup, then cosine", utils.nonneg_float),
    "optimizer": ("adamw, or sgd (Nesterov)", {"choices": ("adamw", "sgd")}),
    "widths": "channels of the 3 stages", "blocks": "residual blocks per stage",
    "aa_stages": "stages (1-3) whose blocks get an augmented first conv",
    "pool_stages": ("AA stages that pool attention (Sec. 4.2)", utils.comma_list(int)),
    "num_heads": "Nh", "kappa": "dk / F_out", "upsilon": "dv / F_out",
    "min_dkh": ("at least this many key dims per head", utils.nonneg_int),
    "no_relative": ("AA layers without relative position logits", {"action": "store_true"}),
    "measure_batch": "batch of the memory column", "bench_sizes": "--bench grids (square)",
    "bench_batch": "--bench batch (lowered where the simple form's logits would not fit)",
    "bench_steps": "--bench timed steps per row",
    "long_widths": "long-range task: channels of the 3 stages",
    "long_blocks": "long-range task: residual blocks per stage",
    "long_train": "long-range task: generated training images per seed",
    "long_epochs": "long-range task: epochs per run",
    "long_seeds": "long-range task: paired seeds",
}
EXPERIMENTS = ("longrange", "compare", "maps", "bias", "pilot")
AA, BASE, NO_BIAS = "AA-ResNet", "ResNet", "AA-ResNet (no bias)"
PILOT_VAL_PER_CLASS = 500  # the pilot's validation split, carved from the training images
EVAL_BATCH = 128           # images per evaluation batch


def check(args):
    if len(args.widths) != 3 or len(args.blocks) != 3:
        raise utils.InputError(f"--widths {args.widths} and --blocks {args.blocks} need 3 values")
    if not set(args.aa_stages) <= {1, 2, 3} or not set(args.pool_stages) <= set(args.aa_stages):
        raise utils.InputError(f"--aa-stages {list(args.aa_stages)} must name stages 1-3 and "
                               f"--pool-stages {list(args.pool_stages)} a subset of them")
    if args.upsilon > 1:
        raise utils.InputError(f"--upsilon {args.upsilon}: at most 1 (all channels attention)")
    if "pilot" in args.experiments and args.val_per_class == 0 and (
            "val_per_class" not in args.preset_keys):
        raise utils.InputError("--experiment pilot needs a validation split: --val-per-class >= 1")


def build_model(args, num_classes, *, aa, bias=True, **kw):
    """The lab's ResNet: its AA layers take the blockwise path (equal, faster on a CPU)."""
    kw.setdefault("layer", BlockwiseAugmentedConv2d)
    return ResNet(num_classes=num_classes, widths=args.widths, blocks=args.blocks,
                  aa_stages=args.aa_stages if aa else (), pool_stages=args.pool_stages,
                  num_heads=args.num_heads, kappa=args.kappa, upsilon=args.upsilon,
                  min_dkh=args.min_dkh, relative=not args.no_relative, bias=bias,
                  image_size=args.image_size, **kw)


@torch.no_grad()
def make_arm(args, num_classes, seed, arm):
    """One arm of a seed. The ResNet is drawn first, so every weight the arms share starts equal:
    the AA-ResNet copies each same-named tensor, and in each augmented conv the ResNet conv's
    first F_out - dv filters for its conv branch; only q, k, v, W^O, r^H, r^W are its own. The
    no-bias arm copies the AA-ResNet's weights: with the biases at their initial 0, the two
    compute the same function at step 0 and differ only in what the biases learn."""
    torch.manual_seed(seed)
    base = build_model(args, num_classes, aa=False)
    if arm == BASE:
        return base
    model = build_model(args, num_classes, aa=True)  # attention weights: drawn after the ResNet's
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
    """Every model the full preset trains, at full size: name -> (model, None, image_size)."""
    args = utils.cli(__doc__, PRESETS, FLAGS, [], experiments=EXPERIMENTS)
    return {arm: (make_arm(args, num_classes, 0, arm), None, args.image_size)
            for arm in (BASE, AA)}


def pin_counts(args, data):
    """Fix the preset's image counts at what this dataset gave (utils fits them to a small
    dataset, with one note), so every worker loads the same counts without printing again."""
    for key, y in (("train_per_class", data.y_train), ("val_per_class", data.y_val),
                   ("test_per_class", data.y_test)):
        if key in args.preset_keys and getattr(args, key):
            setattr(args, key, int(torch.bincount(y).min()))
    args.preset_keys = [k for k in args.preset_keys if k not in utils.COUNT_FLAGS]


def uniform_attention(q, k, v, H, W):
    """Every head's weights replaced by 1/N: each pixel gets the mean value vector."""
    return v.mean(dim=2, keepdim=True).expand_as(v)


def evaluate_uniform(model, loader):
    """The trained network with all its attention weights set to uniform: is attention used?"""
    layers = [m for m in model.modules() if isinstance(m, AugmentedConv2d) and m.dv]
    for m in layers:
        m.attention = uniform_attention
    try:
        return utils.evaluate(model, loader)
    finally:
        for m in layers:
            del m.attention


def loaders(args, data, seed, pad):
    """(train, val or None, test) loaders of one run; pad = 0 turns the random crop off."""
    device = utils.get_device(args.device)
    kw = dict(device=device, mean=data.mean, std=data.std)
    train = utils.DeviceLoader(data.x_train, data.y_train, batch_size=args.batch_size,
                               train=True, seed=seed, pad=pad, **kw)
    val = None
    if len(data.y_val):
        val = utils.DeviceLoader(data.x_val, data.y_val, batch_size=EVAL_BATCH, train=False,
                                 **kw)
    test = utils.DeviceLoader(data.x_test, data.y_test, batch_size=EVAL_BATCH, train=False,
                              **kw)
    return train, val, test


def train_arm(args, data, seed, arm, split="test", pad=4):
    """Train and score one arm of one seed (on test, or on validation for the pilot). The seed
    fixes the data subset (already in `data`), the initial weights (make_arm) and the batches.
    The AA-ResNet is also scored with uniform attention; seed args.seed keeps its weights."""
    t0 = time.time()
    device = utils.get_device(args.device)
    model = make_arm(args, data.num_classes, seed, arm).to(device)
    train, val, test = loaders(args, data, seed, pad)
    log = print if seed == args.seed else (lambda line: None)  # epoch lines of the first seed
    hist = utils.train(model, train, epochs=args.epochs, lr=args.lr, optimizer=args.optimizer,
                       weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                       name=f"{arm} seed {seed} ", log=log)
    t1 = time.time()
    loader = val if split == "val" and val is not None else test
    score = utils.evaluate(model, loader)
    res = dict(seed=seed, arm=arm, acc=score.acc, nll=score.nll, train_loss=hist[-1]["loss"],
               train_acc=hist[-1]["train_acc"], img_per_s=statistics.median(
                   h["img_per_s"] for h in hist), steps=args.epochs * len(train),
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
    """One job for utils.run_jobs: the seed's data subset, and every arm trained on it."""
    data = utils.data_from_args(args, seed=seed)
    return [train_arm(args, data, seed, arm, split) for arm in arms]


def train_all(args, arms, split="test", job=run_seed):
    seeds = list(range(args.seed, args.seed + args.seeds))
    print(f"== {len(seeds)} paired seeds x {len(arms)} arms ({', '.join(arms)}), {args.epochs} "
          f"epochs, {args.workers} worker(s), scored on {split} ==", flush=True)
    jobs = [(args, s, arms, split) for s in seeds]
    runs = [r for rs in utils.run_jobs(job, jobs, workers=args.workers) for r in rs]
    state = next((r.pop("state") for r in runs if "state" in r), None)
    return {(r["arm"], r["seed"]): r for r in runs}, seeds, state


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
    print("is attention used? the trained AA-ResNet against itself with uniform attention:")
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


def verdicts(runs_a, runs_b, name_a, name_b, keys_b=("acc", "nll")):
    """compare_paired on accuracy and NLL of two arms' runs (paired by seed), and the accuracy
    verdict without the last 2 pairs: a verdict that flips with 2 pairs fewer is borderline."""
    a = {k: [r[k] for r in runs_a] for k in ("acc", "nll")}
    b = {k: [r[kb] for r in runs_b] for k, kb in zip(("acc", "nll"), keys_b)}
    kw = dict(name_a=name_a, name_b=name_b)
    out = {"acc": utils.compare_paired(a["acc"], b["acc"], bound=1.0, **kw),
           "nll": utils.compare_paired(a["nll"], b["nll"], unit="nats", digits=3,
                                       higher_is_better=False, bound=0.02, **kw)}
    if len(runs_a) > 3:
        out["acc_minus_2"] = utils.compare_paired(
            a["acc"][:-2], b["acc"][:-2], bound=1.0, **kw,
            log=lambda line: print(f"  with the first {len(runs_a) - 2} pairs only: {line}"))
    return out


def table(args, data, device, by, seeds, arms, split):
    """Size, cost and scores of each arm: one row per arm."""
    shape, rows = (3, args.image_size, args.image_size), []
    for arm in arms:
        model = make_arm(args, data.num_classes, args.seed, arm).to(device)
        _, mem = utils.measure_step(model, shape, batch_size=args.measure_batch, steps=1,
                                    warmup=1, num_classes=data.num_classes, device=device)
        runs = [by[arm, s] for s in seeds]
        rows.append(dict(model=arm, params=utils.count_params(model), memory_mb=mem,
                         mflops=utils.count_flops(model, shape, device) / 1e6,
                         img_per_s=statistics.median(r["img_per_s"] for r in runs),
                         acc=utils.mean_ci([r["acc"] for r in runs]),
                         nll=utils.mean_ci([r["nll"] for r in runs]), n=len(runs)))
    head = (f"{'model':20s} {'params':>8s} {'MFLOPs':>6s} {'act. MB':>7s} {'img/s':>5s}  "
            f"{split + ' acc % [95% CI]':22s} {split + ' NLL [95% CI]':25s} n")
    lines = [head] + [f"{r['model']:20s} {r['params']:8,d} {r['mflops']:6.1f} "
                      f"{r['memory_mb']:7.0f} {r['img_per_s']:5.0f}  "
                      f"{utils.fmt_ci(r['acc'], 2):22s} {utils.fmt_ci(r['nll'], 4):25s} {r['n']}"
                      for r in rows]
    print("\n".join(lines), flush=True)
    return rows, "\n".join(lines)


def compare_arms(args, data, device, a, b):
    """Arms a and b trained on paired seeds: the table and the verdicts of a - b."""
    by, seeds, state = train_all(args, (a, b))
    rows, text = table(args, data, device, by, seeds, (b, a), "test")
    runs_a = [by[a, s] for s in seeds]
    v = verdicts(runs_a, [by[b, s] for s in seeds], a, b)
    return dict(seeds=seeds, rows=rows, table=text, verdicts=v, runs=list(by.values())), state


def exp_compare(args, data, device, out):
    """Claim: AA-ResNet beats ResNet (paper: +1.3 points on CIFAR-100). Paired seeds, all test
    images, accuracy and NLL; and the trained AA-ResNet against itself with uniform attention."""
    res, state = compare_arms(args, data, device, AA, BASE)
    print("is attention used? the trained AA-ResNet against itself with uniform attention:")
    aa = [r for r in res["runs"] if r["arm"] == AA]
    res["uniform"] = verdicts(aa, aa, AA, "uniform attention", ("acc_uniform", "nll_uniform"))
    return res, state


def exp_bias(args, data, device, out):
    """Claim: the paper's biases (the query bias; the others cancel under BatchNorm) matter.
    AA-ResNet against the same network without biases, from the same initial function."""
    return compare_arms(args, data, device, AA, NO_BIAS)[0]


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
    long_cost = statistics.mean(by[AA, s]["seconds"] + by[BASE, s]["seconds"] for s in seeds)
    long_s = n_long * long_cost / args.workers
    print(f"pilot, long-range: n = {n_long} pairs (the fewest >= 3 with a 95% CI half-width "
          f"<= 5 points: +-{half_width(long_plan['sd'], n_long):.2f}); one pair ~{long_cost:.0f}"
          f" s, so ~{long_s:.0f} s of --quick on {args.workers} worker(s)", flush=True)
    pargs = type(args)(**{**vars(args), "val_per_class": args.val_per_class or PILOT_VAL_PER_CLASS})
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


def attention_weights(model, x):
    """[(layer name, (B, Nh, N, N) softmax weights)] of every AA layer for inputs x."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, AugmentedConv2d) and m.dv]
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, inp, n=n: inputs.update({n: inp[0]}))
             for n, m in layers]
    model.eval()
    with torch.no_grad():
        model(x)
        for h in hooks:
            h.remove()
        out = []
        for n, m in layers:
            a = m.attention_input(inputs[n])
            q, k, _ = m.queries_keys_values(a)
            out.append((n, m.logits(q, k, *a.shape[2:]).softmax(-1)))
    return out


def head_summary(maps):
    """Per head: mean over images and queries of the largest weight and of the entropy (nats)."""
    top = maps.amax(-1).mean(dim=(0, 2))                                       # (Nh,)
    entropy = -(maps * maps.clamp_min(1e-12).log()).sum(-1).mean(dim=(0, 2))  # (Nh,)
    return top.tolist(), entropy.tolist()


def plot_attention(trained, init, x_u8, titles, query):
    """Rows: test images with the trained heads' weights for one query pixel, then the first
    image at init; one colour scale for all panels, so a near-uniform map looks flat."""
    from matplotlib.figure import Figure
    n, nh, H, W = trained.shape
    rows = [(trained[r], x_u8[r], titles[r]) for r in range(n)]
    rows.append((init[0], x_u8[0], f"{titles[0]}, at init"))
    vmax = float(max(trained.max(), init.max()))
    side = x_u8.shape[-1]
    cy, cx = ((c + 0.5) * side / H - 0.5 for c in query)  # the query's centre in image pixels
    fig = Figure(figsize=(1.6 * (nh + 1) + 0.8, 1.6 * len(rows)))
    axes = fig.subplots(len(rows), nh + 1, squeeze=False)
    for r, (maps, img, title) in enumerate(rows):
        axes[r, 0].imshow(img.permute(1, 2, 0).numpy())
        axes[r, 0].plot([cx], [cy], "rx", ms=8, mew=2)
        axes[r, 0].set_title(title, fontsize=8)
        for h in range(nh):
            im = axes[r, h + 1].imshow(maps[h].numpy(), cmap="inferno", vmin=0, vmax=vmax,
                                       extent=(-0.5, side - 0.5, side - 0.5, -0.5))
            axes[r, h + 1].plot([cx], [cy], "cx", ms=7, mew=1.5)
            axes[r, h + 1].set_title(f"head {h + 1}: max {float(maps[h].max()):.3f}", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.6, label="attention weight")
    fig.suptitle(f"first AA layer ({H}x{W} grid), query pixel {query}; uniform = 1/N = "
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
    per_class = max(1, num_images // data.num_classes)  # test images, the first of each class
    pick = torch.cat([torch.nonzero(data.y_test == c).flatten()[:per_class]
                      for c in range(data.num_classes)])
    x_u8, y = data.x_test[pick], data.y_test[pick]
    x, _ = next(iter(utils.DeviceLoader(x_u8, y, batch_size=len(y), device=device, train=False,
                                        mean=data.mean, std=data.std)))
    maps_t, maps_i, stats = attention_weights(trained, x), attention_weights(init, x), []
    print(f"{'layer':16s} head  max weight trained / init  1/N    entropy trained / init  log N")
    for (name, mt), (_, mi) in zip(maps_t, maps_i):
        N = mt.shape[-1]
        (top_t, ent_t), (top_i, ent_i) = head_summary(mt), head_summary(mi)
        for h in range(mt.shape[1]):
            print(f"{name:16s} {h + 1:4d}  {top_t[h]:10.3f} / {top_i[h]:.3f} {1 / N:12.3f}"
                  f"{ent_t[h]:12.2f} / {ent_i[h]:.2f} {math.log(N):12.2f}")
        stats.append(dict(layer=name, N=N, max_weight=top_t, max_weight_init=top_i,
                          entropy=ent_t, entropy_init=ent_i))
    (_, mt), (_, mi) = maps_t[0], maps_i[0]
    H = W = math.isqrt(mt.shape[-1])
    idx = [int(torch.nonzero(y == c)[0]) for c in range(min(4, data.num_classes))]
    row = lambda m: m[idx][:, :, (H // 2) * W + W // 2].reshape(len(idx), -1, H, W).cpu()  # noqa
    fig = plot_attention(row(mt), row(mi), x_u8[idx], [data.classes[int(y[i])] for i in idx],
                         (H // 2, W // 2))
    fig.savefig(path := os.path.join(out, "attention_maps.png"), dpi=90, bbox_inches="tight")
    print(f"wrote {path}")
    return dict(stats=stats, figure=path, images=len(y))


def time_step(step, steps):
    step()                                                           # warm-up
    t0 = time.time()
    for _ in range(steps):
        step()
    return 1000 * (time.time() - t0) / steps


def exp_bench(args, device):
    """One 64-channel AA layer, forward + backward: the simple form and the blockwise path on the
    same weights, the paper's pooled attention and a plain 3x3 conv; then one training step of
    the quick AA-ResNet with and without channels-last storage."""
    C, Nh, dk, dv = 64, 4, 32, 16
    print(f"== bench: {C}->{C} channels, 3x3, dk={dk}, dv={dv}, Nh={Nh}; forward + backward; "
          f"memory = what autograd saves for the backward pass ==", flush=True)
    rows = []
    for size in args.bench_sizes:
        N = size * size
        # the simple form holds several (B, Nh, N, N) tensors: one <= 0.5 GiB (CPU), 1/8 (GPU)
        budget = (torch.cuda.get_device_properties(device).total_memory // 8
                  if device.type == "cuda" else 2 ** 29)
        batch = max(1, min(args.bench_batch, budget // (Nh * N * N * 4)))
        torch.manual_seed(args.seed)
        kw = dict(dk=dk, dv=dv, num_heads=Nh, max_size=size)
        simple = AugmentedConv2d(C, C, 3, **kw).to(device)
        fast = BlockwiseAugmentedConv2d(C, C, 3, **kw).to(device)
        fast.load_state_dict(simple.state_dict())
        pooled = BlockwiseAugmentedConv2d(C, C, 3, pool_attention=True, **kw).to(device)
        x = torch.randn(batch, C, size, size, device=device)
        for name, m in (("simple form", simple), ("blockwise", fast), ("blockwise + pooled",
                        pooled), ("plain 3x3 conv", nn.Conv2d(C, C, 3, padding=1).to(device))):
            step = lambda: m(x).mean(dim=(2, 3)).sum().backward()  # noqa: E731
            ms = time_step(step, args.bench_steps)
            rows.append(dict(size=size, batch=batch, layer=name, ms_per_step=ms,
                             saved_mb=saved_mb(lambda: m(x))))
            print(f"  {size}x{size} batch {batch:3d} {name:20s} {ms:8.1f} ms/step  saved "
                  f"{rows[-1]['saved_mb']:7.1f} MB", flush=True)
        s, f = rows[-4], rows[-3]
        print(f"  {size}x{size}: blockwise {s['ms_per_step'] / f['ms_per_step']:.2f}x faster "
              f"than the simple form, saves {f['saved_mb']:.0f} vs {s['saved_mb']:.0f} MB")
    fmt = {}
    for cl in (False, True):
        torch.manual_seed(args.seed)
        model = build_model(args, 10, aa=True, channels_last=cl).to(device)
        x = torch.randn(64, 3, args.image_size, args.image_size, device=device)
        y = torch.randint(0, 10, (64,), device=device)
        step = lambda: F.cross_entropy(model(x), y).backward()  # noqa: E731
        fmt[cl] = time_step(step, 3 * args.bench_steps)
        print(f"  quick AA-ResNet train step, batch 64, channels-last={cl}: {fmt[cl]:.1f} ms")
    print(f"  channels-last: {fmt[False] / fmt[True]:.2f}x the speed of the default layout")
    return dict(rows=rows, train_step_ms={"default": fmt[False], "channels_last": fmt[True]})


def describe(args, data):
    stages = [(st, w, *aa_channels(w, num_heads=args.num_heads, kappa=args.kappa,
                                   upsilon=args.upsilon, min_dkh=args.min_dkh))
              for st, w in zip((1, 2, 3), args.widths) if st in args.aa_stages]
    print(f"data: {len(data.y_train)} train / {len(data.y_val)} val / {len(data.y_test)} test, "
          f"{data.num_classes} classes; widths {args.widths}, blocks {args.blocks}; AA (stage, "
          f"F_out, dk, dv): {stages}, Nh={args.num_heads}, relative={not args.no_relative}, "
          f"pooled stages {args.pool_stages}", flush=True)


def main(argv=None):
    args = utils.cli(__doc__, PRESETS, FLAGS, argv, experiments=EXPERIMENTS, check=check,
                     bench="time and memory of the simple and blockwise AA layer, side by side")
    device, out = utils.start(args, "02_aa_conv")
    config = {k: v for k, v in vars(args).items() if k != "preset_values"}
    if args.mode == "demo":
        return utils.run_demos(out, [demo_relative_logits, demo_branches, demo_blockwise])
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
        else:
            results[name] = {"bias": exp_bias, "pilot": exp_pilot}[name](args, data, device, out)
        results[name]["wall_s"] = round(time.time() - t0, 1)
        utils.save_results(os.path.join(out, f"{name}.json"), config, results[name])
        print(f"== {name} done in {results[name]['wall_s']:.0f} s -> {out}/{name}.json ==",
              flush=True)
    return results


# %%
if __name__ == "__main__":
    utils.run_main(main)
