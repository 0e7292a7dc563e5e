"""The Trainer: one loop for every method and every engine.

It reads the config, joins the process group, builds the data stream, the method and the
engine, resumes from the newest checkpoint of its run directory, and then steps: set the
scheduled values, forward, backward, step, log, checkpoint, stop on a signal. What it scores
is bigssl/eval/during_training.py's, where it stands in its data bigssl/data/epoch.py's.
Nothing here knows which method or engine it runs.
"""

from __future__ import annotations

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
from bigssl.data.epoch import EpochPosition
from bigssl.data.pipeline import TrainData
from bigssl.data.shards import resolve
from bigssl.data.views import view_grid
from bigssl.distributed import comm
from bigssl.distributed import env as env_lib
from bigssl.distributed.engines import build_engine
from bigssl.errors import UserError
from bigssl.eval.during_training import TrainingEvaluation
from bigssl.eval.export import save_backbone
from bigssl.methods import build as build_method
from bigssl.methods.context import RunContext
from bigssl.monitor import Monitor, run_directory_note
from bigssl.optim import GroupSettings, build_optimizer, lr_schedule
from bigssl.step_log import StepLog


@dataclass
class Progress:
    """Trainer state that goes into every checkpoint, beside the data position (`EpochPosition`)."""

    step: int = 0
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
        val_shards = resolve(config.data.val, "data.val") if config.data.val else None
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
        self.position = EpochPosition(self.data)
        self.evaluation = TrainingEvaluation(config.eval, config.data, self.data.shards, val_shards,
                                             self.data.photometric.normalize, self.engine, self.method,
                                             self.device, self.env.is_main)
        self.log = StepLog(self.device, config.optim.batch_size, self.env.world_size)
        self.window = self.log.window
        self._last_saved = 0  # the step of the newest checkpoint of this process (or where it resumed)
        self._nonfinite_in_a_row = 0
        # Once everything that can fail on the user's input (data, method, model, engine) has
        # been built: such a failure's one line then stands alone, with no banner before it.
        print(f"bigssl: {env_lib.describe(self.env, self.backend)}", file=sys.stderr, flush=True)

    # ----------------------------------------------------------------------------- helpers
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

    def _save(self) -> None:
        p = self.progress
        comm.broadcast_norm_statistics(self.method)  # the checkpoint holds rank 0's, whichever rank writes
        position = self.position.state_dict()
        # The entries in the order checkpoints have always had them.
        extra = {"step": p.step, "epoch": position.pop("epoch"), "epoch_step": position.pop("epoch_step"),
                 "knn": dict(p.knn), **position, "log_window": self.window.state(), "nonfinite": p.nonfinite}
        self.checkpoints.save(p.step, self.engine, extra)

    def _restore(self, extra: dict[str, Any], monitor_message: list[str]) -> None:
        """The trainer's state from a loaded checkpoint's `extra`."""
        self.progress = Progress(step=int(extra["step"]), knn=dict(extra["knn"]),
                                 nonfinite=int(extra.get("nonfinite", 0)))
        if (note := self.position.load_state_dict(extra)) is not None:
            monitor_message.append(note)
        self.window.restore(extra.get("log_window"), self.env.rank)

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
        p, position = self.progress, self.position
        if fresh:
            p.knn.update(self.evaluation.baselines(monitor))
        self._announce_training(monitor)
        monitor.start_progress(self.last_step, p.step)
        self._last_saved = p.step
        while p.step < self.last_step and position.epoch < self.config.optim.epochs:
            planned = position.planned_end()  # the epoch's last step
            self._epoch(monitor, planned)
            if p.step >= self.last_step and position.epoch_step < planned:
                break  # a capped run stopping mid-epoch: the position stays in the epoch
            self._end_epoch(monitor)
        return self._finish(monitor)

    def _epoch(self, monitor: Monitor, planned: int) -> None:
        """The current epoch's steps up to its step `planned` (or the run's last). Its data
        workers are shut down on return (with `batches`), before anything else runs."""
        p, position = self.progress, self.position
        batches = position.open(p.step)
        while position.epoch_step < planned and p.step < self.last_step:
            fetch_start = time.perf_counter()
            batch = position.next_batch(batches, p.step)
            if batch is None:
                break
            batch = self.data.to_device(batch, p.step, self.device)
            self.window.data_wait += time.perf_counter() - fetch_start
            self._step(monitor, batch)

    def _step(self, monitor: Monitor, batch: dict[str, Any]) -> None:
        """One training step, then its log record, checkpoint and stop, as they fall due."""
        p, config = self.progress, self.config
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
        grad_norm = self._update(out) if finite else self._skip_nonfinite(monitor)
        p.step += 1
        self.position.epoch_step += 1
        # (Every rank agrees on skipped steps, so on whether the window has any.)
        if (p.step % config.log.every_steps == 0 or p.step == self.last_step) and self.window.steps:
            self._log_step(monitor, out if finite else None, lr, grad_norm)
        every = config.checkpoint.every_steps
        if every and p.step % every == 0 and p.step < self.last_step:
            self._save()
            self._last_saved = p.step
        if stop and p.step < self.last_step:
            self._stop(monitor, saved=p.step == self._last_saved)

    def _update(self, out: dict[str, Any]) -> float:
        """Backward, the optimizer step, the EMA teachers; returns the gradient norm."""
        self.engine.backward(out.loss)
        grad_norm = self.engine.step()
        if pairs := self.method.ema_pairs():
            self.engine.ema_update(pairs, self.method.ema_momentum(self.progress.step))
        self.method.after_step(self.progress.step)
        self.window.add(out)
        self._nonfinite_in_a_row = 0
        return grad_norm

    def _end_epoch(self, monitor: Monitor) -> None:
        """The next epoch's position, its checkpoint, and a kNN evaluation when one is due."""
        p, position = self.progress, self.position
        position.next_epoch()
        if p.step != self._last_saved and p.step < self.last_step:
            self._save()
            self._last_saved = p.step
        if self.evaluation.due(position.epoch) and p.step < self.last_step:
            scores = self.evaluation.evaluate(monitor, p.step, final=False)
            monitor.message(f"bigssl: kNN after epoch {position.epoch} (step {p.step}): top-1 {scores['top1']:.4f}")

    def _finish(self, monitor: Monitor) -> dict[str, float]:
        """The last checkpoint, the exported backbone, the final evaluation and the skip summary."""
        p = self.progress
        monitor.end_progress()
        if p.step != self._last_saved:
            self._save()
        backbone = self.engine.full_module(self.method.backbone)  # a collective under sharded engines
        if self.env.is_main:
            save_backbone(backbone, self.config, self.run_dir)
        final_scores: dict[str, float] = {}
        if self.evaluation.due_at_end(self.position.epoch, mid_epoch=self.position.epoch_step != 0):
            final_scores = self.evaluation.final(monitor, p.step, p.knn)
        self.log.summarise_skips(monitor, p.step, self.position.skipped_now())
        if self.env.is_main:
            monitor.message(run_directory_note(self.run_dir))
        return final_scores

    def _announce_training(self, monitor: Monitor) -> None:
        p, config = self.progress, self.config
        where = f"resuming at step {p.step}" if p.step else "from step 0"
        monitor.message(f"bigssl: training: {self.last_step} steps ({config.optim.epochs} epochs of "
                        f"{self.steps_per_epoch} steps, global batch {config.optim.batch_size}, "
                        f"{self.env.world_size} rank{'s' if self.env.world_size > 1 else ''}), {where}; "
                        f"writing to {self.run_dir}")

    def _skip_nonfinite(self, monitor: Monitor) -> float:
        """A step whose loss is not finite on some rank: no backward, no update (the weights stay
        as they were); too many in a row stop the run. Returns the step's gradient norm, NaN."""
        p, limit = self.progress, self.config.optim.nonfinite_limit
        self._nonfinite_in_a_row += 1
        in_a_row = self._nonfinite_in_a_row
        p.nonfinite += 1
        step = p.step + 1  # numbered as in metrics.jsonl: the step it would have completed
        monitor.message(f"bigssl: warning: step {step}: the loss is not finite on some rank; step skipped "
                        f"({in_a_row} in a row, {p.nonfinite} in the run)")
        if in_a_row >= limit:
            raise TrainingDiverged(
                f"optim.nonfinite_limit: the loss was not finite for {in_a_row} steps in a row (steps "
                f"{step - in_a_row + 1}-{step}); stopped. {self.checkpoints.kept_note()}; lower optim.base_lr, set "
                "optim.clip_grad, or train in fp32 before resuming")
        return float("nan")

    def _stop(self, monitor: Monitor, saved: bool) -> None:
        """A stop signal reached some rank: checkpoint here, requeue under SLURM, raise Stopped."""
        if not saved:
            self._save()
        signals = sorted({name for name in comm.all_gather_object(self.stop_request.received) if name})
        message = preemption.stop_note(signals, self.progress.step, self.checkpoints.latest(),
                                       self.config.checkpoint.requeue, self.env.is_main)
        monitor.message(message)
        comm.barrier()
        raise preemption.Stopped(message)

    def _log_step(self, monitor: Monitor, out: dict[str, Any] | None, lr: float, grad_norm: float) -> None:
        """The log record of the window ending at this step; `out`: the step's outputs, None when
        it was skipped (health from its NaN embeddings would only raise false alarms)."""
        step = self.progress.step
        health_values: dict[str, float] = {}
        if out is not None:
            ema = self.method.ema_momentum(step - 1) if self.method.ema_pairs() else None  # the update just applied
            health_values = health.log_step_values(out, self.engine.optimizer.param_groups, ema, self.device)
        values = {"lr": lr, "grad_norm": grad_norm, **self.engine.metrics(), **health_values}
        if self.progress.nonfinite:
            values["nonfinite_steps"] = self.progress.nonfinite
        self.log.log(monitor, step, self.position.fraction(), values, self.position.skipped_now())


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
