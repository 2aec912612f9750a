"""Config: defaults, YAML + dotted overrides, and clear errors before any data or model is touched."""

from __future__ import annotations

import pytest

import rerule.train.model
from rerule.train.config import TrainConfig, describe
from rerule.train.trainer import Trainer

DEFAULT_YAML = "rerule/configs/default.yaml"


def test_defaults_are_rules_published_settings():
    c = TrainConfig()
    assert (c.rollout.group_size, c.rollout.temperature) == (8, 1.0)
    assert (c.loss.beta, c.loss.epsilon_low, c.loss.epsilon_high, c.loss.dual_clip) == (1e-2, 0.2, 0.3, 3.0)
    assert (c.optim.lr, c.optim.weight_decay, c.optim.grad_clip) == (2e-6, 0.01, 1.0)
    assert c.replay.advantages == "consistent" and c.replay.sampling == "uniform"
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

    monkeypatch.setattr(rerule.train.model, "load_model", boom)
    monkeypatch.setattr("rerule.train.trainer.load_model", boom)
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


# --- one configuration system (YAML + dotted overrides) for train, eval and demo ------------------------


def test_on_off_values_for_switches_and_booleans(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("tensorboard: on\nmodel: {liger: off}\nrollout: {chat_template: off}\nprogress: off\n")
    c = TrainConfig.from_yaml(path)
    assert (c.tensorboard, c.model.liger, c.rollout.chat_template, c.progress) == ("on", "off", "off", False)
    c = c.apply_overrides({"tensorboard": "off", "model.liger": "on", "replay.enabled": "off", "progress": "yes"})
    assert (c.tensorboard, c.model.liger, c.replay.enabled, c.progress) == ("off", "on", False, True)
    with pytest.raises(ValueError, match="tensorboard must be one of"):
        c.apply_overrides({"tensorboard": "maybe"})


def test_shipped_configs_found_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the clone: found in the package
    assert TrainConfig.from_yaml("smoke").output_dir == "runs/smoke"
    assert TrainConfig.from_yaml("tiny_synthetic.yaml").task.name == "synthetic"
    with pytest.raises(ValueError, match=r"does not exist \(shipped configs, usable by name: .*smoke"):
        TrainConfig.from_yaml("smok")


def test_task_switch_resets_the_task_arguments(tmp_path):
    c = TrainConfig.from_yaml("tiny_synthetic", {"task.name": "tofu"})
    assert c.task.kwargs == {} and c.task.name == "tofu"
    c = TrainConfig.from_yaml("tiny_synthetic", {"task.name": "custom", "task.data_dir": str(tmp_path)})
    assert c.task.kwargs == {} and c.task.data_dir == str(tmp_path)
    same = TrainConfig.from_yaml("tiny_synthetic", {"task.name": "synthetic"})
    assert same.task.kwargs["n_forget"] == 4  # same task: its arguments stay
    with pytest.raises(ValueError, match="task.name=custom needs task.data_dir"):
        TrainConfig.from_yaml("tiny_synthetic", {"task.name": "custom"})


def test_one_override_syntax(tmp_path):
    from rerule import cli

    tokens = ["--replay.cap", "1.5", "--set", "optim.lr=1e-3", "--steps=3", "--set", "task.kwargs={seed: 2}",
              "--progress"]
    over = cli.parse_overrides(tokens)
    c = TrainConfig.from_yaml("tiny_synthetic", over)
    assert (c.replay.cap, c.optim.lr, c.steps, c.task.kwargs, c.progress) == (1.5, 1e-3, 3, {"seed": 2}, True)
    with pytest.raises(ValueError, match="--set expects key=value"):
        cli.parse_overrides(["--set", "steps"])


def test_new_dataclass_fields_are_picked_up(monkeypatch):
    """The parser reads the dataclasses: a field added to a section is settable with no parser change."""
    import dataclasses

    from rerule.train import config

    @dataclasses.dataclass
    class Extra(config.ReplayConfig):
        extra_sources: list = config._help("test field", factory=lambda: ["forget"])

    hints = dict(config.TrainConfig.__annotations__)
    monkeypatch.setattr(config.TrainConfig, "__annotations__", {**hints, "replay": Extra})
    built = config._build(Extra, {"extra_sources": ["forget", "boundary"], "cap": 1.5}, "replay.")
    assert built.extra_sources == ["forget", "boundary"] and built.cap == 1.5
    assert any(line.startswith("extra_sources (") for line in config.describe(Extra))


def test_train_help_lists_sections_and_keys(capsys):
    from rerule import cli

    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--set" in out and "--resume" in out and "--overwrite" in out and "help-config" not in out
    for section in ("model", "task", "rollout", "replay", "warm_start", "distributed"):
        assert f"\n  {section} " in out
    assert "replay.cap (2.0)" in out and "tensorboard ('auto')" in out


def test_demo_accepts_both_override_forms(monkeypatch):
    import rerule.demo.cli
    from rerule import cli

    seen = {}
    monkeypatch.setattr(rerule.demo.cli, "run_demo", lambda args: seen.update(vars(args)))
    argv = ["demo", "--sweep", "--set", "sweep.seeds=[0]", "--set", "sweep.hardness=[0.2]", "--set",
            "sweep.arms=[RULE]", "--out", "x", "--train.steps", "5", "--config", "demo"]
    assert cli.main(argv) == 0
    assert seen["set"] == ["sweep.seeds=[0]", "sweep.hardness=[0.2]", "sweep.arms=[RULE]", "train.steps=5"]
    assert seen["sweep"] and seen["out"] == "x" and seen["config"].endswith("rerule/configs/demo.yaml")
