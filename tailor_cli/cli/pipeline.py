"""``nettailor run``: the six stages in one command (teacher, tailor, prune --auto, finetune, export,
report), with each training stage's options under its own name (``--tailor-lr``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import defaults
from ..errors import UsageError
from .app import app, execute, fail_on_tolerance
from .options import (
    Amp,
    AttentionSlowEpochs,
    AttentionSlowFactor,
    Backbone,
    Cache,
    ClipGrad,
    ComplexityWeight,
    Config,
    Data,
    Debug,
    Device,
    Download,
    Fallbacks,
    FinetuneBatchSize,
    FinetuneEpochs,
    FinetuneLr,
    Hflip,
    ImgSize,
    Json,
    KdTemperature,
    KdWeight,
    KeepCheckpoints,
    LabelSmoothing,
    MaxSkip,
    NoiseAllowance,
    OldOut,
    Output,
    Pretrained,
    Resume,
    RunDropBlocks,
    RunSearchEpochs,
    RunTolerance,
    Schedule,
    Seed,
    SkipBad,
    SplitSeed,
    TailorBatchSize,
    TailorEpochs,
    TailorLr,
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
    Weights,
    Workers,
    data_options,
    default_output,
    export_dir_value,
    require_data,
    train_options,
)
from .output import emit
from .progress import reporting
from .render import render_run, render_stage


@app.command()
def run(
    config: Config = None, data: Data = None, backbone: Backbone = "resnet34", output: Output = None,
    export_dir: Annotated[Optional[Path], typer.Option("--export-dir", metavar="EXPORT_DIR", help="Export directory for the adapter "
                                                       "[default: RUN/export].")] = None,
    out: OldOut = None, task_name: TaskName = None, pretrained: Pretrained = True, weights: Weights = None,
    teacher_run: TeacherSource = None,
    task: Task = None, img_size: ImgSize = None, val_fraction: ValFraction = None, split_seed: SplitSeed = None,
    download: Download = False, cache: Cache = False,
    hflip: Hflip = None, skip_bad: SkipBad = False, workers: Workers = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Epochs of every training stage (see --STAGE-epochs) "
                                                  f"[default: teacher {defaults.EPOCHS['teacher']}, tailor "
                                                  f"{defaults.EPOCHS['tailor']}, finetune {defaults.EPOCHS['finetune']}].")] = None,
    teacher_epochs: TeacherEpochs = None, teacher_lr: TeacherLr = None, teacher_batch_size: TeacherBatchSize = None,
    tailor_epochs: TailorEpochs = None, tailor_lr: TailorLr = None, tailor_batch_size: TailorBatchSize = None,
    finetune_epochs: FinetuneEpochs = None, finetune_lr: FinetuneLr = None,
    finetune_batch_size: FinetuneBatchSize = None,
    threshold: Threshold = defaults.THRESHOLD,
    drop_blocks: RunDropBlocks = None, tolerance: RunTolerance = defaults.TOLERANCE,
    noise_allowance: NoiseAllowance = False, fallbacks: Fallbacks = defaults.FALLBACKS,
    max_macs: Annotated[Optional[float], typer.Option("--max-macs", help="MACs budget instead of a tolerance.")] = None,
    search_epochs: RunSearchEpochs = defaults.SEARCH_EPOCHS,
    max_skip: MaxSkip = defaults.MAX_SKIP, complexity_weight: ComplexityWeight = defaults.COMPLEXITY_WEIGHT,
    teacher_weight: TeacherWeight = defaults.TEACHER_WEIGHT, teacher_loss: TeacherLoss = defaults.TEACHER_LOSS,
    train_bn: TrainBn = defaults.TRAIN_BN,
    kd_weight: KdWeight = defaults.KD_WEIGHT, kd_temperature: KdTemperature = defaults.KD_TEMPERATURE,
    attention_slow_epochs: AttentionSlowEpochs = None,
    attention_slow_factor: AttentionSlowFactor = defaults.ATTENTION_SLOW_FACTOR,
    schedule: Schedule = None, label_smoothing: LabelSmoothing = None,
    seed: Seed = 0, device: Device = "auto", amp: Amp = None, resume: Resume = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start the run again: remove what nettailor wrote "
                                            "in its directory first.")] = False,
    clip_grad: ClipGrad = None, keep_checkpoints: KeepCheckpoints = False, json_out: Json = False, debug: Debug = False,
):
    """The whole pipeline in one command: teacher, tailor, prune, finetune, export, report."""

    def body():
        from ..stages import BackboneOptions, SearchOptions, TailorOptions, run_pipeline

        require_data(data)
        if epochs is not None and epochs <= 0:
            raise UsageError(f"--epochs must be positive, got {epochs}")
        target = export_dir_value(export_dir, out)
        stage = lambda name, n, lr, bs: train_options(name, epochs=epochs if n is None else n, lr=lr, batch_size=bs,
                                                      seed=seed, device=device, amp=amp,
                                                      keep_checkpoints=keep_checkpoints, clip_grad=clip_grad,
                                                      schedule=schedule, label_smoothing=label_smoothing)
        with reporting() as rep:
            result = run_pipeline(
                output or default_output(data, backbone), target, BackboneOptions(backbone, pretrained, weights),
                data_options(data, task, img_size, val_fraction, download, cache, hflip, skip_bad, workers,
                             split_seed=split_seed),
                TailorOptions(teacher=teacher_run, max_skip=max_skip, complexity_weight=complexity_weight,
                              teacher_weight=teacher_weight, teacher_loss=teacher_loss, train_bn=train_bn,
                              kd_weight=kd_weight, kd_temperature=kd_temperature,
                              attention_slow_epochs=attention_slow_epochs,
                              attention_slow_factor=attention_slow_factor,
                              teacher_train=stage("teacher", teacher_epochs, teacher_lr, teacher_batch_size)),
                stage("tailor", tailor_epochs, tailor_lr, tailor_batch_size),
                stage("finetune", finetune_epochs, finetune_lr, finetune_batch_size),
                SearchOptions(tolerance=tolerance, max_macs=max_macs, search_epochs=search_epochs, threshold=threshold,
                              noise_allowance=noise_allowance, fallbacks=fallbacks),
                drop_blocks, resume=resume, overwrite=overwrite, task_name=task_name, callbacks=rep,
                on_stage=None if json_out else lambda r: emit(r, False, render_stage))
        emit(result, json_out, render_run)
        fail_on_tolerance(result)

    execute(debug, body, json_out)
