"""Resume is exact: K steps straight == K/2 steps, SIGKILL, resume to K (parameters, optimizer, buffer,
sampler, RNG, metrics), on CPU.

The run under test is this file executed as a script (``python tests/train/test_resume.py OUT STEPS
[--resume] [--sleep S]``): a toy task with a tiny Llama, a warm start, a KL reference, replay from
step 1 and prioritized prompt sampling, so every piece of resumable state is non-trivial.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

K = 8
HERE = Path(__file__).resolve()
TIME_KEYS = ("time_rollout_s", "time_update_s", "time_step_s", "time_total_s")


def _config(out: str, steps: int):
    from rerule.train.config import TrainConfig

    return TrainConfig.from_dict({
        "steps": steps, "seed": 3, "output_dir": out, "progress": False, "save_final": False,
        "tensorboard": "off", "save_every": 1, "keep_checkpoints": 3,
        "rollout": {"group_size": 4, "prompts_per_step": 4, "max_new_tokens": 4},
        "optim": {"lr": 1e-2}, "loss": {"beta": 0.05},
        "warm_start": {"epochs": 1, "lr": 1e-2, "batch_size": 4, "warmup_steps": 0},
        "replay": {"enabled": True, "start_step": 1, "fraction": 0.5, "cap": 1.5},
        "sampling": {"mode": "prioritized"},
    })


def _drive(argv: list[str]) -> None:
    """Train (or resume) the toy run: argv = [out_dir, steps, ("--resume"), ("--sleep", seconds)]."""
    torch.set_num_threads(1)
    from rerule.train.trainer import Trainer
    from tests.train._toy import toy_task, upper_reward

    out, steps = argv[0], int(argv[1])
    sleep = float(argv[argv.index("--sleep") + 1]) if "--sleep" in argv else 0.0
    trainer = Trainer(_config(out, steps), task=toy_task(), reward_fn=upper_reward, resume="--resume" in argv)
    # Sleeping after a step slows the run down so the parent can kill it mid-way; it touches no state.
    trainer.train(callback=lambda m: time.sleep(sleep))


def _launch(out: Path, steps: int, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(HERE.parents[2]))
    return subprocess.Popen([sys.executable, str(HERE), str(out), str(steps), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait(proc: subprocess.Popen, timeout: float = 240) -> None:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out.decode()[-3000:]


def _final(out: Path) -> dict:
    from rerule.train.checkpoint import latest_checkpoint, load_checkpoint

    path = latest_checkpoint(out / "checkpoints")
    assert path is not None and path.name == f"step-{K:06d}", path
    return load_checkpoint(path)


def _assert_same(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            if k not in TIME_KEYS and k != "output_dir":
                _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def test_sigkill_then_resume_is_exact(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    victim = _launch(killed, K, "--sleep", "0.5")
    # The uninterrupted run goes in this process (same thread count and environment) while the
    # victim starts up; the trainer runs under its own RNG, so nothing else in the process leaks in.
    _drive([str(straight), str(K)])
    from rerule.train.checkpoint import list_checkpoints

    def saved() -> int:
        return max(list_checkpoints(killed / "checkpoints"), default=-1)

    deadline = time.time() + 240
    while saved() < K // 2:
        assert time.time() < deadline, "the run never reached its mid-way checkpoint"
        assert victim.poll() is None, victim.communicate()[0].decode()[-3000:]
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    done = list_checkpoints(killed / "checkpoints")
    assert K // 2 <= max(done) < K, done
    rows = (killed / "metrics.jsonl").read_text().splitlines()
    assert len(rows) >= max(done)

    _wait(_launch(killed, K, "--resume"))

    a, b = _final(straight), _final(killed)
    _assert_same(a["model"], b["model"], "model")
    _assert_same(a["optimizer"], b["optimizer"], "optimizer")
    sa, sb = a["state"], b["state"]
    assert sa["step"] == sb["step"] == K
    for key in ("buffer", "sampler", "rng", "history", "warm_start"):
        _assert_same(sa[key], sb[key], key)
    assert len(sa["buffer"]["entries"]) > 0 and any(m["replay_groups"] for m in sa["history"])
    ref_a = torch.load(straight / "reference.pt", weights_only=True)
    ref_b = torch.load(killed / "reference.pt", weights_only=True)
    _assert_same(ref_a, ref_b, "reference")

    def log(p):
        return [
            {k: v for k, v in json.loads(r).items() if k not in TIME_KEYS} for r in p.read_text().splitlines()
        ]

    assert log(straight / "metrics.jsonl") == log(killed / "metrics.jsonl")
    assert [m["step"] for m in log(killed / "metrics.jsonl")] == list(range(1, K + 1))


def test_atomic_checkpoint_leaves_old_or_new(tmp_path):
    from rerule.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    root = tmp_path / "ck"
    save_checkpoint(root, 1, {"model": {"w": torch.ones(2)}, "optimizer": {}, "state": {"step": 1}})
    # A writer killed mid-save leaves only a temp directory, which is ignored and later cleaned up.
    (root / "step-000002.tmp-999999").mkdir()
    (root / "step-000002.tmp-999999" / "model.pt").write_bytes(b"partial")
    assert latest_checkpoint(root).name == "step-000001"
    save_checkpoint(root, 2, {"model": {"w": torch.zeros(2)}, "optimizer": {}, "state": {"step": 2}}, keep=1)
    assert latest_checkpoint(root).name == "step-000002"
    assert load_checkpoint(latest_checkpoint(root))["state"]["step"] == 2
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000002"]


if __name__ == "__main__":
    _drive(sys.argv[1:])
