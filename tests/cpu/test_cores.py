"""Detection cores: each builds, runs at its default size, and returns the head's raw tensors."""

from __future__ import annotations

import pytest
import torch

from trt_prune.errors import ModelSpecError
from trt_prune.models.cores import CORE_NAMES, CORES, DetectionCore, core_spec, detection_core


@pytest.mark.parametrize("name", CORE_NAMES)
def test_every_core_runs_at_its_default_size_on_meta(name):
    # the meta device checks structure, shapes and names without initialising or computing real weights
    with torch.device("meta"):
        core = detection_core(name)
        out = core(torch.empty(core.input_shape))
    spec = CORES[name]
    assert isinstance(core, DetectionCore) and not core.training
    assert spec.input_size % 32 == 0 or name == "ssd300_vgg16"
    assert core.input_shape == (1, 3, spec.input_size, spec.input_size)
    assert isinstance(out, tuple) and len(out) == len(spec.output_names)
    assert all(isinstance(t, torch.Tensor) and t.shape[0] == 1 for t in out)
    modules = dict(core.named_modules())
    for path in spec.output_layers:
        assert isinstance(modules.get(path), torch.nn.Conv2d), path


def test_core_keeps_only_backbone_and_head():
    with torch.device("meta"):
        core = detection_core("fasterrcnn_resnet50_fpn")
    assert {n for n, _ in core.named_children()} == {"backbone", "head"}
    assert "roi_heads" not in {n.split(".")[0] for n, _ in core.named_modules()}


@pytest.mark.parametrize("name, expected", [
    # RetinaNet at 128: P3..P7 are 16, 8, 4, 2, 1 cells wide, 9 anchors each, 91 classes
    ("retinanet_resnet50_fpn", [(1, 9 * (256 + 64 + 16 + 4 + 1), 91), (1, 9 * (256 + 64 + 16 + 4 + 1), 4)]),
    ("ssdlite320_mobilenet_v3_large", None),
])
def test_cheap_cores_compute_finite_tensors(name, expected):
    torch.manual_seed(0)
    core = detection_core(name)
    with torch.no_grad():
        out = core(torch.rand(1, 3, 128, 128))
    assert len(out) == 2
    if expected is not None:
        assert [tuple(t.shape) for t in out] == expected
    # SSD returns boxes then classes: the last dim says which
    assert out[0].shape[1] == out[1].shape[1] and sorted(t.shape[-1] for t in out) == [4, 91]
    assert all(torch.isfinite(t).all() for t in out)


def test_builder_options_pass_through():
    with torch.device("meta"):
        core = detection_core("retinanet_resnet50_fpn", num_classes=4)
        cls_logits, _ = core(torch.empty(1, 3, 128, 128))
    assert cls_logits.shape[-1] == 4


def test_unknown_core_lists_valid_names():
    with pytest.raises(ModelSpecError) as info:
        detection_core("yolo_v99")
    message = str(info.value)
    assert "yolo_v99" in message
    assert all(name in message for name in CORE_NAMES)
    with pytest.raises(ModelSpecError):
        core_spec("")
