"""On the Relationship between Self-Attention and Convolutional Layers -- Cordonnier, Loukas & Jaggi, ICLR 2020
(arXiv:1911.03584), with the attention layers it is usually compared with: stand-alone local self-attention
(SASA, Ramachandran et al. 2019, arXiv:1906.05909) and axial attention (Ho et al. 2019, arXiv:1912.12180), here in
its position-sensitive form (Axial-DeepLab, Wang et al. 2020, arXiv:2003.07853).

The idea. A multi-head self-attention (MHSA) layer over the pixels of an image, given *relative* positional
attention, can express any K x K convolution: take K^2 heads, make head h attend (almost) only to the pixel at
one shift Delta_h of the kernel, and let the value/output projections of that head carry the kernel slice
W[:, :, Delta_h] (Theorem 1). Cordonnier's quadratic encoding makes the "attend to shift Delta" part exact in
the limit: with r_delta = (|delta|^2, delta_1, delta_2) and v_h = -alpha (1, -2 Delta_1, -2 Delta_2) the score is
v_h . r_delta = -alpha (|delta - Delta|^2 - |Delta|^2), a Gaussian bump around Delta whose softmax tends to a
one-hot as alpha -> infinity. `attention_from_conv` builds that layer from any nn.Conv2d (odd K, stride 1,
padding K//2) and the tests check allclose(attention(x), conv(x), atol=1e-5). The experiments then ask the
practical question: in one small ResNet on real CIFAR-10, what does it cost and gain to use local (SASA) or
axial attention instead of 3x3 convs, does "conv early, attention late" help, and does attention catch up with
convolution as the training set grows?

Experiments (--experiment compare|scaling|swap|all; each prints its table and verdicts and writes
runs/01_conv_vs_attention/<experiment>.json; all runs are independent jobs, --workers of them at a time):
  compare  all-conv vs all-local (SASA) vs all-axial vs hybrid (conv, conv, local: Ramachandran sec. 4.3) on one
           backbone where only the stages' spatial operator differs. Parameter-matched (within 10%; attention
           layers have 3-6 C^2 weights where a 3x3 conv has 9 C^2, so stage 3 is widened, `matched_widths`), paired
           seeds (same images, batches, augmentation and initial value of every shared weight), all 10,000 test
           images, accuracy and NLL with 95% CIs (utils.compare_paired).
  scaling  the gap (attention - conv) at two training-set sizes 10x apart, both trained for the same number of
           optimizer steps (ConViT's protocol: the small set is seen 10x more often), and the change of the gap
           between the sizes, per seed, with its CI. The small subset is part of the large one (same seed).
  swap     Theorem 1 on a trained network: all-conv's first 3x3 conv replaced by its 9-head attention twin.
  --bench  one SASA layer by the unfold reference and by the fast path, side by side, at each stage's size in
           the quick preset; axial attention and a 3x3 conv of the same width for scale.

Run (reads real CIFAR-10 images; `--data cifar10` downloads them, an ImageFolder copy works offline):
    python 01_conv_vs_attention.py --quick --data ../shared/data/cifar10       # 2-core CPU: 525 s
    python 01_conv_vs_attention.py --quick --data ../shared/data/cifar10 --experiment swap
    python 01_conv_vs_attention.py --bench --threads 1                          # SASA unfold vs fast, conv, axial
    python 01_conv_vs_attention.py --data ../shared/data/cifar10               # full preset: one GPU (not measured)

RESULTS of `--quick` (this 2-core AMD EPYC CPU, torch 2.15 float32, --workers 2 x 1 thread, from a clean clone:
525 s wall; every run 312 steps of batch 64, scored on all 10,000 CIFAR-10 test images; mean [95% CI] over paired
seeds; full tables in the README and runs/01_conv_vs_attention/*.json):
    compare, 1000 images/class   widths       params  img/s  n   test acc %            test NLL
    all-conv   conv,conv,conv    16,32,128   325,338   1522  4   48.57 [46.96, 50.19]  1.407 [1.372, 1.442]
    all-local  local x3 (3x3)    16,32,224   323,994    471  4   42.58 [41.64, 43.52]  1.573 [1.560, 1.586]
    all-axial  axial x3          16,32,144   304,122    252  3   41.08 [37.73, 44.43]  1.628 [1.555, 1.701]
    hybrid     conv,conv,local   16,32,224   338,778    923  4   49.25 [46.94, 51.55]  1.399 [1.353, 1.444]
  - vs all-conv (points): all-local -6.0 [-7.3, -4.7], all-axial -7.4 [-13.0, -1.8] (both worse, also in NLL);
    hybrid +0.7 [-0.8, +2.2] (not decided); hybrid - all-local = +6.7 [+4.7, +8.7]: conv early, attention late.
  - scaling (all-local - all-conv, same 312 steps): -7.7 [-9.9, -5.5] at 100 images/class, -6.0 [-7.3, -4.7] at
    1000; change of the gap +1.7 [-1.7, +5.1] points, -0.050 [-0.147, +0.046] nats, n=4: NOT decided at this budget.
  - swap: all-conv's trained first conv and its 9-head attention twin differ by <= 2.4e-7 on real features; the
    swapped network gives the same prediction on all 2,000 test images scored (50.45% = 50.45%).
  - NOT reached: the issue's target of a best quick model >= 60% (best: hybrid 49.3%). all-conv needs ~4x the steps
    for that (62.4% on a validation split after 8 epochs of 10,000 images, widths 16,32,64), and at that length
    three all-axial runs alone would take ~16 minutes of one core. The budget went to four paired models instead.
  - axial before -> after (the layer of commit 06f7b51 patched into the very same runs, paired seeds): on a
    digits-like set (8x8 grey rendered digits, runs/01_conv_vs_attention/make_digits_like.py, 3,000 train / 1,000
    test, 460 steps, n=3) 87.0 -> 99.0%, +12.0 [+2.9, +21.1] points, NLL -0.334 [-0.458, -0.210] (all-conv 100.0%);
    on CIFAR-10 (the compare setting, n=3) 34.6 -> 41.1%, +6.4 [-0.7, +13.5] points, NLL -0.121 [-0.271, +0.028]:
    every seed gains (+3.3 to +8.8) but 3 pairs do not decide.
  - bench (`--bench --threads 1`, one layer, fwd+bwd, batch 64, at the quick all-local model's three stage sizes):
    SASA fast path vs the unfold reference 4.4x / 3.9x / 4.5x faster at k=3 (4.3x for the three stages together),
    3.5x / 8.3x / 7.9x at k=5 (5.3x); fast SASA / 3x3 conv of the same width: 5.9x at 16x16 (k=3), 12.5x (k=5).

The axial fix. Before this version, AxialAttention1d scored q.(k + r)/sqrt(d) with one small learned table r
(std d^-1/2) and no normalisation, i.e. its only positional term was q.r/sqrt(d). That score is the product
of two learned quantities that start small (q from a 1x1 conv, r with std d^-1/2), with nothing to fix its
scale, so whether a layer learns position-dependent attention at all depended on its initialisation. Measured on
the "where is it?" task below (4 seeds, 300 Adam steps, scratch study): the old scoring reached 75.7, 87.1, 72.2
and 26.3% (chance 25%); a table with std 1 (2.8x larger) or no 1/sqrt(d) did not help (77.1/50.7/85.7/26.3 and
95.8/71.6/75.8/26.3); batch-normalising the score terms did (98.5/98.2/100.0/99.9), and the full Axial-DeepLab
layer got 100.0/99.8/99.6/99.9. On real images the trained old layers did learn some positional attention (their
attention is not uniform), but less reliably.
The fix is Axial-DeepLab's position-sensitive layer as its official implementations build it: content q.k,
query-side q.r^q and key-side k.r^k scores, each batch-normalised (so the positional scores have unit spread from
the first step, whatever q and k are), plus a value-side r^v. Tested: a per-pair loop check of every term
(tests/test_01...py::test_axial_matches_a_per_pair_loop; zeroing any one table fails it), and a "where is it?"
task whose label is the direction from a marker to a target, which content attention cannot solve (control:
<= 65%) and the fixed layer solves from every seed tried (> 95%); the old layer reached 50-96% on those seeds.

Deviations from the papers, each with its reason:
  SASA (LocalSelfAttention2d): dense W_Q, W_K, W_V shared by all heads (the paper splits the channels into one
    group per head: C^2/h weights each; dense maps let each head read every channel, as in MHSA); scores scaled by
    1/sqrt(d) (not in eq. 2: keeps the initial spread independent of d, and a full window equals
    MultiHeadSelfAttention2d exactly); one r_row / r_col table per head (the paper's single d_out-wide embedding
    split into heads would give some heads only row and others only column offsets). No output projection, as in
    the paper. The quick preset uses a 3x3 window (the paper's default is 7x7, as in the full preset): the same
    footprint as the conv it replaces, and 3x cheaper on a CPU.
  Axial (AxialAttention1d): q, k and v all have d channels per head (deeplab2 uses a value depth of 2 C inside its
    bottleneck block; our basic block keeps C); PyTorch's default init for the q/k/v 1x1 conv (a batch norm follows
    it). As in the paper: batch norms on the three score terms and the two output terms, no 1/sqrt(d), no output
    projection, height axis then width axis, one table set per head.
  Backbone: a ResNet basic block with both 3x3 convs replaced (SASA's ResNets use bottleneck blocks); in the quick
    preset a conv stem of stride 2 on 32x32 CIFAR images, so the stages run at 16, 8 and 4 pixels (full preset: 32,
    16, 8).
The full preset (one GPU, 50,000 training images at full resolution) was NOT measured: no GPU was available to
this task. `full_preset_models()` is built and stepped once in bf16 by tests/test_utils.py.

Letters used in shape comments: B batch, C channels (C_in, C_out), H x W image/feature size, N = H*W query
pixels, M number of key pixels (M = N, or (H+2P)(W+2P) on a zero-padded key grid with P = K//2), h heads,
d channels per head, K conv kernel side, k local window side (K in code where k is the key tensor), L = k*k window
slots, S sequences and T sequence length in axial attention (axis "height": S = W columns of T = H pixels),
o / p query / key position along an axial line.
"""
import argparse
import copy
import functools
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import utils

# ------------------------------------------------------------------------------------------------ config

PRESETS = {
    # 2-core CPU, <= 10 min with --workers 2 (measured, see RESULTS). Every run: 312 steps of batch 64 (2 epochs of the
    # 10,000-image set, 20 of the 1,000-image one), scored on all 10,000 test images. all-axial trains at ~240 img/s
    # on one core (all-conv ~1,650), so 4 paired seeds (3 for all-axial) of all four models plus the small-data runs
    # of all-conv and all-local fill the budget; see the docstring for what was traded away.
    "quick": dict(train_per_class=1000, scaling_factor=10, test_per_class=None, val_per_class=0, epochs=2,
                  widths=(16, 32, 128), head_dim=16, window=3, stem_stride=2, batch_size=64, lr=3e-3,
                  seeds=4, axial_seeds=3, scaling_models=("all-local",), swap_images=2000, workers=2, threads=1),
    # one GPU, full CIFAR-10 at full resolution, SASA's 7x7 window (not measured here: no GPU was available).
    "full": dict(train_per_class=5000, scaling_factor=10, test_per_class=None, val_per_class=0, epochs=30,
                 widths=(64, 128, 256), head_dim=16, window=7, stem_stride=1, batch_size=128, lr=2e-3,
                 seeds=3, axial_seeds=3, scaling_models=("all-local", "all-axial", "hybrid"), swap_images=10000,
                 workers=1, threads=None),
}
# which spatial operator each of the three stages uses (stage resolution S/s, S/2s, S/4s: image S, stem stride s)
MODELS = {
    "all-conv": ("conv", "conv", "conv"),
    "all-local": ("local", "local", "local"),
    "all-axial": ("axial", "axial", "axial"),
    "hybrid": ("conv", "conv", "local"),  # Ramachandran et al. 2019 sec. 4.3: convs early, attention late
}
EXPERIMENTS = ("compare", "scaling", "swap")


def get_args(argv=None):
    p = utils.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                             epilog="Presets (a flag you pass wins over its preset value):\n" +
                                    "\n".join(f"  {k}: {v}" for k, v in PRESETS.items()))
    utils.add_common_args(p)
    p.add_argument("--quick", action="store_true", help="CPU preset (<= 10 min on 2 cores with --workers 2)")
    p.add_argument("--bench", action="store_true", help="only time single layers: SASA unfold vs fast, conv, axial")
    p.add_argument("--experiment", default="all", choices=EXPERIMENTS + ("all",), help="which experiment to run")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list from {list(MODELS)} (all-conv is always trained: "
                   "every comparison is against it)")
    p.add_argument("--epochs", type=utils.positive_int, default=None,
                   help="epochs at the large training set; every run gets the same number of optimizer steps")
    p.add_argument("--scaling-factor", type=utils.positive_int, default=None,
                   help="the small training set has train-per-class / this many images per class")
    p.add_argument("--scaling-models", default=None, help="attention models trained at the small size too (comma list)")
    p.add_argument("--widths", default=None, help="all-conv's channels in the 3 stages, e.g. 16,32,64; attention stages are "
                   "widened to the same parameter count")
    p.add_argument("--head-dim", type=utils.positive_int, default=None, help="channels per attention head d (heads = width / d)")
    p.add_argument("--window", type=utils.positive_int, default=None, help="local attention window side k (odd)")
    p.add_argument("--stem-stride", type=utils.positive_int, default=None, choices=(1, 2, 4), help="2 halves every stage's resolution")
    p.add_argument("--batch-size", type=utils.positive_int, default=None)
    p.add_argument("--lr", type=utils.positive_float, default=None)
    p.add_argument("--seeds", type=utils.positive_int, default=None, help="paired seeds seed, seed+1, ... for every model")
    p.add_argument("--axial-seeds", type=utils.positive_int, default=None,
                   help="paired seeds for all-axial, the first of --seeds (it costs ~7x all-conv per step on a CPU)")
    p.add_argument("--swap-images", type=utils.positive_int, default=None,
                   help="test images (every n-th, so all classes) scored by the attention twin")
    p.add_argument("--alpha", type=utils.positive_float, default=20.0, help="attention_from_conv sharpness (see its docstring)")
    args = p.parse_args(argv)
    utils.apply_preset(args, PRESETS["quick" if args.quick else "full"])
    if isinstance(args.widths, str):
        args.widths = tuple(int(w) for w in args.widths.split(","))
    if isinstance(args.scaling_models, str):
        args.scaling_models = tuple(m.strip() for m in args.scaling_models.split(",") if m.strip())
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in list(args.models) + list(args.scaling_models) if m not in MODELS]
    if bad:
        p.error(f"unknown --models / --scaling-models {bad}; choose from {list(MODELS)}")
    args.models = ["all-conv"] + [m for m in args.models if m != "all-conv"]
    args.scaling_models = tuple(m for m in args.scaling_models if m in args.models and m != "all-conv")
    if len(args.widths) != 3:
        p.error(f"--widths needs 3 comma-separated numbers (one per stage), got {args.widths}")
    if any(w % args.head_dim for w in args.widths):
        p.error(f"every width in --widths {args.widths} must be a multiple of --head-dim {args.head_dim}")
    if args.window % 2 == 0:
        p.error(f"--window must be odd so the window is centred on its pixel, got {args.window}")
    if args.image_size % (4 * args.stem_stride):
        p.error(f"--image-size must be divisible by {4 * args.stem_stride} (stem stride {args.stem_stride}, then two "
                f"2x downsamplings), got {args.image_size}")
    args.axial_seeds = min(args.axial_seeds, args.seeds)
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


@functools.lru_cache(maxsize=64)
def window_slots(H, W, window, device=None):
    """For every pixel n of an H x W map and every slot l = (dy + p) * k + (dx + p) of its k x k window (p = k//2):
    the key pixel index m = (y + dy) * W + (x + dx), clamped into the image, and whether that key lies inside the
    image. Returns (key_index, inside), each (N, L). Cached: it only depends on the sizes."""
    p = window // 2
    y, x = torch.meshgrid(torch.arange(H, device=device), torch.arange(W, device=device), indexing="ij")        # (H, W)
    dy, dx = torch.meshgrid(torch.arange(-p, p + 1, device=device), torch.arange(-p, p + 1, device=device), indexing="ij")
    ky, kx = y.reshape(-1, 1) + dy.reshape(1, -1), x.reshape(-1, 1) + dx.reshape(1, -1)                        # (N, L)
    inside = (ky >= 0) & (ky < H) & (kx >= 0) & (kx < W)
    return ky.clamp(0, H - 1) * W + kx.clamp(0, W - 1), inside


def local_attention_unfold(q, k, v, r, window):
    """SASA by Tensor.unfold: the REFERENCE the fast versions are tested against (it is the obvious way to write it).
    q (scaled by 1/sqrt d), k, v: (B, h, d, H, W); r: (h, L, d) relative embeddings per window slot.
    Returns out (B, h, d, H, W) and attn (B, h, N, L). Every pixel's window of keys and values is COPIED (L copies of
    the map), and each pixel does its own (1 x d) @ (d x L) matmul: thousands of tiny matmuls, hence slow."""
    B, h, d, H, W = q.shape
    K, p, L = window, window // 2, window * window
    k = F.pad(k, (p, p, p, p)).unfold(3, K, 1).unfold(4, K, 1)                  # (B, h, d, H, W, K, K) strided view
    v = F.pad(v, (p, p, p, p)).unfold(3, K, 1).unfold(4, K, 1)                  # slot (a, b) = padded pixel (y+a, x+b)
    k = k.permute(0, 1, 3, 4, 2, 5, 6).reshape(B, h, H, W, d, L)                # copy: (B, h, H, W, d, L)
    v = v.permute(0, 1, 3, 4, 5, 6, 2).reshape(B, h, H, W, L, d)                # copy: (B, h, H, W, L, d)
    q = q.permute(0, 1, 3, 4, 2).unsqueeze(-2)                                  # (B, h, H, W, 1, d)
    logits = (q @ k + q @ r.transpose(-1, -2)[:, None, None]).squeeze(-2)       # (B, h, H, W, L): q . (k + r)
    _, inside = window_slots(H, W, window, q.device)                            # (N, L)
    logits = logits.masked_fill(~inside.view(H, W, L), float("-inf"))           # slots outside the image: no key
    attn = logits.softmax(-1)
    out = (attn.unsqueeze(-2) @ v).squeeze(-2)                                  # (B, h, H, W, d)
    return out.permute(0, 1, 4, 2, 3), attn.reshape(B, h, H * W, L)


def local_attention_shifted(q, k, v, r, window):
    """SASA by shifted slices: for each of the L = k*k window slots (dy, dx), the keys of every pixel at that offset
    are ONE slice of the zero-padded key map, kp[..., p+dy : p+dy+H, p+dx : p+dx+W] -- a view, no copy. So the scores
    are L elementwise products summed over d, and the output L multiply-adds of value slices: 2L large vectorised
    ops instead of N tiny matmuls, and O(N d) memory instead of O(N L d). Same inputs/outputs as the reference,
    except attn comes back as (B, h, L, H, W)."""
    B, h, d, H, W = q.shape
    K, p, L = window, window // 2, window * window
    kp, vp = F.pad(k, (p, p, p, p)), F.pad(v, (p, p, p, p))                     # (B, h, d, H+2p, W+2p)
    slots = [(a, b) for a in range(K) for b in range(K)]                        # slot l = a*K + b: (dy, dx) = (a-p, b-p)
    content = torch.stack([(q * kp[..., a:a + H, b:b + W]).sum(2) for a, b in slots], 2)  # (B, h, L, H, W): q . k
    logits = content + torch.einsum("bhdyx,hld->bhlyx", q, r)                   # + q . r_delta
    _, inside = window_slots(H, W, window, q.device)                            # (N, L)
    attn = logits.masked_fill(~inside.T.reshape(L, H, W), float("-inf")).softmax(2)
    out = sum(attn[:, :, l, None] * vp[..., a:a + H, b:b + W] for l, (a, b) in enumerate(slots))  # (B, h, d, H, W)
    return out, attn


@functools.lru_cache(maxsize=64)
def window_pairs(H, W, window, device=None):
    """For every (query, key) pixel pair of an H x W map: whether the key lies in the query's k x k window, and its
    window slot l = (dy + p) * k + (dx + p) (clamped to a valid slot outside the window). Each (N, N); cached."""
    p = window // 2
    dy, dx = MultiHeadSelfAttention2d.relative_offsets(H, W, 0, device)         # (N, N): key - query
    return (dy.abs() <= p) & (dx.abs() <= p), ((dy + p) * window + dx + p).clamp(0, window * window - 1)


def local_attention_dense(q, k, v, r, window):
    """SASA as masked global attention: all N x N scores by one matmul, pairs outside the k x k window set to -inf.
    N^2 d work instead of N L d, but in a few large matmuls: on a CPU this beats 2L small ops while N <= ~4L (an 8x8
    map for k = 5). Returns out (B, h, d, H, W) and the dense attention (B, h, N, N)."""
    B, h, d, H, W = q.shape
    N = H * W
    q, k, v = q.flatten(3), k.flatten(3), v.flatten(3)                          # (B, h, d, N)
    in_window, slot = window_pairs(H, W, window, q.device)                      # (N, N) each
    qr = torch.einsum("bhdn,hld->bhnl", q, r)                                   # (B, h, N, L): q . r for every slot
    logits = q.transpose(-1, -2) @ k + qr.gather(-1, slot.expand(B, h, N, N))   # (B, h, N, N): q . (k + r)
    attn = logits.masked_fill(~in_window, float("-inf")).softmax(-1)
    out = (attn @ v.transpose(-1, -2)).transpose(-1, -2)                        # (B, h, d, N)
    return out.reshape(B, h, d, H, W), attn


class LocalSelfAttention2d(nn.Module):
    """Stand-alone self-attention, SASA (Ramachandran et al. 2019, sec. 3, eq. 2-3). Pixel (i, j) attends to the
    k x k window N_k(i, j) around it:

        y_ij = sum_{(a,b) in N_k(i,j)} softmax_ab( q_ij . (k_ab + r_{a-i, b-j}) / sqrt(d) ) v_ab

    q = W_Q x, k = W_K x, v = W_V x (one 1x1 conv), per head h of d channels; r_{dy,dx} = [r_row[dy]; r_col[dx]]:
    half of the head's d channels encode the row offset, half the column offset (eq. 3). Heads are concatenated;
    there is no output projection (the paper has none; the next layer mixes the heads). Window slots outside the
    image are not keys (score -inf), so attention is a distribution over real pixels and a window covering the
    whole image is exactly global attention (tested).

    Deviations from the paper, each for a reason:
      - W_Q, W_K, W_V are dense C -> C maps shared by all heads; the paper splits the input channels into groups,
        one per head (block-diagonal maps, C^2/h weights each). Dense maps let heads read every channel, as in
        MHSA and in the other scripts; the parameter-matched comparison widens attention stages either way.
      - scores are scaled by 1/sqrt(d) (Vaswani et al.), which eq. 2 does not have: it keeps the initial scores'
        spread independent of d and makes a full window equal MultiHeadSelfAttention2d (tested).
      - one r_row / r_col table per head (the paper's single d_out-wide embedding, split into heads, leaves some heads
        with only row and others with only column offsets).

    `impl` chooses how the same function is computed (all three tested equal): "unfold" (the reference, slow),
    "shifted" (shifted slices, for large maps), "dense" (masked N x N matmul, for small maps); "auto" picks dense when
    N <= 4 L. `--bench` times them side by side."""

    def __init__(self, dim, *, num_heads, window=7, head_dim=None, qkv_bias=True):
        super().__init__()
        assert window % 2 == 1, f"window must be odd so it is centred on its pixel, got {window}"
        assert head_dim is not None or dim % num_heads == 0, f"dim {dim} is not divisible by num_heads {num_heads}; pass head_dim"
        self.num_heads, self.head_dim, self.window = num_heads, head_dim or dim // num_heads, window
        h, d = self.num_heads, self.head_dim
        assert d % 2 == 0, f"relative embeddings split d into rows/cols: head_dim {d} must be even"
        self.qkv = nn.Conv2d(dim, 3 * h * d, 1, bias=qkv_bias)                  # W_Q, W_K, W_V: 1x1 convs
        self.rel_row = nn.Parameter(torch.randn(h, window, d // 2) * d ** -0.5)  # r_row[head, dy + k//2]
        self.rel_col = nn.Parameter(torch.randn(h, window, d // 2) * d ** -0.5)  # r_col[head, dx + k//2]

    def relative_embeddings(self):
        """(h, L, d): r_delta = [r_row[dy]; r_col[dx]] for window slot l = (dy + k//2) * k + (dx + k//2)."""
        h, K, d2 = self.rel_row.shape
        return torch.cat([self.rel_row[:, :, None].expand(h, K, K, d2),
                          self.rel_col[:, None].expand(h, K, K, d2)], -1).reshape(h, K * K, 2 * d2)

    def forward(self, x, return_attn=False, impl="auto"):
        B, C, H, W = x.shape
        h, d, K = self.num_heads, self.head_dim, self.window
        q, k, v = self.qkv(x).view(B, 3, h, d, H, W).unbind(1)                  # (B, h, d, H, W) each
        q, r = q / math.sqrt(d), self.relative_embeddings()                     # r: (h, L, d)
        if impl == "auto":
            impl = "dense" if H * W <= 4 * K * K else "shifted"
        if impl == "unfold":
            out, attn = local_attention_unfold(q, k, v, r, K)                   # attn (B, h, N, L)
        elif impl == "shifted":
            out, attn = local_attention_shifted(q, k, v, r, K)                  # attn (B, h, L, H, W)
            attn = attn.flatten(3).transpose(2, 3)                              # (B, h, N, L)
        elif impl == "dense":
            out, attn = local_attention_dense(q, k, v, r, K)                    # attn (B, h, N, N)
            if return_attn:
                key, inside = window_slots(H, W, K, x.device)                   # (N, L): the window's keys
                attn = attn.gather(-1, key.expand(B, h, -1, -1)).masked_fill(~inside, 0.0)  # (B, h, N, L)
        else:
            raise ValueError(f"impl must be auto, unfold, shifted or dense, got {impl!r}")
        out = out.reshape(B, h * d, H, W)                                       # heads concatenated
        return (out, attn) if return_attn else out


class AxialAttention1d(nn.Module):
    """Position-sensitive axial attention (Axial-DeepLab, Wang et al. 2020, sec. 3.1 eq. 4 and Fig. 2) along one axis
    of a (B, C, H, W) map: axis="height" lets every pixel attend to its whole column, axis="width" to its whole row.
    For query o and key p on that line, delta = p - o:

        a_op = softmax_p( BN(q_o . k_p) + BN(q_o . r^q_delta) + BN(k_p . r^k_delta) )
        y_o  = BN( sum_p a_op v_p ) + BN( sum_p a_op r^v_delta )

    r^q, r^k, r^v are learned relative embeddings per head. The batch norms (one per term and head on the scores,
    one per term and channel on the outputs) are those of the official implementations: they give each score term
    unit spread, so the positional terms q.r^q and k.r^k count as much as the content term from the first step.
    Without them (this file before the fix: q.(k + r) / sqrt(d), nothing normalised) the positional score is the
    product of two small learned quantities, and whether a layer learns to use position depended on its
    initialisation (see "The axial fix" at the top of the file).

    Deviations from Axial-DeepLab, with reasons: q, k, v all have d channels per head (deeplab2 uses value depth
    2 C inside its bottleneck block; our basic block keeps C in = C out); PyTorch's default init for the 1x1 conv
    (a batch norm follows it, so its scale does not matter)."""

    def __init__(self, dim, *, num_heads, max_len, axis, head_dim=None):
        super().__init__()
        assert axis in ("height", "width"), f"axis must be 'height' or 'width', got {axis!r}"
        assert head_dim is not None or dim % num_heads == 0, f"dim {dim} is not divisible by num_heads {num_heads}; pass head_dim"
        self.num_heads, self.head_dim, self.max_len, self.axis = num_heads, head_dim or dim // num_heads, max_len, axis
        h, d = self.num_heads, self.head_dim
        self.qkv = nn.Conv2d(dim, 3 * h * d, 1, bias=False)                     # W_Q, W_K, W_V
        self.bn_qkv = nn.BatchNorm2d(3 * h * d)
        # r[head, delta + max_len - 1] for |delta| < max_len; std 1 as deeplab2's initialization_std
        self.rel_q, self.rel_k, self.rel_v = (nn.Parameter(torch.randn(h, 2 * max_len - 1, d)) for _ in range(3))
        # one batch norm per score term (a channel per head) and per output term (a channel per head and d)
        self.bn_qk, self.bn_qr, self.bn_kr = nn.BatchNorm1d(h), nn.BatchNorm1d(h), nn.BatchNorm1d(h)
        self.bn_sv, self.bn_sve = nn.BatchNorm1d(h * d), nn.BatchNorm1d(h * d)

    def terms(self, x):
        """The parts of eq. 4 before their batch norms. Sequences are the columns (axis="height": S = W sequences of
        T = H pixels) or the rows (axis="width": S = H, T = W). Returns q, k, v (B, h, S, T, d), the score terms
        qk, qr, kr (B, h, S, T_query, T_key) and the value embeddings r^v (h, T_query, T_key, d)."""
        B, C, H, W = x.shape
        h, d = self.num_heads, self.head_dim
        q, k, v = self.bn_qkv(self.qkv(x)).view(B, 3, h, d, H, W).unbind(1)    # (B, h, d, H, W)
        order = (0, 1, 4, 3, 2) if self.axis == "height" else (0, 1, 3, 4, 2)   # -> (B, h, S, T, d)
        q, k, v = (t.permute(order) for t in (q, k, v))
        T = q.shape[3]
        assert T <= self.max_len, f"axis length {T} exceeds max_len {self.max_len}: build with a larger max_len"
        pos = torch.arange(T, device=x.device)
        delta = pos[None, :] - pos[:, None] + self.max_len - 1                  # (T, T): [o, p] -> index of p - o
        rq, rk, rv = self.rel_q[:, delta], self.rel_k[:, delta], self.rel_v[:, delta]  # (h, T, T, d) each
        qk = q @ k.transpose(-1, -2)                                            # (B, h, S, T, T): q_o . k_p
        qr = torch.einsum("bhsod,hopd->bhsop", q, rq)                           # q_o . r^q_{p-o}
        kr = torch.einsum("bhspd,hopd->bhsop", k, rk)                           # k_p . r^k_{p-o}
        return q, k, v, qk, qr, kr, rv

    def forward(self, x):
        B, C, H, W = x.shape
        h, d = self.num_heads, self.head_dim
        q, k, v, qk, qr, kr, rv = self.terms(x)
        S, T = q.shape[2], q.shape[3]
        norm = lambda bn, t: bn(t.reshape(B, h, -1)).view(t.shape)              # batch norm, one channel per head
        attn = (norm(self.bn_qk, qk) + norm(self.bn_qr, qr) + norm(self.bn_kr, kr)).softmax(-1)  # (B, h, S, T, T)
        sv = attn @ v                                                           # (B, h, S, T, d): sum_p a v_p
        sve = torch.einsum("bhsop,hopd->bhsod", attn, rv)                       # sum_p a r^v_{p-o}
        channels = lambda t: t.permute(0, 1, 4, 2, 3).reshape(B, h * d, S * T)  # (B, C, S*T), channel = (head, d)
        out = (self.bn_sv(channels(sv)) + self.bn_sve(channels(sve))).view(B, h * d, S, T)
        return out.transpose(2, 3) if self.axis == "height" else out            # (B, C, H, W)


class AxialAttention2d(nn.Module):
    """Height-axis then width-axis attention (Axial-DeepLab's order): after the two passes every output pixel depends
    on every input pixel (through the column of the key's row), a global receptive field at O(N (H + W) d) instead
    of O(N^2 d). There is no output projection (as in Axial-DeepLab)."""

    def __init__(self, dim, *, num_heads, max_size, head_dim=None):
        super().__init__()
        self.height = AxialAttention1d(dim, num_heads=num_heads, max_len=max_size, axis="height", head_dim=head_dim)
        self.width = AxialAttention1d(dim, num_heads=num_heads, max_len=max_size, axis="width", head_dim=head_dim)

    def forward(self, x):
        return self.width(self.height(x))


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
        self.ops, self.widths = tuple(ops), tuple(widths)
        kernel, pad = (3, 1) if stem_stride <= 2 else (stem_stride, 0)   # stride 4: non-overlapping 4x4 patches
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], kernel, stride=stem_stride, padding=pad, bias=False),
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
        x = self.stages(self.stem(x))         # (B, C, S/4s, S/4s)
        return self.head(x.mean((2, 3)))      # (B, classes)


@functools.lru_cache(maxsize=None)
def matched_widths(ops, *, widths, head_dim, window, image_size, stem_stride, num_classes):
    """Parameter matching: the widths for `ops` whose parameter count is closest to the all-conv net's at `widths`.
    A 3x3 conv has 9 C^2 weights, SASA 3 C^2 and axial attention 6 C^2, so a model with attention needs more
    channels somewhere. Only stage 3 (which holds most of the weights) gets them, in multiples of head_dim: stages
    1-2 keep their widths in every model, so the stem and the stage-1/2 layers that two models share are the same
    layers (and start from the same weights), and the costly high-resolution attention stays narrow. Decided from
    parameter counts alone, before any training. Returns (widths, params, target params)."""
    def count(w):
        with torch.device("meta"):                                         # shapes only: no memory, no init cost
            return utils.count_params(Net(ops=ops, widths=w, head_dim=head_dim, window=window, image_size=image_size,
                                          stem_stride=stem_stride, num_classes=num_classes))
    with torch.device("meta"):
        target = utils.count_params(Net(ops=("conv",) * 3, widths=widths, head_dim=head_dim, window=window,
                                        image_size=image_size, stem_stride=stem_stride, num_classes=num_classes))
    candidates = [(widths[0], widths[1], head_dim * j) for j in range(1, 4 * widths[2] // head_dim + 1)]
    best = min(candidates, key=lambda w: abs(count(w) - target))
    return best, count(best), target


def init_model(cfg, arm, num_classes, seed):
    """`arm`'s network with seed-`seed` initial weights, where every weight it shares with all-conv (same name and
    shape: the stem, conv stages, downsampling, norms of equal width) starts equal to all-conv's: paired arms."""
    utils.set_seed(seed)
    model = build_model(cfg, arm, num_classes)
    utils.set_seed(seed)
    utils.copy_shared_init(build_model(cfg, "all-conv", num_classes), model)
    return model


def build_model(cfg, arm, num_classes):
    """The network of one arm (a key of MODELS) with its parameter-matched widths."""
    widths = matched_widths(MODELS[arm], widths=tuple(cfg.widths), head_dim=cfg.head_dim, window=cfg.window,
                            image_size=cfg.image_size, stem_stride=cfg.stem_stride, num_classes=num_classes)[0]
    return Net(ops=MODELS[arm], widths=widths, head_dim=cfg.head_dim, window=cfg.window, image_size=cfg.image_size,
               stem_stride=cfg.stem_stride, num_classes=num_classes)


def full_preset_models(num_classes=10):
    """Every model the full preset trains, at its real size: name -> (model, step_fn or None, image_size).
    tests/test_utils.py runs one bf16-autocast training step of each on a CPU, so a full GPU run is known to start."""
    a = get_args([])
    return {name: (build_model(a, name, num_classes), None, a.image_size) for name in MODELS}


# ------------------------------------------------------------------------------------------------ train

def train_job(cfg, arm, per_class, seed, keep_state=False):
    """One training run, self-contained so that utils.run_jobs can run it in another process: model `arm` trained
    from `seed` on `per_class` images per class, for cfg["steps"] optimizer steps whatever the training-set size,
    then scored on the test set. Paired by seed: the same seed gives every arm the same images (the small subset is
    part of the large one: same seeded permutation), the same batches and augmentation (a fresh loader seeded with
    `seed`) and the same initial value of every weight it shares with all-conv (copy_shared_init)."""
    a = argparse.Namespace(**cfg)
    device = torch.device(a.device)
    data = utils.load_data(a.data, image_size=a.image_size, train_per_class=per_class, test_per_class=a.test_per_class,
                           seed=seed)
    model = init_model(a, arm, data.num_classes, seed)
    train, _, test = utils.make_loaders(data, batch_size=a.batch_size, device=device, seed=seed)
    epochs = max(1, round(a.steps / len(train)))                      # same number of steps at every training size
    t0 = time.time()
    hist = utils.train(model.to(device), train, epochs=epochs, lr=a.lr, weight_decay=0.05, warmup_epochs=epochs / 8,
                       label_smoothing=0.1, grad_clip=1.0, log=lambda line: None)
    score = utils.evaluate(model, test)
    seconds = time.time() - t0
    print(f"  {arm:<9} {len(data.y_train):>6,d} train images  seed {seed}: {epochs:3d} epochs x {len(train)} steps, "
          f"test {score.acc:5.2f}%  NLL {score.nll:.3f}  ({seconds:.0f} s)", flush=True)
    return dict(arm=arm, per_class=per_class, seed=seed, acc=score.acc, nll=score.nll, train_acc=hist[-1]["train_acc"],
                epochs=epochs, steps=epochs * len(train), img_per_s=sum(h["img_per_s"] for h in hist) / len(hist),
                seconds=seconds, params=utils.count_params(model), widths=list(model.widths),
                state={k: v.cpu() for k, v in model.state_dict().items()} if keep_state else None)


def plan_runs(args, per_class, todo):
    """Every (arm, images per class, seed, keep_state) run the chosen experiments need, most expensive first so that
    parallel workers finish together. Every model gets --seeds seeds, all-axial the first --axial-seeds of them; the
    small training size only the models in --scaling-models, plus all-conv."""
    small = max(1, per_class // args.scaling_factor)
    seeds = lambda arm: range(args.seed, args.seed + (args.axial_seeds if arm == "all-axial" else args.seeds))
    runs = {(arm, per_class, args.seed) for arm in args.models if arm in ("all-conv", "all-local")} if "swap" in todo else set()
    if {"compare", "scaling"} & set(todo):
        runs |= {(arm, per_class, s) for arm in args.models for s in seeds(arm)}
    if "scaling" in todo:
        runs |= {(arm, small, s) for arm in ("all-conv",) + tuple(args.scaling_models) for s in seeds(arm)}
    cost = {"all-conv": 1, "hybrid": 1.5, "all-local": 3, "all-axial": 6}           # relative time per step (measured)
    keep = lambda arm, n, s: "swap" in todo and s == args.seed and n == per_class and arm in ("all-conv", "all-local")
    return [(arm, n, s, keep(arm, n, s)) for arm, n, s in sorted(runs, key=lambda r: (-cost[r[0]], r[0], -r[1], r[2]))]


def train_all(args, data, todo, device):
    """Run plan_runs' jobs (in parallel with --workers) and index the results by (arm, images per class, seed)."""
    per_class = int(torch.bincount(data.y_train).min())               # what the preset's count fitted to
    small = max(1, per_class // args.scaling_factor)
    steps = args.epochs * (len(data.y_train) // min(args.batch_size, len(data.y_train)))
    cfg = dict(data=args.data, image_size=args.image_size, test_per_class=args.test_per_class, widths=args.widths,
               head_dim=args.head_dim, window=args.window, stem_stride=args.stem_stride, batch_size=args.batch_size,
               lr=args.lr, steps=steps, device=str(device))
    jobs = plan_runs(args, per_class, todo)
    print(f"training {len(jobs)} runs ({steps} steps each; {per_class} and {small} images per class; "
          f"{args.workers} at a time, 1 thread each)", flush=True)
    t0 = time.time()
    results = utils.run_jobs(train_job, [(cfg, *job) for job in jobs], workers=args.workers)
    print(f"all runs done in {time.time() - t0:.0f} s", flush=True)
    return {"per_class": per_class, "small": small, "steps": steps,
            "runs": {(r["arm"], r["per_class"], r["seed"]): r for r in results}}


# ------------------------------------------------------------------------------------------------ experiments

def paired(runs, arm_a, arm_b, per_class, key):
    """Per-seed values of metric `key` for two arms, over the seeds both have at this training size."""
    seeds = sorted(s for (a, n, s) in runs if a == arm_a and n == per_class and (arm_b, n, s) in runs)
    return [runs[(arm_a, per_class, s)][key] for s in seeds], [runs[(arm_b, per_class, s)][key] for s in seeds]


def compare_arms(runs, arm, ref, per_class, log=print):
    """Accuracy and NLL of `arm` against `ref` at one training size, in the one verdict wording of utils."""
    a, b = paired(runs, arm, ref, per_class, "acc")
    acc = utils.compare_paired(a, b, name_a=arm, name_b=ref, unit="points", digits=1, bound=1.0, log=log)
    a, b = paired(runs, arm, ref, per_class, "nll")
    nll = utils.compare_paired(a, b, name_a=arm, name_b=ref, unit="nats", digits=3, higher_is_better=False,
                               bound=0.02, log=log)
    return {"acc": acc, "nll": nll}


def exp_compare(args, out, trained):
    """Conv vs local vs axial vs hybrid on one backbone, parameter-matched, at the large training size: one table
    (mean and 95% CI over paired seeds, full test set) and every attention model against all-conv."""
    runs, n = trained["runs"], trained["per_class"]
    header = f"{'model':<10} {'ops (stage 1,2,3)':<18} {'widths':<13} {'params':>8} {'img/s':>6} {'n':>2}  " \
             f"{'test acc % [95% CI]':<22} {'test NLL [95% CI]':<24}"
    lines, rows = [header, "-" * len(header)], {}
    for arm in args.models:
        rs = [r for (a, m, s), r in sorted(runs.items()) if a == arm and m == n]
        acc, nll = utils.mean_ci([r["acc"] for r in rs]), utils.mean_ci([r["nll"] for r in rs])
        rows[arm] = dict(ops=list(MODELS[arm]), widths=rs[0]["widths"], params=rs[0]["params"], n=len(rs), acc=acc,
                         nll=nll, img_per_s=sum(r["img_per_s"] for r in rs) / len(rs), accs=[r["acc"] for r in rs])
        lines.append(f"{arm:<10} {','.join(MODELS[arm]):<18} {','.join(map(str, rs[0]['widths'])):<13} "
                     f"{rs[0]['params']:>8,d} {rows[arm]['img_per_s']:>6.0f} {len(rs):>2}  "
                     f"{acc[0]:5.2f} [{acc[1]:5.2f}, {acc[2]:5.2f}]   {nll[0]:.3f} [{nll[1]:.3f}, {nll[2]:.3f}]")
    r0 = next(iter(runs.values()))
    lines.append(f"{n} training images per class, {r0['steps']} steps of batch {args.batch_size}; test: all "
                 f"{args.test_per_class or 'the'} test images; img/s = training throughput of one process, 1 thread")
    print("\n".join(lines), flush=True)
    verdicts = {arm: compare_arms(runs, arm, "all-conv", n) for arm in args.models if arm != "all-conv"}
    if {"hybrid", "all-local"} <= set(args.models):          # Ramachandran et al.: conv stem/early stages help attention
        verdicts["hybrid vs all-local"] = compare_arms(runs, "hybrid", "all-local", n)
    return {"table": lines, "models": rows, "verdicts": verdicts}


def exp_scaling(args, out, trained):
    """Data scaling: attention's gap to all-conv at two training-set sizes (scaling_factor apart, same number of
    optimizer steps), and whether it changes between them: per seed, (arm - conv) at the large size minus
    (arm - conv) at the small size, with its 95% CI."""
    runs, big, small = trained["runs"], trained["per_class"], trained["small"]
    result = {}
    for arm in args.scaling_models:
        print(f"-- {arm} vs all-conv: {small} -> {big} images per class", flush=True)
        at = {n: compare_arms(runs, arm, "all-conv", n) for n in (small, big)}
        change = {}
        for key, unit, digits, hib, bound in (("acc", "points", 1, True, 1.0), ("nll", "nats", 3, False, 0.02)):
            gaps = {}
            for n in (small, big):
                a, b = paired(runs, arm, "all-conv", n, key)
                gaps[n] = [x - y for x, y in zip(a, b)]                   # arm - conv, per seed
            k = min(len(gaps[small]), len(gaps[big]))
            change[key] = utils.compare_paired(
                gaps[big][:k], gaps[small][:k], name_a=f"({arm} - conv) at {big}/class", name_b=f"at {small}/class",
                unit=unit, digits=digits, higher_is_better=hib, bound=bound, pairs="paired seeds (difference of gaps)")
        result[arm] = {"small": at[small], "large": at[big], "change_of_gap": change}
    return {"per_class": [small, big], "models": result}


@torch.no_grad()
def conv_equivalence_check(model, x, alpha):
    """Theorem 1 on real data: rebuild the trained stage-1 conv as attention and apply both to the real features
    that conv sees. Returns max |attention - conv|, the attention probabilities (B, K^2, N, M) and the feature size."""
    conv = model.stages[0][1].op1
    feats = model.stem(x)                                                      # (B, C, H, W) what op1 sees
    out, probs = attention_from_conv(conv, alpha)(feats, return_attn=True)    # probs (B, K^2, N, M)
    return (out - conv(feats)).abs().max().item(), probs, tuple(feats.shape[2:])


def trained_model(args, trained, arm, data, device):
    """The seed-`args.seed` model of `arm` at the large size, rebuilt from its state_dict."""
    model = build_model(args, arm, data.num_classes).to(device)
    model.load_state_dict(trained["runs"][(arm, trained["per_class"], args.seed)]["state"])
    return model.eval()


def exp_swap(args, out, trained, data, device):
    """Theorem 1 on a trained network: the seed-0 all-conv's first 3x3 conv is replaced by its 9-head attention twin
    (attention_from_conv); the twin's max error on real features, and the whole network's test accuracy and
    predictions with the twin swapped in. Plus the attention maps of a trained SASA layer next to the twin's."""
    conv_net = trained_model(args, trained, "all-conv", data, device)
    every = max(1, math.ceil(len(data.y_test) / args.swap_images))          # every n-th image: all classes alike
    test = utils.DeviceLoader(data.x_test[::every], data.y_test[::every], batch_size=50,
                              device=device, train=False, mean=data.mean, std=data.std)
    x, _ = next(iter(test))                                                    # (50, 3, S, S) normalised test images
    err, probs, (Hc, Wc) = conv_equivalence_check(conv_net, x[:16], args.alpha)
    swapped = copy.deepcopy(conv_net)
    swapped.stages[0][1].op1 = attention_from_conv(swapped.stages[0][1].op1, args.alpha)
    with torch.no_grad():                                                     # one pass: both networks, every batch
        logits = [(conv_net(xb), swapped(xb), yb) for xb, yb in test]
    lc, ls, y = (torch.cat(t) for t in zip(*logits))
    s_conv, s_swap = (utils.Score(100.0 * (l.argmax(-1) == y).float().mean().item(), F.cross_entropy(l, y).item())
                      for l in (lc, ls))
    same = 100.0 * (lc.argmax(-1) == ls.argmax(-1)).float().mean().item()
    res = {"max_abs_err": err, "alpha": args.alpha, "images": len(test.y), "test_acc_conv": s_conv.acc,
           "test_acc_attention": s_swap.acc, "nll_conv": s_conv.nll, "nll_attention": s_swap.nll, "same_predictions_pct": same,
           "head_nonlocality": nonlocality(probs[0], Hc, Wc, key_padding=1).tolist()}
    print(f"Theorem 1 on a trained network: all-conv's stage-1 3x3 conv rebuilt by attention_from_conv (9 heads, alpha "
          f"{args.alpha:g}): max |attention - conv| = {err:.1e} on real features; on {len(test.y):,d} test images the "
          f"network scores {s_swap.acc:.2f}% with the attention twin and {s_conv.acc:.2f}% with the conv "
          f"(NLL {s_swap.nll:.4f} vs {s_conv.nll:.4f}), {same:.2f}% identical predictions", flush=True)
    local_arm = "all-local" if ("all-local", trained["per_class"], args.seed) in trained["runs"] else None
    if local_arm is not None:
        local_attn, (Hs, Ws), stage = local_attention_maps(trained_model(args, trained, local_arm, data, device), x[:16],
                                                           MODELS[local_arm])
        D = nonlocality(window_to_dense(local_attn, Hs, Ws, args.window), Hs, Ws, key_padding=args.window // 2)
        res["local_nonlocality"] = {"model": local_arm, "stage": stage + 1, "per_head": D.mean(0).tolist()}
        mean, std = torch.tensor(data.mean).view(3, 1, 1), torch.tensor(data.std).view(3, 1, 1)
        image = (x[0].cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()   # (S, S, 3) for imshow
        res["figure"] = os.path.join(out, "attention_maps.png")
        plot_attention(res["figure"], image, local_attn[0, :, (Hs // 2) * Ws + Ws // 2].cpu(), (Hs, Ws), args.window,
                       probs[0, :, (Hc // 2) * Wc + Wc // 2].cpu(), (Hc, Wc), 3, f"{local_arm} stage {stage + 1}")
        print(f"trained {local_arm} stage-{stage + 1} SASA heads: nonlocality (ConViT eq. 6, mean query-key distance in "
              f"pixels) = {[round(v, 2) for v in D.mean(0).tolist()]}; figure: {res['figure']}", flush=True)
    return res


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


def time_step(layer, shape, *, batch_size, steps, forward=None):
    """Median seconds of one forward + backward of `layer` on a random (batch_size, *shape) input (after 1 warm-up)."""
    forward = forward or (lambda m, x: m(x))
    x = torch.randn(batch_size, *shape, requires_grad=True)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        forward(layer, x).square().mean().backward()
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[steps // 2]


def bench(args, device, *, steps=7):
    """One layer of each kind at the sizes the quick preset's all-local model runs (batch, width and resolution of
    each stage), with the quick preset's window and with 5x5 (this file's previous quick preset): SASA by unfold (the
    reference, this file's previous implementation) and by the fast path, side by side; then axial attention and a
    3x3 conv of the same width. Forward + backward, median of `steps` steps."""
    q = argparse.Namespace(**{**vars(args), **{k: v for k, v in PRESETS["quick"].items() if k in
                                               ("widths", "head_dim", "window", "stem_stride", "batch_size")}})
    widths = matched_widths(MODELS["all-local"], widths=q.widths, head_dim=q.head_dim, window=q.window,
                            image_size=args.image_size, stem_stride=q.stem_stride, num_classes=10)[0]
    rows, lines, run = [], [], lambda layer, shape, **kw: time_step(layer.to(device), shape, batch_size=q.batch_size,
                                                                     steps=steps, **kw)
    for window in sorted({q.window, 5}):
        for stage, C in enumerate(widths):
            S = args.image_size // q.stem_stride // 2 ** stage
            utils.set_seed(0)
            sasa, shape = LocalSelfAttention2d(C, num_heads=C // q.head_dim, window=window), (C, S, S)
            fast = "dense" if S * S <= 4 * window ** 2 else "shifted"              # what impl="auto" picks
            t = {"SASA unfold": run(sasa, shape, forward=lambda m, x: m(x, impl="unfold")), f"SASA {fast}": run(sasa, shape),
                 "axial": run(AxialAttention2d(C, num_heads=C // q.head_dim, max_size=S), shape),
                 "conv 3x3": run(nn.Conv2d(C, C, 3, padding=1, bias=False), shape)}
            rows.append(dict(window=window, stage=stage + 1, size=S, width=C, batch=q.batch_size, fast=fast,
                             ms={k: 1e3 * v for k, v in t.items()}, speedup=t["SASA unfold"] / t[f"SASA {fast}"],
                             fast_over_conv=t[f"SASA {fast}"] / t["conv 3x3"]))
            lines.append(f"k={window} stage {stage + 1}: {S:>2}x{S:<2} C={C:<3} batch {q.batch_size}: " +
                         "  ".join(f"{k} {1e3 * v:6.1f} ms" for k, v in t.items()) +
                         f" | SASA {fast}/unfold speed-up {rows[-1]['speedup']:4.1f}x, SASA/conv {rows[-1]['fast_over_conv']:4.1f}x")
            print(lines[-1], flush=True)
        mine = [r for r in rows if r["window"] == window]
        unfold, fast = sum(r["ms"]["SASA unfold"] for r in mine), sum(r["ms"][f"SASA {r['fast']}"] for r in mine)
        conv = sum(r["ms"]["conv 3x3"] for r in mine)
        lines.append(f"k={window}, the three stages together: SASA unfold {unfold:.1f} ms, fast {fast:.1f} ms "
                     f"({unfold / fast:.1f}x faster), conv 3x3 {conv:.1f} ms (fast SASA / conv = {fast / conv:.1f}x)")
        print(lines[-1], flush=True)
    return {"rows": rows, "lines": lines}


# ------------------------------------------------------------------------------------------------ main

def main(argv=None):
    args = get_args(argv)
    device, out = utils.start(args, "01_conv_vs_attention")
    config = {k: v for k, v in vars(args).items()}
    if args.bench:
        res = bench(args, device)
        utils.save_results(os.path.join(out, "bench.json"), config, res)
        return res
    data = utils.data_from_args(args)
    print(f"data: {len(data.y_train):,d} train / {len(data.y_test):,d} test images, {data.num_classes} classes, "
          f"{args.image_size}x{args.image_size}, device {device}", flush=True)
    todo = EXPERIMENTS if args.experiment == "all" else (args.experiment,)
    trained = train_all(args, data, todo, device)
    results = {}
    for name in todo:
        print(f"== {name} ==", flush=True)
        fn = {"compare": lambda: exp_compare(args, out, trained), "scaling": lambda: exp_scaling(args, out, trained),
              "swap": lambda: exp_swap(args, out, trained, data, device)}[name]
        results[name] = fn()
        utils.save_results(os.path.join(out, f"{name}.json"), config, results[name])
    runs = [{k: v for k, v in r.items() if k != "state"} for r in trained["runs"].values()]
    utils.save_results(os.path.join(out, "results.json"), config, {**results, "runs": runs})
    print(f"results: {out}/results.json", flush=True)
    return {**results, "runs": runs}


if __name__ == "__main__":
    utils.run_main(main)
