"""Atomic file writes, safetensors I/O, and training checkpoints.

Every file the tool writes goes to a temporary name in the same directory, is
fsynced, then renamed over the target: a killed process leaves either the old
file or the new one, never half of one. Weights are only ever safetensors: a
training checkpoint too (model and optimiser tensors in the file, a student's without its shared
frozen tensors; the epoch, scheduler and loss-scaler state as its JSON metadata), so resuming
unpickles nothing.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Collection

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import RunError


def current_umask() -> int:
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
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def link_or_copy(src: Path, dst: Path) -> bool:
    """Make ``dst`` the file ``src`` is: a hard link (one copy on disk) where the file system allows, else an
    atomic copy. Returns whether it linked. Safe because every write here replaces a file (a new inode),
    never changes one in place."""
    from .distributed import is_main

    if not is_main():
        return False
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.{os.getpid()}.link.tmp"
    try:
        os.link(src, tmp)
        os.replace(tmp, dst)
        return True
    except OSError:  # another file system, or links not allowed there
        tmp.unlink(missing_ok=True)
    _atomic_replace(dst, lambda name: shutil.copyfile(src, name))
    return False


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


# --------------------------------------------------------------------------- training checkpoints
def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def model_state(model: nn.Module, frozen: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` without the ``frozen`` keys (a student's shared tensors, stored once per run)."""
    return {k: v for k, v in model.state_dict().items() if k not in frozen}


def load_model_state(model: nn.Module, tensors: dict[str, torch.Tensor], frozen: Collection[str] = (), *,
                     what: str = "weights") -> None:
    """Load what :func:`model_state` saved: every key but the ``frozen`` ones must be there, and nothing else.

    A file that holds the frozen tensors too (written before they were left out) loads as well.
    """
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if k not in frozen]
    if missing or unexpected:
        raise RunError(f"{what} does not fit the model ({len(missing)} missing, {len(unexpected)} unexpected tensors, "
                       f"e.g. {(missing or unexpected)[0]}); rerun the stage with --overwrite")


def save_checkpoint(path: Path, model: nn.Module, opt, sched, *, epoch: int, best: float, best_epoch: int,
                    extra: dict, scaler: torch.amp.GradScaler | None = None, frozen: Collection[str] = ()) -> None:
    """Model (less its ``frozen`` tensors) and optimiser tensors; epoch, scheduler, optimiser scalars and the
    loss scaler's state as metadata."""
    tensors = {f"model.{k}": v for k, v in model_state(model, frozen).items()}
    opt_tensors, opt_meta = _optimizer_tensors(opt)
    tensors.update(opt_tensors)
    meta = {"epoch": epoch, "best_acc": best, "best_epoch": best_epoch, "scheduler": sched.state_dict(),
            "optimizer": opt_meta, **extra}
    if scaler is not None:
        meta["grad_scaler"] = scaler.state_dict()  # scale, growth tracker and factors: plain numbers
    write_safetensors(path, tensors, meta)


def load_checkpoint(path: Path, model: nn.Module, opt, sched, device,
                    scaler: torch.amp.GradScaler | None = None, frozen: Collection[str] = ()) -> dict:
    tensors, meta = read_safetensors(path, what="checkpoint", device=str(device) if device.type != "mps" else "cpu")
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    load_model_state(model, model_state, frozen, what=f"checkpoint '{path}'")
    _load_optimizer(opt, tensors, meta["optimizer"])
    sched.load_state_dict(meta["scheduler"])
    for group, lr in zip(opt.param_groups, sched.get_last_lr()):  # the rate where the curve stopped
        group["lr"] = lr
    if scaler is not None and meta.get("grad_scaler"):
        scaler.load_state_dict(meta["grad_scaler"])
    return meta
