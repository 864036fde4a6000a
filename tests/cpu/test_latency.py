"""Latency tables, the network latency model and the latency planner (trt_prune.latency), on ONNX Runtime."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from trt_prune.cli import cli
from trt_prune.errors import LatencyError, PruneError, SparsifyError
from trt_prune.latency import LatencyModel, LatencyPlanner, ensure_table, load_table, parse_budget
from trt_prune.latency.measure import environment_key, layer_module, layer_onnx
from trt_prune.latency.model import layer_uses, model_key
from trt_prune.latency.table import Entry, LatencyTable, LayerSig, TableKey, axis_points
from trt_prune.pruning import ChannelPruner, Schedule, prune
from trt_prune.pruning.graph import trace
from trt_prune.pruning.structured import PruneConfig, _example, _prunable, apply_recipe

SHAPE = (1, 3, 32, 32)


class Net(nn.Module):
    """conv → strided conv → depthwise → 1×1 conv → pooled linear head (its 10 outputs are kept)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, groups=64, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        self.c3 = nn.Sequential(nn.Conv2d(64, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.c3(self.dw(self.c2(self.c1(x))))
        return self.fc(x.mean((2, 3)))


def _net():
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():  # distinct BN statistics, so channels differ in importance
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.2, 1.5)
                m.running_var.uniform_(0.5, 2.0)
    return net


def _graph(net):
    return trace(net, _example(net, SHAPE))


def synthetic_table(graph, per_layer=None, constant=1.0, per_activation=0.0) -> LatencyTable:
    """A table whose layer times are ``a · c_in · c_out`` (``a · c`` for one-axis ops) on an 8-aligned grid, and a
    calibration for ``graph``: planner tests then do not depend on this machine's timing noise."""
    uses, _ = layer_uses(graph)
    table = LatencyTable(TableKey("onnxruntime", "test", "cpu", 1))
    for u in uses:
        a = (per_layer or {}).get(u.module, 1e-3)
        ins = axis_points(u.dense_in, 8, 64) if u.in_classes is not None else [u.dense_in]
        outs = [0] if u.sig.one_axis else (axis_points(u.dense_out, 8, 64) if u.dense_out > 8 else [u.dense_out])
        ms = np.array([[a * i * (o if not u.sig.one_axis else 1) for o in outs] for i in ins], dtype=float)
        table.entries[u.sig.key()] = Entry(u.sig, ins, outs, ms)
    table.calibrations[model_key(uses, graph.input_shape)] = {"constant_ms": constant,
                                                              "per_activation_ms": per_activation}
    return table


# ----------------------------------------------------------------------------------------------- the table
def test_interpolation_is_exact_on_a_bilinear_function_and_clamps_outside():
    sig = LayerSig("conv", (1, 1), (1, 1), (0, 0), (1, 1), 1, (8, 8), 1, False, (64, 64))
    ins, outs = [8, 32, 64], [16, 48, 64]
    ms = np.array([[0.5 + 0.01 * i + 0.02 * o + 1e-4 * i * o for o in outs] for i in ins])
    e = Entry(sig, ins, outs, ms)
    for i, o in [(8, 16), (24, 40), (40, 56), (64, 64), (13, 47)]:
        assert e.time(i, o) == pytest.approx(0.5 + 0.01 * i + 0.02 * o + 1e-4 * i * o)
    assert e.time(2, 4) == pytest.approx(ms[0, 0]) and e.time(100, 100) == pytest.approx(ms[-1, -1])
    one = Entry(LayerSig("depthwise", dense=(64, 64)), [8, 64], [0], np.array([[1.0], [8.0]]))
    assert one.time(36) == pytest.approx(4.5)


def test_axis_points_are_aligned_and_end_at_the_dense_count():
    pts = axis_points(100, 8, 6)
    assert pts[-1] == 100 and pts[0] == 8 and all(p % 8 == 0 for p in pts[:-1])
    assert pts[-2] == 96 and len(pts) == 7  # six aligned counts, and the unaligned dense count itself
    assert axis_points(8, 8, 6) == [8] and axis_points(3, 8, 6) == [3]
    assert axis_points(256, 16, 4, lowest=128) == [128, 176, 208, 256]


def test_table_round_trips_and_refuses_another_environment(tmp_path):
    graph = _graph(_net())
    table = synthetic_table(graph)
    table.save(tmp_path)
    back = load_table(tmp_path, expect=table.key)
    assert back.to_dict() == table.to_dict()
    other = TableKey("onnxruntime", "9.9", "another cpu", 4)
    with pytest.raises(LatencyError) as err:
        load_table(tmp_path, expect=other)
    assert table.key.describe() in str(err.value) and other.describe() in str(err.value)


@pytest.mark.parametrize("text, expected", [
    ("{not json", "not readable JSON"),
    (json.dumps({"format": "something else"}), "not a trt_prune latency table"),
    (json.dumps({"format": "trt_prune.latency_table", "version": 99}), "version 99"),
    (json.dumps({"format": "trt_prune.latency_table", "version": 1, "key": {"backend": "x"}}), "environment key"),
    (json.dumps({"format": "trt_prune.latency_table", "version": 1,
                 "key": {"backend": "onnxruntime", "backend_version": "1", "device": "cpu", "threads": 1},
                 "entries": [{"sig": {"op": "conv", "dense": [8, 8]}, "ins": [8], "outs": [8], "ms": [[-1]]}]}),
     "malformed"),
])
def test_a_corrupt_table_is_one_clear_error(tmp_path, text, expected):
    (tmp_path / "latency_table.json").write_text(text)
    with pytest.raises(LatencyError, match=expected):
        load_table(tmp_path)


@pytest.mark.parametrize("value, kind, number", [(0.6, "fraction", 0.6), ("0.25", "fraction", 0.25),
                                                 ("4.5ms", "ms", 4.5), (" 12MS ", "ms", 12.0)])
def test_budgets_parse(value, kind, number):
    assert parse_budget(value) == (kind, number)


@pytest.mark.parametrize("value", [0, 1.0, 1.5, "-3ms", "fast", "0ms", "nanms"])
def test_bad_budgets_are_refused(value):
    with pytest.raises(LatencyError, match="target latency"):
        parse_budget(value)


# ------------------------------------------------------------------------------------ layers and measuring
def test_layer_uses_describe_every_conv_and_linear():
    graph = _graph(_net())
    uses, uncovered = layer_uses(graph)
    by = {u.module: u.sig for u in uses}
    assert uncovered == []
    assert by["c1.0"].op == "conv" and by["c1.0"].dense == (3, 32) and by["c1.0"].spatial == (32, 32)
    assert by["c2.0"].stride == (2, 2) and by["c2.0"].spatial == (32, 32)
    assert by["dw.0"].op == "depthwise" and by["dw.0"].spatial == (16, 16) and by["dw.0"].one_axis
    assert by["fc"].op == "linear" and by["fc"].dense == (32, 10) and by["fc"].spatial == (1,)


@pytest.mark.parametrize("sig, c_in, c_out", [
    (LayerSig("conv", (3, 3), (2, 2), (1, 1), (1, 1), 1, (17, 15), 2, True, (16, 24)), 8, 16),
    (LayerSig("depthwise", (3, 3), (1, 1), (1, 1), (1, 1), 16, (9, 9), 1, False, (16, 16)), 8, 0),
    (LayerSig("grouped", (3, 3), (1, 1), (1, 1), (1, 1), 4, (9, 9), 1, False, (32, 32)), 16, 0),
    (LayerSig("conv_transpose", (2, 2), (2, 2), (0, 0), (1, 1), 1, (8, 8), 1, True, (16, 8)), 16, 8),
    (LayerSig("linear", spatial=(5,), batch=2, bias=True, dense=(32, 24)), 16, 8),
])
def test_single_layer_onnx_computes_what_the_torch_layer_computes(tmp_path, sig, c_in, c_out):
    import onnx
    from onnx import numpy_helper

    path = layer_onnx(sig, c_in, c_out, tmp_path / "l.onnx")
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    module = layer_module(sig, c_in, c_out)
    with torch.no_grad():
        w = torch.from_numpy(weights["W"].copy())
        module.weight.copy_(w.T if sig.op == "linear" else w)
        if module.bias is not None:
            module.bias.copy_(torch.from_numpy(weights["B"].copy()))
    shape = (sig.batch, sig.spatial[0], c_in) if sig.op == "linear" else (sig.batch, c_in, *sig.spatial)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """A real table of Net on ONNX Runtime (3 grid points per axis), calibrated; measured once per module."""
    folder = tmp_path_factory.mktemp("table")
    net = _net()
    graph = _graph(net)
    seen = {}
    table, info = ensure_table(net, graph, SHAPE, location=folder, points=3, threads=1,
                               on_estimate=lambda n, s: seen.update(points=n, estimate=s),
                               on_progress=lambda n: seen.update(done=seen.get("done", 0) + n))
    return folder, net, graph, table, info, seen


def test_a_real_table_is_measured_reported_and_then_reused(measured):
    folder, net, graph, table, info, seen = measured
    assert info["points_measured"] == seen["points"] == seen["done"] > 0 and seen["estimate"] > 0
    assert all(not np.isnan(e.ms).any() and (e.ms >= 0).all() and e.overhead_ms > 0 for e in table.entries.values())
    cal = table.calibrations[LatencyModel(graph, table).key]
    assert cal["dense_measured_ms"] > 0 and cal["half_activation_fraction"] < 0.8
    # the fc's 10 outputs are the model's output: never on a grid
    fc = next(u for u in layer_uses(graph)[0] if u.module == "fc")
    assert table.entry(fc.sig).outs == [10]
    again, info2 = ensure_table(net, graph, SHAPE, location=folder, points=3, threads=1)
    assert info2["points_measured"] == 0 and not info2["calibrated"]
    assert again.to_dict()["entries"] == table.to_dict()["entries"]
    assert load_table(folder, expect=environment_key("onnxruntime", 1)).key == table.key


def test_the_model_predicts_the_dense_latency_it_was_calibrated_on(measured):
    _, _, graph, table, _, _ = measured
    lm = LatencyModel(graph, table)
    cal = table.calibrations[lm.key]
    assert lm.predict() == pytest.approx(cal["dense_measured_ms"], rel=1e-3)
    half = graph.kept_mask({g.key: list(range(g.size // 2)) for g in _prunable(graph, PruneConfig())[0]})
    assert lm.predict(half) < lm.predict()


# --------------------------------------------------------------------------------------------- planning
def test_the_plan_meets_the_budget_and_its_prediction_is_the_models():
    net = _net()
    graph = _graph(net)
    lm = LatencyModel(graph, synthetic_table(graph))
    groups, _ = _prunable(graph, PruneConfig(round_to=8))
    scores = {g.key: np.random.default_rng(1).random(g.size) for g in groups}
    planner = LatencyPlanner(lm, groups, round_to=8, max_ratio=None)  # uncapped: budgets down to 0.4
    for frac in (0.9, 0.6, 0.4):
        plan, info = planner.plan(scores, frac * lm.predict())
        predicted = lm.predict(graph.kept_mask(plan))
        assert predicted == pytest.approx(info["predicted_ms"], abs=1e-4)
        assert predicted <= frac * lm.predict() + 1e-9
        assert predicted >= 0.9 * frac * lm.predict()  # tight: the repair gives back what fits
        assert all(len(k) % 8 == 0 for k in plan.values())
    capped, _ = LatencyPlanner(lm, groups, round_to=8).plan(scores, 0.6 * lm.predict())  # default: max_ratio 0.5
    sizes = {g.key: g.size for g in groups}
    assert capped and all(len(keep) >= sizes[key] // 2 for key, keep in capped.items())


def test_the_planner_cuts_where_latency_is_and_keeps_the_important_channels():
    graph = _graph(_net())
    groups, _ = _prunable(graph, PruneConfig(round_to=8))
    key_c2 = next(g.key for g in groups if "c2.0" in g.producers)
    key_c1 = next(g.key for g in groups if "c1.0" in g.producers)
    key_c3 = next(g.key for g in groups if "c3.0" in g.producers)
    # the depthwise conv dominates and only c2's group (which it shares) shrinks it: the budget comes from there
    table = synthetic_table(graph, per_layer={"dw.0": 5.0})
    lm = LatencyModel(graph, table)
    scores = {g.key: np.linspace(1.0, 2.0, g.size) for g in groups}
    plan, _ = LatencyPlanner(lm, groups, round_to=8).plan(scores, 0.6 * lm.predict())
    kept = {k: len(plan.get(k, range(g.size))) / g.size for k, g in ((g.key, g) for g in groups)}
    assert kept[key_c2] < 0.7 and kept[key_c1] == kept[key_c3] == 1.0
    assert plan[key_c2] == list(range(64 - len(plan[key_c2]), 64))  # the highest scores stay


def test_concave_utilities_spread_the_cuts_over_more_groups():
    graph = _graph(_net())
    lm = LatencyModel(graph, synthetic_table(graph))
    groups, _ = _prunable(graph, PruneConfig(round_to=8))
    scores = {g.key: np.ones(g.size) for g in groups}
    budget = 0.6 * lm.predict()
    cut, kept = {}, {}
    for utility in ("linear", "log", "quadratic"):
        plan, info = LatencyPlanner(lm, groups, round_to=8, max_ratio=None, utility=utility).plan(scores, budget)
        assert info["utility"] == utility and info["predicted_ms"] <= budget + 1e-9
        cut[utility], kept[utility] = len(plan), info["importance_kept"]
    # linear maximises the mean share kept by cutting one group deep; the concave values cut more groups less
    assert cut["linear"] == 1 < cut["log"] <= cut["quadratic"] == 3
    assert kept["linear"] == max(kept.values())
    with pytest.raises(LatencyError, match="unknown planner utility 'cubic'; choose one of linear, log, quadratic"):
        LatencyPlanner(lm, groups, utility="cubic")
    with pytest.raises(PruneError, match="latency_utility must be one of linear, log, quadratic, got 'cubic'"):
        PruneConfig(target_latency=0.6, latency_utility="cubic").validate()


def test_the_repair_drops_the_least_important_chunk_per_millisecond_first():
    # the knapsack's linearisation can land over budget; the repair then drops chunks one at a time. c1's last
    # 8 channels are nearly worthless, every other group's channels are equal: one chunk over, c1's goes.
    from trt_prune.latency.planner import _options

    graph = _graph(_net())
    lm = LatencyModel(graph, synthetic_table(graph))
    groups, _ = _prunable(graph, PruneConfig(round_to=8))
    key_c1 = next(g.key for g in groups if "c1.0" in g.producers)
    scores = {g.key: np.ones(g.size) for g in groups}
    scores[key_c1][:8] = 1e-3
    planner = LatencyPlanner(lm, groups, round_to=8, max_ratio=None)
    st = [_options(g, scores[g.key], 8, None) for g in groups]
    planner._sort_ranks(st)
    full = {i: int(s.options[-1]) for i, s in enumerate(st)}
    ks = planner._repair(st, full, planner.predict(full, st) - 1e-6)
    dropped = {groups[i].key: full[i] - k for i, k in ks.items() if k != full[i]}
    assert dropped == {key_c1: 8}


def test_a_budget_below_the_smallest_model_names_the_smallest_latency():
    graph = _graph(_net())
    lm = LatencyModel(graph, synthetic_table(graph))
    groups, _ = _prunable(graph, PruneConfig(round_to=8))
    planner = LatencyPlanner(lm, groups, round_to=8, max_ratio=None)
    floor = lm.predict(graph.kept_mask({g.key: list(range(8)) for g in groups}))
    with pytest.raises(LatencyError, match=rf"smallest this model reaches .* is {floor:.3f} ms"):
        planner.plan({g.key: np.ones(g.size) for g in groups}, 0.5 * floor)


def test_prune_to_a_latency_budget_end_to_end(measured):
    _, net, graph, table, _, _ = measured
    result = prune(net, SHAPE, target_latency=0.7, latency_table=table, round_to=8)
    lat = result.report["latency"]
    assert lat["predicted_ms"] <= lat["budget_ms"] + 1e-9
    assert lat["budget_ms"] == pytest.approx(0.7 * lat["dense_ms"], rel=1e-4)
    assert result.report["macs_after"] < result.report["macs_before"]
    assert result.recipe["config"]["target_latency"] == 0.7
    replayed = apply_recipe(net, result.recipe)
    x = torch.rand(SHAPE)
    with torch.no_grad():
        assert torch.equal(replayed(x), result.model(x))
    with pytest.raises(PruneError, match="one of target_macs, target_params and target_latency"):
        prune(net, SHAPE, target_latency=0.7, target_macs=0.5, latency_table=table)
    with pytest.raises(LatencyError, match="cannot be met"):
        prune(net, SHAPE, target_latency="0.001ms", latency_table=synthetic_table(graph))


def test_gradual_pruning_to_a_latency_budget_shrinks_along_the_schedule():
    torch.manual_seed(0)
    net = _net().train()
    graph = _graph(_net())
    table = synthetic_table(graph)
    pruner = ChannelPruner(net, SHAPE, target_latency=0.5, latency_table=table, importance="l1",
                           schedule=Schedule(steps=6, every=2)).prepare()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    for _ in range(6):
        loss = net(torch.rand(2, 3, 32, 32)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()
    targets = [h["target_latency_ms"] for h in pruner.history]
    predicted = [h["predicted_ms"] for h in pruner.history]
    assert targets == sorted(targets, reverse=True) and len(targets) == 3
    assert all(p <= t + 1e-9 for p, t in zip(predicted, targets, strict=True))
    assert targets[-1] == pytest.approx(0.5 * pruner.dense_ms, rel=1e-4)
    net.eval()
    x = torch.rand(SHAPE)
    with torch.no_grad():
        masked = net(x)
    result = pruner.squash()
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), masked, atol=1e-5, rtol=1e-5)
    with pytest.raises(PruneError, match="cannot be reached"):
        ChannelPruner(_net(), SHAPE, target_latency="0.01ms", latency_table=table, schedule=4).prepare()
    with pytest.raises(PruneError, match="latency_table"):
        ChannelPruner(_net(), SHAPE, target_latency=0.5, schedule=4)


# -------------------------------------------------------------------------------------------------- CLI
FACTORY = '''
from torch import nn


def net():
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 4, 1))
'''


def test_cli_builds_a_table_inspects_it_and_prunes_to_a_latency(tmp_path):
    (tmp_path / "m.py").write_text(FACTORY)
    spec, table_dir = f"{tmp_path / 'm.py'}:net", tmp_path / "table"
    runner = CliRunner()
    r = runner.invoke(cli, ["latency-table", spec, "--trust-code", "--input-shape", "1x3x24x24", "--points", "3",
                            "--threads", "1", "-o", str(table_dir), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    built = json.loads(r.stdout)
    assert built["points_measured"] > 0 and built["calibration"]["dense_measured_ms"] > 0
    r = runner.invoke(cli, ["inspect", "latency-table", str(table_dir), "--plot", str(tmp_path / "t.png"), "--json"])
    assert r.exit_code == 0, r.output
    shown = json.loads(r.stdout)
    assert len(shown["entries"]) == built["entries"] and (tmp_path / "t.png").stat().st_size > 1000
    r = runner.invoke(cli, ["prune", spec, "--trust-code", "--input-shape", "1x3x24x24", "--target-latency", "0.7",
                            "--latency-table", str(table_dir), "-o", str(tmp_path / "p"), "--json"])
    # the table was measured with 1 thread; prune measures with all usable cores unless they are 1
    if environment_key("onnxruntime").threads != 1:
        assert r.exit_code == 2 and "was measured with" in r.stderr and "but this run uses" in r.stderr
        assert not (tmp_path / "p").exists()
    else:
        assert r.exit_code == 0, r.output
        lat = json.loads(r.stdout)["latency"]
        assert lat["predicted_ms"] <= lat["budget_ms"]


def test_cli_refuses_bad_latency_options(tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli, ["prune", "builtin:demo-detector", "--latency-table", str(tmp_path), "-o",
                            str(tmp_path / "p")])
    assert r.exit_code == 2 and "--target-latency" in r.stderr
    r = runner.invoke(cli, ["prune", "builtin:demo-detector", "--target-latency", "fast", "-o", str(tmp_path / "p")])
    assert r.exit_code == 2 and "neither a fraction" in r.stderr
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "latency_table.json").write_text("{broken")
    r = runner.invoke(cli, ["inspect", "latency-table", str(tmp_path / "t")])
    assert r.exit_code == 2 and "not readable JSON" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "p").exists()


# ---------------------------------------------------------------------------------------- 2:4 where it pays
def test_sparse_grids_round_trip_and_decide_where_24_pays(tmp_path):
    from trt_prune.latency import sparse_choice
    from trt_prune.latency.measure import wants_sparse

    graph = _graph(_net())
    table = synthetic_table(graph)
    assert sparse_choice(LatencyModel(graph, table)) is None  # a CPU table: the channel floor decides
    slow = {"c1.0", "fc"}  # here the sparse kernel is slower; elsewhere 30 % faster
    uses = {u.sig.key(): u for u in layer_uses(graph)[0]}
    for key, e in table.entries.items():
        e.sparse_ms = e.ms * (1.2 if uses[key].module in slow else 0.7)
    table.save(tmp_path)
    back = load_table(tmp_path)
    assert all(np.allclose(back.entries[k].sparse_ms, e.sparse_ms, atol=1e-6) for k, e in table.entries.items())
    rows = {r["module"]: r for r in sparse_choice(LatencyModel(graph, back))}
    assert {m for m, r in rows.items() if r["pays"]} == {"c2.0", "dw.0", "c3.0"}
    assert rows["c2.0"]["sparse_ms"] == pytest.approx(0.7 * rows["c2.0"]["dense_ms"], rel=1e-3)
    assert not wants_sparse(TableKey("onnxruntime", "1", "cpu", 2, "float16"))
    assert wants_sparse(TableKey("torch", "2", "gpu", 1, "float16"))
    assert not wants_sparse(TableKey("torch", "2", "cpu", 1, "float32"))


def test_the_sparse_grid_is_measured_through_the_same_code_path():
    """On a GPU backend the second grid runs sparse kernels; here ONNX Runtime runs the 2:4 weights densely, so
    the code path is exercised and both grids are real measurements of the same layer."""
    from trt_prune.latency.measure import measure, plan_measurements

    graph = _graph(_net())
    uses = [u for u in layer_uses(graph)[0] if u.module == "c3.0"]
    table = LatencyTable(environment_key("onnxruntime", 1))
    todo = plan_measurements(table, uses, np.ones(len(graph.root), bool), 8, points=2, sparse=True)
    measure(table, todo, rounds=2, iterations=2)
    entry = table.entry(uses[0].sig)
    assert entry.ins == [8, 64] and entry.outs == [8, 32]
    assert not np.isnan(entry.sparse_ms).any() and entry.sparse_ms.shape == entry.ms.shape
    assert entry.missing() == []


def test_prune_then_sparsify_puts_24_only_where_the_table_says_it_pays():
    from trt_prune.sparsity.combined import prune_then_sparsify
    from trt_prune.sparsity.pattern import holds_2of4

    net = _net()
    graph = _graph(net)
    table = synthetic_table(graph)
    uses = {u.sig.key(): u for u in layer_uses(graph)[0]}
    for key, e in table.entries.items():  # 2:4 faster only on the 1x1 conv
        e.sparse_ms = e.ms * (0.6 if uses[key].module == "c3.0" else 1.3)
    result = prune_then_sparsify(net, SHAPE, target_latency=0.7, latency_table=table, round_to=8)
    assert result.sparsify.sparse_layers == ["c3.0"]
    rows = {r["module"]: r for r in result.layers}
    assert "pays" in rows["c3.0"]["reason"] and "does not pay" in rows["c2.0"]["reason"]
    w = dict(result.model.named_modules())["c3.0"].weight.detach().numpy()
    assert holds_2of4(w.reshape(w.shape[0], -1), axis=1)
    for e in table.entries.values():
        e.sparse_ms = e.ms * 1.3
    with pytest.raises(SparsifyError, match="pays on no layer"):
        prune_then_sparsify(net, SHAPE, target_latency=0.7, latency_table=table, round_to=8)


def test_the_torch_backend_measures_through_the_same_code_path(tmp_path):
    """The GPU tables come from the torch backend (fp16 on CUDA there); on the CPU the same calls run in fp32."""
    net = _net()
    graph = _graph(net)
    table, info = ensure_table(net, graph, SHAPE, backend="torch", location=tmp_path, points=2, threads=1)
    assert table.key.backend == "torch" and info["points_measured"] > 0
    assert all(not np.isnan(e.ms).any() for e in table.entries.values())
    lm = LatencyModel(graph, table)
    assert lm.predict() == pytest.approx(table.calibrations[lm.key]["dense_measured_ms"], rel=1e-3)
    with pytest.raises(LatencyError, match="but this run uses"):  # an ONNX Runtime run refuses the torch table
        load_table(tmp_path, expect=environment_key("onnxruntime", 1))
