"""The CLI's contract over every command, derived from the CLI itself: ``--help`` works, and every bad input
(a wrong shape, a factory that raises, an unwritable output, an unknown option) is one ``error:`` line, exit 2,
and an output location left as it was."""

from __future__ import annotations

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from trt_prune.cli import cli

FACTORIES = '''
import torch
from torch import nn


def tiny():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))


def boom():
    raise RuntimeError("factory exploded")
'''


def command_paths(group: click.Group = cli, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and sub-command of ``group``, as argument paths, from the CLI's own tables."""
    paths = []
    for name, command in sorted(group.commands.items()):
        paths.append((*prefix, name))
        if isinstance(command, click.Group):
            paths += command_paths(command, (*prefix, name))
    return paths


def leaf_commands() -> list[tuple[str, ...]]:
    return [p for p in command_paths() if not isinstance(_command(p), click.Group)]


def _command(path):
    command = cli
    for name in path:
        command = command.commands[name]
    return command


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def snapshot(folder):
    """Every file's bytes and every folder under ``folder``: what a failed command must leave as it was."""
    return ({str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()},
            sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_dir()))


@pytest.mark.parametrize("path", command_paths(), ids=" ".join)
def test_every_command_has_help(path):
    result = run(*path, "--help")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: cli {' '.join(path)}") and "--help" in result.output


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Inputs every command can be pointed at: a factory file, a small ONNX file, a suite, a profile JSON."""
    from trt_prune.exporter import export_onnx

    root = tmp_path_factory.mktemp("contract")
    (root / "models.py").write_text(FACTORIES)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    export_onnx(model, root / "small.onnx", (1, 3, 16, 16), exporter="torchscript")
    np.save(root / "calib.npy", np.random.default_rng(0).random((2, 3, 16, 16), dtype=np.float32))
    (root / "suite.yaml").write_text(f"name: s\nentries: [{{model: '{root / 'models.py'}:boom', "
                                     "variants: {dense: {}}}]\n")
    (root / "blocker").write_text("a file where a folder should be")
    return root


# Per command: a valid invocation (placeholders {onnx}, {tiny}, {boom}, {suite}, {out}, {file}) and which
# bad-input cases apply. {out}/{file} stand for the output folder/file; the unwritable case puts them under a
# file. A new command must be added here: the test below fails for any command without an entry.
TABLE: dict[tuple[str, ...], dict] = {
    ("demo",): {"args": ["--quick", "-o", "{out}"], "out": True},
    ("prune",): {"args": ["{tiny}", "--input-shape", "1x3x16x16", "--out", "{out}"], "out": True, "model": True,
                 "shape": True},
    ("sparsify",): {"args": ["{tiny}", "--out", "{out}"], "out": True, "model": True},
    ("export",): {"args": ["{tiny}", "--input-shape", "1x3x16x16", "-o", "{file}"], "out": True, "model": True,
                  "shape": True},
    ("clean",): {"args": ["{onnx}", "-o", "{file}"], "out": True, "shape": True},
    ("fp16",): {"args": ["{onnx}", "-o", "{file}"], "out": True, "shape": True},
    ("build",): {"args": ["{tiny}", "-o", "{file}"], "out": True, "model": True},
    ("profile",): {"args": ["{tiny}", "--backend", "torch", "--input-shape", "1x3x16x16", "-o", "{file}"],
                   "out": True, "model": True, "shape": True},
    ("quantize",): {"args": ["{onnx}", "--calib", "{calib}", "--no-cache", "-o", "{file}"], "out": True},
    ("inspect", "sparsity"): {"args": ["{onnx}"]},
    ("inspect", "quantization"): {"args": ["{onnx}"]},
    ("inspect", "latency-table"): {"args": ["{out}"]},
    ("latency-table",): {"args": ["{tiny}", "--input-shape", "1x3x16x16", "--points", "2", "-o", "{out}"],
                         "out": True, "model": True, "shape": True},
    ("bench", "run"): {"args": ["{suite}", "--store", "{file}", "--trust-code"], "out": True, "model_in_suite": True},
    ("bench", "compare"): {"args": ["--baseline", "{tiny}", "--candidate", "{tiny}", "--input-shape", "1x3x16x16",
                                    "--backend", "torch", "--html", "{file}", "--max-blocks", "2"], "out": True,
                           "model": True, "shape": True},
    ("bench", "history"): {"args": ["--store", "{file}", "--html", "{file}.html"], "out": True},
}


def test_the_table_covers_every_command():
    assert set(TABLE) == set(leaf_commands())


def _cases(path):
    """``(label, replacements, extra args)`` for every bad input that applies to the command at ``path``."""
    spec = TABLE[path]
    cases = [("unknown option", {}, ["--no-such-option"])]
    if spec.get("out"):
        cases.append(("unwritable output", {"out": "{root}/blocker/sub", "file": "{root}/blocker/sub/x.json"}, []))
    if spec.get("model"):
        cases.append(("factory raises", {"tiny": "{root}/models.py:boom"}, []))
    if spec.get("shape"):
        wrong = "1x3" if path in (("clean",), ("fp16",)) else "1x4x16x16"
        cases.append(("wrong input shape", {"shape": wrong}, []))
    return cases


ALL_CASES = [(path, label, repl, extra) for path in TABLE for label, repl, extra in _cases(path)]


@pytest.mark.parametrize("path, label, replacements, extra", ALL_CASES,
                         ids=[f"{' '.join(p)}: {label}" for p, label, _, _ in ALL_CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(workspace, tmp_path, path, label, replacements, extra):
    values = {"onnx": str(workspace / "small.onnx"), "tiny": f"{workspace / 'models.py'}:tiny",
              "suite": str(workspace / "suite.yaml"), "out": str(tmp_path / "out"),
              "calib": str(workspace / "calib.npy"), "file": str(tmp_path / "out.json")}
    values.update({k: v.format(root=workspace) for k, v in replacements.items()})
    args = [a.format(**values) for a in TABLE[path]["args"]]
    if "shape" in replacements:  # the wrong shape replaces the valid one, or is added
        if "--input-shape" in args:
            args[args.index("--input-shape") + 1] = replacements["shape"]
        else:
            args += ["--input-shape", replacements["shape"]]
    before, before_ws = snapshot(tmp_path), snapshot(workspace)
    result = run(*path, *args, *extra)
    assert result.exit_code == 2, (label, result.output, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output + result.stderr
    assert snapshot(tmp_path) == before and snapshot(workspace) == before_ws  # nothing created, nothing changed


def test_wrong_input_shape_to_prune_names_the_module_and_writes_no_folder(tmp_path):
    result = run("prune", "builtin:demo-detector", "--input-shape", "1x4x320x320", "--out", tmp_path / "pruned")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "module 'backbone.stem.conv' (Conv2d)" in result.stderr and "--input-shape" in result.stderr
    assert not (tmp_path / "pruned").exists()


def test_a_factory_that_raises_is_named(workspace, tmp_path):
    result = run("export", f"{workspace / 'models.py'}:boom", "-o", tmp_path / "m.onnx")
    assert result.exit_code == 2
    assert "raised RuntimeError: factory exploded" in result.stderr and "models.py:boom" in result.stderr


def test_usage_errors_are_one_line_with_the_command_to_ask(tmp_path):
    result = run("prune", "builtin:demo-detector", "--ratio", "lots", "--out", tmp_path / "p")
    assert result.exit_code == 2
    assert result.stderr.strip() == ("error: Invalid value for '--ratio': 'lots' is not a valid float. "
                                     "(see 'cli prune --help')")
    result = run("profile")
    assert result.exit_code == 2 and result.stderr.startswith("error: Missing argument 'FILE.onnx|MODEL'")


def test_torch_is_named_only_inside_the_backends():
    """Which backend builds from what is the backends' declaration: no caller branches on a backend's name."""
    from pathlib import Path

    import trt_prune

    root = Path(trt_prune.__file__).parent
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if "backends" not in p.parts and ('== "torch"' in p.read_text() or "== 'torch'" in p.read_text())]
    assert offenders == []


def test_backend_flags_are_checked_against_the_declarations():
    from trt_prune.backends import OPTIONS, backend_class, backend_names

    # every flag the CLI offers for a backend option is declared by at least one backend, and vice versa
    flags = {p.opts[0] for p in _command(("profile",)).params if isinstance(p, click.Option)}
    declared = {name for b in backend_names() for name in backend_class(b).options}
    offered = {name for name, option in OPTIONS.items() if option.flag in flags}
    assert offered <= declared
    assert {"fp16", "sparse_weights", "cache_dir", "cuda_graph", "device", "channels_last", "sparse24"} <= offered
    result = run("profile", "m.onnx", "--backend", "onnxruntime", "--sparse24")
    assert result.exit_code == 2 and "--sparse24 to --backend torch only" in result.stderr


def test_shape_helper_runs_a_model_only_once_per_check():
    from trt_prune.errors import PruneError
    from trt_prune.models import check_runs

    calls = []
    model = nn.Conv2d(3, 4, 1)
    model.register_forward_hook(lambda *a: calls.append(1))
    check_runs(model, (1, 3, 4, 4))
    assert calls == [1]
    with pytest.raises(PruneError, match=r"does not run on input shape 1x5x4x4 \(in the top-level module"):
        check_runs(model, (1, 5, 4, 4), PruneError)
    assert torch.is_grad_enabled()


def test_an_unavailable_backend_creates_no_cache_folder(workspace, tmp_path):
    from trt_prune.backends import get_backend

    if get_backend("tensorrt").available()[0]:
        pytest.skip("TensorRT is installed here: the command would build an engine into the folder")
    for command in (["build", workspace / "small.onnx", "--backend", "tensorrt", "-o", tmp_path / "engines"],
                    ["profile", workspace / "small.onnx", "--backend", "tensorrt", "--cache-dir", tmp_path / "c"]):
        result = run(*command)
        assert result.exit_code == 2 and "backend 'tensorrt' is unavailable" in result.stderr
        assert list(tmp_path.iterdir()) == []
