"""The quickstart recipe end to end through the CLI: 1 process, 2 processes, kill and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import QUICKSTART, SMALL, free_port, run_cli, torch_threads, worker_env
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_steps(run: Path) -> list[int]:
    return [m["step"] for m in metrics(run) if "loss" in m]


def test_quickstart_one_process(tmp_path: Path):
    run = tmp_path / "run"
    result = run_cli("train", str(QUICKSTART), *SMALL, f"log.dir={run}", "optim.max_steps=4",
                     "checkpoint.every_steps=2")
    assert result.returncode == 0, result.stderr
    assert "rank 0 of 1" in result.stderr
    assert train_steps(run) == [1, 2, 3, 4]
    records = metrics(run)
    last = records[-1]
    # Its value: test_eval_offline.py::test_offline_knn_equals_the_trainers_final_knn (one process's final
    # kNN equals the offline evaluation of its checkpoint); here the summary prints what was logged.
    assert last["knn/top1"] <= last["knn/top5"]
    assert f"trained, step 4  {last['knn/top1']:.4f}" in result.stderr  # the summary prints the logged score
    assert {"knn/random_init_top1", "knn/pixels_top1"} <= {k for r in records for k in r}
    assert all(r["world_size"] == 1 and r["images_per_s"] > 0 for r in records if "loss" in r)
    assert "random init" in result.stderr and "trained, step 4" in result.stderr
    # Every phase says what it does, in order; off a terminal one plain line per log window.
    phases = ["bigssl: baselines: kNN of the random-init backbone and raw pixels", "bigssl: baselines: random init",
              "bigssl: training: 4 steps", "bigssl: step 2/4 (50%)", "bigssl: step 4/4 (100%)",
              "bigssl: final evaluation: kNN of the trained backbone", "the trained backbone beats",
              f"bigssl: run directory {run}:", f"tensorboard --logdir {run / 'tb'}"]
    positions = [result.stderr.find(text) for text in phases]
    assert -1 not in positions and positions == sorted(positions), list(zip(phases, positions, strict=True))
    assert "\r" not in result.stderr
    events = EventAccumulator(str(run / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert {"train/loss", "train/lr", "knn/top1"} <= set(events.Tags()["scalars"])
    grid = events.Images("views/first_batch")
    assert len(grid) == 1 and grid[0].step == 0
    # One row per image shown, one column per view: 2 views of 28 px (+ 2 px padding each).
    assert grid[0].width >= 2 * 28 and grid[0].height >= 4 * 28
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    assert (run / "checkpoints" / "step_00000004" / "state.pt").is_file()
    assert (run / "config.yaml").read_text().startswith("name: simclr")
    weights = load_file(run / "backbone" / "model.safetensors")  # timm's hub layout (tests/test_export.py)
    assert weights["conv1.weight"].shape == (64, 3, 3, 3)  # the small stem, exported with the trunk
    assert not any(name.startswith("fc.") for name in weights)


@pytest.mark.distributed
@pytest.mark.parametrize("engine", ["ddp", "fsdp", "deepspeed"])
def test_quickstart_two_processes_with_torchrun(tmp_path: Path, engine: str):
    run = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={free_port()}", "-m"]
    # 64 samples per epoch = 2 steps: kNN after epoch 1 (step 2) and at the end (step 3).
    result = run_cli("train", str(QUICKSTART), *SMALL, f"log.dir={run}", "optim.max_steps=3",
                     "data.samples_per_epoch=64", "eval.knn_every_epochs=1", "eval.knn_baseline=false",
                     "eval.knn_pixels=false", f"engine.kind={engine}", "engine.zero_stage=3", launcher=torchrun)
    assert result.returncode == 0, result.stderr
    # Each worker reports the world size its process group really has.
    assert "rank 0 of 2" in result.stderr and "rank 1 of 2" in result.stderr
    assert train_steps(run) == [1, 2, 3]
    assert all(m["world_size"] == 2 for m in metrics(run) if "loss" in m)
    knn_steps = [m["step"] for m in metrics(run) if "knn/top1" in m]
    assert knn_steps == [2, 3]
    # The kNN during training (every rank embeds its part, features gathered) equals one
    # process's offline kNN of the checkpointed backbone: both ranks' features, one network.
    from bigssl.eval.offline import EvalOptions, evaluate

    with torch_threads(1):  # as each rank
        offline = evaluate("knn", run, EvalOptions(train="quickstart:train", val="quickstart:val", workers=0))
    final = [m for m in metrics(run) if "knn/top1" in m][-1]
    assert (offline["eval/knn_top1"], offline["eval/knn_top5"]) == pytest.approx(
        (final["knn/top1"], final["knn/top5"]), abs=1e-9)
    # FSDP2: a DCP directory of all ranks' shards; DeepSpeed: its own layout, one file per rank.
    written = {"ddp": "state.pt", "fsdp": "dcp/.metadata",
               "deepspeed": "zero/zero_pp_rank_1_mp_rank_00_model_states.pt"}
    assert (run / "checkpoints" / "step_00000003" / written[engine]).is_file()
    # whole, not a shard
    assert load_file(run / "backbone" / "model.safetensors")["conv1.weight"].shape == (64, 3, 3, 3)


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path: Path):
    run = tmp_path / "run"
    args = ["train", str(QUICKSTART), *SMALL, f"log.dir={run}", "optim.max_steps=30", "checkpoint.every_steps=3",
            "eval.knn_at_end=false"]
    victim = subprocess.Popen([sys.executable, "-m", "bigssl", *args], env=worker_env(), start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = run / "checkpoints" / "step_00000003"
    deadline = time.time() + 300
    while not first.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)  # the whole process group, as a lost node would
    assert victim.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    saved = sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.endswith(".partial"))
    resumed_at = int(saved[-1].split("_")[1])
    assert resumed_at >= 3

    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert f"resumed from {run / 'checkpoints' / saved[-1]} (step {resumed_at})" in result.stderr
    # Steps the killed run logged after its checkpoint are dropped: no gap, no duplicate.
    assert train_steps(run) == list(range(1, 31))
    assert (run / "checkpoints" / "step_00000030").is_dir()


@pytest.mark.distributed
def test_exact_epochs_on_two_processes_record_a_merged_position(tmp_path: Path):
    run = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={free_port()}", "-m"]
    result = run_cli("train", str(QUICKSTART), *SMALL, f"log.dir={run}", "data.mode=exact", "optim.max_steps=3",
                     "checkpoint.every_steps=2", "eval.knn_at_end=false", launcher=torchrun)
    assert result.returncode == 0, result.stderr
    assert "rank 0 of 2" in result.stderr and "rank 1 of 2" in result.stderr
    state = torch.load(run / "checkpoints" / "step_00000002" / "state.pt", weights_only=True)
    position = state["extra"]["consumed"]
    consumed = sum(position["prefix_ends"]) + len(position["beyond_ordinals"])
    assert consumed == 2 * 32  # two steps of the global batch, gathered from both ranks
    assert (state["extra"]["epoch"], state["extra"]["epoch_step"]) == (0, 2)
