"""05_trionet_search.py: samplers (sec. 3.2), Multi-head Sharing (sec. 3.3), sandwich rule, extract_subnet, FLOPs,
the three operators' receptive fields, invalid configs, and the script end to end."""
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import load_script

import utils

m = load_script("05_trionet_search")


@pytest.fixture(autouse=True)
def one_thread():
    """These nets are tiny: one thread avoids OpenMP overhead (and oversubscription on a shared 2-core CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_space(image_size=16, depths=(1, 1, 1), mid=(8, 16, 32), max_heads=2, head_choices=(1, 2)):
    return m.SearchSpace(image_size=image_size, stem_channels=8, stage_channels=(16, 24, 32), mid_channels=mid,
                         depths=depths, max_heads=max_heads, head_choices=head_choices, width_ratios=(0.5, 0.75, 1.0),
                         conv_kernels=(3, 5), local_windows=(3, 5, 7))


def randomise_bn(model, seed):
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g) * 0.1)
            mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) + 0.5)
            mod.weight.data.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
            mod.bias.data.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)


# ------------------------------------------------------------------------------------------------ sampling (sec. 3.2)

def chi_square(counts, probs):
    n = sum(counts)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs))


@pytest.mark.parametrize("seed", [0, 1])
def test_hierarchical_marginals_uniform_flat_marginals_proportional(seed):
    space = make_space(depths=(2, 1, 1))
    n_cands = [len(space.candidates[0][op]) for op in space.OPS]              # conv 6, local 12, axial 4
    assert n_cands == [6, 12, 4]
    flat_p = [n / sum(n_cands) for n in n_cands]
    draws = 1500                                                              # x 4 blocks = 6000 block draws
    counts = {}
    for name, sampler in (("hier", m.sample_hierarchical), ("flat", m.sample_uniform)):
        g = torch.Generator().manual_seed(seed)
        c = [0, 0, 0]
        for _ in range(draws):
            for ch in sampler(space, g):
                c[space.OPS.index(ch.op)] += 1
        counts[name] = c
    crit = 13.82  # chi-square, 2 degrees of freedom, p = 0.001
    assert chi_square(counts["hier"], [1 / 3] * 3) < crit, counts            # hierarchical: 1/3 per type
    assert chi_square(counts["flat"], flat_p) < crit, counts                 # flat: proportional to #candidates
    # and each sampler is clearly NOT the other one (the flat sampler over-samples local attention)
    assert chi_square(counts["hier"], flat_p) > 10 * crit
    assert chi_square(counts["flat"], [1 / 3] * 3) > 10 * crit
    # within a type the hierarchical sampler is uniform over that type's candidates (local: 12 of them)
    g = torch.Generator().manual_seed(seed)
    local = [m.sample_hierarchical(space, g, ops=("local",))[0] for _ in range(2400)]
    per = [sum(ch == c for ch in local) for c in space.candidates[0]["local"]]
    assert chi_square(per, [1 / 12] * 12) < 31.26  # 11 dof, p = 0.001


def test_samplers_are_seeded():
    space = make_space()
    a = [m.sample_hierarchical(space, torch.Generator().manual_seed(3)) for _ in range(2)]
    b = [m.sample_hierarchical(space, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert a == b


# ------------------------------------------------------------------------------------------------ Multi-head Sharing (sec. 3.3)

@pytest.mark.parametrize("max_width,max_heads,width,heads", [(16, 4, 8, 4), (16, 4, 12, 4), (16, 4, 8, 2), (32, 8, 16, 8),
                                                              (8, 2, 6, 2), (16, 4, 16, 4)])
def test_multihead_slices_are_leading_channels_of_each_head(max_width, max_heads, width, heads):
    ch = m.Choice("local", 3, width, heads)
    mh = m.channel_index(ch, max_width=max_width, max_heads=max_heads, sharing="multihead").tolist()
    plain = m.channel_index(ch, max_width=max_width, max_heads=max_heads, sharing="plain").tolist()
    d, d_max = width // heads, max_width // max_heads
    # sub-head i (its channels are mh[i*d:(i+1)*d]) = the leading d channels of supernet head i
    for i in range(heads):
        assert mh[i * d:(i + 1) * d] == list(range(i * d_max, i * d_max + d))
        assert all(j // d_max == i for j in mh[i * d:(i + 1) * d])  # a channel only ever serves its own head
    assert plain == list(range(width))
    if d < d_max and heads > 1:  # narrower heads: the two strategies pick different channels
        assert mh != plain
        # with plain sharing some channel serves a different head than in the widest layer
        assert any(j // d != j // d_max for j in plain)
    if d == d_max:
        assert mh == plain  # full-width heads (e.g. the widest layer): both use the leading heads, in order
    # convolution has no heads: always the first channels
    assert m.channel_index(m.Choice("conv", 3, width, 1), max_width=max_width, max_heads=max_heads,
                           sharing="multihead").tolist() == list(range(width))


def test_ablation_subnets_are_those_where_the_sharing_schemes_differ():
    space = make_space()
    configs = m.sharing_sensitive_attention_configs(space, 4, torch.Generator().manual_seed(0))
    assert len(set(configs)) == 4
    for cfg in configs:
        for b, ch in enumerate(cfg):
            assert ch.op in ("local", "axial")
            kw = dict(max_width=space.mid[b], max_heads=space.max_heads)
            assert not torch.equal(m.channel_index(ch, sharing="multihead", **kw), m.channel_index(ch, sharing="plain", **kw))


def test_multihead_sharing_impossible_heads_is_an_error():
    with pytest.raises(AssertionError, match="do not fit"):
        m.channel_index(m.Choice("local", 3, 16, 2), max_width=16, max_heads=4, sharing="multihead")  # d=8 > d_max=4


# ------------------------------------------------------------------------------------------------ sandwich rule

def test_sandwich_step_visits_largest_smallest_and_accumulates_gradients():
    torch.manual_seed(0)
    space = make_space()
    net = m.TrioNetSupernet(space, num_classes=3)
    visited = []
    step = m.sandwich_step_fn(space, sampler=m.sample_hierarchical, n_random=2,
                              generator=torch.Generator().manual_seed(0), visited=visited)
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 3, (6,))
    net.train()
    net.zero_grad()
    loss, logits = step(net, x, y)
    assert len(visited) == 4 and visited[0] == space.extreme(largest=True) and visited[1] == space.extreme(largest=False)
    largest_f, smallest_f = space.flops(visited[0]), space.flops(visited[1])
    all_f = [space.flops(m.sample_hierarchical(space, torch.Generator().manual_seed(s))) for s in range(200)]
    assert smallest_f <= min(all_f) and largest_f >= max(all_f)
    got = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    # the step's gradient is the SUM of the four sub-networks' gradients (accumulated, one optimizer step)
    want = {}
    for cfg in visited:
        net.zero_grad()
        F.cross_entropy(net(x, cfg), y, label_smoothing=0.1).backward()
        for n, p in net.named_parameters():
            if p.grad is not None:
                want[n] = want.get(n, 0) + p.grad
    assert got.keys() == want.keys()
    for n in got:
        torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=1e-4, msg=n)
    # the loop: utils.train with this step_fn visits largest and smallest every step
    visited.clear()
    loader = utils.DeviceLoader(torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8), torch.randint(0, 3, (8,)),
                                batch_size=4, device=torch.device("cpu"), train=True)
    utils.train(net, loader, epochs=1, lr=1e-3, step_fn=step, log=lambda s: None)
    assert len(visited) == 2 * 4 and visited[0::4] == [space.extreme(True)] * 2 and visited[1::4] == [space.extreme(False)] * 2


# ------------------------------------------------------------------------------------------------ extract_subnet, FLOPs

@pytest.mark.parametrize("sharing", ["multihead", "plain"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_extract_subnet_equals_supernet_forward(sharing, seed):
    torch.manual_seed(seed)
    space = make_space(depths=(1, 2, 1), mid=(16, 32, 32), max_heads=4, head_choices=(2, 4)) if seed == 2 else make_space()
    net = m.TrioNetSupernet(space, num_classes=5, sharing=sharing)
    randomise_bn(net, seed)
    g = torch.Generator().manual_seed(seed)
    configs = [m.sample_hierarchical(space, g) for _ in range(3)] + [space.extreme(True), space.extreme(False)]
    x = torch.randn(3, 3, 16, 16)
    net.eval()
    for cfg in configs:
        sub = m.extract_subnet(net, cfg).eval()
        assert sum(p.numel() for p in sub.parameters()) < sum(p.numel() for p in net.parameters())
        err = (net(x, cfg) - sub(x)).abs().max().item()
        assert err < 1e-5, (cfg, err)


@pytest.mark.parametrize("image_size", [16, 32])
def test_analytical_flops_match_flop_counter(image_size):
    space = make_space(image_size=image_size, depths=(1, 2, 1))
    net = m.TrioNetSupernet(space, num_classes=10)
    g = torch.Generator().manual_seed(image_size)
    configs = [m.sample_hierarchical(space, g) for _ in range(4)] + [m.sample_uniform(space, g) for _ in range(2)]
    for cfg in configs + [space.extreme(True), space.extreme(False)]:
        counted = utils.count_flops(m.extract_subnet(net, cfg), (3, image_size, image_size))
        assert abs(space.flops(cfg) - counted) <= 0.02 * counted, (cfg, space.flops(cfg), counted)


# ------------------------------------------------------------------------------------------------ operators

def dense_global_attention(q, k, v, rel, heads):
    """Reference: every pixel attends to every pixel, logit = q_i . (k_j + r_{j-i}), r indexed by the 2-D offset."""
    B, c, H, W = q.shape
    d, p = c // heads, rel.shape[-1] // 2
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    r = rel[:, ys[None, :] - ys[:, None] + p, xs[None, :] - xs[:, None] + p]        # (c, N_i, N_j)
    q, k, v = (t.reshape(B, heads, d, H * W) for t in (q, k, v))
    logits = torch.einsum("bhdi,bhdj->bhij", q, k) + torch.einsum("bhdi,hdij->bhij", q, r.view(heads, d, H * W, H * W))
    out = torch.einsum("bhij,bhdj->bhdi", (logits * d ** -0.5).softmax(-1), v)
    return out.reshape(B, c, H, W)


@pytest.mark.parametrize("size,heads", [(3, 1), (4, 2), (5, 4)])
def test_local_attention_with_window_covering_the_map_is_global_attention(size, heads):
    torch.manual_seed(size)
    c, window = 8, 2 * size - 1  # the smallest window that reaches from any pixel to every other one
    q, k, v = (torch.randn(2, c, size, size) for _ in range(3))
    rel = torch.randn(c, window, window)
    torch.testing.assert_close(m.local_attention(q, k, v, rel, heads=heads),
                               dense_global_attention(q, k, v, rel, heads), atol=1e-5, rtol=1e-5)
    # a window larger still changes nothing (extra cells are padding and masked out)
    big = torch.randn(c, window + 2, window + 2)
    big[:, 1:-1, 1:-1] = rel
    torch.testing.assert_close(m.local_attention(q, k, v, big, heads=heads), dense_global_attention(q, k, v, rel, heads),
                               atol=1e-5, rtol=1e-5)


def test_local_attention_only_sees_its_window():
    torch.manual_seed(0)
    att = m.LocalSelfAttention(4, heads=2, window=3)
    x = torch.randn(1, 4, 7, 7, requires_grad=True)
    att(x)[0, :, 3, 3].sum().backward()
    seen = x.grad[0].abs().sum(0) > 0
    want = torch.zeros(7, 7, dtype=torch.bool)
    want[2:5, 2:5] = True
    assert torch.equal(seen, want)


def test_axial_attention_reaches_every_pixel_after_row_and_column_passes():
    torch.manual_seed(0)
    att = m.AxialSelfAttention(4, heads=2, span=6)
    x = torch.randn(1, 4, 6, 5, requires_grad=True)
    att(x)[0, :, 1, 2].sum().backward()
    assert (x.grad[0].abs().sum(0) > 0).all()  # every input pixel influences output pixel (1, 2)
    # one height pass alone only reaches the pixel's own column
    x.grad = None
    q, k, v = att.qkv_h(x).chunk(3, dim=1)
    m.axial_attention(q, k, v, att.rel_h, heads=2, axis="height")[0, :, 1, 2].sum().backward()
    seen = x.grad[0].abs().sum(0) > 0
    assert seen[:, 2].all() and not seen[:, [0, 1, 3, 4]].any()


# ------------------------------------------------------------------------------------------------ errors

def test_invalid_configs_raise_clear_errors():
    space = make_space()
    good = space.extreme(True)
    net = m.TrioNetSupernet(space, num_classes=3)
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="blocks"):
        net(x, good[:2])
    with pytest.raises(ValueError, match="unknown operator"):
        net(x, (m.Choice("mlp", 3, 8, 1),) + good[1:])
    with pytest.raises(ValueError, match="local candidates are"):
        net(x, (m.Choice("local", 9, 8, 2),) + good[1:])      # window 9 not in {3, 5, 7}
    with pytest.raises(ValueError, match="not a candidate"):
        net(x, (m.Choice("axial", 0, 8, 1),) + good[1:])      # 1 head of 8 channels > d_max = 4
    with pytest.raises(ValueError, match="not a candidate"):
        net(x, (m.Choice("conv", 3, 7, 1),) + good[1:])       # width 7 not a width choice
    with pytest.raises(ValueError, match="Choice"):
        space.check((("conv", 3, 8, 1),) + good[1:])
    with pytest.raises(AssertionError, match="divisible by 4"):
        make_space(image_size=18)
    with pytest.raises(AssertionError, match="divisible by max_heads"):
        make_space(mid=(6, 16, 32), max_heads=4, head_choices=(2, 4))
    with pytest.raises(AssertionError, match="fits no head choice"):
        make_space(mid=(8, 16, 32), max_heads=4, head_choices=(4,))  # width 6 cannot be split into 4 heads
    with pytest.raises(AssertionError, match="built for 16px"):
        space.build(good, 3)(torch.randn(1, 3, 32, 32))
    with pytest.raises(AssertionError, match="sharing"):
        m.TrioNetSupernet(space, num_classes=3, sharing="first")


# ------------------------------------------------------------------------------------------------ end to end

def test_main_smoke(tiny_image_folder, tmp_path):
    out = tmp_path / "run"
    metrics = m.main(["--data", tiny_image_folder, "--quick", "--image-size", "16", "--val-per-class", "4", "--train-per-class", "8",
                      "--supernet-epochs", "1", "--standalone-epochs", "1", "--population", "3", "--generations", "2",
                      "--parents", "2", "--ablation-subnets", "2", "--batch-size", "8", "--test-per-class", "4",
                      "--out", str(out)])
    blob = json.loads((out / "results.json").read_text())
    assert (out / "searched_architecture.png").stat().st_size > 1000
    assert blob["metrics"]["searched"] == metrics["searched"] and len(metrics["searched"]) == 3
    assert set(metrics["standalone"]) == {"all-conv", "all-local", "all-axial", "searched TrioNet"}
    assert set(metrics["ablation"]) == {"multihead + hierarchical", "plain + hierarchical", "multihead + uniform"}
    assert metrics["search_scored"] >= 3
    # every searched network respects the FLOPs budget, and FlopCounterMode agrees with the analytical count
    for s in metrics["standalone"].values():
        assert abs(s["flops"] - s["flops_analytical"]) <= 0.02 * s["flops"]
    assert metrics["standalone"]["searched TrioNet"]["flops"] <= metrics["budget_flops"]
    assert metrics["searched_val_extracted"] == metrics["searched_val_inherited"]


def test_real_cifar_supernet_learns(data_dir):
    torch.manual_seed(0)
    d = utils.load_data(data_dir, image_size=16, train_per_class=60, val_per_class=20, test_per_class=1)
    space = make_space()
    cpu = torch.device("cpu")
    loaders = m.make_loaders(d, 50, cpu, 0, 2)
    cfg = m.Preset(supernet_epochs=4, n_random=1, lr=3e-3)
    net, _ = m.train_supernet(space, loaders, num_classes=10, sharing="multihead", sampler=m.sample_hierarchical,
                              cfg=cfg, seed=0, log=lambda s: None, name="t")
    accs = [m.inherited_accuracy(net, c, loaders[1], loaders[3]) for c in (space.extreme(True), space.extreme(False))]
    assert min(accs) > 15, accs  # chance is 10% on 200 validation images
