"""Benchmark the data loader against a CPU training step.

Reports images/s of the loader alone (one epoch over the train split, with and without
``cache=True``, default worker count for the device) and of a plain timm backbone's train step
(forward + backward + SGD, random inputs) at the same image size and batch size, and the ratio
loader / training. The loader should be several times faster than training, so that it never
limits a run.

    python examples/bench_data.py                      # generated GTSRB-like data, ~2000 images
    python examples/bench_data.py --data digits --json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from tailor_cli.data import default_num_workers, load_task_data, make_loader  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None,
                   help="dataset (folder, 'digits', torchvision:NAME); default: generated GTSRB-like data")
    p.add_argument("--task", default=None, help="Visual Decathlon task")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: default_num_workers)")
    p.add_argument("--train-steps", type=int, default=8, help="timed training steps")
    p.add_argument("--n-images", type=int, default=2000, help="size of the generated dataset")
    p.add_argument("--e2e", action="store_true", help="also time training steps fed by the cached loader")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args()


def generate(root: Path, n_images: int) -> Path:
    """GTSRB-layout data of about ``n_images`` 40x40 images (10 classes, 10 frames per track)."""
    from datagen import make_gtsrb

    n_classes, frames = 10, 10
    tracks = max(2, round(n_images / (n_classes * frames)))
    return make_gtsrb(root, n_classes=n_classes, tracks_per_class=tracks, frames_per_track=frames,
                      size=(40, 40), test_per_class=2)


def time_loader(data: str, cfg: dict, args: argparse.Namespace, cache: bool, device: torch.device) -> dict:
    t0 = time.perf_counter()
    td = load_task_data(data, data_config=cfg, img_size=args.img_size, task=args.task, cache=cache)
    setup_s = time.perf_counter() - t0
    nw = default_num_workers(device) if args.workers is None else args.workers
    loader = make_loader(td.train, batch_size=args.batch_size, train=True, device=device, num_workers=nw)
    t0 = time.perf_counter()
    n = 0
    for x, _ in loader:
        n += x.shape[0]
    epoch_s = time.perf_counter() - t0
    return {"cache": cache, "workers": nw, "setup_s": round(setup_s, 3), "epoch_s": round(epoch_s, 3),
            "images": n, "images_per_s": round(n / epoch_s, 1), "summary": td.summary(),
            "_loader": loader, "_classes": len(td.classes)}


def train_step_fn(backbone: str, num_classes: int, lr: float = 0.01):
    import timm

    model = timm.create_model(backbone, pretrained=False, num_classes=num_classes)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def time_training(args: argparse.Namespace, num_classes: int) -> dict:
    step = train_step_fn(args.backbone, num_classes)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    y = torch.randint(0, num_classes, (args.batch_size,))
    for _ in range(2):  # warm-up
        step(x, y)
    t0 = time.perf_counter()
    for _ in range(args.train_steps):
        step(x, y)
    s = time.perf_counter() - t0
    return {"backbone": args.backbone, "steps": args.train_steps, "threads": torch.get_num_threads(),
            "images_per_s": round(args.train_steps * args.batch_size / s, 1)}


def time_e2e(args: argparse.Namespace, loader, num_classes: int) -> dict:
    step = train_step_fn(args.backbone, num_classes)
    it = iter(loader)
    x, y = next(it)
    step(x, y)
    t0, n = time.perf_counter(), 0
    for i, (x, y) in enumerate(it):
        if i >= args.train_steps:
            break
        step(x, y)
        n += x.shape[0]
    return {"images_per_s": round(n / (time.perf_counter() - t0), 1)}


def main() -> None:
    args = parse_args()
    import timm

    device = torch.device("cpu")
    cfg = timm.data.resolve_data_config({}, model=timm.create_model(args.backbone, pretrained=False))
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data if args.data is not None else str(generate(Path(tmp) / "gtsrb", args.n_images))
        plain = time_loader(data, cfg, args, cache=False, device=device)
        cached = time_loader(data, cfg, args, cache=True, device=device)
        training = time_training(args, plain["_classes"])
        e2e = time_e2e(args, cached["_loader"], cached["_classes"]) if args.e2e else None
    result = {
        "data": args.data or f"generated GTSRB-like ({plain['summary']['train']} train images, 40x40)",
        "img_size": args.img_size, "batch_size": args.batch_size, "cpus": torch.get_num_threads(),
        "loader": {k: v for k, v in plain.items() if not k.startswith("_")},
        "loader_cached": {k: v for k, v in cached.items() if not k.startswith("_")},
        "training": training,
        "ratio_loader_vs_training": round(plain["images_per_s"] / training["images_per_s"], 2),
        "ratio_cached_loader_vs_training": round(cached["images_per_s"] / training["images_per_s"], 2),
    }
    if e2e is not None:
        result["training_fed_by_cached_loader"] = e2e
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"data: {result['data']}  img {args.img_size}px  batch {args.batch_size}  threads {result['cpus']}")
    for key in ("loader", "loader_cached"):
        r = result[key]
        print(f"{key:14s} workers={r['workers']}  setup {r['setup_s']:.2f}s  epoch {r['epoch_s']:.2f}s  "
              f"{r['images_per_s']:.0f} img/s")
    print(f"training       {args.backbone} fwd+bwd+SGD  {training['images_per_s']:.0f} img/s")
    if e2e is not None:
        print(f"training fed by cached loader  {e2e['images_per_s']:.0f} img/s")
    print(f"ratio loader/training: {result['ratio_loader_vs_training']:.1f}x (uncached), "
          f"{result['ratio_cached_loader_vs_training']:.1f}x (cached)")


if __name__ == "__main__":
    main()
