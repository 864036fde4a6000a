"""Decoding, NMS, COCO mAP and the detection loss, on hand-built tensors with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trt_prune.data import RoadScenes, collate_detection
from trt_prune.detection import DetectionLoss, anchor_points, coco_map, decode, evaluate, postprocess
from trt_prune.detection.loss import box_iou_pairs
from trt_prune.errors import TrtPruneError
from trt_prune.models.demo_detector import DemoDetector

NC = 4


def inv_softplus(y: float) -> float:
    return math.log(math.expm1(y))


def encode(boxes_per_image, labels_per_image, hw, logit=8.0):
    """A raw output that decodes to the given boxes: each box sits on the stride-8 anchor nearest its centre."""
    points, strides = anchor_points(*hw)
    raw = torch.full((len(boxes_per_image), 4 + NC, points.shape[0]), -12.0)
    for b, (boxes, labels) in enumerate(zip(boxes_per_image, labels_per_image, strict=True)):
        for box, label in zip(boxes, labels, strict=True):
            box = torch.as_tensor(box, dtype=torch.float32)
            centre = (box[:2] + box[2:]) / 2
            d = ((points - centre) ** 2).sum(1) + (strides != 8) * 1e9
            i = int(d.argmin())
            dist = torch.cat((points[i] - box[:2], box[2:] - points[i])) / strides[i]
            raw[b, :4, i] = torch.tensor([inv_softplus(float(v)) for v in dist])
            raw[b, 4 + int(label), i] = logit
    return raw


# -- anchors and decode --------------------------------------------------------------------------------

def test_anchor_points_layout():
    points, strides = anchor_points(64, 96)
    assert points.shape == (8 * 12 + 4 * 6 + 2 * 3, 2) and points.dtype == torch.float32
    assert points[0].tolist() == [4.0, 4.0] and points[1].tolist() == [12.0, 4.0]
    assert points[12].tolist() == [4.0, 12.0]  # row-major: the second row starts after 12 columns
    assert points[96].tolist() == [8.0, 8.0] and strides[96] == 16
    assert points[-1].tolist() == [80.0, 48.0] and strides[-1] == 32


def test_decode_known_anchor():
    hw = (64, 64)
    points, strides = anchor_points(*hw)
    n = points.shape[0]
    raw = torch.zeros(1, 4 + NC, n)
    i = 64 + 5  # level 16: grid 4x4, row 1, column 1 -> centre (24, 24)
    assert points[i].tolist() == [24.0, 24.0] and strides[i] == 16
    ltrb = (1.0, 0.5, 2.0, 0.25)
    raw[0, :4, i] = torch.tensor([inv_softplus(v) for v in ltrb])
    raw[0, 4 + 2, i] = 2.0
    boxes, scores = decode(raw, hw)
    assert boxes.shape == (1, n, 4) and scores.shape == (1, n, NC)
    torch.testing.assert_close(boxes[0, i], torch.tensor([24 - 16.0, 24 - 8.0, 24 + 32.0, 24 + 4.0]))
    assert scores[0, i, 2].item() == pytest.approx(1 / (1 + math.exp(-2.0)))
    assert scores[0, i, 0].item() == pytest.approx(0.5)


def test_decode_rejects_wrong_anchor_count():
    with pytest.raises(TrtPruneError, match="anchors"):
        decode(torch.zeros(1, 8, 100), (64, 64))
    with pytest.raises(TrtPruneError):
        decode([[1.0]], (64, 64))


def test_torch_and_numpy_give_identical_results():
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(2, 4 + NC, anchor_points(96, 64)[0].shape[0], generator=g) * 3
    for a, b in zip(decode(raw, (96, 64)), decode(raw.numpy().copy(), (96, 64)), strict=True):
        assert torch.equal(a, b)
    pa = postprocess(raw, (96, 64), score_threshold=0.05)
    pb = postprocess(raw.numpy().copy(), (96, 64), score_threshold=0.05)
    assert len(pa[0]["scores"]) > 0
    for da, db in zip(pa, pb, strict=True):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(da[key], db[key])


# -- postprocess ---------------------------------------------------------------------------------------

def test_postprocess_removes_duplicates_per_class():
    hw = (64, 64)
    box = [10.0, 10.0, 30.0, 34.0]
    raw = encode([[box]], [[1]], hw)
    points, strides = anchor_points(*hw)
    # A second anchor inside the box predicts the same box with a lower score: a duplicate.
    j = int((((points - torch.tensor([20.0, 28.0])) ** 2).sum(1) + (strides != 8) * 1e9).argmin())
    dist = torch.cat((points[j] - torch.tensor(box[:2]), torch.tensor(box[2:]) - points[j])) / 8
    raw[0, :4, j] = torch.tensor([inv_softplus(float(v)) for v in dist])
    raw[0, 4 + 1, j] = 4.0
    # A third anchor votes the same box for another class: NMS is per class, so it stays.
    k = j + 1
    dist = torch.cat((points[k] - torch.tensor(box[:2]), torch.tensor(box[2:]) - points[k])) / 8
    raw[0, :4, k] = torch.tensor([inv_softplus(float(v)) for v in dist])
    raw[0, 4 + 3, k] = 3.0

    det = postprocess(raw, hw, score_threshold=0.01)[0]
    assert det["labels"].tolist() == [1, 3]
    torch.testing.assert_close(det["boxes"], torch.tensor([box, box]), atol=1e-4, rtol=0)
    assert det["scores"][0] == pytest.approx(1 / (1 + math.exp(-8.0)))
    assert postprocess(raw, hw, score_threshold=0.99)[0]["labels"].tolist() == [1]
    assert len(postprocess(raw, hw, score_threshold=0.01, max_detections=1)[0]["labels"]) == 1


def test_postprocess_clips_to_image():
    raw = encode([[[40.0, 40.0, 70.0, 80.0]]], [[0]], (64, 64))
    det = postprocess(raw, (64, 64))[0]
    assert det["boxes"][0].tolist() == [40.0, 40.0, 64.0, 64.0]


# -- mAP -----------------------------------------------------------------------------------------------

def _targets():
    return [
        {"boxes": torch.tensor([[10.0, 10.0, 50.0, 40.0], [60.0, 20.0, 90.0, 90.0]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.tensor([[5.0, 50.0, 25.0, 95.0]]), "labels": torch.tensor([3])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]


def _as_predictions(targets, shift=0.0, label_offset=0):
    return [{"boxes": t["boxes"] + shift, "scores": torch.ones(len(t["labels"])),
             "labels": (t["labels"] + label_offset) % NC} for t in targets]


def test_coco_map_perfect_and_degraded():
    targets = _targets()
    perfect = coco_map(_as_predictions(targets), targets, NC)
    assert perfect == {"map50_95": pytest.approx(1.0), "map50": pytest.approx(1.0)}
    shifted = coco_map(_as_predictions(targets, shift=4.0), targets, NC)
    assert 0.0 < shifted["map50_95"] < 0.9 and shifted["map50"] == pytest.approx(1.0)
    far = coco_map(_as_predictions(targets, shift=30.0), targets, NC)
    assert far["map50"] < 0.5
    wrong = coco_map(_as_predictions(targets, label_offset=1), targets, NC)
    assert wrong == {"map50_95": 0.0, "map50": 0.0}
    numpy_preds = [{k: v.numpy() for k, v in p.items()} for p in _as_predictions(targets)]
    assert coco_map(numpy_preds, targets, NC)["map50_95"] == pytest.approx(1.0)


def test_coco_map_edge_cases(capsys):
    targets = _targets()
    empty = [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}] * 3
    assert coco_map(empty, targets, NC) == {"map50_95": 0.0, "map50": 0.0}
    with pytest.raises(TrtPruneError, match="predictions"):
        coco_map(empty[:2], targets, NC)
    bad = _as_predictions(targets)
    bad[0]["labels"] = torch.tensor([0, 7])
    with pytest.raises(TrtPruneError, match="labels"):
        coco_map(bad, targets, NC)
    coco_map(_as_predictions(targets), targets, NC)
    assert capsys.readouterr().out == ""  # pycocotools' chatter is silenced


def test_evaluate_end_to_end_with_encoded_predictor():
    hw = (96, 128)
    targets = _targets()
    dataset = [(torch.zeros(3, *hw), t) for t in targets]

    # evaluate() walks the dataset in order, so the predictor answers with the next images' targets.
    def predict(images):
        assert images.shape[1:] == (3, *hw)
        start = predict.calls
        predict.calls += len(images)
        chunk = targets[start:start + len(images)]
        return encode([t["boxes"] for t in chunk], [t["labels"] for t in chunk], hw).numpy()

    predict.calls = 0
    result = evaluate(predict, dataset, batch_size=2)
    assert result["images"] == 3
    assert result["map50_95"] == pytest.approx(1.0, abs=1e-6) and result["map50"] == pytest.approx(1.0)

    # On procedural scenes, a predictor that sees nothing scores 0 and the limit is honoured.
    scenes = RoadScenes("val", length=10, size=64)
    blind = lambda images: torch.full((len(images), 4 + NC, anchor_points(64, 64)[0].shape[0]), -20.0)  # noqa: E731
    assert evaluate(blind, scenes, batch_size=4, limit=5) == {"map50_95": 0.0, "map50": 0.0, "images": 5}


# -- loss ----------------------------------------------------------------------------------------------

def test_box_iou_kinds():
    a = torch.tensor([0.0, 0.0, 10.0, 10.0])
    for kind in ("iou", "giou", "ciou"):
        assert box_iou_pairs(a, a, kind).item() == pytest.approx(1.0, abs=1e-6)
    b = torch.tensor([20.0, 0.0, 30.0, 10.0])
    assert box_iou_pairs(a, b, "iou").item() == 0.0
    assert box_iou_pairs(a, b, "giou").item() == pytest.approx(-1 / 3, abs=1e-6)
    assert box_iou_pairs(a, b, "ciou").item() == pytest.approx(-(20 ** 2) / (30 ** 2 + 10 ** 2), abs=1e-6)


def test_assigner_picks_inside_points_and_resolves_conflicts():
    hw = (64, 64)
    points, strides = anchor_points(*hw)
    n = points.shape[0]
    loss = DetectionLoss(NC, topk=10)
    gt = torch.tensor([[[0.0, 0.0, 32.0, 32.0], [16.0, 16.0, 48.0, 48.0]]])
    labels = torch.tensor([[1, 2]])
    valid = torch.tensor([[True, False]])
    # Every anchor predicts exactly the first GT: IoU 1 wherever the point is inside it.
    pred = gt[:, :1].expand(1, n, 4).clone()
    scores = torch.full((1, n, NC), 0.5)
    fg, tboxes, tscores = loss.assign(pred, scores, points, gt, labels, valid)
    inside = (points[:, 0] < 32) & (points[:, 1] < 32)
    assert fg.sum() == 10 and not (fg[0] & ~inside).any()
    assert torch.equal(tboxes[0, fg[0]], gt[0, :1].expand(10, 4))
    assert tscores[0, fg[0], 1].max().item() == pytest.approx(1.0) and tscores[0, :, [0, 2, 3]].sum() == 0
    assert tscores[0, ~fg[0]].sum() == 0

    # With both GTs valid, the point (20, 20) lies in both: it goes to the GT its prediction overlaps most.
    centre = int(((points - torch.tensor([20.0, 20.0])) ** 2).sum(1).argmin())
    pred = gt[:, :1].expand(1, n, 4).clone()
    pred[0, centre] = gt[0, 1]
    fg, tboxes, _ = loss.assign(pred, scores, points, gt, labels, torch.tensor([[True, True]]))
    assert fg[0, centre] and torch.equal(tboxes[0, centre], gt[0, 1])


def test_assigner_gives_tiny_box_its_nearest_point():
    points, _ = anchor_points(64, 64)
    loss = DetectionLoss(NC)
    gt = torch.tensor([[[9.0, 9.0, 11.0, 11.0]]])  # contains no anchor centre
    pred = torch.tensor([8.0, 8.0, 12.0, 12.0]).expand(1, points.shape[0], 4)
    fg, _, tscores = loss.assign(pred, torch.full((1, points.shape[0], NC), 0.5), points, gt,
                                 torch.tensor([[0]]), torch.tensor([[True]]))
    assert fg.sum() == 1 and points[fg[0]].tolist() == [[12.0, 12.0]]
    assert tscores.sum() > 0


def test_loss_is_finite_without_objects():
    torch.manual_seed(0)
    hw = (64, 64)
    raw = torch.randn(2, 4 + NC, anchor_points(*hw)[0].shape[0], requires_grad=True)
    none = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    some = {"boxes": torch.tensor([[4.0, 6.0, 40.0, 30.0]]), "labels": torch.tensor([3])}
    crit = DetectionLoss(NC)
    for targets in ([none, none], [none, some]):
        total, parts = crit(raw, targets, hw)
        total.backward()
        assert torch.isfinite(total) and torch.isfinite(raw.grad).all()
        assert set(parts) == {"cls", "box"} and all(torch.isfinite(v) for v in parts.values())
        raw.grad = None
    assert crit(raw, [none, none], hw)[1]["box"].item() == 0.0


def test_loss_is_float32_under_autocast():
    torch.manual_seed(0)
    hw = (64, 64)
    raw = torch.randn(1, 4 + NC, anchor_points(*hw)[0].shape[0]).bfloat16()
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 30.0]]), "labels": torch.tensor([1])}]
    crit = DetectionLoss(NC)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, _ = crit(raw, targets, hw)
    assert total.dtype == torch.float32
    assert total.item() == pytest.approx(crit(raw.float(), targets, hw)[0].item(), rel=1e-5)


def test_loss_decreases_when_overfitting_a_batch():
    torch.manual_seed(0)
    scenes = RoadScenes("train", length=64, size=128, seed=1)
    picked = [scenes[i] for i in range(len(scenes)) if len(scenes[i][1]["labels"]) >= 1][:2]
    images, targets = collate_detection(picked)
    model = DemoDetector(widths=(8, 16, 32, 64, 128), depths=(1, 1, 1, 1))
    crit = DetectionLoss(NC)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        total, _ = crit(model(images), targets, (128, 128))
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3])
