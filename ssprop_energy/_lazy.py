"""Lazy public names for a package: ``import ssprop_energy.report`` must not import torch.

A package lists ``public name -> defining module`` and gets a module-level ``__getattr__`` (PEP 562) that imports
the module on first use and caches the name in the package namespace, plus a matching ``__dir__``.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping, MutableMapping, Sequence


def lazy_exports(
    package: str, names: Mapping[str, str], namespace: MutableMapping[str, Any], public: Sequence[str] | None = None
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` whose public ``names`` load lazily from their modules.

    Args:
        package: the package's ``__name__`` (for the AttributeError message).
        names: public name -> module that defines it.
        namespace: the package's ``globals()``; a loaded name is cached there, so it loads once.
        public: what ``dir()`` lists; default the lazy names.
    """
    listed = sorted(public if public is not None else names)

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return listed

    return __getattr__, __dir__
