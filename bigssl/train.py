"""The Trainer: one loop for every method and every engine.

It reads the config, joins the process group, builds the data stream, the method and the
engine, resumes from the newest checkpoint of its run directory, and then steps: set the
scheduled values, forward, backward, step, log, checkpoint, evaluate. Nothing here knows
which method or engine it runs.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bigssl import config as config_lib
from bigssl import files, health, preemption, runtime
from bigssl.checkpoint import Checkpointer
from bigssl.config import Config
from bigssl.data.loader import DataError
from bigssl.data.pipeline import SKIP_REASONS, TrainData, eval_batches, skip_vector
from bigssl.data.position import Consumed
from bigssl.data.shards import resolve
from bigssl.data.views import view_grid
from bigssl.distributed import comm
from bigssl.distributed import env as env_lib
from bigssl.distributed.engines import build_engine
from bigssl.errors import UserError
from bigssl.eval import attention, knn, zeroshot
from bigssl.eval.export import save_backbone
from bigssl.methods import build as build_method
from bigssl.methods.base import StepOutput
from bigssl.methods.context import RunContext
from bigssl.monitor import Monitor
from bigssl.optim import GroupSettings, build_optimizer, lr_schedule


class _Window:
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


@dataclass
class Progress:
    """Trainer state that goes into every checkpoint."""

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0  # steps done in the current epoch
    consumed: Consumed = field(default_factory=Consumed)  # samples of this epoch used (exact mode)
    bad: Consumed = field(default_factory=Consumed)  # the consumed samples that were skipped as bad
    replay: bool = False  # resumed mid-epoch with the same data layout: replay the epoch's batches
    skipped: dict[str, int] = field(default_factory=dict)  # all ranks, epochs before the current one
    knn: dict[str, float] = field(default_factory=dict)  # first scores, e.g. the random-init kNN
    nonfinite: int = 0  # steps skipped for a non-finite loss, the whole run


class TrainingDiverged(UserError):
    """Too many non-finite losses in a row."""


class Trainer:
    def __init__(self, config: Config, stop_request: preemption.StopRequest | None = None) -> None:
        self.config = config
        # Installed by train() before anything slow (joining the group, building, resuming), so
        # a stop signal during start-up is honoured after the first step instead of killing it.
        self.stop_request = stop_request or preemption.StopRequest()
        runtime.keep_freed_memory()  # before workers fork: they inherit it
        self.env = env_lib.detect()
        self.backend = env_lib.init(self.env, config.engine.backend, config.engine.timeout_s,
                                    config.engine.dead_rank_timeout_s)
        self.device = env_lib.device_for(self.env)
        self.run_dir = Path(config.log.dir)
        self.local_batch = config_lib.per_rank_batch(config, self.env.world_size)

        # Data first: a missing shard must fail before any model is built.
        self.data = TrainData(config, self.env.rank, self.env.world_size, self.local_batch)
        self.val_shards = resolve(config.data.val, "data.val") if config.data.val else None
        self.steps_per_epoch = self.data.steps_per_epoch
        self.total_steps = config.optim.epochs * self.steps_per_epoch
        self.last_step = min(self.total_steps, config.optim.max_steps or self.total_steps)
        self.lr = lr_schedule(config.optim, self.steps_per_epoch, self.total_steps)

        torch.manual_seed(config.seed)  # identical initial weights on every rank
        self.method = build_method(config, RunContext.of(
            config, world_size=self.env.world_size, steps_per_epoch=self.steps_per_epoch,
            total_steps=self.total_steps, num_samples=self.data.shards.total))
        self.engine = build_engine(config, self.env, self.device)
        probe_lr = config.eval.online_probe_lr
        rules = self.method.param_rules()
        self.engine.setup(self.method, lambda module: build_optimizer(module, config.optim, probe_lr, rules))
        self.checkpoints = Checkpointer(self.run_dir, config.checkpoint.keep, self.env.is_main)
        self.progress = Progress()
        self.collapse_watch = health.CollapseWatch()
        self._zero_shot_note_given = False
        self._fixed: torch.Tensor | None = None  # the attention-map images, read at the first evaluation
        self.generator = torch.Generator(device=self.device)
        self.window = _Window(self.device)
        self._logged_skips: dict[str, int] = {}  # the skip counts of the last metrics record
        # Once everything that can fail on the user's input (data, method, model, engine) has
        # been built: such a failure's one line then stands alone, with no banner before it.
        print(f"bigssl: {env_lib.describe(self.env, self.backend)}", file=sys.stderr, flush=True)

    # ----------------------------------------------------------------------------- helpers
    def _to_device(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        """uint8 crops to the device, then the photometric half of the views, batched there."""
        groups = [g.to(self.device, non_blocking=True) for g in batch["views"]]
        key = hashlib.blake2b(f"{self.config.seed}/{self.env.rank}/{step}".encode(), digest_size=8).digest()
        seed = int.from_bytes(key, "little") >> 1
        self.generator.manual_seed(seed)  # reproducible per (seed, rank, step)
        # The global generators too (drop path, dropout, anything a method draws): a resumed run
        # then draws at step s what an uninterrupted one drew there.
        torch.manual_seed(seed)
        views = self.data.photometric(groups, self.generator)
        return {**batch, "views": views, "label": batch["label"].to(self.device, non_blocking=True)}

    def _set_lr(self, step: int) -> float:
        """The scheduled lr (and the method's weight decay, if it schedules one) into every group."""
        lr, weight_decay = self.lr(step), self.method.weight_decay_at(step)
        for group in self.engine.optimizer.param_groups:
            settings = GroupSettings.of(group)
            base = self.config.optim.lr if settings.fixed_lr else lr
            group["lr"] = base * settings.lr_scale
            # A frozen group is left out of the optimizer step altogether (optim.skipping_frozen_groups).
            group["frozen"] = step < settings.frozen_steps
            if weight_decay is not None and settings.scheduled_wd:
                group["weight_decay"] = weight_decay
        return lr

    def _skipped_now(self, loader_skipped: dict[str, int]) -> dict[str, int]:
        """Skips over all ranks and all epochs so far (a collective: every rank calls it)."""
        this_epoch = comm.all_reduce_sum_cpu(skip_vector(loader_skipped)).tolist()
        return {r: self.progress.skipped.get(r, 0) + n for r, n in zip(SKIP_REASONS, this_epoch, strict=True)}

    def _save(self, loader_skipped: dict[str, int]) -> None:
        p = self.progress
        comm.broadcast_norm_statistics(self.method)  # the checkpoint holds rank 0's, whichever rank writes
        merged, merged_bad = Consumed(), Consumed()
        for part, bad in comm.all_gather_object((p.consumed.state_dict(), p.bad.state_dict())):
            merged.merge(Consumed.from_state(part))  # exact mode: ranks read disjoint shards
            merged_bad.merge(Consumed.from_state(bad))
        extra = {"step": p.step, "epoch": p.epoch, "epoch_step": p.epoch_step, "knn": dict(p.knn),
                 "skipped_before_epoch": dict(p.skipped), "skipped_in_epoch": self._skipped_now(loader_skipped),
                 "consumed": merged.state_dict(), "bad": merged_bad.state_dict(), "shards": self.data.fingerprint(),
                 "layout": self.data.layout(), "log_window": self.window.state(), "nonfinite": p.nonfinite}
        self.checkpoints.save(p.step, self.engine, extra)

    def _restore(self, extra: dict[str, Any], monitor_message: list[str]) -> None:
        """The trainer's state from a loaded checkpoint's `extra`."""
        p = Progress(step=int(extra["step"]), epoch=int(extra["epoch"]), epoch_step=int(extra["epoch_step"]),
                     knn=dict(extra["knn"]), skipped=dict(extra["skipped_before_epoch"]),
                     nonfinite=int(extra.get("nonfinite", 0)))
        if extra["shards"] == self.data.fingerprint():
            p.consumed = Consumed.from_state(extra["consumed"])
            # Skips of the interrupted epoch are part of the position: keep them counted.
            p.skipped = dict(extra["skipped_in_epoch"])
            # Same ranks, workers and batches: the epoch's remaining batches are replayed as they
            # would have come; otherwise the remaining samples are dealt afresh.
            if "bad" in extra and extra.get("layout") == self.data.layout():
                p.bad, p.replay = Consumed.from_state(extra["bad"]), True
        else:
            monitor_message.append("bigssl: data.train changed since the checkpoint: the epoch's position "
                                   "is not carried over")
        self.progress = p
        self.window.restore(extra.get("log_window"), self.env.rank)

    def _knn(self, model: torch.nn.Module | None = None) -> dict[str, float]:
        return self._knn_with_features(model)[0]

    def _knn_with_features(self, model: torch.nn.Module | None = None) -> tuple[dict[str, float], knn.Features]:
        ev, data = self.config.eval, self.config.data
        model = model or self.engine.full_module(self.method.backbone)
        comm.broadcast_norm_statistics(model)  # one network on every rank: the one exported
        args = (data.views, self.data.photometric.normalize, ev.batch_size, data.workers, self.device,
                data.timeout_s)
        train = knn.extract(model, self.data.shards, *args)
        val = knn.extract(model, self.val_shards, *args)
        return knn.weighted_knn(train, val, ev.knn_k, ev.knn_temperature), val

    def _evaluate(self, monitor: Monitor, step: int, final: bool) -> dict[str, float]:
        """kNN (logged), the ViT attention maps of fixed images and, at the end, a labelled
        embedding dump for TensorBoard's projector. A collective: every rank calls it."""
        model = self.engine.full_module(self.method.backbone)
        scores, val = self._knn_with_features(model)
        monitor.log(step, {"knn/top1": scores["top1"], "knn/top5": scores["top5"]})
        if self.env.is_main and attention.has_attention_maps(model):
            images = self._fixed_images()
            inputs = self.data.photometric.normalize(images.to(self.device).float().div(255))
            maps = attention.cls_attention(model, inputs)
            monitor.image("attention/last_block_cls", attention.attention_grid(images.float().div(255), maps), step)
        if final and self.env.is_main:
            keep = min(len(val.labels), self.config.eval.projector_samples)
            monitor.embedding("embeddings/val", val.features[:keep], val.labels[:keep].tolist(), step)
        if self._zero_shot_ready(monitor):
            zero_shot = self._zero_shot()
            monitor.log(step, {"zeroshot/top1": zero_shot["top1"], "zeroshot/top5": zero_shot["top5"]})
            scores = {**scores, "zeroshot_top1": zero_shot["top1"], "zeroshot_top5": zero_shot["top5"]}
        return scores

    def _zero_shot_ready(self, monitor: Monitor) -> bool:
        """Image–text methods are scored zero-shot where the engine holds whole parameters;
        sharded ones are scored offline (`bigssl eval zeroshot`), which merges any checkpoint."""
        if not hasattr(self.method, "encode_text"):
            return False
        engine = self.config.engine
        if engine.kind == "ddp" or (engine.kind == "deepspeed" and engine.zero_stage < 3):
            return True
        if not self._zero_shot_note_given:
            monitor.message(f"bigssl: zero-shot is not scored during training under engine.kind={engine.kind} "
                            "(sharded parameters); run `bigssl eval zeroshot RUN --val SHARDS` on a checkpoint")
            self._zero_shot_note_given = True
        return False

    def _zero_shot(self) -> dict[str, float]:
        data, ev = self.config.data, self.config.eval
        return zeroshot.zero_shot(self.method, self.val_shards, "data.val", data.views, self.data.photometric.normalize,
                                  ev.batch_size, data.workers, self.device, data.timeout_s)

    def _fixed_images(self, count: int = 4) -> torch.Tensor:
        """The first `count` validation images in their evaluation view (uint8), the same at every evaluation."""
        if self._fixed is None:
            batches = eval_batches(self.val_shards, self.config.data.views, 0, 1, count, 0, self.config.data.timeout_s)
            self._fixed = next(iter(batches))["image"]
        return self._fixed

    def _baselines(self, monitor: Monitor) -> None:
        """Scores to compare the trained backbone against, taken before the first step."""
        ev = self.config.eval
        names = [name for name, wanted in (("the random-init backbone", ev.knn_baseline), ("raw pixels", ev.knn_pixels))
                 if wanted]
        if not names:
            return
        started = time.perf_counter()
        monitor.message(f"bigssl: baselines: kNN of {' and '.join(names)} on {self.config.data.val}…")
        if ev.knn_baseline:
            scores = self._knn()
            self.progress.knn["random_init"] = scores["top1"]
            monitor.log(0, {"knn/random_init_top1": scores["top1"], "knn/random_init_top5": scores["top5"]})
            if self._zero_shot_ready(monitor):
                zero_shot = self._zero_shot()
                self.progress.knn["random_init_zeroshot"] = zero_shot["top1"]
                monitor.log(0, {"zeroshot/random_init_top1": zero_shot["top1"],
                                "zeroshot/random_init_top5": zero_shot["top5"]})
        if ev.knn_pixels:
            scores = self._knn(torch.nn.Flatten())
            self.progress.knn["pixels"] = scores["top1"]
            monitor.log(0, {"knn/pixels_top1": scores["top1"], "knn/pixels_top5": scores["top5"]})
        found = ", ".join(f"{BASELINE_NAMES.get(name, name)} {score:.4f}" for name, score in self.progress.knn.items())
        monitor.message(f"bigssl: baselines: {found} ({time.perf_counter() - started:.0f} s)")

    def _knn_due(self, epochs_done: int) -> bool:
        every = self.config.eval.knn_every_epochs
        return bool(every) and epochs_done % every == 0

    # -------------------------------------------------------------------------------- loop
    def fit(self) -> dict[str, float]:
        config = self.config
        messages: list[str] = []  # printed through the monitor once it exists (rank 0)
        # The newest checkpoint that verifies and loads; corrupt ones are set aside.
        found = self.checkpoints.resume(messages.append, self.engine.load) if config.checkpoint.resume else None
        resume_from = None if found is None else found[0]
        if found is not None:
            self._restore(found[1], messages)
            messages.append(f"bigssl: resumed from {resume_from} (step {self.progress.step})")
        elif self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            files.write_text(self.run_dir / "config.yaml", config_lib.to_yaml(config))
        p = self.progress
        monitor = Monitor(self.run_dir, self.env.is_main, p.step, tensorboard=config.log.tensorboard,
                          progress=config.log.progress)
        try:
            for message in messages:
                monitor.message(message)
            scores = self._run(monitor, fresh=resume_from is None)
        except BaseException:
            monitor.close(failing=True)  # also on errors, so the bar does not print after the error line
            raise
        monitor.close()
        return scores

    def _run(self, monitor: Monitor, fresh: bool) -> dict[str, float]:
        config, p = self.config, self.progress
        evaluating = self.val_shards is not None and (config.eval.knn_at_end or config.eval.knn_every_epochs > 0)
        if evaluating and fresh:
            self._baselines(monitor)
        self._announce_training(monitor)
        monitor.start_progress(self.last_step, p.step)

        window = self.window
        last_saved = p.step
        nonfinite_in_a_row = 0
        epoch_skips: dict[str, int] = {}  # this rank's skips in the current epoch
        while p.step < self.last_step and p.epoch < config.optim.epochs:
            # The epoch's last step.
            planned = p.epoch_step + self.data.planned_steps(p.epoch, p.epoch_step, p.consumed, p.replay)
            loader = self.data.loader(p.epoch, p.step, p.consumed, p.bad, p.replay)
            batches = iter(loader)
            while p.epoch_step < planned and p.step < self.last_step:
                fetch_start = time.perf_counter()
                batch = next(batches, None)
                if not self.data.exact and batch is None:
                    raise DataError(f"data.train: the resampled stream ended at step {p.step}; "
                                    f"skipped so far: {self._skipped_now(loader.skipped())}")
                # Exact epochs end when any rank runs dry (skipped samples can make one short).
                if self.data.exact and not comm.all_agree(batch is not None):
                    if p.epoch_step == 0:
                        raise DataError(f"data.train: epoch {p.epoch} gave no full batch on some rank; "
                                        f"skipped so far: {self._skipped_now(loader.skipped())}")
                    break
                batch = self._to_device(batch, p.step)
                window.data_wait += time.perf_counter() - fetch_start
                if p.step == 0:
                    monitor.image("views/first_batch", view_grid(batch["views"], self.data.photometric), 0)
                lr = self._set_lr(p.step)
                if unit_rows := self.method.unit_norm_rows():
                    self.engine.normalise_rows(unit_rows)
                out = self.engine.forward(batch, p.step)
                # One small collective per step: a finite loss on every rank, and whether a stop
                # signal reached any rank (then every rank stops after this same step).
                finite, stop = comm.agree(bool(torch.isfinite(out.loss.detach()).all()),
                                          self.stop_request.received is not None)
                if finite:
                    self.engine.backward(out.loss)
                    grad_norm = self.engine.step()
                    if pairs := self.method.ema_pairs():
                        self.engine.ema_update(pairs, self.method.ema_momentum(p.step))
                    self.method.after_step(p.step)
                    window.add(out)
                    nonfinite_in_a_row = 0
                else:  # no backward, no update: the weights stay as they were
                    nonfinite_in_a_row += 1
                    self._skip_nonfinite(monitor, nonfinite_in_a_row)
                    grad_norm = float("nan")
                p.step += 1
                p.epoch_step += 1
                # (Every rank agrees on skipped steps, so on whether the window has any.)
                if (p.step % config.log.every_steps == 0 or p.step == self.last_step) and window.steps:
                    # Health from a skipped step's NaN embeddings would only raise false alarms.
                    health_values = self._health(out, p.step) if finite else {}
                    values = {"lr": lr, "grad_norm": grad_norm, **self.engine.metrics(), **health_values}
                    if p.nonfinite:
                        values["nonfinite_steps"] = p.nonfinite
                    self._log_window(monitor, window, values, loader.skipped())
                every = config.checkpoint.every_steps
                if every and p.step % every == 0 and p.step < self.last_step:
                    self._save(loader.skipped())
                    last_saved = p.step
                if stop and p.step < self.last_step:
                    self._stop(monitor, loader.skipped(), saved=p.step == last_saved)
            epoch_skips = loader.skipped()
            del batches  # shut this epoch's workers down before anything else runs
            if p.step >= self.last_step and p.epoch_step < planned:
                break  # a capped run stopping mid-epoch: the position stays in the epoch
            p.skipped = self._skipped_now(epoch_skips)
            p.epoch, p.epoch_step, epoch_skips = p.epoch + 1, 0, {}
            p.consumed, p.bad, p.replay = Consumed(), Consumed(), False
            if p.step != last_saved and p.step < self.last_step:
                self._save(epoch_skips)
                last_saved = p.step
            if evaluating and self._knn_due(p.epoch) and p.step < self.last_step:
                scores = self._evaluate(monitor, p.step, final=False)
                monitor.message(f"bigssl: kNN after epoch {p.epoch} (step {p.step}): top-1 {scores['top1']:.4f}")

        monitor.end_progress()
        if p.step != last_saved:
            self._save(epoch_skips)
        backbone = self.engine.full_module(self.method.backbone)  # a collective under sharded engines
        if self.env.is_main:
            save_backbone(backbone, config, self.run_dir)
        final_scores: dict[str, float] = {}
        if evaluating and (config.eval.knn_at_end or (p.epoch_step == 0 and self._knn_due(p.epoch))):
            started = time.perf_counter()
            monitor.message(f"bigssl: final evaluation: kNN of the trained backbone on {config.data.val}…")
            final_scores = self._evaluate(monitor, p.step, final=True)
            monitor.message(f"bigssl: final evaluation done ({time.perf_counter() - started:.0f} s)")
            monitor.message(self._summary(p.step, final_scores))
        skipped = self._skipped_now(epoch_skips)
        if any(skipped.values()) and skipped != self._logged_skips:
            # Samples read after the last log step were skipped too (an exact epoch ends when a
            # rank runs dry, after reading its tail): the last record agrees with the summary.
            monitor.log(p.step, {f"data/skipped_{reason}": count for reason, count in skipped.items()})
        if any(skipped.values()):
            monitor.message("bigssl: skipped data: " + ", ".join(f"{n} {r}" for r, n in skipped.items() if n))
        if self.env.is_main:
            monitor.message(self._run_directory_note())
        return final_scores

    def _announce_training(self, monitor: Monitor) -> None:
        p, config = self.progress, self.config
        where = f"resuming at step {p.step}" if p.step else "from step 0"
        monitor.message(f"bigssl: training: {self.last_step} steps ({config.optim.epochs} epochs of "
                        f"{self.steps_per_epoch} steps, global batch {config.optim.batch_size}, "
                        f"{self.env.world_size} rank{'s' if self.env.world_size > 1 else ''}), {where}; "
                        f"writing to {self.run_dir}")

    def _run_directory_note(self) -> str:
        """Where everything went, and the one command to look at it."""
        entries = sorted(path.name + ("/" if path.is_dir() else "") for path in self.run_dir.iterdir()
                         if not path.name.startswith("."))
        note = f"bigssl: run directory {self.run_dir}: {', '.join(entries)}"
        if (self.run_dir / "tb").is_dir():
            note += f"\nbigssl: to look at it: tensorboard --logdir {self.run_dir / 'tb'}"
        return note

    def _skip_nonfinite(self, monitor: Monitor, in_a_row: int) -> None:
        p, limit = self.progress, self.config.optim.nonfinite_limit
        p.nonfinite += 1
        step = p.step + 1  # numbered as in metrics.jsonl: the step it would have completed
        monitor.message(f"bigssl: warning: step {step}: the loss is not finite on some rank; step skipped "
                        f"({in_a_row} in a row, {p.nonfinite} in the run)")
        if in_a_row >= limit:
            raise TrainingDiverged(
                f"optim.nonfinite_limit: the loss was not finite for {in_a_row} steps in a row (steps "
                f"{step - in_a_row + 1}-{step}); stopped. {self._kept_checkpoint()}; lower optim.base_lr, set "
                "optim.clip_grad, or train in fp32 before resuming")

    def _kept_checkpoint(self) -> str:
        latest = self.checkpoints.latest()
        if latest is None:
            return "No checkpoint was written yet (a rerun starts from step 0)"
        return f"The last checkpoint, {latest}, is kept"


    def _stop(self, monitor: Monitor, loader_skipped: dict[str, int], saved: bool) -> None:
        """A stop signal reached some rank: checkpoint here, requeue under SLURM, raise Stopped."""
        if not saved:
            self._save(loader_skipped)
        signals = sorted({name for name in comm.all_gather_object(self.stop_request.received) if name})
        message = (f"bigssl: {'/'.join(signals)} received: stopped after step {self.progress.step}, "
                   f"checkpoint {self.checkpoints.latest()}")
        job = preemption.slurm_job_id()
        if self.env.is_main and job and self.config.checkpoint.requeue and preemption.REQUEUE_SIGNAL in signals:
            # Before the last barrier: once a rank exits, srun --kill-on-bad-exit may end rank 0.
            message += "; " + preemption.requeue_slurm_job(job)
        monitor.message(message)
        comm.barrier()
        raise preemption.Stopped(message)

    def _log_window(self, monitor: Monitor, window: _Window, values: dict[str, float],
                    epoch_skips: dict[str, int]) -> None:
        """Log the means since the last log step (loss averaged over ranks too) and restart the window."""
        step = self.progress.step
        skipped = self._skipped_now(epoch_skips)
        elapsed = time.perf_counter() - window.start
        means = window.means()
        loss = means["loss"]
        record = {"epoch": self.progress.epoch + self.progress.epoch_step / self.steps_per_epoch, **means,
                  **values, "images_per_s": self.config.optim.batch_size * window.timed_steps / elapsed,
                  "data_wait_fraction": window.data_wait / elapsed, "world_size": self.env.world_size}
        if any(skipped.values()):
            record.update({f"data/skipped_{reason}": count for reason, count in skipped.items()})
        self._logged_skips = skipped
        monitor.log(step, record)
        for warning in self.collapse_watch.check(step, record):
            monitor.message(warning)
        monitor.progress(step, {"epoch": f"{record['epoch']:.2f}", "loss": f"{loss:.4f}", "lr": f"{values['lr']:.3g}",
                                "img/s": f"{record['images_per_s']:.0f}",
                                "data wait": f"{100 * record['data_wait_fraction']:.0f}%"})
        window.reset()

    def _health(self, out: StepOutput, step: int) -> dict[str, float]:
        """Numbers that tell a healthy run from a sick one, at a log step (a collective)."""
        values: dict[str, float] = {}
        if out.embedding is not None:  # over the global batch: the effective rank needs many rows
            values.update(health.embedding_health(comm.gather_variable(out.embedding.detach().float())))
        for index, group in enumerate(self.engine.optimizer.param_groups):
            name = group.get("name", f"group{index}")
            values[f"lr/{name}"] = 0.0 if group.get("frozen") else float(group["lr"])  # the lr it steps with
            values[f"wd/{name}"] = float(group.get("weight_decay", 0.0))
        if self.method.ema_pairs():
            values["ema_momentum"] = self.method.ema_momentum(step - 1)  # the update after the step just taken
        values.update(runtime.memory_gib(self.device))
        return values

    def _summary(self, step: int, scores: dict[str, float]) -> str:
        ev = self.config.eval
        baselines = {name: value for name, value in self.progress.knn.items() if not name.endswith("_zeroshot")}
        lines = _table(f"kNN top-1 (k={ev.knn_k}, T={ev.knn_temperature}) of {self.config.data.val}:",
                       baselines, f"trained, step {step}", scores["top1"])
        if "zeroshot_top1" in scores:
            zero_shot = {name.removesuffix("_zeroshot"): value for name, value in self.progress.knn.items()
                         if name.endswith("_zeroshot")}
            lines += _table(f"zero-shot top-1 (class-name prompts) of {self.config.data.val}:", zero_shot,
                            f"trained, step {step}", scores["zeroshot_top1"])
        return "\n".join(lines)


BASELINE_NAMES = {"pixels": "raw pixels", "random_init": "random init"}


def verdict(baselines: dict[str, float], value: float) -> str:
    """Which baselines the trained score beat, in words: 'beats raw pixels (+0.0325) and random init (+0.2735)'."""
    beaten = [f"{BASELINE_NAMES.get(n, n)} (+{value - s:.4f})" for n, s in sorted(baselines.items()) if value > s]
    missed = [f"{BASELINE_NAMES.get(n, n)} ({value - s:+.4f})" for n, s in sorted(baselines.items()) if value <= s]
    text = "beats " + " and ".join(beaten) if beaten else "beats no baseline"
    return text + ("; does not beat " + " or ".join(missed) if missed else "")


def _table(title: str, baselines: dict[str, float], name: str, value: float) -> list[str]:
    rows = [(BASELINE_NAMES.get(key, key), score) for key, score in sorted(baselines.items())] + [(name, value)]
    width = max(len(key) for key, _ in rows)
    lines = [title] + [f"  {key:<{width}}  {score:.4f}" for key, score in rows]
    if baselines:
        lines.append(f"  the trained backbone {verdict(baselines, value)}")
    return lines


def train(config: Config, stop_request: preemption.StopRequest | None = None) -> dict[str, float]:
    """Run `config` to its end. `stop_request`: one the caller installed already (the CLI does,
    before its imports); by default one is installed for the run."""
    own = stop_request is None
    stop_request = stop_request or preemption.StopRequest()
    if own:
        stop_request.install()
    try:
        scores = Trainer(config, stop_request).fit()
    except preemption.Stopped:
        env_lib.shutdown()  # every rank stopped at the same step: leave together
        raise
    except BaseException as err:
        lost = env_lib.lost_ranks(err)
        env_lib.shutdown(clean=False)
        if lost:
            raise env_lib.RankLost(lost) from err
        raise
    finally:
        if own:
            stop_request.restore()
    env_lib.shutdown()
    return scores
