"""04_autoformer_entangle.py: weight entanglement (leading slices, consistent q/k/v), relative positions and the
global-pool head, extraction, the trie scorer, the search operators (Pd vs Pm, crossover, constraints), and the
experiments end to end."""
import json
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
    """These models are tiny: one thread is as fast as two on an idle CPU, and on a busy one two OpenMP threads
    that wait for each other made this file ~10x slower. Restored afterwards for the other test files."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SPACES = {
    "quick-like": m.SearchSpace((24, 32, 40), (1, 2, 3), (1, 2, 3), (1.5, 2.0, 3.0), 8),
    "autoformer-T-like": m.SearchSpace((12, 18), (2, 3), (3, 4), (3.5, 4.0), 4),  # MLP 3.5 x 18 -> 63 units
}
OPTIONS = {"cls token, absolute positions": dict(gp=False, max_rel=0),
           "official: gp + relative positions": dict(gp=True, max_rel=14),
           "relative positions clipped at 1": dict(gp=False, max_rel=1)}


def make_supernet(space, seed=0, image_size=16, patch_size=4, num_classes=5, gp=False, max_rel=0):
    torch.manual_seed(seed)
    sn = m.SuperViT(space, image_size=image_size, patch_size=patch_size, num_classes=num_classes, gp=gp, max_rel=max_rel)
    with torch.no_grad():  # LayerNorm params start at 1/0: perturb them so a wrong slice of them would show
        for n, p in sn.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return sn


# ------------------------------------------------------------------------------------------------ the supernet

@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("space_name", list(SPACES))
@pytest.mark.parametrize("seed", [0, 1])
def test_extracted_subnet_equals_supernet_and_param_count(space_name, seed, options):
    space = SPACES[space_name]
    sn = make_supernet(space, seed, **OPTIONS[options])
    rng = random.Random(seed)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    for cfg in [m.sample_config(space, rng) for _ in range(4)] + [m.smallest_config(space), m.largest_config(space)]:
        sub = m.extract_subnet(sn, cfg)
        assert isinstance(sub, m.ViT)
        err = (sub(x) - sn(x, cfg)).abs().max().item()
        assert torch.allclose(sub(x), sn(x, cfg), atol=1e-5), f"{cfg}: max error {err}"
        # the count the search's constraint uses == the real parameter count of the standalone subnet
        assert sn.subnet_params(cfg) == sum(p.numel() for p in sub.parameters())
        # the standalone copy does not alias the supernet's storage
        assert all(p.data_ptr() != q.data_ptr() for p in sub.parameters() for q in sn.parameters())


def used_rel_rows(grid, max_rel):
    """Rows of a relative-position table that some pair of tokens uses: 0 (class token) and R+1+d, |d| < grid."""
    return {0} | {max_rel + 1 + d for d in range(-min(grid - 1, max_rel), min(grid - 1, max_rel) + 1)}


def can_have_grad(name, p, grid=4, max_rel=0, cls_only_block=None):
    """Mask of the entries whose gradient can be nonzero. The KEY bias never gets one: q.(k_j + b) shifts every
    logit of a softmax row by the same q.b, which softmax ignores, so d loss / d b_k is 0 up to rounding. Rows of a
    relative-position table for offsets larger than the grid are never looked up. With a class-token head, only the
    class token's query matters in the last block (`cls_only_block`), and it uses table entry 0 for every key: a
    uniform shift of its logits (no gradient for the key tables) and one value entry."""
    used = torch.ones_like(p, dtype=torch.bool)
    if name.endswith("attn.qkv.bias"):
        used.view(3, -1)[1] = False
    if ".rel_" in name:
        used[:] = False
        used[sorted(used_rel_rows(grid, max_rel))] = True
        if cls_only_block is not None and name.startswith(f"blocks.{cls_only_block}."):
            used[:] = False
            used[0] = ".rel_v." in name
    return used


@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("space_name", list(SPACES))
def test_largest_config_uses_every_supernet_weight(space_name, options):
    space = SPACES[space_name]
    sn = make_supernet(space, **OPTIONS[options])
    big = m.largest_config(space)
    assert sn.subnet_params(big) == sum(p.numel() for p in sn.parameters())
    F.cross_entropy(sn(torch.randn(4, 3, 16, 16), big), torch.tensor([0, 1, 2, 3])).backward()
    for n, p in sn.named_parameters():
        opts = OPTIONS[options]
        used = can_have_grad(n, p, max_rel=opts["max_rel"], cls_only_block=None if opts["gp"] else big["depth"] - 1)
        assert p.grad is not None and (p.grad[used] != 0).all(), f"{n}: the largest subnet leaves part of it unused"


def qkv_rows_consistent(w, b, inner, max_inner):
    """Given a qkv weight whose row r is filled with r and a bias with entry r = r, the subnet's row j and bias j
    must be the same supernet unit, and q/k/v must each be the first `inner` units of their block."""
    expected = torch.cat([torch.arange(inner) + s * max_inner for s in range(3)]).float()
    return torch.equal(w[:, 0], b) and torch.equal(b, expected)


def reference_code_qkv_slice(weight, bias, in_dim, out_dim):
    """The official AutoFormer qkv_super slicing, restated for this test: rows interleaved, bias leading."""
    w = weight[:, :in_dim]
    return torch.cat([w[i:out_dim:3, :] for i in range(3)], 0), bias[:out_dim]


@pytest.mark.parametrize("heads", [1, 2, 3])
@pytest.mark.parametrize("dim", [24, 40])
def test_qkv_weight_and_bias_sliced_consistently(heads, dim):
    space = SPACES["quick-like"]
    sn = make_supernet(space)
    attn = sn.blocks[0].attn
    Imax, inner = attn.max_inner, heads * space.head_dim
    with torch.no_grad():  # label every output unit of the fused qkv layer with its row index
        attn.qkv.weight.copy_(torch.arange(3 * Imax).float()[:, None].expand_as(attn.qkv.weight))
        attn.qkv.bias.copy_(torch.arange(3 * Imax).float())
    w, b = attn.qkv_slice(dim, inner)
    assert w.shape == (3 * inner, dim) and b.shape == (3 * inner,)
    assert qkv_rows_consistent(w, b, inner, Imax)
    # the same check catches the reference code's bug (weight rows and bias entries of different units)
    w_ref, b_ref = reference_code_qkv_slice(attn.qkv.weight, attn.qkv.bias, dim, 3 * inner)
    assert not qkv_rows_consistent(w_ref, b_ref, inner, Imax)
    # and the extracted plain Attention got the consistent slice
    cfg = {"embed_dim": dim, "depth": 1, "num_heads": (heads,), "mlp_ratio": (2.0,)}
    blk = m.extract_subnet(sn, cfg).blocks[0].attn.qkv
    assert qkv_rows_consistent(blk.weight, blk.bias, inner, Imax)


def expected_masks(sn, cfg, grid=4):
    """name -> bool mask of the region a subnet may touch, written independently of the model code (None: unused)."""
    s, D, L = sn.space, cfg["embed_dim"], cfg["depth"]
    masks = {}
    for n, p in sn.named_parameters():
        mask = torch.zeros_like(p, dtype=torch.bool)
        parts = n.split(".")
        if parts[0] == "blocks":
            i = int(parts[1])
            if i >= L:
                masks[n] = None
                continue
            I, M = cfg["num_heads"][i] * s.head_dim, int(round(cfg["mlp_ratio"][i] * D))
            Imax = max(s.num_heads) * s.head_dim
            key = ".".join(parts[2:])
            if key.startswith(("norm1", "norm2")) or key in ("attn.proj.bias", "fc2.bias"):
                mask[:D] = True
            elif key == "attn.qkv.weight":
                mask.view(3, Imax, -1)[:, :I, :D] = True
            elif key == "attn.qkv.bias":
                mask.view(3, Imax)[:, :I] = True
            elif key == "attn.proj.weight":
                mask[:D, :I] = True
            elif key == "fc1.weight":
                mask[:M, :D] = True
            elif key == "fc1.bias":
                mask[:M] = True
            elif key == "fc2.weight":
                mask[:D, :M] = True
            elif key.startswith(("attn.rel_k.", "attn.rel_v.")):  # head dim is fixed: whole rows, looked-up rows only
                mask[sorted(used_rel_rows(grid, sn.max_rel))] = True
            else:
                raise AssertionError(f"test does not know parameter {n}")
        elif n in ("cls_token", "pos_embed"):
            mask[..., :D] = True
        elif n.startswith(("patch_embed", "norm")):
            mask[:D] = True
        elif n == "head.weight":
            mask[:, :D] = True
        elif n == "head.bias":
            mask[:] = True
        else:
            raise AssertionError(f"test does not know parameter {n}")
        masks[n] = mask
    return masks


@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradients_touch_only_the_sliced_region(seed, options):
    space = SPACES["quick-like"]
    sn = make_supernet(space, seed, **OPTIONS[options])
    rng = random.Random(seed)
    cfg = m.sample_config(space, rng)
    while cfg == m.largest_config(space):
        cfg = m.sample_config(space, rng)
    F.cross_entropy(sn(torch.randn(4, 3, 16, 16), cfg), torch.tensor([0, 1, 2, 3])).backward()
    for n, p in sn.named_parameters():
        mask = expected_masks(sn, cfg)[n]
        if mask is None:
            assert p.grad is None or (p.grad == 0).all(), f"{n}: block beyond depth {cfg['depth']} got a gradient"
            continue
        assert (p.grad[~mask] == 0).all(), f"{n}: gradient outside the leading slice of {m.config_str(cfg)}"
        cls_only = None if sn.gp else cfg["depth"] - 1
        assert (p.grad[mask & can_have_grad(n, p, max_rel=sn.max_rel, cls_only_block=cls_only)] != 0).all(), \
            f"{n}: part of the slice got no gradient"


# ------------------------------------------------------------------------------------------------ fidelity: --gp, --relative_position

@pytest.mark.parametrize("grid, max_rel", [(3, 14), (4, 2), (4, 1)])
def test_relative_position_index_per_pair(grid, max_rel):
    """Against an independent per-pair loop: tokens 1.. are patches in row-major order, token 0 the class token."""
    idx = m.relative_position_index(grid, max_rel)
    N = grid * grid + 1
    assert idx.shape == (2, N, N)
    clip = lambda d: max(-max_rel, min(max_rel, d)) + max_rel + 1
    for i in range(N):
        for j in range(N):
            if i == 0 or j == 0:
                assert idx[0, i, j] == idx[1, i, j] == 0
                continue
            (ri, ci), (rj, cj) = divmod(i - 1, grid), divmod(j - 1, grid)
            assert (idx[0, i, j], idx[1, i, j]) == (clip(rj - ri), clip(cj - ci)), (i, j)


@pytest.mark.parametrize("seed", [0, 1])
def test_relative_position_attention_matches_per_pair_loop(seed):
    """Attention with relative positions (official --relative_position) against a loop over query/key pairs:
    logit_ij = q_i.(k_j + a^K_ij)/sqrt(hd), out_i = sum_j softmax_j(logit_ij) (v_j + a^V_ij),
    a_ij = E_row[row offset] + E_col[column offset] (entry 0 for the class token)."""
    torch.manual_seed(seed)
    grid, R, h, hd, D = 3, 1, 2, 4, 6
    attn = m.Attention(D, num_heads=h, head_dim=hd, grid=grid, max_rel=R)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_()
    x = torch.randn(2, grid * grid + 1, D)
    q, k, v = attn.qkv(x).view(2, -1, 3, h, hd).unbind(2)  # each (B, N, h, hd)
    idx = m.relative_position_index(grid, R)
    table = lambda rel, i, j: rel.rel_rows[idx[0, i, j]] + rel.rel_cols[idx[1, i, j]]
    N = x.shape[1]
    out = torch.zeros(2, N, h, hd)
    for b in range(2):
        for head in range(h):
            for i in range(N):
                logits = torch.stack([q[b, i, head] @ (k[b, j, head] + table(attn.rel_k, i, j)) / hd ** 0.5 for j in range(N)])
                a = logits.softmax(0)
                out[b, i, head] = sum(a[j] * (v[b, j, head] + table(attn.rel_v, i, j)) for j in range(N))
    assert torch.allclose(attn(x), attn.proj(out.reshape(2, N, h * hd)), atol=1e-5)


def test_global_pool_head_averages_the_normed_patch_tokens():
    space = SPACES["quick-like"]
    sn = make_supernet(space, gp=True)
    cfg = {"embed_dim": 32, "depth": 2, "num_heads": (1, 2), "mlp_ratio": (2.0, 3.0)}
    x = torch.randn(3, 3, 16, 16)
    t = sn.embed(x, 32)
    for blk, h, r in zip(sn.blocks, cfg["num_heads"], cfg["mlp_ratio"]):
        t = blk(t, num_heads=h, mlp_hidden=m.mlp_hidden_dim(r, 32))
    normed = F.layer_norm(t, (32,), sn.norm.weight[:32], sn.norm.bias[:32], 1e-5)  # (B, N, D)
    expected = normed[:, 1:].mean(1) @ sn.head.weight[:, :32].T + sn.head.bias  # patch tokens only
    assert torch.allclose(sn(x, cfg), expected, atol=1e-5)
    sn.gp = False  # the class-token head reads token 0 instead
    assert torch.allclose(sn(x, cfg), normed[:, 0] @ sn.head.weight[:, :32].T + sn.head.bias, atol=1e-5)


# ------------------------------------------------------------------------------------------------ scoring many subnets

@pytest.mark.parametrize("options", list(OPTIONS))
def test_trie_scores_equal_one_evaluation_per_subnet(options):
    """score_configs shares every common prefix of layers; the result equals a plain evaluation of each subnet."""
    sn = make_supernet(SPACES["quick-like"], **OPTIONS[options])
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (23, 3, 16, 16), dtype=torch.uint8, generator=g), torch.randint(0, 5, (23,), generator=g)
    loader = utils.DeviceLoader(x, y, batch_size=10, device=torch.device("cpu"), train=False)
    configs = m.all_configs(m.SearchSpace((24, 40), (1, 2), (1, 3), (2.0, 3.0), 8))
    assert len(configs) == 2 * (4 + 16)  # D x (4 one-layer + 16 two-layer gene combinations)
    scores = m.score_configs(sn, configs, loader)
    for c in configs:
        ref = utils.evaluate(sn, loader, forward=lambda model, xb: model(xb, c))
        got = m.summarize(*scores[m.config_key(c)])
        assert got.acc == pytest.approx(ref.acc, abs=1e-9) and got.nll == pytest.approx(ref.nll, abs=1e-5), m.config_str(c)


# ------------------------------------------------------------------------------------------------ the classic baseline

def test_classic_sharing_trains_only_the_chosen_modules():
    space = SPACES["quick-like"]
    torch.manual_seed(0)
    cl = m.ClassicSuperViT(space, image_size=16, patch_size=4, num_classes=5, gp=True, max_rel=14)
    cfg = {"embed_dim": 32, "depth": 2, "num_heads": (1, 3), "mlp_ratio": (2.0, 1.5)}
    F.cross_entropy(cl(torch.randn(2, 3, 16, 16), cfg), torch.tensor([0, 1])).backward()
    names_with_grad = {n for n, p in cl.named_parameters() if p.grad is not None}
    assert "cls_token.e32" in names_with_grad and "cls_token.e24" not in names_with_grad
    assert any(n.startswith("attn.0.e32_h1.") for n in names_with_grad)
    assert not any(n.startswith(("attn.0.e32_h2.", "attn.0.e24_h1.", "attn.2.")) for n in names_with_grad)
    assert not any(n.startswith("mlp.0.e32_r0.") for n in names_with_grad)  # layer 0 picked ratio 2.0 = index 1
    # exactly the chosen modules were used: one stem, one attention and one MLP per layer
    used = {n.split(".")[0] + "." + n.split(".")[1] + ("." + n.split(".")[2] if n.startswith(("attn", "mlp")) else "")
            for n in names_with_grad}
    assert used == {"patch_embed.e32", "cls_token.e32", "pos_embed.e32", "norm.e32", "head.e32",
                    "attn.0.e32_h1", "attn.1.e32_h3", "mlp.0.e32_r1", "mlp.1.e32_r0"}, used
    assert len(cl.attn[0]) == len(space.embed_dims) * len(space.num_heads)  # every (D, heads) choice has its own copy


def test_one_step_on_one_subnet_moves_other_subnets_only_when_entangled():
    """Entanglement's point (paper sec. 3.1): a step on subnet A also updates every subnet that shares A's leading
    slices. With classic sharing a subnet B that picks different choices everywhere is untouched."""
    space = SPACES["quick-like"]
    a = {"embed_dim": 32, "depth": 2, "num_heads": (1, 1), "mlp_ratio": (1.5, 1.5)}
    b = {"embed_dim": 24, "depth": 3, "num_heads": (2, 2, 3), "mlp_ratio": (2.0, 3.0, 3.0)}
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    for cls, should_move in ((m.SuperViT, True), (m.ClassicSuperViT, False)):
        torch.manual_seed(0)
        net = cls(space, image_size=16, patch_size=4, num_classes=5, gp=True, max_rel=14)
        before = net(x, b).detach()
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        F.cross_entropy(net(x, a), y).backward()
        opt.step()
        moved = (net(x, b) - before).abs().max().item()
        assert (moved > 1e-4) if should_move else (moved == 0.0), (cls.__name__, moved)


# ------------------------------------------------------------------------------------------------ search operators

def test_pd_drives_depth_and_embed_dim_pm_drives_per_layer_genes():
    """Statistically: with Pd = 0.1 and Pm = 0.5, a gene with c choices changes with probability P * (1 - 1/c).
    Swapping Pd and Pm (the official code's values are the paper's swapped) moves every rate by > 20 SDs."""
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
        assert abs(observed - expected) < 5 * sd, f"{gene}: changed in {observed:.3f} of children, expected {expected:.3f}"
    # the two probabilities act on separate genes: Pd alone never touches a kept layer, Pm alone never the depth or D
    only_pd = [m.mutate(parent, space, rng, p_depth=1.0, p_layer=0.0) for _ in range(300)]
    assert all(k["num_heads"][:2] == (2, 2) and k["mlp_ratio"][:2] == (2.0, 2.0) for k in only_pd)
    assert len({k["depth"] for k in only_pd}) == 3 and len({k["embed_dim"] for k in only_pd}) == 3
    only_pm = [m.mutate(parent, space, rng, p_depth=0.0, p_layer=1.0) for _ in range(300)]
    assert all(k["depth"] == 3 and k["embed_dim"] == 24 for k in only_pm)
    assert len({k["num_heads"] for k in only_pm}) > 10


def test_crossover_children_take_every_gene_from_a_parent():
    """Parents with different values in every gene: each child gene must be one of its parents' values at that
    position (layers only the deeper parent has come from it), and both parents must contribute about half."""
    a = {"embed_dim": 16, "depth": 2, "num_heads": (1, 1), "mlp_ratio": (1.0, 1.0)}
    b = {"embed_dim": 32, "depth": 4, "num_heads": (3, 3, 3, 3), "mlp_ratio": (3.0, 3.0, 3.0, 3.0)}
    rng, kids = random.Random(1), []
    for _ in range(1000):
        kids.append(m.crossover(a, b, rng))
    from_a = []
    for k in kids:
        assert k["embed_dim"] in (16, 32) and k["depth"] in (2, 4), m.config_str(k)
        for i in range(k["depth"]):
            donors = [p for p in (a, b) if i < p["depth"]]
            assert k["num_heads"][i] in [p["num_heads"][i] for p in donors], m.config_str(k)
            assert k["mlp_ratio"][i] in [p["mlp_ratio"][i] for p in donors], m.config_str(k)
        from_a += [k["embed_dim"] == 16, k["depth"] == 2, k["num_heads"][0] == 1, k["mlp_ratio"][1] == 1.0]
    share = sum(from_a) / len(from_a)
    assert 0.45 < share < 0.55, f"parent a gave {share:.2f} of the genes; expected about half"
    donors = [{k["embed_dim"] == 16, k["depth"] == 2, k["num_heads"][0] == 1, k["mlp_ratio"][0] == 1.0} for k in kids]
    mixed = sum(len(d) == 2 for d in donors) / len(kids)  # 1 - 2 / 2^4 = 0.875 if genes are drawn independently
    assert mixed > 0.8, f"only {mixed:.2f} of the children mix genes of both parents"
    assert m.crossover(a, b, rng, constraint=lambda c: False) in (a, b)  # no valid child: a parent comes back


def _params_constraint(space, lo_frac, hi_frac):
    sn = make_supernet(space)
    lo, hi = (sn.subnet_params(c) for c in (m.smallest_config(space), m.largest_config(space)))
    lo, hi = lo + lo_frac * (hi - lo), lo + hi_frac * (hi - lo)
    return (lambda c: lo <= sn.subnet_params(c) <= hi), sn


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_out_of_range_candidate_is_ever_scored(seed):
    space = SPACES["quick-like"]
    ok, sn = _params_constraint(space, 0.3, 0.45)
    scored = []
    fitness = lambda c: scored.append(c) or sn.subnet_params(c) + random.Random(str(c)).random()
    arch = m.evolution_search(fitness, space, constraint=ok, budget=60, population=8, parents=3, p_depth=0.2,
                              p_layer=0.4, rng=random.Random(seed))
    assert len(scored) == len(arch) == 60 and all(ok(c) for c in scored)
    assert len({m.config_key(c) for c in scored}) == 60, "a candidate was scored twice"
    rng = random.Random(seed)
    for _ in range(200):  # the operators themselves only return valid children
        p1, p2 = arch.top(3)[rng.randrange(3)], arch.top(3)[rng.randrange(3)]
        for child in (m.mutate(p1, space, rng, p_depth=0.2, p_layer=0.4, constraint=ok), m.crossover(p1, p2, rng, constraint=ok)):
            sn.check_config(child)
            assert ok(child), f"{m.config_str(child)} has {sn.subnet_params(child)} params: out of range"
    rs = m.random_search(fitness, space, constraint=ok, budget=30, rng=random.Random(seed))
    assert all(ok(c) for _, c in rs.scored.values())
    with pytest.raises(AssertionError, match="must not be scored"):
        m.Archive(fitness, ok).add(m.largest_config(space))
    with pytest.raises(utils.InputError, match="--param-range"):
        m.sample_valid(space, rng, lambda c: False, max_tries=20)


def evaluations_to_optimum(arch, optimum):
    curve = arch.best_so_far()
    return next((i + 1 for i, f in enumerate(curve) if f == optimum), len(curve) + 1)


def test_evolution_reaches_a_known_optimum_in_fewer_evaluations_than_random_search():
    """A synthetic fitness with one optimum inside the range: the number of genes that match a target subnet. Over
    10 seeds, evolution needs fewer evaluations than random search, on average, to score the optimum."""
    space = m.SearchSpace((16, 24), (2, 3), (1, 2, 3), (1.0, 2.0, 3.0), 8)  # 2 x (81 + 729) = 1620 configs
    target = {"embed_dim": 24, "depth": 3, "num_heads": (3, 1, 2), "mlp_ratio": (2.0, 3.0, 1.0)}
    fitness = lambda c: ((c["embed_dim"] == 24) + (c["depth"] == 3) + sum(h == t for h, t in zip(c["num_heads"], target["num_heads"]))
                         + sum(r == t for r, t in zip(c["mlp_ratio"], target["mlp_ratio"])))
    best, budget, ok = fitness(target), 500, lambda c: True
    ea = [evaluations_to_optimum(m.evolution_search(fitness, space, constraint=ok, budget=budget, population=10, parents=5,
                                                    p_depth=0.2, p_layer=0.4, rng=random.Random(s)), best) for s in range(10)]
    rs = [evaluations_to_optimum(m.random_search(fitness, space, constraint=ok, budget=budget, rng=random.Random(s)), best)
          for s in range(10)]
    assert sum(e <= budget for e in ea) >= 8, f"evolution missed the optimum too often: {ea}"
    assert sum(ea) / 10 < sum(rs) / 10, (ea, rs)


def test_invalid_configs_give_clear_errors():
    space = SPACES["quick-like"]
    sn = make_supernet(space)
    x = torch.randn(1, 3, 16, 16)
    good = {"embed_dim": 32, "depth": 2, "num_heads": (1, 2), "mlp_ratio": (2.0, 3.0)}
    sn(x, good)
    bad = [({"num_heads": (1, 5)}, r"num_heads \[5\] not in the search space"),
           ({"embed_dim": 64}, "larger than the supernet's 40"),
           ({"embed_dim": 30}, "embed_dim 30 is not in the search space"),
           ({"depth": 4, "num_heads": (1,) * 4, "mlp_ratio": (2.0,) * 4}, "depth 4 is not in the search space"),
           ({"depth": 3}, "depth 3 needs 3 num_heads"),
           ({"mlp_ratio": (2.0, 2.5)}, r"mlp_ratio \[2.5\] not in the search space")]
    for change, msg in bad:
        with pytest.raises(ValueError, match=msg):
            sn(x, {**good, **change})
        with pytest.raises(ValueError, match=msg):
            m.extract_subnet(sn, {**good, **change})
    with pytest.raises(AssertionError, match="divisible by patch size"):
        m.SuperViT(space, image_size=18, patch_size=4, num_classes=3)
    with pytest.raises(AssertionError, match="non-empty"):
        m.SearchSpace((), (1,), (1,), (1.0,), 8)


@pytest.mark.parametrize("argv, match", [
    (["--parents", "20", "--population", "10"], "--parents 20 must be <= --population 10"),
    (["--table-depths", "6"], "--table-depths [6] must be a subset of --depths"),
    (["--n-rank", "2"], "--n-rank must be >= 3"),
    (["--p-layer", "1.5"], "probabilities"),
    (["--param-range", "0.2", "0.1"], "LO must be < HI"),
    (["--image-size", "30"], "divisible by --patch-size"),
    (["--repeats", "0"], "--repeats: must be an integer >= 1, got 0"),
])
def test_bad_flags_get_one_line_errors(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        utils.run_main(m.main, ["--quick", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and match in err, err


# ------------------------------------------------------------------------------------------------ experiments end to end

TINY = ["--image-size", "16", "--patch-size", "8", "--embed-dims", "16", "24", "--depths", "1", "2", "--num-heads", "1", "2",
        "--mlp-ratios", "1", "2", "--head-dim", "8", "--table-embed-dims", "16", "24", "--table-depths", "1", "2",
        "--table-num-heads", "1", "2", "--table-mlp-ratios", "1", "2", "--batch-size", "8", "--epochs", "2",
        "--retrain-epochs", "1", "--finetune-epochs", "1", "--budgets", "2", "4", "--repeats", "6", "--population", "4",
        "--parents", "2", "--n-compare", "4", "--n-val-test", "5", "--n-rank", "3", "--inherit-seeds", "2"]


def test_main_end_to_end_on_any_dataset(tiny_gray_folder, tmp_path, capsys):
    """--quick on a tiny grayscale 4-class folder with val/ instead of test/: the preset's counts shrink to fit (no
    count flags passed), every experiment runs, prints its verdicts and writes its JSON and figure; a repeat of one
    experiment is bit-identical."""
    out = tmp_path / "run"
    res = m.main(["--quick", "--data", tiny_gray_folder, "--out", str(out), "--workers", "1", *TINY])
    printed = capsys.readouterr().out
    assert "python " in printed.splitlines()[0] and "note: this dataset is smaller than the preset" in printed
    for name in m.EXPERIMENTS:
        assert f"== {name}:" in printed and json.load(open(out / f"{name}.json"))["metrics"]
    for fig in ("entangle", "fitness", "tabular", "ranking"):
        assert os.path.getsize(out / f"{fig}.png") > 1000
    assert printed.count("paired subnets \u2192") == 3 and printed.count("paired seeds \u2192") == 4
    assert res["tabular"]["table_size"] == 2 * (4 + 16) and set(res["tabular"]["setting_sizes"]) == {"in range", "whole table"}
    curve = res["tabular"]["report"]["in range/nll"]["evolution"]
    assert curve[4]["regret"] <= curve[2]["regret"]  # best-so-far: regret never grows with more evaluations
    assert len(res["ranking"]["subnets"]) == 3 and len(res["inherit"]["arms"]["retrained"]) == 2
    again = m.main(["--quick", "--data", tiny_gray_folder, "--out", str(tmp_path / "again"), "--workers", "1",
                    "--experiment", "ranking", *TINY])
    assert again["ranking"]["subnets"] == res["ranking"]["subnets"], "a repeated run must be bit-identical"
    bench = m.main(["--quick", "--bench", "--data", tiny_gray_folder, "--out", str(out), *TINY])
    assert len(bench["rows"]) == 4 and all(r["ratio"] > 0 for r in bench["rows"])


def test_worker_processes_give_the_same_supernets(tiny_gray_folder):
    """utils.run_jobs in 2 spawned processes trains the same supernets, bit for bit, as in this process."""
    args = m.get_args(["--quick", "--data", tiny_gray_folder, *TINY])
    data = utils.data_from_args(args)
    jobs = [(args, data, ("supernet", "entangled", s, (), None), None) for s in (0, 1)]
    here, there = utils.run_jobs(m.run_job, jobs, workers=1), utils.run_jobs(m.run_job, jobs, workers=2)
    for a, b in zip(here, there):
        assert a["losses"] == b["losses"] and all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
    assert here[0]["losses"] != here[1]["losses"]  # and the seed matters


def test_entanglement_beats_classic_sharing_on_real_cifar(data_dir):
    """Real CIFAR-10, the paper's Fig. 3/4 claim under one budget: the same ~280 steps, the same sampled subnets
    and batches. The entangled supernet ends with a lower training loss, and the same random subnets score better on
    the validation split (carved from train) with inherited weights -- and better than chance, with no retraining."""
    args = m.get_args(["--quick", "--data", data_dir, "--train-per-class", "300", "--val-per-class", "50",
                       "--epochs", "6", "--batch-size", "64", "--embed-dims", "32", "48", "--depths", "2", "3",
                       "--num-heads", "2", "3", "--mlp-ratios", "2", "3", "--table-embed-dims", "32",
                       "--table-depths", "2", "--table-num-heads", "2", "--table-mlp-ratios", "2"])
    data = utils.data_from_args(args)
    probes = tuple(m.config_key(m.sample_config(m.space_from_args(args), random.Random(5))) for _ in range(6))
    res = {kind: m.run_job(args, data, ("supernet", kind, 0, probes, None)) for kind in ("entangled", "classic")}
    for r in res.values():
        assert len(r["losses"]) == 6 * (3000 // 64) and r["history"][-1]["loss"] < r["history"][0]["loss"]
    ent, cla = ([s[0] for s in res[k]["probes"]] for k in ("entangled", "classic"))
    assert min(ent) > 15, ent  # chance is 10% (500 val images: 15% is > 4 standard deviations above it)
    assert res["entangled"]["history"][-1]["loss"] < res["classic"]["history"][-1]["loss"]
    assert sum(e > c for e, c in zip(ent, cla)) >= 5 and sum(ent) > sum(cla) + 6 * 2.0, (ent, cla)


def test_kendall_tau_and_bootstrap():
    assert m.kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert m.kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    # 5 items, one discordant pair of 10 -> (9 - 1) / 10; a tie in b: tau-b = 9 / sqrt(10 * 9)
    assert math.isclose(m.kendall_tau([1, 2, 3, 4, 5], [1, 2, 3, 5, 4]), 0.8)
    assert math.isclose(m.kendall_tau([1, 2, 3, 4, 5], [1, 2, 3, 3, 5]), 9 / math.sqrt(10 * 9))
    v, lo, hi = m.bootstrap_ci(m.kendall_tau, list(range(12)),
                               [0, 2, 1, 3, 5, 4, 6, 8, 7, 9, 11, 10], n_boot=300)
    assert lo <= v <= hi and 0.5 < lo and hi <= 1.0
