"""The `nettailor` command line: parse, validate, call the core, render.

stdout carries results only (``--json``: exactly one JSON document); progress and
logs go to stderr (a rich progress bar on a terminal, plain lines otherwise).
"""
from __future__ import annotations

import difflib
import json
import math
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from . import __version__, defaults
from .errors import (
    EXIT_DATA,
    EXIT_EXPORT,
    EXIT_INTERNAL,
    EXIT_MODEL,
    EXIT_RUN,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_TOLERANCE,
    EXIT_TRAINING,
    EXIT_USAGE,
    TailorError,
)

EXIT_CODES_HELP = (
    f"Exit codes: 0 ok; {EXIT_INTERNAL} internal error (a bug; rerun with --debug); {EXIT_USAGE} bad arguments; "
    f"{EXIT_DATA} data error; {EXIT_MODEL} backbone/weights error; {EXIT_RUN} run directory error; "
    f"{EXIT_TRAINING} training failed (NaN, out of memory); {EXIT_TOLERANCE} accuracy tolerance missed; "
    f"{EXIT_EXPORT} export/adapter error; {EXIT_SIGINT} interrupted (Ctrl-C); {EXIT_SIGTERM} terminated (SIGTERM)."
)

app = typer.Typer(
    name="nettailor",
    help="Tailor pretrained CNNs to new tasks by changing the architecture, not just the weights "
    "(NetTailor, CVPR 2019).\n\n" + EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
err_console = Console(stderr=True, soft_wrap=True)  # an error is one line, never wrapped
_now = time.monotonic  # the progress clock (a test replaces it)


# --------------------------------------------------------------------------- -c/--config FILE
def _read_config(ctx: typer.Context, value: Optional[Path]) -> Optional[Path]:
    """``-c FILE`` (eager): its values become the command's defaults (click's ``default_map``), so options
    given on the command line still win."""
    if value is not None:
        ctx.default_map = {**(ctx.default_map or {}), **_config_values(value, ctx.command)}
    return value


def _config_values(path: Path, command) -> dict:
    """Option values from a YAML (or JSON) mapping, keyed by option name (``batch_size`` or ``batch-size``).

    A record nettailor wrote (a stage's ``config.json``, a run's ``run.json``) gives its ``options``,
    to the command that made it. Unknown keys are refused.
    """
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise typer.BadParameter(f"cannot read '{path}' ({err.strerror})") from err
    except yaml.YAMLError as err:
        raise typer.BadParameter(f"'{path}' is not valid YAML ({' '.join(str(err).split())[:160]})") from err
    doc = {} if doc is None else doc
    if not isinstance(doc, dict):
        raise typer.BadParameter(f"'{path}' must hold a mapping of option names to values")
    if isinstance(doc.get("options"), dict):
        if doc.get("command") != command.name:
            raise typer.BadParameter(f"'{path}' holds the options of `nettailor {doc.get('command')}`, not of "
                                     f"`nettailor {command.name}`; pass it to that command")
        doc = doc["options"]
    names = {opt[2:].replace("-", "_"): param.name for param in command.params if param.param_type_name == "option"
             for opt in param.opts if opt.startswith("--") and param.name != "config"}
    values = {}
    for key, value in doc.items():
        name = names.get(str(key).replace("-", "_"))
        if name is None:
            close = difflib.get_close_matches(str(key).replace("-", "_"), list(names), n=1)
            raise typer.BadParameter(f"'{path}': `nettailor {command.name}` has no option '{key}'"
                                     + (f" (did you mean '{close[0]}'?)" if close else ""))
        values[name] = value
    return values


# --------------------------------------------------------------------------- shared options
Config = Annotated[Optional[Path], typer.Option(
    "--config", "-c", is_eager=True, callback=_read_config, help="YAML (or JSON) file of option values by name "
    "(batch_size: 64); options on the command line win. A stage's config.json (run.json for `run`) holds the "
    "options it was made with.")]
KeepCheckpoints = Annotated[bool, typer.Option(
    "--keep-checkpoints", help="Keep each finished stage's checkpoint (weights + optimiser state) and best-epoch "
    "copy, and the K search's candidate weights [default: only what later stages read is kept].")]
Data = Annotated[Optional[str], typer.Option("--data", help="Dataset: a folder (ImageFolder, GTSRB, Decathlon), "
                                             "'torchvision:NAME', or 'digits' (embedded).")]
Backbone = Annotated[str, typer.Option("--backbone", help="timm model name, optionally with a tag "
                                       "(resnet34, resnet50d, resnet34.tv_in1k).")]
Pretrained = Annotated[bool, typer.Option("--pretrained/--no-pretrained",
                                          help="Start from timm's pretrained weights (downloaded when online).")]
Weights = Annotated[Optional[Path], typer.Option("--weights", help="Local backbone weights: .safetensors, or a timm "
                                                 ".pth (read with weights_only).")]
Output = Annotated[Optional[Path], typer.Option("--output", "-o", help="Run directory [default: runs/<data>-<backbone>].")]
ExportDir = Annotated[Optional[Path], typer.Option("--export-dir", help="Export directory: the shared backbone and "
                                                   "one adapter folder per task.")]
OldOut = Annotated[Optional[Path], typer.Option("--out", hidden=True, help="Deprecated name of --export-dir.")]
Task = Annotated[Optional[str], typer.Option("--task", help="Visual Decathlon task name.")]
ImgSize = Annotated[Optional[int], typer.Option("--img-size", help="Training input size [default: dataset/backbone].")]
ValFraction = Annotated[Optional[float], typer.Option("--val-fraction", help="Validation fraction for data without a "
                                                      f"validation split [default: {defaults.VAL_FRACTION}].")]
Download = Annotated[bool, typer.Option("--download", help="Download torchvision datasets.")]
Cache = Annotated[bool, typer.Option("--cache", help="Decode and resize once, keep uint8 images in memory "
                                         "(refused if over 80% of available memory).")]
Hflip = Annotated[Optional[bool], typer.Option("--hflip/--no-hflip", help="Horizontal flips in training "
                                               "[default: off for digits, characters, traffic signs].")]
SkipBad = Annotated[bool, typer.Option("--skip-bad", help="Skip unreadable images instead of failing (each image is "
                                       "decoded once up front; the skipped ones are logged and listed in summary.json).")]
Augment = Annotated[bool, typer.Option("--augment/--no-augment", help="Random-resized-crop (and flips) in "
                                       "training; --no-augment trains on the evaluation transform.")]
Workers = Annotated[Optional[int], typer.Option("--workers", help="Data loader workers [default: from CPU count].")]
Epochs = Annotated[int, typer.Option("--epochs", help="Training epochs.")]
BatchSize = Annotated[Optional[int], typer.Option("--batch-size", help="Batch size (per process).")]
Lr = Annotated[Optional[float], typer.Option("--lr", help="Learning rate (SGD, momentum 0.9, step decay x0.1).")]
LrStep = Annotated[Optional[int], typer.Option("--lr-step", help="Epochs between x0.1 decays [default: 40% of epochs].")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed.")]
Device = Annotated[str, typer.Option("--device", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps.")]
Amp = Annotated[Optional[bool], typer.Option("--amp/--no-amp", help="Mixed precision [default: on for CUDA].")]
AmpDtype = Annotated[str, typer.Option("--amp-dtype", help="bfloat16 or float16 (with a gradient scaler).")]
Compile = Annotated[bool, typer.Option("--compile", help="torch.compile the training forward (CUDA: faster "
                                       "steps after a warm-up compile).")]
ClipGrad = Annotated[Optional[float], typer.Option("--clip-grad", help="Clip each step's gradient norm (the "
                                                  "weights', never the attention logits') to this; 0: no clipping "
                                                  f"[default: {defaults.CLIP_GRAD:g}].")]
ChannelsLast = Annotated[Optional[bool], typer.Option("--channels-last/--no-channels-last",
                                                      help="Channels-last memory format [default: on for CUDA].")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the stage from its last checkpoint.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Redo the stage (and discard the stages built on it).")]
TeacherLoss = Annotated[str, typer.Option("--teacher-loss", help="Teacher term: 'mse' (the paper's) or 'relative' "
                                          "(each layer's squared error over its energy: scale-free, bounded; "
                                          "see docs/method.md for when it helps).")]
Json = Annotated[bool, typer.Option("--json", help="Print exactly one JSON document on stdout.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]


def _stage_options(stage: str, short: str, also: str = ""):
    """The options of one training stage: --STAGE-epochs, --STAGE-lr, --STAGE-batch-size (`run`; tailor's --teacher-*)."""
    return (
        Annotated[Optional[int], typer.Option(f"--{stage}-epochs", help=f"Epochs of {short} [default: --epochs].")],
        Annotated[Optional[float], typer.Option(f"--{stage}-lr", help=f"Learning rate of {short}{also} "
                                                f"[default: {defaults.LR[stage]}].")],
        Annotated[Optional[int], typer.Option(f"--{stage}-batch-size", help=f"Batch size of {short}{also} "
                                              f"[default: {defaults.BATCH_SIZE[stage]}].")],
    )


TeacherEpochs, TeacherLr, TeacherBatchSize = _stage_options("teacher", "the teacher (full fine-tuning) trained in "
                                                                       "the run")
TailorEpochs, TailorLr, TailorBatchSize = _stage_options("tailor", "the tailored student")
FinetuneEpochs, FinetuneLr, FinetuneBatchSize = _stage_options("finetune", "the pruned network's fine-tuning",
                                                               " and of the K search's candidates")


def _default_output(data: str | None, backbone: str) -> Path:
    name = Path(data.rstrip("/")).name if data else "run"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name.replace("torchvision:", "")).strip("-") or "run"
    return Path("runs") / f"{name}-{backbone.split('.')[0]}"


# --------------------------------------------------------------------------- reporting
class Reporter:
    """Training callbacks on stderr: a progress bar on a terminal, plain log lines otherwise.

    Both say where the stage is and how long it has left, and under ``run`` (which announces its
    stages with ``on_plan``) about how long the whole pipeline has left. Without a terminal (CI
    logs), a progress line comes at most every ``$NETTAILOR_PROGRESS_SECONDS`` (30) inside an epoch.
    """

    def __init__(self, quiet: bool = False, console: Console | None = None):
        from .distributed import is_main

        self.quiet = quiet or not is_main()  # under torchrun, rank 0 alone prints
        self.console = console or err_console
        self.tty = not self.quiet and (self.console.is_terminal if console is not None else sys.stderr.isatty())
        self.interval = _progress_seconds()
        self.progress = None
        self.task_id = None
        self.plan: list[list] = []  # [stage, epochs] still to come
        self.stage: dict = {}  # the stage running: name, epochs, steps, steps to do and done, when it started

    def on_plan(self, stages):
        self.plan = [[name, epochs] for name, epochs in stages]

    def on_stage_start(self, stage, epochs, steps, start_epoch):
        self._advance_plan(stage, epochs - start_epoch)
        now = _now()
        self.stage = {"name": stage, "epochs": epochs, "steps": steps, "todo": (epochs - start_epoch) * steps,
                      "done": 0, "start": now, "last_line": now}
        self._log(f"{stage}: {epochs} epochs x {steps} steps" + (f", resuming at epoch {start_epoch + 1}" if start_epoch else ""))
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            if self.progress is None:
                self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                         TextColumn("{task.fields[eta]}"), console=self.console, transient=True)
                self.progress.start()
            self.task_id = self.progress.add_task(f"{stage} epoch {start_epoch + 1}/{epochs}", total=steps, eta="")

    def on_step(self, stage, epoch, step, steps):
        self.stage["done"] += 1
        if self.progress is not None:
            self.progress.update(self.task_id, completed=step + 1, eta=self._eta())
        elif not self.quiet and _now() - self.stage["last_line"] >= self.interval:
            self.stage["last_line"] = _now()
            self._log(f"{stage} epoch {epoch + 1}/{self.stage['epochs']}: step {step + 1}/{steps}; {self._eta()}")

    def on_epoch_end(self, stage, row):
        epochs = self.stage.get("epochs", row["epoch"])
        terms = " ".join(f"{k[6:]} {row[k]:.4f}" for k in row if k.startswith("train_") and k not in ("train_loss", "train_acc"))
        self._log(f"{stage} epoch {row['epoch']}/{epochs}: loss {row['train_loss']:.4f} ({terms}) "
                  f"train_acc {row['train_acc']:.2f} val_acc {row['val_acc']:.2f} "
                  f"[{row['epoch_seconds']:.1f}s, {row['images_per_second']:.0f} img/s]")
        self.stage["last_line"] = _now()
        if self.progress is None:
            return
        if row["epoch"] < epochs:
            self.progress.reset(self.task_id, description=f"{stage} epoch {row['epoch'] + 1}/{epochs}",
                                eta=self._eta())
        else:  # the stage is done: no bar for an epoch that will not run
            self.progress.remove_task(self.task_id)
            self.task_id = None

    def on_message(self, message):
        self._log(message)

    def _advance_plan(self, stage, epochs):
        """Drop the planned stages before ``stage``; a K search candidate uses up its epochs of the search's."""
        name = stage.split("/")[0]
        names = [n for n, _ in self.plan]
        if name not in names:
            return
        del self.plan[:names.index(name)]
        if name == "search":
            self.plan[0][1] = max(self.plan[0][1] - epochs, 0)
        else:
            del self.plan[0]

    def _eta(self) -> str:
        """``stage 4m10s left, run about 21m05s left``: the steps to go at this stage's pace so far
        (evaluations included), and the planned epochs after it at this stage's seconds per epoch."""
        st = self.stage
        if not st.get("done"):
            return ""
        per_step = (_now() - st["start"]) / st["done"]
        left = per_step * (st["todo"] - st["done"])
        text = f"stage {_duration(left)} left"
        later = sum(epochs for _, epochs in self.plan)
        if later:
            text += f", run about {_duration(left + later * per_step * st['steps'])} left"
        return text

    def _log(self, message):
        if self.quiet:
            return
        if self.progress is not None:
            self.progress.console.print(message, highlight=False)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _progress_seconds() -> float:
    """Seconds between progress lines without a terminal: ``$NETTAILOR_PROGRESS_SECONDS``, or the default."""
    text = os.environ.get("NETTAILOR_PROGRESS_SECONDS")
    if text is None:
        return defaults.PROGRESS_SECONDS
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        raise _usage(f"NETTAILOR_PROGRESS_SECONDS must be a number of seconds >= 0, got '{text}'; unset it for "
                     f"a line every {defaults.PROGRESS_SECONDS:g} s")
    return value


def _emit(result: dict, as_json: bool, render: Callable[[dict], None] | None = None) -> None:
    from .distributed import is_main

    if not is_main():
        return
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
        _state["emitted"] = True
    elif render is not None:
        render(result)


_state = {"emitted": False}  # whether this command already wrote its JSON document


def _execute(debug: bool, fn: Callable[[], None], json_out: bool = False) -> None:
    """Run a command body: TailorError -> one line + its exit code; anything else -> exit 1.

    With ``--json`` the error is also the one JSON document on stdout: ``{"error": ..., "exit_code": ...}``.
    """
    _state["emitted"] = False
    try:
        fn()
    except TailorError as err:
        if debug:
            traceback.print_exc()
        _fail(f"{_rank_prefix()}{err}", err.exit_code, json_out)
    except KeyboardInterrupt:
        _fail("interrupted", EXIT_SIGINT, json_out)
    except Exception as err:  # a bug, or an environment problem we did not anticipate
        if debug:
            traceback.print_exc()
        msg = str(err).splitlines()[0][:200] if str(err) else ""
        if "out of memory" in msg.lower():
            _fail(f"out of memory ({msg}); try a smaller --batch-size", EXIT_TRAINING, json_out)
        _fail(f"internal error: {type(err).__name__}: {msg} (rerun with --debug for the traceback)", EXIT_INTERNAL,
              json_out)


def _fail(message: str, code: int, json_out: bool):
    """One ``error:`` line on stderr (and the JSON error document on stdout with --json), then exit ``code``."""
    from .distributed import is_main

    err_console.print(f"error: {message}", highlight=False, markup=False, soft_wrap=True)
    if json_out and is_main() and not _state["emitted"]:  # exit 7 follows its result document: no second one
        sys.stdout.write(json.dumps({"error": message, "exit_code": code}) + "\n")
        sys.stdout.flush()
    raise typer.Exit(code)


def _rank_prefix() -> str:
    from .distributed import info

    return f"[rank {info().rank}] " if info().rank else ""


def _stage_help(stage: str, text: str) -> str:
    return f"{text} Defaults: lr {defaults.LR[stage]}, batch {defaults.BATCH_SIZE[stage]}, {defaults.EPOCHS} epochs."


def _data_opts(data, task, img_size, val_fraction, download, cache, hflip, skip_bad, workers, augment=True):
    from .stages import DataOptions

    return DataOptions(data=data, task=task, img_size=img_size, val_fraction=val_fraction, download=download,
                       cache=cache, hflip=hflip, skip_bad=skip_bad, workers=workers, augment=augment)


def _render_stage(result: dict) -> None:
    parts = [f"{result['stage']} done"]
    if result.get("val_acc") is not None:
        kept = f" (epoch {result['kept_epoch']} of {result['epochs']}, best on validation)" if (
            result.get("kept_epoch") and result.get("kept_epoch") != result.get("epochs")) else ""
        parts.append(f"val_acc {result['val_acc']:.2f}%{kept}")
    if result.get("test_acc") is not None:
        parts.append(f"test_acc {result['test_acc']:.2f}% (held out)")
    if isinstance(result.get("macs"), int):
        parts.append(f"{result['macs'] / 1e6:.1f} MMACs")
    if "run" in result:
        parts.append(f"in {result['run']}")
    print(", ".join(parts))


# --------------------------------------------------------------------------- commands
def _version(value: bool) -> None:
    if value:
        print(f"nettailor {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
):
    """Tailor pretrained CNNs to new tasks by changing the architecture, not just the weights."""


@app.command(help=_stage_help("teacher", "Stage 1: fine-tune the whole backbone (new classifier) on the task."))
def teacher(
    config: Config = None, data: Data = None, backbone: Backbone = "resnet34", output: Output = None,
    pretrained: Pretrained = True, weights: Weights = None, task: Task = None, img_size: ImgSize = None,
    val_fraction: ValFraction = None, download: Download = False, cache: Cache = False, hflip: Hflip = None,
    skip_bad: SkipBad = False, workers: Workers = None, augment: Augment = True, epochs: Epochs = defaults.EPOCHS,
    batch_size: BatchSize = None, lr: Lr = None, lr_step: LrStep = None, seed: Seed = 0, device: Device = "auto",
    amp: Amp = None, amp_dtype: AmpDtype = "bfloat16", compile_model: Compile = False,
    channels_last: ChannelsLast = None, resume: Resume = False, overwrite: Overwrite = False,
    clip_grad: ClipGrad = None, keep_checkpoints: KeepCheckpoints = False, json_out: Json = False, debug: Debug = False,
):
    def body():
        from .stages import BackboneOptions, TrainOptions, train_teacher

        if data is None:
            raise _usage("--data is required (a dataset folder, torchvision:NAME, or 'digits')")
        run = output or _default_output(data, backbone)
        train = TrainOptions.for_stage("teacher", epochs=epochs, lr=lr, batch_size=batch_size, lr_step=lr_step,
                                       seed=seed, device=device, amp=amp, amp_dtype=amp_dtype, resume=resume,
                                       overwrite=overwrite, compile=compile_model, channels_last=channels_last,
                                       keep_checkpoints=keep_checkpoints, clip_grad=_clip_grad(clip_grad))
        rep = Reporter()
        try:
            result = train_teacher(run, BackboneOptions(backbone, pretrained, weights),
                                   _data_opts(data, task, img_size, val_fraction, download, cache, hflip, skip_bad,
                                              workers, augment), train, rep)
        finally:
            rep.close()
        _emit({"run": str(run), **result}, json_out, _render_stage)

    _execute(debug, body, json_out)


@app.command(help=_stage_help("tailor", "Stage 2: build the student (frozen blocks + proxies + attention) and "
                                        "train it."))
def tailor(
    config: Config = None, data: Data = None, backbone: Backbone = "resnet34", output: Output = None,
    teacher_run: Annotated[Optional[Path], typer.Option("--teacher", help="A finished teacher run; omitted: one "
                                                        "is trained first in RUN/teacher.")] = None,
    max_skip: Annotated[int, typer.Option("--max-skip", help="Proxies per layer (skips over 1..K blocks).")] = defaults.MAX_SKIP,
    complexity_weight: Annotated[float, typer.Option("--complexity-weight", help="g1, weight of E[C].")] = defaults.COMPLEXITY_WEIGHT,
    teacher_weight: Annotated[float, typer.Option("--teacher-weight", help="g2, weight of the teacher term.")] = defaults.TEACHER_WEIGHT,
    teacher_epochs: TeacherEpochs = None, teacher_lr: TeacherLr = None, teacher_batch_size: TeacherBatchSize = None,
    teacher_loss: TeacherLoss = defaults.TEACHER_LOSS,
    pretrained: Pretrained = True, weights: Weights = None, task: Task = None, img_size: ImgSize = None,
    val_fraction: ValFraction = None, download: Download = False, cache: Cache = False, hflip: Hflip = None,
    skip_bad: SkipBad = False, workers: Workers = None, augment: Augment = True, epochs: Epochs = defaults.EPOCHS,
    batch_size: BatchSize = None, lr: Lr = None, lr_step: LrStep = None, seed: Seed = 0, device: Device = "auto",
    amp: Amp = None, amp_dtype: AmpDtype = "bfloat16", compile_model: Compile = False,
    channels_last: ChannelsLast = None, resume: Resume = False, overwrite: Overwrite = False,
    clip_grad: ClipGrad = None, keep_checkpoints: KeepCheckpoints = False, json_out: Json = False, debug: Debug = False,
):
    def body():
        from .stages import BackboneOptions, TailorOptions, TrainOptions
        from .stages.tailor import tailor as run_tailor

        if data is None:
            raise _usage("--data is required (a dataset folder, torchvision:NAME, or 'digits')")
        run = output or _default_output(data, backbone)
        common = dict(seed=seed, device=device, amp=amp, amp_dtype=amp_dtype, keep_checkpoints=keep_checkpoints,
                      clip_grad=_clip_grad(clip_grad))
        t_train = TrainOptions.for_stage("teacher", epochs=teacher_epochs if teacher_epochs is not None else epochs,
                                         lr=teacher_lr, batch_size=teacher_batch_size, **common)
        train = TrainOptions.for_stage("tailor", epochs=epochs, lr=lr, batch_size=batch_size, lr_step=lr_step,
                                       resume=resume, overwrite=overwrite, compile=compile_model,
                                       channels_last=channels_last, **common)
        rep = Reporter()
        try:
            result = run_tailor(
                run, BackboneOptions(backbone, pretrained, weights),
                _data_opts(data, task, img_size, val_fraction, download, cache, hflip, skip_bad, workers, augment),
                train, TailorOptions(teacher=teacher_run, max_skip=max_skip, complexity_weight=complexity_weight,
                                     teacher_weight=teacher_weight, teacher_loss=teacher_loss, teacher_train=t_train),
                rep)
        finally:
            rep.close()
        _emit({"run": str(run), **result}, json_out, _render_stage)

    _execute(debug, body, json_out)


@app.command()
def prune(
    run: Annotated[Path, typer.Argument(help="A run directory with a finished 'tailor' stage.")],
    config: Config = None,
    threshold: Annotated[float, typer.Option("--threshold", help="Remove proxies with attention below this.")] = defaults.THRESHOLD,
    drop_blocks: Annotated[int, typer.Option("--drop-blocks", "-k", help="Remove the K universal blocks with the "
                                             "lowest attention.")] = 0,
    auto: Annotated[bool, typer.Option("--auto", help="Search K: the leanest network within --tolerance of the "
                                       "teacher (or the most accurate under --max-macs), then fine-tune it.")] = False,
    tolerance: Annotated[float, typer.Option("--tolerance", help="--auto: accuracy points allowed below the "
                                             "teacher on the validation split.")] = defaults.TOLERANCE,
    max_macs: Annotated[Optional[float], typer.Option("--max-macs", help="--auto: MACs budget, absolute or a "
                                                      "fraction (<= 1) of the full network.")] = None,
    search_epochs: Annotated[int, typer.Option("--search-epochs", help="--auto: fine-tuning epochs per "
                                               "candidate.")] = defaults.SEARCH_EPOCHS,
    epochs: Annotated[int, typer.Option("--epochs", help="--auto: epochs of the final fine-tuning.")] = defaults.EPOCHS,
    data: Data = None, cache: Cache = False, workers: Workers = None, batch_size: BatchSize = None, lr: Lr = None,
    seed: Seed = 0, device: Device = "auto", amp: Amp = None, clip_grad: ClipGrad = None, keep_checkpoints: KeepCheckpoints = False,
    overwrite: Overwrite = False, json_out: Json = False, debug: Debug = False,
):
    """Stage 3: remove low-attention proxies and the K weakest blocks, then everything orphaned."""

    def body():
        from .stages import SearchOptions, TrainOptions, auto_prune
        from .stages.prune import prune as run_prune

        if auto and drop_blocks:
            raise _usage("--auto searches K itself; drop --drop-blocks (or drop --auto to prune exactly K blocks)")
        rep = Reporter()
        if not auto:
            result = run_prune(run, threshold=threshold, drop_blocks=drop_blocks, overwrite=overwrite, callbacks=rep)
            _emit({"run": str(run), **result}, json_out, _render_stage)
            return
        d = _data_opts(data, None, None, None, False, cache, None, False, workers)
        mk = lambda n: TrainOptions.for_stage("finetune", epochs=n, lr=lr, batch_size=batch_size, seed=seed,
                                              device=device, amp=amp, keep_checkpoints=keep_checkpoints,
                                              clip_grad=_clip_grad(clip_grad))
        try:
            result = auto_prune(run, d, mk(search_epochs), mk(epochs),
                                SearchOptions(tolerance=tolerance, max_macs=max_macs, search_epochs=search_epochs,
                                              threshold=threshold), overwrite=overwrite, callbacks=rep)
        finally:
            rep.close()
        _emit(result, json_out, _render_search)
        _fail_on_tolerance(result)

    _execute(debug, body, json_out)


def _render_search(result: dict) -> None:
    render_frontier(result["search"])
    _render_stage(result)


def _fail_on_tolerance(result: dict) -> None:
    if result.get("error"):
        from .errors import ToleranceError

        raise ToleranceError(result["error"])


@app.command(help=_stage_help("finetune", "Stage 4: retrain the pruned student (complexity weight 0, teacher term "
                                          "on)."))
def finetune(
    run: Annotated[Path, typer.Argument(help="A run directory with a finished 'prune' stage.")],
    config: Config = None,
    teacher_weight: Annotated[float, typer.Option("--teacher-weight", help="g2, weight of the teacher term.")] = defaults.TEACHER_WEIGHT,
    data: Data = None, task: Task = None, cache: Cache = False, skip_bad: SkipBad = False, workers: Workers = None,
    augment: Augment = True, epochs: Epochs = defaults.EPOCHS, batch_size: BatchSize = None, lr: Lr = None,
    lr_step: LrStep = None, seed: Seed = 0, device: Device = "auto", amp: Amp = None, amp_dtype: AmpDtype = "bfloat16",
    compile_model: Compile = False, channels_last: ChannelsLast = None, resume: Resume = False,
    overwrite: Overwrite = False, clip_grad: ClipGrad = None, keep_checkpoints: KeepCheckpoints = False,
    json_out: Json = False, debug: Debug = False,
):
    def body():
        from .stages import TrainOptions
        from .stages.finetune import finetune as run_finetune

        train = TrainOptions.for_stage("finetune", epochs=epochs, lr=lr, batch_size=batch_size, lr_step=lr_step,
                                       seed=seed, device=device, amp=amp, amp_dtype=amp_dtype, resume=resume,
                                       overwrite=overwrite, compile=compile_model, channels_last=channels_last,
                                       keep_checkpoints=keep_checkpoints, clip_grad=_clip_grad(clip_grad))
        rep = Reporter()
        try:
            result = run_finetune(run, _data_opts(data, task, None, None, False, cache, None, skip_bad, workers,
                                                  augment), train, teacher_weight=teacher_weight, callbacks=rep)
        finally:
            rep.close()
        _emit({"run": str(run), **result}, json_out, _render_stage)

    _execute(debug, body, json_out)


def _export_dir(export_dir: Path | None, out: Path | None) -> Path | None:
    """``--export-dir``, or the deprecated ``--out`` (with a one-line warning)."""
    if out is None:
        return export_dir
    if export_dir is not None:
        raise _usage("--out is the old name of --export-dir; pass only --export-dir")
    err_console.print("warning: --out is deprecated; use --export-dir (same meaning)", highlight=False, markup=False)
    return out


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="A run directory (its latest student stage is exported).")],
    export_dir: ExportDir = None, out: OldOut = None,
    task_name: Annotated[Optional[str], typer.Option("--task-name", help="Name of the task in the export "
                                                     "[default: the dataset's name].")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace this task's adapter if the export "
                                            "directory already holds it.")] = False,
    json_out: Json = False, debug: Debug = False,
):
    """Stage 5: write the task's adapter beside the shared frozen backbone."""

    def body():
        from .adapter import export_task

        target = _export_dir(export_dir, out)
        if target is None:
            raise _usage("--export-dir is required (the export directory: shared backbone + one folder per task)")
        result = export_task(run, target, task_name=task_name, overwrite=overwrite)
        _emit(result, json_out, lambda r: print(
            f"exported task '{r['task']}' ({r['stage']}) to {r['export_dir']}: adapter {r['adapter_bytes'] / 1e6:.2f} MB, "
            f"shared backbone {r['backbone_bytes'] / 1e6:.1f} MB ({'reused' if r['backbone_reused'] else 'written'})"))

    _execute(debug, body, json_out)


@app.command()
def report(
    path: Annotated[Path, typer.Argument(help="A run directory or an export directory.")],
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Also draw the block-usage diagram to FILE.png or "
                                                 "FILE.svg (needs matplotlib: pip install matplotlib).")] = None,
    json_out: Json = False, debug: Debug = False,
):
    """Stage 6: per-task block usage (blocks, proxies, attention), params, MACs, accuracy."""

    def body():
        from .report import report_path

        result = report_path(path)
        if plot is not None:
            from .plot import plot_block_usage

            result["plot"] = str(plot_block_usage(result, plot))
        _emit(result, json_out, render_report)

    _execute(debug, body, json_out)


@app.command()
def predict(
    export_dir: Annotated[Path, typer.Argument(help="An export directory (shared backbone + task adapters).")],
    images: Annotated[list[Path], typer.Argument(help="Image files or folders of images.")],
    task: Annotated[Optional[list[str]], typer.Option("--task", help="Task to run (repeatable) [default: all].")] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="Classes to show per image.")] = 5,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 32,
    device: Device = "auto", json_out: Json = False, debug: Debug = False,
):
    """Run exported tasks on images: one shared backbone, each task's own tailored network."""

    def body():
        from .predict import predict as run_predict
        from .train import resolve_device

        if top_k <= 0 or batch_size <= 0:
            raise _usage("--top-k and --batch-size must be positive")
        result = run_predict(export_dir, images, tasks=task, top_k=top_k, batch_size=batch_size,
                             device=resolve_device(device))

        def render(r):
            print("task\timage\tpredictions")  # tab-separated, one line per image and task, best class first
            for p in r["predictions"]:
                best = ", ".join(f"{t['class']} {100 * t['prob']:.1f}%" for t in p["top"])
                print(f"{p['task']}\t{p['image']}\t{best}")

        _emit(result, json_out, render)

    _execute(debug, body, json_out)


@app.command()
def run(
    config: Config = None, data: Data = None, backbone: Backbone = "resnet34", output: Output = None,
    export_dir: Annotated[Optional[Path], typer.Option("--export-dir", help="Export directory for the adapter "
                                                       "[default: RUN/export].")] = None,
    out: OldOut = None, pretrained: Pretrained = True, weights: Weights = None, task: Task = None,
    img_size: ImgSize = None, val_fraction: ValFraction = None, download: Download = False, cache: Cache = False,
    hflip: Hflip = None, skip_bad: SkipBad = False, workers: Workers = None,
    epochs: Annotated[int, typer.Option("--epochs", help="Epochs of each training stage (see --STAGE-epochs).")] = defaults.EPOCHS,
    teacher_epochs: TeacherEpochs = None, teacher_lr: TeacherLr = None, teacher_batch_size: TeacherBatchSize = None,
    tailor_epochs: TailorEpochs = None, tailor_lr: TailorLr = None, tailor_batch_size: TailorBatchSize = None,
    finetune_epochs: FinetuneEpochs = None, finetune_lr: FinetuneLr = None,
    finetune_batch_size: FinetuneBatchSize = None,
    threshold: Annotated[float, typer.Option("--threshold", help="Remove paths with attention below this.")] = defaults.THRESHOLD,
    drop_blocks: Annotated[Optional[int], typer.Option("--drop-blocks", "-k", help="Drop exactly K blocks "
                                                       "[default: search K automatically].")] = None,
    tolerance: Annotated[float, typer.Option("--tolerance", help="Accuracy points allowed below the teacher; "
                                             "the exit code is 7 when the chosen network misses it.")] = defaults.TOLERANCE,
    max_macs: Annotated[Optional[float], typer.Option("--max-macs", help="MACs budget instead of a tolerance.")] = None,
    search_epochs: Annotated[int, typer.Option("--search-epochs", help="Fine-tuning epochs of each K search "
                                               "candidate.")] = defaults.SEARCH_EPOCHS,
    max_skip: Annotated[int, typer.Option("--max-skip", help="Proxies per layer (skips over 1..K blocks).")] = defaults.MAX_SKIP,
    teacher_loss: TeacherLoss = defaults.TEACHER_LOSS,
    seed: Seed = 0, device: Device = "auto", amp: Amp = None, resume: Resume = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start the run again: remove what nettailor wrote "
                                            "in its directory first.")] = False,
    clip_grad: ClipGrad = None, keep_checkpoints: KeepCheckpoints = False, json_out: Json = False, debug: Debug = False,
):
    """The whole pipeline in one command: teacher, tailor, prune, finetune, export, report."""

    def body():
        from .stages import BackboneOptions, SearchOptions, TailorOptions, TrainOptions, run_pipeline

        if data is None:
            raise _usage("--data is required (a dataset folder, torchvision:NAME, or 'digits')")
        if epochs <= 0:
            raise _usage(f"--epochs must be positive, got {epochs}")
        target = _export_dir(export_dir, out)
        common = dict(seed=seed, device=device, amp=amp, keep_checkpoints=keep_checkpoints, clip_grad=_clip_grad(clip_grad))
        stage = lambda name, n, lr, bs: TrainOptions.for_stage(name, epochs=epochs if n is None else n, lr=lr,
                                                               batch_size=bs, **common)
        run_dir = output or _default_output(data, backbone)
        rep = Reporter()
        try:
            result = run_pipeline(
                run_dir, target, BackboneOptions(backbone, pretrained, weights),
                _data_opts(data, task, img_size, val_fraction, download, cache, hflip, skip_bad, workers),
                TailorOptions(max_skip=max_skip, teacher_loss=teacher_loss,
                              teacher_train=stage("teacher", teacher_epochs, teacher_lr, teacher_batch_size)),
                stage("tailor", tailor_epochs, tailor_lr, tailor_batch_size),
                stage("finetune", finetune_epochs, finetune_lr, finetune_batch_size),
                SearchOptions(tolerance=tolerance, max_macs=max_macs, search_epochs=search_epochs, threshold=threshold),
                drop_blocks, resume=resume, overwrite=overwrite, callbacks=rep)
        finally:
            rep.close()
        _emit(result, json_out, render_report)
        _fail_on_tolerance(result)

    _execute(debug, body, json_out)


def _clip_grad(value: float | None) -> float | None:
    """``--clip-grad``: not given -> the default, 0 -> no clipping (``None`` in the core)."""
    if value is None:
        return defaults.CLIP_GRAD
    return None if value == 0 else value


def _usage(message: str) -> TailorError:
    from .errors import UsageError

    return UsageError(message)


# --------------------------------------------------------------------------- report rendering
def _fmt_n(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _fmt_acc(a) -> str:
    return f"{a:.2f}" if isinstance(a, (int, float)) else "-"


def _stdout_console() -> Console:
    """Rich on a terminal; on a pipe or file plain ASCII, never wrapped (so ``grep`` finds whole lines)."""
    if sys.stdout.isatty():
        return Console(file=sys.stdout)
    return Console(file=sys.stdout, width=10_000, no_color=True, highlight=False, emoji=False, soft_wrap=True)


def _table(title: str) -> Table:
    return Table(title=title, title_justify="left", box=box.HEAVY_HEAD if sys.stdout.isatty() else box.ASCII)


def render_report(result: dict) -> None:
    """Rich tables on a terminal; the same content as plain ASCII text when stdout is a pipe or file."""
    from .report import LAYER_STATUS, layer_status

    console = _stdout_console()
    for rep in result["tasks"]:
        t = rep["totals"]
        table = _table(f"task '{rep['task']}': its network after the '{rep['stage']}' stage "
                       f"({rep['backbone']} at {rep['img_size']} px)")
        for col in ("layer", "block", "universal block", "alpha", "proxies (from node: alpha)", "params", "MACs"):
            table.add_column(col, justify="right" if col in ("layer", "params", "MACs", "alpha") else "left")
        for l in rep["layers"]:
            prox = ", ".join(f"{p['from_node']}: {p['alpha']:.2f}" for p in l["proxies"]) or "-"
            table.add_row(str(l["layer"]), l["block"], layer_status(l["block_kept"], bool(l["proxies"])),
                          f"{l['block_alpha']:.2f}" if l["block_alpha"] is not None else "-", prox,
                          _fmt_n(l["params"]), _fmt_n(l["macs"]))
        console.print(table)
        console.print(
            f"blocks kept {t['blocks_kept']}/{t['blocks_total']}, proxies {t['proxies_kept']}; "
            f"params: shared {_fmt_n(t['params_shared'])} + task {_fmt_n(t['params_task'])} = {_fmt_n(t['params_total'])} "
            f"({100 * t['params_total'] / t['params_full']:.1f}% of the fine-tuned network's {_fmt_n(t['params_full'])}); "
            f"MACs {_fmt_n(t['macs'])} ({100 * t['macs_fraction']:.1f}% of {_fmt_n(t['macs_full'])}); "
            + _accuracy_line(rep["accuracy"], rep.get("split_sizes"))
            + (f"; adapter {t['adapter_bytes'] / 1e6:.2f} MB" if t.get("adapter_bytes") else ""),
            highlight=False,
        )
    console.print("universal block: " + ", ".join(f"{k} = {v}" for k, v in LAYER_STATUS.items())
                  + "; alpha = the attention on the block's path; proxies = the node each reads (0: the stem) "
                  "and its attention", highlight=False)
    if "export" in result:  # `run`: where the adapter went
        e = result["export"]
        console.print(f"exported task '{e['task']}' to {e['export_dir']}: adapter {e['adapter_bytes'] / 1e6:.2f} MB, "
                      f"shared backbone {e['backbone_bytes'] / 1e6:.1f} MB", highlight=False)
    for rep in result["tasks"]:
        if rep.get("search"):
            render_frontier(rep["search"], console)
    m = result["matrix"]
    if len(m["tasks"]) > 1:
        table = _table("block usage across tasks")
        table.add_column("block")
        for name in m["tasks"]:
            table.add_column(name, justify="center")
        for block, row in zip(m["blocks"], m["cells"]):
            table.add_row(block, *[_usage_cell(c) for c in row])
        console.print(table)
        console.print("B = the universal block runs; +n = n proxies enter the layer (B+2: the block and 2 proxies; "
                      "+3: 3 proxies stand in for the dropped block); . = the layer is skipped", highlight=False)
    if "totals" in result:
        tt = result["totals"]
        console.print(
            f"{tt['tasks']} tasks on one backbone: {tt['disk_bytes'] / 1e6:.1f} MB on disk "
            f"(backbone {tt['backbone_bytes'] / 1e6:.1f} MB + adapters {tt['adapter_bytes'] / 1e6:.1f} MB) vs "
            f"{tt['finetune_bytes'] / 1e6:.1f} MB for one fine-tuned network per task; "
            f"params {_fmt_n(tt['params'])} vs {_fmt_n(tt['finetune_params'])}",
            highlight=False,
        )


def _usage_cell(cell: dict) -> str:
    """``B``, ``B+2``, ``+3`` or ``.``: the block, the proxies entering the layer, or neither."""
    proxies = f"+{cell['proxies']}" if cell["proxies"] else ""
    return ("B" + proxies) if cell["block"] else (proxies or ".")


def _accuracy_line(acc: dict, sizes: dict | None) -> str:
    """``accuracy val 98.61% vs teacher 99.17% (287 images, chose K and epochs); test ...`` (reported only)."""
    sizes = sizes or {}

    def split(name: str, role: str) -> str:
        n = sizes.get(name)
        where = f"{n} images, {role}" if n else role
        return f"{name} {_fmt_acc(acc.get(name))}% vs teacher {_fmt_acc(acc.get('teacher_' + name))}% ({where})"

    text = "accuracy " + split("val", "used for choices")
    if acc.get("test") is not None or acc.get("teacher_test") is not None:
        text += "; " + split("test", "held out, reported only")
    return text


def render_frontier(search: dict, console: Console | None = None) -> None:
    """The K search: every K, the network it gives, and for those tried the paired comparison."""
    console = console or _stdout_console()
    ref = search.get("reference_k")
    basis = (f"each candidate vs K={ref} after {search['search_epochs']} epochs on {search.get('val_images', '?')} "
             f"validation images; tolerance {search['tolerance']} points + noise" if ref is not None else "budget")
    table = _table(f"architecture search (tried {search['candidates_tried']} of "
                   f"{search.get('distinct_networks', search['k_values'])} distinct networks; {basis})")
    for col in ("K", "blocks kept", "proxies", "params", "MACs", "of full", "val acc", "vs ref (allowed)", ""):
        table.add_column(col, justify="right")
    for row in search["frontier"]:
        if row["status"] == "disconnected":
            table.add_row(str(row["k"]), "-", "-", "-", "-", "-", "disconnected", "", "")
            continue
        cmp = row.get("comparison")
        vs = f"{cmp['diff']:+.2f} (>= {-(cmp['tolerance'] + cmp['margin']):.2f})" if cmp and row["k"] != ref else ""
        status = {"tried": _fmt_acc(row.get("val_acc")), "same": f"= K={row.get('same_as')}"}.get(row["status"], "not tried")
        verdict = "chosen" if row["chosen"] else ("reference" if row["k"] == ref else
                                                  "rejected" if cmp and not cmp["accepted"] else "")
        table.add_row(str(row["k"]), str(row["blocks_kept"]), str(row["proxies_kept"]), _fmt_n(row["params"]),
                      _fmt_n(row["macs"]), f"{100 * row['macs_fraction']:.0f}%", status, vs, verdict)
    console.print(table)
    final = search.get("final_vs_teacher")
    if final:
        console.print(f"final network vs teacher on validation: {final['candidate_acc']:.2f}% vs {final['reference_acc']:.2f}% "
                      f"({final['diff']:+.2f} points; allowed {-(final['tolerance'] + final['margin']):.2f}): "
                      + ("within tolerance" if final["accepted"] else "MISSED"), highlight=False)


def main() -> None:
    """Console-script entry point (also under torchrun: the process group comes from the environment)."""
    from .distributed import cleanup, setup

    try:
        setup()
    except Exception as err:  # a rendezvous that fails is an environment problem, not a bug
        print(f"error: could not start the distributed process group ({err}); check the torchrun arguments",
              file=sys.stderr)
        raise SystemExit(EXIT_USAGE)
    try:
        code = _invoke(sys.argv[1:])
    finally:
        cleanup()
    raise SystemExit(code)


def _invoke(argv: list[str]) -> int:
    """Run the app; click's own parsing errors become one ``error:`` line and exit 2, like ours."""
    try:
        code = app(args=argv, prog_name="nettailor", standalone_mode=False)
    except typer.Abort:
        err_console.print("error: interrupted", highlight=False, markup=False)
        return EXIT_SIGINT
    except Exception as err:
        # click's exceptions (typer vendors click in recent versions, so match by shape, not class)
        if not (hasattr(err, "format_message") and isinstance(getattr(err, "exit_code", None), int)):
            raise
        if type(err).__name__ == "NoArgsIsHelpError":  # `nettailor` alone prints the help
            err.show()
            return err.exit_code
        ctx = getattr(err, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        try:
            _fail(err.format_message() + hint, EXIT_USAGE if err.exit_code == 2 else err.exit_code, "--json" in argv)
        except typer.Exit as exit_:
            return exit_.exit_code
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    main()
