"""Attention Augmented Convolutional Networks -- Bello, Zoph, Vaswani, Shlens, Le, ICCV 2019, arXiv 1904.09925.

The idea. A convolution only sees a k x k neighbourhood; self-attention sees the whole image but, on its own,
ignores where things are. An *attention-augmented convolution* runs both side by side on the same input and
concatenates their outputs on the channel axis (paper Sec. 3.2):

    AAConv(X) = Concat[ Conv(X), MHA(X) ]          Conv -> F_out - d_v channels,  MHA -> d_v channels

MHA is multi-head self-attention over all H*W pixels (eq. 1-2): a 1x1 conv makes queries, keys and values,
each head h computes Softmax(Q_h K_h^T / sqrt(d_k^h)) V_h, and a 1x1 conv mixes the heads. To make attention
aware of 2D position while staying translation-equivariant, the paper adds *relative* logits (Sec. 3.1.2, eq. 3):

    l_{i,j} = q_i^T / sqrt(d_k^h) * ( k_j + r^W_{j_x - i_x} + r^H_{j_y - i_y} )

with one learned embedding per relative width offset (2W-1 of them) and per relative height offset (2H-1).
They are computed with the "relative to absolute" trick (`rel_to_abs`) in O(HW(H+W)) memory and added to the
(HW x HW) content logits by broadcasting. Three knobs, as in the paper: N_h heads, kappa = d_k / F_out and
upsilon = d_v / F_out. upsilon = 0 is a plain convolution; upsilon = 1 (no conv branch) is fully attentional.
`BlockwiseAttention` computes the same softmax(logits) V block by block without ever storing an N x N tensor.

Run (from the repo root; --experiment compare|maps|pilot|all, default all = compare + maps):
    python 02_aa_conv.py --quick --data ../shared/data/cifar10                      # <= 10 min on 2 cores (2 workers)
    python 02_aa_conv.py --quick --experiment pilot --data ../shared/data/cifar10   # the power planning, ~5 min
    python 02_aa_conv.py --bench --threads 1                                        # the AA layer, before / after
    python 02_aa_conv.py --data ../shared/data/cifar10                              # full preset: one GPU (not measured)

Experiments (each prints its table and writes runs/02_aa_conv/<experiment>.json):
  compare  AA-ResNet vs ResNet (the paper's CIFAR recipe: the first 3x3 conv of each residual block augmented) on
           paired seeds: one seed = one training subset, one batch order, and equal initial values for every weight
           both arms have (make_arm). Full 10,000-image test set; accuracy and NLL; verdicts by utils.compare_paired.
  maps     attention of the trained heads vs the very same network at init (largest weight vs 1/N, entropy vs log N)
           and runs/02_aa_conv/attention_maps.png, all panels on one colour scale.
  pilot    the power planning, never on test: compare on a validation split (500 per class) carved from train.
  --bench  one 64-channel AA layer, forward + backward: the simple form (the layer before this change) and
           BlockwiseAttention (after) on the same weights, plus the paper's pooled attention and a plain conv.

The quick preset, and why. A ResNet-10 (widths 16/32/64, blocks 1/1/2) with attention in stage 3, on 500 CIFAR-10
training images per class (a new subset per seed), 4 epochs, AdamW, 12 paired seeds, 2 worker processes.
  Power planning (--experiment pilot, validation split, 8 pairs): the per-seed accuracy difference had SD 1.52
  points at 4 epochs (1.76 at 3 epochs, which buys 1.3x the pairs: the same power per CPU-second). A 95% CI
  half-width t * SD / sqrt(n) <= 1 point then needs n >= 12; validation is 5,000 images, the test set 10,000, so
  the test-set differences are a little less noisy. 12 pairs is what fits the 10-minute budget: a measured run with
  14 pairs took 625 s on this machine (one pair costs ~85 CPU-seconds).
  kappa, upsilon, N_h against the paper. The paper's CIFAR rule is N_h = 8, kappa = 2 upsilon = 0.2 and at least 20
  key dims per head (its WRN-28-10 has 160-640 channels). At our 64 channels that rule gives d_k = 8 x 20 = 160,
  2.5x the layer's width, and d_v = 0.1 x 64 = 6.4 values for 8 heads. We keep the 20-key-dims rule and cut the
  heads instead: N_h = 2, d_k = 40 (kappa = 0.5 asks for 32, the 20-per-head minimum raises it to 40), and
  upsilon = 0.25 (d_v = 16, 8 per head) so that attention carries a quarter of the layer's channels. Decided
  before any test run, not tuned.

RESULTS of `--quick` (this 2-core AMD EPYC CPU, torch 2.15 float32, 2 workers x 1 thread, from a clean clone: 522 s;
12 paired seeds, all 10,000 test images; mean [95% CI]; full tables in the README and runs/02_aa_conv/):
    model      params   MFLOPs  saved act. MB  img/s   test acc %            test NLL
    ResNet     152,026   34.4      138          678    49.91 [49.05, 50.76]  1.3860 [1.3697, 1.4022]
    AA-ResNet  149,130   35.1      160          519    49.01 [48.52, 49.50]  1.4020 [1.3917, 1.4123]
  AA-ResNet - ResNet = -0.9 points [-1.8, -0.0] -> ResNet better (at the edge: 14 pairs, 625 s, gave -0.8
  [-1.5, +0.0], not decided); NLL +0.016 nats [-0.001, +0.033] -> not decided. The paper's +1.3 does not appear.
  The attention is used: uniform weights cost the trained seed-0 net 8 points (49.2 -> 41.2% on 1,000 test
  images, measured by tests/), and the second AA layer's heads put 15x the uniform weight on their top pixel
  (entropy 2.8 vs log N = 4.2).
  bench (--bench --threads 1, one 64-channel layer, fwd+bwd): blockwise vs simple form 3.70x at 32x32 batch 32
  (4,022 -> 1,088 ms, peak 1,636 -> 235 MB), 3.17x at 64x64 batch 2 (3,881 -> 1,224 ms, 1,640 -> 164 MB); the
  paper's pooled attention 118 / 80 ms; a plain 3x3 conv 55 / 14 ms. The full preset was NOT measured: no GPU.

Deviations from the paper and its code (and why):
  - Scale: a ResNet-10 on CIFAR-10 subsets for minutes on a CPU, not a WRN-28-10 on CIFAR-100 for 500 epochs; AdamW
    (lr 3e-3, weight decay 0.05 on kernels only, label smoothing 0.1) instead of the WRN's SGD recipe. The full
    preset follows the paper's recipe (SGD, N_h 8, kappa 0.2, upsilon 0.1, >= 20 key dims) but was not run.
  - Strided AA layers are not in the paper (its code has no stride). Ours attend on the conv's output grid: the
    attention input is k x k average pooled with the layer's stride. The paper's own pooling (pool_attention: 3x3 /
    2 average pooling of the attention input "in the layers with the largest spatial dimensions", then bilinear
    upsampling back) is implemented too and used by the full preset's 32x32 stage; the quick preset's 8x8 grid
    needs no memory saving, so it does not use it.
  - upsample_pooled puts pooled pixel i back at input pixel 2i (the centre of its pooling window), as TF1's
    resize_bilinear mapped a 2x upsampling; PyTorch's align_corners=False would shift it by a quarter pixel.
    Pooling does not count padding, as TensorFlow's 'SAME' pooling.
  - The relative tables are sized once for the largest grid (max_size); a smaller grid uses their centre rows. The
    paper builds them for the grid at hand. They start with std dkh^-1/2; the paper's printed code passes dkh^-0.5
    as the first argument of tf.random_normal_initializer, which TensorFlow reads as the MEAN (std 1): we take it
    as the intended scale.
  - BlockwiseAttention evaluates the same sums in another order: results match the simple form to float rounding
    (tests: 1e-5 in float32, gradcheck in float64).
  - Channels-last memory format for the ResNets: the same numbers, 1.45x faster training on this CPU.

Letters used in shape comments:
    B batch, C channels, H x W spatial size (of the attention grid after any pooling), N = H*W pixels,
    Nh heads, dk / dv total key / value depth, dkh = dk/Nh and dvh = dv/Nh per head, G = B*Nh, L a generic length.
"""
import argparse
import copy
import math
import os
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import utils

# ------------------------------------------------------------------------------------------------ config

PRESETS = {
    # quick: 2-core CPU, <= 10 min. A ResNet-10 (widths 16/32/64, blocks 1/1/2) with attention in stage 3 only (an
    # 8x8 grid; two AA layers: the strided first conv and the second block's). The paper too augments "starting from
    # the last layer until we hit memory constraints". Nh = 2 heads so that each head keeps the paper's minimum of 20
    # key dims: dk = 40 (kappa = 0.5 -> 32, raised to 2 x 20), dv = 16 (upsilon = 0.25, 8 per head). The paper's
    # kappa = 2 upsilon = 0.2 with 8 heads would give a 64-channel layer 1.6 key and 0.8 value dims per head.
    # Counts, epochs and seeds: see the power planning in the docstring (pilot on a validation split).
    "quick": dict(widths=(16, 32, 64), blocks=(1, 1, 2), aa_stages=(3,), pool_stages=(), num_heads=2, kappa=0.5,
                  upsilon=0.25, min_dkh=20, epochs=4, batch_size=64, lr=3e-3, weight_decay=0.05, optimizer="adamw",
                  warmup_epochs=1.0, seeds=12, train_per_class=500, val_per_class=0, test_per_class=None,
                  workers=2, threads=1),
    # full: one GPU, full CIFAR-10, the paper's CIFAR recipe on a wide ResNet-14 (widths 128/256/512, two blocks per
    # stage): attention in every block, Nh = 8, kappa = 2 upsilon = 0.2, >= 20 key dims per head; the 32x32 stage
    # pools its attention input (the paper's memory saver for its largest grids). Not measured: no GPU in this task.
    "full": dict(widths=(128, 256, 512), blocks=(2, 2, 2), aa_stages=(1, 2, 3), pool_stages=(1,), num_heads=8,
                 kappa=0.2, upsilon=0.1, min_dkh=20, epochs=100, batch_size=128, lr=0.1, weight_decay=5e-4,
                 optimizer="sgd", warmup_epochs=5.0, seeds=5, train_per_class=None, val_per_class=0,
                 test_per_class=None, workers=1, threads=None),
}
PILOT_VAL_PER_CLASS = 500  # the pilot's validation split: 5,000 CIFAR-10 training images, never used for training
EXPERIMENTS = ("compare", "maps", "pilot")
ARMS = {False: "ResNet", True: "AA-ResNet"}
EVAL_BATCH = 128  # images per evaluation batch (500 was 1.4x slower on this CPU: activations fall out of cache)


def get_args(argv=None):
    p = utils.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                             epilog="Presets (a flag you pass wins over its preset value):\n" +
                                    "\n".join(f"  {k}: {v}" for k, v in PRESETS.items()))
    p.add_argument("--experiment", default="all", choices=EXPERIMENTS + ("all",),
                   help="compare: AA-ResNet vs ResNet on paired seeds; maps: attention of the trained heads vs init; "
                        "pilot: the power planning on a validation split; all = compare + maps")
    p.add_argument("--quick", action="store_true", help="CPU preset (<= 10 min on 2 cores); default: the full GPU preset")
    p.add_argument("--bench", action="store_true", help="only the AA-layer benchmark: before / after side by side")
    p.add_argument("--epochs", type=utils.positive_int)
    p.add_argument("--seeds", type=utils.positive_int, help="paired seeds: --seed, --seed+1, ... (each trains both arms)")
    p.add_argument("--batch-size", type=utils.positive_int)
    p.add_argument("--lr", type=utils.positive_float)
    p.add_argument("--weight-decay", type=utils.nonneg_float)
    p.add_argument("--warmup-epochs", type=utils.nonneg_float)
    p.add_argument("--optimizer", choices=("adamw", "sgd"))
    p.add_argument("--widths", type=utils.positive_int, nargs=3, help="channels of the 3 ResNet stages")
    p.add_argument("--blocks", type=utils.positive_int, nargs=3, help="residual blocks per stage")
    p.add_argument("--aa-stages", type=int, nargs="+", help="stages (1-3) whose blocks get an AA first conv")
    p.add_argument("--pool-stages", type=int, nargs="*", help="AA stages whose attention input is pooled (paper Sec. 4.2)")
    p.add_argument("--num-heads", type=utils.positive_int, help="Nh")
    p.add_argument("--kappa", type=utils.positive_float, help="dk / F_out")
    p.add_argument("--upsilon", type=utils.positive_float, help="dv / F_out")
    p.add_argument("--min-dkh", type=utils.nonneg_int, help="at least this many key dims per head (paper: 20)")
    p.add_argument("--no-relative", action="store_true", help="AA layers without relative position logits")
    p.add_argument("--measure-batch", type=utils.positive_int, default=128, help="batch of the memory column")
    p.add_argument("--bench-sizes", type=utils.positive_int, nargs="+", default=[32, 64], help="benchmark grids (square)")
    p.add_argument("--bench-batch", type=utils.positive_int, default=128,
                   help="benchmark batch; lowered (and printed) where one (B, Nh, N, N) fp32 logit tensor of the simple "
                        "form would exceed 0.5 GiB on a CPU or 1/8 of the GPU memory")
    p.add_argument("--bench-steps", type=utils.positive_int, default=3, help="timed steps per benchmark row")
    utils.add_common_args(p)
    args = p.parse_args(argv)
    preset = dict(PRESETS["quick" if args.quick else "full"])
    if args.experiment == "pilot":
        preset["val_per_class"] = PILOT_VAL_PER_CLASS
    utils.apply_preset(args, preset)
    if not set(args.aa_stages) <= {1, 2, 3} or not set(args.pool_stages) <= set(args.aa_stages):
        p.error(f"--aa-stages {args.aa_stages} must name stages 1-3 and --pool-stages {args.pool_stages} a subset of them")
    if args.experiment == "pilot" and not args.val_per_class:
        p.error("--experiment pilot needs a validation split: --val-per-class >= 1")
    args.widths, args.blocks = tuple(args.widths), tuple(args.blocks)
    return args


# ------------------------------------------------------------------------------------------------ building blocks

def rel_to_abs(x):
    """Relative -> absolute indexing (paper Sec. 3.1.2, the "skewing" trick of Music Transformer).

    x[..., i, m] holds the logit of query i for relative offset m - (L-1), m in [0, 2L-2]. Returns y[..., i, j] =
    x[..., i, j - i + L - 1], the logit for the key at absolute position j. Pure padding + reshapes: no gather,
    no (L, L, 2L-1) one-hot. (..., L, 2L-1) -> (..., L, L)."""
    *lead, L, M = x.shape
    assert M == 2 * L - 1, f"rel_to_abs expects (..., L, 2L-1) relative logits, got last dims ({L}, {M})"
    x = F.pad(x, (0, 1))                      # (..., L, 2L): one zero column per row
    x = x.reshape(*lead, L * 2 * L)           # (..., 2L*L): rows laid end to end
    x = F.pad(x, (0, L - 1))                  # (..., 2L*L + L-1) = (..., (L+1)(2L-1))
    x = x.reshape(*lead, L + 1, 2 * L - 1)    # (..., L+1, 2L-1): reading with a row length one shorter skews row i by i
    return x[..., :L, L - 1:]                 # (..., L, L): y[i, j] = x[i, j - i + L-1]


def relative_logits_1d(q, rel_k):
    """Relative logits along the last spatial axis. q: (B, Nh, H, W, dkh) scaled queries; rel_k: (2W-1, dkh)
    embeddings of offsets -(W-1)..W-1. Returns (B, Nh, H, W, W): out[..., y, x, x'] = q[y, x] . rel_k[x' - x + W-1]."""
    rel = torch.einsum("bhyxd,md->bhyxm", q, rel_k)  # (B, Nh, H, W, 2W-1): every query against every offset
    return rel_to_abs(rel)                           # (B, Nh, H, W, W)


def pooled_size(n, stride):
    """Grid size after a k x k window with stride s and padding k//2 (k odd): the conv's and the pool's output."""
    return (n - 1) // stride + 1


def upsample_pooled(x, size):
    """Undo the paper's 3x3 / stride-2 average pooling of the attention input (Sec. 4.2: "the following upsampling
    (required for the concatenation) is obtained via bilinear interpolation"). Pooled pixel i is the mean of a window
    centred on input pixel 2i, so it goes back to pixel 2i, and the pixel between two of them gets their mean
    (bilinear with align_corners=True onto 2h-1 points); an even-sized grid repeats its last row / column.
    (B, C, h, w) -> (B, C, H, W) with H = 2h-1 or 2h."""
    H, W = size
    h, w = x.shape[-2:]
    assert H in (2 * h - 1, 2 * h) and W in (2 * w - 1, 2 * w), f"grid {h}x{w} is not a stride-2 pooling of {H}x{W}"
    x = F.interpolate(x, size=(2 * h - 1, 2 * w - 1), mode="bilinear", align_corners=True)  # (B, C, 2h-1, 2w-1)
    return F.pad(x, (0, W - (2 * w - 1), 0, H - (2 * h - 1)), mode="replicate")          # (B, C, H, W)


def wide_matmul(a, b):
    """a @ b for a product with a narrow result (..., N, d), d = dkh or dvh: computed as (b^T a^T)^T, the same sums
    with a wide (..., d, N) result, which CPU BLAS ran 3-8x faster (measured: torch 2.15, one AVX-512 core)."""
    return (b.transpose(-2, -1) @ a.transpose(-2, -1)).transpose(-2, -1)


class BlockwiseAttention(torch.autograd.Function):
    """softmax(q k^T + relative logits) v, computed block by block so that no (N x N) tensor is ever stored.

    The simple form (AugmentedConv2d.attention_reference) materialises the (B, Nh, N, N) logits, keeps the softmax
    weights for the backward pass and streams several N x N tensors through memory: on a CPU that memory traffic, not
    arithmetic, is the cost. Here (the idea of FlashAttention, Dao et al. 2022, in plain PyTorch) each block of
    complete query rows, ~1 MiB, is computed while it sits in the cache; the forward keeps only q, k, v, the
    relative logits and the output, and the backward recomputes each block's weights. Same equations, same result up
    to float rounding: tests compare it with the simple form and run a float64 gradcheck.

    q, k: (G, N, dkh), q already scaled by dkh^-0.5; v: (G, N, dvh); G = B * Nh heads, N = H * W pixels.
    rel_h: (G, N, H), rel_h[g, i, y'] = q_i . r^H_{y' - i_y}; rel_w: (G, N, W), rel_w[g, i, x'] = q_i . r^W_{x' - i_x}.
    (None, None) for attention without relative logits. Returns (G, N, dvh)."""

    BLOCK_ELEMENTS = 2 ** 18  # logits per block: 1 MiB of float32, about one core's L2 cache

    @staticmethod
    def blocks(G, N):
        """(head slice, row slice) pairs that cover the G x N query rows in blocks of ~BLOCK_ELEMENTS logits."""
        budget = BlockwiseAttention.BLOCK_ELEMENTS
        heads = max(1, budget // (N * N))
        rows = min(N, max(1, budget // N))
        return [(slice(g, g + heads), slice(r, r + rows)) for g in range(0, G, heads) for r in range(0, N, rows)]

    @staticmethod
    def weights(q, k, rel_h, rel_w, HW):
        """Softmax weights of one block: (g, r, N), eq. 1 with the logits of eq. 3."""
        s = q @ k.transpose(1, 2)                                           # (g, r, N) content logits q_i . k_j
        if rel_h is not None:
            g, r, N = s.shape
            s = (s.view(g, r, *HW) + rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)).view(g, r, N)  # + r^H + r^W terms
        return s.softmax(dim=-1)

    @staticmethod
    def forward(ctx, q, k, v, rel_h, rel_w, H, W):
        G, N, _ = q.shape
        o = v.new_empty(G, N, v.shape[-1])
        for hs, rs in BlockwiseAttention.blocks(G, N):
            rh, rw = (None, None) if rel_h is None else (rel_h[hs, rs], rel_w[hs, rs])
            o[hs, rs] = wide_matmul(BlockwiseAttention.weights(q[hs, rs], k[hs], rh, rw, (H, W)), v[hs])  # (g, r, dvh)
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
        delta = (do * o).sum(-1, keepdim=True)                              # (G, N, 1) = sum_j p_ij dp_ij
        for hs, rs in BlockwiseAttention.blocks(*q.shape[:2]):
            rh, rw = (None, None) if rel_h is None else (rel_h[hs, rs], rel_w[hs, rs])
            p = BlockwiseAttention.weights(q[hs, rs], k[hs], rh, rw, ctx.HW)  # (g, r, N), recomputed
            dv[hs] += wide_matmul(p.transpose(1, 2), do[hs, rs])            # o = p v
            ds = p * (do[hs, rs] @ v[hs].transpose(1, 2) - delta[hs, rs])   # softmax backward: (g, r, N)
            if rel_h is not None:
                d = ds.view(*ds.shape[:2], *ctx.HW)                         # (g, r, H, W): the key's (y', x')
                drel_h[hs, rs], drel_w[hs, rs] = d.sum(3), d.sum(2)         # each term was broadcast over one axis
            dq[hs, rs] = wide_matmul(ds, k[hs])                             # s = q k^T
            dk[hs] += wide_matmul(ds.transpose(1, 2), q[hs, rs])
        return dq, dk, dv, drel_h, drel_w, None, None


class AugmentedConv2d(nn.Module):
    """Attention-augmented convolution (paper Sec. 3.2): Concat[Conv(X), MHA(X)] on the channel axis.

    out_channels - dv channels come from a k x k convolution, dv from multi-head self-attention over all pixels with
    dk key/query channels split over num_heads heads. relative=True adds 2D relative position logits (Sec. 3.1.2)
    for grids up to `max_size` (an int or (H_in, W_in) of the largest input); smaller grids use the central rows of
    the tables, which are shared across heads as in the paper's code. dv = dk = 0 is exactly
    nn.Conv2d(in, out, k, stride, padding=k//2).

    pool_attention=True is the paper's memory saver for its largest feature maps (Sec. 4.2): the attention input is
    3x3 average pooled with stride 2 (N/4 pixels, N^2/16 logits), and the attention output is upsampled back by
    bilinear interpolation (`upsample_pooled`) before the concatenation.

    stride > 1 (a downsampling layer) is NOT described by the paper, whose code has no stride. Here the conv branch
    strides as usual and the attention branch attends on the output grid: its input is k x k average pooled with the
    same stride (padding k//2, padding not counted, as TensorFlow's 'SAME' pooling), so both branches land on the
    same grid and nothing needs upsampling. Attending at full resolution and subsampling the output would spend
    stride^4 times the logits on values that are then thrown away.

    fast=True computes the attention with `BlockwiseAttention` (no N x N tensor stored); fast=False with the simple
    form `attention_reference`, which tests use as the reference and --bench as the "before" layer.
    """

    def __init__(self, in_channels, out_channels, kernel_size, *, dk, dv, num_heads, relative=True, stride=1,
                 pool_attention=False, max_size=32, bias=True, fast=True):
        super().__init__()
        assert kernel_size % 2 == 1, f"kernel_size must be odd so the output keeps the grid (padding k//2), got {kernel_size}"
        assert 0 <= dv <= out_channels, f"dv={dv} must be in [0, out_channels={out_channels}]: dv channels of the output come from attention"
        assert dk >= 0 and (dk > 0) == (dv > 0), f"dk={dk}, dv={dv}: either both > 0 (attention branch) or both 0 (plain conv)"
        assert num_heads >= 1, f"num_heads must be >= 1, got {num_heads}"
        assert dk % num_heads == 0, f"dk={dk} must be divisible by num_heads={num_heads}: each head gets dk/Nh key dims"
        assert dv % num_heads == 0, f"dv={dv} must be divisible by num_heads={num_heads}: each head gets dv/Nh value dims"
        assert stride >= 1, f"stride must be >= 1, got {stride}"
        self.dk, self.dv, self.num_heads, self.relative, self.stride = dk, dv, num_heads, relative, stride
        self.kernel_size, self.pool_attention, self.fast = kernel_size, pool_attention, fast
        # conv branch: out_channels - dv output channels (None when upsilon = 1, i.e. fully attentional)
        self.conv = (nn.Conv2d(in_channels, out_channels - dv, kernel_size, stride=stride, padding=kernel_size // 2, bias=bias)
                     if out_channels > dv else None)
        if dv == 0:
            return
        self.qkv = nn.Conv2d(in_channels, 2 * dk + dv, 1, bias=bias)  # W_q, W_k, W_v of eq. 1 as one 1x1 conv
        self.attn_out = nn.Conv2d(dv, dv, 1, bias=bias)                # W^O of eq. 2
        if relative:
            max_h, max_w = (max_size, max_size) if isinstance(max_size, int) else max_size
            # the tables are sized for the grid attention works on: the output grid, halved again when pooled
            self.max_h, self.max_w = (pooled_size(pooled_size(n, stride), 2 if pool_attention else 1) for n in (max_h, max_w))
            dkh = dk // num_heads
            # r^H and r^W of eq. 3: one row per relative offset -(H-1)..H-1 and -(W-1)..W-1 (init as the paper's code)
            self.key_rel_h = nn.Parameter(torch.randn(2 * self.max_h - 1, dkh) * dkh ** -0.5)
            self.key_rel_w = nn.Parameter(torch.randn(2 * self.max_w - 1, dkh) * dkh ** -0.5)

    def attention_input(self, x):
        """The grid attention works on: x, k x k average pooled when strided, then 3x3/2 pooled when pool_attention."""
        if self.stride > 1:
            x = F.avg_pool2d(x, self.kernel_size, self.stride, padding=self.kernel_size // 2, count_include_pad=False)
        if self.pool_attention:
            x = F.avg_pool2d(x, 3, 2, padding=1, count_include_pad=False)
        return x

    def queries_keys_values(self, x):
        """x: (B, C, H, W) attention input -> q (scaled by dkh^-0.5), k: (B, Nh, N, dkh) and v: (B, Nh, N, dvh)."""
        B, _, H, W = x.shape
        Nh, N = self.num_heads, H * W
        q, k, v = self.qkv(x).split([self.dk, self.dk, self.dv], dim=1)  # (B, dk|dk|dv, H, W)
        q = q.reshape(B, Nh, self.dk // Nh, N).transpose(2, 3)           # (B, Nh, N, dkh)
        k = k.reshape(B, Nh, self.dk // Nh, N).transpose(2, 3)           # (B, Nh, N, dkh)
        v = v.reshape(B, Nh, self.dv // Nh, N).transpose(2, 3)           # (B, Nh, N, dvh)
        return q * (self.dk // Nh) ** -0.5, k, v  # eq. 1/3: 1/sqrt(dkh) scales content and relative logits alike

    def relative_logits(self, q, H, W):
        """2D relative logits (eq. 3), in broadcastable form: q: (B, Nh, N, dkh) ->
        rel_h: (B, Nh, H, W, H, 1) = q_i . r^H_{j_y - i_y},  rel_w: (B, Nh, H, W, 1, W) = q_i . r^W_{j_x - i_x}.
        Added to the (B, Nh, H, W, H, W) view of the content logits they broadcast; never repeated in memory."""
        assert H <= self.max_h and W <= self.max_w, (
            f"attention grid {H}x{W} is larger than the relative embeddings ({self.max_h}x{self.max_w}); "
            f"build the layer with max_size=(H_in, W_in) of the largest input")
        B, Nh, _, dkh = q.shape
        q = q.reshape(B, Nh, H, W, dkh)                                   # (B, Nh, H, W, dkh)
        # the tables hold offsets up to the largest grid; a smaller grid uses the centre rows (offsets -(W-1)..W-1)
        rel_w_table = self.key_rel_w[self.max_w - W: self.max_w + W - 1]  # (2W-1, dkh)
        rel_h_table = self.key_rel_h[self.max_h - H: self.max_h + H - 1]  # (2H-1, dkh)
        rel_w = relative_logits_1d(q, rel_w_table)                        # (B, Nh, H, W, W):  [y, x, x']
        rel_h = relative_logits_1d(q.transpose(2, 3), rel_h_table)        # (B, Nh, W, H, H):  [x, y, y']
        rel_h = rel_h.transpose(2, 3)                                     # (B, Nh, H, W, H):  [y, x, y']
        return rel_h.unsqueeze(-1), rel_w.unsqueeze(-2)                   # (B,Nh,H,W,H,1), (B,Nh,H,W,1,W)

    def attention_logits(self, q, k, H, W):
        """Content + relative logits (eq. 3): (B, Nh, N, N); row i = query pixel i, column j = key pixel j."""
        B, Nh, N, _ = q.shape
        logits = q @ k.transpose(2, 3)                                    # (B, Nh, N, N) content term q_i . k_j
        if self.relative:
            rel_h, rel_w = self.relative_logits(q, H, W)
            # add in place through a (B, Nh, H, W, H, W) view: rel_h broadcasts over the key's x, rel_w over its y
            logits.view(B, Nh, H, W, H, W).add_(rel_h).add_(rel_w)
        return logits

    def attention_reference(self, q, k, v, H, W):
        """The simple form of eq. 1: softmax over the materialised (B, Nh, N, N) logits, times v -> (B, Nh, N, dvh)."""
        return self.attention_logits(q, k, H, W).softmax(dim=-1) @ v

    def attention_fast(self, q, k, v, H, W):
        """The same as attention_reference, by BlockwiseAttention: (B, Nh, N, dvh), no N x N tensor kept."""
        B, Nh, N, _ = q.shape
        rel_h = rel_w = None
        if self.relative:
            rel_h, rel_w = (t.reshape(B * Nh, N, -1) for t in self.relative_logits(q, H, W))  # (G, N, H), (G, N, W)
        flat = lambda t: t.reshape(B * Nh, N, t.shape[-1])                                    # (G, N, d)
        o = BlockwiseAttention.apply(flat(q), flat(k), flat(v), rel_h, rel_w, H, W)
        return o.view(B, Nh, N, -1)                                                           # (B, Nh, N, dvh)

    def attention_maps(self, x):
        """Softmax attention weights (B, Nh, N, N) for input x (B, C, H_in, W_in); for plots and tests."""
        a = self.attention_input(x)
        q, k, _ = self.queries_keys_values(a)
        return self.attention_logits(q, k, a.shape[2], a.shape[3]).softmax(dim=-1)

    def attend(self, x):
        """The attention branch MHA(X) of eq. 2: (B, C, H_in, W_in) -> (B, dv, H', W') on the conv's output grid."""
        a = self.attention_input(x)
        B, _, H, W = a.shape
        q, k, v = self.queries_keys_values(a)
        o = (self.attention_fast if self.fast else self.attention_reference)(q, k, v, H, W)  # (B, Nh, N, dvh)
        o = o.transpose(2, 3).reshape(B, self.dv, H, W)                   # (B, dv, H, W): heads concatenated
        o = self.attn_out(o)                                              # W^O of eq. 2
        if self.pool_attention:  # back to the output grid (W^O is 1x1 and bilinear weights sum to 1: they commute)
            o = upsample_pooled(o, [pooled_size(n, self.stride) for n in x.shape[2:]])
        return o

    def forward(self, x):
        if self.dv == 0:
            return self.conv(x)                                           # upsilon = 0: a plain convolution
        att = self.attend(x)                                              # (B, dv, H', W')
        if self.conv is None:
            return att                                                    # upsilon = 1: fully attentional
        return torch.cat([self.conv(x), att], dim=1)                      # (B, out_channels, H', W'), Sec. 3.2


# ------------------------------------------------------------------------------------------------ model

def aa_channels(f_out, *, num_heads, kappa, upsilon, min_dkh=0):
    """(dk, dv) for a layer with f_out output channels: kappa*F_out and upsilon*F_out rounded to a multiple of Nh
    (at least one dim per head); dk at least min_dkh per head (the paper's CIFAR runs use 20)."""
    to_heads = lambda c: max(num_heads, num_heads * round(c / num_heads))
    dk = max(to_heads(kappa * f_out), min_dkh * num_heads)
    dv = min(to_heads(upsilon * f_out), f_out // num_heads * num_heads)
    return dk, dv


class BasicBlock(nn.Module):
    """Post-activation ResNet block: conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU. With `aa` (dict of
    AugmentedConv2d keyword args) its FIRST convolution is attention-augmented, as the paper does on CIFAR."""

    def __init__(self, in_ch, out_ch, *, stride, aa=None, max_size=32):
        super().__init__()
        if aa:
            self.conv1 = AugmentedConv2d(in_ch, out_ch, 3, stride=stride, bias=False, max_size=max_size, **aa)
        else:
            self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_ch != out_ch:  # projection shortcut when the shape changes
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet: 3x3 stem, three stages (stride 1, 2, 2), global average pool, linear head. Blocks of the stages
    in aa_stages get an attention-augmented first conv (none: the baseline); in pool_stages its attention input is
    pooled and its output upsampled (the paper's memory saver for the largest grids)."""

    def __init__(self, *, num_classes, widths=(32, 64, 128), blocks=(1, 1, 1), aa_stages=(), pool_stages=(),
                 num_heads=4, kappa=0.5, upsilon=0.25, min_dkh=0, relative=True, image_size=32):
        super().__init__()
        assert len(widths) == len(blocks) == 3, f"widths {widths} and blocks {blocks} must both have 3 stages"
        assert all(s in (1, 2, 3) for s in (*aa_stages, *pool_stages)), f"stages {aa_stages} {pool_stages} must be 1, 2 or 3"
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, in_ch, size = [], widths[0], image_size
        for stage, (w, n) in enumerate(zip(widths, blocks), start=1):
            for b in range(n):
                stride = 2 if stage > 1 and b == 0 else 1
                aa = None
                if stage in aa_stages:
                    dk, dv = aa_channels(w, num_heads=num_heads, kappa=kappa, upsilon=upsilon, min_dkh=min_dkh)
                    aa = dict(dk=dk, dv=dv, num_heads=num_heads, relative=relative, pool_attention=stage in pool_stages)
                layers.append(BasicBlock(in_ch, w, stride=stride, aa=aa, max_size=size))
                in_ch, size = w, pooled_size(size, stride)
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(in_ch, num_classes)
        # channels-last (B, H, W, C) storage: the same numbers, but CPU (oneDNN) convolutions ran 1.45x faster in
        # training (measured, this 2-core machine); GPUs with mixed precision prefer it too
        self.to(memory_format=torch.channels_last)

    def forward(self, x):
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.blocks(self.stem(x))               # (B, C, H/4, W/4)
        return self.head(x.mean(dim=(2, 3)))        # (B, num_classes)


def build_model(args, num_classes, *, augmented):
    return ResNet(num_classes=num_classes, widths=args.widths, blocks=args.blocks,
                  aa_stages=args.aa_stages if augmented else (), pool_stages=args.pool_stages,
                  num_heads=args.num_heads, kappa=args.kappa, upsilon=args.upsilon, min_dkh=args.min_dkh,
                  relative=not args.no_relative, image_size=args.image_size)


@torch.no_grad()
def make_arm(args, num_classes, seed, *, augmented):
    """One arm of a seed pair. Both arms draw the ResNet from `seed` first, so every weight they share starts equal:
    the AA-ResNet takes the ResNet's value of every same-named tensor (stem, BatchNorms, second convs, shortcuts,
    head) and, in each augmented conv, the ResNet conv's first F_out - dv filters for its conv branch (attention
    takes the place of the other dv). Only the attention weights (q, k, v, W^O, r^H, r^W) are its own."""
    torch.manual_seed(seed)
    base = build_model(args, num_classes, augmented=False)
    if not augmented:
        return base
    model = build_model(args, num_classes, augmented=True)  # attention weights: drawn after the ResNet's
    utils.copy_shared_init(base, model)
    for name, m in model.named_modules():
        if isinstance(m, AugmentedConv2d) and m.conv is not None:
            m.conv.weight.copy_(base.get_submodule(name).weight[:m.conv.out_channels])
    return model


def full_preset_models(num_classes=10):
    """Every model the full preset trains, at its real size: name -> (model, step_fn or None, image_size).
    tests/test_utils.py runs one bf16-autocast training step of each on a CPU, so a full GPU run is known to start."""
    args = get_args([])
    return {name: (make_arm(args, num_classes, 0, augmented=aug), None, args.image_size)
            for name, aug in (("ResNet", False), ("AA-ResNet", True))}


# ------------------------------------------------------------------------------------------------ data

def pin_counts(args, data):
    """Fix the preset's image counts at what this dataset gave (utils shrinks them to fit a small dataset, with one
    note), so that every worker process loads the same counts without fitting and printing again."""
    per_class = lambda y: int(torch.bincount(y).min())
    for key, y in (("train_per_class", data.y_train), ("val_per_class", data.y_val), ("test_per_class", data.y_test)):
        if key in args.preset_keys and getattr(args, key):
            setattr(args, key, per_class(y))
    args.preset_keys = [k for k in args.preset_keys if k not in utils.COUNT_FLAGS]


def normalised(data, x_u8, device):
    """uint8 test images -> the network's input, normalised as the loaders do."""
    mean = torch.tensor(data.mean).view(1, -1, 1, 1) * 255
    std = torch.tensor(data.std).view(1, -1, 1, 1) * 255
    return ((x_u8.float() - mean) / std).to(device)


# ------------------------------------------------------------------------------------------------ train

def train_arm(args, data, seed, augmented, split="test"):
    """Train and score one arm of one seed. The seed fixes the data subset (already in `data`), the initial weights
    (shared with the other arm, see make_arm) and the batches, so the two arms of a seed differ only by the
    attention. Scores on the test split, or for the pilot on the validation split carved from train. Returns
    numbers, plus the trained AA-ResNet's weights for the first seed (the maps experiment looks at them)."""
    t0 = time.time()
    device = utils.get_device(args.device)
    model = make_arm(args, data.num_classes, seed, augmented=augmented).to(device)
    train_loader, val_loader, test_loader = utils.make_loaders(data, batch_size=args.batch_size, device=device, seed=seed,
                                                               eval_batch_size=EVAL_BATCH)
    name = f"{ARMS[augmented]} seed {seed}"
    hist = utils.train(model, train_loader, epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                       optimizer=args.optimizer, warmup_epochs=args.warmup_epochs, name=name + " ",
                       log=print if seed == args.seed else (lambda line: None))  # epoch lines of the first pair only
    score = utils.evaluate(model, val_loader if split == "val" else test_loader)
    speeds = sorted(h["img_per_s"] for h in hist)
    res = dict(seed=seed, arm=ARMS[augmented], acc=score.acc, nll=score.nll, train_loss=hist[-1]["loss"],
               train_acc=hist[-1]["train_acc"], img_per_s=speeds[len(speeds) // 2], images=len(data.y_train),
               steps=args.epochs * len(train_loader), seconds=round(time.time() - t0, 1))
    print(f"  [{name}] {split} {score.acc:.2f}% NLL {score.nll:.4f} | train loss {res['train_loss']:.3f} "
          f"acc {res['train_acc']:.1f}% | {res['steps']} steps, {res['seconds']:.0f}s", flush=True)
    if augmented and seed == args.seed:
        res["state"] = {k: v.cpu() for k, v in model.state_dict().items()}
    return res


def run_pair(args, seed, split="test"):
    """One job for utils.run_jobs: the seed's data subset (loaded once) and both arms trained on it."""
    data = utils.data_from_args(args, seed=seed)
    return [train_arm(args, data, seed, augmented, split) for augmented in (True, False)]


# ------------------------------------------------------------------------------------------------ experiments

def arm_row(args, data, device, arm, runs):
    """One line of the comparison table: size and cost of the arm's model, and its scores over the seeds."""
    model = make_arm(args, data.num_classes, args.seed, augmented=arm == ARMS[True]).to(device)
    shape = (3, args.image_size, args.image_size)
    _, mem = utils.measure_step(model, shape, batch_size=args.measure_batch, num_classes=data.num_classes,
                                steps=1, warmup=1, device=device)
    speeds = sorted(r["img_per_s"] for r in runs)
    return dict(model=arm, params=utils.count_params(model), flops=utils.count_flops(model, shape, device),
                memory_mb=mem, img_per_s=speeds[len(speeds) // 2], acc=utils.mean_ci([r["acc"] for r in runs]),
                nll=utils.mean_ci([r["nll"] for r in runs]), n=len(runs))


def format_table(rows, split):
    ci = lambda m, lo, hi, d: f"{m:.{d}f} [{lo:.{d}f}, {hi:.{d}f}]"
    head = (f"{'model':10s} {'params':>8s} {'MFLOPs':>7s} {'memory MB':>9s} {'img/s':>6s} "
            f"{split + ' acc % [95% CI]':>24s} {split + ' NLL [95% CI]':>25s}  n")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:10s} {r['params']:8d} {r['flops'] / 1e6:7.1f} {r['memory_mb']:9.1f} {r['img_per_s']:6.0f} "
                     f"{ci(*r['acc'], 2):>24s} {ci(*r['nll'], 4):>25s}  {r['n']}")
    return "\n".join(lines)


def exp_compare(args, data, device, out, *, split="test"):
    """AA-ResNet vs ResNet, paired: seeds args.seed .. args.seed + seeds - 1, both arms per seed, scored on the full
    test split (or on validation, for the pilot). Verdicts by utils.compare_paired on accuracy and NLL."""
    seeds = list(range(args.seed, args.seed + args.seeds))
    print(f"== compare: {len(seeds)} paired seeds x 2 arms, {args.epochs} epochs each, {args.workers} worker(s), "
          f"scored on {split} ==", flush=True)
    runs = [r for pair in utils.run_jobs(run_pair, [(args, s, split) for s in seeds], workers=args.workers) for r in pair]
    state = next(r.pop("state") for r in runs if "state" in r)
    by = {(r["arm"], r["seed"]): r for r in runs}
    rows = [arm_row(args, data, device, arm, [by[arm, s] for s in seeds]) for arm in (ARMS[False], ARMS[True])]
    table = format_table(rows, split)
    print("\n" + table)
    aa_runs, base_runs = [by[ARMS[True], s] for s in seeds], [by[ARMS[False], s] for s in seeds]
    verdicts = {
        "acc": utils.compare_paired([r["acc"] for r in aa_runs], [r["acc"] for r in base_runs],
                                    name_a=ARMS[True], name_b=ARMS[False], bound=1.0),
        "nll": utils.compare_paired([r["nll"] for r in aa_runs], [r["nll"] for r in base_runs],
                                    name_a=ARMS[True], name_b=ARMS[False], unit="nats", digits=3,
                                    higher_is_better=False, bound=0.02)}
    return dict(split=split, seeds=seeds, rows=rows, table=table, verdicts=verdicts, runs=runs), state


def exp_pilot(args, data, device, out):
    """Power planning, never on test: the paired design on a validation split carved from the training images.
    The SD of the per-seed accuracy difference decides how many pairs a 95% CI half-width <= 1 point needs."""
    res, _ = exp_compare(args, data, device, out, split="val")
    d = res["verdicts"]["acc"]["per_pair"]
    sd = statistics.stdev(d)
    n_needed = next(n for n in range(2, 10 ** 4) if utils.t95(n - 1) * sd / math.sqrt(n) <= 1.0)
    pair_s = sum(r["seconds"] for r in res["runs"]) / len(d)
    res.update(sd_diff=sd, n_needed=n_needed, pair_cpu_s=pair_s)
    print(f"pilot: per-seed differences {['%+.2f' % x for x in d]}, SD {sd:.2f} points -> {n_needed} pairs give a "
          f"95% CI half-width <= 1 point; one pair costs {pair_s:.0f} CPU-seconds (~{n_needed * pair_s / 2:.0f} s "
          f"of wall time on 2 workers)", flush=True)
    return res


@torch.no_grad()
def attention_stats(model, x):
    """Attention weights of every AA layer for inputs x: [(layer name, maps (B, Nh, N, N))]."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, AugmentedConv2d) and m.dv > 0]
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, inp, n=n: inputs.update({n: inp[0]})) for n, m in layers]
    model.eval()
    model(x)
    for h in hooks:
        h.remove()
    return [(n, m.attention_maps(inputs[n])) for n, m in layers]


def head_summary(maps):
    """Per head: mean over images and queries of the largest weight, and of the entropy (nats) of the map."""
    top = maps.amax(-1).mean(dim=(0, 2))                                   # (Nh,)
    entropy = -(maps * maps.clamp_min(1e-12).log()).sum(-1).mean(dim=(0, 2))  # (Nh,)
    return top.tolist(), entropy.tolist()


def plot_attention(maps_trained, maps_init, x_u8, titles, path, *, query):
    """Rows: test images with the trained model's heads, then the first image at init; one colour scale for all
    panels (0 .. the largest weight shown), and each panel's max weight next to 1/N, so a near-uniform map looks
    flat instead of being stretched to full contrast."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n, nh, H, W = maps_trained.shape                                  # one query's row, reshaped to the grid
    rows = [(maps_trained[r], x_u8[r], titles[r]) for r in range(n)] + [(maps_init[0], x_u8[0], f"{titles[0]}, at init")]
    vmax = float(max(maps_trained.max(), maps_init.max()))
    img_h, img_w = x_u8.shape[2:]
    qy, qx = query
    cy, cx = (qy + 0.5) * img_h / H - 0.5, (qx + 0.5) * img_w / W - 0.5  # the query's centre in image pixels
    fig, axes = plt.subplots(len(rows), nh + 1, figsize=(1.9 * (nh + 1) + 0.6, 1.9 * len(rows)), squeeze=False)
    for r, (maps, img, title) in enumerate(rows):
        axes[r, 0].imshow(img.permute(1, 2, 0).numpy())
        axes[r, 0].plot([cx], [cy], marker="x", color="red", markersize=9, mew=2)
        axes[r, 0].set_title(title, fontsize=8)
        for h in range(nh):
            im = axes[r, h + 1].imshow(maps[h].numpy(), cmap="inferno", vmin=0, vmax=vmax, interpolation="nearest",
                                       extent=(-0.5, img_w - 0.5, img_h - 0.5, -0.5))
            axes[r, h + 1].plot([cx], [cy], marker="x", color="cyan", markersize=7, mew=1.5)
            axes[r, h + 1].set_title(f"head {h + 1}: max {float(maps[h].max()):.3f}", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.6, label="attention weight")
    fig.suptitle(f"AA-ResNet, first attention layer ({H}x{W} grid): weights of query pixel ({qy},{qx}) (x), one colour "
                 f"scale; uniform = 1/N = {1 / (H * W):.3f}", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def exp_maps(args, data, device, out, state=None, *, num_images=64):
    """Where the trained heads look (paper Fig. 3-like), against the very same network at init: per head the mean
    largest weight (uniform = 1/N) and the mean entropy (uniform = log N), plus the figure."""
    if state is None:  # --experiment maps alone: train the first seed's AA-ResNet
        state = train_arm(args, data, args.seed, True)["state"]
    init = make_arm(args, data.num_classes, args.seed, augmented=True).to(device)
    trained = copy.deepcopy(init)
    trained.load_state_dict(state)
    x_u8 = data.x_test[:num_images]
    x = normalised(data, x_u8, device)
    stats = []
    print(f"{'layer':18s} {'head':>4s} {'max weight trained / init':>26s} {'1/N':>6s} {'entropy trained / init':>23s} {'log N':>6s}")
    for (name, mt), (_, mi) in zip(attention_stats(trained, x), attention_stats(init, x)):
        N = mt.shape[-1]
        (top_t, ent_t), (top_i, ent_i) = head_summary(mt), head_summary(mi)
        for h in range(mt.shape[1]):
            print(f"{name:18s} {h + 1:4d} {top_t[h]:12.3f} / {top_i[h]:.3f} {1 / N:15.3f} {ent_t[h]:10.2f} / {ent_i[h]:.2f} "
                  f"{math.log(N):11.2f}")
        stats.append(dict(layer=name, N=N, max_weight=top_t, max_weight_init=top_i, entropy=ent_t, entropy_init=ent_i))
    # the figure: the first AA layer, one query near the centre, the first test image of the first classes
    (name, mt), (_, mi) = attention_stats(trained, x)[0], attention_stats(init, x)[0]
    H = W = int(math.isqrt(mt.shape[-1]))
    qy, qx = H // 2, W // 2
    idx = [int(torch.nonzero(data.y_test[:num_images] == c)[0]) for c in range(data.num_classes)
           if (data.y_test[:num_images] == c).any()][:4]
    row = lambda m: m[idx][:, :, qy * W + qx].reshape(len(idx), -1, H, W).cpu()  # (n, Nh, H, W)
    fig = plot_attention(row(mt), row(mi), x_u8[idx], [data.classes[int(data.y_test[i])] for i in idx],
                         os.path.join(out, "attention_maps.png"), query=(qy, qx))
    print(f"wrote {fig}")
    return dict(stats=stats, figure=fig, images=num_images)


def peak_memory_mb(step, device):
    """Memory one call of step() adds at its peak, in MB. CUDA: the allocator's peak. Linux CPU: the peak resident
    memory of this process (VmHWM), after handing freed heap back to the OS (glibc malloc_trim) and resetting the
    peak (clear_refs 5), so every byte the step touches counts. None where neither exists."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2 ** 20
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        status = lambda: {l.split(":")[0]: int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("Vm")}
        before = status()["VmRSS"]
        step()
        return (status()["VmHWM"] - before) / 1024
    except OSError:
        return None


def exp_bench(args, device):
    """Forward + backward of one AA layer, the simple form ("before", today's layer) and BlockwiseAttention ("after")
    on the same weights, side by side; plus the paper's pooled attention and a plain 3x3 conv."""
    C, Nh, dk, dv = 64, 4, 32, 16  # kappa = 0.5, upsilon = 0.25: a 64-channel layer
    print(f"== bench: layer {C}->{C} channels, 3x3, dk={dk}, dv={dv}, Nh={Nh}; forward + backward of the spatially "
          f"averaged output; memory = peak added by one step ==", flush=True)
    rows = []
    for size in args.bench_sizes:
        N = size * size
        # the simple form holds several (B, Nh, N, N) tensors: one must stay below 0.5 GiB on a (shared) CPU and 1/8
        # of a GPU's memory (at 64x64 and batch 128 it would be 34 GB)
        budget = torch.cuda.get_device_properties(device).total_memory // 8 if device.type == "cuda" else 2 ** 29
        batch = max(1, min(args.bench_batch, budget // (Nh * N * N * 4)))
        torch.manual_seed(args.seed)
        layer = AugmentedConv2d(C, C, 3, dk=dk, dv=dv, num_heads=Nh, max_size=size).to(device)
        pooled = AugmentedConv2d(C, C, 3, dk=dk, dv=dv, num_heads=Nh, max_size=size, pool_attention=True).to(device)
        x = torch.randn(batch, C, size, size, device=device)
        for name, m, fast in (("before: simple form", layer, False), ("after: blockwise", layer, True),
                              ("after + pooled attn", pooled, True), ("plain 3x3 conv", nn.Conv2d(C, C, 3, padding=1).to(device), None)):
            if fast is not None:
                m.fast = fast
            step = lambda: m(x).mean(dim=(2, 3)).sum().backward()
            step()  # warm-up
            t0 = time.time()
            for _ in range(args.bench_steps):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            ms = 1000 * (time.time() - t0) / args.bench_steps
            rows.append(dict(size=size, batch=batch, layer=name, ms_per_step=ms, peak_mb=peak_memory_mb(step, device)))
            print(f"  {size}x{size} batch {batch:3d} {name:20s} {ms:9.1f} ms/step  peak {rows[-1]['peak_mb'] or float('nan'):8.1f} MB",
                  flush=True)
        before, after = rows[-4], rows[-3]
        print(f"  {size}x{size}: after is {before['ms_per_step'] / after['ms_per_step']:.2f}x faster than before, peak "
              f"memory {after['peak_mb'] or float('nan'):.0f} vs {before['peak_mb'] or float('nan'):.0f} MB", flush=True)
    return dict(rows=rows)


# ------------------------------------------------------------------------------------------------ main

def describe(args, data):
    print(f"data: {len(data.y_train)} train / {len(data.y_val)} val / {len(data.y_test)} test images, "
          f"{data.num_classes} classes; ResNet widths {args.widths}, blocks {args.blocks}", flush=True)
    for stage, w in zip((1, 2, 3), args.widths):
        if stage in args.aa_stages:
            dk, dv = aa_channels(w, num_heads=args.num_heads, kappa=args.kappa, upsilon=args.upsilon, min_dkh=args.min_dkh)
            print(f"  AA in stage {stage}: F_out={w}, Nh={args.num_heads}, dk={dk} ({dk // args.num_heads}/head), "
                  f"dv={dv} ({dv // args.num_heads}/head), relative={not args.no_relative}, "
                  f"pooled attention={stage in args.pool_stages}", flush=True)


def main(argv=None):
    args = get_args(argv)
    device, out = utils.start(args, "02_aa_conv")
    config = {k: v for k, v in vars(args).items()}
    if args.bench:
        res = exp_bench(args, device)
        utils.save_results(os.path.join(out, "bench.json"), config, res)
        return res
    data = utils.data_from_args(args)
    pin_counts(args, data)
    describe(args, data)
    todo = ("compare", "maps") if args.experiment == "all" else (args.experiment,)
    results, state = {}, None
    for name in todo:
        t0 = time.time()
        if name == "compare":
            results[name], state = exp_compare(args, data, device, out)
        else:
            results[name] = exp_pilot(args, data, device, out) if name == "pilot" else exp_maps(args, data, device, out, state)
        results[name]["wall_s"] = round(time.time() - t0, 1)
        utils.save_results(os.path.join(out, f"{name}.json"), config, results[name])
        print(f"== {name} done in {results[name]['wall_s']:.0f}s -> {out}/{name}.json ==", flush=True)
    return results


if __name__ == "__main__":
    utils.run_main(main)
