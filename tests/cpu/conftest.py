"""Shared helpers for the CPU tests."""

from __future__ import annotations

import shutil

import pytest
import torch

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "headless_shell")


def _kill(model, graph, fraction=0.5, pick=None):
    """Zero every weight that writes the second half of each prunable group's channels (per split segment), or
    the positions ``pick(group)`` returns."""
    modules = dict(model.named_modules())
    dead = set()
    for g in graph.groups:
        if g.pinned:
            continue
        if pick is not None:
            dead |= {g.classes[i] for i in pick(g)}
            continue
        for seg in g.segments or [list(range(g.size))]:
            dead |= {g.classes[i] for i in seg[int(len(seg) * (1 - fraction)):]}
    with torch.no_grad():
        for (path, kind), slot in graph.slots.items():
            idx = [i for i, e in enumerate(slot.elements) if graph.cls(e) in dead]
            if not idx:
                continue
            m = modules[path]
            if kind.startswith("param:"):  # a tensor cut along one axis (transposed conv, embedding, layer scale)
                _, name, axis = kind.split(":")
                getattr(m, name).index_fill_(int(axis), torch.tensor(idx), 0)
            elif kind in ("out", "depthwise", "grouped", "multiplier"):
                m.weight[idx] = 0
                if m.bias is not None:
                    m.bias[idx] = 0
                if kind == "grouped" and getattr(m, "transposed", False):
                    # weight [in, out/groups, ...]: rows are inputs, so output i is written by column i % width
                    width = m.weight.shape[1]
                    for i in idx:
                        m.weight[i // width * width:(i // width + 1) * width, i % width] = 0
            elif kind == "in":
                m.weight[:, idx] = 0
            elif kind == "norm":
                m.weight[idx] = 0
                if getattr(m, "bias", None) is not None:
                    m.bias[idx] = 0
                if getattr(m, "running_mean", None) is not None:
                    m.running_mean[idx] = 0
                    m.running_var[idx] = 1


@pytest.fixture
def kill_channels():
    """``kill(model, graph, pick=None)``: make the second half of every prunable group's channels (or the
    positions ``pick(group)`` returns) dead (every weight that writes or reads them zero), so pruning exactly
    those channels must leave the outputs unchanged."""
    return _kill


@pytest.fixture(scope="module")
def detector():
    """A DemoDetector with random weights and non-trivial BatchNorm statistics and biases, so that a mistake in
    cutting or reordering a norm's tensors changes the outputs."""
    from torch import nn

    from trt_prune.models.demo_detector import DemoDetector

    torch.manual_seed(0)
    model = DemoDetector().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    return model


def find_browser() -> str | None:
    """A headless-capable Chromium on PATH (the first of :data:`BROWSERS` found), or None."""
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture
def browser() -> str:
    """The path of a Chromium on PATH for screenshot tests; the test skips, saying why, where there is none
    (CI installs Debian's ``chromium`` in ``.ci/run``)."""
    found = find_browser()
    if found is None:
        pytest.skip(f"no browser on PATH (looked for {', '.join(BROWSERS)}); `apt-get install chromium` adds one")
    return found


@pytest.fixture
def screenshot(browser, tmp_path):
    """``shoot(page, width, height) -> pixels``: the page rendered headless, offline, as an RGB(A) array; the
    test fails when the browser does, or when the picture is one flat colour (a page that rendered nothing)."""
    import subprocess

    import matplotlib.image
    import numpy as np

    def shoot(page, width: int = 1200, height: int = 1600):
        shot = tmp_path / "screenshot.png"
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run",
                        f"--user-data-dir={tmp_path / 'browser-profile'}", f"--screenshot={shot}",
                        f"--window-size={width},{height}", page.resolve().as_uri()],
                       capture_output=True, timeout=120, check=True)
        assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        pixels = np.asarray(matplotlib.image.imread(shot))
        flat = pixels.reshape(-1, pixels.shape[-1])
        assert not (flat == flat[0]).all(), "the page rendered as one flat colour"
        shutil.rmtree(tmp_path / "browser-profile", ignore_errors=True)
        return pixels

    return shoot
