"""`bigssl plan`: put a traced step, the engine models and a GPU's datasheet together.

Per engine: the bytes of each collective per step and what they put on the wire, per-rank
memory, and a lower bound on the step time, max(compute at the datasheet peak, wire bytes at
the link bandwidth): compute and communication overlapped perfectly, every kernel at peak. A
real step is slower; a plan whose bound already misses a target will miss it.
Wire bytes per rank follow the ring algorithms NCCL uses at scale (its "bus bandwidth"):
all-reduce 2(W−1)/W of the buffer, all-gather and reduce-scatter (W−1)/W of the gathered size,
broadcast (W−1)/W of the buffer. The CPU-side votes (a few bytes over gloo) are listed, not timed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from bigssl import config as config_lib
from bigssl import recipes
from bigssl.config import Config
from bigssl.distributed.collective import Collective
from bigssl.plan.devices import GPUS_PER_NODE, PLANNED, Device
from bigssl.plan.engines import ENGINES, Memory, engine_collectives, engine_memory
from bigssl.plan.structure import Trace

LABELS = {"ddp": "DDP", "zero1": "ZeRO-1", "zero2": "ZeRO-2", "zero3": "ZeRO-3", "fsdp": "FSDP2"}
HEADROOM = 0.9  # of the GPU's memory a plan may use: the allocator's fragmentation, CUDA context, NCCL buffers
SIMPLER_FIRST = ("ddp", "zero1", "zero2", "fsdp", "zero3")  # ties go to the engine with less machinery


def wire_bytes(call: Collective, world: int) -> float:
    share = (world - 1) / world
    if call.op == "all_reduce":
        return 2 * share * call.in_bytes
    if call.op == "all_gather":
        return share * call.out_bytes
    if call.op == "reduce_scatter":
        return share * call.in_bytes
    return share * call.in_bytes


@dataclass
class EnginePlan:
    engine: str
    collectives: list[Collective]
    memory: Memory
    wire_bytes: float
    compute_s: float
    comm_s: float
    fits: bool
    note: str = ""

    @property
    def bound_s(self) -> float:
        return max(self.compute_s, self.comm_s)


@dataclass
class Plan:
    recipe: str
    gpus: int
    device: Device
    link_gbps: float
    link: str
    local_batch: int
    flops: int
    trace: Trace
    engines: dict[str, EnginePlan]
    choice: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "gpus": self.gpus, "device": asdict(self.device), "link_gbps": self.link_gbps,
                "link": self.link, "local_batch": self.local_batch, "flops_per_gpu_step": self.flops,
                "choice": self.choice,
                "engines": {name: {"collectives": [asdict(c) for c in e.collectives],
                                   "wire_bytes": e.wire_bytes, "memory": {**asdict(e.memory), "total": e.memory.total},
                                   "compute_s": e.compute_s, "comm_s": e.comm_s, "bound_s": e.bound_s,
                                   "fits": e.fits, "note": e.note}
                            for name, e in self.engines.items()}}


def _cache_path(config: Config, world: int, samples: int | None) -> Path:
    """Traces are cached by everything they depend on: the resolved recipe, the world size, the
    dataset size and the versions of bigssl, torch and timm."""
    versions = [metadata.version(name) for name in ("torch", "timm")]
    text = json.dumps([config_lib.to_yaml(config), world, samples, versions, _source_digest()])
    root = Path(os.environ.get("BIGSSL_CACHE") or Path.home() / ".cache" / "bigssl")
    return root / "plan" / (hashlib.sha256(text.encode()).hexdigest()[:24] + ".json")


def _source_digest() -> str:
    """bigssl's own code changes what a trace sees: its methods, comm and the planner."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def load_trace(config: Config, world: int, samples: int | None = None, cache: bool = True) -> Trace:
    path = _cache_path(config, world, samples)
    if cache and path.is_file():
        return Trace.from_dict(json.loads(path.read_text()))
    from bigssl.plan.trace import trace  # imports torch and timm: only when not cached

    result = trace(config, world, samples)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(result.to_dict()))
        os.replace(tmp, path)
    return result


def _note(config: Config, engine: str, trace: Trace) -> str:
    """Combinations bigssl's engines refuse (see engines/base.py and deepspeed_zero.py)."""
    deepspeed = engine.startswith("zero")
    if deepspeed and config.optim.clip_grad_per_parameter:
        return "refused: DeepSpeed clips the global norm only (optim.clip_grad_per_parameter)"
    if deepspeed and config.engine.precision == "fp16" and trace.ema:
        return "refused: DeepSpeed's fp16 keeps the EMA teacher in fp16"
    if deepspeed and config.engine.compile:
        return "refused: engine.compile with DeepSpeed"
    return ""


def plan(recipe: str, gpus: int, gpu: str = "h100", link_gbps: float | None = None,
         overrides: list[str] | tuple[str, ...] = (), samples: int | None = None, cache: bool = True) -> Plan:
    config = recipes.load(recipe, list(overrides))
    device = PLANNED[gpu]
    local_batch = config_lib.per_rank_batch(config, gpus)
    if link_gbps is None:
        within = gpus <= GPUS_PER_NODE
        link_gbps = device.nvlink_gbps if within else device.network_gbps
        link = "NVLink (one node)" if within else f"network adapter per GPU ({gpus // GPUS_PER_NODE}+ nodes)"
    else:
        link = "given"
    trace = load_trace(config, gpus, samples, cache)
    peak = (device.bf16_tflops if config.engine.precision in ("bf16", "fp16") else device.tf32_tflops) * 1e12
    compute_s = trace.flops / peak
    engines = {}
    for engine in ENGINES:
        calls = trace.collectives + engine_collectives(trace, engine, config.engine.precision)
        wire = sum(wire_bytes(c, gpus) for c in calls if c.group != "cpu")
        memory = engine_memory(trace, engine, config.optim.name, config.engine.precision)
        note = _note(config, engine, trace)
        engines[engine] = EnginePlan(engine, calls, memory, wire, compute_s, wire * 8 / (link_gbps * 1e9),
                                     fits=not note and memory.total <= HEADROOM * device.memory_bytes, note=note)
    fitting = [e for e in SIMPLER_FIRST if engines[e].fits]
    choice = None
    if fitting:
        best = min(engines[e].bound_s for e in fitting)
        choice = next(e for e in fitting if engines[e].bound_s <= best * 1.01)
    return Plan(recipe, gpus, device, link_gbps, link, local_batch, trace.flops, trace, engines, choice)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}" if n else "-"


def format_plan(p: Plan, config: Config | None = None) -> str:
    lines = [f"bigssl plan: {p.recipe} on {p.gpus} × {p.device.name} ({p.device.bf16_tflops:.0f} TFLOP/s bf16, "
             f"{p.device.memory_gb:.0f} GB); link {p.link_gbps:.0f} Gbit/s per GPU, {p.link}",
             f"per GPU: batch {p.local_batch}, {p.flops / 1e12:.2f} TFLOP per step (forward + backward, "
             f"torch.utils.flop_counter), {len(p.trace.collectives)} collective(s) of the method's own"]
    width = 46
    header = f"{'':<{width}}" + "".join(f"{LABELS[e]:>10}" for e in p.engines)
    lines += ["", "collectives per step, MiB each GPU issues (payload)", header]
    purposes = []
    for e in p.engines.values():
        for call in e.collectives:
            key = (_short(call.purpose), call.op)
            if key not in purposes:
                purposes.append(key)
    for purpose, op in purposes:
        cells = []
        for e in p.engines.values():
            total = sum(max(c.in_bytes, c.out_bytes) for c in e.collectives
                        if (_short(c.purpose), c.op) == (purpose, op))
            count = sum(1 for c in e.collectives if (_short(c.purpose), c.op) == (purpose, op))
            cells.append(f"{_mib(total)}{'' if count <= 1 else f' ×{count}'}" if count else "-")
        label = f"{purpose} · {op.replace('_', '-')}"
        lines.append(f"{label[:width - 1]:<{width}}" + "".join(f"{c:>10}" for c in cells))
    lines.append(f"{'on the wire, MiB (ring algorithms)':<{width}}"
                 + "".join(f"{_mib(e.wire_bytes):>10}" for e in p.engines.values()))
    lines += ["", "memory per GPU, GiB", header]
    for name in ("parameters", "gradients", "optimizer", "master", "buffers", "activations", "gathered"):
        lines.append(f"{name:<{width}}" + "".join(f"{_gib(getattr(e.memory, name)):>10}" for e in p.engines.values()))
    lines.append(f"{'total':<{width}}" + "".join(f"{_gib(e.memory.total):>10}" for e in p.engines.values()))
    lines += ["", "step time lower bound, ms", header]
    for name, attr in (("compute at peak", "compute_s"), ("communication at link bandwidth", "comm_s"),
                       ("bound (perfect overlap)", "bound_s")):
        lines.append(f"{name:<{width}}" + "".join(f"{getattr(e, attr) * 1e3:>10.1f}" for e in p.engines.values()))
    lines.append(f"{'fits (≤ 90 % of memory)':<{width}}"
                 + "".join(f"{'yes' if e.fits else 'no':>10}" for e in p.engines.values()))
    for e in p.engines.values():
        if e.note:
            lines.append(f"  {LABELS[e.engine]}: {e.note}")
    if p.choice:
        bound = p.engines[p.choice].bound_s
        lines.append(f"\nchoice: {LABELS[p.choice]} (fits; step ≥ {bound * 1e3:.1f} ms, "
                     f"≤ {p.local_batch * p.gpus / bound:,.0f} images/s over {p.gpus} GPUs)")
    else:
        lines.append("\nchoice: no engine fits; lower the per-GPU batch or use more GPUs")
    return "\n".join(lines)


def _short(purpose: str) -> str:
    """'bigssl.methods.dino.DINO._update_center' → 'dino.DINO._update_center'."""
    for prefix in ("bigssl.methods.", "bigssl.losses.", "bigssl.distributed."):
        if purpose.startswith(prefix):
            return purpose[len(prefix):].replace("_GlobalBatchNormFn.", "")
    return purpose
