"""Noticing that a rank is gone, and saying which one.

A rank that dies (kill -9, a lost node, an OOM kill) leaves the others waiting in their next
collective: gloo fails it at once with "connection closed by peer", which names no rank, and
NCCL waits for the process group timeout (30 minutes by default). Each rank therefore runs a
heartbeat thread on the rendezvous store: it bumps its own counter every `interval_s`. Rank 0
watches every counter; the others watch rank 0's and a "lost" notice rank 0 posts. When a
counter stands still for `timeout_s`, the watcher prints which rank (host, pid) went silent and
ends its process with EXIT_CODE, so a job stops within a bounded time instead of hanging. A rank
whose collective has just failed asks `diagnose()` instead, which names the silent ranks after
two intervals. Ranks that finish normally say so first, and are never reported.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time

import torch.distributed as dist

from bigssl.distributed.launch import record_failure
from bigssl.errors import EXIT_RANK_LOST

EXIT_CODE = EXIT_RANK_LOST  # the same as a RankLost raised in the main thread (bigssl/cli.py)
PREFIX = "bigssl/watchdog/"


class Watchdog:
    def __init__(self, store: dist.Store, rank: int, world_size: int, interval_s: float, timeout_s: float) -> None:
        self.store = dist.PrefixStore(PREFIX, store)
        self.rank, self.world_size = rank, world_size
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bigssl-watchdog", daemon=True)
        self._watched = range(world_size) if rank == 0 else [0]
        self._last_seen: dict[int, tuple[int, float]] = {}  # rank → (counter, when it last moved)

    def start(self) -> None:
        self.store.set(f"who/{self.rank}", f"{socket.gethostname()}, pid {os.getpid()}")
        self._beat()
        self._thread.start()

    def stop(self, finished: bool = True) -> None:
        """Stop beating; `finished`: this rank is leaving on purpose (never report it)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=2 * self.interval_s + 5)
        if finished:
            with contextlib.suppress(Exception):  # rank 0 (the store) may have left already
                self.store.set(f"done/{self.rank}", "1")

    # ----------------------------------------------------------------------------- internals
    def _beat(self) -> None:
        self.store.add(f"beat/{self.rank}", 1)

    def _counter(self, rank: int) -> int:
        return self.store.add(f"beat/{rank}", 0)

    def _finished(self, rank: int) -> bool:
        return self.store.check([f"done/{rank}"])

    def describe(self, rank: int) -> str:
        try:
            return f"rank {rank} ({self.store.get(f'who/{rank}').decode()})"
        except Exception:  # noqa: BLE001
            return f"rank {rank}"

    def _silent_ranks(self, now: float) -> list[int]:
        silent = []
        for rank in self._watched:
            if rank == self.rank:
                continue
            counter = self._counter(rank)
            previous = self._last_seen.get(rank)
            if previous is None or counter != previous[0]:
                self._last_seen[rank] = (counter, now)
            elif now - previous[1] > self.timeout_s and not self._finished(rank):
                silent.append(rank)
        return silent

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._beat()
                if self.rank != 0 and self.store.check(["lost"]):
                    self._abort(f"rank 0 reports {self.store.get('lost').decode()}")
                silent = self._silent_ranks(time.monotonic())
            except Exception as err:  # noqa: BLE001 - the store lives in rank 0's process
                if self._stop.is_set():
                    return
                self._abort(f"rank 0 (which hosts the rendezvous store) is unreachable: {err}")
                return
            if silent:
                names = ", ".join(self.describe(rank) for rank in silent)
                notice = f"{names} sent no heartbeat for {self.timeout_s:g} s (the process exited or hangs)"
                with contextlib.suppress(Exception):
                    self.store.set("lost", notice)  # tell the other survivors before leaving
                self._abort(notice)

    def _abort(self, reason: str) -> None:
        if self._stop.is_set():
            return
        line = f"bigssl: error: {reason}; rank {self.rank} stops (engine.dead_rank_timeout_s sets the limit)"
        print(line, file=sys.stderr, flush=True)
        record_failure(line)
        os._exit(EXIT_CODE)  # the main thread may be stuck in a collective that never returns

    def diagnose(self) -> str | None:
        """After a failed collective: which ranks went silent (two heartbeat intervals of
        counters), or None if every rank still beats (the failure was something else)."""
        try:
            ranks = [r for r in range(self.world_size) if r != self.rank]
            before = {r: self._counter(r) for r in ranks}
            time.sleep(2.5 * self.interval_s)
            silent = [r for r in ranks if self._counter(r) == before[r] and not self._finished(r)]
        except Exception as err:  # noqa: BLE001
            return f"rank 0 (which hosts the rendezvous store) is unreachable: {err}"
        if not silent:
            return None
        return ", ".join(self.describe(r) for r in silent) + " stopped sending heartbeats (the process exited or hangs)"


_current: Watchdog | None = None


def start(store: dist.Store, rank: int, world_size: int, interval_s: float, timeout_s: float) -> None:
    global _current
    stop()
    if timeout_s <= 0:
        return
    _current = Watchdog(store, rank, world_size, interval_s, timeout_s)
    _current.start()


def stop(finished: bool = True) -> None:
    global _current
    if _current is not None:
        _current.stop(finished)
        _current = None


def diagnose() -> str | None:
    return _current.diagnose() if _current is not None else None
