"""Every method's config schema by `method.name`, without torch: the built-ins' from configs.py,
a plug-in's as it registers (`bigssl.methods.base.register` calls `register_schema`).

Config parsing (bigssl/config.py) imports no method: `method_schemas()` is what its caller,
`bigssl.recipes.load`, passes in. Reading and checking a recipe then takes a fraction of a
second; a method's own module (and with it torch and timm) is imported by `load_builtin` when
the method is built.
"""

from __future__ import annotations

import importlib

from bigssl.config import MethodConfig, MethodSchema
from bigssl.errors import ConfigError
from bigssl.methods.configs import CHOICES, CONFIGS

_PLUGINS: dict[str, MethodSchema] = {}


def register_schema(name: str, config_class: type[MethodConfig]) -> None:
    """A plug-in method's schema; a built-in's own registration changes nothing (configs.py has it)."""
    if name not in CONFIGS:
        _PLUGINS[name] = MethodSchema(config_class)


def method_schemas() -> dict[str, MethodSchema]:
    """Every method registered so far; a built-in name always means the built-in method."""
    builtins = {name: MethodSchema(schema, CHOICES.get(name, {}), builtin_ranges=True)
                for name, schema in CONFIGS.items()}
    return {**_PLUGINS, **builtins}


def method_config_class(name: str) -> type[MethodConfig]:
    """The config schema of `method.name`, without importing the method (and torch) for built-ins."""
    schemas = method_schemas()
    if name not in schemas:
        raise ConfigError(f"method.name: unknown method {name!r}; known: {', '.join(sorted(schemas))}")
    return schemas[name].config_class


def load_builtin(name: str) -> None:
    """Import the module of built-in method `name` (it registers itself); nothing for other names.
    By computed name, as any plug-in loader: no module's imports name the methods it builds."""
    if name in CONFIGS:
        importlib.import_module(f"bigssl.methods.{name}")
