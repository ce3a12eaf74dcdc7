"""Shared fixtures: tiny generated datasets and finished runs on timm's `test_resnet`.

Everything runs offline on CPU: models use pretrained=False, data is generated.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
# two cores: one process with two threads, or (pytest -n 2) two workers with one thread each
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

from datagen import make_imagefolder  # noqa: E402

FAST = ["--backbone", "test_resnet", "--no-pretrained", "--img-size", "32", "--batch-size", "8",
        "--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="session")
def folder_data(tmp_path_factory) -> Path:
    """ImageFolder with train/ and val/, 3 learnable classes."""
    return make_imagefolder(tmp_path_factory.mktemp("data") / "shapes", n_classes=3, per_class=12, size=(36, 36))


@pytest.fixture(scope="session")
def tailored_run(tmp_path_factory, folder_data) -> Path:
    """A run with teacher + tailor done (test_resnet, 32px), shared read-only by many tests."""
    from typer.testing import CliRunner

    from tailor_cli.cli import app

    run = tmp_path_factory.mktemp("runs") / "shapes"
    res = CliRunner().invoke(app, ["tailor", "--data", str(folder_data), "--output", str(run), "--epochs", "2",
                                   "--teacher-epochs", "2", "--keep-checkpoints", *FAST])  # tests resume from them
    assert res.exit_code == 0, res.output
    return run
