"""One task deployed as ONNX: the tailored network against the fine-tuned one, in ONNX Runtime on the CPU.

    pip install '.[onnx]'
    nettailor run --data digits --backbone resnet18 --no-pretrained --epochs 1 --drop-blocks 2 --output runs/r18
    python examples/onnx_deploy.py runs/r18                      # the table in the README's "Deploying one task"
    python examples/onnx_deploy.py runs/r18 --threads 1 --json   # one JSON document

For a finished run it exports, with the installed `nettailor` command, the tailored network (the
run's latest stage) and the fine-tuned teacher as standalone ONNX files (`export --format onnx`,
`--stage teacher`), then reports for each: the file's size, its MACs, how far ONNX Runtime's logits are
from the tool's own PyTorch network on the run's validation images (max abs), whether both give the
same predictions, and ONNX Runtime's latency (median of --repeats, after --warmup, the two networks
interleaved) at each --batch-sizes; then the speed-up of the tailored network over the fine-tuned one
against their MAC ratio (the target: a speed-up of at least 0.8 x the MAC ratio).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import timm
import torch

from tailor_cli.data import load_task_data, make_loader
from tailor_cli.loading import load_student, load_teacher
from tailor_cli.runs import locate_teacher


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a finished run directory (teacher, tailor, prune, finetune)")
    p.add_argument("--export-dir", type=Path, default=None, help="where the two ONNX files go (default: a temporary "
                                                                  "folder, removed at the end)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime's intra-op threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=30, help="timed runs per network and batch size (median reported)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print exactly one JSON document on stdout")
    return p.parse_args(argv)


def nettailor(*args: str) -> dict:
    """Run the installed ``nettailor`` command with ``--json``; its one JSON document."""
    exe = shutil.which("nettailor", path=str(Path(sys.executable).parent)) or "nettailor"
    proc = subprocess.run([exe, *args, "--json"], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: nettailor {' '.join(args)} failed: {proc.stderr.strip().splitlines()[-1]}")
    return json.loads(proc.stdout)


def validation_images(run: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's validation split, preprocessed as the run trained (and as the ONNX metadata says)."""
    meta = json.loads((run / "run.json").read_text())
    data, arch = meta["data"], meta["backbone"]["architecture"]
    config = timm.data.resolve_data_config({}, model=timm.create_model(arch, pretrained=False, num_classes=0))
    task = load_task_data(data["path"], data_config=config, img_size=data["img_size"], split_file=run / "split.json",
                          task=data.get("task"), val_fraction=data["val_fraction"], seed=data["seed"],
                          hflip=data["hflip"], expected_classes=meta["classes"], augment=False)
    batches = list(make_loader(task.val, batch_size=256, train=False, device=torch.device("cpu"), num_workers=0))
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def logits(sess: ort.InferenceSession, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    return torch.cat([torch.from_numpy(sess.run(["logits"], {"images": images[i:i + batch].numpy()})[0])
                      for i in range(0, len(images), batch)])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    out = args.export_dir or Path(tempfile.mkdtemp(prefix="nettailor-onnx-"))
    try:
        exported = {
            "tailored": nettailor("export", str(args.run), "--export-dir", str(out), "--format", "onnx",
                                  "--task-name", "tailored", "--overwrite"),
            "fine-tuned": nettailor("export", str(args.run), "--export-dir", str(out), "--format", "onnx",
                                    "--stage", "teacher", "--task-name", "fine-tuned", "--overwrite"),
        }
        sessions = {name: session(Path(r["file"]), threads) for name, r in exported.items()}
        images, labels = validation_images(args.run)
        stage = exported["tailored"]["stage"]
        torch_nets = {"tailored": load_student(args.run / stage, torch.device("cpu"))[0].eval(),
                      "fine-tuned": load_teacher(locate_teacher(args.run, json.loads((args.run / "run.json").read_text())),
                                                 torch.device("cpu")).eval()}
        rows: dict[str, dict] = {}
        for name, sess in sessions.items():
            got = logits(sess, images)
            with torch.no_grad():
                want = torch.cat([torch_nets[name](images[i:i + 64]) for i in range(0, len(images), 64)])
            r = exported[name]
            rows[name] = {"stage": r["stage"], "file": r["file"], "onnx_bytes": r["onnx_bytes"],
                          "params_bytes": r["params_bytes"], "macs": r["macs"],
                          "max_abs_diff": float((got - want).abs().max()), "val_images": len(images),
                          "same_predictions": bool((got.argmax(1) == want.argmax(1)).all()),
                          "val_acc_onnx": float((got.argmax(1) == labels).float().mean() * 100), "latency_ms": {}}
        for batch in args.batch_sizes:
            x = np.random.default_rng(0).standard_normal((batch, *images.shape[1:]), dtype=np.float32)
            times: dict[str, list[float]] = {name: [] for name in sessions}
            for i in range(args.warmup + args.repeats):
                for name, sess in sessions.items():  # interleaved: both see the same machine state
                    t0 = time.perf_counter()
                    sess.run(["logits"], {"images": x})
                    if i >= args.warmup:
                        times[name].append(time.perf_counter() - t0)
            for name in sessions:
                rows[name]["latency_ms"][str(batch)] = 1000 * statistics.median(times[name])
        mac_ratio = rows["fine-tuned"]["macs"] / rows["tailored"]["macs"]
        speedup = {b: rows["fine-tuned"]["latency_ms"][b] / rows["tailored"]["latency_ms"][b]
                   for b in rows["tailored"]["latency_ms"]}
        result = {"run": str(args.run), "threads": threads, "onnxruntime": ort.__version__, "networks": rows,
                  "mac_ratio": mac_ratio, "speedup": speedup,
                  "speedup_over_mac_ratio": {b: s / mac_ratio for b, s in speedup.items()}}
    finally:
        if args.export_dir is None:
            shutil.rmtree(out, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return result


def print_table(r: dict) -> None:
    batches = list(r["speedup"])
    print(f"ONNX Runtime {r['onnxruntime']}, CPU, {r['threads']} thread(s); run {r['run']}")
    head = ["network", "stage", "ONNX file", "MACs", "max abs diff vs PyTorch", "same predictions"]
    head += [f"latency batch {b}" for b in batches]
    print("| " + " | ".join(head) + " |")
    for name, n in r["networks"].items():
        cells = [name, n["stage"], f"{n['onnx_bytes'] / 1e6:.2f} MB", f"{n['macs'] / 1e6:.2f}M",
                 f"{n['max_abs_diff']:.1e} ({n['val_images']} val images)", "yes" if n["same_predictions"] else "no"]
        cells += [f"{n['latency_ms'][b]:.2f} ms" for b in batches]
        print("| " + " | ".join(cells) + " |")
    print(f"MAC ratio (fine-tuned / tailored) {r['mac_ratio']:.2f}; speed-up "
          + ", ".join(f"batch {b}: {r['speedup'][b]:.2f}x ({r['speedup_over_mac_ratio'][b]:.2f} of the MAC ratio)"
                      for b in batches))


if __name__ == "__main__":
    main()
