"""One writer per run folder: a lock that a training job holds for its whole life.

The lock file `<run>/.writer.lock` (JSON) names its holder: pid, host, the process's start time (to
tell a reused pid from the holder), when the job started, a heartbeat time that a daemon thread
refreshes every `heartbeat_s` seconds, and a random token that tells the holder its own lock apart.

A lock is stale (its holder is gone) when
- it was taken on this host and that pid is dead, a zombie, or now another process (start time differs);
- it was taken on another host and its heartbeat is older than `stale_s` (10 x the heartbeat by default;
  SEMPRIOR_LOCK_HEARTBEAT_S and SEMPRIOR_LOCK_STALE_S override both, the tests use that), so a SLURM
  requeue on another node takes the run over once the dead node's heartbeat has gone quiet. Hosts
  compare wall clocks there: a clock skew larger than `stale_s` would misjudge (cluster nodes run NTP).
A lock file that is not valid JSON cannot name a live holder and counts as stale.

Why a guard file: every read-check-write of the lock file (take, heartbeat, release) runs under
filelock.FileLock on the side file `<run>/.writer.lock.guard`, held for milliseconds. O_EXCL create alone
makes taking a *free* lock atomic, but taking over a *stale* one is delete + create, and two contenders
that both judged it stale can each delete the other's fresh file; an atomic rename has the same hole
(the last rename wins while both believe they hold it). The guard serialises the whole check-and-take.
The cache stage already relies on the same FileLock (core/cache.py), so this adds no assumption about
the file system. The lock file itself is written by temp file + rename, so a reader never sees half of it.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from filelock import FileLock

log = logging.getLogger(__name__)
LOCK_NAME = ".writer.lock"
GUARD_TIMEOUT_S = 60.0       # the guard is held for milliseconds; a minute means a hung file system


class RunHeld(RuntimeError):
    """The run folder is held by another live process."""

    def __init__(self, run_dir: Path, holder: dict) -> None:
        self.run_dir, self.holder = Path(run_dir), holder
        super().__init__(f"{Path(run_dir).name}: held by another process ({describe(holder)})")


def describe(info: dict) -> str:
    return f"{info.get('pid')}@{info.get('host')}"


def heartbeat_period() -> float:
    return float(os.environ.get("SEMPRIOR_LOCK_HEARTBEAT_S", "5"))


def stale_after() -> float:
    return float(os.environ.get("SEMPRIOR_LOCK_STALE_S", str(10 * heartbeat_period())))


def process_start(pid: int) -> int | None:
    """The start time of `pid` in clock ticks since boot (Linux /proc), None where unknown or gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()      # after "pid (comm) "; comm may hold spaces
    return int(fields[19])                              # field 22 of stat(5); fields[0] is field 3


def pid_alive(pid: int, start: int | None = None) -> bool:
    """True while `pid` runs (not a zombie) and, where `start` is known, is still the same process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                             # alive, another user's
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat[stat.rindex(")") + 2:].split()[0] in ("Z", "X"):
            return False
    except OSError:                                     # no /proc (macOS): os.kill's answer stands
        return True
    return start is None or process_start(pid) in (None, start)


def is_stale(info: dict | None, now: float | None = None) -> bool:
    if not info:
        return True
    if info.get("host") == socket.gethostname():
        return not pid_alive(int(info["pid"]), info.get("pid_start"))
    return (time.time() if now is None else now) - float(info.get("heartbeat", 0)) > stale_after()


def read(run_dir: Path) -> dict | None:
    """The lock file's content; None when absent; {} when unreadable (counts as stale)."""
    path = Path(run_dir) / LOCK_NAME
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        log.warning("%s is not a valid lock file; treating it as stale", path)
        return {}
    return info if isinstance(info, dict) else {}


def holder(run_dir: Path) -> dict | None:
    """The live holder of a run folder, or None when it is free or its lock is stale."""
    info = read(run_dir)
    return None if is_stale(info) else info


class RunLock:
    """`with RunLock(run_dir): ...` holds the run folder or raises RunHeld naming the holder.

    wait_s > 0 polls a held lock that long before giving up (a requeued SLURM job waits for the dead
    node's heartbeat to go stale instead of skipping its own run)."""

    def __init__(self, run_dir: str | Path, *, wait_s: float = 0.0, heartbeat_s: float | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.wait_s = wait_s
        self.heartbeat_s = heartbeat_period() if heartbeat_s is None else heartbeat_s
        self.token = uuid.uuid4().hex
        self.lost = threading.Event()              # set when another process took the lock from us
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _guard(self) -> FileLock:
        return FileLock(str(self.run_dir / f"{LOCK_NAME}.guard"), timeout=GUARD_TIMEOUT_S)

    def _write(self, started: float) -> None:
        now = time.time()
        info = {"pid": os.getpid(), "host": socket.gethostname(), "pid_start": process_start(os.getpid()),
                "started": started, "heartbeat": now, "token": self.token,
                "job": os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID")}
        tmp = self.path.with_name(f".{LOCK_NAME}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(info, sort_keys=True))
        os.replace(tmp, self.path)

    def _try_take(self) -> dict | None:
        """Take the lock if free or stale; return the live holder otherwise."""
        with self._guard():
            info = read(self.run_dir)
            if not is_stale(info):
                return info
            if info:
                log.warning("%s: taking over a stale lock of %s", self.run_dir.name, describe(info))
            self._write(time.time())
            return None

    def acquire(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.time() + self.wait_s
        while (info := self._try_take()) is not None:
            if time.time() >= deadline:
                raise RunHeld(self.run_dir, info)
            time.sleep(min(1.0, self.heartbeat_s))
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat_loop, name="runlock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self._beat():
                    return
            except Exception as e:  # noqa: BLE001 - a failed heartbeat must not kill the job; retry next period
                log.warning("%s: heartbeat failed (%s)", self.run_dir.name, e)

    def _beat(self) -> bool:
        with self._guard():
            info = read(self.run_dir)
            if not info or info.get("token") != self.token:
                self.lost.set()
                log.error("%s: lost the run lock to %s (this process was stalled for longer than %.0fs?)",
                          self.run_dir.name, describe(info or {}), stale_after())
                return False
            self._write(float(info.get("started", time.time())))
            return True

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        with self._guard():
            info = read(self.run_dir)
            if info is not None and info.get("token") == self.token:
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
