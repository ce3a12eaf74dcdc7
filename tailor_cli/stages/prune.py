"""Stage 3, prune: remove the paths under the threshold and the K weakest blocks (trains nothing)."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from .. import defaults
from .. import distributed as dist
from ..counting import format_count, full_network, student_macs, student_params
from ..errors import RunError
from ..frozen import save_student
from ..loading import ensure_store, load_student, student_meta
from ..pruning import plan as plan_pruning
from ..runs import MODEL, prepare_stage, read_run, read_summary, require_stage, stage_done, write_summary
from ..train import Callbacks
from .common import one_writer


@one_writer(create=False)
def prune(run: Path, *, threshold: float = defaults.THRESHOLD, drop_blocks: int = 0, overwrite: bool = False,
          callbacks: Callbacks | None = None, searched: bool = False) -> dict:
    """Drop low-attention proxies and the K weakest blocks, then everything orphaned (stage 3).

    ``searched``: K comes from the search (``prune --auto``), whose record ``run/search/`` stays;
    a K chosen by hand discards an earlier search's record, which no longer describes the run.
    """
    cb = callbacks or Callbacks()
    t0 = time.perf_counter()
    run_meta = read_run(run)
    tailor_dir = require_stage(run, "tailor", "prune")
    student, meta = load_student(tailor_dir, torch.device("cpu"))
    alphas = [a.tolist() if a is not None else [] for a in student.attention()]
    result = plan_pruning(student.structure, alphas, threshold=threshold, drop_blocks=drop_blocks)
    if stage_done(run, "prune") and not overwrite:
        raise RunError(f"'{run}' is already pruned; pass --overwrite to prune again (this also discards 'finetune')")
    prepare_stage(run, "prune", resume=False, overwrite=True)
    if not searched and dist.is_main():
        shutil.rmtree(run / "search", ignore_errors=True)
    img_size = run_meta["data"]["img_size"]
    macs_before = student_macs(student, img_size).total
    before = {"params": student_params(student), "macs": macs_before,
              "structure": student.structure.counts()}
    student.prune_(result.structure)
    macs_after = student_macs(student, img_size).total
    after = {"params": student_params(student), "macs": macs_after,
             "structure": student.structure.counts()}
    arch = run_meta["backbone"]["architecture"]
    full = full_network(arch, len(run_meta["classes"]), img_size)  # the fine-tuned network: the MAC reference
    ensure_store(run)
    save_student(run, run / "prune", MODEL, student, student_meta(student, arch, "prune"), run_meta["backbone"]["sha256"])
    summary = {
        "stage": "prune", "threshold": threshold, "drop_blocks": drop_blocks,
        "removed_proxies": [{"layer": l, "source": s} for l, s in result.removed_proxies],
        "removed_blocks": result.removed_blocks, "free_blocks": result.free_blocks, "orphaned": result.orphaned,
        "fixpoint_rounds": result.rounds,
        "before": before, "after": after, "tailor_val_acc": read_summary(run, "tailor")["val_acc"],
        "structure": after["structure"], "params": after["params"], "macs": after["macs"],
        "macs_full": full["macs"], "params_full": full["params"], "macs_fraction": macs_after / full["macs"],
        "attention": [a.tolist() if a is not None else None for a in student.attention()],
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    write_summary(run, "prune", summary)
    cb.on_message(
        f"prune: kept {after['structure']['blocks']}/{before['structure']['blocks']} blocks and "
        f"{after['structure']['proxies']}/{before['structure']['proxies']} proxies; "
        f"{format_count(macs_after)} MACs, {100 * macs_after / full['macs']:.1f}% of the fine-tuned network's "
        f"{format_count(full['macs'])} (the tailored student with every proxy: {format_count(macs_before)})"
    )
    return summary
