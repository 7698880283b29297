"""Every package declares its public API once: a docstring and one sorted `__all__`."""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

PACKAGES = ["fedcore", "aggregator", "clients", "privacy", "api"]
ROOT = Path(__file__).resolve().parent.parent


def import_package(name: str) -> ModuleType:
    """Import `name`, skipping only when the package does not exist yet."""
    directory = ROOT / name
    if importlib.util.find_spec(name) is None or not any(directory.glob("*.py")):
        pytest.skip(f"package {name!r} has no modules yet")
    if not (directory / "__init__.py").exists():
        pytest.fail(f"package {name!r} has modules but no __init__.py")
    # Any other import error (a missing dependency, a cycle, a typo) fails the test.
    return importlib.import_module(name)


def isort_key(name: str) -> tuple[int, list[tuple[int, int | str]]]:
    """Order of ruff's RUF022: CONSTANTS, then Classes, then the rest; natural sort."""
    if len(name) > 1 and name.isupper():
        category = 0
    elif name[:1].isupper():
        category = 1
    else:
        category = 2
    parts = re.split(r"(\d+)", name)
    return category, [(0, int(p)) if p.isdigit() else (1, p) for p in parts if p]


@pytest.mark.parametrize("name", PACKAGES)
def test_package_has_a_module_docstring(name: str) -> None:
    package = import_package(name)
    assert package.__doc__, f"{name}/__init__.py needs a docstring"
    assert package.__doc__.strip(), f"{name}/__init__.py needs a docstring"


@pytest.mark.parametrize("name", PACKAGES)
def test_package_all_is_sorted_unique_and_resolves(name: str) -> None:
    package = import_package(name)
    public = getattr(package, "__all__", None)
    assert isinstance(public, list), f"{name} must declare __all__ as a list"
    assert all(isinstance(n, str) for n in public)
    assert len(public) == len(set(public)), f"{name}.__all__ has duplicates"
    assert public == sorted(public, key=isort_key), f"{name}.__all__ is not sorted"
    missing = [n for n in public if not hasattr(package, n)]
    assert not missing, f"{name}.__all__ names what the package does not define: {missing}"


def test_isort_key_orders_like_ruff() -> None:
    names = ["wire", "UPDATE_META_KEY", "Aggregate", "as_dtype", "Layer10", "Layer2", "T"]
    assert sorted(names, key=isort_key) == [
        "UPDATE_META_KEY",
        "Aggregate",
        "Layer2",
        "Layer10",
        "T",
        "as_dtype",
        "wire",
    ]
