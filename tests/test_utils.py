"""utils.py: data path (ImageFolder, subsets, errors), device loader, train loop, statistics, FLOPs, results."""
import importlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import utils
from conftest import ROOT

SCRIPTS = ["01_conv_vs_attention", "02_aa_conv", "03_gpsa_convit", "04_autoformer_entangle", "05_trionet_search"]


# ------------------------------------------------------------------------------------------------ data

def test_image_folder_resize_and_subsets(tiny_image_folder):
    d = utils.load_data(tiny_image_folder, image_size=16, train_per_class=5, val_per_class=3, test_per_class=2, seed=1)
    assert d.x_train.shape == (15, 3, 16, 16) and d.x_train.dtype == torch.uint8
    assert d.x_val.shape == (9, 3, 16, 16) and d.x_test.shape == (6, 3, 16, 16)
    assert d.classes == ["cat", "dog", "emu"]
    assert torch.bincount(d.y_train).tolist() == [5, 5, 5] and torch.bincount(d.y_val).tolist() == [3, 3, 3]
    # validation images are carved out of train: no image appears in both
    tr = {bytes(x.numpy()) for x in d.x_train}
    assert not any(bytes(x.numpy()) in tr for x in d.x_val)
    # same seed -> same subset (reads the cache the first call wrote); other seed -> another subset
    d2 = utils.load_data(tiny_image_folder, image_size=16, train_per_class=5, val_per_class=3, seed=1)
    d3 = utils.load_data(tiny_image_folder, image_size=16, train_per_class=5, val_per_class=3, seed=2)
    assert torch.equal(d.x_train, d2.x_train) and not torch.equal(d.x_train, d3.x_train)
    frac = utils.load_data(tiny_image_folder, image_size=16, train_per_class=0.5)
    assert torch.bincount(frac.y_train).tolist() == [6, 6, 6]
    # an ImageFolder is normalised by its own training images' statistics
    assert torch.allclose(torch.tensor(frac.mean, dtype=torch.float64),
                          utils.load_data(tiny_image_folder, image_size=16).x_train.double().div(255).mean((0, 2, 3)))


def test_any_dataset_grayscale_val_split_and_four_classes(tiny_gray_folder, capsys):
    """--quick fits any dataset: a preset's counts shrink to what exists, with one printed line; the user's don't."""
    d = utils.load_data(tiny_gray_folder, image_size=16, train_per_class=150, val_per_class=50, test_per_class=1000,
                        fit={"train_per_class", "val_per_class", "test_per_class"})
    note = [l for l in capsys.readouterr().out.splitlines() if l.startswith("note:")]
    assert len(note) == 1 and "--train-per-class -> 5" in note[0] and "--test-per-class -> 3" in note[0], note
    assert d.classes == ["one", "three", "two", "zero"] and d.num_classes == 4
    assert d.x_train.shape == (20, 3, 16, 16)            # grayscale became 3 equal channels
    assert torch.equal(d.x_train[:, 0], d.x_train[:, 2])
    assert torch.bincount(d.y_val).tolist() == [5] * 4 and torch.bincount(d.y_test).tolist() == [3] * 4
    with pytest.raises(utils.InputError, match="use at most 10"):
        utils.load_data(tiny_gray_folder, image_size=16, train_per_class=11)
    with pytest.raises(utils.InputError, match="use at most 3"):
        utils.load_data(tiny_gray_folder, image_size=16, test_per_class=4)
    # through the flags: what the user passed is kept, what the preset filled is shrunk
    p = utils.add_common_args(utils.ArgumentParser())
    args = utils.apply_preset(p.parse_args(["--data", tiny_gray_folder, "--image-size", "16", "--train-per-class", "4"]),
                              dict(train_per_class=150, val_per_class=100, test_per_class=None))
    assert args.preset_keys == ["test_per_class", "val_per_class"] and args.train_per_class == 4
    d = utils.data_from_args(args)
    assert len(d.y_train) == 16 and len(d.y_val) == 20


@pytest.mark.parametrize("kind", ["missing folder", "no train/", "classes differ", "one class", "unreadable image"])
def test_bad_data_says_what_to_do(kind, tmp_path, tiny_image_folder):
    root = tmp_path / "bad"
    if kind == "no train/":
        (root / "test" / "cat").mkdir(parents=True)
    elif kind in ("classes differ", "one class", "unreadable image"):
        import shutil
        shutil.copytree(tiny_image_folder, root)
        if kind == "classes differ":
            os.rename(root / "test" / "emu", root / "test" / "owl")
        elif kind == "one class":
            for split in ("train", "test"):
                shutil.rmtree(root / split / "dog"), shutil.rmtree(root / split / "emu")
        else:
            (root / "train" / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    match = {"missing folder": "is not a directory", "no train/": "must contain train/<class>/",
             "classes differ": r"only in train/ \['emu'\], only in test/ \['owl'\]", "one class": ">= 2",
             "unreadable image": "cannot read image .*dog/broken.jpg.*delete or replace"}[kind]
    with pytest.raises(utils.InputError, match=match):
        utils.load_data(str(root), image_size=16)


def test_download_failure_points_to_data_flag(monkeypatch, tmp_path):
    import torchvision
    def offline(*a, **k):
        raise OSError("Name or service not known")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(utils.InputError, match="--data DIR"):
        utils.load_data("cifar10")


def test_device_loader_augments_on_device():
    x = torch.arange(4 * 3 * 8 * 8, dtype=torch.int64).remainder(256).to(torch.uint8).view(4, 3, 8, 8)
    y = torch.arange(4)
    ev = utils.DeviceLoader(x, y, batch_size=3, device=torch.device("cpu"), train=False, mean=(0, 0, 0), std=(1 / 255,) * 3)
    batches = list(ev)
    assert [len(b[1]) for b in batches] == [3, 1]  # eval keeps every image, in order
    assert torch.equal(batches[0][0], x[:3].float())  # normalised with mean 0, std 1/255 -> raw values
    tr = utils.DeviceLoader(x, y, batch_size=2, device=torch.device("cpu"), train=True, seed=0)
    xb, yb = next(iter(tr))
    assert xb.shape == (2, 3, 8, 8) and len(tr) == 2
    # a crop of a zero-padded image: every output row/column is a shifted window of the (possibly flipped) input
    raw = torch.ones(64, 1, 8, 8, dtype=torch.uint8)
    aug = utils.DeviceLoader(raw, torch.zeros(64), batch_size=64, device=torch.device("cpu"), train=True,
                             mean=(0,), std=(1 / 255,)).augment(raw.float())
    assert set(aug.unique().tolist()) <= {0.0, 1.0} and aug.sum() < raw.sum()  # some shifts bring in padding
    assert (aug.sum((1, 2, 3)) >= 16).all()  # a shift of at most 4 keeps at least a 4x4 block of the image


def test_same_seed_same_batches_whatever_ran_before():
    """Fresh, seeded loaders: a loader reused for a second run replays its batches (train() resets it)."""
    x, y = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8), torch.randint(0, 4, (40,))
    loader = utils.DeviceLoader(x, y, batch_size=8, device=torch.device("cpu"), train=True, seed=3)

    def run():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(192, 4))
        utils.train(model, loader, epochs=2, lr=1e-2, log=lambda s: None)
        return model[1].weight.detach().clone()

    first = run()
    list(loader)  # something else consumes the loader's random numbers in between
    assert torch.equal(run(), first)
    other = utils.DeviceLoader(x, y, batch_size=8, device=torch.device("cpu"), train=True, seed=4)
    assert not torch.equal(next(iter(other))[0], next(iter(loader.reset()))[0])


# ------------------------------------------------------------------------------------------------ train / eval

def test_train_learns_and_evaluate_returns_accuracy_and_nll(tiny_image_folder):
    utils.set_seed(0)
    d = utils.load_data(tiny_image_folder, image_size=16)
    dev = torch.device("cpu")
    tr, _, te = utils.make_loaders(d, batch_size=12, device=dev, seed=0, eval_batch_size=5)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    logs = []
    hist = utils.train(model, tr, epochs=15, lr=1e-2, eval_loader=te, log=logs.append)
    assert len(hist) == 15 and len(logs) == 15 and "eta" in logs[-1]
    assert hist[-1]["loss"] < hist[0]["loss"]
    score = utils.evaluate(model, te)
    assert hist[-1]["test_acc"] == score.acc and score.acc > 50  # chance is 33%
    # NLL: the plain mean cross-entropy over every test image (batched in 5s, so the sum is over batches)
    model.eval()
    x = torch.cat([b[0] for b in te])
    with torch.no_grad():
        assert math.isclose(score.nll, F.cross_entropy(model(x), d.y_test).item(), rel_tol=1e-5)
        assert hist[-1]["test_nll"] == score.nll


def test_weight_decay_only_on_matrices_and_kernels():
    class ViTish(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
            self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
            self.attn = nn.Linear(4, 4)                         # weight decays, bias does not
            self.norm = nn.LayerNorm(4)
            self.conv = nn.Conv2d(4, 4, 3)                      # kernel decays
            self.key_rel_h = nn.Parameter(torch.zeros(7, 2))    # 2-D relative-position tables do not
            self.rel = nn.Parameter(torch.zeros(4, 3, 3))
            self.gate_table = nn.Parameter(torch.zeros(3, 3))   # listed by the model itself
            self.frozen = nn.Parameter(torch.zeros(3, 3), requires_grad=False)

        def no_weight_decay(self):
            return {"gate_table"}

    m = ViTish()
    decay, no_decay = utils.param_groups(m, 0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in decay["params"]) == ["attn.weight", "conv.weight"]
    assert sorted(names[id(p)] for p in no_decay["params"]) == sorted(
        ["cls_token", "pos_embed", "attn.bias", "norm.weight", "norm.bias", "conv.bias", "key_rel_h", "rel", "gate_table"])


def test_copy_shared_init_pairs_arms():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    torch.manual_seed(1)
    b = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 5))   # same first layer, other head
    copied = utils.copy_shared_init(a, b)
    assert copied == ["0.weight", "0.bias"]
    assert torch.equal(a[0].weight, b[0].weight) and not torch.equal(a[2].bias[:3], b[2].bias[:3])


def _square(x, offset):
    return x * x + offset


def test_run_jobs_same_results_in_worker_processes():
    jobs = [(i, 0.5) for i in range(4)]
    assert utils.run_jobs(_square, jobs, workers=2) == utils.run_jobs(_square, jobs, workers=1) == [0.5, 1.5, 4.5, 9.5]


@pytest.mark.parametrize("script", SCRIPTS)
def test_full_preset_model_takes_a_bf16_training_step(script, monkeypatch):
    """Every full-preset model at its real size takes one training step on CPU with bf16 autocast forced on: the
    mixed-precision path a GPU run takes (matmuls in bf16, the loss in float32) runs, and the weights move."""
    from torch.utils._python_dispatch import TorchDispatchMode
    monkeypatch.setattr(utils, "FORCE_AUTOCAST", True)
    threads = torch.get_num_threads()
    m = importlib.import_module(script)
    torch.set_num_threads(threads)

    class Bf16Matmuls(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm,
                                       torch.ops.aten.convolution) and out.dtype == torch.bfloat16:
                Bf16Matmuls.count += 1
            return out

    for name, (model, step_fn, size) in m.full_preset_models(num_classes=10).items():
        torch.manual_seed(0)
        x = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
        loader = utils.DeviceLoader(x, torch.tensor([1, 7]), batch_size=2, device=torch.device("cpu"), train=True)
        before = [p.detach().clone() for p in model.parameters()]
        Bf16Matmuls.count = 0
        with Bf16Matmuls():
            hist = utils.train(model, loader, epochs=1, lr=1e-3, warmup_epochs=0, step_fn=step_fn, log=lambda s: None)
        assert math.isfinite(hist[0]["loss"]), (script, name)
        assert Bf16Matmuls.count > 0, f"{script} {name}: no matmul ran in bf16 under autocast"
        assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters())), (script, name)


# ------------------------------------------------------------------------------------------------ command line

def _cli_error(capsys, main, argv):
    """Run main through utils.run_main as the scripts do; return the one stderr line of the refusal."""
    with pytest.raises(SystemExit) as e:
        utils.run_main(main, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("argv, match", [
    (["--threads", "0"], "--threads: must be an integer >= 1, got 0"),
    (["--seed", "-1"], "--seed: must be an integer >= 0, got -1"),
    (["--train-per-class", "0"], "--train-per-class: must be a number > 0, got 0"),
    (["--train-per-class", "-5"], "--train-per-class: must be a number > 0"),
    (["--test-per-class", "many"], "--test-per-class: expected an integer >= 1, got 'many'"),
    (["--train-per-class", "5000"], "use at most 10"),                      # too large for the dataset
    (["--device", "tpu"], "is not one of auto, cpu, cuda, mps"),
])
def test_bad_common_flags_get_one_line(argv, match, capsys, tiny_gray_folder):
    p = utils.add_common_args(utils.ArgumentParser(prog="script"))

    def main(argv):
        args = p.parse_args(argv)
        utils.get_device(args.device)
        return utils.data_from_args(args)

    assert match in _cli_error(capsys, main, ["--data", tiny_gray_folder, *argv])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_says_use_cpu(capsys):
    p = utils.add_common_args(utils.ArgumentParser(prog="script"))
    assert "use --device cpu" in _cli_error(capsys, lambda a: utils.get_device(p.parse_args(a).device), ["--device", "cuda"])


@pytest.mark.parametrize("argv, match", [
    (["--epochs", "0"], "--epochs: must be an integer >= 1, got 0"),
    (["--image-size", "30"], "divisible"),                                  # sizes that do not divide
    (["--threads", "0"], "--threads: must be an integer >= 1"),
])
def test_script_flag_errors_are_one_line(argv, match, capsys):
    m = importlib.import_module("01_conv_vs_attention")
    assert match in _cli_error(capsys, m.main, ["--quick", *argv])


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_refuses_bad_input_with_one_line(script, tmp_path):
    """The real command line: `python <script>.py --data <missing>` prints one `error:` line, exit status 2."""
    r = subprocess.run([sys.executable, f"{script}.py", "--quick", "--data", str(tmp_path / "missing"),
                        "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: --data") and r.stderr.count("\n") == 1, r.stderr


# ------------------------------------------------------------------------------------------------ statistics

def test_mean_ci_matches_a_hand_computed_t_interval():
    m, lo, hi = utils.mean_ci([1.0, 2.0, 3.0, 4.0])     # mean 2.5, s = 1.291, t(3) = 3.182
    half = 3.182 * 1.2909944 / 2
    assert m == 2.5 and math.isclose(lo, 2.5 - half, rel_tol=1e-6) and math.isclose(hi, 2.5 + half, rel_tol=1e-6)
    assert utils.t95(100) == utils.T95[60] and utils.t95(1000) == 1.96
    assert math.isnan(utils.mean_ci([3.0])[1])


@pytest.mark.parametrize("a, b, verdict", [
    ([30, 31, 32, 33, 34, 35], [28, 29.5, 29, 31, 32, 32.5], "ConViT better"),                     # shown
    ([28, 29.5, 29, 31, 32, 32.5], [30, 31, 32, 33, 34, 35], "DeiT better"),
    ([30.1, 30.0, 29.9, 30.2, 29.8, 30.0], [30.0, 30.1, 30.0, 30.0, 29.9, 30.1], "equivalent within ±1 points"),  # bounded
    ([30, 35, 25, 33, 27, 31], [30, 30, 30, 30, 30, 30], "not decided at this budget"),
    ([30], [28], "not decided at this budget (one pair"),
])
def test_compare_paired_verdicts(a, b, verdict):
    lines = []
    r = utils.compare_paired(a, b, name_a="ConViT", name_b="DeiT", log=lines.append)
    assert r["verdict"].startswith(verdict) or verdict in r["verdict"], r["line"]
    assert lines == [r["line"]] and r["n"] == len(a) and r["line"].startswith("ConViT \u2212 DeiT = ")
    d = [x - y for x, y in zip(a, b)]
    assert math.isclose(r["diff"], sum(d) / len(d))
    if len(a) > 1:
        assert "95% CI [" in r["line"] and f"n={len(a)} paired seeds \u2192 " in r["line"]


def test_compare_paired_lower_is_better_for_nll():
    r = utils.compare_paired([1.50, 1.52, 1.49, 1.51], [1.60, 1.61, 1.62, 1.60], name_a="ConViT", name_b="DeiT",
                             unit="nats", digits=3, higher_is_better=False, bound=0.02, log=None)
    assert r["verdict"] == "ConViT better" and "\u22120.103 nats" in r["line"]


def test_kendall_tau_and_bootstrap():
    assert utils.kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert utils.kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    # 5 items, one discordant pair out of 10 -> (9 - 1) / 10; with a tie in b, tau-b = 7 / sqrt(10 * 9)
    assert math.isclose(utils.kendall_tau([1, 2, 3, 4, 5], [1, 2, 3, 5, 4]), 0.8)
    assert math.isclose(utils.kendall_tau([1, 2, 3, 4, 5], [1, 2, 3, 3, 5]) , 9 / math.sqrt(10 * 9))
    v, lo, hi = utils.bootstrap_ci(utils.kendall_tau, list(range(12)), [0, 2, 1, 3, 5, 4, 6, 8, 7, 9, 11, 10], n_boot=300)
    assert lo <= v <= hi and 0.5 < lo and hi <= 1.0


# ------------------------------------------------------------------------------------------------ measure / results

def test_flops_params_and_measure():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert utils.count_params(conv) == 8 * 3 * 9
    assert utils.count_flops(conv, (3, 10, 12)) == 2 * 8 * 3 * 9 * 10 * 12  # 1 MAC = 2 FLOPs
    img_s, mem_mb = utils.measure_step(nn.Sequential(conv, nn.Flatten(), nn.Linear(960, 10)), (3, 10, 12),
                                       batch_size=4, steps=2, warmup=1, device=torch.device("cpu"))
    assert img_s > 0 and mem_mb > 0
    bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 8 * 10, 10))
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    utils.measure_step(bn, (3, 10, 12), batch_size=4, steps=1, warmup=1, device=torch.device("cpu"))
    assert all(torch.equal(before[k], v) for k, v in bn.state_dict().items())  # BatchNorm statistics untouched


def test_save_results_atomic_json(tmp_path):
    p = utils.save_results(str(tmp_path / "runs" / "x" / "results.json"), {"lr": 0.1}, {"acc": 12.5})
    blob = json.load(open(p))
    assert blob["config"] == {"lr": 0.1} and blob["metrics"] == {"acc": 12.5} and "torch" in blob and "wall_time_s" in blob
    assert os.listdir(os.path.dirname(p)) == ["results.json"]
