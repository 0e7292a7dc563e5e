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

When the node that hosts the store (rank 0's) goes silent, with no connection reset, a store
call simply never returns (TCPStore's add and check wait in a recv with no timeout), and the
ranks of the other nodes would hang in it (measured on the netns SLURM cluster of
tests/test_slurm_multinode.py). So a second thread watches the heartbeat thread: a round of
store calls that has not finished after `timeout_s` ends the process, naming rank 0 and its
host. The heartbeats go over a connection of their own, so that a blocked one never holds up
the main thread's store traffic.
"""

from __future__ import annotations

import contextlib
import datetime
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
        # A clone is a new client connection (gets wait at most timeout_s on it), and the main
        # thread's store traffic (new groups, barriers) never waits behind a heartbeat.
        connection = store.clone()
        connection.set_timeout(datetime.timedelta(seconds=timeout_s))
        self.store = dist.PrefixStore(PREFIX, connection)
        self.rank, self.world_size = rank, world_size
        self._store_host = "rank 0"  # named with its host and pid once rank 0 has registered
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bigssl-watchdog", daemon=True)
        self._guard = threading.Thread(target=self._guard_loop, name="bigssl-watchdog-guard", daemon=True)
        self._round_done = time.monotonic()  # when the heartbeat thread last finished its store calls
        self._watched = range(world_size) if rank == 0 else [0]
        self._last_seen: dict[int, tuple[int, float]] = {}  # rank → (counter, when it last moved)

    def start(self) -> None:
        self.store.set(f"who/{self.rank}", f"{socket.gethostname()}, pid {os.getpid()}")
        self._beat()
        self._round_done = time.monotonic()
        self._thread.start()
        self._guard.start()

    def stop(self, finished: bool = True) -> None:
        """Stop beating; `finished`: this rank is leaving on purpose (never report it)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=2 * self.interval_s + 5)
        self._guard.join(timeout=2 * self.interval_s + 5)
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

    def _who(self, rank: int) -> str | None:
        """'host, pid N' as the rank registered it, or None."""
        try:
            return self.store.get(f"who/{rank}").decode() if self.store.check([f"who/{rank}"]) else None
        except Exception:  # noqa: BLE001
            return None

    def describe_all(self, ranks: list[int]) -> str:
        """Ranks grouped by host, so that a lost node reads as one: 'ranks 2, 3 (gpu02, pids 11,
        12)'; a rank alone keeps the 'rank 1 (host, pid 5)' form."""
        by_host: dict[str, list[tuple[int, str]]] = {}
        unknown = []
        for rank in ranks:
            host, _, pid = (self._who(rank) or "").partition(", pid ")
            if host:
                by_host.setdefault(host, []).append((rank, pid))
            else:
                unknown.append(f"rank {rank}")
        parts = []
        for host, members in by_host.items():
            if len(members) == 1:
                parts.append(f"rank {members[0][0]} ({host}, pid {members[0][1]})")
            else:
                parts.append(f"ranks {', '.join(str(r) for r, _ in members)} "
                             f"({host}, pids {', '.join(p for _, p in members)})")
        return ", ".join(parts + unknown)

    def _silent_ranks(self, now: float) -> list[int]:
        silent, stalled = [], []
        for rank in self._watched:
            if rank == self.rank:
                continue
            counter = self._counter(rank)
            previous = self._last_seen.get(rank)
            if previous is None or counter != previous[0]:
                self._last_seen[rank] = (counter, now)
            elif now - previous[1] > self.timeout_s and not self._finished(rank):
                silent.append(rank)
            elif now - previous[1] > 2 * self.interval_s and not self._finished(rank):
                stalled.append(rank)
        # The ranks of a lost node fall silent together but cross the limit up to an interval
        # apart: those already two beats late are named with the first, in the same notice.
        return sorted(silent + stalled) if silent else []

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._beat()
                if self._store_host == "rank 0" and (who := self._who(0)):
                    self._store_host = f"rank 0 ({who})"
                if self.rank != 0 and self.store.check(["lost"]):
                    notice = self.store.get("lost").decode()
                    self.store.add("lost_read", 1)  # rank 0 may leave now
                    self._abort(f"rank 0 reports {notice}")
                silent = self._silent_ranks(time.monotonic())
                self._round_done = time.monotonic()
            except Exception as err:  # noqa: BLE001 - the store lives in rank 0's process
                if self._stop.is_set():
                    return
                reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                self._abort(f"{self._store_host}, which hosts the rendezvous store, is unreachable (the process "
                            f"exited or hangs, or its node is down): {reason}")
                return
            if silent:
                notice = (f"{self.describe_all(silent)} sent no heartbeat for {self.timeout_s:g} s (the process "
                          "exited or hangs, or its node is down)")
                with contextlib.suppress(Exception):
                    self.store.set("lost", notice)  # tell the other survivors before leaving
                    self._await_readers(self.world_size - 1 - len(silent))
                self._abort(notice)

    def _await_readers(self, survivors: int) -> None:
        """Rank 0 holds the store: leaving at once would cut the survivors off before they read
        the notice (they would then only say that rank 0 is unreachable; seen on two nodes).
        Waits until they have, three heartbeats at most."""
        deadline = time.monotonic() + 3 * self.interval_s
        while self.store.add("lost_read", 0) < survivors and time.monotonic() < deadline:
            time.sleep(self.interval_s / 10)

    def _guard_loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            waited = time.monotonic() - self._round_done
            if waited > self.timeout_s + self.interval_s:
                self._abort(f"{self._store_host}, which hosts the rendezvous store, has not answered for "
                            f"{waited:.0f} s (the process hangs, or its node is down or cut off)")

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
        return (f"{self.describe_all(silent)} stopped sending heartbeats (the process exited or hangs, or its "
                "node is down)")


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
