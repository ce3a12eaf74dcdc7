"""Results as people read them: the block-usage report, the K search, one line per finished stage.

Every function takes the result dict a command would print with ``--json`` and writes the same
content to stdout: rich tables on a terminal, plain ASCII on a pipe or file.
"""
from __future__ import annotations

from rich.console import Console

from .output import err_console, stdout_console, table


def fmt_n(n: int | float | None) -> str:
    """``21.29M``, ``3.58G``, ``512``; ``-`` for a missing value."""
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def fmt_acc(a) -> str:
    return f"{a:.2f}" if isinstance(a, (int, float)) else "-"


def render_report(result: dict, *, stages_printed: bool = False) -> None:
    """``report`` and ``run``: per task a table of its layers, its totals, then the cross-task matrix.

    ``stages_printed``: ``run`` already printed each stage's line (and the search table) as it ended.
    """
    from ..report import LAYER_STATUS, layer_status

    console = stdout_console()
    for rep in result["tasks"]:
        t = rep["totals"]
        own_bn = "; its own BatchNorm scale and shift, --train-bn" if rep.get("train_bn") else ""
        tab = table(f"task '{rep['task']}': its network after the '{rep['stage']}' stage "
                    f"({rep['backbone']} at {rep['img_size']} px{own_bn})")
        for col in ("layer", "block", "universal block", "alpha", "proxies (from node: alpha)", "params", "MACs"):
            tab.add_column(col, justify="right" if col in ("layer", "params", "MACs", "alpha") else "left")
        for l in rep["layers"]:
            prox = ", ".join(f"{p['from_node']}: {p['alpha']:.2f}" for p in l["proxies"]) or "-"
            tab.add_row(str(l["layer"]), l["block"], layer_status(l["block_kept"], bool(l["proxies"])),
                        f"{l['block_alpha']:.2f}" if l["block_alpha"] is not None else "-", prox,
                        fmt_n(l["params"]), fmt_n(l["macs"]))
        console.print(tab)
        console.print(
            f"blocks kept {t['blocks_kept']}/{t['blocks_total']}, proxies {t['proxies_kept']}; "
            f"params: shared {fmt_n(t['params_shared'])} + task {fmt_n(t['params_task'])} = {fmt_n(t['params_total'])} "
            f"({100 * t['params_total'] / t['params_full']:.1f}% of the fine-tuned network's {fmt_n(t['params_full'])}); "
            f"MACs {fmt_n(t['macs'])} ({100 * t['macs_fraction']:.1f}% of the fine-tuned network's {fmt_n(t['macs_full'])}); "
            + _accuracy_line(rep["accuracy"], rep.get("split_sizes"))
            + (f"; adapter {t['adapter_bytes'] / 1e6:.2f} MB" if t.get("adapter_bytes") else ""),
            highlight=False,
        )
    console.print("universal block: " + ", ".join(f"{k} = {v}" for k, v in LAYER_STATUS.items())
                  + "; alpha = the attention on the block's path; proxies = the node each reads (0: the stem) "
                  "and its attention", highlight=False)
    if "export" in result and not stages_printed:  # `run`: where the adapter went
        console.print(export_line(result["export"]), highlight=False)
    for rep in result["tasks"]:
        if rep.get("search") and not stages_printed:
            render_frontier(rep["search"], console)
    m = result["matrix"]
    if len(m["tasks"]) > 1:
        tab = table("block usage across tasks")
        tab.add_column("block")
        for name in m["tasks"]:
            tab.add_column(name, justify="center")
        for block, row in zip(m["blocks"], m["cells"]):
            tab.add_row(block, *[_usage_cell(c) for c in row])
        console.print(tab)
        console.print("B = the universal block runs; +n = n proxies enter the layer (B+2: the block and 2 proxies; "
                      "+3: 3 proxies stand in for the dropped block); . = the layer is skipped", highlight=False)
    if "totals" in result:
        tt = result["totals"]
        console.print(
            f"{_plural(tt['tasks'], 'task')} on one backbone: {tt['disk_bytes'] / 1e6:.1f} MB on disk "
            f"(backbone {tt['backbone_bytes'] / 1e6:.1f} MB + adapters {tt['adapter_bytes'] / 1e6:.1f} MB) vs "
            f"{tt['finetune_bytes'] / 1e6:.1f} MB for one fine-tuned network per task; "
            f"params {fmt_n(tt['params'])} vs {fmt_n(tt['finetune_params'])}; each further task on this backbone "
            f"adds only its adapter",
            highlight=False,
        )
    if result.get("plot"):
        console.print(f"block-usage diagram written to {result['plot']}", highlight=False)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _usage_cell(cell: dict) -> str:
    """``B``, ``B+2``, ``+3`` or ``.``: the block, the proxies entering the layer, or neither."""
    proxies = f"+{cell['proxies']}" if cell["proxies"] else ""
    return ("B" + proxies) if cell["block"] else (proxies or ".")


def _accuracy_line(acc: dict, sizes: dict | None) -> str:
    """``accuracy val 98.61% vs teacher 99.17% (287 images, chose K and epochs); test ...`` (reported only)."""
    sizes = sizes or {}

    def split(name: str, role: str) -> str:
        n = sizes.get(name)
        where = f"{n} images, {role}" if n else role
        return f"{name} {fmt_acc(acc.get(name))}% vs teacher {fmt_acc(acc.get('teacher_' + name))}% ({where})"

    text = "accuracy " + split("val", "used for choices")
    if acc.get("test") is not None or acc.get("teacher_test") is not None:
        text += "; " + split("test", "held out, reported only")
    return text


def render_frontier(search: dict, console: Console | None = None) -> None:
    """The K search: every K, the network it gives, and for those tried the paired comparison."""
    console = console or stdout_console()
    ref = search.get("reference_k")
    basis = (f"each candidate vs K={ref} after {search['search_epochs']} epochs on {search.get('val_images', '?')} "
             f"validation images; tolerance {search['tolerance']} points + noise" if ref is not None else "budget")
    full = f" of the fine-tuned network's {fmt_n(search['full_macs'])}" if search.get("full_macs") else ""
    tab = table(f"architecture search (tried {search['candidates_tried']} of "
                f"{search.get('distinct_networks', search['k_values'])} distinct networks; {basis}; "
                f"MACs as a share{full})")
    for col in ("K", "blocks kept", "proxies", "params", "MACs", "of fine-tuned", "val acc", "vs ref (allowed)", ""):
        tab.add_column(col, justify="right")
    kept = search.get("chosen_k") if search.get("final_vs_teacher") else None  # None: stopped before the check
    missed = {a["k"]: a for a in search.get("final_attempts", []) if a["k"] != kept}  # fine-tuned fully, discarded
    for row in search["frontier"]:
        if row["status"] == "disconnected":
            tab.add_row(str(row["k"]), "-", "-", "-", "-", "-", "disconnected", "", "")
            continue
        cmp = row.get("comparison")
        vs = f"{cmp['diff']:+.2f} (>= {-(cmp['tolerance'] + cmp['margin']):.2f})" if cmp and row["k"] != ref else ""
        status = {"tried": fmt_acc(row.get("val_acc")), "same": f"= K={row.get('same_as')}"}.get(row["status"], "not tried")
        verdict = "chosen" if row["chosen"] else ("missed once fine-tuned" if row["k"] in missed else
                                                  "reference" if row["k"] == ref else
                                                  "rejected" if cmp and not cmp["accepted"] else "")
        tab.add_row(str(row["k"]), str(row["blocks_kept"]), str(row["proxies_kept"]), fmt_n(row["params"]),
                    fmt_n(row["macs"]), f"{100 * row['macs_fraction']:.0f}%", status, vs, verdict)
    console.print(tab)
    for a in missed.values():
        console.print(f"K={a['k']} fine-tuned fully: {a['val_acc']:.2f}% on validation, {a['vs_teacher']['diff']:+.2f} "
                      f"points vs the teacher, more than --tolerance {a['vs_teacher']['tolerance']:g}; the next less "
                      "pruned network was fine-tuned in its place (--fallbacks)", highlight=False)
    if search.get("final_vs_teacher"):
        console.print(tolerance_line(search["final_vs_teacher"]), highlight=False)
    if search.get("coarse_validation"):
        console.print(f"note: {search['coarse_validation']}", highlight=False)


def tolerance_line(final: dict) -> str:
    """The chosen network, fine-tuned, against the teacher on validation, and the verdict."""
    within = final.get("within_tolerance", final["accepted"])
    verdict = ("within tolerance" if within else
               f"accepted by --noise-allowance: {-final['diff']:.2f} points below, more than --tolerance "
               f"{final['tolerance']:g} but within it plus the noise ({final['margin']:.2f})" if final["accepted"] else
               "MISSED")
    allowed = f"tolerance {-final['tolerance']:.2f}" + (f", with noise {-(final['tolerance'] + final['margin']):.2f}"
                                                          if final["margin"] else "")
    return (f"final network vs teacher on validation: {final['candidate_acc']:.2f}% vs {final['reference_acc']:.2f}% "
            f"({final['diff']:+.2f} points; {allowed}): {verdict}")


def duration(seconds: float) -> str:
    """``42s``, ``6m37s``, ``1h05m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _share(macs: int | None, full: int | None) -> str:
    """``19.30M MACs (61.6% of the fine-tuned network's 31.35M)``: every share is of the fine-tuned network."""
    if not full or macs is None:
        return f"{fmt_n(macs)} MACs"
    return f"{fmt_n(macs)} MACs ({100 * macs / full:.1f}% of the fine-tuned network's {fmt_n(full)})"


def _accuracy(r: dict, split: str) -> str | None:
    """``val 98.61% on 287 images (vs teacher 99.30%)``; ``None`` when the split was not measured."""
    acc = r.get(f"{split}_acc")
    if acc is None:
        return None
    n = (r.get("split_sizes") or {}).get(split)
    text = f"{split} {acc:.2f}%" + (f" on {n} images" if n else "")
    teacher = r.get(f"teacher_{split}_acc")
    extra = [f"teacher {teacher:.2f}%"] if teacher is not None else []
    if split == "val" and r.get("kept_epoch") and r.get("epochs") and r["kept_epoch"] != r["epochs"]:
        extra.append(f"epoch {r['kept_epoch']} of {r['epochs']}, the best on validation")
    if split == "test":
        extra.append("held out, reported only")
    return text + (f" ({'; '.join(extra)})" if extra else "")


def _produced(r: dict) -> str:
    """What a stage produced, in words, with its MACs against the one reference."""
    stage = r["stage"].split("/")[0]
    st = r.get("structure") or {}
    macs, full = r.get("macs"), r.get("macs_full")
    if stage == "teacher":
        return f"the fine-tuned network, {fmt_n(macs)} MACs (the reference of every MAC share)"
    if stage == "search":
        row = next(f for f in r["frontier"] if f["chosen"])
        return (f"chose K={r['chosen_k']}: {row['blocks_kept']} blocks, {row['proxies_kept']} proxies, "
                f"{_share(row['macs'], r.get('full_macs'))}; tried {r['candidates_tried']} of "
                f"{r['distinct_networks']} distinct networks, {r['search_epochs']} epoch{'s' * (r['search_epochs'] != 1)} each")
    if stage == "prune":
        before = r.get("before", {})
        had = before.get("structure", {})
        every = f", the tailored student with every proxy {fmt_n(before['macs'])} MACs" if "macs" in before else ""
        return (f"kept {st.get('blocks')}/{had.get('blocks', '?')} blocks and {st.get('proxies')}/"
                f"{had.get('proxies', '?')} proxies, {_share(macs, full)}{every}; accuracy measured once fine-tuned")
    what = {"tailor": "the tailored student with every proxy",
            "finetune": "the pruned network, fine-tuned"}.get(stage, f"the {stage} network")
    shape = f", {st['blocks']} blocks + {st['proxies']} proxies" if st else ""
    return f"{what}{shape}, " + (_share(macs, full) if isinstance(macs, int) else "MACs not recorded")


def stage_line(r: dict) -> str:
    """One finished stage: ``STAGE: what it produced; its accuracy, split named; its time; where``."""
    if r["stage"] == "export":
        return export_line(r)
    parts = [f"{r['stage']}: {_produced(r)}"]
    parts += [a for a in (_accuracy(r, "val"), _accuracy(r, "test")) if a]
    if r.get("discarded"):
        parts.append("discarded: misses --tolerance")
    if r.get("reused"):
        parts.append("done earlier, kept")
    elif r.get("wall_seconds") is not None:
        parts.append(duration(r["wall_seconds"]))
    if r.get("run") and r["stage"] != "search":
        parts.append(f"in {r['run']}/{r['stage']}")
    return "; ".join(parts)


def render_stage(result: dict) -> None:
    """A stage command's result: its one line (under ``run`` and ``prune --auto``, as each stage ends)."""
    console = stdout_console()
    if result["stage"] == "search":  # the check against the teacher follows the fine-tuning's line
        render_frontier({k: v for k, v in result.items() if k != "final_vs_teacher"}, console)
    console.print(stage_line(result), highlight=False)
    if result["stage"] == "finetune" and result.get("final_vs_teacher"):
        console.print(tolerance_line(result["final_vs_teacher"]), highlight=False)


def render_run(result: dict) -> None:
    """``run``: its stage lines were printed as each ended; then the report and the total time."""
    render_report(result, stages_printed=True)
    if result.get("wall_seconds") is not None:
        print(f"run: done in {duration(result['wall_seconds'])}")


def export_line(r: dict) -> str:
    """Where the adapter went, and what a task costs: the backbone is written once, for every task on it."""
    extra = (f" (one fine-tuned network per task: {r['finetune_bytes'] / 1e6:.1f} MB each)"
             if r.get("finetune_bytes") else "")
    line = (f"export: exported task '{r['task']}' to {r['export_dir']} (its {r.get('exported_stage', r['stage'])} network): "
            f"adapter {r['adapter_bytes'] / 1e6:.2f} MB + "
            f"shared backbone {r['backbone_bytes'] / 1e6:.1f} MB ({_backbone_how(r)}); "
            f"the backbone is shared by every further task on it, so each further task costs its adapter"
            f"{extra}")
    return line + (f"; {duration(r['wall_seconds'])}" if r.get("wall_seconds") is not None else "")


def _backbone_how(r: dict) -> str:
    if r["backbone_reused"]:
        return "reused"
    return "written: a hard link to the run's own copy, no second copy on disk" if r.get("backbone_linked") else "written"


def render_export(r: dict) -> None:
    print(export_line(r))


def render_onnx_export(r: dict) -> None:
    """What the ONNX file holds and costs, and how closely ONNX Runtime reproduces the network."""
    network = (f"{r['structure']['blocks']} blocks + {r['structure']['proxies']} proxies, " if r.get("structure")
               else "the whole network, ")
    print(f"export: wrote task '{r['task']}' (its {r['stage']} network: {network}{fmt_n(r['macs'])} MACs, "
          f"{fmt_n(r['params'])} params) to {r['file']}: {r['onnx_bytes'] / 1e6:.2f} MB; ONNX Runtime's logits "
          f"within {r['max_abs_diff']:.1e} of the PyTorch network's (max abs, batches of "
          f"{' and '.join(map(str, r['batch_sizes_checked']))}); input 'images' (N, 3, {r['input']['img_size']}, "
          f"{r['input']['img_size']}) normalised, output 'logits'")


def input_line(task: str, spec: dict) -> str:
    """What a task's images must look like: the size and normalisation it was trained with (and what they show)."""
    mean = ", ".join(f"{v:.3f}" for v in spec.get("mean") or [])
    std = ", ".join(f"{v:.3f}" for v in spec.get("std") or [])
    line = (f"task '{task}' expects RGB images resized to {spec.get('img_size')} px ({spec.get('interpolation')}, "
            f"crop {spec.get('crop_pct')}), normalised with mean ({mean}) and std ({std})")
    return line + (f"; {spec['expects']}" if spec.get("expects") else "")


def render_predictions(r: dict) -> None:
    """Tab-separated, a header line, then one line per image and task, best class first; on stderr, what
    input each task expects."""
    for task, spec in (r.get("inputs") or {}).items():
        err_console.print(input_line(task, spec), highlight=False, markup=False)
    for bad in r.get("skipped") or []:
        err_console.print(f"skipped {bad['image']}: {bad['reason']}", highlight=False, markup=False)
    print("task\timage\tpredictions")
    for p in r["predictions"]:
        best = ", ".join(f"{t['class']} {100 * t['prob']:.1f}%" for t in p["top"])
        print(f"{p['task']}\t{p['image']}\t{best}")
