"""RunDir.save_checkpoint streams torch.save into its temp file: the same bytes and checksum as the in-memory
write it replaced, host memory that does not grow with the checkpoint, and a failed or killed write that
never touches the previous checkpoint or leaves a partial file under the final name."""
import hashlib
import io
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import pytest
import torch

from core import rundir
from core.rundir import RunDir, sha256_file

ROOT = Path(__file__).resolve().parents[1]


def _state(n: int = 64) -> dict:
    """A small training-like state: nested dicts, a view sharing its base's storage, ints and lists."""
    w = torch.arange(n, dtype=torch.float32)
    return {"model": {"w": w, "w_view": w[2:10], "b": torch.ones(3, dtype=torch.bfloat16)},
            "opt": {"state": {0: {"exp_avg": torch.zeros(n), "step": torch.tensor(7.0)}}, "param_groups": [{"lr": 1e-3}]},
            "step": 12, "rng": torch.get_rng_state()}


def _old_bytes(state: dict) -> bytes:
    """What save_checkpoint wrote before it streamed: torch.save into a BytesIO."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def test_same_bytes_and_checksum_as_the_in_memory_write(tmp_path):
    state = _state()
    path = RunDir(tmp_path).save_checkpoint(12, state)
    old = _old_bytes(state)
    assert path == tmp_path / "checkpoints" / "step_0000012.pt"
    assert path.read_bytes() == old
    assert path.with_suffix(".sha256").read_text() == hashlib.sha256(old).hexdigest() == sha256_file(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["step_0000012.pt", "step_0000012.sha256"]


def test_written_checkpoint_loads_and_verifies(tmp_path):
    rd = RunDir(tmp_path)
    state = _state()
    rd.save_checkpoint(12, state)
    assert [s for s, _ in rd.valid_checkpoints()] == [12]
    back = rd.load_latest()
    assert torch.equal(back["model"]["w"], state["model"]["w"]) and back["step"] == 12
    assert back["model"]["w_view"].untyped_storage().data_ptr() == back["model"]["w"].untyped_storage().data_ptr()


def test_checkpoint_written_the_old_way_still_loads(tmp_path):
    """A checkpoint from before this change (bytes + hex digest written separately) resumes as before."""
    rd = RunDir(tmp_path)
    old = _old_bytes(_state())
    rundir.atomic_write_bytes(rd.ckpt_dir / "step_0000004.pt", old)
    rundir.atomic_write_text(rd.ckpt_dir / "step_0000004.sha256", hashlib.sha256(old).hexdigest())
    rd.save_checkpoint(8, {"step": 8}, keep=3)
    assert [s for s, _ in rd.valid_checkpoints()] == [8, 4]
    (rd.ckpt_dir / "step_0000008.pt").unlink()
    assert rd.load_latest()["step"] == 12


def test_flipped_byte_is_refused(tmp_path):
    rd = RunDir(tmp_path)
    rd.save_checkpoint(10, {"w": torch.ones(1000)}, keep=3)
    path = rd.save_checkpoint(20, {"w": torch.full((1000,), 2.0)}, keep=3)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01                      # inside the tensor data: torch.load alone would not notice
    path.write_bytes(bytes(data))
    assert [s for s, _ in rd.valid_checkpoints()] == [10]
    assert torch.equal(rd.load_latest()["w"], torch.ones(1000))


def test_no_checkpoint_sized_bytes_in_memory(tmp_path):
    """About 50 MB of state (weights + two Adam moments): the write's Python allocations stay far below it
    (the BytesIO write it replaced peaked at 57 MB, the whole file; the streamed one at 0.04 MB)."""
    n = 4_200_000                                     # 3 × 4.2M float32 ≈ 50 MB
    state = {"model": {"w": torch.ones(n)}, "opt": {"exp_avg": torch.zeros(n), "exp_avg_sq": torch.full((n,), 2.0)}}
    size = sum(t.numel() * t.element_size() for t in (state["model"]["w"], *state["opt"].values()))
    tracemalloc.start()
    try:
        path = RunDir(tmp_path).save_checkpoint(1, state)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert path.stat().st_size > size
    assert peak < size / 20, f"peak {peak / 1e6:.1f} MB of Python allocations for a {size / 1e6:.0f} MB state"


class _FullDisk:
    """The temp file, until a first chunk has reached it: then every write fails as on a full disk."""

    def __init__(self, f, seen):
        self._f, self._seen, self.chunks = f, seen, 0

    def write(self, chunk):
        if self.chunks:
            self._seen.extend(sorted(p.name for p in Path(self._f.name).parent.iterdir()))
            raise OSError(28, "No space left on device")
        self.chunks += 1
        return self._f.write(chunk)

    def flush(self):
        self._f.flush()


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    rd = RunDir(tmp_path)
    prev = rd.save_checkpoint(10, {"w": torch.ones(1000)})
    before = {p.name: p.read_bytes() for p in rd.ckpt_dir.iterdir()}
    seen = []                                         # the folder when the write fails
    real_init = rundir._HashingWriter.__init__
    monkeypatch.setattr(rundir._HashingWriter, "__init__", lambda self, f: real_init(self, _FullDisk(f, seen)))
    with pytest.raises(OSError, match="No space left"):                # the disk's error, not torch's
        rd.save_checkpoint(20, {"w": torch.full((1000,), 2.0)})
    assert seen == sorted([*before, f".step_0000020.pt.tmp{rundir.os.getpid()}"])    # a partial temp file
    assert {p.name: p.read_bytes() for p in rd.ckpt_dir.iterdir()} == before     # and now it is removed
    assert rd.checkpoints() == [(10, prev)]
    assert torch.equal(rd.load_latest()["w"], torch.ones(1000))


_KILLED = textwrap.dedent("""
    import os, sys, torch
    from core import rundir
    real = rundir._HashingWriter.write
    def write(self, chunk):
        if getattr(self, "written", 0) > 400_000:
            os._exit(9)                       # killed after the tensor data: no handler, no cleanup
        self.written = getattr(self, "written", 0) + len(chunk)
        return real(self, chunk)
    rundir._HashingWriter.write = write
    rundir.RunDir(sys.argv[1]).save_checkpoint(20, {"w": torch.full((100_000,), 2.0)})
""")


def test_killed_write_leaves_only_a_temp_file_that_resume_removes(tmp_path):
    rd = RunDir(tmp_path)
    prev = rd.save_checkpoint(10, {"w": torch.ones(1000)})
    before = {p.name: p.read_bytes() for p in rd.ckpt_dir.iterdir()}
    proc = subprocess.run([sys.executable, "-c", _KILLED, str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    (tmp,) = [p for p in rd.ckpt_dir.iterdir() if p.name not in before]
    assert tmp.name.startswith(".step_0000020.pt.tmp") and tmp.stat().st_size > 400_000    # a partial file
    assert {n: (rd.ckpt_dir / n).read_bytes() for n in before} == before
    assert rd.checkpoints() == [(10, prev)]
    assert rd.remove_stale_tmp() == [tmp]
    assert torch.equal(rd.load_latest()["w"], torch.ones(1000))
