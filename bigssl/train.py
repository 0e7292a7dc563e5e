"""The Trainer: one loop for every method and every engine.

It reads the config, joins the process group, builds the data stream, the method and the
engine, resumes from the newest checkpoint of its run directory, and then steps: set the
scheduled values, forward, backward, step, log, checkpoint, evaluate. Nothing here knows
which method or engine it runs.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bigssl import config as config_lib
from bigssl.checkpoint import Checkpointer
from bigssl.config import Config
from bigssl.data.shards import ShardStream, StreamPosition, decode_image, decode_label, loader, resolve, sample_count
from bigssl.data.views import ViewPolicy, build_policy
from bigssl.distributed import comm
from bigssl.distributed import env as env_lib
from bigssl.distributed.engines import build_engine
from bigssl.errors import ConfigError
from bigssl.eval import knn
from bigssl.eval.export import save_backbone
from bigssl.methods import build as build_method
from bigssl.monitor import Monitor
from bigssl.optim import build_optimizer
from bigssl.schedules import WarmupCosine


class _TrainSample:
    """Decode one sample and cut its views (runs in DataLoader workers)."""

    def __init__(self, policy: ViewPolicy) -> None:
        self.policy = policy

    def __call__(self, sample: dict) -> dict[str, Any]:
        return {"views": self.policy(decode_image(sample)), "label": decode_label(sample)}


class _Window:
    """Accumulates what happened since the last log step, without syncing the device each step."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.reset()

    def reset(self) -> None:
        self.start, self.data_wait, self.steps = time.perf_counter(), 0.0, 0
        self.loss_sum.zero_()

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss.detach().float()
        self.steps += 1


@dataclass
class Progress:
    """Trainer state that goes into every checkpoint."""

    step: int = 0
    knn: dict[str, float] = field(default_factory=dict)  # first scores, e.g. the random-init kNN


class Trainer:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.env = env_lib.detect()
        self.backend = env_lib.init(self.env, config.engine.backend, config.engine.timeout_s)
        self.device = env_lib.device_for(self.env)
        print(f"bigssl: {env_lib.describe(self.env, self.backend)}", file=sys.stderr, flush=True)
        self.run_dir = Path(config.log.dir)
        self.local_batch = config_lib.per_rank_batch(config, self.env.world_size)

        # Data first: a missing shard must fail before any model is built.
        self.train_urls = resolve(config.data.train, "data.train")
        self.val_urls = resolve(config.data.val, "data.val") if config.data.val else []
        samples = config.data.samples_per_epoch or sample_count(self.train_urls)
        if not samples:
            raise ConfigError("data.samples_per_epoch: the size of data.train is unknown (no index.json); set it")
        self.steps_per_epoch = samples // config.optim.batch_size
        if self.steps_per_epoch < 1:
            raise ConfigError(f"optim.batch_size={config.optim.batch_size} exceeds the {samples} samples per epoch")
        self.total_steps = config.optim.epochs * self.steps_per_epoch
        self.last_step = min(self.total_steps, config.optim.max_steps or self.total_steps)
        self.policy = build_policy(config.data.views)

        torch.manual_seed(config.seed)  # identical initial weights on every rank
        self.method = build_method(config)
        self.engine = build_engine(config, self.env, self.device)
        self.engine.setup(self.method, lambda module: build_optimizer(module, config.optim))
        self.lr = WarmupCosine(peak=config.optim.lr, total_steps=self.total_steps,
                               warmup_steps=round(config.optim.warmup_epochs * self.steps_per_epoch),
                               final=config.optim.min_lr)
        self.checkpoints = Checkpointer(self.run_dir, config.checkpoint.keep, self.env.is_main)
        self.progress = Progress()

    # ----------------------------------------------------------------------------- helpers
    def _batches(self, epoch: int, start_step: int) -> Iterator[dict[str, Any]]:
        position = StreamPosition(self.env.rank, self.env.world_size,
                                  seed=self.config.seed * 1_000_003 + start_step, epoch=epoch)
        stream = ShardStream(self.train_urls, _TrainSample(self.policy), position, resampled=True,
                             shuffle_buffer=self.config.data.shuffle_buffer)
        return iter(loader(stream, self.local_batch, self.config.data.workers, drop_last=True))

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        memory_format = torch.channels_last if self.config.model.channels_last else torch.contiguous_format
        views = [v.to(self.device, non_blocking=True).contiguous(memory_format=memory_format)
                 for v in batch["views"]]
        return {**batch, "views": views, "label": batch["label"].to(self.device, non_blocking=True)}

    def _set_lr(self, step: int) -> float:
        lr = self.lr(step)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def _save(self, step: int) -> None:
        self.checkpoints.save(step, self.engine, {"step": step, "knn": dict(self.progress.knn)})

    def _knn(self, model: torch.nn.Module | None = None) -> dict[str, float]:
        ev, data = self.config.eval, self.config.data
        train = knn.extract(model or self.method.backbone, self.train_urls, data.views, ev.batch_size,
                            data.workers, self.device)
        val = knn.extract(model or self.method.backbone, self.val_urls, data.views, ev.batch_size,
                          data.workers, self.device)
        return knn.weighted_knn(train, val, ev.knn_k, ev.knn_temperature)

    def _baselines(self, monitor: Monitor) -> None:
        """Scores to compare the trained backbone against, taken before the first step."""
        ev = self.config.eval
        if ev.knn_baseline:
            scores = self._knn()
            self.progress.knn["random_init"] = scores["top1"]
            monitor.log(0, {"knn/random_init_top1": scores["top1"], "knn/random_init_top5": scores["top5"]})
        if ev.knn_pixels:
            scores = self._knn(torch.nn.Flatten())
            self.progress.knn["pixels"] = scores["top1"]
            monitor.log(0, {"knn/pixels_top1": scores["top1"], "knn/pixels_top5": scores["top5"]})

    # -------------------------------------------------------------------------------- loop
    def fit(self) -> dict[str, float]:
        config = self.config
        resume_from = self.checkpoints.latest() if config.checkpoint.resume else None
        if resume_from is not None:
            extra = self.engine.load(resume_from)
            self.progress = Progress(step=int(extra["step"]), knn=dict(extra.get("knn", {})))
        elif self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(config_lib.to_yaml(config))
        step = self.progress.step
        monitor = Monitor(self.run_dir, self.env.is_main, self.last_step, step,
                          tensorboard=config.log.tensorboard, progress=config.log.progress)
        if resume_from is not None:
            monitor.message(f"bigssl: resumed from {resume_from} (step {step})")
        evaluating = bool(self.val_urls) and (config.eval.knn_at_end or config.eval.knn_every_epochs > 0)
        if evaluating and resume_from is None:
            self._baselines(monitor)

        window = _Window(self.device)
        last_saved = step
        while step < self.last_step:
            epoch = step // self.steps_per_epoch
            batches = self._batches(epoch, step)
            epoch_end = min((epoch + 1) * self.steps_per_epoch, self.last_step)
            while step < epoch_end:
                fetch_start = time.perf_counter()
                batch = self._to_device(next(batches))
                window.data_wait += time.perf_counter() - fetch_start
                lr = self._set_lr(step)
                out = self.engine.forward(batch, step)
                self.engine.backward(out["loss"])
                grad_norm = self.engine.step()
                self.method.after_step(step)
                step += 1
                window.add(out["loss"])
                if step % config.log.every_steps == 0 or step == self.last_step:
                    self._log_window(monitor, window, step, {"lr": lr, "grad_norm": grad_norm})
                every = config.checkpoint.every_steps
                if every and step % every == 0 and step < self.last_step:
                    self._save(step)
                    last_saved = step
            del batches  # shut this epoch's workers down before the next epoch starts its own
            if step % self.steps_per_epoch or step >= self.last_step:
                continue  # end of a capped run: handled below
            if step != last_saved:
                self._save(step)
                last_saved = step
            if evaluating and self._knn_due(step):
                scores = self._knn()
                monitor.log(step, {"knn/top1": scores["top1"], "knn/top5": scores["top5"]})

        monitor.end_progress()
        if step != last_saved:
            self._save(step)
        if self.env.is_main:
            save_backbone(self.method.backbone, self.run_dir / "backbone.safetensors")
        final_scores: dict[str, float] = {}
        if evaluating and (config.eval.knn_at_end or self._knn_due(step)):
            final_scores = self._knn()
            monitor.log(step, {"knn/top1": final_scores["top1"], "knn/top5": final_scores["top5"]})
            monitor.message(self._summary(step, final_scores))
        monitor.close()
        return final_scores

    def _knn_due(self, step: int) -> bool:
        """True at the end of every `eval.knn_every_epochs`-th epoch."""
        every = self.config.eval.knn_every_epochs
        return bool(every) and step % self.steps_per_epoch == 0 and (step // self.steps_per_epoch) % every == 0

    def _log_window(self, monitor: Monitor, window: _Window, step: int, values: dict[str, float]) -> None:
        """Log the means since the last log step (loss averaged over ranks too) and restart the window."""
        elapsed = time.perf_counter() - window.start
        loss = float(comm.all_reduce_mean(window.loss_sum / window.steps))
        record = {"epoch": step / self.steps_per_epoch, "loss": loss, **values,
                  "images_per_s": self.config.optim.batch_size * window.steps / elapsed,
                  "data_wait_fraction": window.data_wait / elapsed, "world_size": self.env.world_size}
        monitor.log(step, record)
        monitor.progress(window.steps, {"loss": f"{loss:.4f}", "lr": f"{values['lr']:.3g}",
                                        "img/s": f"{record['images_per_s']:.0f}"})
        window.reset()

    def _summary(self, step: int, scores: dict[str, float]) -> str:
        ev = self.config.eval
        rows = [(name.replace("_", " "), value) for name, value in sorted(self.progress.knn.items())]
        rows.append((f"trained, step {step}", scores["top1"]))
        width = max(len(name) for name, _ in rows)
        lines = [f"kNN top-1 (k={ev.knn_k}, T={ev.knn_temperature}) of {self.config.data.val}:"]
        lines += [f"  {name:<{width}}  {value:.4f}" for name, value in rows]
        return "\n".join(lines)

def train(config: Config) -> dict[str, float]:
    try:
        scores = Trainer(config).fit()
    except BaseException:
        env_lib.shutdown(clean=False)
        raise
    env_lib.shutdown()
    return scores
