"""Shared test helpers: import the numbered scripts, find real CIFAR-10, write tiny ImageFolders."""
import importlib
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(min(2, torch.get_num_threads()))
SCRIPTS = ["01_conv_vs_attention", "02_aa_conv", "03_gpsa_convit", "04_autoformer_entangle",
           "05_trionet_search"]


def load_script(name):
    """`import 03_gpsa_convit` is not valid Python, so tests import numbered scripts this way."""
    return importlib.import_module(name)


@pytest.fixture(scope="session")
def data_dir():
    """The real CIFAR-10 ImageFolder copy named by $DATA_DIR (CI sets it); skipped, with the
    reason, when unset."""
    d = os.environ.get("DATA_DIR")
    if not d:
        pytest.skip("DATA_DIR is not set: export DATA_DIR=<a CIFAR-10 ImageFolder copy> to run "
                    "the real-data tests")
    assert os.path.isdir(d), f"DATA_DIR={d!r} is not a directory"
    return d


@pytest.fixture
def tiny_image_folder(tmp_path, monkeypatch):
    """A 3-class ImageFolder (train/ 12 per class, test/ 4 per class) of 40x36 PNGs: exercises
    decode + resize. Its decode cache goes to tmp_path too: tests never touch the user's cache."""
    monkeypatch.setenv("CMA_CACHE", str(tmp_path / "cache"))
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    root = tmp_path / "tiny"
    for split, n in (("train", 12), ("test", 4)):
        for c, name in enumerate(["cat", "dog", "emu"]):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                img = torch.randint(0, 60, (3, 36, 40), generator=g, dtype=torch.uint8)
                img[c] += 150  # each class has its own dominant colour, so it is learnable
                Image.fromarray(img.permute(1, 2, 0).numpy()).save(d / f"{i:03d}.png")
    return str(root)


@pytest.fixture
def tiny_gray_folder(tmp_path, monkeypatch):
    """A dataset unlike CIFAR-10, for "--quick fits any dataset": 4 classes of 28x28 GRAYSCALE
    PNGs, a `val/` split instead of `test/`, and far fewer images (10 train / 3 val per class)
    than any preset asks for. Each class is a bright bar in its own place: learnable."""
    monkeypatch.setenv("CMA_CACHE", str(tmp_path / "cache"))
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    root = tmp_path / "gray"
    for split, n in (("train", 10), ("val", 3)):
        for c, name in enumerate(["zero", "one", "two", "three"]):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                img = torch.randint(0, 80, (28, 28), generator=g, dtype=torch.uint8)
                img[7 * c:7 * c + 7] += 150
                Image.fromarray(img.numpy(), mode="L").save(d / f"{i:03d}.png")
    return str(root)
