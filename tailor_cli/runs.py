"""Run directories: one per task, one subdirectory per stage.

    RUN/
      run.json            backbone identity, data settings, classes, teacher location
      frozen/             the frozen backbone and its pretrained BN statistics, stored once (tailor_cli.frozen)
      split.json          the validation split when we made it (flat folders, GTSRB, digits)
      teacher/            (when the teacher was trained in this run)
      tailor/  prune/  finetune/
        config.json       the resolved configuration of the stage
        metrics.jsonl     one line per epoch
        checkpoint.safetensors   model + optimiser state, written atomically each epoch
        model.safetensors the stage's final weights (the stage is done when it exists)
        summary.json      final metrics, params, MACs

Every write is atomic (temporary name + rename), so a killed process never leaves
half a file. One process at a time writes a run (or export) directory: it holds an
exclusive lock on ``.nettailor.lock`` inside it (see :func:`lock_dir`).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no locking
    fcntl = None  # type: ignore[assignment]

from .checkpoint import read_json, write_json
from .errors import RunError

RUN_FORMAT = 2  # 2: the frozen backbone stored once (frozen/), student files without it
STAGES = ("teacher", "tailor", "prune", "finetune")
# What an --overwrite of a stage discards: the stages built on it, and the K search ("search/") made from a tailored
# student. Pruning again by hand discards the search too (`prune`); the search's own pruning keeps it.
DOWNSTREAM = {"teacher": ("tailor", "prune", "finetune", "search"), "tailor": ("prune", "finetune", "search"),
              "prune": ("finetune",), "finetune": ()}
MODEL = "model.safetensors"
SUMMARY = "summary.json"
CONFIG = "config.json"
CHECKPOINT = "checkpoint.safetensors"  # model + optimiser state, written each epoch by train.fit
LOCK = ".nettailor.lock"  # held (flock) by the one process writing the directory; removed when it is done


def stage_done(run: Path, stage: str) -> bool:
    return (run / stage / MODEL).is_file() and (run / stage / SUMMARY).is_file()


def check_writable(path: Path, flag: str = "--output") -> None:
    """Fail before any work if ``path`` (or its nearest existing parent) cannot be written (``flag`` names it)."""
    probe = Path(path)
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise RunError(f"output path '{path}' is inside a file ('{probe}'); choose another {flag}")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".nettailor-write-test.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise RunError(f"output directory '{path}' is not writable ({err.strerror}); choose another {flag}") from err


def prepare_stage(run: Path, stage: str, *, resume: bool, overwrite: bool, settings: dict | None = None) -> bool:
    """Decide what to do with ``run/stage``. Returns True when the stage is already complete.

    Never overwrites silently: an existing stage needs ``--resume`` or ``--overwrite``.
    ``--overwrite`` also removes the stages built on this one. A stage that stopped before
    its first checkpoint holds nothing to resume and simply starts again. ``settings`` (what
    the stage's result depends on, see :func:`check_settings`) must equal the recorded ones
    to resume or reuse a stage. Under torchrun every rank decides before rank 0 writes anything.
    """
    from .distributed import barrier, is_main

    try:
        return _prepare_stage(run, stage, resume=resume, overwrite=overwrite, settings=settings, main=is_main())
    finally:
        barrier()


def _prepare_stage(run: Path, stage: str, *, resume: bool, overwrite: bool, settings: dict | None,
                   main: bool) -> bool:
    stage_dir = run / stage
    if overwrite:
        if main:
            for name in (stage,) + DOWNSTREAM[stage]:
                shutil.rmtree(run / name, ignore_errors=True)
        return False
    if not stage_dir.exists():
        return False
    if stage_done(run, stage):
        if resume:
            check_settings(run, stage, settings, done=True)
            return True
        raise RunError(
            f"stage '{stage}' is already done in '{run}'; pass --resume to keep it, --overwrite to redo it, "
            "or choose another --output"
        )
    if not (stage_dir / CHECKPOINT).is_file():  # stopped before its first epoch ended: nothing to keep
        if main:
            shutil.rmtree(stage_dir, ignore_errors=True)
        return False
    if resume:
        check_settings(run, stage, settings, done=False)
        return False
    raise RunError(
        f"'{stage_dir}' holds an unfinished '{stage}' stage; pass --resume to continue it or --overwrite to restart"
    )


# Settings recorded from some version on, and what a stage written before then did. A tailor stage
# from before the attention's slow start (session 18) trained without it: resuming it with the slow
# start would change its recipe halfway.
SETTINGS_BEFORE_RECORDED: dict[str, object] = {"attention_slow_epochs": 0}


def check_settings(run: Path, stage: str, settings: dict | None, *, done: bool,
                   redo: str = "pass --overwrite to redo it") -> None:
    """Refuse to resume or reuse ``run/stage`` with settings other than those it was made with.

    ``settings`` maps option names to values; ``None`` means "not given" (inherited from the run)
    and matches anything. Stages written without recorded settings are not checked. A setting a
    stage predates (its record lacks the key) counts as the value the tool had then
    (:data:`SETTINGS_BEFORE_RECORDED`), or is not checked when that value is not known.
    """
    path = run / stage / CONFIG
    if settings is None or not path.is_file():
        return
    old = read_json(path, what=f"{stage} config").get("settings")
    if not isinstance(old, dict):
        return
    new = json.loads(json.dumps(settings, default=str))
    old = {**{k: v for k, v in SETTINGS_BEFORE_RECORDED.items() if k in new}, **old}
    diffs = [f"{key} {old[key]!r} -> {value!r}" for key, value in new.items()
             if value is not None and key in old and old[key] != value
             and not (key == "weights" and _same_package_file(old[key], value))]
    if diffs:
        from .errors import UsageError

        raise UsageError(
            f"stage '{stage}' in '{run}' was {'trained' if done else 'started'} with other settings "
            f"({'; '.join(diffs)}); rerun with its settings to {'reuse' if done else 'resume'} it, "
            f"{redo}, or choose another --output"
        )


def _same_package_file(old: object, new: object) -> bool:
    """Two recorded ``--weights`` paths to the same file of an installed package (``pkg:NAME``) in two
    environments: the same path after ``site-packages/``. (The backbone's sha256 is checked anyway.)"""
    marker = "site-packages/"
    if not (isinstance(old, str) and isinstance(new, str) and marker in old and marker in new):
        return False
    return old.rsplit(marker, 1)[1] == new.rsplit(marker, 1)[1]


def reset_run(run: Path) -> None:
    """Remove everything nettailor wrote in a run directory (``run --overwrite``); nothing else."""
    from .distributed import barrier, is_main

    if (run / "run.json").is_file():
        read_run(run)  # refuses a directory whose run.json nettailor did not write: nothing is removed
    if is_main() and (run / "run.json").is_file():
        for name in STAGES + ("search", "export", "frozen"):
            shutil.rmtree(run / name, ignore_errors=True)
        for name in ("split.json", "run.json"):
            (run / name).unlink(missing_ok=True)
    barrier()


def read_run(run: Path) -> dict:
    run = Path(run)
    if not run.is_dir():
        raise RunError(f"run directory '{run}' does not exist")
    meta = read_json(run / "run.json", what="run config")
    for key in ("format", "backbone", "data", "classes"):
        if key not in meta:
            raise RunError(f"run config '{run / 'run.json'}' lacks '{key}'; it was not written by nettailor")
    if int(meta["format"]) > RUN_FORMAT:
        raise RunError(f"run '{run}' was written by a newer nettailor (format {meta['format']}); upgrade")
    return meta


def write_run(run: Path, meta: dict) -> None:
    from .distributed import barrier

    write_json(run / "run.json", {"format": RUN_FORMAT, **meta})
    barrier()


def require_stage(run: Path, stage: str, command: str) -> Path:
    """The directory of a finished stage, or a one-line error that says what to run first."""
    if not stage_done(run, stage):
        done = [s for s in STAGES if stage_done(run, s)]
        hint = {"teacher": "nettailor teacher", "tailor": "nettailor tailor", "prune": "nettailor prune"}[stage]
        raise RunError(
            f"`nettailor {command}` needs a finished '{stage}' stage in '{run}' "
            f"(found: {', '.join(done) or 'none'}); run `{hint}` first"
        )
    return run / stage


def latest_student_stage(run: Path) -> str:
    for stage in ("finetune", "prune", "tailor"):
        if stage_done(run, stage):
            return stage
    done = [s for s in STAGES if stage_done(run, s)]
    raise RunError(
        f"'{run}' holds no tailored student (found: {', '.join(done) or 'none'}); run `nettailor tailor` first"
    )


def read_summary(run: Path, stage: str) -> dict:
    return read_json(run / stage / SUMMARY, what=f"{stage} summary")


def write_summary(run: Path, stage: str, summary: dict) -> None:
    write_json(run / stage / SUMMARY, summary)


def locate_teacher(run: Path, meta: dict) -> Path:
    """Where a run's teacher lives: ``RUN/teacher`` (stored relative, so the run can move) or an
    external teacher run (stored absolute)."""
    path = Path(meta.get("teacher") or "teacher")
    return path if path.is_absolute() else Path(run) / path


# --------------------------------------------------------------------------- one writer per directory
_HELD: dict[str, tuple[int, list[Path]]] = {}  # realpath -> (fd, directories the lock created, deepest first)


@contextlib.contextmanager
def lock_dir(path: Path, *, create: bool = True, what: str = "run directory"):
    """Hold ``path`` for this process alone while the block runs (a second writer gets :class:`RunError`, exit 5).

    The lock is an exclusive ``flock`` on ``path/.nettailor.lock``; the OS drops it when its
    process dies, so a lock file left by a killed process blocks nothing. Re-entrant within a
    process (``nettailor run`` holds its run across the stages, which lock it again). Under
    torchrun rank 0 alone locks. ``create``: make ``path`` (and missing parents) to hold the
    lock, and remove what was made if it is left empty; otherwise a missing ``path`` is not
    locked (the caller reports it). Where no lock can be taken (a file in the way, no write
    permission, no ``flock``), the block runs unlocked and the caller's own checks speak.
    """
    from .distributed import is_main

    path = Path(path)
    key = os.path.realpath(path)
    if key in _HELD:  # already ours: the outermost holder releases it
        yield
        return
    held = _acquire(path, create=create, what=what) if is_main() and fcntl is not None else None
    if held is None:
        yield
        return
    _HELD[key] = held
    try:
        yield
    finally:
        del _HELD[key]
        _release(path, *held)


def lock_created(path: Path) -> bool:
    """Whether this process's lock on ``path`` created the directory (it did not exist before the stage)."""
    held = _HELD.get(os.path.realpath(path))
    return bool(held and held[1])


def _acquire(path: Path, *, create: bool, what: str) -> tuple[int, list[Path]] | None:
    """Lock ``path/LOCK``: (file descriptor, directories created for it), or None where it cannot be locked."""
    made = [p for p in [path, *path.parents] if not p.exists()] if create else []
    if any(p.exists() and not p.is_dir() for p in [path, *path.parents]) or not (path.is_dir() or made):
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = _lock_file(path / LOCK)
    except OSError:
        _remove_empty(made)
        return None
    if fd is None:
        holder = _holder(path / LOCK)
        _remove_empty(made)
        raise RunError(f"{what} '{path}' is in use by another nettailor process{holder}; wait for it to finish, "
                       "or choose another directory")
    return fd, made


def _lock_file(lock: Path) -> int | None:
    """A descriptor holding an exclusive flock on ``lock`` (made if missing, our pid written in it),
    or None while another process holds it."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _same_file(fd, lock):  # not unlinked by its last holder between our open and our flock
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return fd
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _holder(lock: Path) -> str:
    """`` (pid N)`` from a lock file, or "" when it cannot be read."""
    try:
        pid = lock.read_text().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _release(path: Path, fd: int, made: list[Path]) -> None:
    """Remove the lock file (if it is still ours) while holding it, unlock, and remove the directories made empty."""
    try:
        if _same_file(fd, path / LOCK):
            (path / LOCK).unlink(missing_ok=True)
    finally:
        os.close(fd)
    _remove_empty(made)


def _remove_empty(dirs: list[Path]) -> None:
    """Remove ``dirs`` (deepest first) while they are empty."""
    for d in dirs:
        try:
            d.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            break
