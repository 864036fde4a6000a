"""Regression benchmarks end to end on ONNX Runtime: suites, the store, planted work, stored and live comparisons,
exit codes. Effects are made large (40 % or more) so the verdicts do not depend on this machine's noise; the
calibration of small effects is a benchmark (bench/calibrate_regression.py), not a test."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from trt_prune.cli import cli
from trt_prune.errors import BenchError
from trt_prune.exporter import export_onnx
from trt_prune.onnx_io import node_module, run_onnxruntime
from trt_prune.regression.planted import PLANTED_OUTPUT, plant_work
from trt_prune.regression.runner import exit_code, parse_ref
from trt_prune.regression.store import Store
from trt_prune.regression.suite import load_suite

# These tests decide verdicts from measured latency: they run alone (make test runs them after the parallel
# part), so another test's load on the same 2 cores cannot move them.
pytestmark = pytest.mark.timing

SUITE = """
name: test
backends: [onnxruntime]
batches: [1]
threads: 1
blocks: 6
per_block: 8
accuracy_images: 16
entries:
  - model: builtin:demo-detector
    input_shape: [1, 3, 256, 256]
    variants:
      dense: {}
      fast: {prune: {ratio: 0.3, round_to: 16}}
      slowed: {planted_steps: 400}
"""


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    (folder / "suite.yaml").write_text(SUITE)
    store = folder / "runs.sqlite"
    res = run("bench", "run", folder / "suite.yaml", "--store", store, "--name", "base", "--json")
    assert res.exit_code == 0, res.output + res.stderr
    return store, json.loads(res.stdout)


def _compare(store, baseline, candidate, *extra):
    res = run("bench", "compare", "--store", store, "--baseline", baseline, "--candidate", candidate, "--json",
              *extra)
    assert res.exit_code in (0, 1), res.output + res.stderr
    return res.exit_code, json.loads(res.stdout)


def test_run_records_every_variant_with_blocks_accuracy_and_layers(recorded):
    store, summary = recorded
    assert summary["run"] == "base" and {r["variant"] for r in summary["results"]} == {"dense", "fast", "slowed"}
    results = {r.variant: r for r in Store(store).results("base")}
    for r in results.values():
        assert len(r.blocks) == 6 and all(len(b) == 8 for b in r.blocks)
        assert r.p50_ms == pytest.approx(float(np.median(np.concatenate(r.blocks))))
        assert r.profile["per_layer"] and r.env["backend"] == "onnxruntime" and r.env["threads"] == 1
    # same detections for the dense graph with planted work; a 30 % prune without re-training loses them
    assert results["slowed"].accuracy == pytest.approx(results["dense"].accuracy)
    assert results["dense"].accuracy > 50 > results["fast"].accuracy + 20
    with sqlite3.connect(store) as conn:  # one row per measurement block
        assert conn.execute("SELECT COUNT(*) FROM blocks").fetchone()[0] == 3 * 6


def test_slowed_variant_is_a_regression_naming_the_planted_layers(recorded):
    store, _ = recorded
    code, result = _compare(store, "base:dense", "base:slowed")
    assert code == 1 and result["verdict"] == "regression"
    assert result["ratio"] > 1.2 and result["ci"][0] > 1.0 and result["p_value"] < 0.05
    assert result["layers"][0]["key"] == PLANTED_OUTPUT and result["layers"][0]["base_ms"] is None
    assert result["accuracy"]["drop"] == pytest.approx(0.0) and result["accuracy"]["verdict"] is None
    assert set(result) >= {"verdict", "ratio", "ci", "p_value", "accuracy", "layers"}


def test_faster_but_less_accurate_is_a_regression_unless_the_bar_allows_it(recorded):
    store, _ = recorded
    code, result = _compare(store, "base:dense", "base:fast")
    assert result["speed_verdict"] == "improvement" and result["ratio"] < 0.9
    assert code == 1 and result["verdict"] == "regression" and result["accuracy"]["verdict"] == "regression"
    code, result = _compare(store, "base:dense", "base:fast", "--max-accuracy-drop", "100")
    assert code == 0 and result["verdict"] == "improvement"


def test_history_and_stored_errors(recorded, tmp_path):
    store, _ = recorded
    res = run("bench", "history", "--store", store, "--json")
    assert res.exit_code == 0
    rows = json.loads(res.stdout)["results"]
    assert [r["variant"] for r in rows] == ["dense", "fast", "slowed"] and rows[0]["run"] == "base"
    from trt_prune.profiling.profile import machine_info

    assert {r["machine"] for r in rows} == {machine_info()["cpu"]}  # no GPU here: the CPU names the machine
    res = run("bench", "compare", "--store", store, "--baseline", "base:dense", "--candidate", "nope:dense")
    assert res.exit_code == 2 and "'nope:dense' is not a run" in res.stderr
    res = run("bench", "compare", "--store", store, "--baseline", "base:dense", "--candidate", "base:missing")
    assert res.exit_code == 2 and "has no variant 'missing'" in res.stderr
    res = run("bench", "compare", "--store", store, "--baseline", "base:dense", "--candidate", "base:slowed",
              "--backend", "torch")  # the run holds onnxruntime results only
    assert res.exit_code == 2 and "on backend 'torch'" in res.stderr
    with pytest.raises(BenchError, match="already has a run named 'base'"):
        Store(store).add_run("base", "t", None, "s", {}, {}, [])


# ------------------------------------------------------------------------------------------------ the store file
def _one_result(**overrides):
    return {"entry": "builtin:demo-detector", "variant": "dense", "backend": "onnxruntime", "batch": 1,
            "p50_ms": 5.0, "p99_ms": 6.0, "mean_ms": 5.2, "images_s": 192.3, "accuracy": 31.2,
            "profile": {"per_layer": []}, "env": {"cpu": "test cpu"}, "blocks": [[5.0, 5.1], [4.9, 5.0, 5.2]],
            **overrides}


def _user_version(path):
    with sqlite3.connect(path) as conn:
        return conn.execute("PRAGMA user_version").fetchone()[0]


def _set_user_version(path, version):
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {version}")
    conn.commit()
    conn.close()


def test_store_records_its_schema_version(tmp_path):
    from trt_prune.regression.store import SCHEMA_VERSION

    path = tmp_path / "runs.sqlite"
    store = Store(path)
    store.add_run("a", "2025-01-01T00:00:00Z", "abc1234", "suite", {}, {}, [_one_result()])
    assert SCHEMA_VERSION == 1 and _user_version(path) == 1 and store.schema_version() == 1
    [result] = store.results("a")
    assert result.blocks == [[5.0, 5.1], [4.9, 5.0, 5.2]] and result.env == {"cpu": "test cpu"}
    assert result.p50_ms == 5.0 and result.accuracy == 31.2


def test_store_from_before_versions_reads_as_version_1_and_is_stamped_on_write(tmp_path):
    path = tmp_path / "old.sqlite"
    Store(path).add_run("a", "2025-01-01T00:00:00Z", None, "suite", {}, {}, [_one_result()])
    _set_user_version(path, 0)  # what every store written before the version existed holds
    store = Store(path)
    assert store.run_names() == ["a"] and store.schema_version() == 1
    assert _user_version(path) == 0  # reading changes nothing
    store.add_run("b", "2025-01-02T00:00:00Z", None, "suite", {}, {}, [_one_result(variant="fast")])
    assert _user_version(path) == 1 and store.run_names() == ["a", "b"]
    assert [r.variant for r in store.results("b")] == ["fast"]


def test_store_of_a_newer_version_is_refused(tmp_path):
    path = tmp_path / "new.sqlite"
    Store(path).add_run("a", "2025-01-01T00:00:00Z", None, "suite", {}, {}, [_one_result()])
    _set_user_version(path, 2)
    for action in (lambda s: s.run_names(), lambda s: s.add_run("b", "t", None, "s", {}, {}, [])):
        with pytest.raises(BenchError) as info:
            action(Store(path))
        message = str(info.value)
        assert f"result store {str(path)!r} has schema version 2, written by a newer trt_prune" in message
        assert "reads and writes version 1: upgrade trt_prune" in message and "--store NEW.sqlite" in message
    assert _user_version(path) == 2  # untouched
    _set_user_version(path, 1)
    assert Store(path).run_names() == ["a"]  # nothing was added by the refused write


def test_store_files_that_are_not_stores(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(BenchError, match=r"junk.sqlite' is not an SQLite database \(it starts with b'not a databa'\)"):
        Store(junk).run_names()
    with pytest.raises(BenchError, match="is not an SQLite database"):
        Store(junk).add_run("a", "t", None, "s", {}, {}, [])
    assert junk.read_bytes() == b"not a database at all" * 100
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE photos (id INTEGER, path TEXT)")
    with pytest.raises(BenchError) as info:
        Store(other).add_run("a", "t", None, "s", {}, {}, [])
    assert "is an SQLite database but not a trt-prune result store (its tables are ['photos']; a store has " \
           "['blocks', 'results', 'runs'])" in str(info.value)
    with sqlite3.connect(other) as conn:  # nothing of ours was added to someone else's database
        assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master")] == ["photos"]
    half = tmp_path / "half.sqlite"
    with sqlite3.connect(half) as conn:
        conn.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY, name TEXT)")
    with pytest.raises(BenchError, match=r"lacks tables or columns \{'runs': \['created', 'env_json'"):
        Store(half).run_names()
    folder = tmp_path / "folder.sqlite"
    folder.mkdir()
    with pytest.raises(BenchError, match="is not a file"):
        Store(folder).add_run("a", "t", None, "s", {}, {}, [])


def test_damaged_store_is_one_error(tmp_path):
    path = tmp_path / "runs.sqlite"
    Store(path).add_run("a", "2025-01-01T00:00:00Z", None, "suite", {}, {}, [_one_result()])
    data = path.read_bytes()
    cut = tmp_path / "cut.sqlite"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(BenchError, match="is not usable .*restore it from a copy"):
        Store(cut).results("a")
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE results SET profile_json = '{\"per_layer\": ['")
    with pytest.raises(BenchError, match=r"the profile of result 1 \(builtin:demo-detector / dense / onnxruntime / "
                                         r"batch 1\) of run 'a' is not readable JSON"):
        Store(path).results("a")


# ------------------------------------------------------------------------------------------------ planted work
@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("small") / "small.onnx"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    export_onnx(model, path, (1, 3, 64, 64))
    return path


def test_planted_work_keeps_outputs_and_names_its_module(small_onnx, tmp_path):
    model = onnx.load(str(small_onnx))
    planted = plant_work(model, 5)
    onnx.checker.check_model(planted)
    x = {"images": np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)}
    base, slow = run_onnxruntime(model, x), run_onnxruntime(planted, x)
    assert set(slow) == {*base, PLANTED_OUTPUT}
    np.testing.assert_array_equal(slow["output"], base["output"])
    added = [n for n in planted.graph.node if n.name.startswith("planted/")]
    assert sum(n.op_type == "MatMul" for n in added) == 5
    assert {node_module(n) for n in added} == {PLANTED_OUTPUT}
    assert len(plant_work(model, 0).graph.node) == len(model.graph.node)
    with pytest.raises(BenchError, match="steps must be an integer"):
        plant_work(model, -1)


def test_live_compare_of_files_with_exit_codes(small_onnx, tmp_path):
    slow = tmp_path / "slow.onnx"
    onnx.save(plant_work(onnx.load(str(small_onnx)), 300), str(slow))
    res = run("bench", "compare", "--baseline", small_onnx, "--candidate", slow, "--store", tmp_path / "none.sqlite",
              "--max-blocks", "16", "--json")
    assert res.exit_code == 1, res.output + res.stderr
    result = json.loads(res.stdout)
    assert result["verdict"] == "regression" and result["mode"] == "live, interleaved"
    assert result["accuracy"] is None and result["environment"]["differences"] == []
    assert result["layers"][0]["key"] == PLANTED_OUTPUT
    assert not (tmp_path / "none.sqlite").exists()  # a live comparison stores nothing


# ------------------------------------------------------------------------------------------------ suites
@pytest.mark.parametrize("text, needle", [
    ("entries: []", "entries: must be a non-empty list"),
    ("entries: [{model: builtin:demo-detector, variants: {a: {prune: {ratio: 1.5}}}}]",
     "entries[0].variants.a.prune: needs ratio"),
    ("entries: [{model: builtin:demo-detector, variants: {a: {path: nowhere/}}}]",
     "entries[0].variants.a.path: 'nowhere/' does not exist"),
    ("entries: [{model: builtin:demo-detector, variants: {a: {quantize: {}}}}]", "unknown variant kind 'quantize'"),
    ("backends: [openvino]\nentries: [{model: x}]", "unknown backend 'openvino'"),
    ("blocks: 1\nentries: [{model: x}]", "blocks: must be at least 2"),
    ("colour: red\nentries: [{model: x}]", "unknown key(s) ['colour']"),
    ("entries: [unclosed", "not readable YAML"),
])
def test_bad_suites_name_the_place(tmp_path, text, needle):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(BenchError) as info:
        load_suite(path)
    assert needle in str(info.value)
    res = run("bench", "run", path, "--store", tmp_path / "s.sqlite")
    assert res.exit_code == 2 and needle in res.stderr and not (tmp_path / "s.sqlite").exists()


def test_refs_and_exit_codes():
    assert parse_ref("nightly") == ("nightly", None) and parse_ref("nightly:dense") == ("nightly", "dense")
    assert [exit_code({"verdict": v}) for v in ("regression", "improvement", "no change", "inconclusive")] == \
        [1, 0, 0, 0]
