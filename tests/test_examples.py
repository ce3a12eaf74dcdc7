"""The example scripts run end to end, offline: generated data and a weights file the test writes.

They are what users copy, so they are run as users run them: ``bash examples/gtsrb.sh DATA`` with
the settings overridden from the environment, the installed ``nettailor`` on PATH.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
from datagen import make_gtsrb, make_imagefolder
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NETTAILOR = shutil.which("nettailor", path=str(BIN)) or shutil.which("nettailor")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or NETTAILOR is None,
                                reason="needs bash and the installed nettailor command")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """test_resnet weights as a user's local .safetensors file (stands in for pretrained ones)."""
    path = tmp_path_factory.mktemp("weights") / "test_resnet.safetensors"
    save_file(timm.create_model("test_resnet", pretrained=False).state_dict(), str(path))
    return path


def _env(**settings) -> dict:
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(NETTAILOR).parent), os.environ.get("PATH", "")]))
    env.update({k: str(v) for k, v in settings.items()})
    return env


def _bash(script: str, *args, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "examples" / script), *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_gtsrb_script_runs_every_stage_and_resumes(tmp_path, weights):
    data = make_gtsrb(tmp_path / "gtsrb", n_classes=3, tracks_per_class=3, frames_per_track=3)
    run, out = tmp_path / "runs" / "gtsrb", tmp_path / "exports"
    env = _env(BACKBONE="test_resnet", WEIGHTS=weights, RUN=run, OUT=out, EPOCHS=1, K=1, THRESHOLD=0.01,
               IMG_SIZE=32, DEVICE="cpu")
    res = _bash("gtsrb.sh", data, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    for stage in ("1/6 teacher", "2/6 tailor", "3/6 prune", "4/6 finetune", "5/6 export", "6/6 report"):
        assert stage in res.stderr
    report = json.loads((run / "report.json").read_text())
    (task,) = report["tasks"]
    assert task["stage"] == "finetune" and task["totals"]["blocks_kept"] == task["totals"]["blocks_total"] - 1
    config = json.loads((out / "gtsrb" / "adapter_config.json").read_text())
    assert config["task"] == "gtsrb" and len(config["classes"]) == 3
    assert (out / "backbone.safetensors").is_file()

    again = _bash("gtsrb.sh", data, env=env, cwd=tmp_path)  # "re-running continues where it stopped"
    assert again.returncode == 0, again.stderr[-3000:]
    assert "prune: already done" in again.stderr
    assert json.loads((run / "report.json").read_text()) == report

    other_k = _bash("gtsrb.sh", data, env={**env, "K": "2"}, cwd=tmp_path)  # never a stale network silently
    assert other_k.returncode == 2 and "another K or THRESHOLD" in other_k.stderr


def test_multi_task_script_shares_one_backbone_and_serve_matches_predict(tmp_path, weights):
    shapes = make_imagefolder(tmp_path / "data" / "Shapes", n_classes=3, per_class=10, size=(36, 36), split=False)
    stripes = make_imagefolder(tmp_path / "data" / "stripes", n_classes=2, per_class=10, size=(36, 36),
                               split=False, seed=7)
    runs, out = tmp_path / "runs", tmp_path / "exports"
    env = _env(BACKBONE="test_resnet", WEIGHTS=weights, RUNS=runs, OUT=out, EPOCHS=1, THRESHOLD=0.01,
               DEVICE="cpu", TASKS=f"{shapes},1,32 {stripes}/,2,32")
    res = _bash("multi_task.sh", env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["Shapes", "stripes"]  # the folders' names
    assert sorted(p.name for p in runs.iterdir()) == ["Shapes", "stripes"]
    assert len(list(out.glob("*.safetensors"))) == 1  # one shared backbone file
    assert "Shapes" in res.stdout and "stripes" in res.stdout  # the cross-task report

    bad = _bash("multi_task.sh", env=_env(**{**env, "TASKS": "torchvision:GTSRB"}), cwd=tmp_path)
    assert bad.returncode == 2 and "DATA,K,IMG_SIZE" in bad.stderr

    images = sorted((shapes / "class_0").iterdir())[:2] + sorted((stripes / "class_1").iterdir())[:1]
    served = subprocess.run([sys.executable, str(ROOT / "examples" / "serve.py"), str(out), *map(str, images),
                             "--top-k", "2", "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert served.returncode == 0, served.stderr[-3000:]
    predicted = subprocess.run([NETTAILOR, "predict", str(out), *map(str, images), "--top-k", "2", "--json",
                                "--device", "cpu"], env=env, capture_output=True, text=True, timeout=300)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    by_cli = {(p["task"], str(Path(p["image"]).resolve())): p["top"]
              for p in json.loads(predicted.stdout)["predictions"]}
    by_serve = {(task, str(Path(row["image"]).resolve())): row["top"]
                for task, rows in json.loads(served.stdout).items() for row in rows}
    assert by_cli.keys() == by_serve.keys() and len(by_cli) == 2 * len(images)
    for key, top in by_serve.items():
        assert [t["class"] for t in top] == [t["class"] for t in by_cli[key]], key
        for a, b in zip(top, by_cli[key]):
            assert abs(a["prob"] - b["prob"]) < 1e-3, key
    for flags, needle in [(["--top-k", "0"], "--top-k must be at least 1"), (["--device", "nope"], "unknown --device")]:
        bad = subprocess.run([sys.executable, str(ROOT / "examples" / "serve.py"), str(out), str(images[0]), *flags],
                             env=env, capture_output=True, text=True, timeout=300)
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]


def test_proxy_costs_prints_the_readme_table_and_json():
    script = str(ROOT / "examples" / "proxy_costs.py")
    table = subprocess.run([sys.executable, script, "test_resnet", "test_convnext"], capture_output=True, text=True,
                           timeout=300)
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].startswith("| backbone (input) | block/proxy MACs min / median")
    assert [l.split(" ")[1] for l in table.stdout.splitlines()[2:]] == ["test_resnet", "test_convnext"]
    out = subprocess.run([sys.executable, script, "test_resnet", "--json"], capture_output=True, text=True, timeout=300)
    (row,) = json.loads(out.stdout)
    assert row["backbone"] == "test_resnet" and row["ratio_min"] >= 11.4
    assert row["task_params_pruned"] < row["task_params_full"] and row["pruned_macs"] < row["backbone_macs"]


def test_finetune_baseline_is_independent_and_reports_validation_and_test(tmp_path, weights):
    """The reference fine-tune: timm and torch only, last-epoch validation and test accuracy as JSON."""
    source = (ROOT / "examples" / "finetune_baseline.py").read_text()
    assert "tailor_cli" not in source  # shares no code with the tool it is a reference for
    data = make_imagefolder(tmp_path / "data", n_classes=3, per_class=8, size=(36, 36))
    shutil.copytree(data / "val", data / "test")
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "finetune_baseline.py"), str(data), "--model",
                          "test_resnet", "--weights", str(weights), "--img-size", "32", "--epochs", "2",
                          "--batch-size", "8", "--workers", "0", "--hflip", "0", "--json"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)  # one JSON document on stdout, epochs logged on stderr
    assert out["epochs"] == 2 and out["img_size"] == 32
    assert 0 <= out["val_acc"] <= 100 and out["test_acc"] == out["val_acc"]  # test/ is a copy of val/ here
    assert res.stderr.count("epoch ") == 2
    bad = tmp_path / "other.safetensors"
    save_file(timm.create_model("test_efficientnet", pretrained=False).state_dict(), str(bad))
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "finetune_baseline.py"), str(data), "--model",
                          "test_resnet", "--weights", str(bad), "--epochs", "1", "--workers", "0"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode != 0 and "error:" in res.stderr and "Traceback" not in res.stderr
