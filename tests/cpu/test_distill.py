"""Distillation losses: kl_logits against the formula, DetectorDistillLoss on the demo detector's real output."""

from __future__ import annotations

import math

import pytest
import torch

from trt_prune.errors import PruneError
from trt_prune.pruning.distill import DetectorDistillLoss, kl_logits, level_sizes_for

SIZES = [40 * 40, 20 * 20, 10 * 10]
GRIDS = [(40, 40), (20, 20), (10, 10)]


@pytest.fixture(scope="module")
def demo_out():
    """The shipped demo detector's output on a fixed batch: [2, 4 + num_classes, 2100]."""
    from trt_prune.models import load_model

    m = load_model("builtin:demo-detector").model.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        out = m(torch.rand(2, 3, 320, 320))
    return out, m.num_classes


def _entropy_part(out, box_channels=4, level_weights=(1.0, 1.0, 1.0)):
    """BCE of p against itself (the binary entropy), averaged per level, summed with level weights."""
    total = 0.0
    for lvl, w in zip(out.double().split(SIZES, dim=2), level_weights, strict=True):
        p = torch.sigmoid(lvl[:, box_channels:])
        h = -(p * torch.log(p) + (1 - p) * torch.log1p(-p))
        total += w * h.mean().item()
    return total


def _as_pairs(out, box_channels=4):
    """The same data in layout (b): per level (box [B, 4, H, W], cls [B, C, H, W])."""
    pairs = []
    for lvl, (h, w) in zip(out.split(SIZES, dim=2), GRIDS, strict=True):
        b = lvl.shape[0]
        pairs.append((lvl[:, :box_channels].reshape(b, box_channels, h, w),
                      lvl[:, box_channels:].reshape(b, -1, h, w)))
    return pairs


# -- kl_logits ------------------------------------------------------------------------------------------------


def test_kl_zero_when_equal_positive_otherwise():
    torch.manual_seed(1)
    t = torch.randn(8, 10)
    assert kl_logits(t.clone(), t).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_logits(t + 0.5 * torch.randn(8, 10), t).item() > 1e-3
    dense = torch.randn(2, 5, 4, 4)
    assert kl_logits(dense.clone(), dense).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_logits(torch.randn(2, 5, 4, 4), dense).item() > 1e-3


def _softmax(xs):
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


def test_kl_matches_hand_computed_value():
    s = [[1.0, 2.0], [0.0, -1.0]]
    t = [[2.0, 0.0], [1.0, 1.0]]
    T = 2.0
    expected_rows = []
    for srow, trow in zip(s, t, strict=True):
        ps = _softmax([v / T for v in srow])
        pt = _softmax([v / T for v in trow])
        expected_rows.append(sum(a * math.log(a / b) for a, b in zip(pt, ps, strict=True)) * T * T)
    got = kl_logits(torch.tensor(s), torch.tensor(t), temperature=T)
    assert got.item() == pytest.approx(sum(expected_rows) / 2, rel=1e-6)
    assert kl_logits(torch.tensor(s), torch.tensor(t), T, "sum").item() == pytest.approx(sum(expected_rows), rel=1e-6)
    assert kl_logits(torch.tensor(s), torch.tensor(t), T, "mean").item() == pytest.approx(sum(expected_rows) / 4,
                                                                                           rel=1e-6)
    per = kl_logits(torch.tensor(s), torch.tensor(t), T, "none")
    assert per.shape == (2, 2)
    assert per.sum(1).tolist() == pytest.approx(expected_rows, rel=1e-6)


def test_kl_gradients_reach_student_only():
    torch.manual_seed(2)
    s = torch.randn(4, 6, requires_grad=True)
    t = torch.randn(4, 6, requires_grad=True)
    kl_logits(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum().item() > 0
    assert t.grad is None


@pytest.mark.parametrize("s, t, kwargs, match", [
    (torch.zeros(2, 3), torch.zeros(2, 4), {}, r"differ in shape: student \(2, 3\), teacher \(2, 4\)"),
    (torch.zeros(3), torch.zeros(3), {}, r"at least 2 dimensions"),
    (torch.zeros(2, 3), torch.zeros(2, 3), {"temperature": 0.0}, r"temperature must be .*> 0, got 0\.0"),
    (torch.zeros(2, 3), torch.zeros(2, 3), {"temperature": -1}, r"temperature .* got -1"),
    (torch.zeros(2, 3), torch.zeros(2, 3), {"reduction": "avg"}, r"unknown reduction 'avg'"),
    (torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), {}, r"floating-point"),
])
def test_kl_bad_inputs(s, t, kwargs, match):
    with pytest.raises(PruneError, match=match):
        kl_logits(s, t, **kwargs)


# -- level sizes ----------------------------------------------------------------------------------------------


def test_level_sizes_for():
    assert level_sizes_for((320, 320), (8, 16, 32)) == SIZES
    assert sum(level_sizes_for((320, 320), (8, 16, 32))) == 40 * 40 + 20 * 20 + 10 * 10
    assert level_sizes_for((320, 640)) == [40 * 80, 20 * 40, 10 * 20]
    assert DetectorDistillLoss.level_sizes_for((64, 64), (8,)) == [64]
    with pytest.raises(PruneError, match=r"320x328 is not a multiple of stride 16"):
        level_sizes_for((320, 328))
    with pytest.raises(PruneError, match=r"input_hw must be two positive integers"):
        level_sizes_for((320,))
    with pytest.raises(PruneError, match=r"strides must be"):
        level_sizes_for((320, 320), (8, 0))


# -- DetectorDistillLoss --------------------------------------------------------------------------------------


def test_demo_output_layout(demo_out):
    out, nc = demo_out
    assert out.shape == (2, 4 + nc, sum(level_sizes_for((320, 320), (8, 16, 32))))


def test_equal_student_gives_entropy_and_zero_box(demo_out):
    out, _ = demo_out
    loss_fn = DetectorDistillLoss(level_sizes=SIZES)
    total = loss_fn(out.clone(), out)
    for i in range(3):
        assert loss_fn.last_parts[f"box/{i}"] == 0.0
        assert loss_fn.last_parts[f"cls/{i}"] > 0.0
    assert set(loss_fn.last_parts) == {"cls/0", "box/0", "cls/1", "box/1", "cls/2", "box/2"}
    assert total.item() == pytest.approx(_entropy_part(out), rel=1e-5)
    # level sizes inferred from N when not given
    assert DetectorDistillLoss()(out.clone(), out).item() == pytest.approx(total.item(), rel=1e-6)


def test_perturbed_student_costs_more(demo_out):
    out, _ = demo_out
    torch.manual_seed(3)
    loss_fn = DetectorDistillLoss(level_sizes=SIZES)
    base = loss_fn(out.clone(), out).item()
    student = out + 0.3 * torch.randn_like(out)
    worse = loss_fn(student, out).item()
    assert worse > base + 1e-3
    assert all(loss_fn.last_parts[f"box/{i}"] > 0 for i in range(3))
    cls_only = DetectorDistillLoss(level_sizes=SIZES, box_weight=0.0)(student, out).item()
    assert base < cls_only < worse


@pytest.mark.parametrize("box_loss", ["l1", "smooth_l1", "mse"])
@pytest.mark.parametrize("weight_by_teacher", [True, False])
def test_layouts_agree(demo_out, box_loss, weight_by_teacher):
    out, _ = demo_out
    torch.manual_seed(4)
    student = out + 0.2 * torch.randn_like(out)
    loss_fn = DetectorDistillLoss(level_sizes=SIZES, box_loss=box_loss, weight_by_teacher=weight_by_teacher,
                                  temperature=2.0, cls_weight=0.7, box_weight=1.3, level_weights=[1.0, 0.5, 2.0])
    a = loss_fn(student, out).item()
    parts_a = dict(loss_fn.last_parts)
    b = loss_fn(_as_pairs(student), _as_pairs(out)).item()
    assert b == pytest.approx(a, rel=1e-5)
    assert loss_fn.last_parts == pytest.approx(parts_a, rel=1e-5)


def test_box_weighting_by_teacher_confidence():
    """With weight_by_teacher the box error at a confident location counts, one at background barely does."""
    t_cls = torch.tensor([[[8.0, -8.0]]])  # location 0 confident, location 1 background
    t_box = torch.zeros(1, 4, 2)
    teacher = torch.cat((t_box, t_cls), 1)
    err_bg = teacher.clone()
    err_bg[:, :4, 1] = 1.0
    err_fg = teacher.clone()
    err_fg[:, :4, 0] = 1.0
    fn = DetectorDistillLoss(level_sizes=[2], cls_weight=0.0)
    fg, bg = fn(err_fg, teacher).item(), fn(err_bg, teacher).item()
    w0, w1 = 1 / (1 + math.exp(-8.0)), 1 / (1 + math.exp(8.0))
    assert fg == pytest.approx(4 * w0 / (w0 + w1), rel=1e-4)
    assert bg == pytest.approx(4 * w1 / (w0 + w1), rel=1e-3)
    uniform = DetectorDistillLoss(level_sizes=[2], cls_weight=0.0, weight_by_teacher=False)
    assert uniform(err_fg, teacher).item() == pytest.approx(2.0)
    assert uniform(err_bg, teacher).item() == pytest.approx(2.0)


def test_level_weight_zero_ignores_that_level(demo_out):
    out, _ = demo_out
    torch.manual_seed(5)
    loss_fn = DetectorDistillLoss(level_sizes=SIZES, level_weights=[1.0, 0.0, 1.0])
    student = out + 0.1 * torch.randn_like(out)
    base = loss_fn(student, out).item()
    lvl1 = student.clone()
    lvl1[:, :, SIZES[0]:SIZES[0] + SIZES[1]] += torch.randn(2, out.shape[1], SIZES[1])
    assert loss_fn(lvl1, out).item() == base
    assert loss_fn.last_parts["cls/1"] > 0  # still computed and logged
    lvl0 = student.clone()
    lvl0[:, :, :SIZES[0]] += torch.randn(2, out.shape[1], SIZES[0])
    assert loss_fn(lvl0, out).item() > base + 1e-3


def test_detector_gradients_reach_student_only(demo_out):
    out, _ = demo_out
    student = (out + 0.1).clone().requires_grad_(True)
    teacher = out.clone().requires_grad_(True)
    DetectorDistillLoss(level_sizes=SIZES, temperature=2.0)(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum().item() > 0
    assert teacher.grad is None
    pairs_s = [(b.detach().requires_grad_(True), c.detach().requires_grad_(True)) for b, c in _as_pairs(out + 0.1)]
    pairs_t = [(b.requires_grad_(True), c.requires_grad_(True)) for b, c in
               ((b.clone(), c.clone()) for b, c in _as_pairs(out))]
    DetectorDistillLoss()(pairs_s, pairs_t).backward()
    assert all(b.grad is not None and c.grad is not None for b, c in pairs_s)
    assert all(b.grad is None and c.grad is None for b, c in pairs_t)


def test_detector_bad_inputs(demo_out):
    out, _ = demo_out
    with pytest.raises(PruneError, match=r"student \(2, 8, 2100\), teacher \(2, 8, 2000\)"):
        DetectorDistillLoss()(out, out[:, :, :2000])
    with pytest.raises(PruneError, match=r"level_sizes \[1600, 400, 99\] sum to 2099 but the output has N=2100"):
        DetectorDistillLoss(level_sizes=[1600, 400, 99])(out, out)
    with pytest.raises(PruneError, match=r"box_channels=8 leaves no class channels .* 8 channels"):
        DetectorDistillLoss(box_channels=8)(out, out)
    with pytest.raises(PruneError, match=r"cannot split 2099 locations"):
        DetectorDistillLoss()(out[:, :, :2099], out[:, :, :2099])
    with pytest.raises(PruneError, match=r"level_weights has 2 values but the outputs have 3 levels"):
        DetectorDistillLoss(level_weights=[1.0, 1.0])(out, out)
    with pytest.raises(PruneError, match=r"level 1 cls outputs differ in shape"):
        s = _as_pairs(out)
        t = _as_pairs(out)
        t[1] = (t[1][0], t[1][1][:, :2])
        DetectorDistillLoss()(s, t)
    with pytest.raises(PruneError, match=r"student has 3 levels but teacher has 2"):
        DetectorDistillLoss()(_as_pairs(out), _as_pairs(out)[:2])
    with pytest.raises(PruneError, match=r"same layout"):
        DetectorDistillLoss()(_as_pairs(out), out)
    with pytest.raises(PruneError, match=r"must be a tensor"):
        DetectorDistillLoss()("out", out)


@pytest.mark.parametrize("kwargs, match", [
    ({"cls_weight": -1.0}, r"cls_weight must be a finite number >= 0, got -1\.0"),
    ({"box_weight": -0.5}, r"box_weight must be .* got -0\.5"),
    ({"level_weights": [1.0, -2.0, 1.0]}, r"level_weights\[1\] must be .* got -2\.0"),
    ({"temperature": 0}, r"temperature must be .* got 0"),
    ({"box_loss": "giou"}, r"unknown box_loss 'giou'; use one of l1, smooth_l1, mse"),
    ({"box_channels": 0}, r"box_channels must be an integer >= 1, got 0"),
    ({"level_sizes": [1600, -400]}, r"level_sizes must be positive integers"),
])
def test_detector_bad_config(kwargs, match):
    with pytest.raises(PruneError, match=match):
        DetectorDistillLoss(**kwargs)
