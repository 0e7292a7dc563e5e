"""A recipe read with everything registered: the floor above config.py that tells it which
methods and view policies exist.

config.py parses and checks; it imports no method and no view policy, so what `method.name`
and `data.views.policy` may name reaches it as a `Registry` from here: every built-in method's
schema and every plug-in registered so far (bigssl/methods/schemas.py), every view policy's
published settings. Reading a recipe imports no torch.
"""

from __future__ import annotations

from pathlib import Path

from bigssl import config
from bigssl.config import Config, Registry
from bigssl.methods.policies import POLICIES, defaults
from bigssl.methods.schemas import method_schemas


def registry() -> Registry:
    """Built now, not once: a plug-in registered since the last call is in it."""
    return Registry(methods=method_schemas(), policies={name: defaults(name) for name in POLICIES})


def load(recipe: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Recipe YAML ⊕ `section.key=value` overrides → a validated, resolved `Config` (config.load)."""
    return config.load(recipe, overrides, registry=registry())
