"""The block-usage report: what each task kept, and what it costs (data only; the CLI renders it)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .adapter import ADAPTER_CONFIG, BACKBONE_FILE, load_export
from .checkpoint import read_json
from .counting import full_network, student_macs, student_params
from .errors import RunError, UsageError
from .runs import latest_student_stage, locate_teacher, read_run, read_summary
from .student import Student

# What became of each layer's universal block (the report's "universal block" column; README.md, "Reading the report").
LAYER_STATUS = {
    "kept": "the pretrained block runs",
    "dropped": "the block is removed and the layer's proxies stand in",
    "skipped": "the block and the layer's proxies are removed, a longer proxy jumps over the layer",
}


def layer_status(block_kept: bool, has_proxies: bool) -> str:
    return "kept" if block_kept else ("dropped" if has_proxies else "skipped")


def student_report(student: Student, *, task: str, architecture: str, img_size: int, accuracy: dict,
                   stage: str, adapter_bytes: int | None = None) -> dict:
    """Per layer: block kept?, its alpha, kept proxies with alphas, params and MACs; plus totals.

    ``accuracy``: ``{"val": ..., "test": ..., "teacher_val": ..., "teacher_test": ...}`` in %
    (``None`` where not measured: a pruned, not yet fine-tuned network; data without a test split).
    """
    cost = student_macs(student, img_size)
    alphas = student.attention()
    layers: list[dict[str, Any]] = []
    for i, (layer, spec, info) in enumerate(zip(student.layers, student.structure.layers, student.infos)):
        a = alphas[i].tolist() if alphas[i] is not None else []
        keys = spec.path_keys()
        layers.append({
            "layer": i + 1,
            "block": f"{info.stage}.{info.index}",
            "timm_module": info.name,
            "block_type": info.block_type,
            "block_kept": spec.block,
            "status": layer_status(spec.block, bool(spec.proxies)),
            "block_alpha": a[0] if spec.block else None,
            "proxies": [{"from_node": s, "skip": i + 1 - s, "alpha": a[keys.index(f"proxy{s}")],
                         "form": layer.proxies[str(s)].form.describe()} for s in spec.proxies],
            "params": sum(p.numel() for p in layer.parameters()),
            "macs": cost.layer(i),
        })
    full = full_network(architecture, student.num_classes, img_size)
    params = student_params(student)
    return {
        "task": task,
        "stage": stage,
        "backbone": architecture,
        "img_size": img_size,
        "train_bn": student.train_bn,  # the blocks' BatchNorm scale and shift are the task's own
        "layers": layers,
        "totals": {
            "blocks_kept": sum(l["block_kept"] for l in layers), "blocks_total": len(layers),
            "proxies_kept": sum(len(l["proxies"]) for l in layers),
            "params_shared": params["shared"], "params_task": params["task_specific"],
            "params_total": params["total"], "params_full": full["params"],
            "macs": cost.total, "macs_full": full["macs"], "macs_fraction": cost.total / full["macs"],
            "adapter_bytes": adapter_bytes,
        },
        "accuracy": {key: accuracy.get(key) for key in ("val", "test", "teacher_val", "teacher_test")},
        "split_sizes": accuracy.get("split_sizes"),
    }


def report_run(run: Path) -> dict:
    """Report of a run directory's latest student stage."""
    from .loading import load_student

    run = Path(run)
    meta = read_run(run)
    stage = latest_student_stage(run)
    student, _ = load_student(run / stage, torch.device("cpu"))
    summary = read_summary(run, stage)
    teacher = locate_teacher(run, meta)
    t_summary = read_json(teacher / "summary.json") if (teacher / "summary.json").is_file() else {}
    trained = stage != "prune"  # a pruned network is not evaluated before it is fine-tuned
    accuracy = {"val": summary.get("val_acc") if trained else None, "test": summary.get("test_acc") if trained else None,
                "teacher_val": t_summary.get("val_acc"), "teacher_test": t_summary.get("test_acc"),
                "split_sizes": summary.get("split_sizes") or t_summary.get("split_sizes")}
    report = student_report(student, task=meta.get("task_name", run.name), architecture=meta["backbone"]["architecture"],
                            img_size=int(meta["data"]["img_size"]), accuracy=accuracy, stage=stage)
    report["run"] = str(run)
    if (run / "search" / "frontier.json").is_file():
        report["search"] = read_json(run / "search" / "frontier.json", what="search frontier")
    return {"kind": "run", "tasks": [report], "matrix": _matrix([report])}


def report_export(export_dir: Path, tasks: list[str] | None = None) -> dict:
    """Cross-task report of an export directory (every task, or the named ones): per-task reports,
    block-usage matrix, totals over the tasks reported."""
    export_dir = Path(export_dir)
    backbone, loaded = load_export(export_dir, tasks)
    reports = []
    for name, (student, config) in loaded.items():
        m = config["metrics"]
        reports.append(student_report(
            student, task=name, architecture=config["base_model"]["architecture"],
            img_size=config["input"]["img_size"],
            accuracy={"val": m.get("val_acc"), "test": m.get("test_acc"), "teacher_val": m.get("teacher_val_acc"),
                      "teacher_test": m.get("teacher_test_acc"), "split_sizes": m.get("split_sizes")},
            stage=config.get("stage", "?"), adapter_bytes=(export_dir / name / "adapter.safetensors").stat().st_size,
        ))
    backbone_bytes = (export_dir / BACKBONE_FILE).stat().st_size
    adapters = sum(r["totals"]["adapter_bytes"] for r in reports)
    full_bytes = 4 * sum(r["totals"]["params_full"] for r in reports)  # one fp32 network per task
    totals = {
        "tasks": len(reports),
        "backbone_bytes": backbone_bytes, "adapter_bytes": adapters, "disk_bytes": backbone_bytes + adapters,
        "finetune_bytes": full_bytes,
        "params": backbone.config.get("num_params", 0) + sum(r["totals"]["params_task"] for r in reports),
        "finetune_params": sum(r["totals"]["params_full"] for r in reports),
    }
    return {"kind": "export", "export_dir": str(export_dir), "backbone": backbone.config, "tasks": reports,
            "matrix": _matrix(reports), "totals": totals}


def _matrix(reports: list[dict]) -> dict:
    """Rows: universal blocks (stage.block); columns: tasks; cell: block kept and proxies entering."""
    if not reports:
        return {"blocks": [], "tasks": [], "cells": []}
    blocks = [l["block"] for l in reports[0]["layers"]]
    cells = [[{"block": r["layers"][i]["block_kept"], "proxies": len(r["layers"][i]["proxies"])} for r in reports]
             for i in range(len(blocks))]
    return {"blocks": blocks, "tasks": [r["task"] for r in reports], "cells": cells}


def report_path(path: Path, tasks: list[str] | None = None) -> dict:
    """Report of a run directory, an export directory (every task, or `tasks`), or one task's
    directory inside an export (that task alone)."""
    path = Path(path)
    if (path / ADAPTER_CONFIG).is_file():  # a single task directory inside an export
        path = path.resolve()  # `report .` from inside it: its name is the task's
        if tasks and set(tasks) != {path.name}:
            raise UsageError(f"'{path}' is the task '{path.name}'; pass its export directory to choose other tasks")
        return report_export(path.parent, [path.name])
    if (path / BACKBONE_FILE).is_file():
        return report_export(path, tasks)
    if tasks:
        raise UsageError("--task applies to an export directory; a run directory holds one task")
    if (path / "run.json").is_file():
        return report_run(path)
    if not path.exists():
        raise RunError(f"'{path}' does not exist")
    raise RunError(f"'{path}' is neither a run directory (run.json) nor an export directory ({BACKBONE_FILE})")
