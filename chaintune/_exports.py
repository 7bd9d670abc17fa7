"""The one lazy boundary below the CLI: the public names a package re-exports from modules that import torch.

A package's ``__init__`` lists them (``name -> module``) and gets a module ``__getattr__`` from :func:`lazy`: they
load on first use, so importing the package for its torch-free parts (the configs that ``chaintune --help`` reads)
stays cheap. Every other import in chaintune is at the top of its module (tests/test_layers.py checks it, and that
the mapped modules exist and define the names).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy(package: str, exports: dict[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``package`` that imports ``exports[name]`` (a module) the first time ``name`` is
    read and keeps the value in the package's namespace."""

    def __getattr__(name: str) -> object:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
