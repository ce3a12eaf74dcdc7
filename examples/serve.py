#!/usr/bin/env python
"""Classify images with every task of a nettailor export directory (one shared backbone).

    python examples/serve.py EXPORT_DIR image1.png image2.jpg [--task gtsrb] [--top-k 3]

The shared frozen backbone is loaded (and its sha256 checked) once; each task's adapter is
built on the same backbone tensors. Each task's eval transform is rebuilt from the input
settings recorded at export time with `tailor_cli.data.eval_transform` (resize, crop as timm's
crop_mode says, normalise), and images are read with `tailor_cli.data.open_image`: the very
functions validation used, so images are preprocessed exactly as during validation.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from tailor_cli.adapter import load_export
from tailor_cli.data import eval_transform, open_image
from tailor_cli.errors import TailorError
from tailor_cli.train import resolve_device


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("export_dir", type=Path, help="export directory (backbone.safetensors + one folder per task)")
    p.add_argument("images", type=Path, nargs="+", help="image files to classify")
    p.add_argument("--task", action="append", dest="tasks", metavar="NAME",
                   help="only this task (repeatable; default: every task in the export)")
    p.add_argument("--top-k", type=int, default=3, help="predictions shown per image and task (default: 3)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps (default: cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    if args.top_k < 1:
        print(f"error: --top-k must be at least 1, got {args.top_k}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        device = resolve_device(args.device)  # an unknown or absent device: one line, exit 2
        backbone, tasks = load_export(args.export_dir, args.tasks, device=device)
    except TailorError as err:
        print(f"error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 1)
    print(f"loaded {len(tasks)} task(s) on {backbone.config.get('name', backbone.config['architecture'])} "
          f"({backbone.num_bytes / 1e6:.1f} MB shared) in {time.perf_counter() - t0:.2f}s", file=sys.stderr)

    images = []
    for path in args.images:
        try:
            images.append(open_image(path))
        except OSError as err:
            print(f"error: cannot read image '{path}': {err}", file=sys.stderr)
            return 3

    results: dict[str, list[dict]] = {}
    for name, (model, config) in tasks.items():
        tf = eval_transform(config["input"])
        batch = torch.stack([tf(im) for im in images]).to(device)
        with torch.inference_mode():
            probs = model(batch).float().softmax(dim=1).cpu()
        k = min(args.top_k, probs.shape[1])
        top_p, top_i = probs.topk(k, dim=1)
        results[name] = [
            {"image": str(path), "top": [{"class": config["classes"][i], "index": int(i), "prob": round(float(p), 4)}
                                         for p, i in zip(top_p[n].tolist(), top_i[n].tolist())]}
            for n, path in enumerate(args.images)
        ]

    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for name, rows in results.items():
        print(f"== task '{name}'")
        for row in rows:
            preds = ", ".join(f"{t['class']} ({100 * t['prob']:.1f}%)" for t in row["top"])
            print(f"{row['image']}: {preds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
