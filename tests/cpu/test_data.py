"""RoadScenes: determinism, label validity, split separation, argument checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trt_prune.data import VAL_LENGTH, RoadScenes, collate_detection
from trt_prune.models.demo_detector import CLASS_NAMES


def _bytes(item):
    image, target = item
    return image.numpy().tobytes(), target["boxes"].numpy().tobytes(), target["labels"].numpy().tobytes()


def test_same_index_gives_identical_bytes():
    a = RoadScenes("train", seed=3)
    b = RoadScenes("train", seed=3)
    assert _bytes(a[7]) == _bytes(a[7]) == _bytes(b[7])
    assert _bytes(a[-1]) == _bytes(a[len(a) - 1])


def test_seeds_splits_and_indices_differ():
    train0, train1, val0 = RoadScenes("train", seed=0), RoadScenes("train", seed=1), RoadScenes("val", seed=0)
    img = train0[5][0]
    assert not torch.equal(img, train1[5][0])
    assert not torch.equal(img, val0[5][0])
    assert not torch.equal(img, train0[6][0])


def test_items_are_valid_over_many_scenes():
    ds = RoadScenes("val", length=40, size=(160, 224))
    counts = np.zeros(len(CLASS_NAMES), dtype=int)
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.dtype == torch.float32 and image.shape == (3, 160, 224)
        assert image.is_contiguous()
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        boxes, labels = target["boxes"], target["labels"]
        assert boxes.dtype == torch.float32 and labels.dtype == torch.int64
        assert boxes.shape == (len(labels), 4)
        if len(labels):
            assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
            assert (boxes[:, 2] <= 224).all() and (boxes[:, 3] <= 160).all()
            # Non-degenerate: at least 2 px on each side.
            assert ((boxes[:, 2:] - boxes[:, :2]) >= 2).all()
            assert labels.min() >= 0 and labels.max() < len(CLASS_NAMES)
            counts += np.bincount(labels.numpy(), minlength=len(CLASS_NAMES))
    # Every class shows up, and the scenes hold several objects on average.
    assert (counts > 0).all(), counts
    assert counts.sum() > 2 * len(ds)


def test_image_has_structure():
    image = RoadScenes("train")[0][0]
    # Not flat noise: sky and ground differ, and there is real contrast.
    assert float(image.std()) > 0.05
    assert not torch.allclose(image[:, :20].mean(), image[:, -20:].mean(), atol=0.02)


def test_default_lengths_and_collate():
    assert len(RoadScenes("val")) == VAL_LENGTH == 500
    assert len(RoadScenes("train")) == 20000
    ds = RoadScenes("train", length=3, size=64)
    images, targets = collate_detection([ds[0], ds[1], ds[2]])
    assert images.shape == (3, 3, 64, 64)
    assert len(targets) == 3 and set(targets[0]) == {"boxes", "labels"}


@pytest.mark.parametrize("kwargs, match", [
    ({"split": "test"}, "train"),
    ({"size": 100}, "multiple of 32"),
    ({"size": (64, 48)}, "multiple of 32"),
    ({"size": "320"}, "int"),
    ({"length": -1}, "length"),
    ({"seed": -2}, "seed"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RoadScenes(**kwargs)


def test_split_error_names_valid_values():
    with pytest.raises(ValueError) as info:
        RoadScenes("validation")
    assert "'train'" in str(info.value) and "'val'" in str(info.value) and "validation" in str(info.value)


def test_index_out_of_range():
    ds = RoadScenes("val", length=2)
    with pytest.raises(IndexError):
        ds[2]
    with pytest.raises(IndexError):
        ds[-3]


def test_uint8_images_match_float_images():
    as_float = RoadScenes("val", length=2, size=64)[1]
    as_uint8 = RoadScenes("val", length=2, size=64, uint8=True)[1]
    assert as_uint8[0].dtype == torch.uint8 and as_uint8[0].shape == (3, 64, 64)
    torch.testing.assert_close(as_uint8[0].float() / 255.0, as_float[0], rtol=0, atol=1e-7)
    assert torch.equal(as_uint8[1]["boxes"], as_float[1]["boxes"])
