"""Where a run stands in its data, as its checkpoints record it: the epoch, the steps done in
it, which of its samples were consumed (and which of those were bad), whether a resumed epoch
is replayed batch for batch, and the skip counts.

The trainer counts steps; this object opens each epoch's loader, hands out its batches (and
says when an exact epoch is over), keeps the rest and turns it into a checkpoint's entries
(`state_dict`) and back (`load_state_dict`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from bigssl.data.loader import BatchLoader, DataError
from bigssl.data.pipeline import SKIP_REASONS, TrainData, skip_vector
from bigssl.data.position import Consumed
from bigssl.distributed import comm


class EpochPosition:
    def __init__(self, data: TrainData) -> None:
        self.data = data
        self.epoch = 0
        self.epoch_step = 0  # steps done in the current epoch
        self.consumed = Consumed()  # samples of this epoch used (exact mode)
        self.bad = Consumed()  # the consumed samples that were skipped as bad
        self.replay = False  # resumed mid-epoch with the same data layout: replay the epoch's batches
        self.skipped: dict[str, int] = {}  # all ranks, epochs before the current one
        self._loader: BatchLoader | None = None  # the current epoch's, once opened

    def planned_end(self) -> int:
        """The epoch's last step, counted in `epoch_step`s."""
        return self.epoch_step + self.data.planned_steps(self.epoch, self.epoch_step, self.consumed, self.replay)

    def open(self, step: int) -> Iterator[dict[str, Any]]:
        """This rank's batches of the rest of the epoch; `step`: the run's step they start at.
        The epoch's data workers live as long as the iterator."""
        self._loader = self.data.loader(self.epoch, step, self.consumed, self.bad, self.replay)
        return iter(self._loader)

    def next_batch(self, batches: Iterator[dict[str, Any]], step: int) -> dict[str, Any] | None:
        """The next batch of `batches` (from `open`); None once an exact epoch is over on every
        rank (a collective in exact mode). A stream that ends otherwise is a DataError."""
        batch = next(batches, None)
        if not self.data.exact and batch is None:
            raise DataError(f"data.train: the resampled stream ended at step {step}; "
                            f"skipped so far: {self.skipped_now()}")
        # Exact epochs end when any rank runs dry (skipped samples can make one short).
        if self.data.exact and not comm.all_agree(batch is not None):
            if self.epoch_step == 0:
                raise DataError(f"data.train: epoch {self.epoch} gave no full batch on some rank; "
                                f"skipped so far: {self.skipped_now()}")
            return None
        return batch

    def epoch_skips(self) -> dict[str, int]:
        """This rank's skips in the current epoch, by reason."""
        return self._loader.skipped() if self._loader is not None else {}

    def fraction(self) -> float:
        """Epochs done, the current one's steps as a fraction."""
        return self.epoch + self.epoch_step / self.data.steps_per_epoch

    def skipped_now(self) -> dict[str, int]:
        """Skips over all ranks and all epochs so far (a collective: every rank calls it)."""
        this_epoch = comm.all_reduce_sum_cpu(skip_vector(self.epoch_skips())).tolist()
        return {r: self.skipped.get(r, 0) + n for r, n in zip(SKIP_REASONS, this_epoch, strict=True)}

    def next_epoch(self) -> None:
        """The current epoch is over (a collective: its skips are summed over ranks)."""
        self.skipped = self.skipped_now()
        self.epoch, self.epoch_step, self._loader = self.epoch + 1, 0, None
        self.consumed, self.bad, self.replay = Consumed(), Consumed(), False

    def state_dict(self) -> dict[str, Any]:
        """Every rank's position merged, as the checkpoint's entries (a collective)."""
        merged, merged_bad = Consumed(), Consumed()
        for part, bad in comm.all_gather_object((self.consumed.state_dict(), self.bad.state_dict())):
            merged.merge(Consumed.from_state(part))  # exact mode: ranks read disjoint shards
            merged_bad.merge(Consumed.from_state(bad))
        return {"epoch": self.epoch, "epoch_step": self.epoch_step, "skipped_before_epoch": dict(self.skipped),
                "skipped_in_epoch": self.skipped_now(), "consumed": merged.state_dict(),
                "bad": merged_bad.state_dict(), "shards": self.data.fingerprint(), "layout": self.data.layout()}

    def load_state_dict(self, state: dict[str, Any]) -> str | None:
        """The position from a checkpoint's entries; returns a message when the epoch's position
        cannot be carried over (another shard list)."""
        self.epoch, self.epoch_step = int(state["epoch"]), int(state["epoch_step"])
        self.skipped = dict(state["skipped_before_epoch"])
        self.consumed, self.bad, self.replay = Consumed(), Consumed(), False
        if state["shards"] != self.data.fingerprint():
            return "bigssl: data.train changed since the checkpoint: the epoch's position is not carried over"
        self.consumed = Consumed.from_state(state["consumed"])
        # Skips of the interrupted epoch are part of the position: keep them counted.
        self.skipped = dict(state["skipped_in_epoch"])
        # Same ranks, workers and batches: the epoch's remaining batches are replayed as they
        # would have come; otherwise the remaining samples are dealt afresh.
        if "bad" in state and state.get("layout") == self.data.layout():
            self.bad, self.replay = Consumed.from_state(state["bad"]), True
        return None
