"""Training configuration: nested dataclasses with help text, validated on construction.

Every field carries its help string in ``field(metadata={"help": ...})``; ``describe()`` prints them.
A config is built from a YAML file (``TrainConfig.from_yaml``; a shipped config is found by name:
``tiny_synthetic``, ``smoke``, ``default``), from a dict (``from_dict``), and overridden by dotted keys
(``apply_overrides({"replay.cap": 1.5})``, the CLI's ``--replay.cap 1.5`` or ``--set replay.cap=1.5``).
YAML files and override values are read by OmegaConf (``1e-3`` is a float, ``[a, b]`` a list, ``null``
None); this module then checks every key against the dataclasses (unknown keys get a "did you mean")
and every value against its type. ``on`` / ``off`` (which YAML reads as booleans) are accepted for
the string switches (``tensorboard``, ``model.liger``, ``rollout.chat_template``), and ``on`` / ``off`` /
``yes`` / ``no`` for booleans. Setting ``task.name`` to another task drops the file's ``task.forget``,
``task.data_dir`` and ``task.kwargs`` (they belong to the old task) unless they are set alongside.
Validation runs in ``__post_init__``, so a bad config fails before any data or model is loaded.

Defaults are RULE's published settings where they apply (group 8, temperature 1.0, k3 KL 1e-2,
clip 0.2 / 0.3 with dual clip 3.0, lr 2e-6, AdamW wd 0.01, grad clip 1.0, one update per rollout
batch) and, for replay, the toy study in docs/replay.md (start early, staleness ~16, ~12.5 % of the
batch replayed, lambda 1, cap 2, uniform sampling in the buffer) with the consistent replay estimator.

Example:
    >>> cfg = TrainConfig.from_dict({"rollout": {"group_size": 4}, "replay": {"lambda": 0.5}})
    >>> cfg.apply_overrides({"replay.cap": "1.5"}).replay.cap
    1.5
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rerule.train.config_sections import (
    REWARD_VARIANTS,
    TASKS,
    DistributedConfig,
    LoraConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    ReplayConfig,
    RewardConfig,
    RolloutConfig,
    SamplingConfig,
    TaskConfig,
    TinyModelConfig,
    WarmStartConfig,
    _check,
    _choice,
    _help,
    _int,
)

CONFIG_DIR = Path(__file__).parents[1] / "configs"
# Config keys that are Python keywords, spelled in YAML / on the CLI by their usual name.
ALIASES = {"lambda": "lam"}


@dataclass
class TrainConfig:
    """The whole run. Stages: warm start (warm_start.epochs), on-policy RULE (steps < replay.start_step),
    hybrid ReRULE (replay.start_step <= step < steps, when replay.enabled)."""

    steps: int = _help("RL steps (stage 1 + stage 2)", 20)
    seed: int = _help("seeds model init, sampling, buffer draws", 0)
    output_dir: str = _help("metrics.jsonl, checkpoints/ and final/ go here", "runs/rerule")
    device: str = _help("auto (cuda when available), cpu, cuda, cuda:N", "auto")
    save_every: int = _help("checkpoint every N steps (0: only at the end)", 0)
    keep_checkpoints: int = _help("how many recent checkpoints to keep", 2)
    eval_every: int = _help("call evaluate_fn every N steps (0: never)", 0)
    progress: bool = _help("show a tqdm progress bar", True)
    tensorboard: str = _help("auto (when tensorboard is installed), on, off", "auto")
    save_final: bool = _help("save_pretrained the final model (and tokenizer) to output_dir/final", True)
    model: ModelConfig = _help("model", factory=ModelConfig)
    task: TaskConfig = _help("benchmark", factory=TaskConfig)
    rollout: RolloutConfig = _help("sampling", factory=RolloutConfig)
    reward: RewardConfig = _help("rewards", factory=RewardConfig)
    optim: OptimConfig = _help("optimizer", factory=OptimConfig)
    loss: LossConfig = _help("loss", factory=LossConfig)
    replay: ReplayConfig = _help("replay buffer (ReRULE)", factory=ReplayConfig)
    sampling: SamplingConfig = _help("prompt sampling", factory=SamplingConfig)
    warm_start: WarmStartConfig = _help("stage 0", factory=WarmStartConfig)
    distributed: DistributedConfig = _help("multi-GPU / multi-node runs", factory=DistributedConfig)

    def __post_init__(self):
        for name, low in (("steps", 1), ("keep_checkpoints", 1), ("save_every", 0), ("eval_every", 0)):
            _int(name, getattr(self, name), low)
        _check(isinstance(self.seed, int), "seed", "must be an int")
        ok = self.device in ("auto", "cpu") or self.device.startswith("cuda")
        _check(ok, "device", f"must be auto, cpu or cuda[:N], got {self.device!r}")
        _choice("tensorboard", self.tensorboard, ("auto", "on", "off"))
        P = self.rollout.prompts_per_step
        for name, n in (("optim.micro_batch_groups", self.optim.micro_batch_groups),
                        ("generation_batch_groups", self.rollout.generation_batch_groups)):
            _check(n is None or P % n == 0, "rollout.prompts_per_step", f"({P}) must divide by {name} ({n})")

    @classmethod
    def from_dict(cls, data: dict | None) -> TrainConfig:
        """Build from nested dicts; unknown keys raise ValueError with the closest valid name."""
        return _build(cls, data or {}, "")

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict | None = None) -> TrainConfig:
        """Build from a YAML file (a path, or the name of a shipped config) and dotted overrides."""
        data = load_yaml(path)
        return cls.from_dict(merge_overrides(data, overrides or {}))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def apply_overrides(self, overrides: dict[str, Any]) -> TrainConfig:
        """A new config with dotted keys replaced; strings are parsed as YAML ('1e-3', 'true', '[a, b]')."""
        return TrainConfig.from_dict(merge_overrides(self.to_dict(), overrides))


def find_config(name: str | Path) -> Path:
    """A YAML path as given, or a shipped config by name (``tiny_synthetic``, ``smoke.yaml`` ...)."""
    path = Path(name)
    if path.is_file():
        return path
    for cand in (CONFIG_DIR / path.name, CONFIG_DIR / f"{path.name}.yaml"):
        if not path.parent.parts and cand.is_file():
            return cand
    shipped = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p.stem != "accelerate_fsdp"))
    raise ValueError(f"config file {str(name)!r} does not exist (shipped configs, usable by name: {shipped})")


def load_yaml(path: str | Path) -> dict:
    """A YAML file (or shipped config name) as a plain dict, read by OmegaConf (interpolations resolved)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = find_config(path)
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"config file {str(path)!r} is not valid YAML: {first}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping at the top level")
    return data


def parse_value(value):
    """A command-line value as OmegaConf reads it: ``'1e-3'`` -> 0.001, ``'[a, b]'`` -> list, ``'off'`` -> False."""
    if not isinstance(value, str) or not value.strip():
        return value
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        node = OmegaConf.from_dotlist([f"v={value}"])
        out = OmegaConf.to_container(node, resolve=True)["v"]
    except (yaml.YAMLError, OmegaConfBaseException, ValueError):
        return value
    return out


def merge_overrides(data: dict, overrides: dict[str, Any]) -> dict:
    """``data`` with dotted ``overrides`` applied (values parsed as on the command line). A new
    ``task.name`` resets the task's other keys that are not overridden too."""
    data = dict(data)
    overrides = {ALIASES.get(k, k) if "." not in k else k: v for k, v in overrides.items()}
    if "task.name" in overrides:
        task = data.get("task") or {}
        new = parse_value(overrides["task.name"])
        if isinstance(task, dict) and task.get("name", TaskConfig.name) != new:
            data["task"] = {}
    for key, value in overrides.items():
        _set_dotted(data, key, value)
    return data


def _set_dotted(data: dict, key: str, value):
    value = parse_value(value)
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        child = node.get(p)
        node[p] = child = dict(child) if isinstance(child, dict) else ({} if child is None else child)
        node = child
        if not isinstance(node, dict):
            raise ValueError(f"config: cannot set {key!r}: {p!r} is not a section")
    node[parts[-1]] = value


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "top level"
        raise ValueError(f"config: {where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for raw_key, value in data.items():
        key = ALIASES.get(raw_key, raw_key)
        if key not in fields:
            close = difflib.get_close_matches(raw_key, list(fields), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ValueError(f"config: unknown key {prefix}{raw_key}{hint}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value if value is not None else {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, hint, f"{prefix}{key}")
    return cls(**kwargs)


_BOOL_WORDS = {"true": True, "false": False, "on": True, "off": False, "yes": True, "no": False, "1": True,
               "0": False}


def _coerce(value, hint, name):
    """Light type checking: ints become floats where a float is expected; wrong kinds raise."""
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args or hint is Any:
            return None
        raise ValueError(f"config: {name} must not be null")
    base = [a for a in args if a is not type(None)] if args else [hint]
    if hint is Any or Any in base:
        return value
    for t in base:
        t = typing.get_origin(t) or t
        if t in (float, int) and isinstance(value, str):
            # YAML 1.1 reads "1e-3" (no dot) as a string.
            try:
                value = t(value)
            except ValueError:
                continue
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is bool and isinstance(value, bool):
            return value
        if t is bool and isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.lower()]
        if t is str and isinstance(value, str):
            return value
        if t is str and isinstance(value, bool):
            # YAML 1.1 reads on/off/yes/no as booleans; the string switches spell them on/off.
            return "on" if value else "off"
        if t in (dict, tuple, list) and isinstance(value, (dict, list, tuple)):
            return tuple(value) if t is tuple else value
    raise ValueError(f"config: {name} must be of type {hint}, got {value!r}")


def sections(cls=TrainConfig) -> list[tuple[str, str]]:
    """(name, help) of every config section (for ``--help``)."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    return [(f.name, f.metadata.get("help", "")) for f in fields if dataclasses.is_dataclass(hints[f.name])]


def describe(cls=TrainConfig, prefix: str = "") -> list[str]:
    """One 'key (default): help' line per field, sections expanded (for --help and docs)."""
    lines = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            lines.extend(describe(hint, f"{prefix}{f.name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"{prefix}{f.name} ({default!r}): {f.metadata.get('help', '')}")
    return lines


def parse_overrides(tokens: list[str]) -> dict[str, str]:
    """``["--a.b", "1", "--c=2", "--flag", "--set", "d.e=3"]`` ->
    ``{"a.b": "1", "c": "2", "flag": "true", "d.e": "3"}``."""
    out: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "--set":
            if i + 1 >= len(tokens) or "=" not in tokens[i + 1]:
                raise ValueError("--set expects key=value (e.g. --set replay.cap=1.5)")
            key, value = tokens[i + 1].split("=", 1)
            out[key.strip().replace("-", "_")] = value
            i += 2
            continue
        if not tok.startswith("--") or len(tok) == 2:
            raise ValueError(f"unexpected argument {tok!r}: overrides look like --section.key value")
        key = tok[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            value = tokens[i + 1]
            i += 2
        else:
            value = "true"
            i += 1
        out[key.replace("-", "_")] = value
    return out


__all__ = [
    "ALIASES",
    "CONFIG_DIR",
    "DistributedConfig",
    "LoraConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "REWARD_VARIANTS",
    "ReplayConfig",
    "RewardConfig",
    "RolloutConfig",
    "SamplingConfig",
    "TASKS",
    "TaskConfig",
    "TinyModelConfig",
    "TrainConfig",
    "WarmStartConfig",
    "describe",
    "find_config",
    "load_yaml",
    "merge_overrides",
    "parse_overrides",
    "parse_value",
    "sections",
]
