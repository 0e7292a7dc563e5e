"""CLIP's contrastive image–text pretraining (Radford et al. 2021, arXiv 2103.00020).

An image tower (any backbone) and a text tower (`bigssl.models.text`: byte-level tokens, a
causal transformer read at the END token), each followed by a linear projection only (no
non-linear head) into a shared space; the symmetric InfoNCE over the global batch
(`bigssl.losses.clip_loss`, both sides gathered with gradient). The temperature is learned as
a log-scale initialised to ln(1/0.07) and the multiplier is clamped at 100 (CLIP §2.5: needed
for stability); the clamp acts in the forward, so it holds under any engine.

Training batches carry one view per image and its caption (`data.views.policy: clip` reads
the shards' `.txt` members). Evaluation: zero-shot classification from class-name prompts
(`bigssl.eval.zeroshot`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bigssl import losses
from bigssl.methods.base import Batch, Method, StepOutput, register
from bigssl.methods.configs import CLIPConfig
from bigssl.models.backbones import build_backbone, feature_dim
from bigssl.models.text import ByteTokenizer, TextTransformer


@register("clip")
class CLIP(Method):
    config_class = CLIPConfig
    encodes_text = True
    config: CLIPConfig

    def build(self) -> None:
        method = self.config
        self.backbone = build_backbone(self.model_config)
        self.image_projection = nn.Linear(feature_dim(self.backbone), method.embed_dim, bias=False)
        self.text = TextTransformer(method.text_width, method.text_layers, method.text_heads, method.context_length)
        self.text_projection = nn.Linear(method.text_width, method.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / method.init_temperature)))
        self.tokenizer = ByteTokenizer(method.context_length)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_projection(self.backbone(images))

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts).to(self.logit_scale.device)
        return self.text_projection(self.text(tokens))

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=self.config.max_logit_scale)

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        if "text" not in batch:
            raise ValueError("method clip needs captions: data.views.policy: clip and shards with .txt members")
        features = self.backbone(batch["views"][0][0])
        image = self.image_projection(features)
        text = self.encode_text(list(batch["text"]))
        scale = self.scale()
        loss = losses.clip_loss(image, text, scale, gather=self.config.gather)
        return StepOutput(loss, features, image.detach(), metrics={"logit_scale": scale.detach()})
