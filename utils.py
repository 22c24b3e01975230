"""Shared plumbing for the numbered scripts: command line, data, train/eval loop, paired statistics, measurement.

Nothing here knows about any one paper. Each script reads top to bottom on its own and only calls:
    ArgumentParser, add_common_args, apply_preset   flags with one-line errors; presets that flags override
    run_main(main), InputError                      `error: ...` + exit 2 for every bad input, never a traceback
    start(args, script) -> (device, out_dir)        the first lines of every main()
    load_data / data_from_args -> Data              uint8 train / val / test; quick presets fit small datasets
    DeviceLoader, make_loaders                      whole dataset on the device; crop+flip+normalise per batch
    train(...), evaluate(...) -> Score(acc, nll)    AdamW/SGD, warmup+cosine, label smoothing, clipping, bf16 on CUDA
    copy_shared_init(src, dst)                      paired arms: equal initial values for every weight they share
    run_jobs(fn, jobs, workers)                     independent runs (one per seed/arm) on several CPU cores
    mean_ci, compare_paired, kendall_tau, bootstrap_ci   how sure we are: 95% intervals and one verdict wording
    count_params, count_flops, measure_step         params, FLOPs (FlopCounterMode), img/s and memory
    save_results(path, config, metrics)             atomic JSON under runs/<script>/
"""
import argparse
import copy
import hashlib
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

_START = time.time()
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
COUNT_FLAGS = ("train_per_class", "val_per_class", "test_per_class")

# ------------------------------------------------------------------------------------------------ command line

class InputError(Exception):
    """A bad input the user can fix (a flag, a data folder, an image). `run_main` prints it as one line."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag prints ONE line, `error: ... (see --help)`, and exits with status 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _number(kind, low, name):
    """An argparse `type` that accepts numbers >= low (or > 0 when low is None) and says so when it refuses one."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}")
        if (low is None and not v > 0) or (low is not None and v < low) or not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be {name}, got {text}")
        return v
    parse.__name__ = name
    return parse


positive_int = _number(int, 1, "an integer >= 1")
nonneg_int = _number(int, 0, "an integer >= 0")
positive_float = _number(float, None, "a number > 0")
nonneg_float = _number(float, 0.0, "a number >= 0")


def add_common_args(p):
    """The flags every script shares, so `--help` reads the same everywhere. Counts default to None = the preset's."""
    p.add_argument("--data", default="cifar10",
                   help="'cifar10' / 'cifar100' (torchvision download into ./data) or a directory in "
                        "ImageFolder layout: DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg (or DIR/val/...); "
                        "offline copy: --data ../shared/data/cifar10")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cuda, mps or cpu")
    p.add_argument("--seed", type=nonneg_int, default=0, help="first seed; runs are repeatable bit for bit on one machine")
    p.add_argument("--image-size", type=positive_int, default=32, help="images are resized to this if needed")
    p.add_argument("--train-per-class", type=positive_float, default=None,
                   help="N images per class (N >= 1) or a fraction of each class (0 < N < 1); default: the preset's")
    p.add_argument("--val-per-class", type=nonneg_int, default=None,
                   help="images per class carved out of the TRAINING split for validation / search")
    p.add_argument("--test-per-class", type=positive_int, default=None,
                   help="subset of the test split (default: all of it, 10,000 images on CIFAR-10)")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="independent runs (seeds, arms) trained at once in separate processes, 1 torch thread each "
                        "(default: the preset's). Results do not depend on it")
    p.add_argument("--out", default=None, help="results folder (default runs/<script>)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: the preset's, else torch's). On a CPU shared with other jobs use 1: "
                        "OpenMP threads waiting on busy cores made training steps up to 10x slower on a 2-core machine")
    return p


def apply_preset(args, preset):
    """Fill every flag left at None from `preset` (a flag you pass wins) and remember which values came from the
    preset in args.preset_keys, so that data_from_args may shrink a preset's counts to fit a small dataset."""
    args.preset_keys = sorted(k for k, v in preset.items() if getattr(args, k, None) is None)
    for k in args.preset_keys:
        setattr(args, k, preset[k])
    return args


def run_main(main, argv=None):
    """`if __name__ == "__main__": utils.run_main(main)`: an InputError becomes one line on stderr and exit 2."""
    try:
        return main(argv)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def get_device(name="auto"):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise InputError(f"--device {name!r} is not one of auto, cpu, cuda, mps")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name}: this machine has no CUDA GPU (or torch was built without CUDA); "
                         f"use --device cpu or --device auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise InputError("--device mps: Apple MPS is not available here; use --device cpu or --device auto")
    return torch.device(name)


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def reproduce_command():
    """The exact command line of this run, printed at start and stored in results.json."""
    return "python " + " ".join(sys.argv)


def start(args, script):
    """The first lines of every main(): print the command, set torch threads, pick the device, make the results
    folder. Returns (device, out_dir)."""
    print(reproduce_command(), flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = get_device(args.device)
    out = args.out or os.path.join("runs", script)
    os.makedirs(out, exist_ok=True)
    return device, out


# ------------------------------------------------------------------------------------------------ data

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

    @property
    def num_classes(self):
        return len(self.classes)


def _resize_square(img, size):
    """(3, h, w) uint8 -> (3, size, size) uint8: resize the shorter side, then centre crop."""
    _, h, w = img.shape
    if h == w == size:
        return img
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    img = F.interpolate(img[None].float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return img[:, top:top + size, left:left + size].round().clamp(0, 255).to(torch.uint8)


def _decode(path):
    """One image file -> (3, h, w) uint8. Grayscale and palette images become RGB; a broken file is named."""
    from PIL import Image  # pillow comes with torchvision; torchvision.io's decoders are deprecated since 0.29
    try:
        with Image.open(path) as im:
            return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)  # (3, h, w)
    except Exception as e:
        raise InputError(f"cannot read image {path} ({type(e).__name__}: {e}); delete or replace that file") from None


def _read_image_folder(split_dir, image_size, cache_dir):
    """Decode DIR/<class>/* once into a uint8 tensor and cache it (60k small JPEGs take ~20 s to decode)."""
    classes = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
    files = [(os.path.join(split_dir, c, f), i) for i, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(split_dir, c))) if not f.startswith(".")]
    if not files:
        raise InputError(f"{split_dir} has no images; expected {split_dir}/<class>/<image>")
    key = hashlib.sha1(f"{os.path.abspath(split_dir)}|{image_size}|{len(files)}|{files[-1][0]}".encode()).hexdigest()[:16]
    cache = os.path.join(cache_dir, f"{os.path.basename(split_dir.rstrip('/'))}_{image_size}_{key}.pt")
    if os.path.exists(cache):
        blob = torch.load(cache)
        return blob["x"], blob["y"], classes
    print(f"decoding {len(files)} images from {split_dir} (cached in {cache} for next time)", flush=True)
    x = torch.stack([_resize_square(_decode(f), image_size) for f, _ in files])
    y = torch.tensor([c for _, c in files], dtype=torch.long)
    os.makedirs(cache_dir, exist_ok=True)
    torch.save({"x": x, "y": y}, cache + f".tmp{os.getpid()}")
    os.replace(cache + f".tmp{os.getpid()}", cache)
    return x, y, classes


def _check_folder(data):
    """The ImageFolder layout, or an InputError that says what is missing. -> name of the test split."""
    if not os.path.isdir(data):
        raise InputError(f"--data {data!r} is not a directory; pass 'cifar10' to download, or a folder with "
                         f"train/<class>/ and test/<class>/ (e.g. --data ../shared/data/cifar10)")
    test_name = next((s for s in ("test", "val") if os.path.isdir(os.path.join(data, s))), None)
    if not os.path.isdir(os.path.join(data, "train")) or test_name is None:
        raise InputError(f"--data {data!r} must contain train/<class>/ and test/<class>/ (or val/<class>/) "
                         f"sub-folders in torchvision ImageFolder layout; found {sorted(os.listdir(data))}")
    dirs = {s: sorted(d for d in os.listdir(os.path.join(data, s)) if os.path.isdir(os.path.join(data, s, d)))
            for s in ("train", test_name)}
    if len(dirs["train"]) < 2:
        raise InputError(f"{os.path.join(data, 'train')} has {len(dirs['train'])} class folder(s); a classifier needs "
                         f">= 2, as train/<class>/<image>")
    if dirs["train"] != dirs[test_name]:
        only_tr, only_te = set(dirs["train"]) - set(dirs[test_name]), set(dirs[test_name]) - set(dirs["train"])
        raise InputError(f"train/ and {test_name}/ must have the same class folders: only in train/ {sorted(only_tr)}, "
                         f"only in {test_name}/ {sorted(only_te)}")
    return test_name


def _per_class_subset(y, n, generator):
    """Indices of a stratified random subset: n per class (int) or a fraction of each class (0 < n < 1)."""
    keep = []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        keep.append(idx[:round(n * len(idx)) if n < 1 else int(n)])
    return torch.cat(keep).sort().values


def _fit_counts(y_tr, y_te, counts, fit):
    """Check the per-class counts against the smallest class. Counts named in `fit` (a preset's) are shrunk to what
    exists, with one printed line; a count the user asked for that does not fit is an InputError."""
    n_tr, n_te = int(torch.bincount(y_tr).min()), int(torch.bincount(y_te).min())
    counts, notes = dict(counts), []
    val, tr, te = counts["val_per_class"] or 0, counts["train_per_class"], counts["test_per_class"]
    if val and val > n_tr // 2 and "val_per_class" in fit:  # a shrunk validation set keeps half of each class to train on
        counts["val_per_class"], val = n_tr // 2, n_tr // 2
        notes.append(f"--val-per-class -> {val}")
    if val >= n_tr:
        raise InputError(f"--val-per-class {val} leaves no training images: the smallest class has {n_tr}; use fewer")
    if tr is not None and tr >= 1 and tr > n_tr - val:
        if "train_per_class" not in fit:
            raise InputError(f"--train-per-class {tr:g} is more than the {n_tr - val} images per class left after "
                             f"--val-per-class {val} (smallest class: {n_tr}); use at most {n_tr - val}")
        counts["train_per_class"] = n_tr - val
        notes.append(f"--train-per-class -> {n_tr - val}")
    if te is not None and te > n_te:
        if "test_per_class" not in fit:
            raise InputError(f"--test-per-class {te} is more than the {n_te} test images of the smallest class; "
                             f"use at most {n_te}")
        counts["test_per_class"] = n_te
        notes.append(f"--test-per-class -> {n_te}")
    if notes:
        print(f"note: this dataset is smaller than the preset (smallest class: {n_tr} train / {n_te} test images), "
              f"so the preset uses what exists: {', '.join(notes)}", flush=True)
    return counts


def _channel_stats(x):
    """Per-channel mean and std in [0, 1] of uint8 images (N, 3, H, W), in chunks so memory stays small."""
    s = s2 = torch.zeros(x.shape[1], dtype=torch.float64)
    for chunk in x.split(4096):
        c = chunk.to(torch.float64) / 255
        s, s2 = s + c.sum((0, 2, 3)), s2 + (c * c).sum((0, 2, 3))
    n = x.numel() / x.shape[1]
    mean = s / n
    return tuple(mean.tolist()), tuple((s2 / n - mean ** 2).clamp_min(1e-12).sqrt().tolist())


def load_data(data="cifar10", *, image_size=32, train_per_class=None, val_per_class=0, test_per_class=None,
              seed=0, cache_dir=None, fit=()):
    """Returns a Data with uint8 (N, 3, S, S) images. Subsets are stratified and seeded (same seed, same images).
    Validation images are carved out of the training split first; training images come from what is left.
    `fit`: names of the counts that may be shrunk to fit a small dataset (the preset's, see apply_preset)."""
    cache_dir = cache_dir or os.environ.get("CMA_CACHE", os.path.expanduser("~/.cache/conv-meets-attention"))
    if data in ("cifar10", "cifar100"):
        import torchvision
        ds_cls = torchvision.datasets.CIFAR10 if data == "cifar10" else torchvision.datasets.CIFAR100
        try:
            tr, te = (ds_cls("./data", train=t, download=True) for t in (True, False))
        except Exception as e:  # offline, proxy, ...
            raise InputError(f"could not download {data} into ./data ({type(e).__name__}: {e}); if you are offline, "
                             f"pass --data DIR with an ImageFolder copy (DIR/train/<class>/*.jpg, DIR/test/<class>/*.jpg), "
                             f"e.g. --data ../shared/data/cifar10") from None
        to_t = lambda ds: (torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets))
        (x_tr, y_tr), (x_te, y_te), classes = to_t(tr), to_t(te), tr.classes
        if image_size != 32:
            x_tr, x_te = (torch.stack([_resize_square(im, image_size) for im in x]) for x in (x_tr, x_te))
    else:
        test_name = _check_folder(data)
        x_tr, y_tr, classes = _read_image_folder(os.path.join(data, "train"), image_size, cache_dir)
        x_te, y_te, _ = _read_image_folder(os.path.join(data, test_name), image_size, cache_dir)
    counts = _fit_counts(y_tr, y_te, dict(train_per_class=train_per_class, val_per_class=val_per_class,
                                          test_per_class=test_per_class), fit)
    g = torch.Generator().manual_seed(seed)
    val_n = counts["val_per_class"] or 0
    val = _per_class_subset(y_tr, val_n, g) if val_n else torch.empty(0, dtype=torch.long)
    rest = torch.ones(len(y_tr), dtype=torch.bool)
    rest[val] = False  # validation images are removed from the training pool
    rest = torch.nonzero(rest).flatten()
    if counts["train_per_class"] is not None:
        rest = rest[_per_class_subset(y_tr[rest], counts["train_per_class"], g)]
    if counts["test_per_class"] is not None:
        keep = _per_class_subset(y_te, counts["test_per_class"], g)
        x_te, y_te = x_te[keep], y_te[keep]
    # CIFAR-10's usual constants for the torchvision copy; any other dataset is normalised by its own statistics
    mean, std = (CIFAR_MEAN, CIFAR_STD) if data == "cifar10" else _channel_stats(x_tr)
    return Data(x_tr[rest], y_tr[rest], x_tr[val], y_tr[val], x_te, y_te, list(classes), mean, std)


def data_from_args(args, seed=None):
    """load_data with the common flags (see add_common_args); counts that came from a preset fit small datasets."""
    tpc = args.train_per_class
    return load_data(args.data, image_size=args.image_size, seed=args.seed if seed is None else seed,
                     train_per_class=int(tpc) if tpc is not None and tpc >= 1 else tpc,
                     val_per_class=args.val_per_class or 0, test_per_class=args.test_per_class,
                     fit=set(getattr(args, "preset_keys", ())) & set(COUNT_FLAGS))


class DeviceLoader:
    """Keeps the whole uint8 dataset on the device and augments there, one batch at a time (airbench's idea):
    no worker processes, no per-image Python. Training batches get random crop (zero pad 4) + horizontal flip.
    Shuffling and augmentation draw from the loader's own generator, which `reset()` (called by `train`) puts back
    to `seed`: two runs with the same seed see the same batches, whatever ran before them."""

    def __init__(self, x, y, *, batch_size, device, train, mean=CIFAR_MEAN, std=CIFAR_STD, pad=4, seed=0):
        assert x.dtype == torch.uint8 and x.ndim == 4, f"expected uint8 (N, C, H, W) images, got {x.dtype} {tuple(x.shape)}"
        if len(x) == 0:
            raise InputError("an empty image set reached a loader: check --train-per-class / --val-per-class")
        self.x, self.y = x.to(device), y.to(device)
        self.batch_size, self.train, self.pad, self.device, self.seed = min(batch_size, len(x)), train, pad, device, seed
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255
        self.g = torch.Generator(device=device)
        self.reset()

    def reset(self):
        self.g.manual_seed(self.seed)
        return self

    def __len__(self):
        n = len(self.x) // self.batch_size if self.train else math.ceil(len(self.x) / self.batch_size)
        return max(n, 1)

    def augment(self, x):
        B, _, H, W = x.shape
        p = self.pad
        xp = F.pad(x, (p, p, p, p))  # (B, C, H+2p, W+2p), zeros
        dy = torch.randint(0, 2 * p + 1, (B, 1), device=x.device, generator=self.g)
        dx = torch.randint(0, 2 * p + 1, (B, 1), device=x.device, generator=self.g)
        rows = (dy + torch.arange(H, device=x.device))[:, :, None]  # (B, H, 1)
        cols = (dx + torch.arange(W, device=x.device))[:, None, :]  # (B, 1, W)
        x = xp.permute(0, 2, 3, 1)[torch.arange(B, device=x.device)[:, None, None], rows, cols]  # (B, H, W, C)
        x = x.permute(0, 3, 1, 2)
        flip = torch.rand(B, device=x.device, generator=self.g) < 0.5
        return torch.where(flip[:, None, None, None], x.flip(3), x)

    def __iter__(self):
        n = len(self.x)
        order = torch.randperm(n, device=self.device, generator=self.g) if self.train else torch.arange(n, device=self.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.x[idx].float()
            if self.train:
                x = self.augment(x)
            yield (x - self.mean) / self.std, self.y[idx]


def make_loaders(data, *, batch_size, device, seed, eval_batch_size=500):
    """Fresh loaders for one run: (train, val or None, test). The training loader is seeded with `seed`."""
    kw = dict(device=device, mean=data.mean, std=data.std)
    train = DeviceLoader(data.x_train, data.y_train, batch_size=batch_size, train=True, seed=seed, **kw)
    val = DeviceLoader(data.x_val, data.y_val, batch_size=eval_batch_size, train=False, **kw) if len(data.y_val) else None
    test = DeviceLoader(data.x_test, data.y_test, batch_size=eval_batch_size, train=False, **kw)
    return train, val, test


# ------------------------------------------------------------------------------------------------ train / eval

FORCE_AUTOCAST = False  # tests set this to run the bf16 mixed-precision path on a CPU


def autocast(device):
    """bf16 autocast on CUDA (fast tensor cores); a no-op elsewhere so CPU numbers stay exact float32."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" or FORCE_AUTOCAST)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Score(NamedTuple):
    acc: float  # top-1 accuracy, %
    nll: float  # mean negative log-likelihood (cross-entropy, no label smoothing), nats per image


@torch.no_grad()
def evaluate(model, loader, forward=None):
    """Score(acc %, nll) of `forward(model, x)` (default model(x)) over a non-shuffled loader. The NLL is far less
    noisy than accuracy, so comparisons report both."""
    was_training = model.training
    model.eval()
    correct = total = 0
    nll = 0.0
    for x, y in loader:
        with autocast(loader.device):
            logits = forward(model, x) if forward else model(x)
        correct += (logits.argmax(-1) == y).sum().item()
        nll += F.cross_entropy(logits.float(), y, reduction="sum").item()
        total += len(y)
    model.train(was_training)
    return Score(100.0 * correct / total, nll / total)


# Weight decay pulls weights towards 0. That is a prior for weight matrices and kernels only: biases and norm scales
# (1-D) set offsets and scales, and class tokens, position embeddings and relative-position tables are embeddings
# that decay would just shrink. The official ConViT / DeiT / AutoFormer recipes exempt exactly these (timm's
# `no_weight_decay()`); we exempt them by name, and a model may list more names in its own `no_weight_decay()`.
NO_DECAY = re.compile(r"(^|\.)(cls_token|pos_embed|rel\w*|key_rel\w*|pos_v)($|\.)")


def param_groups(model, weight_decay):
    """AdamW/SGD parameter groups: decay on weight matrices and kernels, none on everything NO_DECAY names."""
    extra = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or NO_DECAY.search(name) or any(e in name for e in extra)
        (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(model, train_loader, *, epochs, lr, weight_decay=0.05, optimizer="adamw", momentum=0.9,
          warmup_epochs=1.0, label_smoothing=0.1, grad_clip=1.0, eval_loader=None, step_fn=None,
          eval_fn=None, log=print, name=""):
    """Train `model` and return its history: one dict per epoch. The loader is reset to its seed first.

    step_fn(model, x, y) -> (loss, logits) may replace the default forward + cross-entropy + backward; it must call
    backward itself (weight-sharing supernets accumulate several backward passes per step). The loop owns the
    rest: zero_grad, clipping, optimizer and the learning-rate schedule (linear warmup, then cosine to zero)."""
    device = train_loader.device
    params = [p for p in model.parameters() if p.requires_grad]
    groups = param_groups(model, weight_decay)
    if optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=lr)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)
    else:
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
    total, warmup = epochs * len(train_loader), int(warmup_epochs * len(train_loader))
    schedule = lambda s: (s + 1) / max(warmup, 1) if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(total - warmup, 1)))
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
        t_epoch, data_time, loss_sum, correct, seen = time.time(), 0.0, 0.0, 0, 0
        it = iter(train_loader)
        while True:
            t_data = time.time()
            try:
                x, y = next(it)
            except StopIteration:
                break
            _sync(device)
            data_time += time.time() - t_data
            opt.zero_grad(set_to_none=True)
            loss, logits = step_fn(model, x, y)
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(-1) == y).sum().item()
            seen += len(y)
        train_time = time.time() - t_epoch
        rec = {"epoch": epoch, "loss": loss_sum / seen, "train_acc": 100.0 * correct / seen,
               "img_per_s": seen / train_time, "data_frac": data_time / train_time}
        if eval_loader is not None or eval_fn is not None:
            score = eval_fn(model) if eval_fn else evaluate(model, eval_loader)
            rec["test_acc"], rec["test_nll"] = (score.acc, score.nll) if isinstance(score, Score) else (score, None)
        rec["elapsed_s"] = time.time() - t0
        history.append(rec)
        eta = rec["elapsed_s"] / epoch * (epochs - epoch)
        acc = f" test {rec['test_acc']:5.1f}%" if "test_acc" in rec else ""
        log(f"{name}epoch {epoch:3d}/{epochs} loss {rec['loss']:.3f} train {rec['train_acc']:5.1f}%{acc} "
            f"| {rec['img_per_s']:6.0f} img/s (data {100 * rec['data_frac']:.0f}%) | {rec['elapsed_s']:6.1f}s eta {eta:5.0f}s")
    return history


def copy_shared_init(src, dst):
    """Paired arms: give `dst` the initial value of every parameter and buffer that `src` has under the same name
    and shape (e.g. ConViT's MLPs from DeiT's), so the two arms differ only where their architectures differ.
    Returns the names copied."""
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
    """[fn(*job) for job in jobs], with `workers` > 1 running them in that many fresh processes at once.

    Each job must seed everything it uses (data subset, init, batches), so its result does not depend on which
    process ran it or what ran before. `fn` must be a module-level function and jobs and results picklable (return
    numbers or CPU state_dicts, not models). Processes are spawned, not forked: forking after torch has started its
    thread pools can deadlock."""
    if workers <= 1 or len(jobs) <= 1:
        return [fn(*job) for job in jobs]
    import concurrent.futures
    import multiprocessing
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as ex:
        return list(ex.map(_run_job, [fn] * len(jobs), jobs, [threads] * len(jobs)))


# ------------------------------------------------------------------------------------------------ statistics

# two-sided 95% quantiles of Student's t, by degrees of freedom (between two rows we take the smaller df: wider)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086,
       21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042,
       40: 2.021, 60: 2.000, 120: 1.980}


def t95(df):
    return T95[max(k for k in T95 if k <= df)] if df <= 120 else 1.960


def mean_ci(xs):
    """(mean, low, high): the 95% t-interval of the mean of independent values xs; low = high = nan when n < 2."""
    xs = [float(x) for x in xs]
    n, m = len(xs), sum(xs) / len(xs)
    if n < 2:
        return m, float("nan"), float("nan")
    half = t95(n - 1) * math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)
    return m, m - half, m + half


def _signed(v, digits):
    return f"{v:+.{digits}f}".replace("-", "\u2212")


def compare_paired(a, b, *, name_a, name_b, unit="points", digits=1, higher_is_better=True, bound=1.0,
                   pairs="paired seeds", log=print):
    """The one verdict wording of this repository. a[i] and b[i] are one metric of arms A and B from the same
    seed (same data, batches and shared initial weights), so the difference cancels most seed noise. Prints and
    returns a dict with the mean difference A - B, its 95% t-interval, n and the verdict:
      "<A> better" / "<B> better"      the interval excludes 0 (shown);
      "... equivalent within +-bound"  the interval includes 0 and lies inside [-bound, +bound] (bounded);
      "not decided at this budget"     anything else: the design cannot tell.
    higher_is_better=False for losses such as NLL."""
    assert len(a) == len(b) and len(a) >= 1, f"need the same number (>= 1) of paired values, got {len(a)} and {len(b)}"
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
        verdict = f"no difference detected; not decided at this budget (interval wider than \u00b1{bound:g} {unit})"
    ci = f"95% CI [{_signed(lo, digits)}, {_signed(hi, digits)}]" if n > 1 else "no CI"
    line = f"{name_a} \u2212 {name_b} = {_signed(m, digits)} {unit}, {ci}, n={n} {pairs} \u2192 {verdict}"
    if log:
        log(line)
    return {"a": name_a, "b": name_b, "unit": unit, "diff": m, "ci": [lo, hi], "n": n, "verdict": verdict,
            "line": line, "per_pair": d}


def kendall_tau(a, b):
    """Kendall's tau-b rank correlation of two equally long sequences (ties counted, as scipy does):
    (concordant - discordant pairs) / sqrt(pairs not tied in a * pairs not tied in b). O(n^2) memory."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    assert len(a) == len(b) >= 2, "kendall_tau needs two sequences of the same length >= 2"
    i, j = np.triu_indices(len(a), 1)                      # every pair i < j once
    sa, sb = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])    # (pairs,) +1 / -1 / 0 for a tie
    denom = math.sqrt(float((sa != 0).sum()) * float((sb != 0).sum()))
    return float((sa * sb).sum() / denom) if denom else float("nan")


def bootstrap_ci(stat, *samples, n_boot=2000, seed=0):
    """(value, low, high): stat(*samples) and its 95% percentile-bootstrap interval, resampling the rows
    (the same indices in every sample, so pairs stay pairs)."""
    g = np.random.default_rng(seed)
    n = len(samples[0])
    vals = []
    for _ in range(n_boot):
        idx = g.integers(0, n, n)
        v = stat(*[[s[i] for i in idx] for s in samples])
        if not math.isnan(v):
            vals.append(v)
    lo, hi = np.percentile(vals, [2.5, 97.5]) if vals else (float("nan"), float("nan"))
    return stat(*samples), float(lo), float(hi)


# ------------------------------------------------------------------------------------------------ measure

def count_params(model):
    return sum(p.numel() for p in model.parameters())


def count_flops(model, input_shape, device="cpu"):
    """Forward FLOPs of one input of `input_shape` (C, H, W), counted by torch's FlopCounterMode (1 MAC = 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(torch.zeros(1, *input_shape, device=device))
    model.train(was_training)
    return fc.get_total_flops()


def measure_step(model, input_shape, *, batch_size=128, num_classes=10, steps=5, warmup=2, device="cpu", forward=None):
    """Train-step throughput (img/s: forward + backward, no optimizer) and memory in MB.
    Memory is the CUDA peak on a GPU; elsewhere the bytes autograd saves for backward (the activations), which is
    what dominates a training step's memory and is the same on every device.
    Runs on a copy: training steps on random inputs would overwrite a trained model's BatchNorm statistics."""
    device = torch.device(device)
    forward = forward or (lambda m, x: m(x))
    model = copy.deepcopy(model)
    x = torch.randn(batch_size, *input_shape, device=device)
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    model.train()
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0, saved[0] = time.time(), 0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(device):
            loss = F.cross_entropy(forward(model, x).float(), y)
        loss.backward()
        model.zero_grad(set_to_none=True)
    _sync(device)
    img_s = steps * batch_size / (time.time() - t0)
    mem = torch.cuda.max_memory_allocated() if device.type == "cuda" else saved[0] / steps
    return img_s, mem / 2**20


# ------------------------------------------------------------------------------------------------ results

def save_results(path, config, metrics):
    """Write {config, metrics, environment} as JSON atomically (temp file + rename: a killed run never leaves half a file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    blob = {"command": reproduce_command(), "config": config, "metrics": metrics, "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()} threads",
            "wall_time_s": round(time.time() - _START, 1), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(blob, f, indent=2, default=str)
    os.replace(tmp, path)
    return path
