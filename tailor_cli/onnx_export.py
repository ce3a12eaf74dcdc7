"""One task's network as a standalone ONNX file (``nettailor export RUN --format onnx``).

    EXPORT_DIR/<task>/model.onnx

The network of one stage of a run, in a file that runs without this package (ONNX Runtime,
TensorRT, Triton, ...): a tailored student (``finetune``, ``prune`` or ``tailor``) holds only its kept
blocks, its surviving proxies and its classifier; a teacher, the whole fine-tuned network. For a
student (README.md, "Deploying one task"):

- each proxy's BatchNorms and its attention weight are folded into its 1x1 convolutions (a
  convolution, a BatchNorm in eval mode and a scale are one convolution with a bias);
- a kept block's attention weight stays one multiplication of its output (a residual block's
  output is not one convolution's, so there is nothing to fold it into exactly); the exporter folds
  the frozen blocks' own BatchNorms (eval mode), as for any network;
- a layer with one path has no weight at all (a softmax over one path is 1).

Input ``images``: float32 (N, 3, S, S), S the training size, normalised with the run's mean and std;
output ``logits`` (N, classes); N is dynamic. The model's metadata (``metadata_props``) records the task,
the stage, the class names and the input settings (JSON). Before the file is kept, ONNX Runtime runs it
at two batch sizes and its logits must be within :data:`PARITY_TOLERANCE` of the PyTorch network's.
Exported with torch's TorchScript-based exporter (``dynamo=False``; the default since torch 2.9 is the
``torch.export``-based one, which needs ``onnxscript``), which traces these static graphs exactly.
"""
from __future__ import annotations

import copy
import inspect
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from . import __version__
from .adapter import TASK_NAME
from .checkpoint import current_umask
from .counting import model_macs, network_params, student_macs, student_params
from .data import INPUT_NOTES
from .distributed import is_main
from .errors import ExportError, UsageError
from .loading import load_student, load_teacher
from .proxies import Proxy
from .runs import (
    STAGES,
    check_writable,
    latest_student_stage,
    locate_teacher,
    lock_dir,
    read_run,
    require_stage,
    stage_done,
)
from .student import Student

ONNX_FILE = "model.onnx"
OPSET = 17
PARITY_TOLERANCE = 1e-4  # max abs difference of the logits, ONNX Runtime against PyTorch
CHECK_BATCHES = (1, 3)  # two batch sizes: the batch dimension must be dynamic
EXTRA_HINT = "pip install '.[onnx]' in nettailor's folder (or pip install onnx onnxruntime)"


def require_onnx() -> tuple[Any, Any]:
    """The ``onnx`` and ``onnxruntime`` modules, or a one-line :class:`UsageError` naming the extra."""
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise UsageError(f"--format onnx needs nettailor's onnx extra ({err.name or err} is not installed): "
                         f"{EXTRA_HINT}") from err
    return onnx, onnxruntime


# --------------------------------------------------------------------------- the standalone network
def fold_batch_norm(conv: Any, bn: Any, scale: float = 1.0) -> nn.Conv2d:
    """``scale * bn(conv(x))`` (``bn`` in eval mode) as one convolution with a bias."""
    inv = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        inv = inv * bn.weight.detach()
    shift = bn.bias.detach() if bn.bias is not None else torch.zeros_like(bn.running_mean)
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                       conv.dilation, conv.groups, bias=True)
    with torch.no_grad():
        folded.weight.copy_(conv.weight * (inv * scale).reshape(-1, 1, 1, 1))
        folded.bias.copy_(((bias - bn.running_mean) * inv + shift) * scale)
    return folded


def fold_proxy(proxy: Proxy, scale: float) -> nn.Module:
    """A proxy times its attention weight, its BatchNorms folded into its convolutions."""
    body = list(proxy.body)
    if proxy.form.kind == "lowrank":  # conv, BN, ReLU, conv, BN
        return nn.Sequential(fold_batch_norm(body[0], body[1]), nn.ReLU(), fold_batch_norm(body[3], body[4], scale))
    return fold_batch_norm(body[0], body[1], scale)


def _plain_pool(m: nn.Module) -> nn.Module:
    """The student's faster CPU max-pool as the plain ``nn.MaxPool2d`` it computes (one ONNX ``MaxPool``)."""
    if isinstance(m, nn.MaxPool2d):
        return nn.MaxPool2d(m.kernel_size, m.stride, m.padding, m.dilation, m.return_indices, m.ceil_mode)
    return m


class DeployedLayer(nn.Module):
    """One alive layer: ``act(block_scale * G(x_{l-1}) + sum_j P_j(pool(x_s_j)))`` with the proxies folded."""

    def __init__(self, layer: Any, alpha: torch.Tensor, strides: list[str]):
        super().__init__()
        weighted = alpha.numel() > 1
        first = 1 if layer.block is not None else 0
        self.block = copy.deepcopy(layer.block)
        self.block_scale = float(alpha[0]) if weighted and layer.block is not None else None
        self.proxies = nn.ModuleList([fold_proxy(layer.proxies[str(s)], float(alpha[first + j]) if weighted else 1.0)
                                      for j, s in enumerate(layer.sources)])
        self.sources = list(layer.sources)
        self.strides = strides  # the pool (by stride) each proxy reads its source through
        self.act = copy.deepcopy(layer.act)


class DeployedStudent(nn.Module):
    """A tailored student as a plain feed-forward network: what survives pruning, proxies folded, eval mode."""

    def __init__(self, student: Student):
        super().__init__()
        student = student.eval()
        alphas = student.attention()
        self.stem = copy.deepcopy(student.stem)
        for name, m in self.stem.named_children():
            setattr(self.stem, name, _plain_pool(m))
        self.nodes = [l for l, layer in enumerate(student.tailored_layers(), 1) if layer.alive]
        self.layers = nn.ModuleList([
            DeployedLayer(student.layers[l - 1], alphas[l - 1].detach(),  # type: ignore[union-attr]
                          [str(student.stride(s, l)) for s in student.layers[l - 1].sources])
            for l in self.nodes])
        self.pools = nn.ModuleDict({k: _plain_pool(m) for k, m in student.pools.items()})
        self.tail, self.head, self.fc = (copy.deepcopy(student.tail), copy.deepcopy(student.head),
                                         copy.deepcopy(student.fc))
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        nodes = {0: self.stem(images)}
        pooled: dict[tuple[int, str], torch.Tensor] = {}
        for l, layer in zip(self.nodes, cast("list[DeployedLayer]", list(self.layers))):
            out = None
            for source, stride, proxy in zip(layer.sources, layer.strides, layer.proxies):
                if (source, stride) not in pooled:  # proxies reading one node at one stride share its pooling
                    pooled[source, stride] = self.pools[stride](nodes[source])
                y = proxy(pooled[source, stride])
                out = y if out is None else out + y
            if layer.block is not None:
                g = layer.block(nodes[l - 1])
                if layer.block_scale is not None:
                    g = g * layer.block_scale
                out = g if out is None else out + g
            nodes[l] = layer.act(out)
        return self.fc(self.head.forward_head(self.tail(nodes[self.nodes[-1]]), pre_logits=True))


class _Logits(nn.Module):
    """A timm model (the teacher) whose forward takes ``images`` (the ONNX input's name)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


# --------------------------------------------------------------------------- export
def export_onnx(run: Path, out: Path, *, stage: str | None = None, task_name: str | None = None,
                overwrite: bool = False) -> dict:
    """Write one stage's network of ``run`` as ``out/<task>/model.onnx`` (default: its latest student stage,
    or the teacher of a run that has no student), checked in ONNX Runtime before it is kept."""
    onnx, ort = require_onnx()
    run, out = Path(run), Path(out)
    run_meta = read_run(run)
    if stage is not None and stage not in STAGES:
        raise UsageError(f"--stage must be one of {', '.join(STAGES)}, got '{stage}'")
    if stage is None:
        stage = latest_student_stage(run) if any(stage_done(run, s) for s in STAGES[1:]) else "teacher"
    task = task_name or run_meta.get("task_name") or run.name
    if not TASK_NAME.match(task):
        raise ExportError(f"task name '{task}' is not valid; use letters, digits, '_', '-', '.' (pass --task-name)")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--export-dir '{out}' is a file; pass a directory")
    check_writable(out, flag="--export-dir")
    img_size = int(run_meta["data"]["img_size"])
    if stage == "teacher":
        teacher_dir = locate_teacher(run, run_meta)
        if not (teacher_dir / "model.safetensors").is_file():
            require_stage(run, "teacher", "export --stage teacher")
        model: nn.Module = _Logits(load_teacher(teacher_dir, torch.device("cpu")))
        reference = model
        blocks = None
        macs, params = model_macs(model, img_size), network_params(model)
    else:
        student, _ = load_student(require_stage(run, stage, f"export --stage {stage}"), torch.device("cpu"))
        student.eval()
        model, reference = DeployedStudent(student), student
        blocks = student.structure.counts()
        macs, params = student_macs(student, img_size).total, student_params(student)["total"]
    metadata = _metadata(run_meta, task, stage, img_size)
    with lock_dir(out, what="export directory"):
        path = out / task / ONNX_FILE
        if path.exists() and not overwrite:
            raise ExportError(f"'{path}' exists; pass --overwrite, or --task-name NAME to export under another name")
        diff = _write(model, reference, path, img_size, metadata, onnx, ort)
    return {"export_dir": str(out), "task": task, "stage": stage, "format": "onnx", "file": str(path),
            "onnx_bytes": path.stat().st_size, "params": params, "params_bytes": 4 * params, "macs": macs,
            "structure": blocks, "max_abs_diff": diff, "tolerance": PARITY_TOLERANCE,
            "batch_sizes_checked": list(CHECK_BATCHES), "opset": OPSET, "input": json.loads(metadata["input"])}


def _metadata(run_meta: dict, task: str, stage: str, img_size: int) -> dict[str, str]:
    data, ident = run_meta["data"], run_meta["backbone"]
    spec = {"img_size": img_size, "mean": data["mean"], "std": data["std"], "interpolation": data["interpolation"],
            "crop_pct": data["crop_pct"], "crop_mode": data.get("crop_mode", "center"),
            "layout": "NCHW float32, RGB, normalised: (x / 255 - mean) / std",
            **({"expects": INPUT_NOTES[data["layout"]]} if data.get("layout") in INPUT_NOTES else {})}
    return {"task": task, "stage": stage, "classes": json.dumps(list(run_meta["classes"])), "input": json.dumps(spec),
            "backbone": json.dumps({k: ident.get(k) for k in ("name", "architecture", "weights_source", "sha256")}),
            "nettailor": __version__}


def _write(model: nn.Module, reference: nn.Module, path: Path, img_size: int, metadata: dict[str, str],
           onnx: Any, ort: Any) -> float:
    """Export to a temporary name beside ``path``, add the metadata, check it in ONNX Runtime, then rename."""
    made = not path.parent.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    kept = False
    try:
        _trace(model, tmp, img_size)
        proto = onnx.load(tmp)
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(proto)
        onnx.save(proto, tmp)
        diff = parity(tmp, reference, img_size, ort)
        if not diff <= PARITY_TOLERANCE:
            raise ExportError(f"ONNX Runtime's logits differ from the PyTorch network's by {diff:.2e} (more than "
                              f"{PARITY_TOLERANCE:g}); nothing was written. Report it with the run's backbone")
        if is_main():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600: a server running as another user could not read it
            os.replace(tmp, path)
        kept = True
    finally:
        Path(tmp).unlink(missing_ok=True)
        if made and not kept:  # a failed export leaves no empty task folder behind
            shutil.rmtree(path.parent, ignore_errors=True)
    return diff


def _trace(model: nn.Module, file: str, img_size: int) -> None:
    """torch's TorchScript-based exporter, the batch dimension dynamic."""
    options: dict[str, Any] = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    example = torch.zeros(2, 3, img_size, img_size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation notice and tracer warnings
        torch.onnx.export(model, (example,), file, input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=OPSET,
                          do_constant_folding=True, **options)


def parity(file: str | Path, reference: nn.Module, img_size: int, ort: Any) -> float:
    """Max abs difference of the logits, ONNX Runtime against ``reference``, on the same random images at
    each of :data:`CHECK_BATCHES` (one session)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    reference.eval()
    for batch in CHECK_BATCHES:
        images = torch.randn(batch, 3, img_size, img_size, generator=generator)
        with torch.no_grad():
            want = reference(images).float()
        got = torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])
        if got.shape != want.shape:
            raise ExportError(f"the ONNX file gives logits of shape {tuple(got.shape)} for a batch of {batch}, "
                              f"not {tuple(want.shape)}; nothing was written")
        worst = max(worst, float((got - want).abs().max()))
    return worst
