"""What a new user trips over (issue 15): `run` checks every stage before training, progress
with an ETA on a terminal and in CI logs, lean run directories, -c/--config files, --export-dir."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import FAST
from rich.console import Console
from typer.testing import CliRunner

from tailor_cli import defaults
from tailor_cli.cli import app
from tailor_cli.cli.progress import Reporter

runner = CliRunner()
TINY = ["--backbone", "test_resnet", "--no-pretrained", "--img-size", "32", "--workers", "0", "--device", "cpu"]
BATCHES = ["--teacher-batch-size", "8", "--tailor-batch-size", "8", "--finetune-batch-size", "8"]


def invoke(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def _one_error_line(res, code: int, *needles: str):
    assert res.exit_code == code, res.output
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert lines[-1].startswith("error: ") and "Traceback" not in res.output, res.stderr
    for needle in needles:
        assert needle in lines[-1], lines[-1]


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- 1. run checks every stage up front
@pytest.mark.parametrize("args, needle", [
    (["--threshold", "1.5"], "--threshold must be in [0, 1)"),
    (["--drop-blocks", "5"], "--drop-blocks must be between 0 and 4"),  # test_resnet has 4 blocks
    (["--tolerance", "-1"], "--tolerance must be >= 0"),
    (["--search-epochs", "0"], "--search-epochs must be positive"),
    (["--max-macs", "-2"], "--max-macs must be positive"),
    (["--finetune-lr", "0"], "--finetune-lr must be positive"),
    (["--teacher-epochs", "0"], "--teacher-epochs must be positive"),
    (["--tailor-batch-size", "-8"], "--tailor-batch-size must be positive"),
    (["--max-skip", "0"], "--max-skip must be at least 1"),
])
def test_run_refuses_bad_later_stage_options_before_anything(tmp_path, folder_data, args, needle):
    run = tmp_path / "run"
    res = invoke("run", "--data", folder_data, "--output", run, "--epochs", "1", *TINY, *args)
    _one_error_line(res, 2, needle)
    assert not run.exists()  # nothing loaded, nothing trained, nothing written


def test_run_refuses_an_export_directory_of_another_backbone_before_training(tmp_path, folder_data):
    export = tmp_path / "export"
    export.mkdir()
    record = {"format_version": 1, "name": "resnet18", "architecture": "resnet18", "sha256": "f" * 64}
    (export / "backbone.json").write_text(json.dumps(record))
    run = tmp_path / "run"
    res = invoke("run", "--data", folder_data, "--output", run, "--export-dir", export, "--epochs", "1", *TINY)
    _one_error_line(res, 8, "holds another backbone (resnet18", "another directory")
    assert not run.exists()  # refused on the architecture alone, before the data was read

    # the same architecture on other weights: known once the backbone is built, still before the first epoch
    (export / "backbone.json").write_text(json.dumps(record | {"name": "test_resnet", "architecture": "test_resnet"}))
    res = invoke("run", "--data", folder_data, "--output", run, "--export-dir", export, "--epochs", "1", *TINY)
    _one_error_line(res, 8, "holds another backbone (test_resnet, sha256 ffffffffffff)")
    assert not (run / "teacher").exists() and not (run / "tailor").exists()

    (tmp_path / "file").write_text("x")
    res = invoke("run", "--data", folder_data, "--output", run, "--export-dir", tmp_path / "file", "--epochs", "1",
                 *TINY)
    _one_error_line(res, 8, "is a file")


# --------------------------------------------------------------------------- 3. progress
def test_piped_progress_prints_lines_inside_an_epoch_with_an_eta(tmp_path, folder_data, monkeypatch):
    args = ["teacher", "--data", folder_data, "--epochs", "2", *FAST]
    monkeypatch.setenv("NETTAILOR_PROGRESS_SECONDS", "0")  # a line at every step
    res = invoke(*args, "--output", tmp_path / "a")
    assert res.exit_code == 0, res.output
    assert "teacher epoch 1/2: step 1/" in res.stderr and "teacher epoch 2/2: step 1/" in res.stderr
    step_lines = [l for l in res.stderr.splitlines() if ": step " in l]
    assert all("stage " in l and " left" in l for l in step_lines)
    assert "teacher epoch 2/2: loss" in res.stderr  # the epoch lines keep the total

    monkeypatch.delenv("NETTAILOR_PROGRESS_SECONDS")  # default: one line every 30 s at most
    res = invoke(*args, "--output", tmp_path / "b")
    assert res.exit_code == 0 and ": step " not in res.stderr

    monkeypatch.setenv("NETTAILOR_PROGRESS_SECONDS", "often")
    _one_error_line(invoke(*args, "--output", tmp_path / "c"), 2, "NETTAILOR_PROGRESS_SECONDS")


def test_terminal_progress_keeps_the_total_and_gives_stage_and_run_eta(monkeypatch):
    clock = iter(range(0, 10_000, 10))  # 10 s per call of time.monotonic
    monkeypatch.setattr("tailor_cli.cli.progress._now", lambda: next(clock))
    rep = Reporter(console=Console(file=io.StringIO(), force_terminal=True, width=120))
    rep.on_plan([("teacher", 2), ("tailor", 3), ("search", 4), ("finetune", 3)])
    rep.on_stage_start("teacher", 2, 3, 0)
    describe = lambda: [t.description for t in rep.progress.tasks]
    assert describe() == ["teacher epoch 1/2"]
    row = {"train_loss": 1.0, "train_acc": 50.0, "val_acc": 50.0, "epoch_seconds": 1.0, "images_per_second": 10.0}
    for epoch in range(2):
        for step in range(3):
            rep.on_step("teacher", epoch, step, 3)
        eta = rep.progress.tasks[0].fields["eta"]
        assert eta.startswith("stage ") and "run about " in eta  # the stage and the rest of the run
        rep.on_epoch_end("teacher", {**row, "epoch": epoch + 1})
        if epoch == 0:
            assert describe() == ["teacher epoch 2/2"]  # the total stays
    assert describe() == []  # no phantom 'epoch 3' after a 2-epoch stage
    rep.on_stage_start("tailor", 3, 3, 0)
    rep.on_step("tailor", 0, 0, 3)
    # one step took 10 s: 8 steps to go in this stage, then search and finetune, 7 epochs of 3 steps at that pace
    assert rep.progress.tasks[0].fields["eta"] == "stage 1m20s left, run about 4m50s left"
    rep.close()


# --------------------------------------------------------------------------- 4. lean run directories
def test_finished_stages_keep_only_what_later_stages_read(tmp_path, folder_data):
    run = tmp_path / "run"
    args = ["run", "--data", folder_data, "--output", run, "--epochs", "1", "--threshold", "0.01", "--search-epochs",
            "1", "--tolerance", "100", *TINY, *BATCHES]
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    files = _files(run)
    weights = sorted(f for f in files if f.endswith(".safetensors"))
    assert weights == ["export/backbone.safetensors", "export/shapes/adapter.safetensors", "finetune/model.safetensors",
                       "frozen/backbone.safetensors", "frozen/stats.safetensors", "prune/model.safetensors",
                       "tailor/model.safetensors", "teacher/model.safetensors"]
    tried = [f for f in files if f.startswith("search/k") and f.endswith("summary.json")]
    assert len(tried) >= 2  # every candidate tried keeps its record (config, metrics, summary), not its weights

    again = invoke(*args, "--resume")  # --resume still skips every finished stage
    assert again.exit_code == 0, again.output
    assert "tailor: already complete" in again.stderr and "finetune: already complete" in again.stderr
    assert " epoch 1/1: loss" not in again.stderr

    kept = tmp_path / "kept"
    res = invoke(*[a if a != run else kept for a in args], "--keep-checkpoints")
    assert res.exit_code == 0, res.output
    kept_files = _files(kept)
    for stage in ("teacher", "tailor", "finetune"):
        assert f"{stage}/checkpoint.safetensors" in kept_files
    assert "teacher/best.safetensors" in kept_files and any(f.startswith("search/k") and f.endswith("model.safetensors")
                                                            for f in kept_files)
    assert sum(files.values()) < 0.5 * sum(kept_files.values())


# --------------------------------------------------------------------------- 7, 8. --export-dir, -c/--config
def test_a_stage_config_json_reproduces_its_settings_and_flags_win(tmp_path, folder_data):
    first = tmp_path / "first"
    res = invoke("teacher", "--data", folder_data, "--output", first, "--epochs", "1", "--lr", "0.02", "--seed", "3",
                 "--no-hflip", "--clip-grad", "0", *FAST)
    assert res.exit_code == 0, res.output
    config = first / "teacher" / "config.json"
    again = tmp_path / "again"
    res = invoke("teacher", "-c", config, "--output", again)
    assert res.exit_code == 0, res.output
    settings = lambda run: json.loads((run / "teacher" / "config.json").read_text())["settings"]
    assert settings(again) == settings(first) and settings(first)["clip_grad"] == "off"
    assert json.loads((again / "teacher" / "config.json").read_text())["options"] == json.loads(config.read_text())["options"]

    user = tmp_path / "mine.yaml"  # a file of one's own, with dashes or underscores; the command line wins
    user.write_text(yaml.safe_dump({"data": str(folder_data), "batch-size": 4, "epochs": 3, "img_size": 32,
                                    "backbone": "test_resnet", "pretrained": False, "workers": 0, "device": "cpu"}))
    res = invoke("teacher", "--config", user, "--epochs", "1", "--output", tmp_path / "mine", "--json")
    assert res.exit_code == 0, res.output
    got = settings(tmp_path / "mine")
    assert (got["batch_size"], got["epochs"], got["img_size"]) == (4, 1, 32)


@pytest.mark.parametrize("content, needle", [
    ({"epochs": 1, "batchsize": 8}, "has no option 'batchsize' (did you mean 'batch_size'?)"),
    ({"command": "run", "options": {"epochs": 1}}, "holds the options of `nettailor run`"),
    (["epochs", 1], "must hold a mapping"),
    ("epochs: [1", "is not valid YAML"),
])
def test_bad_config_files_are_one_line_usage_errors(tmp_path, capsys, content, needle):
    from tailor_cli.cli import invoke as _invoke

    path = tmp_path / "bad.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    assert _invoke(["teacher", "-c", str(path), "--output", str(tmp_path / "r")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: ") and needle in err, err
    assert not (tmp_path / "r").exists()
    assert _invoke(["teacher", "-c", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_run_takes_per_stage_settings_and_its_run_json_repeats_them(tmp_path, folder_data):
    first, export = tmp_path / "first", tmp_path / "export"
    res = invoke("run", "--data", folder_data, "--output", first, "--export-dir", export, "--epochs", "1",
                 "--tailor-epochs", "2", "--finetune-lr", "0.02", "--teacher-lr", "0.03", "--drop-blocks", "1",
                 "--threshold", "0.01", "--clip-grad", "5", *TINY, *BATCHES)
    assert res.exit_code == 0, res.output
    settings = lambda run, stage: json.loads((run / stage / "config.json").read_text())["settings"]
    assert [settings(first, s)["epochs"] for s in ("teacher", "tailor", "finetune")] == [1, 2, 1]
    assert [settings(first, s)["clip_grad"] for s in ("teacher", "tailor", "finetune")] == [5, 5, 5]
    assert (settings(first, "teacher")["lr"], settings(first, "tailor")["lr"], settings(first, "finetune")["lr"]) == (
        0.03, defaults.LR["tailor"], 0.02)
    assert (export / "shapes" / "adapter.safetensors").is_file()

    # run.json records run's options, the split's seed resolved: -c repeats the run; --out still works, with one
    # warning line
    assert json.loads((first / "run.json").read_text())["options"]["split_seed"] == defaults.SPLIT_SEED
    again = tmp_path / "again"
    res = invoke("run", "-c", first / "run.json", "--output", again, "--out", tmp_path / "export2")
    assert res.exit_code == 0, res.output
    for stage in ("teacher", "tailor", "finetune"):
        assert settings(again, stage) == settings(first, stage)
    assert json.loads((again / "prune" / "summary.json").read_text())["drop_blocks"] == 1
    assert [l for l in res.stderr.splitlines() if "deprecated" in l] == [
        "warning: --out is deprecated; use --export-dir (same meaning)"]
    assert (tmp_path / "export2" / "shapes" / "adapter.safetensors").is_file()
    _one_error_line(invoke("run", "-c", first / "run.json", "--export-dir", export, "--out", export), 2,
                    "pass only --export-dir")
    # Another run into the same export directory would replace the first run's task of the same name: refused
    # before any training, with what to do; an invalid --task-name before anything is loaded.
    adapter = (export / "shapes" / "adapter.safetensors").read_bytes()
    third = tmp_path / "third"
    _one_error_line(invoke("run", "-c", first / "run.json", "--output", third, "--export-dir", export), 8,
                    "task 'shapes' already exists", "--task-name NAME")
    assert not (third / "teacher").exists() and (export / "shapes" / "adapter.safetensors").read_bytes() == adapter
    # --resume re-exports a run's own task only: another run's task of that name is refused the same way
    _one_error_line(invoke("run", "-c", first / "run.json", "--output", third, "--export-dir", export, "--resume"), 8,
                    "another run's export", "--task-name NAME")
    assert not (third / "teacher").exists() and (export / "shapes" / "adapter.safetensors").read_bytes() == adapter
    res = invoke("run", "-c", first / "run.json", "--output", first, "--export-dir", export, "--resume")
    assert res.exit_code == 0, res.output
    _one_error_line(invoke("run", "-c", first / "run.json", "--output", third, "--export-dir", export,
                           "--task-name", "a/b"), 8, "task name 'a/b' is not valid")


def test_a_run_directory_called_digits_does_not_shadow_the_embedded_digits(tmp_path, monkeypatch):
    """`--data digits --output digits`: the run directory exists before the data is read, and used to be read as
    an (empty) image folder: exit 3, 'digits is empty'. The bare name always means the embedded set."""
    monkeypatch.chdir(tmp_path)
    res = invoke("teacher", "--data", "digits", "--output", "digits", "--epochs", "1", "--batch-size", "64", *TINY)
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "digits" / "run.json").read_text())["data"]
    assert (data["path"], data["layout"]) == ("digits", "digits")


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["teacher", "--epochs", "x"], ["report", "--json"]])
def test_help_version_and_usage_errors_answer_without_importing_torch(args):
    """Scripts call `nettailor --help` and get usage errors without waiting seconds for torch to load."""
    code = ("import sys\nfrom tailor_cli.cli import main\nsys.argv = ['nettailor', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules, file=sys.stderr)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    expected = 0 if args[0].startswith("--") else 2
    assert proc.stderr.splitlines()[-1] == f"exit {expected} False", proc.stderr
