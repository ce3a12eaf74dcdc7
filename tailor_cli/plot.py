"""The per-task block-usage diagram, in the spirit of the paper's figure (optional: needs matplotlib).

One column per task: the universal blocks stacked bottom (stem) to top (classifier),
filled when the task runs them, hollow when pruned; each kept proxy is an arc on the
right from its source node to the layer it enters, thicker with more attention.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

from .errors import RunError, UsageError


def plot_block_usage(report: dict, out: Path) -> Path:
    """Draw ``report`` (from :mod:`tailor_cli.report`) to ``out`` (.png or .svg); returns ``out``."""
    out = Path(out)
    if out.suffix.lower() not in (".png", ".svg"):
        raise UsageError(f"--plot must end in .png or .svg, got '{out.name}'")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
        from matplotlib.patches import FancyArrowPatch, Patch, Rectangle
    except ImportError as err:
        raise UsageError("--plot needs matplotlib: pip install matplotlib (or the package's [plot] extra)") from err

    tasks = report["tasks"]
    n_layers = len(tasks[0]["layers"])
    fig, ax = plt.subplots(figsize=(2.2 * len(tasks) + 0.8, 0.32 * n_layers + 1.6))
    for col, rep in enumerate(tasks):
        x0 = col * 2.2
        ax.add_patch(Rectangle((x0, -0.9), 0.8, 0.6, facecolor="0.35", edgecolor="black"))
        ax.text(x0 + 0.4, -0.6, "stem", ha="center", va="center", fontsize=6, color="white")
        for layer in rep["layers"]:
            y = layer["layer"] - 1
            kept = layer["block_kept"]
            ax.add_patch(Rectangle((x0, y), 0.8, 0.7, facecolor="tab:blue" if kept else "white",
                                   edgecolor="tab:blue" if kept else "0.6", linestyle="-" if kept else "--"))
            ax.text(x0 + 0.4, y + 0.35, layer["block"], ha="center", va="center", fontsize=6,
                    color="white" if kept else "0.5")
            for proxy in layer["proxies"]:
                src_y = -0.6 if proxy["from_node"] == 0 else proxy["from_node"] - 1 + 0.35
                arc = FancyArrowPatch((x0 + 0.8, src_y), (x0 + 0.8, y + 0.35),
                                      connectionstyle=f"arc3,rad={0.25 + 0.1 * proxy['skip']}",
                                      arrowstyle="-|>", mutation_scale=6, color="tab:orange",
                                      linewidth=0.5 + 2.5 * proxy["alpha"])
                ax.add_patch(arc)
        t = rep["totals"]
        acc = rep["accuracy"]["test"] if rep["accuracy"].get("test") is not None else rep["accuracy"]["val"]
        split = "test" if rep["accuracy"].get("test") is not None else "val"
        ax.text(x0 + 0.6, n_layers + 0.3, f"{rep['task']}\n{t['blocks_kept']}/{t['blocks_total']} blocks, "
                f"{100 * t['macs_fraction']:.0f}% MACs" + (f"\n{split} acc {acc:.1f}%" if isinstance(acc, (int, float)) else ""),
                ha="center", va="bottom", fontsize=7)
    ax.legend(handles=[Patch(facecolor="tab:blue", edgecolor="tab:blue", label="universal block, kept"),
                       Patch(facecolor="white", edgecolor="0.6", linestyle="--", label="universal block, removed"),
                       Line2D([], [], color="tab:orange", label="proxy (thicker: more attention)")],
              loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=6, frameon=False)
    ax.set_xlim(-0.4, 2.2 * len(tasks))
    ax.set_ylim(-1.2, n_layers + 1.6)
    ax.axis("off")
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp{out.suffix}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, dpi=150, bbox_inches="tight")  # the legend sits under the columns
        tmp.replace(out)
    except OSError as err:
        with contextlib.suppress(OSError):  # the folder may not exist, or be a file
            tmp.unlink(missing_ok=True)
        raise RunError(f"cannot write --plot '{out}' ({err.strerror or err}); choose a writable path") from err
    finally:
        plt.close(fig)
    return out
