"""05_trionet_search.py: samplers and the sandwich rule (sec. 3.2), Multi-head Sharing (sec. 3.3) and where it may
index, sliced BatchNorm, gradients confined to the sampled slice, extract_subnet, FLOPs, the operators against
independent references, evolution on a fitness with a known optimum, flag errors, and the script end to end."""
import json
import math

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


def make_space(image_size=16, depths=(1, 1, 1), mid=(8, 16, 32), max_heads=2, head_choices=(1, 2),
               width_ratios=(0.5, 0.75, 1.0), ops=m.SearchSpace.OPS):
    return m.SearchSpace(image_size=image_size, stem_channels=8, stage_channels=(16, 24, 32), mid_channels=mid,
                         depths=depths, max_heads=max_heads, head_choices=head_choices, width_ratios=width_ratios,
                         conv_kernels=(3, 5), local_windows=(3, 5, 7), ops=ops)


def sharing_space():
    """An attention-only space with several head counts per width (as the sharing experiment's)."""
    return make_space(mid=(16, 16, 32), max_heads=4, head_choices=(1, 2, 4), width_ratios=(0.25, 0.5, 1.0),
                      ops=("local", "axial"))


def randomise_bn(model, seed):
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g) * 0.1)
            mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) + 0.5)
            mod.weight.data.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
            mod.bias.data.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)


CRIT_2DF = 13.82  # chi-square, 2 degrees of freedom, p = 0.001


# ------------------------------------------------------------------------------------------------ sampling (sec. 3.2)

@pytest.mark.parametrize("seed", [0, 1])
def test_hierarchical_marginals_uniform_flat_marginals_proportional(seed):
    space = make_space(depths=(2, 1, 1))
    n_cands = [len(space.candidates[0][op]) for op in space.OPS]              # conv 6, local 12, axial 4
    assert n_cands == [6, 12, 4]
    flat_p = [n / sum(n_cands) for n in n_cands]
    counts = {}
    for scheme in ("hierarchical", "uniform"):
        g, c = torch.Generator().manual_seed(seed), [0, 0, 0]
        for _ in range(1500):                                                 # x 4 blocks = 6000 block draws
            for ch in m.sample_config(space, g, scheme):
                c[space.OPS.index(ch.op)] += 1
        counts[scheme] = c
    assert m.chi_square(counts["hierarchical"], [1 / 3] * 3)[0] < CRIT_2DF, counts
    assert m.chi_square(counts["uniform"], flat_p)[0] < CRIT_2DF, counts
    # and each sampler is clearly NOT the other one (the flat sampler over-samples local attention)
    assert m.chi_square(counts["hierarchical"], flat_p)[0] > 10 * CRIT_2DF
    assert m.chi_square(counts["uniform"], [1 / 3] * 3)[0] > 10 * CRIT_2DF
    # within a type the candidates are uniform (local: 12 of them)
    g = torch.Generator().manual_seed(seed)
    local = [m.sample_candidates(space, ("local",) * 4, g)[0] for _ in range(2400)]
    per = [sum(ch == c for ch in local) for c in space.candidates[0]["local"]]
    n = sum(per)
    assert sum((c - n / 12) ** 2 / (n / 12) for c in per) < 31.26  # 11 dof, p = 0.001
    assert m.type_probs(space, "uniform") == pytest.approx(dict(zip(space.OPS, flat_p)))


def test_chi_square_p_value_is_the_2_dof_survival_function():
    x, p = m.chi_square([50, 30, 20], [1 / 3] * 3)
    assert x == pytest.approx(14.0) and p == pytest.approx(math.exp(-7.0))
    assert m.chi_square([100, 100, 100], [1 / 3] * 3) == (0.0, 1.0)


def test_samplers_are_seeded():
    space = make_space()
    a = [m.sample_config(space, torch.Generator().manual_seed(3)) for _ in range(2)]
    b = [m.sample_config(space, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert a == b


# ------------------------------------------------------------------------------------------------ sandwich rule

@pytest.mark.parametrize("scheme", ["hierarchical", "uniform"])
def test_sandwich_takes_extremes_within_the_sampled_assignment_and_follows_the_sampler(scheme):
    space = make_space(depths=(1, 2, 1))
    g = torch.Generator().manual_seed(0)
    assign = [0, 0, 0]
    for _ in range(1500):
        configs = m.sandwich_configs(space, g, scheme=scheme, n_random=2)
        assert len(configs) == 4
        ops = tuple(ch.op for ch in configs[0])
        assert all(tuple(ch.op for ch in c) == ops for c in configs), "every sub-network of a step shares the types"
        for b, op in enumerate(ops):  # largest / smallest among the candidates of the block's sampled type
            f = [space.block_flops(b, c) for c in space.candidates[b][op]]
            assert space.block_flops(b, configs[0][b]) == max(f) and space.block_flops(b, configs[1][b]) == min(f)
            assign[space.OPS.index(op)] += 1
    probs = [m.type_probs(space, scheme)[op] for op in space.OPS]
    assert m.chi_square(assign, probs)[0] < CRIT_2DF, assign
    # the old rule (fixed global ends: all-conv5 and all-local3) trained conv and local ~44% each, axial ~11%
    old = [(2 * 1 / 3 + 1) / 3, (2 * 1 / 3 + 1) / 3, (2 * 1 / 3) / 3] if scheme == "hierarchical" else None
    if old:
        assert [ch.op for ch in space.extreme(True)] == ["conv"] * 4 and [ch.op for ch in space.extreme(False)] == ["local"] * 4
        assert m.chi_square(assign, old)[0] > 10 * CRIT_2DF


def test_sandwich_step_accumulates_gradients_and_replay_matches_training():
    torch.manual_seed(0)
    space = make_space()
    net = m.TrioNetSupernet(space, num_classes=3)
    visited = []
    step = m.sandwich_step_fn(space, scheme="hierarchical", n_random=2, generator=torch.Generator().manual_seed(0),
                              visited=visited)
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 3, (6,))
    net.train()
    net.zero_grad()
    step(net, x, y)
    assert visited == m.sandwich_configs(space, torch.Generator().manual_seed(0), scheme="hierarchical", n_random=2)
    got = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    want = {}  # the step's gradient is the SUM of the four sub-networks' gradients (one optimizer step)
    for cfg in visited:
        net.zero_grad()
        F.cross_entropy(net(x, cfg), y, label_smoothing=0.1).backward()
        for n, p in net.named_parameters():
            if p.grad is not None:
                want[n] = want.get(n, 0) + p.grad
    assert got.keys() == want.keys()
    for n in got:
        torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=1e-4, msg=n)
    # in utils.train the step draws exactly the stream exp_sampling replays (same seeded generator)
    visited.clear()
    step = m.sandwich_step_fn(space, scheme="uniform", n_random=1, generator=torch.Generator().manual_seed(4),
                              visited=visited)
    loader = utils.DeviceLoader(torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8), torch.randint(0, 3, (8,)),
                                batch_size=4, device=torch.device("cpu"), train=True)
    utils.train(net, loader, epochs=1, lr=1e-3, step_fn=step, log=lambda s: None)
    g = torch.Generator().manual_seed(4)
    assert visited == [c for _ in range(2) for c in m.sandwich_configs(space, g, scheme="uniform", n_random=1)]


# ------------------------------------------------------------------------------------------------ Multi-head Sharing (sec. 3.3)

@pytest.mark.parametrize("max_width,max_heads,width,heads", [(16, 4, 8, 4), (16, 4, 12, 4), (16, 4, 8, 2), (32, 8, 16, 8),
                                                              (8, 2, 6, 2), (16, 4, 16, 4)])
def test_multihead_slices_are_leading_channels_of_each_head(max_width, max_heads, width, heads):
    ch = m.Choice("local", 3, width, heads)
    mh = m.channel_index(ch, max_width=max_width, max_heads=max_heads, sharing="multihead").tolist()
    plain = m.channel_index(ch, max_width=max_width, max_heads=max_heads, sharing="plain").tolist()
    d, d_max = width // heads, max_width // max_heads
    for i in range(heads):  # sub-head i (channels mh[i*d:(i+1)*d]) = the leading d channels of supernet head i
        assert mh[i * d:(i + 1) * d] == list(range(i * d_max, i * d_max + d))
    assert plain == list(range(width))
    if d < d_max and heads > 1:  # narrower heads: the two strategies pick different channels
        assert mh != plain and any(j // d != j // d_max for j in plain)
    if d == d_max:
        assert mh == plain  # full-width heads: both use the leading heads, in order
    assert m.channel_index(m.Choice("conv", 3, width, 1), max_width=max_width, max_heads=max_heads,
                           sharing="multihead").tolist() == list(range(width))


def test_multihead_sharing_impossible_heads_is_an_error():
    with pytest.raises(AssertionError, match="do not fit"):
        m.channel_index(m.Choice("local", 3, 16, 2), max_width=16, max_heads=4, sharing="multihead")  # d=8 > d_max=4


def test_sharing_sensitive_configs_are_those_where_the_schemes_differ():
    space = sharing_space()
    configs = m.sharing_sensitive_configs(space, 6, torch.Generator().manual_seed(0))
    assert len(set(configs)) == 6 and {ch.op for c in configs for ch in c} == {"local", "axial"}
    for cfg in configs:
        for b, ch in enumerate(cfg):
            kw = dict(max_width=space.mid[b], max_heads=space.max_heads)
            assert not torch.equal(m.channel_index(ch, sharing="multihead", **kw), m.channel_index(ch, sharing="plain", **kw))
    # several head counts at one width: what makes head identity matter
    assert {(c.width, c.heads) for c in space.candidates[0]["axial"]} >= {(4, 1), (4, 2), (4, 4), (8, 2), (8, 4)}


def slice_masks(block, choice, sharing):
    """{parameter name: bool mask of the entries the sub-block `choice` may touch}, from first principles: the shared
    bottleneck uses its first c channels; the operator's own channels are channel_index's; windows are centred."""
    c, mid = choice.width, block.mid
    first = torch.zeros(mid, dtype=torch.bool)
    first[:c] = True
    idx = torch.zeros(mid, dtype=torch.bool)
    idx[m.channel_index(choice, max_width=mid, max_heads=block.max_heads, sharing=sharing)] = True
    masks = {"reduce.weight": first[:, None, None, None].expand_as(block.reduce.weight),
             "expand.weight": first[None, :, None, None].expand_as(block.expand.weight),
             "bn_reduce.weight": first, "bn_reduce.bias": first,
             f"bn_op.{choice.op}.weight": first, f"bn_op.{choice.op}.bias": first}
    if choice.op == "conv":
        K, o = block.conv.weight.shape[-1], (block.conv.weight.shape[-1] - choice.size) // 2
        win = torch.zeros(K, K, dtype=torch.bool)
        win[o:o + choice.size, o:o + choice.size] = True
        masks["conv.weight"] = first[:, None, None, None] & first[None, :, None, None] & win
        return masks
    rows = idx.repeat(3)[:, None, None, None]                              # the same idx rows of W_q, W_k and W_v
    name = choice.op
    masks[f"{name}.proj.weight"] = first[:, None, None, None] & idx[None, :, None, None]
    if name == "local":
        K, o = block.local.rel.shape[-1], (block.local.rel.shape[-1] - choice.size) // 2
        win = torch.zeros(K, K, dtype=torch.bool)
        win[o:o + choice.size, o:o + choice.size] = True
        masks["local.qkv.weight"] = rows & first[None, :, None, None]
        masks["local.rel"] = idx[:, None, None] & win
    else:
        masks["axial.qkv_h.weight"] = rows & first[None, :, None, None]     # reads the bottleneck
        masks["axial.qkv_w.weight"] = rows & idx[None, :, None, None]       # reads the height layer's channels
        masks["axial.rel_h"] = masks["axial.rel_w"] = idx[:, None].expand_as(block.axial.rel_h)
        heads = (torch.arange(block.max_heads) < choice.heads)[:, None]    # per-head bias: sub-head i uses row i
        masks["axial.rel_bias_h"] = masks["axial.rel_bias_w"] = heads.expand_as(block.axial.rel_bias_h)
    return masks


@pytest.mark.parametrize("sharing", ["multihead", "plain"])
@pytest.mark.parametrize("choice", [m.Choice("local", 5, 8, 4), m.Choice("axial", 0, 4, 2), m.Choice("conv", 3, 8, 1),
                                    m.Choice("local", 3, 4, 1)])
def test_gradients_reach_only_the_sampled_slice(sharing, choice):
    torch.manual_seed(0)
    space = make_space(mid=(16, 16, 32), max_heads=4, head_choices=(1, 2, 4), width_ratios=(0.25, 0.5, 1.0))
    net = m.TrioNetSupernet(space, num_classes=3, sharing=sharing)
    config = (choice,) + space.extreme(True)[1:]
    F.cross_entropy(net(torch.randn(4, 3, 16, 16), config), torch.tensor([0, 1, 2, 0])).backward()
    block = net.blocks[0]
    masks = slice_masks(block, choice, sharing)
    for name, p in block.named_parameters():
        if name.startswith("shortcut") or name.startswith("bn_out"):
            continue  # full width, used by every sub-block
        if name not in masks:  # another operator type's weights (or BatchNorm): untouched
            assert p.grad is None or not p.grad.any(), name
            continue
        assert p.grad is not None and not p.grad[~masks[name]].any(), f"{name}: gradient outside the sampled slice"
        assert p.grad[masks[name]].ne(0).float().mean() > 0.5, f"{name}: the sampled slice got (almost) no gradient"
    # the shared bottleneck is indexed the same way in both sharing schemes: only the attention's own channels differ
    if choice.op != "conv":
        assert not masks["reduce.weight"][choice.width:].any() and masks["reduce.weight"][:choice.width].all()


# ------------------------------------------------------------------------------------------------ sliced BatchNorm

def test_sliced_batch_norm_writes_running_statistics_back_and_only_for_its_channels():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(8, momentum=0.25)
    bn.running_mean.copy_(torch.randn(8))
    bn.running_var.copy_(torch.rand(8) + 0.5)
    before_mean, before_var = bn.running_mean.clone(), bn.running_var.clone()
    x = torch.randn(16, 5, 4, 4) * 2 + 1
    bn.train()
    y = m.sliced_batch_norm(x, bn)
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=True)          # running_var uses the unbiased variance
    torch.testing.assert_close(bn.running_mean[:5], 0.75 * before_mean[:5] + 0.25 * mean)
    torch.testing.assert_close(bn.running_var[:5], 0.75 * before_var[:5] + 0.25 * var)
    assert torch.equal(bn.running_mean[5:], before_mean[5:]) and torch.equal(bn.running_var[5:], before_var[5:])
    assert int(bn.num_batches_tracked) == 1
    torch.testing.assert_close(y, F.batch_norm(x, None, None, bn.weight[:5], bn.bias[:5], True, 0.0, bn.eps))
    bn.eval()  # evaluation uses the written-back statistics
    torch.testing.assert_close(m.sliced_batch_norm(x, bn),
                               (x - bn.running_mean[:5, None, None]) / (bn.running_var[:5, None, None] + bn.eps).sqrt())
    bn.train()  # momentum None = cumulative average (BN re-estimation): two batches average exactly
    bn.reset_running_stats()
    bn.momentum = None
    x2 = torch.randn(16, 5, 4, 4)
    m.sliced_batch_norm(x, bn), m.sliced_batch_norm(x2, bn)
    torch.testing.assert_close(bn.running_mean[:5], (x.mean((0, 2, 3)) + x2.mean((0, 2, 3))) / 2)


# ------------------------------------------------------------------------------------------------ extract_subnet, FLOPs

@pytest.mark.parametrize("sharing", ["multihead", "plain"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_extract_subnet_equals_supernet_forward(sharing, seed):
    torch.manual_seed(seed)
    space = {0: make_space(), 1: sharing_space(),
             2: make_space(depths=(1, 2, 1), mid=(16, 32, 32), max_heads=4, head_choices=(2, 4))}[seed]
    net = m.TrioNetSupernet(space, num_classes=5, sharing=sharing)
    randomise_bn(net, seed)
    g = torch.Generator().manual_seed(seed)
    configs = [m.sample_config(space, g) for _ in range(3)] + [space.extreme(True), space.extreme(False)]
    x = torch.randn(3, 3, 16, 16)
    net.eval()
    for cfg in configs:
        sub = m.extract_subnet(net, cfg).eval()
        assert sum(p.numel() for p in sub.parameters()) < sum(p.numel() for p in net.parameters())
        err = (net(x, cfg) - sub(x)).abs().max().item()
        assert err < 1e-5, (cfg, err)


@pytest.mark.parametrize("image_size", [16, 32])
def test_analytical_flops_match_flop_counter(image_size, monkeypatch):
    monkeypatch.setattr(m, "local_attention", m.local_attention_einsum)  # the form whose products the counter sees
    space = make_space(image_size=image_size, depths=(1, 2, 1))
    net = m.TrioNetSupernet(space, num_classes=10)
    g = torch.Generator().manual_seed(image_size)
    configs = [m.sample_config(space, g) for _ in range(4)] + [m.sample_config(space, g, "uniform") for _ in range(2)]
    for cfg in configs + [space.extreme(True), space.extreme(False)]:
        counted = utils.count_flops(m.extract_subnet(net, cfg), (3, image_size, image_size))
        assert abs(space.flops(cfg) - counted) <= 0.02 * counted, (cfg, space.flops(cfg), counted)


def test_flops_matched_config_and_budget():
    space = make_space()
    budget = m.budget_of(space, 10)
    single = {op: m.single_operator_config(space, op, budget) for op in space.OPS}
    assert all(space.flops(c) <= budget for c in single.values())
    target = space.flops(single["local"])
    matched = m.flops_matched_config(space, "conv", target)
    assert {ch.op for ch in matched} == {"conv"} and space.flops(matched) <= target
    import itertools  # it is the most FLOPs any all-conv network has under the target
    assert space.flops(matched) == max(f for c in itertools.product(*[b["conv"] for b in space.candidates])
                                       if (f := space.flops(c)) <= target)


def test_standalone_arms_of_one_seed_share_their_common_initial_weights():
    space = make_space()
    ref = m.single_operator_config(space, "conv", m.budget_of(space, 10))
    other = m.sample_config(space, torch.Generator().manual_seed(1))
    a, b = m.build_standalone(space, ref, 3, ref, 10), m.build_standalone(space, other, 3, ref, 10)
    sa, sb = a.state_dict(), b.state_dict()
    shared = [k for k in sb if k in sa and sa[k].shape == sb[k].shape]
    assert any(k.startswith("stem") for k in shared) and "fc.weight" in shared
    assert all(torch.equal(sa[k], sb[k]) for k in shared)
    assert not torch.equal(m.build_standalone(space, ref, 4, ref, 10).fc.weight, a.fc.weight)  # another seed differs


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
@pytest.mark.parametrize("form", ["local_attention", "local_attention_einsum"])
def test_local_attention_with_window_covering_the_map_is_global_attention(size, heads, form):
    torch.manual_seed(size)
    fn = getattr(m, form)
    c, window = 8, 2 * size - 1  # the smallest window that reaches from any pixel to every other one
    q, k, v = (torch.randn(2, c, size, size) for _ in range(3))
    rel = torch.randn(c, window, window)
    torch.testing.assert_close(fn(q, k, v, rel, heads=heads), dense_global_attention(q, k, v, rel, heads),
                               atol=1e-5, rtol=1e-5)
    big = torch.randn(c, window + 2, window + 2)  # a larger window changes nothing: extra cells are masked padding
    big[:, 1:-1, 1:-1] = rel
    torch.testing.assert_close(fn(q, k, v, big, heads=heads), dense_global_attention(q, k, v, rel, heads),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("B,c,H,W,K,heads", [(2, 8, 6, 5, 3, 2), (1, 12, 7, 7, 5, 3), (2, 4, 4, 4, 7, 1), (1, 16, 9, 3, 5, 4)])
def test_fast_local_attention_equals_the_einsum_reference_values_and_gradients(B, c, H, W, K, heads):
    torch.manual_seed(K * c)
    inputs = [torch.randn(B, c, H, W, requires_grad=True) for _ in range(3)] + [torch.randn(c, K, K, requires_grad=True)]
    outs, grads = [], []
    for fn in (m.local_attention, m.local_attention_einsum):
        y = fn(*inputs, heads=heads)
        outs.append(y)
        grads.append(torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(), inputs))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_local_attention_only_sees_its_window():
    torch.manual_seed(0)
    att = m.LocalSelfAttention(4, heads=2, window=3)
    x = torch.randn(1, 4, 7, 7, requires_grad=True)
    att(x)[0, :, 3, 3].sum().backward()
    seen = x.grad[0].abs().sum(0) > 0
    want = torch.zeros(7, 7, dtype=torch.bool)
    want[2:5, 2:5] = True
    assert torch.equal(seen, want)


def axial_per_pair_reference(q, k, v, rel, bias, heads):
    """Independent reference of one HEIGHT-axis layer, one pair at a time: pixel (i, x) attends to every (j, x) with
    logit (q_i . k_j + q_i . r[offset j - i]) / sqrt(d) + b[head, offset j - i], offset j - i at index j - i + span - 1."""
    B, c, H, W = q.shape
    d, span = c // heads, (rel.shape[-1] + 1) // 2
    out = torch.zeros_like(v)
    for b in range(B):
        for h in range(heads):
            ch = slice(h * d, (h + 1) * d)
            for x in range(W):
                for i in range(H):
                    logits = torch.stack([(q[b, ch, i, x] @ k[b, ch, j, x] + q[b, ch, i, x] @ rel[ch, j - i + span - 1])
                                          / math.sqrt(d) + bias[h, j - i + span - 1] for j in range(H)])
                    out[b, ch, i, x] = sum(a * v[b, ch, j, x] for j, a in enumerate(logits.softmax(0)))
    return out


@pytest.mark.parametrize("H,W,span,heads", [(5, 3, 5, 1), (4, 6, 6, 2)])
def test_axial_attention_matches_a_per_pair_reference_and_a_flipped_offset_fails(H, W, span, heads):
    torch.manual_seed(H)
    c = 4
    q, k, v = (torch.randn(2, c, H, W) for _ in range(3))
    rel, bias = torch.randn(c, 2 * span - 1), torch.randn(heads, 2 * span - 1)
    ref = axial_per_pair_reference(q, k, v, rel, bias, heads)
    torch.testing.assert_close(m.axial_attention(q, k, v, rel, heads=heads, axis="height", bias=bias), ref,
                               atol=1e-5, rtol=1e-5)
    t = lambda a: a.transpose(2, 3)  # the width axis is the height axis of the transposed map
    torch.testing.assert_close(m.axial_attention(t(q), t(k), t(v), rel, heads=heads, axis="width", bias=bias), t(ref),
                               atol=1e-5, rtol=1e-5)
    # a table read with the offset flipped (r_{i-j} instead of r_{j-i}) must NOT pass: the test sees the bug
    for r, b in ((rel.flip(-1), bias), (rel, bias.flip(-1)), (rel * 0, bias)):
        assert (m.axial_attention(q, k, v, r, heads=heads, axis="height", bias=b) - ref).abs().max() > 1e-2


def test_axial_attention_starts_local_not_as_the_mean_of_the_axis():
    """The cause of 'axial attention learns badly': with logits ~0 at initialisation an axial layer outputs the mean
    of its column, wiping out each pixel's own features. The locality-initialised bias b_{j-i} = -(j-i)^2 puts about
    half of every pixel's attention on itself (exp(0) against 2 exp(-1) + 2 exp(-4) + ...)."""
    torch.manual_seed(0)
    x = torch.randn(8, 16, 16, 16)
    share = {}
    for locality in (m.LOCALITY, 0.0):
        att = m.AxialSelfAttention(16, heads=2, span=16, locality=locality)
        q, k, _ = att.qkv_h(x).chunk(3, dim=1)
        a = m.axial_attention_weights(q, k, att.rel_h, heads=2, bias=att.rel_bias_h)  # (B, h, L, L, M)
        share[locality] = a.diagonal(dim1=2, dim2=3).mean().item()                    # weight on j = i
    assert share[m.LOCALITY] > 0.4, share
    assert abs(share[0.0] - 1 / 16) < 0.02, share  # the uniform start: 1/L on itself


def test_axial_attention_reaches_every_pixel_after_row_and_column_passes():
    torch.manual_seed(0)
    att = m.AxialSelfAttention(4, heads=2, span=6)
    x = torch.randn(1, 4, 6, 5, requires_grad=True)
    att(x)[0, :, 1, 2].sum().backward()
    assert (x.grad[0].abs().sum(0) > 0).all()  # every input pixel influences output pixel (1, 2)
    x.grad = None  # one height pass alone only reaches the pixel's own column
    q, k, v = att.qkv_h(x).chunk(3, dim=1)
    m.axial_attention(q, k, v, att.rel_h, heads=2, axis="height")[0, :, 1, 2].sum().backward()
    seen = x.grad[0].abs().sum(0) > 0
    assert seen[:, 2].all() and not seen[:, [0, 1, 3, 4]].any()


# ------------------------------------------------------------------------------------------------ mechanism check

def test_head_alignment_sees_head_identity():
    """Make every full head's q and k depend only on the inputs a narrow layer also reads (the first c/2 bottleneck
    channels) and on its LEADING d/2 channels, and make attention sharp: under Multi-head Sharing narrow head i then
    computes full head i's logits (up to the 1/sqrt(d) scale, which sharp attention ignores); under plain sharing
    narrow head 1 reads zeroed channels of full head 0 and attends uniformly. head_alignment must see the difference."""
    space = make_space(mid=(16, 16, 32), max_heads=2, head_choices=(1, 2), width_ratios=(0.5, 1.0), ops=("local", "axial"))
    tv = {}
    for sharing in ("multihead", "plain"):
        torch.manual_seed(0)
        net = m.TrioNetSupernet(space, num_classes=3, sharing=sharing)
        with torch.no_grad():
            for blk in net.blocks:
                d_max = blk.mid // blk.max_heads
                keep = (torch.arange(blk.mid) % d_max) < d_max // 2                # leading half of each head
                for w in (blk.local.qkv.weight, blk.axial.qkv_h.weight):
                    w3 = w.view(3, blk.mid, blk.mid, 1, 1)                       # (q/k/v, out, in, 1, 1)
                    w3[:2, :, blk.mid // 2:] = 0                                 # q, k read the narrow inputs only
                    w3[0, ~keep] = 0
                    w3[:2] *= 16                                                 # sharp attention
                for r in (blk.local.rel, blk.axial.rel_h):
                    r.zero_()
        loader = utils.DeviceLoader(torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8), torch.zeros(16).long(),
                                    batch_size=8, device=torch.device("cpu"), train=False)
        tv[sharing] = m.head_alignment(net, torch.randn(4, 3, 16, 16), loader)
        assert all(0 <= t <= 1 for t in tv[sharing].values())
    for op in ("local", "axial"):
        assert tv["multihead"][op] < 0.5 * tv["plain"][op], tv


# ------------------------------------------------------------------------------------------------ search

def test_evolution_finds_the_known_optimum_of_a_synthetic_fitness():
    """Fitness = number of blocks that equal a target config under the budget (maximum = num_blocks, unique)."""
    space = make_space(depths=(2, 2, 1))
    budget = m.budget_of(space, 10)
    g = torch.Generator().manual_seed(7)
    target = next(c for c in iter(lambda: m.sample_config(space, g), None) if space.flops(c) <= 0.8 * budget)
    fitness = lambda c: float(sum(a == b for a, b in zip(c, target)))
    best, scores = m.evolutionary_search(space, fitness, budget=budget, population=16, generations=30, parents=4,
                                         mutate_prob=0.3, generator=torch.Generator().manual_seed(0), log=lambda s: None)
    assert best == target and scores[best] == space.num_blocks
    assert all(space.flops(c) <= budget for c in scores)                     # nothing over budget was ever scored
    assert len(scores) < 0.2 * math.prod(sum(len(v) for v in b.values()) for b in space.candidates)
    # random search with as many evaluations does worse on this fitness (the point of evolving)
    g = torch.Generator().manual_seed(0)
    rand = [fitness(c) for c in (m.sample_config(space, g) for _ in range(len(scores))) if space.flops(c) <= budget]
    assert max(rand) < space.num_blocks


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
    with pytest.raises(ValueError, match="unknown operator"):  # conv is not in an attention-only space
        m.TrioNetSupernet(sharing_space(), num_classes=3)(x, (m.Choice("conv", 3, 8, 1),) + good[1:])
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


@pytest.mark.parametrize("argv,match", [
    (["--parents", "9", "--population", "4"], "--parents 9 must not exceed --population 4"),
    (["--seeds", "1"], "must be >= 2"),
    (["--image-size", "18"], "divisible by 4"),
    (["--mid-channels", "6", "16", "32", "--max-heads", "4"], "divisible by max_heads"),
    (["--mutate-prob", "1.5"], "--mutate-prob must lie in"),
    (["--experiment", "nope"], "invalid choice"),
    (["--supernet-epochs", "0"], "must be an integer >= 1"),
])
def test_bad_flags_give_one_line_errors(capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        utils.run_main(m.main, ["--quick"] + argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and match in err, err


# ------------------------------------------------------------------------------------------------ end to end

def test_main_smoke(tiny_gray_folder, tmp_path):
    """--quick on a small grayscale dataset with val/ instead of test/: the preset's counts are fitted, not passed."""
    out = tmp_path / "run"
    small = ["--supernet-epochs", "1", "--standalone-epochs", "1", "--population", "3", "--generations", "2",
             "--parents", "2", "--probes", "2", "--seeds", "2", "--retrain-seeds", "2", "--select-seeds", "1", "--batch-size", "8",
             "--calib-batches", "1", "--workers", "1", "--out", str(out)]
    metrics = m.main(["--quick", "--data", tiny_gray_folder] + small)
    assert set(metrics) == set(m.PRESETS["quick"]["all_experiments"]) == set(m.EXPERIMENTS) - {"axial"}
    for name in metrics:
        blob = json.loads((out / f"{name}.json").read_text())
        assert blob["metrics"]["wall_s"] >= 0 and blob["command"].startswith("python")
    assert (out / "searched_architecture.png").stat().st_size > 1000
    s = metrics["search"]
    assert len(s["searched"]) == 3 and s["search_scored"] >= 3
    assert set(s["runs"]) >= {"all-conv", "all-local", "all-axial", "searched", f"all-{s['best_op']} FLOPs-matched"}
    assert {k: len(v) for k, v in s["runs"].items() if k.startswith("searched") or k.startswith(f"all-{s['best_op']}")} \
        == {"searched": 2, f"all-{s['best_op']}": 2, f"all-{s['best_op']} FLOPs-matched": 2}
    assert all(len(v) == 1 for k, v in s["runs"].items() if k in {"all-conv", "all-local", "all-axial"} - {f"all-{s['best_op']}"})
    assert {v["n"] for v in s["verdicts"].values()} == {2}
    assert metrics["sharing"]["verdicts"]["acc"]["n"] == 2 and metrics["sampler"]["verdicts"]["gap_acc"]["n"] == 2
    mix = metrics["sampling"]["trained"]["hierarchical"]["mix"]
    assert set(mix) == {"conv", "local", "axial"} and abs(sum(mix.values()) - 1) < 1e-9
    axial = m.main(["--quick", "--data", tiny_gray_folder, "--experiment", "axial"] + small)["axial"]
    assert set(axial["arms"]) == {"locality", "uniform start", "no spatial operator"}
    assert all(len(v) == 2 for v in axial["arms"].values())
    assert all(r["self_share_init"] > 0.4 for r in axial["arms"]["locality"])           # starts local
    assert all(r["self_share_init"] < 0.3 for r in axial["arms"]["uniform start"])      # starts as the axis mean


def test_real_cifar_supernet_learns(data_dir):
    d = utils.load_data(data_dir, image_size=16, train_per_class=60, val_per_class=20, test_per_class=1)
    space = make_space()
    loaders = m.make_loaders(d, 50, torch.device("cpu"), 0, 2)
    torch.manual_seed(0)
    net = m.TrioNetSupernet(space, num_classes=10)
    step = m.sandwich_step_fn(space, scheme="hierarchical", n_random=1, generator=torch.Generator().manual_seed(0))
    utils.train(net, loaders[0], epochs=4, lr=3e-3, step_fn=step, log=lambda s: None)
    accs = [m.inherited_score(net, c, loaders[1], loaders[3]).acc for c in (space.extreme(True), space.extreme(False))]
    assert min(accs) > 15, accs  # chance is 10% on 200 validation images
