"""Adapters: a task's own tensors beside one shared frozen backbone (HF PEFT's layout, in spirit).

    EXPORT_DIR/
      backbone.safetensors      frozen parameters of stem + every block, timm names, no classifier
      backbone.json             timm name, pretrained tag, sha256 of those tensors
      <task>/adapter.safetensors   proxies, attention logits, classifier, the task's BN statistics
      <task>/adapter_config.json   base model (name, tag, sha256), classes, input transform,
                                   surviving structure, metrics, sha256 of the adapter's tensors

Loading checks the backbone's sha256 against the adapter's record and refuses a
mismatch, an adapter file that is not the one its config was written with (an export
stopped between its two files, or a file replaced), a newer format, or a config with
missing/wrong-typed fields. Every task
loaded from one directory references the *same* backbone tensors in memory.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import timm
import torch
from torch import nn

from . import __version__
from .backbone import tensors_sha256
from .checkpoint import link_or_copy, read_json, read_safetensors, write_json, write_safetensors
from .counting import model_macs, network_params, student_macs, student_params
from .data import INPUT_NOTES
from .errors import ExportError, RunError, UsageError
from .frozen import STORE, has_store, read_store, shared_tensors, task_tensors
from .runs import check_writable, latest_student_stage, locate_teacher, lock_dir, read_run, read_summary, require_stage
from .student import Structure, Student

FORMAT_VERSION = 1
BACKBONE_FILE = "backbone.safetensors"
BACKBONE_CONFIG = "backbone.json"
ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")  # timm's names
CROP_MODES = ("center", "squash", "border")  # timm's eval crops

# field -> type(s) the adapter config must have
_CONFIG_FIELDS = {
    "format_version": int, "task": str, "base_model": dict, "classes": list, "input": dict,
    "structure": list, "max_skip": int, "num_classes": int, "metrics": dict,
}
_BASE_FIELDS = {"name": str, "architecture": str, "sha256": str}
_INPUT_FIELDS = {"img_size": int, "mean": list, "std": list, "interpolation": str, "crop_pct": (int, float)}


def run_backbone_tensors(run: Path, sha256: str) -> tuple[dict[str, torch.Tensor], Path | None]:
    """The frozen parameters of a run, checked against its ``sha256``, and the file that holds them as
    an export's shared backbone (``None`` for a run written before runs stored them once, whose
    tailored student holds them)."""
    from .loading import load_student

    if has_store(run):
        return read_store(run / STORE, sha256), run / STORE
    full, _ = load_student(require_stage(run, "tailor", "export"), torch.device("cpu"))
    return shared_tensors(full), None


def export_task(run: Path, out: Path, *, task_name: str | None = None, overwrite: bool = False,
                stage: str | None = None) -> dict:
    """Write ``run``'s latest student (or its ``stage``'s) as an adapter in ``out`` (creating or reusing the backbone).

    ``out`` has one writer at a time: a second export into it meanwhile is refused (exit 5).
    """
    with lock_dir(Path(out), what="export directory"):
        return _export_task(Path(run), Path(out), task_name=task_name, overwrite=overwrite, stage=stage)


def _export_task(run: Path, out: Path, *, task_name: str | None, overwrite: bool, stage: str | None) -> dict:
    from .loading import load_student

    run_meta = read_run(run)
    if stage in (None, "tailor", "prune", "finetune"):
        stage = stage and require_stage(run, stage, f"export --stage {stage}").name or latest_student_stage(run)
    elif stage == "teacher":
        raise UsageError("--stage teacher: an adapter holds a tailored student's own tensors (--stage tailor, prune "
                         "or finetune); the teacher is a whole network: export it with --format onnx")
    else:
        raise UsageError(f"--stage must be tailor, prune or finetune (or teacher with --format onnx), got '{stage}'")
    task = task_name or run_meta.get("task_name") or run.name
    ident = run_meta["backbone"]
    check_export_target(out, ident, task)
    student, _ = load_student(run / stage, torch.device("cpu"))
    shared, store = run_backbone_tensors(run, ident["sha256"])
    sha = tensors_sha256(shared) if store is None else ident["sha256"]  # a store was checked as it was read
    if sha != ident["sha256"]:
        raise ExportError(f"the backbone tensors of '{run}' do not match its recorded sha256; the run is corrupt")

    linked = False
    repaired = False
    if (out / BACKBONE_CONFIG).exists():
        if not (out / BACKBONE_FILE).is_file():
            raise ExportError(f"'{out}' has {BACKBONE_CONFIG} but no {BACKBONE_FILE}; remove the directory and export again")
        try:  # the file every task there loads: it must still be the backbone its config names (the same as ours)
            read_store(out / BACKBONE_FILE, sha)
        except (RunError, ExportError):  # truncated or modified: put back the run's copy, tensor for tensor the same
            repaired = True
            _write_backbone(out / BACKBONE_FILE, store, shared, sha, ident["architecture"])
        reused = True
    else:
        linked = _write_backbone(out / BACKBONE_FILE, store, shared, sha, ident["architecture"])
        write_json(out / BACKBONE_CONFIG, {"format_version": FORMAT_VERSION, "name": ident["name"],
                                           "architecture": ident["architecture"], "pretrained_tag": ident.get("pretrained_tag"),
                                           "weights_source": ident.get("weights_source"), "sha256": sha,
                                           "num_tensors": len(shared), "num_params": sum(t.numel() for t in shared.values())})
        reused = False

    task_dir = out / task
    if (task_dir / ADAPTER_CONFIG).exists() and not overwrite:
        raise ExportError(f"task '{task}' already exists in '{out}'; pass --overwrite or --task-name NAME")
    data = run_meta["data"]
    adapter = task_tensors(student)
    summary = read_summary(run, stage)
    teacher = _teacher_summary(run, run_meta)
    img_size = int(data["img_size"])
    full_model = timm.create_model(ident["architecture"], pretrained=False, num_classes=len(run_meta["classes"]))
    config = {
        "format_version": FORMAT_VERSION,
        "task": task,
        "nettailor": __version__,
        "base_model": {k: ident.get(k) for k in ("name", "architecture", "pretrained_tag", "weights_source", "sha256")},
        "classes": list(run_meta["classes"]),
        "num_classes": len(run_meta["classes"]),
        "input": {"img_size": img_size, "mean": data["mean"], "std": data["std"],
                  "interpolation": data["interpolation"], "crop_pct": data["crop_pct"],
                  "crop_mode": data.get("crop_mode", "center"),
                  **({"expects": INPUT_NOTES[data.get("layout")]} if data.get("layout") in INPUT_NOTES else {})},
        "max_skip": student.max_skip,
        "train_bn": student.train_bn,  # its universal BatchNorms' scale and shift are the adapter's own
        "structure": student.structure.to_json(),
        "adapter_sha256": tensors_sha256(adapter),  # the pair of files belongs together: checked on loading
        "stage": stage,
        "run_id": run_id(run),  # the run it came from (no path in the file): `run --resume` re-exports its own only
        "metrics": {
            "val_acc": summary.get("val_acc"), "teacher_val_acc": teacher.get("val_acc"),
            "test_acc": summary.get("test_acc"), "teacher_test_acc": teacher.get("test_acc"),
            "split_sizes": summary.get("split_sizes"),
            "params": student_params(student), "macs": student_macs(student, img_size).total,
            "full_params": network_params(full_model), "full_macs": model_macs(full_model, img_size),
        },
    }
    write_safetensors(task_dir / ADAPTER_FILE, adapter, {"task": task, "format_version": FORMAT_VERSION})
    write_json(task_dir / ADAPTER_CONFIG, config)
    return {"export_dir": str(out), "task": task, "stage": stage, "backbone_reused": reused, "backbone_linked": linked,
            "backbone_repaired": repaired,
            "adapter_bytes": (task_dir / ADAPTER_FILE).stat().st_size,
            "backbone_bytes": (out / BACKBONE_FILE).stat().st_size, "sha256": sha,
            "finetune_bytes": 4 * network_params(full_model)}  # one fp32 fine-tuned network, for comparison


def _write_backbone(path: Path, store: Path | None, shared: dict[str, torch.Tensor], sha: str,
                    architecture: str) -> bool:
    """Write an export's shared backbone (replacing it atomically); returns whether it is a hard link.

    The run's own copy (``store``) is an export's shared backbone as it is: linked where the file
    system allows; a run from before runs stored it writes its tensors.
    """
    if store is not None:
        return link_or_copy(store, path)
    write_safetensors(path, shared, {"sha256": sha, "architecture": architecture})
    return False


def run_id(run: Path) -> str:
    """A run's identity in the adapters it exports: a digest of its absolute path (an export names no path)."""
    return hashlib.sha256(str(Path(run).resolve()).encode()).hexdigest()[:16]


def check_export_target(out: Path, backbone: dict, task: str | None = None) -> None:
    """Refuse an export into ``out`` that would fail, before any work: ``out`` a file or not writable,
    an invalid task name, another backbone there.

    ``backbone``: the run's identity (``run.json`` "backbone"); given only its ``architecture`` (known
    before the weights are loaded), other weights of the same architecture are not caught yet.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--export-dir '{out}' is a file; pass a directory")
    check_writable(out, flag="--export-dir")
    if task is not None and not TASK_NAME.match(task):
        raise ExportError(f"task name '{task}' is not valid; use letters, digits, '_', '-', '.' (pass --task-name)")
    if task is not None and (task in (BACKBONE_FILE, BACKBONE_CONFIG) or (out / task).is_file()):
        raise ExportError(f"task name '{task}' is a file of the export directory '{out}'; pass another --task-name")
    config_path = out / BACKBONE_CONFIG
    if not config_path.exists():
        return
    existing = read_backbone_config(config_path)
    other_weights = "sha256" in backbone and existing["sha256"] != backbone["sha256"]
    if existing["architecture"] == backbone["architecture"] and not other_weights:
        return
    hint = ""
    if existing.get("weights_source") == backbone.get("weights_source") == "random-init":
        hint = " (both are --no-pretrained backbones, initialised from --seed: tailor with the same --seed)"
    ours = f"{backbone.get('name', backbone['architecture'])}" + (f", sha256 {backbone['sha256'][:12]}" if "sha256" in backbone else "")
    raise ExportError(
        f"'{out}' holds another backbone ({existing.get('name', existing['architecture'])}, sha256 "
        f"{existing['sha256'][:12]}); this task is tailored on {ours}{hint}. Export it to another directory"
    )


def _teacher_summary(run: Path, run_meta: dict) -> dict:
    teacher = locate_teacher(run, run_meta)
    try:
        return read_json(teacher / "summary.json", what="teacher summary")
    except RunError:
        return {}


def read_backbone_config(path: Path) -> dict:
    """An export directory's ``backbone.json``: its backbone's identity (exit 8 when it is not one)."""
    try:
        config = read_json(path, what="backbone config")
    except RunError as err:
        raise ExportError(f"{err}; it is the export directory's backbone config: export its tasks again into a new "
                          "directory") from err
    if not isinstance(config, dict):
        raise ExportError(f"'{path}' is not a backbone config (a JSON object); export its tasks again into a new "
                          "directory")
    return _validate(config, {"sha256": str, "architecture": str}, path)


def _validate(obj: dict, fields: dict, where: Path | str) -> dict:
    for key, typ in fields.items():
        if key not in obj:
            raise ExportError(f"'{where}' lacks the field '{key}'; re-export the task")
        if not isinstance(obj[key], typ) or (typ is int and isinstance(obj[key], bool)):
            raise ExportError(f"'{where}': field '{key}' has the wrong type ({type(obj[key]).__name__}); re-export the task")
    return obj


def read_adapter_config(task_dir: Path) -> dict:
    path = Path(task_dir) / ADAPTER_CONFIG
    try:
        config = read_json(path, what="adapter config")
    except RunError as err:
        raise ExportError(str(err)) from err
    _validate(config, _CONFIG_FIELDS, path)
    if config["format_version"] > FORMAT_VERSION:
        raise ExportError(
            f"'{path}' was written by a newer nettailor (format {config['format_version']} > {FORMAT_VERSION}); upgrade nettailor"
        )
    _validate(config["base_model"], _BASE_FIELDS, f"{path} (base_model)")
    _validate(config["input"], _INPUT_FIELDS, f"{path} (input)")
    if len(config["classes"]) != config["num_classes"]:
        raise ExportError(f"'{path}': {len(config['classes'])} class names for num_classes={config['num_classes']}")
    if not isinstance(config.get("train_bn", False), bool):  # absent before --train-bn existed: False
        raise ExportError(f"'{path}': train_bn must be true or false; re-export")
    spec, problems = config["input"], []
    if spec["img_size"] <= 0:
        problems.append(f"img_size {spec['img_size']}")
    for key in ("mean", "std"):
        values = spec[key]
        if len(values) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) \
                or (key == "std" and min(values) <= 0):
            problems.append(f"{key} {values}")
    if spec["interpolation"] not in INTERPOLATIONS:
        problems.append(f"interpolation '{spec['interpolation']}'")
    if spec.get("crop_mode", "center") not in CROP_MODES:
        problems.append(f"crop_mode '{spec.get('crop_mode')}'")
    if problems:
        raise ExportError(f"'{path}': the input it describes is not one a network reads ({'; '.join(problems)}); "
                          "re-export the task")
    return config


def _not_an_export(path: Path) -> str:
    """Why ``path`` is no export directory, pointing at the export when it is a run directory."""
    if not path.exists():
        return f"export directory '{path}' does not exist; pass the --export-dir an export or `nettailor run` wrote"
    if (path / "run.json").is_file():
        if (path / "export" / BACKBONE_FILE).is_file():
            return f"'{path}' is a run directory; its export is {path / 'export'}: pass that"
        return (f"'{path}' is a run directory with no export in it; `nettailor export {path} --export-dir DIR` "
                "makes one (`nettailor run` writes RUN/export)")
    return f"'{path}' holds no {BACKBONE_FILE}; is it an export directory?"


def list_tasks(export_dir: Path) -> list[str]:
    export_dir = Path(export_dir)
    return sorted(p.name for p in export_dir.iterdir() if (p / ADAPTER_CONFIG).is_file()) if export_dir.is_dir() else []


class SharedBackbone:
    """The shared frozen tensors of an export directory, loaded and verified once."""

    def __init__(self, export_dir: Path, device: torch.device | str = "cpu"):
        export_dir = Path(export_dir)
        if not (export_dir / BACKBONE_FILE).is_file():
            raise ExportError(_not_an_export(export_dir))
        try:
            config = read_json(export_dir / BACKBONE_CONFIG, what="backbone config")
            tensors, _ = read_safetensors(export_dir / BACKBONE_FILE, what="shared backbone")
        except RunError as err:
            raise ExportError(str(err)) from err
        _validate(config, {"sha256": str, "architecture": str}, export_dir / BACKBONE_CONFIG)
        sha = tensors_sha256(tensors)
        if sha != config["sha256"]:
            raise ExportError(
                f"shared backbone '{export_dir / BACKBONE_FILE}' has sha256 {sha[:12]} but backbone.json records "
                f"{config['sha256'][:12]}; the file was modified or damaged, re-export"
            )
        self.config, self.sha256 = config, sha
        self.device = torch.device(device)
        self.params = {k: nn.Parameter(v.to(self.device), requires_grad=False) for k, v in tensors.items()}

    @property
    def num_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.params.values())


def load_task(export_dir: Path, task: str, *, backbone: SharedBackbone | None = None,
              device: torch.device | str = "cpu") -> tuple[Student, dict]:
    """Build one task's tailored network on the shared backbone (eval mode).

    The student's frozen parameters *are* the backbone's tensors (no copy).
    """
    export_dir = Path(export_dir)
    task_dir = export_dir / task
    if not (task_dir / ADAPTER_CONFIG).is_file():
        raise ExportError(f"no task '{task}' in '{export_dir}' (tasks: {', '.join(list_tasks(export_dir)) or 'none'})")
    config = read_adapter_config(task_dir)
    backbone = backbone or SharedBackbone(export_dir, device)
    recorded = config["base_model"]["sha256"]
    if recorded != backbone.sha256:
        raise ExportError(
            f"adapter '{task}' was tailored on backbone sha256 {recorded[:12]} "
            f"but '{export_dir / BACKBONE_FILE}' has sha256 {backbone.sha256[:12]}; use the matching backbone"
        )
    try:
        tensors, _ = read_safetensors(task_dir / ADAPTER_FILE, what="adapter")
    except RunError as err:
        raise ExportError(str(err)) from err
    try:  # a config edited or damaged by hand may name no timm model, or paths the network does not have
        skeleton = timm.create_model(config["base_model"]["architecture"], pretrained=False, num_classes=0)
        student = Student(skeleton, config["num_classes"], max_skip=config["max_skip"],
                          train_bn=bool(config.get("train_bn", False)),
                          structure=Structure.from_json(config["structure"]))
    except (RunError, RuntimeError, ValueError, KeyError, IndexError, TypeError, AttributeError) as err:
        raise ExportError(f"'{task_dir / ADAPTER_CONFIG}' does not describe a network nettailor can build on "
                          f"{config['base_model']['architecture']} ({type(err).__name__}: {err}); re-export the task") from err
    del skeleton
    # Task-specific tensors first (strict on the keys the adapter must provide) ...
    shared_keys = {k for k, _ in student.named_parameters() if student.timm_name(k) is not None}
    expected = set(student.state_dict()) - shared_keys
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ExportError(
            f"adapter '{task}' does not match its structure ({len(missing)} missing, {len(extra)} unexpected tensors"
            f"{', e.g. ' + (missing or extra)[0] if missing or extra else ''}); re-export"
        )
    try:
        student.load_state_dict(tensors, strict=False)
    except RuntimeError as err:  # shapes: e.g. an adapter whose proxies another nettailor version sized
        raise ExportError(f"adapter '{task}' does not fit its structure ({str(err).splitlines()[-1].strip()[:160]}); "
                          "re-export it with this nettailor from its run") from err
    recorded, got = config.get("adapter_sha256"), tensors_sha256(tensors)  # absent in exports made before it was
    if recorded is not None and got != recorded:
        raise ExportError(f"'{task_dir / ADAPTER_FILE}' is not the adapter its {ADAPTER_CONFIG} was written with "
                          f"(sha256 {got[:12]}, recorded {str(recorded)[:12]}): an export stopped between its two "
                          "files, or a file was replaced; re-export the task")
    student.to(backbone.device).eval()
    # ... then the shared parameters, by reference.
    for key in shared_keys:
        name = student.timm_name(key)
        if name not in backbone.params:
            raise ExportError(f"shared backbone lacks '{name}' needed by task '{task}'")
        module_path, attr = key.rsplit(".", 1)
        module = student.get_submodule(module_path)
        if module._parameters[attr].shape != backbone.params[name].shape:
            raise ExportError(f"shared backbone tensor '{name}' has the wrong shape for task '{task}'")
        module._parameters[attr] = backbone.params[name]
    return student, config


def load_export(export_dir: Path, tasks: list[str] | None = None, *, device: torch.device | str = "cpu"
                ) -> tuple[SharedBackbone, dict[str, tuple[Student, dict]]]:
    """Load the shared backbone once and every (or the named) task on it.

    >>> backbone, tasks = load_export("exports/")
    >>> model, config = tasks["gtsrb"]; logits = model(images)
    """
    backbone = SharedBackbone(export_dir, device)
    names = list(dict.fromkeys(tasks)) if tasks else list_tasks(export_dir)  # a task named twice is loaded once
    if not names:
        raise ExportError(f"'{export_dir}' holds no exported task")
    return backbone, {name: load_task(export_dir, name, backbone=backbone) for name in names}
