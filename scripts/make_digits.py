"""Convert scikit-learn's bundled 8x8 digits (UCI, CC BY 4.0) into the shipped asset.

Run once by a maintainer (needs scikit-learn); the package only reads the .npz:
    python scripts/make_digits.py
"""
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

digits = load_digits()
images = (digits.images * (255 / 16)).round().clip(0, 255).astype(np.uint8)  # (1797, 8, 8)
out = Path(__file__).resolve().parents[1] / "tailor_cli" / "assets" / "digits.npz"
np.savez_compressed(out, images=images, labels=digits.target.astype(np.uint8))
print(f"wrote {out} ({out.stat().st_size} bytes, {len(images)} images)")
