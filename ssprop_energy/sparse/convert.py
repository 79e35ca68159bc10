"""Swap a model's layers for ssProp layers and back, in place, keeping the same Parameter objects.

Because the ``weight``/``bias`` Parameters are the very same objects, an optimizer built before
:func:`sparsify` keeps working, and ``state_dict`` keys do not change.

Only modules whose type is exactly ``nn.Conv2d`` / ``nn.Linear`` are swapped: a subclass may override
``forward`` (weight standardisation, LoRA, parametrizations) and swapping it would silently change the
model's maths, so such modules are left alone and named once in the log.
"""

from __future__ import annotations

import logging
from typing import Iterable, Iterator, Sequence

from torch import nn

from ssprop_energy.errors import ConfigError
from ssprop_energy.sparse.functional import validate_drop_rate, validate_selection
from ssprop_energy.sparse.layers import SSPropConv2d, SSPropLinear

__all__ = ["LAYER_KINDS", "sparsify", "densify", "set_drop_rate", "ssprop_layers"]

logger = logging.getLogger(__name__)

from ssprop_energy.sparse.vocab import LAYER_KIND_NAMES  # noqa: E402

# layer kind accepted in ``layers=`` -> (dense type, ssProp type)
LAYER_KINDS: dict[str, tuple[type[nn.Module], type[nn.Module]]] = {
    "conv": (nn.Conv2d, SSPropConv2d),
    "linear": (nn.Linear, SSPropLinear),
}
assert tuple(LAYER_KINDS) == LAYER_KIND_NAMES, "sparse/vocab.py names the layer kinds this module maps"


def _swap(old: nn.Module, new_type: type[nn.Module]) -> nn.Module:
    """A module of ``new_type`` sharing ``old``'s parameters, buffers, hooks and attributes."""
    new = new_type.__new__(new_type)
    for key, value in old.__dict__.items():
        # Copy the containers (parameter dict, hook dicts, buffer-name set), never their contents.
        new.__dict__[key] = value.copy() if isinstance(value, (dict, set)) else value
    return new


def _named_children_recursive(model: nn.Module, prefix: str = "") -> Iterator[tuple[nn.Module, str, str, nn.Module]]:
    """Yield ``(parent, child_name, full_name, child)`` for every module below ``model``, parents first."""
    for name, child in model.named_children():
        full = f"{prefix}.{name}" if prefix else name
        yield model, name, full, child
        yield from _named_children_recursive(child, full)


def _excluded(full_name: str, exclude: Iterable[str]) -> bool:
    return any(full_name == e or full_name.startswith(f"{e}.") for e in exclude)


def sparsify(
    model: nn.Module,
    drop_rate: float = 0.8,
    layers: Sequence[str] = ("conv",),
    selection: str = "topk",
    exclude: Iterable[str] = (),
) -> nn.Module:
    """Replace the model's ``nn.Conv2d`` (and/or ``nn.Linear``) layers by ssProp layers, in place.

    Args:
        model: the model to convert; modified in place and returned.
        drop_rate: drop rate set on every converted (and already ssProp) layer, in [0, 1).
        layers: kinds to convert: any of ``"conv"``, ``"linear"``.
        selection: ``"topk"``, ``"random"`` or ``"quantile"``.
        exclude: qualified module names (as in ``named_modules``) to leave dense; a name excludes its
            whole subtree. An unknown name is an error (a typo would silently sparsify the layer).

    Returns:
        ``model``.

    Raises:
        ConfigError: bad drop rate, selection, layer kind or exclude name, or nothing to sparsify.
    """
    drop_rate = validate_drop_rate(drop_rate)
    validate_selection(selection)
    if isinstance(layers, str):
        layers = (layers,)
    unknown = [kind for kind in layers if kind not in LAYER_KINDS]
    if unknown or not layers:
        raise ConfigError(f"unknown layer kind(s) {unknown or list(layers)!r}; allowed: {', '.join(LAYER_KINDS)}")
    exclude = tuple(exclude)
    names = {name for name, _ in model.named_modules()}
    missing = [e for e in exclude if e not in names]
    if missing:
        raise ConfigError(f"exclude names not found in the model: {missing!r}")

    targets = {LAYER_KINDS[kind][0]: LAYER_KINDS[kind][1] for kind in layers}
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    skipped: list[str] = []
    count = 0
    for parent, name, full, child in _named_children_recursive(model):
        if _excluded(full, exclude):
            continue
        if isinstance(child, tuple(targets.values())):
            child.drop_rate = drop_rate  # type: ignore[attr-defined]
            child.selection = selection  # type: ignore[attr-defined]
            count += 1
        elif type(child) in targets:
            swaps.append((parent, name, child))
        elif isinstance(child, tuple(targets)):
            skipped.append(f"{full} ({type(child).__name__})")
    for parent, name, child in swaps:
        new = _swap(child, targets[type(child)])
        new._init_ssprop(drop_rate, selection)  # type: ignore[attr-defined]
        setattr(parent, name, new)
        count += 1
    if skipped:
        logger.warning("sparsify left these subclassed layers dense: %s", ", ".join(skipped))
    if count == 0 and type(model) in targets:
        raise ConfigError(
            f"sparsify swaps layers inside a model, not the model itself ({type(model).__name__}); "
            "build an SSPropConv2d / SSPropLinear directly"
        )
    if count == 0:
        raise ConfigError(
            f"no layer to sparsify: the model has no {' or '.join(t.__name__ for t in targets)} "
            f"outside exclude={list(exclude)!r} (layers={list(layers)!r}; allowed kinds: {', '.join(LAYER_KINDS)})"
        )
    logger.info("sparsify: %d layer(s) at drop rate %s, selection %s", count, drop_rate, selection)
    return model


def ssprop_layers(model: nn.Module) -> list[nn.Module]:
    """The ssProp layers of ``model``, in ``named_modules`` order."""
    return [m for m in model.modules() if isinstance(m, (SSPropConv2d, SSPropLinear))]


def set_drop_rate(model: nn.Module, drop_rate: float) -> int:
    """Set ``drop_rate`` on every ssProp layer of ``model``. Returns how many layers were set.

    Raises:
        ConfigError: the drop rate is outside [0, 1), or the model has no ssProp layer.
    """
    drop_rate = validate_drop_rate(drop_rate)
    found = ssprop_layers(model)
    if not found:
        raise ConfigError("set_drop_rate: the model has no ssProp layer; call sparsify(model) first")
    for layer in found:
        layer.drop_rate = drop_rate  # type: ignore[attr-defined]
    return len(found)


def densify(model: nn.Module) -> nn.Module:
    """Swap every ssProp layer back to its plain ``nn.Conv2d`` / ``nn.Linear``, in place; returns ``model``."""
    back = {ssprop_type: dense_type for dense_type, ssprop_type in LAYER_KINDS.values()}
    swaps = [(p, n, c) for p, n, _, c in _named_children_recursive(model) if type(c) in back]
    for parent, name, child in swaps:
        new = _swap(child, back[type(child)])
        for attr in ("_drop_rate", "_selection", "_kept_record"):
            new.__dict__.pop(attr, None)
        setattr(parent, name, new)
    return model
