"""Per-rank memory of parameters, gradients and optimizer state under each engine, 2 ranks.

    python tools/bench_memory.py [--models vit_small_patch16_224 vit_base_patch16_224] [--json]

For each backbone, each engine (DDP, DeepSpeed ZeRO-1/2/3, FSDP2) trains one step with AdamW in
2 gloo processes on this machine, and rank 0 adds up the bytes of the live tensors it holds:
  parameters  the model's parameters as this rank stores them (a shard under ZeRO-3 / FSDP2);
  gradients   every other tensor storage reachable from Python after a backward (gradients,
              reduction buckets, engine work buffers), de-duplicated by storage;
  optimizer   AdamW's moments as held by this rank;
  master      fp32 master-weight copies that an engine keeps besides the parameters (DeepSpeed
              ZeRO-1/2 clone their partition even in fp32 training; bigssl's ZeRO-3 engine
              shares it with the parameters; DDP and FSDP2 keep none).
Ratios are per-rank totals over DDP's for the same model. DDP keeps its gradients as views of
its reduction buckets (bigssl's default), so they are counted once.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

ENGINES = {"ddp": ["engine.kind=ddp"], "zero1": ["engine.kind=deepspeed", "engine.zero_stage=1"],
           "zero2": ["engine.kind=deepspeed", "engine.zero_stage=2"],
           "zero3": ["engine.kind=deepspeed", "engine.zero_stage=3"], "fsdp": ["engine.kind=fsdp"]}


def live_storages() -> dict[int, int]:
    """data_ptr → bytes of every tensor storage reachable from Python objects."""
    found: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not obj.is_meta:
            try:
                storage = obj.untyped_storage()
                if storage.nbytes():
                    found[storage.data_ptr()] = storage.nbytes()
            except (RuntimeError, NotImplementedError):  # DTensor wrappers, freed ZeRO-3 storages
                continue
    return found


def _measure(rank: int, model: str, engine: str, port: int, out: str, overrides: tuple[str, ...] = (),
             side: int = 224) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "GLOO_SOCKET_IFNAME": "lo"})
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from memory_method import FEATURES_METHOD  # registers the method

    from bigssl import recipes
    from bigssl.distributed import comm, env
    from bigssl.distributed.engines import build_engine
    from bigssl.methods.base import build
    from bigssl.optim import build_optimizer

    dist_env = env.detect()
    env.init(dist_env, backend="gloo")
    assert comm.world_size() == 2, f"rank {rank} sees world size {comm.world_size()}"
    config = recipes.load(None, [f"method.name={FEATURES_METHOD}", f"model.backbone={model}",
                                 "model.channels_last=false", "optim.name=adamw", "optim.lr=0.0001",
                                 "optim.batch_size=2", *ENGINES[engine], *overrides])
    torch.manual_seed(0)
    method = build(config)
    engine_ = build_engine(config, dist_env, torch.device("cpu"))
    engine_.setup(method, lambda module: build_optimizer(module, config.optim))
    batch = {"views": [torch.rand(1, 1, 3, side, side)]}
    for step in range(2):  # the first step makes every lazy buffer; measure after the second backward
        loss = engine_.forward(batch, step).loss
        engine_.backward(loss)
        del loss
        if step == 0:
            engine_.step()
    # Python wrappers of C++-held tensors exist only once touched: hold every gradient so the
    # walk below sees it (DDP's are views of its buckets).
    held_gradients = [p.grad for p in method.parameters()]
    gc.collect()

    def storages(tensors) -> dict[int, int]:
        from torch.distributed.tensor import DTensor

        found = {}
        for t in tensors:
            t = t.to_local() if isinstance(t, DTensor) else t  # FSDP2 state: this rank's shard
            if isinstance(t, torch.Tensor) and t.numel():
                found[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return found

    params = storages(engine_.local_tensor(p) for p in method.parameters())
    inner = getattr(engine_.optimizer, "optimizer", engine_.optimizer)  # DeepSpeed wraps the client's
    moments = storages(v for state in inner.state.values() for v in state.values()
                       if isinstance(v, torch.Tensor) and v.dim() > 0)
    copies = [*getattr(engine_.optimizer, "single_partition_of_fp32_groups", []),  # ZeRO-1/2
              *getattr(engine_.optimizer, "fp32_partitioned_groups_flat", [])]  # ZeRO-3
    master = {ptr: n for ptr, n in storages(copies).items() if ptr not in params}
    known = {**params, **moments, **master, **storages(batch["views"])}
    # Everything else this rank holds now: gradients, reduction buckets, engine work buffers.
    gradients = {ptr: n for ptr, n in live_storages().items() if ptr not in known}
    params, moments, master, gradients = (sum(d.values()) for d in (params, moments, master, gradients))
    del held_gradients
    if rank == 0:
        Path(out).write_text(json.dumps({"parameters": params, "gradients": gradients, "optimizer": moments,
                                         "master": master}))
    env.shutdown()
    sys.stdout.flush()
    os._exit(0)  # torch + gloo can abort in exit handlers after all work is done


def measure(model: str, engine: str, overrides: tuple[str, ...] = (), side: int = 224) -> dict[str, int]:
    """Bytes per kind on rank 0 of 2; `overrides` (config keys) and `side` (image size) make the
    model small enough for a test (tests/test_plan_memory.py)."""
    from socket import socket

    with socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        mp.spawn(_measure, args=(model, engine, port, out, tuple(overrides), side), nprocs=2, join=True)
        return json.loads(Path(out).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit_small_patch16_224", "vit_base_patch16_224"])
    parser.add_argument("--json", action="store_true", help="end with one JSON line of every number")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    result: dict[str, float | int] = {}
    mib = 2**20
    print(f"{'model':<24}{'engine':<8}{'params':>9}{'grads':>9}{'optim':>9}{'master':>9}{'total':>9}"
          f"{'vs DDP':>8}   MiB per rank, 2 ranks")
    for model in args.models:
        ddp_total = ddp_optimizer = 0
        for engine in ENGINES:
            numbers = measure(model, engine)
            total = sum(numbers.values())
            if engine == "ddp":
                ddp_total, ddp_optimizer = total, numbers["optimizer"]
            for key, value in {**numbers, "total": total}.items():
                result[f"{model}_{engine}_{key}_bytes"] = value
            result[f"{model}_{engine}_ratio"] = total / ddp_total
            result[f"{model}_{engine}_optimizer_ratio"] = numbers["optimizer"] / ddp_optimizer
            result[f"{model}_{engine}_optimizer_with_master_ratio"] = ((numbers["optimizer"] + numbers["master"])
                                                                      / ddp_optimizer)
            print(f"{model:<24}{engine:<8}{numbers['parameters'] / mib:>9.1f}{numbers['gradients'] / mib:>9.1f}"
                  f"{numbers['optimizer'] / mib:>9.1f}{numbers['master'] / mib:>9.1f}{total / mib:>9.1f}"
                  f"{total / ddp_total:>7.2f}x")
    small = args.models[0]
    result["zero3_ratio"] = result[f"{small}_zero3_ratio"]
    result["fsdp_ratio"] = result[f"{small}_fsdp_ratio"]
    result["zero2_optimizer_ratio"] = result[f"{small}_zero2_optimizer_ratio"]
    result["zero2_optimizer_with_master_ratio"] = result[f"{small}_zero2_optimizer_with_master_ratio"]
    print(f"{small}: ZeRO-3 {result['zero3_ratio']:.2f}x, FSDP2 {result['fsdp_ratio']:.2f}x of DDP per rank; "
          f"ZeRO-2 optimizer state {result['zero2_optimizer_ratio']:.2f}x "
          f"({result['zero2_optimizer_with_master_ratio']:.2f}x with its fp32 master partition)")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
