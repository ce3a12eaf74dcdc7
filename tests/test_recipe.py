"""The training recipe (warm-up + cosine per step, the authors' step schedule by options, label
smoothing) and `--teacher FILE` (a model fine-tuned elsewhere)."""
from __future__ import annotations

import argparse
import json
import math

import pytest
import timm
import torch
from conftest import FAST
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tailor_cli import defaults
from tailor_cli.checkpoint import read_jsonl
from tailor_cli.cli import app
from tailor_cli.schedule import lr_factor, make_scheduler

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _one_line_error(res, code: int, *needles: str) -> None:
    assert res.exit_code == code, res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.output and res.stdout == ""
    for needle in needles:
        assert needle in res.stderr, res.stderr


# --------------------------------------------------------------------------- the schedule
def test_warmup_is_linear_then_cosine_reaches_zero_at_the_last_update():
    f = lambda u: lr_factor(u, schedule="cosine", total=100, per_epoch=10, warmup=10, lr_step=4)
    assert [f(u) for u in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(10) == pytest.approx(1.0)  # the peak, right after the warm-up
    assert f(55) == pytest.approx(0.5)  # halfway through the decay
    assert f(99) == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert f(100) == pytest.approx(0.0, abs=1e-12)
    values = [f(u) for u in range(10, 100)]
    assert all(a > b for a, b in zip(values, values[1:]))  # strictly decreasing after the warm-up


def test_cosine_matches_timm_scheduler_after_the_warmup():
    """A second, independent implementation of the same curve: timm's CosineLRScheduler."""
    from timm.scheduler import CosineLRScheduler

    total, warmup, lr = 60, 6, 0.05
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    ref = CosineLRScheduler(opt, t_initial=total - warmup, warmup_t=warmup, warmup_prefix=True, lr_min=0.0,
                            warmup_lr_init=0.0, t_in_epochs=False)
    for update in range(warmup, total):
        ours = lr * lr_factor(update, schedule="cosine", total=total, per_epoch=6, warmup=warmup, lr_step=1)
        assert ours == pytest.approx(ref._get_lr(update)[0], rel=1e-9, abs=1e-12), update


def test_the_authors_step_schedule_decays_by_ten_every_lr_step_epochs():
    f = lambda u: lr_factor(u, schedule="step", total=200, per_epoch=10, warmup=0, lr_step=8)
    assert f(0) == f(79) == 1.0
    assert f(80) == pytest.approx(0.1) and f(159) == pytest.approx(0.1)
    assert f(160) == pytest.approx(0.01)


def test_the_scheduler_steps_per_update_and_its_state_resumes_the_curve():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1)
    sched = make_scheduler(opt, schedule="cosine", epochs=3, per_epoch=4, warmup_epochs=1, lr_step=1)
    seen = []
    for _ in range(7):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    state = json.loads(json.dumps(sched.state_dict()))  # checkpoints keep it as JSON metadata
    opt2 = torch.optim.SGD([param], lr=0.1)  # as fit() resumes: a new optimiser and scheduler, then their states
    sched2 = make_scheduler(opt2, schedule="cosine", epochs=3, per_epoch=4, warmup_epochs=1, lr_step=1)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(state)
    expected = [0.1 * lr_factor(u, schedule="cosine", total=12, per_epoch=4, warmup=4, lr_step=1) for u in range(12)]
    assert seen == pytest.approx(expected[:7])
    rest = []
    for _ in range(5):
        rest.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert rest == pytest.approx(expected[7:])


def test_defaults_train_with_warmup_cosine_and_smoothing_and_the_paper_recipe_is_reachable(tmp_path, folder_data):
    res = invoke("teacher", "--data", folder_data, "--output", tmp_path / "new", "--epochs", "3", *FAST)
    assert res.exit_code == 0, res.output
    settings = json.loads((tmp_path / "new" / "teacher" / "config.json").read_text())["settings"]
    assert (settings["schedule"], settings["warmup_epochs"], settings["label_smoothing"], settings["lr"]) == (
        "cosine", defaults.WARMUP_EPOCHS["teacher"], defaults.LABEL_SMOOTHING, defaults.LR["teacher"])
    assert settings["weight_decay"] == defaults.WEIGHT_DECAY
    assert settings["nesterov"] is defaults.NESTEROV is True
    rows = read_jsonl(tmp_path / "new" / "teacher" / "metrics.jsonl")
    lr = defaults.LR["teacher"]
    train_size = json.loads((tmp_path / "new" / "teacher" / "summary.json").read_text())["split_sizes"]["train"]
    steps = train_size // 8  # FAST's batch of 8, the last partial batch dropped
    expected = [lr * lr_factor(e * steps, schedule="cosine", total=3 * steps, per_epoch=steps, warmup=steps, lr_step=1)
                for e in range(3)]
    assert [r["lr"] for r in rows] == pytest.approx(expected)  # the rate of each epoch's first update

    res = invoke("teacher", "--data", folder_data, "--output", tmp_path / "paper", "--epochs", "3", "--lr", "0.01",
                 "--schedule", "step", "--lr-step", "1", "--warmup-epochs", "0", "--label-smoothing", "0",
                 "--no-nesterov", *FAST)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "paper" / "teacher" / "config.json").read_text())["settings"]["nesterov"] is False
    rows = read_jsonl(tmp_path / "paper" / "teacher" / "metrics.jsonl")
    assert [r["lr"] for r in rows] == pytest.approx([0.01, 0.001, 0.0001])
    # without smoothing the training loss is the plain cross-entropy the evaluation computes
    assert all(r["train_ce"] == r["train_loss"] for r in rows)


@pytest.mark.parametrize("command,flags,epochs", [
    ("run", [], (20, 40, 20)),  # the student still climbs at 20 epochs (docs/method.md): tailor trains 40
    ("run", ["--epochs", "3"], (3, 3, 3)),  # --epochs is every stage's
    ("run", ["--epochs", "3", "--tailor-epochs", "5"], (3, 5, 3)),
    ("tailor", [], (20, 40)),  # (teacher trained in the run, student)
    ("tailor", ["--epochs", "7"], (7, 7)),
    ("tailor", ["--teacher-epochs", "2"], (2, 40)),
])
def test_each_stage_has_its_own_default_epochs_and_epochs_sets_them_all(monkeypatch, command, flags, epochs):
    import tailor_cli.stages as stages
    import tailor_cli.stages.tailor as tailor_module
    from tailor_cli.errors import UsageError

    seen = []

    def fake_run(run, export_dir, bb, data, opts, tailor_train, finetune_train, *args, **kwargs):
        seen.append((opts.teacher_train.epochs, tailor_train.epochs, finetune_train.epochs))
        raise UsageError("stopped before training")

    def fake_tailor(run, bb, data, train, opts, *args, **kwargs):
        seen.append((opts.teacher_train.epochs, train.epochs))
        raise UsageError("stopped before training")

    monkeypatch.setattr(stages, "run_pipeline", fake_run)
    monkeypatch.setattr(tailor_module, "tailor", fake_tailor)
    res = invoke(command, "--data", "digits", "--backbone", "test_resnet", *flags)
    assert res.exit_code == 2 and "stopped before training" in res.stderr, res.output
    assert seen == [epochs]


def test_the_optimiser_is_nesterov_sgd_unless_asked_for_the_papers_plain_momentum():
    from tailor_cli.train import TrainConfig, make_optimizer

    w = torch.nn.Parameter(torch.ones(3))
    for nesterov in (True, False):
        opt, _ = make_optimizer([{"params": [w]}], TrainConfig(epochs=1, lr=0.1, lr_step=1, nesterov=nesterov))
        assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["nesterov"] is nesterov
        assert opt.param_groups[0]["momentum"] == defaults.MOMENTUM
    opt, _ = make_optimizer([{"params": [w]}], TrainConfig(epochs=1, lr=0.1, lr_step=1))
    assert opt.param_groups[0]["nesterov"] is defaults.NESTEROV


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet"])
def test_a_new_classifier_starts_at_zero_so_every_class_starts_equally_likely(name):
    from tailor_cli.backbone import create_backbone
    from tailor_cli.student import Student

    model = create_backbone(name, num_classes=7)
    head = model.get_classifier()
    assert head.weight.abs().sum() == 0 and head.bias.abs().sum() == 0
    assert torch.count_nonzero(model(torch.randn(2, 3, 32, 32))) == 0
    student = Student(model, num_classes=7)
    assert student.fc.weight.abs().sum() == 0 and student.fc.bias.abs().sum() == 0
    # the body is untouched: its pretrained (here random) weights are not zeroed with the head
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "classifier" not in n and "fc" not in n)


@pytest.mark.parametrize("flag,value,needle", [("--schedule", "linear", "--schedule must be one of cosine, step"),
                                               ("--warmup-epochs", "-1", "--warmup-epochs must be >= 0"),
                                               ("--label-smoothing", "1", "--label-smoothing must be in [0, 1)"),
                                               ("--weight-decay", "-0.1", "--weight-decay must be >= 0")])
def test_bad_recipe_options_are_one_line_usage_errors(tmp_path, folder_data, flag, value, needle):
    res = invoke("teacher", "--data", folder_data, "--output", tmp_path / "r", flag, value, *FAST)
    _one_line_error(res, 2, needle)
    assert not (tmp_path / "r").exists()


def test_label_smoothing_is_in_the_training_loss():
    from tailor_cli.objectives import TeacherObjective

    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    plain, logits, _ = TeacherObjective(model)(images, labels)
    smooth, _, _ = TeacherObjective(model, label_smoothing=0.1)(images, labels)
    expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
    assert smooth.item() == pytest.approx(expected.item()) and smooth.item() != pytest.approx(plain.item())


def test_logit_distillation_is_recorded_at_tailor_and_kept_by_finetune_unless_the_teacher_is_off(tmp_path, folder_data):
    run = tmp_path / "kd"
    res = invoke("tailor", "--data", folder_data, "--output", run, "--epochs", "1", "--teacher-epochs", "1",
                 "--kd-weight", "0.5", "--kd-temperature", "2", *FAST)
    assert res.exit_code == 0, res.output
    settings = json.loads((run / "tailor" / "config.json").read_text())["settings"]
    assert (settings["kd_weight"], settings["kd_temperature"]) == (0.5, 2.0)
    (row,) = read_jsonl(run / "tailor" / "metrics.jsonl")
    assert row["train_kd"] > 0 and row["train_loss"] > row["train_ce"] + 0.5 * row["train_kd"]
    res = invoke("prune", run, "--threshold", "0.01", "--drop-blocks", "1")
    assert res.exit_code == 0, res.output
    tune = ["--epochs", "1", "--batch-size", "8", "--workers", "0", "--device", "cpu"]
    res = invoke("finetune", run, *tune)
    assert res.exit_code == 0, res.output
    assert read_jsonl(run / "finetune" / "metrics.jsonl")[-1]["train_kd"] > 0
    res = invoke("finetune", run, *tune, "--teacher-weight", "0", "--overwrite")  # no teacher: no KD either
    assert res.exit_code == 0, res.output
    assert "train_kd" not in read_jsonl(run / "finetune" / "metrics.jsonl")[-1]


def test_a_run_tailored_before_the_option_existed_is_fine_tuned_without_distillation(tmp_path):
    from tailor_cli.stages.common import Distillation, tailored_distillation

    (tmp_path / "tailor").mkdir()
    (tmp_path / "tailor" / "config.json").write_text(json.dumps({"settings": {"teacher_loss": "mse"}}))
    assert tailored_distillation(tmp_path, 10.0) == Distillation("mse", 0.0, defaults.KD_TEMPERATURE)
    (tmp_path / "tailor" / "config.json").write_text(json.dumps({"settings": {"kd_weight": 1.0, "kd_temperature": 2.0}}))
    assert tailored_distillation(tmp_path, 10.0) == Distillation("mse", 1.0, 2.0)
    assert tailored_distillation(tmp_path, 0.0).kd_weight == 0.0


@pytest.mark.parametrize("flag,value,needle", [
    ("--kd-weight", "-1", "--kd-weight must be >= 0"), ("--kd-temperature", "0", "--kd-temperature must be > 0"),
    ("--attention-slow-epochs", "-1", "--attention-slow-epochs must be >= 0"),
    ("--attention-slow-factor", "1.5", "--attention-slow-factor must be between 0 and 1")])
def test_bad_student_options_are_one_line_usage_errors(tmp_path, folder_data, flag, value, needle):
    res = invoke("tailor", "--data", folder_data, "--output", tmp_path / "r", flag, value, *FAST)
    _one_line_error(res, 2, needle)
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- --teacher FILE
@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A user's fine-tuned test_resnet for the 3 classes of folder_data, as a safetensors state dict."""
    torch.manual_seed(5)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    path = tmp_path_factory.mktemp("ft") / "finetuned.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, model


def test_a_fine_tuned_model_file_becomes_the_runs_teacher(tmp_path, folder_data, finetuned):
    path, model = finetuned
    run = tmp_path / "run"
    res = invoke("tailor", "--data", folder_data, "--output", run, "--teacher", path, "--epochs", "1", *FAST)
    assert res.exit_code == 0, res.output
    assert "imported" in res.stderr
    assert not (run / "teacher" / "metrics.jsonl").exists()  # nothing was trained
    stored = load_file(str(run / "teacher" / "model.safetensors"))
    for key, value in model.state_dict().items():
        assert torch.equal(stored[key], value), key
    summary = json.loads((run / "teacher" / "summary.json").read_text())
    assert summary["epochs"] == 0 and summary["source"] == str(path.resolve())
    # its accuracy, evaluated on the run's validation split as a trained teacher's would be
    from tailor_cli.loading import load_teacher
    from tailor_cli.stages.common import data_config, load_data, loaders
    from tailor_cli.stages.options import DataOptions
    from tailor_cli.train import evaluate

    meta = json.loads((run / "run.json").read_text())
    task = load_data(meta, DataOptions(), data_config("test_resnet"), run)
    _, val = loaders(task, 8, torch.device("cpu"), 0, 0)
    expected = evaluate(load_teacher(run / "teacher", torch.device("cpu")), val, torch.device("cpu"))["acc"]
    assert summary["val_acc"] == pytest.approx(expected)
    # the same file again: the run keeps its teacher; another teacher is refused
    res = invoke("tailor", "--data", folder_data, "--output", run, "--teacher", path, "--epochs", "1", "--overwrite",
                 *FAST)
    assert res.exit_code == 0, res.output


def test_a_timm_training_checkpoint_is_read_without_unpickling_code(tmp_path, folder_data, finetuned):
    """timm's train.py saves {'state_dict', 'args' (an argparse.Namespace), 'epoch', ...}."""
    _, model = finetuned
    ckpt = tmp_path / "model_best.pth.tar"  # the name timm gives it: Path.suffix is .tar
    torch.save({"epoch": 7, "arch": "test_resnet", "state_dict": model.state_dict(),
                "args": argparse.Namespace(lr=0.05, model="test_resnet")}, ckpt)
    res = invoke("tailor", "--data", folder_data, "--output", tmp_path / "run", "--teacher", ckpt, "--epochs", "1",
                 *FAST)
    assert res.exit_code == 0, res.output


def _save(model, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_a_file_for_another_architecture_is_refused(tmp_path, folder_data):
    path = _save(timm.create_model("test_efficientnet", pretrained=False, num_classes=3), tmp_path / "other.safetensors")
    res = invoke("tailor", "--data", folder_data, "--output", tmp_path / "run", "--teacher", path, *FAST)
    _one_line_error(res, 4, "do not fit backbone 'test_resnet'", "--backbone")
    assert not (tmp_path / "run").exists()  # refused before a new run keeps anything


def test_a_file_for_other_classes_is_refused(tmp_path, folder_data):
    path = _save(timm.create_model("test_resnet", pretrained=False, num_classes=5), tmp_path / "five.safetensors")
    res = invoke("tailor", "--data", folder_data, "--output", tmp_path / "run", "--teacher", path, *FAST)
    _one_line_error(res, 4, "classifies 5 classes, but the data has 3")


def test_a_backbone_without_classifier_is_refused(tmp_path, folder_data):
    path = _save(timm.create_model("test_resnet", pretrained=False, num_classes=0), tmp_path / "body.safetensors")
    res = invoke("tailor", "--data", folder_data, "--output", tmp_path / "run", "--teacher", path, *FAST)
    _one_line_error(res, 4, "holds no classifier", "--weights")


def test_a_corrupt_file_is_refused(tmp_path, folder_data, finetuned):
    path, _ = finetuned
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(path.read_bytes()[:200])
    res = invoke("tailor", "--data", folder_data, "--output", tmp_path / "run", "--teacher", bad, *FAST)
    _one_line_error(res, 4, "corrupt or truncated")  # a file the user hands in: a weights error, as a pickle's is
    pickled = tmp_path / "evil.pth"
    torch.save({"state_dict": {"fc.weight": torch.zeros(3, 8)}, "obj": object()}, pickled)
    res = invoke("tailor", "--data", folder_data, "--output", tmp_path / "run2", "--teacher", pickled, *FAST)
    _one_line_error(res, 4, "cannot read weights")


def test_run_takes_a_teacher_file_and_trains_no_teacher(tmp_path, folder_data, finetuned):
    path, _ = finetuned
    run = tmp_path / "run"
    res = invoke("run", "--data", folder_data, "--output", run, "--teacher", path, "--epochs", "1", "--drop-blocks",
                 "1", "--threshold", "0", "--tolerance", "100", "--complexity-weight", "0.2", "--teacher-weight", "5",
                 *[a for a in FAST if a not in ("--batch-size", "8")])
    assert res.exit_code == 0, res.output
    assert "teacher epoch" not in res.stderr
    options = json.loads((run / "run.json").read_text())["options"]
    assert options["teacher"] == str(path.resolve())
    # run passes the loss weights to the tailor stage and records them: `run -c RUN/run.json` repeats them
    assert (options["complexity_weight"], options["teacher_weight"]) == (0.2, 5.0)
    tailored = json.loads((run / "tailor" / "config.json").read_text())
    assert (tailored["complexity_weight"], tailored["teacher_weight"]) == (0.2, 5.0)


def test_weight_decay_reaches_the_optimiser_but_never_the_attention_logits():
    from tailor_cli.stages.options import TrainOptions
    from tailor_cli.train import make_optimizer

    cfg = TrainOptions(weight_decay=1e-4).config(torch.device("cpu"))
    weights, logits = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt, _ = make_optimizer([{"params": [weights]}, {"params": [logits], "weight_decay": 0.0}], cfg)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]


# --------------------------------------------------------------------------- the attention's slow start
def test_a_slow_group_follows_a_plain_sgd_whose_rate_is_set_by_hand():
    """Two groups: the weights on the stage's curve, the attention logits at 0.1x for the first epoch
    of three. Against two plain SGDs whose rates are written out here, update by update, across the
    end of the slow start and through a checkpoint's JSON round trip."""
    from tailor_cli.train import TrainConfig, make_optimizer

    torch.manual_seed(0)
    per_epoch, epochs, lr = 4, 3, 0.05
    cfg = TrainConfig(epochs=epochs, lr=lr, lr_step=1, warmup_epochs=1.0)  # cosine, Nesterov, weight decay 5e-4
    w, a = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    w_ref, a_ref = torch.nn.Parameter(w.detach().clone()), torch.nn.Parameter(a.detach().clone())
    opt, sched = make_optimizer([{"params": [w]}, {"params": [a], "name": "attention", "weight_decay": 0.0,
                                                   "slow_epochs": 1, "slow_factor": 0.1}], cfg, steps_per_epoch=per_epoch)
    sgd = lambda p, wd: torch.optim.SGD([p], lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
    ref_w, ref_a = sgd(w_ref, 5e-4), sgd(a_ref, 0.0)

    def curve(u):  # one epoch of linear warm-up, then cosine to 0 over the last two
        return (u + 1) / per_epoch if u < per_epoch else 0.5 * (1 + math.cos(math.pi * (u - per_epoch) / (2 * per_epoch)))

    rates = []
    for u in range(epochs * per_epoch):
        if u == 2:  # a checkpoint inside the slow start, resumed by a new optimiser and scheduler
            state = json.loads(json.dumps(sched.state_dict()))
            groups = [{**g, "params": [p]} for g, p in zip(opt.param_groups, (w, a))]
            opt2, sched = make_optimizer([{k: v for k, v in g.items() if k != "lr"} for g in groups], cfg,
                                         steps_per_epoch=per_epoch)
            opt2.load_state_dict(opt.state_dict())
            sched.load_state_dict(state)
            opt = opt2
        rates.append((opt.param_groups[0]["lr"], opt.param_groups[1]["lr"]))
        for group, rate in ((ref_w.param_groups[0], lr * curve(u)), (ref_a.param_groups[0], lr * curve(u) * (0.1 if u < per_epoch else 1))):
            group["lr"] = rate
        grad_w, grad_a = torch.randn(3), torch.randn(3)
        for p, g in ((w, grad_w), (a, grad_a), (w_ref, grad_w), (a_ref, grad_a)):
            p.grad = g.clone()
        opt.step(), ref_w.step(), ref_a.step()
        sched.step()
        assert torch.allclose(w, w_ref, rtol=0, atol=1e-7) and torch.allclose(a, a_ref, rtol=0, atol=1e-7), u
    assert rates[0] == pytest.approx((lr / per_epoch, 0.1 * lr / per_epoch))
    assert rates[per_epoch - 1][1] == pytest.approx(0.1 * rates[per_epoch - 1][0])
    assert all(r[0] == r[1] for r in rates[per_epoch:])  # the same curve once the slow start is over


def test_tailor_starts_the_attention_slow_records_it_and_a_factor_of_zero_holds_it(tmp_path, folder_data):
    from tailor_cli.student import BLOCK_LOGIT_INIT, PROXY_LOGIT_INIT

    base = ["--data", folder_data, "--epochs", "4", "--teacher-epochs", "1", *FAST]
    res = invoke("tailor", "--output", tmp_path / "default", *base)
    assert res.exit_code == 0, res.output
    settings = json.loads((tmp_path / "default" / "tailor" / "config.json").read_text())["settings"]
    assert (settings["attention_slow_epochs"], settings["attention_slow_factor"]) == (1, defaults.ATTENTION_SLOW_FACTOR)
    rows = read_jsonl(tmp_path / "default" / "tailor" / "metrics.jsonl")
    assert rows[0]["attention_lr"] == pytest.approx(0.1 * rows[0]["lr"])  # a quarter of 4 epochs: the first
    assert [r["attention_lr"] for r in rows[1:]] == [r["lr"] for r in rows[1:]]

    # a stage from before the slow start (no such settings) trained without it: resuming it needs 0, as any
    # other changed setting would
    config = tmp_path / "default" / "tailor" / "config.json"
    record = json.loads(config.read_text())
    for key in ("attention_slow_epochs", "attention_slow_factor"):
        del record["settings"][key]
    config.write_text(json.dumps(record))
    res = invoke("tailor", "--output", tmp_path / "default", *base, "--resume")
    assert res.exit_code == 2 and "attention_slow_epochs 0 -> 1" in res.output, res.output
    res = invoke("tailor", "--output", tmp_path / "default", *base, "--resume", "--attention-slow-epochs", "0")
    assert res.exit_code == 0 and "already complete" in res.output, res.output

    # factor 0 for every epoch: the logits never move, the proxies do
    held = tmp_path / "held"
    assert invoke("tailor", "--output", held, *base, "--attention-slow-factor", "0",
                  "--attention-slow-epochs", "4").exit_code == 0
    moved = tmp_path / "moved"
    assert invoke("tailor", "--output", moved, *base, "--attention-slow-epochs", "0").exit_code == 0
    (h, m) = (load_file(run / "tailor" / "model.safetensors") for run in (held, moved))
    logits = [k for k in h if k.endswith(".logits") and h[k].numel() > 1]
    assert logits and all(set(h[k].tolist()) <= {BLOCK_LOGIT_INIT, PROXY_LOGIT_INIT} for k in logits)
    assert any(not torch.equal(h[k], m[k]) for k in logits)
    proxies = [k for k in h if ".proxies." in k and k.endswith("weight")]
    assert proxies and any(not torch.equal(h[k], m[k]) for k in proxies)
    assert [r["attention_lr"] for r in read_jsonl(moved / "tailor" / "metrics.jsonl")] == \
        [r["lr"] for r in read_jsonl(moved / "tailor" / "metrics.jsonl")]
