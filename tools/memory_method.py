"""The smallest method for tools/bench_memory.py: the backbone's features, squared and averaged."""

from __future__ import annotations

from dataclasses import dataclass

from bigssl.config import MethodConfig
from bigssl.methods.base import Method, StepOutput, flat, register
from bigssl.models.backbones import build_backbone

FEATURES_METHOD = "bench_features"


@dataclass
class FeaturesConfig(MethodConfig):
    name: str = FEATURES_METHOD


@register(FEATURES_METHOD)
class Features(Method):
    config_class = FeaturesConfig

    def build(self) -> None:
        self.backbone = build_backbone(self.model_config)

    def training_step(self, batch, step):
        return StepOutput(self.backbone(flat(batch["views"][0])).pow(2).mean())
