"""What the trainer logs at each log step: the means since the last one, its values, the skip
counts, collapse warnings and the progress line (`StepLog`, every rank: its means are collectives).

`LogWindow` sums the method's loss and every other 0-dim tensor it reports on the device, step
by step, and averages over the steps and the ranks at the log step only (no device sync per
step). Its unfinished sums go into every checkpoint, so a resumed run logs what an
uninterrupted one logs.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from bigssl.distributed import comm
from bigssl.health import CollapseWatch
from bigssl.monitor import Monitor

if TYPE_CHECKING:
    from bigssl.methods.base import StepOutput


class LogWindow:
    """Accumulates what happened since the last log step, without syncing the device each step:
    the method's loss and every other 0-dim tensor it reports (see methods/base.py)."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.reset()

    def reset(self) -> None:
        self.start, self.data_wait, self.steps = time.perf_counter(), 0.0, 0
        self.timed_steps = 0  # steps of this process since `start` (a restored window has more)
        self.loss_sum.zero_()
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, out: StepOutput) -> None:
        self.loss_sum += (out.loss if out.ssl_loss is None else out.ssl_loss).detach().float()
        for name, value in out.scalars().items():
            value = value.detach().float()
            self.sums[name] = value if name not in self.sums else self.sums[name] + value
        self.steps += 1
        self.timed_steps += 1

    def means(self) -> dict[str, float]:
        """Window means over every rank (a collective)."""
        names = sorted(self.sums)
        values = torch.stack([self.loss_sum, *(self.sums[n] for n in names)]) / self.steps
        values = comm.all_reduce_mean(values).tolist()
        return dict(zip(["loss", *names], values, strict=True))

    def state(self) -> dict[str, Any]:
        """The unfinished window, every rank's sums (a collective), for a checkpoint: a run
        resumed between two log steps then logs the same means as an uninterrupted one."""
        names = sorted(self.sums)
        mine = torch.stack([self.loss_sum, *(self.sums[n] for n in names)]).cpu().tolist()
        return {"steps": self.steps, "names": names, "per_rank": comm.all_gather_object(mine)}

    def restore(self, state: dict[str, Any] | None, rank: int) -> None:
        if not state or not state["steps"]:
            return
        per_rank = state["per_rank"]
        # At another world size each rank takes the mean, which keeps the logged mean.
        sums = per_rank[rank] if len(per_rank) == comm.world_size() else [sum(v) / len(per_rank)
                                                                           for v in zip(*per_rank, strict=True)]
        values = torch.tensor(sums, dtype=torch.float32, device=self.loss_sum.device)
        self.loss_sum.copy_(values[0])
        self.sums = dict(zip(state["names"], values[1:].unbind(), strict=True))
        self.steps = state["steps"]


    def record(self, epoch: float, values: dict[str, Any], global_batch: int, world_size: int) -> dict[str, Any]:
        """The window's log record (a collective: the means over ranks): the epoch, the means,
        `values` (lr, gradient norm, health, ...), the throughput and the data-wait fraction."""
        elapsed = time.perf_counter() - self.start
        return {"epoch": epoch, **self.means(), **values, "images_per_s": global_batch * self.timed_steps / elapsed,
                "data_wait_fraction": self.data_wait / elapsed, "world_size": world_size}


class StepLog:
    def __init__(self, device: torch.device, global_batch: int, world_size: int) -> None:
        self.window = LogWindow(device)
        self.global_batch, self.world_size = global_batch, world_size
        self.collapse_watch = CollapseWatch()
        self.logged_skips: dict[str, int] = {}  # the skip counts of the last metrics record

    def log(self, monitor: Monitor, step: int, epoch: float, values: dict[str, float], skipped: dict[str, int]) -> None:
        """Log the window's means (loss averaged over ranks too), `values` and the skip counts
        of every rank so far, then restart the window (a collective)."""
        record = self.window.record(epoch, values, self.global_batch, self.world_size)
        if any(skipped.values()):
            record.update({f"data/skipped_{reason}": count for reason, count in skipped.items()})
        self.logged_skips = skipped
        monitor.log(step, record)
        for warning in self.collapse_watch.check(step, record):
            monitor.message(warning)
        monitor.progress(step, {"epoch": f"{record['epoch']:.2f}", "loss": f"{record['loss']:.4f}",
                                "lr": f"{values['lr']:.3g}", "img/s": f"{record['images_per_s']:.0f}",
                                "data wait": f"{100 * record['data_wait_fraction']:.0f}%"})
        self.window.reset()

    def summarise_skips(self, monitor: Monitor, step: int, skipped: dict[str, int]) -> None:
        """At the end: the run's skip counts, in the metrics (unless the last record has them) and in words."""
        if any(skipped.values()) and skipped != self.logged_skips:
            # Samples read after the last log step were skipped too (an exact epoch ends when a
            # rank runs dry, after reading its tail): the last record agrees with the summary.
            monitor.log(step, {f"data/skipped_{reason}": count for reason, count in skipped.items()})
        if any(skipped.values()):
            monitor.message("bigssl: skipped data: " + ", ".join(f"{n} {r}" for r, n in skipped.items() if n))
