"""The commands: each parses its options, turns them into the core's options, calls one core
function and renders its result. Validation beyond the option types happens in the core
(``tailor_cli.stages``), before any file is written.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import defaults
from ..errors import Interrupted, UsageError
from .app import app, execute, fail_on_tolerance
from .options import (
    AUTO_ONLY,
    Amp,
    AmpDtype,
    AttentionSlowEpochs,
    AttentionSlowFactor,
    Augment,
    Backbone,
    BatchSize,
    Cache,
    ChannelsLast,
    ClipGrad,
    Compile,
    ComplexityWeight,
    Config,
    Data,
    Debug,
    Device,
    Download,
    Epochs,
    ExportDir,
    Fallbacks,
    Hflip,
    ImgSize,
    Json,
    KdTemperature,
    KdWeight,
    KeepCheckpoints,
    LabelSmoothing,
    Lr,
    LrStep,
    MaxSkip,
    Nesterov,
    NoiseAllowance,
    OldOut,
    Output,
    Overwrite,
    Pretrained,
    Resume,
    Schedule,
    Seed,
    SkipBad,
    SplitSeed,
    Task,
    TaskName,
    TeacherBatchSize,
    TeacherEpochs,
    TeacherLoss,
    TeacherLr,
    TeacherSource,
    TeacherWeight,
    Threshold,
    TrainBn,
    ValFraction,
    WarmupEpochs,
    WeightDecay,
    Weights,
    Workers,
    command_line_options,
    data_options,
    default_output,
    export_dir_value,
    require_data,
    stage_help,
    train_options,
)
from .output import emit
from .progress import reporting
from .render import render_export, render_onnx_export, render_predictions, render_report, render_stage


@app.command(help=stage_help("teacher", "Stage 1: fine-tune the whole backbone (new classifier) on the task."))
def teacher(
    config: Config = None, data: Data = None, backbone: Backbone = "resnet34", output: Output = None,
    pretrained: Pretrained = True, weights: Weights = None, task: Task = None, img_size: ImgSize = None,
    val_fraction: ValFraction = None, split_seed: SplitSeed = None, download: Download = False, cache: Cache = False, hflip: Hflip = None,
    skip_bad: SkipBad = False, workers: Workers = None, augment: Augment = True, epochs: Epochs = None,
    batch_size: BatchSize = None, lr: Lr = None, lr_step: LrStep = None, schedule: Schedule = None,
    warmup_epochs: WarmupEpochs = None, label_smoothing: LabelSmoothing = None, weight_decay: WeightDecay = None,
    nesterov: Nesterov = None, seed: Seed = 0, device: Device = "auto",
    amp: Amp = None, amp_dtype: AmpDtype = "bfloat16", compile_model: Compile = False,
    channels_last: ChannelsLast = None, resume: Resume = False, overwrite: Overwrite = False,
    clip_grad: ClipGrad = None, keep_checkpoints: KeepCheckpoints = False, json_out: Json = False, debug: Debug = False,
):
    def body():
        from ..stages import BackboneOptions, train_teacher

        require_data(data)
        run = output or default_output(data, backbone)
        train = train_options("teacher", epochs=epochs, lr=lr, batch_size=batch_size, lr_step=lr_step, seed=seed,
                              schedule=schedule, warmup_epochs=warmup_epochs, label_smoothing=label_smoothing,
                              weight_decay=weight_decay, nesterov=nesterov, device=device, amp=amp, amp_dtype=amp_dtype, resume=resume,
                              overwrite=overwrite,
                              compile=compile_model, channels_last=channels_last, keep_checkpoints=keep_checkpoints,
                              clip_grad=clip_grad)
        with reporting() as rep:
            result = train_teacher(run, BackboneOptions(backbone, pretrained, weights),
                                   data_options(data, task, img_size, val_fraction, download, cache, hflip, skip_bad,
                                                workers, augment, split_seed), train, rep)
        emit({"run": str(run), **result}, json_out, render_stage)

    execute(debug, body, json_out)


@app.command(help=stage_help("tailor", "Stage 2: build the student (frozen blocks + proxies + attention) and "
                                       "train it."))
def tailor(
    config: Config = None, data: Data = None, backbone: Backbone = "resnet34", output: Output = None,
    teacher_run: TeacherSource = None,
    max_skip: MaxSkip = defaults.MAX_SKIP,
    complexity_weight: ComplexityWeight = defaults.COMPLEXITY_WEIGHT,
    teacher_weight: TeacherWeight = defaults.TEACHER_WEIGHT,
    teacher_epochs: TeacherEpochs = None, teacher_lr: TeacherLr = None, teacher_batch_size: TeacherBatchSize = None,
    teacher_loss: TeacherLoss = defaults.TEACHER_LOSS, train_bn: TrainBn = defaults.TRAIN_BN,
    kd_weight: KdWeight = defaults.KD_WEIGHT, kd_temperature: KdTemperature = defaults.KD_TEMPERATURE,
    attention_slow_epochs: AttentionSlowEpochs = None,
    attention_slow_factor: AttentionSlowFactor = defaults.ATTENTION_SLOW_FACTOR,
    pretrained: Pretrained = True, weights: Weights = None, task: Task = None, img_size: ImgSize = None,
    val_fraction: ValFraction = None, split_seed: SplitSeed = None, download: Download = False, cache: Cache = False, hflip: Hflip = None,
    skip_bad: SkipBad = False, workers: Workers = None, augment: Augment = True, epochs: Epochs = None,
    batch_size: BatchSize = None, lr: Lr = None, lr_step: LrStep = None, schedule: Schedule = None,
    warmup_epochs: WarmupEpochs = None, label_smoothing: LabelSmoothing = None, weight_decay: WeightDecay = None,
    nesterov: Nesterov = None, seed: Seed = 0, device: Device = "auto",
    amp: Amp = None, amp_dtype: AmpDtype = "bfloat16", compile_model: Compile = False,
    channels_last: ChannelsLast = None, resume: Resume = False, overwrite: Overwrite = False,
    clip_grad: ClipGrad = None, keep_checkpoints: KeepCheckpoints = False, json_out: Json = False, debug: Debug = False,
):
    def body():
        from ..stages import BackboneOptions, TailorOptions
        from ..stages.tailor import tailor as run_tailor

        require_data(data)
        run = output or default_output(data, backbone)
        common = dict(seed=seed, device=device, amp=amp, amp_dtype=amp_dtype, keep_checkpoints=keep_checkpoints,
                      clip_grad=clip_grad, schedule=schedule, label_smoothing=label_smoothing,
                      weight_decay=weight_decay, nesterov=nesterov)
        t_train = train_options("teacher", epochs=teacher_epochs if teacher_epochs is not None else epochs,
                                lr=teacher_lr, batch_size=teacher_batch_size, **common)
        train = train_options("tailor", epochs=epochs, lr=lr, batch_size=batch_size, lr_step=lr_step, resume=resume,
                              warmup_epochs=warmup_epochs,
                              overwrite=overwrite, compile=compile_model, channels_last=channels_last, **common)
        with reporting() as rep:
            result = run_tailor(
                run, BackboneOptions(backbone, pretrained, weights),
                data_options(data, task, img_size, val_fraction, download, cache, hflip, skip_bad, workers, augment,
                             split_seed),
                train, TailorOptions(teacher=teacher_run, max_skip=max_skip, complexity_weight=complexity_weight,
                                     teacher_weight=teacher_weight, teacher_loss=teacher_loss, train_bn=train_bn,
                                     kd_weight=kd_weight, kd_temperature=kd_temperature,
                                     attention_slow_epochs=attention_slow_epochs,
                                     attention_slow_factor=attention_slow_factor, teacher_train=t_train),
                rep)
        emit({"run": str(run), **result}, json_out, render_stage)

    execute(debug, body, json_out)


@app.command()
def prune(
    ctx: typer.Context,
    run: Annotated[Path, typer.Argument(metavar="RUN", help="A run directory with a finished 'tailor' stage.")],
    config: Config = None, threshold: Threshold = defaults.THRESHOLD,
    drop_blocks: Annotated[int, typer.Option("--drop-blocks", "-k", help="Remove the K universal blocks with the "
                                             "lowest attention.")] = 0,
    auto: Annotated[bool, typer.Option("--auto", help="Search K: the leanest network within --tolerance of the "
                                       "teacher (or the most accurate under --max-macs), then fine-tune it.")] = False,
    tolerance: Annotated[float, typer.Option("--tolerance", help="--auto: accuracy points allowed below the "
                                             "teacher on the validation split.")] = defaults.TOLERANCE,
    noise_allowance: NoiseAllowance = False, fallbacks: Fallbacks = defaults.FALLBACKS,
    max_macs: Annotated[Optional[float], typer.Option("--max-macs", help="--auto: MACs budget, absolute or a "
                                                      "fraction (<= 1) of the full network.")] = None,
    search_epochs: Annotated[int, typer.Option("--search-epochs", help="--auto: fine-tuning epochs per "
                                               "candidate.")] = defaults.SEARCH_EPOCHS,
    epochs: Annotated[int, typer.Option("--epochs", help="--auto: epochs of the final fine-tuning.")] = defaults.EPOCHS["finetune"],
    data: Data = None, cache: Cache = False, workers: Workers = None, batch_size: BatchSize = None, lr: Lr = None,
    schedule: Schedule = None, warmup_epochs: WarmupEpochs = None, label_smoothing: LabelSmoothing = None,
    seed: Seed = 0, device: Device = "auto", amp: Amp = None, clip_grad: ClipGrad = None,
    keep_checkpoints: KeepCheckpoints = False,
    resume: Annotated[bool, typer.Option("--resume", help="--auto: continue a stopped search (the candidates "
                                         "fine-tuned so far are kept) or its final fine-tuning.")] = False,
    overwrite: Overwrite = False, json_out: Json = False, debug: Debug = False,
):
    """Stage 3: remove low-attention proxies and the K weakest blocks, then everything orphaned."""

    def body():
        from ..stages import SearchOptions, auto_prune
        from ..stages.prune import prune as run_prune

        if auto and drop_blocks:
            raise UsageError("--auto searches K itself; drop --drop-blocks (or drop --auto to prune exactly K blocks)")
        if resume and overwrite:
            raise UsageError("--resume and --overwrite exclude each other")
        if not auto and (given := command_line_options(ctx, AUTO_ONLY)):
            raise UsageError(f"{', '.join(given)} only {'applies' if len(given) == 1 else 'apply'} to the search; "
                             "add --auto to search K, or drop them to prune exactly --drop-blocks K")
        with reporting() as rep:
            if not auto:
                result = run_prune(run, threshold=threshold, drop_blocks=drop_blocks, overwrite=overwrite,
                                   callbacks=rep)
                emit({"run": str(run), **result}, json_out, render_stage)
                return
            finetune = lambda n: train_options("finetune", epochs=n, lr=lr, batch_size=batch_size, seed=seed,
                                               device=device, amp=amp, keep_checkpoints=keep_checkpoints,
                                               clip_grad=clip_grad, schedule=schedule, warmup_epochs=warmup_epochs,
                                               label_smoothing=label_smoothing)
            try:
                result = auto_prune(run, data_options(data, None, None, None, False, cache, None, False, workers),
                                    finetune(search_epochs), finetune(epochs),
                                    SearchOptions(tolerance=tolerance, max_macs=max_macs, search_epochs=search_epochs,
                                                  noise_allowance=noise_allowance, fallbacks=fallbacks,
                                                  threshold=threshold), overwrite=overwrite, resume=resume,
                                    callbacks=rep,
                                    on_stage=None if json_out else lambda r: emit(r, False, render_stage))
            except Interrupted as err:  # the training loop's advice names a stage; prune resumes the whole search
                raise Interrupted(f"prune --auto: {err.where}; rerun the same command with --resume to continue "
                                  "(the candidates fine-tuned so far are kept)", exit_code=err.exit_code) from err
        emit(result, json_out)  # without --json, each part's lines were printed as it ended
        fail_on_tolerance(result)

    execute(debug, body, json_out)


@app.command(help=stage_help("finetune", "Stage 4: retrain the pruned student (complexity weight 0, teacher term "
                                         "on)."))
def finetune(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="A run directory with a finished 'prune' stage.")],
    config: Config = None, teacher_weight: TeacherWeight = defaults.TEACHER_WEIGHT,
    data: Data = None, task: Task = None, cache: Cache = False, skip_bad: SkipBad = False, workers: Workers = None,
    augment: Augment = True, epochs: Epochs = None, batch_size: BatchSize = None, lr: Lr = None,
    lr_step: LrStep = None, schedule: Schedule = None, warmup_epochs: WarmupEpochs = None,
    label_smoothing: LabelSmoothing = None, weight_decay: WeightDecay = None, nesterov: Nesterov = None,
    seed: Seed = 0,
    device: Device = "auto", amp: Amp = None, amp_dtype: AmpDtype = "bfloat16", compile_model: Compile = False,
    channels_last: ChannelsLast = None, resume: Resume = False,
    overwrite: Overwrite = False, clip_grad: ClipGrad = None, keep_checkpoints: KeepCheckpoints = False,
    json_out: Json = False, debug: Debug = False,
):
    def body():
        from ..stages.finetune import finetune as run_finetune

        train = train_options("finetune", epochs=epochs, lr=lr, batch_size=batch_size, lr_step=lr_step, seed=seed,
                              schedule=schedule, warmup_epochs=warmup_epochs, label_smoothing=label_smoothing,
                              weight_decay=weight_decay, nesterov=nesterov, device=device, amp=amp, amp_dtype=amp_dtype, resume=resume,
                              overwrite=overwrite,
                              compile=compile_model, channels_last=channels_last, keep_checkpoints=keep_checkpoints,
                              clip_grad=clip_grad)
        with reporting() as rep:
            result = run_finetune(run, data_options(data, task, None, None, False, cache, None, skip_bad, workers,
                                                    augment), train, teacher_weight=teacher_weight, callbacks=rep)
        emit({"run": str(run), **result}, json_out, render_stage)

    execute(debug, body, json_out)


@app.command()
def export(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="A run directory (its latest student stage is "
                                        "exported).")],
    export_dir: ExportDir = None, out: OldOut = None,
    task_name: TaskName = None,
    export_format: Annotated[str, typer.Option("--format", metavar="adapter|onnx", help="adapter: the task's own "
                                               "tensors beside the shared backbone; onnx: the task's network as one "
                                               "standalone EXPORT_DIR/TASK/model.onnx, checked in ONNX Runtime (pip "
                                               "install 'nettailor[onnx]').")] = "adapter",
    stage: Annotated[Optional[str], typer.Option("--stage", metavar="STAGE", help="The stage whose network to export: "
                                                 "tailor, prune, finetune, or (--format onnx) teacher [default: the "
                                                 "latest student stage; a teacher run's teacher].")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace this task's adapter (or model.onnx) if the "
                                            "export directory already holds it.")] = False,
    json_out: Json = False, debug: Debug = False,
):
    """Stage 5: write the task's adapter beside the shared frozen backbone, or its network as one ONNX file."""

    def body():
        target = export_dir_value(export_dir, out)
        if target is None:
            raise UsageError("--export-dir is required (the export directory: shared backbone + one folder per task)")
        if export_format == "onnx":
            from ..onnx_export import export_onnx

            emit(export_onnx(run, target, stage=stage, task_name=task_name, overwrite=overwrite), json_out,
                 render_onnx_export)
            return
        if export_format != "adapter":
            raise UsageError(f"--format must be adapter or onnx, got '{export_format}'")
        from ..adapter import export_task

        emit(export_task(run, target, task_name=task_name, overwrite=overwrite, stage=stage), json_out, render_export)

    execute(debug, body, json_out)


@app.command()
def report(
    path: Annotated[Path, typer.Argument(metavar="RUN_OR_EXPORT_DIR", help="A run directory or an export directory.")],
    plot: Annotated[Optional[Path], typer.Option("--plot", metavar="FILE", help="Also draw the block-usage diagram to FILE.png or "
                                                 "FILE.svg (needs matplotlib: pip install matplotlib).")] = None,
    task: Annotated[Optional[list[str]], typer.Option("--task", metavar="TASK", help="Task of an export directory to "
                                                      "report (repeatable) [default: all; EXPORT/TASK: that one].")] = None,
    json_out: Json = False, debug: Debug = False,
):
    """Stage 6: per-task block usage (blocks, proxies, attention), params, MACs, accuracy."""

    def body():
        from ..report import report_path

        result = report_path(path, task)
        if plot is not None:
            from ..plot import plot_block_usage

            result["plot"] = str(plot_block_usage(result, plot))
        emit(result, json_out, render_report)

    execute(debug, body, json_out)


@app.command()
def predict(
    export_dir: Annotated[Path, typer.Argument(metavar="EXPORT_DIR", help="An export directory (shared backbone + "
                                               "task adapters; `nettailor run` writes RUN/export).")],
    images: Annotated[list[Path], typer.Argument(metavar="IMAGES", help="Image files or folders of images.")],
    task: Annotated[Optional[list[str]], typer.Option("--task", metavar="TASK", help="Task to run (repeatable) [default: all].")] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="Classes to show per image.")] = 5,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 32,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip images that cannot be read instead of failing; "
                                           "each is named on stderr and listed under \"skipped\" in --json.")] = False,
    device: Device = "auto", json_out: Json = False, debug: Debug = False,
):
    """Run exported tasks on images: one shared backbone, each task's own tailored network."""

    def body():
        from ..predict import predict as run_predict
        from ..train import resolve_device

        if top_k <= 0 or batch_size <= 0:
            raise UsageError("--top-k and --batch-size must be positive")
        result = run_predict(export_dir, images, tasks=task, top_k=top_k, batch_size=batch_size,
                             device=resolve_device(device), skip_bad=skip_bad)
        emit(result, json_out, render_predictions)

    execute(debug, body, json_out)
