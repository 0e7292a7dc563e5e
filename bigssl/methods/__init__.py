"""Method plug-ins; importing this package registers every method."""

from bigssl.methods import barlow, byol, clip, cmc, cpc, dino, instdisc, invaspread, moco, mocov3, simclr, simsiam, swav  # noqa: F401  (each registers itself)
from bigssl.methods.base import Method, build, method_class, method_config_class, names, register

__all__ = ["Method", "build", "method_class", "method_config_class", "names", "register"]
