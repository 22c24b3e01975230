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

The experiment: a small CIFAR ResNet and the same ResNet whose first 3x3 convolution of each residual block is
attention-augmented (the paper's CIFAR recipe), on real CIFAR-10, plus the attention maps of the heads for one
query pixel on test images, plus a micro-benchmark of the layer (`--bench`).

Run:
    python 02_aa_conv.py --quick --threads 1 --data ../shared/data/cifar10   # ~3 min on a 2-core CPU
    python 02_aa_conv.py --data ../shared/data/cifar10             # full preset: one GPU, full CIFAR-10
    python 02_aa_conv.py --bench --threads 1                       # layer micro-benchmark

RESULTS (--quick, real CIFAR-10 subset, 2-core shared CPU; see runs/02_aa_conv/results.json):
    `python 02_aa_conv.py --quick --threads 1 --data ../shared/data/cifar10`: 173 s wall (under the CPU lock)
    2000 train / 2000 test images, 6 epochs, 3 seeds; AA (Nh=4, kappa=0.5, upsilon=0.25) in stage 3 only
    model         params   MFLOPs  memory MB train img/s  test acc % (mean ± std)
    ResNet        152026     34.4      138.1         549       41.05 ± 1.84 (n=3)
    AA-ResNet     146874     34.8      187.1         407       42.15 ± 1.39 (n=3)
    AA is +1.10 points, inside the seed noise: at this scale it does NOT clearly beat the baseline.
    --bench (CPU, 1 thread; 64->64 channels, dk=32, dv=16, Nh=4; batch lowered from 128 to 32 / 2 so one
    logit tensor stays < 0.5 GiB; memory = autograd-saved bytes):
      32x32 b32: AA relative 4565 ms/step 1060 MB | AA no-rel 2667 ms 1052 MB | plain conv 68 ms 8 MB
      64x64 b2 : AA relative 4550 ms/step 1033 MB | AA no-rel 2840 ms 1031 MB | plain conv 17 ms 2 MB
    Relative logits cost +0.8% memory (broadcast, never repeated) but ~1.6-1.7x time on this memory-bound CPU.
The full preset was NOT measured: no GPU was available when this script was written.

Letters used in shape comments:
    B batch, C channels, H x W spatial size (of the attention grid after any stride), N = H*W pixels,
    Nh heads, dk / dv total key / value depth, dkh = dk/Nh and dvh = dv/Nh per head, L a generic length.
"""
import argparse
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import utils

# ------------------------------------------------------------------------------------------------ config

PRESETS = {
    # 2-core CPU, < 5 minutes for 2 models x 3 seeds: a small ResNet-10 (widths 16/32/64, blocks 1/1/2).
    # Attention only in stage 3 (an 8x8 grid, two AA layers: one strided, one not). The paper too augments
    # "starting from the last layer until we hit memory constraints"; on this CPU a 16x16 grid already made the
    # AA model 5x slower than the baseline (softmax and N x N logits are memory-bound), a 32x32 grid far more.
    # kappa = 2*upsilon as in the paper, but 0.5/0.25 instead of 0.2/0.1 and 4 heads instead of 8: at width 64
    # the paper's values would leave 1-2 key dims per head. Result: dk = 32 (8 per head), dv = 16 (4 per head).
    "quick": dict(widths=(16, 32, 64), blocks=(1, 1, 2), aa_stages=(3,), num_heads=4, kappa=0.5, upsilon=0.25,
                  min_dkh=0, epochs=6, batch_size=64, lr=3e-3, weight_decay=0.05, optimizer="adamw",
                  train_per_class=200, test_per_class=200, seeds=3),
    # one GPU, full CIFAR-10: a wide ResNet-14 (widths 128/256/512, two blocks per stage), attention in every
    # block (the 32x32 grid included), with the paper's CIFAR values: Nh = 8, kappa = 2*upsilon = 0.2 and at
    # least 20 key dims per head.
    "full": dict(widths=(128, 256, 512), blocks=(2, 2, 2), aa_stages=(1, 2, 3), num_heads=8, kappa=0.2,
                 upsilon=0.1, min_dkh=20, epochs=100, batch_size=128, lr=0.1, weight_decay=5e-4, optimizer="sgd",
                 train_per_class=None, test_per_class=None, seeds=3),
}


def build_parser():
    p = utils.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    utils.add_common_args(p)
    p.add_argument("--quick", action="store_true", help="small CPU preset (~5 min); default: the full GPU preset")
    p.add_argument("--bench", action="store_true", help="only run the AugmentedConv2d micro-benchmark")
    p.add_argument("--epochs", type=utils.positive_int, default=None, help="override the preset's epochs")
    p.add_argument("--seeds", type=utils.positive_int, default=None, help="training runs per model (seed, seed+1, ...)")
    p.add_argument("--batch-size", type=utils.positive_int, default=None)
    p.add_argument("--widths", type=utils.positive_int, nargs=3, default=None, help="channels of the 3 ResNet stages")
    p.add_argument("--num-heads", type=utils.positive_int, default=None, help="Nh")
    p.add_argument("--kappa", type=utils.positive_float, default=None, help="dk / F_out")
    p.add_argument("--upsilon", type=utils.positive_float, default=None, help="dv / F_out")
    p.add_argument("--no-relative", action="store_true", help="AA model without relative position logits")
    p.add_argument("--blocks", type=utils.positive_int, nargs=3, default=None, help="residual blocks per stage")
    p.add_argument("--aa-stages", type=int, nargs="*", default=None, help="stages (1-3) whose blocks get AA convs")
    p.add_argument("--measure-batch", type=utils.positive_int, default=128, help="batch for the img/s and memory columns")
    p.add_argument("--bench-sizes", type=utils.positive_int, nargs="+", default=[32, 64], help="benchmark input sizes (square)")
    p.add_argument("--bench-batch", type=utils.positive_int, default=128,
                   help="benchmark batch; lowered (and printed) where one (B, Nh, N, N) fp32 logit tensor would exceed "
                        "0.5 GiB on a CPU or 1/8 of the GPU memory")
    return p


def resolve_config(args):
    """Preset values, overridden by any flag given explicitly on the command line."""
    cfg = dict(PRESETS["quick" if args.quick else "full"])
    for key in ("epochs", "seeds", "batch_size", "num_heads", "kappa", "upsilon"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    for key in ("widths", "blocks", "aa_stages"):
        if getattr(args, key) is not None:
            cfg[key] = tuple(getattr(args, key))
    args.preset_keys = [k for k in ("train_per_class", "test_per_class") if getattr(args, k) is None]
    if args.train_per_class is None:
        args.train_per_class = cfg["train_per_class"]
    if args.test_per_class is None:
        args.test_per_class = cfg["test_per_class"]
    cfg.update(relative=not args.no_relative, train_per_class=args.train_per_class,
               test_per_class=args.test_per_class, image_size=args.image_size)
    assert cfg["epochs"] >= 1 and cfg["seeds"] >= 1, "--epochs and --seeds must be >= 1"
    return cfg


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


class AugmentedConv2d(nn.Module):
    """Attention-augmented convolution (paper Sec. 3.2): Concat[Conv(X), MHA(X)] on the channel axis.

    out_channels - dv channels come from a k x k convolution, dv from multi-head self-attention over all pixels with
    dk key/query channels split over num_heads heads. relative=True adds 2D relative position logits (Sec. 3.1.2)
    for inputs up to `max_size` (an int or (H_in, W_in)); smaller inputs use the central rows of the tables. The
    tables are shared across heads, as in the paper's code. dv=0 (and dk=0) is exactly nn.Conv2d(in, out, k, stride, padding=k//2).

    stride > 1: the conv branch strides as usual. The attention branch first average-pools its input with a
    k x k window and the same stride (padding k//2, so both branches land on the same grid). This is what the paper
    does to the attention input of layers with large feature maps (3x3 average pooling with stride 2, Sec. 4) and it
    costs (N/stride^2)^2 logits instead of N^2; attending at full resolution and subsampling the output would spend
    4x the memory on logits that are then thrown away.
    """

    def __init__(self, in_channels, out_channels, kernel_size, *, dk, dv, num_heads, relative=True, stride=1,
                 max_size=32, bias=True):
        super().__init__()
        assert kernel_size % 2 == 1, f"kernel_size must be odd so the output keeps the grid (padding k//2), got {kernel_size}"
        assert 0 <= dv <= out_channels, f"dv={dv} must be in [0, out_channels={out_channels}]: dv channels of the output come from attention"
        assert dk >= 0 and (dk > 0) == (dv > 0), f"dk={dk}, dv={dv}: either both > 0 (attention branch) or both 0 (plain conv)"
        assert num_heads >= 1, f"num_heads must be >= 1, got {num_heads}"
        assert dk % num_heads == 0, f"dk={dk} must be divisible by num_heads={num_heads}: each head gets dk/Nh key dims"
        assert dv % num_heads == 0, f"dv={dv} must be divisible by num_heads={num_heads}: each head gets dv/Nh value dims"
        assert stride >= 1, f"stride must be >= 1, got {stride}"
        self.dk, self.dv, self.num_heads, self.relative, self.stride = dk, dv, num_heads, relative, stride
        self.kernel_size = kernel_size
        # conv branch: out_channels - dv output channels (may be 0 when upsilon = 1, i.e. fully attentional)
        self.conv = (nn.Conv2d(in_channels, out_channels - dv, kernel_size, stride=stride, padding=kernel_size // 2, bias=bias)
                     if out_channels > dv else None)
        if dv == 0:
            return
        self.qkv = nn.Conv2d(in_channels, 2 * dk + dv, 1, bias=bias)  # W_q, W_k, W_v of eq. 1 as one 1x1 conv
        self.attn_out = nn.Conv2d(dv, dv, 1, bias=bias)                # W^O of eq. 2
        if relative:
            max_h, max_w = (max_size, max_size) if isinstance(max_size, int) else max_size
            # the attention grid of the largest input: stride s maps H to (H-1)//s + 1, like the conv branch
            self.max_h, self.max_w = (max_h - 1) // stride + 1, (max_w - 1) // stride + 1
            dkh = dk // num_heads
            # r^H and r^W of eq. 3: one row per relative offset -(H-1)..H-1 and -(W-1)..W-1 (init as the paper's code)
            self.key_rel_h = nn.Parameter(torch.randn(2 * self.max_h - 1, dkh) * dkh ** -0.5)
            self.key_rel_w = nn.Parameter(torch.randn(2 * self.max_w - 1, dkh) * dkh ** -0.5)

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
            # add in place through a (B, Nh, H, W, H, W) view: rel_h broadcasts over the key's x, rel_w over its y.
            # No (B, Nh, N, N) copy of either term, not even a temporary (matmul's backward needs q and k, not
            # its output, so writing into it is safe for autograd)
            logits.view(B, Nh, H, W, H, W).add_(rel_h).add_(rel_w)
        return logits

    def attention_input(self, x):
        """The grid the attention branch works on: x itself, or k x k average pooled when strided (see class doc)."""
        if self.stride == 1:
            return x
        return F.avg_pool2d(x, self.kernel_size, self.stride, padding=self.kernel_size // 2, count_include_pad=False)

    def attention_maps(self, x):
        """Softmax attention weights (B, Nh, N, N) for input x (B, C, H_in, W_in); for plots and tests."""
        a = self.attention_input(x)
        q, k, _ = self.queries_keys_values(a)
        return self.attention_logits(q, k, a.shape[2], a.shape[3]).softmax(dim=-1)

    def attend(self, x):
        """The attention branch MHA(X) of eq. 2: (B, C, H_in, W_in) -> (B, dv, H, W)."""
        a = self.attention_input(x)
        B, _, H, W = a.shape
        q, k, v = self.queries_keys_values(a)
        weights = self.attention_logits(q, k, H, W).softmax(dim=-1)       # (B, Nh, N, N), eq. 1
        o = weights @ v                                                   # (B, Nh, N, dvh)
        o = o.transpose(2, 3).reshape(B, self.dv, H, W)                   # (B, dv, H, W): heads concatenated
        return self.attn_out(o)                                           # (B, dv, H, W), W^O of eq. 2

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
    """CIFAR ResNet: 3x3 stem, three stages (stride 1, 2, 2), global average pool, linear head.
    Blocks of the stages listed in aa_stages get an attention-augmented first conv (None: the baseline)."""

    def __init__(self, *, num_classes, widths=(32, 64, 128), blocks=(1, 1, 1), aa_stages=(), num_heads=4,
                 kappa=0.5, upsilon=0.25, min_dkh=0, relative=True, image_size=32):
        super().__init__()
        assert len(widths) == len(blocks) == 3, f"widths {widths} and blocks {blocks} must both have 3 stages"
        assert all(s in (1, 2, 3) for s in aa_stages), f"aa_stages {aa_stages} must name stages 1, 2 or 3"
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, in_ch, size = [], widths[0], image_size
        for stage, (w, n) in enumerate(zip(widths, blocks), start=1):
            for b in range(n):
                stride = 2 if stage > 1 and b == 0 else 1
                aa = None
                if stage in aa_stages:
                    dk, dv = aa_channels(w, num_heads=num_heads, kappa=kappa, upsilon=upsilon, min_dkh=min_dkh)
                    aa = dict(dk=dk, dv=dv, num_heads=num_heads, relative=relative)
                layers.append(BasicBlock(in_ch, w, stride=stride, aa=aa, max_size=size))
                in_ch, size = w, (size - 1) // stride + 1
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(in_ch, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))               # (B, C, H/4, W/4)
        return self.head(x.mean(dim=(2, 3)))        # (B, num_classes)


def build_model(cfg, *, num_classes, augmented):
    return ResNet(num_classes=num_classes, widths=cfg["widths"], blocks=cfg["blocks"],
                  aa_stages=cfg["aa_stages"] if augmented else (), num_heads=cfg["num_heads"], kappa=cfg["kappa"],
                  upsilon=cfg["upsilon"], min_dkh=cfg["min_dkh"], relative=cfg["relative"], image_size=cfg["image_size"])


def full_preset_models(num_classes=10):
    """Every model the full preset trains, at its real size: name -> (model, step_fn or None, image_size).
    tests/test_utils.py runs one bf16-autocast training step of each on a CPU, so a full GPU run is known to start."""
    cfg = resolve_config(build_parser().parse_args([]))
    return {name: (build_model(cfg, num_classes=num_classes, augmented=aug), None, cfg["image_size"])
            for name, aug in (("ResNet", False), ("AA-ResNet", True))}


# ------------------------------------------------------------------------------------------------ data

def make_loaders(data, cfg, device, seed):
    train_loader = utils.DeviceLoader(data.x_train, data.y_train, batch_size=cfg["batch_size"], device=device,
                                      train=True, mean=data.mean, std=data.std, seed=seed)
    test_loader = utils.DeviceLoader(data.x_test, data.y_test, batch_size=256, device=device, train=False,
                                     mean=data.mean, std=data.std)
    return train_loader, test_loader


# ------------------------------------------------------------------------------------------------ train

def train_one(cfg, data, device, *, augmented, seed, log=print):
    """Train one model from seed; returns (model, history)."""
    utils.set_seed(seed)
    model = build_model(cfg, num_classes=data.num_classes, augmented=augmented).to(device)
    train_loader, test_loader = make_loaders(data, cfg, device, seed)
    name = f"{'AA-ResNet' if augmented else 'ResNet'} seed {seed} "
    # test accuracy only once, after training (nothing is selected on it; per-epoch evaluation would cost
    # ~20% of the CPU budget)
    hist = utils.train(model, train_loader, epochs=cfg["epochs"], lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                       optimizer=cfg["optimizer"], log=log, name=name)
    hist[-1]["test_acc"] = utils.evaluate(model, test_loader).acc
    log(f"{name}test accuracy {hist[-1]['test_acc']:.2f}%")
    return model, hist


# ------------------------------------------------------------------------------------------------ experiments

def mean_std(xs):
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, s


def plot_attention(model, data, device, path, *, num_images=4, query=None):
    """Attention maps of every head of the first AA layer for one query pixel on real test images."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    layer = next(m for m in model.modules() if isinstance(m, AugmentedConv2d) and m.dv > 0)
    captured = {}
    hook = layer.register_forward_pre_hook(lambda m, inp: captured.update(x=inp[0]))
    # one test image of each of the first classes, so the figure shows different objects
    idx = [int(torch.nonzero(data.y_test == c)[0]) for c in range(min(num_images, data.num_classes))]
    x_u8 = data.x_test[idx]
    mean = torch.tensor(data.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(data.std).view(1, 3, 1, 1) * 255
    model.eval()
    with torch.no_grad():
        model(((x_u8.float() - mean) / std).to(device))
        hook.remove()
        a = layer.attention_input(captured["x"])
        H, W = a.shape[2:]
        maps = layer.attention_maps(captured["x"]).cpu()                 # (n, Nh, N, N)
    qy, qx = query if query is not None else (H // 2, W // 2)
    maps = maps[:, :, qy * W + qx].reshape(len(idx), layer.num_heads, H, W)  # (n, Nh, H, W): one query's row
    img_h, img_w = x_u8.shape[2:]
    n, nh = len(idx), layer.num_heads
    fig, axes = plt.subplots(n, nh + 1, figsize=(1.8 * (nh + 1), 1.9 * n), squeeze=False)
    for r in range(n):
        axes[r, 0].imshow(x_u8[r].permute(1, 2, 0).numpy())
        # the query's receptive centre in image pixels
        cy, cx = (qy + 0.5) * img_h / H - 0.5, (qx + 0.5) * img_w / W - 0.5
        axes[r, 0].plot([cx], [cy], marker="x", color="red", markersize=9, mew=2)
        axes[r, 0].set_title(data.classes[int(data.y_test[idx[r]])], fontsize=8)
        for h in range(nh):
            axes[r, h + 1].imshow(x_u8[r].permute(1, 2, 0).numpy(), alpha=0.35)
            axes[r, h + 1].imshow(maps[r, h].numpy(), cmap="inferno", alpha=0.75,
                                  extent=(-0.5, img_w - 0.5, img_h - 0.5, -0.5), interpolation="nearest")
            axes[r, h + 1].plot([cx], [cy], marker="x", color="cyan", markersize=7, mew=1.5)
            if r == 0:
                axes[r, h + 1].set_title(f"head {h + 1}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"AA-ResNet, first attention layer ({H}x{W} grid): attention of query pixel ({qy},{qx}) (x) per head\n"
                 f"bright = high weight, each panel scaled to its own maximum", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bench(args, device, log=print):
    """Forward+backward time and memory of one AugmentedConv2d vs relative=False vs a plain conv (same outputs)."""
    C, Nh, dk, dv = (64, 4, 32, 16)  # kappa = 0.5, upsilon = 0.25 as in the quick model's 64-channel stage
    log(f"bench: layer {C}->{C} channels, 3x3, dk={dk}, dv={dv}, Nh={Nh}; forward+backward of the spatially averaged output")
    rows = []
    for size in args.bench_sizes:
        N = size * size
        # one (B, Nh, N, N) fp32 logit tensor must stay below 0.5 GiB on a (shared) CPU and 1/8 of a GPU's memory:
        # at 64x64 and batch 128 it would be 34 GB, and a training step holds several of them
        budget = torch.cuda.get_device_properties(device).total_memory // 8 if device.type == "cuda" else 2 ** 29
        batch = max(1, min(args.bench_batch, budget // (Nh * N * N * 4)))
        layers = {
            "AA relative": AugmentedConv2d(C, C, 3, dk=dk, dv=dv, num_heads=Nh, relative=True, max_size=size),
            "AA no-rel": AugmentedConv2d(C, C, 3, dk=dk, dv=dv, num_heads=Nh, relative=False, max_size=size),
            "plain conv": nn.Conv2d(C, C, 3, padding=1),
        }
        for name, layer in layers.items():
            layer = layer.to(device)
            steps, warm = (3, 1) if device.type == "cpu" else (10, 3)
            img_s, mem = utils.measure_step(layer, (C, size, size), batch_size=batch, num_classes=C, steps=steps,
                                            warmup=warm, device=device, forward=lambda m, x: m(x).mean(dim=(2, 3)))
            row = dict(size=size, batch=batch, layer=name, ms_per_step=1000 * batch / img_s,
                       ms_per_img=1000 / img_s, memory_mb=mem, params=utils.count_params(layer))
            rows.append(row)
            log(f"  {size}x{size} batch {batch:3d} {name:12s} {row['ms_per_step']:9.1f} ms/step "
                f"{row['ms_per_img']:8.3f} ms/img  memory {mem:8.1f} MB  params {row['params']}")
    return rows


def format_table(rows):
    head = (f"{'model':10s} {'params':>9s} {'MFLOPs':>8s} {'memory MB':>10s} {'train img/s':>11s} "
            f"{'test acc % (mean ± std)':>24s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        acc = f"{r['acc_mean']:.2f} ± {r['acc_std']:.2f} (n={r['n_seeds']})"
        lines.append(f"{r['model']:10s} {r['params']:9d} {r['flops'] / 1e6:8.1f} {r['memory_mb']:10.1f} "
                     f"{r['img_per_s']:11.0f} {acc:>24s}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main

def main(argv=None):
    args = build_parser().parse_args(argv)
    print(utils.reproduce_command())
    if args.threads:
        torch.set_num_threads(args.threads)
    device = utils.get_device(args.device)
    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "runs", "02_aa_conv")
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()

    if args.bench:
        utils.set_seed(args.seed)
        rows = bench(args, device)
        path = utils.save_results(os.path.join(out_dir, "bench.json"), vars(args), {"bench": rows})
        print(f"wrote {path} ({time.time() - t0:.0f}s)")
        return rows

    cfg = resolve_config(args)
    print(f"preset {'quick' if args.quick else 'full'} on {device}: {cfg}")
    data = utils.data_from_args(args)
    cfg["image_size"] = data.x_train.shape[-1]
    print(f"data: {len(data.x_train)} train / {len(data.x_test)} test images, {data.num_classes} classes")
    for stage, w in zip((1, 2, 3), cfg["widths"]):
        if stage in cfg["aa_stages"]:
            dk, dv = aa_channels(w, num_heads=cfg["num_heads"], kappa=cfg["kappa"], upsilon=cfg["upsilon"], min_dkh=cfg["min_dkh"])
            print(f"  stage {stage}: F_out={w}, dk={dk} ({dk // cfg['num_heads']}/head), dv={dv} ({dv // cfg['num_heads']}/head)")

    rows, histories, aa_model = [], {}, None
    shape = (3, cfg["image_size"], cfg["image_size"])
    for augmented in (False, True):
        name = "AA-ResNet" if augmented else "ResNet"
        accs, speeds = [], []
        for s in range(cfg["seeds"]):
            model, hist = train_one(cfg, data, device, augmented=augmented, seed=args.seed + s)
            accs.append(hist[-1]["test_acc"])
            speeds += [h["img_per_s"] for h in hist]
            histories[f"{name}/seed{args.seed + s}"] = hist
            if augmented and s == 0:
                aa_model = model
        # memory: autograd-saved activations of one training step at --measure-batch (CUDA peak on a GPU).
        # img/s: the median training throughput over all epochs and seeds (a few timed steps are too noisy on a
        # shared CPU)
        _, mem = utils.measure_step(model, shape, batch_size=args.measure_batch, device=device,
                                    num_classes=data.num_classes, steps=1, warmup=1)
        img_s = sorted(speeds)[len(speeds) // 2]
        m, sd = mean_std(accs)
        rows.append(dict(model=name, params=utils.count_params(model), flops=utils.count_flops(model, shape, device),
                         memory_mb=mem, img_per_s=img_s, acc_mean=m, acc_std=sd, n_seeds=len(accs), accs=accs))

    table = format_table(rows)
    print("\n" + table)
    gain = rows[1]["acc_mean"] - rows[0]["acc_mean"]
    noise = max(rows[0]["acc_std"], rows[1]["acc_std"])
    verdict = ("AA beats the baseline" if gain > noise else "AA does NOT clearly beat the baseline") + \
              f" at this scale: {gain:+.2f} points (largest seed std {noise:.2f})"
    print(verdict)
    fig = plot_attention(aa_model, data, device, os.path.join(out_dir, "attention_maps.png"))
    print(f"wrote {fig}")
    path = utils.save_results(os.path.join(out_dir, "results.json"), cfg,
                              {"table": rows, "verdict": verdict, "history": histories,
                               "printed_table": table, "elapsed_s": time.time() - t0})
    print(f"wrote {path} ({time.time() - t0:.0f}s)")
    return rows


if __name__ == "__main__":
    utils.run_main(main)
