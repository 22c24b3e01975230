"""Shared plumbing for the numbered scripts; nothing here knows about any paper.

cli (presets, flags, --demo/--quick), run_main (one-line errors; a no-op in notebooks), show and
run_demos (figures inline in Jupyter, PNGs under --demo), data_from_args and DeviceLoader (uint8
data on the device), train / evaluate, copy_shared_init (paired arms), run_jobs (runs on several
cores), mean_ci / compare_paired (95% intervals, the one verdict wording), count_*, save_results.
"""
import argparse
import copy
import hashlib
import io
import json
import math
import os
import pickle
import random
import re
import sys
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

_START = time.time()
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
COUNT_FLAGS = ("train_per_class", "val_per_class", "test_per_class")

# ---------------------------------------------------------------------------------- command line


class InputError(Exception):
    """A bad input the user can fix: `run_main` prints it as one line."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag prints ONE line, `error: ... (see --help)`, and exits with 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _number(kind, low, name):
    """An argparse type for numbers >= low (> 0 when low is None) that says why it refuses one."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
        if (low is None and not v > 0) or (low is not None and v < low) or not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be {name}, got {text}")
        return v
    parse.__name__ = name
    return parse


positive_int = _number(int, 1, "an integer >= 1")
nonneg_int = _number(int, 0, "an integer >= 0")
positive_float = _number(float, None, "a number > 0")
nonneg_float = _number(float, 0.0, "a number >= 0")


def comma_list(kind):
    """An argparse type for `16,32,64`: a tuple of `kind`."""
    def parse(text):
        return tuple(kind(t.strip()) for t in text.split(",") if t.strip())
    parse.__name__ = f"a comma-separated list of {getattr(kind, '__name__', kind)}"
    return parse


def _flag_type(values):
    """The argparse type of a flag, from the values its presets give it."""
    values = [v for v in values if v is not None]
    v = values[0] if values else ""
    if isinstance(v, (tuple, list)):
        return comma_list(_flag_type([x for vs in values for x in vs]))
    if isinstance(v, (int, float)):
        floats, zero = any(isinstance(x, float) for x in values), 0 in values
        return [[positive_int, nonneg_int], [positive_float, nonneg_float]][floats][zero]
    return str


COMMON_FLAGS = {  # every script's flags: name -> (type, default, help); None = the preset's
    "data": (str, "cifar10", "'cifar10' (torchvision download into ./data) or a folder in "
             "ImageFolder layout, DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg (or val/)"),
    "device": (str, "auto", "auto (cuda > mps > cpu), cuda, mps or cpu"),
    "seed": (nonneg_int, 0, "first seed; runs repeat bit for bit on one machine"),
    "image_size": (positive_int, 32, "images are resized to this side if needed"),
    "train_per_class": (positive_float, None, "N images per class (N >= 1) or a fraction (< 1)"),
    "val_per_class": (nonneg_int, None, "images per class carved out of the TRAINING split for "
                      "validation"),
    "test_per_class": (positive_int, None, "subset of the test split (default: all of it)"),
    "workers": (positive_int, None, "runs trained at once in separate processes, 1 thread each; "
                "results do not depend on it"),
    "out": (str, None, "results folder (default runs/<script>)"),
    "threads": (positive_int, None, "torch CPU threads; on a CPU shared with other jobs use 1 "
                "(OpenMP threads waiting on busy cores made steps up to 10x slower on 2 cores)")}


def cli(doc, presets, flags, argv=None, *, experiments=(), bench=None, check=None):
    """A script's command line, declared as data. presets: {"quick": {...}, "full": {...}}, a
    value for every setting (--quick, --demo and --bench take "quick"; a flag you pass wins).
    flags: {name: help or (help, type or argparse keywords)}; the type follows the presets' values
    (int -> integer >= 1, tuple -> comma list, ...). experiments: what --experiment accepts;
    args.experiments is what to run (default: the preset's "experiments", else all). bench: the
    help of --bench. check(args) raises InputError for settings that do not fit together."""
    p = ArgumentParser(description=(doc or "").strip().split("\n\n")[0],
                       epilog="A flag you pass wins over its preset value [quick: ..., full: ...]")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--demo", action="store_true",
                      help="no data, seconds: the paper's checks and figures")
    mode.add_argument("--quick", action="store_true",
                      help="CPU preset: real images, minutes on 2 cores (no flag: the GPU preset)")
    if bench:
        mode.add_argument("--bench", action="store_true", help=bench)
    if experiments:
        p.add_argument("--experiment", choices=(*experiments, "all"), default=None,
                       help="run one experiment (default: the preset's list)")
    for name, (kind, default, text) in COMMON_FLAGS.items():
        default = None if any(name in pr for pr in presets.values()) else default
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=default, help=text)
    for name, spec in flags.items():
        text, kind = (spec, None) if isinstance(spec, str) else spec
        kw = kind if isinstance(kind, dict) else {
            "type": kind or _flag_type([pr.get(name) for pr in presets.values()])}
        p.add_argument("--" + name.replace("_", "-"), default=None, help=text, **kw)
    for action in p._actions:                      # show every preset value beside its flag
        shown = [f"{k}: {_fmt(pr[action.dest])}" for k, pr in presets.items() if action.dest in pr]
        if shown and action.help:
            action.help += f" [{', '.join(shown)}]"
    args = p.parse_args(argv)
    args.bench = getattr(args, "bench", False)
    args.mode = next(m for m in ("demo", "quick", "bench", "full") if getattr(args, m, True))
    # every setting left at None comes from the preset; preset_keys names them, so that
    # data_from_args may fit those counts to a small dataset
    preset = presets["full" if args.mode == "full" else "quick"]
    args.preset_keys = sorted(k for k in preset if getattr(args, k, None) is None)
    args.preset_values = dict(preset)
    for k in args.preset_keys:
        setattr(args, k, preset[k])
    chosen = getattr(args, "experiment", None)
    args.experiments = (list(experiments) if chosen == "all" else [chosen] if chosen
                        else list(preset.get("experiments", experiments)))
    try:
        if check:
            check(args)
    except InputError as e:
        p.error(str(e))
    return args


def _fmt(v):
    return ",".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)


def in_notebook():
    """True inside a Jupyter kernel (also VS Code's interactive window)."""
    ip = sys.modules["IPython"].get_ipython() if "IPython" in sys.modules else None
    return type(ip).__name__ == "ZMQInteractiveShell"


def run_main(main, argv=None):
    """`if __name__ == "__main__": utils.run_main(main)`. An InputError becomes one line, exit 2.
    In a notebook, "Run All" must not start a training run or parse the kernel's argv."""
    if argv is None and in_notebook():
        print("notebook: the demos above ran; to run the experiments, call "
              "main(['--quick', '--data', 'cifar10']) in a cell (minutes on a CPU)")
        return None
    try:
        return main(argv)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def get_device(name="auto"):
    ok = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name == "auto":
        return torch.device(next(k for k in ("cuda", "mps", "cpu") if ok[k]))
    if name.split(":")[0] not in ok:
        raise InputError(f"--device {name!r} is not one of auto, cpu, cuda, mps")
    if not ok[name.split(":")[0]]:
        raise InputError(f"--device {name}: this machine has no {name.split(':')[0].upper()} "
                         f"device (or torch was built without it); use --device cpu or auto")
    return torch.device(name)


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def start(args, script):
    """The first lines of every main(): print the command, set torch threads, pick the device,
    make the results folder. Returns (device, out_dir)."""
    print("python " + " ".join(sys.argv), flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = get_device(args.device)
    out = args.out or os.path.join("runs", script)
    os.makedirs(out, exist_ok=True)
    return device, out

# ---------------------------------------------------------------------------------- figures, demos


FIGURES = None  # the folder where show() saves figures; run_demos sets it


def show(fig, name):
    """A matplotlib Figure inline in a notebook, as FIGURES/<name>.png under --demo. Scripts draw
    on matplotlib.figure.Figure, not pyplot: no backend is needed and nothing stays open."""
    if in_notebook():
        from IPython.display import Image, display
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        display(Image(buf.getvalue()))
    if FIGURES:
        fig.savefig(os.path.join(FIGURES, f"{name}.png"), dpi=100, bbox_inches="tight")
        print(f"  figure: {os.path.join(FIGURES, name)}.png", flush=True)


def run_demos(out, demos):
    """--demo: run each demo_*() (no data); figures and out/demo.json (its checks) go to out."""
    global FIGURES
    FIGURES, results = out, {}
    try:
        for fn in demos:
            t0 = time.time()
            print(f"== {fn.__name__}", flush=True)
            results[fn.__name__] = fn()
            print(f"  ({time.time() - t0:.1f} s)", flush=True)
    finally:
        FIGURES = None
    save_results(os.path.join(out, "demo.json"), {}, results)
    return results

# ---------------------------------------------------------------------------------- data


@dataclass
class Data:
    x_train: torch.Tensor  # (N, 3, H, W) uint8
    y_train: torch.Tensor  # (N,) int64
    x_val: torch.Tensor    # carved from the training split, never from test
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list
    mean: tuple = CIFAR_MEAN  # per-channel mean / std of the training images, in [0, 1]
    std: tuple = CIFAR_STD
    notes: list = field(default_factory=list)  # counts a preset shrank to fit this dataset

    @property
    def num_classes(self):
        return len(self.classes)


def _resize_square(img, size):
    """(3, h, w) uint8 -> (3, size, size) uint8: resize the shorter side, then centre crop."""
    _, h, w = img.shape
    if h == w == size:
        return img
    nh, nw = max(size, round(h * size / min(h, w))), max(size, round(w * size / min(h, w)))
    img = F.interpolate(img[None].float(), size=(nh, nw), mode="bilinear", antialias=True)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return img[:, top:top + size, left:left + size].round().clamp(0, 255).to(torch.uint8)


def _decode(path):
    """One image file -> (3, h, w) uint8. Grayscale and palette images become RGB."""
    from PIL import Image  # pillow comes with torchvision
    try:
        with Image.open(path) as im:
            return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
    except Exception as e:
        raise InputError(f"cannot read image {path} ({type(e).__name__}: {e}); delete or replace "
                         f"that file") from None


def _read_image_folder(split_dir, image_size, cache_dir):
    """Decode DIR/<class>/* once into a uint8 tensor and cache it (60k JPEGs take ~20 s)."""
    classes = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
    files = [(os.path.join(split_dir, c, f), i) for i, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(split_dir, c))) if not f.startswith(".")]
    if not files:
        raise InputError(f"{split_dir} has no images; expected {split_dir}/<class>/<image>")
    key = hashlib.sha1(f"{os.path.abspath(split_dir)}|{image_size}|{len(files)}|{files[-1][0]}"
                       .encode()).hexdigest()[:16]
    cache = os.path.join(cache_dir, f"{os.path.basename(split_dir.rstrip('/'))}_{image_size}_"
                                    f"{key}.pt")
    if os.path.exists(cache):
        blob = torch.load(cache)
        return blob["x"], blob["y"], classes
    print(f"decoding {len(files)} images from {split_dir} (cached in {cache})", flush=True)
    x = torch.stack([_resize_square(_decode(f), image_size) for f, _ in files])
    y = torch.tensor([c for _, c in files], dtype=torch.long)
    os.makedirs(cache_dir, exist_ok=True)
    torch.save({"x": x, "y": y}, cache + f".tmp{os.getpid()}")
    os.replace(cache + f".tmp{os.getpid()}", cache)
    return x, y, classes


def _check_folder(data):
    """The ImageFolder layout, or an InputError that says what is missing. -> test split name."""
    if not os.path.isdir(data):
        raise InputError(f"--data {data!r} is not a directory; pass 'cifar10' to download, or a "
                         f"folder with train/<class>/ and test/<class>/")
    test_name = next((s for s in ("test", "val") if os.path.isdir(os.path.join(data, s))), None)
    if not os.path.isdir(os.path.join(data, "train")) or test_name is None:
        raise InputError(f"--data {data!r} must contain train/<class>/ and test/<class>/ (or "
                         f"val/<class>/) sub-folders in torchvision ImageFolder layout; found "
                         f"{sorted(os.listdir(data))}")
    dirs = {s: sorted(d for d in os.listdir(os.path.join(data, s))
                      if os.path.isdir(os.path.join(data, s, d))) for s in ("train", test_name)}
    if len(dirs["train"]) < 2:
        raise InputError(f"{os.path.join(data, 'train')} has {len(dirs['train'])} class "
                         f"folder(s); a classifier needs >= 2, as train/<class>/<image>")
    if dirs["train"] != dirs[test_name]:
        only_tr = sorted(set(dirs["train"]) - set(dirs[test_name]))
        only_te = sorted(set(dirs[test_name]) - set(dirs["train"]))
        raise InputError(f"train/ and {test_name}/ must have the same class folders: only in "
                         f"train/ {only_tr}, only in {test_name}/ {only_te}")
    return test_name


def _per_class_subset(y, n, generator):
    """Indices of a stratified random subset: n per class (int) or a fraction (0 < n < 1)."""
    keep = []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        keep.append(idx[:round(n * len(idx)) if n < 1 else int(n)])
    return torch.cat(keep).sort().values


def _fit_counts(y_tr, y_te, counts, fit):
    """Check the per-class counts against the smallest class. Counts named in `fit` (a preset's)
    shrink to what exists, with a note; a count the user asked for that does not fit is an error."""
    n_tr, n_te = int(torch.bincount(y_tr).min()), int(torch.bincount(y_te).min())
    counts, notes = dict(counts), []
    val, tr, te = counts["val_per_class"] or 0, counts["train_per_class"], counts["test_per_class"]
    if val and val > n_tr // 2 and "val_per_class" in fit:  # keep half of each class to train on
        counts["val_per_class"], val = n_tr // 2, n_tr // 2
        notes.append(f"--val-per-class -> {val}")
    if val >= n_tr:
        raise InputError(f"--val-per-class {val} leaves no training images: the smallest class "
                         f"has {n_tr}; use fewer")
    if tr is not None and tr >= 1 and tr > n_tr - val:
        if "train_per_class" not in fit:
            raise InputError(f"--train-per-class {tr:g} is more than the {n_tr - val} images per "
                             f"class left after --val-per-class {val} (smallest class: {n_tr}); "
                             f"use at most {n_tr - val}")
        counts["train_per_class"] = n_tr - val
        notes.append(f"--train-per-class -> {n_tr - val}")
    if te is not None and te > n_te:
        if "test_per_class" not in fit:
            raise InputError(f"--test-per-class {te} is more than the {n_te} test images of the "
                             f"smallest class; use at most {n_te}")
        counts["test_per_class"] = n_te
        notes.append(f"--test-per-class -> {n_te}")
    return counts, notes


def _channel_stats(x):
    """Per-channel mean and std in [0, 1] of uint8 images (N, 3, H, W), in chunks."""
    s = s2 = torch.zeros(x.shape[1], dtype=torch.float64)
    for chunk in x.split(4096):
        c = chunk.to(torch.float64) / 255
        s, s2 = s + c.sum((0, 2, 3)), s2 + (c * c).sum((0, 2, 3))
    mean = s / (x.numel() / x.shape[1])
    return tuple(mean.tolist()), tuple((s2 / (x.numel() / x.shape[1]) - mean ** 2).sqrt().tolist())


def load_data(data="cifar10", *, image_size=32, train_per_class=None, val_per_class=0,
              test_per_class=None, seed=0, cache_dir=None, fit=()):
    """A Data of uint8 (N, 3, S, S) images. Subsets are stratified and seeded (same seed, same
    images); validation images are carved out of the training split first. `fit`: the counts
    that may shrink to fit a small dataset (the preset's, see cli)."""
    cache_dir = cache_dir or os.environ.get("CMA_CACHE", os.path.expanduser(
        "~/.cache/conv-meets-attention"))
    if data == "cifar10":
        import torchvision
        try:
            tr, te = (torchvision.datasets.CIFAR10("./data", train=t, download=True)
                      for t in (True, False))
        except Exception as e:  # offline, proxy, ...
            raise InputError(f"could not download {data} into ./data ({type(e).__name__}: {e}); "
                             f"if you are offline, pass --data DIR with an ImageFolder copy "
                             f"(DIR/train/<class>/*.jpg, DIR/test/<class>/*.jpg)") from None
        x_tr, x_te = (torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous() for ds in (tr, te))
        y_tr, y_te, classes = torch.tensor(tr.targets), torch.tensor(te.targets), tr.classes
        if image_size != 32:
            x_tr, x_te = (torch.stack([_resize_square(im, image_size) for im in x])
                          for x in (x_tr, x_te))
    else:
        test_name = _check_folder(data)
        x_tr, y_tr, classes = _read_image_folder(os.path.join(data, "train"), image_size, cache_dir)
        x_te, y_te, _ = _read_image_folder(os.path.join(data, test_name), image_size, cache_dir)
    counts, notes = _fit_counts(y_tr, y_te, dict(train_per_class=train_per_class,
                                                 val_per_class=val_per_class,
                                                 test_per_class=test_per_class), fit)
    g = torch.Generator().manual_seed(seed)
    val = (_per_class_subset(y_tr, counts["val_per_class"], g) if counts["val_per_class"]
           else torch.empty(0, dtype=torch.long))
    rest = torch.ones(len(y_tr), dtype=torch.bool)
    rest[val] = False  # validation images are removed from the training pool
    rest = torch.nonzero(rest).flatten()
    if counts["train_per_class"] is not None:
        rest = rest[_per_class_subset(y_tr[rest], counts["train_per_class"], g)]
    if counts["test_per_class"] is not None:
        keep = _per_class_subset(y_te, counts["test_per_class"], g)
        x_te, y_te = x_te[keep], y_te[keep]
    # CIFAR-10's usual constants for the torchvision copy; other data by its own statistics
    mean, std = (CIFAR_MEAN, CIFAR_STD) if data == "cifar10" else _channel_stats(x_tr)
    return Data(x_tr[rest], y_tr[rest], x_tr[val], y_tr[val], x_te, y_te, list(classes), mean,
                std, notes)


def data_from_args(args, seed=None):
    """load_data with the common flags. Counts that came from a preset fit a small dataset; when
    the training count shrinks, every preset `*epochs` setting grows by the same factor, so the
    run keeps about the preset's number of optimiser steps, and one `note:` line says so."""
    tpc = args.train_per_class
    data = load_data(args.data, image_size=args.image_size,
                     seed=args.seed if seed is None else seed,
                     train_per_class=int(tpc) if tpc is not None and tpc >= 1 else tpc,
                     val_per_class=args.val_per_class or 0, test_per_class=args.test_per_class,
                     fit=set(getattr(args, "preset_keys", ())) & set(COUNT_FLAGS))
    notes, fitted = list(data.notes), int(torch.bincount(data.y_train).min())
    if tpc is not None and tpc >= 1 and fitted < tpc and "train_per_class" in args.preset_keys:
        for name in [k for k in args.preset_keys if k.endswith("epochs")]:
            epochs = args.preset_values[name]
            setattr(args, name, type(epochs)(max(1, round(epochs * tpc / fitted))))
            notes.append(f"--{name.replace('_', '-')} {epochs} -> {getattr(args, name)} (keeps "
                         f"the preset's optimiser steps)")
    if notes:
        print(f"note: this dataset is smaller than the preset (smallest class: "
              f"{fitted + len(data.y_val) // data.num_classes} train / "
              f"{int(torch.bincount(data.y_test).min())} test images), so the preset uses what "
              f"exists: {', '.join(notes)}", flush=True)
    return data


class DeviceLoader:
    """The uint8 dataset on the device, augmented there per batch (airbench): random crop (zero
    pad 4) and flip from the loader's own generator, which reset() (called by train) puts back
    to `seed`: the same seed gives the same batches, whatever ran before."""

    def __init__(self, x, y, *, batch_size, device, train, mean=CIFAR_MEAN, std=CIFAR_STD,
                 pad=4, seed=0):
        assert x.dtype == torch.uint8 and x.ndim == 4, \
            f"expected uint8 (N, C, H, W) images, got {x.dtype} {tuple(x.shape)}"
        if len(x) == 0:
            raise InputError("an empty image set reached a loader: check --train-per-class / "
                             "--val-per-class")
        self.x, self.y, self.device, self.seed = x.to(device), y.to(device), device, seed
        self.batch_size, self.train, self.pad = min(batch_size, len(x)), train, pad
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255
        self.g = torch.Generator(device=device)
        self.reset()

    def reset(self):
        self.g.manual_seed(self.seed)
        return self

    def __len__(self):
        n = len(self.x) / self.batch_size
        return max(int(n) if self.train else math.ceil(n), 1)  # training drops a last partial batch

    def augment(self, x):
        B, _, H, W = x.shape
        p = self.pad
        xp = F.pad(x, (p, p, p, p))  # (B, C, H+2p, W+2p), zeros
        dy = torch.randint(0, 2 * p + 1, (B, 1), device=x.device, generator=self.g)
        dx = torch.randint(0, 2 * p + 1, (B, 1), device=x.device, generator=self.g)
        rows = (dy + torch.arange(H, device=x.device))[:, :, None]  # (B, H, 1)
        cols = (dx + torch.arange(W, device=x.device))[:, None, :]  # (B, 1, W)
        batch = torch.arange(B, device=x.device)[:, None, None]
        x = xp.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)
        flip = torch.rand(B, device=x.device, generator=self.g) < 0.5
        return torch.where(flip[:, None, None, None], x.flip(3), x)

    def __iter__(self):
        n = len(self.x)
        order = (torch.randperm(n, device=self.device, generator=self.g) if self.train
                 else torch.arange(n, device=self.device))
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.augment(self.x[idx].float()) if self.train else self.x[idx].float()
            yield (x - self.mean) / self.std, self.y[idx]


def make_loaders(data, *, batch_size, device, seed, eval_batch_size=500):
    """Fresh loaders for one run: (train, val or None, test); training is seeded with `seed`."""
    kw = dict(device=device, mean=data.mean, std=data.std)
    train = DeviceLoader(data.x_train, data.y_train, batch_size=batch_size, train=True, seed=seed,
                         **kw)
    val = (DeviceLoader(data.x_val, data.y_val, batch_size=eval_batch_size, train=False, **kw)
           if len(data.y_val) else None)
    test = DeviceLoader(data.x_test, data.y_test, batch_size=eval_batch_size, train=False, **kw)
    return train, val, test

# ---------------------------------------------------------------------------------- train / eval


FORCE_AUTOCAST = False  # tests set this to run the bf16 mixed-precision path on a CPU


def autocast(device):
    """bf16 autocast on CUDA; a no-op elsewhere, so CPU numbers stay exact float32."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=device.type == "cuda" or FORCE_AUTOCAST)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Score(NamedTuple):
    acc: float  # top-1 accuracy, %
    nll: float  # mean negative log-likelihood (no label smoothing), nats per image


@torch.no_grad()
def evaluate(model, loader, forward=None):
    """Score(acc %, nll) of `forward(model, x)` (default model(x)) over a non-shuffled loader.
    The NLL is far less noisy than accuracy, so comparisons report both."""
    was_training = model.training
    model.eval()
    correct = total = nll = 0
    for x, y in loader:
        with autocast(loader.device):
            logits = forward(model, x) if forward else model(x)
        correct += (logits.argmax(-1) == y).sum().item()
        nll += F.cross_entropy(logits.float(), y, reduction="sum").item()
        total += len(y)
    model.train(was_training)
    return Score(100.0 * correct / total, nll / total)


# Weight decay is a prior for weight matrices and kernels. Biases and norms (1-D) and positional
# parameters (class token, position embeddings, relative-position tables) are exempt: decay would
# pull them towards "no positional preference". timm's optimiser (official DeiT, ConViT and
# AutoFormer) skips 1-D parameters and the EXACT names in a model's no_weight_decay(): DeiT and
# ConViT list pos_embed and cls_token, as we do; AutoFormer's exact names miss its relative tables,
# so its official run decays them. A model may list more names in its own no_weight_decay().
NO_DECAY = re.compile(r"(^|\.)(cls_token|pos_embed|rel\w*|key_rel\w*|pos_v)($|\.)")


def param_groups(model, weight_decay):
    """AdamW/SGD groups: decay on weight matrices and kernels, none on what NO_DECAY names."""
    extra = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            exempt = p.ndim < 2 or NO_DECAY.search(name) or any(e in name for e in extra)
            (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def train(model, train_loader, *, epochs, lr, weight_decay=0.05, optimizer="adamw", momentum=0.9,
          warmup_epochs=1.0, label_smoothing=0.1, grad_clip=1.0, step_fn=None, log=print, name=""):
    """Train `model` (its loader reset to its seed); returns one dict per epoch. step_fn(model, x,
    y) -> (loss, logits) may replace forward + loss + backward (a supernet's several backward
    passes); the loop owns zero_grad, clipping, the optimiser and warmup + cosine schedule."""
    device = train_loader.device
    params = [p for p in model.parameters() if p.requires_grad]
    groups = param_groups(model, weight_decay)
    if optimizer not in ("adamw", "sgd"):
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
    opt = (torch.optim.AdamW(groups, lr=lr) if optimizer == "adamw"
           else torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True))
    total, warmup = epochs * len(train_loader), int(warmup_epochs * len(train_loader))

    def schedule(s):  # linear warmup to lr, then cosine to 0
        if s < warmup:
            return (s + 1) / max(warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(total - warmup, 1)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)

    def default_step(model, x, y):
        with autocast(device):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        loss.backward()
        return loss, logits

    step_fn = step_fn or default_step
    history, t0 = [], time.time()
    train_loader.reset()
    model.train()
    for epoch in range(1, epochs + 1):
        t_epoch, loss_sum, correct, seen = time.time(), 0.0, 0, 0
        for x, y in train_loader:
            opt.zero_grad(set_to_none=True)
            loss, logits = step_fn(model, x, y)
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(-1) == y).sum().item()
            seen += len(y)
        _sync(device)
        history.append({"epoch": epoch, "loss": loss_sum / seen, "train_acc": 100 * correct / seen,
                        "img_per_s": seen / (time.time() - t_epoch)})
        h, elapsed = history[-1], time.time() - t0
        eta = elapsed / epoch * (epochs - epoch)
        log(f"{name}epoch {epoch:3d}/{epochs} loss {h['loss']:.3f} train {h['train_acc']:5.1f}% | "
            f"{h['img_per_s']:6.0f} img/s | {elapsed:6.1f}s eta {eta:5.0f}s")
    return history


def copy_shared_init(src, dst):
    """Paired arms: give `dst` the initial value of every parameter and buffer `src` has under the
    same name and shape, so two arms differ only where their architectures do. -> names copied."""
    src_state, copied = src.state_dict(), []
    with torch.no_grad():
        for name, t in dst.state_dict().items():
            if name in src_state and src_state[name].shape == t.shape:
                t.copy_(src_state[name])
                copied.append(name)
    return copied


def _run_job(fn, job, threads):
    torch.set_num_threads(threads)
    return fn(*job)


def run_jobs(fn, jobs, *, workers=1, threads=1):
    """[fn(*job) for job in jobs], `workers` at a time in spawned processes (forking after torch
    started its threads can deadlock). A job seeds all it uses, so where it ran does not matter.
    A job a worker cannot receive (fn defined in a notebook) runs here instead, with a note."""
    if workers <= 1 or len(jobs) <= 1:
        return [fn(*job) for job in jobs]
    try:
        assert getattr(sys.modules.get(fn.__module__), "__file__", None) is not None
        pickle.dumps((fn, jobs[0]))
    except Exception:
        print(f"note: {fn.__name__} cannot be sent to worker processes (defined in a notebook?); "
              f"running its {len(jobs)} jobs in this process", flush=True)
        return [fn(*job) for job in jobs]
    import concurrent.futures
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as ex:
        return list(ex.map(_run_job, [fn] * len(jobs), jobs, [threads] * len(jobs)))

# ---------------------------------------------------------------------------------- statistics


# two-sided 95% quantiles of Student's t for df 1..30 (beyond 30, t95 uses an expansion)
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
       2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
       2.052, 2.048, 2.045, 2.042)


def t95(df):
    """The 97.5% quantile of Student's t: the table up to df 30, then the Cornish-Fisher expansion
    around the normal's 1.95996 (Abramowitz & Stegun 26.7.5; error < 1e-4 from df 30)."""
    assert df >= 1, f"a t-interval needs df >= 1, got {df}"
    if df <= 30:
        return T95[int(df) - 1]
    z = 1.959964
    g = ((z**3 + z) / 4, (5 * z**5 + 16 * z**3 + 3 * z) / 96,
         (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
         (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160)
    return z + sum(gi / df ** (i + 1) for i, gi in enumerate(g))


def mean_ci(xs):
    """(mean, low, high): the 95% t-interval of the mean of independent values; nan when n < 2."""
    xs = [float(x) for x in xs]
    n, m = len(xs), sum(xs) / len(xs)
    if n < 2:
        return m, float("nan"), float("nan")
    half = t95(n - 1) * math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)
    return m, m - half, m + half


def fmt_ci(ci, digits=2):
    """'48.57 [46.96, 50.19]' for a mean_ci, and 'n=1, no interval' instead of a nan interval."""
    m, lo, hi = ci
    if math.isnan(lo):
        return f"{m:.{digits}f} (n=1, no interval)"
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _signed(v, digits):
    return f"{v:+.{digits}f}".replace("-", "\u2212")


def compare_paired(a, b, *, name_a, name_b, unit="points", digits=1, higher_is_better=True,
                   bound=1.0, pairs="paired seeds", log=print):
    """The one verdict wording. a[i], b[i]: a metric of arms A and B from the same seed (same
    data, batches, shared initial weights). Prints and returns the mean of A - B, its 95%
    t-interval, n and: "<A|B> better" if the interval excludes 0 (checked first); "equivalent
    within +-bound" if it lies inside +-bound; else "not decided at this budget"."""
    assert len(a) == len(b) >= 1, f"need equally many (>= 1) paired values, got {len(a)}, {len(b)}"
    d = [float(x) - float(y) for x, y in zip(a, b)]
    m, lo, hi = mean_ci(d)
    n = len(d)
    if n < 2:
        verdict = "not decided at this budget (one pair: no interval)"
    elif lo > 0 or hi < 0:
        verdict = f"{name_a if (m > 0) == higher_is_better else name_b} better"
    elif -bound <= lo and hi <= bound:
        verdict = f"no difference detected: equivalent within \u00b1{bound:g} {unit}"
    else:
        verdict = (f"no difference detected; not decided at this budget (interval wider than "
                   f"\u00b1{bound:g} {unit})")
    ci = f"95% CI [{_signed(lo, digits)}, {_signed(hi, digits)}]" if n > 1 else "no interval"
    line = (f"{name_a} \u2212 {name_b} = {_signed(m, digits)} {unit}, {ci}, n={n} {pairs} "
            f"\u2192 {verdict}")
    if log:
        log(line)
    return {"a": name_a, "b": name_b, "unit": unit, "diff": m, "ci": [lo, hi], "n": n,
            "verdict": verdict, "line": line, "per_pair": d}

# ---------------------------------------------------------------------------------- measure


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def count_flops(model, input_shape, device="cpu"):
    """Forward FLOPs of one (C, H, W) input by torch's FlopCounterMode (1 MAC = 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(torch.zeros(1, *input_shape, device=device))
    model.train(was_training)
    return fc.get_total_flops()


def measure_step(model, input_shape, *, batch_size=128, num_classes=10, steps=5, warmup=2,
                 device="cpu", forward=None):
    """Train-step img/s (forward + backward) and memory in MB: the CUDA peak, else the bytes
    autograd saves for backward (the activations). Runs on a copy: BatchNorm stats stay."""
    device, model, saved = torch.device(device), copy.deepcopy(model).train(), [0]
    x = torch.randn(batch_size, *input_shape, device=device)
    y = torch.randint(0, num_classes, (batch_size,), device=device)

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0, saved[0] = time.time(), 0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(device):
            loss = F.cross_entropy((forward(model, x) if forward else model(x)).float(), y)
        loss.backward()
        model.zero_grad(set_to_none=True)
    _sync(device)
    img_s = steps * batch_size / (time.time() - t0)
    mem = torch.cuda.max_memory_allocated() if device.type == "cuda" else saved[0] / steps
    return img_s, mem / 2**20


def save_results(path, config, metrics):
    """Write {command, config, metrics, environment} as JSON atomically (temp file + rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    device = (torch.cuda.get_device_name() if torch.cuda.is_available()
              else f"cpu x{torch.get_num_threads()} threads")
    blob = {"command": "python " + " ".join(sys.argv), "config": config, "metrics": metrics,
            "torch": torch.__version__, "device": device,
            "wall_time_s": round(time.time() - _START, 1), "date": time.strftime("%Y-%m-%d %H:%M")}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(blob, f, indent=2, default=str)
    os.replace(tmp, path)
    return path
