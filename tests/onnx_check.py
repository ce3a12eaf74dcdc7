"""ONNX Runtime against the tool's own PyTorch network, on the same real images (tests only)."""
from __future__ import annotations

import json
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from PIL import Image

from tailor_cli.data import eval_transform


def onnx_check(model_file: Path, reference, data: Path, batches: tuple[int, ...] = (1, 5)) -> float:
    """Max abs difference of the logits, ONNX Runtime on ``model_file`` against the PyTorch ``reference``, on the
    same real images of ``data`` (``val/`` or flat), preprocessed as the file's metadata says, at each batch size."""
    meta = {p.key: p.value for p in onnx.load(str(model_file)).metadata_props}
    transform = eval_transform(json.loads(meta["input"]))
    files = sorted((data / "val" if (data / "val").is_dir() else data).rglob("*.png"))
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    worst, start = 0.0, 0
    reference.eval()
    for batch in batches:
        chunk = [files[(start + i) % len(files)] for i in range(batch)]
        start += batch
        images = torch.stack([transform(Image.open(f).convert("RGB")) for f in chunk])
        with torch.no_grad():
            want = reference(images)
        got = session.run(["logits"], {"images": images.numpy()})[0]
        assert got.shape == tuple(want.shape)
        worst = max(worst, float((torch.from_numpy(got) - want).abs().max()))
    return worst
