"""The capacity planner's bytes per collective, checked exactly against the collectives that the
engines and methods really issue at 2 and 4 gloo ranks (torch's process-group hooks count every
one, DDP's C++ buckets and DTensor's reductions included)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import run_distributed
from plan_cases import COUNTED_STEP, ENGINE_CASES, SAMPLES, case_config, rank_batch


def _counted(rank: int, world_size: int, out_dir: str) -> None:
    from bigssl.distributed import comm, counting
    from bigssl.distributed.engines import build_engine
    from bigssl.distributed.env import DistEnv
    from bigssl.methods import build as build_method
    from bigssl.methods.context import RunContext
    from bigssl.optim import build_optimizer

    assert comm.world_size() == world_size
    env = DistEnv(rank=rank, world_size=world_size, local_rank=rank)
    results = {}
    for engine_name, cases in ENGINE_CASES[world_size].items():
        for case in cases:
            config = case_config(case, engine_name)
            local = config.optim.batch_size // world_size
            steps_per_epoch = SAMPLES // config.optim.batch_size
            torch.manual_seed(config.seed)
            method = build_method(config, RunContext.of(config, world_size=world_size, steps_per_epoch=steps_per_epoch,
                                                        total_steps=config.optim.epochs * steps_per_epoch,
                                                        num_samples=SAMPLES))
            engine = build_engine(config, env, torch.device("cpu"))
            engine.setup(method, lambda module, m=method, c=config: build_optimizer(
                module, c.optim, c.eval.online_probe_lr, m.param_rules()))
            for step in range(COUNTED_STEP + 1):  # the trainer's step, as in train.py's loop
                with counting.counted() if step == COUNTED_STEP else _nothing() as calls:
                    if rows := method.unit_norm_rows():
                        engine.normalise_rows(rows)
                    out = engine.forward(rank_batch(config, rank, local, step), step)
                    comm.agree(bool(torch.isfinite(out.loss.detach())), False)
                    engine.backward(out.loss)
                    engine.step()
                    if pairs := method.ema_pairs():
                        engine.ema_update(pairs, method.ema_momentum(step))
                    method.after_step(step)
            results[f"{engine_name}/{case}"] = counting.totals(calls)
            del engine, method
    if rank == 0:
        (Path(out_dir) / f"counted-{world_size}.json").write_text(json.dumps(results))


class _nothing:
    def __enter__(self) -> list:
        return []

    def __exit__(self, *exc) -> None:
        return None


def _predicted(world_size: int) -> dict[str, dict]:
    from bigssl.distributed import counting
    from bigssl.plan.engines import engine_collectives
    from bigssl.plan.trace import trace

    predicted = {}
    traces = {}
    for engine_name, cases in ENGINE_CASES[world_size].items():
        for case in cases:
            config = case_config(case, engine_name)
            if case not in traces:  # the method's collectives do not depend on the engine
                traces[case] = trace(config, world_size, samples=SAMPLES, step=COUNTED_STEP)
            calls = traces[case].collectives + engine_collectives(traces[case], engine_name, config.engine.precision)
            predicted[f"{engine_name}/{case}"] = counting.totals(calls)
    return predicted


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 4])
def test_predicted_collectives_are_the_counted_ones(tmp_path: Path, world_size: int):
    from bigssl.distributed import counting

    if not counting.hooks_available():
        pytest.skip("torch has no ProcessGroup.register_pre_hook")
    run_distributed(_counted, world_size, str(tmp_path))
    counted = json.loads((tmp_path / f"counted-{world_size}.json").read_text())
    predicted = _predicted(world_size)
    wrong = {key: {"counted": counted[key], "predicted": predicted[key]} for key in counted
             if _bytes(counted[key]) != _bytes(predicted[key])}
    assert not wrong, json.dumps(wrong, indent=1)


def _bytes(totals: dict[str, dict[str, int]]) -> dict[str, tuple[int, int]]:
    """Bytes per operation (the number of calls differs with bucketing, not the bytes)."""
    return {op: (entry["in_bytes"], entry["out_bytes"]) for op, entry in totals.items()}


def test_zero3_sub_groups_are_deepspeeds():
    """The planner's ZeRO-3 sub-groups (one LARS all-reduce each) are those DeepSpeed's own code
    cuts, at sub-group sizes that cut (the tests' small models never reach the 10⁹ default)."""
    from types import SimpleNamespace

    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    from bigssl.plan.engines import zero3_sub_groups

    partitions = [5, 1, 7, 3, 3, 12, 1, 1]
    params = [SimpleNamespace(index=i, partition_numel=lambda n=n: n) for i, n in enumerate(partitions)]
    for size in (0, 1, 4, 6, 8, 11, 12, 33, 34, 10**9):
        theirs = DeepSpeedZeroOptimizer_Stage3._create_fp16_sub_groups(SimpleNamespace(sub_group_size=size), params)
        assert zero3_sub_groups(partitions, size) == [[p.index for p in sub] for sub in theirs], size


def test_trace_cached_before_lars_fields_loads():
    from bigssl.plan.engines import engine_collectives
    from bigssl.plan.structure import Param, Trace

    trace = Trace(world_size=2, local_batch=4, params=[Param("w", (3, 2), 4, True, 0)], buffers={},
                  synchronised_buffers=[], groups=[[0]], units=1, unit_calls=[(0, True)], lars_groups=[0])
    old = trace.to_dict()
    del old["lars_groups"], old["lars_rule"]
    loaded = Trace.from_dict(old)
    assert (loaded.lars_groups, loaded.lars_rule) == ([], "lars")
    assert Trace.from_dict(trace.to_dict()) == trace
    lars = [c for c in engine_collectives(trace, "fsdp", "fp32") if c.purpose.startswith("LARS")]
    assert [(c.op, c.in_bytes) for c in lars] == [("all_reduce", 4)] * 4
    assert not [c for c in engine_collectives(loaded, "fsdp", "fp32") if c.purpose.startswith("LARS")]
