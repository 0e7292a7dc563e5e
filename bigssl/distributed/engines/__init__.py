"""Engine factory: `engine.kind` → an Engine."""

from __future__ import annotations

import torch

from bigssl.config import Config
from bigssl.distributed.engines.base import Engine
from bigssl.distributed.engines.ddp import DDPEngine
from bigssl.distributed.engines.deepspeed_zero import DeepSpeedEngine
from bigssl.distributed.engines.fsdp import FSDPEngine
from bigssl.distributed.env import DistEnv

_ENGINES: dict[str, type[Engine]] = {"ddp": DDPEngine, "fsdp": FSDPEngine, "deepspeed": DeepSpeedEngine}


def build_engine(config: Config, env: DistEnv, device: torch.device) -> Engine:
    return _ENGINES[config.engine.kind](config, env, device)


__all__ = ["Engine", "build_engine"]
