"""Pre-processing + model + decode/NMS timed per part on the torch backend (trt_prune.profiling.pipeline)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from trt_prune import stages
from trt_prune.backends import BuildConfig
from trt_prune.cli import cli
from trt_prune.errors import ProfileError
from trt_prune.profiling.pipeline import builtin_frames, folder_frames, time_pipeline


def test_builtin_frames_are_camera_sized_bgr_scenes():
    frames = builtin_frames(2, (270, 480))
    assert [f.shape for f in frames] == [(270, 480, 3)] * 2
    assert all(f.dtype == np.uint8 and f.flags["C_CONTIGUOUS"] for f in frames)
    assert not np.array_equal(frames[0], frames[1])  # two different scenes
    again = builtin_frames(1, (270, 480))[0]
    np.testing.assert_array_equal(again, frames[0])  # deterministic


def test_folder_frames_reads_images_as_bgr(tmp_path):
    from PIL import Image

    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., 0] = 200  # red
    Image.fromarray(rgb).save(tmp_path / "a.png")
    (frame,) = folder_frames(tmp_path, 4)
    assert frame.shape == (20, 30, 3) and frame[0, 0].tolist() == [0, 0, 200]
    with pytest.raises(ProfileError, match="holds no images"):
        folder_frames(tmp_path / "a.png", 1)


def test_pipeline_times_every_part_and_its_detections_are_the_models_own():
    frames = builtin_frames(2, (180, 320))
    config = BuildConfig(extra={"device": "cpu"}, threads=2)
    with stages.build("builtin:demo-detector", "torch", config, batch=2) as session:
        result = time_pipeline(session, frames, iterations=2, warmup_s=0.0)
    assert result["frames"] == 2 and result["frame_sizes"] == ["320x180"]
    assert result["preprocess_impl"] == "torch" and result["device"] == "cpu"
    assert set(result["parts"]) == {"preprocess", "model", "postprocess"}
    parts = sum(v["p50_ms"] for v in result["parts"].values())
    assert all(v["p50_ms"] > 0 for v in result["parts"].values())
    # the total is timed around the three parts: never less than their medians' sum by more than noise
    assert result["total"]["p50_ms"] >= 0.9 * parts
    assert result["total"]["p50_ms_per_frame"] == pytest.approx(result["total"]["p50_ms"] / 2)
    assert result["notes"] == []


def test_pipeline_on_a_model_without_decoder_says_so():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU())
    config = BuildConfig(extra={"device": "cpu"}, shapes={"images": ((1, 3, 64, 64),) * 3})
    with stages.build(model, "torch", config) as session:
        result = time_pipeline(session, builtin_frames(1, (48, 80)), iterations=1, warmup_s=0.0)
    assert set(result["parts"]) == {"preprocess", "model"}
    assert "no decoder" in result["notes"][0]


def test_pipeline_refuses_a_non_torch_session(tmp_path):
    with pytest.raises(ProfileError, match="torch backend"):
        time_pipeline(object(), builtin_frames(1, (48, 80)))


@pytest.mark.parametrize("args, message", [
    (["--e2e"], "--backend torch"),
    (["--backend", "torch", "--frames", "nowhere"], "only feeds --e2e"),
    (["--backend", "torch", "--e2e", "--frames", "nowhere"], "neither 'builtin' nor a folder"),
])
def test_profile_e2e_bad_options_fail_before_timing(args, message, tmp_path):
    out = tmp_path / "p.json"
    res = CliRunner().invoke(cli, ["profile", "builtin:demo-detector", *args, "-o", str(out)])
    assert res.exit_code == 2 and message in res.output
    assert not out.exists()


def test_profile_e2e_cli_reports_the_parts(tmp_path):
    out = tmp_path / "p.json"
    res = CliRunner().invoke(cli, ["profile", "builtin:demo-detector", "--backend", "torch", "--device", "cpu",
                                   "--e2e", "--iterations", "2", "--warmup", "0", "--duration", "0",
                                   "--layer-runs", "1", "--threads", "2", "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    pipe = json.loads(out.read_text())["pipeline"]
    assert pipe["frames"] == 1 and pipe["frame_sizes"] == ["1920x1080"] and pipe["input_hw"] == [320, 320]
    assert set(pipe["parts"]) == {"preprocess", "model", "postprocess"}
    assert json.loads(res.stdout)["pipeline"]["iterations"] == 2


def test_export_stores_the_preprocessing_the_model_was_trained_with(tmp_path):
    from trt_prune.kernels.preprocess import PreprocessSpec
    from trt_prune.models import load_model
    from trt_prune.profiling.pipeline import default_spec, exported_spec

    raw, cleaned = tmp_path / "m.onnx", tmp_path / "m.clean.onnx"
    stages.export("builtin:demo-detector", raw, (1, 3, 256, 320))
    stages.clean(raw, cleaned)
    spec = exported_spec(cleaned)  # survives the clean stage
    assert spec == default_spec(load_model("builtin:demo-detector").model, (256, 320))
    assert spec == PreprocessSpec(size=(256, 320), stride=32, pad_value=114, input_order="bgr")
    # a model whose training transform is unknown gets none
    other = tmp_path / "conv.onnx"
    stages.export(torch.nn.Conv2d(3, 4, 3), other, (1, 3, 32, 32))
    assert exported_spec(other) is None
