"""Atomic file writes and safetensors I/O.

Every file the tool writes goes to a temporary name in the same directory, is
fsynced, then renamed over the target: a killed process leaves either the old
file or the new one, never half of one. Weights are only ever safetensors.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import RunError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_replace(path: Path, write) -> None:
    from .distributed import is_main

    if not is_main():  # under torchrun, rank 0 alone writes files
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as pretty JSON, atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")

    _atomic_replace(path, write)


def read_json(path: Path, *, what: str = "file") -> dict:
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{what} '{path}' does not exist")
    try:
        with open(path) as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        reason = err.msg if hasattr(err, "msg") else err
        raise RunError(f"{what} '{path}' is not valid JSON ({reason}); delete it or rerun the stage") from err
    if not isinstance(obj, dict):
        raise RunError(f"{what} '{path}' must hold a JSON object")
    return obj


def append_jsonl(path: Path, obj: dict) -> None:
    """Append one line; a torn last line is tolerated by :func:`read_jsonl`."""
    from .distributed import is_main

    if not is_main():
        return
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line torn by a kill: everything before it is good
    return rows


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> None:
    """Save tensors (made contiguous, on CPU) with JSON-encoded metadata, atomically."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    _atomic_replace(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_safetensors(path: Path, *, what: str = "weights", device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load tensors and decoded metadata; a corrupt or truncated file is a one-line :class:`RunError`."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{what} '{path}' does not exist")
    try:
        tensors = load_file(str(path), device=device)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise RunError(
            f"{what} '{path}' is corrupt or truncated ({str(err).splitlines()[0][:120]}); re-create it"
        ) from err
    meta = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    return tensors, meta
