"""DeepSpeed ZeRO stages 1, 2 and 3, called directly with `deepspeed.initialize`.

Stage 1 shards optimizer state, stage 2 also gradients, stage 3 also parameters (each one cut
into a flat `ds_tensor` per rank and gathered around the forward and backward of its module).
Every parameter of the method is partitioned the same way, frozen EMA teachers included, so a
teacher's `ds_tensor` lines up with its student's and the EMA needs no communication.

Written explicitly because DeepSpeed's defaults bite: `gradient_clipping` (absent = clip at 1.0),
`zero_allow_untested_optimizer` (SGD and LARS are not on its list). Precision is the trainer's
autocast, as for the other engines, so all engines compute the same numbers; fp32 master
weights are kept by the client optimizer. fp16 is the exception: its loss scaling has to live
inside ZeRO (the overflow check must see every partition), so it turns on DeepSpeed's own fp16
mode, which also stores the model in fp16 (fp32 master copies in the optimizer) under the
same autocast.
"""

from __future__ import annotations

import copy
import importlib
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bigssl.distributed import comm
from bigssl.distributed.engines import zero_merge
from bigssl.distributed.engines.base import Capabilities, Engine, plain_layout
from bigssl.distributed.engines.safe_load import DEEPSPEED_DIR, naming
from bigssl.errors import CheckpointError, ConfigError
from bigssl.methods.base import Batch, Method, StepOutput
from bigssl.optim import FlatLayout, Segment

TAG = DEEPSPEED_DIR  # the checkpoint sub-directory DeepSpeed writes into


def _deepspeed():
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed

    _import_muon_uncompiled()
    return deepspeed


MUON = "deepspeed.runtime.zero.muon.muon_optimizer"


def _import_muon_uncompiled() -> None:
    """Import DeepSpeed's Muon optimizer with TorchDynamo off, before DeepSpeed does.

    Every ZeRO setup imports it (to ask whether the client optimizer is a Muon), and the module
    wraps its kernels in `torch.compile` at import time, which imports all of TorchInductor: 2 s
    of CPU per rank at every start (measured, DeepSpeed 0.19.8 on CPU), for an optimizer bigssl
    never builds (optim.name is lars, sgd or adamw). Imported this way the module is complete
    and its functions run eagerly should anything call them; once imported, DeepSpeed's own
    imports of it are free."""
    if MUON in sys.modules:
        return
    previous = os.environ.get("TORCHDYNAMO_DISABLE")
    os.environ["TORCHDYNAMO_DISABLE"] = "1"  # read by each torch.compile call
    try:
        importlib.import_module(MUON)
    except ImportError:  # an older DeepSpeed without Muon
        pass
    finally:
        if previous is None:
            del os.environ["TORCHDYNAMO_DISABLE"]
        else:
            os.environ["TORCHDYNAMO_DISABLE"] = previous


def ds_config(stage: int, micro_batch: int, clip: float, parameters: int, fp16_scale: float | None = None
              ) -> dict[str, Any]:
    # DeepSpeed's communication buckets default to 5·10⁸ elements, sized for big models on GPUs:
    # ZeRO-3 preallocates one, 2 GB in fp32 (measured: 24× a ViT-S's parameters). A sixteenth of
    # the model, within [10⁶, 5·10⁸] elements, keeps them in proportion.
    bucket = int(min(5e8, max(1e6, parameters // 16)))
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": clip,  # 0 = off; never leave it absent
        # Stage 3 keeps parameters under 100k elements whole on every rank by default, and their
        # `ds_tensor` is then not what the forward reads: partition all of them, so an EMA on
        # local shards reaches the teacher (measured: the default breaks a tiny ViT's EMA).
        "zero_optimization": {"stage": stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket,
                              **({"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": bucket}
                                 if stage == 3 else {})},
        "zero_allow_untested_optimizer": True,
        # Dynamic loss scaling (loss_scale 0) from engine.loss_scale_init, halved on overflow (any rank's, all-reduced),
        # doubled after 2000 clean steps: the DDP and FSDP engines' schedule.
        **({"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": round(math.log2(fp16_scale or 1)),
                     "loss_scale_window": 2000,
                     "hysteresis": 1, "min_loss_scale": 1}} if fp16_scale else {}),
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


@torch.no_grad()
def share_master_weights(optimizer) -> int:
    """Under ZeRO-3 with an fp32 model, let DeepSpeed's fp32 master partitions be this rank's
    parameter partitions themselves; returns the number of groups shared.

    DeepSpeed keeps an fp32 master copy of every partition for its optimizer, then copies it back
    into the parameters. For an fp32 model the copy is pure overhead (a fifth of ZeRO-3's per-rank
    memory with AdamW); stage 3 means to skip it but compares a torch.device with a str and never
    does (DeepSpeed 0.19.8, stage3._create_fp32_partitions). Re-pointing the master's storage
    keeps the tensor's identity (the optimizer's param groups and state are keyed by it), and the
    copy back becomes a copy onto itself. Stages 1/2 are left alone: they also link per-parameter
    views of the master copy (`_hp_mapping`), which would keep the old storage and go stale."""
    if not hasattr(optimizer, "fp32_partitioned_groups_flat"):
        return 0
    shared = 0
    for master, own in zip(optimizer.fp32_partitioned_groups_flat, optimizer.fp16_partitioned_groups_flat,
                           strict=True):
        if (master.dtype == own.dtype == torch.float32 and master.device == own.device
                and master.shape == own.shape and master.data_ptr() != own.data_ptr()):
            master.data = own.data
            shared += 1
    return shared


def flat_layouts(zero_optimizer: Any) -> list[tuple[torch.Tensor, FlatLayout]]:
    """Every flat fp32 partition that ZeRO hands its client optimizer on this rank, with where
    each parameter's elements lie in it, so LARS can take whole-tensor norms (optim.LARS)."""
    if hasattr(zero_optimizer, "fp32_partitioned_groups_flat"):  # stage 3: one per sub-group
        return [_stage3_layout(flat, params, group) for flat, params, group in
                zip(zero_optimizer.fp32_partitioned_groups_flat, zero_optimizer.fp16_groups,
                    zero_optimizer.sub_group_process_groups, strict=True)]
    if hasattr(zero_optimizer, "single_partition_of_fp32_groups"):  # stages 1 and 2: one per group
        return [_stage12_layout(flat, params, group) for flat, params, group in
                zip(zero_optimizer.single_partition_of_fp32_groups, zero_optimizer.bit16_groups,
                    zero_optimizer.real_dp_process_group, strict=True)]
    raise ConfigError(f"optim.name: lars under DeepSpeed's {type(zero_optimizer).__name__}, whose flat "
                      "partitions bigssl cannot map to parameters (engine.zero_stage 1, 2, 3 are known)")


def _stage12_layout(flat: torch.Tensor, params: list[nn.Parameter],
                    group: dist.ProcessGroup) -> tuple[torch.Tensor, FlatLayout]:
    # The group's parameters are flattened one after another (with alignment padding) and cut
    # into equal partitions; DeepSpeed records each parameter's piece of this rank's partition
    # (at most one, contiguous) in `_hp_mapping`, None where the parameter lies elsewhere.
    segments = tuple(Segment(mapping.hp_fragment_address.start, mapping.hp_fragment_address.numel, index)
                     for index, param in enumerate(params)
                     if (mapping := getattr(param, "_hp_mapping", None)) is not None)
    return flat, _checked(FlatLayout(segments, len(params), _summer(group)), [p.numel() for p in params], flat.device)


def _stage3_layout(flat: torch.Tensor, params: list[nn.Parameter],
                   group: dist.ProcessGroup) -> tuple[torch.Tensor, FlatLayout]:
    segments, width = stage3_segments([(p.ds_numel, p.partition_numel()) for p in params], dist.get_rank(group))
    if width != flat.numel():
        raise RuntimeError(f"ZeRO-3 sub-group of {flat.numel()} elements, its parameters' partitions {width}")
    return flat, _checked(FlatLayout(segments, len(params), _summer(group)), [p.ds_numel for p in params], flat.device)


def stage3_segments(sizes: list[tuple[int, int]], rank: int) -> tuple[tuple[Segment, ...], int]:
    """(segments, partition width) of a ZeRO-3 sub-group's flat partition on `rank`, from each
    parameter's (numel, partition numel). Every parameter is cut into equal `ds_tensor` pieces,
    rank r holding elements [r·p, (r+1)·p) zero-padded past its end, and the sub-group's flat
    partition is its parameters' pieces one after another; padding belongs to no segment."""
    segments, offset = [], 0
    for index, (numel, width) in enumerate(sizes):
        real = min(width, max(0, numel - rank * width))
        if real:
            segments.append(Segment(offset, real, index))
        offset += width
    return tuple(segments), offset


def _summer(group: dist.ProcessGroup) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda values: comm.all_reduce_sum_no_grad(values, group=group)


def _checked(layout: FlatLayout, numels: list[int], device: torch.device) -> FlatLayout:
    """The layout, once the ranks' segments are seen to cover each parameter exactly (one
    collective at setup): a DeepSpeed that laid partitions out otherwise would be refused here
    rather than give LARS wrong norms."""
    counts = [0] * layout.params
    for segment in layout.segments:
        counts[segment.index] += segment.numel
    # on the partition's device: an NCCL group reduces no CPU tensor
    covered = layout.sum_over_ranks(torch.tensor(counts, dtype=torch.int64, device=device))
    if covered.tolist() != numels:
        raise RuntimeError(f"ZeRO partitions cover the parameters' {numels} elements as {covered.tolist()}")
    return layout


class DeepSpeedEngine(Engine):
    kind = "deepspeed"
    checkpoint_marker = f"{TAG}/"

    @property
    def capabilities(self) -> Capabilities:
        # Stages 1-2 shard optimizer state and gradients only; stage 3 cuts parameters too.
        return Capabilities(holds_whole_parameters=self.config.engine.zero_stage < 3,
                            compile_refusal="its ZeRO hooks and torch.compile do not mix reliably")

    @staticmethod
    def holds(checkpoint: Path) -> bool:
        return (checkpoint / TAG).is_dir()

    @staticmethod
    def whole_method_state(checkpoint: Path) -> dict[str, torch.Tensor]:
        return zero_merge.zero_state(checkpoint / TAG)

    def setup(self, method: Method, optimizer_factory) -> None:
        stage = self.config.engine.zero_stage
        if stage not in (1, 2, 3):
            raise ConfigError(f"engine.zero_stage: {stage} is not one of 1, 2, 3")
        if self.config.optim.clip_grad_per_parameter:
            raise ConfigError("optim.clip_grad_per_parameter: DeepSpeed clips the global gradient norm only; "
                              "use optim.clip_grad alone, or engine.kind=ddp or fsdp")
        fp16 = self.config.engine.precision == "fp16"
        self.scaler = None  # DeepSpeed scales the loss itself
        if fp16 and method.ema_pairs():
            # DeepSpeed's fp16 mode stores every parameter in fp16, frozen teachers included, and
            # an EMA step (1 − m)·Δ below 2⁻¹¹ of a weight then vanishes: the teacher freezes.
            raise ConfigError(f"engine.precision: fp16 with engine.kind=deepspeed would keep "
                              f"{self.config.method.name}'s EMA teacher in fp16, where its updates round "
                              "away; use bf16, or fp16 with engine.kind=ddp or fsdp")
        deepspeed = _deepspeed()
        # DeepSpeed reads the rank from the environment; srun and plain spawns do not set it.
        for name, value in (("LOCAL_RANK", self.env.local_rank), ("RANK", self.env.rank),
                            ("WORLD_SIZE", self.env.world_size)):
            os.environ.setdefault(name, str(value))
        if not dist.is_initialized():  # alone: a private one-rank group (DeepSpeed needs one)
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        method.to(self.device)
        self.prepare(method)
        plain_layout(method)  # inputs may stay channels-last
        self._skeletons = {id(method.backbone): copy.deepcopy(method.backbone).to("meta")}
        micro_batch = max(1, self.config.optim.batch_size // self.env.world_size)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=method, optimizer=optimizer_factory(method), dist_init_required=False,
            config=ds_config(stage, micro_batch, self.config.optim.clip_grad,
                             sum(p.numel() for p in method.parameters()),
                             fp16_scale=self.config.engine.loss_scale_init if fp16 else None))
        # fp16 mode's fp16 parameters need their fp32 masters; fp32 ones can be their own.
        self.master_groups_shared = 0 if fp16 else share_master_weights(self.optimizer)
        client = self.optimizer.optimizer
        if hasattr(client, "set_flat_layout"):  # LARS: trust ratios of whole tensors, not of partitions
            for flat, layout in flat_layouts(self.optimizer):
                client.set_flat_layout(flat, layout)
        self.method = method
        self.stage = stage

    def forward(self, batch: Batch, step: int) -> StepOutput:
        with self.autocast():
            return self.ds(batch, step)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self) -> float:
        self.ds.step()  # clips (as configured), steps and zeroes the gradients
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def metrics(self) -> dict[str, float]:
        if self.config.engine.precision != "fp16":
            return {}
        return {"loss_scale": float(self.ds.optimizer.loss_scale), "overflow_steps": float(self.ds.skipped_steps)}

    def local_tensor(self, param: torch.Tensor) -> torch.Tensor:
        return param.ds_tensor if hasattr(param, "ds_tensor") else param.detach()

    @torch.no_grad()
    def normalise_rows(self, params: list[nn.Parameter]) -> None:
        """Rows live in two places under ZeRO: the parameter the forward reads and the
        optimizer's fp32 master partition, which is copied into it after every step. Both get
        the unit rows. Stage 3 cuts rows across ranks, so the whole parameter is gathered."""
        from deepspeed.utils import safe_set_full_fp32_param

        if self.stage < 3:  # every rank holds the whole parameter
            for param in params:
                unit = torch.nn.functional.normalize(param.detach().float(), dim=1)
                param.data.copy_(unit.to(param.dtype))
                safe_set_full_fp32_param(param, unit)
            return
        units = []
        with _deepspeed().zero.GatheredParameters(params, modifier_rank=0):  # a collective
            for param in params:
                unit = torch.nn.functional.normalize(param.detach().float(), dim=1)
                param.data.copy_(unit.to(param.dtype))  # re-partitioned from rank 0 on exit
                units.append(unit)
        for param, unit in zip(params, units, strict=True):
            safe_set_full_fp32_param(param, unit)  # this rank's master partition

    def full_module(self, module: nn.Module) -> nn.Module:
        if self.stage < 3:
            return module
        skeleton = self._skeletons.get(id(module))
        if skeleton is None:
            raise ValueError("DeepSpeedEngine.full_module: only the method's backbone has a skeleton")
        whole = copy.deepcopy(skeleton).to_empty(device=self.device)
        params = list(module.parameters())
        with _deepspeed().zero.GatheredParameters(params, modifier_rank=None):
            whole.load_state_dict({k: v.detach().clone() for k, v in module.state_dict().items()})
        return whole

    def save(self, directory: Path, extra: dict[str, Any]) -> None:
        self.ds.save_checkpoint(str(directory), tag=TAG, client_state={"extra": extra})

    def load(self, directory: Path) -> dict[str, Any]:
        # DeepSpeed reads its files with weights_only=False (full pickle: a crafted checkpoint runs
        # code). Its checkpoint engine's load is swapped for the weights-only unpickler for this
        # call, with the few DeepSpeed classes its files hold allowed by name.
        checkpoint_engine = self.ds.checkpoint_engine
        checkpoint_engine.load = _weights_only_load
        try:
            path, client_state = self.ds.load_checkpoint(str(directory), tag=TAG)
        finally:
            del checkpoint_engine.load  # the class's method again
        if path is None:
            raise CheckpointError(f"{directory / TAG}: no DeepSpeed checkpoint there")
        return client_state["extra"]


def _weights_only_load(path: str, map_location: Any = None) -> Any:
    """DeepSpeed's real classes (its load_checkpoint uses them), allowed by name; a refused or
    unreadable file is a CheckpointError naming it (safe_load.DEEPSPEED_STAND_INS: the same names)."""
    from deepspeed.runtime.fp16 import loss_scaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [loss_scaler.LossScaler, loss_scaler.DynamicLossScaler, ZeroStageEnum, fragment_address]
    with naming(Path(path)), torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location=map_location, weights_only=True)
