"""Model specs, weights loading (safetensors, state dicts, refused pickles) and model folders."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from trt_prune.errors import ModelSpecError, WeightsError
from trt_prune.models import BUILTINS, builtin_weights_path, load_model, load_weights
from trt_prune.models.demo_detector import DemoDetector
from trt_prune.stages import prune


class NotAStateDict:
    """A class a weights_only unpickler refuses: loading it would run code from the file."""

    def __reduce__(self):
        return (print, ("side effect",))


def test_builtin_detector_size_and_shipped_weights():
    loaded = load_model("builtin:demo-detector")
    params = sum(p.numel() for p in loaded.model.parameters())
    assert 1_000_000 <= params <= 5_000_000
    assert loaded.input_shape == (1, 3, 320, 320)
    path = builtin_weights_path("demo-detector")
    assert path.is_file() and path.stat().st_size <= 10 * 1024 * 1024
    assert loaded.meta.weights == f"shipped:{path.name}"
    assert not loaded.model.training
    x = torch.rand(1, 3, 320, 320)
    assert loaded.model(x).shape == (1, 4 + 4, 40 * 40 + 20 * 20 + 10 * 10)


@pytest.mark.parametrize("spec, message", [
    ("nonsense", "unknown model spec"),
    ("builtin:nope", "unknown built-in model 'nope'"),
    ("torchvision:not_a_net", "torchvision has no model 'not_a_net'"),
    ("missing/file.py:make", "does not exist"),
    ("", "empty model spec"),
])
def test_bad_specs(spec, message):
    with pytest.raises(ModelSpecError, match=message):
        load_model(spec)


def test_unknown_builtin_lists_valid_names():
    with pytest.raises(ModelSpecError) as err:
        load_model("builtin:nope")
    assert all(name in str(err.value) for name in BUILTINS)


def test_torchvision_and_file_specs(tmp_path):
    loaded = load_model("torchvision:resnet18")
    assert loaded.model.fc.out_features == 1000 and loaded.task == "classification"
    src = tmp_path / "mynet.py"
    src.write_text("import torch\n\ndef make():\n    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3))\n")
    loaded = load_model(f"{src}:make")
    assert isinstance(loaded.model[0], torch.nn.Conv2d)
    with pytest.raises(ModelSpecError, match="no callable 'other'"):
        load_model(f"{src}:other")


def test_weights_roundtrip_safetensors_and_state_dict(tmp_path):
    src = DemoDetector()
    torch.nn.init.constant_(src.backbone.stem.conv.weight, 0.5)
    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(st))
    pt = tmp_path / "w.pt"
    torch.save(src.state_dict(), pt)
    for path in (st, pt):
        loaded = load_model("builtin:demo-detector", weights=path)
        assert torch.equal(loaded.model.backbone.stem.conv.weight, src.backbone.stem.conv.weight)


def test_missing_corrupt_mismatched_weights(tmp_path):
    model = DemoDetector()
    with pytest.raises(WeightsError, match="does not exist"):
        load_weights(model, tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(WeightsError, match="not a readable safetensors"):
        load_weights(model, bad)
    badpt = tmp_path / "bad.pt"
    badpt.write_bytes(b"not a zip, not a pickle")
    with pytest.raises(WeightsError, match="could not be read"):
        load_weights(model, badpt)
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(WeightsError, match="does not match the model"):
        load_weights(model, other)


def test_pickle_needs_opt_in(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": DemoDetector().state_dict(), "extra": NotAStateDict()}, path)
    with pytest.raises(WeightsError, match="--allow-pickle"):
        load_weights(DemoDetector(), path)
    assert "side effect" not in capsys.readouterr().out
    # with the opt-in the file is unpickled (and its code runs, which is why it is opt-in)
    load_weights(DemoDetector(), path, allow_pickle=True)
    assert "side effect" in capsys.readouterr().out


def test_model_folder_roundtrip(tmp_path):
    base = load_model("builtin:demo-detector")
    result = prune(base, (1, 3, 128, 128), ratio=0.3, out=tmp_path / "pruned")  # the stage writes the folder
    folder = result.folder
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.safetensors", "recipe.json"]
    loaded = load_model(str(folder))
    assert loaded.source == "builtin:demo-detector" and loaded.meta.recipe["version"] == 1
    assert loaded.input_shape == (1, 3, 128, 128) and loaded.meta.history == ["prune"]
    assert loaded.meta.weights == base.meta.weights and loaded.task == "detection"
    x = torch.rand(1, 3, 128, 128)
    torch.testing.assert_close(loaded.model(x), result.model.eval()(x))
    with pytest.raises(ModelSpecError, match="holds no model.json"):
        load_model(str(tmp_path))
