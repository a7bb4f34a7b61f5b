"""Faults with real processes: two launchers of one grid, a job process killed by SIGKILL, the launcher
killed (SIGKILL, SIGTERM), and the run lock (core/runlock.py) that keeps one writer per run folder.

The launcher tests run `python -m benchmarks.run grid=smoke launcher=local ...` as subprocesses on one
prepared cache shared by the session (artifacts train once), with few steps and few eval samples."""
import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import run as cli
from core import runlock
from core.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
# 24 steps with a checkpoint every 4: long enough to kill mid-run, short enough for CI. One thread per job
# on every launch, so the killed-and-resumed run repeats the uninterrupted one's computation exactly.
SHORT = ["train.steps=24", "train.ckpt_every=4", "train.log_every=2", "train.threads=1", "eval.num_samples=20",
         "eval.batch_size=20"]


def _argv(results, cache, *extra):
    return [sys.executable, "-m", "benchmarks.run", "grid=smoke", "launcher=local", "parallel=1",
            f"results={results}", f"cache_dir={cache}", *SHORT, *extra]


def _start(results, cache, *extra, sigint_ignored=False):
    """sigint_ignored: start the launcher as a script's background job (`... &`) is started, with SIGINT
    ignored, which its children inherit."""
    env = {**os.environ, "SEMPRIOR_LOCK_HEARTBEAT_S": "0.5"}
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
    return subprocess.Popen(_argv(results, cache, *extra), cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=ignore)


def _finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _run_dir(results) -> Path:
    (d,) = [p for p in (Path(results) / "smoke").iterdir() if (p / "config.yaml").exists()]
    return d


def _wait_for(cond, timeout=240.0, every=0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (v := cond()):
            return v
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {cond}")


def _steps(rows):
    return [r["step"] for r in rows]


@pytest.fixture(scope="module")
def warm(tmp_path_factory, smoke_cache):
    """Prepare the shared cache and FD reference once, in this process, so that two launchers started at
    once find them built (their prepare stages would otherwise wait on each other's file locks)."""
    from benchmarks.config.grid import expand

    out = tmp_path_factory.mktemp("warm")
    (out / "smoke").mkdir()
    cli.prepare_stage(expand("smoke", [f"cache_dir={smoke_cache}", *SHORT]), out)
    return smoke_cache


@pytest.fixture(scope="module")
def two_launchers(tmp_path_factory, warm):
    """Two launchers of one grid whose jobs overlap: the first job is paused (SIGSTOP) from the moment it
    holds the run until the second launcher has ended, so the overlap does not depend on this machine's
    speed (unpaused, a fast machine finishes the first run before the second launcher's job starts, and
    the second then finds it done). It is paused only outside the lock's guard (held for milliseconds by
    each heartbeat), so the second launcher's check never waits on a stopped process."""
    from filelock import FileLock, Timeout

    results = tmp_path_factory.mktemp("twice")
    a = _start(results, warm)
    lock = _wait_for(lambda: runlock.read(d) if (d := _first_run(results)) else None)
    job, guard = int(lock["pid"]), FileLock(str(_first_run(results) / f"{runlock.LOCK_NAME}.guard"))
    while True:
        os.kill(job, signal.SIGSTOP)
        try:
            guard.acquire(timeout=0)
            guard.release()
            break
        except Timeout:                        # stopped inside a heartbeat: let it finish and try again
            os.kill(job, signal.SIGCONT)
            time.sleep(0.05)
    try:
        second = _finish(_start(results, warm))
    finally:
        os.kill(job, signal.SIGCONT)
    return results, [_finish(a), second]


@pytest.mark.slow
def test_two_launchers_train_each_run_once(two_launchers):
    results, outs = two_launchers
    codes = sorted(rc for rc, _ in outs)
    held = [out for rc, out in outs if rc != 0]
    assert codes == [0, 1], [o[-2000:] for _, o in outs]
    assert "held by another process" in held[0]
    rd = RunDir(_run_dir(results))
    assert rd.is_done()
    assert _steps(rd.rows("metrics.jsonl")) == list(range(2, 25, 2))        # one writer: no doubled rows
    assert _steps(rd.rows("eval.jsonl")) == [0, 24]
    curves = (results / "smoke" / "curves.csv").read_text().strip().splitlines()
    assert len(curves) == 1 + 2                                                 # header + one row per eval
    assert not (rd.path / runlock.LOCK_NAME).exists()                         # released at the end


@pytest.mark.slow
def test_killed_job_is_failed_then_resumes_exactly(tmp_path, two_launchers, warm):
    reference = RunDir(_run_dir(two_launchers[0]))
    proc = _start(tmp_path, warm)
    lock = _wait_for(lambda: runlock.read(d) if (d := _first_run(tmp_path)) and RunDir(d).checkpoints() else None)
    os.kill(int(lock["pid"]), signal.SIGKILL)
    rc, out = _finish(proc)
    rd = RunDir(_run_dir(tmp_path))
    assert rc == 1 and not rd.is_done(), out[-3000:]
    failed = json.loads(rd.failed_file.read_text())
    assert failed["reason"] == "job process killed by SIGKILL" and failed["exit_code"] == -9
    assert failed["log_tail"] and all(p.endswith((".err", ".out")) for p in failed["log"])
    assert "killed by SIGKILL" in out and "NOT DONE" in out
    # The rerun resumes it; in this process (inline, one thread, as the jobs) to spare two process starts.
    assert cli.main(["grid=smoke", "launcher=inline", f"results={tmp_path}", f"cache_dir={warm}", *SHORT]) == 0
    assert rd.is_done() and not rd.failed_file.exists()
    assert [_no_time(r) for r in rd.rows("eval.jsonl")] == [_no_time(r) for r in reference.rows("eval.jsonl")]
    assert _steps(rd.rows("metrics.jsonl")) == list(range(2, 25, 2))
    losses = [r["loss"] for r in rd.rows("metrics.jsonl")]
    assert losses == [r["loss"] for r in reference.rows("metrics.jsonl")]


def _no_time(row: dict) -> dict:
    """An eval row without its wall-clock seconds (the only field that is not a result)."""
    return {k: v for k, v in row.items() if k != "sec"}


def _first_run(results) -> Path | None:
    root = Path(results) / "smoke"
    found = [p for p in root.iterdir() if (p / "config.yaml").exists()] if root.exists() else []
    return found[0] if found else None


def _tree_state(d: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in d.rglob("*") if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("sig, sigint_ignored", [(signal.SIGKILL, False), (signal.SIGTERM, False),
                                                 (signal.SIGKILL, True), (signal.SIGTERM, True)],
                         ids=["SIGKILL", "SIGTERM", "SIGKILL-background", "SIGTERM-background"])
def test_launcher_killed_ends_its_jobs(tmp_path, warm, sig, sigint_ignored):
    proc = _start(tmp_path, warm, "train.steps=400", "train.ckpt_every=50", sigint_ignored=sigint_ignored)
    lock = _wait_for(lambda: runlock.read(d) if (d := _first_run(tmp_path)) else None)
    job_pid, controller_pid = int(lock["pid"]), int(lock["job"])
    assert runlock.pid_alive(job_pid) and runlock.pid_alive(controller_pid)
    proc.send_signal(sig)
    rc, out = _finish(proc, timeout=60)
    assert rc == (-9 if sig == signal.SIGKILL else 130), out[-2000:]
    _wait_for(lambda: not runlock.pid_alive(job_pid) and not runlock.pid_alive(controller_pid), timeout=8)
    run = _first_run(tmp_path)
    before = _tree_state(run)
    time.sleep(1.5)
    assert _tree_state(run) == before                       # nobody writes into the folder any more
    assert not RunDir(run).is_done() and runlock.holder(run) is None


# ---------------------------------------------------------------- the parallel= setting


@pytest.mark.parametrize("value", ["0", "-1", "abc", "1.5", ""])
def test_parallel_must_be_a_positive_integer(tmp_path, capsys, value):
    assert cli.main(["grid=smoke", f"results={tmp_path / 'r'}", f"parallel={value}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: parallel must be a positive integer") and "\n" not in err
    assert not (tmp_path / "r").exists()                    # refused before anything is written


def test_local_jobs_see_the_machines_gpus(tmp_path, monkeypatch):
    """submitit's local jobs see `gpus_per_node` GPUs, 0 unless set: the launcher must pass the machine's
    count, or a GPU machine's jobs train on the CPU under train.device=auto without a word."""
    from benchmarks.execution import launch
    from benchmarks.execution import localjob

    seen = {}
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    monkeypatch.setattr(localjob.LocalExecutor, "update_parameters", lambda self, **kw: seen.update(kw))
    launch.launch_local([], folder=tmp_path, parallel=1)
    assert seen["gpus_per_node"] == 2 and seen["timeout_min"] >= 24 * 60


# ---------------------------------------------------------------- core/runlock.py


def _write_lock(d: Path, **info) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / runlock.LOCK_NAME).write_text(json.dumps(info))


def test_lock_is_taken_and_released(tmp_path):
    with runlock.RunLock(tmp_path) as lock:
        info = runlock.read(tmp_path)
        assert info["pid"] == os.getpid() and info["token"] == lock.token
        assert runlock.holder(tmp_path) == info
    assert runlock.read(tmp_path) is None


def test_live_lock_is_refused_naming_its_holder(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        _write_lock(tmp_path, pid=sleeper.pid, host=socket.gethostname(),
                    pid_start=runlock.process_start(sleeper.pid), heartbeat=0.0, token="other")
        with pytest.raises(runlock.RunHeld, match=f"held by another process \\({sleeper.pid}@"):
            runlock.RunLock(tmp_path).acquire()
        assert json.loads((tmp_path / runlock.LOCK_NAME).read_text())["token"] == "other"   # left alone
    finally:
        sleeper.kill()
        sleeper.wait()


def test_lock_of_a_dead_pid_on_this_host_is_stale(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _write_lock(tmp_path, pid=gone.pid, host=socket.gethostname(), heartbeat=time.time(), token="dead")
    with runlock.RunLock(tmp_path) as lock:
        assert runlock.read(tmp_path)["token"] == lock.token


def test_reused_pid_is_not_the_holder(tmp_path):
    """Our own pid with another start time: the pid was reused after the holder died."""
    _write_lock(tmp_path, pid=os.getpid(), host=socket.gethostname(),
                pid_start=runlock.process_start(os.getpid()) - 1, heartbeat=time.time(), token="old")
    assert runlock.holder(tmp_path) is None


def test_other_host_is_stale_only_after_its_heartbeat_stops(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMPRIOR_LOCK_STALE_S", "30")
    _write_lock(tmp_path, pid=1, host="node-that-died", heartbeat=time.time() - 5, token="fresh")
    with pytest.raises(runlock.RunHeld, match="1@node-that-died"):
        runlock.RunLock(tmp_path).acquire()
    _write_lock(tmp_path, pid=1, host="node-that-died", heartbeat=time.time() - 31, token="quiet")
    with runlock.RunLock(tmp_path) as lock:
        assert runlock.read(tmp_path)["token"] == lock.token


def test_heartbeat_keeps_a_long_job_fresh(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMPRIOR_LOCK_HEARTBEAT_S", "0.1")
    with runlock.RunLock(tmp_path):
        first = runlock.read(tmp_path)["heartbeat"]
        _wait_for(lambda: runlock.read(tmp_path)["heartbeat"] > first, timeout=5)


def test_waiting_contender_gets_the_lock_when_it_is_released(tmp_path):
    holder = runlock.RunLock(tmp_path).acquire()
    waiter = runlock.RunLock(tmp_path, wait_s=10)
    t0 = time.time()
    import threading

    threading.Timer(0.5, holder.release).start()
    waiter.acquire()
    assert 0.4 < time.time() - t0 < 9 and runlock.read(tmp_path)["token"] == waiter.token
    waiter.release()


def test_unreadable_lock_file_is_stale(tmp_path):
    (tmp_path / runlock.LOCK_NAME).write_text("{not json")
    with runlock.RunLock(tmp_path) as lock:
        assert runlock.read(tmp_path)["token"] == lock.token


def _contend(run_dir: str, go, out) -> None:
    go.wait()
    try:
        lock = runlock.RunLock(run_dir).acquire()
    except runlock.RunHeld:
        out.put("held")
        return
    out.put("took")
    time.sleep(1.0)                 # hold while the others try
    lock.release()


def test_two_contenders_for_a_stale_lock_one_wins(tmp_path):
    """Several processes find the same stale lock at the same moment: exactly one takes it over."""
    ctx = mp.get_context("fork")
    for round_ in range(3):
        d = tmp_path / f"r{round_}"
        _write_lock(d, pid=1, host="gone-host", heartbeat=0.0, token="stale")
        go, out = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_contend, args=(str(d), go, out)) for _ in range(4)]
        for p in procs:
            p.start()
        go.set()
        for p in procs:
            p.join(timeout=30)
        assert sorted(out.get(timeout=5) for _ in procs) == ["held", "held", "held", "took"]
