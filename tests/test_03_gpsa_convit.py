"""03_gpsa_convit.py: GPSA equations, the convolutional init IS a convolution, ConViT structure, errors, smoke run."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import load_script

m = load_script("03_gpsa_convit")


def _gpsa(dim, heads, *, alpha=1.0, local=True, seed=0):
    torch.manual_seed(seed)
    return m.GPSA(dim, num_heads=heads, locality_strength=alpha, use_local_init=local).eval()


@pytest.mark.parametrize("heads", [4, 9, 5])
@pytest.mark.parametrize("gate", [-30.0, -2.0, 0.0, 1.0, 30.0])
def test_gpsa_is_two_softmaxes_mixed_by_the_gate(heads, gate):
    """Eq. 7-8 written out independently from the weights: rows sum to 1 for every gate value."""
    C, G, B = 2 * heads * 4, 5, 3
    g = _gpsa(C, heads, local=False)
    with torch.no_grad():
        g.gating_param.fill_(gate)
        g.pos_proj.weight.normal_()  # a random positional part, so both softmaxes are non-trivial
        g.qk.weight.normal_(std=0.3)
    x = torch.randn(B, G * G, C)
    attn = g.get_attention(x)
    assert attn.shape == (B, heads, G * G, G * G) and g(x).shape == x.shape
    assert (attn >= 0).all() and torch.allclose(attn.sum(-1), torch.ones(B, heads, G * G), atol=1e-6)
    d = C // heads
    q = (x @ g.qk.weight[:C].T).view(B, G * G, heads, d).transpose(1, 2)
    k = (x @ g.qk.weight[C:].T).view(B, G * G, heads, d).transpose(1, 2)
    content = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1)
    ys, xs = torch.meshgrid(torch.arange(G), torch.arange(G), indexing="ij")
    px, py = xs.flatten().float(), ys.flatten().float()
    dx, dy = px[None] - px[:, None], py[None] - py[:, None]  # key minus query, (N, N)
    w, b = g.pos_proj.weight, g.pos_proj.bias
    pos = torch.softmax(w[:, 0, None, None] * dx + w[:, 1, None, None] * dy + w[:, 2, None, None] * (dx ** 2 + dy ** 2)
                        + b[:, None, None], -1)  # (h, N, N)
    s = torch.sigmoid(torch.tensor(gate))
    assert torch.allclose(attn, (1 - s) * content + s * pos, atol=1e-6)


def test_positional_scores_computed_once_per_forward_not_per_sample():
    g = _gpsa(32, 4)
    shapes = []
    g.pos_proj.register_forward_hook(lambda mod, inp, out: shapes.append(tuple(inp[0].shape)))
    g(torch.randn(7, 36, 32))
    assert shapes == [(36, 36, 3)]  # one call, no batch dimension


@pytest.mark.parametrize("heads", [1, 2, 4, 5, 6, 9, 16])
def test_head_centres_form_a_grid_around_the_query(heads):
    c = m.head_centres(heads)
    assert len(c) == heads and len(set(c)) == heads  # every head its own centre
    k = math.isqrt(heads)
    if k * k == heads:  # square count: the paper's k x k grid, symmetric around the query
        vals = sorted({dx for dx, _ in c})
        assert len(vals) == k and torch.allclose(torch.tensor(vals), torch.arange(k) - (k - 1) / 2)
        assert sum(dx for dx, _ in c) == 0 and sum(dy for _, dy in c) == 0
    else:  # non-square: the cells nearest the centre of the enclosing grid
        kk = math.ceil(math.sqrt(heads))
        r2 = sorted((x - (kk - 1) / 2) ** 2 + (y - (kk - 1) / 2) ** 2 for y in range(kk) for x in range(kk))
        assert max(dx * dx + dy * dy for dx, dy in c) == r2[heads - 1]


def _conv_kernel(centre):
    """What a head centred at Delta attends to in the large-alpha limit: the 3x3 offsets nearest Delta, equally."""
    offs = [(dx, dy) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    d2 = torch.tensor([(dx - centre[0]) ** 2 + (dy - centre[1]) ** 2 for dx, dy in offs])
    near = (d2 == d2.min()).float()
    return (near / near.sum()).view(3, 3)  # [1 + dy, 1 + dx]


@pytest.mark.parametrize("heads", [4, 9, 5])
def test_local_init_heads_attend_to_their_centre(heads):
    """Large alpha + gate fully positional: each head's attention from an interior query sits on query + Delta_h."""
    G = 7
    g = _gpsa(8 * heads, heads, alpha=50.0)
    with torch.no_grad():
        g.gating_param.fill_(30.0)  # sigma(30) == 1 in float32: purely positional
    attn = g.get_attention(torch.randn(2, G * G, 8 * heads))  # (B, h, N, N)
    for h, (dx, dy) in enumerate(m.head_centres(heads)):
        K = _conv_kernel((dx, dy))
        for qy in range(1, G - 1):
            for qx in range(1, G - 1):
                a = attn[:, h, qy * G + qx].view(-1, G, G)[:, qy - 1:qy + 2, qx - 1:qx + 2]  # 3x3 around the query
                assert torch.allclose(a, K.expand_as(a), atol=1e-5), (h, qx, qy)
                if K.max() == 1:  # integer centre: (almost) all the mass on one patch
                    assert a.amax() > 0.99


@pytest.mark.parametrize("heads,G", [(4, 6), (9, 8), (5, 6)])
def test_gpsa_with_identity_values_equals_a_fixed_convolution(heads, G):
    """Eq. 5: with W_val = I (local init), W_proj = I, large alpha and the gate fully positional, GPSA is a grouped
    3x3 convolution of the token grid whose kernel for the channels of head h is one-hot (or evenly split) at Delta_h."""
    C = 4 * heads
    g = _gpsa(C, heads, alpha=50.0)
    with torch.no_grad():
        g.gating_param.fill_(30.0)
        g.proj.weight.copy_(torch.eye(C))
        g.proj.bias.zero_()
    torch.manual_seed(1)
    x = torch.randn(3, G * G, C)                                            # (B, N, C)
    out = g(x).transpose(1, 2).reshape(3, C, G, G)                          # (B, C, G, G)
    weight = torch.stack([_conv_kernel(m.head_centres(heads)[c // (C // heads)]) for c in range(C)])[:, None]  # (C, 1, 3, 3)
    conv = F.conv2d(x.transpose(1, 2).reshape(3, C, G, G), weight, padding=1, groups=C)  # depthwise
    interior = (slice(None), slice(None), slice(1, G - 1), slice(1, G - 1))
    err = (out[interior] - conv[interior]).abs().max().item()
    assert torch.allclose(out[interior], conv[interior], atol=1e-5), err
    assert (out - conv).abs().max() > 1e-3  # sanity: the borders differ (softmax renormalises, conv zero-pads)


def test_conv_init_is_more_local_than_random_init():
    G, C, h = 8, 32, 4
    x = torch.randn(4, G * G, C)
    local = m.nonlocality(_gpsa(C, h).get_attention(x), G)
    rand = m.nonlocality(_gpsa(C, h, local=False).get_attention(x), G)
    assert local.shape == (h,) and (local < 0.6 * rand).all(), (local, rand)
    # the same inside ConViT: its GPSA blocks start local, DeiT's blocks start (almost) uniform
    torch.manual_seed(0)
    img = torch.randn(2, 3, 32, 32)
    kw = dict(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=4)
    _, cv = m.ConViT(local_up_to_layer=2, **kw).eval()(img, return_attention=True)
    _, dt = m.ConViT(local_up_to_layer=0, **kw).eval()(img, return_attention=True)
    assert len(cv) == len(dt) == 3 and all(a.shape == (2, 4, 64, 64) for a in cv + dt)
    assert all(m.nonlocality(c, G).mean() < 0.6 * m.nonlocality(d, G).mean() for c, d in zip(cv[:2], dt[:2]))


@pytest.mark.parametrize("local", [0, 1, 3])
def test_class_token_joins_after_the_last_gpsa_block(local):
    model = m.ConViT(img_size=16, patch_size=4, num_classes=5, embed_dim=24, depth=4, num_heads=3, local_up_to_layer=local)
    tokens = []
    for blk in model.blocks:
        blk.register_forward_hook(lambda mod, inp, out: tokens.append(inp[0].shape[1]))
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 5)
    assert tokens == [16] * local + [17] * (4 - local)  # 4x4 patches, + class token from block `local` on
    assert [b.use_gpsa for b in model.blocks] == [i < local for i in range(4)]
    assert [type(b.attn).__name__ for b in model.blocks] == ["GPSA"] * local + ["MHSA"] * (4 - local)


def test_deit_mode_has_no_gpsa_parameters():
    kw = dict(img_size=16, patch_size=4, embed_dim=24, depth=3, num_heads=3)
    deit, convit = m.ConViT(local_up_to_layer=0, **kw), m.ConViT(local_up_to_layer=2, **kw)
    names = [n for n, _ in deit.named_parameters()]
    assert not any("gating_param" in n or "pos_proj" in n for n in names)
    assert not any(isinstance(x, m.GPSA) for x in deit.modules())
    assert m.gates(deit).numel() == 0 and m.gates(convit).shape == (2, 3)
    assert torch.allclose(m.gates(convit), torch.sigmoid(torch.tensor(1.0)).expand(2, 3))  # lambda_h = 1 at init
    # a GPSA block has exactly pos_proj (3h weights + h biases) and the h gates more than an MHSA block
    n = lambda mod: sum(p.numel() for p in mod.parameters())
    assert n(convit) - n(deit) == 2 * (3 * 3 + 3 + 3)


def test_bad_input_gives_clear_errors():
    with pytest.raises(AssertionError, match="not divisible by patch_size"):
        m.ConViT(img_size=30, patch_size=4)
    with pytest.raises(AssertionError, match="divisible by num_heads"):
        m.GPSA(10, num_heads=3)
    with pytest.raises(AssertionError, match="num_heads"):
        m.ConViT(embed_dim=10, num_heads=3)
    with pytest.raises(AssertionError, match="local_up_to_layer"):
        m.ConViT(depth=4, local_up_to_layer=4)
    with pytest.raises(AssertionError, match="square grid"):
        _gpsa(16, 4)(torch.randn(1, 65, 16))  # 64 patches + a class token
    with pytest.raises(SystemExit):
        m.main(["--quick", "--image-size", "30"])
    with pytest.raises(SystemExit):
        m.main(["--quick", "--embed-dim", "30", "--num-heads", "4"])
    with pytest.raises(SystemExit):
        m.main(["--quick", "--low-seeds", "0"])


def test_main_smoke_all_experiments(tiny_image_folder, tmp_path):
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster, and immune to a busy machine's oversubscription
    try:
        res = m.main(["--quick", "--data", tiny_image_folder, "--image-size", "16", "--train-per-class", "12",
                      "--test-per-class", "4", "--embed-dim", "16", "--depth", "3", "--num-heads", "4",
                      "--local-up-to-layer", "2", "--fractions", "0.5", "1.0", "--base-epochs", "2",
                      "--track-epochs", "2", "--ablation-fraction", "0.5", "--batch-size", "8", "--snapshots", "2",
                      "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert set(res) == {"sample", "ablation", "locality", "maps"}
    for name in res:
        assert (out / f"{name}.png").stat().st_size > 1000
        assert json.loads((out / f"{name}.json").read_text())["metrics"]["wall_s"] >= 0
    rows = res["sample"]["rows"]
    assert [r["train_images"] for r in rows] == [18, 36]
    assert rows[0]["epochs"] == 2 * rows[1]["epochs"]  # epochs x 1/f: the same number of steps
    assert all(0 <= r[k] <= 100 for r in rows for k in ("deit", "convit", "deit_train", "convit_train"))
    assert [len(r["convit_per_seed"]) for r in rows] == [2, 1]  # quick preset: 2 seeds at the smallest fraction
    assert abs(rows[0]["convit"] - sum(rows[0]["convit_per_seed"]) / 2) < 1e-9
    assert [r["variant"] for r in res["ablation"]["rows"]][-1] == "DeiT"
    loc = res["locality"]
    assert len(loc["convit"]["nonlocality"][0]) == 3 and len(loc["convit"]["gates"][0]) == 2
    assert loc["convit"]["nonlocality"][0][0] < loc["deit"]["nonlocality"][0][0]  # conv init starts local
    assert json.loads((out / "results.json").read_text())["metrics"].keys() == res.keys()


def test_conv_equivalence_on_real_cifar_tokens(data_dir):
    """The fixed-convolution identity on the patch embeddings of real CIFAR-10 test images."""
    import utils
    d = utils.load_data(data_dir, image_size=32, train_per_class=1, test_per_class=1, seed=0)
    model = m.ConViT(img_size=32, patch_size=4, embed_dim=36, depth=2, num_heads=9, local_up_to_layer=1,
                     locality_strength=50.0).eval()
    g = model.blocks[0].attn
    with torch.no_grad():
        g.gating_param.fill_(30.0)
        g.proj.weight.copy_(torch.eye(36))
        g.proj.bias.zero_()
        x = model.tokens((d.x_test.float() / 255 - 0.5) / 0.25)          # (10, 64, 36)
        out = g(x).transpose(1, 2).reshape(10, 36, 8, 8)
    weight = torch.stack([_conv_kernel(m.head_centres(9)[c // 4]) for c in range(36)])[:, None]
    conv = F.conv2d(x.transpose(1, 2).reshape(10, 36, 8, 8), weight, padding=1, groups=36)
    assert torch.allclose(out[..., 1:-1, 1:-1], conv[..., 1:-1, 1:-1], atol=1e-5)
