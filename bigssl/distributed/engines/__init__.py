"""Engine registry and factory: `engine.kind` → an Engine.

An engine is one module (its class sets `kind`, declares its `capabilities` and reads its own
checkpoints) plus its entry in `ENGINES` here; nothing else in bigssl names it. The order is
the order in which `consolidate.engine_of` asks engines whether they wrote a checkpoint.
"""

from __future__ import annotations

import torch

from bigssl.config import Config
from bigssl.distributed.engines.base import Engine
from bigssl.distributed.engines.ddp import DDPEngine
from bigssl.distributed.engines.deepspeed_zero import DeepSpeedEngine
from bigssl.distributed.engines.fsdp import FSDPEngine
from bigssl.distributed.env import DistEnv

ENGINES: dict[str, type[Engine]] = {engine.kind: engine for engine in (DDPEngine, FSDPEngine, DeepSpeedEngine)}


def build_engine(config: Config, env: DistEnv, device: torch.device) -> Engine:
    return ENGINES[config.engine.kind](config, env, device)


__all__ = ["ENGINES", "Engine", "build_engine"]
