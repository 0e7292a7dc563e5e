"""A multi-node SLURM on this machine (tests/slurm/multinode.sh): every node a network namespace
with its own address, hostname and slurmd; the head namespace runs slurmctld. The test process
stays in the machine's own namespace and reaches the cluster only through `client()`."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SCRIPT = Path(__file__).parent / "slurm" / "multinode.sh"
# slurm.conf order; SLURM lists (and places tasks on) nodes sorted, so a 3-node job's list is
# 'cpu01,gpu[01-02]' with task 0 on cpu01: a node list of two prefixes, its first host not the
# first node of slurm.conf.
NODES = ("gpu01", "gpu02", "cpu01")
PARTITIONS = "PartitionName=gpu Nodes=gpu[01-02] MaxTime=INFINITE State=UP"
# Each node offers 12 CPUs to SLURM on this 2-core machine, so that the test module's small jobs
# all run at once (five on gpu01), sharing the cores where one alone would leave them idle.
CPUS = 12


def missing_requirements() -> str | None:
    """Why the cluster cannot start here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, slurmd)"
    if not Path("/usr/sbin/slurmctld").exists() or not Path("/usr/sbin/munged").exists():
        return "needs slurm-wlm and munge (apt-get; .ci/run installs them)"
    for tool in ("ip", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"needs {tool} (iproute2, util-linux)"
    probe = f"bigssl-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"network namespaces are unavailable here: ip netns add: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _bash(script: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f'source "{SCRIPT}" && {script}'], env=env, capture_output=True, text=True,
                          timeout=timeout)


@dataclass
class Cluster:
    directory: Path
    cluster_id: str
    nodes: tuple[str, ...]
    pids: list[str] = field(default_factory=list)

    @property
    def head(self) -> str:
        return f"bsl{self.cluster_id}h"

    @property
    def conf(self) -> str:
        return str(self.directory / "slurm.conf")

    def namespace(self, node: str) -> str:
        return f"bsl{self.cluster_id}n{self.nodes.index(node) + 1}"

    def _shell_env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_DIR": str(self.directory), "SLURM_CONF": self.conf, "MN_ID": self.cluster_id,
                "MN_HEAD": self.head, "MN_NODES": " ".join(self.nodes), "MN_PIDS": " ".join(self.pids)}

    def client(self, *command: str, env: dict[str, str] | None = None, cwd: Path | None = None,
               timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess:
        """A SLURM client (sbatch, scontrol, squeue...) run on the head node."""
        env = {**(env or os.environ), "SLURM_CONF": self.conf}
        return subprocess.run(["nsenter", f"--net=/run/netns/{self.head}", *command], env=env, cwd=cwd,
                              capture_output=True, text=True, timeout=timeout, check=check)

    def lose(self, node: str) -> None:
        """The node drops off the network, then every process on it dies (a power loss): no
        connection is closed, the other nodes only hear silence."""
        index = self.nodes.index(node) + 1
        subprocess.run(["ip", "-n", self.head, "link", "set", f"bsl{self.cluster_id}n{index}y", "down"], check=True)
        pids = subprocess.run(["ip", "netns", "pids", self.namespace(node)], capture_output=True, text=True).stdout
        for pid in pids.split():  # all started by this cluster: its slurmd, slurmstepd and the ranks
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)

    def restore(self, node: str, timeout: float = 60) -> None:
        """The node back on the network with a fresh slurmd; waits until SLURM sees it idle."""
        index = self.nodes.index(node) + 1
        subprocess.run(["ip", "-n", self.head, "link", "set", f"bsl{self.cluster_id}n{index}y", "up"], check=True)
        started = _bash(f'MN_PIDS="" && mn_slurmd {index} && echo "$MN_PIDS"', self._shell_env())
        assert started.returncode == 0, started.stderr
        self.pids.append(started.stdout.split()[-1])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.client("sinfo", "-h", "-n", node, "-o", "%t").stdout.strip()
            if state == "idle":
                return
            if state.startswith("down") or state.startswith("drain"):  # marked down while it was lost
                self.client("scontrol", "update", f"nodename={node}", "state=resume")
            time.sleep(0.3)
        raise AssertionError(f"{node} not idle {timeout} s after its restore: {state!r}")

    def down(self) -> None:
        _bash("mn_down", self._shell_env())
        shutil.rmtree(self.directory, ignore_errors=True)


def start() -> Cluster:
    # munged wants every directory above its socket world-executable: pytest's are not.
    directory = Path(tempfile.mkdtemp(prefix="bigssl-mn-", dir="/tmp"))
    # A lost node is declared down after 10 s, and a cancelled job whose srun waits for it is
    # killed 5 s after its SIGTERM (SLURM's defaults: 300 s and 30 s).
    env = {**os.environ, "SLURM_DIR": str(directory), "MN_CPUS": str(CPUS), "MN_CONF": PARTITIONS,
           "MN_SLURMD_TIMEOUT": "10", "MN_KILL_WAIT": "5"}
    started = _bash(f'mn_up {" ".join(NODES)} && echo "$MN_ID|$MN_PIDS"', env)
    if started.returncode != 0:
        shutil.rmtree(directory, ignore_errors=True)
        raise AssertionError(f"the multi-node SLURM did not start: {started.stderr[-3000:]}")
    cluster_id, pids = started.stdout.strip().splitlines()[-1].split("|")
    return Cluster(directory, cluster_id, NODES, pids.split())
