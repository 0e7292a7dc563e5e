"""BatchNorm over the global batch ("SyncBN"), the same code on CPU/gloo and CUDA/NCCL.

torch's nn.SyncBatchNorm refuses CPU tensors, so its cross-rank path could never be tested
without GPUs; this one is plain tensor ops and small all-reduces (two in forward, one in
backward), so the gloo tests check the exact code that runs on GPUs.

Training mode, more than one rank: mean and biased variance over every rank's samples,
normalise, affine; running statistics take the unbiased global variance with torch's momentum
rule (momentum=None: the cumulative average). Gradients are those of one process holding the
whole batch: the backward all-reduces Σdy and Σdy·x̂, which is the backward of the forward's
sum all-reduce. Eval mode and a single process run torch's own BatchNorm unchanged. The
classes subclass nn.BatchNorm1d/2d/3d with no state of their own: state-dict keys, checkpoints
and exports are those of plain BatchNorm.
"""

from __future__ import annotations

import torch
from torch import nn

from bigssl.distributed import comm
from bigssl.errors import ConfigError


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]  # every dimension but the channels


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # float32 for bf16/fp16, float64 stays


def _per_channel(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return values.view(1, -1, *([1] * (x.dim() - 2)))  # broadcasts against [N, C, ...]


class _GlobalBatchNormFn(torch.autograd.Function):
    """y = γ·(x − μ)/√(σ² + ε) + β with μ, σ² over all ranks; returns (y, μ, σ², global count).

    Statistics are float32 at least, whatever the input dtype (bf16 autocast included), and
    two-pass: the global mean first, then Σ(x − mean)², one small all-reduce each. One pass,
    E[x²] − E[x]², would save a collective but loses about 2⁻²⁴·(mean/std)² of the variance to
    cancellation: mean/std reaches 30 on the first BN after the tests' tiny ViT, where it moved
    SimCLR's first loss by 1e-5 (relative) from one process's; two-pass, by 4e-7.
    Only the input is kept for backward, in its own dtype, as torch's fused kernels do; x̂ is
    recomputed there.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                eps: float) -> tuple[torch.Tensor, ...]:
        dims, channels = _reduce_dims(x), x.shape[1]
        xf = x.to(_compute_dtype(x))
        count = xf.new_full((1,), float(x.numel() // channels))
        # float32 holds counts exactly up to 2^24 per channel (and within 6e-8 beyond).
        total = comm.all_reduce_sum_no_grad(torch.cat([xf.sum(dims), count]))
        n = total[channels:]
        mean = total[:channels] / n
        centred = xf - _per_channel(mean, x)
        var = comm.all_reduce_sum_no_grad(centred.square().sum(dims)) / n
        invstd = (var + eps).rsqrt()
        y = centred * _per_channel(invstd, x)
        if weight is not None:
            y = y * _per_channel(weight.to(xf.dtype), x)
        if bias is not None:
            y = y + _per_channel(bias.to(xf.dtype), x)
        ctx.save_for_backward(x, weight, mean, invstd, n)
        ctx.mark_non_differentiable(mean, var, n)
        return y.to(x.dtype), mean, var, n

    @staticmethod
    def backward(ctx, dy: torch.Tensor, *_: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, mean, invstd, n = ctx.saved_tensors
        dims = _reduce_dims(x)
        xhat = (x.to(mean.dtype) - _per_channel(mean, x)) * _per_channel(invstd, x)
        dyf = dy.to(mean.dtype)
        sum_dy, sum_dy_xhat = dyf.sum(dims), (dyf * xhat).sum(dims)
        # γ and β are applied per sample on this rank: their gradients are this rank's share,
        # which the engine sums (averages) over ranks like any other parameter's.
        # (affine=False has neither; a bias, when there is one, has the weight's dtype.)
        grad_weight = sum_dy_xhat.to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.to(weight.dtype) if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:  # the same on every rank (same graph), so all take this collective or none
            total = comm.all_reduce_sum_no_grad(torch.cat([sum_dy, sum_dy_xhat])) / n
            mean_dy, mean_dy_xhat = total.chunk(2)
            scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
            grad_x = ((dyf - _per_channel(mean_dy, x) - xhat * _per_channel(mean_dy_xhat, x))
                      * _per_channel(scale, x)).to(x.dtype)
        return grad_x, grad_weight, grad_bias, None


class _GlobalStatistics(nn.modules.batchnorm._BatchNorm):
    """The forward shared by GlobalBatchNorm1d/2d/3d (input checks come from the torch class)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and comm.is_distributed()):
            return super().forward(input)
        self._check_input_dim(input)
        factor = self._update_factor()
        out, mean, var, n = _GlobalBatchNormFn.apply(input, self.weight, self.bias, self.eps)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():  # torch's rule: the unbiased variance, n/(n − 1)
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_mean.mul_(1 - factor).add_((mean * factor).to(self.running_mean.dtype))
                self.running_var.mul_(1 - factor).add_((unbiased * factor).to(self.running_var.dtype))
        return out

    def _update_factor(self) -> float:
        """Count the batch and return the running-average weight, as _BatchNorm.forward does."""
        if not self.track_running_stats or self.num_batches_tracked is None:
            return 0.0
        self.num_batches_tracked.add_(1)
        return 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum


class GlobalBatchNorm1d(_GlobalStatistics, nn.BatchNorm1d):
    """nn.BatchNorm1d ([N, C] or [N, C, L]) with statistics over the global batch."""


class GlobalBatchNorm2d(_GlobalStatistics, nn.BatchNorm2d):
    """nn.BatchNorm2d with statistics over the global batch."""


class GlobalBatchNorm3d(_GlobalStatistics, nn.BatchNorm3d):
    """nn.BatchNorm3d with statistics over the global batch."""


_GLOBAL: dict[type[nn.Module], type[_GlobalStatistics]] = {
    nn.BatchNorm1d: GlobalBatchNorm1d, nn.BatchNorm2d: GlobalBatchNorm2d, nn.BatchNorm3d: GlobalBatchNorm3d}


def convert_sync_bn(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm1d/2d/3d in `module` by its global-batch twin, in place; returns
    `module` (or its replacement, if it is a BatchNorm itself).

    The twin takes over the same Parameter and buffer objects, so names, state-dict keys and an
    EMA teacher's pairing with its student are unchanged; call it before the optimizer and any
    wrapping or sharding see the model. Other _BatchNorm subclasses (timm's BatchNormAct2d,
    torch's SyncBatchNorm) have forwards of their own that a twin would silently drop: refused.
    """
    return _convert(module, "", {})


def _convert(module: nn.Module, path: str, done: dict[int, nn.Module]) -> nn.Module:
    if id(module) in done:  # one BatchNorm reachable by two names stays one module
        return done[id(module)]
    if isinstance(module, _GlobalStatistics):
        return module
    if type(module) in _GLOBAL:
        twin = _GLOBAL[type(module)](module.num_features, module.eps, module.momentum, module.affine,
                                     module.track_running_stats, device="meta")
        for name in ("weight", "bias"):
            setattr(twin, name, getattr(module, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(twin, name, getattr(module, name))
        twin.train(module.training)
        done[id(module)] = twin
        return twin
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        raise ConfigError(f"engine.sync_bn: {path or 'the model'} is a {type(module).__name__}, which has a "
                          "forward of its own; only nn.BatchNorm1d/2d/3d are converted")
    for name, child in list(module._modules.items()):  # every name (named_children skips aliases)
        if child is None:
            continue
        converted = _convert(child, f"{path}.{name}" if path else name, done)
        if converted is not child:
            module.add_module(name, converted)
    done[id(module)] = module
    return module
