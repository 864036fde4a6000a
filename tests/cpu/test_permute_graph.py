"""Channel permutation for 2:4 through the channel graph: same outputs, more magnitude kept."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trt_prune.errors import SparsifyError
from trt_prune.sparsity import sparsify
from trt_prune.sparsity.pattern import kept_magnitude
from trt_prune.sparsity.permute import permute_for_24


def test_permutation_keeps_outputs_and_raises_kept_magnitude(detector):
    res = permute_for_24(detector, (1, 3, 64, 64), min_channels=64, time_budget_s=0.2)
    assert len(res.permuted) >= 3
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), detector(x), rtol=1e-4, atol=1e-5)
    # every permuted group: its 2:4 readers keep at least as much magnitude, and overall strictly more
    gained = 0.0
    for row in res.permuted:
        assert row["kept_permuted"] >= row["kept_plain"] and row["efficacy"] > 0
        for layer in row["layers"]:
            before = kept_magnitude(detector.get_submodule(layer).weight.detach().numpy(), axis=1)
            after = kept_magnitude(res.model.get_submodule(layer).weight.detach().numpy(), axis=1)
            gained += after - before
    assert gained > 0
    # after sparsify, the permuted model's 2:4 layers hold more of their dense magnitude
    plain, permuted = sparsify(detector, min_channels=64), sparsify(res.model, min_channels=64)
    assert set(plain.sparse_layers) == set(permuted.sparse_layers)
    share = {r["module"]: r["kept_magnitude"] for r in permuted.layers if r["made_24"]}
    base = {r["module"]: r["kept_magnitude"] for r in plain.layers if r["made_24"]}
    moved = [m for row in res.permuted for m in row["layers"]]
    assert all(share[m] >= base[m] - 1e-9 for m in moved) and sum(share[m] - base[m] for m in moved) > 0
    # groups that cannot move say why (the head outputs are pinned; the C2f splits fix positions)
    reasons = {row.get("reason", "") for row in res.groups if not row["permuted"]}
    assert any("split" in r for r in reasons)


def test_permutation_needs_an_eligible_layer():
    with pytest.raises(SparsifyError, match="no layer of this model is eligible"):
        permute_for_24(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1)), (1, 3, 16, 16))


def test_the_kernel_scorer_permutes_the_model_too_and_keeps_its_outputs(detector):
    # on the CPU the kernel scorer runs its torch reference; the permutation must still preserve the function
    res = permute_for_24(detector, (1, 3, 64, 64), min_channels=64, time_budget_s=0.2, scorer="kernel")
    assert res.permuted and all(row["kept_permuted"] >= row["kept_plain"] for row in res.permuted)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), detector(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(SparsifyError, match="scorer must be one of numpy, kernel, got 'gpu'"):
        permute_for_24(detector, (1, 3, 64, 64), min_channels=64, scorer="gpu")


def test_cli_permute_scorer_needs_permute(tmp_path):
    from click.testing import CliRunner

    from trt_prune.cli import cli

    out = tmp_path / "sparse"
    res = CliRunner().invoke(cli, ["sparsify", "builtin:demo-detector", "--permute-scorer", "kernel", "-o", str(out)])
    assert res.exit_code == 2 and "add --permute SECONDS" in res.output
    assert not out.exists()
