"""Names a package offers but imports on first use: importing the package itself then loads no torch, so
that ``--help``, ``python -m ahiq zoo`` and the torch-free modules beside them answer at once."""
from __future__ import annotations

import importlib
import sys
from typing import Callable


def exports(package: str, homes: dict[str, str]) -> tuple[Callable, Callable]:
    """The module ``__getattr__`` and ``__dir__`` of ``package``: each name in ``homes`` taken from the module
    that ``homes`` names for it, when first asked for."""
    def __getattr__(name: str):
        if name in homes:
            return getattr(importlib.import_module(homes[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *homes})

    return __getattr__, __dir__
