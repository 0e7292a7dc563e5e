"""What tests/slurm/python runs in every task of a multi-node test job: `launch.py -m bigssl train
RECIPE [key=value ...]`, the command line slurm/train.sbatch gives `$PYTHON`.

- any recipe: bigssl's own CLI, with the test method `test_mn_recorder` registered
  (tests/multinode_methods.py: it writes what each rank trained on, where, and with which weights);
- the recipe `tests:engines`: every rank checks where SLURM put it, then trains a few steps of
  each engine named on the command line on rank batches (tests/engine_cases.py) and saves its
  losses, for the test to compare with one process on the whole batch.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: engine_cases, multinode_methods

import multinode_methods  # noqa: E402, F401 - registers test_mn_recorder
import torch  # noqa: E402

from bigssl.distributed import comm  # noqa: E402
from bigssl.distributed import env as env_lib  # noqa: E402


# ------------------------------------------------------------------------------ engines check
def check_placement(dist_env: env_lib.DistEnv) -> None:
    """Each rank says where it is, and checks it against SLURM's layout (block distribution:
    ranks fill a node before the next) and against every other rank's report."""
    nodes = env_lib.hostnames(os.environ["SLURM_JOB_NODELIST"])
    per_node = int(os.environ["SLURM_NTASKS_PER_NODE"])
    host = socket.gethostname()
    print(f"bigssl-test: rank {dist_env.rank} of {dist_env.world_size}, local rank {dist_env.local_rank} of "
          f"{per_node}, on {host} (node {nodes.index(host)} of {len(nodes)}), rendezvous "
          f"{dist_env.master_addr}:{dist_env.master_port}", flush=True)
    assert dist_env.world_size == len(nodes) * per_node == comm.world_size()
    assert host == nodes[dist_env.rank // per_node] == nodes[int(os.environ["SLURM_NODEID"])]
    assert dist_env.local_rank == dist_env.rank % per_node
    assert dist_env.master_addr == nodes[0]
    everyone = comm.all_gather_object((dist_env.rank, dist_env.local_rank, host, dist_env.world_size))
    assert everyone == [(r, r % per_node, nodes[r // per_node], dist_env.world_size)
                        for r in range(dist_env.world_size)], everyone


def run_engines(arguments: list[str]) -> None:
    import engine_cases

    """`arguments`: out=DIR steps=N methods=A,B ENGINE...; losses go to DIR/METHOD/ENGINE/rankR.pt."""
    options = dict(a.split("=", 1) for a in arguments if "=" in a)
    out, steps, methods = Path(options["out"]), int(options["steps"]), options["methods"].split(",")
    engines = [a for a in arguments if "=" not in a]
    dist_env = env_lib.detect()
    env_lib.init(dist_env, "gloo", timeout_s=300, dead_rank_timeout_s=60)
    torch.set_num_threads(1)
    check_placement(dist_env)
    started = time.monotonic()
    for method in methods:
        for name in engines:
            config = engine_cases.make_config(method, *engine_cases.engine_keys(name), engine_cases.NO_BN)
            engine = engine_cases.setup(config, dist_env.rank, dist_env.world_size, env=dist_env)
            my_batch = functools.partial(engine_cases.rank_batch, dist_env.rank)
            result = engine_cases.train_steps(engine, range(steps), my_batch)
            (out / method / name).mkdir(parents=True, exist_ok=True)
            engine_cases.save_result(out / method / name, dist_env.rank, result)
            comm.barrier()
            if dist_env.is_main:
                print(f"bigssl-test: {method} under {name} done ({time.monotonic() - started:.1f} s)", flush=True)
    env_lib.shutdown()


def main(argv: list[str]) -> int:
    if argv[:3] != ["-m", "bigssl", "train"]:
        raise SystemExit(f"launch.py: expected `-m bigssl train RECIPE ...`, got {argv}")
    # bigssl's own warnings fail the job, as they fail the tests (pyproject.toml, tests/helpers.py).
    warnings.filterwarnings("error", module=r"bigssl(\.|$)")
    if argv[3] == "tests:engines":
        run_engines(argv[4:])
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # torch 2.14 + gloo can abort in its exit handlers (bigssl/cli.py)
    from bigssl.cli import main as bigssl_main

    return bigssl_main(argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
