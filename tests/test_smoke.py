"""The shipped smoke config learns: `rerule train --config smoke` (tiny model, CPU) raises the forget refusal
rate and the reward, replays buffered groups, and logs eval/* every eval_every steps."""

from __future__ import annotations

import json

import pytest

from rerule import cli
from rerule.train.config import TrainConfig


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs)


@pytest.mark.slow
def test_smoke_config_learns(tmp_path, capsys):
    out = tmp_path / "smoke"
    cfg = TrainConfig.from_yaml("smoke")
    assert cli.main(["train", "--config", "smoke", "--output_dir", str(out), "--progress", "off",
                     "--eval-max-examples", "4"]) == 0
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, cfg.steps + 1))
    first, last = rows[:3], rows[-10:]
    refusal = _mean(r["forget_refusal_rate"] for r in first), _mean(r["forget_refusal_rate"] for r in last)
    reward = _mean(r["reward"] for r in first), _mean(r["reward"] for r in last)
    assert refusal[1] >= refusal[0] + 0.2, refusal
    assert reward[1] >= reward[0] + 0.05, reward
    assert _mean(r["boundary_refusal_rate"] for r in last) <= 0.1  # boundary prompts still answered
    assert sum(r["replay_groups"] for r in rows) >= 5  # replay fires
    assert any(r.get("is_weight_mean") is not None for r in rows)
    evals = [r for r in rows if "eval/forget_refusal_rate" in r]
    assert [r["step"] for r in evals] == list(range(cfg.eval_every, cfg.steps + 1, cfg.eval_every))
    for name in ("reward.png", "refusal.png", "eval.png", "buffer.png", "importance.png", "summary.md"):
        assert (out / "report" / name).is_file(), name
    assert "sizes: checkpoint step-000030" in capsys.readouterr().out
