"""The profile report: summary, side-by-side comparison, PNG plots and the offline HTML page, on real profiles
of two small exported conv nets; the CLI's --html/--compare/--png-dir; the GPU probe; a headless render."""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from trt_prune import provenance
from trt_prune.cli import cli
from trt_prune.errors import ProfileError
from trt_prune.exporter import export_onnx
from trt_prune.profiling import ProfileResult
from trt_prune.profiling.compare import (
    as_profile,
    compare_layers,
    compare_totals,
    format_ms,
    layer_key,
    load_profile,
    per_layer_share,
)
from trt_prune.profiling.html import (
    PNG_NAMES,
    breakdown_rows,
    render_plots,
    summary_rows,
    write_profile_html,
    write_profile_pngs,
)
from trt_prune.provenance import gpu_info, parse_gpu_query
from trt_prune.stages import profile as profile_onnx

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
QUICK = {"warmup_s": 0.0, "iterations": 20, "min_duration_s": 0.0, "layer_runs": 3}
QUICK_CLI = ["--iterations", "20", "--warmup", "0", "--duration", "0", "--layer-runs", "3"]


class Wide(nn.Module):
    """Two conv+relu blocks then a 1x1 head: ``stem.2`` exists only here."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                                  nn.ReLU())
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(self.stem(x))


class Narrow(nn.Module):
    """The same paths narrower, one block fewer, and a ``tail`` the wide net lacks."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(8, 4, 1)
        self.tail = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.tail(self.head(self.stem(x)))


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nets")
    torch.manual_seed(0)
    wide = folder / "wide.onnx"
    narrow = folder / "narrow.onnx"
    export_onnx(Wide().eval(), wide, (1, 3, 32, 32), exporter="torchscript")
    export_onnx(Narrow().eval(), narrow, (1, 3, 32, 32), exporter="torchscript")
    return wide, narrow


@pytest.fixture(scope="module")
def profiles(onnx_files):
    """Real profiles (with samples) of the wide (baseline) and narrow nets."""
    wide, narrow = onnx_files
    return (profile_onnx(wide, threads=1, **QUICK).to_dict(), profile_onnx(narrow, threads=1, **QUICK).to_dict())


def _images(page: str) -> list[bytes]:
    srcs = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert len(srcs) == page.count("<img ")
    out = []
    for src in srcs:
        assert src.startswith("data:image/png;base64,"), src[:60]
        out.append(base64.b64decode(src.split(",", 1)[1], validate=True))
    return out


def _profile(per_layer, **fields):
    """A small but complete profile dict (every required field) with these layer rows."""
    latency = dict.fromkeys(("p50", "p90", "p95", "p99", "mean", "std", "min", "max", "cv"), 1.0)
    return {"backend": "onnxruntime", "onnx": "net.onnx", "batch": 1, "input_shapes": {"images": [1, 3, 8, 8]},
            "latency_ms": {**latency, "n": 1}, "throughput_ips": 1000.0, "throughput_images_s": 1000.0,
            "per_layer": per_layer, **fields}


def _sums(rows):
    out = {}
    for r in rows:
        out[layer_key(r)] = out.get(layer_key(r), 0.0) + r["ms"]
    return out


# ---------------------------------------------------------------- summary and comparison


def test_format_ms():
    assert format_ms(5.26431) == "5.264"
    assert format_ms(0.012994) == "0.013"
    assert format_ms(1234.56) == "1234.6"
    assert format_ms(0.0) == "0.000"
    assert format_ms(None) == "–"


def test_summary_rows_carry_the_profile(profiles):
    _, narrow = profiles
    rows = dict(summary_rows(narrow))
    lat = narrow["latency_ms"]
    assert rows["Latency median (p50)"] == f"{format_ms(lat['p50'])} ms"
    for key, label in (("min", "Latency min"), ("max", "Latency max"), ("mean", "Latency mean"),
                       ("p90", "Latency p90"), ("p95", "Latency p95"), ("p99", "Latency p99"),
                       ("std", "Latency std")):
        assert rows[label] == f"{format_ms(lat[key])} ms"
    assert rows["Samples"] == "20" == str(lat["n"])
    assert rows["Coefficient of variation"] == f"{lat['cv'] * 100:.1f} %"
    assert rows["Throughput"].startswith(f"{narrow['throughput_ips']:.1f} inferences/s = "
                                         f"{narrow['throughput_images_s']:.1f} images/s")
    assert rows["Batch"] == "1" and rows["Input shapes"] == "images 1x3x32x32"
    assert rows["Backend"].startswith(f"onnxruntime {narrow['env']['backend_version']}")
    assert rows["Threads"] == "1"
    assert rows["CPU"].startswith(narrow["env"]["cpu"])
    assert f"trt_prune {narrow['env']['trt_prune']}" in rows["Versions"]
    assert f"onnxruntime {narrow['env']['onnxruntime']}" in rows["Versions"]
    assert ("Warning" in rows) == bool(narrow["cv_warning"])
    # the per-layer share, recomputed from the rows
    total = sum(r["ms"] for r in narrow["per_layer"])
    assert total == pytest.approx(narrow["per_layer_sum_ms"])
    share = rows["Per-layer vs end-to-end"]
    assert share == per_layer_share(narrow)
    assert share.startswith(f"per-layer sum {format_ms(total)} ms = {total / lat['mean'] * 100:.1f} % of the mean "
                            f"end-to-end latency {format_ms(lat['mean'])} ms")
    assert f"{format_ms(narrow['per_layer_run_ms'])} ms" in share and "instrumented" in share


def test_summary_without_per_layer_times(profiles):
    bare = {**profiles[0], "per_layer": [], "per_layer_sum_ms": None}
    assert per_layer_share(bare) is None
    assert dict(summary_rows(bare))["Per-layer vs end-to-end"] == "per-layer times were not collected"


def test_breakdown_rows_read_like_trtexec(profiles):
    from trt_prune.backends.tensorrt import timing_breakdown

    # three iterations 5 ms apart: H2D 0.5 ms, compute 2/3/4 ms, D2H 0.25 ms; enqueue 0.1 ms
    starts, compute = [0.0, 5.0, 10.0], [2.0, 3.0, 4.0]
    ends = [t + 0.5 + c for t, c in zip(starts, compute, strict=True)]
    breakdown = timing_breakdown([t + 0.4 for t in starts], [t + 0.5 for t in starts], starts,
                                 [t + 0.5 for t in starts], ends, [e + 0.25 for e in ends], host_wall_ms=15.0)
    breakdown["cuda_graph"] = True
    rows = breakdown_rows(breakdown)
    labels = [label for label, _ in rows]
    assert labels[:6] == ["Throughput (trtexec)", "Latency (H2D + compute + D2H)", "Enqueue time", "H2D",
                          "GPU compute", "D2H"]
    assert rows[0][1] == "200.0 qps over 3 iterations (host wall time, CUDA graph)"
    assert dict(rows)["GPU compute"] == (
        "min 2.000 / max 4.000 / mean 3.000 / median 3.000 / p90 3.800 / p95 3.900 / p99 3.980 ms")
    assert dict(rows)["H2D"].startswith("min 0.5 / max 0.5 / mean 0.5 ")
    assert labels[6:] == ["Warning"] and "GPU compute time: latency is unstable" in rows[6][1]
    # in the HTML summary after the latency rows; absent for profiles without one (other backends, old files)
    labels = [label for label, _ in summary_rows({**profiles[0], "breakdown": breakdown})]
    assert labels.index("GPU compute") > labels.index("Latency p99")
    assert breakdown_rows(None) == [] and breakdown_rows({"h2d": "fast"}) == []
    assert "GPU compute" not in dict(summary_rows(profiles[0]))


def test_compare_layers_matches_by_module(profiles):
    wide, narrow = profiles
    rows = compare_layers(wide, narrow)
    base, other = _sums(wide["per_layer"]), _sums(narrow["per_layer"])
    assert {r["key"] for r in rows} == set(base) | set(other)
    by_key = {r["key"]: r for r in rows}
    for key, r in by_key.items():
        assert r["base_ms"] == (pytest.approx(base[key]) if key in base else None)
        assert r["other_ms"] == (pytest.approx(other[key]) if key in other else None)
        if key in base and key in other:
            assert r["delta_ms"] == pytest.approx(other[key] - base[key])
            assert r["ratio"] == (pytest.approx(other[key] / base[key]) if base[key] > 0 else None)
        else:
            assert r["delta_ms"] is None and r["ratio"] is None
    # the modules each net really has: stem.0 and head in both, the second stem block only in the wide one
    # (ORT fuses its conv and relu into one kernel, which counts for the conv), tail only in the narrow one
    assert {"stem.0", "head"} <= {k for k in by_key if k in base and k in other}
    base_only = [r for r in rows if r["other_ms"] is None]
    assert any(r["key"] == "stem.2" and r["base_ms"] > 0 for r in base_only)
    assert by_key["tail"]["base_ms"] is None and by_key["tail"]["other_ms"] > 0
    changes = [abs(r["delta_ms"]) if r["delta_ms"] is not None else (r["base_ms"] or r["other_ms"]) for r in rows]
    assert changes == sorted(changes, reverse=True)


def test_compare_layers_sums_rows_sharing_a_module():
    prof = _profile
    base = prof([{"name": "a1", "op": "Conv", "module": "m", "ms": 1.0},
                 {"name": "a2", "op": "Relu", "module": "m", "ms": 0.5},
                 {"name": "reorder", "op": "Reorder", "module": None, "ms": 0.25}])
    other = prof([{"name": "b", "op": "Conv", "module": "m", "ms": 1.0},
                  {"name": "reorder", "op": "Reorder", "module": None, "ms": 0.75}])
    rows = {r["key"]: r for r in compare_layers(base, other)}
    assert rows["m"] == {"key": "m", "op": "Conv+Relu", "base_ms": 1.5, "other_ms": 1.0, "delta_ms": -0.5,
                         "ratio": pytest.approx(2 / 3)}
    assert rows["reorder"]["delta_ms"] == 0.5 and rows["reorder"]["ratio"] == 3.0


def test_compare_totals(profiles):
    wide, narrow = profiles
    totals = compare_totals(wide, narrow)
    for k in ("mean", "p50", "p99"):
        t = totals[f"latency_{k}_ms"]
        assert (t["base"], t["other"]) == (wide["latency_ms"][k], narrow["latency_ms"][k])
        assert t["delta"] == pytest.approx(t["other"] - t["base"])
        assert t["ratio"] == pytest.approx(t["other"] / t["base"])
    assert totals["per_layer_sum_ms"]["base"] == pytest.approx(wide["per_layer_sum_ms"])
    rows = compare_layers(wide, narrow)
    assert totals["layers"] == {"matched": sum(r["delta_ms"] is not None for r in rows),
                                "base_only": sum(r["other_ms"] is None for r in rows),
                                "other_only": sum(r["base_ms"] is None for r in rows)}
    assert totals["layers"]["base_only"] >= 1 and totals["layers"]["other_only"] >= 1


# ---------------------------------------------------------------- plots and the page


def test_plots_are_pngs(profiles, tmp_path):
    wide, narrow = profiles
    pngs = render_plots(narrow, compare=wide, top=5)
    assert set(pngs) == {"histogram", "layers", "compare"}
    assert all(data.startswith(PNG_SIGNATURE) for data in pngs.values())
    written = write_profile_pngs(narrow, tmp_path / "png", compare=wide, top=5)
    assert sorted(p.name for p in written) == sorted(PNG_NAMES.values())
    assert all(p.read_bytes().startswith(PNG_SIGNATURE) for p in written)
    assert b"http" not in b"".join(p.read_bytes() for p in written)  # no matplotlib URL in the metadata
    no_samples = {k: v for k, v in narrow.items() if k != "samples_ms"}
    assert set(render_plots(no_samples)) == {"layers"}


def test_html_is_self_contained_and_carries_the_numbers(profiles, tmp_path):
    wide, narrow = profiles
    path = write_profile_html(narrow, tmp_path / "report.html", compare=wide, top=5, png_dir=tmp_path / "png")
    page = path.read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"<(link|script)\b", page) and "@import" not in page and "url(" not in page
    images = _images(page)
    assert len(images) == 3 and all(img.startswith(PNG_SIGNATURE) for img in images)
    on_disk = sorted((tmp_path / "png").iterdir())
    assert sorted(p.name for p in on_disk) == sorted(PNG_NAMES.values())
    assert sorted(p.read_bytes() for p in on_disk) == sorted(images)  # the same plots, embedded and on disk
    for label, value in summary_rows(narrow):
        assert f"<td>{label}</td><td>{value}</td>".replace("&", "&amp;") in page or "<" in value or ">" in value
    assert f"{format_ms(narrow['latency_ms']['p50'])} ms" in page
    assert f"{format_ms(narrow['latency_ms']['p99'])} ms" in page
    for heading in ("By module", "By op", "By stage", "Comparison: wide → narrow", "Environment"):
        assert heading in page
    slowest = max(narrow["per_layer"], key=lambda r: r["ms"])
    assert f"<td>{slowest['name']}</td>" in page and f"<td class=\"n\">{format_ms(slowest['ms'])}</td>" in page
    totals = compare_totals(wide, narrow)
    assert f"{totals['latency_p50_ms']['ratio']:.2f}×" in page
    row = next(r for r in compare_layers(wide, narrow) if r["key"] == "stem.0")
    assert f"{row['delta_ms']:+.4g}" in page


def test_html_escapes_text(profiles, tmp_path):
    evil = copy.deepcopy(profiles[0])
    evil["per_layer"][0]["module"] = "<script>alert(1)</script>"
    evil["notes"] = ["a & b <b>bold</b>"]
    page = write_profile_html(evil, tmp_path / "evil.html").read_text(encoding="utf-8")
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "a &amp; b &lt;b&gt;bold&lt;/b&gt;" in page


def test_html_without_samples_explains_the_missing_histogram(profiles, tmp_path):
    stored = {k: v for k, v in profiles[1].items() if k != "samples_ms"}  # what 'profile -o' writes
    page = write_profile_html(stored, tmp_path / "r.html").read_text(encoding="utf-8")
    assert len(_images(page)) == 1 and "stores no samples" in page


def test_bad_profiles_raise_and_write_nothing(profiles, tmp_path):
    good = profiles[0]
    with pytest.raises(ProfileError, match="is a list, not a profile"):
        as_profile([1, 2])
    with pytest.raises(ProfileError, match=r"lacks \['per_layer'\]"):
        as_profile({k: v for k, v in good.items() if k not in ("per_layer",)})
    with pytest.raises(ProfileError, match=r"'latency_ms' lacks numbers for \['p99'\]"):
        as_profile({**good, "latency_ms": {k: v for k, v in good["latency_ms"].items() if k != "p99"}})
    with pytest.raises(ProfileError, match=r"per_layer\[0\]"):
        as_profile({**good, "per_layer": [{"name": "x"}]})
    with pytest.raises(ProfileError, match="top must be a positive integer"):
        write_profile_html(good, tmp_path / "t.html", top=0)
    out = tmp_path / "report.html"
    out.write_text("old")
    with pytest.raises(ProfileError, match="compare profile is not a profile"):
        write_profile_html(good, out, compare={"backend": "onnxruntime"})
    assert out.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_load_profile(profiles, tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({k: v for k, v in profiles[0].items() if k != "samples_ms"}))
    loaded = load_profile(good)
    assert isinstance(loaded, ProfileResult) and loaded.latency_ms == profiles[0]["latency_ms"]
    assert loaded.to_dict() == {**profiles[0], "samples_ms": []}  # every field back, samples left out by -o
    (tmp_path / "text.json").write_text("not json")
    with pytest.raises(ProfileError, match="text.json' is not JSON"):
        load_profile(tmp_path / "text.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ProfileError, match="list.json' is a list, not a profile"):
        load_profile(tmp_path / "list.json")
    with pytest.raises(ProfileError, match="cannot read profile .*missing.json"):
        load_profile(tmp_path / "missing.json")


def test_profile_record_round_trips_with_its_version(profiles):
    data = profiles[0]
    assert data["format"] == "trt_prune.profile" and data["version"] == 1
    record = ProfileResult.from_dict(data)
    assert record.to_dict() == data
    assert ProfileResult.from_dict(json.loads(json.dumps(data))) == record
    # a file from before the version field: the same record
    old = {k: v for k, v in data.items() if k not in ("format", "version", "breakdown")}
    assert ProfileResult.from_dict(old) == record
    # what 'profile -o' adds beside the fields is ignored
    assert ProfileResult.from_dict({**data, "aggregates": {"op": []}, "per_layer_vs_e2e": "x"}) == record


def test_profile_of_a_newer_version_or_another_format(profiles, tmp_path):
    path = tmp_path / "new.json"
    path.write_text(json.dumps({**profiles[0], "version": 2}))
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    message = str(info.value)
    assert f"profile '{path}' is profile format version 2, written by a newer trt_prune" in message
    assert "reads version 1 and older: upgrade trt_prune" in message and "\n" not in message
    path.write_text(json.dumps({**profiles[0], "format": "trt_prune.recipe"}))
    with pytest.raises(ProfileError, match=r"new.json' is a 'trt_prune.recipe' file, not a profile"):
        load_profile(path)
    path.write_text(json.dumps({**profiles[0], "version": "1"}))
    with pytest.raises(ProfileError, match=r"'version' is '1', expected a positive integer"):
        load_profile(path)


@pytest.mark.parametrize("change, message", [
    ({"batch": 0}, r"'batch' is 0, expected an integer >= 1"),
    ({"batch": True}, r"'batch' is True, expected an integer >= 1"),
    ({"backend": ""}, r"'backend' is '', expected a non-empty string"),
    ({"onnx": None}, r"'onnx' is None, expected a string"),
    ({"throughput_ips": float("nan")}, r"'throughput_ips' is nan, expected a finite number >= 0"),
    ({"throughput_images_s": -1.0}, r"'throughput_images_s' is -1.0, expected a finite number >= 0"),
    ({"per_layer_sum_ms": "3 ms"}, r"'per_layer_sum_ms' is '3 ms', expected a finite number >= 0"),
    ({"input_shapes": {"images": [1, "3"]}}, r"input_shapes\['images'\] is \[1, '3'\], expected a list of integers"),
    ({"input_shapes": [1, 3]}, r"'input_shapes' is \[1, 3\], expected a dict"),
    ({"samples_ms": [1.0, float("inf")]}, r"samples_ms\[1\] is inf, expected a finite number >= 0"),
    ({"notes": "slow"}, r"notes is 'slow', expected a list of strings"),
    ({"env": {"providers": "CPUExecutionProvider"}}, r"env\['providers'\] is 'CPUExecutionProvider', expected a list"),
    ({"breakdown": [1]}, r"'breakdown' is \[1\], expected a dict"),
    ({"cv_warning": 3}, r"'cv_warning' is 3, expected a string"),
])
def test_profile_fields_are_checked_by_name(profiles, tmp_path, change, message):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({**profiles[0], **change}))
    with pytest.raises(ProfileError, match=message) as info:
        load_profile(path)
    assert str(info.value).startswith(f"profile '{path}': ") and "\n" not in str(info.value)


def test_profile_layer_rows_and_latency_are_checked(profiles):
    good = profiles[0]
    row = good["per_layer"][0]
    for bad, message in (({**row, "ms": -0.1}, r"per_layer\[0\]\['ms'\] is -0.1"),
                         ({**row, "module": 7}, r"per_layer\[0\]\['module'\] is 7, expected a string or null"),
                         ({**row, "members": [1]}, r"per_layer\[0\]\['members'\] is \[1\]"),
                         ({**row, "op": None}, r"per_layer\[0\] is .*each row needs 'name' and 'op'")):
        with pytest.raises(ProfileError, match=message):
            ProfileResult.from_dict({**good, "per_layer": [bad]}, "base")
    for key, value, message in (("n", 0, r"latency_ms\['n'\] is 0, expected an integer >= 1"),
                                ("n", 2.5, r"latency_ms\['n'\] is 2.5"),
                                ("p99", float("inf"), r"latency_ms\['p99'\] is inf, expected a finite number")):
        with pytest.raises(ProfileError, match=message):
            ProfileResult.from_dict({**good, "latency_ms": {**good["latency_ms"], key: value}})
    # an infinite rate is what profile_record writes for a 0 ms mean, and only then
    zero = {**good, "latency_ms": {**good["latency_ms"], "mean": 0.0}, "throughput_ips": float("inf")}
    assert ProfileResult.from_dict(zero).throughput_ips == float("inf")
    with pytest.raises(ProfileError, match="'throughput_ips' is inf"):
        ProfileResult.from_dict({**good, "throughput_ips": float("inf")})


def test_report_loads_no_backend_library(profiles, tmp_path):
    """A report made from a stored profile, in a fresh interpreter, never loads onnxruntime, TensorRT, torch or
    any of trt_prune's backend modules."""
    stored = tmp_path / "p.json"
    stored.write_text(json.dumps(profiles[1]))
    code = ("import sys; from trt_prune.profiling.compare import compare_layers, load_profile; "
            f"p = load_profile({str(stored)!r}); compare_layers(p, p); "
            "print(sorted(m for m in ('matplotlib', 'onnxruntime', 'tensorrt', 'torch', 'onnx', 'trt_prune.backends') "
            "if m in sys.modules)); "
            "from trt_prune.profiling.html import write_profile_html; "
            f"write_profile_html(p, {str(tmp_path / 'r.html')!r}); "
            "print(sorted(m for m in ('onnxruntime', 'tensorrt', 'torch', 'onnx', 'trt_prune.backends') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    # the comparison needs no plotting library, the report no backend
    assert done.stdout.split("\n")[:2] == ["[]", "[]"] and (tmp_path / "r.html").is_file()


# ---------------------------------------------------------------- CLI


def _cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_cli_html_png_and_compare(onnx_files, tmp_path):
    wide, narrow = onnx_files
    base = _cli("profile", wide, *QUICK_CLI, "--threads", "1", "-o", tmp_path / "wide.json", "--html",
                tmp_path / "wide.html", "--json")
    assert base.exit_code == 0, base.output + base.stderr
    data = json.loads(base.stdout)
    assert data["html"] == str(tmp_path / "wide.html") and "samples_ms" not in data
    page = (tmp_path / "wide.html").read_text(encoding="utf-8")
    assert f"{format_ms(data['latency_ms']['p50'])} ms" in page and "http" not in page
    assert len(_images(page)) == 2  # histogram and layers; nothing to compare
    env = data["env"]
    assert {"cpu", "threads", "trt_prune", "numpy", "onnxruntime", "python"} <= set(env) and env["threads"] == 1
    assert ("gpu" in env) == bool(gpu_info())
    stored = json.loads((tmp_path / "wide.json").read_text())
    assert "html" not in stored and stored["latency_ms"] == data["latency_ms"]

    other = _cli("profile", narrow, *QUICK_CLI, "--threads", "1", "--compare", tmp_path / "wide.json", "--html",
                 tmp_path / "cmp.html", "--png-dir", tmp_path / "png", "--top", "4", "--json")
    assert other.exit_code == 0, other.output + other.stderr
    data = json.loads(other.stdout)
    assert data["png"] == [str(tmp_path / "png" / n) for n in PNG_NAMES.values()]
    page = (tmp_path / "cmp.html").read_text(encoding="utf-8")
    assert "Comparison: wide → narrow" in page and len(_images(page)) == 3
    assert all(Path(p).read_bytes().startswith(PNG_SIGNATURE) for p in data["png"])


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not JSON"),
    (json.dumps({"backend": "onnxruntime", "model": "x"}), "is not a profile: it lacks"),
])
def test_cli_bad_compare_fails_before_profiling(onnx_files, tmp_path, content, message):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    result = _cli("profile", onnx_files[0], *QUICK_CLI, "--compare", bad, "--html", tmp_path / "sub" / "r.html",
                  "--png-dir", tmp_path / "png", "-o", tmp_path / "p.json")
    assert result.exit_code == 2
    assert message in result.stderr and str(bad) in result.stderr and result.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]  # nothing written, no folder made


def test_cli_compare_needs_a_report(onnx_files, tmp_path):
    result = _cli("profile", onnx_files[0], *QUICK_CLI, "--compare", tmp_path / "x.json")
    assert result.exit_code == 2 and "add --html" in result.stderr


# ---------------------------------------------------------------- GPU probe


def test_parse_gpu_query():
    text = "NVIDIA H100 80GB HBM3, 1980 MHz, 2619 MHz\nNVIDIA H100 80GB HBM3, 345 MHz, 2619 MHz\n"
    assert parse_gpu_query(text) == {"gpu": "NVIDIA H100 80GB HBM3", "gpu_sm_clock": "1980 MHz",
                                     "gpu_mem_clock": "2619 MHz"}
    assert parse_gpu_query("") == {} and parse_gpu_query("No devices were found") == {}


@pytest.mark.parametrize("script, expected", [
    ('echo "Fake GPU, 1500 MHz, 5000 MHz"', {"gpu": "Fake GPU", "gpu_sm_clock": "1500 MHz",
                                             "gpu_mem_clock": "5000 MHz"}),
    ('echo "Fake GPU, 1500 MHz, 5000 MHz"; exit 9', {}),  # an error exit: nothing, whatever it printed
    ("exec sleep 5", {}),  # a hang: cut off by the timeout
])
def test_gpu_info_never_fails(tmp_path, monkeypatch, script, expected):
    fake = tmp_path / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\n{script}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(provenance, "GPU_PROBE_TIMEOUT_S", 0.5)
    assert gpu_info() == expected
    info = provenance.machine_info()
    assert {k: info[k] for k in expected} == expected and ("gpu" in info) == bool(expected)


def test_gpu_info_without_nvidia_smi(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert gpu_info() == {}


# ---------------------------------------------------------------- a real browser


def test_chromium_renders_the_page(profiles, tmp_path, screenshot):
    wide, narrow = profiles
    screenshot(write_profile_html(narrow, tmp_path / "report.html", compare=wide), 1200, 2400)


def test_per_layer_share_within_and_outside_ten_percent():
    def prof(total, mean, run):
        profile = _profile([{"name": "a", "op": "Conv", "module": "a", "ms": total}], per_layer_sum_ms=total,
                           per_layer_run_ms=run)
        profile["latency_ms"]["mean"] = mean
        return profile

    inside = per_layer_share(prof(5.2, 5.0, 5.6))
    assert inside.startswith("per-layer sum 5.200 ms = 104.0 % of the mean end-to-end latency 5.000 ms")
    assert "(within ±10 %" in inside and "5.600 ms" in inside
    outside = per_layer_share(prof(5.64, 4.81, 6.28))
    assert "outside ±10 %" in outside
    assert "6.280 ms (130.6 % of the timed run)" in outside and "cover 89.8 % of that run" in outside
