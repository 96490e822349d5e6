"""Supervision of what `loraforge up` and `loraforge demo` start, and single ownership of a home.

- `HomeLock`: one `up` (or `demo`) per `LORAFORGE_HOME`. An exclusive `flock` on
  `<home>/up.lock`, with the holder's pid written in it; the kernel drops it when the process
  ends however it ends (kill -9 included), so a stale lock never blocks a later start.
- `Child`: a child process in a session of its own, so that stopping it reaches what it started
  too (celery's beat, the worker's local Ray instance and its trainer actors). Stopping sends
  SIGTERM to the child alone, which stops what it started in its own order, waits a bounded
  grace, then SIGKILLs whatever is left in the session. (Not SIGTERM to the whole group: Ray's
  GCS and raylet share the worker's group and would end with its trainers at once, before the
  worker could ask them to hand their jobs back.)
- `Supervisor`: restarts a child that exits while the platform runs (backoff doubling from 1 s to
  30 s, reset once a child has stayed up for a minute), and restarts the embedded PostgreSQL when
  it stops answering; each restart is one log line that says why.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Protocol

import psutil

log = logging.getLogger("loraforge.supervise")

BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0


def stop_on_sigterm() -> None:
    """Make SIGTERM (what Kubernetes, systemd and Docker send) end the process as Ctrl-C does:
    a KeyboardInterrupt that runs every `finally` (uvicorn re-raises the signal it captured
    once it has shut down, which lands here)."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


@dataclass
class RestartBackoff:
    """How long to wait before restarting something that stopped: 1 s, doubling to 30 s, and
    back to 1 s once it had stayed up for a minute."""

    delay_s: float = BACKOFF_START_S

    def next_delay(self, ran_for_s: float) -> float:
        if ran_for_s > STABLE_AFTER_S:
            self.delay_s = BACKOFF_START_S
        delay = self.delay_s
        self.delay_s = min(delay * 2, BACKOFF_MAX_S)
        return delay


class HomeInUseError(Exception):
    """Another `loraforge up` or `demo` holds this home."""


class HomeLock:
    """Exclusive ownership of a home while `up` or `demo` runs (see the module docstring)."""

    def __init__(self, home: Path) -> None:
        self.path = Path(home) / "up.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise HomeInUseError(
                f"{self.path.parent} is in use by a running loraforge (pid {holder}); stop it "
                f"first (Ctrl-C there, or `kill -TERM {holder}`), or set LORAFORGE_HOME to "
                "another directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> HomeLock:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


@dataclass
class ChildSpec:
    """How to start one supervised child, and how long it may take to stop on SIGTERM."""

    name: str
    argv: Sequence[str]
    env: dict[str, str]
    stop_grace_s: float = 10.0


@dataclass
class Child:
    """One running child (restarted in place by the supervisor)."""

    spec: ChildSpec
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    backoff: RestartBackoff = field(default_factory=RestartBackoff)
    restart_at: float | None = None
    restarts: int = 0

    def start(self) -> None:
        # A session of its own: whatever the child starts can be found (and killed) by it.
        self.process = subprocess.Popen(
            list(self.spec.argv), env=self.spec.env, start_new_session=True
        )
        self.started_at = time.monotonic()
        self.restart_at = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def exited(self) -> int | None:
        """The exit code once the child has ended (None while it runs)."""
        return self.process.poll() if self.process is not None else None

    def terminate(self) -> None:
        """SIGTERM to the child alone: it stops its own children in its own order (the worker
        asks its trainers to hand their jobs back before it shuts its Ray instance down)."""
        if self.process is not None:
            self.process.terminate()  # skips a child already reaped, as `Popen` does

    def kill_session(self) -> None:
        """SIGKILL every process left in the child's session: its group, and the groups its
        descendants made for themselves (Ray gives each worker process a group of its own)."""
        if self.process is None:
            return
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
                if os.getsid(proc.pid) == self.process.pid:
                    proc.kill()


class Watched(Protocol):
    """A dependency the supervisor keeps alive (the embedded PostgreSQL)."""

    name: str

    def alive(self) -> bool: ...

    def restart(self) -> None: ...


@dataclass
class Supervisor:
    """Starts the children, restarts them when they exit, and stops them all together."""

    specs: Sequence[ChildSpec]
    watched: Sequence[Watched] = ()
    check_every_s: float = 1.0
    children: list[Child] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    on_restart: Callable[[str, str], None] | None = None

    def start(self) -> None:
        self.children = [Child(spec) for spec in self.specs]
        for child in self.children:
            child.start()
        self._thread = threading.Thread(target=self._loop, name="supervisor", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.check_every_s):
            for dependency in self.watched:
                self._check_dependency(dependency)
            for child in self.children:
                self._check_child(child)

    def _check_dependency(self, dependency: Watched) -> None:
        if self._stop.is_set() or dependency.alive():
            return
        self._say(dependency.name, f"{dependency.name} stopped answering; restarting it")
        try:
            dependency.restart()
        except Exception as exc:  # retried at the next check
            self._say(dependency.name, f"restarting {dependency.name} failed: {exc}")

    def _check_child(self, child: Child) -> None:
        now = time.monotonic()
        if child.restart_at is not None:
            if now >= child.restart_at and not self._stop.is_set():
                child.restarts += 1
                child.start()
            return
        code = child.exited()
        if code is None:
            return
        delay = child.backoff.next_delay(now - child.started_at)
        child.restart_at = now + delay
        self._say(
            child.spec.name,
            f"{child.spec.name} (pid {child.pid}) exited with code {code}; "
            f"restarting it in {delay:.0f} s",
        )

    def _say(self, name: str, message: str) -> None:
        log.warning("loraforge: %s", message)
        if self.on_restart is not None:
            self.on_restart(name, message)

    def stop(self) -> None:
        """SIGTERM every child at once, wait up to each one's grace, then SIGKILL whatever is
        left in its session."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.check_every_s + 5)
        for child in self.children:
            child.terminate()
        for child in self.children:
            if child.process is None:
                continue
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(timeout=child.spec.stop_grace_s)
            # What outlives the grace (a grandchild that ignored SIGTERM) is killed, all of it.
            child.kill_session()
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(timeout=5)
