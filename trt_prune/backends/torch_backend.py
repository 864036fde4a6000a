"""The torch backend: the PyTorch model itself behind the common :class:`~trt_prune.backends.base.Session`.

It is the GPU truth this project can measure without TensorRT: on a CUDA device it runs fp16 or fp32,
optionally ``channels_last``, optionally replayed from a CUDA graph (eager launches cost more than small
kernels), and optionally with 2:4 layers on cuSPARSELt through ``torch.sparse.to_sparse_semi_structured``; on
the CPU it runs the model eagerly in fp32, which is what the tests exercise.

It builds from the model rather than from ONNX (``builds_from = ("model",)``;
``get_backend("torch").build(model_or_spec, config)``): an ``nn.Module``, a loaded model, a model spec
(``builtin:demo-detector``, ``torchvision:resnet50``…) or a model folder. The input shape comes from
``config.shapes`` (one entry, any name) or the model spec's own shape with ``config.batch``'s opt batch.

``BuildConfig`` fields it reads: ``precision`` (``fp16`` needs CUDA), ``threads`` (CPU: ``torch.set_num_threads``,
a process-wide setting, reported in ``notes``), ``batch`` / ``shapes``, and ``extra``:

- ``device``: ``"cuda"`` or ``"cpu"`` (default: CUDA when available);
- ``channels_last``: memory format of the model and input (default ``False``);
- ``cuda_graph``: time and run by CUDA-graph replay (CUDA only; default ``False``);
- ``sparse24``: replace every layer that :func:`sparse24_reason` accepts by a cuSPARSELt 2:4 layer (CUDA and
  fp16 only; default ``False``). Only weights that already hold 2:4 are converted (``trt-prune sparsify``
  first): converting others would change the model's output. Measured on an NVIDIA H200 (torch 2.11,
  ``bench/results/gpu_sparse24_layers.json``): this path was slower than dense on every one of 102 GEMMs of the
  demo detector and resnet50 (0.17–0.50×, up to 2048 channels), and the whole models ran 0.47–1.05× dense
  (``gpu_torch_variants.json``). It checks 2:4 outputs on real sparse kernels; it is not a way to speed a model up.

Timing: on CUDA each inference is bracketed by CUDA events (device time, synchronised per call); on the CPU
by ``perf_counter_ns``. Per-layer times come from forward hooks on every module, in a run separate from the
end-to-end timing: each module's *own* time (its time minus its children's), so the rows add up to the whole
forward pass and the functional ops a parent runs itself (a ``torch.cat``, a residual add) are not lost.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trt_prune.backends.base import (
    Backend,
    BuildConfig,
    LayerTime,
    Session,
    TensorSpec,
    register_backend,
)
from trt_prune.errors import BackendError, BackendUnavailableError

SPARSE_ALIGN = 16  # cuSPARSELt's fp16 2:4 weights: rows and columns multiples of 16 (torch's own constraint)


def sparse24_reason(kind: str, weight_shape: Sequence[int], *, groups: int = 1, kernel=(1, 1), stride=(1, 1),
                    padding=(0, 0), holds_24: bool = True) -> str | None:
    """Why a layer cannot run on torch's 2:4 path, or ``None`` when it can.

    ``to_sparse_semi_structured`` compresses a 2-D ``[out, in]`` weight for ``F.linear``: a Linear, or a 1×1
    convolution with one group, stride 1 and no padding (a GEMM over the pixels in channels_last layout).
    cuSPARSELt takes fp16 weights whose both dimensions are multiples of 16, and the weight must already be
    2:4 along ``in`` (the conversion would otherwise drop values and change the output).
    """
    if kind not in ("linear", "conv"):
        return f"{kind} layers have no GEMM form for 2:4"
    if kind == "conv":
        if groups != 1:
            return f"grouped convolution (groups={groups})"
        if tuple(kernel) != (1, 1) or tuple(stride) != (1, 1) or tuple(padding) not in ((0, 0), "valid"):
            return (f"only 1x1 convolutions with stride 1 and no padding are GEMMs here; this one has kernel "
                    f"{tuple(kernel)}, stride {tuple(stride)}, padding {padding}")
    out_ch, in_ch = int(weight_shape[0]), int(weight_shape[1])
    if out_ch % SPARSE_ALIGN or in_ch % SPARSE_ALIGN:
        return f"weight {out_ch}x{in_ch}: cuSPARSELt needs both dimensions multiples of {SPARSE_ALIGN}"
    if not holds_24:
        return "weight does not hold 2:4 along its input channels (run trt-prune sparsify first)"
    return None


def sparse24_plan(model) -> list[dict[str, Any]]:
    """Per Linear / Conv2d of ``model``: ``{module, op, shape, reason}`` with ``reason`` None where 2:4 applies."""
    from torch import nn

    from trt_prune.sparsity.pattern import holds_2of4

    rows = []
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear):
            kind, extra = "linear", {}
        elif isinstance(module, nn.Conv2d):
            kind = "conv"
            extra = {"groups": module.groups, "kernel": module.kernel_size, "stride": module.stride,
                     "padding": module.padding}
        else:
            continue
        weight = module.weight.detach()
        matrix = weight.reshape(weight.shape[0], -1).float().cpu().numpy()
        holds = matrix.shape[1] % 4 == 0 and holds_2of4(matrix, axis=1)
        reason = sparse24_reason(kind, tuple(weight.shape), holds_24=holds, **extra)
        rows.append({"module": path, "op": type(module).__name__, "shape": list(weight.shape), "reason": reason})
    return rows


def _sparse_conv1x1(conv):
    """A module running the 1x1 convolution ``conv`` as ``F.linear`` over pixels with a 2:4 compressed weight.
    (Defined inside a function: importing this module must not import torch.)"""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class SparseConv1x1(nn.Module):
        def __init__(self):
            super().__init__()
            weight = conv.weight.detach().reshape(conv.out_channels, conv.in_channels)
            self.weight = nn.Parameter(torch.sparse.to_sparse_semi_structured(weight), requires_grad=False)
            self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), requires_grad=False)

        def forward(self, x):
            n, c, h, w = x.shape
            rows = x.permute(0, 2, 3, 1).reshape(-1, c)  # free in channels_last
            out = F.linear(rows, self.weight, self.bias)
            return out.reshape(n, h, w, -1).permute(0, 3, 1, 2)

    return SparseConv1x1()


@register_backend
class TorchBackend(Backend):
    """Runs the PyTorch model (CUDA when present, else CPU)."""

    name = "torch"
    install_hint = "pip install torch (a CUDA build for the GPU path)"
    library = "torch"

    builds_from = ("model",)
    options = frozenset({"fp16", "device", "channels_last", "cuda_graph", "sparse24"})

    def _build_impl(self, source, config: BuildConfig) -> TorchSession:
        """Build a session for ``source``: an ``nn.Module``, a loaded model, a model spec or a model folder."""
        model, default_shape, label = _resolve_model(source)
        return _build_session(model, default_shape, label, config)


def _resolve_model(source) -> tuple[Any, tuple[int, ...] | None, str]:
    from torch import nn

    if isinstance(source, nn.Module):
        return source, None, type(source).__name__
    if hasattr(source, "model") and hasattr(source, "input_shape"):  # a LoadedModel
        return source.model, tuple(source.input_shape), str(getattr(source, "spec", type(source.model).__name__))
    if isinstance(source, (str, Path)):
        text = str(source)
        if text.endswith(".onnx") or text.endswith(".engine"):
            raise BackendError(f"the torch backend runs the PyTorch model, not {text!r}; give the model spec or "
                               "folder the file was exported from (e.g. builtin:demo-detector or a pruned/ "
                               "folder), or choose --backend onnxruntime")
        from trt_prune.models import load_model

        loaded = load_model(text)
        return loaded.model, tuple(loaded.input_shape), text
    raise BackendError(f"the torch backend builds from an nn.Module, a model spec or a folder; got "
                       f"{type(source).__name__}")


def _input_shape(default: tuple[int, ...] | None, config: BuildConfig) -> tuple[int, ...]:
    if config.shapes:
        if len(config.shapes) != 1:
            raise BackendError(f"the torch backend feeds one input; config.shapes names {sorted(config.shapes)}")
        lo, opt, hi = next(iter(config.shapes.values()))
        return tuple(int(d) for d in opt)
    if default is None:
        raise BackendError("no input shape: give BuildConfig.shapes={'images': (shape, shape, shape)} for an "
                           "nn.Module (a model spec brings its own)")
    return (int(config.batch[1]), *default[1:])


def _build_session(model, default_shape, label: str, config: BuildConfig) -> TorchSession:
    import torch

    device = str(config.extra.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device not in ("cuda", "cpu"):
        raise BackendError(f"device must be 'cuda' or 'cpu', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError("device 'cuda' asked for, but torch sees no CUDA GPU "
                                      f"(torch {torch.__version__}); use device 'cpu'")
    cuda = device == "cuda"
    fp16 = config.precision == "fp16"
    if fp16 and not cuda:
        raise BackendError("precision fp16 with the torch backend needs a CUDA GPU; use fp32 on the CPU")
    graph = bool(config.extra.get("cuda_graph", False))
    sparse = bool(config.extra.get("sparse24", False))
    if graph and not cuda:
        raise BackendError("cuda_graph needs device 'cuda'")
    if sparse and not (cuda and fp16):
        raise BackendError("sparse24 runs cuSPARSELt fp16 kernels: it needs device 'cuda' and precision fp16")
    notes = []
    if config.threads is not None and not cuda:
        torch.set_num_threads(config.threads)
        notes.append(f"torch.set_num_threads({config.threads}) is process-wide")
    shape = _input_shape(default_shape, config)
    model = copy.deepcopy(model).eval()
    channels_last = bool(config.extra.get("channels_last", False)) and len(shape) == 4
    model = model.to(device=device, dtype=torch.float16 if fp16 else torch.float32)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    from trt_prune.models import check_runs

    check_runs(model, shape, BackendError)  # a wrong input shape: one error naming the module, not a traceback
    plan = []
    if sparse:
        plan = sparse24_plan(model)
        converted = _convert_sparse(model, plan)
        notes.append(f"2:4 (cuSPARSELt) on {converted} of {len(plan)} Linear/Conv2d layers; on an H200 this "
                     "path ran slower than dense for every layer measured (bench/results/gpu_sparse24_layers.json)")
    return TorchSession(model, label, shape, device, fp16, channels_last, graph, config, notes, plan)


def _convert_sparse(model, plan: list[dict[str, Any]]) -> int:
    import torch
    from torch import nn

    modules = dict(model.named_modules())
    count = 0
    for row in plan:
        if row["reason"] is not None:
            continue
        module = modules[row["module"]]
        if isinstance(module, nn.Linear):
            module.weight = nn.Parameter(torch.sparse.to_sparse_semi_structured(module.weight.detach()),
                                         requires_grad=False)
        else:
            parent_path, _, child = row["module"].rpartition(".")
            setattr(modules[parent_path] if parent_path else model, child, _sparse_conv1x1(module))
        count += 1
    return count


class TorchSession(Session):
    """A PyTorch model on one device behind the common :class:`Session` interface."""

    backend_name = "torch"

    def __init__(self, model, label: str, shape: tuple[int, ...], device: str, fp16: bool, channels_last: bool,
                 cuda_graph: bool, config: BuildConfig, notes: list[str], sparse_plan: list[dict[str, Any]]):
        super().__init__()
        import torch

        self.model = model
        self.label = label
        self.device = device
        self.fp16 = fp16
        self.channels_last = channels_last
        self.cuda_graph = cuda_graph
        self.config = config
        self.notes = notes
        self.sparse_plan = sparse_plan
        self._inputs = [TensorSpec("images", tuple(shape), "float32")]
        with torch.inference_mode():
            out = self.model(self._tensor(np.zeros(shape, np.float32)))
        self._output_names = [f"output_{i}" if i else "output" for i in range(len(_flatten(out)))]
        self._outputs = [TensorSpec(n, tuple(a.shape), "float32") for n, a in zip(self._output_names, _flatten(out),
                                                                                   strict=True)]
        self._graph = None
        self._static = self._graph_out = None

    def env(self) -> dict[str, Any]:
        import torch

        env = {"backend": "torch", "torch": torch.__version__, "device": self.device,
               "precision": "fp16" if self.fp16 else "fp32", "channels_last": self.channels_last,
               "cuda_graph": self.cuda_graph, "threads": torch.get_num_threads()}
        if self.device == "cuda":
            env.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                       compute_capability=".".join(map(str, torch.cuda.get_device_capability())))
        return env

    # -- running ----------------------------------------------------------------------------------------------
    def _tensor(self, array: np.ndarray):
        import torch

        x = torch.from_numpy(np.ascontiguousarray(array)).to(self.device)
        x = x.half() if self.fp16 else x.float()
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _run_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        if self.cuda_graph:  # what is timed is what runs: the graph's replay, read from its static outputs
            self._prepare(feeds)
            self._graph.replay()
            torch.cuda.synchronize()
            out = self._graph_out
        else:
            with torch.inference_mode():
                out = self.model(self._tensor(feeds["images"]))
        return {name: a.float().cpu().numpy() for name, a in zip(self._output_names, _flatten(out), strict=True)}

    def _prepare(self, feeds: dict[str, np.ndarray]):
        import torch

        x = self._tensor(feeds["images"])
        if not self.cuda_graph:
            return x
        # a graph replays into the memory it was captured on: capture once per shape on a static input, then
        # copy each new input into it (interleaved timing prepares once per block)
        if self._graph is None or self._static.shape != x.shape:
            self._static = x.clone(memory_format=torch.channels_last) if self.channels_last else x.clone()
            self._graph, self._graph_out = capture_cuda_graph(self.model, self._static)
        else:
            self._static.copy_(x)
        return self._static

    def _infer(self, prepared) -> None:
        import torch

        if self._graph is not None:
            self._graph.replay()
        else:
            with torch.inference_mode():
                self.model(prepared)
        if self.device == "cuda":
            torch.cuda.synchronize()

    def _timed_call(self, prepared) -> float:
        """On CUDA: the device time between two CUDA events around the call (its launches and kernels)."""
        if self.device != "cuda":
            return super()._timed_call(prepared)
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        if self._graph is not None:
            self._graph.replay()
        else:
            with torch.inference_mode():
                self.model(prepared)
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))

    # -- per-module times -------------------------------------------------------------------------------------
    def _profile_layers_impl(self, feeds: dict[str, np.ndarray], runs: int,
                             module_map: Mapping[str, str | None] | None) -> list[LayerTime]:
        import torch

        x = self._tensor(feeds["images"])
        cuda = self.device == "cuda"
        records: list[list] = []  # [path, class, start, end, parent index]
        stack: list[int] = []
        paths = {id(m): (p, type(m).__name__) for p, m in self.model.named_modules()}

        def stamp():
            if cuda:
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                return event
            return time.perf_counter_ns()

        def pre(module, _args):
            path, kind = paths[id(module)]
            records.append([path, kind, stamp(), None, stack[-1] if stack else None])
            stack.append(len(records) - 1)

        def post(module, _args, _out):
            records[stack.pop()][3] = stamp()

        handles = []
        for module in self.model.modules():
            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post))
        runs_ms = []
        try:
            with torch.inference_mode():
                self.model(x)  # warm-up, not recorded
                records.clear()
                for _ in range(runs):
                    first = len(records)
                    self.model(x)
                    if cuda:
                        torch.cuda.synchronize()
                    root = records[first]
                    runs_ms.append(_elapsed(root[2], root[3], cuda))
        finally:
            for handle in handles:
                handle.remove()
        own: dict[str, float] = {}
        kinds: dict[str, str] = {}
        children = [0.0] * len(records)
        spans = [_elapsed(r[2], r[3], cuda) for r in records]
        for index, record in enumerate(records):
            if record[4] is not None:
                children[record[4]] += spans[index]
        for index, (path, kind, *_rest) in enumerate(records):
            own[path] = own.get(path, 0.0) + max(spans[index] - children[index], 0.0)
            kinds[path] = kind
        self.profile_run_ms = float(np.mean(runs_ms)) if runs_ms else None
        return [LayerTime(name=path or "(root)", op=kinds[path], ms=total / runs, module=path, members=[])
                for path, total in own.items()]

    def _close_impl(self) -> None:
        self._graph = self._static = self._graph_out = None
        self.model = None


def _elapsed(start, end, cuda: bool) -> float:
    if cuda:
        return float(start.elapsed_time(end))
    return (end - start) / 1e6


def capture_cuda_graph(model, x):
    """Capture one forward pass of ``model`` on ``x`` as a CUDA graph (after warm-up on a side stream);
    returns the graph and the outputs it writes on every replay."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(3):
            model(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        out = model(x)
    return graph, out


def _flatten(output) -> list:
    import torch

    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _flatten(item)]
    if isinstance(output, dict):
        return [t for item in output.values() for t in _flatten(item)]
    raise BackendError(f"the model returned {type(output).__name__}; the torch backend needs tensors, or "
                       "tuples/lists/dicts of tensors")
