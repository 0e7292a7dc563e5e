"""Method plug-ins: one module per method, imported when a run names it in `method.name`.

Most built-in methods' config schemas are in `bigssl.methods.configs`, which needs no torch, so
reading and checking a recipe takes a fraction of a second; the method's own module (and with
it torch and timm) is imported by `build` or `method_class`. A built-in may instead be one file
alone, its schema beside the method (VICReg): its recipes import torch to be checked.
`bigssl.methods.schemas` holds the schemas by name, the built-ins' and those of plug-ins
registered at run time.
"""

from __future__ import annotations

from typing import Any

from bigssl.methods.schemas import load_builtin, method_config_class

__all__ = ["Method", "build", "load_builtin", "method_class", "method_config_class", "names", "register"]


def __getattr__(attribute: str) -> Any:
    # The registry and the Method base class import torch: only when asked for.
    if attribute in ("Method", "build", "method_class", "names", "register"):
        from bigssl.methods import base

        return getattr(base, attribute)
    raise AttributeError(f"module 'bigssl.methods' has no attribute {attribute!r}")
