"""Proof that a refactoring changed no behaviour: a fingerprint of short runs of every
quickstart recipe, and a bit-for-bit comparison of two fingerprints.

    python tools/compare_runs.py run [--tree DIR] --out before.json     # on the old code
    python tools/compare_runs.py run --out after.json                   # on the new code
    python tools/compare_runs.py compare before.json after.json         # exit 0: identical

`run` trains each recipes/quickstart/*.yaml of `--tree` (default: this checkout) through the
command line, `python -m bigssl train`, in a fresh process with that tree first on PYTHONPATH,
so the tool needs no API of the code it measures and works on any commit. Each run is cut to
cost seconds, not minutes, the same way for every recipe: `--steps` steps (20), a global batch
of `--batch` (16), epochs of `--samples-per-epoch` samples (160: ten steps, so the run crosses
an epoch boundary, its loader restart and its epoch-end checkpoint, and the lr schedule is
past its warm-up), no evaluation (data.val empty: no kNN, baselines or zero-shot), no
TensorBoard. Every method is covered; the recipes' models and views are kept.

A fingerprint holds, per recipe: the loss of every step and every other logged value that does
not measure time or memory (metrics.jsonl with log.every_steps=1), and a SHA-256 of every
tensor of the final checkpoint and of the exported backbone: of the tensors' dtype, shape and
values, not of the files' bytes (a pickle's bytes can change with nothing that trained). The
checkpoint's other values (step, data position, optimizer settings) get a digest of their own.

Bit-identical needs the same machine, torch build and thread count: `run` fixes the threads of
each run (OMP_NUM_THREADS=1, `--jobs` runs side by side) and records torch's version, and
`compare` refuses fingerprints made under different ones.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Logged values that measure the machine, not the training: left out of the fingerprint.
VOLATILE = ("time", "images_per_s", "data_wait_fraction")
VOLATILE_PREFIXES = ("memory/",)
# What each run keeps fixed, so that two fingerprints are comparable (`compare` checks it).
SETTINGS = ("steps", "batch", "samples_per_epoch", "threads", "torch")


def overrides(steps: int, batch: int, samples_per_epoch: int, log_dir: Path) -> list[str]:
    """The keys that cut a quickstart recipe to a fingerprint run (the module docstring says why)."""
    return [f"optim.max_steps={steps}", f"optim.batch_size={batch}", f"data.samples_per_epoch={samples_per_epoch}",
            "data.val=", "log.every_steps=1", "log.tensorboard=false", "log.progress=false",
            "checkpoint.every_steps=0", "checkpoint.resume=false", f"log.dir={log_dir}"]


def child_env(tree: Path, threads: int) -> dict[str, str]:
    """The environment of a run: `tree` before the installed bigssl, a fixed thread count."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")}
    env["PYTHONPATH"] = os.pathsep.join([str(tree), *filter(None, [env.get("PYTHONPATH")])])
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONHASHSEED": "0"})
    return env


def check_tree(tree: Path, env: dict[str, str]) -> None:
    """The runs must import bigssl from `tree`, not the installed copy (an editable install
    points elsewhere; Python puts the working directory first, so the runs start elsewhere): a
    fingerprint of the wrong code would prove nothing."""
    found = subprocess.run([sys.executable, "-c", "import bigssl; print(bigssl.__file__)"], env=env,
                           capture_output=True, text=True, check=True, cwd=tempfile.gettempdir()).stdout.strip()
    if not Path(found).resolve().is_relative_to(tree.resolve()):
        sys.exit(f"compare_runs: bigssl is imported from {found}, not from --tree {tree}")


def tensor_digest(value: Any) -> str:
    import torch

    tensor = value.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    # Viewed as bytes: the values exactly, whatever the dtype (bfloat16 included).
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def walk(value: Any, path: str, tensors: dict[str, str], other: list[str]) -> None:
    """Every tensor under `value` by its path into `tensors`; every other leaf, as text, into `other`."""
    import torch

    if torch.is_tensor(value):
        tensors[path] = tensor_digest(value)
    elif isinstance(value, dict):
        for key in sorted(value, key=repr):
            walk(value[key], f"{path}/{key}", tensors, other)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            walk(item, f"{path}[{index}]", tensors, other)
    else:
        other.append(f"{path}={value!r}")


def state_digests(state: Any) -> dict[str, Any]:
    tensors: dict[str, str] = {}
    other: list[str] = []
    walk(state, "", tensors, other)
    whole = hashlib.sha256("\n".join(f"{k} {v}" for k, v in sorted(tensors.items())).encode()).hexdigest()
    return {"tensors": whole, "count": len(tensors), "other": hashlib.sha256("\n".join(other).encode()).hexdigest(),
            "per_tensor": tensors}


def checkpoint_fingerprint(run_dir: Path) -> dict[str, Any]:
    """Digests of the newest checkpoint's files (any engine's: every .pt under it) and the backbone."""
    import torch
    from safetensors.torch import load_file

    newest = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    state = {str(path.relative_to(newest)): torch.load(path, map_location="cpu", weights_only=True)
             for path in sorted(newest.rglob("*.pt"))}
    backbone = {str(path.relative_to(run_dir)): load_file(path) for path in sorted(run_dir.rglob("*.safetensors"))}
    return {"checkpoint": newest.name, "state": state_digests(state), "backbone": state_digests(backbone)}


def metrics_fingerprint(run_dir: Path) -> dict[str, Any]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    kept = [{k: v for k, v in record.items() if k not in VOLATILE and not k.startswith(VOLATILE_PREFIXES)}
            for record in records]
    return {"losses": [record["loss"] for record in kept if "loss" in record], "records": kept}


def run_recipe(recipe: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One short training run of `recipe`, fingerprinted."""
    log_dir = work / recipe.stem
    command = [sys.executable, "-m", "bigssl", "train", str(recipe),
               *overrides(args.steps, args.batch, args.samples_per_epoch, log_dir)]
    started = time.perf_counter()
    done = subprocess.run(command, env=child_env(args.tree, args.threads), capture_output=True, text=True,
                          cwd=work)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"{recipe.name}: exit {done.returncode}: " + " | ".join(tail))
    return {**metrics_fingerprint(log_dir), **checkpoint_fingerprint(log_dir), "seconds": round(seconds, 1)}


def git_commit(tree: Path) -> str:
    done = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return (done.stdout.strip() or "unknown") + ("+dirty" if dirty else "")


def run(args: argparse.Namespace) -> int:
    import torch

    args.tree = args.tree.resolve()
    check_tree(args.tree, child_env(args.tree, args.threads))
    recipes = sorted((args.tree / "recipes" / "quickstart").glob("*.yaml"))
    if args.only:
        recipes = [r for r in recipes if r.stem in args.only.split(",")]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="compare-runs-") as work, \
            concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {r.stem: pool.submit(run_recipe, r, args, Path(work)) for r in recipes}
        results = {}
        for name, future in futures.items():
            results[name] = future.result()
            print(f"{name}: {results[name]['seconds']} s, loss {results[name]['losses'][-1]:.6f}", flush=True)
    settings = {"steps": args.steps, "batch": args.batch, "samples_per_epoch": args.samples_per_epoch,
                "threads": args.threads, "torch": torch.__version__}
    out = {"settings": settings, "commit": args.label or git_commit(args.tree), "jobs": args.jobs,
           "seconds": round(time.perf_counter() - started, 1), "recipes": results}
    args.out.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"{len(results)} recipes in {out['seconds']} s → {args.out}")
    return 0


def differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Every way two recipe fingerprints differ, one line each (empty: bit-identical)."""
    found = []
    if before["losses"] != after["losses"]:
        first = next((i for i, (a, b) in enumerate(zip(before["losses"], after["losses"], strict=False)) if a != b),
                     min(len(before["losses"]), len(after["losses"])))
        found.append(f"losses differ from step {first + 1}")
    elif before["records"] != after["records"]:
        keys = sorted({k for a, b in zip(before["records"], after["records"], strict=False)
                       for k in set(a) | set(b) if a.get(k) != b.get(k)})
        found.append(f"logged values differ: {', '.join(keys) or 'number of records'}")
    for part in ("state", "backbone"):
        one, two = before[part], after[part]
        changed = sorted(k for k in set(one["per_tensor"]) | set(two["per_tensor"])
                         if one["per_tensor"].get(k) != two["per_tensor"].get(k))
        if changed:
            more = ", …" if len(changed) > 4 else ""
            found.append(f"{part}: {len(changed)} tensors differ ({', '.join(changed[:4])}{more})")
        if one["other"] != two["other"]:
            found.append(f"{part}: non-tensor values differ")
    if before["checkpoint"] != after["checkpoint"]:
        found.append(f"final checkpoint {before['checkpoint']} vs {after['checkpoint']}")
    return found


def compare(args: argparse.Namespace) -> int:
    before, after = (json.loads(Path(p).read_text()) for p in (args.before, args.after))
    if before["settings"] != after["settings"]:
        sys.exit(f"compare_runs: made under different settings: {before['settings']} vs {after['settings']}")
    failed = False
    for name in sorted(set(before["recipes"]) | set(after["recipes"])):
        if name not in before["recipes"] or name not in after["recipes"]:
            print(f"{name}: only in {'the second' if name not in before['recipes'] else 'the first'}")
            failed = True
            continue
        found = differences(before["recipes"][name], after["recipes"][name])
        print(f"{name}: {'; '.join(found) if found else 'bit-identical'}")
        failed |= bool(found)
    print(f"{before['commit']} vs {after['commit']}: {'DIFFERENT' if failed else 'bit-identical'}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("run", help="fingerprint short runs of every quickstart recipe")
    make.add_argument("--tree", type=Path, default=REPO, help="checkout whose bigssl and recipes run")
    make.add_argument("--out", type=Path, required=True)
    make.add_argument("--steps", type=int, default=20)
    make.add_argument("--batch", type=int, default=16)
    make.add_argument("--samples-per-epoch", type=int, default=160)
    make.add_argument("--threads", type=int, default=1, help="torch threads per run")
    make.add_argument("--jobs", type=int, default=2, help="runs side by side")
    make.add_argument("--only", default="", help="comma-separated recipe names (default: all)")
    make.add_argument("--label", default="", help="what ran, for the report (default: the tree's git commit)")
    check = commands.add_parser("compare", help="exit 0 when two fingerprints are bit-identical")
    check.add_argument("before")
    check.add_argument("after")
    args = parser.parse_args(argv)
    return run(args) if args.command == "run" else compare(args)


if __name__ == "__main__":
    sys.exit(main())
