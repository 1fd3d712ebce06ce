"""The tree keeps the shape docs/architecture.md describes.

Packages stand in data-flow order and each may import only the ones before it: the base, the
contracts, the live services in the order events reach them, then the offline lab, the operator
tools and the shell. Imports inside functions count too (a lazy import is still a dependency), so
a running service can never pull in training code. No package may grow past 30 % of the code.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Data-flow order: a package may import itself and the packages before it, nothing after.
ORDER = ["recstream", "schemas", "streams", "inference", "consumers", "api", "lab", "ops", "cli"]
SERVICES = {"streams", "inference", "consumers", "api"}
OFFLINE = {"lab", "ops", "cli"}


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imported_packages(path: Path) -> set[str]:
    """Top-level project packages that ``path`` imports anywhere in its body."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names = [node.args[0].value]
        else:
            continue
        found.update(name.split(".")[0] for name in names if name.split(".")[0] in ORDER)
    return found


def _code_lines(path: Path) -> int:
    return sum(
        1
        for line in path.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    )


def test_every_top_level_package_is_placed_in_the_order() -> None:
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "bench"}
    assert packages == set(ORDER), "a new top-level package needs a place in ORDER and the doc"


@pytest.mark.parametrize("package", ORDER)
def test_imports_point_only_upstream(package: str) -> None:
    allowed = set(ORDER[: ORDER.index(package) + 1])
    wrong = {
        str(path.relative_to(ROOT)): sorted(_imported_packages(path) - allowed)
        for path in _modules(package)
        if _imported_packages(path) - allowed
    }
    assert not wrong, f"{package} imports packages downstream of it: {wrong}"


@pytest.mark.parametrize("package", sorted(SERVICES))
def test_services_never_import_offline_code(package: str) -> None:
    # Implied by the order; stated on its own because it is the rule that matters most.
    offenders = [
        str(path.relative_to(ROOT))
        for path in _modules(package)
        if _imported_packages(path) & OFFLINE
    ]
    assert not offenders


def test_no_package_holds_more_than_30_percent_of_the_code() -> None:
    lines = {package: sum(_code_lines(p) for p in _modules(package)) for package in ORDER}
    total = sum(lines.values())
    too_big = {package: f"{n / total:.0%}" for package, n in lines.items() if n > 0.30 * total}
    assert not too_big, f"packages over 30 % of {total} lines: {too_big}"


def test_the_checker_sees_lazy_imports(tmp_path: Path) -> None:
    # A checker that missed imports inside functions would pass every rule above vacuously.
    module = tmp_path / "m.py"
    module.write_text(
        "def f():\n    from lab.datasets import load_dataset\n"
        "    import importlib\n    importlib.import_module('ops.cli')\n"
    )
    assert _imported_packages(module) == {"lab", "ops"}
