"""How much of a model's backward pass ssProp can reach: sparsified layers per kind and their share of the
backward FLOPs.

ssProp saves only inside the layers it replaced. A run whose sparsified layers hold a small share of the
backward FLOPs (a ViT with only its patch-embedding conv sparsified: under 5%) can save almost nothing,
whatever its drop rate; such a run gets a warning.

Torch-free: it reads per-layer rows, from a live ``flops.StepFlops.layers`` list (``LayerFlops``: ``type``,
``backward``) or from a record's ``layers.csv`` (``type``, ``flops_backward``), so the report can use it too.
Shares must come from a *dense* step (drop rate 0: the layers' full backward), otherwise a drop rate shrinks
the very share it is judged by.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

__all__ = ["LOW_SHARE", "SSPROP_LAYER_TYPES", "KindCoverage", "LayerCoverage", "layer_coverage"]

# Below this share of backward FLOPs held by sparsified layers a run is warned about (issue 13).
LOW_SHARE = 0.20

# ssProp layer class name -> layer kind (the kinds of ``sparse.convert.LAYER_KINDS``).
SSPROP_LAYER_TYPES = {"SSPropConv2d": "conv", "SSPropLinear": "linear"}


@dataclass(frozen=True)
class KindCoverage:
    """Sparsified layers of one kind: how many, and their backward FLOPs (per sample, dense step)."""

    layers: int
    flops_backward: float


@dataclass(frozen=True)
class LayerCoverage:
    """Sparsified layers per kind and the share of the step's backward FLOPs they hold.

    Attributes:
        kinds: kind (``conv``, ``linear``) -> :class:`KindCoverage`, only kinds with a sparsified layer.
        flops_backward: backward FLOPs of the whole step (every layer, sparsified or not), same unit.
    """

    kinds: dict[str, KindCoverage] = field(default_factory=dict)
    flops_backward: float = 0.0

    @property
    def layers(self) -> int:
        """Number of sparsified layers, all kinds."""
        return sum(k.layers for k in self.kinds.values())

    @property
    def flops_backward_sparsified(self) -> float:
        return sum(k.flops_backward for k in self.kinds.values())

    @property
    def share(self) -> float:
        """Fraction of the step's backward FLOPs held by sparsified layers, in [0, 1] (0 for an empty step)."""
        return self.flops_backward_sparsified / self.flops_backward if self.flops_backward > 0 else 0.0

    def kind_share(self, kind: str) -> float:
        """Fraction of the step's backward FLOPs held by sparsified layers of ``kind``."""
        cov = self.kinds.get(kind)
        return cov.flops_backward / self.flops_backward if cov and self.flops_backward > 0 else 0.0

    @property
    def warning(self) -> str | None:
        """A one-line warning when the share is under :data:`LOW_SHARE`, else None."""
        if self.share >= LOW_SHARE:
            return None
        return (
            f"the sparsified layers hold only {self.share:.1%} of the backward FLOPs (under {LOW_SHARE:.0%}): "
            "ssProp cannot save more than that share of the backward pass; sparsify more layer kinds (--layers)"
        )

    def describe(self) -> str:
        """E.g. ``20 conv (97.1%) + 1 linear (0.0%) sparsified: 97.1% of backward FLOPs``."""
        if not self.kinds:
            return "no layer sparsified: 0.0% of backward FLOPs"
        parts = [f"{c.layers} {kind} ({self.kind_share(kind):.1%})" for kind, c in self.kinds.items()]
        return f"{' + '.join(parts)} sparsified: {self.share:.1%} of backward FLOPs"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: per kind ``layers``, ``flops_backward``, ``share``; totals; the warning or None."""
        return {
            "kinds": {
                kind: {"layers": c.layers, "flops_backward": c.flops_backward, "share": self.kind_share(kind)}
                for kind, c in self.kinds.items()
            },
            "layers": self.layers,
            "flops_backward": self.flops_backward,
            "flops_backward_sparsified": self.flops_backward_sparsified,
            "share": self.share,
            "warning": self.warning,
        }


def _row(row: Any) -> tuple[str, float]:
    if isinstance(row, Mapping):
        backward = row["flops_backward"] if "flops_backward" in row else row["backward"]
        return str(row["type"]), float(backward)
    return str(row.type), float(row.backward)


def layer_coverage(layers: Iterable[Any]) -> LayerCoverage:
    """Summarise per-layer rows of a dense step (drop rate 0) of a sparsified model.

    Args:
        layers: ``LayerFlops`` objects (``type``, ``backward``) or mappings with ``type`` and
            ``flops_backward`` (a ``layers.csv`` row) or ``backward``. ``type`` is the module's class name;
            ``SSPropConv2d`` / ``SSPropLinear`` rows count as sparsified.

    Returns:
        The :class:`LayerCoverage`; its ``flops_backward`` is the sum over every row.
    """
    counts: dict[str, list[float]] = {}
    total = 0.0
    for raw in layers:
        type_name, backward = _row(raw)
        if not backward >= 0.0:
            raise ValueError(f"layer of type {type_name}: backward FLOPs {backward!r} is negative or not a number")
        total += backward
        kind = SSPROP_LAYER_TYPES.get(type_name)
        if kind is not None:
            entry = counts.setdefault(kind, [0, 0.0])
            entry[0] += 1
            entry[1] += backward
    kinds = {k: KindCoverage(int(v[0]), float(v[1])) for k, v in sorted(counts.items(), key=lambda kv: kv[0])}
    return LayerCoverage(kinds=kinds, flops_backward=total)
