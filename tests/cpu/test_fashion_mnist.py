"""bench/fashion_mnist.py: IDX parsing, finding the data (folder, variable, .deb), the SmallResNet and its
train/evaluate loop, all on small synthetic data; one test reads the real test split when it is findable."""

from __future__ import annotations

import gzip
import importlib.util
import io
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

BENCH = Path(__file__).resolve().parents[2] / "bench" / "fashion_mnist.py"


def _load():
    spec = importlib.util.spec_from_file_location("fashion_mnist", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fashion_mnist", module)
    spec.loader.exec_module(module)
    return module


fm = _load()


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file's bytes for a uint8 array: magic 0x0000 0x08 ndim, big-endian dims, the data."""
    head = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return head + array.astype(np.uint8).tobytes()


def write_split(folder: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    image_name, label_name = fm.FILES[split]
    (folder / image_name).write_bytes(gzip.compress(idx_bytes(images)))
    (folder / label_name).write_bytes(gzip.compress(idx_bytes(labels)))


def fake_dataset(folder: Path, n_train: int = 6, n_test: int = 4, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    data = {
        split: (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8))
        for split, n in (("train", n_train), ("test", n_test))
    }
    folder.mkdir(parents=True, exist_ok=True)
    for split, (x, y) in data.items():
        write_split(folder, split, x, y)
    return data


@pytest.fixture
def nowhere(tmp_path, monkeypatch):
    """No data anywhere but where a test puts it: no variable, no system folder, an empty cache and apt archive."""
    monkeypatch.delenv(fm.ENV_VAR, raising=False)
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "system")
    monkeypatch.setattr(fm, "APT_ARCHIVES", tmp_path / "archives")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


# --------------------------------------------------------------------------------------------------- IDX


def test_load_split_parses_idx_shapes_values_and_dtypes(tmp_path):
    data = fake_dataset(tmp_path)
    for split, (x, y) in data.items():
        images, labels = fm.load_split(split, tmp_path)
        assert images.dtype == np.uint8 and images.shape == (len(x), 28, 28)
        assert labels.dtype == np.int64 and labels.shape == (len(y),)
        np.testing.assert_array_equal(images, x)
        np.testing.assert_array_equal(labels, y)


def test_bad_magic_number_names_the_file(tmp_path):
    fake_dataset(tmp_path)
    path = tmp_path / fm.FILES["train"][0]
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[2:4] = b"\x08\x01"  # says labels (1 dim) in the images file
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(fm.DataError, match=r"train-images-idx3-ubyte\.gz.*magic"):
        fm.load_split("train", tmp_path)


def test_truncated_data_names_the_file(tmp_path):
    fake_dataset(tmp_path)
    path = tmp_path / fm.FILES["test"][0]
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))  # a valid gzip whose IDX data are short
    with pytest.raises(fm.DataError, match=r"t10k-images-idx3-ubyte\.gz.*truncated"):
        fm.load_split("test", tmp_path)


def test_truncated_gzip_names_the_file(tmp_path):
    fake_dataset(tmp_path)
    path = tmp_path / fm.FILES["test"][1]
    path.write_bytes(path.read_bytes()[:20])  # the gzip stream itself is cut off
    with pytest.raises(fm.DataError, match=r"t10k-labels-idx1-ubyte\.gz.*(corrupt|truncated)"):
        fm.load_split("test", tmp_path)


def test_not_gzip_and_mismatched_counts_are_clear(tmp_path):
    fake_dataset(tmp_path)
    (tmp_path / fm.FILES["train"][1]).write_bytes(b"this is not gzip at all")
    with pytest.raises(fm.DataError, match=r"train-labels-idx1-ubyte\.gz"):
        fm.load_split("train", tmp_path)
    write_split(tmp_path, "train", np.zeros((3, 28, 28), np.uint8), np.zeros(2, np.uint8))
    with pytest.raises(fm.DataError, match="3 images but .* 2 labels"):
        fm.load_split("train", tmp_path)
    with pytest.raises(ValueError, match="split"):
        fm.load_split("validation", tmp_path)


def test_wrong_image_size_is_rejected(tmp_path):
    fake_dataset(tmp_path)
    write_split(tmp_path, "test", np.zeros((2, 32, 32), np.uint8), np.zeros(2, np.uint8))
    with pytest.raises(fm.DataError, match=r"t10k-images.*shape"):
        fm.load_split("test", tmp_path)


# --------------------------------------------------------------------------------------------------- find_data


def test_find_data_explicit_dir_and_variable(nowhere, monkeypatch):
    folder = nowhere / "mine"
    fake_dataset(folder)
    assert fm.find_data(folder) == folder
    assert fm.find_data(str(folder)) == folder
    monkeypatch.setenv(fm.ENV_VAR, str(folder))
    assert fm.find_data() == folder
    (folder / fm.FILES["test"][1]).unlink()
    with pytest.raises(RuntimeError, match="t10k-labels-idx1-ubyte.gz"):
        fm.find_data(folder)  # a folder named explicitly that lacks a file is an error, not skipped


def test_find_data_system_folder(nowhere):
    fake_dataset(fm.SYSTEM_DIR)
    assert fm.find_data() == fm.SYSTEM_DIR


def test_find_data_nothing_found_says_what_to_do(nowhere):
    with pytest.raises(RuntimeError) as info:
        fm.find_data()
    message = str(info.value)
    assert "\n" not in message
    assert "apt install dataset-fashion-mnist" in message and "--data DIR" in message


def make_deb(path: Path, files: dict[str, bytes]) -> Path:
    """A minimal Debian package: an ar archive of debian-binary, control.tar.gz and data.tar.xz."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(f"./usr/share/datasets/fashion-mnist/{name}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    control = io.BytesIO()
    with tarfile.open(fileobj=control, mode="w:gz") as tar:
        body = b"Package: dataset-fashion-mnist\nVersion: 0\nArchitecture: all\n"
        info = tarfile.TarInfo("./control")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    out = bytearray(b"!<arch>\n")
    for name, content in (("debian-binary", b"2.0\n"), ("control.tar.gz", control.getvalue()),
                          ("data.tar.xz", data.getvalue())):
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(content):<10}".encode() + b"`\n"
        out += content + (b"\n" if len(content) % 2 else b"")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(out))
    return path


@pytest.mark.parametrize("use_dpkg", [False, True], ids=["python-ar", "dpkg-deb"])
def test_find_data_extracts_the_deb_into_the_cache(nowhere, monkeypatch, use_dpkg):
    if use_dpkg and shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed")
    if not use_dpkg:
        monkeypatch.setattr(fm.shutil, "which", lambda name: None)
    source = nowhere / "src"
    data = fake_dataset(source)
    files = {name: (source / name).read_bytes() for name in fm.ALL_FILES}
    make_deb(fm.APT_ARCHIVES / "dataset-fashion-mnist_0.0~git1-1_all.deb", files)
    found = fm.find_data()
    assert found == nowhere / "cache" / "trt_prune" / "fashion-mnist"
    assert sorted(p.name for p in found.iterdir()) == sorted(fm.ALL_FILES)  # no temp folder left inside
    assert [p.name for p in found.parent.iterdir()] == ["fashion-mnist"]
    images, labels = fm.load_split("test")
    np.testing.assert_array_equal(images, data["test"][0])
    assert fm.find_data() == found  # the second time straight from the cache


def test_a_deb_without_the_files_is_reported(nowhere, monkeypatch):
    monkeypatch.setattr(fm.shutil, "which", lambda name: None)
    make_deb(fm.APT_ARCHIVES / "dataset-fashion-mnist_0_all.deb", {"README": b"nothing here"})
    with pytest.raises(RuntimeError, match="apt install dataset-fashion-mnist.*holds no"):
        fm.find_data()


# --------------------------------------------------------------------------------------------------- loaders


def test_loaders_normalise_shuffle_with_seed_and_limit(nowhere):
    folder = nowhere / "data"
    data = fake_dataset(folder, n_train=10, n_test=5)
    train, test = fm.loaders(batch_size=4, data_dir=folder, train_limit=8, seed=3)
    x, y = next(iter(test))
    assert x.dtype == torch.float32 and x.shape == (4, 1, 28, 28) and y.dtype == torch.int64
    expected = (torch.from_numpy(data["test"][0][:4]).float() / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(x[:, 0], expected)
    first = [b[1].tolist() for b in train]
    assert len(train.dataset) == 8 and len(first) == 2
    again = [b[1].tolist() for b in fm.loaders(batch_size=4, data_dir=folder, train_limit=8, seed=3)[0]]
    assert first == again
    assert sorted(sum(first, [])) == sorted(data["train"][1][:8].tolist())


# --------------------------------------------------------------------------------------------------- model


def test_small_resnet_shapes_and_structure():
    torch.manual_seed(0)
    model = fm.SmallResNet()
    out = model(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10)
    kinds = {type(m) for m in model.modules()}
    allowed = {fm.SmallResNet, fm.BasicBlock, nn.Sequential, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Identity,
               nn.AdaptiveAvgPool2d, nn.Linear}
    assert kinds <= allowed
    model = fm.SmallResNet(num_classes=4, widths=(8, 16, 24), blocks=(2, 1, 2))
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 4)
    strides = [b.conv1.stride[0] for stage in model.stages for b in stage]
    assert strides == [1, 1, 2, 2, 1]
    assert [isinstance(b.shortcut, nn.Sequential) for stage in model.stages for b in stage] == [
        False, False, True, True, False]
    with pytest.raises(ValueError):
        fm.SmallResNet(widths=(8, 16), blocks=(1,))


def test_lr_schedule_warms_up_then_decays_to_zero():
    f = [fm.lr_factor(s, 100) for s in range(100)]
    assert f[0] < 0.5 and max(f) == pytest.approx(1.0)
    peak = f.index(max(f))
    assert all(a >= b for a, b in zip(f[peak:], f[peak + 1:], strict=False))
    assert f[-1] == pytest.approx(0.0, abs=1e-9)
    assert fm.lr_factor(0, 1) > 0


def separable(n: int = 64, seed: int = 0, classes: int = 4) -> TensorDataset:
    """Class c: noise around a brightness of c - (classes - 1) / 2, i.e. a few well separated levels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, 1, 28, 28, generator=g) * 0.1 + (y.float() - (classes - 1) / 2).view(-1, 1, 1, 1)
    return TensorDataset(x, y)


def test_train_reduces_loss_calls_hooks_and_evaluate_reaches_one():
    torch.manual_seed(0)
    model = fm.SmallResNet(widths=(8, 8, 8))
    data = separable()
    loader = DataLoader(data, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    seen, after, extra_calls = [], [], []

    def extra_loss(m, images, labels, logits):
        extra_calls.append(logits.shape)
        return None if len(extra_calls) % 2 else 0.0 * logits.sum()

    result = fm.train(model, loader, steps=50, lr=0.1, on_step=lambda s, loss: seen.append((s, loss)),
                      extra_loss=extra_loss, after_step=after.append)
    assert set(result) == {"steps", "seconds", "loss_first", "loss_last"} and result["steps"] == 50
    assert result["loss_last"] < 0.5 * result["loss_first"]
    assert [s for s, _ in seen] == after == list(range(50))  # the loader (2 batches) was cycled
    assert len(extra_calls) == 50 and extra_calls[0] == (32, 10)
    model.train()
    assert fm.evaluate(model, DataLoader(data, batch_size=64)) == 1.0
    assert model.training  # the mode is restored


def test_extra_loss_is_added_and_after_step_sees_updated_weights():
    torch.manual_seed(0)
    model = fm.SmallResNet(widths=(4, 4, 4))
    loader = DataLoader(separable(16), batch_size=8)
    losses = []
    fm.train(model, loader, 2, extra_loss=lambda *a: torch.tensor(100.0), on_step=lambda s, v: losses.append(v))
    assert all(v > 100 for v in losses)

    def zero_fc(step):
        with torch.no_grad():
            model.fc.weight.zero_()

    fm.train(model, loader, 3, after_step=zero_fc)
    assert model.fc.weight.abs().sum() == 0


def test_weight_decay_skips_batch_norm_and_biases():
    model = fm.SmallResNet(widths=(4, 4, 4))
    decay, no_decay = fm._param_groups(model, 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


class Fixed(nn.Module):
    """Predicts class (input's first pixel) regardless of training; for an exact evaluate value."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return nn.functional.one_hot(x[:, 0, 0, 0].long(), 10).float() + self.w


def test_evaluate_exact_value_and_eval_mode():
    x = torch.zeros(8, 1, 28, 28)
    x[:, 0, 0, 0] = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7], dtype=torch.float32)
    y = torch.tensor([0, 1, 2, 0, 4, 0, 6, 0])  # 5 of 8 right
    model = Fixed()
    assert fm.evaluate(model, DataLoader(TensorDataset(x, y), batch_size=3)) == 5 / 8
    with pytest.raises(ValueError):
        fm.evaluate(model, [])


# --------------------------------------------------------------------------------------------------- real data


def _real_data():
    try:
        return fm.find_data()
    except RuntimeError as e:
        pytest.skip(f"Fashion-MNIST not findable here: {e}")


def test_real_test_split_has_10000_images_of_10_classes():
    folder = _real_data()
    images, labels = fm.load_split("test", folder)
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert sorted(np.unique(labels).tolist()) == list(range(10))
    assert np.bincount(labels).tolist() == [1000] * 10
