"""pyproject.toml lists its packages by hand (kernels/ is mapped to trt_prune.kernels): none may be forgotten."""

from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(tomllib is None, reason="tomllib needs Python 3.11")
def test_every_package_folder_is_listed_and_kernels_is_mapped():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "trt_prune").rglob("__init__.py")}
    found.add("trt_prune.kernels")
    assert set(config["packages"]) == found
    assert config["package-dir"] == {"trt_prune.kernels": "kernels"}
    assert (ROOT / "kernels" / "__init__.py").is_file()


def test_kernels_import_from_the_top_level_folder():
    import trt_prune.kernels

    assert Path(trt_prune.kernels.__file__).resolve().parent == ROOT / "kernels"
