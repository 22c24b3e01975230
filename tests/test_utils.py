"""utils.py: command line, notebook safety, data, loader, train loop, statistics, measurement."""
import importlib
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import utils
from conftest import ROOT, SCRIPTS


# ---------------------------------------------------------------------------------- data

def test_image_folder_resize_and_subsets(tiny_image_folder):
    d = utils.load_data(tiny_image_folder, image_size=16, train_per_class=5, val_per_class=3,
                        test_per_class=2, seed=1)
    assert d.x_train.shape == (15, 3, 16, 16) and d.x_train.dtype == torch.uint8
    assert d.x_val.shape == (9, 3, 16, 16) and d.x_test.shape == (6, 3, 16, 16)
    assert d.classes == ["cat", "dog", "emu"]
    assert torch.bincount(d.y_train).tolist() == [5, 5, 5]
    assert torch.bincount(d.y_val).tolist() == [3, 3, 3]
    # validation images are carved out of train: no image appears in both
    tr = {bytes(x.numpy()) for x in d.x_train}
    assert not any(bytes(x.numpy()) in tr for x in d.x_val)
    # same seed -> same subset (reads the cache the first call wrote); other seed -> another
    kw = dict(image_size=16, train_per_class=5, val_per_class=3)
    d2, d3 = utils.load_data(tiny_image_folder, seed=1, **kw), utils.load_data(tiny_image_folder,
                                                                                seed=2, **kw)
    assert torch.equal(d.x_train, d2.x_train) and not torch.equal(d.x_train, d3.x_train)
    frac = utils.load_data(tiny_image_folder, image_size=16, train_per_class=0.5)
    assert torch.bincount(frac.y_train).tolist() == [6, 6, 6]
    # an ImageFolder is normalised by its own training images' statistics
    whole = utils.load_data(tiny_image_folder, image_size=16).x_train.double().div(255)
    assert torch.allclose(torch.tensor(frac.mean, dtype=torch.float64), whole.mean((0, 2, 3)))
    assert torch.allclose(torch.tensor(frac.std, dtype=torch.float64),
                          whole.std((0, 2, 3), unbiased=False))


def _args(argv, preset):
    """The common flags parsed as a script parses them, with `preset` as its --quick preset."""
    return utils.cli("", {"quick": preset, "full": preset}, {}, ["--quick", *argv])


def test_any_dataset_grayscale_val_split_and_four_classes(tiny_gray_folder, capsys):
    """--quick fits any dataset: a preset's counts shrink to what exists, with one printed line;
    the counts the user passed do not."""
    args = _args(["--data", tiny_gray_folder, "--image-size", "16"],
                 dict(train_per_class=150, val_per_class=50, test_per_class=1000))
    d = utils.data_from_args(args)
    note = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(note) == 1 and "--train-per-class -> 5" in note[0], note
    assert "--test-per-class -> 3" in note[0] and "10 train / 3 test" in note[0], note
    assert d.classes == ["one", "three", "two", "zero"] and d.num_classes == 4
    assert d.x_train.shape == (20, 3, 16, 16)            # grayscale became 3 equal channels
    assert torch.equal(d.x_train[:, 0], d.x_train[:, 2])
    assert torch.bincount(d.y_val).tolist() == [5] * 4
    assert torch.bincount(d.y_test).tolist() == [3] * 4
    with pytest.raises(utils.InputError, match="use at most 10"):
        utils.load_data(tiny_gray_folder, image_size=16, train_per_class=11)
    with pytest.raises(utils.InputError, match="use at most 3"):
        utils.load_data(tiny_gray_folder, image_size=16, test_per_class=4)
    # through the flags: what the user passed is kept, what the preset filled is shrunk
    args = _args(["--data", tiny_gray_folder, "--image-size", "16", "--train-per-class", "4"],
                 dict(train_per_class=150, val_per_class=100, test_per_class=None))
    assert args.preset_keys == ["test_per_class", "val_per_class"] and args.train_per_class == 4
    d = utils.data_from_args(args)
    assert len(d.y_train) == 16 and len(d.y_val) == 20


def test_a_shrunk_preset_keeps_its_optimiser_steps(tiny_gray_folder, capsys):
    """A preset's 100 images per class for 2 epochs become the 10 that exist for 20 epochs (and
    every other preset `*epochs` setting grows alike); epochs the user passed are kept."""
    preset = dict(train_per_class=100, val_per_class=0, epochs=2, supernet_epochs=3,
                  warmup_epochs=0.5)
    args = _args(["--data", tiny_gray_folder, "--image-size", "8"], preset)
    utils.data_from_args(args)
    assert (args.epochs, args.supernet_epochs, args.warmup_epochs) == (20, 30, 5.0)
    note = capsys.readouterr().out
    assert "--epochs 2 -> 20 (keeps the preset's optimiser steps)" in note, note
    utils.data_from_args(args)                              # a second call does not grow it again
    assert args.epochs == 20
    args = _args(["--data", tiny_gray_folder, "--image-size", "8"], preset)
    args.preset_keys.remove("epochs")                       # as if the user had passed --epochs 2
    utils.data_from_args(args)
    assert args.epochs == 2 and args.supernet_epochs == 30


@pytest.mark.parametrize("kind", ["missing folder", "no train/", "classes differ", "one class",
                                  "unreadable image"])
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
                shutil.rmtree(root / split / "dog")
                shutil.rmtree(root / split / "emu")
        else:
            (root / "train" / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    match = {"missing folder": "is not a directory", "no train/": "must contain train/<class>/",
             "classes differ": r"only in train/ \['emu'\], only in test/ \['owl'\]",
             "one class": ">= 2",
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
    x = torch.arange(4 * 3 * 8 * 8, dtype=torch.int64).remainder(256).to(torch.uint8)
    x, y, cpu = x.view(4, 3, 8, 8), torch.arange(4), torch.device("cpu")
    ev = utils.DeviceLoader(x, y, batch_size=3, device=cpu, train=False, mean=(0, 0, 0),
                            std=(1 / 255,) * 3)
    batches = list(ev)
    assert [len(b[1]) for b in batches] == [3, 1]  # eval keeps every image, in order
    assert torch.equal(batches[0][0], x[:3].float())  # mean 0, std 1/255 -> raw values
    tr = utils.DeviceLoader(x, y, batch_size=2, device=cpu, train=True, seed=0)
    xb, yb = next(iter(tr))
    assert xb.shape == (2, 3, 8, 8) and len(tr) == 2
    # a crop of a zero-padded image: each output is a shifted window of the (flipped) input
    raw = torch.ones(64, 1, 8, 8, dtype=torch.uint8)
    aug = utils.DeviceLoader(raw, torch.zeros(64), batch_size=64, device=cpu, train=True,
                             mean=(0,), std=(1 / 255,)).augment(raw.float())
    assert set(aug.unique().tolist()) <= {0.0, 1.0} and aug.sum() < raw.sum()  # padding came in
    assert (aug.sum((1, 2, 3)) >= 16).all()  # a shift of at most 4 keeps a 4x4 block at least


def test_same_seed_same_batches_whatever_ran_before():
    """Fresh, seeded loaders: a loader reused for a second run replays its batches."""
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


# ---------------------------------------------------------------------------------- train / eval

def test_train_learns_and_evaluate_returns_accuracy_and_nll(tiny_image_folder):
    utils.set_seed(0)
    d = utils.load_data(tiny_image_folder, image_size=16)
    tr, _, te = utils.make_loaders(d, batch_size=12, device=torch.device("cpu"), seed=0,
                                   eval_batch_size=5)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 3))
    logs = []
    hist = utils.train(model, tr, epochs=15, lr=1e-2, log=logs.append)
    assert len(hist) == 15 and len(logs) == 15 and "eta" in logs[-1]
    assert hist[-1]["loss"] < hist[0]["loss"]
    score = utils.evaluate(model, te)
    assert score.acc > 50  # chance is 33%
    # NLL: the plain mean cross-entropy over every test image (batched in 5s)
    model.eval()
    x = torch.cat([b[0] for b in te])
    with torch.no_grad():
        assert math.isclose(score.nll, F.cross_entropy(model(x), d.y_test).item(), rel_tol=1e-5)


def test_weight_decay_only_on_matrices_and_kernels():
    class ViTish(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
            self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
            self.attn = nn.Linear(4, 4)                         # weight decays, bias does not
            self.norm = nn.LayerNorm(4)
            self.conv = nn.Conv2d(4, 4, 3)                      # kernel decays
            self.key_rel_h = nn.Parameter(torch.zeros(7, 2))    # relative-position tables do not
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
        ["cls_token", "pos_embed", "attn.bias", "norm.weight", "norm.bias", "conv.bias",
         "key_rel_h", "rel", "gate_table"])


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_positional_table_of_every_model_is_exempt_from_weight_decay(script):
    """In every model the scripts train, a parameter of >= 2 dimensions decays if and only if it
    is a layer's `weight`; everything else of that size is a positional table, class token or
    position embedding and must keep its exemption (a name the rule stops matching fails here)."""
    m = importlib.import_module(script)
    exempt_tables = 0
    for name, (model, _, _) in m.full_preset_models(num_classes=10).items():
        decay = {id(p) for p in utils.param_groups(model, 0.05)[0]["params"]}
        for n, p in model.named_parameters():
            if p.ndim >= 2:
                assert (id(p) in decay) == n.endswith("weight"), f"{script} {name}: {n}"
                exempt_tables += not n.endswith("weight")
    assert exempt_tables > 0, f"{script}: no positional table found, the check saw nothing"


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
    assert utils.run_jobs(_square, jobs, workers=2) == utils.run_jobs(_square, jobs, workers=1)
    assert utils.run_jobs(_square, jobs, workers=2) == [0.5, 1.5, 4.5, 9.5]


def test_jobs_a_worker_cannot_receive_run_in_process(capsys, monkeypatch):
    """A function defined in a notebook lives in a __main__ without a file: a spawned worker
    cannot import it (BrokenProcessPool). run_jobs runs such jobs here, with a note."""
    def cube(x):
        return x ** 3
    assert utils.run_jobs(cube, [(1,), (2,), (3,)], workers=2) == [1, 8, 27]   # a local function
    assert "cannot be sent to worker processes" in capsys.readouterr().out
    import types
    notebook_main = types.ModuleType("__main__")                # as in a Jupyter kernel: no file
    monkeypatch.setitem(sys.modules, "__main__", notebook_main)
    sq = _copy_function(_square, "__main__")
    notebook_main._square = sq                                  # it pickles, by reference
    assert utils.run_jobs(sq, [(2, 0.0), (3, 0.0)], workers=2) == [4.0, 9.0]
    assert "running its 2 jobs in this process" in capsys.readouterr().out


def _copy_function(fn, module):
    import types
    g = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__)
    g.__module__ = module
    return g


@pytest.mark.parametrize("script", SCRIPTS)
def test_full_preset_model_takes_a_bf16_training_step(script, monkeypatch):
    """Every full-preset model at its real size takes one training step on CPU with bf16
    autocast forced on: the mixed-precision path a GPU run takes runs, and the weights move."""
    from torch.utils._python_dispatch import TorchDispatchMode
    monkeypatch.setattr(utils, "FORCE_AUTOCAST", True)

    class Bf16Matmuls(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm,
                                       torch.ops.aten.convolution) and out.dtype == torch.bfloat16:
                Bf16Matmuls.count += 1
            return out

    threads = torch.get_num_threads()
    m = importlib.import_module(script)
    torch.set_num_threads(threads)
    for name, (model, step_fn, size) in m.full_preset_models(num_classes=10).items():
        torch.manual_seed(0)
        x = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
        loader = utils.DeviceLoader(x, torch.tensor([1, 7]), batch_size=2,
                                    device=torch.device("cpu"), train=True)
        before = [p.detach().clone() for p in model.parameters()]
        Bf16Matmuls.count = 0
        with Bf16Matmuls():
            hist = utils.train(model, loader, epochs=1, lr=1e-3, warmup_epochs=0,
                               step_fn=step_fn, log=lambda s: None)
        assert math.isfinite(hist[0]["loss"]), (script, name)
        assert Bf16Matmuls.count > 0, f"{script} {name}: no matmul ran in bf16 under autocast"
        assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters())), name


# ---------------------------------------------------------------------------------- command line

def _cli_error(capsys, main, argv):
    """Run main through utils.run_main as the scripts do; return the one stderr line."""
    with pytest.raises(SystemExit) as e:
        utils.run_main(main, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err, err
    return err


@pytest.mark.parametrize("argv, match", [
    (["--threads", "0"], "--threads: must be an integer >= 1, got 0"),
    (["--seed", "-1"], "--seed: must be an integer >= 0, got -1"),
    (["--train-per-class", "0"], "--train-per-class: must be a number > 0, got 0"),
    (["--train-per-class", "-5"], "--train-per-class: must be a number > 0"),
    (["--test-per-class", "many"], "--test-per-class: expected an integer >= 1, got 'many'"),
    (["--train-per-class", "5000"], "use at most 10"),                  # too large for the dataset
    (["--device", "tpu"], "is not one of auto, cpu, cuda, mps"),
])
def test_bad_common_flags_get_one_line(argv, match, capsys, tiny_gray_folder):
    def main(argv):
        args = _args(argv, {})
        utils.get_device(args.device)
        return utils.data_from_args(args)

    assert match in _cli_error(capsys, main, ["--data", tiny_gray_folder, *argv])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_says_use_cpu(capsys):
    err = _cli_error(capsys, lambda a: utils.get_device(_args(a, {}).device), ["--device", "cuda"])
    assert "use --device cpu" in err


PRESETS = {"quick": dict(epochs=2, widths=(16, 32), lr=3e-3, val_per_class=0, seeds=4, dropout=0.0,
                         name="small", experiments=("compare",)),
           "full": dict(epochs=30, widths=(64, 128), lr=2e-3, val_per_class=500, seeds=3,
                        dropout=0.1, name="big")}
FLAGS = {"epochs": "training epochs", "widths": "channels per stage", "lr": "peak learning rate",
         "seeds": "paired seeds", "dropout": "dropout rate", "name": "a name"}


def _cli(argv, check=None):
    return utils.cli("Title line.\n\nMore.", PRESETS, FLAGS, argv, experiments=("compare", "swap"),
                     bench="time layers", check=check)


def test_cli_declares_flags_from_presets():
    a = _cli(["--quick"])
    assert (a.mode, a.epochs, a.widths, a.lr, a.seeds, a.name) == ("quick", 2, (16, 32), 3e-3, 4,
                                                                   "small")
    assert a.experiments == ["compare"] and a.preset_keys == sorted(PRESETS["quick"])
    a = _cli(["--epochs", "5", "--widths", "8,8", "--dropout", "0", "--experiment", "all"])
    assert (a.mode, a.epochs, a.widths, a.dropout, a.lr) == ("full", 5, (8, 8), 0.0, 2e-3)
    assert a.experiments == ["compare", "swap"] and "epochs" not in a.preset_keys
    assert _cli(["--demo"]).mode == "demo" and _cli(["--bench"]).mode == "bench"
    assert _cli(["--experiment", "swap"]).experiments == ["swap"]


def test_cli_help_explains_every_flag_with_its_preset_values(capsys):
    with pytest.raises(SystemExit):
        _cli(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert out.count("usage:") == 1 and "Title line." in out and "More." in out  # the epilog
    for name, text in FLAGS.items():
        flag = "--" + name.replace("_", "-")
        shown = ", ".join(f"{k}: {utils._fmt(p[name])}" for k, p in PRESETS.items())
        assert re.search(re.escape(flag) + r" \S+ " + re.escape(f"{text} [{shown}]"), out), flag
    assert "--val-per-class VAL_PER_CLASS images per class carved out" in out
    assert "[quick: 0, full: 500]" in out and "--demo" in out and "--bench" in out


@pytest.mark.parametrize("argv, match", [
    (["--epochs", "0"], "--epochs: must be an integer >= 1, got 0"),
    (["--lr", "-1"], "--lr: must be a number > 0, got -1"),
    (["--dropout", "-0.1"], "--dropout: must be a number >= 0"),          # a preset value is 0
    (["--widths", "16,x"], "--widths: expected an integer >= 1, got 'x'"),
    (["--quick", "--demo"], "not allowed with argument"),
    (["--experiment", "nope"], "invalid choice: 'nope'"),
    (["--seeds", "1"], "--seeds must be >= 2 for an interval"),           # the script's check
])
def test_cli_refuses_bad_flags_with_one_line(argv, match, capsys):
    def check(args):
        if args.seeds < 2:
            raise utils.InputError("--seeds must be >= 2 for an interval")
    assert match in _cli_error(capsys, lambda a: _cli(a, check), argv)


def test_run_main_in_a_notebook_starts_nothing(monkeypatch, capsys):
    """In a Jupyter kernel, the script's last cell `utils.run_main(main)` must neither parse the
    kernel's argv (`-f kernel.json`) nor start a training run."""
    monkeypatch.setattr(utils, "in_notebook", lambda: True)
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "kernel-1.json"])
    started = []
    assert utils.run_main(started.append) is None and started == []
    assert "call main(['--quick'" in capsys.readouterr().out
    assert utils.run_main(started.append, ["--demo"]) is None and started == [["--demo"]]


def test_show_and_run_demos_save_figures(tmp_path):
    from matplotlib.figure import Figure

    def demo_line():
        fig = Figure(figsize=(2, 2))
        fig.subplots().plot([0, 1], [1, 0])
        utils.show(fig, "line")
        return {"max_err": 0.0}
    utils.show(Figure(), "not_saved")                        # outside --demo: nothing written
    assert utils.run_demos(str(tmp_path), [demo_line]) == {"demo_line": {"max_err": 0.0}}
    assert sorted(os.listdir(tmp_path)) == ["demo.json", "line.png"]
    assert json.load(open(tmp_path / "demo.json"))["metrics"] == {"demo_line": {"max_err": 0.0}}
    assert utils.FIGURES is None


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_refuses_bad_input_with_one_line(script, tmp_path):
    """The real command line: `python <script>.py --data <missing>` prints one `error:` line."""
    r = subprocess.run([sys.executable, f"{script}.py", "--quick", "--data",
                        str(tmp_path / "missing"), "--out", str(tmp_path / "out")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: --data"), r.stderr
    assert r.stderr.count("\n") == 1, r.stderr


# ---------------------------------------------------------------------------------- statistics

def test_mean_ci_matches_a_hand_computed_t_interval():
    m, lo, hi = utils.mean_ci([1.0, 2.0, 3.0, 4.0])     # mean 2.5, s = 1.291, t(3) = 3.182
    half = 3.182 * 1.2909944 / 2
    assert m == 2.5 and math.isclose(lo, 2.5 - half, rel_tol=1e-6)
    assert math.isclose(hi, 2.5 + half, rel_tol=1e-6)
    assert math.isnan(utils.mean_ci([3.0])[1])


@pytest.mark.parametrize("df, t", [(1, 12.706), (3, 3.182), (7, 2.365), (11, 2.201), (30, 2.042),
                                   (31, 2.040), (40, 2.021), (60, 2.000), (120, 1.980),
                                   (1000, 1.962), (10**6, 1.960)])
def test_t_quantiles_match_published_values(df, t):
    """Two-sided 95% t quantiles (published tables); beyond df 30 from the expansion."""
    assert abs(utils.t95(df) - t) < 6e-4, (df, utils.t95(df))


def test_one_seed_prints_no_interval_instead_of_nan():
    assert utils.fmt_ci(utils.mean_ci([48.57])) == "48.57 (n=1, no interval)"
    assert utils.fmt_ci(utils.mean_ci([1.0, 2.0, 3.0, 4.0]), 1) == "2.5 [0.4, 4.6]"
    r = utils.compare_paired([30.0], [28.0], name_a="A", name_b="B", log=None)
    assert "nan" not in r["line"] and "no interval, n=1 paired seeds" in r["line"]


@pytest.mark.parametrize("a, b, verdict", [
    ([30, 31, 32, 33, 34, 35], [28, 29.5, 29, 31, 32, 32.5], "ConViT better"),      # shown
    ([28, 29.5, 29, 31, 32, 32.5], [30, 31, 32, 33, 34, 35], "DeiT better"),
    ([30.1, 30.0, 29.9, 30.2, 29.8, 30.0], [30.0, 30.1, 30.0, 30.0, 29.9, 30.1],
     "equivalent within ±1 points"),                                                 # bounded
    ([30, 35, 25, 33, 27, 31], [30, 30, 30, 30, 30, 30], "not decided at this budget"),
    ([30], [28], "not decided at this budget (one pair"),
])
def test_compare_paired_verdicts(a, b, verdict):
    lines = []
    r = utils.compare_paired(a, b, name_a="ConViT", name_b="DeiT", log=lines.append)
    assert r["verdict"].startswith(verdict) or verdict in r["verdict"], r["line"]
    assert lines == [r["line"]] and r["n"] == len(a)
    assert r["line"].startswith("ConViT \u2212 DeiT = ")
    d = [x - y for x, y in zip(a, b)]
    assert math.isclose(r["diff"], sum(d) / len(d))
    if len(a) > 1:
        assert "95% CI [" in r["line"] and f"n={len(a)} paired seeds \u2192 " in r["line"]


def test_an_interval_that_excludes_zero_is_shown_before_it_is_bounded():
    """A small but sure difference: its interval [+0.08, +0.12] excludes 0 AND lies inside +-1.
    The verdict must be "better" (shown), not "equivalent" (bounded): the order of the checks."""
    a = [30.10, 30.12, 30.08, 30.11, 30.09, 30.10]
    r = utils.compare_paired(a, [30.0] * 6, name_a="A", name_b="B", bound=1.0, log=None)
    assert 0 < r["ci"][0] and r["ci"][1] < 1.0 and r["verdict"] == "A better", r["line"]
    r = utils.compare_paired([30.0] * 6, a, name_a="A", name_b="B", unit="nats", digits=3,
                             higher_is_better=False, bound=1.0, log=None)
    assert r["verdict"] == "A better", r["line"]


def test_compare_paired_lower_is_better_for_nll():
    r = utils.compare_paired([1.50, 1.52, 1.49, 1.51], [1.60, 1.61, 1.62, 1.60], name_a="ConViT",
                             name_b="DeiT", unit="nats", digits=3, higher_is_better=False,
                             bound=0.02, log=None)
    assert r["verdict"] == "ConViT better" and "\u22120.103 nats" in r["line"]


# ---------------------------------------------------------------------------------- measure

def test_params_and_measure():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert utils.count_params(conv) == 8 * 3 * 9
    img_s, mem_mb = utils.measure_step(nn.Sequential(conv, nn.Flatten(), nn.Linear(960, 10)),
                                       (3, 10, 12), batch_size=4, steps=2, warmup=1)
    assert img_s > 0 and mem_mb > 0
    bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(320, 10))
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    utils.measure_step(bn, (3, 10, 12), batch_size=4, steps=1, warmup=1)
    assert all(torch.equal(before[k], v) for k, v in bn.state_dict().items())  # BN stats untouched


def test_save_results_atomic_json(tmp_path):
    p = utils.save_results(str(tmp_path / "runs" / "x" / "r.json"), {"lr": 0.1}, {"acc": 12.5})
    blob = json.load(open(p))
    assert blob["config"] == {"lr": 0.1} and blob["metrics"] == {"acc": 12.5}
    assert "torch" in blob and "wall_time_s" in blob
    assert os.listdir(os.path.dirname(p)) == ["r.json"]
