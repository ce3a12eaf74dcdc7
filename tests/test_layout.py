"""The package's layout holds: every import points down the list below, and no module outgrows 400 lines.

The list is the README's "Layout" section, module by module, top to bottom. A package's
``__init__`` (which re-exports) sits above its own modules. Imports inside functions count too:
a lazy import that reaches up is still a room reaching up.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tailor_cli"
MAX_LINES = 400

ORDER = [
    "__main__",
    # the command line
    "cli", "cli.pipeline", "cli.commands", "cli.app", "cli.options", "cli.progress", "cli.render", "cli.output",
    # the pipeline
    "stages", "stages.run", "stages.search", "stages.search_records", "stages.tailor", "stages.teacher", "stages.finetune", "stages.prune",
    "stages.common", "stages.options",
    # tasks on disk
    "report", "predict", "plot", "onnx_export", "adapter", "loading", "frozen",
    # training and choices
    "train", "objectives", "selection", "schedule",
    # the model
    "counting", "losses", "pruning", "student", "proxies", "pooling", "structure", "backbone",
    # data
    "data", "data.task", "data.loader", "data.cache", "data.layouts", "data.torchvision_sets", "data.decathlon",
    "data.gtsrb", "data.split", "data.checks", "data.datasets", "data.raw", "data.transforms", "data.samples",
    # plumbing
    "weights", "runs", "checkpoint", "distributed", "defaults", "errors",
    "",  # tailor_cli/__init__.py: the version
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports (``from .x import y`` names module ``x.y`` if it is one)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    package = [p for p in package if p]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:  # from .x import y
            base = package[:len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
        elif (node.module or "").split(".")[0] == "tailor_cli":  # from tailor_cli.x import y
            base = node.module.split(".")[1:]
        else:
            continue
        target = ".".join(base)
        subs = {f"{target}.{a.name}".lstrip(".") for a in node.names} & modules.keys()
        found |= subs or {target}
    return found - {name}


def test_the_layout_lists_every_module():
    assert sorted(_modules()) == sorted(ORDER), "add the new module to ORDER here and to the README's Layout"


def test_every_import_points_down():
    modules = _modules()
    rank = {name: i for i, name in enumerate(ORDER)}
    upward = [f"{name or 'tailor_cli'} imports {target or 'tailor_cli'}"
              for name, path in modules.items() for target in _imports(name, path, modules)
              if rank[target] <= rank[name]]
    assert not upward, upward


def test_no_module_outgrows_the_limit():
    sizes = {name or "tailor_cli": path.read_text().count("\n") for name, path in _modules().items()}
    too_long = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not too_long, f"split these by concern: {too_long}"
