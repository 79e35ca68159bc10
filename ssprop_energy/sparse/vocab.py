"""The names of the ssProp method's choices, torch-free, so that configs and CLIs can list and check them
without importing torch. The modules that implement the choices import their names from here."""

from __future__ import annotations

# how the kept output channels are chosen in the backward pass (``sparse/functional.py`` implements them)
SELECTIONS: tuple[str, ...] = ("topk", "random", "quantile")

# layer kinds ``sparsify(layers=...)`` can replace (``sparse/convert.py`` maps each to its layer types)
LAYER_KIND_NAMES: tuple[str, ...] = ("conv", "linear")
