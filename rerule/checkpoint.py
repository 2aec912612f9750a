"""Crash-safe checkpoints: every file is written to a temporary name, fsynced and renamed into place.

Layout under ``<output_dir>/checkpoints``::

    step-000010/          one complete checkpoint (the directory appears only when all of it is on disk)
        model.pt          trainable weights (the adapter under LoRA, the full state dict otherwise)
        optimizer.pt      AdamW state
        state.pt          step, buffer, prompt sampler, the trainer's torch RNG states, metric history,
                          config, wall time
        buffer-rank{r}.pt one per rank in a multi-process run (its replay buffer, prompt sampler and
                          RNG; ``rerule.distributed``): state.pt then holds the shared state only
    latest                name of the newest complete checkpoint

A checkpoint is first written as ``step-000010.tmp-<pid>/`` and renamed when complete (a directory
rename is atomic on POSIX), then ``latest`` is replaced atomically. A process killed at any point
leaves either the previous checkpoint or the new one, never half of one. Stale ``*.tmp-*`` entries
from a killed writer are ignored and cleaned up by the next save.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

STEP_DIR = re.compile(r"^step-(\d+)$")
PARTS = ("model", "optimizer", "state")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj, path: str | Path) -> None:
    """``torch.save(obj, path)`` through a temp file in the same directory + ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def begin_checkpoint(root: str | Path, step: int) -> Path:
    """Create the temporary directory checkpoint ``step`` is written into (stale ones from killed writers
    are removed first). Only one process per run calls this; see ``commit_checkpoint``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("*.tmp-*"):
        # Left by a killed writer (the pid in the name is another, dead process).
        if not stale.name.endswith(f".tmp-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    tmp = root / f"step-{step:06d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def commit_checkpoint(root: str | Path, tmp: str | Path, step: int, keep: int = 2) -> Path:
    """Rename the fully written ``tmp`` into place as checkpoint ``step``, point ``latest`` at it and keep
    the newest ``keep`` checkpoints. Returns the checkpoint directory."""
    root, tmp = Path(root), Path(tmp)
    final = root / f"step-{step:06d}"
    if final.exists():
        # Re-saving a step (a resumed run passing the same step): move the old one aside first.
        trash = root / f"{final.name}.old.tmp-{os.getpid()}"
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    atomic_write_text(root / "latest", final.name + "\n")
    for old in sorted(list_checkpoints(root))[:-keep] if keep > 0 else []:
        shutil.rmtree(root / f"step-{old:06d}", ignore_errors=True)
    return final


def save_checkpoint(root: str | Path, step: int, parts: dict, keep: int = 2) -> Path:
    """Write ``parts`` ({"model": ..., "optimizer": ..., "state": ...}) as checkpoint ``step``; keep the
    newest ``keep`` checkpoints. Returns the checkpoint directory."""
    tmp = begin_checkpoint(root, step)
    for name, obj in parts.items():
        atomic_save(obj, tmp / f"{name}.pt")
    return commit_checkpoint(root, tmp, step, keep)


def list_checkpoints(root: str | Path) -> list[int]:
    """Steps of the complete checkpoints under ``root``."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = []
    for d in root.iterdir():
        m = STEP_DIR.match(d.name)
        if m and d.is_dir() and all((d / f"{p}.pt").is_file() for p in PARTS):
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint directory, or None."""
    root = Path(root)
    pointer = root / "latest"
    if pointer.is_file():
        d = root / pointer.read_text().strip()
        if d.is_dir() and all((d / f"{p}.pt").is_file() for p in PARTS):
            return d
    steps = list_checkpoints(root)
    return root / f"step-{steps[-1]:06d}" if steps else None


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """{"model": ..., "optimizer": ..., "state": ...} from a checkpoint directory."""
    path = Path(path)
    missing = [p for p in PARTS if not (path / f"{p}.pt").is_file()]
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} is incomplete: missing {missing}")
    return {p: torch.load(path / f"{p}.pt", map_location=map_location, weights_only=True) for p in PARTS}
