"""Stage 4, finetune: train the pruned student's surviving proxies, attention and classifier."""
from __future__ import annotations

from pathlib import Path

from .. import defaults
from ..loading import load_student, load_teacher
from ..runs import locate_teacher, prepare_stage, read_run, read_summary, require_stage
from ..train import Callbacks, resolve_device
from .common import check_run_data, data_config, fit_student, load_data, one_writer, say_skipped, tailored_distillation
from .options import RUN_DATA, DataOptions, TrainOptions, recorded_options, stage_settings


@one_writer(create=False)
def finetune(run: Path, data: DataOptions, train: TrainOptions, *, teacher_weight: float = defaults.TEACHER_WEIGHT,
             callbacks: Callbacks | None = None) -> dict:
    """Retrain the pruned student with the complexity weight 0, teacher term on (stage 4)."""
    cb = callbacks or Callbacks()
    train.validate()
    device = resolve_device(train.device)
    run_meta = read_run(run)
    prune_dir = require_stage(run, "prune", "finetune")
    check_run_data(run, run_meta, data)
    settings = stage_settings(train, device, data, run_meta=run_meta, teacher_weight=teacher_weight)
    done = prepare_stage(run, "finetune", resume=train.resume, overwrite=train.overwrite, settings=settings)
    if done:
        cb.on_message(f"finetune: already complete in {run}")
        return read_summary(run, "finetune")
    task = load_data(run_meta, data, data_config(run_meta["backbone"]["architecture"]), run)
    say_skipped(cb, task)
    student, _ = load_student(prune_dir, device)
    teacher = None
    if teacher_weight > 0:
        teacher = load_teacher(locate_teacher(run, run_meta), device).eval().requires_grad_(False)
    return fit_student(run, "finetune", student, teacher, task, data, train, device, cb, complexity=None,
                        g1=0.0, g2=teacher_weight, distill=tailored_distillation(run, teacher_weight),
                        extra={"settings": settings, "teacher_weight": teacher_weight, "command": "finetune",
                               "options": recorded_options(settings, train, data, drop=RUN_DATA)})
