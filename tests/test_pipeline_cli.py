"""Every subcommand through the CLI on generated data, end to end, with files, exit codes and JSON."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST
from typer.testing import CliRunner

from tailor_cli.adapter import load_export, load_task
from tailor_cli.checkpoint import read_jsonl
from tailor_cli.cli import app
from tailor_cli.loading import load_student

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tailored_run) -> Path:
    """tailor_run copied, then pruned and finetuned through the CLI."""
    run = tmp_path_factory.mktemp("finished") / "shapes"
    shutil.copytree(tailored_run, run)
    res = invoke("prune", run, "--threshold", "0.01", "--drop-blocks", "1", "--json")
    assert res.exit_code == 0, res.output
    pruned = json.loads(res.stdout)
    assert pruned["after"]["structure"]["blocks"] == 3
    res = invoke("finetune", run, "--epochs", "1", "--batch-size", "8", "--workers", "0", "--device", "cpu", "--json")
    assert res.exit_code == 0, res.output
    return run


def test_tailor_without_teacher_trains_one_and_writes_the_run_layout(tailored_run):
    run = tailored_run
    meta = json.loads((run / "run.json").read_text())
    assert meta["classes"] == ["class_0", "class_1", "class_2"]
    assert meta["backbone"]["architecture"] == "test_resnet" and len(meta["backbone"]["sha256"]) == 64
    for stage in ("teacher", "tailor"):
        assert (run / stage / "model.safetensors").is_file()
        assert json.loads((run / stage / "config.json").read_text())["stage"] == stage
        rows = read_jsonl(run / stage / "metrics.jsonl")
        assert [r["epoch"] for r in rows] == [1, 2]
        assert all(0 <= r["val_acc"] <= 100 for r in rows)
    rows = read_jsonl(run / "tailor" / "metrics.jsonl")
    assert {"train_ce", "train_complexity", "train_teacher", "attention"} <= set(rows[0])
    assert "train_kd" not in rows[0]  # logit distillation is opt-in (--kd-weight): no gain measured on average
    settings = json.loads((run / "tailor" / "config.json").read_text())["settings"]
    assert (settings["kd_weight"], settings["kd_temperature"]) == (0.0, 4.0)
    assert not list(run.rglob("*.tmp"))


def test_explicit_teacher_run_is_used(tmp_path, folder_data, tailored_run):
    out = tmp_path / "student"
    res = invoke("tailor", "--data", folder_data, "--teacher", tailored_run, "--output", out, "--epochs", "1", "--json",
                 *FAST)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["stage"] == "tailor" and not (out / "teacher").exists()
    assert json.loads((out / "run.json").read_text())["teacher"] == str((tailored_run / "teacher").resolve())
    assert "fine-tuning one first" not in res.stderr


def test_prune_writes_a_physically_smaller_student(finished_run):
    summary = json.loads((finished_run / "prune" / "summary.json").read_text())
    assert summary["after"]["macs"] < summary["before"]["macs"]
    assert summary["after"]["params"]["total"] < summary["before"]["params"]["total"]
    student, meta = load_student(finished_run / "prune", torch.device("cpu"))
    assert sum(spec.block for spec in student.structure.layers) == 3
    removed = summary["removed_blocks"][0]
    assert student.layers[removed - 1].block is None
    assert not any(k.startswith(f"layers.{removed - 1}.block.") for k in student.state_dict())


def test_finetune_keeps_structure_and_trains_without_complexity(finished_run):
    rows = read_jsonl(finished_run / "finetune" / "metrics.jsonl")
    assert len(rows) == 1 and "train_complexity" not in rows[0] and "train_teacher" in rows[0]
    pruned, _ = load_student(finished_run / "prune", torch.device("cpu"))
    tuned, _ = load_student(finished_run / "finetune", torch.device("cpu"))
    assert tuned.structure.to_json() == pruned.structure.to_json()


def test_export_then_load_reproduces_the_finetuned_students_logits(tmp_path, finished_run, folder_data):
    out = tmp_path / "export"
    res = invoke("export", finished_run, "--export-dir", out, "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert (out / "backbone.safetensors").is_file() and (out / info["task"] / "adapter.safetensors").is_file()
    config = json.loads((out / info["task"] / "adapter_config.json").read_text())
    assert config["base_model"]["architecture"] == "test_resnet"
    assert config["classes"] == ["class_0", "class_1", "class_2"]
    assert "/" not in json.dumps(config["base_model"]) or "file:" not in json.dumps(config["base_model"])
    assert str(tmp_path) not in json.dumps(config)  # no absolute paths of the training machine
    student, _ = load_student(finished_run / "finetune", torch.device("cpu"))
    student.eval()
    loaded, _ = load_task(out, info["task"])
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), student(x), atol=1e-5)
    # the adapter holds no shared backbone parameter, only task tensors
    from safetensors import safe_open

    with safe_open(str(out / info["task"] / "adapter.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not any(k.startswith("stem.") and k.endswith("weight") and "bn" not in k for k in keys)
    assert any(k.endswith("running_mean") for k in keys) and "fc.weight" in keys
    assert info["adapter_bytes"] < info["backbone_bytes"]


def test_second_task_reuses_backbone_and_another_backbone_is_refused(tmp_path, finished_run, tailored_run, folder_data):
    out = tmp_path / "export"
    assert invoke("export", finished_run, "--export-dir", out, "--task-name", "a").exit_code == 0
    before = (out / "backbone.safetensors").stat().st_mtime_ns
    res = invoke("export", tailored_run, "--export-dir", out, "--task-name", "b", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["backbone_reused"] is True
    assert (out / "backbone.safetensors").stat().st_mtime_ns == before
    backbone, tasks = load_export(out)
    a, b = tasks["a"][0], tasks["b"][0]
    # both tasks reference the very same backbone storage
    assert a.stem.conv1[0].weight.data_ptr() == b.stem.conv1[0].weight.data_ptr()
    # a run on other backbone weights (different seed -> different random init) is refused
    other = tmp_path / "other"
    res = invoke("tailor", "--data", folder_data, "--output", other, "--epochs", "1", "--seed", "1",
                 *[a if a != "test_resnet" else "test_resnet" for a in FAST])
    assert res.exit_code == 0, res.output
    res = invoke("export", other, "--export-dir", out, "--task-name", "c")
    assert res.exit_code == 8
    assert "holds another backbone" in res.stderr


def test_report_on_run_and_export_as_json_and_text(tmp_path, finished_run):
    res = invoke("report", finished_run, "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    task = rep["tasks"][0]
    assert task["stage"] == "finetune" and len(task["layers"]) == 4
    assert sum(l["block_kept"] for l in task["layers"]) == task["totals"]["blocks_kept"] == 3
    assert task["totals"]["macs"] < task["totals"]["macs_full"] * 1.5
    assert task["accuracy"]["teacher_val"] is not None and task["accuracy"]["val"] is not None
    res = invoke("report", finished_run)
    assert res.exit_code == 0 and "blocks kept 3/4" in res.stdout
    out = tmp_path / "export"
    invoke("export", finished_run, "--export-dir", out)
    res = invoke("report", out, "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["kind"] == "export" and rep["totals"]["tasks"] == 1
    assert rep["totals"]["disk_bytes"] > rep["totals"]["adapter_bytes"]


def test_report_on_one_task_of_an_export_reports_that_task_alone(tmp_path, finished_run, tailored_run):
    out = tmp_path / "export"
    assert invoke("export", finished_run, "--export-dir", out, "--task-name", "a").exit_code == 0
    assert invoke("export", tailored_run, "--export-dir", out, "--task-name", "b").exit_code == 0
    both = json.loads(invoke("report", out, "--json").stdout)
    assert [t["task"] for t in both["tasks"]] == ["a", "b"] and both["totals"]["tasks"] == 2
    for args, name in (((out / "b",), "b"), ((out, "--task", "a"), "a"), ((out / "a", "--task", "a", "--task", "a"), "a")):
        res = invoke("report", *args, "--json")
        assert res.exit_code == 0, res.output
        rep = json.loads(res.stdout)
        assert [t["task"] for t in rep["tasks"]] == rep["matrix"]["tasks"] == [name]
        one = next(t for t in both["tasks"] if t["task"] == name)
        assert rep["totals"]["adapter_bytes"] == one["totals"]["adapter_bytes"] and rep["totals"]["tasks"] == 1
    for args, code, words in (((out / "b", "--task", "a"), 2, "is the task 'b'"),
                              ((finished_run, "--task", "a"), 2, "--task applies to an export directory"),
                              ((out, "--task", "c"), 8, "no task 'c'")):
        res = invoke("report", *args)
        assert res.exit_code == code and words in res.stderr, res.output


def test_report_words_are_explained(finished_run, capsys):
    from tailor_cli.cli.render import render_report

    rep = json.loads(invoke("report", finished_run, "--json").stdout)
    layers = rep["tasks"][0]["layers"]
    assert layers[1]["proxies"]  # threshold 0.01 keeps them
    layers[1].update(block_kept=False, block_alpha=None, status="dropped")  # proxies stand in
    layers[2].update(block_kept=False, block_alpha=None, proxies=[], status="skipped")  # nothing computes it
    second = json.loads(json.dumps(rep["tasks"][0]))
    second["task"] = "other"
    rep["tasks"].append(second)
    rep["matrix"]["tasks"].append("other")
    for row, layer in zip(rep["matrix"]["cells"], layers):
        row[0] = {"block": layer["block_kept"], "proxies": len(layer["proxies"])}
        row.append(dict(row[0]))
    render_report(rep)
    text = capsys.readouterr().out
    title = "task 'shapes': its network after the 'finetune' stage (test_resnet at 32 px)"
    assert text.count(title) == 1 and "dead" not in text
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines()
            if line.startswith("|") and line.split("|")[1].strip().isdigit()}
    assert [rows[str(i)][2] for i in (1, 2, 3)] == ["kept", "dropped", "skipped"]
    for word in ("kept =", "dropped =", "skipped =", "alpha =", "proxies ="):  # the legend says what each word means
        assert word in text
    cells = [line.split("|")[2].strip() for line in text.splitlines() if line.startswith("| 1.0 ") or
             line.startswith("| 2.0 ") or line.startswith("| 3.0 ")]
    assert cells == ["B" + (f"+{len(layers[0]['proxies'])}" if layers[0]["proxies"] else ""),
                     f"+{len(layers[1]['proxies'])}", "."]  # never ".+n" for a dropped block with proxies
    assert text.count("block usage") == 1 and ". = the layer is skipped" in text


def test_json_stdout_is_exactly_one_document_in_a_real_process(finished_run):
    proc = subprocess.run([sys.executable, "-m", "tailor_cli", "report", str(finished_run), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    json.loads(proc.stdout)  # raises if anything else is on stdout


def test_run_command_does_the_whole_pipeline(tmp_path, folder_data):
    res = invoke("run", "--data", folder_data, "--backbone", "test_resnet", "--no-pretrained", "--img-size", "32", "--threshold", "0.01",
                 "--epochs", "1", "--drop-blocks", "1", "--workers", "0", "--device", "cpu",
                 "--output", tmp_path / "run", "--export-dir", tmp_path / "export", "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["tasks"][0]["stage"] == "finetune"
    assert (tmp_path / "export" / "backbone.safetensors").is_file()
    assert "--teacher" not in res.stderr  # `run` has no --teacher: its messages never name one
