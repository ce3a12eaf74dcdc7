"""Stage 2, tailor: train the student (proxies, attention, classifier) against the teacher."""
from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Callable

import torch

from ..backbone import backbone_identity, check_backbone_name
from ..checkpoint import read_json
from ..counting import path_costs
from ..errors import RunError
from ..loading import load_teacher
from ..losses import ComplexityModel
from ..runs import (
    CHECKPOINT,
    check_settings,
    check_writable,
    locate_teacher,
    prepare_stage,
    read_run,
    read_summary,
    stage_done,
    write_run,
)
from ..student import Student
from ..train import Callbacks, resolve_device
from .common import (
    REDO_TEACHER,
    Distillation,
    check_run_data,
    data_config,
    data_record,
    fit_student,
    keep_backbone,
    load_data,
    new_run_guard,
    one_writer,
    run_backbone,
    say_skipped,
)
from .options import (
    BackboneOptions,
    DataOptions,
    TailorOptions,
    TrainOptions,
    recorded_options,
    stage_settings,
    weights_option,
)
from .teacher import (
    check_teacher,
    check_teacher_data,
    file_sha256,
    fit_teacher,
    import_teacher,
    is_teacher_file,
    load_teacher_file,
    resolve_teacher_dir,
)


@one_writer(create=True)
def tailor(run: Path, bb: BackboneOptions, data: DataOptions, train: TrainOptions, opts: TailorOptions,
           callbacks: Callbacks | None = None, on_ready: Callable[[dict], None] | None = None) -> dict:
    """Build the student and train it with CE + g1 E[C] + g2 Omega (stage 2).

    Without ``opts.teacher`` (and no finished teacher in ``run``), trains one first in ``run/teacher``.
    ``on_ready`` is called with the run's backbone identity and task name (as ``run.json`` records
    them) as soon as they are known, before any training, also when the stage is already done:
    ``run`` checks its export there.
    """
    cb = callbacks or Callbacks()
    train.validate()
    opts.teacher_train.validate("teacher-")
    opts.validate()
    device = resolve_device(train.device)
    check_writable(run)
    run_meta = read_run(run) if (run / "run.json").exists() else None
    check_run_data(run, run_meta, data)
    teacher_file = Path(opts.teacher) if opts.teacher is not None and is_teacher_file(opts.teacher) else None
    teacher_dir = resolve_teacher_dir(opts.teacher) if opts.teacher and teacher_file is None else None
    if teacher_dir is None and teacher_file is None and run_meta is not None and run_meta.get("teacher") not in (None, "teacher"):
        teacher_dir = locate_teacher(run, run_meta)  # the external teacher this run was started with

    teacher_setting = "teacher" if teacher_dir is None else str(teacher_dir.resolve())  # in the run: relative

    def settings_now(meta):
        return stage_settings(train, device, data, bb, meta, max_skip=opts.max_skip, teacher=teacher_setting,
                              complexity_weight=opts.complexity_weight, teacher_weight=opts.teacher_weight,
                              teacher_loss=opts.teacher_loss, train_bn=opts.train_bn,
                              kd_weight=opts.kd_weight, kd_temperature=opts.kd_temperature,
                              attention_slow_epochs=opts.slow_epochs(train.epochs),
                              attention_slow_factor=opts.attention_slow_factor)

    done = prepare_stage(run, "tailor", resume=train.resume, overwrite=train.overwrite, settings=settings_now(run_meta))
    if done:
        if on_ready is not None:
            on_ready(read_run(run))
        cb.on_message(f"tailor: already complete in {run}")
        return read_summary(run, "tailor")
    if teacher_dir is not None:
        check_teacher_data(teacher_dir, data.data or (run_meta or {}).get("data", {}).get("path"))
    with new_run_guard(run):
        check_backbone_name(bb.name)
        if teacher_dir is not None and run_meta is None and (teacher_dir.parent / "split.json").exists():
            run.mkdir(parents=True, exist_ok=True)  # the student must see exactly the teacher's split
            shutil.copyfile(teacher_dir.parent / "split.json", run / "split.json")
        task = load_data(run_meta, data, data_config(bb.name), run)
        backbone = run_backbone(run, run_meta, bb, len(task.classes), train.seed)
        init_rng = torch.get_rng_state()  # for the student's proxies, below
        say_skipped(cb, task)
        identity = backbone_identity(backbone, name=bb.name, weights=bb.weights, pretrained=bb.pretrained)
        if teacher_dir is not None:
            check_teacher(teacher_dir, identity, task.classes)
        if teacher_file is not None:  # refused here, before anything of a new run is kept
            file_teacher = load_teacher_file(teacher_file, copy.deepcopy(backbone), len(task.classes))
        if on_ready is not None:
            on_ready({"backbone": identity, "task_name": (run_meta or {}).get("task_name", task.name)})
    if run_meta is None:
        write_run(run, {"backbone": identity, "data": data_record(task, data), "classes": task.classes,
                        "task_name": task.name})
    elif run_meta["backbone"]["sha256"] != identity["sha256"]:
        raise RunError(f"run '{run}' was made with other backbone weights; use another --output or --overwrite")
    keep_backbone(run, run_meta, backbone, identity)  # once, before any training

    if teacher_dir is None and teacher_file is not None:
        teacher_dir = run / "teacher"
        _import_teacher_file(run, teacher_file, file_teacher, task, data, opts.teacher_train, device, cb)
    elif teacher_dir is None:
        teacher_dir = run / "teacher"
        t_opts = opts.teacher_train
        t_opts.device = train.device
        t_opts.resume = train.resume or train.overwrite  # --overwrite redoes the tailor stage, not its teacher
        t_settings = stage_settings(t_opts, device, data, bb, read_run(run))
        made_by_tailor = (read_json(teacher_dir / "config.json", what="teacher config").get("made_by") == "tailor"
                          if (teacher_dir / "config.json").is_file() else True)
        if stage_done(run, "teacher"):
            if made_by_tailor:  # one from `nettailor teacher` is used as it is
                check_settings(run, "teacher", t_settings, done=True, redo=REDO_TEACHER.format(run=run))
        else:
            if not made_by_tailor and (teacher_dir / CHECKPOINT).is_file():
                raise RunError(f"'{teacher_dir}' is an unfinished `nettailor teacher` stage; finish it first with "
                               f"`nettailor teacher --output {run} --resume` and its options")
            cb.on_message(f"tailor: the student learns from a fine-tuned teacher; fine-tuning one first in {teacher_dir}")
            prepare_stage(run, "teacher", resume=t_opts.resume, overwrite=False, settings=t_settings)
            fit_teacher(run, bb, copy.deepcopy(backbone), task, data, t_opts, device, cb, t_settings, made_by="tailor")
    meta = read_run(run)
    inside = teacher_dir.resolve() == (run / "teacher").resolve()
    meta["teacher"] = "teacher" if inside else str(teacher_dir.resolve())
    write_run(run, {k: v for k, v in meta.items() if k != "format"})

    teacher = load_teacher(teacher_dir, device)
    teacher.eval().requires_grad_(False)
    # The proxies are drawn from the generator as building the backbone left it (seeded there), whether a
    # teacher was trained in between (`run`) or before (`tailor --resume`, `teacher` then `tailor`).
    torch.set_rng_state(init_rng)
    student = Student(backbone, len(task.classes), max_skip=opts.max_skip, train_bn=opts.train_bn)
    costs, backbone_macs = path_costs(student, task.img_size)
    settings = settings_now(read_run(run))
    t = opts.teacher_train  # its options are tailor's --teacher-* when tailor trains the teacher in the run
    in_run: dict[str, object] = {"teacher_epochs": t.epochs, "teacher_lr": t.lr, "teacher_batch_size": t.batch_size}
    if teacher_file is not None:  # `tailor -c config.json` imports the same file again
        in_run = {"teacher": str(teacher_file.resolve())}
    options = recorded_options(settings, train, data, weights=weights_option(bb), **(in_run if inside else {}),
                               drop=("teacher",) if inside else ())
    return fit_student(run, "tailor", student, teacher, task, data, train, device, cb,
                        complexity=ComplexityModel(student.structure, costs),
                        g1=opts.complexity_weight, g2=opts.teacher_weight,
                        distill=Distillation(opts.teacher_loss, opts.kd_weight, opts.kd_temperature),
                        keep="last",  # the architecture is what the complexity schedule ends with
                        attention_slow=(settings["attention_slow_epochs"], settings["attention_slow_factor"]),
                        extra={"settings": settings, "max_skip": opts.max_skip, "train_bn": opts.train_bn,
                               "complexity_weight": opts.complexity_weight,
                               "teacher_weight": opts.teacher_weight, "teacher": str(teacher_dir),
                               "path_costs": costs, "backbone_macs": backbone_macs,
                               "command": "tailor", "options": options})


def _import_teacher_file(run: Path, file: Path, model, task, data: DataOptions, t_opts: TrainOptions, device,
                         cb: Callbacks) -> None:
    """``--teacher FILE``: import it as ``RUN/teacher`` once; a run whose teacher came from elsewhere refuses it."""
    if stage_done(run, "teacher"):
        made = read_json(run / "teacher" / "config.json", what="teacher config")
        if made.get("source_sha256") == file_sha256(file):
            return  # this very file, imported before
        origin = f"imported from '{made.get('source')}'" if made.get("made_by") == "file" else "trained in the run"
        raise RunError(f"run '{run}' already has a teacher ({origin}); start a new run (--output) to use '{file}'")
    t_settings = {"teacher_file": str(file.resolve())}
    prepare_stage(run, "teacher", resume=False, overwrite=False, settings=t_settings)
    import_teacher(run, file, model, task, data, t_opts, device, cb, t_settings)
