"""04_autoformer_entangle.py: weight entanglement (leading slices, checked against independent
index lists), relative positions and the pooled head, extraction, the trie scorer, the search
operators (Pd vs Pm, crossover, the parameter range), the demos and the experiments end to end."""
import importlib
import math
import os
import random

import pytest
import torch
import torch.nn.functional as F

import utils
from conftest import load_script

m = load_script("04_autoformer_entangle")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """These models are tiny: one thread is as fast as two on an idle CPU, and on a busy one two
    OpenMP threads that wait for each other were ~10x slower. Restored for the other files."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SPACES = {
    "quick-like": m.SearchSpace((24, 32, 40), (1, 2, 3), (1, 2, 3), (1.5, 2.0, 3.0), 8),
    "autoformer-T-like": m.SearchSpace((12, 18), (2, 3), (3, 4), (3.5, 4.0), 4),  # 3.5 x 18 = 63
}
MAX_REL = {"absolute positions only": 0, "relative, clipped at 14": 14, "relative, clipped at 1": 1}


def make_supernet(space, seed=0, max_rel=0, image_size=16):
    torch.manual_seed(seed)
    sn = m.SuperViT(space, image_size=image_size, patch_size=4, num_classes=5, max_rel=max_rel)
    with torch.no_grad():  # norms start at 1 / 0 and biases at 0: perturb them, so that a wrong
        for n, p in sn.named_parameters():  # slice of them would show
            if "norm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return sn


def configs_of(space, rng, n=4):
    """n random configs, then the smallest and the largest."""
    return ([m.sample_config(space, rng) for _ in range(n)]
            + [m.smallest_config(space), m.largest_config(space)])

# ---------------------------------------------------------------------------------- the supernet


@pytest.mark.parametrize("max_rel", list(MAX_REL.values()), ids=list(MAX_REL))
@pytest.mark.parametrize("space_name", list(SPACES))
@pytest.mark.parametrize("seed", [0, 1])
def test_extracted_subnet_equals_supernet_and_param_count(space_name, seed, max_rel):
    space = SPACES[space_name]
    sn = make_supernet(space, seed, max_rel)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    for cfg in configs_of(space, random.Random(seed)):
        sub = m.extract_subnet(sn, cfg)
        assert isinstance(sub, m.ViT)
        err = (sub(x) - sn(x, cfg)).abs().max().item()
        assert torch.allclose(sub(x), sn(x, cfg), atol=1e-5), f"{cfg}: max error {err}"
        # the count the search's constraint uses == the standalone subnet's real count
        assert m.subnet_params(sn, cfg) == sum(p.numel() for p in sub.parameters())
        # the copy does not share storage with the supernet
        assert all(p.data_ptr() != q.data_ptr() for p in sub.parameters() for q in sn.parameters())


def index_lists(name, cfg, space, max_rel):
    """Which rows / columns / ... of the supernet's parameter `name` a subnet's parameter of the
    same name holds, as explicit index lists (one per dimension, None = all), written from the
    paper's rules and not from the model's slicing code."""
    D, hd = cfg["embed_dim"], space.head_dim
    first = lambda n: list(range(n))  # noqa: E731
    parts = name.split(".")
    if parts[0] != "blocks":
        return {"patch_embed.weight": [first(D), None, None, None],
                "patch_embed.bias": [first(D)], "cls_token": [None, None, first(D)],
                "pos_embed": [None, None, first(D)], "norm.weight": [first(D)],
                "norm.bias": [first(D)], "head.weight": [None, first(D)], "head.bias": [None]}[name]
    layer, key = int(parts[1]), ".".join(parts[2:])
    units = first(cfg["num_heads"][layer] * hd)  # the first h*hd units of each of q, k, v
    hidden = first(int(round(cfg["mlp_ratio"][layer] * D)))
    if key.startswith(("attn.rel_k.", "attn.rel_v.")):
        return [first(2 * max_rel + 2), first(hd)]  # whole tables: the head dim is fixed
    return {"norm1.weight": [first(D)], "norm1.bias": [first(D)], "norm2.weight": [first(D)],
            "norm2.bias": [first(D)], "attn.q.weight": [units, first(D)],
            "attn.k.weight": [units, first(D)], "attn.v.weight": [units, first(D)],
            "attn.q.bias": [units], "attn.k.bias": [units], "attn.v.bias": [units],
            "attn.proj.weight": [first(D), units], "attn.proj.bias": [first(D)],
            "fc1.weight": [hidden, first(D)], "fc1.bias": [hidden],
            "fc2.weight": [first(D), hidden], "fc2.bias": [first(D)]}[key]


def take(t, indices):
    for dim, idx in enumerate(indices):
        if idx is not None:
            t = t.index_select(dim, torch.tensor(idx, dtype=torch.long))
    return t


@pytest.mark.parametrize("max_rel", [0, 14])
@pytest.mark.parametrize("space_name", list(SPACES))
def test_extraction_and_forward_match_independent_index_lists(space_name, max_rel):
    """The subnet's weights gathered with explicit index lists (independent of the model's
    slicing code) equal what extract_subnet copies, and a plain ViT holding them computes what
    the supernet computes for that config: a slicing bug in either one fails here."""
    space = SPACES[space_name]
    sn = make_supernet(space, 3, max_rel)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    params = dict(sn.named_parameters())
    for cfg in configs_of(space, random.Random(7), n=6):
        expected = {n: take(params[n], index_lists(n, cfg, space, max_rel)).detach()
                    for n, _ in m.build_subnet(sn, cfg).named_parameters()}
        extracted = dict(m.extract_subnet(sn, cfg).named_parameters())
        assert expected.keys() == extracted.keys()
        for n, t in expected.items():
            assert torch.equal(extracted[n], t), f"{m.config_str(cfg)}: {n} is not its slice"
        reference = m.build_subnet(sn, cfg)
        reference.load_state_dict(expected, strict=False)  # index buffers stay as built
        assert torch.allclose(sn(x, cfg), reference(x), atol=1e-5), m.config_str(cfg)


def used_rel_rows(grid, max_rel):
    """Table rows some pair of tokens uses: 0 (class token) and R+1+d for offsets |d| < grid."""
    reach = min(grid - 1, max_rel)
    return {0} | {max_rel + 1 + d for d in range(-reach, reach + 1)}


def can_have_grad(name, p, grid=4, max_rel=0):
    """Entries whose gradient can be nonzero. The KEY bias never gets one: q.(k_j + b) shifts a
    softmax row by q.b, which softmax ignores. Rows of a relative-position table for offsets
    larger than the grid are never looked up."""
    used = torch.ones_like(p, dtype=torch.bool)
    if name.endswith("attn.k.bias"):
        used[:] = False
    if ".rel_" in name:
        used[:] = False
        used[sorted(used_rel_rows(grid, max_rel))] = True
    return used


@pytest.mark.parametrize("max_rel", list(MAX_REL.values()), ids=list(MAX_REL))
@pytest.mark.parametrize("space_name", list(SPACES))
def test_largest_config_uses_every_supernet_weight(space_name, max_rel):
    space = SPACES[space_name]
    sn = make_supernet(space, max_rel=max_rel)
    big = m.largest_config(space)
    assert m.subnet_params(sn, big) == sum(p.numel() for p in sn.parameters())
    F.cross_entropy(sn(torch.randn(4, 3, 16, 16), big), torch.tensor([0, 1, 2, 3])).backward()
    for n, p in sn.named_parameters():
        used = can_have_grad(n, p, max_rel=max_rel)
        assert p.grad is not None and (p.grad[used] != 0).all(), f"{n}: partly unused"


def expected_masks(sn, cfg, max_rel):
    """name -> bool mask of what a subnet may touch (from index_lists), None beyond its depth."""
    masks = {}
    for n, p in sn.named_parameters():
        if n.startswith("blocks.") and int(n.split(".")[1]) >= cfg["depth"]:
            masks[n] = None
            continue
        mask = torch.zeros_like(p, dtype=torch.bool)
        idx = index_lists(n, cfg, sn.space, max_rel)
        mask[tuple(torch.tensor(i if i is not None else range(s)).view(
            [-1 if d == k else 1 for d in range(p.ndim)]) for k, (i, s) in enumerate(
                zip(idx, p.shape)))] = True
        masks[n] = mask
    return masks


@pytest.mark.parametrize("max_rel", list(MAX_REL.values()), ids=list(MAX_REL))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradients_touch_only_the_sliced_region(seed, max_rel):
    space = SPACES["quick-like"]
    sn = make_supernet(space, seed, max_rel)
    rng = random.Random(seed)
    cfg = m.sample_config(space, rng)
    while cfg == m.largest_config(space):
        cfg = m.sample_config(space, rng)
    F.cross_entropy(sn(torch.randn(4, 3, 16, 16), cfg), torch.tensor([0, 1, 2, 3])).backward()
    masks = expected_masks(sn, cfg, max_rel)
    for n, p in sn.named_parameters():
        if masks[n] is None:
            assert p.grad is None or (p.grad == 0).all(), f"{n}: beyond depth, got a gradient"
            continue
        assert (p.grad[~masks[n]] == 0).all(), f"{n}: gradient outside {m.config_str(cfg)}"
        assert (p.grad[masks[n] & can_have_grad(n, p, max_rel=max_rel)] != 0).all(), \
            f"{n}: part of the slice got no gradient"

# ---------------------------------------------------------------- relative positions, pooled head


@pytest.mark.parametrize("grid, max_rel", [(3, 14), (4, 2), (4, 1)])
def test_relative_position_index_per_pair(grid, max_rel):
    """Against a per-pair loop: tokens 1.. are patches in row-major order, token 0 the class
    token."""
    idx = m.relative_position_index(grid, max_rel)
    N = grid * grid + 1
    assert idx.shape == (2, N, N)
    clip = lambda d: max(-max_rel, min(max_rel, d)) + max_rel + 1  # noqa: E731
    for i in range(N):
        for j in range(N):
            if i == 0 or j == 0:
                assert idx[0, i, j] == idx[1, i, j] == 0
                continue
            (ri, ci), (rj, cj) = divmod(i - 1, grid), divmod(j - 1, grid)
            assert (idx[0, i, j], idx[1, i, j]) == (clip(rj - ri), clip(cj - ci)), (i, j)


@pytest.mark.parametrize("seed", [0, 1])
def test_relative_position_attention_matches_per_pair_loop(seed):
    """logit_ij = q_i.(k_j + r^K_ij)/sqrt(hd), out_i = sum_j softmax_j(logit_ij) (v_j + r^V_ij),
    r_ij = E_row[row offset] + E_col[column offset] (entry 0 for the class token), by a loop."""
    torch.manual_seed(seed)
    grid, R, h, hd, D = 3, 1, 2, 4, 6
    attn = m.Attention(dim=D, num_heads=h, head_dim=hd, grid=grid, max_rel=R)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_()
    x = torch.randn(2, grid * grid + 1, D)
    q, k, v = (f(x).view(2, -1, h, hd) for f in (attn.q, attn.k, attn.v))  # each (B, N, h, hd)
    idx = m.relative_position_index(grid, R)
    table = lambda rel, i, j: rel.rel_rows[idx[0, i, j]] + rel.rel_cols[idx[1, i, j]]  # noqa
    N = x.shape[1]
    out = torch.zeros(2, N, h, hd)
    for b in range(2):
        for head in range(h):
            for i in range(N):
                logits = torch.stack([q[b, i, head] @ (k[b, j, head] + table(attn.rel_k, i, j))
                                      / hd ** 0.5 for j in range(N)])
                a = logits.softmax(0)
                out[b, i, head] = sum(a[j] * (v[b, j, head] + table(attn.rel_v, i, j))
                                      for j in range(N))
    assert torch.allclose(attn(x), attn.proj(out.reshape(2, N, h * hd)), atol=1e-5)


def test_head_averages_the_normed_patch_tokens():
    """The official --gp head: final LayerNorm[:D], mean over the patch tokens (not the class
    token), then W_head[:, :D]."""
    sn = make_supernet(SPACES["quick-like"])
    cfg = {"embed_dim": 32, "depth": 2, "num_heads": (1, 2), "mlp_ratio": (2.0, 3.0)}
    x = torch.randn(3, 3, 16, 16)
    t = sn.embed(x, 32)
    for blk, h, r in zip(sn.blocks, cfg["num_heads"], cfg["mlp_ratio"]):
        t = blk(t, num_heads=h, mlp_hidden=m.mlp_hidden_dim(r, 32))
    normed = F.layer_norm(t, (32,), sn.norm.weight[:32], sn.norm.bias[:32], 1e-5)  # (B, N, D)
    expected = normed[:, 1:].mean(1) @ sn.head.weight[:, :32].T + sn.head.bias
    assert torch.allclose(sn(x, cfg), expected, atol=1e-5)

# ---------------------------------------------------------------------- scoring many subnets


@pytest.mark.parametrize("max_rel", [0, 14])
def test_trie_scores_equal_one_evaluation_per_subnet(max_rel):
    """score_configs shares every common prefix of layers; it equals evaluating each subnet."""
    sn = make_supernet(SPACES["quick-like"], max_rel=max_rel)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (23, 3, 16, 16), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 5, (23,), generator=g)
    loader = utils.DeviceLoader(x, y, batch_size=10, device=torch.device("cpu"), train=False)
    configs = m.all_configs(m.SearchSpace((24, 40), (1, 2), (1, 3), (2.0, 3.0), 8))
    assert len(configs) == 2 * (4 + 16)  # D x (4 one-layer + 16 two-layer gene combinations)
    scores = m.score_configs(sn, configs, loader)
    for c in configs:
        ref = utils.evaluate(sn, loader, forward=lambda model, xb: model(xb, c))
        got = m.summarize(*scores[m.config_key(c)])
        assert got.acc == pytest.approx(ref.acc, abs=1e-9), m.config_str(c)
        assert got.nll == pytest.approx(ref.nll, abs=1e-5), m.config_str(c)

# --------------------------------------------------------------------------- the classic baseline


def test_classic_sharing_trains_only_the_chosen_modules():
    space = SPACES["quick-like"]
    torch.manual_seed(0)
    cl = m.ClassicSuperViT(space, image_size=16, patch_size=4, num_classes=5, max_rel=14)
    cfg = {"embed_dim": 32, "depth": 2, "num_heads": (1, 3), "mlp_ratio": (2.0, 1.5)}
    F.cross_entropy(cl(torch.randn(2, 3, 16, 16), cfg), torch.tensor([0, 1])).backward()
    with_grad = {n for n, p in cl.named_parameters() if p.grad is not None}
    # exactly the chosen modules: one stem, and one attention and one MLP per layer
    used = {".".join(n.split(".")[:3 if n.startswith(("attn", "mlp")) else 2]) for n in with_grad}
    assert used == {"patch_embed.e32", "cls_token.e32", "pos_embed.e32", "norm.e32", "head.e32",
                    "attn.0.e32_h1", "attn.1.e32_h3", "mlp.0.e32_r1", "mlp.1.e32_r0"}, used
    assert len(cl.attn[0]) == len(space.embed_dims) * len(space.num_heads)  # a copy per choice


def test_one_step_on_one_subnet_moves_other_subnets_only_when_entangled():
    """Entanglement's point (sec. 3.1): a step on subnet A also updates every subnet that shares
    A's leading slices. With classic sharing, a subnet B with other choices everywhere stays."""
    space = SPACES["quick-like"]
    a = {"embed_dim": 32, "depth": 2, "num_heads": (1, 1), "mlp_ratio": (1.5, 1.5)}
    b = {"embed_dim": 24, "depth": 3, "num_heads": (2, 2, 3), "mlp_ratio": (2.0, 3.0, 3.0)}
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    for cls, should_move in ((m.SuperViT, True), (m.ClassicSuperViT, False)):
        torch.manual_seed(0)
        net = cls(space, image_size=16, patch_size=4, num_classes=5, max_rel=14)
        before = net(x, b).detach()
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        F.cross_entropy(net(x, a), y).backward()
        opt.step()
        moved = (net(x, b) - before).abs().max().item()
        assert (moved > 1e-4) if should_move else (moved == 0.0), (cls.__name__, moved)

# ------------------------------------------------------------------------------ search operators


def test_pd_drives_depth_and_embed_dim_pm_drives_per_layer_genes():
    """With Pd = 0.1 and Pm = 0.5, a gene with c choices changes with probability P (1 - 1/c).
    Swapping Pd and Pm (the official code's values are the paper's swapped) moves every rate by
    more than 20 SDs."""
    space = m.SearchSpace((16, 24, 32), (2, 3, 4), (1, 2, 3), (1.0, 2.0, 3.0), 8)
    parent = {"embed_dim": 24, "depth": 3, "num_heads": (2, 2, 2), "mlp_ratio": (2.0, 2.0, 2.0)}
    rng, N, pd, pm = random.Random(0), 4000, 0.1, 0.5
    kids = [m.mutate(parent, space, rng, p_depth=pd, p_layer=pm) for _ in range(N)]
    rates = {"depth": (sum(k["depth"] != 3 for k in kids) / N, pd),
             "embed_dim": (sum(k["embed_dim"] != 24 for k in kids) / N, pd),
             "heads of layer 0": (sum(k["num_heads"][0] != 2 for k in kids) / N, pm),
             "MLP ratio of layer 1": (sum(k["mlp_ratio"][1] != 2.0 for k in kids) / N, pm)}
    for gene, (observed, p) in rates.items():
        expected = p * (1 - 1 / 3)
        sd = math.sqrt(expected * (1 - expected) / N)
        assert abs(observed - expected) < 5 * sd, f"{gene}: {observed:.3f}, expected {expected:.3f}"
    # each probability acts on its own genes: Pd never touches a kept layer, Pm never depth or D
    only_pd = [m.mutate(parent, space, rng, p_depth=1.0, p_layer=0.0) for _ in range(300)]
    assert all(k["num_heads"][:2] == (2, 2) and k["mlp_ratio"][:2] == (2.0, 2.0) for k in only_pd)
    assert len({k["depth"] for k in only_pd}) == 3 and len({k["embed_dim"] for k in only_pd}) == 3
    only_pm = [m.mutate(parent, space, rng, p_depth=0.0, p_layer=1.0) for _ in range(300)]
    assert all(k["depth"] == 3 and k["embed_dim"] == 24 for k in only_pm)
    assert len({k["num_heads"] for k in only_pm}) > 10


def test_crossover_children_take_every_gene_from_a_parent():
    """Every child gene is one of its parents' values at that position (layers only the deeper
    parent has come from it); both parents give about half, and genes are drawn independently."""
    a = {"embed_dim": 16, "depth": 2, "num_heads": (1, 1), "mlp_ratio": (1.0, 1.0)}
    b = {"embed_dim": 32, "depth": 4, "num_heads": (3, 3, 3, 3), "mlp_ratio": (3.0, 3.0, 3.0, 3.0)}
    rng = random.Random(1)
    kids = [m.crossover(a, b, rng) for _ in range(1000)]
    from_a = []
    for k in kids:
        assert k["embed_dim"] in (16, 32) and k["depth"] in (2, 4), m.config_str(k)
        for i in range(k["depth"]):
            donors = [p for p in (a, b) if i < p["depth"]]
            assert k["num_heads"][i] in [p["num_heads"][i] for p in donors], m.config_str(k)
            assert k["mlp_ratio"][i] in [p["mlp_ratio"][i] for p in donors], m.config_str(k)
        from_a += [k["embed_dim"] == 16, k["depth"] == 2, k["num_heads"][0] == 1,
                   k["mlp_ratio"][1] == 1.0]
    share = sum(from_a) / len(from_a)
    assert 0.45 < share < 0.55, f"parent a gave {share:.2f} of the genes; expected about half"
    donors = [{k["embed_dim"] == 16, k["depth"] == 2, k["num_heads"][0] == 1,
               k["mlp_ratio"][0] == 1.0} for k in kids]
    mixed = sum(len(d) == 2 for d in donors) / len(kids)  # 1 - 2/2^4 = 0.875 if independent
    assert mixed > 0.8, f"only {mixed:.2f} of the children mix genes of both parents"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_out_of_range_subnet_is_ever_scored(seed):
    space = SPACES["quick-like"]
    sn = make_supernet(space)
    ok = m.in_range(sn, (0.3, 0.45))
    lo, hi = ok.bounds
    scored = []
    fitness = lambda c: scored.append(c) or m.subnet_params(sn, c) + random.Random(str(c)).random()  # noqa
    arch = m.evolution_search(fitness, space, constraint=ok, budget=60, population=8, parents=3,
                              p_depth=0.2, p_layer=0.4, rng=random.Random(seed))
    assert len(scored) == len(arch) == 60
    assert all(lo <= m.subnet_params(sn, c) <= hi for c in scored), "an out-of-range subnet scored"
    assert len({m.config_key(c) for c in scored}) == 60, "a subnet was scored twice"
    rs = m.random_search(fitness, space, constraint=ok, budget=30, rng=random.Random(seed))
    assert all(lo <= m.subnet_params(sn, c) <= hi for _, c in rs.values())
    with pytest.raises(utils.InputError, match="--param-range"):
        m.random_search(fitness, space, constraint=lambda c: False, budget=5, rng=random.Random(0))


def evaluations_to_optimum(arch, optimum):
    curve = arch.best_so_far()
    return next((i + 1 for i, f in enumerate(curve) if f == optimum), len(curve) + 1)


def test_evolution_reaches_a_known_optimum_in_fewer_evaluations_than_random_search():
    """A fitness with one optimum: the number of genes equal to a target subnet's. Over 10 seeds,
    evolution scores the optimum after fewer evaluations than random search, on average."""
    space = m.SearchSpace((16, 24), (2, 3), (1, 2, 3), (1.0, 2.0, 3.0), 8)  # 1620 configs
    target = {"embed_dim": 24, "depth": 3, "num_heads": (3, 1, 2), "mlp_ratio": (2.0, 3.0, 1.0)}
    fitness = lambda c: ((c["embed_dim"] == 24) + (c["depth"] == 3)  # noqa: E731
                         + sum(h == t for h, t in zip(c["num_heads"], target["num_heads"]))
                         + sum(r == t for r, t in zip(c["mlp_ratio"], target["mlp_ratio"])))
    best, budget, ok = fitness(target), 500, lambda c: True
    ea = [evaluations_to_optimum(m.evolution_search(
        fitness, space, constraint=ok, budget=budget, population=10, parents=5, p_depth=0.2,
        p_layer=0.4, rng=random.Random(s)), best) for s in range(10)]
    rs = [evaluations_to_optimum(m.random_search(
        fitness, space, constraint=ok, budget=budget, rng=random.Random(s)), best)
        for s in range(10)]
    assert sum(e <= budget for e in ea) >= 8, f"evolution missed the optimum too often: {ea}"
    assert sum(ea) / 10 < sum(rs) / 10, (ea, rs)


def test_demos_run_without_data_and_check_what_they_show():
    """The demos (no data): only the smallest subnet's corner of W changes when it trains; the
    closed-form counts of the space's ends equal the extracted models' real counts; on the
    synthetic table, evolution ends with less regret than random search."""
    d1 = m.demo_entangled_weights()
    assert d1["slice_error"] < 1e-6 and d1["changed"] == 96 * 48 and d1["changed_outside"] == 0
    d2 = m.demo_space_params()
    sn = m.SuperViT(m.QUICK_SPACE, **m.QUICK_IMAGE)
    ends = [sum(p.numel() for p in m.extract_subnet(sn, c).parameters())
            for c in (m.smallest_config(m.QUICK_SPACE), m.largest_config(m.QUICK_SPACE))]
    assert [d2["min"], d2["max"]] == ends and d2["n_subnets"] == 3 * (9 + 9**2 + 9**3)
    d3 = m.demo_search(runs=20)
    assert d3["evolution"]["regret"] < d3["random"]["regret"], d3


def test_invalid_configs_give_clear_errors():
    space = SPACES["quick-like"]
    sn = make_supernet(space)
    x = torch.randn(1, 3, 16, 16)
    good = {"embed_dim": 32, "depth": 2, "num_heads": (1, 2), "mlp_ratio": (2.0, 3.0)}
    sn(x, good)
    for change in ({"num_heads": (1, 5)}, {"embed_dim": 64}, {"embed_dim": 30}, {"depth": 3},
                   {"depth": 4, "num_heads": (1,) * 4, "mlp_ratio": (2.0,) * 4},
                   {"mlp_ratio": (2.0, 2.5)}):
        for fn in (lambda c: sn(x, c), lambda c: m.extract_subnet(sn, c)):
            with pytest.raises(ValueError, match="is not in the search space SearchSpace"):
                fn({**good, **change})
    with pytest.raises(ValueError, match="divisible by patch size"):
        m.SuperViT(space, image_size=18, patch_size=4, num_classes=3, max_rel=0)

# --------------------------------------------------------------------- command line, end to end


@pytest.mark.parametrize("argv, match", [
    (["--parents", "20", "--population", "10"], "--parents must be <= --population"),
    (["--table-depths", "6"], "--table-depths must be a subset of --depths"),
    (["--p-layer", "1.5"], "probabilities"),
    (["--param-range", "0.5,0.1"], "0 <= LO < HI <= 1"),
    (["--image-size", "30"], "divisible by --patch-size"),
    (["--runs", "0"], "--runs: must be an integer >= 1, got 0"),
])
def test_bad_flags_get_one_line_errors(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        utils.run_main(m.main, ["--quick", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert match in err, err


TINY = ["--image-size", "16", "--patch-size", "8", "--embed-dims", "16,24", "--depths", "1,2",
        "--num-heads", "1,2", "--mlp-ratios", "1,2", "--head-dim", "8", "--table-embed-dims",
        "16,24", "--table-depths", "1,2", "--table-num-heads", "1,2", "--table-mlp-ratios", "1,2",
        "--batch-size", "8", "--epochs", "2", "--budget", "4", "--runs", "6", "--population", "4",
        "--parents", "2", "--probes", "4", "--seeds", "2", "--rank-k", "3"]


def test_main_end_to_end_on_any_dataset(tiny_gray_folder, tmp_path, capsys):
    """--quick on a tiny grayscale 4-class folder with val/ instead of test/: the preset's counts
    shrink to fit, the four experiments print their entry checks and verdicts (the entry checks
    again right before the search verdicts), the figure and the JSON are written, and a repeat
    is bit-identical."""
    out = tmp_path / "run"
    res = m.main(["--quick", "--data", tiny_gray_folder, "--out", str(out), "--workers", "1",
                  "--experiment", "all", *TINY])
    printed = capsys.readouterr().out
    assert "note: this dataset is smaller than the preset" in printed
    for name in m.EXPERIMENTS:
        assert f"== {name}:" in printed
    for name in ("entangle", "search", "inherit"):
        assert len(res[name]["verdicts"]) == 2
    assert printed.count("paired supernet seeds \u2192") == 4
    assert printed.count("tables (supernet seeds) \u2192") == 2
    # the two entry checks, in the rank section and again just before the search verdicts
    assert printed.count("entry check: capacity matters: largest \u2212 smallest") == 2
    assert printed.count("entry check: the supernet ranks sub-networks: Kendall") == 2
    search_part = printed[printed.index("== search:"):]
    assert search_part.index("entry check:") < search_part.index("evolution \u2212 random")
    assert "control: linear classifier on pixels" in printed
    assert len(res["rank"]["tau_nll"]) == 2 and len(res["rank"]["rows"]) == 2 * (3 + 1)
    assert os.path.getsize(out / "results.png") > 1000 and (out / "results.json").exists()
    regret = res["search"]["per_seed"][0]["evolution"]["regret"]
    assert all(a >= b for a, b in zip(regret, regret[1:]))  # best-so-far: regret never grows
    again = m.main(["--quick", "--data", tiny_gray_folder, "--out", str(tmp_path / "again"),
                    "--workers", "1", "--experiment", "all", *TINY])
    for name in ("entangle", "search", "inherit"):
        assert [v["per_pair"] for v in again[name]["verdicts"]] == \
            [v["per_pair"] for v in res[name]["verdicts"]], f"{name}: a rerun must be identical"
    assert again["rank"]["tau_nll"] == res["rank"]["tau_nll"]
    assert again["rank"]["checks"] == res["rank"]["checks"]
    # run alone, the search prints the entry checks the rank run saved for the same supernets
    capsys.readouterr()
    m.main(["--quick", "--data", tiny_gray_folder, "--out", str(out), "--workers", "1",
            "--experiment", "search", *TINY])
    printed = capsys.readouterr().out
    search_part = printed[printed.index("== search:"):]
    for line in res["rank"]["checks"]:
        assert search_part.index(line) < search_part.index("evolution \u2212 random")
    # but not those of other supernets (another epoch count)
    m.main(["--quick", "--data", tiny_gray_folder, "--out", str(out), "--workers", "1",
            "--experiment", "search", *TINY, "--epochs", "1"])
    assert "entry check" not in capsys.readouterr().out


def test_worker_processes_give_the_same_results(tiny_gray_folder):
    """utils.run_jobs in 2 spawned processes gives the same supernets, bit for bit, as here."""
    a = utils.cli(m.__doc__, m.PRESETS, m.FLAGS, ["--quick", "--data", tiny_gray_folder, *TINY],
                  experiments=m.EXPERIMENTS, check=m.check)
    data = utils.data_from_args(a)
    jobs = [(a, data, "classic", s, ("entangle",)) for s in (0, 1)]
    here = utils.run_jobs(m.run_seed, jobs, workers=1)
    there = utils.run_jobs(m.run_seed, jobs, workers=2)
    loss = lambda r: [h["loss"] for h in r["history"]]  # noqa: E731
    for x, y in zip(here, there):
        assert loss(x) == loss(y) and x["probes"] == y["probes"]
    assert loss(here[0]) != loss(here[1])  # and the seed matters


def test_entanglement_beats_classic_sharing_on_real_cifar(data_dir):
    """Real CIFAR-10, Fig. 3/4 under one budget: the same ~280 steps, sampled subnets and batches.
    The entangled supernet ends with a lower training loss, and the same six distinct random
    subnets score better on validation (carved from train) with inherited weights, and better
    than chance, with no retraining."""
    a = utils.cli(m.__doc__, m.PRESETS, m.FLAGS, [
        "--quick", "--data", data_dir, "--train-per-class", "300", "--val-per-class", "50",
        "--epochs", "6", "--embed-dims", "32,48", "--depths", "2,3", "--num-heads", "2,3",
        "--mlp-ratios", "2,3", "--table-embed-dims", "32", "--table-depths", "2",
        "--table-num-heads", "2", "--table-mlp-ratios", "2", "--probes", "6"],
        experiments=m.EXPERIMENTS, check=m.check)
    data = utils.data_from_args(a)
    res = {k: m.run_seed(a, data, k, 0, ("entangle",)) for k in ("entangled", "classic")}
    probes = [p[0] for p in res["entangled"]["probes"]]
    assert probes == [p[0] for p in res["classic"]["probes"]] and len(set(probes)) == 6, probes
    for r in res.values():
        assert len(r["history"]) == 6 and r["history"][-1]["loss"] < r["history"][0]["loss"]
    ent, cla = ([p[1][0] for p in res[k]["probes"]] for k in ("entangled", "classic"))
    assert min(ent) > 15, ent  # chance is 10% (500 val images: 15% is > 4 SDs above it)
    assert res["entangled"]["history"][-1]["loss"] < res["classic"]["history"][-1]["loss"]
    assert sum(e > c for e, c in zip(ent, cla)) >= 5, (ent, cla)
    assert sum(ent) > sum(cla) + 6 * 2.0, (ent, cla)

# ------------------------------------------------------- the search's direction, the premise


def genes_apart(c, target):
    """How many genes of config c differ from target's (C, depth, and each block's N_h and r;
    a block only one of them has counts as two genes)."""
    n = (c["embed_dim"] != target["embed_dim"]) + (c["depth"] != target["depth"])
    for i in range(max(c["depth"], target["depth"])):
        for gene in ("num_heads", "mlp_ratio"):
            a = c[gene][i] if i < c["depth"] else None
            b = target[gene][i] if i < target["depth"] else None
            n += a != b
    return n


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_search_on_the_lab_fitness_ends_at_the_known_best_subnet(seed):
    """Per-image validation scores with a known best subnet: each image's NLL grows with the
    number of genes a subnet differs from the target (plus noise). Through the lab's own
    fitness (fitness_from_scores) and the lab's replay (search_curves), evolution must end at
    the target or next to it. A sign error anywhere (fitness = +NLL, parents from the bottom,
    regret from the worst) sends it to the far end of the space, and this test fails."""
    space = m.SearchSpace((16, 24, 32), (2, 3), (1, 2, 4), (1.0, 2.0, 4.0), 8)
    configs = m.all_configs(space)  # 3 x (81 + 729) = 2430 subnets
    target = {"embed_dim": 24, "depth": 3, "num_heads": (4, 1, 2), "mlp_ratio": (2.0, 4.0, 1.0)}
    g = torch.Generator().manual_seed(seed)
    per = {}
    for c in configs:
        nll = 1.0 + 0.05 * genes_apart(c, target) + 0.02 * torch.rand(200, generator=g)
        correct = torch.rand(200, generator=g) < 0.5
        per[m.config_key(c)] = (correct, nll)
    fitness = m.fitness_from_scores(per)
    assert max(fitness, key=fitness.get) == m.config_key(target)
    curves = m.search_curves(fitness, space, constraint=lambda c: True, budget=150, runs=10,
                             seed=seed, population=10, parents=5, p_depth=0.2, p_layer=0.4)
    regret, picks = curves["evolution"]
    apart = [genes_apart(c, target) for c in picks]
    assert all(d <= 1 for d in apart), f"evolution ended {apart} genes from the best subnet"
    assert sum(d == 0 for d in apart) >= 7, apart
    assert (regret >= 0).all() and (regret[:, -1] <= regret[:, 0]).all()


def test_kendall_tau_against_known_orders():
    assert m.kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert m.kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    # one swapped pair of 6 (pairs 1-2): (5 - 1) / 6
    assert m.kendall_tau([1, 2, 3, 4], [2, 1, 3, 4]) == pytest.approx(4 / 6)
    # against the definition on random data without ties, by brute force over pairs
    rng = random.Random(0)
    a = [rng.random() for _ in range(9)]
    b = [x + rng.gauss(0, 0.3) for x in a]
    pairs = [(i, j) for i in range(9) for j in range(i + 1, 9)]
    agree = sum((a[i] < a[j]) == (b[i] < b[j]) for i, j in pairs)
    assert m.kendall_tau(a, b) == pytest.approx((2 * agree - len(pairs)) / len(pairs))


def test_entry_checks_need_an_interval_clear_of_zero():
    """Met: the capacity gap >= 3 points and both intervals (over supernets) above 0. One
    supernet has no interval: not met, and the line says so instead of printing nan."""
    met = m.entry_checks((8.2, 5.6, 10.8), (0.66, 0.52, 0.80))
    assert met[0].endswith("→ met") and met[1].endswith("→ met"), met
    weak = m.entry_checks((2.5, 1.0, 4.0), (0.43, -0.28, 1.14))
    assert all(line.endswith("→ not met") for line in weak), weak
    one = m.entry_checks(utils.mean_ci([8.0]), utils.mean_ci([0.79]))
    assert "nan" not in " ".join(one) and "no interval" in one[1], one
    assert all(line.endswith("→ not met") for line in one), one


@pytest.mark.parametrize("spacing", ["log", "linear"])
@pytest.mark.parametrize("k", [2, 5, 8])
def test_spread_configs_run_from_the_smallest_to_the_largest(k, spacing):
    sn = m.SuperViT(m.QUICK_SPACE, **m.QUICK_IMAGE)
    spread = m.spread_configs(sn, k, seed=3, spacing=spacing)
    sizes = [m.subnet_params(sn, c) for c in spread]
    assert len(spread) == k
    assert spread[0] == m.smallest_config(m.QUICK_SPACE)
    assert spread[-1] == m.largest_config(m.QUICK_SPACE)
    assert sizes == sorted(sizes) and len(set(sizes)) == k, sizes
    # the same subnets in every job of a seed
    assert spread == m.spread_configs(sn, k, seed=3, spacing=spacing)


def test_log_spacing_steps_by_a_constant_factor_and_linear_by_a_constant_size():
    """With k = 8 on the quick space, each subnet of the log ladder is about (hi/lo)^(1/7)
    times the one before (1.5x), while the linear ladder adds about (hi - lo)/7 parameters;
    so the log ladder puts more subnets among the small ones, where accuracy still grows."""
    sn = m.SuperViT(m.QUICK_SPACE, **m.QUICK_IMAGE)
    for spacing in ("log", "linear"):
        sizes = [m.subnet_params(sn, c) for c in m.spread_configs(sn, 8, 3, spacing)]
        lo, hi = sizes[0], sizes[-1]
        for i, size in enumerate(sizes):
            target = lo * (hi / lo) ** (i / 7)
            if spacing == "linear":
                target = lo + i * (hi - lo) / 7
            assert abs(size / target - 1) < 0.1, (spacing, i, size, target)
    log_sizes = [m.subnet_params(sn, c) for c in m.spread_configs(sn, 8, 3, "log")]
    assert sum(s < 30_000 for s in log_sizes) >= 4  # half the ladder below 30k parameters

# ----------------------------------------------------------------------------------- exercises


def solutions():
    return importlib.import_module("solutions.04_autoformer_entangle")


@pytest.mark.parametrize("who", ["solution", "student"])
def test_implement_extract_subnet(who):
    """Exercise 3: my_extract_subnet must copy the leading slices into a plain ViT: the same
    parameters as extract_subnet, the supernet's outputs, and no shared storage."""
    fn = solutions().my_extract_subnet if who == "solution" else m.my_extract_subnet
    for space_name, max_rel in (("quick-like", 14), ("autoformer-T-like", 0)):
        space = SPACES[space_name]
        sn = make_supernet(space, 5, max_rel)
        x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
        for cfg in configs_of(space, random.Random(5)):
            try:
                sub = fn(sn, cfg)
            except NotImplementedError:
                pytest.skip("my_extract_subnet is not written yet: fill in my_extract_subnet "
                            "in the Exercises section of 04_autoformer_entangle.py")
            ref = m.extract_subnet(sn, cfg)
            assert isinstance(sub, m.ViT)
            got = sub.state_dict()
            for name, t in ref.state_dict().items():
                assert torch.equal(got[name], t), f"{m.config_str(cfg)}: {name}"
            assert torch.allclose(sub(x), sn(x, cfg), atol=1e-5), m.config_str(cfg)
            own = {q.data_ptr() for q in sn.parameters()}
            assert all(p.data_ptr() not in own for p in sub.parameters()), "shares storage"


def test_solutions_without_data_assert_their_answers():
    sol = solutions()
    names = sorted(n for n in dir(sol) if n.startswith("exercise_"))
    assert names == [f"exercise_{i}" for i in range(1, 6)], names
    for name in names:
        fn = getattr(sol, name)
        if "data_dir" not in fn.__code__.co_varnames[:fn.__code__.co_argcount]:
            fn()
