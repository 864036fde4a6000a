"""The command-line contract: every command, its --json keys, and one clear exit-2 error per bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from trt_prune.cli import cli


def run(*args, ok=True):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output + result.stderr
    return result


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """prune → sparsify → export → clean through model folders, as a user would chain them."""
    out = tmp_path_factory.mktemp("chain")
    pruned = json.loads(run("prune", "builtin:demo-detector", "--ratio", "0.5", "--round-to", "8",
                            "--input-shape", "1x3x320x320", "--out", out / "pruned", "--json").stdout)
    sparse = json.loads(run("sparsify", out / "pruned", "--min-channels", "32", "--out", out / "sparse",
                            "--json").stdout)
    exported = json.loads(run("export", out / "sparse", "-o", out / "model.onnx", "--json").stdout)
    cleaned = json.loads(run("clean", out / "model.onnx", "-o", out / "clean.onnx", "--json").stdout)
    return out, pruned, sparse, exported, cleaned


def test_prune_json_contract(chain):
    out, pruned, *_ = chain
    assert pruned["params_after"] < pruned["params_before"]
    assert pruned["macs_after"] < 0.5 * pruned["macs_before"]
    meta = json.loads((out / "pruned" / "model.json").read_text())
    assert meta["source"] == "builtin:demo-detector" and meta["input_shape"] == [1, 3, 320, 320]
    assert meta["recipe"]["groups"] and (out / "pruned" / "model.safetensors").is_file()


def test_sparsify_json_contract(chain):
    _, _, sparse, *_ = chain
    rows = sparse["layers"]
    assert {"module", "made_24", "reason"} <= set(rows[0])
    assert any(r["made_24"] for r in rows) and any(not r["made_24"] for r in rows)
    assert all(r["reason"] for r in rows)


def test_export_clean_inspect_profile(chain):
    out, _, sparse, exported, cleaned = chain
    assert exported["parity"]["max_abs"] < 1e-3 and exported["parity"]["max_rel"] < 1e-2
    assert cleaned["nodes_after"] <= cleaned["nodes_before"]
    records = json.loads(run("inspect", "sparsity", out / "clean.onnx", "--json").stdout)
    assert {"name", "op", "holds_24", "eligible", "reason"} <= set(records[0])
    holding = sum(r["holds_24"] for r in records)
    assert holding == sparse["sparse_layers"] > 0  # the 2:4 layers survived export and cleaning
    prof = json.loads(run("profile", out / "clean.onnx", "--backend", "onnxruntime", "--batch", "2",
                          "--iterations", "5", "--warmup", "0.1", "--duration", "0", "--layer-runs", "2",
                          "--json").stdout)
    assert set(prof["latency_ms"]) >= {"p50", "p90", "p99", "mean"}
    assert prof["latency_ms"]["p50"] > 0 and prof["throughput_ips"] > 0
    assert {"name", "op", "module", "ms"} <= set(prof["per_layer"][0])
    assert prof["per_layer_sum_ms"] == pytest.approx(sum(r["ms"] for r in prof["per_layer"]))
    modules = {r["module"] for r in prof["per_layer"]}
    assert any(m and m.startswith("backbone.") for m in modules) and any(m and m.startswith("head.")
                                                                         for m in modules)


def test_build_onnxruntime(chain):
    out = chain[0]
    data = json.loads(run("build", out / "clean.onnx", "--backend", "onnxruntime", "--json").stdout)
    assert data["outputs"]["output"] == [1, 8, 2100]


# --- bad input: one clear error, exit code 2, nothing written ------------------------------------------------

def _assert_error(result, *needles):
    assert result.exit_code == 2, result.output
    err = result.stderr
    assert err.startswith("error: ") or "Error:" in err, err
    for n in needles:
        assert n in err, err


def test_unknown_model_spec(tmp_path):
    result = run("prune", "builtin:nope", "--out", tmp_path / "o", ok=False)
    _assert_error(result, "unknown built-in model 'nope'", "demo-detector")
    result = run("export", "what:ever", "-o", tmp_path / "m.onnx", ok=False)
    _assert_error(result, "unknown model spec")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("ratio", ["0", "1", "1.5", "-0.2"])
def test_ratio_outside_unit_interval(tmp_path, ratio):
    result = run("prune", "builtin:demo-detector", "--ratio", ratio, "--out", tmp_path / "o", ok=False)
    _assert_error(result, "ratio must be in (0, 1)", ratio)
    assert not (tmp_path / "o").exists()


def test_missing_corrupt_and_pickled_weights(tmp_path):
    result = run("export", "builtin:demo-detector", "--weights", tmp_path / "nope.safetensors",
                 "-o", tmp_path / "m.onnx", ok=False)
    _assert_error(result, "does not exist")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"{corrupt" * 20)
    result = run("prune", "builtin:demo-detector", "--weights", bad, "--out", tmp_path / "o", ok=False)
    _assert_error(result, "not a readable safetensors")
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "obj": Path("x")}, evil)  # a pathlib object: needs real unpickling
    result = run("sparsify", "builtin:demo-detector", "--weights", evil, "--out", tmp_path / "s", ok=False)
    _assert_error(result, "--allow-pickle")
    # the weights are read before the output folder is made: a failed load leaves nothing behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors", "evil.pt"]


def test_unwritable_output(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    result = run("prune", "builtin:demo-detector", "--out", blocker / "sub", ok=False)
    _assert_error(result, "cannot write to output folder")
    result = run("export", "builtin:demo-detector", "-o", blocker / "m.onnx", ok=False)
    _assert_error(result, "cannot write")
    assert blocker.read_text() == "a file, not a folder"


def test_build_tensorrt_without_tensorrt(chain, tmp_path):
    pytest.importorskip("onnxruntime")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here; this checks the message where it is missing")
    except ImportError:
        pass
    result = run("build", chain[0] / "clean.onnx", "--backend", "tensorrt", "-o", tmp_path / "engine", ok=False)
    _assert_error(result, "tensorrt")
    assert not (tmp_path / "engine").exists()


def test_clean_refuses_corrupt_onnx(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    before = bad.read_bytes()
    result = run("clean", bad, "-o", tmp_path / "out.onnx", ok=False)
    _assert_error(result)
    assert bad.read_bytes() == before and not (tmp_path / "out.onnx").exists()


def test_prune_taylor_global_and_params_target(tmp_path):
    res = json.loads(run("prune", "builtin:demo-detector", "--importance", "taylor", "--taylor-batches", "1",
                         "--global", "--max-ratio", "0.75", "--target-params", "0.5", "--input-shape",
                         "1x3x128x128", "--out", tmp_path / "t", "--json").stdout)
    assert abs(res["params_after"] / res["params_before"] - 0.5) < 0.03
    recipe = json.loads((tmp_path / "t" / "recipe.json").read_text())
    assert recipe["config"]["importance"] == "taylor" and recipe["config"]["global_pruning"] is True
    # global: groups lose different shares, none more than max_ratio
    shares = [1 - len(g["keep"]) / g["channels"] for g in recipe["groups"]]
    assert max(shares) <= 0.75 and max(shares) - min(shares) > 0.2


def test_prune_taylor_needs_a_loss(tmp_path):
    res = run("prune", "torchvision:resnet18", "--importance", "taylor", "--input-shape", "1x3x64x64",
              "--out", tmp_path / "r", ok=False)
    assert res.exit_code == 2
    assert "needs a loss and data" in res.output + res.stderr
    assert not (tmp_path / "r").exists()


def test_sparsify_bad_requests_and_permute(tmp_path):
    # a layer that cannot hold 2:4 asked for by name: 3 input channels
    res = run("sparsify", "builtin:demo-detector", "--layers", "backbone.stem.conv", "--out", tmp_path / "a",
              ok=False)
    _assert_error(res, "'backbone.stem.conv' cannot hold 2:4: input channels per group 3")
    # no eligible layer at all
    res = run("sparsify", "builtin:demo-detector", "--min-channels", "100000", "--out", tmp_path / "b", ok=False)
    _assert_error(res, "no layer of this model is eligible for 2:4")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # named layers below the size floor are honoured; a permutation first is reported per group
    out = json.loads(run("sparsify", "builtin:demo-detector", "--layers", "neck.td3.cv2.conv",
                         "--permute", "0.05", "--out", tmp_path / "c", "--json").stdout)
    assert out["sparse_layers"] == 1 and out["permutation"]


def test_fp16_command(chain, tmp_path):
    import onnx

    out, *_ = chain
    before = (out / "clean.onnx").read_bytes()
    res = json.loads(run("fp16", out / "clean.onnx", "-o", tmp_path / "h.onnx", "--json").stdout)
    assert (out / "clean.onnx").read_bytes() == before  # the input is untouched
    assert res["io_types"] and all(t == "float" for t in res["io_types"].values())
    assert "float16" in res["initializers"]["by_dtype"] and all(p["max_abs"] < 0.05 for p in res["parity"].values())
    model = onnx.load(tmp_path / "h.onnx")
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(before[: len(before) // 3])  # truncated
    _assert_error(run("fp16", bad, "-o", tmp_path / "x.onnx", ok=False))
    assert not (tmp_path / "x.onnx").exists()
