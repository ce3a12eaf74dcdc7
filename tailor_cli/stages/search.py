"""``prune --auto``: the search for K (docs/method.md, "Choosing K")."""
from __future__ import annotations

import copy
import shutil
import time
from dataclasses import asdict
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
from ..runs import MODEL, locate_teacher, prepare_stage, read_run, read_summary, require_stage, stage_done
from ..train import Callbacks, autocast_context, resolve_device
from .common import check_run_data, data_config, fit_student, load_data, one_writer, tailored_distillation
from .finetune import finetune
from .options import DataOptions, SearchOptions, TrainOptions
from .prune import prune


def check_run_resume(run_dir: Path, threshold: float, drop_blocks: int | None, tolerance: float,
                     max_macs: float | None, search_epochs: int) -> None:
    """``run --resume`` keeps a finished prune (or K search) only if it was made with the same options."""
    if not stage_done(run_dir, "prune"):
        return
    pruned = read_summary(run_dir, "prune")
    frontier = run_dir / "search" / "frontier.json"
    search = read_json(frontier, what="search frontier") if frontier.is_file() else None
    diffs = []
    if pruned.get("threshold") != threshold:
        diffs.append(f"--threshold {pruned.get('threshold')} -> {threshold}")
    if drop_blocks is not None:
        if search is not None:
            diffs.append(f"K was searched (K={search.get('chosen_k')}) -> --drop-blocks {drop_blocks}")
        elif pruned.get("drop_blocks") != drop_blocks:
            diffs.append(f"--drop-blocks {pruned.get('drop_blocks')} -> {drop_blocks}")
    elif search is None:
        diffs.append(f"--drop-blocks {pruned.get('drop_blocks')} -> K searched")
    else:
        was_budget = search.get("mode") == "budget" and isinstance(search.get("max_macs"), (int, float))
        was = f"--max-macs {search['max_macs'] / 1e6:.2f}M MACs" if was_budget else f"--tolerance {search.get('tolerance')}"
        if max_macs is not None:
            full = search.get("full_macs") or 0
            budget = max_macs * full if max_macs <= 1 else max_macs
            if not was_budget or abs(search["max_macs"] - budget) > 1e-6 * max(budget, 1):
                diffs.append(f"{was} -> --max-macs {budget / 1e6:.2f}M MACs")
        elif was_budget or search.get("tolerance") != tolerance:
            diffs.append(f"{was} -> --tolerance {tolerance}")
        if search.get("search_epochs") != search_epochs:
            diffs.append(f"--search-epochs {search.get('search_epochs')} -> {search_epochs}")
    if diffs:
        raise UsageError(f"'{run_dir}' was pruned with other options ({'; '.join(diffs)}); rerun with them to resume, "
                         "or pass --overwrite to start again")


@one_writer(create=False)
def auto_prune(run: Path, data: DataOptions, search_train: TrainOptions, final_train: TrainOptions,
               opts: SearchOptions, *, teacher_weight: float = defaults.TEACHER_WEIGHT, overwrite: bool = False,
               callbacks: Callbacks | None = None, on_stage: Callable[[dict], None] | None = None) -> dict:
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
    if stage_done(run, "prune") and not overwrite:
        raise RunError(f"'{run}' is already pruned; pass --overwrite to search again (this also discards 'finetune')")
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
        pruned = copy.deepcopy(student)  # the tailored student is read once; each K prunes a copy
        pruned.prune_(res.structure)
        plans[k] = {"k": k, "status": "untried", "structure": res.structure, "blocks_kept": res.structure.counts()["blocks"],
                    "proxies_kept": res.structure.counts()["proxies"], "params": student_params(pruned)["total"],
                    "macs": student_macs(pruned, img_size).total, "free_blocks": len(res.free_blocks)}
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
    correct: dict[int, torch.Tensor] = {}
    coarse = resolution_warning(len(task.val), opts.tolerance) if budget is None else None
    if coarse is not None:
        cb.on_message(f"prune --auto: warning: {coarse}")

    def evaluate_k(k: int) -> float:
        row = plans[k]
        if row["status"] == "tried":
            return row["val_acc"]
        cand = copy.deepcopy(student)
        cand.prune_(row["structure"])
        stage = f"search/k{k}"
        shutil.rmtree(run / stage, ignore_errors=True)
        opts_k = TrainOptions(**{**asdict(search_train), "epochs": opts.search_epochs, "resume": False})
        summary = fit_student(run, stage, cand, teacher, task, data, opts_k, device, cb, complexity=None, g1=0.0,
                               g2=teacher_weight, distill=tailored_distillation(run, teacher_weight), extra={"search_k": k},
                               keep="last", held_out=False)
        trained, _ = load_student(run / stage, device)
        correct[k] = correct_mask(trained, val_loader, device, amp_ctx=amp, channels_last=cfg.channels_last)
        if not search_train.keep_checkpoints:  # compared: its record stays, its weights are not used again
            dist.barrier()
            if dist.is_main():
                (run / stage / MODEL).unlink()
        row.update(status="tried", val_acc=summary["val_acc"])
        cb.on_message(f"search: K={k} keeps {row['blocks_kept']}/{num_blocks} blocks, {format_count(row['macs'])} MACs "
                      f"({100 * row['macs'] / full_macs:.1f}% of the fine-tuned network's {format_count(full_macs)}), "
                      f"val_acc {row['val_acc']:.2f} (teacher {teacher_acc:.2f})")
        return row["val_acc"]

    reference = min(candidates)  # the least pruned network, at the same training as every candidate
    fits = [k for k in candidates if budget is not None and plans[k]["macs"] <= budget]
    if budget is not None and not fits:
        raise UsageError(f"no network fits --max-macs {budget / 1e6:.1f}M (the leanest needs "
                         f"{min(plans[k]['macs'] for k in candidates) / 1e6:.1f}M)")
    # Searching again: the pruned network, its fine-tune and the last search's record go before any training.
    prepare_stage(run, "prune", resume=False, overwrite=True)
    if dist.is_main():
        shutil.rmtree(run / "search", ignore_errors=True)
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
              "search_epochs": opts.search_epochs, "wall_seconds": round(time.perf_counter() - t0, 1),
              "frontier": frontier}
    write_json(run / "search" / "frontier.json", search)
    cb.on_message(f"search: tried {len(tried)} of {len(candidates)} distinct networks ({len(plans)} K values); "
                  f"chose K={chosen}")
    stages: list[dict] = []

    def ended(record: dict) -> None:
        stages.append(record)
        if on_stage is not None:
            on_stage(record)

    ended({"stage": "search", "run": str(run), **copy.deepcopy(search)})  # as the search chose; fallbacks come after
    teacher_model = teacher if teacher is not None else load_teacher(t_dir, device).eval()
    teacher_correct = correct_mask(teacher_model, val_loader, device, amp_ctx=amp, channels_last=cfg.channels_last)
    teacher_summary = read_summary(t_dir.parent, "teacher")

    def checked(final: dict, check) -> dict:  # a final fine-tune's record, with its check against the teacher
        return {"run": str(run), **final, "teacher_val_acc": teacher_acc,
                "teacher_test_acc": teacher_summary.get("test_acc"), "final_vs_teacher": check.to_json()}

    searched_k, attempts = chosen, []
    while True:  # the chosen network, then (tolerance mode) less pruned ones while it misses, opts.fallbacks at most
        pruned = prune(run, threshold=opts.threshold, drop_blocks=chosen, overwrite=True, callbacks=cb, searched=True)
        ended({"run": str(run), **pruned})
        final = finetune(run, data, final_train, teacher_weight=teacher_weight, callbacks=cb)
        final_model, _ = load_student(run / "finetune", device)
        check = compare(correct_mask(final_model, val_loader, device, amp_ctx=amp, channels_last=cfg.channels_last),
                        teacher_correct, tolerance=opts.tolerance, z=Z_ONE_SIDED_95 if opts.noise_allowance else 0.0)
        attempts.append(attempt_record(chosen, plans[chosen], full_macs, final, check))
        less_pruned = [k for k in candidates if k < chosen]
        if budget is not None or check.accepted or not less_pruned or len(attempts) > opts.fallbacks:
            break
        cb.on_message(f"prune --auto: K={chosen} ends {-check.diff:.2f} points below the teacher, more than "
                      f"--tolerance {opts.tolerance}; fine-tuning the next less pruned network, K={less_pruned[-1]}")
        ended(checked(final, check) | {"discarded": True})
        search.update(searched_k=searched_k, final_attempts=list(attempts))  # `run --resume` after a stop keeps them
        write_json(run / "search" / "frontier.json", search)
        chosen = less_pruned[-1]
    within = check.accepted  # the measured difference, unless --noise-allowance was asked for
    record_final(search, chosen, searched_k, attempts, final, check, opts)
    write_json(run / "search" / "frontier.json", search)
    ended(checked(final, check))
    result = {"stage": "finetune", "run": str(run), "search": search, "prune": pruned, **final, "stages": stages}
    if budget is None and not within:
        result["error"] = missed_tolerance(search, opts, "; raise --tolerance or --fallbacks, or keep more blocks "
                                           "(--max-macs, prune -k)" if less_pruned else
                                           "; raise --tolerance (no less pruned network is left to try)")
    return result


def attempt_record(k: int, network: dict, full_macs: float, final: dict, check) -> dict:
    """One final fine-tune in ``final_attempts``: the network (a frontier row) and its check against the teacher."""
    return {"k": k, "blocks_kept": network["blocks_kept"], "macs": network["macs"],
            "macs_fraction": network["macs"] / full_macs, "val_acc": final["val_acc"], "vs_teacher": check.to_json()}


def record_final(search: dict, k: int, searched_k: int, attempts: list[dict], final: dict, check,
                 opts: SearchOptions) -> None:
    """Write the kept network (K = ``k``) and its check against the teacher into the frontier ``search``."""
    for row in search["frontier"]:
        row["chosen"] = row["k"] == k
    search.update(chosen_k=k, searched_k=searched_k, fallbacks=opts.fallbacks, final_attempts=attempts,
                  final_val_acc=final["val_acc"], final_test_acc=final.get("test_acc"),
                  within_tolerance=check.within_tolerance, accepted=check.accepted,
                  noise_allowance=opts.noise_allowance, final_vs_teacher=check.to_json())


def missed_tolerance(search: dict, opts: SearchOptions, advice: str) -> str:
    """Exit 7's message: the kept network against the teacher, every network fine-tuned, what to do."""
    check, attempts = search["final_vs_teacher"], search.get("final_attempts", [])
    tuned = ", ".join(f"K={a['k']} {a['vs_teacher']['diff']:+.2f}" for a in attempts)
    return (f"the chosen network (K={search['chosen_k']}) reaches {check['candidate_acc']:.2f}% on validation, "
            f"{-check['diff']:.2f} points below the teacher's {check['reference_acc']:.2f}%: more than --tolerance "
            f"{opts.tolerance}" + (f" plus the noise of {check['n']} validation images ({check['margin']:.2f}, "
                                   "--noise-allowance)" if opts.noise_allowance else "")
            + (f" (fine-tuned: {tuned})" if len(attempts) > 1 else "") + advice)


def recheck_resumed(run: Path, data: DataOptions, train: TrainOptions, opts: SearchOptions) -> dict:
    """``run --resume`` of a run whose K search had ended: the final network against the teacher.

    ``auto_prune`` ends with this check, but a run stopped during a final fine-tune left a frontier
    without it; the resumed fine-tune is then checked here as ``auto_prune`` checks it (the same
    validation images, the measured difference unless ``opts.noise_allowance``) and the check is
    written to ``search/frontier.json``. A check made before is read back, not remeasured. Returns
    the frontier, with ``error`` (exit 7) when the kept network misses the tolerance; no less pruned
    network is tried here (``prune --auto --overwrite`` searches again). The networks a stopped
    search had fine-tuned and discarded stay in ``final_attempts``. Budget mode has no check.
    """
    from ..data import make_loader
    from ..selection import Z_ONE_SIDED_95, compare
    from ..train import correct_mask

    search = read_json(run / "search" / "frontier.json", what="search frontier")
    if search.get("mode") == "budget":
        return search
    if "final_vs_teacher" not in search:
        run_meta, device = read_run(run), resolve_device(train.device)
        cfg = train.config(device)
        amp = autocast_context(cfg, device)
        task = load_data(run_meta, data, data_config(run_meta["backbone"]["architecture"]), run)
        val_loader = make_loader(task.val, batch_size=max(train.batch_size, 64), train=False, device=device,
                                 num_workers=0)
        final_model, _ = load_student(run / "finetune", device)
        teacher = load_teacher(locate_teacher(run, run_meta), device).eval()
        check = compare(*(correct_mask(m, val_loader, device, amp_ctx=amp, channels_last=cfg.channels_last)
                          for m in (final_model, teacher)),
                        tolerance=opts.tolerance, z=Z_ONE_SIDED_95 if opts.noise_allowance else 0.0)
        final, k = read_summary(run, "finetune"), read_summary(run, "prune")["drop_blocks"]
        network = next(r for r in search["frontier"] if r["k"] == k)
        discarded = [a for a in search.get("final_attempts", []) if a["k"] != k]  # fine-tuned before the stop
        record_final(search, k, search.get("searched_k", search["chosen_k"]),
                     discarded + [attempt_record(k, network, search["full_macs"], final, check)], final, check, opts)
        write_json(run / "search" / "frontier.json", search)
    accepted = search.get("accepted", search["final_vs_teacher"]["within_tolerance"])
    if not accepted:
        search["error"] = missed_tolerance(search, opts, "; the resumed run tries no other network: search again "
                                           "(prune --auto --overwrite), or raise --tolerance")
    return search
