"""Pruning models that exist only as ONNX (issue 18): conversion checked against ONNX Runtime, the body pruned,
the post-processing tail stitched back, and one clear error for what cannot be converted."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from trt_prune import onnx_io
from trt_prune.cli import cli
from trt_prune.models import load_model
from trt_prune.onnx_import import OnnxImportError, Reshape, _align, import_onnx
from trt_prune.stages import prune

sys.path.insert(0, str(Path(__file__).parent))
from onnx_handbuilt import nothing_prunable_net, opset11_net, unconvertible_net  # noqa: E402


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(model: onnx.ModelProto | str | Path, x: np.ndarray) -> dict[str, np.ndarray]:
    m = onnx.load(str(model)) if not isinstance(model, onnx.ModelProto) else model
    return onnx_io.run_onnxruntime(m, {m.graph.input[0].name: x})


def test_align_pairs_merged_and_split_axes():
    assert _align((1, 64, 4, 4), (1, 64, 16)) == [([0], [0]), ([1], [1]), ([2, 3], [2])]
    assert _align((1, 64, 16), (1, 4, 16, 16)) == [([0], [0]), ([1], [1, 2]), ([2], [3])]
    assert _align((2, 3), (4,)) is None


def test_reshape_follows_a_pruned_merge_and_flags_a_split_channel_axis():
    flatten = Reshape([1, 64, -1], (1, 64, 4, 4))
    assert flatten.trt_prune_fixed_axes == {}
    assert tuple(flatten(torch.rand(1, 40, 4, 4)).shape) == (1, 40, 16)  # 64 channels pruned to 40
    heads = Reshape([1, 4, 16, 16], (1, 64, 16))
    assert list(heads.trt_prune_fixed_axes) == [1] and "splits axis 1" in heads.trt_prune_fixed_axes[1]
    tokens = Reshape([1, 16, 4, 16], (1, 16, 64))  # (B, N, C) -> (B, N, heads, C/heads): channels last
    assert list(tokens.trt_prune_fixed_axes) == [2]


def test_opset11_model_converts_prunes_and_stitches(tmp_path):
    src = tmp_path / "net.onnx"
    onnx.save(opset11_net(), src)
    before = _sha(src)
    imported = import_onnx(src)
    assert imported.opset == 11 and imported.input_shape == (1, 3, 32, 32)
    assert {"Reshape", "Split"} <= set(imported.own_converters)
    assert max(imported.parity.values()) <= 1e-4
    assert [n.op_type for n in imported.tail] == ["Sigmoid"]  # after the last layer with weights

    result = prune(str(src), ratio=0.5, out=tmp_path / "pruned")
    report = result.report
    assert report["macs_after"] < 0.6 * report["macs_before"]
    pruned_file = result.folder / "model.onnx"
    assert report["onnx"]["outputs"] == ["logits", "box.act"]
    assert max(report["onnx"]["export_parity_max_abs"].values()) <= 1e-4
    pruned = onnx.load(str(pruned_file))
    assert onnx_io.default_opset(pruned) == 11
    widths = [i.dims[0] for i in pruned.graph.initializer if i.name.endswith("weight") or i.name.endswith(".w")]
    assert widths and min(widths) < 16  # channels really went
    x = np.random.default_rng(3).standard_normal((1, 3, 32, 32)).astype(np.float32)
    got = _run(pruned_file, x)
    with torch.no_grad():
        box, logits = result.model(torch.from_numpy(x))
    np.testing.assert_allclose(got["logits"], logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(got["box.act"], torch.sigmoid(box).numpy(), atol=1e-5)  # the stitched tail
    # the folder reloads from the source file and its recipe, to the same numbers
    again = load_model(str(result.folder)).model
    with torch.no_grad():
        torch.testing.assert_close(again(torch.from_numpy(x))[1], logits)
    assert _sha(src) == before


class _Chunky(nn.Module):
    """What the dynamo exporter writes at opset 18 with Split's sizes and ReduceMean's axes as inputs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.cv = nn.Conv2d(8, 8, 3, padding=1)
        self.out = nn.Conv2d(24, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        a, b = torch.relu(self.stem(x)).chunk(2, 1)
        y = torch.relu(self.out(torch.cat([a, b, torch.relu(self.cv(b))], 1)))
        return self.fc(y.mean(dim=(2, 3)))


def test_dynamo_opset18_split_and_reduce_mean_convert_and_prune(tmp_path):
    from trt_prune.exporter import export_onnx

    src = tmp_path / "chunky.onnx"
    torch.manual_seed(0)
    export_onnx(_Chunky().eval(), src, (1, 3, 16, 16), dynamic_batch=False)
    imported = import_onnx(src)
    assert imported.opset == 18
    assert {"Split", "ReduceMean"} <= set(imported.own_converters)
    assert max(imported.parity.values()) <= 1e-4
    result = prune(str(src), ratio=0.5, round_to=4, out=tmp_path / "p")
    assert result.report["groups_pruned"] >= 2
    assert max(result.report["onnx"]["export_parity_max_abs"].values()) <= 1e-4


class _L2Norm(nn.Module):
    """SSD's L2Norm: the TorchScript exporter writes ``clamp(min=eps)`` as Clip with an omitted max input."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.scale = nn.Parameter(torch.full((16,), 20.0))
        self.mid = nn.Conv2d(16, 16, 3, padding=1)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x / x.norm(dim=1, keepdim=True).clamp(min=1e-10) * self.scale.view(1, -1, 1, 1)
        return self.out(torch.relu(self.mid(x)))


def test_clip_with_an_omitted_bound_converts(tmp_path):
    from trt_prune.exporter import export_onnx

    src = tmp_path / "l2norm.onnx"
    torch.manual_seed(0)
    export_onnx(_L2Norm().eval(), src, (1, 3, 8, 8), exporter="torchscript", opset=17, dynamic_batch=False)
    clip = next(n for n in onnx.load(str(src)).graph.node if n.op_type == "Clip")
    assert len(clip.input) == 3 and clip.input[2] == ""  # what onnx2torch refused
    imported = import_onnx(src)
    assert "Clip" in imported.own_converters and max(imported.parity.values()) <= 1e-4
    result = prune(str(src), ratio=0.5, round_to=4, out=tmp_path / "p")
    assert result.report["groups_pruned"] >= 2
    assert max(result.report["onnx"]["export_parity_max_abs"].values()) <= 1e-4


class _TinyViT(nn.Module):
    """What the TorchScript exporter writes for a small ViT: Linear layers over tokens as MatMul + Add of
    initializers, GELU as Erf, the class token read with Gather, GroupNorm(1) as InstanceNormalization between
    reshapes, and numeric value names ('123') for the outputs."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 32, 4, stride=4)
        self.norm = nn.GroupNorm(1, 32)
        self.cls = nn.Parameter(torch.randn(1, 1, 32) * 0.1)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        t = self.norm(self.embed(x)).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1)
        t = t + self.fc2(nn.functional.gelu(self.fc1(t)))
        return self.head(t[:, 0])


def test_tokens_model_from_the_torchscript_exporter_prunes_its_mlp(tmp_path):
    src = tmp_path / "vit.onnx"
    torch.manual_seed(0)
    torch.onnx.export(_TinyViT().eval(), torch.rand(1, 3, 16, 16), str(src), dynamo=False, opset_version=17)
    source = onnx.load(str(src))
    assert {"MatMul", "Erf", "Gather", "InstanceNormalization"} <= {n.op_type for n in source.graph.node}
    name = source.graph.output[0].name
    assert name.isdigit()  # a name the exporter refuses to be given
    imported = import_onnx(src)
    assert {"MatMul", "Add"} <= set(imported.own_converters) and max(imported.parity.values()) <= 1e-4
    result = prune(str(src), ratio=0.5, round_to=8, out=tmp_path / "p")
    keep = {g["key"]: len(g["keep"]) for g in result.recipe["groups"]}
    assert 32 in keep.values()  # the MLP's hidden 64 channels, now a Linear the pruner cuts
    assert result.report["macs_after"] < result.report["macs_before"]
    assert max(result.report["onnx"]["export_parity_max_abs"].values()) <= 1e-4
    pruned = onnx.load(str(tmp_path / "p" / "model.onnx"))
    assert [o.name for o in pruned.graph.output] == [name]
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    assert _run(pruned, x)[name].shape == (1, 5)


class _Heads(nn.Module):
    """Tokens split into heads by a reshape: in ONNX its sizes are constants that cannot follow pruning."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.q = nn.Conv2d(32, 32, 1)
        self.mid = nn.Conv2d(32, 32, 3, padding=1)
        self.out = nn.Conv2d(32, 8, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        q = self.q(x).reshape(1, 4, 8, 64).softmax(-1).reshape(1, 32, 8, 8)
        return self.out(torch.relu(self.mid(x + q)))


def test_reshape_into_constant_heads_keeps_its_channels_whole(tmp_path):
    from trt_prune.exporter import export_onnx

    src = tmp_path / "heads.onnx"
    torch.manual_seed(0)
    export_onnx(_Heads().eval(), src, (1, 3, 8, 8), exporter="torchscript", opset=13, dynamic_batch=False)
    imported = import_onnx(src)
    # the split into heads stores the channel axis' sizes; the way back stores the spatial axis'
    assert sorted(imported.fixed.values()) == [
        "reshape of [1, 32, 8, 8] to the constant shape [1, 4, 8, 64] splits axis 1 (sizes stored in the ONNX graph)",
        "reshape of [1, 4, 8, 64] to the constant shape [1, 32, 8, 8] splits axis 3 (sizes stored in the ONNX graph)"]
    why = sorted(imported.fixed.values())[0]
    result = prune(str(src), ratio=0.5, round_to=4, out=tmp_path / "p")
    reasons = " ".join(g["reason"] for g in result.report["skipped_groups"])
    assert why in reasons
    pruned = {k["key"] for k in result.recipe["groups"]}
    assert any("mid" in k for k in pruned)  # the group the reshape does not read is still pruned
    assert max(result.report["onnx"]["export_parity_max_abs"].values()) <= 1e-4


@pytest.mark.slow
def test_nms_graph_keeps_its_detection_outputs(tmp_path):
    from trt_prune.stages import export_nms

    src = tmp_path / "demo_nms.onnx"
    export_nms("builtin:demo-detector", src, dynamic_batch=False)
    source_outputs = [o.name for o in onnx.load(str(src)).graph.output]
    run = CliRunner().invoke(cli, ["prune", str(src), "--target-macs", "0.5", "-o", str(tmp_path / "p"), "--json"])
    assert run.exit_code == 0, run.output
    summary = json.loads(run.stdout)
    assert summary["macs_after"] / summary["macs_before"] == pytest.approx(0.5, abs=0.05)
    assert summary["onnx"]["outputs"] == source_outputs == ["num_detections", "detection_boxes", "detection_scores",
                                                            "detection_classes"]
    assert {"NonMaxSuppression", "TopK"} <= set(summary["onnx"]["import"]["tail_ops"])
    x = np.random.default_rng(0).random((1, 3, 320, 320)).astype(np.float32)
    got, ref = _run(tmp_path / "p" / "model.onnx", x), _run(src, x)
    for name in source_outputs:
        assert got[name].shape == ref[name].shape and got[name].dtype == ref[name].dtype


# -------------------------------------------------------------------------------------------- bad inputs
def _prune_cli(tmp_path, src: Path, *extra: str):
    out = tmp_path / "out"
    run = CliRunner().invoke(cli, ["prune", str(src), "-o", str(out), *extra])
    return run, out


def test_unconvertible_op_is_one_error_naming_node_and_op(tmp_path):
    src = tmp_path / "bad.onnx"
    onnx.save(unconvertible_net(), src)
    before = _sha(src)
    run, out = _prune_cli(tmp_path, src)
    assert run.exit_code == 2
    assert "node 'stem/SpaceToDepth'" in run.output and "op SpaceToDepth (opset 13)" in run.output
    assert not out.exists() and _sha(src) == before


def test_external_data_outside_the_folder_is_refused(tmp_path):
    inner = tmp_path / "model"
    inner.mkdir()
    model = opset11_net()
    onnx.save_model(model, inner / "net.onnx", save_as_external_data=True, location="net.data", size_threshold=0)
    (tmp_path / "net.data").write_bytes((inner / "net.data").read_bytes())
    m = onnx.load(str(inner / "net.onnx"), load_external_data=False)
    for t in m.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = "../net.data"
    onnx.save(m, inner / "net.onnx")
    run, out = _prune_cli(tmp_path, inner / "net.onnx")
    assert run.exit_code == 2
    assert "'../net.data' outside its folder" in run.output
    assert not out.exists()


def test_model_with_nothing_prunable_says_why(tmp_path):
    src = tmp_path / "flat.onnx"
    onnx.save(nothing_prunable_net(), src)
    run, out = _prune_cli(tmp_path, src, "--round-to", "4")
    assert run.exit_code == 2
    assert "nothing can be pruned" in run.output
    assert "softmax over the channel axis" in run.output and "coupled to a model output" in run.output
    assert not out.exists()


def test_unsupported_opset_and_weights_flag_are_refused(tmp_path):
    model = opset11_net()
    model.opset_import[0].version = 10
    src = tmp_path / "old.onnx"
    onnx.save(model, src)
    with pytest.raises(OnnxImportError, match="opset 10; pruning converts opsets 11 to 18"):
        import_onnx(src)
    good = tmp_path / "net.onnx"
    onnx.save(opset11_net(), good)
    run, out = _prune_cli(tmp_path, good, "--weights", str(good))
    assert run.exit_code == 2 and "weights are inside it" in run.output and not out.exists()


def test_strict_turns_a_kept_whole_op_into_the_error(tmp_path):
    src = tmp_path / "flat.onnx"
    onnx.save(nothing_prunable_net(), src)
    run, out = _prune_cli(tmp_path, src, "--strict")
    assert run.exit_code == 2
    assert "softmax over the channel axis" in run.output and "strict" in run.output
    assert not out.exists()
