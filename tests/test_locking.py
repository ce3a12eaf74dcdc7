"""One writer per run (or export) directory: a second one is refused with exit 5 and writes nothing."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST
from typer.testing import CliRunner

from tailor_cli.cli import app

LOCK = ".nettailor.lock"
_BS = FAST.index("--batch-size")
RUN_FAST = FAST[:_BS] + FAST[_BS + 2:]  # `run` takes no --batch-size
HOLD = ("import fcntl, os, sys, time\n"  # what a writer does: flock the lock file and write its pid in it
        "for d in sys.argv[1:]:\n"
        "    os.makedirs(d, exist_ok=True)\n"
        "    fd = os.open(os.path.join(d, '.nettailor.lock'), os.O_RDWR | os.O_CREAT)\n"
        "    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "    os.write(fd, str(os.getpid()).encode())\n"
        "print('locked', flush=True)\n"
        "time.sleep(600)\n")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    return env


def _hold(*dirs: Path) -> subprocess.Popen:
    """Another process writing ``dirs``: it holds their locks until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, *map(str, dirs)], stdout=subprocess.PIPE, text=True,
                            env=_env())
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_a_second_writer_is_refused_and_a_dead_writers_lock_blocks_nothing(tmp_path, folder_data, tailored_run):
    run, export = tmp_path / "run", tmp_path / "export"
    holder = _hold(run, export)
    try:
        before = _tree(tmp_path)
        assert (run / LOCK).read_text().strip() == str(holder.pid)
        for args in (["teacher", "--data", folder_data, "--output", run, "--epochs", "1", *FAST],
                     ["teacher", "--data", folder_data, "--output", run, "--epochs", "1", "--overwrite", *FAST],
                     ["run", "--data", folder_data, "--output", run, "--epochs", "1", *RUN_FAST],
                     ["export", tailored_run, "--export-dir", export]):
            res = _invoke(*args)
            assert res.exit_code == 5, (args[0], res.output)
            lines = res.output.strip().splitlines()
            assert len(lines) == 1 and f"is in use by another nettailor process (pid {holder.pid})" in lines[0]
            assert _tree(tmp_path) == before  # nothing written, nothing removed
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run / LOCK).is_file()  # left behind by the killed writer: the OS released its lock
    res = _invoke("teacher", "--data", folder_data, "--output", run, "--epochs", "1", *FAST)
    assert res.exit_code == 0, res.output
    assert (run / "teacher" / "model.safetensors").is_file() and not (run / LOCK).exists()


def test_run_holds_the_lock_across_its_stages_and_a_failed_new_run_leaves_nothing(tmp_path, folder_data, monkeypatch):
    import tailor_cli.stages.run as run_module  # where `run` finds its stages
    from tailor_cli.errors import DataError

    run = tmp_path / "runs" / "r"
    seen = []

    def tailor(run_dir, *args, **kwargs):  # the first stage `run` calls
        seen.append((run_dir / LOCK).read_text().strip())
        raise DataError("stop here")

    monkeypatch.setattr(run_module, "tailor", tailor)
    res = _invoke("run", "--data", folder_data, "--output", run, "--epochs", "1", *RUN_FAST)
    assert res.exit_code == 3, res.output
    assert seen == [str(os.getpid())]
    assert not (tmp_path / "runs").exists()  # the directories made for the lock are gone again


def test_lock_is_reentrant_and_only_rank_0_takes_it(tmp_path, monkeypatch):
    from tailor_cli import distributed
    from tailor_cli.runs import lock_dir

    with lock_dir(tmp_path / "a"):
        with lock_dir(tmp_path / "a"):  # a stage inside `nettailor run`
            assert (tmp_path / "a" / LOCK).is_file()
        assert (tmp_path / "a" / LOCK).is_file()
    assert not (tmp_path / "a").exists()
    monkeypatch.setattr(distributed, "_INFO", distributed.DistInfo(rank=1, world_size=2))
    (tmp_path / "b").mkdir()
    with lock_dir(tmp_path / "b"):
        assert not (tmp_path / "b" / LOCK).exists()


@pytest.mark.parametrize("command", ["report", "predict"])
def test_read_only_commands_take_no_lock(tmp_path, tailored_run, command):
    holder = _hold(tailored_run)
    try:
        res = _invoke("report", tailored_run) if command == "report" else None
        if command == "predict":
            export = tmp_path / "export"
            assert _invoke("export", tailored_run, "--export-dir", export).exit_code == 0
            holder.send_signal(signal.SIGKILL)
            holder.wait()
            holder = _hold(export)
            from PIL import Image

            Image.new("RGB", (30, 30)).save(tmp_path / "x.png")
            res = _invoke("predict", export, tmp_path / "x.png", "--device", "cpu")
        assert res.exit_code == 0, res.output
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
