"""``trt-prune``: a thin command line over the stage functions.

Every command writes its artifacts where ``-o/--out`` says, prints a table (or ``--json``), and exits 0 when
done, 2 on bad input (one line on stderr saying what was wrong and what to do).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import click

from .errors import TrtPruneError

# Rich sizes tables to the terminal, and to 80 columns when the output is a file or pipe (CI logs, `| tee`),
# where wide tables would be cut to "…" in every cell; give those a width the tables fit (COLUMNS still rules).
LOG_WIDTH = 160


def _console(stderr: bool = True):
    from rich.console import Console

    console = Console(stderr=stderr)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(stderr=stderr, width=LOG_WIDTH)
    return console


def _emit(data: dict, as_json: bool, table=None) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, default=_default))
    elif table is not None:
        _console(stderr=False).print(table)


def _default(obj):
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """``1x3x320x320`` → ``(1, 3, 320, 320)``."""
    if text is None:
        return None
    try:
        shape = tuple(int(p) for p in text.lower().replace(",", "x").split("x"))
    except ValueError:
        raise click.BadParameter(f"'{text}' is not a shape; write it like 1x3x320x320") from None
    if len(shape) < 2 or any(d < 1 for d in shape):
        raise click.BadParameter(f"'{text}' is not a shape; write it like 1x3x320x320")
    return shape


def _fail(message: str) -> None:
    """The error contract: one ``error:`` line on stderr (whitespace folded), exit code 2."""
    click.echo(f"error: {' '.join(str(message).split())}", err=True)
    sys.exit(2)


class _Group(click.Group):
    """Turns every :class:`TrtPruneError` and every usage error (unknown option, bad value) into one line on
    stderr and exit code 2; click's own handler would print a multi-line usage block."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TrtPruneError as exc:
            _fail(str(exc))

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "trt-prune"
            _fail(f"{exc.format_message()} (see '{where} --help')")
        except click.ClickException as exc:  # e.g. a file click itself could not open
            _fail(exc.format_message())
        except click.exceptions.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


model_arg = click.argument("model", metavar="MODEL")
weights_opt = click.option("--weights", type=click.Path(dir_okay=False), default=None,
                           help="Weights: .safetensors, or a state dict loaded with weights_only=True.")
pickle_opt = click.option("--allow-pickle", is_flag=True,
                          help="Allow a weights file that needs full unpickling (runs code from the file).")
shape_opt = click.option("--input-shape", default=None, metavar="NxCxHxW",
                         help="Example input shape (default: the model's, e.g. 1x3x320x320).")
json_opt = click.option("--json", "as_json", is_flag=True, help="Print a machine-readable result on stdout.")
trust_opt = click.option("--trust-code", is_flag=True,
                         help="Allow a model folder whose model.json names a .py source (loading it runs that file).")


def _load(model: str, weights, allow_pickle, trust_code: bool = False, input_shape=None):
    from .stages import load

    return load(model, weights=weights, allow_pickle=allow_pickle, trust_code=trust_code, input_shape=input_shape)


def _backend_config(backend: str, flags: dict, **fields):
    """A ``BuildConfig`` from backend flags (option name -> value): a flag that ``backend``'s declaration
    (``Backend.options``) lacks is refused, naming the backends that take it."""
    from .backends import OPTIONS, BuildConfig, backend_class, backends_taking

    declared = backend_class(backend).options  # an unknown name lists the valid ones
    wrong = [name for name, value in flags.items() if value and name not in declared]
    if wrong:
        where = "; ".join(f"{OPTIONS[n].flag} to --backend {' or '.join(backends_taking(n))}" for n in wrong)
        flags_text = ", ".join(OPTIONS[n].flag for n in wrong)
        verb = "does" if len(wrong) == 1 else "do"
        raise TrtPruneError(f"{flags_text} {verb} not apply to --backend {backend} ({where} only); for ONNX "
                            "Runtime convert the ONNX file first (trt-prune fp16, trt-prune sparsify)")
    extra, values = {}, {}
    for name, value in flags.items():
        if not value:
            continue
        option = OPTIONS[name]
        if option.field == "precision":
            values["precision"] = "fp16"
        elif option.field == "extra":
            extra[name] = value
        else:
            values[option.field] = value
    return BuildConfig(extra=extra, **values, **fields)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="trt_prune")
def cli():
    """Prune, sparsify, export, clean, build and profile PyTorch models for TensorRT.

    MODEL is builtin:demo-detector, torchvision:NAME, timm:NAME, path/to/file.py:factory, or a folder written by
    'prune' or 'sparsify'.
    """


@cli.command()
@click.option("-o", "--out", default="out/demo", show_default=True, help="Output folder.")
@click.option("--quick", is_flag=True, help="Fewer images, steps and rounds: under 3 minutes on 2 cores.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ONNX Runtime threads (default: all).")
@click.option("--exporter", type=click.Choice(["dynamo", "torchscript"]), default="dynamo", show_default=True)
@json_opt
def demo(out, quick, threads, exporter, as_json):
    """Run prune → export → clean → build → profile on builtin:demo-detector and write a report."""
    from .demo import run_demo

    report = run_demo(out, quick=quick, threads=threads, console=_console(), exporter=exporter)
    if as_json:
        slim = {**report, "variants": [{k: v for k, v in r.items() if k != "latency_samples_ms"}
                                       for r in report["variants"]]}
        _emit(slim, True)


@cli.command("prune")
@model_arg
@click.option("--ratio", type=float, default=0.5, show_default=True,
              help="Fraction of channels to remove from each prunable group (or, with --global, overall), in (0, 1).")
@click.option("--target-macs", type=float, default=None,
              help="Instead of --ratio: the fraction of MACs to keep (the ratio is searched for).")
@click.option("--target-params", type=float, default=None,
              help="Instead of --ratio: the fraction of parameters to keep (the ratio is searched for).")
@click.option("--global", "global_pruning", is_flag=True,
              help="Rank the channels of all groups together: weak groups lose more (see --max-ratio).")
@click.option("--max-ratio", type=float, default=None,
              help="No group loses more than this fraction of its channels, in (0, 1).")
@click.option("--round-to", type=int, default=8, show_default=True, help="Kept channel counts are multiples of this.")
@click.option("--importance", default=None,
              help="l1 (default), l2, bn_scale, taylor (built-in detector: gradients of its loss on road scenes) or "
                   "random; with --train the default is taylor, accumulated over training.")
@click.option("--taylor-batches", type=click.IntRange(min=1), default=4, show_default=True,
              help="Batches of 8 training images for --importance taylor.")
@click.option("--ignore", multiple=True, help="Module path to leave unpruned (repeatable).")
@click.option("--strict", is_flag=True,
              help="Fail on an op the engine cannot prune through instead of keeping the channels it reads whole.")
@click.option("--train", "train_steps", type=click.IntRange(min=2), default=None,
              help="Prune gradually while training for this many steps (built-in detector: its road scenes and "
                   "loss; your own model: the Python API ChannelPruner). Needs --target-macs.")
@click.option("--distill", is_flag=True, help="With --train: the dense model teaches the pruned one.")
@click.option("--sparse-train", type=click.Choice(["bn_l1", "group_lasso"]), default=None,
              help="With --train: a sparsity penalty on the channel groups before and while pruning.")
@click.option("--batch", "batch_size", type=click.IntRange(min=1), default=8, show_default=True,
              help="With --train: images per step.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True,
              help="With --train: peak AdamW learning rate.")
@click.option("--device", default=None, help="With --train: torch device to train on (default: cuda if present).")
@click.option("--target-latency", default=None, metavar="FRACTION|MSms",
              help="Instead of --ratio: a latency budget on --backend, as a fraction of the dense latency (0.6) or "
                   "milliseconds (4.5ms); met by a knapsack over measured per-layer latencies.")
@click.option("--backend", default="onnxruntime", show_default=True,
              help="With --target-latency: the backend whose latency is measured (onnxruntime, torch, tensorrt).")
@click.option("--latency-table", default=None, metavar="DIR",
              help="With --target-latency: a latency table folder (trt-prune latency-table); what this model lacks "
                   "is measured and written back. Default: measured for this run only.")
@shape_opt
@weights_opt
@pickle_opt
@trust_opt
@click.option("-o", "--out", required=True, help="Output model folder (model.json + model.safetensors).")
@json_opt
def prune_cmd(model, ratio, target_macs, target_params, global_pruning, max_ratio, round_to, importance,
              taylor_batches, ignore, strict, train_steps, distill, sparse_train, batch_size, lr, device,
              target_latency, backend, latency_table, input_shape, weights, allow_pickle, trust_code, out, as_json):
    """Structured (channel) pruning; writes a model folder and its replayable recipe.

    MODEL may be an ONNX file: its body is converted to torch, pruned, and written back as OUT/model.onnx with
    the file's post-processing (NMS, TopK, plugins) stitched on unchanged."""
    from .artifacts import check_output_dir
    from .pruning import PruneConfig
    from .stages import prune

    if train_steps is None and (distill or sparse_train):
        raise TrtPruneError(f"{'--distill' if distill else '--sparse-train'} works while training: add --train "
                            "STEPS (and --target-macs)")
    if latency_table is not None and target_latency is None:
        raise TrtPruneError("--latency-table is read for --target-latency; add --target-latency (e.g. 0.6)")
    if train_steps is not None:
        if target_latency is not None:
            raise TrtPruneError("--train prunes to --target-macs; for a latency budget while training use the "
                                "Python API ChannelPruner(target_latency=..., latency_table=...)")
        return _prune_while_training(model, target_macs, target_params, global_pruning, max_ratio, round_to,
                                     importance or "taylor", ignore, train_steps, distill, sparse_train, batch_size,
                                     lr, device, input_shape, weights, allow_pickle, trust_code, out, as_json)
    importance = importance or "l1"
    config = PruneConfig(ratio=ratio, round_to=round_to, importance=importance, ignore=tuple(ignore),
                         target_macs=target_macs, target_params=target_params, global_pruning=global_pruning,
                         max_ratio=max_ratio, target_latency=target_latency, latency_table=latency_table,
                         backend=backend, strict=strict)
    config.validate()
    shape = parse_shape(input_shape)
    check_output_dir(out)  # refused before any work; created only when there is a model to write
    table = None
    if target_latency is not None:
        table = _latency_table_for_prune(backend, latency_table)
    loaded = _load(model, weights, allow_pickle, trust_code, input_shape=shape)
    if importance == "taylor" and (loaded.task != "detection" or not hasattr(loaded.model, "num_classes")):
        raise TrtPruneError(f"--importance taylor needs a loss and data; the CLI has them for the built-in "
                            f"detector only, not '{model}'. Use the Python API: prune(model, shape, "
                            "importance='taylor', data=batches, loss_fn=fn)")
    shape = shape or loaded.input_shape
    data = loss_fn = None
    if importance == "taylor":
        from .finetune import detector_taylor_inputs
        from .models import check_runs

        check_runs(loaded.model, shape, TrtPruneError)
        data, loss_fn = detector_taylor_inputs(loaded.model, batches=taylor_batches, img_size=shape[-1])
    with _measuring_bar(as_json) as (on_estimate, on_progress):
        result = prune(loaded, shape, config, out=out, data=data, loss_fn=loss_fn, latency_table=table,
                       on_estimate=on_estimate, on_progress=on_progress)
    out_dir = result.folder
    summary = {k: result.report[k] for k in ("params_before", "params_after", "macs_before", "macs_after",
                                             "effective_ratio", "groups_total", "groups_pruned")}
    summary.update(out=str(out_dir), skipped_groups=result.report["skipped_groups"],
                   kept_whole=result.report["kept_whole"], layers=result.report["layers"])
    for key in ("latency", "onnx"):
        if key in result.report:
            summary[key] = result.report[key]
    from rich.table import Table

    table = Table(title=f"pruned {model} → {out_dir}")
    for col in ("", "before", "after", "×"):
        table.add_column(col, justify="right")
    for key in ("params", "macs"):
        b, a = result.report[f"{key}_before"], result.report[f"{key}_after"]
        table.add_row(key, f"{b:,}", f"{a:,}", f"{a / b:.3f}")
    if "latency" in result.report:
        lat = result.report["latency"]
        table.add_row(f"predicted ms ({backend})", f"{lat['dense_ms']:.2f}", f"{lat['predicted_ms']:.2f}",
                      f"{lat['predicted_ms'] / lat['dense_ms']:.3f}")
    if not as_json:
        for line in kept_whole_lines(result.report):
            _console(stderr=True).print(line, markup=False, highlight=False)
    _emit(summary, as_json, table)


def kept_whole_lines(report: dict, limit: int = 8) -> list[str]:
    """The prune summary's kept-whole lines: one count, then one line per op the engine kept whole (module, op,
    reason), at most ``limit``; ``--json`` has them all."""
    ops = report.get("kept_whole") or []
    skipped = report.get("skipped_groups") or []
    lines = [f"{report['groups_pruned']} of {report['groups_total']} channel groups pruned, {len(skipped)} kept "
             f"whole (--json lists each with its reason); {len(ops)} op(s) or module(s) the engine cannot prune "
             "through kept the channels they read whole (--strict makes that an error)"]
    lines += [f"  kept whole: {k['op']} in '{k['module']}': {k['reason']}" for k in ops[:limit]]
    if len(ops) > limit:
        lines.append(f"  … and {len(ops) - limit} more")
    if "onnx" in report:
        onnx = report["onnx"]
        lines.append(f"ONNX: {onnx['path']} (opset {onnx['opset']}, outputs {', '.join(onnx['outputs'])})")
    return lines


def _latency_table_for_prune(backend: str, location: str | None):
    """The table ``prune --target-latency`` reads: ``location``'s when it exists (refused if measured in another
    environment), else None (measured by the prune itself, into ``location`` when given)."""
    from .latency import table_path
    from .latency.measure import environment_key, open_table

    key = environment_key(backend)
    if location is not None and table_path(location).exists():
        return open_table(location, key)
    if location is not None:
        from .artifacts import check_output_dir

        check_output_dir(location, "--latency-table")
    return None


@contextlib.contextmanager
def _measuring_bar(quiet: bool):
    """Callbacks for a latency-table measurement: the estimate is printed first, then a progress bar."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    console = _console(stderr=True)
    bar = Progress(TextColumn("measuring latency table"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeRemainingColumn(), console=console, transient=True, disable=quiet)
    state = {}

    def on_estimate(points: int, seconds: float) -> None:
        if not quiet:
            console.print(f"measuring {points} grid points on this machine: about {seconds:.0f} s")
        bar.start()
        state["task"] = bar.add_task("measure", total=points)

    def on_progress(n: int) -> None:
        bar.advance(state["task"], n)

    try:
        yield on_estimate, on_progress
    finally:
        if state:  # a bar never started must not be stopped: rich would print an empty line
            bar.stop()


def _prune_while_training(model, target_macs, target_params, global_pruning, max_ratio, round_to, importance,
                          ignore, steps, distill, sparse_train, batch_size, lr, device, input_shape, weights,
                          allow_pickle, trust_code, out, as_json):
    """``prune --train``: the built-in gradual recipe (:func:`trt_prune.finetune.gradual_prune_detector`)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from .artifacts import check_output_dir
    from .finetune import gradual_prune_detector
    from .pruning.importance import get_importance

    if target_macs is None or target_params is not None:
        raise TrtPruneError("--train prunes to a MACs budget: give --target-macs (e.g. 0.5), not "
                            f"{'--target-params' if target_params is not None else '--ratio'}")
    get_importance(importance)
    check_output_dir(out)
    loaded = _load(model, weights, allow_pickle, trust_code)
    if loaded.task != "detection" or not hasattr(loaded.model, "num_classes") or not loaded.source:
        raise TrtPruneError(f"--train uses the built-in detector's road scenes and loss; '{model}' is not such a "
                            "detector. For your own model and data use the Python API: "
                            "trt_prune.pruning.gradual.ChannelPruner (docs/pruning.md, 'Pruning while training')")
    shape = parse_shape(input_shape) or loaded.input_shape
    if shape[-1] != shape[-2]:
        raise TrtPruneError(f"--train trains on square road scenes; got input shape {list(shape)}")
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    console = _console(stderr=True)
    bar = Progress(TextColumn("pruning while training"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("MACs {task.fields[macs]:.3f}"),
                   TimeRemainingColumn(), console=console, transient=True,
                   disable=as_json or os.environ.get("RANK", "0") != "0")  # under torchrun: rank 0 reports
    with bar:
        task = bar.add_task("train", total=steps, loss=float("nan"), macs=1.0)
        result, stats = gradual_prune_detector(
            loaded.model, target_macs, steps, batch_size=batch_size, lr=lr, img_size=int(shape[-1]),
            importance=importance, distill=distill, sparsity=sparse_train, round_to=round_to,
            global_pruning=global_pruning, max_ratio=max_ratio, ignore=tuple(ignore), device=device,
            on_step=lambda step, loss, macs: bar.update(task, completed=step, loss=loss, macs=macs),
            out=out, source=loaded.source)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # rank 0 has written the folder
        dist.destroy_process_group()
    if stats["rank"] != 0:
        return
    report = result.report
    summary = {k: report[k] for k in ("params_before", "params_after", "macs_before", "macs_after", "groups_total",
                                      "groups_pruned", "steps")}
    summary.update(out=str(result.folder), loss_first=stats["loss_first"], loss_last=stats["loss_last"],
                   seconds=stats["seconds"], history=stats["history"], skipped_groups=report["skipped_groups"],
                   world_size=stats["world_size"])
    from rich.table import Table

    table = Table(title=f"pruned {model} while training {steps} steps → {result.folder}")
    for col in ("", "before", "after", "×"):
        table.add_column(col, justify="right")
    for key in ("params", "macs"):
        b, a = report[f"{key}_before"], report[f"{key}_after"]
        table.add_row(key, f"{b:,}", f"{a:,}", f"{a / b:.3f}")
    _emit(summary, as_json, table)


@cli.command("latency-table")
@model_arg
@click.option("--backend", default="onnxruntime", show_default=True,
              help="Backend to measure on (onnxruntime; torch and tensorrt where they exist).")
@click.option("--round-to", type=int, default=8, show_default=True,
              help="Grid counts are multiples of this (match the --round-to you will prune with).")
@click.option("--points", type=click.IntRange(min=2, max=64), default=6, show_default=True,
              help="Grid points per channel axis of each layer shape (interpolated between).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Backend threads (default: all usable cores); tables are keyed by it.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="float16: a GPU table (torch or TensorRT), with 2:4 times beside the dense ones where the "
                   "backend has sparse kernels.")
@click.option("--ignore", multiple=True, help="Module path that will not be pruned (its counts are not gridded).")
@click.option("--recalibrate", is_flag=True, help="Time the whole model again even if the table knows it.")
@shape_opt
@weights_opt
@pickle_opt
@trust_opt
@click.option("-o", "--out", required=True, metavar="DIR",
              help="Table folder: latency_table.json is created, or extended where it lacks this model.")
@json_opt
def latency_table_cmd(model, backend, round_to, points, threads, dtype, ignore, recalibrate, input_shape, weights,
                      allow_pickle, trust_code, out, as_json):
    """Measure the per-layer latency table of MODEL on a backend (what --target-latency plans with)."""
    from .artifacts import check_output_dir
    from .latency import LatencyModel, ensure_table, table_path
    from .latency.measure import environment_key, open_table
    from .pruning.graph import trace
    from .pruning.structured import ALLOWED_ROUND_TO, _example

    if round_to not in ALLOWED_ROUND_TO:
        raise TrtPruneError(f"--round-to must be one of {ALLOWED_ROUND_TO}, got {round_to}")
    check_output_dir(out)
    key = environment_key(backend, threads, dtype)
    if table_path(out).exists():
        open_table(out, key)  # a table from elsewhere is refused before any work
    loaded = _load(model, weights, allow_pickle, trust_code)
    shape = parse_shape(input_shape) or loaded.input_shape
    from .models import check_runs

    check_runs(loaded.model, shape, TrtPruneError)
    net = loaded.model.eval()
    graph = trace(net, _example(net, shape), tuple(ignore))
    with _measuring_bar(as_json) as (on_estimate, on_progress):
        table, info = ensure_table(net, graph, shape, backend=backend, location=out, round_to=round_to,
                                   ignore=tuple(ignore), points=points, threads=threads, dtype=dtype,
                                   on_estimate=on_estimate, on_progress=on_progress, recalibrate=recalibrate)
    lm = LatencyModel(graph, table)
    cal = table.calibrations[lm.key]
    summary = {**info, "table": str(table_path(out)), "dense_predicted_ms": round(lm.predict(), 4),
               "calibration": cal}
    from rich.table import Table

    view = Table(title=f"latency table for {model} → {table_path(out)} ({info['key']})")
    view.add_column("")
    view.add_column("value", justify="right")
    view.add_row("layer shapes in the table", str(info["entries"]))
    view.add_row("grid points measured now", f"{info['points_measured']} in {info['seconds']:.1f} s")
    view.add_row("dense, measured end to end", f"{cal['dense_measured_ms']:.3f} ms")
    view.add_row("dense, sum of table layers", f"{cal['dense_layer_sum_ms']:.3f} ms")
    view.add_row("rest: constant + per activation", f"{cal['constant_ms']:.3f} + {cal['per_activation_ms']:.3f} ms")
    _emit(summary, as_json, view)


@cli.command("sparsify")
@model_arg
@click.option("--min-channels", type=int, default=None,
              help="Skip layers with fewer input or output channels (default 256: NVIDIA's guidance).")
@click.option("--layers", default=None,
              help="Comma-separated module paths to make 2:4 instead of choosing by size; each must hold 2:4.")
@click.option("--permute", "permute_s", type=click.FloatRange(min=0), default=None,
              help="Reorder channels first so 2:4 keeps more weight (seconds of search per channel group).")
@click.option("--permute-scorer", type=click.Choice(["numpy", "kernel"]), default="numpy", show_default=True,
              help="What scores the permutation search: numpy on the CPU, or the Triton kernel (trt_prune.kernels) "
                   "on a CUDA GPU, for layers of thousands of channels.")
@weights_opt
@pickle_opt
@trust_opt
@click.option("-o", "--out", required=True, help="Output model folder.")
@json_opt
def sparsify_cmd(model, min_channels, layers, permute_s, permute_scorer, weights, allow_pickle, trust_code, out,
                 as_json):
    """2:4 magnitude masks on TensorRT's axis for every eligible conv/linear layer; says why not for the rest."""
    from .artifacts import check_output_dir
    from .stages import sparsify

    if permute_scorer != "numpy" and permute_s is None:
        raise TrtPruneError(f"--permute-scorer {permute_scorer} scores the permutation search; add --permute SECONDS")
    check_output_dir(out)
    loaded = _load(model, weights, allow_pickle, trust_code)
    only = [p.strip() for p in layers.split(",") if p.strip()] if layers else None
    result = sparsify(loaded, min_channels=min_channels, only=only, permute_s=permute_s, out=out,
                      permute_scorer=permute_scorer)
    out_dir = result.folder
    from rich.table import Table

    table = Table(title=f"2:4 on {model}: {len(result.sparse_layers)} of {len(result.layers)} layers")
    for col in ("module", "shape", "2:4", "reason"):
        table.add_column(col)
    for row in result.layers:
        table.add_row(row["module"], "x".join(map(str, row["shape"])), "yes" if row["made_24"] else "no",
                      row["reason"])
    summary = {"out": str(out_dir), "sparse_layers": len(result.sparse_layers), "layers": result.layers}
    if result.permutation is not None:
        summary["permutation"] = result.permutation
    _emit(summary, as_json, table)


@cli.command("export")
@model_arg
@shape_opt
@weights_opt
@pickle_opt
@trust_opt
@click.option("--exporter", type=click.Choice(["dynamo", "torchscript"]), default="dynamo", show_default=True,
              help="torch.export-based exporter (TorchScript as fallback) or TorchScript directly.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default chosen for TensorRT 10/11 and ORT).")
@click.option("--static-batch", is_flag=True, help="Fix the batch axis instead of making it dynamic.")
@click.option("--dynamic-hw", is_flag=True,
              help="Make height and width of 4-D inputs dynamic too (TensorRT then needs an optimisation profile "
                   "for them). Not with --nms: its anchors are computed for one size.")
@click.option("--no-parity", is_flag=True, help="Skip the ONNX Runtime vs torch check (not recommended).")
@click.option("--atol", type=float, default=1e-4, show_default=True,
              help="Parity: an element fails when |onnx - torch| > atol + rtol * |torch| (with --nms, boxes are in "
                   "pixels).")
@click.option("--rtol", type=float, default=1e-3, show_default=True, help="Parity: relative tolerance.")
@click.option("--nms", is_flag=True,
              help="Detectors: box decoding, score activation and NMS in the graph; outputs num_detections, "
                   "detection_boxes, detection_scores, detection_classes (builtin:demo-detector, core:retinanet_"
                   "resnet50_fpn, core:fcos_resnet50_fpn, core:ssd300_vgg16, core:ssdlite320_mobilenet_v3_large "
                   "and folders pruned from them). Thresholds default to the model's own post-processing.")
@click.option("--nms-plugin", type=click.Choice(["onnx", "efficient"]), default=None,
              help="With --nms: the standard NonMaxSuppression op (default; runs in ONNX Runtime and TensorRT) or "
                   "TensorRT's EfficientNMS_TRT plugin node (TensorRT only).")
@click.option("--score-threshold", type=float, default=None,
              help="With --nms: keep class scores above this, in [0, 1) (default: the model's own; 0.001 for "
                   "the demo detector, the mAP setting).")
@click.option("--iou-threshold", type=float, default=None,
              help="With --nms: suppress boxes overlapping a better one by more than this IoU, in [0, 1] "
                   "(default: the model's own; 0.6 for the demo detector).")
@click.option("--max-detections", type=int, default=None,
              help="With --nms: detections kept per image, K (default: the model's own; 100 for the demo "
                   "detector); outputs are padded to K.")
@click.option("--pre-nms-topk", type=int, default=None,
              help="With --nms: best-scoring candidates that enter NMS, per image (demo detector, default 3000), "
                   "per FPN level (RetinaNet, FCOS) or per class (SSD), as the model's own post-processing.")
@click.option("--class-agnostic", is_flag=True, help="With --nms: boxes of different classes suppress each other.")
@click.option("-o", "--out", required=True, help="Output .onnx file.")
@json_opt
def export_cmd(model, input_shape, weights, allow_pickle, trust_code, exporter, opset, static_batch, dynamic_hw,
               no_parity, atol, rtol, nms, nms_plugin, score_threshold, iou_threshold, max_detections, pre_nms_topk,
               class_agnostic, out, as_json):
    """Export to ONNX and check ONNX Runtime's outputs against torch."""
    from .artifacts import check_output_file
    from .stages import export

    nms_options = {"score_threshold": score_threshold, "iou_threshold": iou_threshold,
                   "max_detections": max_detections, "pre_nms_topk": pre_nms_topk, "plugin": nms_plugin,
                   "class_agnostic": class_agnostic or None}
    given = {k: v for k, v in nms_options.items() if v is not None}
    if nms and dynamic_hw:
        raise TrtPruneError("--dynamic-hw does not combine with --nms: the anchors in the graph are computed for one "
                            "input size; export one file per size (--input-shape)")
    if nms:
        _export_nms(model, input_shape, weights, allow_pickle, trust_code, exporter, opset, static_batch, no_parity,
                    atol, rtol, given, out, as_json)
        return
    if given:
        flags = ", ".join("--" + k.replace("_", "-").replace("plugin", "nms-plugin") for k in given)
        raise TrtPruneError(f"{flags} only apply with --nms; add --nms or drop them")
    shape = parse_shape(input_shape)
    check_output_file(out)
    loaded = _load(model, weights, allow_pickle, trust_code)
    result = export(loaded, out, shape or loaded.input_shape, exporter=exporter, opset=opset,
                    dynamic_batch=not static_batch, dynamic_hw=dynamic_hw, check_parity=not no_parity, atol=atol,
                    rtol=rtol)
    data = result.to_dict()
    first = next(iter(result.parity.values()), {})
    data["parity_per_output"] = data.pop("parity")
    data["parity"] = {"max_abs": first.get("max_abs"), "max_rel": first.get("max_rel")}
    if len(result.parity) > 1:
        data["parity"] = {"max_abs": max(p["max_abs"] for p in result.parity.values()),
                          "max_rel": max(p["max_rel"] for p in result.parity.values())}
    from rich.table import Table

    table = Table(title=f"{model} → {result.path} ({result.exporter}, opset {result.opset})")
    table.add_column("output")
    table.add_column("max |Δ|", justify="right")
    table.add_column("max rel", justify="right")
    for name, p in result.parity.items():
        table.add_row(name, f"{p['max_abs']:.2e}", f"{p['max_rel']:.2e}")
    if not as_json:
        if result.fallback_reason:
            _console().print(f"[yellow]note:[/yellow] TorchScript exported this model because dynamo failed: "
                             f"{result.fallback_reason}")
        for warning in result.trace_warnings:
            _console().print(f"[yellow]warning:[/yellow] the TorchScript trace froze a value: {warning}")
    _emit(data, as_json, table)


def _export_nms(model, input_shape, weights, allow_pickle, trust_code, exporter, opset, static_batch, no_parity,
                atol, rtol, options, out, as_json):
    """``export --nms``: every option and the model are checked before anything is written."""
    from .artifacts import check_output_file
    from .detection.nms_export import NMSConfig
    from .stages import export_nms

    NMSConfig(**options).validate()  # a bad option fails before the model loads
    shape = parse_shape(input_shape)
    check_output_file(out)
    loaded = _load(model, weights, allow_pickle, trust_code)
    result = export_nms(loaded, out, shape or loaded.input_shape, options, exporter=exporter, opset=opset,
                        dynamic_batch=not static_batch, check_parity=not no_parity, atol=atol, rtol=rtol)
    data = result.to_dict()
    parity = data.pop("parity")
    data["parity_per_output"] = parity
    data["parity"] = {"max_abs": max((p["max_abs"] for p in parity.values()), default=None),
                      "max_rel": max((p["max_rel"] for p in parity.values()), default=None)}
    from rich.table import Table

    table = Table(title=f"{model} → {result.path} ({result.decode.exporter}, opset {result.decode.opset}, "
                        f"{result.op})")
    table.add_column("check")
    table.add_column("result", justify="right")
    for name, p in parity.items():
        table.add_row(f"{name} (decode) max |Δ|", f"{p['max_abs']:.2e}")
    for label, stats in (("NMS vs torch, same inputs", result.nms_parity),
                         ("detections vs torch model", result.detections_parity)):
        if stats:
            table.add_row(label, f"{stats['paired']}/{stats['detections_expected']} paired, max box Δ "
                                 f"{stats['max_box_diff']:.2e} px, {stats['images']} images")
    for name, dims in result.output_shapes.items():
        table.add_row(name, "x".join(map(str, dims)))
    if result.nms_parity.get("note") and not as_json:
        _console().print(f"[yellow]note:[/yellow] {result.nms_parity['note']}")
    _emit(data, as_json, table)


def _shape_map(text: str | None):
    """``--input-shape``: one shape (``1x3x320x320``) for a one-input model, or ``name=1x3x320x320`` pairs
    joined by ``;`` for several inputs."""
    if text is None:
        return None
    if "=" not in text:
        return parse_shape(text)
    shapes = {}
    for part in text.split(";"):
        name, sep, shape = part.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(f"'{text}' is not a list of name=shape pairs; write it like "
                                     "images=1x3x320x320;mask=1x1x320x320")
        shapes[name.strip()] = parse_shape(shape.strip())
    return shapes


onnx_shape_opt = click.option("--input-shape", default=None, metavar="NxCxHxW",
                              help="Input shape for dynamic axes (parity is checked at it): one shape, or "
                                   "name=NxCxHxW pairs joined by ';' for several inputs. Default: a size the graph "
                                   "accepts, or an error asking for this option.")


@cli.command("clean")
@click.argument("onnx_file", metavar="FILE.onnx")
@onnx_shape_opt
@click.option("-o", "--out", required=True, help="Output .onnx file (the input is never modified).")
@json_opt
def clean_cmd(onnx_file, input_shape, out, as_json):
    """Shape inference, constant folding, dead-node removal… with onnx-graphsurgeon; parity checked."""
    from .stages import clean

    shape = _shape_map(input_shape)
    result = clean(onnx_file, out, **({"input_shape": shape} if shape is not None else {}))
    from rich.table import Table

    table = Table(title=f"{onnx_file} → {out}: {result.nodes_before} → {result.nodes_after} nodes")
    for col in ("pass", "nodes before", "nodes after", "detail"):
        table.add_column(col)
    for p in result.passes:
        table.add_row(p["name"], str(p["nodes_before"]), str(p["nodes_after"]), str(p.get("detail", "")))
    _emit(result.to_dict(), as_json, table)


@cli.command("fp16")
@click.argument("onnx_file", metavar="FILE.onnx")
@click.option("--io", "io_type", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Type of the graph's inputs and outputs.")
@click.option("--block-node", multiple=True, help="Also keep this node in fp32 (repeatable).")
@click.option("--atol", type=float, default=1e-2, show_default=True, help="Parity tolerance against fp32.")
@click.option("--no-parity", is_flag=True, help="Skip the ONNX Runtime check against the fp32 model.")
@onnx_shape_opt
@click.option("-o", "--out", required=True, help="Output .onnx file (the input is never modified).")
@json_opt
def fp16_cmd(onnx_file, io_type, block_node, atol, no_parity, input_shape, out, as_json):
    """fp16 ONNX for TensorRT 11's strongly typed builds: sensitive ops kept fp32, checked against fp32."""
    from .stages import fp16

    shape = _shape_map(input_shape)
    result = fp16(onnx_file, out, keep_io_types=io_type == "fp32", block_nodes=tuple(block_node),
                  check_parity=not no_parity, atol=atol, **({"input_shape": shape} if shape is not None else {}))
    from rich.table import Table

    table = Table(title=f"{onnx_file} → {out}: fp16, {len(result.blocked)} nodes kept fp32")
    for col in ("output", "max |Δ| vs fp32", "max rel"):
        table.add_column(col)
    for name, p in result.parity.items():
        table.add_row(name, f"{p['max_abs']:.2e}", f"{p['max_rel']:.2e}")
    _emit(result.to_dict(), as_json, table)


def _floats3(text: str | None, name: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) not in (1, 3):
        _fail(f"--{name} takes one number or three comma-separated numbers (one per colour), got {text!r}")
    return values * 3 if len(values) == 1 else values


@cli.command("quantize")
@click.argument("onnx_file", metavar="FILE.onnx")
@click.option("--calib", required=True, metavar="DATA",
              help="Calibration data: a folder of images (letterboxed to the input), a .npy/.npz (N×C×H×W), or "
                   "'builtin' (the demo detector's road scenes).")
@click.option("--method", type=click.Choice(["entropy", "minmax", "percentile"]), default="entropy",
              show_default=True, help="How activation ranges are chosen from the calibration data.")
@click.option("--calib-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Calibration samples used (at most).")
@click.option("--calib-cache", default=None, metavar="FILE",
              help="Calibration cache, reused when model, data and method match  [default: OUT.calib.json].")
@click.option("--no-cache", is_flag=True, help="Neither read nor write a calibration cache.")
@click.option("--exclude", multiple=True, metavar="NODE", help="Keep this node in float (repeatable).")
@click.option("--fp16-rest", is_flag=True, help="Make every tensor not quantized fp16 (strongly typed TensorRT).")
@click.option("--min-channels", type=click.IntRange(min=1), default=16, show_default=True,
              help="Weighted layers with fewer input or output channels stay in float.")
@click.option("--mean", default=None, metavar="M[,M,M]", help="Images: subtract after scaling to [0, 1].")
@click.option("--std", default=None, metavar="S[,S,S]", help="Images: divide by this after --mean.")
@click.option("-o", "--out", required=True, help="Output .onnx file (the input is never modified).")
@json_opt
def quantize_cmd(onnx_file, calib, method, calib_size, calib_cache, no_cache, exclude, fp16_rest, min_channels,
                 mean, std, out, as_json):
    """INT8 (QDQ) ONNX for TensorRT: Q/DQ placed where TensorRT fuses them, calibrated on real data."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from .quantize import quantize

    means, stds = _floats3(mean, "mean"), _floats3(std, "std")
    bar = Progress(TextColumn(f"calibrating ({method})"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeRemainingColumn(), console=_console(stderr=True), transient=True, disable=as_json)
    state = {}

    def on_progress(done: int, total: int) -> None:
        if "task" not in state:
            bar.start()
            state["task"] = bar.add_task("calibrate", total=total)
        bar.update(state["task"], completed=done)

    try:
        result = quantize(onnx_file, out, calib=calib, method=method, exclude=exclude, fp16_rest=fp16_rest,
                          calib_size=calib_size, calib_cache=False if no_cache else calib_cache,
                          min_channels=min_channels, on_progress=on_progress,
                          **({"mean": means} if means else {}), **({"std": stds} if stds else {}))
    finally:
        if state:
            bar.stop()
    from rich.table import Table

    p = result.placement
    table = Table(title=f"{onnx_file} → {out}: INT8 ({method}), {len(p['quantized'])} layers quantized, "
                        f"{len(p['kept'])} kept in float, {result.qdq_pairs} Q/DQ pairs; calibration "
                        f"{'from the cache' if result.calibration['cached'] else result.calibration['source']}")
    for col in ("kept in float", "op", "why"):
        table.add_column(col)
    for k in p["kept"]:
        table.add_row(k["node"], k["op"], k["reason"])
    for name, a in result.agreement.items():
        table.add_row(f"output {name}", "", f"SQNR vs fp32 {a['sqnr_db']:.1f} dB (max |Δ| {a['max_abs']:.3g})")
    _emit(result.to_dict(), as_json, table)


def _backend_help(what: str) -> str:
    from .backends import SOURCE_KINDS, backend_class, backend_names

    kinds = {kind: [n for n in backend_names() if kind in backend_class(n).builds_from] for kind in SOURCE_KINDS}
    return f"{what}: {', '.join(kinds['onnx'])} (from FILE.onnx), {', '.join(kinds['model'])} (from MODEL)."


def _takes(option: str) -> str:
    from .backends import backends_taking

    return "--backend " + " or ".join(backends_taking(option))


@cli.command("build")
@click.argument("source", metavar="FILE.onnx|MODEL")
@click.option("--backend", default="onnxruntime", show_default=True, help=_backend_help("Backend"))
@click.option("--fp16", is_flag=True, help=f"fp16 precision ({_takes('fp16')}; TensorRT 11 needs an fp16 ONNX).")
@click.option("--sparse", is_flag=True, help=f"Let TensorRT choose 2:4 sparse kernels where faster "
                                             f"({_takes('sparse_weights')}).")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None)
@trust_opt
@click.option("-o", "--out", default=None,
              help="Where to keep the built artifact: the engine/cache folder (TensorRT) or the optimised model "
                   "(ONNX Runtime).")
@json_opt
def build_cmd(source, backend, fp16, sparse, batch, threads, trust_code, out, as_json):
    """Build a backend session (checks it builds and runs once)."""
    import time

    from .backends import backend_class
    from .profiling.profile import make_feeds, resolve_input_shapes
    from .stages import build

    flags = {"fp16": fp16, "sparse_weights": sparse}
    if out is not None:  # the backend's declaration says where a kept artifact goes
        from .artifacts import check_output_dir, check_output_file

        declared = backend_class(backend).options
        if "cache_dir" in declared:
            flags["cache_dir"] = str(check_output_dir(out, "-o"))
        elif "optimized_model_path" in declared:
            flags["optimized_model_path"] = str(check_output_file(out))
        else:
            raise TrtPruneError(f"--backend {backend} keeps no built artifact; drop -o")
    config = _backend_config(backend, flags, threads=threads, batch=(batch, batch, batch))
    # the backend makes its cache folder when it has an engine to keep; an unavailable backend fails first
    start = time.perf_counter()
    with build(source, backend, config, batch=batch, trust_code=trust_code) as session:
        seconds = time.perf_counter() - start
        shapes = resolve_input_shapes(session.inputs, batch, None)
        outputs = session.run(make_feeds(session.inputs, shapes))
        data = {"backend": backend, "source": str(source), "build_seconds": seconds, "env": session.env(),
                "notes": session.notes, "inputs": {n: list(s) for n, s in shapes.items()},
                "outputs": {k: list(v.shape) for k, v in outputs.items()}, "out": out}
    if not as_json:
        _console().print(f"built {source} on {backend} in {seconds:.2f} s; outputs "
                         + ", ".join(f"{k} {list(v)}" for k, v in data["outputs"].items()))
    _emit(data, as_json)


@cli.command("profile")
@click.argument("source", metavar="FILE.onnx|MODEL")
@click.option("--backend", default="onnxruntime", show_default=True,
              help=_backend_help("Backend") + " A MODEL given to an ONNX backend is exported and cleaned first.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True)
@onnx_shape_opt
@click.option("--iterations", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--warmup", type=click.FloatRange(min=0), default=1.0, show_default=True, help="Warm-up seconds.")
@click.option("--duration", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Keep timing at least this many seconds.")
@click.option("--threads", type=click.IntRange(min=1), default=None)
@click.option("--layer-runs", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--top", type=click.IntRange(min=1), default=15, show_default=True,
              help="Rows in the layer tables (terminal and report).")
@click.option("-o", "--out", default=None, help="Also write the result as JSON to this file.")
@click.option("--html", "html_path", default=None, metavar="PATH",
              help="Write a self-contained HTML report (summary, plots, per-layer tables) to this file.")
@click.option("--compare", "compare_path", default=None, metavar="PROFILE.json",
              help="Baseline profile (written by 'trt-prune profile -o') to set beside this one, layer by layer, "
                   "in the report.")
@click.option("--png-dir", default=None, metavar="DIR", help="Also write the report's plots as PNG files here.")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default=None,
              help=f"Where to run ({_takes('device')}; default: CUDA when torch sees a GPU).")
@click.option("--fp16", is_flag=True, help=f"Half precision ({_takes('fp16')}; torch: CUDA only; TensorRT 11 needs "
                                           "an fp16 ONNX, see trt-prune fp16).")
@click.option("--channels-last", is_flag=True, help=f"channels_last memory format ({_takes('channels_last')}).")
@click.option("--cuda-graph", is_flag=True,
              help=f"Time CUDA-graph replays, as trtexec --useCudaGraph ({_takes('cuda_graph')}; CUDA only).")
@click.option("--sparse24", is_flag=True,
              help=f"Run layers whose weights hold 2:4 on cuSPARSELt ({_takes('sparse24')}; CUDA and --fp16).")
@click.option("--sparse", is_flag=True, help=f"SPARSE_WEIGHTS: 2:4 kernels where faster ({_takes('sparse_weights')}).")
@click.option("--cache-dir", default=None, metavar="DIR",
              help=f"Engine cache folder ({_takes('cache_dir')}; the one 'trt-prune build -o' wrote): an engine "
                   "built for the same ONNX, GPU, TensorRT version and options is loaded instead of rebuilt.")
@click.option("--e2e", is_flag=True,
              help="Also time what a frame costs end to end on the torch backend: pre-processing (letterbox kernel) "
                   "+ model + decode/NMS, each part apart (--batch frames).")
@click.option("--frames", default="builtin", show_default=True, metavar="builtin|DIR",
              help="--e2e frames: road scenes rendered at 1920x1080, or a folder of images.")
@trust_opt
@json_opt
def profile_cmd(source, backend, batch, input_shape, iterations, warmup, duration, threads, layer_runs, top, out,
                html_path, compare_path, png_dir, device, fp16, channels_last, cuda_graph, sparse24, sparse, cache_dir,
                e2e, frames, trust_code, as_json):
    """Latency percentiles, throughput and per-layer times mapped back to PyTorch modules."""
    from .artifacts import check_output_dir, check_output_file, write_json
    from .backends import source_kind
    from .stages import profile

    # Everything that can fail on bad input fails here, before the long timing run, and writes nothing.
    config = _backend_config(backend, {"device": device, "fp16": fp16, "channels_last": channels_last,
                                       "cuda_graph": cuda_graph, "sparse24": sparse24, "sparse_weights": sparse,
                                       "cache_dir": cache_dir})
    shape = _shape_map(input_shape)
    if source_kind(source) == "onnx" and not Path(source).is_file():
        raise TrtPruneError(f"ONNX file {source!r} does not exist; export one (trt-prune export), or profile the "
                            "model itself (a spec or folder)")
    if compare_path and not (html_path or png_dir):
        raise TrtPruneError(f"--compare {compare_path} only feeds the report; add --html report.html or "
                            "--png-dir DIR")
    compare = None
    if compare_path:
        from .profiling.compare import load_profile

        compare = load_profile(compare_path)
    if e2e and backend != "torch":
        raise TrtPruneError(f"--e2e times pre-processing + model + decode/NMS on the torch backend; got --backend "
                            f"{backend}: add --backend torch")
    if e2e and cuda_graph:
        raise TrtPruneError("--e2e runs the model eagerly between the pre- and post-processing; drop --cuda-graph")
    if frames != "builtin" and not e2e:
        raise TrtPruneError(f"--frames {frames} only feeds --e2e; add --e2e")
    if e2e and frames != "builtin" and not Path(frames).is_dir():
        raise TrtPruneError(f"--frames {frames!r} is neither 'builtin' nor a folder of images")
    for path in (out, html_path):
        if path:
            check_output_file(path)
    for folder in (png_dir, cache_dir):
        if folder:
            check_output_dir(folder, "--png-dir" if folder == png_dir else "--cache-dir")
    result = profile(source, backend, batch=batch, input_shape=shape, warmup_s=warmup, iterations=iterations,
                     min_duration_s=duration, threads=threads, layer_runs=layer_runs, config=config,
                     trust_code=trust_code)
    full = result.to_dict()
    data = {k: v for k, v in full.items() if k != "samples_ms"}
    from .profiling.aggregate import AGGREGATE_KEYS, aggregate_layers
    from .profiling.compare import per_layer_share

    data["per_layer_vs_e2e"] = per_layer_share(full)
    data["aggregates"] = {by: aggregate_layers(result.per_layer, by) for by in AGGREGATE_KEYS}
    if e2e:
        from .stages import profile_pipeline

        data["pipeline"] = profile_pipeline(source, frames, batch=batch, config=config, input_shape=shape,
                                            iterations=iterations,
                                            warmup_s=warmup, threads=threads, trust_code=trust_code)
    if out:
        write_json(out, data)
    if html_path or png_dir:
        from .profiling.html import render_plots, write_profile_html, write_profile_pngs

        pngs = render_plots(full, compare, top)  # drawn once for both the PNG files and the page
        if png_dir:
            data["png"] = [str(p) for p in write_profile_pngs(full, png_dir, compare, top, pngs=pngs)]
        if html_path:
            data["html"] = str(write_profile_html(full, html_path, compare=compare, top=top, pngs=pngs))
    from rich.table import Table

    lat = result.latency_ms
    table = Table(title=f"{source} on {backend}, batch {batch}: p50 {lat['p50']:.3f} ms, p90 {lat['p90']:.3f}, "
                        f"p99 {lat['p99']:.3f}, mean {lat['mean']:.3f}; {result.throughput_ips:.1f} inferences/s; "
                        f"layers sum {result.per_layer_sum_ms or 0:.3f} ms")
    for col in ("layer", "op", "module", "ms"):
        table.add_column(col, justify="right" if col == "ms" else "left")
    for row in result.per_layer[:top]:
        table.add_row(row["name"], row["op"], str(row.get("module") or ""), f"{row['ms']:.3f}")
    if result.cv_warning:
        _console().print(f"[yellow]warning:[/yellow] {result.cv_warning}")
    if result.breakdown and not as_json:
        from .profiling.html import breakdown_rows

        for label, value in breakdown_rows(result.breakdown):
            _console().print(f"{label}: {value}", highlight=False)
    if data["per_layer_vs_e2e"] and not as_json:
        _console().print(data["per_layer_vs_e2e"])
        stages = ", ".join(f"{r['key']} {r['ms']:.3f} ms ({r['share']:.0%})" for r in data["aggregates"]["stage"])
        _console().print(f"by stage: {stages}")
    if data.get("pipeline") and not as_json:
        pipe = data["pipeline"]
        parts = ", ".join(f"{k} {v['p50_ms']:.3f} ms" for k, v in pipe["parts"].items())
        _console().print(f"per batch of {pipe['frames']} {'/'.join(pipe['frame_sizes'])} frame(s), p50: {parts}; "
                         f"total {pipe['total']['p50_ms']:.3f} ms = {pipe['total']['p50_ms_per_frame']:.3f} ms per "
                         f"frame, {pipe['frames_per_s']:.1f} frames/s (pre-processing: {pipe['preprocess_impl']} on "
                         f"{pipe['device']})", highlight=False)
        for note in pipe["notes"]:
            _console().print(f"note: {note}", highlight=False)
    if data.get("html") and not as_json:
        _console().print(f"report written to {data['html']}")
    _emit(data, as_json, table)


@cli.group("inspect", cls=_Group)
def inspect_group():
    """Look inside ONNX files."""


@inspect_group.command("sparsity")
@click.argument("onnx_file", metavar="FILE.onnx")
@json_opt
def inspect_sparsity_cmd(onnx_file, as_json):
    """Per weight of each Conv/Gemm/MatMul: does 2:4 hold on TensorRT's axis, and if not, why."""
    from .sparsity.inspect import inspect_sparsity

    records = inspect_sparsity(onnx_file)
    data = [r.to_dict() for r in records]
    from rich.table import Table

    table = Table(title=f"2:4 in {onnx_file}: {sum(r.holds_24 for r in records)} of {len(records)} weights hold")
    for col in ("weight", "op", "shape", "2:4", "eligible", "reason"):
        table.add_column(col)
    for r in records:
        table.add_row(r.name, r.op, "x".join(map(str, r.shape)), "yes" if r.holds_24 else "no",
                      "yes" if r.eligible else "no", r.reason)
    _emit(data, as_json, table)


@inspect_group.command("quantization")
@click.argument("onnx_file", metavar="FILE.onnx")
@json_opt
def inspect_quantization_cmd(onnx_file, as_json):
    """Per Conv/Gemm/MatMul: INT8 or float (and why); for a QDQ file, also every TensorRT placement rule broken."""
    from .quantize import inspect_quantization

    data = inspect_quantization(onnx_file)
    from rich.table import Table

    n8 = sum(r["precision"] == "int8" for r in data["layers"])
    what = "holds" if data["quantized"] else "would hold (trt-prune quantize)"
    table = Table(title=f"{onnx_file} {what}: {n8} of {len(data['layers'])} weighted layers in INT8"
                        + (f"; {len(data['violations'])} placement problems" if data["quantized"] else ""))
    for col in ("node", "module", "op", "precision", "why"):
        table.add_column(col)
    for r in data["layers"]:
        table.add_row(r["node"], r["module"] or "", r["op"], r["precision"], r["reason"])
    for v in data.get("violations", []):
        table.add_row("", "", "", "problem", v)
    _emit(data, as_json, table)


@inspect_group.command("latency-table")
@click.argument("table_dir", metavar="DIR")
@click.option("--plot", default=None, metavar="FILE.png", help="Write latency vs channels, one panel per layer.")
@json_opt
def inspect_latency_cmd(table_dir, plot, as_json):
    """Show a latency table: per layer shape its grid, and with --plot latency vs channels per layer."""
    from .latency import load_table
    from .latency.plot import plot_table, table_rows

    table = load_table(table_dir)
    rows = table_rows(table)
    data = {"key": table.key.describe(), "entries": rows, "calibrations": table.calibrations}
    if plot is not None:
        data["plot"] = str(plot_table(table, plot))
    from rich.table import Table

    view = Table(title=f"latency table {table_dir}: {table.key.describe()}")
    for col in ("layer", "dense in×out", "grid", "fewest channels ms", "dense ms", "missing"):
        view.add_column(col)
    for r in rows:
        view.add_row(r["layer"], "×".join(map(str, r["dense"])), "×".join(map(str, r["grid"])),
                     "-" if r["min_ms"] is None else f"{r['min_ms']:.3f}",
                     "-" if r["dense_ms"] is None else f"{r['dense_ms']:.3f}", str(r["missing"]))
    _emit(data, as_json, view)
    if plot is not None and not as_json:
        _console().print(f"plot written to {plot}")


@cli.group("bench", cls=_Group)
def bench_group():
    """Regression benchmarks: record suites into a store, compare runs or live candidates (exit 1 on regression)."""


store_opt = click.option("--store", default="trt-prune-bench.sqlite", show_default=True, metavar="FILE",
                         help="SQLite result store (created on the first run).")


@bench_group.command("run")
@click.argument("suite_file", metavar="SUITE.yaml")
@store_opt
@click.option("--name", default=None, help="Run name, unique in the store (default: suite name + UTC time).")
@click.option("--trust-code", is_flag=True,
              help="Allow suite entries (or model folders) whose model is a .py file (loading it runs that file).")
@json_opt
def bench_run_cmd(suite_file, store, name, trust_code, as_json):
    """Measure every entry × variant × backend × batch of a suite and record it as one run."""
    import time

    from .regression.runner import run_suite
    from .regression.store import Store
    from .regression.suite import load_suite

    suite = load_suite(suite_file)  # every bad value fails here, before any work
    name = name or f"{suite.name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    if not Path(store).is_file():
        from .artifacts import check_output_file

        check_output_file(store, "--store")
    target = Store(store)
    if target.path.is_file() and target.has_run(name):
        raise TrtPruneError(f"the store {store!r} already has a run named {name!r}; choose another --name")
    say = (lambda text: None) if as_json else (lambda text: _console().print(f"[dim]{text}[/dim]"))
    result = run_suite(suite, target, name, progress=say, trust_code=trust_code)
    from rich.table import Table

    table = Table(title=f"run {name} ({result['commit'] or 'no git commit'}) → {store}")
    for col in ("entry", "variant", "backend", "batch", "p50 ms", "p99 ms", "images/s", "mAP"):
        table.add_column(col, justify="right" if col[0].isdigit() or " " in col or col in ("batch", "mAP")
                         else "left")
    for r in result["results"]:
        table.add_row(r["entry"], r["variant"], r["backend"], str(r["batch"]), f"{r['p50_ms']:.3f}",
                      f"{r['p99_ms']:.3f}", f"{r['images_s']:.1f}",
                      "–" if r["accuracy"] is None else f"{r['accuracy']:.2f}")
    _emit(result, as_json, table)


@bench_group.command("compare")
@click.option("--baseline", required=True, metavar="A",
              help="A stored run (RUN or RUN:VARIANT), or an ONNX file, model spec or model folder to run live.")
@click.option("--candidate", required=True, metavar="B", help="Same forms as --baseline.")
@click.option("--backend", default=None,
              help="onnxruntime (live default), tensorrt or torch; with stored runs, only that backend's results.")
@click.option("--min-effect", type=float, default=0.05, show_default=True,
              help="Smallest slowdown (fraction) that counts as a regression.")
@click.option("--max-accuracy-drop", type=float, default=1.0, show_default=True,
              help="mAP points the candidate may lose before it is a regression, whatever its speed.")
@store_opt
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Live runs: batch size.")
@shape_opt
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="Live runs: backend threads (1 keeps a 2-core machine's timings steady; see the README).")
@click.option("--max-blocks", type=click.IntRange(min=2), default=40, show_default=True,
              help="Live runs: stop adding interleaved rounds here; the verdict may stay inconclusive.")
@click.option("--accuracy", type=click.Choice(["auto", "map", "none"]), default="auto", show_default=True,
              help="Live runs: score mAP (auto: for the demo detector's family).")
@click.option("--html", "html_path", default=None, metavar="PATH", help="Also write the comparison as HTML.")
@trust_opt
@json_opt
def bench_compare_cmd(baseline, candidate, backend, min_effect, max_accuracy_drop, store, batch, input_shape,
                      threads, max_blocks, accuracy, html_path, trust_code, as_json):
    """Regression verdict between A and B: exit 0 (no regression), 1 (regression), 2 (error)."""
    from .artifacts import check_output_file
    from .backends import backend_names
    from .regression.live import Settings, compare_live
    from .regression.runner import compare_stored, exit_code, is_stored
    from .regression.store import Store

    if backend is not None and backend not in backend_names():
        raise TrtPruneError(f"unknown backend {backend!r}; choose one of {', '.join(backend_names())}")
    settings = Settings(min_effect=min_effect, max_drop=max_accuracy_drop, batch=batch, threads=threads,
                        max_blocks=max_blocks, min_blocks=min(8, max_blocks)).check()
    if html_path:
        check_output_file(html_path)
    target = Store(store)
    stored = [is_stored(target, ref) for ref in (baseline, candidate)]
    if any(stored) and not all(stored):
        which = candidate if stored[0] else baseline
        raise TrtPruneError(f"{which!r} is not a run in {store!r}, but the other side is: compare two stored runs "
                            "or two live candidates (ONNX files, specs, folders)")
    if all(stored):
        result = compare_stored(target, baseline, candidate, settings, backend)
    else:
        say = (lambda text: None) if as_json else (lambda text: _console().print(f"[dim]{text}[/dim]"))
        result = compare_live(baseline, candidate, backend or "onnxruntime", settings, parse_shape(input_shape),
                              None if accuracy == "auto" else accuracy, progress=say, trust_code=trust_code)
    profiles = result.pop("profiles", None)
    if html_path:
        from .regression.report import write_comparison_html

        result["html"] = str(write_comparison_html(result, html_path, profiles))
    if as_json:
        _emit(result, True)
    else:
        from .regression.report import comparison_table

        _console().print(comparison_table(result))
    sys.exit(exit_code(result))


@bench_group.command("history")
@store_opt
@click.option("--entry", default=None, help="Only this entry (model spec).")
@click.option("--html", "html_path", default=None, metavar="PATH",
              help="Write the history of every entry over runs and commits as an offline HTML page with plots.")
@json_opt
def bench_history_cmd(store, entry, html_path, as_json):
    """Every stored result over runs and commits; with --html, one plot per entry."""
    from .artifacts import check_output_file
    from .regression.store import Store

    if html_path:
        check_output_file(html_path)
    rows = Store(store).history(entry)
    data: dict = {"store": store, "results": rows}
    if html_path:
        from .regression.report import write_history_html

        data["html"] = str(write_history_html(rows, html_path))
    from rich.table import Table

    table = Table(title=f"{len(rows)} results in {store}")
    for col in ("run", "commit", "entry", "variant", "backend", "batch", "p50 ms", "mAP"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["run"], str(r["commit"] or ""), r["entry"], r["variant"], r["backend"], str(r["batch"]),
                      f"{r['p50_ms']:.3f}", "–" if r["accuracy"] is None else f"{r['accuracy']:.2f}")
    _emit(data, as_json, table)


def main(argv=None) -> None:
    """Console-script entry point (exit 0 done, 1 a regression verdict, 2 bad input)."""
    cli.main(args=argv, prog_name="trt-prune")


if __name__ == "__main__":
    main()
