"""Which paths of a student exist: a :class:`LayerSpec` per layer, together a :class:`Structure`.

Pruning (:mod:`tailor_cli.pruning`) produces a smaller structure; a
:class:`~tailor_cli.student.Student` built from one holds (and runs) nothing else. Stored as JSON in
checkpoints and adapter configs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import RunError


@dataclass
class LayerSpec:
    """Which paths enter one layer: the universal block, and proxies by source node."""

    block: bool
    proxies: list[int] = field(default_factory=list)  # source nodes, nearest first

    @property
    def alive(self) -> bool:
        return self.block or bool(self.proxies)

    def path_keys(self) -> list[str]:
        """Names of the paths in attention order: ``"block"`` then ``"proxy<src>"``."""
        return (["block"] if self.block else []) + [f"proxy{s}" for s in self.proxies]


@dataclass
class Structure:
    """The surviving graph of a student: one :class:`LayerSpec` per layer 1..L."""

    layers: list[LayerSpec]

    @classmethod
    def full(cls, num_layers: int, max_skip: int) -> "Structure":
        """Every block and every proxy from nodes l-1 .. l-max_skip (node 0 the earliest)."""
        return cls([
            LayerSpec(True, [l - k for k in range(1, max_skip + 1) if l - k >= 0])
            for l in range(1, num_layers + 1)
        ])

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def readers(self, node: int) -> list[tuple[int, str]]:
        """Paths ``(layer, key)`` that read ``node``."""
        out = []
        for l, spec in enumerate(self.layers, 1):
            if spec.block and l - 1 == node:
                out.append((l, "block"))
            out += [(l, f"proxy{s}") for s in spec.proxies if s == node]
        return out

    def to_json(self) -> list[dict]:
        return [{"block": s.block, "proxies": list(s.proxies)} for s in self.layers]

    @classmethod
    def from_json(cls, obj) -> "Structure":
        try:
            return cls([LayerSpec(bool(d["block"]), [int(s) for s in d["proxies"]]) for d in obj])
        except (TypeError, KeyError, ValueError) as err:
            raise RunError(f"invalid student structure in config ({err!r})") from err

    def counts(self) -> dict:
        return {
            "blocks": sum(s.block for s in self.layers),
            "proxies": sum(len(s.proxies) for s in self.layers),
            "layers_alive": sum(s.alive for s in self.layers),
        }
