"""On the Relationship between Self-Attention and Convolutional Layers -- Cordonnier, Loukas & Jaggi, ICLR 2020
(arXiv:1911.03584), with the attention blocks it is usually compared with: stand-alone local self-attention
(SASA, Ramachandran et al. 2019, arXiv:1906.05909) and axial attention (Ho et al. 2019, arXiv:1912.12180;
Wang et al. Axial-DeepLab 2020, arXiv:2003.07853).

The idea. A multi-head self-attention (MHSA) layer over the pixels of an image, given *relative* positional
attention, can express any K x K convolution: take K^2 heads, make head h attend (almost) only to the pixel at
one shift Delta_h of the kernel, and let the value/output projections of that head carry the kernel slice
W[:, :, Delta_h] (Theorem 1). Cordonnier's quadratic encoding makes the "attend to shift Delta" part exact in
the limit: with r_delta = (|delta|^2, delta_1, delta_2) and v_h = -alpha (1, -2 Delta_1, -2 Delta_2) the score is
v_h . r_delta = -alpha (|delta - Delta|^2 - |Delta|^2), a Gaussian bump around Delta whose softmax tends to a
one-hot as alpha -> infinity. `attention_from_conv` builds that layer from any nn.Conv2d (odd K, stride 1,
padding K//2) and the tests check allclose(attention(x), conv(x), atol=1e-5). The experiment then asks the
practical question: in a small ResNet on real CIFAR-10, what does it cost and gain to swap the 3x3 convs of a
stage for local (SASA) or axial attention, and does "conv early, attention late" (Ramachandran's finding) help?

Run (reads real CIFAR-10 images; `--data cifar10` downloads them, an ImageFolder copy works offline):
    python 01_conv_vs_attention.py --quick --data ../shared/data/cifar10     # ~3 min on a 2-core CPU
                                                  # (add --threads 1 when other jobs share the CPU)
    python 01_conv_vs_attention.py --data ../shared/data/cifar10             # full preset: one GPU, full CIFAR-10
    python 01_conv_vs_attention.py --bench                                   # cost of one layer of each kind

RESULTS of `--quick --threads 1` (2-core shared CPU, torch 2.15 float32, 190 s wall; 1500 train / 1000 test real
CIFAR-10 images, 4 epochs, mean +- std over 2 seeds; runs/01_conv_vs_attention/results.json):
    model      ops (stage 1,2,3)      params   MFLOPs  train img/s  mem MB   test acc %
    all-conv   conv,conv,conv        101,082      7.4         1942    16.3   37.6 +- 0.3
    all-local  local,local,local      48,458      5.6          115   223.5   28.6 +- 1.1
    all-axial  axial,axial,axial      93,818      8.7          450    75.8   23.5 +- 1.5
    hybrid     conv,conv,local        60,714      6.4          505    45.8   33.8 +- 0.7      (chance: 10%)
  - Theorem 1 on real data: the trained all-conv model's stage-1 3x3 conv, rebuilt by attention_from_conv
    (9 heads, alpha 20), differs from the conv by at most 9.5e-7 on real test features, and the network with it
    swapped in scores exactly the same test accuracy (37.4% = 37.4%). The unit tests' max error is 4.8e-7.
  - With 1500 images, the conv's built-in locality wins; "conv early, attention late" (hybrid) beats pure local
    attention, which beats axial (global, no locality prior) -- the small-data side of Ramachandran et al. and
    ConViT. This is a 3-minute CPU run: attention *matching* convs (the papers' claim) needs far more data/epochs.
  - On a CPU, local attention is 17x slower per image than the conv net with fewer FLOPs (memory-bound window
    gathers), axial 4x. The trained SASA heads are still nearly uniform over their 5x5 window (nonlocality
    1.8 px; uniform over an interior window: 1.87).
  - `--bench --threads 1` (one layer, 64 channels, batch 16, train img/s / saved activations), at 16x16 -> 32x32:
    conv 3x3 1825 -> 468 img/s; local 7x7 45 -> 11; axial 474 -> 65; global 44 -> 3 img/s and 208 MB -> 3.2 GB
    (the N^2 attention matrix). FLOPs per image at 32x32: 76 M, 53 M, 92 M and 310 M.
The full preset (one GPU, full CIFAR-10) was not measured: no GPU was available when this file was written.

Letters used in shape comments: B batch, C channels (C_in, C_out), H x W image/feature size, N = H*W query
pixels, M number of key pixels (M = N, or (H+2P)(W+2P) on a zero-padded key grid with P = K//2), h heads,
d channels per head, K conv kernel side, k local window side, L = k*k window slots, S sequences and
T sequence length in axial attention (rows: S = H, T = W).
"""
import argparse
import copy
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import utils

# ------------------------------------------------------------------------------------------------ config

PRESETS = {
    # 2-core CPU, ~4 minutes: small widths, 1500 real CIFAR-10 training images (150 per class), 1000 test images, 2 seeds.
    # The stem has stride 2 (stages at 16, 8, 4 pixels): on a CPU, local attention is ~15x slower per image than a
    # conv of the same width (see --bench), so full resolution would not fit in 5 minutes.
    "quick": dict(train_per_class=150, test_per_class=100, epochs=4, widths=(16, 32, 64), head_dim=8, window=5,
                  stem_stride=2, batch_size=64, lr=3e-3, seeds=2),
    # one GPU, full CIFAR-10 at full resolution, SASA's 7x7 window (not measured here: no GPU was available).
    "full": dict(train_per_class=None, test_per_class=None, epochs=15, widths=(64, 128, 256), head_dim=16, window=7,
                 stem_stride=1, batch_size=128, lr=2e-3, seeds=2),
}
# which spatial operator each of the three stages uses (stage resolution S/s, S/2s, S/4s: image S, stem stride s)
MODELS = {
    "all-conv": ("conv", "conv", "conv"),
    "all-local": ("local", "local", "local"),
    "all-axial": ("axial", "axial", "axial"),
    "hybrid": ("conv", "conv", "local"),  # Ramachandran et al. 2019 sec. 4.3: convs early, attention late
}


def get_args(argv=None):
    p = utils.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    utils.add_common_args(p)
    p.add_argument("--quick", action="store_true", help="CPU preset: 1500 training images, small widths, 4 epochs")
    p.add_argument("--bench", action="store_true", help="only time one layer of each kind (no data, no training)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list from {list(MODELS)}")
    p.add_argument("--epochs", type=utils.positive_int, default=None)
    p.add_argument("--widths", default=None, help="channels of the 3 stages, e.g. 16,32,64")
    p.add_argument("--head-dim", type=utils.positive_int, default=None, help="channels per attention head d (heads = width / d)")
    p.add_argument("--window", type=utils.positive_int, default=None, help="local attention window side k (odd)")
    p.add_argument("--stem-stride", type=utils.positive_int, default=None, choices=(1, 2), help="2 halves every stage's resolution")
    p.add_argument("--batch-size", type=utils.positive_int, default=None)
    p.add_argument("--lr", type=utils.positive_float, default=None)
    p.add_argument("--seeds", type=utils.positive_int, default=None, help="train every model with seeds seed, seed+1, ...")
    p.add_argument("--alpha", type=utils.positive_float, default=20.0, help="attention_from_conv sharpness (see its docstring)")
    args = p.parse_args(argv)
    utils.apply_preset(args, PRESETS["quick" if args.quick else "full"])
    if isinstance(args.widths, str):
        args.widths = tuple(int(w) for w in args.widths.split(","))
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in MODELS]
    if bad:
        p.error(f"unknown --models {bad}; choose from {list(MODELS)}")
    if len(args.widths) != 3:
        p.error(f"--widths needs 3 comma-separated numbers (one per stage), got {args.widths}")
    if any(w % args.head_dim for w in args.widths):
        p.error(f"every width in --widths {args.widths} must be a multiple of --head-dim {args.head_dim}")
    if args.window % 2 == 0:
        p.error(f"--window must be odd so the window is centred on its pixel, got {args.window}")
    if args.image_size % (4 * args.stem_stride):
        p.error(f"--image-size must be divisible by {4 * args.stem_stride} (stem stride {args.stem_stride}, then two "
                f"2x downsamplings), got {args.image_size}")
    return args


# ------------------------------------------------------------------------------------------------ building blocks

class MultiHeadSelfAttention2d(nn.Module):
    """Global multi-head self-attention over all pixels of a (B, C, H, W) map (Cordonnier et al. sec. 2).

    Score of query pixel q and key pixel k in head h, with delta = k - q (rows, cols):
        content    q_q . k_k / sqrt(d)                            (always; zero it by zeroing the weights)
        quadratic  v_h . r_delta, r_delta = (|delta|^2, dy, dx)   (Cordonnier sec. 3, Lemma 1: fixed r, learned v_h)
        learned    q_q . r_delta / sqrt(d), r_delta = [r_row[dy]; r_col[dx]]   (SASA-style learned embedding)
    `key_padding` P: keys come from the input zero-padded by P pixels on each side, as a conv with padding P sees
    it. Padded keys are zero-valued pixels that still take part in the softmax (needed by attention_from_conv).
    """

    def __init__(self, dim, *, num_heads, head_dim=None, out_dim=None, positional=None, max_size=32,
                 key_padding=0, qkv_bias=True, proj_bias=True):
        super().__init__()
        assert positional in (None, "quadratic", "learned"), f"positional must be None, 'quadratic' or 'learned', got {positional!r}"
        assert head_dim is not None or dim % num_heads == 0, f"dim {dim} is not divisible by num_heads {num_heads}; pass head_dim"
        self.num_heads, self.head_dim = num_heads, head_dim or dim // num_heads
        self.positional, self.max_size, self.key_padding = positional, max_size, key_padding
        inner = self.num_heads * self.head_dim
        self.query = nn.Linear(dim, inner, bias=qkv_bias)
        self.key = nn.Linear(dim, inner, bias=qkv_bias)
        self.value = nn.Linear(dim, inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, out_dim or dim, bias=proj_bias)  # W_out: concatenated heads -> C_out
        if positional == "quadratic":
            self.pos_v = nn.Parameter(torch.randn(num_heads, 3) * 0.1)  # v_h, one 3-vector per head
        elif positional == "learned":
            assert self.head_dim % 2 == 0, f"learned relative embeddings split d into rows/cols: head_dim {self.head_dim} must be even"
            # offsets -(max_size-1) .. max_size-1 along each axis; row table for dy, column table for dx
            self.rel_row = nn.Parameter(torch.randn(2 * max_size - 1, self.head_dim // 2) * self.head_dim ** -0.5)
            self.rel_col = nn.Parameter(torch.randn(2 * max_size - 1, self.head_dim // 2) * self.head_dim ** -0.5)

    @staticmethod
    def relative_offsets(H, W, key_padding=0, device=None):
        """(dy, dx), each (N, M) int64: key position minus query position, keys on the grid padded by P."""
        P = key_padding
        qy, qx = torch.meshgrid(torch.arange(H, device=device), torch.arange(W, device=device), indexing="ij")
        ky, kx = torch.meshgrid(torch.arange(-P, H + P, device=device), torch.arange(-P, W + P, device=device), indexing="ij")
        return ky.flatten()[None] - qy.flatten()[:, None], kx.flatten()[None] - qx.flatten()[:, None]

    def forward(self, x, return_attn=False):
        B, C, H, W = x.shape
        h, d, P = self.num_heads, self.head_dim, self.key_padding
        xk = F.pad(x, (P, P, P, P))                              # (B, C, H+2P, W+2P): zero pixels beyond the border
        M = xk.shape[2] * xk.shape[3]
        q_in = x.flatten(2).transpose(1, 2)                      # (B, N, C)
        k_in = xk.flatten(2).transpose(1, 2)                     # (B, M, C)
        q = self.query(q_in).view(B, -1, h, d).transpose(1, 2)   # (B, h, N, d)
        k = self.key(k_in).view(B, M, h, d).transpose(1, 2)      # (B, h, M, d)
        v = self.value(k_in).view(B, M, h, d).transpose(1, 2)    # (B, h, M, d)
        logits = q @ k.transpose(-1, -2) / math.sqrt(d)          # (B, h, N, M) content term
        if self.positional is not None:
            dy, dx = self.relative_offsets(H, W, P, x.device)    # (N, M) each
        if self.positional == "quadratic":
            r = torch.stack([dy * dy + dx * dx, dy, dx], -1).to(x.dtype)  # (N, M, 3) = r_delta (Lemma 1)
            logits = logits + torch.einsum("nmc,hc->hnm", r, self.pos_v)  # (h, N, M), same for every image
        elif self.positional == "learned":
            S = self.max_size
            assert max(H, W) + P <= S, f"image {H}x{W} (+ key padding {P}) exceeds max_size {S}: build with a larger max_size"
            qr_row = q[..., : d // 2] @ self.rel_row.T             # (B, h, N, 2S-1): q . r_row for every dy
            qr_col = q[..., d // 2:] @ self.rel_col.T              # (B, h, N, 2S-1)
            idx_row = (dy + S - 1).expand(B, h, -1, -1)            # (B, h, N, M) table index of each pair's dy
            idx_col = (dx + S - 1).expand(B, h, -1, -1)
            logits = logits + (qr_row.gather(-1, idx_row) + qr_col.gather(-1, idx_col)) / math.sqrt(d)
        attn = logits.softmax(-1)                                  # (B, h, N, M)
        out = (attn @ v).transpose(1, 2).reshape(B, H * W, h * d)  # (B, N, h*d): heads concatenated
        out = self.proj(out).transpose(1, 2).reshape(B, -1, H, W)  # (B, C_out, H, W)
        return (out, attn) if return_attn else out


class LocalSelfAttention2d(nn.Module):
    """Stand-alone self-attention (SASA, Ramachandran et al. 2019, eq. 2-3): each pixel attends to the k x k
    window around it, score q . (k_key + r_delta) / sqrt(d) with r_delta = [r_row[dy]; r_col[dx]] (eq. 3: the
    embedding is split in half, one half per axis). Cost O(N L d) instead of O(N^2 d).

    Borders: F.unfold zero-pads, which would add keys that do not exist (k = 0, v = 0) and whose score
    q . r_delta still takes softmax mass, so border pixels would attend to "nothing". We mask those slots out
    (score -inf): every pixel's attention is a distribution over real pixels, and a window covering the whole
    image gives exactly global attention (tested)."""

    def __init__(self, dim, *, num_heads, window=7, head_dim=None, out_dim=None, qkv_bias=True):
        super().__init__()
        assert window % 2 == 1, f"window must be odd so it is centred on its pixel, got {window}"
        assert head_dim is not None or dim % num_heads == 0, f"dim {dim} is not divisible by num_heads {num_heads}; pass head_dim"
        self.num_heads, self.head_dim, self.window = num_heads, head_dim or dim // num_heads, window
        assert self.head_dim % 2 == 0, f"relative embeddings split d into rows/cols: head_dim {self.head_dim} must be even"
        inner = self.num_heads * self.head_dim
        self.qkv = nn.Conv2d(dim, 3 * inner, 1, bias=qkv_bias)   # 1x1 convs = per-pixel linear maps
        self.rel_row = nn.Parameter(torch.randn(window, self.head_dim // 2) * self.head_dim ** -0.5)  # dy = -k//2 .. k//2
        self.rel_col = nn.Parameter(torch.randn(window, self.head_dim // 2) * self.head_dim ** -0.5)
        self.proj = nn.Conv2d(inner, out_dim or dim, 1)

    def forward(self, x, return_attn=False):
        B, C, H, W = x.shape
        h, d, k, p = self.num_heads, self.head_dim, self.window, self.window // 2
        L = k * k
        q, key, v = self.qkv(x).view(B, 3, h, d, H, W).unbind(1)                  # (B, h, d, H, W) each
        # Tensor.unfold gives every pixel's k x k window of the zero-padded map as a strided view: window slot
        # (a, b) of pixel (y, x) is padded pixel (y + a, x + b), i.e. offset dy = a - p, dx = b - p.
        key = F.pad(key, (p, p, p, p)).unfold(3, k, 1).unfold(4, k, 1)            # (B, h, d, H, W, k, k)
        v = F.pad(v, (p, p, p, p)).unfold(3, k, 1).unfold(4, k, 1)                # (B, h, d, H, W, k, k)
        key = key.permute(0, 1, 3, 4, 2, 5, 6).reshape(B, h, H, W, d, L)          # (B, h, H, W, d, L)
        v = v.permute(0, 1, 3, 4, 5, 6, 2).reshape(B, h, H, W, L, d)              # (B, h, H, W, L, d)
        q = q.permute(0, 1, 3, 4, 2).unsqueeze(-2)                                # (B, h, H, W, 1, d)
        r = torch.cat([self.rel_row[:, None].expand(k, k, d // 2),                # r_delta = [r_row[dy]; r_col[dx]]
                       self.rel_col[None].expand(k, k, d // 2)], -1).reshape(L, d)  # (L, d), slot order a*k + b
        logits = ((q @ key) + (q @ r.T)).squeeze(-2) / math.sqrt(d)               # (B, h, H, W, L): q . (k + r)
        inside = F.pad(torch.ones(H, W, device=x.device), (p, p, p, p)).unfold(0, k, 1).unfold(1, k, 1)  # (H, W, k, k)
        logits = logits.masked_fill(inside.reshape(H, W, L) == 0, float("-inf"))  # slots outside the image: no key
        attn = logits.softmax(-1)                                                 # over the L window slots
        out = (attn.unsqueeze(-2) @ v).squeeze(-2)                                # (B, h, H, W, d)
        out = self.proj(out.permute(0, 1, 4, 2, 3).reshape(B, h * d, H, W))       # (B, C_out, H, W)
        return (out, attn.reshape(B, h, H * W, L)) if return_attn else out       # attn: (B, h, N, L)


class AxialAttention1d(nn.Module):
    """Multi-head attention along one axis of a (B, C, H, W) map: axis="width" lets every pixel attend to its whole
    row, axis="height" to its whole column (Ho et al. 2019). Score q . (k + r_delta) / sqrt(d) with a learned 1-D
    relative embedding r_delta (the query-side term of Axial-DeepLab's position-sensitive attention). Cost O(N T d)
    with T = W or H."""

    def __init__(self, dim, *, num_heads, max_len, axis, head_dim=None, out_dim=None, qkv_bias=True):
        super().__init__()
        assert axis in ("height", "width"), f"axis must be 'height' or 'width', got {axis!r}"
        assert head_dim is not None or dim % num_heads == 0, f"dim {dim} is not divisible by num_heads {num_heads}; pass head_dim"
        self.num_heads, self.head_dim, self.max_len, self.axis = num_heads, head_dim or dim // num_heads, max_len, axis
        inner = self.num_heads * self.head_dim
        self.qkv = nn.Conv2d(dim, 3 * inner, 1, bias=qkv_bias)
        self.rel = nn.Parameter(torch.randn(2 * max_len - 1, self.head_dim) * self.head_dim ** -0.5)  # r_delta, |delta| < max_len
        self.proj = nn.Conv2d(inner, out_dim or dim, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h, d = self.num_heads, self.head_dim
        q, k, v = self.qkv(x).view(B, 3, h, d, H, W).unbind(1)                     # (B, h, d, H, W) each
        # put the attended axis last: rows -> (B, h, S=H, T=W, d), columns -> (B, h, S=W, T=H, d)
        order = (0, 1, 3, 4, 2) if self.axis == "width" else (0, 1, 4, 3, 2)
        q, k, v = (t.permute(order) for t in (q, k, v))
        T = q.shape[3]
        assert T <= self.max_len, f"axis length {T} exceeds max_len {self.max_len}: build with a larger max_len"
        pos = torch.arange(T, device=x.device)
        r = self.rel[pos[None, :] - pos[:, None] + self.max_len - 1]               # (T, T, d): r of key - query
        logits = (q @ k.transpose(-1, -2) + torch.einsum("bhstd,tud->bhstu", q, r)) / math.sqrt(d)  # (B, h, S, T, T)
        out = logits.softmax(-1) @ v                                               # (B, h, S, T, d)
        back = (0, 1, 4, 2, 3) if self.axis == "width" else (0, 1, 4, 3, 2)         # inverse permutation of `order`
        out = out.permute(back).reshape(B, h * d, H, W)                            # (B, h*d, H, W)
        return self.proj(out)


class AxialAttention2d(nn.Module):
    """Row attention then column attention: after the two passes every output pixel depends on every input pixel
    (through the row of the key's column), a global receptive field at O(N (H + W) d) instead of O(N^2 d)."""

    def __init__(self, dim, *, num_heads, max_size, head_dim=None, out_dim=None):
        super().__init__()
        self.rows = AxialAttention1d(dim, num_heads=num_heads, max_len=max_size, axis="width", head_dim=head_dim)
        self.cols = AxialAttention1d(dim, num_heads=num_heads, max_len=max_size, axis="height", head_dim=head_dim,
                                     out_dim=out_dim)

    def forward(self, x):
        return self.cols(self.rows(x))


def attention_from_conv(conv, alpha=20.0):
    """Theorem 1 of Cordonnier et al., constructively: an MHSA layer that computes `conv` (odd K, stride 1,
    padding K//2, zero padding, any C_in/C_out, bias or not) on any H x W input.

    Construction (sec. 3, proof of Thm 1): K^2 heads, head h <-> kernel tap (i, j) with shift Delta_h = (i - K//2,
    j - K//2). Content attention is switched off (W_query = W_key = 0). The quadratic encoding with
    v_h = -alpha (1, -2 Delta_h) gives score -alpha (|delta - Delta_h|^2 - |Delta_h|^2): a peak at delta = Delta_h.
    Values are the raw pixels (W_value = identity per head, d = C_in) and the output projection of head h is the
    kernel slice W[:, :, i, j], so sum_h W[:, :, Delta_h] x[q + Delta_h] is exactly the cross-correlation.

    Zero padding: the conv reads x[q + Delta] = 0 when q + Delta falls outside the image. So the keys live on the
    zero-padded grid (H + 2P) x (W + 2P), P = K//2: a border query still attends to its shift Delta, lands on a
    zero pixel and gets value 0, as the conv does. With keys only inside the image, the softmax would instead move
    that head's mass onto the nearest real pixels (tested: wrong at the border, right in the interior).

    Why alpha must be large: softmax never gives an exact one-hot. Head h puts 1 / (1 + S) on Delta_h and leaks
    S / (1 + S) onto other keys, S = sum_{delta != 0} exp(-alpha |delta|^2) ~ 4 exp(-alpha) (4 nearest neighbours).
    The output error is at most 2 S/(1+S) max|x| sum_{c,i,j} |W[o, c, i, j]| (bound checked in the tests):
    alpha = 5 leaks 3e-2, alpha = 10 leaks 2e-4, alpha = 20 leaks 8e-9 -- below float32 resolution (6e-8), so
    1 / (1 + S) rounds to exactly 1 and the result matches the conv to float32 rounding (< 1e-6 in the tests).
    A large alpha is harmless numerically: softmax subtracts the largest score (no overflow), and the scores' own
    rounding only perturbs leaks that are already ~1e-9. The theorem itself is the limit alpha -> infinity.
    """
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"attention_from_conv expects an nn.Conv2d, got {type(conv).__name__}")
    K, K2 = conv.kernel_size
    if K != K2 or K % 2 == 0:
        raise ValueError(f"attention_from_conv needs a square kernel of odd size (one centre pixel per query), got "
                         f"{conv.kernel_size}; use K = 1, 3, 5, ...")
    P = K // 2
    if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1:
        raise ValueError(f"attention_from_conv needs stride 1, dilation 1, groups 1; got stride {conv.stride}, "
                         f"dilation {conv.dilation}, groups {conv.groups}")
    if conv.padding not in ((P, P), "same") or conv.padding_mode != "zeros":
        raise ValueError(f"attention_from_conv needs zero padding K//2 = {P} ('same' size output); got padding "
                         f"{conv.padding} with padding_mode {conv.padding_mode!r}")
    C_out, C_in = conv.out_channels, conv.in_channels
    attn = MultiHeadSelfAttention2d(C_in, num_heads=K * K, head_dim=C_in, out_dim=C_out, positional="quadratic",
                                    key_padding=P, qkv_bias=False, proj_bias=conv.bias is not None)
    W = conv.weight.detach()                                             # (C_out, C_in, K, K)
    with torch.no_grad():
        attn.query.weight.zero_()                                        # no content attention
        attn.key.weight.zero_()
        attn.value.weight.copy_(torch.eye(C_in).repeat(K * K, 1))        # (K^2 C_in, C_in): every head sees x itself
        attn.proj.weight.copy_(W.permute(0, 2, 3, 1).reshape(C_out, K * K * C_in))  # column (i*K + j)*C_in + c
        taps = torch.arange(K) - P
        dy, dx = torch.meshgrid(taps, taps, indexing="ij")              # Delta_h for h = i*K + j
        v = torch.stack([torch.ones(K * K), -2.0 * dy.flatten(), -2.0 * dx.flatten()], 1)
        attn.pos_v.copy_(-alpha * v)                                     # v_h = -alpha (1, -2 Delta_1, -2 Delta_2)
        if conv.bias is not None:
            attn.proj.bias.copy_(conv.bias.detach())
    return attn.to(conv.weight.device)


def nonlocality(attn_probs, H, W, *, key_padding=0):
    """ConViT eq. 6: D_loc = 1/N sum_q sum_k A_qk |delta_qk|, the attention-weighted mean distance (in pixels)
    between a query and its keys. attn_probs: (..., N, M), keys on the H x W grid padded by key_padding.
    Returns (...): one number per head / image. A conv-like head has D = |Delta|, uniform attention ~ H/2."""
    dy, dx = MultiHeadSelfAttention2d.relative_offsets(H, W, key_padding, attn_probs.device)  # (N, M)
    assert attn_probs.shape[-2:] == dy.shape, f"attn_probs ends in {tuple(attn_probs.shape[-2:])}, expected (N, M) = {tuple(dy.shape)}"
    dist = (dy * dy + dx * dx).to(attn_probs.dtype).sqrt()
    return (attn_probs * dist).sum(-1).mean(-1)


# ------------------------------------------------------------------------------------------------ model

def spatial_op(kind, dim, *, head_dim, window, size):
    """The one layer that differs between the compared models: a 3x3 conv, SASA window attention or axial attention."""
    if kind == "conv":
        return nn.Conv2d(dim, dim, 3, padding=1, bias=False)
    if kind == "local":
        return LocalSelfAttention2d(dim, num_heads=dim // head_dim, window=window)
    if kind == "axial":
        return AxialAttention2d(dim, num_heads=dim // head_dim, max_size=size)
    raise ValueError(f"unknown spatial operator {kind!r}; use conv, local or axial")


class Block(nn.Module):
    """ResNet basic block with both 3x3 convs replaced by `op` (as SASA does in its ResNets)."""

    def __init__(self, dim, *, op, head_dim, window, size):
        super().__init__()
        self.op1, self.bn1 = spatial_op(op, dim, head_dim=head_dim, window=window, size=size), nn.BatchNorm2d(dim)
        self.op2, self.bn2 = spatial_op(op, dim, head_dim=head_dim, window=window, size=size), nn.BatchNorm2d(dim)

    def forward(self, x):
        out = F.relu(self.bn1(self.op1(x)))
        return F.relu(x + self.bn2(self.op2(out)))


class Net(nn.Module):
    """Conv stem (stride s) -> 3 stages (one Block each, resolution S/s, S/2s, S/4s) -> global pool -> linear. Downsampling
    (2x2 average pool + 1x1 conv) is the same for every model, so only the stages' spatial operator differs."""

    def __init__(self, *, ops, widths=(16, 32, 64), head_dim=8, window=5, image_size=32, stem_stride=1, num_classes=10):
        super().__init__()
        assert len(ops) == len(widths) == 3, f"need 3 stage operators and 3 widths, got {ops} and {widths}"
        assert image_size % (4 * stem_stride) == 0, \
            f"image_size {image_size} must be divisible by 4 * stem_stride = {4 * stem_stride} (stem + two downsamplings)"
        self.ops = tuple(ops)
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, stride=stem_stride, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, prev, size = [], widths[0], image_size // stem_stride
        for i, (op, w) in enumerate(zip(ops, widths)):
            down = nn.Identity()
            if i > 0:
                size //= 2
                down = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(prev, w, 1, bias=False), nn.BatchNorm2d(w))
            stages.append(nn.Sequential(down, Block(w, op=op, head_dim=head_dim, window=window, size=size)))
            prev = w
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(prev, num_classes)

    def forward(self, x):
        x = self.stages(self.stem(x))         # (B, C, S/4, S/4)
        return self.head(x.mean((2, 3)))      # (B, classes)


def full_preset_models(num_classes=10):
    """Every model the full preset trains, at its real size: name -> (model, step_fn or None, image_size).
    tests/test_utils.py runs one bf16-autocast training step of each on a CPU, so a full GPU run is known to start."""
    a = get_args([])
    return {name: (Net(ops=ops, widths=a.widths, head_dim=a.head_dim, window=a.window, image_size=a.image_size,
                       stem_stride=a.stem_stride, num_classes=num_classes), None, a.image_size)
            for name, ops in MODELS.items()}


# ------------------------------------------------------------------------------------------------ experiment

def run_model(name, args, data, device, seed):
    """Train one model from scratch on the training subset; returns (model, test accuracy %, history)."""
    utils.set_seed(seed)
    model = Net(ops=MODELS[name], widths=args.widths, head_dim=args.head_dim, window=args.window,
                image_size=args.image_size, stem_stride=args.stem_stride, num_classes=data.num_classes).to(device)
    train_loader = utils.DeviceLoader(data.x_train, data.y_train, batch_size=min(args.batch_size, len(data.x_train)),
                                      device=device, train=True, mean=data.mean, std=data.std, seed=seed)
    test_loader = utils.DeviceLoader(data.x_test, data.y_test, batch_size=256, device=device, train=False,
                                     mean=data.mean, std=data.std)
    # no per-epoch test evaluation (it would cost as much as training on CPU): the test set is scored once, at the end
    hist = utils.train(model, train_loader, epochs=args.epochs, lr=args.lr, weight_decay=0.05, warmup_epochs=1,
                       label_smoothing=0.1, grad_clip=1.0, name=f"{name} seed {seed} ")
    acc = utils.evaluate(model, test_loader).acc
    print(f"{name} seed {seed}: test accuracy {acc:.1f}%", flush=True)
    return model, acc, hist


@torch.no_grad()
def conv_equivalence_check(model, x, alpha):
    """Theorem 1 on real data: rebuild the trained stage-1 conv as attention and apply both to the real features
    that conv sees. Returns max |attention - conv|, the attention probabilities (B, K^2, N, M) and the feature size."""
    conv = model.stages[0][1].op1
    feats = model.stem(x)                                                      # (B, C, H, W) what op1 sees
    out, probs = attention_from_conv(conv, alpha)(feats, return_attn=True)    # probs (B, K^2, N, M)
    return (out - conv(feats)).abs().max().item(), probs, tuple(feats.shape[2:])


@torch.no_grad()
def local_attention_maps(model, x, ops):
    """Attention probabilities of the first SASA layer of the first (highest-resolution) local stage,
    (B, h, N, L), with its feature size (H, W) and the stage index."""
    stage = min(i for i, op in enumerate(ops) if op == "local")
    feats = model.stem(x)
    for i in range(stage):
        feats = model.stages[i](feats)
    feats = model.stages[stage][0](feats)                                     # (B, C, H, W) the block's input
    _, attn = model.stages[stage][1].op1(feats, return_attn=True)
    return attn, tuple(feats.shape[2:]), stage


def window_to_dense(attn, H, W, window):
    """SASA attention (..., N, L) over each pixel's window -> (..., N, M) over the key grid padded by window//2,
    so that `nonlocality` (which takes dense attention) can measure it. Slot (a, b) of query (y, x) is padded
    key (y + a, x + b)."""
    k = window
    Wp = W + k - 1
    y, x = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")       # (H, W) query coordinates
    a, b = torch.meshgrid(torch.arange(k), torch.arange(k), indexing="ij")       # (k, k) window slots
    idx = (y.reshape(-1, 1) + a.reshape(1, -1)) * Wp + (x.reshape(-1, 1) + b.reshape(1, -1))  # (N, L)
    dense = attn.new_zeros(*attn.shape[:-1], (H + k - 1) * Wp)                   # (..., N, M)
    return dense.scatter_(-1, idx.to(attn.device).expand_as(attn), attn)


def plot_attention(path, image, local_attn, local_hw, window, conv_probs, conv_hw, K, title, crop=3):
    """Top: the input with the centre query pixel, then each head of a trained SASA layer for that query (its
    k x k window placed on the feature grid). Bottom: the K^2 heads of attention_from_conv for the centre query of
    the stage-1 grid, cropped to +-crop pixels around it (each is a one-hot on its kernel shift)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    heads, cols = local_attn.shape[0], max(local_attn.shape[0], K * K) + 1
    fig, axes = plt.subplots(2, cols, figsize=(1.5 * cols, 3.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    (H, W), p = local_hw, window // 2
    qy, qx = H // 2, W // 2
    axes[0, 0].imshow(image)
    s = image.shape[0] / H                                           # image pixels per feature pixel
    axes[0, 0].add_patch(plt.Rectangle((qx * s - 0.5, qy * s - 0.5), s, s, fill=False, color="red"))
    axes[0, 0].set_title("query (red)", fontsize=7)
    for hd in range(heads):                                          # local_attn: (heads, L) -> (H, W) grid
        grid = torch.zeros(H + 2 * p, W + 2 * p)
        grid[qy:qy + window, qx:qx + window] = local_attn[hd].view(window, window)
        axes[0, hd + 1].imshow(grid[p:p + H, p:p + W].numpy(), cmap="viridis", vmin=0)
        axes[0, hd + 1].scatter([qx], [qy], c="red", s=8, marker="x")
        axes[0, hd + 1].set_title(f"{title}\nhead {hd}", fontsize=6)
    (Hc, Wc), P = conv_hw, K // 2
    cy, cx = Hc // 2 + P, Wc // 2 + P                                # centre query on the padded key grid
    axes[1, 0].text(0.0, 0.5, f"attention_from_conv:\n{K}x{K} conv = {K * K} heads,\nhead = one kernel shift", fontsize=7)
    for hd in range(K * K):                                          # conv_probs: (K^2, M), padded key grid
        grid = conv_probs[hd].view(Hc + 2 * P, Wc + 2 * P)[cy - crop:cy + crop + 1, cx - crop:cx + crop + 1]
        axes[1, hd + 1].imshow(grid.numpy(), cmap="viridis", vmin=0, vmax=1)
        axes[1, hd + 1].scatter([crop], [crop], c="red", s=8, marker="x")
        axes[1, hd + 1].set_title(f"head {hd}\nshift ({hd // K - P},{hd % K - P})", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bench(args, device, *, dim=64, batch_size=16):
    """Cost of ONE layer of each kind on a (B, 64, S, S) map: params, FLOPs (FlopCounterMode: matmuls/convs only),
    train-step img/s and activation memory. Global attention grows as N^2, local as N L, axial as N (H + W)."""
    rows = []
    for size in (8, 16, 32):
        layers = {"conv 3x3": nn.Conv2d(dim, dim, 3, padding=1),
                  f"local {args.window}x{args.window}": LocalSelfAttention2d(dim, num_heads=dim // 8, window=args.window),
                  "axial": AxialAttention2d(dim, num_heads=dim // 8, max_size=size),
                  "global": MultiHeadSelfAttention2d(dim, num_heads=dim // 8, positional="learned", max_size=size)}
        for name, layer in layers.items():
            layer = layer.to(device)
            flops = utils.count_flops(layer, (dim, size, size), device)
            ips, mem = utils.measure_step(layer, (dim, size, size), batch_size=batch_size, steps=3, warmup=1,
                                          device=device, forward=lambda m, x: m(x).mean((2, 3)))
            rows.append(dict(size=size, layer=name, params=utils.count_params(layer), mflops=flops / 1e6,
                             img_per_s=ips, memory_mb=mem))
            print(f"{size:>2}x{size:<2} {name:<10} params {rows[-1]['params']:>7,d}  MFLOPs/img {flops / 1e6:8.1f}  "
                  f"train {ips:8.0f} img/s  memory {mem:8.1f} MB (batch {batch_size})", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ main

def main(argv=None):
    args = get_args(argv)
    print(utils.reproduce_command(), flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = utils.get_device(args.device)
    out_dir = args.out or os.path.join("runs", "01_conv_vs_attention")
    os.makedirs(out_dir, exist_ok=True)
    config = {k: v for k, v in vars(args).items()}
    if args.bench:
        rows = bench(args, device)
        utils.save_results(os.path.join(out_dir, "bench.json"), config, {"bench": rows})
        return rows

    data = utils.data_from_args(args)
    print(f"data: {len(data.x_train)} train / {len(data.x_test)} test images, {data.num_classes} classes, "
          f"{args.image_size}x{args.image_size}, device {device}", flush=True)
    results, trained = {}, {}
    for name in args.models:
        accs = []
        for s in range(args.seeds):
            model, acc, hist = run_model(name, args, data, device, args.seed + s)
            accs.append(acc)
        trained[name] = model                                   # the last seed's model, for the figure
        shape = (3, args.image_size, args.image_size)
        ips, mem = utils.measure_step(model, shape, batch_size=args.batch_size,
                                      num_classes=data.num_classes, steps=3, warmup=1, device=device)
        acc_t = torch.tensor(accs)
        results[name] = dict(ops=list(MODELS[name]), params=utils.count_params(model),
                             mflops=utils.count_flops(model, shape, device) / 1e6, train_img_per_s=ips, memory_mb=mem,
                             test_acc_mean=acc_t.mean().item(), test_acc_std=acc_t.std().item() if len(accs) > 1 else 0.0,
                             test_accs=accs, seeds=len(accs), last_history=hist)

    chance = 100.0 / data.num_classes
    header = f"{'model':<10} {'ops (stage 1,2,3)':<20} {'params':>8} {'MFLOPs':>8} {'train img/s':>11} {'mem MB':>7} {'test acc %':>16}"
    lines = [header, "-" * len(header)]
    for name, r in results.items():
        acc = f"{r['test_acc_mean']:.1f} ± {r['test_acc_std']:.1f} (n={r['seeds']})"
        lines.append(f"{name:<10} {','.join(r['ops']):<20} {r['params']:>8,d} {r['mflops']:>8.1f} "
                     f"{r['train_img_per_s']:>11.0f} {r['memory_mb']:>7.1f} {acc:>16}")
    lines.append(f"chance = {chance:.1f}%; {len(data.x_train)} train / {len(data.x_test)} test images, "
                 f"{args.epochs} epochs, image {args.image_size}x{args.image_size}, device {device}")
    print("\n" + "\n".join(lines), flush=True)

    metrics = {"models": results, "table": lines, "chance": chance}
    x, _ = next(iter(utils.DeviceLoader(data.x_test[:16], data.y_test[:16], batch_size=16, device=device, train=False,
                                        mean=data.mean, std=data.std)))  # (16, 3, S, S) normalised test images
    conv_name = next((n for n in trained if MODELS[n][0] == "conv"), None)
    local_name = next((n for n in trained if "local" in MODELS[n]), None)
    if conv_name is not None:
        err, probs, (Hc, Wc) = conv_equivalence_check(trained[conv_name].eval(), x, args.alpha)
        # the whole trained network with that conv swapped for its 9-head attention twin, on the whole test subset
        swapped = copy.deepcopy(trained[conv_name])
        swapped.stages[0][1].op1 = attention_from_conv(swapped.stages[0][1].op1, args.alpha)
        small = utils.DeviceLoader(data.x_test, data.y_test, batch_size=50, device=device, train=False,
                                   mean=data.mean, std=data.std)
        acc_conv, acc_swapped = utils.evaluate(trained[conv_name], small).acc, utils.evaluate(swapped, small).acc
        metrics["conv_equivalence"] = {"model": conv_name, "alpha": args.alpha, "max_abs_err": err,
                                       "test_acc_conv": acc_conv, "test_acc_attention_swapped": acc_swapped,
                                       "head_nonlocality": nonlocality(probs[0], Hc, Wc, key_padding=1).tolist()}
        print(f"Theorem 1 on real data: {conv_name}'s trained stage-1 conv rebuilt by attention_from_conv (alpha "
              f"{args.alpha:g}, 9 heads): max |attention - conv| = {err:.2e} on real test features; test accuracy "
              f"with the attention layer swapped in {acc_swapped:.1f}% (with the conv: {acc_conv:.1f}%); "
              f"head nonlocality (ConViT eq. 6) = "
              f"{[round(v, 2) for v in metrics['conv_equivalence']['head_nonlocality']]}", flush=True)
    if conv_name is not None and local_name is not None:
        local_attn, (Hs, Ws), stage = local_attention_maps(trained[local_name].eval(), x, MODELS[local_name])
        D = nonlocality(window_to_dense(local_attn, Hs, Ws, args.window), Hs, Ws, key_padding=args.window // 2)
        metrics["local_nonlocality"] = {"model": local_name, "stage": stage + 1, "per_head": D.mean(0).tolist()}
        print(f"trained {local_name} stage {stage + 1} SASA heads: nonlocality (ConViT eq. 6: mean query-key distance "
              f"in pixels, 16 test images) = {[round(v, 2) for v in D.mean(0).tolist()]}", flush=True)
        mean, std = torch.tensor(data.mean).view(3, 1, 1), torch.tensor(data.std).view(3, 1, 1)
        image = (x[0].cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()   # (S, S, 3) for imshow
        fig_path = os.path.join(out_dir, "attention_maps.png")
        plot_attention(fig_path, image, local_attn[0, :, (Hs // 2) * Ws + Ws // 2].cpu(), (Hs, Ws), args.window,
                       probs[0, :, (Hc // 2) * Wc + Wc // 2].cpu(), (Hc, Wc), 3, f"{local_name} stage {stage + 1}")
        metrics["figure"] = fig_path
        print(f"figure: {fig_path}", flush=True)
    path = utils.save_results(os.path.join(out_dir, "results.json"), config, metrics)
    print(f"results: {path}", flush=True)
    return metrics


if __name__ == "__main__":
    utils.run_main(main)
