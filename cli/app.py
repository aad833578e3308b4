"""`fmkt-cli`: thin typer commands: options -> config -> fmkt.commands / fmkt.export / fmkt.bench -> tables.

torch is imported inside the commands, so --help stays fast; it names the methods, losses, encoders and schedules
from fmkt.names (torch-free tuples of the registries' keys); `fmkt-cli info --models` prints every registry.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from fmkt.bench.backends import BENCH_BACKENDS, backends_help
from fmkt.export.formats import EXPORT_FORMATS, PRECISIONS
from fmkt.names import DETECTION_METHOD_NAMES, ENCODER_NAMES, LOSS_NAMES, METHOD_NAMES, SCHEDULE_NAMES, TASK_NAMES

app = typer.Typer(add_completion=False, no_args_is_help=False, pretty_exceptions_enable=False,
                  help="FM-KT knowledge distillation: train, distill, evaluate, inspect.")
out_console = Console()
err_console = Console(stderr=True)

DebugOpt = typer.Option(False, "--debug", help="Show full tracebacks for errors.")
KernelOpt = typer.Option(None, "--kernel", help="Flow-step kernels: auto (Triton on CUDA, else torch) | "
                                                 "triton | torch.")


def _fail(exc: BaseException, debug: bool) -> None:
    from fmkt.errors import FmktError

    if debug:
        raise exc
    if isinstance(exc, FmktError):
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    raise exc


def _run(fn, debug: bool):
    try:
        return fn()
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        err_console.print("interrupted.")
        raise typer.Exit(130)
    except Exception as exc:  # FmktError -> one sentence, exit 2; anything else is a bug: traceback
        _fail(exc, debug)


def _command(name: str | None = None):
    """``app.command`` whose body runs under ``_run`` (its ``debug`` option says whether errors keep tracebacks)."""
    def register(fn):
        @functools.wraps(fn)  # typer reads fn's signature, options and docstring through the wrapper
        def command(**options):
            return _run(lambda: fn(**options), options["debug"])
        return app.command(name)(command)
    return register


def _build(config, sets, **options):
    from fmkt.commands import configure
    from fmkt.config import cli_overrides

    return configure(config, cli_overrides(sets, **options))


def _result_table(result, title: str) -> Table:
    from fmkt.evaluation import step_label

    table = Table(title=title)
    table.add_column("model")
    table.add_column("top-1 last (%)", justify="right")
    table.add_column("top-1 best (%)", justify="right")
    if result.teacher is not None and result.teacher.get("accuracy") is not None:
        table.add_row(f"teacher ({result.teacher['arch']})", f"{result.teacher['accuracy']:.2f}", "")
    for k, v in result.last.items():
        table.add_row(f"student {step_label(k)}", f"{v:.2f}", f"{result.best[k]:.2f}")
    return table


def _report(result, title: str) -> None:
    """The result table on rank 0 (or a plain process); under torchrun every rank also states its top-1."""
    if result.world_size > 1:
        err_console.print(f"rank {result.rank}/{result.world_size} top-1: {json.dumps(result.last, sort_keys=True)}",
                          highlight=False, soft_wrap=True)
    if result.rank != 0:
        return
    out_console.print(result.table(title) if hasattr(result, "table") else _result_table(result, title))
    out_console.print(f"artifact: {result.artifact}  ({result.seconds:.0f} s)")


def _names(names) -> str:
    return " | ".join(names)


@_command()
def train(
    model: str = typer.Option(None, "--model", help="Architecture to train (see `fmkt-cli info --models`), "
                                                    "timm:NAME, or an import path pkg.module:factory."),
    data: str = typer.Option(None, "--data", help="A dataset (`fmkt-cli info --models` lists them), or "
                                                  "pkg.module:factory returning (train, test) datasets."),
    data_dir: str = typer.Option(None, "--data-dir", help="Dataset folder (default per dataset)."),
    epochs: int = typer.Option(None, "--epochs"),
    batch_size: int = typer.Option(None, "--batch-size"),
    lr: float = typer.Option(None, "--lr"),
    seed: int = typer.Option(None, "--seed"),
    config: str = typer.Option(None, "--config", help="YAML config file or shipped recipe name."),
    sets: List[str] = typer.Option(None, "--set", help="Override a config key: --set optim.lr=0.1 (repeatable)."),
    out: str = typer.Option("runs/train", "--out", help="Output folder."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoint.pt."),
    kernel: str = KernelOpt,
    debug: bool = DebugOpt,
):
    """Plain supervised training (a teacher, or a student alone); writes OUT/artifact."""
    from fmkt.commands import run_train

    cfg = _build(config, sets, student=model, data__name=data, data__dir=data_dir, train__epochs=epochs, out=out,
                 data__batch_size=batch_size, optim__lr=lr, train__seed=seed, train__kernel=kernel, method__name="none")
    result = run_train(cfg, resume=resume, console=err_console)
    _report(result, f"{cfg.student} on {cfg.data.name}, {result.epochs} epochs")


@_command()
def distill(
    teacher: str = typer.Option(None, "--teacher", help="Teacher: an fmkt artifact folder or a .pt/.pth/.safetensors "
                                                        "state dict. Default: train one (cached)."),
    teacher_arch: str = typer.Option(None, "--teacher-arch", help="Architecture of a state-dict teacher file (and of "
                                                                  "the default teacher): a zoo name or timm:NAME."),
    teacher_model: str = typer.Option(None, "--teacher-model", help="The teacher as pkg.module:factory (or a zoo "
                                                                    "name, or timm:NAME); --teacher PATH gives its "
                                                                    "weights."),
    student: str = typer.Option(None, "--student", help="Student architecture: a zoo name, timm:NAME "
                                                                "(any timm model) or pkg.module:factory."),
    data: str = typer.Option(None, "--data", help="A dataset (default digits; `fmkt-cli info --models` lists them), "
                                                  "or pkg.module:factory returning (train, test) datasets."),
    data_dir: str = typer.Option(None, "--data-dir"),
    task: str = typer.Option(None, "--task", help=f"{_names(TASK_NAMES)} (default classification)."),
    method: str = typer.Option(None, "--method", help=f"Method: {_names(METHOD_NAMES)} (default fmkt; detection: "
                                                      f"{_names(DETECTION_METHOD_NAMES)})."),
    loss: str = typer.Option(None, "--loss", help=f"Metric loss D of the FM-KT methods: {_names(LOSS_NAMES)} "
                                                  "(default dist)."),
    encoder: str = typer.Option(None, "--encoder", help=f"Meta-encoder: {_names(ENCODER_NAMES)} (default conv)."),
    schedule: str = typer.Option(None, "--schedule", help=f"Interpolation schedule: {_names(SCHEDULE_NAMES)} "
                                                          "(default rectified)."),
    train_steps: str = typer.Option(None, "--train-steps", help="N, or a list drawn per iteration: 1,2,4,8,16"),
    eval_steps: str = typer.Option(None, "--eval-steps", help="K values to evaluate, e.g. 1,2,4,8 (0 = theta)."),
    dirac_ratio: float = typer.Option(None, "--dirac-ratio", help="Fraction of pairs keeping their own teacher target."),
    epochs: int = typer.Option(None, "--epochs"),
    batch_size: int = typer.Option(None, "--batch-size"),
    lr: float = typer.Option(None, "--lr"),
    seed: int = typer.Option(None, "--seed"),
    config: str = typer.Option(None, "--config", help="YAML config file or shipped recipe name."),
    sets: List[str] = typer.Option(None, "--set", help="Override a config key: --set optim.lr=0.1 (repeatable)."),
    out: str = typer.Option(None, "--out", help="Output folder (default runs/distill)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoint.pt."),
    kernel: str = KernelOpt,
    debug: bool = DebugOpt,
):
    """Distill a student from a teacher with FM-KT (or a baseline). With no options: the built-in digits demo."""
    from fmkt.commands import describe, run_distill
    from fmkt.config import parse_int_list, teacher_arch_option

    steps = parse_int_list(eval_steps, "--eval-steps") if eval_steps is not None else None
    cfg = _build(config, sets, teacher__path=teacher, teacher__arch=teacher_arch_option(teacher_arch, teacher_model),
                 student=student, data__name=data, data__dir=data_dir, method__name=method, method__loss=loss,
                 method__encoder=encoder, method__schedule=schedule, method__train_steps=train_steps,
                 method__eval_steps=steps, method__dirac_ratio=dirac_ratio, train__epochs=epochs,
                 data__batch_size=batch_size, optim__lr=lr, train__seed=seed, train__kernel=kernel, out=out, task=task)
    result = run_distill(cfg, resume=resume, console=err_console)
    _report(result, describe(cfg, result.epochs))


@_command("eval")
def eval_cmd(
    artifact: str = typer.Argument(..., help="Artifact folder (OUT/artifact)."),
    data: str = typer.Option(None, "--data", help="Dataset (default: the artifact's own)."),
    data_dir: str = typer.Option(None, "--data-dir"),
    steps: Optional[str] = typer.Option(None, "--steps", help="K values; 0 = theta head. Default 0,1,2,4,8, "
                                        "those the artifact can run."),
    batch_size: int = typer.Option(256, "--batch-size"),
    device: str = typer.Option("auto", "--device"),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    debug: bool = DebugOpt,
):
    """Top-1 accuracy of an artifact at each K on a dataset's test split."""
    from fmkt.config import parse_int_list
    from fmkt.evaluation import step_label
    from fmkt.commands import run_eval

    asked = parse_int_list(steps, "--steps") if steps is not None else [0, 1, 2, 4, 8]
    res = run_eval(artifact, data, data_dir, asked, batch_size, device)
    if steps is None:  # the default list: quietly what the artifact can run
        res["skipped"] = {}
    if as_json:
        out_console.print_json(json.dumps({k: v for k, v in res.items() if k != "meta"}))
        return
    if "map" in res:  # a detection artifact: COCO mAP per K on its val split
        from fmkt.detection.report import eval_table

        return out_console.print(eval_table(res))
    table = Table(title=f"{Path(artifact)} on {res['dataset']} ({res['images']} test images, {res['precision']})")
    table.add_column("K")
    table.add_column("top-1 (%)", justify="right")
    for k, v in res["top1"].items():
        table.add_row(step_label(k), f"{v:.2f}")
    out_console.print(table)
    for k, why in res["skipped"].items():
        out_console.print(f"note: {step_label(k)} was not evaluated: {why}.", highlight=False)


@_command()
def info(
    models: bool = typer.Option(False, "--models", help="Also list models, datasets, losses, encoders, schedules."),
    debug: bool = DebugOpt,
):
    """Versions of torch, triton, onnx, onnxruntime (providers), tensorrt, and the devices."""
    from fmkt.runtime import environment, environment_rows

    table = Table(title="fmkt environment")
    table.add_column("component")
    table.add_column("version / state")
    for k, v in environment_rows(environment()).items():
        table.add_row(k, ", ".join(v) if isinstance(v, list) else str(v))
    out_console.print(table)
    if models:
        _registries()


def _registries() -> None:
    """`info --models`: every registry's names, read from the registries themselves."""
    from fmkt.config import recipe_names
    from fmkt.data import list_datasets
    from fmkt.distillers import METHODS
    from fmkt.flow.encoders import ENCODERS
    from fmkt.flow.schedules import SCHEDULES
    from fmkt.losses import METRIC_LOSSES
    from fmkt.models import list_models
    from fmkt.models.timm_backbone import timm_models_line

    for name, items in [("models", list_models()), ("datasets", list_datasets()), ("methods", list(METHODS)),
                        ("losses", list(METRIC_LOSSES)), ("encoders", list(ENCODERS)),
                        ("schedules", list(SCHEDULES)), ("recipes", recipe_names()),
                        ("export formats", list(EXPORT_FORMATS)), ("bench backends", list(BENCH_BACKENDS))]:
        out_console.print(f"[bold]{name}[/]: {', '.join(items)}")
    out_console.print(f"[bold]timm models[/]: {timm_models_line()}")


@_command("make-detection-data")
def make_detection_data(
    out: str = typer.Argument(..., help="Folder to write: OUT/{train,val}/*.png + OUT/annotations/instances_*.json."),
    train: int = typer.Option(500, "--train", help="Training canvases."),
    val: int = typer.Option(100, "--val", help="Validation canvases."),
    canvas: int = typer.Option(128, "--canvas", help="Canvas side in pixels."),
    source: str = typer.Option("fashion-mnist", "--source", help="Items pasted: fashion-mnist | mnist (IDX files)."),
    data_dir: str = typer.Option(None, "--data-dir", help="The IDX folder (default: the dataset's)."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same files (byte for byte)."),
    overwrite: bool = typer.Option(False, "--force", help="Replace an existing OUT."),
    debug: bool = DebugOpt,
):
    """A COCO-format detection dataset from real images: 28x28 items pasted at random scales and places on larger
    canvases, with their tight boxes and classes."""
    from fmkt.detection.canvas import make_detection_data as make

    s = make(out, source=source, train=train, val=val, canvas=canvas, seed=seed, data_dir=data_dir,
             overwrite=overwrite)
    for split, facts in s["splits"].items():
        out_console.print(f"{split}: {facts['images']} images, {facts['objects']} objects", highlight=False)
    out_console.print(f"wrote {s['root']} ({s['seconds']:.1f} s)", highlight=False)


@_command("export")
def export_cmd(
    artifact: str = typer.Argument(..., help="Artifact folder (OUT/artifact)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="K flow steps to unroll; 0 = the FM-KT^Theta head "
                                        "(or a plain student). Required, except for a detection artifact (its K)."),
    fmt: str = typer.Option("onnx", "--format", help=" | ".join(EXPORT_FORMATS)),
    precision: str = typer.Option("fp32", "--precision",
                                  help=f"{' | '.join(PRECISIONS)} (float32 input and output kept)."),
    batch: str = typer.Option("1:32:128", "--batch", help="Batch range MIN:OPT:MAX (TensorRT profile, AOTI bounds)."),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset (default 17)."),
    out: Optional[str] = typer.Option(None, "--out", help="Output folder (default ARTIFACT/../export-FORMAT-kK)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output folder."),
    device: str = typer.Option("auto", "--device", help=", ".join(n for n, f in EXPORT_FORMATS.items() if f.on_device)
                               + ": compile for auto | cpu | cuda."),
    debug: bool = DebugOpt,
):
    """Export the student with K steps as one static graph (ONNX, TensorRT engine or AOTInductor) + parity report."""
    from fmkt.export import ParityError, run_export

    result = run_export(artifact, steps, fmt, precision=precision, batch=batch, opset=opset, out=out, force=force,
                        device=device)
    for report in result.reports:
        out_console.print(report.table())
    out_console.print(f"wrote {result.out}: {', '.join(sorted(set(result.files.values())))}")
    try:
        result.raise_for_status()
    except ParityError as exc:
        err_console.print(f"[bold red]parity failed:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


@_command()
def bench(
    source: str = typer.Argument(..., help="Artifact folder (OUT/artifact) or export folder (export-*)."),
    backends: Optional[str] = typer.Option(None, "--backends", help=backends_help()),
    batch: str = typer.Option("1,64", "--batch", help="Batch sizes, e.g. 1,64."),
    steps: Optional[str] = typer.Option(None, "--steps", help="K values, e.g. 0,1,2,4,8 (default: those the model "
                                        "can run; 0 = theta head). The student alone is always timed too."),
    precision: str = typer.Option("fp32", "--precision",
                                  help=f"{' and/or '.join(PRECISIONS)}, e.g. {','.join(PRECISIONS)}."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    warmup: int = typer.Option(10, "--warmup", help="Untimed calls before each measurement."),
    iters: int = typer.Option(100, "--iters", help="Timed calls per measurement."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Detection: time this teacher too (artifact/file)."),
    out: Optional[str] = typer.Option(None, "--out", help="JSON file; the CSV and PNG go next to it "
                                      "(default ARTIFACT/../bench/bench-DEVICE.json)."),
    debug: bool = DebugOpt,
):
    """Latency per K, backend and precision (p50/p90/p99, img/s, x the student alone) + JSON, CSV, PNG."""
    from fmkt.bench import BenchSettings, result_table, run_bench, skipped_lines
    from fmkt.config import parse_int_list, parse_words

    settings = BenchSettings(
        backends=parse_words(backends, "--backends") if backends is not None else None,
        batches=parse_int_list(batch, "--batch", minimum=1), teacher=teacher,
        steps=parse_int_list(steps, "--steps") if steps is not None else None,
        precisions=parse_words(precision, "--precision"), device=device, warmup=warmup, iters=iters, out=out)
    result = run_bench(source, settings, console=err_console)
    out_console.print(result_table(result))
    for line in skipped_lines(result.rows):
        out_console.print(f"[yellow]{line}[/]", highlight=False)
    for note in result.info["notes"]:
        out_console.print(f"note: {note}", highlight=False)
    if not result.info["plot"]["written"]:
        out_console.print(f"note: {result.info['plot']['reason']}", highlight=False)
    out_console.print(f"wrote {', '.join(result.files.values())} ({result.seconds:.0f} s; estimated "
                      f"{result.estimate_s:.0f} s)", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
