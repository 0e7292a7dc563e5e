"""Self-supervised losses as plain functions on tensors.

Each function states what crosses ranks and with which gradient. With `gather=True` and a
process group up, the loss on W ranks × B samples has the same value (averaged over ranks)
and, after the engine averages gradients, the same gradients as one rank holding all W·B
samples. With `gather=False`, or in a single process, only the local batch is used.
"""

from bigssl.losses.contrastive import (
    clip_loss,
    cpc_loss,
    info_nce,
    invaspread_loss,
    multiview_nt_xent,
    nce_loss,
    nt_xent,
)
from bigssl.losses.distillation import dino_loss, sinkhorn, swav_loss
from bigssl.losses.regression import barlow_twins_loss, negative_cosine, normalized_mse

__all__ = ["barlow_twins_loss", "clip_loss", "cpc_loss", "dino_loss", "info_nce", "invaspread_loss",
           "multiview_nt_xent", "nce_loss", "negative_cosine", "normalized_mse", "nt_xent", "sinkhorn", "swav_loss"]
