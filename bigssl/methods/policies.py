"""The published augmentation settings of each view policy. Sources: InstDisc and MoCo v1,
zhirongw/lemniscate.pytorch main.py and facebookresearch/moco main_moco.py; MoCo v2 "aug+" (also
SimSiam's), facebookresearch/moco main_moco.py `--aug-plus`; SimCLR, Chen et al. 2020 (arXiv
2002.05709) App. A and google-research/simclr data_util.py; BYOL (also Barlow Twins'),
google-deepmind/deepmind-research byol/utils/augmentations.py and dataset.py; MoCo v3,
facebookresearch/moco-v3 main_moco.py; SwAV, facebookresearch/swav src/multicropdataset.py; DINO,
facebookresearch/dino main_dino.py; CMC, HobbitLong/CMC train_CMC.py; CPC, van den Oord et al.
2018 (arXiv 1807.03748) §3.2; CLIP, Radford et al. 2021 (arXiv 2103.00020) §2 and openai/CLIP
clip/clip.py.

Interpolation of the crop resize, per official code: torchvision's RandomResizedCrop default
(bilinear) where the code passes none, bicubic where it says so; each policy's comment names the
line. Crops are resized with antialiasing (as PIL, which the torchvision pipelines resize with);
the TensorFlow pipelines (SimCLR, BYOL) resize without it, a difference left in place.

A recipe names a policy in `data.views.policy`; every `data.views` field it leaves empty takes
the value below, so `--print-config` shows exactly what runs. Sizes given as fractions of the
global crop scale with it: a 32 px recipe gets 14 px local crops, not 96 px ones.

A policy also declares what it produces, in the same fields, so that the data pipeline never
needs to know which method's policy it runs (bigssl/data/ names no method): `crop` (how an
image is cut: random-resized crops, one random square of the resized image, or that square cut
into a grid of patches), `color_space` of the global crops (rgb or CIE Lab), `channel_split`
(each global crop's channels as separate views: CMC's L and ab) and `text` (the batch carries
each sample's caption). The views a method receives are laid out as bigssl/methods/base.py
documents (`Batch`).

These tables reach config parsing by registration (bigssl/recipes.py passes them in): config.py
imports no policy.
"""

from __future__ import annotations

from typing import Any

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

_COMMON: dict[str, Any] = {
    "size": 224, "views": 2, "crop_scale": [0.08, 1.0], "crop_ratio": [3 / 4, 4 / 3], "interpolation": "bilinear",
    "local_crops": 0, "local_size_fraction": 96 / 224, "local_crop_scale": [0.05, 0.4], "flip_prob": 0.5,
    "jitter": [0.0, 0.0, 0.0, 0.0], "jitter_prob": 0.0, "grayscale_prob": 0.0, "grayscale_first": False,
    "blur_prob": [0.0], "local_blur_prob": 0.0, "blur_sigma": [0.1, 2.0], "solarize_prob": [0.0],
    "local_solarize_prob": 0.0, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "resize_fraction": 256 / 224,
    "grid": 7, "patch_fraction": 64 / 256, "patch_jitter_fraction": 4 / 64,
    # What the views are (the module docstring): random-resized crops in RGB, one view per crop, no text.
    "crop": "random_resized", "color_space": "rgb", "channel_split": [], "text": False,
}

POLICIES: dict[str, dict[str, Any]] = {
    # InstDisc (lemniscate main.py:119-122, bilinear) and MoCo v1 (moco main_moco.py:238-243 at
    # 78b69ca, bilinear): grey *before* an always-on jitter, no blur.
    "instdisc": {"crop_scale": [0.2, 1.0], "jitter": [0.4, 0.4, 0.4, 0.4], "jitter_prob": 1.0,
                 "grayscale_prob": 0.2, "grayscale_first": True},
    # MoCo v2 "aug+" (moco main_moco.py:225-235 at 78b69ca) and SimSiam (main_simsiam.py:229-238),
    # both bilinear: jitter (0.4, 0.4, 0.4, 0.1) at 0.8, blur at 0.5.
    "mocov2": {"crop_scale": [0.2, 1.0], "jitter": [0.4, 0.4, 0.4, 0.1], "jitter_prob": 0.8,
               "grayscale_prob": 0.2, "blur_prob": [0.5]},
    # SimCLR App. A, strength s = 1: (0.8s, 0.8s, 0.8s, 0.2s) at 0.8; [0, 1] inputs, no
    # normalisation; bicubic (data_util.py:325, tf2/data_util.py:319-320).
    "simclr": {"interpolation": "bicubic", "jitter": [0.8, 0.8, 0.8, 0.2], "jitter_prob": 0.8,
               "grayscale_prob": 0.2, "blur_prob": [0.5], "mean": [], "std": []},
    # BYOL (augmentations.py:27-66; bicubic: dataset.py:201), also Barlow Twins (main.py:290-320,
    # bicubic at 293 and 308): asymmetric blur and solarize.
    "byol": {"interpolation": "bicubic", "jitter": [0.4, 0.4, 0.2, 0.1], "jitter_prob": 0.8,
             "grayscale_prob": 0.2, "blur_prob": [1.0, 0.1], "solarize_prob": [0.0, 0.2]},
    # MoCo v3 (main_moco.py:262-285): BYOL's views, resized bilinearly (RandomResizedCrop without
    # an interpolation, lines 263 and 275); crop scale from --crop-min (0.08 for ViTs, 0.2 for ResNets).
    "mocov3": {"jitter": [0.4, 0.4, 0.2, 0.1], "jitter_prob": 0.8, "grayscale_prob": 0.2, "blur_prob": [1.0, 0.1],
               "solarize_prob": [0.0, 0.2]},
    # SwAV multi-crop (multicropdataset.py:37-52, bilinear): 2 × 224 (0.14, 1) + 6 × 96 (0.05,
    # 0.14) in scripts/swav_800ep_pretrain.sh; its std has 0.228 for red (sic).
    "swav": {"crop_scale": [0.14, 1.0], "local_crops": 6, "local_crop_scale": [0.05, 0.14],
             "jitter": [0.8, 0.8, 0.8, 0.2], "jitter_prob": 0.8, "grayscale_prob": 0.2, "blur_prob": [0.5],
             "local_blur_prob": 0.5, "std": [0.228, 0.224, 0.225]},
    # DINO (main_dino.py defaults, DataAugmentationDINO at 419-464): 2 × 224 (0.4, 1) + 8 × 96
    # (0.05, 0.4), bicubic (436, 443, 452); blur 1.0 / 0.1 / local 0.5; solarize on the second
    # global view only.
    "dino": {"crop_scale": [0.4, 1.0], "interpolation": "bicubic", "local_crops": 8,
             "local_crop_scale": [0.05, 0.4], "jitter": [0.4, 0.4, 0.2, 0.1], "jitter_prob": 0.8,
             "grayscale_prob": 0.2, "blur_prob": [1.0, 0.1], "local_blur_prob": 0.5, "solarize_prob": [0.0, 0.2]},
    # CMC (train_CMC.py:143-149, bilinear): one crop (0.2, 1: --crop_low, train_CMC.py:88; 0.08
    # for ResNets on ImageNet, train_CMC.py:95-97, as its ImageNet recipe sets) and a flip, no
    # colour jitter; the view pair is L and ab of Lab.
    "cmc": {"views": 1, "crop_scale": [0.2, 1.0], "color_space": "lab", "channel_split": [1, 2]},
    # CPC v1: random 256 crop of a 300 px resize, 7 × 7 patches of 64 px at stride 32, each a
    # random 60 px sub-crop padded back to 64; greyscale; flip. No official code: bilinear.
    "cpc": {"size": 256, "views": 1, "resize_fraction": 300 / 256, "grayscale_prob": 1.0, "crop": "patch_grid"},
    # CLIP: a random square crop of the resized image is the only augmentation; CLIP's statistics;
    # bicubic, as the released preprocessing (clip.py:79-86; the training code is not public).
    "clip": {"views": 1, "resize_fraction": 1.0, "interpolation": "bicubic", "crop": "random_square", "text": True,
             "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
}


def defaults(policy: str) -> dict[str, Any]:
    return {**_COMMON, **POLICIES[policy]}
