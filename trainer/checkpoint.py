"""Atomic checkpoints: write `step_N.tmp/`, fsync, rename to `step_N/`, then repoint `latest`.

A crash at any moment (exception or SIGKILL) leaves `latest` naming the previous complete checkpoint; a half-written
`*.tmp` folder is removed on the next start. `keep_last` prunes the oldest complete checkpoints. Everything is read
back with `weights_only=True` / safetensors / JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from tokenwise.rl.errors import CheckpointError

LATEST = "latest"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def publish_dir(write: Callable[[Path], None], final: Path) -> Path:
    """Write a directory through `write(tmp)` and rename it to `final` only once it is complete and synced."""
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    _fsync_tree(tmp)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


CHECKSUMS = "checksums.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_checksums(root: Path) -> None:
    """checksums.json: size and SHA-256 of every file under root, written last (inside the .tmp folder)."""
    files = {str(p.relative_to(root)): [p.stat().st_size, _sha256(p)] for p in sorted(root.rglob("*"))
             if p.is_file() and p.name != CHECKSUMS}
    (root / CHECKSUMS).write_text(json.dumps(files, indent=0))


def verify_checksums(root: Path) -> str | None:
    """None if every file checksums.json lists is there with its size and hash (or the checkpoint predates
    checksums); else what is wrong, in a few words."""
    listing = root / CHECKSUMS
    if not listing.is_file():
        return None
    try:
        files = json.loads(listing.read_text())
    except ValueError:
        return f"{CHECKSUMS} is unreadable"
    for name, (size, digest) in files.items():
        path = root / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
        if _sha256(path) != digest:
            return f"{name} does not match its checksum"
    return None


class CheckpointManager:
    def __init__(self, root: Path, *, keep_last: int) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob("*.tmp"):  # left by a crash during a save
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink()

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """Publish step_N (with checksums.json), then point `latest` at it and prune. If step_N exists (this exact
        state was saved already, or a crash came between the rename and the pointer) only repoint and prune."""
        final = self.root / f"step_{step:08d}"
        if not final.is_dir():
            publish_dir(lambda tmp: (write(tmp), write_checksums(tmp)), final)
        write_text_atomic(self.root / LATEST, final.name)
        self._prune(keep=final.name)
        return final

    def resume_point(self, log: Callable[[str], None] = print) -> Path | None:
        """The checkpoint to resume from: `latest` if it is intact, else (saying so through `log`) the newest intact
        one; None if there is none to resume. Raises CheckpointError if checkpoints exist but none is intact."""
        pointer = self.root / LATEST
        named = self.root / pointer.read_text().strip() if pointer.is_file() else None
        candidates = self.complete()[::-1]
        if named is not None and named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
        elif named is not None:
            log(f"{pointer} names '{named.name}', which is missing")
        problems = []
        for path in candidates:
            problem = verify_checksums(path)
            if problem is None:
                if problems or (named is not None and path != named):
                    log(f"resuming from {path.name}, the newest intact checkpoint, instead "
                        f"(skipped: {'; '.join(problems) or named.name + ' (missing)'})")
                    write_text_atomic(pointer, path.name)
                return path
            problems.append(f"{path.name}: {problem}")
            log(f"checkpoint {path} is corrupt: {problem}")
        if problems:
            raise CheckpointError(f"no intact checkpoint under {self.root} ({'; '.join(problems)}); restore one from "
                                  f"a backup, or start the stage over by removing {self.root.parent}")
        return None

    def complete(self) -> list[Path]:
        return sorted(p for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))

    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        if not path.is_dir():
            raise CheckpointError(f"{pointer} names '{path.name}', which is missing; remove {pointer} to start over")
        return path

    def _prune(self, keep: str) -> None:
        done = self.complete()
        for old in done[:-self.keep_last]:
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------ RNG state
def rng_state() -> dict:
    """Python, numpy and torch generator states, in types `torch.load(weights_only=True)` accepts."""
    py_version, py_internal, py_gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(path: Path, state: dict) -> None:
    """trainer_state.json (step, cursor, algorithm state, metric history) and rng.pt."""
    (path / "trainer_state.json").write_text(json.dumps(state, indent=1))
    torch.save(rng_state(), path / "rng.pt")


def load_training_state(path: Path) -> dict:
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable: {e}") from None
    return state
