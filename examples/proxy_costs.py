"""How cheap the proxies are, per backbone family: the table in the README (issue 16).

For each backbone (architecture only, random weights: costs do not depend on the weights) at its
default input size it builds the full NetTailor student and prints

- block/proxy MACs: for every proxy, the MACs of the block it stands in for divided by its own
  (min / median over all proxies): how much replacing a block by a proxy saves;
- task params of the full student (every proxy, attention, classifier and the BN statistics the
  task keeps) against the shared backbone's params;
- task params and MACs after a typical pruning: every second block dropped, each dropped layer
  keeping only the proxy from the node before it (the shape the digits benchmark ends in);
  MACs against the backbone's.

    python examples/proxy_costs.py                       # the six families of the README table
    python examples/proxy_costs.py resnet34 --json       # any supported backbones, JSON out
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import timm

from tailor_cli.counting import model_macs, student_macs, student_params
from tailor_cli.student import LayerSpec, Structure, Student

DEFAULT = ["resnet18", "resnet50", "efficientnet_b0", "mobilenetv3_large_100", "regnetx_002", "convnext_atto"]


def typical_pruning(structure: Structure) -> Structure:
    """Every second block dropped (layers 2, 4, ...), each such layer fed by the proxy from node l-1 only."""
    layers = []
    for l, spec in enumerate(structure.layers, 1):
        if l % 2 == 0 and l < structure.num_layers:
            layers.append(LayerSpec(False, [l - 1]))
        else:
            layers.append(LayerSpec(True, []))
    return Structure(layers)


def measure(name: str, num_classes: int = 10) -> dict:
    model = timm.create_model(name, pretrained=False)
    size = model.pretrained_cfg["input_size"][-1]
    student = Student(model, num_classes).eval()
    cost = student_macs(student, size)
    ratios = [row[0] / p for row in cost.paths for p in row[1:] if p > 0]
    full = student_params(student)
    backbone_params = full["shared"]
    backbone_macs = model_macs(model, size)
    pruned = Student(model, num_classes, structure=typical_pruning(student.structure)).eval()
    after = student_params(pruned)
    return {
        "backbone": name,
        "img_size": size,
        "blocks": student.structure.num_layers,
        "proxies": student.structure.counts()["proxies"],
        "ratio_min": min(ratios),
        "ratio_median": statistics.median(ratios),
        "backbone_params": backbone_params,
        "task_params_full": full["task_specific"],
        "task_params_pruned": after["task_specific"],
        "backbone_macs": backbone_macs,
        "pruned_macs": student_macs(pruned, size).total,
    }


def _m(n: float) -> str:
    return f"{n / 1e6:.2f}M"


def render(rows: list[dict]) -> str:
    lines = [
        "| backbone (input) | block/proxy MACs min / median | task params, full student | "
        "task params, half the blocks pruned | MACs, half pruned |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        bp = r["backbone_params"]
        lines.append(
            f"| {r['backbone']} ({r['img_size']} px) | {r['ratio_min']:.1f} / {r['ratio_median']:.1f} | "
            f"{_m(r['task_params_full'])} ({r['task_params_full'] / bp:.0%} of {_m(bp)}) | "
            f"{_m(r['task_params_pruned'])} ({r['task_params_pruned'] / bp:.0%}) | "
            f"{r['pruned_macs'] / r['backbone_macs']:.0%} of {r['backbone_macs'] / 1e9:.2f}G |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backbones", nargs="*", default=DEFAULT)
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    rows = [measure(name) for name in args.backbones]
    print(json.dumps(rows, indent=2) if args.json else render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
