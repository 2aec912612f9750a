"""The demo's arms: settings, the shared warm start, one RL run per arm with its evaluations and compute
counters (``run_arm``), all arms from one warm-started model (``run_arms``)."""

from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path

import yaml

DEFAULT_CONFIG = Path(__file__).parents[1] / "configs" / "demo.yaml"
KINDS = ("tiny", "smollm2")


def _say(msg: str) -> None:
    print(msg, flush=True)


def _set_dotted(data: dict, key: str, value) -> None:
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {key}: {p!r} is not a section")
    node[parts[-1]] = value


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (extra or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def load_settings(path: str | Path | None = None, overrides=()) -> dict:
    """The demo settings from YAML (default ``configs/demo.yaml``) with ``key=value`` overrides.

    Values are parsed as YAML (``train.steps=20``, ``sweep.hardness=[0.2,0.8]``). Every arm's
    TrainConfig is built here, so a bad key fails before any model is trained.
    """
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise ValueError(f"demo config {str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(value) if value.strip() else value)
    for section in ("world", "tokenizer", "model", "pretrain", "train", "arms", "eval"):
        if not isinstance(data.get(section), dict):
            raise ValueError(f"demo config: section {section!r} is missing or not a mapping")
    if not data["arms"]:
        raise ValueError("demo config: arms must name at least one arm")
    every = data["eval"].get("every")
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"demo config: eval.every must be an int >= 1, got {every!r}")
    for arm in data["arms"]:
        arm_config(data, arm, out_dir="unused")
    for arm, over in (data.get("diagnostic_arms") or {}).items():
        arm_config({**data, "arms": {arm: over}}, arm, out_dir="unused")
    return data


def base_config(settings: dict, *, kind: str = "tiny", seed: int | None = None, steps: int | None = None):
    """The shared TrainConfig: ``train`` (+ ``smollm2.train`` for that model), with seed / steps set."""
    from rerule.train.config import TrainConfig

    base = settings["train"]
    if kind == "smollm2":
        base = _merge(base, settings.get("smollm2", {}).get("train", {}))
    over = {"eval_every": _eval_cfg(settings, kind)["every"]}
    if seed is not None:
        over["seed"] = seed
    if steps is not None:
        over["steps"] = steps
    return TrainConfig.from_dict(base).apply_overrides(over)


def arm_config(
    settings: dict,
    arm: str,
    *,
    out_dir,
    kind: str = "tiny",
    seed: int | None = None,
    steps: int | None = None,
):
    """One arm's TrainConfig: :func:`base_config` with the arm's overrides and no warm start (the demo
    warm-starts once and hands every arm the same warm-started model)."""
    if arm not in settings["arms"]:
        raise ValueError(f"unknown arm {arm!r}; the config has {list(settings['arms'])}")
    over = {**(settings["arms"][arm] or {}), "output_dir": str(out_dir), "warm_start.epochs": 0}
    return base_config(settings, kind=kind, seed=seed, steps=steps).apply_overrides(over)


def _eval_cfg(settings: dict, kind: str) -> dict:
    return _merge(settings["eval"], settings.get("smollm2", {}).get("eval", {}) if kind == "smollm2" else {})


def evaluate_model(model, tokenizer, task, ev: dict) -> dict:
    """``evaluate_synthetic`` (forget refusal/leak, boundary quality/over-refusal, retain quality)."""
    from rerule.eval import evaluate_synthetic

    t0 = time.perf_counter()
    m = evaluate_synthetic(
        model, tokenizer, task, batch_size=ev.get("batch_size", 64), max_examples=ev.get("max_examples")
    )
    m["eval_time_s"] = time.perf_counter() - t0
    return m


def warm_start(world, cfg) -> dict:
    """Stage 0 once, in place on ``world.model`` (rejection steering; ``rerule.train.warm_start.warm_start``)."""
    from rerule.train.warm_start import warm_start as stage0

    t0 = time.perf_counter()
    ws = cfg.warm_start
    if ws.epochs <= 0:
        return {"warm_start_steps": 0, "time_s": 0.0}
    stats = stage0(
        world.model,
        world.tokenizer,
        world.task,
        ws,
        max_prompt_length=cfg.rollout.max_prompt_length,
        chat_template=cfg.rollout.chat_template,
        amp_dtype=None,
        seed=cfg.seed,
        kernel_impl=cfg.loss.kernel_impl,
    )
    world.model.eval()
    return {**stats, "time_s": time.perf_counter() - t0}


def run_arm(world, settings: dict, arm: str, out_dir: Path, *, kind="tiny", seed=None, steps=None, quiet=False) -> dict:
    """Train one arm from a copy of the warm-started model. Returns its history, evaluations, compute."""
    from rerule.train.trainer import Trainer

    shutil.rmtree(out_dir, ignore_errors=True)
    cfg = arm_config(settings, arm, out_dir=out_dir, kind=kind, seed=seed, steps=steps)
    ev = _eval_cfg(settings, kind)
    ages: list = []

    def evaluate_fn(trainer):
        return evaluate_model(trainer.model, trainer.tokenizer, trainer.task, ev)

    trainer = Trainer(
        cfg,
        model=copy.deepcopy(world.model),
        tokenizer=world.tokenizer,
        task=world.task,
        evaluate_fn=evaluate_fn,
    )

    def callback(m):
        # The buffer's mean age is not a trainer metric: read it here, after the step.
        entries = trainer.buffer.entries
        ages.append(sum(trainer.step - 1 - e.step for e in entries) / len(entries) if entries else None)
        if not quiet and "eval/boundary_quality" in m:
            _say(
                f"  [{arm:>11}] step {m['step']:3d}/{cfg.steps}"
                f"  forget-refusal {m['eval/forget_refusal_rate']:.2f}"
                f"  boundary-q {m['eval/boundary_quality']:.2f}  retain-q {m['eval/retain_quality']:.2f}"
                f"  buffer {m['buffer_size']:3d}  {m['time_step_s']:.2f}s/step"
            )
        return False

    cpu0, t0 = time.process_time(), time.perf_counter()
    history = trainer.train(callback=callback)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    for m, age in zip(history, ages):
        m["buffer_age_mean"] = age
    evals = [
        {"step": m["step"], **{k[5:]: v for k, v in m.items() if k.startswith("eval/")}}
        for m in history
        if any(k.startswith("eval/") for k in m)
    ]
    eval_wall = sum(e.get("eval_time_s", 0.0) for e in evals)
    # Checkpoints and the reference copy are the trainer's resume state; the demo does not resume.
    for junk in ("checkpoints", "reference.pt"):
        p = out_dir / junk
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return {
        "overrides": settings["arms"][arm],
        "seed": cfg.seed,
        "history": history,
        "evals": evals,
        "buffer_counters": dict(trainer.buffer.counters),
        "compute": {
            "steps": len(history),
            "generated_tokens": sum(m["generated_tokens"] for m in history),
            "train_tokens": sum(m["train_tokens"] for m in history),
            "step_wall_s": sum(m["time_step_s"] for m in history),
            "rollout_wall_s": sum(m["time_rollout_s"] for m in history),
            "update_wall_s": sum(m["time_update_s"] for m in history),
            "eval_wall_s": eval_wall,
            "total_wall_s": wall,
            # Process CPU time is what a loaded, shared machine does not inflate (evaluation included).
            "total_cpu_s": cpu,
        },
    }


def run_arms(
    world, settings: dict, out_dir: Path, *, kind="tiny", seed=None, steps=None, arms=None, quiet=False
) -> dict:
    """Warm start once, evaluate it (step 0), then every arm. Returns the report's core dict."""
    cfg0 = base_config(settings, kind=kind, seed=seed, steps=steps)
    ws = warm_start(world, cfg0)
    ev = _eval_cfg(settings, kind)
    step0 = {"step": 0, **evaluate_model(world.model, world.tokenizer, world.task, ev)}
    if not quiet:
        _say(
            f"warm start: {ws.get('warm_start_steps', 0)} SFT steps in {ws['time_s']:.1f}s; after it: "
            f"forget-refusal {step0['forget_refusal_rate']:.2f}  boundary-q {step0['boundary_quality']:.2f}"
            f"  retain-q {step0['retain_quality']:.2f}"
        )
    results = {}
    for arm in arms or list(settings["arms"]):
        if not quiet:
            _say(f"arm {arm}: {settings['arms'][arm]}")
        r = run_arm(world, settings, arm, out_dir / "arms" / arm, kind=kind, seed=seed, steps=steps, quiet=quiet)
        r["evals"].insert(0, dict(step0))
        results[arm] = r
    return {"warm_start": ws, "step0": step0, "arms": results, "steps": cfg0.steps, "seed": cfg0.seed}


def estimate_smollm2(model, tokenizer, task, settings: dict, finetune: bool = True) -> dict:
    """A rough time estimate for the smollm2 demo, from one timed forward/backward of a training batch.

    Fine-tuning: ``max_epochs`` passes over the QA pairs (an upper bound: it stops at the target
    accuracy). RL: per step about three times the forward/backward of its rollout rows (sampling,
    reference forward and update); evaluation is not counted.
    """
    from rerule.demo.world import _batch, qa_examples, unknown_people

    pre = settings["smollm2"]["pretrain"]
    unknown = unknown_people(task, pre.get("unknown_people", 0), pre.get("seed", 0))
    examples = qa_examples(task, tokenizer, unknown)
    ids, mask, labels = _batch(examples[: pre["batch_size"]], tokenizer.pad_token_id, "cpu")
    t0 = time.perf_counter()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    fb = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    cfg = base_config(settings, kind="smollm2")
    arms = settings["smollm2"].get("arms") or list(settings["arms"])
    rows = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    per_step = fb * rows / len(ids) * 3
    pretrain_s = fb * pre["max_epochs"] * len(examples) / len(ids) if finetune else 0.0
    rl_s = per_step * cfg.steps * len(arms)
    return {"fwd_bwd_s": fb, "pretrain_s_max": pretrain_s, "rl_s": rl_s, "total_s": pretrain_s + rl_s}
