"""Faults a user meets around checkpoints and output directories: each ends in a warning that names what
was skipped, or in one clear error line (CPU, seconds)."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import pytest
import torch

import rerule.train.model
import rerule.train.trainer  # noqa: F401  (imported before load_model is patched in a test)
from rerule import cli
from rerule.train import checkpoint as ckpt


def _parts(step: int) -> dict:
    return {"model": {"w": torch.full((64,), float(step))}, "optimizer": {"s": torch.ones(8)}, "state": {"step": step}}


def _two(root: Path) -> None:
    ckpt.save_checkpoint(root, 1, _parts(1), keep=3)
    ckpt.save_checkpoint(root, 2, _parts(2), keep=3)


def test_manifest_records_sizes_and_checksums(tmp_path):
    path = ckpt.save_checkpoint(tmp_path / "ck", 1, _parts(1))
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    assert set(manifest["files"]) == {"model.pt", "optimizer.pt", "state.pt"}
    for name, meta in manifest["files"].items():
        assert meta["size"] == (path / name).stat().st_size and len(meta["sha256"]) == 64
    assert ckpt.verify_checkpoint(path) is None


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_optimizer"])
def test_damaged_newest_falls_back_with_a_warning(tmp_path, caplog, damage):
    root = tmp_path / "ck"
    _two(root)
    newest = root / "step-000002"
    if damage == "truncate":
        data = (newest / "state.pt").read_bytes()
        (newest / "state.pt").write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        data = bytearray((newest / "model.pt").read_bytes())
        data[-40] ^= 0xFF  # same size, different bytes: only the checksum sees it
        (newest / "model.pt").write_bytes(bytes(data))
    else:
        (newest / "optimizer.pt").unlink()
    with caplog.at_level(logging.WARNING, logger="rerule.train.checkpoint"):
        found = ckpt.latest_checkpoint(root)
    assert found == root / "step-000001"
    text = caplog.text
    assert "step-000002" in text and {"truncate": "state.pt", "flip": "model.pt", "delete_optimizer": "optimizer.pt"}[
        damage
    ] in text
    assert ckpt.load_checkpoint(found)["state"]["step"] == 1
    with pytest.raises(ckpt.CheckpointError, match="step-000002"):
        ckpt.load_checkpoint(newest)


def test_none_intact_is_one_clear_error(tmp_path):
    root = tmp_path / "ck"
    _two(root)
    for d in ("step-000001", "step-000002"):
        (root / d / "state.pt").write_bytes(b"garbage")
    with pytest.raises(ckpt.CheckpointError, match=r"no intact checkpoint under .*state\.pt.*\(and 1 more\)"):
        ckpt.latest_checkpoint(root)


def test_garbage_latest_pointer_warns(tmp_path, caplog):
    root = tmp_path / "ck"
    _two(root)
    (root / "latest").write_bytes(b"\x00\xffnot-a-step\n")
    with caplog.at_level(logging.WARNING, logger="rerule.train.checkpoint"):
        assert ckpt.latest_checkpoint(root) == root / "step-000002"
    assert "names no checkpoint" in caplog.text


def test_disk_full_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "ck"
    ckpt.save_checkpoint(root, 1, _parts(1))
    real_save = torch.save

    def full(obj, f, *a, **k):
        if isinstance(obj, dict) and "s" in obj:  # the optimizer part of the next checkpoint
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save_checkpoint(root, 2, _parts(2))
    monkeypatch.setattr(torch, "save", real_save)
    assert ckpt.latest_checkpoint(root) == root / "step-000001"
    assert ckpt.load_checkpoint(root / "step-000001")["state"]["step"] == 1
    assert not (root / "step-000002").exists()
    ckpt.save_checkpoint(root, 2, _parts(2))  # space again: the stale temp directory is cleaned up
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000001", "step-000002"]


# --- the trainer and `rerule train` -------------------------------------------------------------------

YAML = (
    "steps: 2\nsave_every: 1\ndevice: cpu\nprogress: false\ntensorboard: 'off'\nsave_final: false\n"
    "task: {name: synthetic, kwargs: {n_forget: 2, n_boundary: 2, n_retain: 0, n_attributes: 1, n_templates: 1}}\n"
    "rollout: {group_size: 2, prompts_per_step: 2, max_new_tokens: 3}\noptim: {lr: 1.0e-3}\n"
    "warm_start: {epochs: 1, lr: 1.0e-3, batch_size: 2, warmup_steps: 0}\n"
)


def _yaml(tmp_path: Path, out: Path) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(YAML + f"output_dir: {out}\n")
    return str(path)


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    lines = [x for x in err if "rerule train: error:" in x]
    assert len(lines) == 1, err
    return lines[0]


def test_output_dir_is_checked_before_the_model_loads(tmp_path, monkeypatch, capsys):
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the output_dir check")

    monkeypatch.setattr(rerule.train.model, "load_model", boom)
    monkeypatch.setattr("rerule.train.trainer.load_model", boom)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert cli.main(["train", "--config", _yaml(tmp_path, blocker / "run"), "--no-report"]) == 2
    assert "not writable" in _err(capsys)
    from rerule.train.config import TrainConfig
    from rerule.train.trainer import Trainer

    with pytest.raises(ValueError, match="not writable"):
        Trainer(TrainConfig.from_yaml(_yaml(tmp_path, blocker / "run")))


def test_second_run_resume_overwrite_and_damaged_checkpoints(tmp_path, capsys, caplog):
    out = tmp_path / "run"
    cfg = _yaml(tmp_path, out)
    # --resume with nothing to resume is an error; --resume auto starts from scratch.
    assert cli.main(["train", "--config", cfg, "--resume", "--no-report"]) == 2
    assert "no checkpoint" in _err(capsys)
    assert cli.main(["train", "--config", cfg, "--resume", "auto", "--no-report"]) == 0
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2]
    # --resume auto where a run left files but no checkpoint: a fresh start, so the same rule applies.
    (out / "checkpoints").rename(out / "moved")
    assert cli.main(["train", "--config", cfg, "--resume", "auto", "--no-report"]) == 2
    assert "already holds a run" in _err(capsys)
    (out / "moved").rename(out / "checkpoints")
    # A second run into the same directory is refused ...
    assert cli.main(["train", "--config", cfg, "--no-report"]) == 2
    line = _err(capsys)
    assert "already holds a run" in line and "--overwrite" in line and "--resume" in line
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    # ... unless --overwrite: the old run's files go, other files stay.
    (out / "notes.txt").write_text("mine")
    assert cli.main(["train", "--config", cfg, "--overwrite", "--steps", "1", "--no-report"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1 and (out / "notes.txt").exists()
    # Checkpoints are HF folders: from_pretrained loads one as it is.
    from transformers import AutoModelForCausalLM

    step1 = out / "checkpoints" / "step-000001"
    assert (step1 / "config.json").is_file() and not (step1 / "model.pt").exists()
    AutoModelForCausalLM.from_pretrained(step1)
    # A damaged newest checkpoint: resume falls back to the older one, with a warning naming the file.
    assert cli.main(["train", "--config", cfg, "--overwrite", "--no-report"]) == 0
    state = out / "checkpoints" / "step-000002" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        assert cli.main(["train", "--config", cfg, "--steps", "3", "--resume", "--no-report"]) == 0
    assert "step-000002" in caplog.text and "state.pt" in caplog.text
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # Nothing intact: one line naming the file.
    for d in (out / "checkpoints").iterdir():
        if d.is_dir():
            (d / "optimizer.pt").write_bytes(b"")
    assert cli.main(["train", "--config", cfg, "--steps", "4", "--resume", "--no-report"]) == 2
    line = _err(capsys)
    assert "no intact checkpoint" in line and "optimizer.pt" in line


def test_warm_started_run_without_its_reference_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = _yaml(tmp_path, out)
    assert cli.main(["train", "--config", cfg, "--no-report"]) == 0
    assert (out / "reference.pt").is_file()  # warm-started: the reference is not the initial model
    (out / "reference.pt").unlink()
    assert cli.main(["train", "--config", cfg, "--steps", "3", "--resume", "--no-report"]) == 2
    assert "reference.pt is missing" in _err(capsys)


def test_reference_not_stored_without_warm_start(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = _yaml(tmp_path, out)
    assert cli.main(["train", "--config", cfg, "--warm_start.epochs", "0", "--no-report"]) == 0
    assert not (out / "reference.pt").exists()
    assert "reference: the initial model (not stored)" in capsys.readouterr().out
    assert cli.main(["train", "--config", cfg, "--warm_start.epochs", "0", "--steps", "3", "--resume",
                     "--no-report"]) == 0


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_reference_is_one_clear_error(tmp_path, capsys, damage):
    """reference.pt has no older copy to fall back to: a damaged one ends in one line that names it."""
    out = tmp_path / "run"
    cfg = _yaml(tmp_path, out)
    assert cli.main(["train", "--config", cfg, "--no-report"]) == 0
    ref = out / "reference.pt"
    ref.write_bytes(ref.read_bytes()[: ref.stat().st_size // 2] if damage == "truncate" else b"not a checkpoint")
    assert cli.main(["train", "--config", cfg, "--steps", "3", "--resume", "--no-report"]) == 2
    assert "reference.pt" in _err(capsys)
