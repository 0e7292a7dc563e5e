"""The data side of a run, as the trainer sees it: epoch length, one loader per epoch, the
resumable position, skip counters. Also the labelled evaluation stream."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from typing import Any

import torch

from bigssl.config import Config, ViewsConfig
from bigssl.data.decode import decode_label, decode_rgb, decode_text, image_bytes
from bigssl.data.loader import BatchLoader
from bigssl.data.position import Consumed
from bigssl.data.shards import ShardSet, resolve
from bigssl.data.stream import ShardStream, StreamSpec, check_exact_split, samples_per_rank
from bigssl.data.views import EvalGeometry, Geometry, Photometric
from bigssl.errors import ConfigError

SKIP_REASONS = ("decode_error", "no_image", "missing_label", "bad_label", "missing_text", "shard_error")


class TrainSample:
    """Raw sample → {"views": uint8 groups, "label"[, "text"]} (in DataLoader workers: must pickle)."""

    def __init__(self, geometry: Geometry, require_labels: bool, fast_decode: bool, text: bool) -> None:
        self.geometry = geometry
        self.require_labels = require_labels
        self.fast_decode = fast_decode
        self.text = text

    def __call__(self, sample: dict[str, Any], rng: random.Random | None = None) -> dict[str, Any]:
        label = decode_label(sample, self.require_labels)
        out = {"views": self.geometry(decode_rgb(image_bytes(sample), self.fast_decode), rng), "label": label}
        if self.text:
            out["text"] = decode_text(sample)
        return out


class EvalSample:
    """Raw sample → {"image": uint8 [C, S, S], "label"}: the deterministic view, labels required."""

    def __init__(self, views: ViewsConfig) -> None:
        self.geometry = EvalGeometry(views)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        label = decode_label(sample, required=True)
        return {"image": self.geometry(decode_rgb(image_bytes(sample))), "label": label}


class TrainData:
    def __init__(self, config: Config, rank: int, world_size: int, local_batch: int) -> None:
        data = config.data
        self.config = config
        self.rank, self.world_size, self.local_batch = rank, world_size, local_batch
        self.shards: ShardSet = resolve(data.train, "data.train", data.weights)
        self.exact = data.mode == "exact"
        if self.exact:
            self.shards.require_counts("data.mode=exact")
            check_exact_split(self.shards, world_size, data.workers)
        samples = data.samples_per_epoch or self.shards.total
        if not samples:
            raise ConfigError(f"data.samples_per_epoch: the size of data.train is unknown (no index.json from bigssl "
                              f"shards, nor img2dataset's _stats.json, for {self.shards.first_uncounted()}); set it")
        self.steps_per_epoch = samples // config.optim.batch_size
        if self.steps_per_epoch < 1:
            raise ConfigError(f"optim.batch_size={config.optim.batch_size} exceeds the {samples} samples per epoch")
        self.geometry = Geometry(data.views)
        self.photometric = Photometric(data.views)
        self._generator: torch.Generator | None = None  # the photometric draws', on the training device

    def to_device(self, batch: dict[str, Any], step: int, device: torch.device) -> dict[str, Any]:
        """A training batch's uint8 crops to `device`, then the photometric half of its views,
        batched there, from draws seeded by (seed, rank, step)."""
        groups = [g.to(device, non_blocking=True) for g in batch["views"]]
        key = hashlib.blake2b(f"{self.config.seed}/{self.rank}/{step}".encode(), digest_size=8).digest()
        seed = int.from_bytes(key, "little") >> 1
        if self._generator is None:
            self._generator = torch.Generator(device=device)
        generator = self._generator.manual_seed(seed)  # reproducible per (seed, rank, step)
        # The global generators too (drop path, dropout, anything a method draws): a resumed run
        # then draws at step s what an uninterrupted one drew there.
        torch.manual_seed(seed)
        views = self.photometric(groups, generator)
        return {**batch, "views": views, "label": batch["label"].to(device, non_blocking=True)}

    def spec(self, epoch: int, restart_step: int) -> StreamSpec:
        data = self.config.data
        # A resampled stream restarted mid-epoch draws afresh rather than replaying the epoch's start.
        seed = self.config.seed if self.exact else self.config.seed * 1_000_003 + restart_step
        return StreamSpec(mode=data.mode, seed=seed, epoch=epoch, rank=self.rank, world_size=self.world_size,
                          interleave=data.interleave, shuffle_buffer=data.shuffle_buffer,
                          micro_batch=data.micro_batch or self.local_batch)

    def planned_steps(self, epoch: int, epoch_step: int, consumed: Consumed, replay: bool = False) -> int:
        """Steps left in this epoch. Exact mode: as many full batches as the rank with the
        fewest remaining samples can make (the tail that cannot fill a step on every rank is
        left out, as drop_last does); a replayed epoch keeps the plan of its start."""
        left = self.steps_per_epoch - epoch_step
        if not self.exact:
            return left
        if replay:
            return self.planned_steps(epoch, 0, Consumed()) - epoch_step
        # workers=0 reads in the main process: one reader, as the stream counts it.
        per_rank = samples_per_rank(self.shards, self.spec(epoch, 0), max(1, self.config.data.workers), consumed)
        return min(left, min(per_rank) // self.local_batch)

    def layout(self) -> dict[str, int]:
        """What decides which batch each rank gets at each step of an exact epoch: a restart
        with the same layout can replay the epoch batch for batch."""
        data = self.config.data
        spec = self.spec(0, 0)
        return {"seed": self.config.seed, "world_size": self.world_size, "workers": data.workers,
                "local_batch": self.local_batch, "micro_batch": spec.micro_batch, "interleave": spec.interleave,
                "shuffle_buffer": spec.shuffle_buffer}

    def loader(self, epoch: int, restart_step: int, consumed: Consumed, bad: Consumed,
               replay: bool = False) -> BatchLoader:
        """This rank's batches of `epoch`; exact mode marks what it hands out in `consumed` (and
        skipped samples also in `bad`). `replay`: the epoch exactly as from its start, with the
        consumed samples passed over (same layout as when they were consumed)."""
        data = self.config.data
        sample = TrainSample(self.geometry, data.require_labels, data.fast_decode, text=bool(data.views.text))
        exact = consumed if self.exact else None
        stream = ShardStream(self.shards, sample, self.spec(epoch, restart_step), exact,
                             replay_bad=bad if self.exact and replay else None, seed_samples=True)
        return BatchLoader(stream, self.local_batch, data.workers, data.timeout_s, consumed=exact,
                           bad=bad if self.exact else None)

    def fingerprint(self) -> list[str]:
        return self.shards.urls


def skip_vector(skipped: dict[str, int]) -> torch.Tensor:
    return torch.tensor([skipped.get(reason, 0) for reason in SKIP_REASONS], dtype=torch.long)


def eval_batches(shards: ShardSet, views: ViewsConfig, rank: int, world_size: int, batch_size: int,
                 workers: int, timeout_s: float) -> Iterator[dict[str, Any]]:
    """Every labelled sample of `shards` once over all ranks, in batches (the last one smaller)."""
    spec = StreamSpec(mode="exact", rank=rank, world_size=world_size, interleave=1, shuffle_buffer=0,
                      micro_batch=min(batch_size, 64))
    my_shards = max(1, len(shards.shards[rank::world_size]))
    stream = ShardStream(shards, EvalSample(views), spec)
    yield from BatchLoader(stream, batch_size, min(workers, my_shards), timeout_s, keep_tail=True)
