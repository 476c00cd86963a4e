"""Package attributes imported on first use (PEP 562): `import unmask.jax` then loads no
torch module (docs/design.md, JAX)."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def attributes(package: str, namespace: dict, table: dict[str, str]) -> tuple[Callable, Callable]:
    """(__getattr__, __dir__) for a package whose names live in other modules: table maps
    a name to the module defining it (or to itself, for a submodule). A name is imported
    once, then kept in the package's namespace."""
    def getattr_(name: str):
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(table[name])
        value = module if module.__name__ == f"{package}.{name}" else getattr(module, name)
        namespace[name] = value  # later lookups skip __getattr__
        return value

    def dir_() -> list[str]:
        return sorted(set(namespace) | set(table))

    return getattr_, dir_
