import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenwise.rl.errors import CheckpointError
from tokenwise.trainer.checkpoint import CheckpointManager, rng_state, set_rng_state

ROOT = Path(__file__).resolve().parents[1]


def _write(value: str):
    def write(path: Path) -> None:
        (path / "payload.txt").write_text(value)
        torch.save({"x": torch.tensor([1.0])}, path / "t.pt")
    return write


def test_save_publishes_atomically_and_prunes(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=2)
    assert m.latest() is None
    for step in (1, 2, 3):
        m.save(step, _write(f"s{step}"))
    assert [p.name for p in m.complete()] == ["step_00000002", "step_00000003"]
    assert m.latest().name == "step_00000003"
    assert (m.latest() / "payload.txt").read_text() == "s3"
    assert not list(tmp_path.glob("*.tmp"))


def test_exception_while_writing_keeps_previous(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=3)
    m.save(1, _write("good"))

    def broken(path: Path) -> None:
        (path / "payload.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        m.save(2, broken)
    assert m.latest().name == "step_00000001"
    assert (m.latest() / "payload.txt").read_text() == "good"
    assert (tmp_path / "step_00000002.tmp").is_dir()
    CheckpointManager(tmp_path, keep_last=3)  # a restart clears the half-written folder
    assert not (tmp_path / "step_00000002.tmp").exists()


def test_sigkill_while_writing_keeps_previous(tmp_path):
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
from tokenwise.trainer.checkpoint import CheckpointManager
m = CheckpointManager(Path({str(tmp_path)!r}), keep_last=3)
m.save(1, lambda p: (p / "payload.txt").write_text("good"))
def dying(p):
    (p / "payload.txt").write_text("half")
    os.kill(os.getpid(), signal.SIGKILL)
m.save(2, dying)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL
    m = CheckpointManager(tmp_path, keep_last=3)
    assert m.latest().name == "step_00000001"
    assert (m.latest() / "payload.txt").read_text() == "good"
    assert [p.name for p in m.complete()] == ["step_00000001"]


def test_latest_pointing_at_missing_folder_is_a_clear_error(tmp_path):
    (tmp_path / "latest").write_text("step_00000009")
    with pytest.raises(CheckpointError, match="missing"):
        CheckpointManager(tmp_path, keep_last=1).latest()


def test_a_failure_message_names_the_newest_intact_checkpoint_when_latest_is_broken(tmp_path):
    """The failure paths report what is safe without raising a second error of their own."""
    from types import SimpleNamespace
    from tokenwise.trainer.stage import _kept
    m = CheckpointManager(tmp_path, keep_last=2)
    assert _kept(SimpleNamespace(ckpt=m)) == "no checkpoint of this stage was written yet"
    m.save(2, _write("good"))
    (tmp_path / "latest").write_text("step_00000009")
    assert _kept(SimpleNamespace(ckpt=m)) == f"the last good checkpoint {tmp_path / 'step_00000002'} is intact"


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    random.seed(1); np.random.seed(2); torch.manual_seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9); np.random.seed(9); torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
