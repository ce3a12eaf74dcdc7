"""Honest numbers: the test split is evaluated and reported, and never decides anything."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from datagen import make_imagefolder
from typer.testing import CliRunner

from tailor_cli.cli import app

runner = CliRunner()
TINY = ["--backbone", "test_resnet", "--no-pretrained", "--img-size", "32", "--workers", "0", "--device", "cpu",
        "--epochs", "3", "--search-epochs", "1", "--threshold", "0.01", "--tolerance", "5"]


def _run(data: Path, out: Path) -> dict:
    res = runner.invoke(app, ["run", "--data", str(data), "--output", str(out), *TINY, "--json"])
    assert res.exit_code in (0, 7), res.output
    return json.loads(res.stdout)


def _choices(run: Path) -> dict:
    """Everything that was chosen, and the validation numbers it was chosen on."""
    out = {}
    for stage in ("teacher", "tailor", "finetune"):
        s = json.loads((run / stage / "summary.json").read_text())
        out[stage] = (s["kept_epoch"], round(s["val_acc"], 6))
    search = json.loads((run / "search" / "frontier.json").read_text())
    out["k"] = search["chosen_k"]
    out["tried"] = [(r["k"], r.get("val_acc")) for r in search["frontier"] if r["status"] == "tried"]
    return out


def test_the_test_split_is_reported_everywhere_and_never_changes_a_choice(tmp_path):
    data = make_imagefolder(tmp_path / "data", n_classes=3, per_class=10, size=(36, 36))
    shutil.copytree(data / "val", data / "test")
    first = _run(data, tmp_path / "a")
    task = first["tasks"][0]
    assert task["accuracy"]["test"] is not None and task["accuracy"]["teacher_test"] is not None
    assert task["split_sizes"]["test"] == 9
    config = json.loads((tmp_path / "a" / "export" / "data" / "adapter_config.json").read_text())
    assert config["metrics"]["test_acc"] == task["accuracy"]["test"]
    assert config["metrics"]["teacher_test_acc"] == task["accuracy"]["teacher_test"]

    # Relabel the whole test split (every image into class_0): test accuracy changes, no choice may
    for k in (1, 2):
        for img in (data / "test" / f"class_{k}").iterdir():
            img.rename(data / "test" / "class_0" / f"from{k}_{img.name}")
        (data / "test" / f"class_{k}").rmdir()
    second = _run(data, tmp_path / "b")
    assert _choices(tmp_path / "a") == _choices(tmp_path / "b")
    assert second["tasks"][0]["accuracy"]["val"] == task["accuracy"]["val"]
    assert second["tasks"][0]["accuracy"]["test"] != task["accuracy"]["test"]


def test_data_with_only_a_test_folder_gets_validation_carved_from_train(tmp_path):
    data = make_imagefolder(tmp_path / "data", n_classes=2, per_class=10, size=(36, 36))
    (data / "val").rename(data / "test")
    out = _run(data, tmp_path / "run")
    sizes = out["tasks"][0]["split_sizes"]
    assert sizes["test"] == 6 and sizes["train"] + sizes["val"] == 20
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert not any("test/" in str(k) for k in split["train"] + split["val"])


def test_every_training_seed_is_measured_on_the_same_validation_images(tmp_path):
    """The split nettailor makes follows --split-seed (default 0), never --seed; later stages keep the run's."""
    data = make_imagefolder(tmp_path / "flat", n_classes=3, per_class=10, size=(36, 36), split=False)
    fast = ["--backbone", "test_resnet", "--no-pretrained", "--img-size", "32", "--workers", "0", "--device", "cpu",
            "--epochs", "1", "--batch-size", "8", "--val-fraction", "0.3"]

    def teacher(name: str, *extra: str) -> list[str]:
        res = runner.invoke(app, ["teacher", "--data", str(data), "--output", str(tmp_path / name), *fast, *extra])
        assert res.exit_code == 0, res.output
        split = json.loads((tmp_path / name / "split.json").read_text())
        assert json.loads((tmp_path / name / "run.json").read_text())["data"]["seed"] == split["seed"]
        return sorted(split["val"])

    seed0, seed1 = teacher("s0"), teacher("s1", "--seed", "1")
    other = teacher("split1", "--seed", "1", "--split-seed", "1")
    assert seed0 == seed1 and other != seed0 and len(other) == len(seed0) == 9
    # a later stage that names another split is refused (exit 2) before anything is written
    for option in (["--split-seed", "0"], ["--val-fraction", "0.5"]):
        res = runner.invoke(app, ["tailor", "--data", str(data), "--output", str(tmp_path / "split1"), *fast[:-2],
                                  *option, "--teacher-epochs", "1"])
        assert res.exit_code == 2 and "was split with " + option[0] in res.output, res.output
        assert not (tmp_path / "split1" / "tailor").exists()
    # so is another input size or flipping: prune counts MACs, and the export serves, at the run's
    for option, needle in ((["--img-size", "48"], "was made with --img-size 32, not --img-size 48"),
                           (["--no-hflip"], "was made with --hflip, not --no-hflip")):
        res = runner.invoke(app, ["tailor", "--data", str(data), "--output", str(tmp_path / "split1"),
                                  *[a for a in fast[:-2] if a not in ("--img-size", "32")], *option,
                                  "--teacher-epochs", "1"])
        assert res.exit_code == 2 and needle in res.output, res.output
        assert not (tmp_path / "split1" / "tailor").exists()
    res = runner.invoke(app, ["teacher", "--data", str(data), "--output", str(tmp_path / "neg"), *fast,
                              "--split-seed", "-1"])
    assert res.exit_code == 2 and "--split-seed must be 0 or more" in res.output and not (tmp_path / "neg").exists()
