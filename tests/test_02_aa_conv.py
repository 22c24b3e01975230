"""02_aa_conv.py: relative logits vs a naive reference, shapes, dv=0 == conv, permutation (non-)equivariance,
gradients, bad configurations, the models, and end-to-end runs (tiny fixture, real CIFAR-10, --bench)."""
import json
import os

import pytest
import torch
import torch.nn as nn

from conftest import load_script

aa = load_script("02_aa_conv")


def naive_logits(layer, q, k, H, W):
    """Eq. 3 written out: for every query (iy, ix) and key (jy, jx), index the embedding tables with the explicit
    offsets jx - ix and jy - iy (table row = offset + max - 1) and take dot products. (B, Nh, N, N)."""
    B, Nh, N, _ = q.shape
    out = torch.zeros(B, Nh, N, N)
    for iy in range(H):
        for ix in range(W):
            for jy in range(H):
                for jx in range(W):
                    i, j = iy * W + ix, jy * W + jx
                    key = k[:, :, j]
                    if layer.relative:
                        key = key + layer.key_rel_w[jx - ix + layer.max_w - 1] + layer.key_rel_h[jy - iy + layer.max_h - 1]
                    out[:, :, i, j] = (q[:, :, i] * key).sum(-1)
    return out


@pytest.mark.parametrize("L", [1, 2, 5, 8])
def test_rel_to_abs_matches_explicit_indexing(L):
    g = torch.Generator().manual_seed(L)
    x = torch.randn(2, 3, 4, L, 2 * L - 1, generator=g)  # arbitrary leading dims
    y = aa.rel_to_abs(x)
    assert y.shape == (2, 3, 4, L, L)
    ref = torch.empty_like(y)
    for i in range(L):
        for j in range(L):
            ref[..., i, j] = x[..., i, j - i + L - 1]  # relative offset j - i
    assert torch.equal(y, ref)


@pytest.mark.parametrize("H,W,max_size,seed", [(3, 5, (3, 5), 0), (5, 3, (5, 3), 1), (4, 7, (6, 9), 2),
                                               (1, 6, (2, 6), 3), (6, 2, 8, 4)])
def test_relative_logits_match_naive_reference(H, W, max_size, seed):
    torch.manual_seed(seed)
    layer = aa.AugmentedConv2d(5, 12, 3, dk=8, dv=4, num_heads=2, relative=True, max_size=max_size)
    x = torch.randn(2, 5, H, W)
    q, k, _ = layer.queries_keys_values(x)
    got = layer.attention_logits(q, k, H, W)
    ref = naive_logits(layer, q, k, H, W)
    assert got.shape == (2, 2, H * W, H * W)
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
    # the relative term really is there (not just q.k): the reference without it differs
    layer.relative = False
    assert not torch.allclose(ref, naive_logits(layer, q, k, H, W), atol=1e-3)


def test_relative_logits_broadcast_instead_of_repeat():
    layer = aa.AugmentedConv2d(4, 8, 3, dk=8, dv=4, num_heads=2, max_size=(5, 7))
    q = torch.randn(3, 2, 5 * 7, 4)
    rel_h, rel_w = layer.relative_logits(q, 5, 7)
    # O(N (H + W)) numbers, not O(N^2): each term keeps a size-1 axis where it is broadcast
    assert rel_h.shape == (3, 2, 5, 7, 5, 1) and rel_w.shape == (3, 2, 5, 7, 1, 7)


def test_relative_logits_depend_only_on_offsets():
    """Translation equivariance of the position term (paper Sec. 3.1.2): for a constant image every pixel has the
    same q and k, so logit(i, j) must depend only on the offset j - i."""
    torch.manual_seed(0)
    H, W = 4, 6
    layer = aa.AugmentedConv2d(3, 8, 3, dk=8, dv=4, num_heads=2, max_size=(H, W))
    q, k, _ = layer.queries_keys_values(torch.ones(1, 3, H, W) * 0.7)
    logits = layer.attention_logits(q, k, H, W)[0]  # (Nh, N, N)
    by_offset = {}
    for iy in range(H):
        for ix in range(W):
            for jy in range(H):
                for jx in range(W):
                    by_offset.setdefault((jy - iy, jx - ix), []).append(logits[:, iy * W + ix, jy * W + jx])
    assert len(by_offset) == (2 * H - 1) * (2 * W - 1)
    for vals in by_offset.values():
        assert torch.allclose(torch.stack(vals), vals[0].expand(len(vals), -1), atol=1e-5)
    spread = torch.stack([v[0] for v in by_offset.values()]).std()
    assert spread > 1e-3  # and different offsets do get different logits


@pytest.mark.parametrize("H,W,stride", [(8, 8, 1), (7, 10, 1), (7, 10, 2), (9, 6, 2), (5, 4, 3)])
@pytest.mark.parametrize("dk,dv,heads", [(8, 4, 2), (12, 12, 4), (4, 16, 1), (8, 16, 8)])
def test_shapes_match_conv(H, W, stride, dk, dv, heads):
    layer = aa.AugmentedConv2d(6, 16, 3, dk=dk, dv=dv, num_heads=heads, stride=stride, max_size=(H, W))
    x = torch.randn(2, 6, H, W)
    ref = nn.Conv2d(6, 16, 3, stride=stride, padding=1)(x)
    y = layer(x)
    assert y.shape == ref.shape == (2, 16, (H - 1) // stride + 1, (W - 1) // stride + 1)
    assert layer.attend(x).shape == (2, dv, *ref.shape[2:])
    maps = layer.attention_maps(x)
    N = ref.shape[2] * ref.shape[3]
    assert maps.shape == (2, heads, N, N) and torch.allclose(maps.sum(-1), torch.ones(2, heads, N), atol=1e-5)


def test_fully_attentional_and_smaller_inputs():
    layer = aa.AugmentedConv2d(6, 8, 3, dk=8, dv=8, num_heads=2, max_size=(6, 9))  # upsilon = 1: no conv branch
    assert layer.conv is None and layer(torch.randn(1, 6, 6, 9)).shape == (1, 8, 6, 9)
    assert layer(torch.randn(1, 6, 3, 4)).shape == (1, 8, 3, 4)  # smaller grids use the centre of the tables


@pytest.mark.parametrize("stride,kernel", [(1, 3), (2, 3), (1, 5), (2, 1)])
def test_dv0_is_plain_conv(stride, kernel):
    torch.manual_seed(stride + kernel)
    layer = aa.AugmentedConv2d(5, 7, kernel, dk=0, dv=0, num_heads=1, stride=stride)
    conv = nn.Conv2d(5, 7, kernel, stride=stride, padding=kernel // 2)
    conv.load_state_dict(layer.conv.state_dict())
    assert sum(p.numel() for p in layer.parameters()) == sum(p.numel() for p in conv.parameters())
    x = torch.randn(3, 5, 9, 11)
    assert torch.allclose(layer(x), conv(x), atol=1e-6)


def test_permutation_equivariance_only_without_relative():
    torch.manual_seed(0)
    H, W = 4, 5
    x = torch.randn(2, 6, H, W)
    perm = torch.randperm(H * W)
    permute = lambda t: t.flatten(2)[:, :, perm].reshape(t.shape)  # (B, C, H, W) with pixels shuffled
    plain = aa.AugmentedConv2d(6, 12, 3, dk=8, dv=8, num_heads=2, relative=False, max_size=(H, W))
    err = (plain.attend(permute(x)) - permute(plain.attend(x))).abs().max()
    assert err < 1e-5, f"relative=False attention should be permutation-equivariant, max error {err}"
    rel = aa.AugmentedConv2d(6, 12, 3, dk=8, dv=8, num_heads=2, relative=True, max_size=(H, W))
    rel.load_state_dict(plain.state_dict(), strict=False)  # same q/k/v/out weights, plus position tables
    assert (rel.attend(permute(x)) - permute(rel.attend(x))).abs().max() > 1e-2


def test_gradients_reach_relative_embeddings():
    layer = aa.AugmentedConv2d(4, 8, 3, dk=8, dv=4, num_heads=2, stride=2, max_size=(8, 6))
    layer(torch.randn(2, 4, 8, 6)).square().sum().backward()
    for name in ("key_rel_h", "key_rel_w", "qkv.weight", "attn_out.weight", "conv.weight"):
        grad = layer.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, f"no gradient reached {name}"
    # the stride-2 grid is 4x3, so only the centre 2*4-1 / 2*3-1 rows of the (max 4x3) tables are used: all of them
    assert layer.key_rel_h.shape[0] == 7 and (layer.key_rel_h.grad.abs().sum(1) > 0).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(dk=6, dv=4, num_heads=4), "dk=6 must be divisible by num_heads=4"),
    (dict(dk=8, dv=6, num_heads=4), "dv=6 must be divisible by num_heads=4"),
    (dict(dk=8, dv=20, num_heads=4), "dv=20 must be in"),
    (dict(dk=0, dv=4, num_heads=2), "both > 0"),
    (dict(dk=8, dv=4, num_heads=0), "num_heads must be >= 1"),
])
def test_bad_configurations_raise(kwargs, match):
    with pytest.raises(AssertionError, match=match):
        aa.AugmentedConv2d(4, 16, 3, **kwargs)


def test_even_kernel_and_too_large_input_raise():
    with pytest.raises(AssertionError, match="kernel_size must be odd"):
        aa.AugmentedConv2d(4, 16, 4, dk=8, dv=4, num_heads=2)
    layer = aa.AugmentedConv2d(4, 16, 3, dk=8, dv=4, num_heads=2, max_size=8)
    with pytest.raises(AssertionError, match="max_size"):
        layer(torch.randn(1, 4, 8, 10))


def test_models_and_channel_rule():
    assert aa.aa_channels(64, num_heads=4, kappa=0.5, upsilon=0.25) == (32, 16)
    assert aa.aa_channels(128, num_heads=8, kappa=0.2, upsilon=0.1, min_dkh=20) == (160, 16)  # paper's CIFAR rule
    cfg = dict(aa.PRESETS["quick"], relative=True, image_size=32, widths=(8, 16, 16))
    base = aa.build_model(cfg, num_classes=10, augmented=False)
    aug = aa.build_model(cfg, num_classes=10, augmented=True)
    x = torch.randn(2, 3, 32, 32)
    assert base(x).shape == aug(x).shape == (2, 10)
    convs = [m for m in aug.modules() if isinstance(m, aa.AugmentedConv2d)]
    assert len(convs) == sum(n for s, n in zip((1, 2, 3), cfg["blocks"]) if s in cfg["aa_stages"]) and all(c.dv > 0 for c in convs)
    assert not any(isinstance(m, aa.AugmentedConv2d) for m in base.modules())
    p_base, p_aug = sum(p.numel() for p in base.parameters()), sum(p.numel() for p in aug.parameters())
    assert abs(p_aug - p_base) / p_base < 0.1, (p_base, p_aug)  # parameter counts kept close


def test_main_end_to_end_tiny(tiny_image_folder, tmp_path):
    out = tmp_path / "run"
    rows = aa.main(["--data", tiny_image_folder, "--quick", "--image-size", "16", "--epochs", "1", "--seeds", "2", "--measure-batch", "8",
                    "--train-per-class", "6", "--test-per-class", "4", "--widths", "8", "16", "16",
                    "--aa-stages", "2", "3", "--out", str(out)])
    blob = json.load(open(out / "results.json"))
    assert [r["model"] for r in blob["metrics"]["table"]] == ["ResNet", "AA-ResNet"] == [r["model"] for r in rows]
    assert all(r["n_seeds"] == 2 and 0 <= r["acc_mean"] <= 100 and r["flops"] > 0 for r in rows)
    assert os.path.getsize(out / "attention_maps.png") > 1000


def test_bench_runs(tmp_path):
    rows = aa.main(["--bench", "--bench-sizes", "8", "12", "--bench-batch", "2", "--device", "cpu", "--out", str(tmp_path)])
    assert {(r["size"], r["layer"]) for r in rows} == {(s, n) for s in (8, 12) for n in ("AA relative", "AA no-rel", "plain conv")}
    assert all(r["ms_per_step"] > 0 and r["memory_mb"] > 0 for r in rows)
    assert os.path.exists(tmp_path / "bench.json")


def test_real_cifar_attention_maps(data_dir, tmp_path):
    """On real CIFAR-10 test images: every head's attention row is a distribution over the 8x8 grid, the heads differ,
    and the figure is written."""
    import utils
    data = utils.load_data(data_dir, train_per_class=1, test_per_class=2, seed=0)
    torch.manual_seed(0)
    cfg = dict(aa.PRESETS["quick"], relative=True, image_size=32, widths=(8, 16, 16))
    model = aa.build_model(cfg, num_classes=10, augmented=True)
    layer = next(m for m in model.modules() if isinstance(m, aa.AugmentedConv2d))
    x = (data.x_test[:4].float() / 255 - 0.5) / 0.25
    feats = model.blocks[:2](model.stem(x))  # (4, 16, 16, 16): the input of the first AA block (stage 3)
    maps = layer.attention_maps(feats)       # (4, Nh, 64, 64) on the 8x8 grid
    assert maps.shape == (4, 4, 64, 64) and torch.allclose(maps.sum(-1), torch.ones(4, 4, 64), atol=1e-5)
    assert (maps[:, 0] - maps[:, 1]).abs().max() > 1e-3
    path = aa.plot_attention(model, data, torch.device("cpu"), str(tmp_path / "att.png"))
    assert os.path.getsize(path) > 1000
