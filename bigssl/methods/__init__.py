"""Method plug-ins: one module per method, imported when a run names it in `method.name`.

Every built-in method's config schema is in `bigssl.methods.configs`, which needs no torch, so
reading and checking a recipe takes a fraction of a second; the method's own module (and with
it torch and timm) is imported by `build` or `method_class`.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from bigssl.config import MethodConfig
from bigssl.errors import ConfigError
from bigssl.methods.configs import CONFIGS

__all__ = ["Method", "build", "method_class", "method_config_class", "names", "register"]


def load_builtin(name: str) -> None:
    """Import the module of built-in method `name` (it registers itself); nothing for other names."""
    if name in CONFIGS:
        importlib.import_module(f"bigssl.methods.{name}")


def method_config_class(name: str) -> type[MethodConfig]:
    """The config schema of `method.name`, without importing the method (and torch) for built-ins."""
    if name in CONFIGS:
        return CONFIGS[name]
    # A plug-in registered at run time has imported the registry already.
    base = sys.modules.get("bigssl.methods.base")
    registered = base._REGISTRY if base is not None else {}
    if name in registered:
        return registered[name].config_class
    known = ", ".join(sorted(set(CONFIGS) | set(registered)))
    raise ConfigError(f"method.name: unknown method {name!r}; known: {known}")


def __getattr__(attribute: str) -> Any:
    # The registry and the Method base class import torch: only when asked for.
    if attribute in ("Method", "build", "method_class", "names", "register"):
        from bigssl.methods import base

        return getattr(base, attribute)
    raise AttributeError(f"module 'bigssl.methods' has no attribute {attribute!r}")
