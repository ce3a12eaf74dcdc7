"""The NetTailor stages (docs/method.md, "Pipeline"), one module each, and ``run`` chaining them.

Each stage validates everything it can *before* creating a file, trains through
:func:`tailor_cli.train.fit`, and writes its stage directory (see :mod:`tailor_cli.runs`). Nothing
here prints; progress goes to callbacks.

Modules, in import order: ``options`` (each stage's options, defaults from
:mod:`tailor_cli.defaults`, the settings a stage records), ``common`` (data, backbone, loaders,
the one-writer lock, the student's training), ``teacher``, ``tailor``, ``prune``, ``finetune``,
``search`` (``prune --auto``), ``run``. ``tailor``, ``prune`` and ``finetune`` are imported from
their modules (``from tailor_cli.stages.tailor import tailor``) so that the names keep meaning
the modules here.
"""
from __future__ import annotations

from .options import BackboneOptions, DataOptions, SearchOptions, TailorOptions, TrainOptions, stage_settings
from .run import run_pipeline
from .search import auto_prune
from .search_records import check_run_resume
from .teacher import train_teacher

__all__ = [
    "BackboneOptions",
    "DataOptions",
    "SearchOptions",
    "TailorOptions",
    "TrainOptions",
    "auto_prune",
    "check_run_resume",
    "run_pipeline",
    "stage_settings",
    "train_teacher",
]
