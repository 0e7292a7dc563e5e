"""What a method is told about the run besides its own config section: the run context and the
view layout. Both are frozen: a method reads them in its constructor and its steps, and nothing
sets them later, so building a method is one call with no order to get right.

Torch-free, like configs.py: the trainer, tools and tests make them from a resolved `Config`
(`RunContext.of`, `ViewLayout.of`); a method never sees the `Config` itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from bigssl.config import Config, ViewsConfig


@dataclass(frozen=True)
class RunContext:
    """The facts of a run that a method needs from outside its own section."""

    global_batch: int  # samples per optimizer step over all ranks (optim.batch_size)
    world_size: int  # ranks
    seed: int  # the run's seed: draws a method makes itself (MoCo's shuffle, bank initialisation)
    steps_per_epoch: int  # optimizer steps per epoch (≥ 1): schedules counted in epochs
    total_steps: int  # optimizer steps of the whole run (≥ 1): schedules that end with training
    num_samples: int | None  # training samples (the shards' index), None when unknown: memory banks
    probe_classes: int | None  # classes of the online linear probe; None: no probe (eval.online_probe_classes)
    weight_decay: float  # the optimizer's weight decay (optim.weight_decay): where a method's own schedule starts

    def __post_init__(self) -> None:
        for name in ("global_batch", "world_size", "steps_per_epoch", "total_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"RunContext.{name} must be at least 1, got {getattr(self, name)}")

    @property
    def rank_batch(self) -> int:
        """Samples per step on each rank."""
        return self.global_batch // self.world_size

    @classmethod
    def of(cls, config: Config, *, world_size: int = 1, steps_per_epoch: int = 1, total_steps: int = 1,
           num_samples: int | None = None) -> RunContext:
        """The context of `config` run on `world_size` ranks. Step counts below 1 (a run too short
        for a whole epoch) count as 1: schedules divide by them."""
        return cls(global_batch=config.optim.batch_size, world_size=world_size, seed=config.seed,
                   steps_per_epoch=max(1, steps_per_epoch), total_steps=max(1, total_steps),
                   num_samples=num_samples, probe_classes=config.eval.online_probe_classes or None,
                   weight_decay=config.optim.weight_decay)


@dataclass(frozen=True)
class ViewLayout:
    """What the views a method receives are (`Batch` in methods/base.py says how they are laid
    out), as the view policy declares them (bigssl/methods/policies.py): a method checks these,
    never the policy's name. The defaults are two random-resized RGB crops per image."""

    views: int = 2  # global crops per image (data.views.views)
    local_crops: int = 0  # small crops per image (data.views.local_crops)
    crop: str = "random_resized"  # random_resized | random_square | patch_grid
    color_space: str = "rgb"  # of the global crops: rgb | lab
    channel_split: tuple[int, ...] = ()  # each global crop's channels as separate view groups (CMC: (1, 2))
    text: bool = False  # the batch carries each sample's caption

    @classmethod
    def of(cls, views: ViewsConfig) -> ViewLayout:
        """The layout of a `data.views` section; a field left null (a section not resolved
        against its policy) keeps the default."""
        def given(name: str):
            value = getattr(views, name)
            return getattr(cls, name) if value is None else value

        return cls(views=int(given("views")), local_crops=int(given("local_crops")), crop=str(given("crop")),
                   color_space=str(given("color_space")), channel_split=tuple(given("channel_split")),
                   text=bool(given("text")))
