"""Every method's config schema by `method.name`, without torch for most: the built-ins' from
configs.py, a plug-in's as it registers (`bigssl.methods.base.register` calls `register_schema`).

Config parsing (bigssl/config.py) imports no method: `method_schemas()` is what its caller,
`bigssl.recipes.load`, passes in. Reading and checking a recipe then takes a fraction of a
second; a method's own module (and with it torch and timm) is imported by `load_builtin` when
the method is built.

A built-in method may also be one file alone, bigssl/methods/<name>.py, holding its config
dataclass beside the method and registering both with `@register("<name>")`, with no entry in
configs.py (VICReg is). Its name is found from the file, without importing it (names(), the
"unknown method" error); its schema is the module's own registration, so a recipe naming such a
method pays the torch import (seconds on a cold disk) before its config errors are reported.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path

from bigssl.config import MethodConfig, MethodSchema
from bigssl.errors import ConfigError
from bigssl.methods.configs import CHOICES, CONFIGS

_PLUGINS: dict[str, MethodSchema] = {}
_ONE_FILE: dict[str, MethodSchema] = {}  # one-file built-ins' schemas, as their modules register them


@cache
def one_file_builtins() -> tuple[str, ...]:
    """Built-in methods without a configs.py entry: the modules of this package that register
    themselves under their own file name. Read as text, not imported: listing them costs no torch."""
    found = []
    for path in sorted(Path(__file__).parent.glob("*.py")):
        name = path.stem
        if name not in CONFIGS and re.search(rf"^@register\(\"{re.escape(name)}\"\)", path.read_text(
                encoding="utf-8"), re.MULTILINE):
            found.append(name)
    return tuple(found)


def builtin_names() -> list[str]:
    return sorted({*CONFIGS, *one_file_builtins()})


def register_schema(name: str, config_class: type[MethodConfig]) -> None:
    """A plug-in method's schema, or a one-file built-in's; a configs.py built-in's own
    registration changes nothing (configs.py has it)."""
    if name in one_file_builtins():
        _ONE_FILE[name] = MethodSchema(config_class)  # its fields check their own ranges
    elif name not in CONFIGS:
        _PLUGINS[name] = MethodSchema(config_class)


class _Schemas(Mapping[str, MethodSchema]):
    """Every method's schema by name; a one-file built-in's module is imported when its schema is
    first looked up (not when the names are listed or tested for)."""

    def __init__(self, ready: dict[str, MethodSchema]) -> None:
        self._ready = ready
        self._names = sorted({*ready, *one_file_builtins()})

    def __getitem__(self, name: str) -> MethodSchema:
        if name in self._ready:
            return self._ready[name]
        if name not in one_file_builtins():
            raise KeyError(name)
        load_builtin(name)
        return _ONE_FILE[name]

    def __contains__(self, name: object) -> bool:
        return name in self._ready or name in one_file_builtins()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def method_schemas() -> Mapping[str, MethodSchema]:
    """Every method registered so far and every built-in; a built-in name always means the built-in method."""
    builtins = {name: MethodSchema(schema, CHOICES.get(name, {}), builtin_ranges=True)
                for name, schema in CONFIGS.items()}
    return _Schemas({**_PLUGINS, **_ONE_FILE, **builtins})


def method_config_class(name: str) -> type[MethodConfig]:
    """The config schema of `method.name`, without importing the method (and torch) for configs.py's built-ins."""
    schemas = method_schemas()
    if name not in schemas:
        raise ConfigError(f"method.name: unknown method {name!r}; known: {', '.join(sorted(schemas))}")
    return schemas[name].config_class


def load_builtin(name: str) -> None:
    """Import the module of built-in method `name` (it registers itself); nothing for other names.
    By computed name, as any plug-in loader: no module's imports name the methods it builds."""
    if name in CONFIGS or name in one_file_builtins():
        importlib.import_module(f"bigssl.methods.{name}")
