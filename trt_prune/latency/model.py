"""A latency model of a whole network, read from a latency table.

predicted(plan) = Σ over conv/linear layers of table(kept in, kept out) + rest, where *rest* is what the table
does not cover (element-wise activations, adds, resizes, concats, pooling, the framework's per-call cost). The
rest is measured, not guessed: ``rest = constant + per_activation × f``, with ``f`` the fraction of the dense
model's layer-output elements a plan keeps. Both numbers come from timing the real model end to end, dense
(f = 1) and with every prunable group cut to half (f ≈ 0.5), minus the table's sum for each
(:func:`trt_prune.latency.measure.calibrate`). The split matters because activations shrink with the
channels: on the demo detector on ONNX Runtime the SiLU after every conv is a visible share of the time
(bench/results/latency_model.md). Where the network runs its layers faster than the table timed them alone
(the rest comes out negative), the two measurements fit a scale on the layer sum plus a constant instead.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
from torch import nn

from ..errors import LatencyError
from ..pruning.graph import ChannelGraph
from .table import LatencyTable, LayerSig


@dataclass
class LayerUse:
    """One conv/linear call of the traced network: its signature and where its channel counts come from."""

    module: str
    sig: LayerSig
    in_classes: np.ndarray | None  # None: input channels fixed (the image)
    out_classes: np.ndarray | None  # None: follows the input (depthwise)
    out_elements: int  # per channel of output: spatial size × batch (for the activation share of the rest)

    @property
    def dense_in(self) -> int:
        return self.sig.dense[0]

    @property
    def dense_out(self) -> int:
        return self.sig.dense[1]

    def counts(self, kept: np.ndarray | None) -> tuple[int, int]:
        c_in = self.dense_in if kept is None or self.in_classes is None else int(kept[self.in_classes].sum())
        if self.sig.one_axis:
            return c_in, 0
        c_out = self.dense_out if kept is None or self.out_classes is None else int(kept[self.out_classes].sum())
        return c_in, c_out


def _pad(padding, kernel, dilation) -> tuple[int, ...]:
    if isinstance(padding, str):  # 'valid' or 'same' (stride 1): the symmetric share of the total padding
        return tuple(0 if padding == "valid" else d * (k - 1) // 2 for k, d in zip(kernel, dilation, strict=False))
    return tuple(int(p) for p in padding)


def layer_uses(graph: ChannelGraph) -> tuple[list[LayerUse], list[str]]:
    """The table-covered layers of ``graph`` and the compute layers it cannot cover (their time is in the rest)."""
    modules = dict(graph.model.named_modules())
    uses, uncovered = [], []
    for node in graph.compute:
        m = modules.get(node.module)
        shape = tuple(node.in_shape)
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                          nn.ConvTranspose3d)) and len(shape) >= 3:
            transposed = isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))
            w = m.weight.shape
            c_in, c_out = (w[0], w[1] * m.groups) if transposed else (w[1] * m.groups, w[0])
            if m.groups == 1:
                op = "conv_transpose" if transposed else "conv"
            elif transposed or c_out != c_in:  # grouped transposed, depthwise with a channel multiplier
                uncovered.append(node.module)
                continue
            else:
                op = "depthwise" if node.out_classes is None else "grouped"
            kernel, dilation = tuple(m.kernel_size), tuple(m.dilation)
            sig = LayerSig(op=op, kernel=kernel, stride=tuple(m.stride), padding=_pad(m.padding, kernel, dilation),
                           dilation=dilation, groups=int(m.groups), spatial=tuple(int(s) for s in shape[2:]),
                           batch=int(shape[0]), bias=m.bias is not None, dense=(int(c_in), int(c_out)))
            per_channel = node.macs / max(1, c_out * (c_in // m.groups) * int(np.prod(kernel))) * shape[0]
        elif isinstance(m, nn.Linear) and len(shape) >= 2 and shape[-1] == m.in_features:
            rows = int(np.prod(shape[1:-1])) if len(shape) > 2 else 1
            sig = LayerSig(op="linear", spatial=(rows,), batch=int(shape[0]), bias=m.bias is not None,
                           dense=(int(m.in_features), int(m.out_features)))
            per_channel = rows * shape[0]
        else:
            uncovered.append(node.module)
            continue
        uses.append(LayerUse(node.module, sig, node.in_classes, node.out_classes, int(round(per_channel))))
    return uses, uncovered


def model_key(uses: list[LayerUse], input_shape) -> str:
    """A fingerprint of a network's covered layers and input shape: calibrations are stored under it."""
    text = json.dumps([list(input_shape)] + [[u.module, u.sig.key()] for u in uses])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


class LatencyModel:
    """Predicted latency (ms) of ``graph`` under any kept mask, from ``table`` and the model's calibration."""

    def __init__(self, graph: ChannelGraph, table: LatencyTable, *, require_calibration: bool = True):
        self.graph = graph
        self.table = table
        self.layers, self.uncovered = layer_uses(graph)
        if not self.layers:
            raise LatencyError("the model has no conv or linear layer a latency table can cover")
        self.key = model_key(self.layers, graph.input_shape)
        missing = sorted({u.sig.key() for u in self.layers if table.entry(u.sig) is None
                          or np.isnan(table.entry(u.sig).ms).any()})
        if missing:
            raise LatencyError(f"the latency table lacks {len(missing)} of this model's layer shapes (first: "
                               f"{missing[0]}); extend it with `trt-prune latency-table MODEL -o DIR`")
        cal = table.calibrations.get(self.key)
        if cal is None and require_calibration:
            raise LatencyError("the latency table has not been calibrated on this model (input shape "
                               f"{list(graph.input_shape)}); `trt-prune latency-table MODEL -o DIR` measures it")
        self.constant_ms = float(cal["constant_ms"]) if cal else 0.0
        self.per_activation_ms = float(cal.get("per_activation_ms", 0.0)) if cal else 0.0
        self.scale = float(cal.get("layer_scale", 1.0)) if cal else 1.0
        self.dense_activation = float(sum(u.out_elements * self._dense_out(u) for u in self.layers))
        self.entries = [table.entry(u.sig) for u in self.layers]  # looked up once: planning reads them often

    @staticmethod
    def _dense_out(u: LayerUse) -> int:
        return u.dense_in if u.sig.one_axis else u.dense_out

    def layer_ms_at(self, index: int, c_in: float, c_out: float) -> float:
        """Time of layer ``index`` (of :attr:`layers`) at these counts, scaled by the calibration."""
        entry = self.entries[index]
        return self.scale * entry.interpolate(entry.ms, c_in, 0 if self.layers[index].sig.one_axis else c_out)

    def layer_sum(self, kept: np.ndarray | None = None) -> float:
        return sum(self.layer_ms_at(i, *u.counts(kept)) for i, u in enumerate(self.layers))

    def activation_fraction(self, kept: np.ndarray | None = None) -> float:
        total = 0.0
        for u in self.layers:
            c_in, c_out = u.counts(kept)
            total += u.out_elements * (c_in if u.sig.one_axis else c_out)
        return total / self.dense_activation if self.dense_activation else 1.0

    def rest_ms(self, kept: np.ndarray | None = None) -> float:
        return self.constant_ms + self.per_activation_ms * self.activation_fraction(kept)

    def predict(self, kept: np.ndarray | None = None) -> float:
        """Predicted end-to-end latency (ms) with the channels of ``kept`` (None: dense)."""
        return self.layer_sum(kept) + self.rest_ms(kept)

    def breakdown(self, kept: np.ndarray | None = None) -> list[dict]:
        rows = []
        for i, u in enumerate(self.layers):
            c_in, c_out = u.counts(kept)
            rows.append({"module": u.module, "op": u.sig.op, "in": c_in, "out": c_out,
                         "ms": round(self.layer_ms_at(i, c_in, c_out), 4)})
        return rows
