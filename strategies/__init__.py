"""Specialization strategies: how an expert is trained on its class subset (one file per strategy).

Importing this package imports every module in it, so each strategy registers its short name in
`REGISTRY` without being listed anywhere; `strategy_class("progressive")` looks one up.
"""

from __future__ import annotations

import importlib
import pkgutil

from askexpert.errors import UserError
from strategies.base import REGISTRY, SpecializationStrategy

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

DEFAULT_STRATEGY = "progressive"


def strategy_names() -> list[str]:
    return sorted(REGISTRY)


def strategy_class(name: str) -> type[SpecializationStrategy]:
    """The strategy registered as `name`, with a clear error listing the known names."""
    if name not in REGISTRY:
        raise UserError(f"unknown specialization {name!r}; specializations: {', '.join(strategy_names())}")
    return REGISTRY[name]


def class_path(name: str) -> str:
    cls = strategy_class(name)
    return f"{cls.__module__}.{cls.__qualname__}"


__all__ = ["DEFAULT_STRATEGY", "REGISTRY", "SpecializationStrategy", "class_path", "strategy_class", "strategy_names"]
