"""The GPU proof run: one prepared script, at most 8 minutes on one GPU, one JSON report and a table.

    python tools/gpu_check.py [--out DIR] [--budget SECONDS]     # on a GPU machine (one H200 here)
    python tools/gpu_check.py --cpu [--out DIR]                  # tiny sizes, gloo, CI (tests/test_gpu_check.py)

It makes its own JPEG shards, then checks, each with a time budget and a pass/fail:
  photometric   the device's photometric chain gives the CPU path's pixels (GPU only)
  step          DINO ViT-S/16 (2 × 224 + 10 × 96) and SimCLR ResNet-50, bf16: two steps under DDP
                (a one-rank NCCL group: DDP's real reducer), ZeRO-1/2/3 and FSDP2 from the same
                weights and batch; losses finite and every engine's equal to DDP's (bf16 tolerance)
  fp16          the same with fp16 and loss scaling (bigssl's scaler under DDP/FSDP2, DeepSpeed's)
  train         bigssl's Trainer for a short run at a realistic per-GPU batch, with the data workers
                the cores allow: images/s, MFU (FLOPs by torch.utils.flop_counter on the traced step,
                peak from the device's datasheet), peak memory (beside bigssl plan's prediction),
                data-wait fraction; ResNets channels-last (the recipe's default)
  bare          the same method and batch in a bare loop (AdamW, views already on the device)
  timm          timm's supervised training step of ResNet-50, the reference for SimCLR's images/s
  compile       the Trainer again with engine.compile (torch.compile of the backbone) (GPU only)
and targets (issue 21): DINO data wait < 10 %, trainer overhead ≤ 5 % over the bare loop, DINO MFU
≥ 23 %. Checks run in order of importance; one that no longer fits the budget is skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's bigssl, installed or not

import torch  # noqa: E402

BUDGET_SIGNAL = signal.SIGUSR2  # sent to the main thread when a check's budget runs out


class CheckTimeout(Exception):
    pass


class Report:
    def __init__(self, total_budget: float, budget_scale: float = 1.0) -> None:
        self.started = time.perf_counter()
        self.total_budget = total_budget
        # --cpu: the budgets only need to stop a hang; a loaded CI machine runs the same checks
        # several times slower than an idle one, and that must not fail them.
        self.budget_scale = budget_scale
        self.checks: list[dict[str, Any]] = []

    def left(self) -> float:
        return self.total_budget - (time.perf_counter() - self.started)

    def run(self, name: str, budget: float, fn: Callable[[], dict[str, Any]], kind: str = "check",
            skip: str | None = None, judge: bool = True) -> dict[str, Any]:
        """Run `fn` within `budget` seconds; its dict may say passed=False. Exceptions fail it.
        `judge=False` runs it and records what it measured, as "measured", without a verdict
        (a GPU target measured on a CPU)."""
        budget *= self.budget_scale
        entry: dict[str, Any] = {"name": name, "kind": kind, "budget_s": budget}
        if skip is None and self.left() < budget:
            skip = f"skipped: out of time ({self.left():.0f} s left, budget {budget:.0f} s)"
        if skip is not None:
            self.checks.append({**entry, "status": "skipped", "reason": skip, "seconds": 0.0})
            return self.checks[-1]
        started = time.perf_counter()
        # Not SIGALRM: the data loader's stall deadline owns that timer and resets it per batch.
        previous = signal.signal(BUDGET_SIGNAL, _alarm)
        timer = threading.Timer(budget, signal.pthread_kill, (threading.main_thread().ident, BUDGET_SIGNAL))
        timer.daemon = True
        timer.start()
        try:
            details = fn()
            status = "pass" if details.pop("passed", True) else "fail"
            entry.update(status=status if judge else "measured", details=details)
        except CheckTimeout:
            entry.update(status="fail", reason=f"over its budget of {budget:.0f} s")
        except Exception as err:  # a broken check is a failed check; the others still run
            entry.update(status="fail", reason=f"{type(err).__name__}: {str(err).strip()[:300]}",
                         traceback=traceback.format_exc()[-4000:])
        finally:
            timer.cancel()
            signal.signal(BUDGET_SIGNAL, previous)
        entry["seconds"] = round(time.perf_counter() - started, 1)
        self.checks.append(entry)
        print(f"gpu_check: {name}: {entry['status']} ({entry['seconds']} s){' — ' + entry.get('reason', '')}",
              file=sys.stderr, flush=True)
        return entry

    def details(self, name: str) -> dict[str, Any] | None:
        entry = next((c for c in self.checks if c["name"] == name), None)
        return entry.get("details") if entry and entry["status"] != "skipped" else None


def _alarm(signum, frame) -> None:
    raise CheckTimeout


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value[:6]) + (", …" if len(value) > 6 else "") + "]"
    return str(value)


def table(report: dict[str, Any]) -> str:
    lines = [f"# gpu_check: {report['mode']} on {report['device']} ({report['when']})", "",
             f"torch {report['torch']}, CUDA {report['cuda']}, bf16 peak {report['peak_tflops']} TFLOP/s "
             f"(datasheet), {report['cpus']} CPUs, {report['elapsed_s']:.0f} s", "",
             "| check | status | s (budget) | result |", "|---|---|---|---|"]
    for check in report["checks"]:
        shown = {k: v for k, v in (check.get("details") or {}).items() if k not in ("traceback",)}
        result = check.get("reason") or "; ".join(f"{k} {_fmt(v)}" for k, v in shown.items())
        lines.append(f"| {check['name']} | {check['status']} | {check['seconds']:.0f} ({check['budget_s']:.0f}) "
                     f"| {result} |")
    summary = report["summary"]
    lines += ["", f"checks: {summary['checks_passed']}/{summary['checks']} passed, "
              f"{summary['checks_skipped']} skipped; targets: {summary['targets_met']}/{summary['targets']} met"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU, one gloo rank (CI)")
    parser.add_argument("--out", default="runs/gpu_check", help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds in all (default: 450 GPU; 1,200 CPU, each check's budget ×5)")
    args = parser.parse_args(argv)
    cpu = args.cpu or not torch.cuda.is_available()
    if not args.cpu and cpu:
        print("gpu_check: no GPU here: running the --cpu checks", file=sys.stderr)
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if cpu else "cuda")
    if cpu:
        os.environ.setdefault("BIGSSL_ALLOW_CPU_FP16", "1")  # the loss scaler's path, slowly, on a CPU
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(args.budget or (1200.0 if cpu else 450.0), budget_scale=5.0 if cpu else 1.0)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        from gpucheck_run import run_checks

        info = run_checks(report, Path(tmp), cpu)
    checks = [c for c in report.checks if c["kind"] == "check"]
    targets = [c for c in report.checks if c["kind"] == "target"]
    result = {**info, "mode": "cpu" if cpu else "gpu", "when": datetime.datetime.now(datetime.UTC).isoformat(
        timespec="seconds"), "elapsed_s": round(time.perf_counter() - report.started, 1), "checks": report.checks,
        "summary": {"checks": len(checks), "checks_passed": sum(c["status"] == "pass" for c in checks),
                    "checks_skipped": sum(c["status"] == "skipped" for c in checks),
                    "targets": len(targets), "targets_met": sum(c["status"] == "pass" for c in targets)}}
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    text = table(result)
    (out / "gpu_check.md").write_text(text + "\n")
    print(text)
    failed = [c for c in checks if c["status"] == "fail"]
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    return 1 if failed else 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # torch + gloo/NCCL can abort in their exit handlers after all work is done
