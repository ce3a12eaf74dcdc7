"""What the K search writes and reads back: its frontier's records, and a search or run resumed.

``prune --auto`` (:mod:`tailor_cli.stages.search`) records every candidate it fine-tunes
(``search/kK/candidate.json``) and the settings they share (``search/settings.json``), so a
stopped search continues where it was, also in its final fine-tunes. A search made before
candidates were recorded (no ``search/settings.json``) can only finish its final fine-tune and
check it against the teacher (:func:`finish_resumed`).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

from ..checkpoint import read_json, write_json
from ..errors import UsageError
from ..loading import load_student, load_teacher
from ..runs import locate_teacher, read_run, read_summary, stage_done
from ..train import Callbacks, autocast_context, resolve_device
from .common import data_config, load_data
from .finetune import finetune
from .options import DataOptions, SearchOptions, TrainOptions

CANDIDATE = "candidate.json"  # search/kK/: a finished candidate's network, validation accuracy and per-image results
SETTINGS = "settings.json"  # search/: what every candidate's fine-tune depends on besides its network


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


def kept_candidates(run: Path, settings: dict) -> bool:
    """Whether a resumed search keeps the candidates under ``run/search`` (made with these ``settings``).

    False when no search was started there (or one made before candidates were recorded); other
    settings are refused (exit 2), naming each difference.
    """
    path = run / "search" / SETTINGS
    if not path.is_file():
        return False
    flat = lambda d: {**{k: v for k, v in d.items() if k != "train"}, **d.get("train", {})}  # noqa: E731
    old, new = flat(read_json(path, what="search settings")), flat(settings)
    diffs = [f"{key} {old.get(key)!r} -> {value!r}" for key, value in new.items() if old.get(key) != value]
    if diffs:
        raise UsageError(f"the K search in '{run}' was started with other settings ({'; '.join(diffs)}); rerun with "
                         "them to resume it, or pass --overwrite to search again")
    return True


def check_run_resume(run_dir: Path, threshold: float, drop_blocks: int | None, tolerance: float,
                     max_macs: float | None, search_epochs: int, noise_allowance: bool | None = None) -> None:
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
        was_allowed = search.get("noise_allowance")  # absent in searches made before it was recorded
        if noise_allowance is not None and was_allowed is not None and was_allowed != noise_allowance and not was_budget:
            diffs.append("--noise-allowance " + ("on -> off" if was_allowed else "off -> on"))
    if diffs:
        raise UsageError(f"'{run_dir}' was pruned with other options ({'; '.join(diffs)}); rerun with them to resume, "
                         "or pass --overwrite to start again")


def recheck_resumed(run: Path, data: DataOptions, train: TrainOptions, opts: SearchOptions) -> dict:
    """A resumed search made before candidates were recorded: the final network against the teacher.

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
        search["error"] = missed_tolerance(search, opts, "; this search, made before nettailor recorded its candidates, "
                                           "cannot try another network on resume: search again "
                                           "(prune --auto --overwrite), or raise --tolerance")
    return search


def finish_resumed(run: Path, data: DataOptions, final_train: TrainOptions, opts: SearchOptions, *,
                   teacher_weight: float, callbacks: Callbacks, on_stage: Callable[[dict], None] | None) -> dict:
    """``prune --auto --resume`` or ``run --resume`` of a search that had ended before candidates were
    recorded (no ``search/settings.json``): continue (or keep) its final fine-tune and check it
    (:func:`recheck_resumed`). The search, its options and the pruned network stay; no other network
    is tried, since the search cannot be replayed without its candidates' records.
    """
    check_run_resume(run, opts.threshold, None, opts.tolerance, opts.max_macs, opts.search_epochs, opts.noise_allowance)
    stages: list[dict] = []

    def ended(record: dict) -> None:
        stages.append(record | {"reused": True} if record["stage"] in ("search", "prune") else record)
        if on_stage is not None:
            on_stage(stages[-1])

    ended({"stage": "search", "run": str(run), **read_json(run / "search" / "frontier.json", what="search frontier")})
    pruned = {"run": str(run), **read_summary(run, "prune")}
    ended(pruned)
    read_back = stage_done(run, "finetune")
    final = finetune(run, data, replace(final_train, resume=True), teacher_weight=teacher_weight, callbacks=callbacks)
    search = recheck_resumed(run, data, final_train, opts)
    teacher = read_summary(locate_teacher(run, read_run(run)).parent, "teacher")
    ended({"run": str(run), **final, **({"reused": True} if read_back else {}), "teacher_val_acc": teacher.get("val_acc"),
           "teacher_test_acc": teacher.get("test_acc"),
           **({"final_vs_teacher": search["final_vs_teacher"]} if "final_vs_teacher" in search else {})})
    result = {"stage": "finetune", "run": str(run), "search": search, "prune": pruned, **final, "stages": stages}
    if search.get("error"):
        result["error"] = search["error"]
    return result
