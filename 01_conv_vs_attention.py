"""On the Relationship between Self-Attention and Convolutional Layers -- Cordonnier, Loukas and
Jaggi, ICLR 2020 (arXiv:1911.03584), with the layers it is compared with: local self-attention
(SASA, Ramachandran et al. 2019) and axial attention (Axial-DeepLab, Wang et al. 2020).

The idea (Theorem 1). Multi-head self-attention (MHSA) over the pixels of an image, with relative
positional attention and K^2 heads, can compute any K x K convolution. Head h attends only to the
pixel at one kernel shift Delta_h, and its value/output projection carries the kernel slice W_h:
    MHSA(X)_q = sum_h sum_k softmax_k(A^h_qk) X_k W_h  ->  sum_h X_{q + Delta_h} W_h = conv(X)_q
With the quadratic encoding r_d = (|d|^2, d_1, d_2) and v_h = -alpha (1, -2 Delta_h), the score
A^h_qk = v_h . r_{k-q} = -alpha (|k - q - Delta_h|^2 - |Delta_h|^2) peaks at k = q + Delta_h; its
softmax tends to a one-hot as alpha grows. `attention_from_conv` builds it from any nn.Conv2d.

Run:
    python 01_conv_vs_attention.py --demo                  # no data, ~8 s: checks and figures
    python 01_conv_vs_attention.py --quick --data cifar10  # 2-core CPU, ~6 min (or --data DIR)
    python 01_conv_vs_attention.py --data cifar10          # full preset: one GPU (not measured)

Results (--quick, 368 s on a 2-core AMD EPYC CPU, torch 2.15, paired seeds, 10,000 test images):
    a trained net's first 3x3 conv vs its 9-head attention twin: max error 2.4e-7, same predictions
    equal parameters, vs all-conv (48.6%): all-local -6.0 [-7.3, -4.7] points, all-axial -7.1
    [-12.1, -2.2] (n=3): conv better; hybrid (conv, conv, local) +0.7 [-0.8, +2.2]: not decided
    local's gap to conv at 100 vs 1,000 images per class: +1.7 [-1.7, +5.1] points, not decided
Details: runs/01_conv_vs_attention/RESULTS.md (tables, logs, bench).
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
# ## 1. Self-attention over pixels, with relative positions (Cordonnier et al., sec. 2-3)
#
# An image is a grid of $N = H W$ pixels $X_q \in \mathbb{R}^{C}$. Head $h$ scores query pixel $q$
# against key pixel $k$ by content and by their relative position $\delta = k - q$:
#
# $$A^h_{qk} = \frac{(X_q W^h_Q)(X_k W^h_K)^\top}{\sqrt{d}} + v_h^\top r_\delta,\qquad
#   \mathrm{MHSA}(X)_q = \sum_h \sum_k \mathrm{softmax}_k(A^h_{qk})\, X_k W^h_V W^h_{out}.$$
#
# `positional="quadratic"` is the paper's encoding $r_\delta = (|\delta|^2, \delta_1,
# \delta_2)$ with a learned $v_h$ (Lemma 1); `"learned"` is SASA's embedding,
# $q \cdot [r^{row}_{\delta_1}; r^{col}_{\delta_2}]/\sqrt{d}$. Letters: B batch, C channels,
# H x W map, N = H W queries, M keys, h heads, d channels per head. `key_padding` P puts the keys on
# the grid zero-padded by P pixels, as a conv with padding P sees it.

# %%
class MultiHeadSelfAttention2d(nn.Module):
    """Global multi-head self-attention over the pixels of a (B, C, H, W) map (equation above)."""

    def __init__(self, dim, *, num_heads, head_dim=None, out_dim=None, positional=None, max_size=32,
                 key_padding=0, qkv_bias=True, proj_bias=True):
        super().__init__()
        assert positional in (None, "quadratic", "learned"), \
            f"positional must be None, 'quadratic' or 'learned', got {positional!r}"
        assert head_dim is not None or dim % num_heads == 0, \
            f"dim {dim} is not divisible by num_heads {num_heads}; pass head_dim"
        self.num_heads, self.head_dim = num_heads, head_dim or dim // num_heads
        self.positional, self.max_size, self.key_padding = positional, max_size, key_padding
        inner = self.num_heads * self.head_dim
        self.query = nn.Linear(dim, inner, bias=qkv_bias)
        self.key = nn.Linear(dim, inner, bias=qkv_bias)
        self.value = nn.Linear(dim, inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, out_dim or dim, bias=proj_bias)  # W_out: heads -> C_out
        if positional == "quadratic":
            self.pos_v = nn.Parameter(torch.randn(num_heads, 3) * 0.1)  # v_h, a 3-vector per head
        elif positional == "learned":
            d = self.head_dim
            assert d % 2 == 0, f"learned embeddings split d in rows/cols: head_dim {d} must be even"
            # offsets -(max_size-1) .. max_size-1: a row table for dy, a column table for dx
            self.rel_row = nn.Parameter(torch.randn(2 * max_size - 1, d // 2) * d ** -0.5)
            self.rel_col = nn.Parameter(torch.randn(2 * max_size - 1, d // 2) * d ** -0.5)

    @staticmethod
    def relative_offsets(H, W, key_padding=0, device=None):
        """(dy, dx), each (N, M) int64: key minus query position, keys on the grid padded by P."""
        P = key_padding
        qy, qx = torch.meshgrid(torch.arange(H, device=device), torch.arange(W, device=device),
                                indexing="ij")
        ky, kx = torch.meshgrid(torch.arange(-P, H + P, device=device),
                                torch.arange(-P, W + P, device=device), indexing="ij")
        return (ky.flatten()[None] - qy.flatten()[:, None],      # (N, M) dy
                kx.flatten()[None] - qx.flatten()[:, None])      # (N, M) dx

    def forward(self, x, return_attn=False):
        B, C, H, W = x.shape
        h, d, P = self.num_heads, self.head_dim, self.key_padding
        xk = F.pad(x, (P, P, P, P))                              # (B, C, H+2P, W+2P): zeros outside
        M = xk.shape[2] * xk.shape[3]
        q_in, k_in = x.flatten(2).transpose(1, 2), xk.flatten(2).transpose(1, 2)  # (B, N|M, C)
        q = self.query(q_in).view(B, -1, h, d).transpose(1, 2)   # (B, h, N, d)
        k = self.key(k_in).view(B, M, h, d).transpose(1, 2)      # (B, h, M, d)
        v = self.value(k_in).view(B, M, h, d).transpose(1, 2)    # (B, h, M, d)
        logits = q @ k.transpose(-1, -2) / math.sqrt(d)          # (B, h, N, M) content term
        if self.positional is not None:
            dy, dx = self.relative_offsets(H, W, P, x.device)    # (N, M) each
        if self.positional == "quadratic":
            # v_h . r_delta with r_delta = (|delta|^2, dy, dx): the same for every image (Lemma 1)
            r = torch.stack([dy * dy + dx * dx, dy, dx], -1).to(x.dtype)       # (N, M, 3)
            logits = logits + torch.einsum("nmc,hc->hnm", r, self.pos_v)       # (h, N, M)
        elif self.positional == "learned":
            S = self.max_size
            assert max(H, W) + P <= S, \
                f"image {H}x{W} (+ key padding {P}) exceeds max_size {S}: build a larger max_size"
            qr_row = q[..., : d // 2] @ self.rel_row.T           # (B, h, N, 2S-1): q . r_row[dy]
            qr_col = q[..., d // 2:] @ self.rel_col.T            # (B, h, N, 2S-1)
            idx_row = (dy + S - 1).expand(B, h, -1, -1)          # (B, h, N, M) table index of dy
            idx_col = (dx + S - 1).expand(B, h, -1, -1)
            qr = qr_row.gather(-1, idx_row) + qr_col.gather(-1, idx_col)  # (B, h, N, M)
            logits = logits + qr / math.sqrt(d)
        attn = logits.softmax(-1)                                  # (B, h, N, M)
        out = (attn @ v).transpose(1, 2).reshape(B, H * W, h * d)  # (B, N, h*d): heads concatenated
        out = self.proj(out).transpose(1, 2).reshape(B, -1, H, W)  # (B, C_out, H, W)
        return (out, attn) if return_attn else out


# %% [markdown]
# ### Theorem 1, constructively: a K x K convolution as K^2 attention heads
#
# Head $h \leftrightarrow$ kernel tap $(i, j)$ with shift $\Delta_h = (i - \lfloor K/2 \rfloor,
# j - \lfloor K/2 \rfloor)$. Content attention is switched off ($W_Q = W_K = 0$), and
# $v_h = -\alpha(1, -2\Delta_h)$ gives the score $-\alpha(|\delta - \Delta_h|^2 -
# |\Delta_h|^2)$: a bump at $\delta = \Delta_h$. Values are the raw pixels ($W_V$ = identity per
# head, $d = C_{in}$) and the output projection of head $h$ is the kernel slice $W[:, :, i, j]$, so
# $\sum_h W[:, :, \Delta_h]\, X_{q+\Delta_h}$ is the conv's cross-correlation.
#
# The softmax is never exactly one-hot: head $h$ leaks $S/(1+S)$ of its mass, with
# $S = \sum_{\delta \neq 0} e^{-\alpha|\delta|^2} \approx 4e^{-\alpha}$, so the output error
# is at most $2\frac{S}{1+S}\max|x| \sum_{c,i,j}|W_{o,c,i,j}|$: $\alpha = 5$ leaks 3e-2,
# $\alpha = 10$ 2e-4, $\alpha = 20$ 8e-9, below float32 resolution. The theorem is the limit
# $\alpha \to \infty$.

# %%
def attention_from_conv(conv, alpha=20.0):
    """An MHSA layer (K^2 heads, quadratic positions) that computes `conv`: odd square K, stride 1,
    zero padding K//2, any C_in / C_out, bias or not, on any H x W input. Follows conv's dtype."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"attention_from_conv expects an nn.Conv2d, got {type(conv).__name__}")
    K, K2 = conv.kernel_size
    if K != K2 or K % 2 == 0:
        raise ValueError(f"attention_from_conv needs a square kernel of odd size (one centre pixel "
                         f"per query), got {conv.kernel_size}; use K = 1, 3, 5, ...")
    P = K // 2
    if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1:
        raise ValueError(f"attention_from_conv needs stride 1, dilation 1, groups 1; got stride "
                         f"{conv.stride}, dilation {conv.dilation}, groups {conv.groups}")
    if conv.padding not in ((P, P), "same") or conv.padding_mode != "zeros":
        raise ValueError(f"attention_from_conv needs zero padding K//2 = {P} ('same' output); got "
                         f"padding {conv.padding} with padding_mode {conv.padding_mode!r}")
    C_out, C_in = conv.out_channels, conv.in_channels
    W = conv.weight.detach()                                             # (C_out, C_in, K, K)
    # Zero padding: the conv reads x[q + Delta] = 0 outside the image, so the keys live on the grid
    # padded by P: a border query still finds its shift, lands on a zero pixel and gets value 0.
    attn = MultiHeadSelfAttention2d(C_in, num_heads=K * K, head_dim=C_in, out_dim=C_out,
                                    positional="quadratic", key_padding=P, qkv_bias=False,
                                    proj_bias=conv.bias is not None)
    attn = attn.to(device=W.device, dtype=W.dtype)
    with torch.no_grad():
        attn.query.weight.zero_()                                        # no content attention
        attn.key.weight.zero_()
        eye = torch.eye(C_in, device=W.device, dtype=W.dtype)
        attn.value.weight.copy_(eye.repeat(K * K, 1))          # (K^2 C_in, C_in): x itself
        # proj column (i*K + j)*C_in + c carries W[:, c, i, j]: head h = i*K + j is tap (i, j)
        attn.proj.weight.copy_(W.permute(0, 2, 3, 1).reshape(C_out, K * K * C_in))
        taps = torch.arange(K, device=W.device, dtype=W.dtype) - P
        dy, dx = torch.meshgrid(taps, taps, indexing="ij")               # Delta_h for h = i*K + j
        # v_h = -alpha (1, -2 Delta_1, -2 Delta_2)
        attn.pos_v.copy_(-alpha * torch.stack([torch.ones_like(dy.flatten()), -2 * dy.flatten(),
                                               -2 * dx.flatten()], 1))
        if conv.bias is not None:
            attn.proj.bias.copy_(conv.bias.detach())
    return attn


def demo_conv_twin(alpha=20.0):
    """A random 3x3 conv and its 9-head attention twin on a random image: the printed error, and
    each head's attention for one query pixel, drawn where it lands: 9 heads = 9 kernel shifts."""
    from matplotlib.figure import Figure
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        out, probs = attention_from_conv(conv, alpha)(x, return_attn=True)  # probs (B, 9, N, M)
        err = (out - conv(x)).abs().max().item()
    print(f"  3x3 conv (4 -> 6 channels) vs its 9-head attention twin, alpha {alpha:g}: "
          f"max |attention - conv| = {err:.1e}")
    fig = Figure(figsize=(5.2, 5.6))
    axes = fig.subplots(3, 3)
    qy = qx = 3                                                      # the centre query pixel
    for h, ax in enumerate(axes.flat):
        grid = probs[0, h, qy * 7 + qx].view(9, 9)[1:-1, 1:-1]       # padded key grid -> image
        ax.imshow(grid.numpy(), cmap="viridis", vmin=0, vmax=1)
        ax.scatter([qx], [qy], c="red", s=12, marker="x")
        ax.set_title(f"head {h}: shift ({h // 3 - 1},{h % 3 - 1})", fontsize=8)
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"attention_from_conv: each head attends to one kernel shift (red x: query)\n"
                 f"max |attention - conv| = {err:.1e}", fontsize=9)
    utils.show(fig, "demo_conv_twin")
    return {"alpha": alpha, "max_abs_err": err}


if utils.in_notebook():
    demo_conv_twin()


# %%
def demo_alpha(alphas=(1, 2, 3, 5, 8, 12, 20)):
    """As alpha falls, each head spreads its mass over neighbouring pixels and the twin becomes a
    blurred conv: the max error against the leak bound above (plus float32 rounding, ~1e-6)."""
    from matplotlib.figure import Figure
    torch.manual_seed(0)
    conv, x = nn.Conv2d(3, 4, 3, padding=1), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        errs = [(attention_from_conv(conv, a)(x) - conv(x)).abs().max().item() for a in alphas]
    w_l1 = conv.weight.detach().abs().sum((1, 2, 3)).max().item()
    leak = [(sum(math.exp(-a * n * n) for n in range(-9, 10)) ** 2 - 1) for a in alphas]  # S
    bound = [2 * s / (1 + s) * x.abs().max().item() * w_l1 for s in leak]
    for a, e, b in zip(alphas, errs, bound):
        print(f"  alpha {a:>4g}: max error {e:.1e} (bound {b:.1e})")
    fig = Figure(figsize=(4.5, 3.2))
    ax = fig.subplots()
    ax.semilogy(alphas, [max(e, 1e-9) for e in errs], "o-", label="max |twin - conv|")
    ax.semilogy(alphas, bound, "--", label="leak bound")
    ax.set_xlabel("alpha"), ax.set_ylabel("error"), ax.legend(fontsize=8)
    ax.set_title("the twin is a conv in the limit alpha -> infinity", fontsize=9)
    utils.show(fig, "demo_alpha")
    return {"alphas": list(alphas), "max_abs_err": errs, "bound": bound}


if utils.in_notebook():
    demo_alpha()


# %% [markdown]
# ## 2. Local self-attention, SASA (Ramachandran et al. 2019, eq. 2-3)
#
# Pixel $(i, j)$ attends only to the $k \times k$ window $\mathcal{N}_k(i, j)$ around it:
#
# $$y_{ij} = \sum_{(a,b) \in \mathcal{N}_k(i,j)} \mathrm{softmax}_{ab}\Big(
#   \frac{q_{ij}^\top (k_{ab} + r_{a-i,\,b-j})}{\sqrt{d}}\Big)\, v_{ab},\qquad
#   r_{\delta_1,\delta_2} = [r^{row}_{\delta_1}; r^{col}_{\delta_2}]$$
#
# per head of $d$ channels; half of a head's channels encode the row offset, half the column offset.
# Window slots outside the image are not keys (score $-\infty$), so a window covering the whole
# image is global attention (tested). L = k^2 window slots; slot $l = (\delta_1 + p) k + (\delta_2 +
# p)$ with $p = k//2$. Our deviations, for reasons: dense $W_Q, W_K, W_V$ shared by all heads (the
# paper gives each head its own group of input channels; dense maps let every head read every
# channel, as in MHSA); the $1/\sqrt{d}$ (not in eq. 2: it makes a full window equal MHSA exactly);
# one $r^{row}$/$r^{col}$ table per head. No output projection, as in the paper.

# %%
@functools.lru_cache(maxsize=64)
def window_slots(H, W, window, device=None):
    """For every pixel n and window slot l: the key pixel m = (y + dy) W + (x + dx), clamped into
    the image, and whether that key lies inside it. Returns (key_index, inside), each (N, L)."""
    p = window // 2
    y, x = torch.meshgrid(torch.arange(H, device=device), torch.arange(W, device=device),
                          indexing="ij")                                                  # (H, W)
    dy, dx = torch.meshgrid(torch.arange(-p, p + 1, device=device),
                            torch.arange(-p, p + 1, device=device), indexing="ij")       # (k, k)
    ky, kx = y.reshape(-1, 1) + dy.reshape(1, -1), x.reshape(-1, 1) + dx.reshape(1, -1)  # (N, L)
    inside = (ky >= 0) & (ky < H) & (kx >= 0) & (kx < W)
    return ky.clamp(0, H - 1) * W + kx.clamp(0, W - 1), inside


def local_attention_unfold(q, k, v, r, window):
    """SASA by Tensor.unfold, the obvious way and the REFERENCE. q (already / sqrt d), k, v:
    (B, h, d, H, W); r: (h, L, d). Returns out (B, h, d, H, W) and attn (B, h, N, L). Every pixel's
    window is copied (L copies of the map) and each pixel does its own (1 x d) @ (d x L) matmul."""
    B, h, d, H, W = q.shape
    K, p, L = window, window // 2, window * window
    k = F.pad(k, (p, p, p, p)).unfold(3, K, 1).unfold(4, K, 1)         # (B, h, d, H, W, K, K) view
    v = F.pad(v, (p, p, p, p)).unfold(3, K, 1).unfold(4, K, 1)         # slot (a, b): (y+a, x+b)
    k = k.permute(0, 1, 3, 4, 2, 5, 6).reshape(B, h, H, W, d, L)       # copy: (B, h, H, W, d, L)
    v = v.permute(0, 1, 3, 4, 5, 6, 2).reshape(B, h, H, W, L, d)       # copy: (B, h, H, W, L, d)
    q = q.permute(0, 1, 3, 4, 2).unsqueeze(-2)                         # (B, h, H, W, 1, d)
    # eq. 2: q . (k + r) for every slot of the window
    logits = (q @ k + q @ r.transpose(-1, -2)[:, None, None]).squeeze(-2)  # (B, h, H, W, L)
    _, inside = window_slots(H, W, window, q.device)                   # (N, L)
    logits = logits.masked_fill(~inside.view(H, W, L), float("-inf"))  # outside the image: no key
    attn = logits.softmax(-1)
    out = (attn.unsqueeze(-2) @ v).squeeze(-2)                         # (B, h, H, W, d)
    return out.permute(0, 1, 4, 2, 3), attn.reshape(B, h, H * W, L)


class LocalSelfAttention2d(nn.Module):
    """SASA (the equation above) on a (B, C, H, W) map. `impl` picks how the same function is
    computed (all tested equal): "unfold" (the reference) or the optional fast paths below,
    "shifted" (large maps) and "dense" (small maps); "auto" takes dense when N <= 4 L."""

    def __init__(self, dim, *, num_heads, window=7, head_dim=None, qkv_bias=True):
        super().__init__()
        assert window % 2 == 1, f"window must be odd so it is centred on its pixel, got {window}"
        assert head_dim is not None or dim % num_heads == 0, \
            f"dim {dim} is not divisible by num_heads {num_heads}; pass head_dim"
        self.num_heads, self.head_dim, self.window = num_heads, head_dim or dim // num_heads, window
        h, d = self.num_heads, self.head_dim
        assert d % 2 == 0, f"relative embeddings split d into rows/cols: head_dim {d} must be even"
        self.qkv = nn.Conv2d(dim, 3 * h * d, 1, bias=qkv_bias)                  # W_Q, W_K, W_V
        self.rel_row = nn.Parameter(torch.randn(h, window, d // 2) * d ** -0.5)  # [head, dy + k//2]
        self.rel_col = nn.Parameter(torch.randn(h, window, d // 2) * d ** -0.5)  # [head, dx + k//2]

    def relative_embeddings(self):
        """(h, L, d): r_delta = [r_row[dy]; r_col[dx]] for window slot l."""
        h, K, d2 = self.rel_row.shape
        return torch.cat([self.rel_row[:, :, None].expand(h, K, K, d2),
                          self.rel_col[:, None].expand(h, K, K, d2)], -1).reshape(h, K * K, 2 * d2)

    def forward(self, x, return_attn=False, impl="auto"):
        B, C, H, W = x.shape
        h, d, K = self.num_heads, self.head_dim, self.window
        q, k, v = self.qkv(x).view(B, 3, h, d, H, W).unbind(1)                  # (B, h, d, H, W)
        q, r = q / math.sqrt(d), self.relative_embeddings()                     # r: (h, L, d)
        if impl == "auto":
            impl = "dense" if H * W <= 4 * K * K else "shifted"
        if impl == "unfold":
            out, attn = local_attention_unfold(q, k, v, r, K)                   # attn (B, h, N, L)
        elif impl == "shifted":
            out, attn = local_attention_shifted(q, k, v, r, K)                  # (B, h, L, H, W)
            attn = attn.flatten(3).transpose(2, 3)                              # (B, h, N, L)
        elif impl == "dense":
            out, attn = local_attention_dense(q, k, v, r, K)                    # (B, h, N, N)
            if return_attn:
                key, inside = window_slots(H, W, K, x.device)                   # (N, L)
                attn = attn.gather(-1, key.expand(B, h, -1, -1)).masked_fill(~inside, 0.0)
        else:
            raise ValueError(f"impl must be auto, unfold, shifted or dense, got {impl!r}")
        out = out.reshape(B, h * d, H, W)                                       # heads concatenated
        return (out, attn) if return_attn else out


# %% [markdown]
# ### Optional: faster SASA (tested equal to `local_attention_unfold`)
#
# The reference copies every window and runs N tiny matmuls. Both paths below compute the same
# function with a few large operations; `--bench` times them side by side.

# %%
def local_attention_shifted(q, k, v, r, window):
    """SASA by shifted slices: the keys of every pixel at window slot (dy, dx) are ONE slice of the
    padded key map, kp[..., p+dy : p+dy+H, p+dx : p+dx+W], a view. So the scores are L elementwise
    products summed over d, and the output L multiply-adds: 2L large ops instead of N tiny matmuls,
    and O(N d) memory instead of O(N L d). As the reference, but attn is (B, h, L, H, W)."""
    B, h, d, H, W = q.shape
    K, p, L = window, window // 2, window * window
    kp, vp = F.pad(k, (p, p, p, p)), F.pad(v, (p, p, p, p))                 # (B, h, d, H+2p, W+2p)
    slots = [(a, b) for a in range(K) for b in range(K)]                    # slot s = a*K + b
    content = torch.stack([(q * kp[..., a:a + H, b:b + W]).sum(2) for a, b in slots], 2)
    logits = content + torch.einsum("bhdyx,hld->bhlyx", q, r)               # (B, h, L, H, W)
    _, inside = window_slots(H, W, window, q.device)                        # (N, L)
    attn = logits.masked_fill(~inside.T.reshape(L, H, W), float("-inf")).softmax(2)
    out = sum(attn[:, :, s, None] * vp[..., a:a + H, b:b + W] for s, (a, b) in enumerate(slots))
    return out, attn                                                        # out (B, h, d, H, W)


@functools.lru_cache(maxsize=64)
def window_pairs(H, W, window, device=None):
    """For every (query, key) pair: whether the key is in the query's window, and its slot (clamped
    to a valid slot outside the window). Each (N, N); cached."""
    p = window // 2
    dy, dx = MultiHeadSelfAttention2d.relative_offsets(H, W, 0, device)     # (N, N): key - query
    slot = ((dy + p) * window + dx + p).clamp(0, window * window - 1)
    return (dy.abs() <= p) & (dx.abs() <= p), slot


def local_attention_dense(q, k, v, r, window):
    """SASA as masked global attention: all N x N scores by one matmul, pairs outside the window
    -inf. N^2 d work instead of N L d, but in a few large matmuls: on a CPU it wins while N <= ~4 L.
    Returns out (B, h, d, H, W) and the dense attention (B, h, N, N)."""
    B, h, d, H, W = q.shape
    N = H * W
    q, k, v = q.flatten(3), k.flatten(3), v.flatten(3)                      # (B, h, d, N)
    in_window, slot = window_pairs(H, W, window, q.device)                  # (N, N) each
    qr = torch.einsum("bhdn,hld->bhnl", q, r)                               # (B, h, N, L)
    logits = q.transpose(-1, -2) @ k + qr.gather(-1, slot.expand(B, h, N, N))  # (B, h, N, N)
    attn = logits.masked_fill(~in_window, float("-inf")).softmax(-1)
    out = (attn @ v.transpose(-1, -2)).transpose(-1, -2)                    # (B, h, d, N)
    return out.reshape(B, h, d, H, W), attn


# %% [markdown]
# ## 3. Axial attention (Axial-DeepLab, Wang et al. 2020, sec. 3.1 eq. 4)
#
# Along one axis (a column for `axis="height"`, a row for `"width"`), query $o$ attends to every
# key $p$ of its line, with $\delta = p - o$ and learned relative embeddings $r^q, r^k, r^v$:
#
# $$a_{op} = \mathrm{softmax}_p\big(\mathrm{BN}(q_o^\top k_p) + \mathrm{BN}(q_o^\top r^q_{\delta})
#   + \mathrm{BN}(k_p^\top r^k_{\delta})\big),\qquad
#   y_o = \mathrm{BN}\Big(\sum_p a_{op} v_p\Big)
#       + \mathrm{BN}\Big(\sum_p a_{op} r^v_{\delta}\Big).$$
#
# The batch norms (one per score term and head, one per output term and channel) are the official
# implementations': they give each score term unit spread from the first step, so position counts as
# much as content whatever the scale of q and k. As in both official implementations, one set of
# tables $r^q, r^k, r^v$ is shared by all heads. Height then width (two layers) reach every pixel at
# $O(N (H + W) d)$ instead of global attention's $O(N^2 d)$. S sequences of length T (axis "height":
# S = W columns of T = H pixels). Ours differs in one place: q, k and v all have d channels per head
# (deeplab2 gives the values 2 C inside its bottleneck block; our basic block keeps C).

# %%
class AxialAttention1d(nn.Module):
    """Position-sensitive axial attention (eq. 4 above) along one axis of a (B, C, H, W) map."""

    def __init__(self, dim, *, num_heads, max_len, axis, head_dim=None):
        super().__init__()
        assert axis in ("height", "width"), f"axis must be 'height' or 'width', got {axis!r}"
        assert head_dim is not None or dim % num_heads == 0, \
            f"dim {dim} is not divisible by num_heads {num_heads}; pass head_dim"
        self.num_heads, self.head_dim = num_heads, head_dim or dim // num_heads
        self.max_len, self.axis = max_len, axis
        h, d = self.num_heads, self.head_dim
        self.qkv = nn.Conv2d(dim, 3 * h * d, 1, bias=False)                     # W_Q, W_K, W_V
        self.bn_qkv = nn.BatchNorm2d(3 * h * d)
        # r[delta + max_len - 1] for |delta| < max_len, shared by the heads; std 1 as deeplab2's
        self.rel_q, self.rel_k, self.rel_v = (nn.Parameter(torch.randn(2 * max_len - 1, d))
                                              for _ in range(3))
        # one batch norm per score term (a channel per head) and per output term (per channel)
        self.bn_qk, self.bn_qr, self.bn_kr = nn.BatchNorm1d(h), nn.BatchNorm1d(h), nn.BatchNorm1d(h)
        self.bn_sv, self.bn_sve = nn.BatchNorm1d(h * d), nn.BatchNorm1d(h * d)

    def forward(self, x):
        B, C, H, W = x.shape
        h, d = self.num_heads, self.head_dim
        q, k, v = self.bn_qkv(self.qkv(x)).view(B, 3, h, d, H, W).unbind(1)    # (B, h, d, H, W)
        order = (0, 1, 4, 3, 2) if self.axis == "height" else (0, 1, 3, 4, 2)   # -> (B, h, S, T, d)
        q, k, v = (t.permute(order) for t in (q, k, v))
        S, T = q.shape[2], q.shape[3]
        assert T <= self.max_len, f"axis length {T} exceeds max_len {self.max_len}: build larger"
        pos = torch.arange(T, device=x.device)
        delta = pos[None, :] - pos[:, None] + self.max_len - 1                  # (T, T): p - o
        rq, rk, rv = self.rel_q[delta], self.rel_k[delta], self.rel_v[delta]    # (T, T, d) each
        # the three score terms of eq. 4, each batch-normed with one channel per head
        qk = q @ k.transpose(-1, -2)                                            # (B, h, S, T, T)
        qr = torch.einsum("bhsod,opd->bhsop", q, rq)                            # q_o . r^q_{p-o}
        kr = torch.einsum("bhspd,opd->bhsop", k, rk)                            # k_p . r^k_{p-o}

        def norm(bn, t):
            return bn(t.reshape(B, h, -1)).view(t.shape)
        attn = (norm(self.bn_qk, qk) + norm(self.bn_qr, qr) + norm(self.bn_kr, kr)).softmax(-1)
        sv = attn @ v                                                           # sum_p a_op v_p
        sve = torch.einsum("bhsop,opd->bhsod", attn, rv)                        # sum_p a_op r^v
        # (B, h, S, T, d) -> (B, C, S*T), channel = (head, d); the two output terms, batch-normed
        sv, sve = (t.permute(0, 1, 4, 2, 3).reshape(B, h * d, S * T) for t in (sv, sve))
        out = (self.bn_sv(sv) + self.bn_sve(sve)).view(B, h * d, S, T)
        return out.transpose(2, 3) if self.axis == "height" else out            # (B, C, H, W)


class AxialAttention2d(nn.Module):
    """Height-axis then width-axis attention (Axial-DeepLab's order): after both passes every output
    pixel depends on every input pixel. No output projection (as in Axial-DeepLab)."""

    def __init__(self, dim, *, num_heads, max_size, head_dim=None):
        super().__init__()
        kw = dict(num_heads=num_heads, max_len=max_size, head_dim=head_dim)
        self.height = AxialAttention1d(dim, axis="height", **kw)
        self.width = AxialAttention1d(dim, axis="width", **kw)

    def forward(self, x):
        return self.width(self.height(x))


# %% [markdown]
# ### What each layer sees
#
# One output pixel depends on: a 3x3 conv, its 3x3 neighbourhood; SASA, its $k \times k$ window; one
# axial layer, its whole column; height then width, the whole image. The demo reads these receptive
# fields off autograd (the input pixels with a non-zero gradient).

# %%
def demo_receptive_fields(size=9, at=(4, 2)):
    """Conv, SASA's window and the axial line(s) on one pixel, read off autograd, side by side."""
    from matplotlib.figure import Figure
    torch.manual_seed(0)
    layers = {"3x3 conv": nn.Conv2d(8, 8, 3, padding=1),
              "SASA, 5x5 window": LocalSelfAttention2d(8, num_heads=2, window=5),
              "axial, height": AxialAttention1d(8, num_heads=2, max_len=size, axis="height"),
              "axial, height then width": AxialAttention2d(8, num_heads=2, max_size=size)}
    fields = {}
    for name, layer in layers.items():            # the input pixels with a non-zero gradient
        x = torch.randn(2, 8, size, size, requires_grad=True)
        layer.eval()(x)[0, :, at[0], at[1]].sum().backward()
        fields[name] = x.grad[0].abs().sum(0) > 0                  # (size, size) bool
    for name, f in fields.items():
        print(f"  {name:<25} output pixel {at} depends on {int(f.sum()):3d} of {size**2} pixels")
    fig = Figure(figsize=(9, 2.6))
    for ax, (name, f) in zip(fig.subplots(1, 4), fields.items()):
        ax.imshow(f.float().numpy(), cmap="Blues", vmin=0, vmax=1.3)
        ax.scatter([at[1]], [at[0]], c="red", s=15, marker="x")
        ax.set_title(name, fontsize=8), ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle("input pixels one output pixel (red x) depends on", fontsize=9)
    utils.show(fig, "demo_receptive_fields")
    return {name: int(f.sum()) for name, f in fields.items()}


if utils.in_notebook():
    demo_receptive_fields()


# %% [markdown]
# ## 4. How local is a head? Non-locality (ConViT, d'Ascoli et al. 2021, eq. 6)
#
# $D = \frac{1}{N}\sum_q \sum_k A_{qk}\, |\delta_{qk}|$: the attention-weighted mean distance, in
# pixels, between a query and its keys. A conv-like head has $D = |\Delta_h|$; uniform attention
# over an $H \times H$ map about $H/2$.

# %%
def nonlocality(attn_probs, H, W, *, key_padding=0):
    """D_loc of attention (..., N, M) with keys on the H x W grid padded by key_padding. -> (...)"""
    dy, dx = MultiHeadSelfAttention2d.relative_offsets(H, W, key_padding, attn_probs.device)
    assert attn_probs.shape[-2:] == dy.shape, \
        f"attn_probs ends in {tuple(attn_probs.shape[-2:])}, expected (N, M) = {tuple(dy.shape)}"
    dist = (dy * dy + dx * dx).to(attn_probs.dtype).sqrt()                  # (N, M) |delta|
    return (attn_probs * dist).sum(-1).mean(-1)


def window_nonlocality(attn, window):
    """The same D for SASA attention (..., N, L) over each pixel's k x k window slots."""
    off = torch.arange(window, device=attn.device, dtype=attn.dtype) - window // 2
    dist = (off[:, None] ** 2 + off[None, :] ** 2).sqrt().flatten()         # (L,) |delta| of slot
    return (attn * dist).sum(-1).mean(-1)


# %% [markdown]
# ## 5. One backbone, three spatial operators
#
# A conv stem, three stages of one ResNet basic block each, global pooling and a linear head. Only
# the blocks' spatial operator differs between the compared models: both 3x3 convs of a block become
# SASA or axial attention (SASA's ResNets replace them the same way, in bottleneck blocks).
# Downsampling (2x2 average pool + 1x1 conv) is shared. "hybrid" keeps convs early and attention
# late (Ramachandran et al. sec. 4.3).

# %%
MODELS = {  # the operator of each of the three stages (resolution S/s, S/2s, S/4s; stem stride s)
    "all-conv": ("conv", "conv", "conv"),
    "all-local": ("local", "local", "local"),
    "all-axial": ("axial", "axial", "axial"),
    "hybrid": ("conv", "conv", "local"),
}


def spatial_op(kind, dim, *, head_dim, window, size):
    """The one layer that differs between the models: a 3x3 conv, SASA or axial attention."""
    assert kind in ("conv", "local", "axial"), f"unknown operator {kind!r}: conv, local or axial"
    if kind == "conv":
        return nn.Conv2d(dim, dim, 3, padding=1, bias=False)
    if kind == "local":
        return LocalSelfAttention2d(dim, num_heads=dim // head_dim, window=window)
    return AxialAttention2d(dim, num_heads=dim // head_dim, max_size=size)


class Block(nn.Module):
    """ResNet basic block with both 3x3 convs replaced by `op`."""

    def __init__(self, dim, *, op, head_dim, window, size):
        super().__init__()
        kw = dict(head_dim=head_dim, window=window, size=size)
        self.op1, self.bn1 = spatial_op(op, dim, **kw), nn.BatchNorm2d(dim)
        self.op2, self.bn2 = spatial_op(op, dim, **kw), nn.BatchNorm2d(dim)

    def forward(self, x):
        out = F.relu(self.bn1(self.op1(x)))
        return F.relu(x + self.bn2(self.op2(out)))


class Net(nn.Module):
    """Conv stem (stride s) -> 3 stages (one Block each) -> global mean -> linear."""

    def __init__(self, *, ops, widths=(16, 32, 64), head_dim=8, window=5, image_size=32,
                 stem_stride=1, num_classes=10):
        super().__init__()
        assert len(ops) == len(widths) == 3, f"need 3 stage ops and 3 widths, got {ops}, {widths}"
        assert image_size % (4 * stem_stride) == 0, \
            f"image_size {image_size} must be divisible by 4 * stem_stride = {4 * stem_stride}"
        self.ops, self.widths = tuple(ops), tuple(widths)
        kernel, pad = (3, 1) if stem_stride <= 2 else (stem_stride, 0)   # stride 4: 4x4 patches
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], kernel, stride=stem_stride, padding=pad,
                                            bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, prev, size = [], widths[0], image_size // stem_stride
        for i, (op, w) in enumerate(zip(ops, widths)):
            size //= 2 if i > 0 else 1                          # stages 2, 3 halve the resolution
            down = (nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(prev, w, 1, bias=False),
                                  nn.BatchNorm2d(w)) if i > 0 else nn.Identity())
            block = Block(w, op=op, head_dim=head_dim, window=window, size=size)
            stages.append(nn.Sequential(down, block))
            prev = w
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(prev, num_classes)

    def forward(self, x):
        x = self.stages(self.stem(x))         # (B, C, S/4s, S/4s)
        return self.head(x.mean((2, 3)))      # (B, classes)


@functools.lru_cache(maxsize=None)
def matched_widths(ops, *, widths, head_dim, window, image_size, stem_stride, num_classes):
    """Parameter matching, from counts alone, before any training: the widths for `ops` whose
    parameter count is closest to all-conv's at `widths`. A 3x3 conv has 9 C^2 weights, SASA 3 C^2
    and axial attention 6 C^2, so attention models get more channels, in stage 3 only (it holds
    most weights), in multiples of head_dim. Stages 1-2 keep their widths, so layers two models
    share are the same layers (same initial weights) and the costly high-resolution attention stays
    narrow.
    Returns (widths, params, target params)."""
    def count(ops, w):
        with torch.device("meta"):                                     # shapes only: no memory
            return utils.count_params(Net(ops=ops, widths=w, head_dim=head_dim, window=window,
                                          image_size=image_size, stem_stride=stem_stride,
                                          num_classes=num_classes))
    target = count(("conv",) * 3, widths)
    candidates = [(*widths[:2], head_dim * j) for j in range(1, 4 * widths[2] // head_dim + 1)]
    best = min(candidates, key=lambda w: abs(count(ops, w) - target))
    return best, count(ops, best), target


# %% [markdown]
# ## Exercises
#
# 1. Lower `alpha` in `demo_conv_twin(alpha=...)` to 3, then 1. Expect each head to spread from
#    one pixel into a blob around its shift: the twin becomes a *blurred* conv. Which alpha makes
#    the max error about 1e-3? (Predict it from $4e^{-\alpha}$ first; `demo_alpha` checks you.)
# 2. Build `attention_from_conv` for a 5x5 conv: how many heads, and what `nonlocality(probs[0],
#    H, W, key_padding=2)` for the head at shift (2, 2)? (Expect 25 heads, D = sqrt(8) = 2.83.)
# 3. Give `LocalSelfAttention2d` a window of `2 * max(H, W) - 1` on an H x W map. Expect exactly
#    global attention: compare with `MultiHeadSelfAttention2d(positional="learned")` after copying
#    weights (the tests do this).
# 4. Zero `rel_q`, `rel_k` and `rel_v` of an `AxialAttention2d` and mirror an image left to right.
#    Expect the output to mirror too: without positions, attention cannot tell left from right.

# %% [markdown]
# ---
# # The lab: presets, runs, experiments, figures
#
# Below, the experiments (the paper is above), one `exp_*` each: `compare` (section 5's models,
# parameter-matched, paired seeds), `scaling` (attention's gap to conv at two training-set sizes,
# same steps), `swap` (Theorem 1 on a trained network).

# %%
PRESETS = {
    # 2-core CPU, ~6 min with --workers 2; every run ~312 steps of batch 64, all test images
    "quick": dict(train_per_class=1000, val_per_class=0, test_per_class=None, image_size=32,
                  epochs=2, scaling_factor=10, widths=(16, 32, 128), head_dim=16, window=3,
                  stem_stride=2, batch_size=64, lr=3e-3, seeds=4, axial_seeds=3,
                  models=tuple(MODELS), scaling_models=("all-local",), swap_images=2000,
                  alpha=20.0, workers=2, threads=1),
    # one GPU: all of CIFAR-10, full resolution, SASA's 7x7 window (not measured: no GPU here)
    "full": dict(train_per_class=5000, val_per_class=0, test_per_class=None, image_size=32,
                 epochs=30, scaling_factor=10, widths=(64, 128, 256), head_dim=16, window=7,
                 stem_stride=1, batch_size=128, lr=2e-3, seeds=3, axial_seeds=3,
                 models=tuple(MODELS), scaling_models=("all-local", "all-axial", "hybrid"),
                 swap_images=10000, alpha=20.0, workers=1, threads=None),
}
FLAGS = {
    "models": f"models to train, from {list(MODELS)} (all-conv always: it is the reference)",
    "epochs": "epochs at the large training set; every run gets the same number of steps",
    "scaling_factor": "the small training set has train-per-class / this many images per class",
    "scaling_models": "attention models also trained at the small size",
    "widths": "all-conv's channels in the 3 stages; attention stage 3 is widened to match params",
    "head_dim": "channels per attention head d (heads = width / d)",
    "window": "SASA window side k (odd)",
    "stem_stride": ("2 halves every stage's resolution", dict(type=int, choices=(1, 2, 4))),
    "batch_size": "training batch size",
    "lr": "peak AdamW learning rate",
    "seeds": "paired seeds seed, seed+1, ... for every model",
    "axial_seeds": "paired seeds of all-axial: the first of --seeds (~6x all-conv's cost per step)",
    "swap_images": "test images (every n-th: all classes) scored with the attention twin",
    "alpha": "attention_from_conv's sharpness",
}
EXPERIMENTS = ("compare", "scaling", "swap")


def check_args(a):
    a.models = ("all-conv",) + tuple(m for m in a.models if m != "all-conv")
    a.axial_seeds = min(a.axial_seeds, a.seeds)
    for bad, message in [
            (set(a.models + a.scaling_models) - set(MODELS), f"unknown --models / --scaling-models "
             f"{sorted(set(a.models + a.scaling_models) - set(MODELS))}; use {list(MODELS)}"),
            (len(a.widths) != 3, f"--widths needs 3 numbers (one per stage), got {a.widths}"),
            (any(w % a.head_dim for w in a.widths), f"every width in --widths {a.widths} must be a "
             f"multiple of --head-dim {a.head_dim}"),
            (a.window % 2 == 0, f"--window must be odd (centred on its pixel), got {a.window}"),
            (a.image_size % (4 * a.stem_stride), f"--image-size must be divisible by "
             f"{4 * a.stem_stride} (stem stride {a.stem_stride}, then two 2x poolings)")]:
        if bad:
            raise utils.InputError(message)
    a.scaling_models = tuple(m for m in a.scaling_models if m in a.models[1:])


def get_args(argv=None):
    return utils.cli(__doc__, PRESETS, FLAGS, argv, experiments=EXPERIMENTS, check=check_args,
                     bench="time one SASA layer (unfold reference vs fast path), axial and a conv")


def build_model(cfg, arm, num_classes):
    """The network of one arm (a key of MODELS) with its parameter-matched widths."""
    widths = matched_widths(MODELS[arm], widths=tuple(cfg.widths), head_dim=cfg.head_dim,
                            window=cfg.window, image_size=cfg.image_size,
                            stem_stride=cfg.stem_stride, num_classes=num_classes)[0]
    return Net(ops=MODELS[arm], widths=widths, head_dim=cfg.head_dim, window=cfg.window,
               image_size=cfg.image_size, stem_stride=cfg.stem_stride, num_classes=num_classes)


def init_model(cfg, arm, num_classes, seed):
    """`arm`'s network with seed-`seed` initial weights, where every weight it shares with all-conv
    (same name and shape: stem, conv stages, downsampling, norms) starts equal to all-conv's."""
    utils.set_seed(seed)
    model = build_model(cfg, arm, num_classes)
    utils.set_seed(seed)
    utils.copy_shared_init(build_model(cfg, "all-conv", num_classes), model)
    return model


def full_preset_models(num_classes=10):
    """Every model the full preset trains, at its real size: name -> (model, None, image_size)."""
    a = get_args([])
    return {name: (build_model(a, name, num_classes), None, a.image_size) for name in MODELS}


# %%
def train_job(cfg, arm, per_class, seed, keep_state=False):
    """One self-contained run (utils.run_jobs may send it to another process): `arm` trained from
    `seed` on `per_class` images per class for ~cfg["steps"] steps, scored on the test set. Paired
    by seed: same images (the small set is part of the large one), batches, shared init."""
    a = SimpleNamespace(**cfg)
    device = torch.device(a.device)
    data = utils.load_data(a.data, image_size=a.image_size, train_per_class=per_class,
                           test_per_class=a.test_per_class, seed=seed)
    model = init_model(a, arm, data.num_classes, seed)
    train, _, test = utils.make_loaders(data, batch_size=a.batch_size, device=device, seed=seed)
    epochs = max(1, round(a.steps / len(train)))              # the same steps at every size
    t0 = time.time()
    hist = utils.train(model.to(device), train, epochs=epochs, lr=a.lr, weight_decay=0.05,
                       warmup_epochs=epochs / 8, log=lambda line: None)
    score, seconds = utils.evaluate(model, test), time.time() - t0
    print(f"  {arm:<9} {len(data.y_train):>6,d} images, seed {seed}: {epochs:3d} epochs x "
          f"{len(train)} steps, test {score.acc:5.2f}%  NLL {score.nll:.3f}  ({seconds:.0f} s)",
          flush=True)
    state = {k: v.cpu() for k, v in model.state_dict().items()} if keep_state else None
    return dict(arm=arm, per_class=per_class, seed=seed, acc=score.acc, nll=score.nll,
                test_images=len(data.y_test), epochs=epochs, steps=epochs * len(train),
                img_per_s=sum(h["img_per_s"] for h in hist) / len(hist), seconds=seconds,
                params=utils.count_params(model), widths=list(model.widths), state=state)


COST = {"all-conv": 1, "hybrid": 1.5, "all-local": 3, "all-axial": 6}  # time per step, measured


def plan_runs(args, per_class, todo):
    """Every (arm, images per class, seed, keep_state) run the chosen experiments need, the most
    expensive first so that the workers finish together. all-axial gets the first --axial-seeds."""
    small = max(1, per_class // args.scaling_factor)

    def seeds(arm):
        n = args.axial_seeds if arm == "all-axial" else args.seeds
        return range(args.seed, args.seed + n)
    runs = set()
    if "swap" in todo:
        runs |= {(arm, per_class, args.seed) for arm in ("all-conv", "all-local")
                 if arm in args.models}
    if {"compare", "scaling"} & set(todo):
        runs |= {(arm, per_class, s) for arm in args.models for s in seeds(arm)}
    if "scaling" in todo:
        runs |= {(arm, small, s) for arm in ("all-conv", *args.scaling_models) for s in seeds(arm)}

    def keep(arm, n, s):
        return ("swap" in todo and s == args.seed and n == per_class
                and arm in ("all-conv", "all-local"))
    order = sorted(runs, key=lambda r: (-COST[r[0]], r[0], -r[1], r[2]))
    return [(arm, n, s, keep(arm, n, s)) for arm, n, s in order]


def train_all(args, data, todo, device):
    """Run plan_runs' jobs (in parallel with --workers); index them by (arm, per class, seed)."""
    per_class = int(torch.bincount(data.y_train).min())               # what the preset fitted to
    small = max(1, per_class // args.scaling_factor)
    steps = args.epochs * (len(data.y_train) // min(args.batch_size, len(data.y_train)))
    cfg = dict(vars(args), steps=steps, device=str(device))          # what every job needs
    jobs = plan_runs(args, per_class, todo)
    print(f"training {len(jobs)} runs (~{steps} steps each; {per_class} and {small} images per "
          f"class; {args.workers} at a time)", flush=True)
    t0 = time.time()
    results = utils.run_jobs(train_job, [(cfg, *job) for job in jobs], workers=args.workers)
    print(f"all runs done in {time.time() - t0:.0f} s", flush=True)
    return {"per_class": per_class, "small": small,
            "runs": {(r["arm"], r["per_class"], r["seed"]): r for r in results}}


# %%
def paired(runs, arm_a, arm_b, per_class, key):
    """Per-seed values of metric `key` for two arms, over the seeds both have at this size."""
    seeds = sorted(s for (a, n, s) in runs if a == arm_a and n == per_class
                   and (arm_b, n, s) in runs)
    return [[runs[(arm, per_class, s)][key] for s in seeds] for arm in (arm_a, arm_b)]


def compare_arms(runs, arm, ref, per_class, log=print):
    """Accuracy and NLL of `arm` against `ref` at one training size, in the one verdict wording."""
    acc = utils.compare_paired(*paired(runs, arm, ref, per_class, "acc"), name_a=arm, name_b=ref,
                               unit="points", digits=1, bound=1.0, log=log)
    nll = utils.compare_paired(*paired(runs, arm, ref, per_class, "nll"), name_a=arm, name_b=ref,
                               unit="nats", digits=3, higher_is_better=False, bound=0.02, log=log)
    return {"acc": acc, "nll": nll}


def exp_compare(args, trained):
    """Conv vs local vs axial vs hybrid at the large size: a table (mean [95% CI] over paired seeds,
    full test set) and every attention model against all-conv (and hybrid against all-local)."""
    runs, n = trained["runs"], trained["per_class"]
    header = (f"{'model':<10} {'widths':<10} {'params':>8} {'steps':>5} {'img/s':>6} {'n':>2}  "
              f"{'test acc % [95% CI]':<22} {'test NLL [95% CI]':<22}")
    lines, rows = [header, "-" * len(header)], {}
    for arm in args.models:
        rs = [r for (a, m, s), r in sorted(runs.items()) if a == arm and m == n]
        acc, nll = utils.mean_ci([r["acc"] for r in rs]), utils.mean_ci([r["nll"] for r in rs])
        rows[arm] = dict(widths=rs[0]["widths"], params=rs[0]["params"], n=len(rs), acc=acc,
                         nll=nll, img_per_s=sum(r["img_per_s"] for r in rs) / len(rs))
        lines.append(f"{arm:<10} {','.join(map(str, rs[0]['widths'])):<10} {rs[0]['params']:>8,d} "
                     f"{rs[0]['steps']:>5} {rows[arm]['img_per_s']:>6.0f} {len(rs):>2}  "
                     f"{utils.fmt_ci(acc):<22} {utils.fmt_ci(nll, 3):<22}")
    lines.append(f"{n} training images per class, batch {args.batch_size}; scored on "
                 f"{rs[0]['test_images']:,d} test images; img/s: one process, 1 thread")
    print("\n".join(lines), flush=True)
    verdicts = {arm: compare_arms(runs, arm, "all-conv", n) for arm in args.models[1:]}
    if {"hybrid", "all-local"} <= set(args.models):       # conv early helps attention (sec. 4.3)
        verdicts["hybrid vs all-local"] = compare_arms(runs, "hybrid", "all-local", n)
    return {"table": lines, "models": rows, "verdicts": verdicts}


def exp_scaling(args, trained):
    """Attention's gap to all-conv at two training-set sizes (same optimiser steps), and whether it
    changes between them: per seed, (arm - conv) at the large size minus at the small size."""
    runs, big, small = trained["runs"], trained["per_class"], trained["small"]
    result = {}
    for arm in args.scaling_models:
        print(f"-- {arm} vs all-conv: {small} -> {big} images per class", flush=True)
        at = {n: compare_arms(runs, arm, "all-conv", n) for n in (small, big)}
        change = {}
        for key, unit, digits, hib, bound in (("acc", "points", 1, True, 1.0),
                                              ("nll", "nats", 3, False, 0.02)):
            gaps = {n: [x - y for x, y in zip(*paired(runs, arm, "all-conv", n, key))]
                    for n in (small, big)}                       # arm - conv, per seed
            k = min(len(gaps[small]), len(gaps[big]))
            change[key] = utils.compare_paired(
                gaps[big][:k], gaps[small][:k], name_a=f"({arm} - conv) at {big}/class",
                name_b=f"at {small}/class", unit=unit, digits=digits, higher_is_better=hib,
                bound=bound, pairs="paired seeds (difference of gaps)")
        result[arm] = {"small": at[small], "large": at[big], "change_of_gap": change}
    return {"per_class": [small, big], "models": result}


@torch.no_grad()
def exp_swap(args, out, trained, data, device):
    """Theorem 1 on a trained network: all-conv's first 3x3 conv swapped for its 9-head attention
    twin (error on real features; test accuracy, NLL, predictions); and trained SASA heads."""
    def trained_model(arm):                       # seed `args.seed`'s run at the large size
        model = build_model(args, arm, data.num_classes).to(device)
        model.load_state_dict(trained["runs"][(arm, trained["per_class"], args.seed)]["state"])
        return model.eval()
    conv_net = trained_model("all-conv")
    every = max(1, math.ceil(len(data.y_test) / args.swap_images))       # every n-th: all classes
    test = utils.DeviceLoader(data.x_test[::every], data.y_test[::every], batch_size=50,
                              device=device, train=False, mean=data.mean, std=data.std)
    x, _ = next(iter(test))                                               # (50, 3, S, S)
    conv = conv_net.stages[0][1].op1
    feats = conv_net.stem(x[:16])                                         # (16, C, H, W)
    err = (attention_from_conv(conv, args.alpha)(feats) - conv(feats)).abs().max().item()
    swapped = copy.deepcopy(conv_net)
    swapped.stages[0][1].op1 = attention_from_conv(conv, args.alpha)
    logits = [(conv_net(xb), swapped(xb), yb) for xb, yb in test]         # both nets, every batch
    lc, ls, y = (torch.cat(t) for t in zip(*logits))
    s_conv, s_swap = (utils.Score(100.0 * (lg.argmax(-1) == y).float().mean().item(),
                                  F.cross_entropy(lg, y).item()) for lg in (lc, ls))
    same = 100.0 * (lc.argmax(-1) == ls.argmax(-1)).float().mean().item()
    res = {"max_abs_err": err, "alpha": args.alpha, "images": len(test.y),
           "test_acc_conv": s_conv.acc, "test_acc_attention": s_swap.acc, "nll_conv": s_conv.nll,
           "nll_attention": s_swap.nll, "same_predictions_pct": same}
    print(f"Theorem 1 on a trained network, alpha {args.alpha:g}: max |twin - conv| = {err:.1e} on "
          f"real features; {len(test.y):,d} test images: {s_swap.acc:.2f}% with the twin, "
          f"{s_conv.acc:.2f}% with the conv (NLL {s_swap.nll:.4f} vs {s_conv.nll:.4f}), "
          f"{same:.2f}% same predictions", flush=True)
    if ("all-local", trained["per_class"], args.seed) in trained["runs"]:
        local_net = trained_model("all-local")
        feats = local_net.stages[0][0](local_net.stem(x[:16]))           # stage 1's block input
        _, attn = local_net.stages[0][1].op1(feats, return_attn=True)     # (B, h, N, L)
        Hs, Ws = feats.shape[2:]
        res["local_nonlocality"] = window_nonlocality(attn, args.window).mean(0).tolist()
        mean, std = torch.tensor(data.mean).view(3, 1, 1), torch.tensor(data.std).view(3, 1, 1)
        images = [(im.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy() for im in x[:4]]
        centre = attn[:4, :, (Hs // 2) * Ws + Ws // 2].cpu()             # (4, h, L)
        res["figure"] = plot_attention(out, images, centre, (Hs, Ws), args.window)
        print(f"trained all-local, stage-1 SASA heads' nonlocality (pixels): "
              f"{[round(v, 2) for v in res['local_nonlocality']]}; {res['figure']}", flush=True)
    return res


def plot_attention(out, images, attn, hw, window):
    """For a few test images: the image with its centre query pixel (red), then each head of the
    trained stage-1 SASA layer for that query: its k x k window of weights placed on the map."""
    from matplotlib.figure import Figure
    (H, W), p, heads = hw, window // 2, attn.shape[1]
    qy, qx = H // 2, W // 2
    fig = Figure(figsize=(1.6 * (heads + 1), 1.6 * len(images)))
    axes = fig.subplots(len(images), heads + 1, squeeze=False)
    for i, image in enumerate(images):                               # image (S, S, 3) in [0, 1]
        s = image.shape[0] / H                                       # image px per feature px
        axes[i, 0].imshow(image)
        axes[i, 0].scatter([(qx + .5) * s - .5], [(qy + .5) * s - .5], c="red", s=20, marker="x")
        for hd in range(heads):                                      # (L,) -> window on the grid
            grid = torch.zeros(H + 2 * p, W + 2 * p)
            grid[qy:qy + window, qx:qx + window] = attn[i, hd].view(window, window)
            axes[i, hd + 1].imshow(grid[p:p + H, p:p + W].numpy(), cmap="viridis", vmin=0)
            axes[i, hd + 1].set_title(f"head {hd}", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("trained all-local, stage 1: SASA attention of the centre pixel", fontsize=8)
    path = os.path.join(out, "attention_maps.png")
    fig.savefig(path, dpi=80, bbox_inches="tight")
    return path


# %%
def time_step(layer, shape, *, batch_size, steps, forward=None):
    """Median seconds of one forward + backward of `layer` on random input, after 1 warm-up."""
    x = torch.randn(batch_size, *shape, requires_grad=True)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        (forward(layer, x) if forward else layer(x)).square().mean().backward()
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[steps // 2]


def bench(args, device, *, steps=7):
    """SASA by unfold (the reference) and by the fast path, side by side, with axial attention and
    a 3x3 conv for scale, at the quick all-local model's stage sizes, k = 3 and 5 (fwd + bwd)."""
    q = SimpleNamespace(**PRESETS["quick"])
    widths = matched_widths(MODELS["all-local"], widths=q.widths, head_dim=q.head_dim,
                            window=q.window, image_size=q.image_size, stem_stride=q.stem_stride,
                            num_classes=10)[0]
    rows, lines = [], []
    for window, (stage, C) in [(k, sc) for k in (3, 5) for sc in enumerate(widths)]:
        S, heads = q.image_size // q.stem_stride // 2 ** stage, C // q.head_dim
        utils.set_seed(0)
        sasa = LocalSelfAttention2d(C, num_heads=heads, window=window)
        fast = "dense" if S * S <= 4 * window ** 2 else "shifted"              # what "auto" takes
        layers = {"SASA unfold": (sasa, lambda m, x: m(x, impl="unfold")),
                  "SASA fast": (sasa, None),
                  "axial": (AxialAttention2d(C, num_heads=heads, max_size=S), None),
                  "conv 3x3": (nn.Conv2d(C, C, 3, padding=1, bias=False), None)}
        ms = {k: 1e3 * time_step(layer.to(device), (C, S, S), batch_size=q.batch_size, steps=steps,
                                 forward=fwd) for k, (layer, fwd) in layers.items()}
        rows.append(dict(window=window, stage=stage + 1, size=S, width=C, fast=fast, ms=ms))
        lines.append(f"k={window} stage {stage + 1} ({S}x{S}, C={C}, batch {q.batch_size}): "
                     + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items())
                     + f" | fast ({fast}) {ms['SASA unfold'] / ms['SASA fast']:.1f}x faster than "
                     f"unfold, {ms['SASA fast'] / ms['conv 3x3']:.1f}x a conv's time")
        print(lines[-1], flush=True)
        if stage == len(widths) - 1:                                  # the three stages together
            tot = {k: sum(r["ms"][k] for r in rows if r["window"] == window) for k in ms}
            lines.append(f"k={window}, three stages: SASA fast "
                         f"{tot['SASA unfold'] / tot['SASA fast']:.1f}x faster than unfold, "
                         f"{tot['SASA fast'] / tot['conv 3x3']:.1f}x a conv's time")
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
          f"{data.num_classes} classes, {args.image_size} px; device {device}", flush=True)
    trained = train_all(args, data, args.experiments, device)
    results = {}
    for name in args.experiments:
        print(f"== {name} ==", flush=True)
        results[name] = {"compare": lambda: exp_compare(args, trained),
                         "scaling": lambda: exp_scaling(args, trained),
                         "swap": lambda: exp_swap(args, out, trained, data, device)}[name]()
        utils.save_results(os.path.join(out, f"{name}.json"), config, results[name])
    runs = [{k: v for k, v in r.items() if k != "state"} for r in trained["runs"].values()]
    utils.save_results(os.path.join(out, "results.json"), config, {**results, "runs": runs})
    print(f"results: {out}/results.json", flush=True)
    return {**results, "runs": runs}


# %%
if __name__ == "__main__":
    utils.run_main(main)
