"""Issue 24: `nettailor export RUN --format onnx`: the task's network as one standalone file, checked in ONNX Runtime.

Every family's file is checked in tests/test_families.py (its round trip); here the ResNet run, the
contents of the file, the teacher, and the errors.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from onnx import numpy_helper
from onnx_check import onnx_check
from typer.testing import CliRunner

from tailor_cli.cli import app
from tailor_cli.loading import load_student, load_teacher
from tailor_cli.onnx_export import DeployedStudent

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory, tailored_run) -> Path:
    """The shared tailored run, copied, with one block dropped (every proxy kept) and fine-tuned."""
    run = tmp_path_factory.mktemp("onnx") / "shapes"
    shutil.copytree(tailored_run, run)
    for args in (["prune", run, "--threshold", "0.0", "--drop-blocks", "1"],
                 ["finetune", run, "--epochs", "1", "--batch-size", "8", "--workers", "0", "--device", "cpu"]):
        res = invoke(*args)
        assert res.exit_code == 0, res.output
    return run


def _convs(module: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.Conv2d) for m in module.modules())


def test_the_tailored_network_as_onnx_matches_pytorch_and_holds_no_dropped_block(tmp_path, pruned_run, folder_data):
    out = tmp_path / "exports"
    res = invoke("export", pruned_run, "--export-dir", out, "--format", "onnx", "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    path = out / "shapes" / "model.onnx"
    assert info["file"] == str(path) and info["stage"] == "finetune" and info["max_abs_diff"] <= 1e-4
    student, _ = load_student(pruned_run / "finetune", torch.device("cpu"))
    # ONNX Runtime on the same preprocessed images, at two batch sizes (the batch dimension is dynamic)
    assert onnx_check(path, student, folder_data, batches=(1, 5)) <= 1e-4
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["images"] and [o.name for o in model.graph.output] == ["logits"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch size
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["classes"]) == ["class_0", "class_1", "class_2"] and meta["stage"] == "finetune"
    assert json.loads(meta["input"])["img_size"] == 32 and len(json.loads(meta["input"])["mean"]) == 3
    # only the kept blocks, the surviving proxies (folded) and the classifier: one Conv per convolution that runs,
    # and about the bytes of the parameters that run (the dropped block is neither a node nor an initializer)
    deployed = DeployedStudent(student)
    convs = sum(node.op_type == "Conv" for node in model.graph.node)
    assert convs == _convs(deployed) < _convs(load_student(pruned_run / "tailor", torch.device("cpu"))[0])
    stored = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    kept = 4 * sum(p.numel() for p in deployed.parameters())
    assert 0.9 * kept <= stored <= kept and path.stat().st_size < 1.1 * kept
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for layer in deployed.layers for m in layer.proxies.modules())
    # the same file again is refused; --overwrite replaces it, --task-name writes another
    res = invoke("export", pruned_run, "--export-dir", out, "--format", "onnx")
    assert res.exit_code == 8 and "--overwrite" in res.stderr
    assert invoke("export", pruned_run, "--export-dir", out, "--format", "onnx", "--overwrite").exit_code == 0
    # the adapter goes beside it, in the same task folder
    assert invoke("export", pruned_run, "--export-dir", out).exit_code == 0
    assert path.is_file() and (out / "shapes" / "adapter.safetensors").is_file()


def test_the_teacher_as_onnx_for_a_teacher_run_and_by_stage(tmp_path, pruned_run, folder_data):
    teacher_run = tmp_path / "teacher-run"
    teacher_run.mkdir()
    shutil.copytree(pruned_run / "teacher", teacher_run / "teacher")
    shutil.copy(pruned_run / "run.json", teacher_run / "run.json")
    res = invoke("export", teacher_run, "--export-dir", tmp_path / "a", "--format", "onnx", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["stage"] == "teacher"  # a run with no student: its teacher
    teacher = load_teacher(pruned_run / "teacher", torch.device("cpu"))
    assert onnx_check(tmp_path / "a" / "shapes" / "model.onnx", teacher, folder_data) <= 1e-4
    # readable as every other file written (it kept mkstemp's 0600: a server running as another user could not load it)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a" / "shapes" / "model.onnx").stat().st_mode) == 0o666 & ~umask
    res = invoke("export", pruned_run, "--export-dir", tmp_path / "b", "--format", "onnx", "--stage", "teacher",
                 "--task-name", "shapes-teacher")
    assert res.exit_code == 0, res.output
    assert "the whole network" in res.stdout
    assert onnx_check(tmp_path / "b" / "shapes-teacher" / "model.onnx", teacher, folder_data) <= 1e-4


@pytest.mark.parametrize("args, code, needle", [
    (["--format", "tflite"], 2, "--format must be adapter or onnx"),
    (["--stage", "teacher"], 2, "export it with --format onnx"),
    (["--stage", "bogus"], 2, "--stage must be tailor, prune or finetune (or teacher with --format onnx), got 'bogus'"),
    (["--format", "onnx", "--stage", "nope"], 2, "--stage must be one of"),
    (["--format", "onnx", "--task-name", "a/b"], 8, "task name 'a/b' is not valid"),
])
def test_bad_export_options_are_one_line_errors(tmp_path, pruned_run, args, code, needle):
    res = invoke("export", pruned_run, "--export-dir", tmp_path / "x", *args)
    assert res.exit_code == code and needle in res.stderr, res.output
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "x" / "shapes").exists()


def test_without_the_onnx_extra_the_export_says_which_to_install(tmp_path, pruned_run, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails, as when not installed
    res = invoke("export", pruned_run, "--export-dir", tmp_path / "x", "--format", "onnx", "--json")
    assert res.exit_code == 2
    error = json.loads(res.stdout)["error"]
    assert "onnx extra" in error and "'.[onnx]'" in error and "onnxruntime" in error
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_the_deploy_example_compares_both_networks_in_onnx_runtime(pruned_run):
    """examples/onnx_deploy.py, as a user runs it (the installed `nettailor` on PATH): sizes, parity, latency."""
    exe = Path(sys.executable).parent / "nettailor"
    if not exe.exists():
        pytest.skip("needs the installed nettailor command")
    proc = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "examples" / "onnx_deploy.py"), str(pruned_run),
                           "--batch-sizes", "1", "4", "--repeats", "2", "--warmup", "1", "--threads", "1", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout)
    tailored, full = r["networks"]["tailored"], r["networks"]["fine-tuned"]
    assert tailored["stage"] == "finetune" and full["stage"] == "teacher"
    assert tailored["max_abs_diff"] <= 1e-4 and full["max_abs_diff"] <= 1e-4 and tailored["same_predictions"]
    assert tailored["macs"] < full["macs"] and tailored["onnx_bytes"] < full["onnx_bytes"]
    assert set(r["speedup"]) == {"1", "4"} and r["mac_ratio"] == pytest.approx(full["macs"] / tailored["macs"])


def test_a_file_that_onnx_runtime_does_not_reproduce_is_not_kept(tmp_path, pruned_run, monkeypatch):
    from tailor_cli import onnx_export

    monkeypatch.setattr(onnx_export, "PARITY_TOLERANCE", -1.0)  # no difference passes: as if the runtime disagreed
    res = invoke("export", pruned_run, "--export-dir", tmp_path / "x", "--format", "onnx")
    assert res.exit_code == 8 and "nothing was written" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists() or not list((tmp_path / "x").rglob("*"))  # no file, no empty task folder
