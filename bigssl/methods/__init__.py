"""Method plug-ins; importing this package registers every method."""

from bigssl.methods import simclr  # noqa: F401  (registers itself)
from bigssl.methods.base import Method, build, method_class, method_config_class, names, register

__all__ = ["Method", "build", "method_class", "method_config_class", "names", "register"]
