"""``prune --auto``: the search for K (docs/method.md, "Choosing K")."""
from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import torch

from .. import defaults
from .. import distributed as dist
from ..checkpoint import read_json, write_json
from ..counting import format_count, full_network, student_macs, student_params
from ..errors import RunError, UsageError
from ..loading import load_student, load_teacher
from ..pruning import connecting_threshold
from ..pruning import plan as plan_pruning
from ..runs import (
    CHECKPOINT,
    CONFIG,
    MODEL,
    SUMMARY,
    locate_teacher,
    prepare_stage,
    read_run,
    read_summary,
    require_stage,
    stage_done,
)
from ..train import Callbacks, autocast_context, resolve_device
from .common import check_run_data, data_config, fit_student, load_data, one_writer, tailored_distillation
from .finetune import finetune
from .options import DataOptions, SearchOptions, TrainOptions, stage_settings
from .prune import prune
from .search_records import (
    CANDIDATE,
    SETTINGS,
    attempt_record,
    check_run_resume,
    finish_resumed,
    kept_candidates,
    missed_tolerance,
    record_final,
)
from .teacher import file_sha256


@one_writer(create=False)
def auto_prune(run: Path, data: DataOptions, search_train: TrainOptions, final_train: TrainOptions,
               opts: SearchOptions, *, teacher_weight: float = defaults.TEACHER_WEIGHT, overwrite: bool = False,
               resume: bool = False, callbacks: Callbacks | None = None,
               on_stage: Callable[[dict], None] | None = None) -> dict:
    """Choose K (blocks to drop) automatically, then prune and fine-tune the chosen network fully.

    Every K is pruned in memory first (no training): K values that give the same network (blocks
    the attention left under ``threshold`` are dropped whatever K, see :mod:`tailor_cli.pruning`)
    are one candidate. Each candidate tried is fine-tuned ``search_epochs`` under ``run/search/kK``.

    Tolerance mode: the reference is the least pruned candidate, fine-tuned the same
    ``search_epochs`` (candidates and reference compared at equal training). A candidate is
    accepted when it is within ``tolerance`` points of the reference on the validation split,
    allowing for the noise of the paired difference (:func:`tailor_cli.selection.compare`), and
    the leanest accepted one is found by bisection over the candidates. Budget mode
    (``max_macs``): the least pruned candidate whose MACs fit the budget. The chosen network is
    then fine-tuned ``final_train.epochs`` and compared with the teacher on the measured
    difference (plus the noise only with ``opts.noise_allowance``). When it misses, the next less
    pruned candidate is pruned and fine-tuned in its place, ``opts.fallbacks`` times at most; the
    last one fine-tuned is kept, and the result has ``error`` (exit 7) when it misses too. Only
    validation data is read; ``run/search/frontier.json`` lists every K and ``final_attempts``.
    ``on_stage`` is called with each part's record as it ends (``search``, ``prune``, ``finetune``
    with the check against the teacher); the result lists them under ``stages``.

    ``resume``: a search that was stopped keeps the candidates it had fine-tuned (``search/kK/
    candidate.json``: the network and its per-image validation results) and continues the one it
    was fine-tuning from its checkpoint, when the candidates' settings (``search/settings.json``)
    are the ones given now; the bisection then replays to the same choices. Another tolerance
    reuses them too (a candidate's fine-tune does not depend on it). A search that had ended
    (``prune`` done, the same options) is replayed from its records, and its final fine-tunes go on
    where they stopped: the networks fine-tuned and discarded before the stop are not trained again,
    the one in progress continues from its checkpoint, and if it misses the tolerance the next less
    pruned networks are tried as in a search that was never stopped. (A search made before candidates
    were recorded only finishes its final fine-tune and checks it: :func:`finish_resumed`.)
    """
    from ..data import make_loader
    from ..selection import Z_ONE_SIDED_95, compare, resolution_warning
    from ..train import correct_mask

    cb = callbacks or Callbacks()
    t0 = time.perf_counter()
    opts.validate()  # first: --search-epochs 0 is named as itself, not as the candidates' --epochs
    search_train.validate()
    final_train.validate()
    run_meta = read_run(run)
    tailor_dir = require_stage(run, "tailor", "prune --auto")
    ended_before = stage_done(run, "prune") and not overwrite  # resumed after the search had chosen
    if ended_before:
        if not (resume and (run / "search" / "frontier.json").is_file()):
            raise RunError(f"'{run}' is already pruned" + (" by hand (prune -k), not by a search" if resume else "")
                           + "; pass --overwrite to search again (this also discards 'finetune')")
        check_run_data(run, run_meta, data)
        check_run_resume(run, opts.threshold, None, opts.tolerance, opts.max_macs, opts.search_epochs,
                         opts.noise_allowance)
        if not (run / "search" / SETTINGS).is_file():
            return finish_resumed(run, data, final_train, opts, teacher_weight=teacher_weight, callbacks=cb,
                                  on_stage=on_stage)
    check_run_data(run, run_meta, data)
    device = resolve_device(search_train.device)
    student, _ = load_student(tailor_dir, torch.device("cpu"))
    num_blocks = sum(s.block for s in student.structure.layers)
    alphas = [a.tolist() if a is not None else [] for a in student.attention()]
    img_size = int(run_meta["data"]["img_size"])
    t_dir = locate_teacher(run, run_meta)
    teacher_acc = read_summary(t_dir.parent, "teacher")["val_acc"]
    full_macs = full_network(run_meta["backbone"]["architecture"], len(run_meta["classes"]), img_size)["macs"]
    budget = None
    if opts.max_macs is not None:
        budget = opts.max_macs * full_macs if opts.max_macs <= 1 else opts.max_macs

    # Structure and MACs of every K cost no training: prune in memory and count.
    plans: dict[int, dict] = {}
    seen: dict[str, int] = {}  # structure -> the first K that gives it
    for k in range(num_blocks + 1):
        try:
            res = plan_pruning(student.structure, alphas, threshold=opts.threshold, drop_blocks=k)
        except UsageError:
            plans[k] = {"k": k, "status": "disconnected"}
            continue
        key = repr(res.structure.to_json())
        if key in seen:
            plans[k] = {**{f: plans[seen[key]][f] for f in ("blocks_kept", "proxies_kept", "params", "macs")},
                        "k": k, "status": "same", "same_as": seen[key]}
            continue
        seen[key] = k
        smaller = copy.deepcopy(student)  # the tailored student is read once; each K prunes a copy
        smaller.prune_(res.structure)
        plans[k] = {"k": k, "status": "untried", "structure": res.structure, "blocks_kept": res.structure.counts()["blocks"],
                    "proxies_kept": res.structure.counts()["proxies"], "params": student_params(smaller)["total"],
                    "macs": student_macs(smaller, img_size).total, "free_blocks": len(res.free_blocks)}
    candidates = [k for k in plans if plans[k]["status"] == "untried"]
    if not candidates:
        t = connecting_threshold(student.structure, alphas, threshold=opts.threshold, drop_blocks=0)
        raise UsageError(f"every K disconnects the classifier at --threshold {opts.threshold}; "
                         + (f"--threshold {t:g} or lower keeps it connected" if t is not None else "lower it"))
    task = load_data(run_meta, data, data_config(run_meta["backbone"]["architecture"]), run)
    teacher = load_teacher(t_dir, device).eval().requires_grad_(False) if teacher_weight > 0 else None
    val_loader = make_loader(task.val, batch_size=max(search_train.batch_size, 64), train=False, device=device,
                             num_workers=0)
    cfg = search_train.config(device)
    amp = autocast_context(cfg, device)
    distill = tailored_distillation(run, teacher_weight)
    settings = json.loads(json.dumps({
        "train": stage_settings(replace(search_train, epochs=opts.search_epochs), device, data, run_meta=run_meta),
        "teacher_weight": teacher_weight, "distillation": asdict(distill), "val_images": len(task.val),
        "tailored_sha256": file_sha256(tailor_dir / MODEL)}, default=str))
    keep = resume and kept_candidates(run, settings)
    correct: dict[int, torch.Tensor] = {}
    coarse = resolution_warning(len(task.val), opts.tolerance) if budget is None else None
    if coarse is not None:
        cb.on_message(f"prune --auto: warning: {coarse}")

    def evaluate_k(k: int) -> float:
        row = plans[k]
        if row["status"] == "tried":
            return row["val_acc"]
        stage, network = f"search/k{k}", json.loads(json.dumps(row["structure"].to_json()))
        saved = read_json(run / stage / CANDIDATE, what="search candidate") if keep and (run / stage / CANDIDATE).is_file() else {}
        if saved.get("structure") == network and len(saved.get("correct", "")) == len(task.val):
            correct[k] = torch.tensor([c == "1" for c in saved["correct"]])
            row.update(status="tried", val_acc=saved["val_acc"], reused=True)
        else:
            same = keep and (run / stage / CONFIG).is_file() and \
                read_json(run / stage / CONFIG, what="search candidate config").get("structure") == network
            if same and (run / stage / SUMMARY).is_file() and (run / stage / MODEL).is_file():
                summary = read_json(run / stage / SUMMARY)  # fine-tuned, stopped before it was compared
            else:
                cand = copy.deepcopy(student)
                cand.prune_(row["structure"])
                continued = same and (run / stage / CHECKPOINT).is_file()
                if not continued and dist.is_main():
                    shutil.rmtree(run / stage, ignore_errors=True)
                dist.barrier()
                opts_k = TrainOptions(**{**asdict(search_train), "epochs": opts.search_epochs, "resume": continued})
                summary = fit_student(run, stage, cand, teacher, task, data, opts_k, device, cb, complexity=None,
                                      g1=0.0, g2=teacher_weight, distill=distill,
                                      extra={"search_k": k, "structure": network}, keep="last", held_out=False)
            trained, _ = load_student(run / stage, device)
            correct[k] = correct_mask(trained, val_loader, device, amp_ctx=amp, channels_last=cfg.channels_last)
            dist.barrier()
            if dist.is_main():  # what a resumed search reads back instead of fine-tuning it again
                write_json(run / stage / CANDIDATE, {"k": k, "structure": network, "val_acc": summary["val_acc"],
                                                     "correct": "".join("1" if c else "0" for c in correct[k].tolist())})
                if not search_train.keep_checkpoints:  # compared: its record stays, its weights are not used again
                    (run / stage / MODEL).unlink()
                    (run / stage / CHECKPOINT).unlink(missing_ok=True)  # left by a stop just after its last epoch
            row.update(status="tried", val_acc=summary["val_acc"])
        cb.on_message(f"search: K={k} keeps {row['blocks_kept']}/{num_blocks} blocks, {format_count(row['macs'])} MACs "
                      f"({100 * row['macs'] / full_macs:.1f}% of the fine-tuned network's {format_count(full_macs)}), "
                      f"val_acc {row['val_acc']:.2f} (teacher {teacher_acc:.2f}"
                      + ("; fine-tuned before the stop)" if row.get("reused") else ")"))
        return row["val_acc"]

    reference = min(candidates)  # the least pruned network, at the same training as every candidate
    fits = [k for k in candidates if budget is not None and plans[k]["macs"] <= budget]
    if budget is not None and not fits:
        raise UsageError(f"no network fits --max-macs {budget / 1e6:.1f}M (the leanest needs "
                         f"{min(plans[k]['macs'] for k in candidates) / 1e6:.1f}M)")
    # A resumed search keeps its candidates (evaluate_k reads each back or continues it) and what a stop
    # after the choice left: the network pruned then (its fine-tune goes on, below) and the final attempts
    # fine-tuned and discarded before it, when judged as now (same tolerance and noise allowance).
    frontier_path = run / "search" / "frontier.json"
    before = read_json(frontier_path, what="search frontier") if keep and frontier_path.is_file() else {}
    in_progress = read_summary(run, "prune").get("drop_blocks") if ended_before else None
    same_check = before.get("tolerance") == opts.tolerance and \
        bool(before.get("noise_allowance", False)) == opts.noise_allowance and budget is None
    discarded = {a["k"]: a for a in before.get("final_attempts", []) if a["k"] != in_progress} if same_check else {}
    if len(discarded) > opts.fallbacks:  # refused before anything is written
        raise UsageError(f"the run fine-tuned and discarded {len(discarded)} networks before the stop; resume with "
                         f"--fallbacks {len(discarded)} or more (the stopped run allowed that many), or pass --overwrite")
    if not ended_before:  # searching again: the pruned network, its fine-tune and the last frontier go first
        prepare_stage(run, "prune", resume=False, overwrite=True)
        if dist.is_main():
            if keep:
                frontier_path.unlink(missing_ok=True)
            else:
                shutil.rmtree(run / "search", ignore_errors=True)
            write_json(run / "search" / SETTINGS, settings)
        dist.barrier()
    if budget is not None:
        chosen = min(fits)  # fewest blocks dropped under the budget: the most accurate
        evaluate_k(chosen)
    else:
        evaluate_k(reference)
        plans[reference]["comparison"] = compare(correct[reference], correct[reference],
                                                 tolerance=opts.tolerance).to_json()

        def accepted(k: int) -> bool:
            evaluate_k(k)
            result = compare(correct[k], correct[reference], tolerance=opts.tolerance)
            plans[k]["comparison"] = result.to_json()
            return result.accepted

        lo, hi, chosen = 1, len(candidates) - 1, reference  # candidates[0] is the reference: accepted
        while lo <= hi:  # the leanest accepted candidate, assuming acceptance falls as K grows
            mid = (lo + hi) // 2
            if accepted(candidates[mid]):
                chosen, lo = candidates[mid], mid + 1
            else:
                hi = mid - 1
    tried = [plans[k] for k in sorted(plans) if plans[k]["status"] == "tried"]
    frontier = []
    for k in sorted(plans):
        row = {key: value for key, value in plans[k].items() if key != "structure"}
        row["macs_fraction"] = row["macs"] / full_macs if "macs" in row else None
        row["accepted"] = row["comparison"]["accepted"] if "comparison" in row else None  # noise allowed
        row["within_tolerance"] = row["comparison"]["within_tolerance"] if "comparison" in row else None
        row["chosen"] = k == chosen
        frontier.append(row)
    search = {"mode": "budget" if budget is not None else "tolerance", "tolerance": opts.tolerance,
              "max_macs": budget, "teacher_val_acc": teacher_acc, "full_macs": full_macs, "chosen_k": chosen,
              "reference_k": reference if budget is None else None, "val_images": len(task.val),
              "coarse_validation": coarse,
              "candidates_tried": len(tried), "k_values": len(plans), "distinct_networks": len(candidates),
              "search_epochs": opts.search_epochs, "noise_allowance": opts.noise_allowance,
              "wall_seconds": before["wall_seconds"] if ended_before and "wall_seconds" in before
              else round(time.perf_counter() - t0, 1), "frontier": frontier}
    # (on disk, the attempts discarded before a stop stay listed until the loop below writes them again)
    write_json(frontier_path, search | ({"searched_k": before.get("searched_k", chosen),
                                                             "final_attempts": list(discarded.values())} if discarded else {}))
    cb.on_message(f"search: tried {len(tried)} of {len(candidates)} distinct networks ({len(plans)} K values); "
                  f"chose K={chosen}")
    stages: list[dict] = []

    def ended(record: dict) -> None:
        stages.append(record)
        if on_stage is not None:
            on_stage(record)

    # as the search chose (read back, if it had ended before a stop); fallbacks come after
    ended({"stage": "search", "run": str(run), **copy.deepcopy(search), **({"reused": True} if ended_before else {})})
    teacher_model = teacher if teacher is not None else load_teacher(t_dir, device).eval()
    teacher_correct = correct_mask(teacher_model, val_loader, device, amp_ctx=amp, channels_last=cfg.channels_last)
    teacher_summary = read_summary(t_dir.parent, "teacher")

    def checked(final: dict, check) -> dict:  # a final fine-tune's record, with its check against the teacher
        return {"run": str(run), **final, "teacher_val_acc": teacher_acc,
                "teacher_test_acc": teacher_summary.get("test_acc"), "final_vs_teacher": check.to_json()}

    searched_k, attempts, read_back = chosen, [], False
    while True:  # the chosen network, then (tolerance mode) less pruned ones while it misses, opts.fallbacks at most
        less_pruned = [k for k in candidates if k < chosen]
        if chosen in discarded:  # fine-tuned before the stop and missed: not trained again
            attempts.append(discarded[chosen])
            if not less_pruned:  # (fallbacks were checked above) a search that now ends elsewhere
                raise RunError(f"K={chosen} was fine-tuned and discarded before the stop and no less pruned network "
                               "is left; pass --overwrite to search again")
            cb.on_message(f"prune --auto: K={chosen} ended {-discarded[chosen]['vs_teacher']['diff']:.2f} points below "
                          f"the teacher before the stop; going on with the next less pruned network, K={less_pruned[-1]}")
            search.update(searched_k=searched_k, final_attempts=list(attempts))
            write_json(run / "search" / "frontier.json", search)
            chosen = less_pruned[-1]
            continue
        if chosen == in_progress:  # pruned before the stop: its fine-tune goes on (or is read back, if it had ended)
            pruned = {"run": str(run), **read_summary(run, "prune")}
            ended(pruned | {"reused": True})
            read_back = stage_done(run, "finetune")
            final = finetune(run, data, replace(final_train, resume=True), teacher_weight=teacher_weight, callbacks=cb)
        else:
            pruned, read_back = prune(run, threshold=opts.threshold, drop_blocks=chosen, overwrite=True, callbacks=cb,
                                      searched=True), False
            ended({"run": str(run), **pruned})
            final = finetune(run, data, final_train, teacher_weight=teacher_weight, callbacks=cb)
        final_model, _ = load_student(run / "finetune", device)
        check = compare(correct_mask(final_model, val_loader, device, amp_ctx=amp, channels_last=cfg.channels_last),
                        teacher_correct, tolerance=opts.tolerance, z=Z_ONE_SIDED_95 if opts.noise_allowance else 0.0)
        attempts.append(attempt_record(chosen, plans[chosen], full_macs, final, check))
        if budget is not None or check.accepted or not less_pruned or len(attempts) > opts.fallbacks:
            break
        cb.on_message(f"prune --auto: K={chosen} ends {-check.diff:.2f} points below the teacher, more than "
                      f"--tolerance {opts.tolerance}; fine-tuning the next less pruned network, K={less_pruned[-1]}")
        ended(checked(final, check) | {"discarded": True} | ({"reused": True} if read_back else {}))
        search.update(searched_k=searched_k, final_attempts=list(attempts))  # `run --resume` after a stop keeps them
        write_json(run / "search" / "frontier.json", search)
        chosen = less_pruned[-1]
    within = check.accepted  # the measured difference, unless --noise-allowance was asked for
    record_final(search, chosen, searched_k, attempts, final, check, opts)
    write_json(run / "search" / "frontier.json", search)
    ended(checked(final, check) | ({"reused": True} if read_back else {}))
    result = {"stage": "finetune", "run": str(run), "search": search, "prune": pruned, **final, "stages": stages}
    if budget is None and not within:
        result["error"] = missed_tolerance(search, opts, "; raise --tolerance or --fallbacks, or keep more blocks "
                                           "(--max-macs, prune -k)" if less_pruned else
                                           "; raise --tolerance (no less pruned network is left to try)")
    return result
