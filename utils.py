"""What the five scripts share, and nothing about any paper: the command line with one-line
errors, figures, data, the train / evaluate loop, runs on several cores, and the paired verdict."""
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
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
COUNT_FLAGS = ("train_per_class", "val_per_class", "test_per_class")


# ------------------------------------------------------------------------------ command line
class InputError(Exception):
    """A bad input the user can fix: `run_main` prints it as one line and exits with 2."""

class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")

def _number(kind, low, name):
    """An argparse type for numbers >= low (> 0 when low is None) that says why it refuses."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
        if (v <= 0 if low is None else v < low) or not math.isfinite(v):
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
    """A flag's type from its preset values: int -> integer >= 1 (>= 0 if a preset is 0), ..."""
    values = [v for v in values if v is not None]
    if values and isinstance(values[0], (tuple, list)):
        return comma_list(_flag_type([x for vs in values for x in vs]))
    if not values or not isinstance(values[0], (int, float)):
        return str
    if any(isinstance(x, float) for x in values):
        return nonneg_float if 0 in values else positive_float
    return nonneg_int if 0 in values else positive_int

COMMON_FLAGS = {  # name -> (type, default, help); a preset's value replaces the default
    "data": (str, "cifar10", "'cifar10' (torchvision download into ./data) or an ImageFolder "
             "DIR with DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg (or val/)"),
    "device": (str, "auto", "auto (cuda > mps > cpu), cuda, mps or cpu"),
    "seed": (nonneg_int, 0, "first seed; runs repeat bit for bit on one machine"),
    "image_size": (positive_int, 32, "images are resized to this side if needed"),
    "train_per_class": (positive_float, None, "N images per class (N >= 1) or a fraction (< 1)"),
    "val_per_class": (nonneg_int, None, "images per class carved out of the TRAINING split for "
                      "validation"),
    "test_per_class": (positive_int, None, "subset of the test split (default: all of it)"),
    "workers": (positive_int, None, "runs trained at once in separate processes (1 thread each); "
                "results do not depend on it"),
    "out": (str, None, "results folder (default runs/<script>)"),
    "threads": (positive_int, None, "torch CPU threads; on a CPU shared with other jobs use 1")}

def cli(doc, presets, flags, argv=None, *, experiments=(), bench=None, check=None):
    """A command line as data: presets {"quick": {...}, "full": {...}} (a flag you pass wins),
    flags {name: help or (help, type)}; check(args) raises InputError for bad combinations."""
    title, _, rest = (doc or "").strip().partition("\n\n")  # the docstring's paper and commands
    p = ArgumentParser(description=title, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=f"{rest}\n\nA flag you pass wins over its preset value [quick: ..., "
                              f"full: ...]".strip())
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--demo", action="store_true", help="no data, seconds: checks and figures")
    mode.add_argument("--quick", action="store_true",
                      help="CPU preset: real images, minutes on 2 cores (no flag: the GPU preset)")
    if bench:
        mode.add_argument("--bench", action="store_true", help=bench)
    if experiments:
        p.add_argument("--experiment", choices=(*experiments, "all"),
                       help="run one experiment (default: the preset's list)")
    for name, (kind, default, text) in COMMON_FLAGS.items():
        in_preset = any(name in pr for pr in presets.values())
        p.add_argument("--" + name.replace("_", "-"), type=kind, help=text,
                       default=None if in_preset else default)
    for name, spec in flags.items():
        text, kind = (spec, None) if isinstance(spec, str) else spec
        if not isinstance(kind, dict):
            kind = {"type": kind or _flag_type([pr.get(name) for pr in presets.values()])}
        p.add_argument("--" + name.replace("_", "-"), default=None, help=text, **kind)
    for action in p._actions:  # show every preset value beside its flag
        shown = [f"{k}: {_fmt(pr[action.dest])}" for k, pr in presets.items() if action.dest in pr]
        if shown and action.help:
            action.help += f" [{', '.join(shown)}]"
    args = p.parse_args(argv)
    args.bench = getattr(args, "bench", False)
    args.mode = next(m for m in ("demo", "quick", "bench", "full") if getattr(args, m, True))
    # settings left at None come from the preset; preset_keys names them, so that
    # data_from_args may fit those counts to a small dataset
    preset = presets["full" if args.mode == "full" else "quick"]
    args.preset_keys = sorted(k for k in preset if getattr(args, k, None) is None)
    args.preset_values = dict(preset)
    for k in args.preset_keys:
        setattr(args, k, preset[k])
    chosen = getattr(args, "experiment", None)
    args.experiments = [chosen] if chosen else list(preset.get("experiments", experiments))
    if chosen == "all":
        args.experiments = list(experiments)
    try:
        if check:
            check(args)
        if args.mode in ("quick", "full") and args.data != "cifar10":
            _check_folder(args.data)  # a wrong folder stops now, not after minutes of work
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
    """An InputError becomes one line, exit 2; in a notebook, "Run All" starts no training."""
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
    kind = name.split(":")[0]
    if name == "auto":
        return torch.device(next(k for k in ("cuda", "mps", "cpu") if ok[k]))
    if kind not in ok:
        raise InputError(f"--device {name!r} is not one of auto, cpu, cuda, mps")
    if not ok[kind]:
        raise InputError(f"--device {name}: this machine has no {kind.upper()} device (or torch "
                         f"was built without it); use --device cpu or auto")
    return torch.device(name)

def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device

def start(args, script):
    """Print the command, set threads, make the results folder. -> (device, out_dir)"""
    print("python " + " ".join(sys.argv), flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or os.path.join("runs", script)
    os.makedirs(out, exist_ok=True)
    return get_device(args.device), out


# ------------------------------------------------------------------------------ figures
FIGURES = None  # where show() saves figures; run_demos sets it

def show(fig, name):
    """A Figure inline in a notebook, and FIGURES/<name>.png under --demo."""
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


# ------------------------------------------------------------------------------ data
@dataclass
class Data:  # uint8 (N, 3, H, W) images, int64 labels; validation is carved out of train
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list
    mean: tuple = CIFAR_MEAN  # per-channel statistics of the training images, in [0, 1]
    std: tuple = CIFAR_STD
    notes: list = field(default_factory=list)  # the counts a preset shrank to fit the data

    @property
    def num_classes(self):
        return len(self.classes)

def _resize_square(img, size):
    """(3, h, w) uint8 -> (3, size, size): resize the shorter side, then centre crop."""
    _, h, w = img.shape
    if h == w == size:
        return img
    nh, nw = max(size, round(h * size / min(h, w))), max(size, round(w * size / min(h, w)))
    img = F.interpolate(img[None].float(), size=(nh, nw), mode="bilinear", antialias=True)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return img[:, top:top + size, left:left + size].round().clamp(0, 255).to(torch.uint8)

def _read_split(split_dir, size, cache_dir):
    """Decode DIR/<class>/* once (torchvision's ImageFolder) into a cached uint8 tensor."""
    from torchvision.datasets import ImageFolder
    ds = ImageFolder(split_dir)
    key = f"{os.path.abspath(split_dir)}|{size}|{len(ds)}|{ds.samples[-1][0]}"
    cache = os.path.join(cache_dir, f"{os.path.basename(split_dir.rstrip('/'))}_{size}_"
                         f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt")
    if os.path.exists(cache):
        blob = torch.load(cache)
        return blob["x"], blob["y"], ds.classes
    print(f"decoding {len(ds)} images from {split_dir} (cached in {cache})", flush=True)
    images = []
    for path, _ in ds.samples:
        try:
            rgb = torch.from_numpy(np.array(ds.loader(path)))  # (h, w, 3): gray becomes RGB
        except Exception as e:
            raise InputError(f"cannot read image {path} ({type(e).__name__}: {e}); delete or "
                             f"replace that file") from None
        images.append(_resize_square(rgb.permute(2, 0, 1), size))
    x, y = torch.stack(images), torch.tensor(ds.targets, dtype=torch.long)
    os.makedirs(cache_dir, exist_ok=True)
    torch.save({"x": x, "y": y}, cache + f".tmp{os.getpid()}")
    os.replace(cache + f".tmp{os.getpid()}", cache)
    return x, y, ds.classes

def _check_folder(data):
    """The ImageFolder layout, or an InputError that says what is missing. -> the test split."""
    if not os.path.isdir(data):
        raise InputError(f"--data {data!r} is not a directory; pass 'cifar10' to download, or a "
                         f"folder with train/<class>/ and test/<class>/")
    test = next((s for s in ("test", "val") if os.path.isdir(os.path.join(data, s))), None)
    if test is None or not os.path.isdir(os.path.join(data, "train")):
        raise InputError(f"--data {data!r} must contain train/<class>/ and test/<class>/ (or "
                         f"val/<class>/) in ImageFolder layout; found {sorted(os.listdir(data))}")
    tr = sorted(e.name for e in os.scandir(os.path.join(data, "train")) if e.is_dir())
    te = sorted(e.name for e in os.scandir(os.path.join(data, test)) if e.is_dir())
    if len(tr) < 2:
        raise InputError(f"{data}/train has {len(tr)} class folder(s); a classifier needs >= 2")
    if tr != te:
        raise InputError(f"train/ and {test}/ must have the same class folders: only in "
                         f"train/ {sorted(set(tr) - set(te))}, only in {test}/ "
                         f"{sorted(set(te) - set(tr))}")
    return test

def _per_class_subset(y, n, generator):
    """Indices of a stratified random subset: n per class (n >= 1) or a fraction (n < 1)."""
    keep = []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        keep.append(idx[:round(n * len(idx)) if n < 1 else int(n)])
    return torch.cat(keep).sort().values

def _fit(name, asked, have, fit, notes, what):
    """A count too large for the data: shrunk if the preset chose it, else an InputError."""
    flag = "--" + name.replace("_", "-")
    if name not in fit:
        raise InputError(f"{flag} {asked:g} is more than {what}; use at most {have}")
    notes.append(f"{flag} -> {have}")
    return have

def load_data(data="cifar10", *, image_size=32, train_per_class=None, val_per_class=0,
              test_per_class=None, seed=0, cache_dir=None, fit=()):
    """A Data of uint8 (N, 3, S, S) images: seeded stratified subsets, validation carved out of
    train first. `fit`: the counts that may shrink to fit a small dataset (the preset's)."""
    home = os.path.expanduser("~/.cache/conv-meets-attention")
    cache_dir = cache_dir or os.environ.get("CMA_CACHE", home)
    if data == "cifar10":
        import torchvision
        try:
            splits = [torchvision.datasets.CIFAR10("./data", train=t, download=True)
                      for t in (True, False)]
        except Exception as e:  # offline, proxy, ...
            raise InputError(f"could not download {data} into ./data ({type(e).__name__}: {e}); "
                             f"offline, pass --data DIR with an ImageFolder copy") from None
        x_tr, x_te = [torch.from_numpy(ds.data).permute(0, 3, 1, 2) for ds in splits]
        x_tr = torch.stack([_resize_square(im, image_size) for im in x_tr])
        x_te = torch.stack([_resize_square(im, image_size) for im in x_te])
        y_tr, y_te = [torch.tensor(ds.targets) for ds in splits]
        classes = splits[0].classes
    else:
        test = _check_folder(data)
        x_tr, y_tr, classes = _read_split(os.path.join(data, "train"), image_size, cache_dir)
        x_te, y_te, _ = _read_split(os.path.join(data, test), image_size, cache_dir)
    n_tr, n_te = int(torch.bincount(y_tr).min()), int(torch.bincount(y_te).min())
    notes = []
    val, tr, te = val_per_class or 0, train_per_class, test_per_class
    if val > n_tr // 2 and "val_per_class" in fit:  # keep half of each class to train on
        val = _fit("val_per_class", val, n_tr // 2, fit, notes, "")
    if val >= n_tr:
        raise InputError(f"--val-per-class {val} leaves no training images: the smallest class "
                         f"has {n_tr}; use fewer")
    if tr is not None and tr >= 1 and tr > n_tr - val:
        tr = _fit("train_per_class", tr, n_tr - val, fit, notes, f"the {n_tr - val} images per "
                  f"class left after --val-per-class {val} (smallest class: {n_tr})")
    if te is not None and te > n_te:
        te = _fit("test_per_class", te, n_te, fit, notes, "the smallest class's test images")
    g = torch.Generator().manual_seed(seed)
    keep = torch.ones(len(y_tr), dtype=torch.bool)
    val = _per_class_subset(y_tr, val, g) if val else torch.empty(0, dtype=torch.long)
    keep[val] = False  # validation images leave the training pool
    rest = torch.nonzero(keep).flatten()
    if tr is not None:
        rest = rest[_per_class_subset(y_tr[rest], tr, g)]
    if te is not None:
        pick = _per_class_subset(y_te, te, g)
        x_te, y_te = x_te[pick], y_te[pick]
    mean, std = CIFAR_MEAN, CIFAR_STD  # the usual constants for torchvision's copy
    if data != "cifar10":  # other data: the statistics of its own training images
        s = s2 = torch.zeros(x_tr.shape[1], dtype=torch.float64)
        for chunk in x_tr.split(4096):  # float64 sums, in chunks to bound memory
            c = chunk.to(torch.float64) / 255
            s, s2 = s + c.sum((0, 2, 3)), s2 + (c * c).sum((0, 2, 3))
        m = s / (x_tr.numel() / x_tr.shape[1])
        mean = tuple(m.tolist())
        std = tuple((s2 / (x_tr.numel() / x_tr.shape[1]) - m ** 2).sqrt().tolist())
    return Data(x_tr[rest], y_tr[rest], x_tr[val], y_tr[val], x_te, y_te, list(classes), mean,
                std, notes)

def data_from_args(args, seed=None):
    """load_data with the common flags. When a preset's training count shrinks to fit, its
    `*epochs` settings grow alike (same optimiser steps), and a `note:` line says so."""
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
    """uint8 images on the device, cropped (zero pad 4) and flipped there per batch (airbench)
    by the loader's own generator; reset() (train calls it) makes a seed replay its batches."""

    def __init__(self, x, y, *, batch_size, device, train, mean=CIFAR_MEAN, std=CIFAR_STD,
                 pad=4, seed=0):
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
        n = len(self.x) / self.batch_size  # training drops a last partial batch
        return max(int(n) if self.train else math.ceil(n), 1)

    def augment(self, x):
        B, _, H, W = x.shape
        p, dev = self.pad, x.device
        xp = F.pad(x, (p, p, p, p)).permute(0, 2, 3, 1)  # (B, H+2p, W+2p, C), zeros around
        dy = torch.randint(0, 2 * p + 1, (B, 1), device=dev, generator=self.g)
        dx = torch.randint(0, 2 * p + 1, (B, 1), device=dev, generator=self.g)
        rows = (dy + torch.arange(H, device=dev))[:, :, None]  # (B, H, 1)
        cols = (dx + torch.arange(W, device=dev))[:, None, :]  # (B, 1, W)
        x = xp[torch.arange(B, device=dev)[:, None, None], rows, cols].permute(0, 3, 1, 2)
        flip = torch.rand(B, device=dev, generator=self.g) < 0.5
        return torch.where(flip[:, None, None, None], x.flip(3), x)

    def __iter__(self):
        n = len(self.x)
        order = torch.arange(n, device=self.device)
        if self.train:
            order = torch.randperm(n, device=self.device, generator=self.g)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.augment(self.x[idx].float()) if self.train else self.x[idx].float()
            yield (x - self.mean) / self.std, self.y[idx]

def make_loaders(data, *, batch_size, device, seed, eval_batch_size=500):
    """Fresh loaders for one run: (train, val or None, test); training is seeded with `seed`."""
    kw = dict(device=device, mean=data.mean, std=data.std)
    train = DeviceLoader(data.x_train, data.y_train, batch_size=batch_size, train=True,
                         seed=seed, **kw)
    val = None
    if len(data.y_val):
        val = DeviceLoader(data.x_val, data.y_val, batch_size=eval_batch_size, train=False, **kw)
    test = DeviceLoader(data.x_test, data.y_test, batch_size=eval_batch_size, train=False, **kw)
    return train, val, test


# ------------------------------------------------------------------------------ train, evaluate
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
    """Score(acc %, nll) of forward(model, x) (default model(x)); NLL is far less noisy."""
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

# Weight decay is a prior for weight matrices and kernels. Biases, norms (1-D) and positional
# parameters are exempt: decay would pull them towards "no positional preference". timm (the
# official DeiT, ConViT, AutoFormer) exempts 1-D parameters and the exact names a model lists in
# no_weight_decay(); AutoFormer's list misses its relative tables, so its official run decays them.
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
    """AdamW/SGD, warmup + cosine, clipping; -> one dict per epoch. step_fn(model, x, y) ->
    (loss, logits) may replace forward + loss + backward (a supernet's several passes)."""
    device = train_loader.device
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer not in ("adamw", "sgd"):
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
    opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr)
    if optimizer == "sgd":
        opt = torch.optim.SGD(param_groups(model, weight_decay), lr=lr, momentum=momentum,
                              nesterov=True)
    total, warmup = epochs * len(train_loader), int(warmup_epochs * len(train_loader))

    def schedule(s):  # linear warmup to lr, then cosine to 0
        if s < warmup:
            return (s + 1) / max(warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(total - warmup, 1)))
    def default_step(model, x, y):
        with autocast(device):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        loss.backward()
        return loss, logits
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
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
        log(f"{name}epoch {epoch:3d}/{epochs} loss {h['loss']:.3f} train {h['train_acc']:5.1f}% | "
            f"{h['img_per_s']:6.0f} img/s | {elapsed:6.1f}s eta "
            f"{elapsed / epoch * (epochs - epoch):5.0f}s")
    return history

def copy_shared_init(src, dst):
    """Paired arms: `dst` takes every tensor `src` has under the same name and shape."""
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
    """[fn(*job) for job in jobs] in `workers` spawned processes (a fork can deadlock torch);
    jobs a worker cannot import (defined in a notebook) run here, with a note."""
    if workers <= 1 or len(jobs) <= 1:
        return [fn(*job) for job in jobs]
    try:
        if getattr(sys.modules.get(fn.__module__), "__file__", None) is None:
            raise TypeError("a worker cannot import a module that has no file")
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


# ------------------------------------------------------------------------------ statistics
# two-sided 95% quantiles of Student's t for df 1..30
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
       2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
       2.052, 2.048, 2.045, 2.042)

def t95(df):
    """Student's t 97.5% quantile: the table, then Cornish-Fisher (A&S 26.7.5) beyond df 30."""
    if df < 1:
        raise ValueError(f"a t-interval needs df >= 1, got {df}")
    if df <= 30:
        return T95[int(df) - 1]
    z = 1.959964
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    return z + g1 / df + g2 / df**2 + g3 / df**3

def mean_ci(xs):
    """(mean, low, high): the 95% t-interval of the mean of independent values; nan if n < 2."""
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
    """The one verdict wording: mean of a[i] - b[i] (same seed), 95% t-interval, n, then "A
    better" if it excludes 0 (checked first), "equivalent" inside +-bound, else "not decided"."""
    if len(a) != len(b) or len(a) == 0:
        raise ValueError(f"need equally many (>= 1) paired values, got {len(a)}, {len(b)}")
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


# ------------------------------------------------------------------------------ measure
def count_params(model):
    return sum(p.numel() for p in model.parameters())

def measure_step(model, input_shape, *, batch_size=128, num_classes=10, steps=5, warmup=2,
                 device="cpu", forward=None):
    """Train-step img/s and MB (CUDA peak, else the bytes saved for backward), on a copy."""
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
    device = f"cpu x{torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    blob = {"command": "python " + " ".join(sys.argv), "config": config, "metrics": metrics,
            "torch": torch.__version__, "device": device,
            "wall_time_s": round(time.time() - _START, 1), "date": time.strftime("%Y-%m-%d %H:%M")}
    with open(f"{path}.tmp{os.getpid()}", "w") as f:
        json.dump(blob, f, indent=2, default=str)
    os.replace(f"{path}.tmp{os.getpid()}", path)
    return path
