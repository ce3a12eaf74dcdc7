"""Issue 24: a run stores its frozen backbone once (RUN/frozen/), its student files only what they trained,
and the run directory alone is enough to resume, prune, fine-tune, export and report, wherever it is moved."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tailor_cli.checkpoint import write_safetensors
from tailor_cli.cli import app
from tailor_cli.frozen import STORE, frozen_keys
from tailor_cli.loading import load_student

runner = CliRunner()
SMALL = ["--backbone", "test_resnet", "--img-size", "32", "--batch-size", "8", "--workers", "0", "--device", "cpu"]
RUN_SMALL = [a for a in SMALL if a not in ("--batch-size", "8")] + [
    f"--{stage}-batch-size=8" for stage in ("teacher", "tailor", "finetune")]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _keys_and_meta(path: Path) -> tuple[set[str], dict]:
    with safe_open(str(path), "pt") as f:
        return set(f.keys()), f.metadata() or {}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A local weights file, as a user's --weights FILE (random test_resnet weights, non-trivial BN statistics)."""
    model = timm.create_model("test_resnet", pretrained=False)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("weights") / "test_resnet.safetensors"
    save_file(model.state_dict(), str(path))
    return path


def test_student_files_and_checkpoints_hold_no_frozen_tensor(tmp_path, folder_data, weights):
    run = tmp_path / "run"
    res = invoke("run", "--data", folder_data, "--output", run, "--weights", weights, "--epochs", "1",
                 "--drop-blocks", "1", "--threshold", "0.0", "--keep-checkpoints", *RUN_SMALL)
    assert res.exit_code == 0, res.output
    sha = json.loads((run / "run.json").read_text())["backbone"]["sha256"]
    assert json.loads((run / "run.json").read_text())["format"] == 2
    store_keys, store_meta = _keys_and_meta(run / STORE)
    assert json.loads(store_meta["sha256"]) == sha
    for stage in ("tailor", "prune", "finetune"):
        student, _ = load_student(run / stage, torch.device("cpu"))
        shared = {student.timm_name(k) for k in frozen_keys(student)}
        keys, meta = _keys_and_meta(run / stage / "model.safetensors")
        assert keys == set(student.state_dict()) - frozen_keys(student)  # the stage's own tensors, all of them
        assert shared <= store_keys and json.loads(meta["frozen"])["sha256"] == sha
        if stage != "prune":  # what --resume reads carries no frozen copy either
            ckpt, _ = _keys_and_meta(run / stage / "checkpoint.safetensors")
            assert not {k[len("model."):] for k in ckpt if k.startswith("model.")} & frozen_keys(student)
    assert (run / "finetune" / "best.safetensors").is_file()
    best, _ = _keys_and_meta(run / "finetune" / "best.safetensors")
    assert not best & frozen_keys(load_student(run / "finetune", torch.device("cpu"))[0])
    # the export's shared backbone is the run's own file (one copy on disk where links work)
    assert (run / "export" / "backbone.safetensors").read_bytes() == (run / STORE).read_bytes()
    assert (run / "export" / "backbone.safetensors").stat().st_ino == (run / STORE).stat().st_ino
    # a damaged store is refused in one line, naming what to do
    tensors = load_file(str(run / STORE))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 1
    write_safetensors(run / STORE, tensors, {"sha256": sha})
    res = invoke("report", run)
    assert res.exit_code == 5 and "modified or damaged" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_a_moved_run_without_its_weights_file_resumes_prunes_finetunes_exports_and_reports(
        tmp_path, folder_data, weights):
    w = tmp_path / "w" / "test_resnet.safetensors"
    w.parent.mkdir()
    shutil.copyfile(weights, w)
    run, ref = tmp_path / "here" / "run", tmp_path / "ref"
    res = invoke("teacher", "--data", folder_data, "--output", run, "--weights", w, "--epochs", "1", *SMALL)
    assert res.exit_code == 0, res.output
    shutil.copytree(run, ref)
    tailor = ["--weights", w, "--epochs", "2", "--keep-checkpoints", *SMALL]
    res = invoke("tailor", "--data", folder_data, "--output", ref, *tailor)  # the reference, with the file
    assert res.exit_code == 0, res.output
    # the run directory moves to a machine without the weights file
    moved = tmp_path / "there" / "run"
    moved.parent.mkdir()
    shutil.move(str(run), str(moved))
    w.unlink()
    # the student starts from the run's own frozen backbone: the same network as from the file
    res = invoke("tailor", "--data", folder_data, "--output", moved, *tailor)
    assert res.exit_code == 0, res.output
    a, b = load_file(str(ref / "tailor" / "model.safetensors")), load_file(str(moved / "tailor" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # --resume from the stage's checkpoint alone (as if killed after its last epoch)
    (moved / "tailor" / "model.safetensors").unlink()
    res = invoke("tailor", "--data", folder_data, "--output", moved, *tailor, "--resume")
    assert res.exit_code == 0, res.output
    assert "resuming after epoch 2" in res.stderr
    b = load_file(str(moved / "tailor" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for args in (["prune", moved, "--threshold", "0.0", "--drop-blocks", "1"],
                 ["finetune", moved, "--epochs", "1", "--batch-size", "8", "--workers", "0", "--device", "cpu"],
                 ["export", moved, "--export-dir", tmp_path / "exports"], ["report", moved, "--json"]):
        res = invoke(*args)
        assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["tasks"][0]["stage"] == "finetune"
    res = invoke("report", tmp_path / "exports", "--json")
    assert res.exit_code == 0, res.output
    # other weights named for a run that has its own are refused, not used
    res = invoke("tailor", "--data", folder_data, "--output", moved, "--no-pretrained", "--epochs", "2",
                 "--overwrite", *SMALL)
    assert res.exit_code == 5 and "was made with" in res.stderr


def test_a_run_written_before_the_store_is_read_and_continued(tmp_path, tailored_run):
    """A run of the previous format (format 1, student files with their own frozen tensors, no frozen/) still
    reports and exports, and a later stage gives it its store and lean files."""
    run = tmp_path / "old"
    shutil.copytree(tailored_run, run)
    for stage in ("tailor",):
        student, meta = load_student(run / stage, torch.device("cpu"))
        meta.pop("frozen")
        write_safetensors(run / stage / "model.safetensors", student.state_dict(), meta)
    shutil.rmtree(run / "frozen")
    (run / "tailor" / "checkpoint.safetensors").unlink()
    meta = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**meta, "format": 1}))
    full = (run / "tailor" / "model.safetensors").stat().st_size
    res = invoke("report", run, "--json")
    assert res.exit_code == 0, res.output
    res = invoke("export", run, "--export-dir", tmp_path / "exports")
    assert res.exit_code == 0, res.output
    res = invoke("prune", run, "--threshold", "0.0", "--drop-blocks", "1")
    assert res.exit_code == 0, res.output
    assert (run / STORE).is_file() and json.loads((run / "run.json").read_text())["format"] == 2
    assert (run / "prune" / "model.safetensors").stat().st_size < full / 2
    res = invoke("finetune", run, "--epochs", "1", "--batch-size", "8", "--workers", "0", "--device", "cpu")
    assert res.exit_code == 0, res.output


def test_the_backbone_rebuilt_from_the_store_is_the_one_built_from_the_weights_file(tmp_path, folder_data, weights):
    """A stage that starts after the store exists (a teacher stopped before its first checkpoint and
    resumed, a student tailored after its teacher) starts from the same network, zero classifier
    included, and leaves the generator where building from the file leaves it (the proxies come next)."""
    from tailor_cli.runs import read_run
    from tailor_cli.stages.common import run_backbone
    from tailor_cli.stages.options import BackboneOptions

    run = tmp_path / "run"
    res = invoke("teacher", "--data", folder_data, "--output", run, "--weights", weights, "--epochs", "1", *SMALL)
    assert res.exit_code == 0, res.output
    bb = BackboneOptions(name="test_resnet", weights=weights)
    built, after_file = run_backbone(run, None, bb, 3, 5).state_dict(), torch.get_rng_state()
    torch.manual_seed(0)  # whatever came before: building reseeds
    rebuilt, after_store = run_backbone(run, read_run(run), bb, 3, 5).state_dict(), torch.get_rng_state()
    assert built.keys() == rebuilt.keys() and all(torch.equal(built[k], rebuilt[k]) for k in built)
    assert not built["fc.weight"].any() and torch.equal(after_file, after_store)
