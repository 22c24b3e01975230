"""01_conv_vs_attention.py: attention reproduces convolution (Cordonnier et al. Thm 1), local/axial attention
locality and reach, ConViT nonlocality, shapes, the experiment end to end, real-CIFAR learning, bad input."""
import json
import math
import os

import pytest
import torch
import torch.nn as nn

from conftest import load_script
import utils

m = load_script("01_conv_vs_attention")


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run small ops; with 2 OpenMP threads on a CPU that other jobs share, threads wait on each other
    and the file took 6 minutes instead of ~40 s. One thread is robust; the previous setting is restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def conv_error(conv, x, alpha):
    with torch.no_grad():
        return (m.attention_from_conv(conv, alpha)(x) - conv(x)).abs().max().item()


# ------------------------------------------------------------------------------------------------ Theorem 1

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
    print(f"K={K} bias={bias} C_in={c_in} C_out={c_out} {H}x{W}: max |attention - conv| = {err:.2e}")
    assert out.shape == conv_out.shape == (2, c_out, H, W)
    assert torch.allclose(out, conv_out, atol=1e-5), f"max error {err:.2e}"


def test_padding_same_conv_is_accepted():
    conv = nn.Conv2d(2, 3, 3, padding="same")
    x = torch.randn(1, 2, 4, 6)
    assert conv_error(conv, x, 20.0) < 1e-5


def test_finite_alpha_error_shrinks_and_stays_under_the_bound():
    """The softmax leaks S/(1+S), S = sum_{delta != 0} exp(-alpha |delta|^2), onto keys other than the kernel shift;
    the docstring's bound 2 S/(1+S) max|x| max_o sum |W[o]| must hold, and the error must fall as alpha grows."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 8, 7)
    alphas = [1.0, 2.0, 4.0, 8.0, 12.0, 20.0]
    errs = [conv_error(conv, x, a) for a in alphas]
    print("alpha -> max error:", {a: f"{e:.1e}" for a, e in zip(alphas, errs)})
    weight_l1 = conv.weight.detach().abs().sum((1, 2, 3)).max().item()
    for a, e in zip(alphas, errs):
        theta = sum(math.exp(-a * n * n) for n in range(-20, 21))  # sum over one axis of the infinite lattice
        S = theta ** 2 - 1
        bound = 2 * S / (1 + S) * x.abs().max().item() * weight_l1
        assert e <= bound + 1e-6, f"alpha {a}: error {e:.2e} above the bound {bound:.2e}"
    assert all(e2 < e1 for e1, e2 in zip(errs[:5], errs[1:5])), f"error must shrink with alpha: {errs}"
    assert errs[0] > 1e-2 and errs[3] > 1e-5, "a small alpha must visibly differ from the conv (the limit matters)"
    assert errs[-1] < 1e-5


def test_zero_padding_needs_the_padded_key_grid():
    """Keys only inside the image: a border query's head re-normalises onto real pixels instead of reading the
    conv's zero padding -- wrong at the border, still right in the interior."""
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


# ------------------------------------------------------------------------------------------------ local / axial

def test_local_attention_with_full_window_equals_global_attention():
    """A k x k window covering every pixel from every query (k = 2 max(H, W) - 1), with out-of-image slots masked,
    is global attention with the same weights and the same relative embeddings."""
    torch.manual_seed(0)
    H, W, S = 5, 7, 7
    g = m.MultiHeadSelfAttention2d(8, num_heads=2, positional="learned", max_size=S)
    loc = m.LocalSelfAttention2d(8, num_heads=2, window=2 * S - 1)
    with torch.no_grad():
        loc.qkv.weight.copy_(torch.cat([g.query.weight, g.key.weight, g.value.weight])[:, :, None, None])
        loc.qkv.bias.copy_(torch.cat([g.query.bias, g.key.bias, g.value.bias]))
        loc.rel_row.copy_(g.rel_row)
        loc.rel_col.copy_(g.rel_col)
        loc.proj.weight.copy_(g.proj.weight[:, :, None, None])
        loc.proj.bias.copy_(g.proj.bias)
        x = torch.randn(2, 8, H, W)
        out_l, attn_l = loc(x, return_attn=True)
        out_g = g(x)
    assert torch.allclose(out_l, out_g, atol=1e-5), (out_l - out_g).abs().max()
    # masked slots (outside the image) get exactly zero attention; every row is a distribution over real pixels
    assert torch.allclose(attn_l.sum(-1), torch.ones(2, 2, H * W))
    assert (attn_l > 0).sum(-1).eq(H * W).all()


@pytest.mark.parametrize("py,px", [(0, 0), (3, 4), (6, 2)])
def test_local_attention_depends_only_on_its_window(py, px):
    torch.manual_seed(0)
    H, W, k = 7, 8, 3
    loc = m.LocalSelfAttention2d(4, num_heads=2, window=k)
    x = torch.randn(1, 4, H, W, requires_grad=True)
    loc(x)[0, :, py, px].sum().backward()
    touched = x.grad.abs().sum(1)[0] > 0                       # (H, W) input pixels the output pixel depends on
    window = torch.zeros(H, W, dtype=torch.bool)
    window[max(py - k // 2, 0):py + k // 2 + 1, max(px - k // 2, 0):px + k // 2 + 1] = True
    assert torch.equal(touched, window), f"\n{touched.int()}\nexpected\n{window.int()}"


def test_two_axial_layers_reach_every_pixel():
    torch.manual_seed(0)
    H, W = 5, 6
    x = torch.randn(1, 4, H, W, requires_grad=True)
    rows = m.AxialAttention1d(4, num_heads=2, max_len=W, axis="width")
    rows(x)[0, :, 2, 3].sum().backward()
    touched = x.grad.abs().sum(1)[0] > 0
    only_row = torch.zeros(H, W, dtype=torch.bool)
    only_row[2] = True
    assert torch.equal(touched, only_row), "one axial layer must see exactly its row"
    x.grad = None
    both = m.AxialAttention2d(4, num_heads=2, max_size=max(H, W))  # rows then columns
    for (py, px) in [(0, 0), (2, 3), (4, 5)]:
        x.grad = None
        both(x)[0, :, py, px].sum().backward()
        assert (x.grad.abs().sum(1)[0] > 0).all(), f"output ({py},{px}) must depend on every input pixel"


# ------------------------------------------------------------------------------------------------ nonlocality

@pytest.mark.parametrize("dy,dx", [(0, 0), (1, 0), (0, -2), (2, 1), (-1, -1), (-2, 2)])
def test_nonlocality_of_one_hot_shift_is_its_length(dy, dx):
    H, W, P = 4, 5, 2
    Mh, Mw = H + 2 * P, W + 2 * P
    A = torch.zeros(H * W, Mh * Mw)                 # every query looks only at the key at shift (dy, dx)
    for y in range(H):
        for x in range(W):
            A[y * W + x, (y + dy + P) * Mw + (x + dx + P)] = 1.0
    D = m.nonlocality(A[None], H, W, key_padding=P)
    assert D.shape == (1,)
    assert abs(D.item() - math.hypot(dy, dx)) < 1e-6


def test_nonlocality_uniform_and_conv_heads():
    # 1 x 2 image, uniform attention: each query is 0 away from itself and 1 away from the other pixel
    assert abs(m.nonlocality(torch.full((2, 2), 0.5), 1, 2).item() - 0.5) < 1e-6
    # the heads of attention_from_conv are one-hot at their kernel shift: D = |Delta_h|
    conv = nn.Conv2d(2, 3, 3, padding=1)
    _, probs = m.attention_from_conv(conv, 20.0)(torch.randn(1, 2, 5, 6), return_attn=True)  # (1, 9, N, M)
    D = m.nonlocality(probs[0], 5, 6, key_padding=1)
    expect = torch.tensor([math.hypot(i - 1, j - 1) for i in range(3) for j in range(3)])
    assert torch.allclose(D, expect, atol=1e-5)
    with pytest.raises(AssertionError, match="expected"):
        m.nonlocality(probs[0], 5, 6)                # wrong key grid: shapes do not match


# ------------------------------------------------------------------------------------------------ shapes

@pytest.mark.parametrize("H,W", [(6, 9), (8, 8)])
def test_block_shapes(H, W):
    x = torch.randn(2, 16, H, W)
    for pos in (None, "quadratic", "learned"):
        assert m.MultiHeadSelfAttention2d(16, num_heads=4, positional=pos, max_size=9)(x).shape == (2, 16, H, W)
    out, attn = m.MultiHeadSelfAttention2d(16, num_heads=4, out_dim=12, key_padding=1)(x, return_attn=True)
    assert out.shape == (2, 12, H, W) and attn.shape == (2, 4, H * W, (H + 2) * (W + 2))
    out, attn = m.LocalSelfAttention2d(16, num_heads=4, window=5, out_dim=12)(x, return_attn=True)
    assert out.shape == (2, 12, H, W) and attn.shape == (2, 4, H * W, 25)
    assert m.AxialAttention2d(16, num_heads=4, max_size=9, out_dim=12)(x).shape == (2, 12, H, W)
    for name, ops in m.MODELS.items():
        net = m.Net(ops=ops, widths=(8, 16, 16), head_dim=4, window=3, image_size=16, num_classes=7)
        assert net(torch.randn(3, 3, 16, 16)).shape == (3, 7), name


def test_blocks_reject_bad_configs():
    with pytest.raises(AssertionError, match="odd"):
        m.LocalSelfAttention2d(8, num_heads=2, window=4)
    with pytest.raises(AssertionError, match="divisible"):
        m.MultiHeadSelfAttention2d(10, num_heads=4)
    with pytest.raises(AssertionError, match="max_size"):
        m.MultiHeadSelfAttention2d(8, num_heads=2, positional="learned", max_size=4)(torch.randn(1, 8, 6, 3))
    with pytest.raises(AssertionError, match="max_len"):
        m.AxialAttention2d(8, num_heads=2, max_size=4)(torch.randn(1, 8, 6, 3))


# ------------------------------------------------------------------------------------------------ experiment

TINY = ["--image-size", "16", "--epochs", "1", "--widths", "8,8,16", "--head-dim", "4", "--window", "3",
        "--batch-size", "12", "--stem-stride", "1"]


def test_main_end_to_end_on_tiny_image_folder(tiny_image_folder, tmp_path):
    out = tmp_path / "run"
    metrics = m.main(["--data", tiny_image_folder, *TINY, "--seeds", "2", "--out", str(out)])
    blob = json.loads((out / "results.json").read_text())
    assert set(blob["metrics"]["models"]) == set(m.MODELS) and blob["command"].startswith("python")
    for name, r in metrics["models"].items():
        assert r["params"] > 0 and r["mflops"] > 0 and r["train_img_per_s"] > 0 and len(r["test_accs"]) == 2
        assert 0 <= r["test_acc_mean"] <= 100
    assert metrics["conv_equivalence"]["max_abs_err"] < 1e-5   # Theorem 1 on the trained conv's real features
    eq = metrics["conv_equivalence"]
    assert eq["test_acc_attention_swapped"] == eq["test_acc_conv"]   # same network, conv swapped for attention
    assert eq["test_acc_conv"] == metrics["models"]["all-conv"]["test_accs"][-1]  # measuring speed left the model intact
    assert os.path.getsize(out / "attention_maps.png") > 1000


def test_bad_input_gives_clear_errors(tmp_path, capsys):
    with pytest.raises(utils.InputError, match="--data"):
        m.main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    (tmp_path / "no_train" / "test" / "cat").mkdir(parents=True)
    with pytest.raises(utils.InputError, match="train/<class>"):
        m.main(["--data", str(tmp_path / "no_train"), "--out", str(tmp_path / "o")])
    for bad, msg in ((["--widths", "16,30,64"], "multiple of --head-dim"), (["--window", "4"], "odd"),
                     (["--image-size", "30"], "divisible"), (["--models", "all-conv,mlp"], "unknown --models")):
        with pytest.raises(SystemExit):
            m.main(["--data", str(tmp_path), *bad])
        assert msg in capsys.readouterr().err


def test_real_cifar10_attention_model_learns(data_dir):
    """The hybrid model (its last stage is SASA attention) trained ~300 steps on 2000 real CIFAR-10 images."""
    import utils
    utils.set_seed(0)
    d = utils.load_data(data_dir, train_per_class=200, test_per_class=50, seed=0)
    dev = torch.device("cpu")
    model = m.Net(ops=m.MODELS["hybrid"], widths=(16, 32, 64), head_dim=8, window=5, stem_stride=2)
    tr = utils.DeviceLoader(d.x_train, d.y_train, batch_size=32, device=dev, train=True, seed=0)
    te = utils.DeviceLoader(d.x_test, d.y_test, batch_size=250, device=dev, train=False)
    hist = utils.train(model, tr, epochs=5, lr=3e-3, log=print)   # 5 x 62 = 310 steps
    acc = utils.evaluate(model, te).acc
    print(f"hybrid after {5 * len(tr)} steps: test accuracy {acc:.1f}% on {len(d.y_test)} images (chance 10%)")
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert acc > 25.0


def test_window_to_dense_lets_nonlocality_measure_local_attention():
    torch.manual_seed(0)
    H, W, k = 5, 6, 3
    _, attn = m.LocalSelfAttention2d(4, num_heads=2, window=k)(torch.randn(1, 4, H, W), return_attn=True)
    dense = m.window_to_dense(attn, H, W, k)                          # (1, 2, N, (H+2)(W+2))
    assert torch.allclose(dense.sum(-1), torch.ones(1, 2, H * W))
    D = m.nonlocality(dense, H, W, key_padding=k // 2)
    assert D.shape == (1, 2) and (D > 0).all() and (D <= math.sqrt(2) + 1e-6).all()   # within a 3x3 window
    # one-hot on the centre slot (each pixel attends to itself) -> distance 0; on slot (0, 1) -> distance 1
    for slot, dist in ((4, 0.0), (1, 1.0)):
        onehot = torch.zeros(H * W, k * k)
        onehot[:, slot] = 1
        assert abs(m.nonlocality(m.window_to_dense(onehot, H, W, k), H, W, key_padding=1).item() - dist) < 1e-6
