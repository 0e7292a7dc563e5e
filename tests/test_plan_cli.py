"""`bigssl plan`: the command's output, and that a repeated plan answers from its cache without
importing torch."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import REPO, worker_env

DINO = str(REPO / "recipes" / "imagenet" / "dino_vit_small.yaml")


def _plan(*args: str, cache: str) -> subprocess.CompletedProcess:
    code = ("import sys, bigssl.cli; code = bigssl.cli.main(sys.argv[1:]); "
            "print('TORCH' if 'torch' in sys.modules else 'NO TORCH', file=sys.stderr); sys.exit(code)")
    return subprocess.run([sys.executable, "-c", code, "plan", *args], cwd=REPO, capture_output=True, text=True,
                          env={**worker_env(), "BIGSSL_CACHE": cache}, timeout=300)


def test_plan_prints_every_engine_and_reuses_its_trace(tmp_path):
    first = _plan(DINO, "--gpus", "64", "--gpu", "h100", "--json", cache=str(tmp_path))
    assert first.returncode == 0, first.stderr
    plan = json.loads(first.stdout)
    assert plan["local_batch"] == 16 and set(plan["engines"]) == {"ddp", "zero1", "zero2", "zero3", "fsdp"}
    ddp, fsdp = plan["engines"]["ddp"], plan["engines"]["fsdp"]
    assert fsdp["memory"]["parameters"] < ddp["memory"]["parameters"] / 32  # sharded 64 ways, padding aside
    assert any("_update_center" in c["purpose"] for c in ddp["collectives"])  # DINO's centre reduction
    assert plan["choice"] in plan["engines"] and plan["engines"][plan["choice"]]["fits"]
    again = _plan(DINO, "--gpus", "64", "--gpu", "h100", cache=str(tmp_path))
    assert again.returncode == 0, again.stderr
    assert "NO TORCH" in again.stderr  # the cached trace: no torch, no model built
    assert "choice:" in again.stdout and "FSDP2" in again.stdout
