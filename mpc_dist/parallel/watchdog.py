"""Failure handling: a failing rank makes every rank exit, never hang, and says why.

Every rank runs a watchdog thread with its own client of the rendezvous store. It publishes a
heartbeat and this rank's state in one line (its flight record: what it runs or which message
it waits for), and watches for (a) a failure record written by a rank that raised, (b) a peer
whose heartbeat stopped (killed), (c) a message this rank has waited for longer than
``pipeline.timeout`` (a hang) and (d) the launcher's SIGTERM. Either way every rank writes its
flight record to ``failure/rank_<r>.json``, prints one line naming the first failure and the
state of every rank, and ends the process with a non-zero code, even if the main thread is
blocked in a receive.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from .flight import FlightRecord, write_json
from .topology import Topology

FAILED_KEY = "mpc_dist/failed"
EXIT_PEER_FAILED = 3
EXIT_TERMINATED = 128 + signal.SIGTERM
MAX_LISTED_RANKS = 16  # the one-line error lists this many ranks' states; the files hold all


def _is_communication_error(error: BaseException) -> bool:
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        marker in text for marker in ("gloo", "Connection", "NCCL", "connection", "peer")
    )


class Watchdog:
    """Heartbeats through the store; ends this process when a peer fails or goes silent, or this
    rank waits too long for a message; writes the flight record on the way out."""

    def __init__(
        self,
        topology: Topology,
        timeout_s: float,
        interval_s: float = 0.5,
        failure_dir: Path | None = None,
        namespace: str = "",
    ) -> None:
        """``failure_dir``: where the flight records go (``run_dir/failure``); ``namespace``:
        this job's own key prefix (``groups.job_token``), so that a restarted job never reads
        the previous attempt's failure or heartbeats from a store that outlived it."""
        self.topology, self.timeout_s, self.interval_s = topology, timeout_s, interval_s
        # how long a message may be waited for, and the config field that says so
        self.message_timeout: tuple[float, str] = (timeout_s, "pipeline.timeout")
        self.rank, self.failure_dir = topology.rank, failure_dir
        self.flight = FlightRecord(topology)
        self._stop = threading.Event()
        self._store = self._client_store(namespace)
        self._published: str | None = None
        self._wakeup: tuple[int, int] | None = None  # the signal wakeup pipe (read, write)
        self._thread = threading.Thread(target=self._run, name="mpc-dist-watchdog", daemon=True)

    @staticmethod
    def _client_store(namespace: str) -> dist.Store:
        # A separate client: the main thread may hold the default store's connection.
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=30))
        return dist.PrefixStore(f"mpc_dist_watchdog/{namespace}", store)

    def start(self) -> Watchdog:
        self._beat()
        self._publish_state()  # a rank that fails in its first interval still names its stage
        self._catch_sigterm()
        self._thread.start()
        return self

    def watch(self, flight: FlightRecord) -> None:
        """Watch the runtime's flight record from now on (it carries on the current phase)."""
        flight.note(self.flight.phase, self.flight.step)
        self.flight = flight

    def stop(self) -> None:
        self._stop.set()
        if self._wakeup is not None:
            with contextlib.suppress(OSError):
                os.write(self._wakeup[1], b"\0")
        self._thread.join(timeout=5)
        self._release_sigterm()
        with contextlib.suppress(Exception):  # the store may already be gone at shutdown
            self._store.set(f"done/{self.rank}", "1")

    # ------------------------------------------------------------------ SIGTERM

    def _catch_sigterm(self) -> None:
        """Launchers stop the other ranks with SIGTERM when one dies (torchrun, accelerate): let
        the watchdog write the flight record first. The main thread may be blocked in C (a
        receive) where no Python handler runs, so the signal reaches the watchdog thread
        through the wakeup pipe that Python's C-level handler writes to."""
        if threading.current_thread() is not threading.main_thread():
            return  # e.g. a Ray Train worker: its own machinery handles signals
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return
        read, write = os.pipe()
        os.set_blocking(write, False)
        try:
            previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        except ValueError:
            previous = None
        if previous != -1:  # someone else listens already (or cannot): leave theirs in place
            if previous is not None:
                signal.set_wakeup_fd(previous)
            os.close(read)
            os.close(write)
            return
        signal.signal(signal.SIGTERM, lambda signum, frame: None)  # the watchdog acts on it
        self._wakeup = (read, write)

    def _release_sigterm(self) -> None:
        if self._wakeup is None or threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        for fd in self._wakeup:
            os.close(fd)
        self._wakeup = None

    def _sleep(self) -> bool:
        """Wait one interval; True when SIGTERM arrived."""
        if self._wakeup is None:
            self._stop.wait(self.interval_s)
            return False
        ready, _, _ = select.select([self._wakeup[0]], [], [], self.interval_s)
        if not ready:
            return False
        with contextlib.suppress(BlockingIOError, OSError):
            return signal.SIGTERM in os.read(self._wakeup[0], 64)
        return False

    # ------------------------------------------------------------------ failures

    def report(self, cause: str, silent: list[int] = ()) -> str:
        """Record ``cause`` as the job's failure unless another was recorded first; returns
        the first, with every rank's state appended. The rank that records it also writes
        ``failure/summary.json``."""
        line = f"{cause}; {self._states_line(silent)}"
        with contextlib.suppress(Exception):
            # compare_set with an empty expected value only writes a key that does not exist
            first = self._store.compare_set(FAILED_KEY, "", line).decode()
            if first == line:
                self._write_summary(line)
            return first
        return line

    def report_failure(self, error: BaseException) -> str:
        """Called by a rank that raised. The first failure recorded wins: a rank that fails
        because a peer died first reports the peer. Returns the failure every rank reports."""
        cause = f"{self.topology.describe(self.rank)} failed: {type(error).__name__}: {error}"
        return self.report(cause.splitlines()[0][:500])

    def fail(self, error: BaseException) -> None:
        """This rank raised: record it; if a peer failed first, say so and exit instead.

        A communication error means a peer died: name that peer (the one whose heartbeat
        stopped), not this rank, so every rank reports the same root cause.
        """
        self.flight.error = "".join(traceback.format_exception(error))[-4000:]
        if _is_communication_error(error) and self.flight.waited() >= 0.9 * self.message_timeout[0]:
            # the message group's own timeout (pipeline.timeout too) beat this thread: a hang
            self.exit(f"stopping: {self.report(self._hang())}")
        if _is_communication_error(error):
            deadline = time.time() + self.timeout_s
            while time.time() < deadline:
                with contextlib.suppress(Exception):
                    if (failure := self._recorded_failure()) is not None:
                        self.exit(f"stopping: {failure}")
                    silent = self._silent_peers(time.time(), stale_s=3 * self.interval_s + 1)
                    if silent:
                        cause = self._silence(silent)
                        self.exit(f"stopping: {self.report(cause, silent)}")
                time.sleep(self.interval_s)
        first = self.report_failure(error)
        if not first.startswith(self.topology.describe(self.rank) + " "):
            self.exit(f"stopping: {first}")
        self._write_record(f"raised {type(error).__name__}, reported the failure", first)
        self._say(f"failed: {first}")
        self.linger()

    def _silence(self, silent: list[int], seconds: float | None = None) -> str:
        names = ", ".join(self.topology.describe(r) for r in silent)
        if seconds is None:
            return f"{names} stopped responding (killed or crashed)"
        return f"{names} stopped responding for {seconds:.0f} s (killed or hung)"

    def _beat(self) -> None:
        self._store.set(f"beat/{self.rank}", repr(time.time()))

    def _publish_state(self) -> None:
        state = self.flight.describe()
        if state != self._published:
            self._store.set(f"state/{self.rank}", state)
            self._published = state

    def _states_line(self, silent: list[int] = ()) -> str:
        """Every rank's last published state (this rank's, fresh), in one line; a silent
        rank's is what it said last."""
        states = []
        for r in range(self.topology.world_size)[:MAX_LISTED_RANKS]:
            if r == self.rank:
                state = self.flight.describe()
            else:
                try:
                    state = (
                        self._store.get(f"state/{r}").decode()
                        if self._store.check([f"state/{r}"])
                        else "no state published"
                    )
                except Exception:
                    state = "unknown (the store did not answer)"
            states.append(f"rank {r}: {'silent, last said: ' if r in silent else ''}{state}")
        more = self.topology.world_size - MAX_LISTED_RANKS
        tail = f" | ... {more} more ranks in the flight records" if more > 0 else ""
        return "every rank: " + " | ".join(states) + tail

    def _run(self) -> None:
        started = time.time()
        while True:
            terminated = self._sleep()
            if self._stop.is_set():
                return
            if terminated:
                self.exit(self._terminated(), code=EXIT_TERMINATED)
            try:
                self._beat()
                self._publish_state()
                failure = self._recorded_failure()
                if failure is not None and not failure.startswith(
                    self.topology.describe(self.rank)
                ):
                    self.exit(f"stopping: {failure}")
                silent = self._silent_peers(started)
                if silent:
                    cause = self._silence(silent, self.timeout_s)
                    self.exit(f"stopping: {self.report(cause, silent)}")
                if self.overdue():
                    self.exit(f"stopping: {self.report(self._hang())}")
            except Exception as error:  # the store lives in rank 0's launcher or process
                if self._stop.is_set():
                    return
                self.exit(
                    f"stopping: lost the rendezvous store ({type(error).__name__}); "
                    f"{self.topology.describe(0)} or its launcher has died"
                )

    def _recorded_failure(self) -> str | None:
        """The job's failure, as the first rank to report one recorded it; None if none has."""
        if not self._store.check([FAILED_KEY]):
            return None
        return self._store.get(FAILED_KEY).decode()

    def _terminated(self) -> str:
        """The launcher stopped this rank, usually because a peer exited after reporting a
        failure this thread has not read yet: name that failure when the store has it."""
        with contextlib.suppress(Exception):
            if (failure := self._recorded_failure()) is not None:
                return f"stopping: {failure}"
        return "stopped by the launcher (SIGTERM; another rank may have failed)"

    def set_message_timeout(self, seconds: float, field: str = "pipeline.timeout") -> None:
        """Wait up to ``seconds`` for a message from now on (as the message groups do: longer
        while blocks compile, ``field`` names the setting)."""
        self.message_timeout = (seconds, field)

    def overdue(self) -> bool:
        """Whether the main thread has waited for one message longer than it may."""
        return self.flight.waited() > self.message_timeout[0]

    def _hang(self) -> str:
        state, me = self.flight.describe(), self.topology.describe(self.rank)
        seconds, field = self.message_timeout
        return f"{me} timed out: {state} ({field}={seconds:g} s)"

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

    # ------------------------------------------------------------------ the way out

    def exit(self, message: str, code: int = EXIT_PEER_FAILED) -> None:
        failure, reason = None, message
        if message.startswith("stopping: "):
            failure = message.removeprefix("stopping: ")
            mine = failure.startswith(self.topology.describe(self.rank) + " ")
            reason = "reported the failure" if mine else "stopped: another rank failed"
        self._write_record(reason, failure)
        self._say(message)
        self.linger()
        os._exit(code)

    def _say(self, message: str) -> None:
        where = f" (flight records: {self.failure_dir})" if self.failure_dir else ""
        print(f"mpc-dist: {self.topology.describe(self.rank)}: {message}{where}", file=sys.stderr)
        sys.stderr.flush()

    def _write_record(self, reason: str, failure: str | None) -> None:
        if self.failure_dir is None:
            return
        with contextlib.suppress(Exception):  # a full disk must not hide the failure itself
            self.flight.write(self.failure_dir, reason, failure)

    def _write_summary(self, line: str) -> None:
        if self.failure_dir is None:
            return
        states = {}
        for r in range(self.topology.world_size):
            with contextlib.suppress(Exception):
                if self._store.check([f"state/{r}"]):
                    states[str(r)] = self._store.get(f"state/{r}").decode()
        states[str(self.rank)] = self.flight.describe()
        summary = {
            "time": time.time(),
            "failure": line,
            "reported_by": self.rank,
            "world_size": self.topology.world_size,
            "states": states,
        }
        with contextlib.suppress(Exception):
            write_json(self.failure_dir / "summary.json", summary)

    def linger(self, timeout_s: float = 5.0) -> None:
        """Let every live peer read the failure before this rank exits: rank 0 may host the
        store, and a launcher stops the other ranks as soon as one exits."""
        with contextlib.suppress(Exception):
            self._store.set(f"seen/{self.rank}", "1")
        self.wait_until_all_done(timeout_s, ("seen", "done"), skip_dead=True)

    def wait_until_all_done(
        self, timeout_s: float = 10.0, marks=("done",), skip_dead: bool = False
    ) -> None:
        """Wait until every peer has set one of marks (``skip_dead``: or has stopped beating,
        killed: it never will)."""
        with contextlib.suppress(Exception):
            deadline = time.time() + timeout_s
            waiting = [r for r in range(self.topology.world_size) if r != self.rank]
            while time.time() < deadline:
                waiting = [
                    r
                    for r in waiting
                    if not any(self._store.check([f"{mark}/{r}"]) for mark in marks)
                ]
                dead = self._silent_peers(time.time(), 3 * self.interval_s + 1) if skip_dead else []
                if all(r in dead for r in waiting):
                    return
                time.sleep(0.1)
