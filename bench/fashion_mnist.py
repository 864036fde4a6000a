"""Fashion-MNIST on a small ResNet: the data and model half of the classifier benchmark track.

Importable (``find_data``, ``load_split``, ``loaders``, ``SmallResNet``, ``train``, ``evaluate``) and a tiny CLI
that trains the dense model from scratch on the CPU and prints steps, seconds and top-1::

    python bench/fashion_mnist.py --steps 1500 --batch 128 [--data DIR]

The data are the four gzip IDX files of Debian's ``dataset-fashion-mnist`` package. ``find_data`` looks for them
in an explicit folder, ``$FASHION_MNIST_DIR``, the package's install folder, and a per-user cache it fills from
the package's ``.deb`` when apt has downloaded it but not installed it.
"""

from __future__ import annotations

import argparse
import gzip
import io
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
ALL_FILES = tuple(name for pair in FILES.values() for name in pair)
ENV_VAR = "FASHION_MNIST_DIR"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # where Debian's dataset-fashion-mnist installs them
APT_ARCHIVES = Path("/var/cache/apt/archives")  # where apt keeps the .deb files it downloaded
DEB_GLOB = "dataset-fashion-mnist_*_all.deb"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MEAN, STD = 0.2860, 0.3530  # of the training images scaled to [0, 1]

IMAGE_MAGIC, LABEL_MAGIC = 0x00000803, 0x00000801  # IDX: two zero bytes, type 0x08 (unsigned byte), ndim


class DataError(ValueError):
    """A data file that is missing, corrupt or not what it should be; the message names the file."""


# --------------------------------------------------------------------------------------------------- finding data


def cache_dir() -> Path:
    """The per-user folder ``find_data`` fills from the ``.deb`` (``$XDG_CACHE_HOME`` or ``~/.cache``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "trt_prune" / "fashion-mnist"


def _missing(folder: Path) -> list[str]:
    return [name for name in ALL_FILES if not (folder / name).is_file()]


def _checked(folder: Path, source: str) -> Path:
    folder = Path(folder).expanduser()
    missing = _missing(folder)
    if missing:
        raise RuntimeError(f"Fashion-MNIST: {source} {folder} lacks {', '.join(missing)}")
    return folder


def find_data(data_dir: str | Path | None = None) -> Path:
    """The folder holding the four Fashion-MNIST IDX files.

    Looks, in order, in ``data_dir``, ``$FASHION_MNIST_DIR``, ``/usr/share/datasets/fashion-mnist`` and the cache
    (``~/.cache/trt_prune/fashion-mnist``), which is filled from a ``dataset-fashion-mnist_*_all.deb`` in apt's
    archive folder when there is one. A folder named explicitly (argument or variable) that lacks a file is an
    error rather than skipped.
    """
    if data_dir is not None:
        return _checked(Path(data_dir), "--data folder")
    if os.environ.get(ENV_VAR):
        return _checked(Path(os.environ[ENV_VAR]), f"${ENV_VAR} folder")
    if not _missing(SYSTEM_DIR):
        return SYSTEM_DIR
    cache = cache_dir()
    if not _missing(cache):
        return cache
    problems = []
    for deb in sorted(APT_ARCHIVES.glob(DEB_GLOB), key=lambda p: p.name, reverse=True):
        try:
            return extract_deb(deb, cache)
        except (OSError, RuntimeError, ValueError, tarfile.TarError, subprocess.SubprocessError) as e:
            problems.append(f"{deb.name}: {e}")
    hint = f" ({'; '.join(problems)})" if problems else ""
    raise RuntimeError(
        "Fashion-MNIST not found: run `apt install dataset-fashion-mnist` "
        f"or pass --data DIR (a folder holding {', '.join(ALL_FILES)}){hint}"
    )


def extract_deb(deb: str | Path, dest: str | Path, use_dpkg: bool | None = None) -> Path:
    """Unpack the four IDX files from the Debian package ``deb`` into ``dest`` and return ``dest``.

    Uses ``dpkg-deb -x`` when it is there (or ``use_dpkg`` is true), else reads the ``ar`` archive and its
    ``data.tar.*`` in Python. The files are unpacked into a temporary folder beside ``dest`` and each moved into
    place with an atomic rename, so a reader never sees a partly written file.
    """
    deb, dest = Path(deb), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if use_dpkg is None:
        use_dpkg = shutil.which("dpkg-deb") is not None
    with tempfile.TemporaryDirectory(prefix=".fashion-mnist-", dir=dest.parent) as tmp:
        tmp = Path(tmp)
        if use_dpkg:
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True, capture_output=True, timeout=600)
        else:
            _extract_deb_python(deb, tmp)
        found = {}
        for path in tmp.rglob("*.gz"):
            if path.name in ALL_FILES and path.parent.name == "fashion-mnist":
                found[path.name] = path
        missing = [name for name in ALL_FILES if name not in found]
        if missing:
            raise RuntimeError(f"{deb} holds no {', '.join(missing)}")
        dest.mkdir(parents=True, exist_ok=True)
        for name in ALL_FILES:
            os.replace(found[name], dest / name)
    return dest


def ar_members(data: bytes, source: str = "archive") -> Iterable[tuple[str, bytes]]:
    """The (name, content) of each member of a Unix ``ar`` archive (the container of a ``.deb``)."""
    if not data.startswith(b"!<arch>\n"):
        raise DataError(f"{source} is not an ar archive (no !<arch> header)")
    pos = 8
    while pos < len(data):
        header = data[pos : pos + 60]
        if len(header) < 60 or header[58:60] != b"`\n":
            raise DataError(f"{source}: bad ar member header at byte {pos}")
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError:
            raise DataError(f"{source}: bad ar member size at byte {pos}") from None
        start = pos + 60
        if start + size > len(data):
            raise DataError(f"{source}: ar member {name!r} is truncated")
        yield name, data[start : start + size]
        pos = start + size + (size & 1)  # members are padded to an even offset


def _extract_deb_python(deb: Path, dest: Path) -> None:
    data = deb.read_bytes()
    for name, content in ar_members(data, str(deb)):
        if name.startswith("data.tar"):
            if name.endswith(".zst"):
                raise RuntimeError(f"{deb}: {name} is zstd-compressed; install dpkg (dpkg-deb) to unpack it")
            with tarfile.open(fileobj=io.BytesIO(content), mode="r:*") as tar:
                for member in tar.getmembers():
                    base = member.name.rsplit("/", 1)[-1]
                    if member.isfile() and base in ALL_FILES and "/fashion-mnist/" in "/" + member.name:
                        src = tar.extractfile(member)
                        assert src is not None
                        (dest / "fashion-mnist").mkdir(exist_ok=True)
                        (dest / "fashion-mnist" / base).write_bytes(src.read())
            return
    raise RuntimeError(f"{deb} has no data.tar member")


# --------------------------------------------------------------------------------------------------- parsing IDX


def read_idx(path: str | Path, magic: int, shape_tail: tuple[int, ...] = ()) -> np.ndarray:
    """The uint8 array in the gzip IDX file ``path``, checking its magic number, its dimensions (the trailing ones
    must equal ``shape_tail``) and that the data are exactly as long as the header says."""
    path = Path(path)
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; a cut-off stream is an EOFError
        raise DataError(f"{path}: corrupt or truncated gzip ({e or type(e).__name__})") from None
    if len(raw) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(f"{path}: bad IDX magic number 0x{found:08x} (expected 0x{magic:08x})")
    ndim = magic & 0xFF
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if shape_tail and shape[1:] != tuple(shape_tail):
        raise DataError(f"{path}: IDX shape {shape}, expected [N, {', '.join(map(str, shape_tail))}]")
    expected = head + math.prod(shape)
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise DataError(f"{path}: {what}: {len(raw)} bytes, header {shape} needs {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(shape).copy()


def load_split(split: str, data_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The images (uint8 [N, 28, 28]) and labels (int64 [N]) of ``split`` ("train" or "test")."""
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    folder = find_data(data_dir)
    image_file, label_file = (folder / name for name in FILES[split])
    images = read_idx(image_file, IMAGE_MAGIC, (28, 28))
    labels = read_idx(label_file, LABEL_MAGIC)
    if len(images) != len(labels):
        raise DataError(f"{image_file} has {len(images)} images but {label_file} has {len(labels)} labels")
    if labels.size and labels.max() >= len(CLASSES):
        raise DataError(f"{label_file}: label {int(labels.max())} out of range 0..{len(CLASSES) - 1}")
    return images, labels.astype(np.int64)


def to_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Float images normalised to ``(x/255 - 0.2860) / 0.3530``, shape [N, 1, 28, 28], and int64 labels."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0).sub_(MEAN).div_(STD).unsqueeze(1)
    return x, torch.from_numpy(np.ascontiguousarray(labels)).long()


def loaders(
    batch_size: int = 128, data_dir: str | Path | None = None, train_limit: int | None = None, seed: int = 0
) -> tuple[DataLoader, DataLoader]:
    """(train, test) DataLoaders of normalised float images [B, 1, 28, 28] and int64 labels.

    The train loader shuffles with a generator seeded by ``seed`` (and drops a last partial batch, so batch norm
    never sees a batch of one); ``train_limit`` keeps the first that many training images. The test loader keeps
    the file's order. No worker processes.
    """
    train_x, train_y = load_split("train", data_dir)
    if train_limit is not None:
        train_x, train_y = train_x[:train_limit], train_y[:train_limit]
    test_x, test_y = load_split("test", data_dir)
    train_set = TensorDataset(*to_tensors(train_x, train_y))
    test_set = TensorDataset(*to_tensors(test_x, test_y))
    generator = torch.Generator().manual_seed(seed)
    train = DataLoader(
        train_set, batch_size=batch_size, shuffle=True, generator=generator, num_workers=0,
        drop_last=len(train_set) > batch_size,
    )
    test = DataLoader(test_set, batch_size=batch_size, shuffle=False, num_workers=0)
    return train, test


# --------------------------------------------------------------------------------------------------- model


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the input (through a 1x1 conv + BN when the shape changes), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet for 28x28 grey images: stem conv3x3(1->w0)+BN+ReLU, a stage of ``blocks[i]`` BasicBlocks of width
    ``widths[i]`` each (stride 2 at the start of every stage after the first: 28 -> 14 -> 7), global average
    pool, Linear."""

    def __init__(
        self, num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 64), blocks: tuple[int, ...] = (1, 1, 1)
    ):
        super().__init__()
        if len(widths) != len(blocks) or not widths or min(blocks) < 1:
            raise ValueError(f"widths {widths} and blocks {blocks} must be non-empty, equal length, blocks >= 1")
        self.stem = nn.Sequential(
            nn.Conv2d(1, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        stages = []
        cin = widths[0]
        for i, (width, count) in enumerate(zip(widths, blocks, strict=True)):
            layers = []
            for j in range(count):
                layers.append(BasicBlock(cin, width, stride=2 if i > 0 and j == 0 else 1))
                cin = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


# --------------------------------------------------------------------------------------------------- training


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            skip = isinstance(module, nn.modules.batchnorm._NormBase) or name == "bias" or p.ndim <= 1
            (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, steps: int, warmup: float = 0.15) -> float:
    """The learning-rate multiplier at ``step`` (0-based) of ``steps``: linear warm-up from 0.1 over the first
    ``warmup`` fraction, then a cosine down to 0 at the end (one-cycle shaped)."""
    w = max(1, int(round(warmup * steps)))
    if step < w:
        return 0.1 + 0.9 * (step + 1) / w
    t = (step - w + 1) / max(1, steps - w)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def _cycle(loader: Iterable):
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("train(): the loader yields no batches")


def train(
    model: nn.Module,
    loader: Iterable,
    steps: int,
    lr: float = 0.05,
    on_step: Callable[[int, float], None] | None = None,
    extra_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None,
    after_step: Callable[[int], None] | None = None,
    weight_decay: float = 5e-4,
    momentum: float = 0.9,
) -> dict:
    """Train ``model`` for ``steps`` optimizer steps over ``loader`` (restarted as often as needed).

    SGD with Nesterov momentum 0.9, weight decay 5e-4 on conv/linear weights only (not on batch norm or biases),
    the learning rate following :func:`lr_factor` (warm-up then cosine) times ``lr``, cross-entropy loss.

    Hooks: ``extra_loss(model, images, labels, logits)`` returns a tensor added to the loss (distillation, a
    penalty) or None; ``after_step(step)`` runs right after each optimizer step (a pruner re-applies its masks
    there); ``on_step(step, loss)`` gets the step's total loss as a float (progress, logging). Steps count from 0.
    Returns ``{"steps", "seconds", "loss_first", "loss_last"}`` (the total loss of the first and last step).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, not {steps}")
    device = next(model.parameters()).device
    optimizer = torch.optim.SGD(_param_groups(model, weight_decay), lr=lr, momentum=momentum, nesterov=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps))
    model.train()
    batches = _cycle(loader)
    loss_first = loss_last = float("nan")
    start = time.perf_counter()
    for step in range(steps):
        images, labels = next(batches)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        logits = model(images)
        loss = F.cross_entropy(logits, labels)
        if extra_loss is not None:
            extra = extra_loss(model, images, labels, logits)
            if extra is not None:
                loss = loss + extra
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if after_step is not None:
            after_step(step)
        loss_last = float(loss.detach())
        if step == 0:
            loss_first = loss_last
        if on_step is not None:
            on_step(step, loss_last)
    return {"steps": steps, "seconds": time.perf_counter() - start, "loss_first": loss_first, "loss_last": loss_last}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable) -> float:
    """Top-1 accuracy of ``model`` over ``loader``, in [0, 1], in eval mode (the previous mode is restored)."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    correct = total = 0
    try:
        for images, labels in loader:
            logits = model(images.to(device))
            correct += int((logits.argmax(1) == labels.to(device)).sum())
            total += len(labels)
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("evaluate(): the loader yields no samples")
    return correct / total


# --------------------------------------------------------------------------------------------------- CLI


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train SmallResNet dense on Fashion-MNIST from scratch; print top-1.")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--data", metavar="DIR", help="folder holding the four Fashion-MNIST .gz IDX files")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--widths", type=_ints, default=None, help="e.g. 32,64,128 (default: SmallResNet's)")
    p.add_argument("--blocks", type=_ints, default=None, help="e.g. 1,1,1 (default: SmallResNet's)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--save", metavar="FILE", help="save the trained state_dict here")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # tiny gradients late in training otherwise slow the CPU kernels down
    torch.manual_seed(args.seed)
    try:
        train_loader, test_loader = loaders(args.batch, args.data, args.train_limit, args.seed)
    except (RuntimeError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kwargs = {k: getattr(args, k) for k in ("widths", "blocks") if getattr(args, k) is not None}
    model = SmallResNet(**kwargs)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: SmallResNet {kwargs or 'default'} ({params:,} parameters), threads {args.threads}", flush=True)

    start = time.perf_counter()

    def progress(step: int, loss: float) -> None:
        if (step + 1) % max(1, args.steps // 10) == 0:
            print(f"  step {step + 1}/{args.steps} loss {loss:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)

    result = train(model, train_loader, args.steps, lr=args.lr, on_step=progress)
    t0 = time.perf_counter()
    top1 = evaluate(model, test_loader)
    eval_seconds = time.perf_counter() - t0
    if args.save:
        torch.save(model.state_dict(), args.save)
    print(f"steps: {result['steps']}")
    print(f"seconds: {result['seconds']:.1f} (train; {result['seconds'] / result['steps'] * 1000:.0f} ms/step)")
    print(f"top-1: {top1:.4f} (test, {eval_seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
