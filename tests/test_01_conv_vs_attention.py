"""01_conv_vs_attention.py: attention reproduces convolution (Cordonnier et al. Thm 1); SASA's
reference form and its fast paths, and axial attention, against per-pair loops; a "where is it?"
task that needs positions; locality and reach; ConViT non-locality; parameter matching and paired
initialisation; the demos; the exercises (solutions and the implement-it grader); the experiment
end to end; real-CIFAR learning; bad input."""
import importlib
import json
import math
import os
import re

import pytest
import torch
import torch.nn as nn

from conftest import load_script
import utils

m = load_script("01_conv_vs_attention")


@pytest.fixture(autouse=True)
def one_thread():
    """Small ops: with 2 OpenMP threads on a CPU that other jobs share, threads wait on each other
    (the file took 6 minutes instead of ~40 s). One thread is robust; restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def conv_error(conv, x, alpha):
    with torch.no_grad():
        return (m.attention_from_conv(conv, alpha)(x) - conv(x)).abs().max().item()


# ---------------------------------------------------------------------------------- Theorem 1

@pytest.mark.parametrize("K", [1, 3, 5])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("c_in,c_out,H,W", [(3, 5, 6, 9), (4, 2, 7, 5)])
def test_attention_from_conv_equals_conv(K, bias, c_in, c_out, H, W):
    torch.manual_seed(K + 10 * c_in)
    conv = nn.Conv2d(c_in, c_out, K, padding=K // 2, bias=bias)
    x = torch.randn(2, c_in, H, W)
    attn = m.attention_from_conv(conv, alpha=20.0)
    assert attn.num_heads == K * K  # one head per kernel tap
    with torch.no_grad():
        out, conv_out = attn(x), conv(x)
    err = (out - conv_out).abs().max().item()
    print(f"K={K} bias={bias} C_in={c_in} C_out={c_out} {H}x{W}: max |attn - conv| = {err:.2e}")
    assert out.shape == conv_out.shape == (2, c_out, H, W)
    assert torch.allclose(out, conv_out, atol=1e-5), f"max error {err:.2e}"


def test_padding_same_conv_is_accepted():
    conv = nn.Conv2d(2, 3, 3, padding="same")
    x = torch.randn(1, 2, 4, 6)
    assert conv_error(conv, x, 20.0) < 1e-5


def test_finite_alpha_error_shrinks_and_stays_under_the_bound():
    """The softmax leaks S/(1+S), S = sum_{delta != 0} exp(-alpha |delta|^2), onto keys other than
    the kernel shift; the bound 2 S/(1+S) max|x| max_o sum |W[o]| must hold, and the error must
    fall as alpha grows."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 8, 7)
    alphas = [1.0, 2.0, 4.0, 8.0, 12.0, 20.0]
    errs = [conv_error(conv, x, a) for a in alphas]
    print("alpha -> max error:", {a: f"{e:.1e}" for a, e in zip(alphas, errs)})
    weight_l1 = conv.weight.detach().abs().sum((1, 2, 3)).max().item()
    for a, e in zip(alphas, errs):
        theta = sum(math.exp(-a * n * n) for n in range(-20, 21))  # one axis of the lattice
        S = theta ** 2 - 1
        bound = 2 * S / (1 + S) * x.abs().max().item() * weight_l1
        assert e <= bound + 1e-6, f"alpha {a}: error {e:.2e} above the bound {bound:.2e}"
    assert all(e2 < e1 for e1, e2 in zip(errs[:5], errs[1:5])), f"must shrink with alpha: {errs}"
    assert errs[0] > 1e-2 and errs[3] > 1e-5, "a small alpha must differ visibly (limit matters)"
    assert errs[-1] < 1e-5


def test_zero_padding_needs_the_padded_key_grid():
    """Keys only inside the image: a border query's head re-normalises onto real pixels instead of
    reading the conv's zero padding -- wrong at the border, still right in the interior."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    x = torch.randn(1, 3, 6, 7)
    attn = m.attention_from_conv(conv, 20.0)
    attn.key_padding = 0
    with torch.no_grad():
        diff = (attn(x) - conv(x)).abs()
    assert diff[..., 1:-1, 1:-1].max() < 1e-5          # interior: every shift lands on a real pixel
    assert diff[..., 0, :].max() > 1e-2 and diff[..., :, -1].max() > 1e-2


@pytest.mark.parametrize("conv,match", [
    (nn.Conv2d(3, 4, 2, padding=1), "odd"),
    (nn.Conv2d(3, 4, 4, padding=2), "odd"),
    (nn.Conv2d(3, 4, (3, 5), padding=(1, 2)), "square"),
    (nn.Conv2d(3, 4, 3, padding=1, stride=2), "stride 1"),
    (nn.Conv2d(3, 4, 3, padding=0), "padding"),
    (nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), "padding"),
    (nn.Conv2d(4, 4, 3, padding=1, groups=2), "groups"),
])
def test_attention_from_conv_rejects_what_it_cannot_express(conv, match):
    with pytest.raises(ValueError, match=match):
        m.attention_from_conv(conv, 20.0)
    with pytest.raises(TypeError, match="nn.Conv2d"):
        m.attention_from_conv(nn.Linear(3, 4), 20.0)


# ---------------------------------------------------------------------------------- SASA

def sasa_loop(layer, x):
    """SASA written pair by pair, independently of the three implementations: for every query pixel
    and every window offset (dy, dx) whose key lies inside the image, score q . (k + [r_row[dy];
    r_col[dx]]) / sqrt(d), softmax over those keys, weighted sum of their values.
    Returns out (B, h*d, H, W) and attn (B, h, N, L)."""
    B, C, H, W = x.shape
    h, d, K = layer.num_heads, layer.head_dim, layer.window
    p = K // 2
    with torch.no_grad():
        qkv = layer.qkv(x)                       # (B, 3 h d, H, W): [q heads | k heads | v heads]
    out, attn = torch.zeros(B, h * d, H, W), torch.zeros(B, h, H * W, K * K)
    for b in range(B):
        for hd in range(h):
            q, k, v = (qkv[b, (j * h + hd) * d:(j * h + hd + 1) * d] for j in range(3))  # (d,H,W)
            for y in range(H):
                for x_ in range(W):
                    slots, scores = [], []
                    for dy in range(-p, p + 1):
                        for dx in range(-p, p + 1):
                            if 0 <= y + dy < H and 0 <= x_ + dx < W:
                                r = torch.cat([layer.rel_row[hd, dy + p],
                                               layer.rel_col[hd, dx + p]])
                                key = k[:, y + dy, x_ + dx]
                                scores.append(q[:, y, x_] @ (key + r) / math.sqrt(d))
                                slots.append((dy, dx))
                    a = torch.softmax(torch.stack(scores), 0)
                    for w, (dy, dx) in zip(a, slots):
                        attn[b, hd, y * W + x_, (dy + p) * K + dx + p] = w
                        out[b, hd * d:(hd + 1) * d, y, x_] += w * v[:, y + dy, x_ + dx]
    return out, attn


def sasa_form(layer, x, form):
    """SASA of `layer` on x computed by one form: "reference" (the layer itself), "shifted" or
    "dense" (the fast paths, called directly), or "fast" (FastLocalSelfAttention2d with the
    layer's weights, which picks a path by map size). -> out (B, C, H, W), attn (B, h, N, L)."""
    if form == "reference":
        return layer(x, return_attn=True)
    if form == "fast":
        fast = m.FastLocalSelfAttention2d(layer.qkv.in_channels, num_heads=layer.num_heads,
                                          window=layer.window)
        fast.load_state_dict(layer.state_dict())
        return fast(x, return_attn=True)
    B, C, H, W = x.shape
    h, d, K = layer.num_heads, layer.head_dim, layer.window
    q, k, v = layer.qkv(x).view(B, 3, h, d, H, W).unbind(1)
    q, r = q / math.sqrt(d), layer.relative_embeddings()
    if form == "shifted":
        out, attn = m.local_attention_shifted(q, k, v, r, K)          # (B, h, L, H, W)
        attn = attn.flatten(3).transpose(2, 3)
    else:
        out, attn = m.local_attention_dense(q, k, v, r, K)            # (B, h, N, N)
        attn = m.dense_to_window(attn, H, W, K)
    return out.reshape(B, h * d, H, W), attn


@pytest.mark.parametrize("form", ["reference", "shifted", "dense", "fast"])
@pytest.mark.parametrize("H,W,K", [(5, 6, 3), (7, 8, 3), (4, 4, 5), (6, 3, 5)])
def test_sasa_matches_a_per_pair_loop(form, H, W, K):
    """Every form, including the relative term r = [r_row[dy]; r_col[dx]] and the border mask,
    against the pair-by-pair definition (SASA eq. 3). "fast" takes the dense path on 5x6, 4x4 and
    6x3 and shifted slices on 7x8."""
    torch.manual_seed(H * 10 + K)
    layer = m.LocalSelfAttention2d(8, num_heads=2, window=K)
    x = torch.randn(2, 8, H, W)
    with torch.no_grad():
        out, attn = sasa_form(layer, x, form)
    ref_out, ref_attn = sasa_loop(layer, x)
    assert torch.allclose(attn, ref_attn, atol=1e-6), (attn - ref_attn).abs().max()
    assert torch.allclose(out, ref_out, atol=1e-5), (out - ref_out).abs().max()


def test_sasa_relative_term_is_used():
    """A layer whose r tables are zeroed must differ from the loop with the trained tables: the
    loop check above would catch a forward pass that dropped r."""
    torch.manual_seed(0)
    layer = m.LocalSelfAttention2d(8, num_heads=2, window=3)
    x = torch.randn(1, 8, 5, 5)
    _, ref_attn = sasa_loop(layer, x)
    with torch.no_grad():
        layer.rel_row.zero_(), layer.rel_col.zero_()
        _, attn = layer(x, return_attn=True)
    assert (attn - ref_attn).abs().max() > 1e-2


@pytest.mark.parametrize("B,C,H,W,K", [(2, 8, 7, 9, 3), (3, 16, 8, 8, 5), (2, 8, 4, 4, 5),
                                       (1, 12, 5, 11, 7)])
def test_fast_sasa_equals_the_reference_forward_and_backward(B, C, H, W, K):
    """The fast paths are the reference's function: same outputs, same attention, same gradients
    for every weight and for the input."""
    torch.manual_seed(B + C + K)
    layer = m.LocalSelfAttention2d(C, num_heads=C // 4, window=K)
    x = torch.randn(B, C, H, W, requires_grad=True)
    g = torch.randn(B, C, H, W)
    results = {}
    for impl in ("reference", "shifted", "dense"):
        layer.zero_grad()
        x.grad = None
        out, attn = sasa_form(layer, x, impl)
        (out * g).sum().backward()
        grads = [p.grad.clone() for p in layer.parameters()]
        results[impl] = (out.detach(), attn.detach(), x.grad.clone(), grads)
    ref = results["reference"]
    for impl in ("shifted", "dense"):
        out, attn, gx, gp = results[impl]
        assert torch.allclose(out, ref[0], atol=1e-5), impl
        assert torch.allclose(attn, ref[1], atol=1e-6), impl
        assert torch.allclose(gx, ref[2], atol=1e-5), impl
        assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(gp, ref[3])), impl


def test_local_attention_with_full_window_equals_global_attention():
    """A k x k window covering every pixel from every query (k = 2 max(H, W) - 1), with
    out-of-image slots masked, is global attention with the same weights and the same relative
    embeddings (global's output projection set to the identity: SASA has none)."""
    torch.manual_seed(0)
    H, W, S = 5, 7, 7
    g = m.MultiHeadSelfAttention2d(8, num_heads=2, positional="learned", max_size=S)
    loc = m.LocalSelfAttention2d(8, num_heads=2, window=2 * S - 1)
    with torch.no_grad():
        w_qkv = torch.cat([g.query.weight, g.key.weight, g.value.weight])
        loc.qkv.weight.copy_(w_qkv[:, :, None, None])
        loc.qkv.bias.copy_(torch.cat([g.query.bias, g.key.bias, g.value.bias]))
        loc.rel_row.copy_(g.rel_row.expand(2, -1, -1))             # every head: global's one table
        loc.rel_col.copy_(g.rel_col.expand(2, -1, -1))
        g.proj.weight.copy_(torch.eye(8)), g.proj.bias.zero_()
        x = torch.randn(2, 8, H, W)
        outs = {impl: sasa_form(loc, x, impl) for impl in ("shifted", "dense", "reference")}
        out_g = g(x)
    for impl, (out_l, attn_l) in outs.items():
        assert torch.allclose(out_l, out_g, atol=1e-5), (impl, (out_l - out_g).abs().max())
        # masked slots (outside the image) get exactly zero attention; each row is a distribution
        assert torch.allclose(attn_l.sum(-1), torch.ones(2, 2, H * W)), impl
        assert (attn_l > 0).sum(-1).eq(H * W).all(), impl


@pytest.mark.parametrize("impl", ["reference", "shifted", "dense"])
@pytest.mark.parametrize("py,px", [(0, 0), (3, 4), (6, 2)])
def test_local_attention_depends_only_on_its_window(impl, py, px):
    torch.manual_seed(0)
    H, W, k = 7, 8, 3
    loc = m.LocalSelfAttention2d(4, num_heads=2, window=k)
    x = torch.randn(1, 4, H, W, requires_grad=True)
    sasa_form(loc, x, impl)[0][0, :, py, px].sum().backward()
    touched = x.grad.abs().sum(1)[0] > 0               # (H, W) input pixels the output depends on
    window = torch.zeros(H, W, dtype=torch.bool)
    window[max(py - k // 2, 0):py + k // 2 + 1, max(px - k // 2, 0):px + k // 2 + 1] = True
    assert torch.equal(touched, window), f"\n{touched.int()}\nexpected\n{window.int()}"


# ---------------------------------------------------------------------------------- axial attention

def bn(mod, c, t):
    """Eval-mode batch norm of channel c, written out."""
    scale = mod.weight[c] / torch.sqrt(mod.running_var[c] + mod.eps)
    return (t - mod.running_mean[c]) * scale + mod.bias[c]


def axial_loop(layer, x):
    """Axial-DeepLab's position-sensitive attention (eq. 4, with the official batch norms and one
    table set shared by the heads), written pixel pair by pixel pair: query pixel (y, x) and every
    key pixel on its column (axis="height") or row (axis="width"), delta = key - query along that
    axis. Eval mode, so every batch norm is a fixed per-channel affine map."""
    B, C, H, W = x.shape
    h, d, Lm = layer.num_heads, layer.head_dim, layer.max_len
    with torch.no_grad():
        qkv = layer.bn_qkv(layer.qkv(x))                                # (B, 3 h d, H, W)
    out = torch.zeros(B, h * d, H, W)
    for b in range(B):
        for hd in range(h):
            q, k, v = (qkv[b, (j * h + hd) * d:(j * h + hd + 1) * d] for j in range(3))  # (d,H,W)
            for y in range(H):
                for x_ in range(W):
                    keys = ([(y2, x_) for y2 in range(H)] if layer.axis == "height"
                            else [(y, x2) for x2 in range(W)])
                    scores = []
                    for (ky, kx) in keys:
                        delta = (ky - y) if layer.axis == "height" else (kx - x_)
                        kv = k[:, ky, kx]
                        scores.append(bn(layer.bn_qk, hd, q[:, y, x_] @ kv)
                                      + bn(layer.bn_qr, hd, q[:, y, x_] @ layer.rel_q[delta+Lm-1])
                                      + bn(layer.bn_kr, hd, kv @ layer.rel_k[delta + Lm - 1]))
                    a = torch.softmax(torch.stack(scores), 0)
                    sv = sum(w * v[:, ky, kx] for w, (ky, kx) in zip(a, keys))
                    deltas = [(ky - y) if layer.axis == "height" else (kx - x_) for ky, kx in keys]
                    sve = sum(w * layer.rel_v[dl + Lm - 1] for w, dl in zip(a, deltas))
                    for c in range(d):
                        ch = hd * d + c
                        out[b, ch, y, x_] = (bn(layer.bn_sv, ch, sv[c])
                                             + bn(layer.bn_sve, ch, sve[c]))
    return out


def randomise_norms(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in layer.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                n = mod.num_features
                mod.running_mean.copy_(torch.randn(n, generator=g))
                mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                mod.weight.copy_(torch.randn(n, generator=g))
                mod.bias.copy_(torch.randn(n, generator=g))
    return layer.eval()


@pytest.mark.parametrize("axis", ["height", "width"])
@pytest.mark.parametrize("H,W,max_len", [(5, 4, 5), (3, 6, 7)])
def test_axial_matches_a_per_pair_loop(axis, H, W, max_len):
    """Every positional term of the axial layer (q.r^q, k.r^k in the scores, r^v in the output),
    the axis and the offset direction, against the pair-by-pair definition."""
    torch.manual_seed(H + W + max_len)
    layer = randomise_norms(m.AxialAttention1d(8, num_heads=2, max_len=max_len, axis=axis))
    x = torch.randn(2, 8, H, W)
    with torch.no_grad():
        out = layer(x)
    ref = axial_loop(layer, x)
    assert torch.allclose(out, ref, atol=1e-4), (out - ref).abs().max()


@pytest.mark.parametrize("table", ["rel_q", "rel_k", "rel_v"])
def test_axial_loop_check_sees_each_positional_term(table):
    """Deleting (zeroing) any one of the three relative terms changes the output well beyond the
    loop check's tolerance, so the check above covers each term."""
    torch.manual_seed(0)
    layer = randomise_norms(m.AxialAttention1d(8, num_heads=2, max_len=5, axis="width"))
    x = torch.randn(2, 8, 4, 5)
    ref = axial_loop(layer, x)
    with torch.no_grad():
        getattr(layer, table).zero_()
        assert (layer(x) - ref).abs().max() > 1e-2


def test_two_axial_layers_reach_every_pixel():
    torch.manual_seed(0)
    H, W = 5, 6
    x = torch.randn(2, 4, H, W, requires_grad=True)
    cols = m.AxialAttention1d(4, num_heads=2, max_len=H, axis="height").eval()
    cols(x)[0, :, 2, 3].sum().backward()
    touched = x.grad[0].abs().sum(0) > 0
    only_col = torch.zeros(H, W, dtype=torch.bool)
    only_col[:, 3] = True
    assert torch.equal(touched, only_col), "one height-axis layer must see exactly its column"
    both = m.AxialAttention2d(4, num_heads=2, max_size=max(H, W)).eval()   # columns then rows
    for (py, px) in [(0, 0), (2, 3), (4, 5)]:
        x.grad = None
        both(x)[0, :, py, px].sum().backward()
        assert (x.grad[0].abs().sum(0) > 0).all(), f"output ({py},{px}) must see every pixel"


# ---------------------------------------------------------------------------------- "where is it?"

def where_task(n, *, size=8, seed=0):
    """A task that only positional attention can solve: a marker (channel 0) and a target (channel
    1) on noise; the label is the direction from marker to target: 0 right, 1 left, 2 down, 3 up,
    1-3 pixels away. Content alone cannot tell left from right (mirroring the image maps one class
    onto the other and leaves every pixel's content unchanged): without positions, ~50%."""
    g = torch.Generator().manual_seed(seed)
    x = 0.1 * torch.randn(n, 2, size, size, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    direction = torch.tensor([[0, 1], [0, -1], [1, 0], [-1, 0]])[y]             # (n, 2)
    step = direction * torch.randint(1, 4, (n, 1), generator=g)                  # (n, 2)
    lo, hi = (-step).clamp(min=0), size - 1 - step.clamp(min=0)  # markers keeping the target inside
    pos = lo + (torch.rand(n, 2, generator=g) * (hi - lo + 1)).long()
    i = torch.arange(n)
    x[i, 0, pos[:, 0], pos[:, 1]] += 1.0
    x[i, 1, pos[:, 0] + step[:, 0], pos[:, 1] + step[:, 1]] += 1.0
    return x, y


def where_accuracy(make_layer, *, seed, steps=400, dim=16):
    """Train 1x1 embedding -> make_layer() -> ReLU -> global mean -> linear on the where task from
    `seed`; held-out accuracy %."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(2, dim, 1), make_layer(), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(dim, 4))
    (xtr, ytr), (xte, yte) = where_task(4096, seed=1), where_task(1000, seed=2)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(xtr), (64,), generator=g)
        loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad(), loss.backward(), opt.step()
    model.eval()
    with torch.no_grad():
        return 100.0 * (model(xte).argmax(-1) == yte).float().mean().item()


def test_axial_attention_learns_where_a_pattern_is():
    """With Axial-DeepLab's batch-normed positional terms, the layer solves the direction task from
    every seed tried (400 steps). A layer whose only positional term is an unnormalised q.r/sqrt(d)
    reached 50-96% on such seeds: whether it learned position depended on its initialisation."""
    accs = [where_accuracy(lambda: m.AxialAttention2d(16, num_heads=2, max_size=8), seed=s)
            for s in range(2)]
    print("axial attention on the where task:", accs)
    assert min(accs) > 95.0, accs


def test_where_task_needs_positions():
    """Control: the same axial layer with its relative tables zeroed and frozen (content attention
    only) cannot solve the task, so passing it really requires working positional terms."""
    def content_only():
        layer = m.AxialAttention2d(16, num_heads=2, max_size=8)
        for t in (layer.height, layer.width):
            for name in ("rel_q", "rel_k", "rel_v"):
                getattr(t, name).data.zero_()
                getattr(t, name).requires_grad_(False)
        return layer
    acc = where_accuracy(content_only, seed=0)
    print("content-only axial attention on the where task:", acc)
    assert acc < 65.0, acc


# ---------------------------------------------------------------------------------- nonlocality

@pytest.mark.parametrize("dy,dx", [(0, 0), (1, 0), (0, -2), (2, 1), (-1, -1), (-2, 2)])
def test_nonlocality_of_one_hot_shift_is_its_length(dy, dx):
    H, W, P = 4, 5, 2
    Mh, Mw = H + 2 * P, W + 2 * P
    A = torch.zeros(H * W, Mh * Mw)            # every query looks only at the key at shift (dy, dx)
    for y in range(H):
        for x in range(W):
            A[y * W + x, (y + dy + P) * Mw + (x + dx + P)] = 1.0
    D = m.nonlocality(A[None], H, W, key_padding=P)
    assert D.shape == (1,)
    assert abs(D.item() - math.hypot(dy, dx)) < 1e-6


def test_nonlocality_uniform_and_conv_heads():
    # 1 x 2 image, uniform attention: each query is 0 away from itself and 1 from the other pixel
    assert abs(m.nonlocality(torch.full((2, 2), 0.5), 1, 2).item() - 0.5) < 1e-6
    # the heads of attention_from_conv are one-hot at their kernel shift: D = |Delta_h|
    conv = nn.Conv2d(2, 3, 3, padding=1)
    _, probs = m.attention_from_conv(conv, 20.0)(torch.randn(1, 2, 5, 6), return_attn=True)
    D = m.nonlocality(probs[0], 5, 6, key_padding=1)
    expect = torch.tensor([math.hypot(i - 1, j - 1) for i in range(3) for j in range(3)])
    assert torch.allclose(D, expect, atol=1e-5)
    with pytest.raises(ValueError, match="expected"):
        m.nonlocality(probs[0], 5, 6)                # wrong key grid: shapes do not match


# ---------------------------------------------------------------------------------- model

@pytest.mark.parametrize("H,W", [(6, 9), (8, 8)])
def test_block_shapes(H, W):
    x = torch.randn(2, 16, H, W)
    for pos in (None, "quadratic", "learned"):
        layer = m.MultiHeadSelfAttention2d(16, num_heads=4, positional=pos, max_size=9)
        assert layer(x).shape == (2, 16, H, W)
    layer = m.MultiHeadSelfAttention2d(16, num_heads=4, out_dim=12, key_padding=1)
    out, attn = layer(x, return_attn=True)
    assert out.shape == (2, 12, H, W) and attn.shape == (2, 4, H * W, (H + 2) * (W + 2))
    out, attn = m.LocalSelfAttention2d(16, num_heads=4, window=5)(x, return_attn=True)
    assert out.shape == (2, 16, H, W) and attn.shape == (2, 4, H * W, 25)
    assert m.AxialAttention2d(16, num_heads=4, max_size=9)(x).shape == (2, 16, H, W)
    for name, ops in m.MODELS.items():
        net = m.Net(ops=ops, widths=(8, 16, 16), head_dim=4, window=3, image_size=16, num_classes=7)
        assert net(torch.randn(3, 3, 16, 16)).shape == (3, 7), name


def test_blocks_reject_bad_configs():
    """Input checks raise ValueError (they survive python -O, unlike assert)."""
    with pytest.raises(ValueError, match="odd"):
        m.LocalSelfAttention2d(8, num_heads=2, window=4)
    with pytest.raises(ValueError, match="divisible"):
        m.MultiHeadSelfAttention2d(10, num_heads=4)
    with pytest.raises(ValueError, match="positional"):
        m.MultiHeadSelfAttention2d(8, num_heads=2, positional="sinusoidal")
    with pytest.raises(ValueError, match="max_size"):
        layer = m.MultiHeadSelfAttention2d(8, num_heads=2, positional="learned", max_size=4)
        layer(torch.randn(1, 8, 6, 3))
    with pytest.raises(ValueError, match="max_len"):
        m.AxialAttention2d(8, num_heads=2, max_size=4)(torch.randn(1, 8, 6, 3))
    with pytest.raises(ValueError, match="axis"):
        m.AxialAttention1d(8, num_heads=2, max_len=4, axis="depth")
    with pytest.raises(ValueError, match="unknown operator"):
        m.spatial_op("mlp", 8, head_dim=4, window=3, size=8)
    with pytest.raises(ValueError, match="divisible"):
        m.Net(ops=m.MODELS["all-conv"], image_size=30)


def test_models_build_the_reference_form_unless_told():
    """Net builds every SASA layer in its reference form; the lab switches the fast path on."""
    net = m.Net(ops=m.MODELS["all-local"], widths=(8, 8, 16), head_dim=4, window=3,
                image_size=16)
    sasa = [mod for mod in net.modules() if isinstance(mod, m.LocalSelfAttention2d)]
    assert len(sasa) == 6 and all(type(s) is m.LocalSelfAttention2d for s in sasa)
    lab = m.build_model(m.get_args(["--quick"]), "all-local", 10)
    assert all(type(mod) is m.FastLocalSelfAttention2d for mod in lab.modules()
               if isinstance(mod, m.LocalSelfAttention2d))


@pytest.mark.parametrize("preset", ["quick", "full"])
def test_models_are_parameter_matched_within_10_percent(preset):
    a = m.get_args(["--quick"] if preset == "quick" else [])
    counts = {arm: utils.count_params(m.build_model(a, arm, 10)) for arm in m.MODELS}
    print(preset, counts)
    for arm, n in counts.items():
        assert abs(n / counts["all-conv"] - 1) <= 0.10, (arm, n, counts["all-conv"])
    # attention layers are cheaper per channel: an unmatched all-local net has far fewer weights
    unmatched = m.Net(ops=m.MODELS["all-local"], widths=a.widths, head_dim=a.head_dim,
                      window=a.window,
                      image_size=a.image_size, stem_stride=a.stem_stride)
    assert utils.count_params(unmatched) < 0.6 * counts["all-conv"]


def test_paired_arms_start_from_the_same_shared_weights():
    """Same seed: hybrid's stem and conv stages start equal to all-conv's (the same layers); another
    seed
    gives other weights."""
    a = m.get_args(["--quick"])
    conv, hybrid = m.init_model(a, "all-conv", 10, 3), m.init_model(a, "hybrid", 10, 3)
    c = conv.state_dict()
    shared = [k for k, v in hybrid.state_dict().items() if k in c and v.shape == c[k].shape]
    assert any(k.startswith("stem.") for k in shared)
    assert any(k.startswith("stages.1.") for k in shared)
    assert all(torch.equal(hybrid.state_dict()[k], conv.state_dict()[k]) for k in shared)
    other = m.init_model(a, "all-conv", 10, 4)
    assert not torch.equal(other.stem[0].weight, conv.stem[0].weight)
    local = m.init_model(a, "all-local", 10, 3)
    assert torch.equal(local.stem[0].weight, conv.stem[0].weight)  # stage 1 keeps the stem width


# ---------------------------------------------------------------------------------- experiment

TINY = ["--image-size", "16", "--epochs", "1", "--widths", "8,8,16", "--head-dim", "4",
        "--window", "3", "--batch-size", "12", "--stem-stride", "1", "--seeds", "2",
        "--axial-seeds", "2", "--workers", "1"]


def test_main_end_to_end_on_tiny_gray_folder(tiny_gray_folder, tmp_path, capsys):
    """--quick on a dataset unlike CIFAR (4 grayscale classes, val/ split, 10 images per class): the
    preset's counts
    are fitted, every experiment runs and prints its verdicts with CIs."""
    out = tmp_path / "run"
    res = m.main(["--quick", "--data", tiny_gray_folder, *TINY, "--out", str(out)])
    printed = capsys.readouterr().out
    assert "note:" in printed and "95% CI [" in printed and "n=2 paired seeds" in printed
    # every claim prints its entry check before its verdict, in the one wording
    checks = [line for line in printed.splitlines() if line.startswith("entry check: ")]
    assert len(checks) == 4 and all(re.search(r"\(needs .+\) → (met|not met)$", c)
                                    for c in checks), checks
    assert printed.index("entry check: Theorem 1") < printed.index("Theorem 1 on a trained")
    assert res["swap"]["entry_check"]["met"]               # alpha 20: leak below float32
    blob = json.loads((out / "results.json").read_text())
    assert set(blob["metrics"]) >= {"compare", "scaling", "swap", "runs"}
    assert blob["command"].startswith("python")
    rows = res["compare"]["models"]
    assert set(rows) == set(m.MODELS) and all(r["n"] == 2 for r in rows.values())
    assert {v["acc"]["n"] for v in res["compare"]["verdicts"].values()} == {2}
    runs = res["runs"]
    assert {r["per_class"] for r in runs} == {10, 1}    # the preset's 1000 fitted to 10; 10 / 10
    assert len({r["steps"] for r in runs}) == 1         # same number of steps at both sizes
    change = res["scaling"]["models"]["all-local"]["change_of_gap"]
    assert change["acc"]["n"] == 2 and "difference of gaps" in change["acc"]["line"]
    swap = res["swap"]
    assert swap["max_abs_err"] < 1e-5 and swap["same_predictions_pct"] == 100.0
    assert swap["test_acc_attention"] == swap["test_acc_conv"]
    assert abs(swap["nll_attention"] - swap["nll_conv"]) < 1e-5
    conv0 = next(r for r in runs if (r["arm"], r["per_class"], r["seed"]) == ("all-conv", 10, 0))
    assert swap["test_acc_conv"] == conv0["acc"]        # the rebuilt model is the trained one
    assert os.path.getsize(out / "attention_maps.png") > 1000


def test_one_experiment_trains_only_what_it_needs(tiny_gray_folder, tmp_path):
    res = m.main(["--quick", "--data", tiny_gray_folder, *TINY, "--experiment", "swap",
                  "--out", str(tmp_path)])
    assert set(res) == {"swap", "runs"}
    assert sorted(r["arm"] for r in res["runs"]) == ["all-conv", "all-local"]
    assert res["swap"]["same_predictions_pct"] == 100.0
    plan = m.plan_runs(m.get_args(["--quick"]), 1000, ("scaling",))
    expect = {(a, 1000) for a in m.MODELS} | {("all-conv", 100), ("all-local", 100)}
    assert {(arm, n) for arm, n, s, keep in plan} == expect
    assert plan[0][0] == "all-axial" and not any(keep for *_, keep in plan)  # costliest first


def test_runs_do_not_depend_on_workers(tiny_gray_folder, tmp_path):
    """Each job seeds everything itself: one process or two give bit-identical results."""
    argv = ["--quick", "--data", tiny_gray_folder, *TINY, "--experiment", "compare",
            "--models", "all-conv,hybrid"]
    one = m.main([*argv, "--out", str(tmp_path / "a")])["runs"]
    two = m.main([*argv, "--workers", "2", "--out", str(tmp_path / "b")])["runs"]  # last one wins
    def rows(runs):
        return sorted((r["arm"], r["per_class"], r["seed"], r["acc"], r["nll"]) for r in runs)
    assert rows(one) == rows(two)


def test_bad_input_gives_clear_errors(tmp_path, capsys):
    # a bad --data folder stops at once, before any experiment runs: one line, exit 2
    (tmp_path / "no_train" / "test" / "cat").mkdir(parents=True)
    for folder, msg in (("missing", "--data"), ("no_train", "train/<class>")):
        with pytest.raises(SystemExit) as e:
            m.main(["--quick", "--data", str(tmp_path / folder), "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and msg in err and err.count("\n") == 1, err
    for bad, msg in ((["--widths", "16,30,64"], "multiple of --head-dim"),
                     (["--window", "4"], "odd"), (["--image-size", "30"], "divisible"),
                     (["--models", "all-conv,mlp"], "unknown --models"),
                     (["--scaling-models", "cnn"], "unknown --models"),
                     (["--epochs", "0"], "--epochs"),
                     (["--experiment", "plot"], "invalid choice")):
        with pytest.raises(SystemExit):
            m.main(["--data", str(tmp_path), *bad])
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err


def test_real_cifar10_axial_model_learns(data_dir):
    """The all-axial model (narrow: 16, 32, 64 channels) on 2000 real CIFAR-10 images, 124 steps:
    well above
    chance (10%)."""
    d = utils.load_data(data_dir, train_per_class=200, test_per_class=100, seed=0)
    utils.set_seed(0)
    model = m.Net(ops=m.MODELS["all-axial"], widths=(16, 32, 64), head_dim=16, window=3,
                  stem_stride=2)
    tr, _, te = utils.make_loaders(d, batch_size=64, device=torch.device("cpu"), seed=0)
    hist = utils.train(model, tr, epochs=4, lr=3e-3, log=print)
    acc = utils.evaluate(model, te).acc
    print(f"all-axial, {4 * len(tr)} steps: test {acc:.1f}% on {len(d.y_test)} images (chance 10%)")
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert acc > 25.0


def window_to_dense(attn, H, W, window):
    """SASA attention (..., N, L) over window slots -> (..., N, M) over the key grid padded by
    window//2: slot (a, b) of query (y, x) is padded key (y + a, x + b). Written independently."""
    Wp = W + window - 1
    dense = torch.zeros(*attn.shape[:-1], (H + window - 1) * Wp)
    for y in range(H):
        for x in range(W):
            for a in range(window):
                for b in range(window):
                    key = (y + a) * Wp + x + b
                    dense[..., y * W + x, key] = attn[..., y * W + x, a * window + b]
    return dense


@pytest.mark.parametrize("k", [3, 5])
def test_window_nonlocality_equals_nonlocality_of_the_dense_attention(k):
    torch.manual_seed(k)
    H, W = 5, 6
    _, attn = m.LocalSelfAttention2d(4, num_heads=2, window=k)(torch.randn(2, 4, H, W),
                                                               return_attn=True)  # (2, 2, N, L)
    dense = window_to_dense(attn.detach(), H, W, k)
    assert torch.allclose(dense.sum(-1), torch.ones(2, 2, H * W))
    D = m.window_nonlocality(attn.detach(), k)
    assert D.shape == (2, 2) and (D > 0).all()
    assert torch.allclose(D, m.nonlocality(dense, H, W, key_padding=k // 2), atol=1e-6)
    # one-hot on the centre slot (each pixel attends to itself): 0; on slot (0, 1): distance 1
    for slot, dist in ((k * k // 2, 0.0), (1, math.hypot(k // 2, k // 2 - 1))):
        onehot = torch.zeros(H * W, k * k)
        onehot[:, slot] = 1
        assert abs(m.window_nonlocality(onehot, k).item() - dist) < 1e-6


def test_attention_from_conv_follows_the_conv_dtype():
    """A float64 conv gets a float64 twin (a float32 one could not even take the float64 input);
    with alpha 40 its leak e^-40 is far below float64 rounding, so the match is to ~1e-13."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    attn = m.attention_from_conv(conv, alpha=40.0)
    assert all(p.dtype == torch.float64 for p in attn.parameters())
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(attn(x), conv(x), atol=1e-12, rtol=0)


def test_demos_check_what_they_draw():
    assert m.demo_conv_twin()["max_abs_err"] < 1e-5
    alpha = m.demo_alpha()
    errs = alpha["max_abs_err"]
    assert errs[0] > 0.1 and errs[-1] < 1e-5 and errs == sorted(errs, reverse=True)
    # the printed bound (leak + float32 floor) holds at every alpha, the float32 end included
    assert all(e <= b for e, b in zip(errs, alpha["bound"])), (errs, alpha["bound"])
    assert alpha["bound"][-1] < 1e-5 and alpha["floor"] > 1e-7
    assert m.demo_receptive_fields(size=9) == {"3x3 conv": 9, "SASA, 5x5 window": 25,
                                               "axial, height": 9, "axial, height then width": 81}


@pytest.mark.parametrize("argv, match", [
    (["--epochs", "0"], "--epochs: must be an integer >= 1, got 0"),
    (["--image-size", "30"], "divisible"),
    (["--threads", "0"], "--threads: must be an integer >= 1"),
    (["--window", "4"], "--window must be odd"),
    (["--models", "all-conv,mlp"], "unknown --models"),
])
def test_script_flag_errors_are_one_line(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        utils.run_main(m.main, ["--quick", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert match in err


# ---------------------------------------------------------------------------------- exercises

solutions = importlib.import_module("solutions.01_conv_vs_attention")


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_solutions_of_the_no_data_exercises_hold(n):
    """Every exercise's answer, computed and asserted by the solutions file."""
    getattr(solutions, f"exercise_{n}")()


@pytest.mark.parametrize("K", [1, 3, 5])
def test_conv_pos_v_puts_each_head_on_its_kernel_offset(K):
    """Row h = i K + j of v_h = -alpha (1, -2 Delta_1, -2 Delta_2) peaks at Delta_h = (i - K//2,
    j - K//2): its score v_h . r_delta over a grid of offsets is largest exactly there."""
    v = m.conv_pos_v(K, 2.0)
    offs = torch.arange(-K, K + 1)
    dy, dx = torch.meshgrid(offs, offs, indexing="ij")
    r = torch.stack([dy * dy + dx * dx, dy, dx], -1).float().view(-1, 3)   # (grid, 3)
    best = (r @ v.T).argmax(0)                                               # (K^2,)
    for h in range(K * K):
        assert (dy.flatten()[best[h]].item(), dx.flatten()[best[h]].item()) == \
            (h // K - K // 2, h % K - K // 2), h


def grade_conv_pos_v(fn):
    """Exercise 3's grader: fn(K, alpha) must give conv_pos_v's (K^2, 3) rows in head order, and
    the twin built with them must compute the convolution."""
    for K in (1, 3, 5):
        for alpha in (20.0, 3.0):
            got = fn(K, alpha)
            want = m.conv_pos_v(K, alpha, dtype=torch.float32)
            assert tuple(got.shape) == (K * K, 3), f"K={K}: shape {tuple(got.shape)}, want (K^2, 3)"
            assert torch.allclose(got.float(), want, atol=1e-5), \
                f"K={K}, alpha={alpha}: rows differ from -alpha (1, -2 Delta_1, -2 Delta_2), " \
                f"head h = i K + j at Delta_h = (i - K//2, j - K//2)"
        torch.manual_seed(K)
        conv = nn.Conv2d(3, 4, K, padding=K // 2)
        twin = m.attention_from_conv(conv, 20.0)
        x = torch.randn(2, 3, 6, 7)
        with torch.no_grad():
            twin.pos_v.copy_(fn(K, 20.0))
            assert torch.allclose(twin(x), conv(x), atol=1e-5), f"K={K}: the twin is not the conv"


@pytest.mark.parametrize("who", ["solution", "student"])
def test_implement_conv_pos_v(who):
    """Exercise 3, graded: python -m pytest tests/test_01_conv_vs_attention.py -k implement"""
    fn = solutions.my_conv_pos_v if who == "solution" else m.my_conv_pos_v
    try:
        fn(3, 1.0)
    except NotImplementedError:
        pytest.skip("my_conv_pos_v not written yet: fill in my_conv_pos_v in the Exercises "
                    "section of 01_conv_vs_attention.py")
    grade_conv_pos_v(fn)


def test_the_pos_v_grader_rejects_wrong_answers():
    """Mutations of the answer (rows and columns swapped, a sign flipped, no factor 2) fail."""
    def swapped(K, alpha):
        return solutions.my_conv_pos_v(K, alpha)[:, [0, 2, 1]]

    def sign(K, alpha):
        return solutions.my_conv_pos_v(K, alpha) * torch.tensor([1.0, -1.0, -1.0])

    def no_two(K, alpha):
        return solutions.my_conv_pos_v(K, alpha) * torch.tensor([1.0, 0.5, 0.5])
    for wrong in (swapped, sign, no_two):
        with pytest.raises(AssertionError):
            grade_conv_pos_v(wrong)
