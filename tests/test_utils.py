"""utils.py: data path (ImageFolder, subsets, errors), device loader, train loop, FLOPs, results."""
import json
import os

import pytest
import torch
import torch.nn as nn

import utils


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


def test_bad_data_paths_say_what_to_do(tmp_path, tiny_image_folder):
    with pytest.raises(FileNotFoundError, match="--data"):
        utils.load_data(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="train/<class>"):
        utils.load_data(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="smaller value"):
        utils.load_data(tiny_image_folder, image_size=16, train_per_class=50)


def test_download_failure_points_to_data_flag(monkeypatch, tmp_path):
    import torchvision
    def offline(*a, **k):
        raise OSError("Name or service not known")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="--data DIR"):
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


def test_train_learns_and_returns_history(tiny_image_folder):
    utils.set_seed(0)
    d = utils.load_data(tiny_image_folder, image_size=16)
    dev = torch.device("cpu")
    tr = utils.DeviceLoader(d.x_train, d.y_train, batch_size=12, device=dev, train=True)
    te = utils.DeviceLoader(d.x_test, d.y_test, batch_size=12, device=dev, train=False)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    logs = []
    hist = utils.train(model, tr, epochs=15, lr=1e-2, eval_loader=te, log=logs.append)
    assert len(hist) == 15 and len(logs) == 15 and "eta" in logs[-1]
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert hist[-1]["test_acc"] == utils.evaluate(model, te) and hist[-1]["test_acc"] > 50  # chance is 33%


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
