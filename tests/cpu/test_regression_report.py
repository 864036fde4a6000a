"""The benchmark reports: the terminal table of a comparison, the comparison and history HTML pages (offline,
escaped, atomic), on hand-made comparison dicts and history rows; a headless render of the history page."""

from __future__ import annotations

import base64
import copy
import re
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from trt_prune.errors import BenchError, ProfileError
from trt_prune.profiling.result import ProfileResult
from trt_prune.regression.comparison import EMPTY_HISTORY, check_comparison, check_history
from trt_prune.regression.report import (
    comparison_table,
    fmt_ci,
    fmt_ratio,
    write_comparison_html,
    write_history_html,
)

PNG_SIGNATURE = b"\x89PNG"
EVIL = "<script>alert(1)</script>"
ENV_DIFF = "threads: 1 (baseline) vs 2 (candidate)"


def _layers():
    return [
        {"key": "backbone.stage3.conv1", "op": "Conv", "base_ms": 0.812, "other_ms": 1.334, "delta_ms": 0.522,
         "ratio": 1.643},
        {"key": "head.cls", "op": "Conv", "base_ms": 0.401, "other_ms": 0.287, "delta_ms": -0.114,
         "ratio": 0.716},
        {"key": "neck.up.1", "op": "Resize", "base_ms": None, "other_ms": 0.095, "delta_ms": None, "ratio": None},
        {"key": "backbone.stem.0", "op": "Conv+Relu", "base_ms": 0.233, "other_ms": 0.241, "delta_ms": 0.008,
         "ratio": 1.034},
    ]


def _env(threads):
    return {"cpu": "AMD EPYC 7B13", "usable_cores": 2, "backend": "onnxruntime", "backend_version": "1.22.0",
            "threads": threads}


def _comparison(verdict="regression", **overrides):
    result = {
        "verdict": verdict, "speed_verdict": verdict, "ratio": 1.1234, "ci": [1.0812, 1.1698], "p_value": 0.00042,
        "p99": {"ratio": 1.204, "ci": [1.101, 1.318], "verdict": "regression"},
        "latency_ms": {"baseline": {"p50": 5.264, "p99": 6.012}, "candidate": {"p50": 5.913, "p99": 7.239}},
        "accuracy": {"metric": "mAP@[.5:.95] (points)", "baseline": 31.24, "candidate": 30.87, "drop": 0.37,
                     "max_drop": 1.0, "verdict": None},
        "layers": _layers(), "blocks": 16, "samples_per_block": 10, "min_effect": 0.05, "level": 0.95,
        "baseline": "dense.onnx", "candidate": "pruned.onnx", "backend": "onnxruntime",
        "environment": {"baseline": _env(1), "candidate": _env(2), "differences": [ENV_DIFF]},
        "mode": "live, interleaved",
    }
    result.update(overrides)
    return result


def _stored():
    subs = []
    for entry, ratio, ci, verdict in (("builtin:demo-detector", 1.1234, [1.0812, 1.1698], "regression"),
                                      ("builtin:resnet-tiny", 0.998, [0.981, 1.012], "no change"),
                                      ("builtin:mlp", 0.861, [0.842, 0.880], "improvement")):
        sub = _comparison(verdict, ratio=ratio, ci=ci, blocks=[12, 12], entry=entry, batch=1,
                          baseline=f"nightly-1:{EVIL}", candidate="nightly-2:pruned50",
                          commits={"baseline": "a1b2c3d", "candidate": "e4f5a6b+dirty"})
        for key in ("mode", "min_effect", "level", "samples_per_block"):
            sub.pop(key)
        subs.append(sub)
    return {**subs[0], "mode": "stored runs (not interleaved with each other)", "min_effect": 0.05, "level": 0.95,
            "comparisons": subs, "baseline": "nightly-1", "candidate": "nightly-2"}


def _profile(samples):
    """A profile record of one arm with these latency samples (the per-layer rows do not matter here)."""
    stats = dict.fromkeys(("p50", "p90", "p95", "p99", "mean", "std", "min", "max"), float(np.median(samples or [1])))
    return ProfileResult(backend="onnxruntime", onnx="dense.onnx", batch=1, input_shapes={"images": [1, 3, 64, 64]},
                         latency_ms={**stats, "cv": 0.0, "n": max(1, len(samples))}, throughput_ips=190.0,
                         throughput_images_s=190.0, samples_ms=list(samples))


def _history():
    rows = []
    runs = [("nightly-1", "2025-05-01T02:00:00Z", "a1b2c3d"), ("nightly-2", "2025-05-02T02:00:00Z", "e4f5a6b"),
            ("nightly-3", "2025-05-03T02:00:00Z", None)]
    for i, (run, created, commit) in enumerate(runs):
        for entry, backend, batch, base in (("builtin:demo-detector", "onnxruntime", 1, 5.2),
                                            ("builtin:demo-detector", "onnxruntime", 8, 31.0),
                                            ("builtin:resnet-tiny", "torch", 1, 2.1)):
            for variant, factor, acc in (("dense", 1.0, 31.2), (EVIL, 0.7, 30.4 - i * 0.3)):
                p50 = base * factor * (1 + 0.03 * i)
                rows.append({"run": run, "created": created, "commit": commit, "entry": entry, "variant": variant,
                             "backend": backend, "batch": batch, "p50_ms": p50, "p99_ms": p50 * 1.18,
                             "images_s": 1000 * batch / p50,
                             "accuracy": acc if entry == "builtin:demo-detector" else None})
    return rows


def _render(renderable) -> str:
    console = Console(record=True, width=160)
    console.print(renderable)
    return console.export_text()


def _check_offline_page(path: Path) -> str:
    assert path.is_file()
    text = path.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', text)
    assert srcs and len(srcs) == text.count("<img ")
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1], validate=True).startswith(PNG_SIGNATURE)
    assert EVIL not in text  # escaped everywhere
    return text


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------- terminal


def test_formatting():
    assert fmt_ratio(1.1234) == "1.123×"
    assert fmt_ratio(None) == fmt_ratio(float("nan")) == "–"
    assert fmt_ci([1.0812, 1.1698]) == "[1.081, 1.170]"


def test_table_regression():
    text = _render(comparison_table(_comparison()))
    assert "REGRESSION" in text
    assert "1.123×" in text and "+12.3 %" in text
    assert "95 % CI [1.081, 1.170]" in text
    assert "p = 4.20e-04" in text and "min effect 5 %" in text and "16 interleaved blocks" in text
    assert "p99 ratio 1.204×" in text and "[1.101, 1.318]" in text
    assert "environment differs: " + ENV_DIFF in text
    assert text.index(ENV_DIFF) < text.index("verdict: REGRESSION")
    assert "baseline 31.24, candidate 30.87, drop 0.37 (allowed 1.00)" in text
    assert "these layers got slower" in text
    # the slower layers (and the new one) are in the table; the faster one is named as not slower
    for key in ("backbone.stage3.conv1", "neck.up.1", "backbone.stem.0"):
        assert key in text
    assert "did not get slower: head.cls" in text
    assert "0.812" in text and "1.334" in text and "+0.522" in text and "1.643×" in text


@pytest.mark.parametrize("verdict", ["improvement", "no change", "inconclusive"])
def test_table_other_verdicts(verdict):
    result = _comparison(verdict, accuracy=None, environment={"baseline": {}, "candidate": {},
                                                              "differences": []})
    text = _render(comparison_table(result))
    assert f"verdict: {verdict.upper()}" in text
    assert "where the time changed" in text and "got slower" not in text
    assert "head.cls" in text and "environment differs" not in text
    assert "accuracy: not scored" in text


def test_table_colours():
    console = Console(record=True, width=160, force_terminal=True, color_system="standard")
    for verdict, code in (("regression", "31"), ("improvement", "32"), ("inconclusive", "33")):
        with console.capture() as cap:
            console.print(comparison_table(_comparison(verdict)))
        out = cap.get()
        line = next(x for x in out.splitlines() if "verdict:" in x)
        assert re.search(rf"\x1b\[[0-9;]*{code}m{verdict.upper()}", line), repr(line)


def test_table_accuracy_regression():
    result = _comparison("regression", speed_verdict="no change", ratio=1.002, ci=[0.99, 1.013],
                         accuracy={"metric": "mAP@[.5:.95] (points)", "baseline": 31.24, "candidate": 28.9,
                                   "drop": 2.34, "max_drop": 1.0, "verdict": "regression"})
    text = _render(comparison_table(result))
    assert "drop 2.34 (allowed 1.00): regression" in text
    assert "speed alone: no change" in text


def test_table_stored_comparisons():
    text = _render(comparison_table(_stored()))
    assert "3 comparisons" in text
    for entry in ("builtin:demo-detector", "builtin:resnet-tiny", "builtin:mlp"):
        assert entry in text
    assert "0.861×" in text and "[0.842, 0.880]" in text and "improvement" in text
    assert "12 baseline / 12 candidate blocks" in text
    assert "commits: a1b2c3d → e4f5a6b+dirty" in text


def test_table_without_layers():
    text = _render(comparison_table(_comparison("no change", layers=[])))
    assert "no per-layer times" in text


# ---------------------------------------------------------------- comparison page


def test_comparison_html(tmp_path):
    result = _comparison(baseline=f"dense {EVIL}.onnx")
    rng = np.random.default_rng(0)
    profiles = [_profile(rng.normal(5.3, 0.2, 160).tolist()),
                _profile(rng.normal(5.9, 0.25, 160).tolist()).to_dict()]  # the record or its dict
    path = write_comparison_html(result, tmp_path / "cmp.html", profiles)
    assert path == tmp_path / "cmp.html" and _leftovers(tmp_path) == ["cmp.html"]
    text = _check_offline_page(path)
    assert html_escaped(EVIL) in text
    assert text.count("<img ") == 3  # ratio, layer deltas, histograms
    assert "REGRESSION" in text and "1.123×" in text and "[1.081, 1.170]" in text
    assert html_escaped(ENV_DIFF) in text
    assert text.index(html_escaped(ENV_DIFF)) < text.index("<h2>Accuracy")
    assert "30.87" in text and "within the allowed drop" in text
    for row in _layers():
        assert row["key"] in text
    assert "these layers got slower" in text


def test_comparison_html_stored_no_profiles(tmp_path):
    path = write_comparison_html(_stored(), tmp_path / "sub" / "cmp.html")
    text = _check_offline_page(path)
    assert text.count("<img ") == 2  # no histogram without profiles
    assert "3 comparisons" in text and "builtin:mlp" in text and "not interleaved" in text
    assert html_escaped(f"nightly-1:{EVIL}") in text


def test_comparison_html_profiles_without_samples(tmp_path):
    text = _check_offline_page(write_comparison_html(_comparison("no change", layers=[]), tmp_path / "c.html",
                                                     [_profile([]), _profile([])]))
    assert text.count("<img ") == 1 and "store no samples" in text and "No per-layer times" in text


def test_comparison_dollar_label_plots(tmp_path):
    # '$' would start matplotlib mathtext; an odd count must not break the plots
    layers = [{**_layers()[0], "key": "price$tag"}]
    text = _check_offline_page(write_comparison_html(_comparison(layers=layers, candidate="a$b"), tmp_path / "d.html"))
    assert "price$tag" in text


@pytest.mark.parametrize("mutate, match", [
    (lambda r: r.pop("verdict"), "lacks"),
    (lambda r: r.pop("environment"), "lacks"),
    (lambda r: r.update(verdict="worse"), "not one of"),
    (lambda r: r.update(ratio="fast"), "ratio"),
    (lambda r: r.update(ci=[1.0]), "ci"),
    (lambda r: r.update(layers="none"), "layers"),
    (lambda r: r.update(layers=[{"op": "Conv"}]), "layers"),
    (lambda r: r.update(comparisons=[{"verdict": "regression"}]), "comparisons"),
])
def test_comparison_bad_input(tmp_path, mutate, match):
    result = copy.deepcopy(_comparison())
    mutate(result)
    with pytest.raises(BenchError, match=match):
        write_comparison_html(result, tmp_path / "bad.html")
    with pytest.raises(BenchError, match=match):
        comparison_table(result)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("bad", [None, "report", ["x"], [{"verdict": "regression"}]])
def test_comparison_not_a_dict(tmp_path, bad):
    with pytest.raises(BenchError):
        write_comparison_html(bad, tmp_path / "bad.html")
    assert _leftovers(tmp_path) == []


def test_comparison_bad_profiles(tmp_path):
    with pytest.raises(BenchError, match="two ProfileResult"):
        write_comparison_html(_comparison(), tmp_path / "bad.html", [{"samples_ms": [1.0]}])
    with pytest.raises(ProfileError, match=r"the candidate profile is not a profile: it lacks \['backend'"):
        write_comparison_html(_comparison(), tmp_path / "bad.html", [_profile([1.0]), {"samples_ms": [1.0]}])
    broken = {**_profile([1.0]).to_dict(), "samples_ms": [1.0, "slow"]}
    with pytest.raises(ProfileError, match=r"the baseline profile: samples_ms\[1\] is 'slow'"):
        write_comparison_html(_comparison(), tmp_path / "bad.html", [broken, _profile([1.0])])
    assert _leftovers(tmp_path) == []


def test_checks_live_outside_the_renderer():
    """The runner and the CLI check comparisons and history rows without importing the report (or matplotlib)."""
    result = _comparison()
    assert check_comparison(result) == result and check_comparison(result) is not result
    assert check_history(_history()) == _history()
    for bad, match in (({**result, "environment": {"differences": "threads"}}, "expected a list of lines"),
                       ({**result, "min_effect": 1.5}, r"min_effect 1.5 is not a fraction in \(0, 1\)"),
                       ({**result, "verdict": ["regression"]}, r"verdict \['regression'\] is not one of"),
                       ({**result, "ratio": 10 ** 400}, "is not a finite number")):
        with pytest.raises(BenchError, match=match):
            check_comparison(bad)
    for rows, match in (([{**_history()[0], "batch": [1]}], r"batch \[1\] is not an integer"),
                        ([{**_history()[0], "run": None}], "run None is not a string"),
                        ([{1: "x", "run": "r"}], r"lacks \['entry'")):
        with pytest.raises(BenchError, match=match):
            check_history(rows)


def test_comparison_keeps_old_file_on_error(tmp_path):
    path = tmp_path / "cmp.html"
    path.write_text("old")
    with pytest.raises(BenchError):
        write_comparison_html({"verdict": "regression"}, path)
    assert path.read_text() == "old" and _leftovers(tmp_path) == ["cmp.html"]


# ---------------------------------------------------------------- history page


def test_history_html(tmp_path):
    rows = _history()
    path = write_history_html(rows, tmp_path / "history.html")
    assert _leftovers(tmp_path) == ["history.html"]
    text = _check_offline_page(path)
    groups = {(r["entry"], r["backend"], r["batch"]) for r in rows}
    assert len(groups) == 3 and text.count("<img ") == len(groups)
    for entry, backend, batch in groups:
        assert html_escaped(f"{entry} on {backend}, batch {batch}") in text
    assert html_escaped(EVIL) in text
    assert text.count("<tr>") == len(rows) + 1  # the table of every row, with its header
    assert "a1b2c3d" in text and "nightly-3" in text


def test_history_single_run_and_no_accuracy(tmp_path):
    rows = [r for r in _history() if r["run"] == "nightly-1" and r["entry"] == "builtin:resnet-tiny"]
    text = _check_offline_page(write_history_html(rows, tmp_path / "h.html"))
    assert text.count("<img ") == 1


def test_history_empty(tmp_path):
    with pytest.raises(BenchError) as err:
        write_history_html([], tmp_path / "h.html")
    assert str(err.value) == EMPTY_HISTORY
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("rows, match", [
    ("rows", "list"),
    ([{"run": "r"}], "lacks"),
    ([{**_history()[0], "p50_ms": None}], "p50_ms"),
    ([_history()[0], 3], "row 1"),
])
def test_history_bad_rows(tmp_path, rows, match):
    with pytest.raises(BenchError, match=match):
        write_history_html(rows, tmp_path / "h.html")
    assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------- a real browser


def html_escaped(text: str) -> str:
    import html

    return html.escape(text)


def test_chromium_renders_the_history(tmp_path, screenshot):
    screenshot(write_history_html(_history(), tmp_path / "history.html"), 1200, 1600)
