"""Each launcher starts a real 2-process run: srun (under a real single-node SLURM), the
deepspeed launcher and accelerate here, torchrun in tests/test_e2e.py (with every engine).

Every worker prints `bigssl: rank r of W` only after checking that its process group really has
W ranks, so finding both ranks' lines proves two synchronised processes, not two lonely ones
(accelerate's `--cpu` flag, for one, silently starts a single process: `accelerate launch --cpu
--num_processes 2` was measured to start one).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from helpers import QUICKSTART, free_port, run_cli, worker_env

pytestmark = pytest.mark.distributed

TINY = ["model.backbone_args.channels=[8,16,32,64]", "model.projector.hidden_dim=32", "model.projector.out_dim=16",
        "optim.batch_size=32", "data.workers=1", "optim.max_steps=2", "log.every_steps=1", "log.progress=false",
        "eval.knn_at_end=false", "eval.knn_baseline=false", "eval.knn_pixels=false"]


def launcher_command(name: str) -> tuple[list[str], dict[str, str]]:
    port, env = str(free_port()), worker_env()
    binary = Path(sys.executable).parent
    if name == "deepspeed":
        env["DS_ACCELERATOR"] = "cpu"
        return [str(binary / "deepspeed"), "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", port,
                "--module"], env
    env["ACCELERATE_USE_CPU"] = "true"  # without it, --multi_gpu on CPU starts two unsynchronised processes
    return [str(binary / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--main_process_ip", "127.0.0.1", "--main_process_port", port, "-m"], env


@pytest.mark.parametrize("name", ["deepspeed", "accelerate"])
def test_launcher_starts_two_synchronised_ranks(tmp_path: Path, name: str):
    command, env = launcher_command(name)
    if not shutil.which(command[0]) and not os.path.exists(command[0]):
        pytest.fail(f"{command[0]} is not installed")
    run = tmp_path / "run"
    result = run_cli("train", str(QUICKSTART), *TINY, f"log.dir={run}", launcher=command, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "rank 0 of 2" in output and "rank 1 of 2" in output
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["world_size"] for r in records if "loss" in r] == [2, 2]


@pytest.mark.slurm
def test_srun_starts_two_synchronised_ranks(tmp_path: Path, slurm_cluster: dict[str, str]):
    run = tmp_path / "run"
    env = {**worker_env(), **slurm_cluster}
    result = run_cli("train", str(QUICKSTART), *TINY, f"log.dir={run}", env=env,
                     launcher=["srun", "--ntasks=2", "--kill-on-bad-exit=1", sys.executable, "-m"])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "rank 0 of 2" in output and "rank 1 of 2" in output and "launcher slurm" in output
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["world_size"] for r in records if "loss" in r] == [2, 2]
