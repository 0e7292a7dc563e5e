"""`bigssl eval knn|linear RUN_OR_CKPT --train SHARDS --val SHARDS`: score a saved backbone;
`bigssl eval zeroshot RUN_OR_CKPT --val SHARDS`: an image–text model's zero-shot accuracy.

The backbone is rebuilt from the run's config.yaml and merged from any engine's checkpoint in
each process; features are extracted on every rank (each reads its share of the shards) and
gathered; rank 0 scores them, prints a table and appends the numbers to the run's
metrics.jsonl and TensorBoard under `eval/`.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from bigssl.data.shards import resolve
from bigssl.data.views import Photometric
from bigssl.distributed import env as env_lib
from bigssl.errors import UserError
from bigssl.eval import knn, linear, zeroshot
from bigssl.eval.runs import SavedRun, locate
from bigssl.methods.base import Method
from bigssl.models.heads import projector_prefix
from bigssl.monitor import Monitor


@dataclass
class EvalOptions:
    train: str
    val: str
    k: int = 20
    temperature: float = 0.07
    epochs: int | None = None  # linear: the protocol's unless given
    lr: float | None = None  # linear: base lr (scaled as the protocol scales it)
    batch_size: int | None = None  # linear
    standardize: bool = True  # linear: features standardised by the training set's statistics
    extract_batch: int = 256
    workers: int = 2
    projector_layers: int = 0  # features after this many projector layers (SimCLR v2: 1); 0 = backbone
    classnames: str = "auto"  # zeroshot: auto | imagenet | a file (bigssl.eval.prompts)
    templates: str = "auto"  # zeroshot: auto | imagenet | a file


def load_backbone(saved: SavedRun, device: torch.device, projector_layers: int = 0) -> nn.Module:
    """The trained trunk, as the run's method builds it (CMC's is two encoders); with
    `projector_layers` > 0, followed by that many layers of the method's projector, all loaded
    from the same checkpoint."""
    from bigssl.distributed.engines.consolidate import method_state
    from bigssl.methods import build

    method = build(saved.config)
    try:
        state = method_state(saved.checkpoint)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from err
    backbone = method.backbone
    _load_part(backbone, state, "backbone.", saved, f"model.backbone={saved.config.model.backbone}")
    if not projector_layers:
        return backbone.to(device)
    head = getattr(method, "projector", None)
    if not isinstance(head, nn.Sequential):
        raise UserError(f"--projector-layers: method {saved.config.method.name} has no projector")
    _load_part(head, state, "projector.", saved, "model.projector")
    try:
        layers = projector_prefix(head, projector_layers)
    except ValueError as err:
        raise UserError(f"--projector-layers: {err}") from err
    return nn.Sequential(backbone, *layers).to(device)


def _load_part(module: nn.Module, state: dict[str, torch.Tensor], prefix: str, saved: SavedRun, what: str) -> None:
    part = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    if not part:
        raise UserError(f"{saved.checkpoint}: the checkpoint holds no {prefix}* weights "
                        f"(method {saved.config.method.name})")
    missing, unexpected = module.load_state_dict(part, strict=False)
    if missing or unexpected:
        raise UserError(f"{saved.checkpoint}: {prefix.rstrip('.')} does not match {what} "
                        f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")


def evaluate(kind: str, source: Path, options: EvalOptions) -> dict[str, float]:
    saved = locate(source)
    env = env_lib.detect()
    backend = env_lib.init(env, "auto", saved.config.engine.timeout_s)
    try:
        print(f"bigssl: {env_lib.describe(env, backend)}", file=sys.stderr, flush=True)
        scores = _evaluate(kind, saved, options, env_lib.device_for(env), env.is_main)
    except BaseException:
        env_lib.shutdown(clean=False)
        raise
    env_lib.shutdown()
    return scores


def load_method(saved: SavedRun, device: torch.device) -> Method:
    """The whole method (both towers of an image–text model), merged from any engine's checkpoint."""
    from bigssl.distributed.engines.consolidate import method_state
    from bigssl.methods import build

    method = build(saved.config)
    state = method_state(saved.checkpoint)
    missing, _ = method.load_state_dict(state, strict=False)
    if missing:
        raise UserError(f"{saved.checkpoint}: does not match method {saved.config.method.name} "
                        f"(missing {sorted(missing)[:3]})")
    return method.to(device)


def _evaluate(kind: str, saved: SavedRun, options: EvalOptions, device: torch.device,
              is_main: bool) -> dict[str, float]:
    config = saved.config
    views = config.data.views
    args = (views, Photometric(views).normalize, options.extract_batch, options.workers, device,
            config.data.timeout_s)
    val_shards = resolve(options.val, "--val")
    if kind == "zeroshot":
        method = load_method(saved, device)
        if not method.encodes_text:
            raise UserError(f"eval zeroshot: method {config.method.name} has no text tower (an image-text "
                            "method such as clip has)")
        prompts = zeroshot.prompts_for(val_shards, "--val", options.classnames, options.templates)
        result = zeroshot.zero_shot(method, val_shards, "--val", *args, prompts=prompts)
        record = {"eval/zeroshot_top1": result["top1"], "eval/zeroshot_top5": result["top5"]}
        if is_main:
            _report(saved, f"zero-shot ({prompts.origin})", record, n_train=0, n_val=result["samples"])
        return record
    backbone = load_backbone(saved, device, options.projector_layers)
    train_shards = resolve(options.train, "--train")
    if kind == "knn":
        train = knn.extract(backbone, train_shards, *args)
        val = knn.extract(backbone, val_shards, *args)
        result = knn.weighted_knn(train, val, options.k, options.temperature)
        record = {"eval/knn_top1": result["top1"], "eval/knn_top5": result["top5"], "eval/knn_k": options.k,
                  "eval/knn_temperature": options.temperature}
        title = f"weighted kNN (k={options.k}, T={options.temperature})"
    else:
        train = knn.extract(backbone, train_shards, *args, l2_normalize=False)
        val = knn.extract(backbone, val_shards, *args, l2_normalize=False)
        protocol = linear.protocol_for(config.method.name, config.model.backbone)
        protocol = replace(protocol, **{k: v for k, v in (("epochs", options.epochs), ("lr", options.lr),
                                                            ("batch_size", options.batch_size)) if v is not None})
        result = linear.train_probe(train.features, train.labels, val.features, val.labels, protocol,
                                    seed=config.seed, standardize=options.standardize) if is_main else {}
        record = {f"eval/linear_{k}": v for k, v in result.items()}
        title = (f"linear probe ({config.method.name} protocol: {protocol.optimizer}, {protocol.epochs} epochs, "
                 f"batch {record.get('eval/linear_batch_size', protocol.batch_size)}, "
                 f"lr {record.get('eval/linear_lr', math.nan):.4g}"
                 f"{', standardised features' if options.standardize else ''}; {protocol.source or 'default'})")
    if is_main:
        _report(saved, title, record, n_train=len(train.labels), n_val=len(val.labels))
    return record


def _report(saved: SavedRun, title: str, record: dict[str, float], n_train: int, n_val: int) -> None:
    monitor = Monitor(saved.run_dir, is_main=True, start_step=0, progress=False,
                      tensorboard=saved.config.log.tensorboard)
    try:
        monitor.log(saved.step, record)
    except BaseException:
        monitor.close(failing=True)
        raise
    monitor.close()
    kind = next(k for k in ("linear", "zeroshot", "knn") if any(name.startswith(f"eval/{k}") for name in record))
    rows = [(name.removeprefix(f"eval/{kind}_"), value) for name, value in record.items()]
    width = max(len(name) for name, _ in rows)
    print(f"{saved.checkpoint} (step {saved.step}): {title}")
    print(f"  train {n_train} samples, val {n_val} samples")
    for name, value in rows:
        print(f"  {name:<{width}}  {value:.4f}" if isinstance(value, float) else f"  {name:<{width}}  {value}")
