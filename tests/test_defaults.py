"""Training that diverges: the relative teacher term keeps the reported case finite, and a failed
stage's advice works as printed."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from datagen import make_imagefolder
from tailor_cli.cli import app

runner = CliRunner()
# the reported case: 5 classes of 28 px grayscale photos, resnet18 at 32 px after a 1-epoch teacher
ARGS = ["--backbone", "resnet18", "--no-pretrained", "--img-size", "32", "--workers", "0", "--device", "cpu",
        "--epochs", "1", "--teacher-epochs", "1"]


@pytest.fixture(scope="module")
def gray(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("gray") / "products", n_classes=5, per_class=90,
                            size=(28, 28), mode="L", seed=3)


def test_the_relative_teacher_term_keeps_default_learning_rates_finite(tmp_path, gray):
    for loss in ("mse", "relative"):
        res = runner.invoke(app, ["tailor", "--data", str(gray), "--output", str(tmp_path / loss), *ARGS,
                                  "--teacher-loss", loss, "--json"])
        assert res.exit_code in (0, 6), res.output
    rows = [json.loads(line) for line in (tmp_path / "relative" / "tailor" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_teacher"] < 4  # bounded
    # the paper's MSE (the default) explodes on this data at lr 0.1: non-finite, or thousands
    mse = (tmp_path / "mse" / "tailor" / "metrics.jsonl")
    assert not mse.is_file() or json.loads(mse.read_text().splitlines()[-1])["train_teacher"] > 100


def test_a_non_finite_loss_says_how_to_rerun_and_that_rerun_works(tmp_path, gray):
    run = tmp_path / "run"
    res = runner.invoke(app, ["teacher", "--data", str(gray), "--output", str(run), *ARGS[:-2], "--epochs", "2",
                              "--lr", "1e6"])
    assert res.exit_code == 6, res.output
    assert "--overwrite" in res.stderr
    advice = res.stderr.strip().splitlines()[-1]
    assert "lower --lr" in advice
    res = runner.invoke(app, ["teacher", "--data", str(gray), "--output", str(run), *ARGS[:-2], "--epochs", "2",
                              "--lr", "0.01", "--overwrite"])
    assert res.exit_code == 0, res.output
