"""Shared plumbing for the numbered scripts: device, seed, data, train/eval loop, params/FLOPs, results.

Nothing here knows about any one paper. Each script reads top to bottom on its own and only calls:
    add_common_args(parser)           --data/--device/--seed/--*-per-class/--image-size flags
    get_device(name), set_seed(seed)
    load_data(...) -> Data            uint8 images + labels for train / val / test
    DeviceLoader(...)                 whole dataset on the device; crop+flip+normalise per batch there
    train(...), evaluate(...)         AdamW/SGD, warmup+cosine, label smoothing, clipping, bf16 on CUDA
    count_params, count_flops, measure_step   params, FLOPs (FlopCounterMode), img/s and memory
    save_results(path, config, metrics)       atomic JSON under runs/<script>/
"""
import copy
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

_START = time.time()
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

# ------------------------------------------------------------------------------------------------ setup

def add_common_args(p):
    """The flags every script shares, so `--help` reads the same everywhere."""
    p.add_argument("--data", default="cifar10",
                   help="'cifar10' / 'cifar100' (torchvision download into ./data) or a directory in "
                        "ImageFolder layout: DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg "
                        "(offline copy: --data ../shared/data/cifar10)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cuda, mps or cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=32, help="images are resized to this if needed")
    p.add_argument("--train-per-class", type=float, default=None,
                   help="N images per class (N >= 1) or a fraction of each class (0 < N < 1); default all")
    p.add_argument("--val-per-class", type=int, default=0,
                   help="images per class carved out of the TRAINING split for validation / search")
    p.add_argument("--test-per-class", type=int, default=None, help="subset of the test split (default all)")
    p.add_argument("--out", default=None, help="results folder (default runs/<script>)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the preset's, else torch's). On a CPU shared with other jobs use 1: "
                        "OpenMP threads waiting on busy cores made training steps up to 10x slower on a 2-core machine")
    return p


def get_device(name="auto"):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def reproduce_command():
    """The exact command line of this run, printed at start and stored in results.json."""
    return "python " + " ".join(sys.argv)


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
    mean: tuple = CIFAR_MEAN
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


def _read_image_folder(split_dir, image_size, cache_dir):
    """Decode DIR/<class>/* once into a uint8 tensor and cache it (60k small JPEGs take ~10 s to decode)."""
    from PIL import Image  # pillow comes with torchvision; torchvision.io's decoders are deprecated since 0.29
    classes = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
    if not classes:
        raise FileNotFoundError(f"{split_dir} has no class sub-folders; expected {split_dir}/<class>/<image>")
    files = [(os.path.join(split_dir, c, f), i) for i, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(split_dir, c)))]
    key = hashlib.sha1(f"{os.path.abspath(split_dir)}|{image_size}|{len(files)}|{files[-1][0]}".encode()).hexdigest()[:16]
    cache = os.path.join(cache_dir, f"{os.path.basename(split_dir.rstrip('/'))}_{image_size}_{key}.pt")
    if os.path.exists(cache):
        blob = torch.load(cache)
        return blob["x"], blob["y"], classes
    print(f"decoding {len(files)} images from {split_dir} (cached in {cache} for next time)")
    decode = lambda f: torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1)  # (3, h, w) uint8
    x = torch.stack([_resize_square(decode(f), image_size) for f, _ in files])
    y = torch.tensor([c for _, c in files], dtype=torch.long)
    os.makedirs(cache_dir, exist_ok=True)
    torch.save({"x": x, "y": y}, cache + ".tmp")
    os.replace(cache + ".tmp", cache)
    return x, y, classes


def _per_class_subset(y, n, generator):
    """Indices of a stratified random subset: n per class (int) or a fraction of each class (0 < n < 1)."""
    keep = []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        k = round(n * len(idx)) if n < 1 else int(n)
        if k > len(idx):
            raise ValueError(f"asked for {k} images of class {int(c)} but only {len(idx)} are left; use a smaller value")
        keep.append(idx[:k])
    return torch.cat(keep).sort().values


def load_data(data="cifar10", *, image_size=32, train_per_class=None, val_per_class=0, test_per_class=None,
              seed=0, cache_dir=None):
    """Returns a Data with uint8 (N, 3, S, S) images. Subsets are stratified and seeded (same seed, same images)."""
    cache_dir = cache_dir or os.environ.get("CMA_CACHE", os.path.expanduser("~/.cache/conv-meets-attention"))
    if data in ("cifar10", "cifar100"):
        import torchvision
        ds_cls = torchvision.datasets.CIFAR10 if data == "cifar10" else torchvision.datasets.CIFAR100
        try:
            tr, te = (ds_cls("./data", train=t, download=True) for t in (True, False))
        except Exception as e:  # offline, proxy, ...
            raise RuntimeError(f"could not download {data} into ./data ({type(e).__name__}: {e}). If you are offline, "
                               f"pass --data DIR with an ImageFolder copy (DIR/train/<class>/*.jpg, DIR/test/<class>/*.jpg), "
                               f"e.g. --data ../shared/data/cifar10") from e
        to_t = lambda ds: (torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets))
        (x_tr, y_tr), (x_te, y_te), classes = to_t(tr), to_t(te), tr.classes
        if image_size != 32:
            x_tr, x_te = (torch.stack([_resize_square(im, image_size) for im in x]) for x in (x_tr, x_te))
    else:
        if not os.path.isdir(data):
            raise FileNotFoundError(f"--data {data!r} is not a directory. Pass 'cifar10' to download, or a folder "
                                    f"with train/<class>/ and test/<class>/ (e.g. --data ../shared/data/cifar10)")
        test_name = next((s for s in ("test", "val") if os.path.isdir(os.path.join(data, s))), None)
        if not os.path.isdir(os.path.join(data, "train")) or test_name is None:
            raise FileNotFoundError(f"{data!r} must contain train/<class>/ and test/<class>/ (or val/<class>/) "
                                    f"sub-folders in torchvision ImageFolder layout; found {sorted(os.listdir(data))}")
        x_tr, y_tr, classes = _read_image_folder(os.path.join(data, "train"), image_size, cache_dir)
        x_te, y_te, test_classes = _read_image_folder(os.path.join(data, test_name), image_size, cache_dir)
        assert test_classes == classes, f"train/ and {test_name}/ have different classes: {classes} vs {test_classes}"
    g = torch.Generator().manual_seed(seed)
    val = _per_class_subset(y_tr, val_per_class, g) if val_per_class else torch.empty(0, dtype=torch.long)
    rest = torch.ones(len(y_tr), dtype=torch.bool)
    rest[val] = False  # validation images are removed from the training pool
    rest = torch.nonzero(rest).flatten()
    if train_per_class is not None:
        rest = rest[_per_class_subset(y_tr[rest], train_per_class, g)]
    if test_per_class is not None:
        te = _per_class_subset(y_te, test_per_class, g)
        x_te, y_te = x_te[te], y_te[te]
    return Data(x_tr[rest], y_tr[rest], x_tr[val], y_tr[val], x_te, y_te, list(classes))


def data_from_args(args, seed=None):
    """load_data with the common flags (see add_common_args)."""
    tpc = args.train_per_class
    return load_data(args.data, image_size=args.image_size, seed=args.seed if seed is None else seed,
                     train_per_class=int(tpc) if tpc is not None and tpc >= 1 else tpc,
                     val_per_class=args.val_per_class, test_per_class=args.test_per_class)


class DeviceLoader:
    """Keeps the whole uint8 dataset on the device and augments there, one batch at a time (airbench's idea):
    no worker processes, no per-image Python. Training batches get random crop (zero pad 4) + horizontal flip."""

    def __init__(self, x, y, *, batch_size, device, train, mean=CIFAR_MEAN, std=CIFAR_STD, pad=4, seed=0):
        assert x.dtype == torch.uint8 and x.ndim == 4, f"expected uint8 (N, C, H, W) images, got {x.dtype} {tuple(x.shape)}"
        assert len(x) > 0, "empty dataset: check --train-per-class / --val-per-class"
        self.x, self.y = x.to(device), y.to(device)
        self.batch_size, self.train, self.pad, self.device = batch_size, train, pad, device
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255
        self.g = torch.Generator(device=device).manual_seed(seed)

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


# ------------------------------------------------------------------------------------------------ train / eval

def autocast(device):
    """bf16 autocast on CUDA (fast tensor cores); a no-op elsewhere so CPU numbers stay exact float32."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def evaluate(model, loader, forward=None):
    """Top-1 accuracy (%) of `forward(model, x)` (default model(x)) over a non-shuffled loader."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        with autocast(loader.device):
            logits = forward(model, x) if forward else model(x)
        correct += (logits.argmax(-1) == y).sum().item()
        total += len(y)
    model.train(was_training)
    return 100.0 * correct / total


def train(model, train_loader, *, epochs, lr, weight_decay=0.05, optimizer="adamw", momentum=0.9,
          warmup_epochs=1.0, label_smoothing=0.1, grad_clip=1.0, eval_loader=None, step_fn=None,
          eval_fn=None, log=print, name=""):
    """Train `model` and return its history: one dict per epoch.

    step_fn(model, x, y) -> (loss, logits) may replace the default forward + cross-entropy + backward; it must call
    backward itself (weight-sharing supernets accumulate several backward passes per step). The loop owns the
    rest: zero_grad, clipping, optimizer and the learning-rate schedule (linear warmup, then cosine to zero)."""
    device = train_loader.device
    params = [p for p in model.parameters() if p.requires_grad]
    # no weight decay on biases, norms, embeddings' scalars: only on matrices/kernels (the usual ViT/ResNet recipe)
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
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
            rec["test_acc"] = eval_fn(model) if eval_fn else evaluate(model, eval_loader)
        rec["elapsed_s"] = time.time() - t0
        history.append(rec)
        eta = rec["elapsed_s"] / epoch * (epochs - epoch)
        acc = f" test {rec['test_acc']:5.1f}%" if "test_acc" in rec else ""
        log(f"{name}epoch {epoch:3d}/{epochs} loss {rec['loss']:.3f} train {rec['train_acc']:5.1f}%{acc} "
            f"| {rec['img_per_s']:6.0f} img/s (data {100 * rec['data_frac']:.0f}%) | {rec['elapsed_s']:6.1f}s eta {eta:5.0f}s")
    return history


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
