"""Evaluation while a run trains: the backbone's kNN accuracy on `data.val`, the ViT attention
maps of a few fixed images, zero-shot accuracy for image–text methods, TensorBoard's projector
dump, the baselines to compare them with (random init, raw pixels) and the final table.

The trainer asks `due(epochs_done)` and calls `evaluate`; it knows nothing of what is scored.
Every call that scores is a collective: every rank makes it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from bigssl.config import DataConfig, EvalConfig
from bigssl.data.pipeline import eval_batches
from bigssl.data.shards import ShardSet
from bigssl.distributed import comm
from bigssl.distributed.engines.base import Engine
from bigssl.eval import attention, knn, zeroshot
from bigssl.methods.base import Method
from bigssl.monitor import Monitor

BASELINE_NAMES = {"pixels": "raw pixels", "random_init": "random init"}


class TrainingEvaluation:
    """Built once, from the `eval` and `data` sections and what the run has built: the training
    shards (the kNN memory), the validation shards (None: nothing is scored), the device-side
    normalisation of the views, the engine holding the method."""

    def __init__(self, ev: EvalConfig, data: DataConfig, train: ShardSet, val: ShardSet | None,
                 normalize: Callable[[torch.Tensor], torch.Tensor], engine: Engine, method: Method,
                 device: torch.device, is_main: bool) -> None:
        self.ev, self.data = ev, data
        self.train, self.val = train, val
        self.normalize = normalize
        self.engine, self.method = engine, method
        self.device, self.is_main = device, is_main
        self.enabled = val is not None and (ev.knn_at_end or ev.knn_every_epochs > 0)
        self._zero_shot_note_given = False
        self._fixed: torch.Tensor | None = None  # the attention-map images, read at the first evaluation

    def due(self, epochs_done: int) -> bool:
        """Whether the end of epoch `epochs_done` is evaluated (eval.knn_every_epochs)."""
        every = self.ev.knn_every_epochs
        return self.enabled and bool(every) and epochs_done % every == 0

    def due_at_end(self, epochs_done: int, mid_epoch: bool) -> bool:
        """Whether the trained backbone is evaluated once training is over."""
        return self.enabled and (self.ev.knn_at_end or (not mid_epoch and self.due(epochs_done)))

    # ------------------------------------------------------------------------ scoring
    def _knn(self, model: torch.nn.Module | None = None) -> dict[str, float]:
        return self._knn_with_features(model)[0]

    def _knn_with_features(self, model: torch.nn.Module | None = None) -> tuple[dict[str, float], knn.Features]:
        ev, data = self.ev, self.data
        model = model or self.engine.full_module(self.method.backbone)
        comm.broadcast_norm_statistics(model)  # one network on every rank: the one exported
        args = (data.views, self.normalize, ev.batch_size, data.workers, self.device, data.timeout_s)
        train = knn.extract(model, self.train, *args)
        val = knn.extract(model, self.val, *args)
        return knn.weighted_knn(train, val, ev.knn_k, ev.knn_temperature), val

    def evaluate(self, monitor: Monitor, step: int, final: bool) -> dict[str, float]:
        """kNN (logged), the ViT attention maps of fixed images and, at the end, a labelled
        embedding dump for TensorBoard's projector. A collective: every rank calls it."""
        model = self.engine.full_module(self.method.backbone)
        scores, val = self._knn_with_features(model)
        monitor.log(step, {"knn/top1": scores["top1"], "knn/top5": scores["top5"]})
        if self.is_main and attention.has_attention_maps(model):
            images = self._fixed_images()
            inputs = self.normalize(images.to(self.device).float().div(255))
            maps = attention.cls_attention(model, inputs)
            monitor.image("attention/last_block_cls", attention.attention_grid(images.float().div(255), maps), step)
        if final and self.is_main:
            keep = min(len(val.labels), self.ev.projector_samples)
            monitor.embedding("embeddings/val", val.features[:keep], val.labels[:keep].tolist(), step)
        if self._zero_shot_ready(monitor):
            zero_shot = self._zero_shot()
            monitor.log(step, {"zeroshot/top1": zero_shot["top1"], "zeroshot/top5": zero_shot["top5"]})
            scores = {**scores, "zeroshot_top1": zero_shot["top1"], "zeroshot_top5": zero_shot["top5"]}
        return scores

    def _zero_shot_ready(self, monitor: Monitor) -> bool:
        """Image–text methods are scored zero-shot where the engine holds whole parameters;
        sharded ones are scored offline (`bigssl eval zeroshot`), which merges any checkpoint."""
        if not self.method.encodes_text:
            return False
        if self.engine.capabilities.holds_whole_parameters:
            return True
        if not self._zero_shot_note_given:
            monitor.message(f"bigssl: zero-shot is not scored during training under engine.kind={self.engine.kind} "
                            "(sharded parameters); run `bigssl eval zeroshot RUN --val SHARDS` on a checkpoint")
            self._zero_shot_note_given = True
        return False

    def _zero_shot(self) -> dict[str, float]:
        data, ev = self.data, self.ev
        return zeroshot.zero_shot(self.method, self.val, "data.val", data.views, self.normalize,
                                  ev.batch_size, data.workers, self.device, data.timeout_s)

    def _fixed_images(self, count: int = 4) -> torch.Tensor:
        """The first `count` validation images in their evaluation view (uint8), the same at every evaluation."""
        if self._fixed is None:
            batches = eval_batches(self.val, self.data.views, 0, 1, count, 0, self.data.timeout_s)
            self._fixed = next(iter(batches))["image"]
        return self._fixed

    # -------------------------------------------------------------- baselines and the end
    def baselines(self, monitor: Monitor) -> dict[str, float]:
        """Scores to compare the trained backbone against, taken before the first step (logged
        at step 0): `random_init`, `random_init_zeroshot`, `pixels`, as eval asks for them."""
        ev, found = self.ev, {}
        names = [name for name, wanted in (("the random-init backbone", ev.knn_baseline), ("raw pixels", ev.knn_pixels))
                 if wanted]
        if not self.enabled or not names:
            return found
        started = time.perf_counter()
        monitor.message(f"bigssl: baselines: kNN of {' and '.join(names)} on {self.data.val}…")
        if ev.knn_baseline:
            scores = self._knn()
            found["random_init"] = scores["top1"]
            monitor.log(0, {"knn/random_init_top1": scores["top1"], "knn/random_init_top5": scores["top5"]})
            if self._zero_shot_ready(monitor):
                zero_shot = self._zero_shot()
                found["random_init_zeroshot"] = zero_shot["top1"]
                monitor.log(0, {"zeroshot/random_init_top1": zero_shot["top1"],
                                "zeroshot/random_init_top5": zero_shot["top5"]})
        if ev.knn_pixels:
            scores = self._knn(torch.nn.Flatten())
            found["pixels"] = scores["top1"]
            monitor.log(0, {"knn/pixels_top1": scores["top1"], "knn/pixels_top5": scores["top5"]})
        shown = ", ".join(f"{BASELINE_NAMES.get(name, name)} {score:.4f}" for name, score in found.items())
        monitor.message(f"bigssl: baselines: {shown} ({time.perf_counter() - started:.0f} s)")
        return found

    def final(self, monitor: Monitor, step: int, baselines: dict[str, float]) -> dict[str, float]:
        """The trained backbone's scores, announced and timed, then the table against `baselines`."""
        started = time.perf_counter()
        monitor.message(f"bigssl: final evaluation: kNN of the trained backbone on {self.data.val}…")
        scores = self.evaluate(monitor, step, final=True)
        monitor.message(f"bigssl: final evaluation done ({time.perf_counter() - started:.0f} s)")
        monitor.message(self.summary(step, scores, baselines))
        return scores

    def summary(self, step: int, scores: dict[str, float], baselines: dict[str, float]) -> str:
        ev = self.ev
        knn_baselines = {name: value for name, value in baselines.items() if not name.endswith("_zeroshot")}
        lines = _table(f"kNN top-1 (k={ev.knn_k}, T={ev.knn_temperature}) of {self.data.val}:",
                       knn_baselines, f"trained, step {step}", scores["top1"])
        if "zeroshot_top1" in scores:
            zero_shot = {name.removesuffix("_zeroshot"): value for name, value in baselines.items()
                         if name.endswith("_zeroshot")}
            lines += _table(f"zero-shot top-1 (class-name prompts) of {self.data.val}:", zero_shot,
                            f"trained, step {step}", scores["zeroshot_top1"])
        return "\n".join(lines)


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
