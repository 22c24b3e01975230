"""03_gpsa_convit.py: GPSA equations (explicit and fast path), the sharp-limit convolution, the real init, dtypes,
non-locality, paired arms, ConViT structure, errors, a smoke run of every experiment."""
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


def _randomise(g, gate):
    """A GPSA whose two softmaxes are both far from uniform, so equalities below test something."""
    with torch.no_grad():
        g.gating_param.fill_(gate)
        g.pos_proj.weight.normal_()
        g.pos_proj.bias.normal_()
        g.qk.weight.normal_(std=0.3)
    return g


@pytest.mark.parametrize("heads", [4, 9, 5])
@pytest.mark.parametrize("gate", [-30.0, -2.0, 0.0, 1.0, 30.0])
def test_gpsa_is_two_softmaxes_mixed_by_the_gate(heads, gate):
    """Eq. 7-8 written out independently from the weights, positional scores by a loop over (query, key) pairs."""
    C, G, B = 2 * heads * 4, 5, 3
    g = _randomise(_gpsa(C, heads, local=False), gate)
    x = torch.randn(B, G * G, C)
    attn = g.get_attention(x)
    assert attn.shape == (B, heads, G * G, G * G) and g(x).shape == x.shape
    assert (attn >= 0).all() and torch.allclose(attn.sum(-1), torch.ones(B, heads, G * G), atol=1e-6)
    d = C // heads
    q = (x @ g.qk.weight[:C].T).view(B, G * G, heads, d).transpose(1, 2)
    k = (x @ g.qk.weight[C:].T).view(B, G * G, heads, d).transpose(1, 2)
    content = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1)
    w, b = g.pos_proj.weight, g.pos_proj.bias
    scores = torch.empty(heads, G * G, G * G)
    for i in range(G * G):
        for j in range(G * G):
            dx, dy = j % G - i % G, j // G - i // G  # key minus query, raster order token = y * G + x
            scores[:, i, j] = w[:, 0] * dx + w[:, 1] * dy + w[:, 2] * (dx * dx + dy * dy) + b
    s = torch.sigmoid(torch.tensor(gate))
    assert torch.allclose(attn, (1 - s) * content + s * torch.softmax(scores, -1), atol=1e-6)


@pytest.mark.parametrize("heads,G,B", [(4, 8, 3), (9, 5, 2), (5, 6, 1), (1, 4, 4)])
@pytest.mark.parametrize("gate", [-3.0, 1.0, 4.0, math.inf])
def test_fast_path_equals_explicit_form_with_gradients(heads, G, B, gate):
    """The fast path (fused content attention + one batch-shared positional matmul, no renormalisation) computes the
    same layer as eq. 7-8 written out, and the same gradients for every parameter. float64 so that only rounding is left."""
    C = 3 * heads * 2
    g = _randomise(_gpsa(C, heads, local=False), gate).double().train()
    x = torch.randn(B, G * G, C, dtype=torch.float64, requires_grad=True)
    outs, grads = [], []
    for f in (g.forward, g.forward_explicit):
        g.zero_grad()
        x.grad = None
        y = f(x)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        outs.append(y.detach())
        grads.append([x.grad.clone()] + [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                                         for p in g.parameters()])
    assert torch.allclose(outs[0], outs[1], atol=1e-12, rtol=0), (outs[0] - outs[1]).abs().max()
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-11, rtol=0), (a - b).abs().max()


def test_mhsa_fast_path_equals_explicit_and_whole_models_agree():
    torch.manual_seed(0)
    a = m.MHSA(24, num_heads=3).double()
    x = torch.randn(2, 17, 24, dtype=torch.float64)
    assert torch.allclose(a(x), a.forward_explicit(x), atol=1e-12, rtol=0)
    model = m.ConViT(img_size=16, patch_size=4, embed_dim=24, depth=3, num_heads=4 - 1, local_up_to_layer=2).double()
    img = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    fast = model(img)
    assert torch.allclose(m.set_fast(model, False)(img), fast, atol=1e-12, rtol=0)


def test_positional_scores_computed_once_per_forward_not_per_sample():
    g = _gpsa(32, 4)
    shapes = []
    g.pos_proj.register_forward_hook(lambda mod, inp, out: shapes.append(tuple(inp[0].shape)))
    g(torch.randn(7, 36, 32))
    assert shapes == [(36, 36, 3)]  # one call, no batch dimension


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_model_cast_before_its_first_forward_runs_in_that_dtype(dtype):
    """The relative-position table is built in the weights' dtype (it used to be float32 always: a crash)."""
    torch.manual_seed(0)
    kw = dict(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=4, local_up_to_layer=1)
    ref = m.ConViT(**kw)
    model = m.ConViT(**kw)
    model.load_state_dict(ref.state_dict())
    model.to(dtype)
    img = torch.randn(3, 3, 16, 16)
    out = model(img.to(dtype))
    rel = model.blocks[0].attn.rel_indices
    assert out.dtype == dtype and rel.dtype == dtype and rel.shape == (16, 16, 3)
    expected = ref(img)
    tol = 1e-6 if dtype == torch.float64 else 0.05 * expected.abs().max().item()
    assert torch.allclose(out.float(), expected, atol=tol, rtol=0), (out.float() - expected).abs().max()
    out.float().sum().backward()  # and it trains in that dtype
    assert model.blocks[0].attn.pos_proj.weight.grad.dtype == dtype
    assert model.float()(img).dtype == torch.float32  # cast back: the cached table follows
    assert model.blocks[0].attn.rel_indices.dtype == torch.float32


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


@pytest.mark.parametrize("heads", [4, 9, 16])
def test_head_centres_are_the_official_set_in_another_order(heads):
    """The official code gives head i + k*j the offset (j - c, i - c): column by column. Ours: row by row."""
    k = math.isqrt(heads)
    c = (k - 1) / 2
    official = [None] * heads
    for i in range(k):
        for j in range(k):
            official[i + k * j] = (j - c, i - c)
    ours = m.head_centres(heads)
    assert sorted(ours) == sorted(official) and ours != official
    assert ours == [(dx, dy) for dy, dx in official]  # the transposed enumeration


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
def test_sharp_limit_with_identity_values_equals_a_fixed_convolution(heads, G):
    """Eq. 5 in the sharp limit: W_val = I (local init), W_proj = I, alpha -> large and the gate fully positional:
    GPSA (its fast path) is a grouped 3x3 convolution whose kernel for the channels of head h is one-hot (or evenly
    split) at Delta_h."""
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
    assert torch.allclose(out[interior], conv[interior], atol=1e-5), (out[interior] - conv[interior]).abs().max()
    assert (out - conv).abs().max() > 1e-3  # sanity: the borders differ (softmax renormalises, conv zero-pads)


def test_real_init_is_soft_local_plus_near_uniform_content():
    """At the init ConViT trains from (alpha = 1, lambda = 1) the layer is NOT a convolution: sigma(1) = 73% of each
    row is a soft local map (~77% of it on the head's 2x2 block for 4 heads) and 27% is content attention, which is
    near-uniform (every weight within 15% of 1/N) because q.k ~ 0 at init."""
    G, C, h = 8, 48, 4
    model = m.ConViT(img_size=32, patch_size=4, embed_dim=C, depth=2, num_heads=h, local_up_to_layer=1).eval()
    g = model.blocks[0].attn
    x = model.blocks[0].norm1(model.tokens(torch.randn(4, 3, 32, 32)))  # what the layer really sees
    gate = torch.sigmoid(g.gating_param)
    assert torch.allclose(gate, torch.full((h,), 0.7311), atol=1e-4)
    pos = g.positional_attention(G * G)                                   # (h, N, N)
    content = (g.get_attention(x) - gate.view(h, 1, 1) * pos) / (1 - gate.view(h, 1, 1))  # recover eq. 7's content
    assert (content - 1 / G ** 2).abs().max() < 0.15 / G ** 2            # every weight within 15% of uniform
    q = 3 * G + 3                                                         # an interior query
    for hh, (dx, dy) in enumerate(m.head_centres(h)):
        block = pos[hh, q].view(G, G)[3 + int(dy - 0.5):3 + int(dy + 0.5) + 1, 3 + int(dx - 0.5):3 + int(dx + 0.5) + 1]
        assert block.shape == (2, 2) and 0.7 < block.sum() < 0.85 and pos[hh, q].max() < 0.2  # soft, not one-hot


def test_nonlocality_of_known_attention_patterns():
    """Absolute values: one-hot attention at a known offset, and uniform attention against a per-pair loop."""
    G, N = 8, 64
    attn = torch.zeros(1, 2, N, N)
    valid = 0
    for i in range(N):
        x, y = i % G, i // G
        if x + 3 < G and y + 4 < G:  # head 0: the key at offset (3, 4), distance 5, where it exists ...
            attn[0, 0, i, (y + 4) * G + x + 3] = 1
            valid += 1
        else:                        # ... else the query itself, distance 0
            attn[0, 0, i, i] = 1
        attn[0, 1, i, i] = 1         # head 1: always itself
    assert valid == 5 * 4
    d = m.nonlocality(attn, G)
    assert d.shape == (2,) and torch.allclose(d, torch.tensor([5.0 * 20 / 64, 0.0]))
    uniform = torch.full((3, 1, N, N), 1.0 / N)
    mean_dist = sum(math.hypot(i % G - j % G, i // G - j // G) for i in range(N) for j in range(N)) / N / N
    assert abs(m.nonlocality(uniform, G).item() - mean_dist) < 1e-5 and 4.1 < mean_dist < 4.2  # DeiT-at-init value


def test_conv_init_is_more_local_than_random_init():
    G, C, h = 8, 32, 4
    x = torch.randn(4, G * G, C)
    local = m.nonlocality(_gpsa(C, h).get_attention(x), G)
    rand = m.nonlocality(_gpsa(C, h, local=False).get_attention(x), G)
    assert local.shape == (h,) and (local < 0.6 * rand).all(), (local, rand)
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
    assert all(n.eps == 1e-6 for n in model.modules() if isinstance(n, torch.nn.LayerNorm))  # the official eps


def test_deit_mode_has_no_gpsa_parameters():
    kw = dict(img_size=16, patch_size=4, embed_dim=24, depth=3, num_heads=3)
    deit, convit = m.ConViT(local_up_to_layer=0, **kw), m.ConViT(local_up_to_layer=2, **kw)
    names = [n for n, _ in deit.named_parameters()]
    assert not any("gating_param" in n or "pos_proj" in n for n in names)
    assert not any(isinstance(x, m.GPSA) for x in deit.modules())
    assert m.gates(deit).numel() == 0 and m.gates(convit).shape == (2, 3)
    assert torch.allclose(m.gates(convit), torch.sigmoid(torch.tensor(1.0)).expand(2, 3))  # lambda_h = 1 at init
    n = lambda mod: sum(p.numel() for p in mod.parameters())
    assert n(convit) - n(deit) == 2 * (3 * 3 + 3 + 3)  # per GPSA block: pos_proj (3h + h) and the h gates


def _args(*extra):
    return m.get_args(["--quick", "--image-size", "16", "--patch-size", "4", "--embed-dim", "16", "--depth", "3",
                       "--num-heads", "4", "--local-up-to-layer", "2", *extra])


@pytest.mark.parametrize("seed", [0, 3])
def test_paired_arms_share_every_common_initial_weight(seed):
    args = _args()
    deit = m.build_arm(args, "deit", 10, seed)
    ref = deit.state_dict()
    for arm in ("convit", "positional", "frozen_gate", "no_conv_init", "frozen_gate_no_conv_init"):
        model = m.build_arm(args, arm, 10, seed)
        common = [k for k, v in model.state_dict().items() if k in ref and ref[k].shape == v.shape]
        assert len(common) >= 20 and all(torch.equal(model.state_dict()[k], ref[k]) for k in common), arm
        for bd, bm in zip(deit.blocks, model.blocks[:2]):
            assert torch.equal(bm.attn.qk.weight, bd.attn.qkv.weight[:32]), arm  # queries and keys
            v = bd.attn.qkv.weight[32:] if "no_conv_init" in arm else torch.eye(16)
            assert torch.equal(bm.attn.v.weight, v), arm                         # values: DeiT's, or W_val = I
        assert not torch.equal(model.blocks[0].attn.pos_proj.weight,
                               m.build_arm(args, arm, 10, seed + 1).blocks[0].attn.pos_proj.weight) or "no_conv" not in arm
    assert not torch.equal(m.build_arm(args, "deit", 10, seed + 1).head.weight, deit.head.weight)  # seeds differ
    assert torch.equal(m.build_arm(args, "cnn", 10, seed).head.weight, m.build_arm(args, "cnn", 10, seed).head.weight)


def test_frozen_fully_positional_gate_ignores_content():
    args = _args()
    model = m.build_arm(args, "positional", 10, 0).eval()
    assert torch.equal(m.gates(model), torch.ones(2, 4))
    assert not any(b.attn.gating_param.requires_grad for b in model.blocks[:2])
    img = torch.randn(2, 3, 16, 16)
    before = model(img)
    with torch.no_grad():
        for b in model.blocks[:2]:
            b.attn.qk.weight.normal_()  # content queries/keys have no say any more
    assert torch.equal(model(img), before)
    frozen = m.build_arm(args, "frozen_gate", 10, 0)
    assert torch.equal(m.gates(frozen), torch.full((2, 4), 0.5))


@pytest.fixture
def tiny_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (40, 3, 16, 16), generator=g, dtype=torch.uint8)
    y = torch.arange(4).repeat(10)
    x[:, 0] = (y * 60).view(-1, 1, 1).to(torch.uint8)  # learnable: class in the red channel
    return m.utils.Data(x, y, x[:0], y[:0], x[:12], y[:12], ["a", "b", "c", "d"], (0.5,) * 3, (0.25,) * 3)


def test_tracking_locality_does_not_change_training(tiny_data):
    args = _args("--sizes", "8", "--epochs", "3", "--batch-size", "8", "--snapshots", "4")
    m._DATA["tiny"] = tiny_data
    plain = m.run_job(args, "tiny", "convit", 8, 0)
    tracked = m.run_job(args, "tiny", "convit", 8, 0, track=True)
    assert (plain["acc"], plain["nll"], plain["train_acc"]) == (tracked["acc"], tracked["nll"], tracked["train_acc"])
    t = tracked["track"]
    assert t["step"] == [0, 3, 6, 9, 12] and len(t["nonlocality"][0]) == 3 and len(t["gates"][0]) == 2
    assert t["nonlocality"][0][0] < t["nonlocality"][0][2]  # GPSA layer starts more local than the MHSA layer


def test_runs_in_worker_processes_equal_runs_in_process(tiny_data):
    """utils.run_jobs: two worker processes read the dataset from the shared file and train bit-identically."""
    args = _args("--sizes", "8", "--epochs", "2", "--batch-size", "8")
    ref = m.share_data(tiny_data, workers=2)
    jobs = [(args, ref, arm, 8, 1) for arm in ("deit", "cnn")]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers (and the quick preset's main process): float sums depend on threads
    try:
        here = m.utils.run_jobs(m.run_job, jobs, workers=1)
        there = m.utils.run_jobs(m.run_job, jobs, workers=2)
    finally:
        torch.set_num_threads(threads)
        os.remove(ref)
        m._DATA.pop(ref)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]
    assert strip(here) == strip(there)


def test_bad_input_gives_clear_errors(capsys, tiny_gray_folder):
    with pytest.raises(AssertionError, match="not divisible by patch_size"):
        m.ConViT(img_size=30, patch_size=4)
    with pytest.raises(AssertionError, match="divisible by num_heads"):
        m.GPSA(10, num_heads=3)
    with pytest.raises(AssertionError, match="local_up_to_layer"):
        m.ConViT(depth=4, local_up_to_layer=4)
    with pytest.raises(AssertionError, match="square grid"):
        _gpsa(16, 4)(torch.randn(1, 65, 16))  # 64 patches + a class token
    for argv, msg in ((["--image-size", "30"], "not divisible by --patch-size"),
                      (["--embed-dim", "30", "--num-heads", "4"], "not divisible by --num-heads"),
                      (["--seeds", "0"], "--seeds"), (["--seeds", "2", "--ablation-seeds", "3"], "--ablation-seeds 3"),
                      (["--seeds", "2", "--control-seeds", "3"], "--control-seeds 3"),
                      (["--eval-split", "val"], "--val-per-class"), (["--warmup-frac", "1"], "--warmup-frac"),
                      (["--sizes", "-5"], "--sizes")):
        with pytest.raises(SystemExit) as e:
            m.utils.run_main(m.main, ["--quick", *argv])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.count("\n") == 0 and err.startswith("error:") and msg in err, err
    with pytest.raises(SystemExit) as e:  # a size the dataset does not have, asked for by the user
        m.utils.run_main(m.main, ["--quick", "--data", tiny_gray_folder, "--sizes", "50"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "--sizes 50" in err and "at most 10" in err, err


def test_main_smoke_all_experiments(tiny_gray_folder, tmp_path, capsys):
    """--quick on a small grayscale dataset with val/ instead of test/, no count flags: the preset's sizes fit it."""
    out = tmp_path / "run"
    res = m.main(["--quick", "--data", tiny_gray_folder, "--image-size", "16", "--embed-dim", "16", "--depth", "3",
                  "--num-heads", "4", "--local-up-to-layer", "2", "--patch-size", "4", "--epochs", "2", "--seeds", "2",
                  "--control-seeds", "2", "--ablation-seeds", "2", "--batch-size", "8", "--snapshots", "2", "--cnn-widths", "4", "8",
                  "--workers", "1", "--out", str(out)])
    text = capsys.readouterr().out
    assert "--sizes -> [10]" in text and "n=2 paired seeds" in text
    assert set(res) == {"sample", "controls", "ablation", "locality", "maps"}
    for name in ("sample", "ablation", "locality", "maps"):
        assert (out / f"{name}.png").stat().st_size > 1000
    for name in res:
        assert json.loads((out / f"{name}.json").read_text())["metrics"]["train_core_s"] >= 0
    s = res["sample"]["sizes"]
    assert [r["n"] for r in s] == [10] and s[0]["images"] == 40 and len(s[0]["convit"]) == 2
    assert s[0]["verdict"]["acc"]["n"] == 2 and "gain_shrinks" not in res["sample"]
    assert set(res["controls"]["arms"]) == {"linear", "cnn", "deit", "positional", "convit"}
    assert len(res["ablation"]["variants"]["no_conv_init"]) == 2 and len(res["ablation"]["verdicts"]) == 7
    loc = res["locality"]
    assert len(loc["convit"]["nonlocality"][0]) == 3 and len(loc["convit"]["gates"][0]) == 2
    assert loc["convit"]["nonlocality"][0][0] < loc["deit"]["nonlocality"][0][0]  # conv init starts local
    assert json.loads((out / "results.json").read_text())["metrics"].keys() == res.keys()
    assert not [k for k in m._DATA if "gpsa_convit_data_" in k]  # main releases the shared data


def test_conv_equivalence_on_real_cifar_tokens(data_dir):
    """The sharp-limit convolution identity on the patch embeddings of real CIFAR-10 test images."""
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
