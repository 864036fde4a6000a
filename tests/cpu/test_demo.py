"""The demo end to end with tiny settings: every artifact the spine promises, with real values."""

from __future__ import annotations

import json

import pytest

from trt_prune.demo import QUICK, DemoSettings, run_demo

# INT8: minmax on 8 scenes keeps the test short (entropy's KL search costs about a minute per model whatever the
# sample count; the quantizer's own tests cover it)
TINY = DemoSettings(eval_images=24, finetune_steps=2, finetune_batch=2, finetune_img=320, finetune_lr=1e-4,
                    rounds=2, iterations_per_round=3, layer_runs=2, bn_batches=2, int8_calib_size=8,
                    int8_method="minmax")
INT8 = ("int8", "structured+sparse24+int8")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, settings=TINY)


def test_report_contract(demo):
    out, report = demo
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["model"] == "builtin:demo-detector" and on_disk["backend"] == "onnxruntime"
    assert on_disk["env"]["backend_version"] and on_disk["env"]["threads"] >= 1
    names = [v["name"] for v in on_disk["variants"]]
    assert names == ["dense", "structured", "sparse24", "structured+sparse24", "structured-gradual", *INT8]
    keys = {"name", "params", "macs", "map50_95", "map50", "map50_95_finetuned", "latency_ms", "throughput_ips",
            "onnx", "per_layer"}
    for v in on_disk["variants"]:
        assert keys <= set(v)
        assert {"p50", "p90", "p99", "mean"} <= set(v["latency_ms"])
        assert 0 < v["latency_ms"]["p50"] <= v["latency_ms"]["p99"]
        assert v["throughput_ips"] > 0
        assert (out / "onnx" / v["onnx"].split("/")[-1]).is_file()
        assert {"name", "op", "ms"} <= set(v["per_layer"][0])
        assert v["speedup_p50"] > 0
        if v["name"] in INT8:  # no torch model: no export parity, no fine-tune score; the ORT score is its own
            assert v["parity"] == {} and v["map50_95_finetuned"] is None and v["int8"]["accuracy"] == "onnxruntime"
            continue
        assert v["int8"] is None and v["derived_from"] is None
        assert v["parity"]["max_abs"] < 1e-3
        # the deployed ONNX scores what the fine-tuned torch model scores
        assert abs(v["map50_95_onnx"] - v["map50_95_finetuned"]) < 0.01


def test_variants_are_what_they_claim(demo):
    _, report = demo
    v = {r["name"]: r for r in report["variants"]}
    assert 0.4 <= v["structured"]["macs"] / v["dense"]["macs"] <= 0.6
    assert v["structured"]["params"] < 0.6 * v["dense"]["params"]
    assert v["sparse24"]["sparse_layers"] > 30 and v["dense"]["sparse_layers"] == 0
    assert v["structured+sparse24"]["macs"] == v["structured"]["macs"]
    # pruned while training to the same MACs target: no score before training, one after
    assert abs(v["structured-gradual"]["macs"] - v["structured"]["macs"]) < 0.08 * v["dense"]["macs"]
    assert v["structured-gradual"]["map50_95"] is None and v["structured-gradual"]["map50_95_finetuned"] >= 0
    assert v["structured-gradual"]["finetune"]["steps"] == TINY.finetune_steps
    # the masked fine-tune kept every 2:4 zero, and each sparse layer's weight holds 2:4 in the cleaned ONNX
    for name in ("sparse24", "structured+sparse24"):
        assert v[name]["masks_intact"] is True
        assert v[name]["onnx_24_weights"] == v[name]["sparse_layers"]
    assert v["dense"]["masks_intact"] is None and v["dense"]["onnx_24_weights"] == 0
    # the shipped weights detect: the dense model scores far above chance on the validation scenes
    assert v["dense"]["map50_95"] > 0.6


def test_int8_variants(demo):
    out, report = demo
    import onnx

    from trt_prune.artifacts import OnnxArtifact

    v = {r["name"]: r for r in report["variants"]}
    for name, source in zip(INT8, ("dense", "structured+sparse24"), strict=True):
        row, q = v[name], v[name]["int8"]
        assert row["derived_from"] == q["source"] == source
        assert q["method"] == "minmax" and q["calib_samples"] == TINY.int8_calib_size
        assert q["calibration_seconds"] >= 0 and q["quantized_layers"] > 30 and q["qdq_pairs"] > 0
        assert all(k["reason"] for k in q["kept"]) and len(q["kept"]) == q["kept_layers"]
        assert all(a["sqnr_db"] > 15 for a in q["agreement"].values())  # about 3 % relative error at most
        # the same network, stored in INT8: the source's params, MACs and 2:4 layers, scored in ONNX Runtime
        assert (row["params"], row["macs"], row["sparse_layers"]) == (v[source]["params"], v[source]["macs"],
                                                                       v[source]["sparse_layers"])
        assert abs(row["map50_95_onnx"] - v[source]["map50_95_onnx"]) < 0.1
        assert row["latency_ms"]["p50"] > 0 and row["speedup_p50"] == pytest.approx(
            v["dense"]["latency_ms"]["p50"] / row["latency_ms"]["p50"])
        assert row["per_layer_sum_ms"] > 0
        path = out / "onnx" / row["onnx"].split("/")[-1]
        ops = {n.op_type for n in onnx.load(str(path)).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        assert [s["stage"] for s in OnnxArtifact.read(path).steps] == ["export", "clean", "quantize"]
    assert v["int8"]["map50_95_onnx"] > 0.5  # the dense model in INT8 still detects (structured ones barely trained)
    # zeros stay zeros: the 2:4 weights still hold the pattern behind their DequantizeLinear
    assert v["structured+sparse24+int8"]["onnx_24_weights"] == v["structured+sparse24"]["onnx_24_weights"]
    html = (out / "report.html").read_text()
    assert "INT8 variants" in html and "structured+sparse24+int8" in html
    assert any(n.startswith("int8 and structured+sparse24+int8:") for n in report["notes"])


def test_plots_recipe_and_self_contained_html(demo):
    out, _ = demo
    for png in ("latency.png", "slowest_layers.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["format"] == "trt_prune.recipe" and recipe["groups"]
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2
    assert "http://" not in html and "https://" not in html and "<script src" not in html


def test_quick_settings_are_lighter_than_full():
    from trt_prune.demo import FULL

    assert QUICK.eval_images < FULL.eval_images and QUICK.finetune_steps < FULL.finetune_steps
    assert (QUICK.int8_calib_size, FULL.int8_calib_size) == (32, 256)
    # entropy (TensorRT's default) for the full demo; --quick takes percentile: entropy's threshold search alone
    # takes about 70 s on 2 cores whatever the sample count
    assert (QUICK.int8_method, FULL.int8_method) == ("percentile", "entropy")


def test_one_line_for_unstable_timings_and_onnx_provenance(demo):
    out, report = demo
    unstable = [r["name"] for r in report["variants"] if r["cv_warning"]]
    cv_notes = [n for n in report["notes"] if "coefficient of variation" in n]
    assert len(cv_notes) == (1 if unstable else 0)  # one line for the run, naming each unstable variant
    assert all(name in cv_notes[0] for name in unstable)
    from trt_prune.artifacts import OnnxArtifact

    artifact = OnnxArtifact.read(out / "onnx" / "structured.onnx")  # the stages stamped what made the file
    assert [s["stage"] for s in artifact.steps] == ["export", "clean"] and artifact.input_shape == (1, 3, 320, 320)
