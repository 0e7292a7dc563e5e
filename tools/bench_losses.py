"""DINO's multi-crop loss: bigssl's fused `dino_loss` against the straightforward pairwise loop.

    python tools/bench_losses.py [--batch 64 --prototypes 65536 --local-crops 10 --repeats 5] [--json]

The pairwise loop is the form of the official code: divide the student logits by τ, then for
every (teacher view, student view ≠ it) pair take a log-softmax and the cross-entropy. Both run
forward + backward on the same inputs in this process (time: median of `--repeats`, alternating);
peak memory is measured in a fresh process per variant as the growth of the peak resident set
while computing (inputs allocated before). `--json` makes the last line a JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from bigssl import losses

TEACHER_TEMP, STUDENT_TEMP = 0.04, 0.1


def pairwise(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    student_out = student / STUDENT_TEMP
    teacher_probs = F.softmax((teacher - center) / TEACHER_TEMP, dim=-1).detach()
    total, pairs = 0.0, 0
    for i in range(teacher.shape[0]):
        for v in range(student.shape[0]):
            if v == i:
                continue
            total = total + torch.sum(-teacher_probs[i] * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
            pairs += 1
    return total / pairs


def fused(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    return losses.dino_loss(student, teacher, center, STUDENT_TEMP, TEACHER_TEMP)


VARIANTS = {"pairwise": pairwise, "fused": fused}


def inputs(views: int, batch: int, prototypes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(views, batch, prototypes, generator=generator).requires_grad_(True)
    teacher = torch.randn(2, batch, prototypes, generator=generator)
    return student, teacher, torch.randn(prototypes, generator=generator) * 0.1


def run_once(name: str, student, teacher, center) -> tuple[float, float, torch.Tensor]:
    student.grad = None
    start = time.perf_counter()
    loss = VARIANTS[name](student, teacher, center)
    loss.backward()
    return time.perf_counter() - start, loss.item(), student.grad


def _high_water_bytes() -> int:
    """This process's peak resident set. From /proc (VmHWM): getrusage's ru_maxrss survives exec,
    so a freshly spawned child would report its parent's peak."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_growth(name: str, views: int, batch: int, prototypes: int, queue) -> None:
    torch.set_num_threads(1)
    student, teacher, center = inputs(views, batch, prototypes)
    before = _high_water_bytes()
    run_once(name, student, teacher, center)
    queue.put(_high_water_bytes() - before)


def peak_bytes(name: str, views: int, batch: int, prototypes: int) -> int:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_peak_growth, args=(name, views, batch, prototypes, queue))
    process.start()
    value = queue.get()
    process.join()
    return int(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prototypes", type=int, default=65536)
    parser.add_argument("--local-crops", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    views = 2 + args.local_crops
    memory = {name: peak_bytes(name, views, args.batch, args.prototypes) for name in VARIANTS}
    student, teacher, center = inputs(views, args.batch, args.prototypes)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    results = {}
    for _ in range(args.repeats):
        for name in VARIANTS:
            seconds, value, grad = run_once(name, student, teacher, center)
            times[name].append(seconds)
            results[name] = (value, grad.clone())
    difference = abs(results["fused"][0] - results["pairwise"][0])
    grad_difference = float((results["fused"][1] - results["pairwise"][1]).abs().max())
    report = {
        "views": views, "batch": args.batch, "prototypes": args.prototypes,
        **{f"dino_loss_{name}_seconds": statistics.median(t) for name, t in times.items()},
        **{f"dino_loss_{name}_peak_bytes": memory[name] for name in VARIANTS},
        "dino_loss_speedup": statistics.median(times["pairwise"]) / statistics.median(times["fused"]),
        "dino_loss_memory_ratio": memory["fused"] / memory["pairwise"],
        "dino_loss_value_difference": difference, "dino_loss_grad_max_difference": grad_difference,
    }
    mib = 2**20
    print(f"DINO loss, {views} crops (2 global), batch {args.batch}, K = {args.prototypes}, forward + backward, "
          f"1 thread, median of {args.repeats}:")
    for name in VARIANTS:
        print(f"  {name:<9} {report[f'dino_loss_{name}_seconds']:.3f} s   peak +{memory[name] / mib:.0f} MiB")
    print(f"  fused: {report['dino_loss_speedup']:.2f}x faster, {report['dino_loss_memory_ratio']:.2f}x the peak "
          f"memory; |value difference| {difference:.2e}, max |grad difference| {grad_difference:.2e}")
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
