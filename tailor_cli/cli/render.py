"""Results as people read them: the block-usage report, the K search, one line per finished stage.

Every function takes the result dict a command would print with ``--json`` and writes the same
content to stdout: rich tables on a terminal, plain ASCII on a pipe or file.
"""
from __future__ import annotations

from rich.console import Console

from .output import stdout_console, table


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


def render_report(result: dict) -> None:
    """``report`` and ``run``: per task a table of its layers, its totals, then the cross-task matrix."""
    from ..report import LAYER_STATUS, layer_status

    console = stdout_console()
    for rep in result["tasks"]:
        t = rep["totals"]
        tab = table(f"task '{rep['task']}': its network after the '{rep['stage']}' stage "
                    f"({rep['backbone']} at {rep['img_size']} px)")
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
            f"MACs {fmt_n(t['macs'])} ({100 * t['macs_fraction']:.1f}% of {fmt_n(t['macs_full'])}); "
            + _accuracy_line(rep["accuracy"], rep.get("split_sizes"))
            + (f"; adapter {t['adapter_bytes'] / 1e6:.2f} MB" if t.get("adapter_bytes") else ""),
            highlight=False,
        )
    console.print("universal block: " + ", ".join(f"{k} = {v}" for k, v in LAYER_STATUS.items())
                  + "; alpha = the attention on the block's path; proxies = the node each reads (0: the stem) "
                  "and its attention", highlight=False)
    if "export" in result:  # `run`: where the adapter went
        e = result["export"]
        console.print(f"exported task '{e['task']}' to {e['export_dir']}: adapter {e['adapter_bytes'] / 1e6:.2f} MB, "
                      f"shared backbone {e['backbone_bytes'] / 1e6:.1f} MB", highlight=False)
    for rep in result["tasks"]:
        if rep.get("search"):
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
            f"{tt['tasks']} tasks on one backbone: {tt['disk_bytes'] / 1e6:.1f} MB on disk "
            f"(backbone {tt['backbone_bytes'] / 1e6:.1f} MB + adapters {tt['adapter_bytes'] / 1e6:.1f} MB) vs "
            f"{tt['finetune_bytes'] / 1e6:.1f} MB for one fine-tuned network per task; "
            f"params {fmt_n(tt['params'])} vs {fmt_n(tt['finetune_params'])}",
            highlight=False,
        )


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
    tab = table(f"architecture search (tried {search['candidates_tried']} of "
                f"{search.get('distinct_networks', search['k_values'])} distinct networks; {basis})")
    for col in ("K", "blocks kept", "proxies", "params", "MACs", "of full", "val acc", "vs ref (allowed)", ""):
        tab.add_column(col, justify="right")
    for row in search["frontier"]:
        if row["status"] == "disconnected":
            tab.add_row(str(row["k"]), "-", "-", "-", "-", "-", "disconnected", "", "")
            continue
        cmp = row.get("comparison")
        vs = f"{cmp['diff']:+.2f} (>= {-(cmp['tolerance'] + cmp['margin']):.2f})" if cmp and row["k"] != ref else ""
        status = {"tried": fmt_acc(row.get("val_acc")), "same": f"= K={row.get('same_as')}"}.get(row["status"], "not tried")
        verdict = "chosen" if row["chosen"] else ("reference" if row["k"] == ref else
                                                  "rejected" if cmp and not cmp["accepted"] else "")
        tab.add_row(str(row["k"]), str(row["blocks_kept"]), str(row["proxies_kept"]), fmt_n(row["params"]),
                    fmt_n(row["macs"]), f"{100 * row['macs_fraction']:.0f}%", status, vs, verdict)
    console.print(tab)
    final = search.get("final_vs_teacher")
    if final:
        console.print(f"final network vs teacher on validation: {final['candidate_acc']:.2f}% vs {final['reference_acc']:.2f}% "
                      f"({final['diff']:+.2f} points; allowed {-(final['tolerance'] + final['margin']):.2f}): "
                      + ("within tolerance" if final["accepted"] else "MISSED"), highlight=False)


def render_stage(result: dict) -> None:
    """One line for a finished stage: ``tailor done, val_acc 98.61% (epoch 17 of 20, ...), ...``."""
    parts = [f"{result['stage']} done"]
    if result.get("val_acc") is not None:
        kept = f" (epoch {result['kept_epoch']} of {result['epochs']}, best on validation)" if (
            result.get("kept_epoch") and result.get("kept_epoch") != result.get("epochs")) else ""
        parts.append(f"val_acc {result['val_acc']:.2f}%{kept}")
    if result.get("test_acc") is not None:
        parts.append(f"test_acc {result['test_acc']:.2f}% (held out)")
    if isinstance(result.get("macs"), int):
        parts.append(f"{result['macs'] / 1e6:.1f} MMACs")
    if "run" in result:
        parts.append(f"in {result['run']}")
    print(", ".join(parts))


def render_search(result: dict) -> None:
    """``prune --auto``: the K search's table, then the final fine-tuning's line."""
    render_frontier(result["search"])
    render_stage(result)


def render_export(r: dict) -> None:
    print(f"exported task '{r['task']}' ({r['stage']}) to {r['export_dir']}: adapter {r['adapter_bytes'] / 1e6:.2f} MB, "
          f"shared backbone {r['backbone_bytes'] / 1e6:.1f} MB ({'reused' if r['backbone_reused'] else 'written'})")


def render_predictions(r: dict) -> None:
    """Tab-separated, a header line, then one line per image and task, best class first."""
    print("task\timage\tpredictions")
    for p in r["predictions"]:
        best = ", ".join(f"{t['class']} {100 * t['prob']:.1f}%" for t in p["top"])
        print(f"{p['task']}\t{p['image']}\t{best}")
