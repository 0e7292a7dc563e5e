"""Dynamic loss scaling for fp16 training under the DDP and FSDP2 engines.

fp16 gradients underflow below 6·10⁻⁸; the loss is multiplied by a large power of two before
backward so they stay representable, and the gradients are divided by it before clipping and the
optimizer step. Powers of two make scaling exact (only the exponent moves). A step whose
gradients hold an inf or NaN anywhere is skipped and the scale halved; after `growth_interval`
clean steps in a row it doubles.

Sharded gradients (FSDP2) put an overflow on one rank only: every rank must agree before any
skips, or the replicas diverge. `unscale_` therefore votes across ranks.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from bigssl.distributed import comm


class DynamicLossScaler:
    def __init__(self, init_scale: float = 2.0**16, growth_interval: int = 2000,
                 min_scale: float = 1.0) -> None:
        self.scale = init_scale
        self.growth_interval = growth_interval
        self.min_scale = min_scale
        self.clean_steps = 0  # since the last overflow or growth
        self.overflow_steps = 0  # skipped so far in this run

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    @torch.no_grad()
    def unscale_(self, grads: list[torch.Tensor]) -> bool:
        """Divide `grads` (this rank's local tensors) by the scale in place; True when every
        rank's gradients are finite."""
        found_inf = torch.zeros(1)
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
        for grad in grads:
            groups[(grad.device, grad.dtype)].append(grad)
        for (device, _), members in groups.items():
            found = torch.zeros(1, device=device)
            inverse = torch.full((1,), 1.0 / self.scale, device=device)
            # One fused pass per device and dtype: multiplies, and flags any non-finite value.
            torch._amp_foreach_non_finite_check_and_unscale_(members, found, inverse)
            found_inf += found.cpu()
        return comm.all_agree(found_inf.item() == 0)

    def update(self, finite: bool) -> None:
        if not finite:
            self.scale = max(self.min_scale, self.scale / 2)
            self.clean_steps = 0
            self.overflow_steps += 1
            return
        self.clean_steps += 1
        if self.clean_steps == self.growth_interval:
            self.scale *= 2
            self.clean_steps = 0

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "clean_steps": self.clean_steps, "overflow_steps": self.overflow_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
        self.overflow_steps = int(state["overflow_steps"])
