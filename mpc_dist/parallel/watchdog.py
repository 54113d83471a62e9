"""Failure handling: a failing rank makes every rank exit, never hang.

Every rank runs a watchdog thread with its own client of the rendezvous store. It publishes a
heartbeat and watches for (a) a failure record written by a rank that raised and (b) a peer
whose heartbeat stopped (killed). Either way it prints one line naming the failed rank and stage
and ends the process with a non-zero code, even if the main thread is blocked in a receive.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist

from .topology import Topology

FAILED_KEY = "mpc_dist/failed"
EXIT_PEER_FAILED = 3


def _is_communication_error(error: BaseException) -> bool:
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        marker in text for marker in ("gloo", "Connection", "NCCL", "connection", "peer")
    )


class Watchdog:
    """Heartbeats through the store; ends this process when a peer fails or goes silent."""

    def __init__(self, topology: Topology, timeout_s: float, interval_s: float = 0.5) -> None:
        self.topology, self.timeout_s, self.interval_s = topology, timeout_s, interval_s
        self.rank = topology.rank
        self._stop = threading.Event()
        self._store = self._client_store()
        self._thread = threading.Thread(target=self._run, name="mpc-dist-watchdog", daemon=True)

    @staticmethod
    def _client_store() -> dist.Store:
        # A separate client: the main thread may hold the default store's connection.
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=30))
        return dist.PrefixStore("mpc_dist_watchdog", store)

    def start(self) -> Watchdog:
        self._beat()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(Exception):  # the store may already be gone at shutdown
            self._store.set(f"done/{self.rank}", "1")

    def report_failure(self, error: BaseException) -> str:
        """Called by a rank that raised. The first failure recorded wins: a rank that fails
        because a peer died first reports the peer. Returns the failure every rank reports."""
        message = f"{self.topology.describe(self.rank)} failed: {type(error).__name__}: {error}"
        message = message.splitlines()[0][:500]
        with contextlib.suppress(Exception):
            # compare_set with an empty expected value only writes a key that does not exist
            return self._store.compare_set(FAILED_KEY, "", message).decode()
        return message

    def fail(self, error: BaseException) -> None:
        """This rank raised: record it; if a peer failed first, say so and exit instead.

        A communication error means a peer died: name that peer (the one whose heartbeat
        stopped), not this rank, so every rank reports the same root cause.
        """
        if _is_communication_error(error):
            deadline = time.time() + self.timeout_s
            while time.time() < deadline:
                with contextlib.suppress(Exception):
                    if self._store.check([FAILED_KEY]):
                        self.exit(f"stopping: {self._store.get(FAILED_KEY).decode()}")
                    silent = self._silent_peers(time.time(), stale_s=3 * self.interval_s + 1)
                    if silent:
                        names = ", ".join(self.topology.describe(r) for r in silent)
                        first = self._store.compare_set(
                            FAILED_KEY, "", f"{names} stopped responding (killed or crashed)"
                        ).decode()
                        self.exit(f"stopping: {first}")
                time.sleep(self.interval_s)
        first = self.report_failure(error)
        if not first.startswith(self.topology.describe(self.rank) + " "):
            self.exit(f"stopping: {first}")
        self.linger()

    def _beat(self) -> None:
        self._store.set(f"beat/{self.rank}", repr(time.time()))

    def _run(self) -> None:
        started = time.time()
        while not self._stop.wait(self.interval_s):
            try:
                self._beat()
                if self._store.check([FAILED_KEY]):
                    failure = self._store.get(FAILED_KEY).decode()
                    if not failure.startswith(self.topology.describe(self.rank)):
                        self.exit(f"stopping: {failure}")
                silent = self._silent_peers(started)
                if silent:
                    names = ", ".join(self.topology.describe(r) for r in silent)
                    self.exit(
                        f"stopping: {names} stopped responding for {self.timeout_s:.0f} s "
                        f"(killed or hung)"
                    )
            except Exception as error:  # the store lives in rank 0's launcher or process
                if self._stop.is_set():
                    return
                self.exit(
                    f"stopping: lost the rendezvous store ({type(error).__name__}); "
                    f"{self.topology.describe(0)} or its launcher has died"
                )

    def _silent_peers(self, started: float, stale_s: float | None = None) -> list[int]:
        now, stale_s = time.time(), stale_s or self.timeout_s
        silent = []
        for r in range(self.topology.world_size):
            if r == self.rank or self._store.check([f"done/{r}"]):
                continue
            if not self._store.check([f"beat/{r}"]):
                if now - started > self.timeout_s:
                    silent.append(r)
                continue
            if now - float(self._store.get(f"beat/{r}").decode()) > stale_s:
                silent.append(r)
        return silent

    def exit(self, message: str) -> None:
        print(f"mpc-dist: {self.topology.describe(self.rank)}: {message}", file=sys.stderr)
        sys.stderr.flush()
        self.linger()
        os._exit(EXIT_PEER_FAILED)

    def linger(self, timeout_s: float = 5.0) -> None:
        """Rank 0 may host the store: let every peer read the failure before it goes away."""
        with contextlib.suppress(Exception):
            self._store.set(f"seen/{self.rank}", "1")
        self.wait_until_all_done(timeout_s, ("seen", "done"))

    def wait_until_all_done(self, timeout_s: float = 10.0, marks=("done",)) -> None:
        """On rank 0 (which may host the store): wait until every peer has set one of marks."""
        if self.rank != 0:
            return
        with contextlib.suppress(Exception):
            deadline = time.time() + timeout_s
            peers = [r for r in range(self.topology.world_size) if r != self.rank]
            while time.time() < deadline and not all(
                any(self._store.check([f"{mark}/{r}"]) for mark in marks) for r in peers
            ):
                time.sleep(0.05)
