"""docs/ARCHITECTURE.md names real modules: every `path.py` or `package/` it lists in backticks exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "ssprop_energy"


def _named_paths() -> set[str]:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    names = set(re.findall(r"`([a-z_]+(?:/[a-z_]+)*(?:\.py|/))`", text))
    return {n for n in names if n not in {"runs/"}}  # runs/ is a run directory, not a module


def test_every_module_named_in_the_architecture_doc_exists() -> None:
    names = _named_paths()
    assert len(names) > 15  # the doc's tables are still there
    missing = sorted(n for n in names if not (PKG / n.removeprefix("ssprop_energy/")).exists())
    assert not missing, f"ARCHITECTURE.md names modules that do not exist: {missing}"
