"""Preemption under a real SLURM (tests/slurm/cluster.sh, one node on 127.0.0.1): the batch
template runs 2 tasks, receives USR1 as a time limit would send it, the ranks checkpoint and
requeue the job, the rerun resumes, and the finished run equals one that was never interrupted:
the same logged metrics at every step (no gap, no step twice), the same kNN, the same weights.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, worker_env
from safetensors.torch import load_file
from test_resume_exact import textured_shards

pytestmark = [pytest.mark.distributed, pytest.mark.slurm]

TEMPLATE = REPO / "slurm" / "train.sbatch"
RECIPE = REPO / "recipes" / "quickstart" / "simclr.yaml"
# Timing-free fields of a metrics record: everything a resumed run must reproduce exactly.
TIMING = ("time", "images_per_s", "data_wait_fraction", "memory/rss_gib")


def overrides(data: str, val: str, run: Path) -> list[str]:
    return [f"data.train={data}", f"data.val={val}", "data.mode=exact", "data.workers=1", "data.views.size=8",
            "data.views.resize=8", "data.shuffle_buffer=20", "model.backbone_args.channels=[8,16,32,64]",
            "model.projector.hidden_dim=32", "model.projector.out_dim=16", "model.channels_last=false",
            "optim.batch_size=16", "optim.epochs=4", "log.every_steps=2", "log.progress=false",
            "log.tensorboard=false", "checkpoint.every_steps=0", "eval.knn_baseline=false",
            "eval.knn_at_end=true", f"log.dir={run}", "engine.dead_rank_timeout_s=30"]


def submit(env: dict[str, str], log: Path, args: list[str]) -> str:
    command = ["sbatch", "--parsable", "--ntasks-per-node=2", "--cpus-per-task=1", f"--output={log}", str(TEMPLATE),
               str(RECIPE), *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def job_state(env: dict[str, str], job: str) -> dict[str, str]:
    shown = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    return dict(field.split("=", 1) for field in shown.split() if "=" in field)


def wait_done(env: dict[str, str], job: str, log: Path, timeout: float = 600) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_state(env, job)
        if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(0.5)
    subprocess.run(["scancel", job], env=env)
    pytest.fail(f"job {job} not done after {timeout} s; log:\n{log.read_text()[-3000:] if log.exists() else ''}")


def logged_steps(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_usr1_checkpoints_requeues_and_the_rerun_matches_an_uninterrupted_run(
        tmp_path: Path, slurm_cluster: dict[str, str]):
    data = textured_shards(tmp_path / "train")
    val = textured_shards(tmp_path / "val")
    env = {**worker_env(), **slurm_cluster, "PYTHON": sys.executable}

    whole_log, whole = tmp_path / "whole.out", tmp_path / "whole"
    state = wait_done(env, submit(env, whole_log, overrides(data, val, whole)), whole_log)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "0", whole_log.read_text()[-3000:]

    cut_log, cut = tmp_path / "cut.out", tmp_path / "cut"
    job = submit(env, cut_log, overrides(data, val, cut))
    deadline = time.monotonic() + 300
    while not ((cut / "metrics.jsonl").exists() and '"loss"' in (cut / "metrics.jsonl").read_text()):
        assert time.monotonic() < deadline, cut_log.read_text()[-3000:] if cut_log.exists() else "no log"
        time.sleep(0.1)
    # The warning a time limit gives (--signal=B:USR1@120), sent now, to the batch shell only.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env, check=True)
    state = wait_done(env, job, cut_log)
    log = cut_log.read_text()
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", log[-4000:]
    assert "USR1 received" in log and f"requeued SLURM job {job}" in log, log[-4000:]
    assert f"job {job} run 1" in log and "resumed from" in log, log[-4000:]

    stopped_at = int(log.split("stopped after step ")[1].split(",")[0])
    total = logged_steps(whole)[-1]["step"]
    assert 0 < stopped_at < total  # it really stopped mid-run
    # Same records in the same order: no step missing, none twice, equal values (loss, lr,
    # gradient norm, embedding health, final kNN) and the same exported weights, bit for bit.
    assert logged_steps(cut) == logged_steps(whole)
    resumed, uninterrupted = (load_file(run / "backbone" / "model.safetensors") for run in (cut, whole))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[name], uninterrupted[name]) for name in resumed)


def test_scancel_checkpoints_and_cancels_without_requeue(tmp_path: Path, slurm_cluster: dict[str, str]):
    """SIGTERM from a plain `scancel` writes a checkpoint but must not requeue: a job that
    requeued itself on it could never be cancelled."""
    env = {**worker_env(), **slurm_cluster, "PYTHON": sys.executable}
    log, run = tmp_path / "job.out", tmp_path / "run"
    job = submit(env, log, overrides(textured_shards(tmp_path / "train"), "", run))
    deadline = time.monotonic() + 300
    while not ((run / "metrics.jsonl").exists() and '"loss"' in (run / "metrics.jsonl").read_text()):
        assert time.monotonic() < deadline, log.read_text()[-3000:] if log.exists() else "no log"
        time.sleep(0.1)
    subprocess.run(["scancel", job], env=env, check=True)
    state = wait_done(env, job, log, timeout=120)
    text = log.read_text()
    assert state["JobState"] == "CANCELLED" and state["Restarts"] == "0", text[-3000:]
    assert "SIGTERM received: stopped after step" in text and "requeued" not in text, text[-3000:]
    assert list((run / "checkpoints").glob("step_*")), "no checkpoint written on SIGTERM"
