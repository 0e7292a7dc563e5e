"""Every built-in method's config section (`method.*`), kept apart from the methods themselves.

This module imports no torch: reading and checking a recipe (`bigssl train R --print-config`,
every config error) needs only these schemas, and must not wait seconds for torch and timm.
A method file takes its class from here; `CONFIGS` maps `method.name` to it, `CHOICES` the
allowed values of its text fields (bigssl/methods/schemas.py registers both for config parsing).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from bigssl.config import MethodConfig


@dataclass
class BarlowConfig(MethodConfig):
    name: str = "barlow"
    lambd: float = 0.0051
    differentiable_reduce: bool = True  # False: the official non-differentiable all_reduce of C


@dataclass
class BYOLConfig(MethodConfig):
    name: str = "byol"
    momentum: float = 0.996  # target EMA at step 0, cosine to 1 at the end (BYOL §3.2)
    predictor_hidden_dim: int = 4096  # predictor 256 → 4096 → 256, BN + ReLU inside


@dataclass
class CLIPConfig(MethodConfig):
    name: str = "clip"
    embed_dim: int = 512
    context_length: int = 77
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    gather: bool = True


@dataclass
class CMCConfig(MethodConfig):
    name: str = "cmc"
    objective: str = "bank"  # bank | batch
    temperature: float = 0.07
    negatives: int = 16384  # bank: noise entries per positive (the released weights used 4096)
    bank_momentum: float = 0.5
    loss: str = "nce"  # bank: nce | softmax


@dataclass
class CPCConfig(MethodConfig):
    name: str = "cpc"
    context_dim: int = 512
    context_layers: int = 2  # residual blocks of row-masked convolutions
    steps: int = 5  # predict 1 … steps rows ahead (CPC: up to 5)
    directions: list[str] = field(default_factory=lambda: ["down"])


@dataclass
class DINOConfig(MethodConfig):
    name: str = "dino"
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer: bool = True
    head_batch_norm: bool = False  # BN after each hidden layer of the head (the official `use_bn_in_head`)
    freeze_last_layer_epochs: float = 1.0
    momentum: float = 0.996  # teacher EMA at step 0, cosine to 1
    student_temp: float = 0.1
    teacher_temp: float = 0.04  # at step 0
    teacher_temp_final: float = 0.07  # after the warm-up (the paper's models)
    teacher_temp_warmup_epochs: float = 30.0
    center_momentum: float = 0.9
    weight_decay_end: float = 0.4  # cosine from optim.weight_decay (0.04)
    # How a ViT's position table is fitted to local crops: dino (bicubic with the official
    # scale factor, no antialias) | timm (timm's dynamic_img_size resampling).
    pos_interpolation: str = "dino"


@dataclass
class InstDiscConfig(MethodConfig):
    name: str = "instdisc"
    temperature: float = 0.07
    negatives: int = 4096  # noise entries per positive; softmax: 0 = the whole bank
    bank_momentum: float = 0.5
    loss: str = "nce"  # nce | softmax


@dataclass
class InvaSpreadConfig(MethodConfig):
    name: str = "invaspread"
    temperature: float = 0.1
    gather: bool = True  # candidates from every rank


@dataclass
class MoCoConfig(MethodConfig):
    name: str = "moco"
    temperature: float = 0.07  # v1; v2 uses 0.2
    momentum: float = 0.999  # key encoder EMA, constant
    queue_size: int = 65536  # over all ranks: every rank holds the whole queue
    shuffle_bn: bool = True
    key_bn_splits: int = 1  # slices per rank for the key encoder's BN (one process: > 1 to shuffle)


@dataclass
class MoCoV3Config(MethodConfig):
    name: str = "mocov3"
    temperature: float = 0.2  # ViT; the ResNet recipe uses 1.0
    momentum: float = 0.99  # at step 0, cosine to 1
    predictor_hidden_dim: int = 4096
    frozen_patch_embed: bool = True  # ViT: random patch projection, never trained
    sincos_pos_embed: bool = True  # ViT: fixed 2-D sin-cos position embedding


@dataclass
class SimCLRConfig(MethodConfig):
    name: str = "simclr"
    temperature: float = 0.1  # ImageNet optimum (SimCLR Table 5); 0.5 on CIFAR-10
    gather: bool = True  # negatives from all ranks; False = local batch only


@dataclass
class SimSiamConfig(MethodConfig):
    name: str = "simsiam"
    predictor_hidden_dim: int = 512
    fixed_predictor_lr: bool = True


@dataclass
class SwAVConfig(MethodConfig):
    name: str = "swav"
    prototypes: int = 3000
    temperature: float = 0.1
    epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    freeze_prototypes_epochs: float = 1.0
    freeze_prototypes_steps: int = 0  # when > 0, steps instead of epochs (the official 313 iterations)
    queue_length: int = 0  # over all ranks; 0 = no queue (the bs-256 recipe: 3840)
    queue_start_epoch: int = 15


CONFIGS: dict[str, type[MethodConfig]] = {
    "barlow": BarlowConfig,
    "byol": BYOLConfig,
    "clip": CLIPConfig,
    "cmc": CMCConfig,
    "cpc": CPCConfig,
    "dino": DINOConfig,
    "instdisc": InstDiscConfig,
    "invaspread": InvaSpreadConfig,
    "moco": MoCoConfig,
    "mocov3": MoCoV3Config,
    "simclr": SimCLRConfig,
    "simsiam": SimSiamConfig,
    "swav": SwAVConfig,
}

# The allowed values of built-in methods' text fields (a plug-in method checks its own).
CHOICES: dict[str, dict[str, tuple[str, ...]]] = {
    "instdisc": {"loss": ("nce", "softmax")},
    "cmc": {"loss": ("nce", "softmax"), "objective": ("bank", "batch")},
}
