"""The package's layout: no import cycle between its top-level subpackages, and a built wheel that holds every
subpackage as a package (not as stray data files)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ssprop_energy"


def _top_level_imports() -> dict[str, set[str]]:
    """Subpackage (or top-level module) -> the other top-level subpackages/modules it imports, read with ``ast``
    (function-local imports included: a lazy import is still a dependency)."""
    tops = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
            if (p.is_file() and p.suffix == ".py") or (p.is_dir() and any(p.glob("*.py")))}
    tops.discard("__init__")
    edges: dict[str, set[str]] = {t: set() for t in tops}
    for path in PACKAGE.rglob("*.py"):
        source = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if source not in tops:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module == "ssprop_energy":
                    names = [alias.name for alias in node.names]
                elif node.module.startswith("ssprop_energy."):
                    names = [node.module.split(".")[1]]
            elif isinstance(node, ast.Import):
                names = [a.name.split(".")[1] for a in node.names if a.name.startswith("ssprop_energy.")]
            edges[source].update(n for n in names if n in tops and n != source)
    return edges


def _find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_cycle_finder_finds_a_cycle() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_edges_are_read() -> None:
    edges = _top_level_imports()
    assert "records" in edges["experiment"] and "sparse" in edges["flops"]


def test_no_import_cycle_between_subpackages() -> None:
    cycle = _find_cycle(_top_level_imports())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def _build_wheel(out: Path) -> Path:
    if shutil.which("git") and (ROOT / ".git").exists():
        # build from a clean copy of the tracked files: a stale build/ in the checkout must not leak in
        src = out / "src"
        files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard"], check=True,
                               capture_output=True, text=True).stdout.split()
        for name in files:
            if (ROOT / name).is_file():
                (src / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, src / name)
    else:
        src = ROOT
    dist = out / "dist"
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(dist), str(src)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"pip wheel failed:\n{result.stdout}\n{result.stderr}")
    (wheel,) = dist.glob("ssprop_energy-*.whl")
    return wheel


@pytest.mark.timeout(300)
def test_wheel_ships_the_experiment_package(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    subpackages = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and any(p.glob("*.py")))
    missing = [s for s in subpackages if f"ssprop_energy/{s}/__init__.py" not in names]
    assert not missing, f"subpackages without __init__.py in the wheel: {missing}"
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import ssprop_energy.experiment.runner as r, sys; "
            f"assert r.__file__.startswith({str(site)!r}), r.__file__; print(r.Experiment.__name__)")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Experiment"
