"""Crash-safe checkpoints: every file is written to a temporary name, fsynced and renamed into place.

Layout under ``<output_dir>/checkpoints``::

    step-000010/          one complete checkpoint (the directory appears only when all of it is on disk)
        config.json, model.safetensors, tokenizer files
                          the policy in Hugging Face format (``save_pretrained``): ``rerule eval --model
                          .../step-000010`` and ``AutoModelForCausalLM.from_pretrained`` load it as it is;
                          under LoRA the adapter (``adapter_model.safetensors``, PEFT's format)
        model.pt          the weights as a torch state dict instead (multi-process runs, where ranks
                          gather FSDP shards)
        optimizer.pt      AdamW state
        state.pt          step, buffer, prompt sampler, the trainer's torch RNG states, metric history,
                          config, wall time
        buffer-rank{r}.pt one per rank in a multi-process run (its replay buffer, prompt sampler and
                          RNG; ``rerule.train.distributed``): state.pt then holds the shared state only
        manifest.json     size and SHA-256 of every file above, written last
    latest                name of the newest complete checkpoint

Loading verifies the manifest: a truncated or corrupted file makes ``latest_checkpoint`` fall back to the
newest intact checkpoint with a warning naming what it skipped and why (a missing optimizer file, a
``latest`` pointer naming no checkpoint, a size or checksum mismatch), and ``load_checkpoint`` fails with
one line naming the file when nothing intact is left.

A checkpoint is first written as ``step-000010.tmp-<pid>/`` and renamed when complete (a directory
rename is atomic on POSIX), then ``latest`` is replaced atomically. A process killed at any point
leaves either the previous checkpoint or the new one, never half of one. Stale ``*.tmp-*`` entries
from a killed writer are ignored and cleaned up by the next save.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d+)$")
PARTS = ("model", "optimizer", "state")
MANIFEST = "manifest.json"
# Weights in Hugging Face format: one of these marks a checkpoint whose model part is not model.pt.
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing or corrupted files); the message names the file."""


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def dir_size(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def check_writable(path: str | Path) -> None:
    """Create ``path`` if needed and write a probe file in it; one clear ValueError when that fails."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"output_dir {str(path)!r} is not writable ({e.strerror or e}): choose another "
                         f"--output_dir or fix its permissions") from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: str | Path) -> dict:
    """Record size and SHA-256 of every file under ``directory`` in ``manifest.json`` (atomically)."""
    directory = Path(directory)
    files = {}
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory).as_posix()
        if p.is_file() and rel != MANIFEST and ".tmp-" not in p.name:
            files[rel] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    manifest = {"files": files, "total_size": sum(f["size"] for f in files.values())}
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def verify_checkpoint(path: str | Path, checksums: bool = True) -> str | None:
    """None when checkpoint ``path`` is intact, else why not (names the file)."""
    path = Path(path)
    if not path.is_dir():
        return f"{path} is not a directory"
    for part in ("optimizer", "state"):
        if not (path / f"{part}.pt").is_file():
            return f"{path / f'{part}.pt'} is missing"
    if not (path / "model.pt").is_file() and not any((path / w).is_file() for w in HF_WEIGHTS):
        return f"{path} has no weights (model.pt or model.safetensors)"
    mpath = path / MANIFEST
    if not mpath.is_file():
        return None  # written before manifests existed: the file checks above are all there is
    try:
        files = json.loads(mpath.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{mpath} is unreadable"
    for rel, meta in files.items():
        f = path / rel
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != meta["size"]:
            return f"{f} has {f.stat().st_size} bytes, the manifest says {meta['size']} (truncated?)"
        if checksums and _sha256(f) != meta["sha256"]:
            return f"{f} does not match its checksum (corrupted)"
    return None


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
    write_manifest(tmp)
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
    log.info("checkpoint %s: %s", final.name, human_size(dir_size(final)))
    atomic_write_text(root / "latest", final.name + "\n")
    for old in sorted(list_checkpoints(root))[:-keep] if keep > 0 else []:
        shutil.rmtree(root / f"step-{old:06d}", ignore_errors=True)
    return final


def save_checkpoint(root: str | Path, step: int, parts: dict, keep: int = 2, write_weights=None) -> Path:
    """Write ``parts`` ({"model": ..., "optimizer": ..., "state": ...}) as checkpoint ``step``; keep the
    newest ``keep`` checkpoints. ``write_weights(directory)`` (e.g. a ``save_pretrained``) writes the
    weights in Hugging Face format instead of a "model" part. Returns the checkpoint directory."""
    tmp = begin_checkpoint(root, step)
    if write_weights is not None:
        write_weights(tmp)
    for name, obj in parts.items():
        atomic_save(obj, tmp / f"{name}.pt")
    return commit_checkpoint(root, tmp, step, keep)


def list_checkpoints(root: str | Path) -> list[int]:
    """Steps of the checkpoint directories under ``root`` that have all their files (not verified)."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = []
    for d in root.iterdir():
        m = STEP_DIR.match(d.name)
        if m and d.is_dir() and verify_checkpoint(d, checksums=False) is None:
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_checkpoint(root: str | Path, verify: bool = True) -> Path | None:
    """The newest intact checkpoint directory, or None when there is no checkpoint at all.

    With ``verify`` every candidate is checked against its manifest (sizes and checksums), newest first;
    each one skipped is logged as a warning with the reason, and so is a ``latest`` pointer that names
    no checkpoint. Raises :class:`CheckpointError` when checkpoints exist but none is intact.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    candidates = sorted((int(m.group(1)), d) for d in root.iterdir()
                        if d.is_dir() and (m := STEP_DIR.match(d.name)))
    pointer = root / "latest"
    if pointer.is_file():
        try:
            name = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError):
            name = None
        if not name or not STEP_DIR.match(name) or not (root / name).is_dir():
            log.warning("checkpoint pointer %s names no checkpoint (%r): using the newest intact one instead",
                        pointer, (name or "")[:60])
        elif candidates and (root / name) != candidates[-1][1]:
            # Normally the pointer names the newest; trust the directory scan, but say so.
            log.warning("checkpoint pointer %s names %s, not the newest directory %s", pointer, name,
                        candidates[-1][1].name)
    elif candidates:
        log.warning("checkpoint pointer %s is missing: using the newest intact checkpoint", pointer)
    skipped = []
    for _, d in reversed(candidates):
        why = verify_checkpoint(d, checksums=verify)
        if why is None:
            if skipped:
                log.warning("skipped %d damaged checkpoint(s): %s; resuming from %s", len(skipped),
                            "; ".join(skipped), d.name)
            return d
        skipped.append(why)
        log.warning("checkpoint %s is not usable: %s", d.name, why)
    if skipped:
        raise CheckpointError(f"no intact checkpoint under {root}: {skipped[0]}"
                              + (f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""))
    return None


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint's weights: model.pt, or the Hugging Face safetensors file(s)."""
    path = Path(path)
    if (path / "model.pt").is_file():
        return torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    from safetensors.torch import load_file

    files = sorted(path.glob("adapter_model.safetensors")) or sorted(path.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"checkpoint {str(path)!r} has no weights (model.pt or model.safetensors)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f, device="cpu"))
    return state


def load_file(path: str | Path, map_location="cpu"):
    """``torch.load`` of one file the run wrote (weights only); a damaged or truncated file raises
    :class:`CheckpointError` that names it, not the zip / pickle error."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a torch / zip / pickle error on a damaged file
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"{path} cannot be read (damaged or truncated?): {type(e).__name__}: {first}") from e


def load_checkpoint(path: str | Path, map_location="cpu", verify: bool = True) -> dict:
    """{"model": ..., "optimizer": ..., "state": ...} from a checkpoint directory, verified against its
    manifest first (a damaged file raises :class:`CheckpointError` naming it)."""
    path = Path(path)
    why = verify_checkpoint(path, checksums=verify)
    if why is not None:
        raise CheckpointError(f"checkpoint {str(path)!r} is not usable: {why}")
    out = {}
    for part in PARTS:
        if part != "model":
            out[part] = load_file(path / f"{part}.pt", map_location)
            continue
        try:
            out[part] = load_weights(path)
        except CheckpointError:
            raise
        except Exception as e:  # a torch / zip / safetensors error on a damaged file
            raise CheckpointError(f"checkpoint file {path / part}.* cannot be read: {type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}") from e
    return out
