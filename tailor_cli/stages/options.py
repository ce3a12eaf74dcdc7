"""The options of each stage, their defaults (``tailor_cli.defaults``) and the settings a stage records."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .. import defaults
from ..errors import UsageError
from ..losses import TEACHER_LOSSES
from ..schedule import SCHEDULES
from ..train import TrainConfig
from ..weights import PKG_PREFIX, resolve_weights_path


@dataclass
class DataOptions:
    data: str | None = None
    task: str | None = None
    img_size: int | None = None
    val_fraction: float | None = None
    split_seed: int | None = None  # None: the run's, else defaults.SPLIT_SEED
    download: bool = False
    cache: bool = False
    hflip: bool | None = None
    skip_bad: bool = False
    workers: int | None = None
    augment: bool = True


@dataclass
class TrainOptions:
    epochs: int = defaults.EPOCHS["tailor"]
    batch_size: int = defaults.BATCH_SIZE["tailor"]
    lr: float = defaults.LR["tailor"]
    lr_step: int | None = None  # schedule "step": default 40% of the epochs (SVHN demo: 20 epochs, decay every 8)
    schedule: str = defaults.SCHEDULE
    warmup_epochs: float = defaults.WARMUP_EPOCHS["tailor"]
    label_smoothing: float = defaults.LABEL_SMOOTHING
    weight_decay: float = defaults.WEIGHT_DECAY  # none on the attention logits, whatever this is
    nesterov: bool = defaults.NESTEROV
    seed: int = 0
    device: str = "auto"
    amp: bool | None = None  # None: on for CUDA (bf16)
    amp_dtype: str = "bfloat16"
    channels_last: bool | None = None  # None: on for CUDA
    compile: bool = False  # torch.compile the training forward
    clip_grad: float | None = defaults.CLIP_GRAD  # max gradient norm of the weights per step; None: off
    resume: bool = False
    overwrite: bool = False
    keep_checkpoints: bool = False  # keep checkpoint.safetensors (and best.safetensors) once the stage is done

    @classmethod
    def for_stage(cls, stage: str, *, epochs: int | None = None, lr: float | None = None,
                  batch_size: int | None = None, warmup_epochs: float | None = None,
                  schedule: str | None = None, label_smoothing: float | None = None,
                  weight_decay: float | None = None, nesterov: bool | None = None, **rest) -> "TrainOptions":
        """Options of a training stage (teacher, tailor, finetune), its defaults (``defaults.py``) for those not given."""
        return cls(epochs=defaults.EPOCHS[stage] if epochs is None else epochs, lr=defaults.LR[stage] if lr is None else lr,
                   batch_size=defaults.BATCH_SIZE[stage] if batch_size is None else batch_size,
                   warmup_epochs=defaults.WARMUP_EPOCHS[stage] if warmup_epochs is None else warmup_epochs,
                   schedule=defaults.SCHEDULE if schedule is None else schedule,
                   label_smoothing=defaults.LABEL_SMOOTHING if label_smoothing is None else label_smoothing,
                   weight_decay=defaults.WEIGHT_DECAY if weight_decay is None else weight_decay,
                   nesterov=defaults.NESTEROV if nesterov is None else nesterov, **rest)

    def validate(self, flag: str = "") -> None:
        """``flag``: the prefix of the options as the command names them (``teacher-`` for ``--teacher-epochs``)."""
        if self.epochs <= 0:
            raise UsageError(f"--{flag}epochs must be positive, got {self.epochs}")
        if self.batch_size <= 0:
            raise UsageError(f"--{flag}batch-size must be positive, got {self.batch_size}")
        if not self.lr > 0:
            raise UsageError(f"--{flag}lr must be positive, got {self.lr}")
        if self.lr_step is not None and self.lr_step <= 0:
            raise UsageError(f"--lr-step must be positive, got {self.lr_step}; leave it out for 40% of --epochs")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise UsageError(f"--clip-grad must be positive, got {self.clip_grad}; pass --clip-grad 0 to train unclipped")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"--schedule must be one of {', '.join(SCHEDULES)}, got '{self.schedule}'")
        if not self.warmup_epochs >= 0:
            raise UsageError(f"--warmup-epochs must be >= 0, got {self.warmup_epochs}")
        if not 0 <= self.label_smoothing < 1:
            raise UsageError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if not self.weight_decay >= 0:
            raise UsageError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.resume and self.overwrite:
            raise UsageError("--resume and --overwrite exclude each other")
        if self.amp_dtype not in ("bfloat16", "float16"):
            raise UsageError(f"--amp-dtype must be bfloat16 or float16, got '{self.amp_dtype}'")

    def config(self, device: torch.device) -> TrainConfig:
        amp = self.amp if self.amp is not None else device.type == "cuda"
        cl = self.channels_last if self.channels_last is not None else device.type == "cuda"
        return TrainConfig(
            epochs=self.epochs, lr=self.lr, lr_step=self.lr_step or max(1, round(0.4 * self.epochs)),
            schedule=self.schedule, warmup_epochs=self.warmup_epochs, label_smoothing=self.label_smoothing,
            weight_decay=self.weight_decay, nesterov=self.nesterov,
            seed=self.seed, amp=amp, amp_dtype=self.amp_dtype, channels_last=cl,
            check_every=1 if device.type == "cpu" else 50, clip_grad=self.clip_grad,
        )


@dataclass
class BackboneOptions:
    name: str = "resnet34"
    pretrained: bool = True
    weights: Path | None = None


@dataclass
class TailorOptions:
    teacher: Path | None = None
    max_skip: int = defaults.MAX_SKIP
    complexity_weight: float = defaults.COMPLEXITY_WEIGHT
    teacher_weight: float = defaults.TEACHER_WEIGHT
    teacher_loss: str = defaults.TEACHER_LOSS  # "mse" (the paper's form) or "relative" (scale-free); see losses.teacher_term
    train_bn: bool = defaults.TRAIN_BN  # also train the frozen blocks' BatchNorm scale and shift, per task (Student)
    kd_weight: float = defaults.KD_WEIGHT  # logit distillation at kd_temperature (losses.logit_distillation)
    kd_temperature: float = defaults.KD_TEMPERATURE
    attention_slow_epochs: int | None = None  # None: defaults.ATTENTION_SLOW_SHARE of the tailor epochs
    attention_slow_factor: float = defaults.ATTENTION_SLOW_FACTOR
    teacher_train: TrainOptions = field(default_factory=lambda: TrainOptions.for_stage("teacher"))  # trained in the run

    def validate(self) -> None:
        if self.max_skip < 1:
            raise UsageError(f"--max-skip must be at least 1, got {self.max_skip}")
        if self.complexity_weight < 0 or self.teacher_weight < 0:
            raise UsageError("--complexity-weight and --teacher-weight must be >= 0")
        if self.kd_weight < 0:
            raise UsageError(f"--kd-weight must be >= 0, got {self.kd_weight}")
        if not self.kd_temperature > 0:
            raise UsageError(f"--kd-temperature must be > 0, got {self.kd_temperature}")
        if self.attention_slow_epochs is not None and self.attention_slow_epochs < 0:
            raise UsageError(f"--attention-slow-epochs must be >= 0 (0: off), got {self.attention_slow_epochs}")
        if not 0 <= self.attention_slow_factor <= 1:
            raise UsageError(f"--attention-slow-factor must be between 0 and 1, got {self.attention_slow_factor}")
        if self.teacher_loss not in TEACHER_LOSSES:
            raise UsageError(f"--teacher-loss must be one of {', '.join(TEACHER_LOSSES)}, got '{self.teacher_loss}'")

    def slow_epochs(self, epochs: int) -> int:
        """The tailor epochs at whose start the attention logits learn at ``attention_slow_factor`` times the rate."""
        if self.attention_slow_epochs is not None:
            return min(self.attention_slow_epochs, epochs)
        return round(defaults.ATTENTION_SLOW_SHARE * epochs)


@dataclass
class SearchOptions:
    tolerance: float = defaults.TOLERANCE  # accuracy points below the teacher's validation accuracy
    max_macs: float | None = None  # absolute MACs, or a fraction of the full network when <= 1
    search_epochs: int = defaults.SEARCH_EPOCHS
    threshold: float = defaults.THRESHOLD
    noise_allowance: bool = False  # also accept a final network below the tolerance by no more than the noise
    fallbacks: int = defaults.FALLBACKS  # less pruned networks fine-tuned in turn when the chosen one misses

    def validate(self) -> None:
        if not 0.0 <= self.threshold < 1.0:
            raise UsageError(f"--threshold must be in [0, 1), got {self.threshold}")
        if self.tolerance < 0:
            raise UsageError(f"--tolerance must be >= 0, got {self.tolerance}")
        if self.search_epochs <= 0:
            raise UsageError(f"--search-epochs must be positive, got {self.search_epochs}")
        if self.fallbacks < 0:
            raise UsageError(f"--fallbacks must be >= 0, got {self.fallbacks}")
        if self.max_macs is not None and not self.max_macs > 0:
            raise UsageError(f"--max-macs must be positive, got {self.max_macs}")


def with_run_data(opts: DataOptions, run_meta: dict | None) -> DataOptions:
    """The data options a stage uses: each one not given takes the run's record (``run.json`` "data").

    The run's first stage records them; a later stage that names the value the run already uses
    makes no change. The one place where "the given value, else the run's" is decided.
    """
    saved = (run_meta or {}).get("data", {})
    return replace(
        opts,
        data=opts.data or saved.get("path"),
        task=opts.task or saved.get("task"),
        img_size=opts.img_size if opts.img_size is not None else saved.get("img_size"),
        val_fraction=opts.val_fraction if opts.val_fraction is not None else saved.get("val_fraction",
                                                                                         defaults.VAL_FRACTION),
        hflip=opts.hflip if opts.hflip is not None else saved.get("hflip"),
        split_seed=opts.split_seed if opts.split_seed is not None else saved.get("seed", defaults.SPLIT_SEED),
        skip_bad=opts.skip_bad or bool(saved.get("skip_bad", False)),
    )


def data_path(data: str) -> str:
    """``--data`` as a run records it: a folder by its absolute path; ``digits`` and ``torchvision:NAME`` as given."""
    from ..data.layouts import EMBEDDED_DIGITS

    p = Path(data)
    return str(p.resolve()) if data != EMBEDDED_DIGITS and p.exists() else data


def stage_settings(train: TrainOptions, device: torch.device, data: DataOptions | None = None,
                   bb: BackboneOptions | None = None, run_meta: dict | None = None, **extra) -> dict:
    """What a stage's result depends on, resolved: recorded in its config.json, compared on --resume.

    Options not given take the run's values (``run.json``) and defaults are resolved (``lr_step``,
    ``amp`` for the device), so naming a value the run already uses is no change. Options that
    only change speed (device, workers, cache, compile, channels-last) are left out.
    """
    cfg = train.config(device)
    out = {"epochs": train.epochs, "batch_size": train.batch_size, "lr": train.lr, "schedule": cfg.schedule,
           "lr_step": cfg.lr_step, "warmup_epochs": cfg.warmup_epochs, "label_smoothing": cfg.label_smoothing,
           "weight_decay": cfg.weight_decay, "nesterov": cfg.nesterov,
           "seed": train.seed, "amp": cfg.amp, "amp_dtype": cfg.amp_dtype if cfg.amp else None,
           "clip_grad": cfg.clip_grad if cfg.clip_grad is not None else "off"}
    if data is not None:
        used = with_run_data(data, run_meta)
        out |= {"data": data_path(used.data) if used.data else None, "task": used.task, "img_size": used.img_size,
                "val_fraction": used.val_fraction, "split_seed": used.split_seed, "hflip": used.hflip, "augment": used.augment,
                "skip_bad": used.skip_bad}
    if bb is not None:
        out |= {"backbone": bb.name, "pretrained": bb.pretrained,
                "weights": str(resolve_weights_path(bb.weights).resolve()) if bb.weights else None}
    return out | extra


RUN_DATA = ("img_size", "val_fraction", "split_seed", "hflip")  # data settings only the run's first stage takes


def recorded_options(settings: dict, train: TrainOptions, data: DataOptions, *, drop: tuple[str, ...] = (), **extra) -> dict:
    """A stage's options under its command's names: what ``nettailor <stage> -c STAGE/config.json`` reads back.

    Its ``settings`` (with defaults resolved), the options that change only speed, and ``extra``;
    values left unset are left out, so they resolve again as they did here.
    """
    speed = {"device": train.device, "workers": data.workers, "cache": data.cache, "compile": train.compile,
             "channels_last": train.channels_last, "keep_checkpoints": train.keep_checkpoints}
    options = json.loads(json.dumps({**settings, **speed, **extra}, default=str))
    if options.get("clip_grad") == "off":  # recorded as "off" in the settings; the option says it as 0
        options["clip_grad"] = 0
    return {key: value for key, value in options.items() if value is not None and key not in drop}


def weights_option(bb: BackboneOptions) -> str | None:
    """``--weights`` as a record gives it back: ``pkg:NAME`` as given, a file by its absolute path."""
    if bb.weights is None or str(bb.weights).startswith(PKG_PREFIX):
        return None if bb.weights is None else str(bb.weights)
    return str(Path(bb.weights).resolve())
