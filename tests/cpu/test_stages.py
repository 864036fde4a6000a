"""The one pipeline: stage functions over typed artifacts, the facade, the registries, and safe loading."""

from __future__ import annotations

import importlib
import json
import pkgutil
import subprocess
import sys
import types

import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import trt_prune
from trt_prune import stages
from trt_prune.artifacts import ModelMeta, OnnxArtifact, read_model_meta
from trt_prune.cli import cli
from trt_prune.errors import BackendError, ModelSpecError, PruneError, TrtPruneError
from trt_prune.registry import Registry, RegistryError

FACTORY = '''
from torch import nn


def net():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 1))
'''


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


# ------------------------------------------------------------------------------------------------- facade
def test_no_facade_name_is_shadowed_by_a_submodule():
    """Importing every submodule (which sets package attributes) must leave each facade name its function."""
    code = """
import importlib, pkgutil, types, trt_prune
for info in pkgutil.walk_packages(trt_prune.__path__, 'trt_prune.'):
    importlib.import_module(info.name)
bad = [n for n in trt_prune.__all__ if isinstance(getattr(trt_prune, n), types.ModuleType)]
def target(n):
    module, attr = trt_prune._PUBLIC[n]
    return getattr(importlib.import_module(module), attr)
wrong = [n for n in trt_prune.__all__ if getattr(trt_prune, n) is not target(n)]
print(bad, wrong)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert done.stdout.strip() == "[] []", done.stdout + done.stderr
    submodules = {info.name.rpartition(".")[2] for info in pkgutil.iter_modules(trt_prune.__path__)}
    assert not set(trt_prune.__all__) & submodules


def test_facade_stages_are_the_stage_functions():
    for name in ("prune", "sparsify", "export", "clean", "fp16", "build", "profile", "to_onnx"):
        assert getattr(trt_prune, name) is getattr(stages, name)


# ----------------------------------------------------------------------------------------------- registries
def _registries():
    from trt_prune.backends.base import _REGISTRY as backends
    from trt_prune.cleaner import PASSES
    from trt_prune.models import BUILTINS
    from trt_prune.pruning.graph import CHANNEL_RULES
    from trt_prune.pruning.importance import IMPORTANCES
    from trt_prune.pruning.surgery import FIXUPS, SURGERY

    return {"channel rules": CHANNEL_RULES, "surgery": SURGERY, "fixups": FIXUPS, "importances": IMPORTANCES,
            "clean passes": PASSES, "backends": backends, "built-in models": BUILTINS}


REGISTRY_NAMES = ["channel rules", "surgery", "fixups", "importances", "clean passes", "backends",
                  "built-in models"]


@pytest.mark.parametrize("name", REGISTRY_NAMES)
def test_every_registry_has_one_duplicate_policy(name):
    registry = _registries()[name]
    assert isinstance(registry, Registry) and len(registry) > 0
    key, value = next(iter(registry.items()))
    registry.register(key, value)  # the same object again: a no-op (a module imported twice)
    with pytest.raises(RegistryError, match="already registered.*replace=True"):
        registry.register(key, object())
    other = object()
    try:
        registry.register(key, other, replace=True)
        assert registry[key] is other
    finally:
        registry.register(key, value, replace=True)
    assert registry[key] is value
    with pytest.raises(registry.error, match="valid names: "):
        registry.lookup("no such entry")


def test_registry_decorator_and_unregister():
    registry = Registry("widget", TrtPruneError)

    @registry.decorator("a", "b")
    def widget():
        return 1

    assert registry["a"] is registry["b"] is widget and registry.names() == ["a", "b"]
    registry.unregister("a")
    assert list(registry) == ["b"]
    with pytest.raises(RegistryError, match="non-empty key"):
        registry.register("", widget)


@pytest.mark.parametrize("name", sorted(_registries()["importances"]))
def test_every_importance_scores_every_channel(name):
    from trt_prune.stages import prune

    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 1))
    data = [torch.randn(2, 3, 8, 8)] if name == "taylor" else None
    loss_fn = (lambda m, batch: m(batch).pow(2).mean()) if name == "taylor" else None
    result = prune(model, (1, 3, 8, 8), ratio=0.5, round_to=4, importance=name, data=data, loss_fn=loss_fn)
    assert result.model[0].out_channels == 8 and result.model[3].in_channels == 8


@pytest.mark.parametrize("name", sorted(_registries()["backends"]))
def test_every_backend_declares_what_it_builds_from(name):
    from trt_prune.backends import OPTIONS, SOURCE_KINDS, backend_class, get_backend

    cls = backend_class(name)
    assert cls.builds_from and set(cls.builds_from) <= set(SOURCE_KINDS)
    assert set(cls.options) <= set(OPTIONS)
    ok, reason = get_backend(name).available()
    assert isinstance(ok, bool) and (ok or reason)


@pytest.mark.parametrize("name", sorted(_registries()["clean passes"]))
def test_every_clean_pass_runs_on_a_real_graph(name, tmp_path):
    from trt_prune.cleaner import clean_onnx
    from trt_prune.exporter import export_onnx

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 8 * 8, 4))
    export_onnx(model.eval(), tmp_path / "m.onnx", (1, 3, 8, 8), exporter="torchscript")
    result = clean_onnx(tmp_path / "m.onnx", tmp_path / "c.onnx", passes=[name])
    assert [p["name"] for p in result.passes] == [name] and result.parity


# ----------------------------------------------------------------------------------------------- folders
def test_python_prune_and_sparsify_write_the_folder_the_cli_writes(tmp_path):
    cli_out = tmp_path / "cli"
    assert run("prune", "builtin:demo-detector", "--ratio", "0.25", "--round-to", "8", "--input-shape",
               "1x3x128x128", "--out", cli_out).exit_code == 0
    result = stages.prune("builtin:demo-detector", (1, 3, 128, 128), ratio=0.25, round_to=8, out=tmp_path / "py")
    assert sorted(p.name for p in result.folder.iterdir()) == sorted(p.name for p in cli_out.iterdir())
    assert read_model_meta(result.folder) == read_model_meta(cli_out)
    assert json.loads((result.folder / "recipe.json").read_text()) == json.loads((cli_out / "recipe.json").read_text())
    sparse = stages.sparsify(result.folder, min_channels=32, out=tmp_path / "sparse")
    meta = read_model_meta(sparse.folder)
    assert meta.history == ["prune", "sparsify"] and meta.recipe == result.recipe
    assert meta.sparsity["layers"] == sparse.sparse_layers and sparse.sparse_layers
    again = trt_prune.load_model(str(sparse.folder))
    x = torch.rand(1, 3, 128, 128)
    torch.testing.assert_close(again.model(x), sparse.model.eval()(x))


def test_a_module_needs_its_source_spec_to_become_a_folder(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 1))
    with pytest.raises(TrtPruneError, match="source='torchvision:resnet18'"):
        stages.prune(model, (1, 3, 8, 8), ratio=0.5, round_to=4, out=tmp_path / "p")
    assert not (tmp_path / "p").exists()
    with pytest.raises(PruneError, match="unknown pruning option 'ratoi'"):
        stages.prune(model, (1, 3, 8, 8), ratoi=0.5)


def test_model_meta_round_trip_and_errors():
    meta = ModelMeta("builtin:demo-detector", (1, 3, 320, 320), "detection", {"version": 1}, None, ["prune"])
    assert ModelMeta.from_dict(meta.to_dict()) == meta
    for broken, needle in (([], "JSON object"), ({**meta.to_dict(), "version": 9}, "upgrade trt_prune"),
                           ({**meta.to_dict(), "input_shape": [1, "3"]}, "input_shape"),
                           ({**meta.to_dict(), "source": ""}, "names no source"),
                           ({**meta.to_dict(), "history": "prune"}, "history"),
                           ({**meta.to_dict(), "recipe": [1]}, "recipe")):
        with pytest.raises(ModelSpecError, match=needle):
            ModelMeta.from_dict(broken)


# ------------------------------------------------------------------------------------------- trusting code
@pytest.fixture
def code_folder(tmp_path):
    """A model folder whose model.json names a .py source, as 'trt-prune prune file.py:net' writes it."""
    (tmp_path / "net.py").write_text(FACTORY)
    (tmp_path / "marker").write_text("")
    spec = f"{tmp_path / 'net.py'}:net"
    result = run("prune", spec, "--input-shape", "1x3x16x16", "--ratio", "0.5", "--round-to", "4", "--out",
                 tmp_path / "pruned")  # a spec typed on the command line: allowed
    assert result.exit_code == 0, result.stderr
    return tmp_path / "pruned", tmp_path / "net.py"


def test_a_folder_naming_a_python_source_needs_trust_code(code_folder, tmp_path):
    folder, source = code_folder
    assert read_model_meta(folder).runs_code == str(source)
    with pytest.raises(ModelSpecError, match=r"would execute that file\. Pass --trust-code"):
        trt_prune.load_model(str(folder))
    loaded = trt_prune.load_model(str(folder), trust_code=True)
    assert loaded.model[0].out_channels == 8
    result = run("export", folder, "-o", tmp_path / "m.onnx")
    assert result.exit_code == 2 and "--trust-code" in result.stderr and str(source) in result.stderr
    assert not (tmp_path / "m.onnx").exists()
    assert run("export", folder, "--trust-code", "-o", tmp_path / "m.onnx").exit_code == 0
    assert (tmp_path / "m.onnx").is_file()


def test_a_suite_naming_a_python_model_needs_trust_code(tmp_path):
    (tmp_path / "net.py").write_text(FACTORY)
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"name: s\nentries: [{{model: '{tmp_path / 'net.py'}:net', input_shape: [1, 3, 16, 16], "
                     "variants: {dense: {}}}]\n")
    result = run("bench", "run", suite, "--store", tmp_path / "s.sqlite")
    assert result.exit_code == 2 and "--trust-code" in result.stderr
    assert not (tmp_path / "s.sqlite").exists()


# ------------------------------------------------------------------------------------------ ONNX artifacts
def test_onnx_provenance_travels_with_the_file(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval()
    stages.export(model, tmp_path / "m.onnx", (1, 3, 16, 16), exporter="torchscript")
    stages.clean(tmp_path / "m.onnx", tmp_path / "c.onnx")
    artifact = OnnxArtifact.read(tmp_path / "c.onnx")
    assert artifact.source == "Sequential" and artifact.input_shape == (1, 3, 16, 16)
    assert [s["stage"] for s in artifact.steps] == ["export", "clean"]
    assert artifact.steps[0]["exporter"] == "torchscript" and artifact.steps[1]["nodes_after"] >= 1
    assert OnnxArtifact.from_dict(json.loads(json.dumps(artifact.to_dict()))) == artifact
    # a file made elsewhere has no record, and a damaged record is never a reason to refuse the file
    foreign = onnx.load(tmp_path / "m.onnx")
    del foreign.metadata_props[:]
    foreign.metadata_props.add(key="trt_prune", value="{not json")
    onnx.save(foreign, tmp_path / "f.onnx")
    assert OnnxArtifact.read(tmp_path / "f.onnx") == OnnxArtifact(tmp_path / "f.onnx")


def test_build_exports_a_model_for_an_onnx_backend_and_cleans_up(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()).eval()
    from trt_prune.models import LoadedModel

    loaded = LoadedModel(model, "tiny", ModelMeta("tiny", (1, 3, 16, 16)))
    session = stages.build(loaded, "onnxruntime", batch=2)
    folder = session.artifact.path.parent
    assert folder.is_dir() and [s["stage"] for s in session.artifact.steps] == ["export", "clean"]
    out = session.run({session.inputs[0].name: torch.rand(2, 3, 16, 16).numpy()})
    assert next(iter(out.values())).shape == (2, 8, 16, 16)
    session.close()
    assert not folder.exists()  # the temporary export went with the session
    with stages.build(loaded, "torch", batch=2) as torch_session:
        assert torch_session.artifact is None and torch_session.inputs[0].shape == (2, 3, 16, 16)
    with pytest.raises(BackendError, match="builds from an ONNX file, not a PyTorch model"):
        trt_prune.backends.get_backend("onnxruntime").build(model)


def test_profile_takes_a_model_on_an_onnx_backend():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()).eval()
    from trt_prune.models import LoadedModel

    loaded = LoadedModel(model, "tiny", ModelMeta("tiny", (1, 3, 16, 16)))
    result = stages.profile(loaded, "onnxruntime", warmup_s=0, iterations=3, min_duration_s=0, layer_runs=2,
                            threads=1)
    assert result.backend == "onnxruntime" and result.input_shapes == {"images": [1, 3, 16, 16]}
    assert result.per_layer and all(r["module"] for r in result.per_layer if r["op"] == "Conv")


def test_every_submodule_imports():
    for info in pkgutil.walk_packages(trt_prune.__path__, "trt_prune."):
        assert isinstance(importlib.import_module(info.name), types.ModuleType)
