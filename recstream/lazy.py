"""Lazy package exports: a package names its public surface up front and loads each heavy module
(torch, transformers, FAISS, Faust) only when one of its names is first used, so a command or a
service that needs none of them starts fast.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, table: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that resolves ``name`` from ``table[name]``."""

    def __getattr__(name: str) -> Any:  # noqa: N807 - it is the module hook
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(module), name)

    return __getattr__
