"""Config: defaults, YAML + dotted overrides, and clear errors before any data or model is touched."""

from __future__ import annotations

import pytest

import rerule.model
from rerule.config import TrainConfig, describe
from rerule.trainer import Trainer

DEFAULT_YAML = "rerule/configs/default.yaml"


def test_defaults_are_rules_published_settings():
    c = TrainConfig()
    assert (c.rollout.group_size, c.rollout.temperature) == (8, 1.0)
    assert (c.loss.beta, c.loss.epsilon_low, c.loss.epsilon_high, c.loss.dual_clip) == (1e-2, 0.2, 0.3, 3.0)
    assert (c.optim.lr, c.optim.weight_decay, c.optim.grad_clip) == (2e-6, 0.01, 1.0)
    assert c.replay.advantages == "recomputed" and c.replay.sampling == "uniform"
    assert 1.0 <= c.replay.cap <= 2.0 and 0.5 <= c.replay.lam <= 1.0 and 10 <= c.replay.staleness <= 25


def test_every_field_has_help():
    lines = describe()
    assert len(lines) > 60
    assert all(line.split(": ", 1)[1].strip() for line in lines), [
        line for line in lines if not line.split(": ", 1)[1]
    ]


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 3\nreplay:\n  lambda: 0.5\n  cap: 1.5\noptim:\n  lr: 1e-3\n")
    c = TrainConfig.from_yaml(path, overrides={"replay.cap": "1.25", "rollout.group_size": "4"})
    assert (c.steps, c.replay.lam, c.replay.cap, c.optim.lr, c.rollout.group_size) == (3, 0.5, 1.25, 1e-3, 4)
    c2 = c.apply_overrides({"replay.enabled": "false", "sampling.mode": "prioritized"})
    assert c2.replay.enabled is False and c2.sampling.mode == "prioritized" and c.replay.enabled is True
    assert TrainConfig.from_dict(c2.to_dict()) == c2


def test_shipped_configs_load():
    c = TrainConfig.from_yaml(DEFAULT_YAML)
    assert c.rollout.group_size == 8 and c.replay.enabled and c.loss.beta == 1e-2
    tiny = TrainConfig.from_yaml("rerule/configs/tiny_synthetic.yaml")
    assert tiny.model.name_or_path == "tiny" and tiny.task.name == "synthetic"


@pytest.mark.parametrize(
    "data, match",
    [
        ({"rollout": {"group_size": 1}}, "group_size"),
        ({"replay": {"cap": 0}}, "replay.cap"),
        ({"replay": {"cap": -1.0}}, "replay.cap"),
        ({"loss": {"loss_type": "ppo"}}, "loss_type"),
        ({"rollout": {"prompts_per_step": 6}, "optim": {"micro_batch_groups": 4}}, "must divide"),
        ({"task": {"name": "tofu", "data_dir": "/nonexistent/tofu"}}, "missing data"),
        ({"task": {"name": "imagenet"}}, "task.name"),
        ({"replay": {"capacity": 0}}, "capacity"),
        ({"replay": {"advantages": "fresh"}}, "advantages"),
        ({"loss": {"epsilon_low": 1.5}}, "epsilon_low"),
        ({"loss": {"dual_clip": 0.5}}, "dual_clip"),
        ({"replay": {"capp": 2}}, "did you mean replay.cap"),
        ({"steps": "many"}, "steps"),
        ({"rollout": {"temperature": 0}}, "temperature"),
    ],
    ids=lambda x: str(x)[:40],
)
def test_bad_config_errors(data, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(data)


def test_bad_config_errors_before_model_loads(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the config error")

    monkeypatch.setattr(rerule.model, "load_model", boom)
    monkeypatch.setattr("rerule.trainer.load_model", boom)
    with pytest.raises(ValueError, match="group_size"):
        Trainer(TrainConfig.from_dict({"rollout": {"group_size": 1}}))
    # Missing data: the task is resolved before the model.
    cfg = TrainConfig.from_dict({"task": {"name": "tofu", "data_dir": "."}})
    with pytest.raises(ValueError):
        Trainer(cfg)
    # prompts_per_step larger than the task
    from types import SimpleNamespace as NS

    task = NS(forget=[NS(prompt="a", answer="", subject="s", source="forget")], boundary=[])
    with pytest.raises(ValueError, match="prompts_per_step"):
        Trainer(TrainConfig.from_dict({"rollout": {"prompts_per_step": 2}}), task=task)
