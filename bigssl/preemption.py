"""Stopping a run cleanly when the scheduler says so, and asking SLURM to run it again.

Schedulers warn before they take the nodes: SLURM sends the signal of `--signal` (USR1 in
slurm/train.sbatch) ahead of the time limit, and SIGTERM when it preempts or cancels a job. On
either, every rank finishes the step it is in, the ranks agree on the step to stop after and a
checkpoint is written. After USR1, rank 0 also runs `scontrol requeue $SLURM_JOB_ID`, and the
rerun resumes from that checkpoint in the same log.dir. Not after SIGTERM: that is also what
`scancel JOB` sends, and a job that requeued itself then could never be cancelled (measured on
the test cluster: it came back as run 1); SLURM requeues the jobs it preempts itself
(PreemptMode=REQUEUE). The process exits with EXIT_CODE (EX_TEMPFAIL: "try again later"), so a
launcher or a shell can tell "stopped, resumable" from done or failed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path
from types import FrameType

from bigssl.errors import EXIT_STOPPED

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
REQUEUE_SIGNAL = "SIGUSR1"  # the time-limit warning: the only one after which the job requeues itself
EXIT_CODE = EXIT_STOPPED


class Stopped(Exception):  # noqa: N818 - not an error: the run stopped on request, resumable
    """Raised after the stop checkpoint is written; the CLI exits with EXIT_CODE."""

    exit_code = EXIT_CODE


def ignore_in_worker() -> None:
    """For DataLoader workers: SLURM signals every process of a job step, workers included, and
    a worker killed mid-batch fails the run before the stop checkpoint can be written. (An
    inherited Python handler is not enough: measured, a worker still dies of SIGTERM with one in
    place.) USR1 is ignored. SIGTERM is also how a DataLoader ends a stuck worker, so it is taken
    by a thread that reads the sender: from the parent process it ends the worker, from anyone
    else (the scheduler) it is ignored and the main process decides."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    # Blocked in this thread (the worker's only one so far, so every later thread inherits it)
    # and received synchronously by the watcher instead.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_end_when_parent_asks, name="bigssl-sigterm", daemon=True).start()


def _end_when_parent_asks() -> None:
    parent = os.getppid()
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent:
            os._exit(128 + signal.SIGTERM)


class StopRequest:
    """Remembers the first stop signal received; installed for the duration of a run."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = self.received or signal.Signals(signum).name


def slurm_job_id() -> str | None:
    return os.environ.get("SLURM_JOB_ID") or None


def stop_note(signals: list[str], step: int, checkpoint: Path | None, requeue: bool, is_main: bool) -> str:
    """What a stop after `step` says, its checkpoint named; rank 0 (`is_main`) first requeues
    the SLURM job when it is one, `requeue` (checkpoint.requeue) asks for it and USR1 was among
    the `signals`. Called before the ranks' last barrier: once a rank exits, srun
    --kill-on-bad-exit may end rank 0."""
    message = f"bigssl: {'/'.join(signals)} received: stopped after step {step}, checkpoint {checkpoint}"
    job = slurm_job_id()
    if is_main and job and requeue and REQUEUE_SIGNAL in signals:
        message += "; " + requeue_slurm_job(job)
    return message


def requeue_slurm_job(job_id: str) -> str:
    """`scontrol requeue JOB`; returns what happened, for the run's log (never raises: the
    checkpoint is written, and a failed requeue only means the job is not rerun by itself)."""
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"scontrol requeue {job_id} failed: {err}"
    if result.returncode != 0:
        return f"scontrol requeue {job_id} failed: {(result.stderr or result.stdout).strip()}"
    return f"requeued SLURM job {job_id}"
