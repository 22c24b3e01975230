"""04_autoformer_entangle.py: weight entanglement (leading slices, consistent q/k/v), extraction, search operators."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

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


def make_supernet(space, seed=0, image_size=16, patch_size=4, num_classes=5):
    torch.manual_seed(seed)
    sn = m.SuperViT(space, image_size=image_size, patch_size=patch_size, num_classes=num_classes)
    with torch.no_grad():  # LayerNorm params start at 1/0: perturb them so a wrong slice of them would show
        for n, p in sn.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return sn


@pytest.mark.parametrize("space_name", list(SPACES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_extracted_subnet_equals_supernet_and_param_count(space_name, seed):
    space = SPACES[space_name]
    sn = make_supernet(space, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 3, 16, 16, generator=g)
    for cfg in [m.sample_config(space, g) for _ in range(4)] + [m.smallest_config(space), m.largest_config(space)]:
        sub = m.extract_subnet(sn, cfg)
        assert isinstance(sub, m.ViT)
        err = (sub(x) - sn(x, cfg)).abs().max().item()
        assert torch.allclose(sub(x), sn(x, cfg), atol=1e-5), f"{cfg}: max error {err}"
        # the count the search's constraint uses == the real parameter count of the standalone subnet
        assert sn.subnet_params(cfg) == sum(p.numel() for p in sub.parameters())
        # the standalone copy does not alias the supernet's storage
        assert all(p.data_ptr() != q.data_ptr() for p in sub.parameters() for q in sn.parameters())


@pytest.mark.parametrize("space_name", list(SPACES))
def test_largest_config_uses_every_supernet_weight(space_name):
    space = SPACES[space_name]
    sn = make_supernet(space)
    big = m.largest_config(space)
    assert sn.subnet_params(big) == sum(p.numel() for p in sn.parameters())
    assert sum(p.numel() for p in m.extract_subnet(sn, big).parameters()) == sum(p.numel() for p in sn.parameters())
    F.cross_entropy(sn(torch.randn(4, 3, 16, 16), big), torch.tensor([0, 1, 2, 3])).backward()
    for n, p in sn.named_parameters():
        used = key_bias_free(n, p.grad, sn)
        assert p.grad is not None and (p.grad[used] != 0).all(), f"{n}: the largest subnet leaves part of it unused"


def key_bias_free(name, grad, sn):
    """Mask of the entries whose gradient can be nonzero. The KEY bias never gets one: q.(k_j + b) shifts every
    logit of a softmax row by the same q.b, which softmax ignores, so d loss / d b_k is 0 up to rounding."""
    used = torch.ones_like(grad, dtype=torch.bool)
    if name.endswith("attn.qkv.bias"):
        used.view(3, -1)[1] = False
    return used


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


def expected_masks(sn, cfg):
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


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_gradients_touch_only_the_sliced_region(seed):
    space = SPACES["quick-like"]
    sn = make_supernet(space, seed)
    g = torch.Generator().manual_seed(seed)
    cfg = m.sample_config(space, g)
    while cfg == m.largest_config(space):
        cfg = m.sample_config(space, g)
    F.cross_entropy(sn(torch.randn(4, 3, 16, 16, generator=g), cfg), torch.tensor([0, 1, 2, 3])).backward()
    for n, p in sn.named_parameters():
        mask = expected_masks(sn, cfg)[n]
        if mask is None:
            assert p.grad is None or (p.grad == 0).all(), f"{n}: block beyond depth {cfg['depth']} got a gradient"
            continue
        assert (p.grad[~mask] == 0).all(), f"{n}: gradient outside the leading slice of {m.config_str(cfg)}"
        assert (p.grad[mask & key_bias_free(n, p.grad, sn)] != 0).all(), f"{n}: part of the slice got no gradient"


def test_classic_sharing_trains_only_the_chosen_modules():
    space = SPACES["quick-like"]
    torch.manual_seed(0)
    cl = m.ClassicSuperViT(space, image_size=16, patch_size=4, num_classes=5)
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


def _constraint(sn, lo, hi):
    return lambda c: lo <= sn.subnet_params(c) <= hi


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mutation_and_crossover_stay_in_space_and_constraint(seed):
    space = SPACES["quick-like"]
    sn = make_supernet(space)
    lo_all, hi_all = sn.subnet_params(m.smallest_config(space)), sn.subnet_params(m.largest_config(space))
    lo, hi = lo_all + 0.3 * (hi_all - lo_all), lo_all + 0.6 * (hi_all - lo_all)
    ok = _constraint(sn, lo, hi)
    g = torch.Generator().manual_seed(seed)
    pool = [m.sample_valid(space, g, ok) for _ in range(8)]
    changed = 0
    for i in range(200):
        a, b = pool[i % 8], pool[(i * 3 + 1) % 8]
        for child in (m.mutate(a, space, g, p_depth=0.2, p_layer=0.4, constraint=ok), m.crossover(a, b, g, constraint=ok)):
            sn.check_config(child)  # raises if outside the space
            assert ok(child), f"{m.config_str(child)} has {sn.subnet_params(child)} params, outside [{lo:.0f}, {hi:.0f}]"
            assert all(isinstance(v, tuple) for v in (child["num_heads"], child["mlp_ratio"]))
        changed += m.config_key(m.mutate(a, space, g, p_depth=0.2, p_layer=0.4, constraint=ok)) != m.config_key(a)
    assert changed > 100, "mutation almost never changes a config"
    # no mutation probability -> the parent comes back unchanged; an impossible constraint -> the parent too
    assert m.mutate(pool[0], space, g, p_depth=0.0, p_layer=0.0) == pool[0]
    assert m.mutate(pool[0], space, g, p_depth=1.0, p_layer=1.0, constraint=lambda c: False) == pool[0]
    with pytest.raises(ValueError, match="--param-range"):
        m.sample_valid(space, g, lambda c: False, max_tries=20)


def test_seeded_evolution_improves_monotonically_on_synthetic_fitness():
    space = SPACES["quick-like"]
    sn = make_supernet(space)
    lo_all, hi_all = sn.subnet_params(m.smallest_config(space)), sn.subnet_params(m.largest_config(space))
    ok = _constraint(sn, lo_all, lo_all + 0.5 * (hi_all - lo_all))
    # a cheap fitness with a unique optimum inside the budget: prefer heads 3 in every layer, MLP ratio 1.5, depth 3
    fitness = lambda c: sum(h == 3 for h in c["num_heads"]) + sum(r == 1.5 for r in c["mlp_ratio"]) + (c["depth"] == 3)
    kw = dict(constraint=ok, population=8, generations=8, parents=3)
    best, hist, archive = m.evolution_search(fitness, space, p_depth=0.2, p_layer=0.4,
                                             generator=torch.Generator().manual_seed(0), log=lambda s: None, **kw)
    bests = [h["best"] for h in hist]
    assert all(b2 >= b1 for b1, b2 in zip(bests, bests[1:])), bests
    assert bests[-1] > bests[0], bests
    assert [h["evaluated"] for h in hist] == [8 * (g + 1) for g in range(8)]  # exactly `population` new per generation
    assert len({m.config_key(c) for _, c in archive}) == len(archive) == 64 and all(ok(c) for _, c in archive)
    assert fitness(best) == bests[-1]
    _, rs_hist, _ = m.random_search(fitness, space, generator=torch.Generator().manual_seed(0), **kw)
    assert [h["evaluated"] for h in rs_hist] == [h["evaluated"] for h in hist]  # same number of candidates
    assert hist[-1]["topk_mean"] > rs_hist[-1]["topk_mean"], (hist[-1], rs_hist[-1])


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
    with pytest.raises(SystemExit):
        m.get_args(["--quick", "--parents", "20", "--population", "10"])


def test_main_end_to_end_on_tiny_folder(tiny_image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    tiny = ["--data", tiny_image_folder, "--out", str(out), "--image-size", "16", "--patch-size", "8",
            "--embed-dims", "16", "24", "--depths", "1", "2", "--num-heads", "1", "2", "--mlp-ratios", "1", "2",
            "--head-dim", "8", "--batch-size", "12", "--train-per-class", "9", "--val-per-class", "3", "--test-per-class", "4"]
    metrics = m.main(["--quick", *tiny, "--epochs", "2", "--retrain-epochs", "1", "--finetune-epochs", "1",
                      "--population", "3", "--generations", "2", "--parents", "2", "--n-compare", "3"])
    printed = capsys.readouterr().out
    assert "python " in printed.splitlines()[0] and "entanglement vs classic" in printed
    blob = json.load(open(out / "results.json"))
    assert blob["metrics"]["preset"] == "quick" and len(blob["metrics"]["search"]["ea_history"]) == 2
    assert set(blob["metrics"]["best_subnet"]) >= {"EA best, inherited", "EA best, inherited + fine-tune"}
    assert len(metrics["compare"]["rows"]) == 3
    for f in ("entangle_vs_classic.png", "search.png"):
        assert os.path.getsize(out / f) > 1000
    res = m.main(["--quick", "--bench", *tiny])
    assert len(res["rows"]) == 4 and all(r["ratio"] > 0 for r in res["rows"])
    assert os.path.exists(out / "bench.json")


def test_one_step_on_one_subnet_moves_other_subnets_only_when_entangled():
    """Entanglement's point (paper sec. 3.1): a step on subnet A also updates every subnet that shares A's leading
    slices. With classic sharing a subnet B that picks different choices everywhere is untouched."""
    space = SPACES["quick-like"]
    a = {"embed_dim": 32, "depth": 2, "num_heads": (1, 1), "mlp_ratio": (1.5, 1.5)}
    b = {"embed_dim": 24, "depth": 3, "num_heads": (2, 2, 3), "mlp_ratio": (2.0, 3.0, 3.0)}
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    for cls, should_move in ((m.SuperViT, True), (m.ClassicSuperViT, False)):
        torch.manual_seed(0)
        net = cls(space, image_size=16, patch_size=4, num_classes=5)
        before = net(x, b).detach()
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        F.cross_entropy(net(x, a), y).backward()
        opt.step()
        moved = (net(x, b) - before).abs().max().item()
        assert (moved > 1e-4) if should_move else (moved == 0.0), (cls.__name__, moved)


def test_entanglement_beats_classic_sharing_on_real_cifar(data_dir):
    """Real CIFAR-10, the paper's Fig. 3/4 claim under one budget: the same ~280 steps, the same sampled subnets
    and batches. The entangled supernet ends with a lower training loss, and the same random subnets score better on
    the validation split (carved from train) with inherited weights -- and better than chance, with no retraining."""
    import utils
    space = m.SearchSpace((32, 48), (2, 3), (2, 3), (2.0, 3.0), 16)
    args = m.get_args(["--quick", "--data", data_dir, "--train-per-class", "300", "--val-per-class", "50",
                       "--epochs", "6", "--batch-size", "64"])
    data = utils.data_from_args(args)
    loss, accs = {}, {}
    for cls in (m.SuperViT, m.ClassicSuperViT):
        train_loader, val_loader, _ = m.make_loaders(data, args, torch.device("cpu"))  # the same batches for both
        torch.manual_seed(0)
        net = cls(space, image_size=32, patch_size=8, num_classes=10)
        hist, losses = m.train_supernet(net, space, train_loader, args, name="", log=lambda s: None)
        assert len(losses) == 6 * len(train_loader) and hist[-1]["loss"] < hist[0]["loss"]
        g = torch.Generator().manual_seed(5)
        loss[cls.__name__] = hist[-1]["loss"]
        accs[cls.__name__] = [m.inherited_acc(net, m.sample_config(space, g), val_loader) for _ in range(6)]
    ent, cla = accs["SuperViT"], accs["ClassicSuperViT"]
    assert min(ent) > 15, accs  # chance is 10% (500 val images: 15% is > 4 standard deviations above it)
    assert loss["SuperViT"] < loss["ClassicSuperViT"], loss
    assert sum(e > c for e, c in zip(ent, cla)) >= 5 and sum(ent) > sum(cla) + 6 * 2.0, accs
