"""Checkpoints are written atomically: a save that fails midway, runs out of disk or is killed
leaves the previous checkpoints loadable and no partial file."""

import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, run_cli

from vaelab import checkpoint_io
from vaelab.checkpoint_io import AtomicCheckpointIO

FULL_DISK = """
import resource, signal, sys, torch
from vaelab.checkpoint_io import AtomicCheckpointIO, CheckpointSaveError
AtomicCheckpointIO().save_checkpoint({"epoch": 1, "w": torch.ones(1000)}, sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))  # as if the disk were full at 20 kB
try:
    AtomicCheckpointIO().save_checkpoint({"epoch": 2, "w": torch.zeros(10_000)}, sys.argv[1])
except CheckpointSaveError as err:
    print(err)
"""


def test_a_write_that_fails_midway_keeps_the_old_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    child = subprocess.run([sys.executable, "-c", FULL_DISK, str(path)], capture_output=True, text=True, check=True)
    assert child.stdout.strip() == (f"could not write checkpoint {path} (File too large); "
                                    f"the last complete checkpoint is {path}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no partial file
    assert torch.load(path, weights_only=True)["epoch"] == 1


def test_an_interrupted_save_leaves_no_partial_file(tmp_path, monkeypatch):
    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_io.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"epoch": 0}, tmp_path / "checkpoints" / "best.ckpt")
    assert list((tmp_path / "checkpoints").iterdir()) == []


SAVE_FOREVER = """
import sys, torch
from vaelab.checkpoint_io import AtomicCheckpointIO
for step in range(1, 10**6):
    AtomicCheckpointIO().save_checkpoint({"step": step, "w": torch.full((4_000_000,), float(step))}, sys.argv[1])
    print(step, flush=True)
"""


def test_kill_9_during_a_save_leaves_a_loadable_last_ckpt(tmp_path):
    """A process saving 16 MB checkpoints over one another, killed at a random moment."""
    path = tmp_path / "last.ckpt"
    tmpdir = {"TMPDIR": "/dev/shm"} if Path("/dev/shm").is_dir() else {}  # Lightning's writer lost 1 in 5 so
    saver = subprocess.Popen([sys.executable, "-c", SAVE_FOREVER, str(path)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, **tmpdir})
    saver.stdout.readline()  # one save done; the next ones are under way
    time.sleep(random.uniform(0.05, 0.5))
    saver.send_signal(signal.SIGKILL)
    saver.wait()
    saver.stdout.close()
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["step"] > 0 and (checkpoint["w"] == checkpoint["step"]).all()
    assert {p.name for p in tmp_path.iterdir()} <= {"last.ckpt", ".checkpoint.partial"}


def full_disk_at(n_bytes: int):
    """For ``preexec_fn``: writes past ``n_bytes`` of any file fail (EFBIG), as on a full disk."""
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))
    return limit


@pytest.mark.slow
def test_a_full_disk_ends_the_run_with_one_line_and_keeps_the_last_checkpoint(fake_root, tmp_path):
    run = tmp_path / "run"
    args = [f"data.root={fake_root}", *TINY, "callbacks=model_checkpoint", "logger=none", f"hydra.run.dir={run}"]
    first = run_cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    assert sorted(before) == ["best-epoch000.ckpt", "last.ckpt"]
    assert len(before["last.ckpt"]) > 100_000  # so that the next one cannot be written whole

    # The system's temporary folder on another filesystem (/dev/shm): where Lightning staged its files.
    tmpdir = {"TMPDIR": "/dev/shm"} if Path("/dev/shm").is_dir() else {}
    result = run_cli(*args, "max_epochs=2", "ckpt_path=last", cwd=tmp_path, env=tmpdir,
                     preexec_fn=full_disk_at(100_000))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]  # after Lightning's lines on the devices it found
    last = run / "checkpoints" / "last.ckpt"
    assert error.startswith(f"error: could not write checkpoint {run / 'checkpoints'}/")
    assert error.endswith(f"(File too large); the last complete checkpoint is {last}")
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before
    assert torch.load(last, weights_only=False)["epoch"] == 0
