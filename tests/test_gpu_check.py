"""tools/gpu_check.py --cpu: the GPU proof run's script at tiny sizes on one gloo rank, so that it
cannot rot between the sessions that have a GPU. Every check that can run on a CPU runs and
passes; the rest say why they were skipped."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import REPO, worker_env

GPU_ONLY = ("photometric:", "timm:", "compile:", "target: DINO MFU")


def test_gpu_check_cpu_mode_runs_every_cpu_check(tmp_path):
    env = {**worker_env(), "OMP_NUM_THREADS": "2", "BIGSSL_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "tools/gpu_check.py", "--cpu", "--out", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["mode"] == "cpu"
    checks = {c["name"]: c for c in report["checks"]}
    for name, check in checks.items():
        if name.startswith(GPU_ONLY):
            assert check["status"] == "skipped" and "no GPU" in check["reason"], check
        elif check["kind"] == "target":
            assert check["status"] == "measured", check  # GPU targets: numbers, no verdict on a CPU
        elif check["status"] == "skipped":
            assert "fp16" in name, check  # DeepSpeed's fp16 mode: a GPU's, or refused for an EMA teacher
        else:
            assert check["status"] == "pass", check
    steps = [c for n, c in checks.items() if n.startswith("step: ")]
    assert len(steps) == 10  # 2 models × DDP, ZeRO-1/2/3, FSDP2
    assert {c["details"]["runs_as"] for c in steps if " ddp " in c["name"]} == {"DistributedDataParallel"}
    trained = [c["details"] for n, c in checks.items() if n.startswith("train: ")]
    assert len(trained) == 2 and all(t["images_per_s"] > 0 and t["flops_per_step"] > 0 for t in trained)
    assert "| step: dino_vit_s16 zero3 bf16 | pass |" in (tmp_path / "gpu_check.md").read_text()
