"""``rerule demo``: RULE vs ReRULE end to end on a CPU, with a report and plots.

    rerule demo                          # ~1.5 min on 2 CPU cores (world cached); runs/demo/report.{json,md} + PNGs
    rerule demo --set train.steps=20     # any demo.yaml key, dotted
    rerule demo --sweep                  # regimes x hardness x seeds at matched forgetting (~26 min)
    rerule demo --diagnose               # + the config's diagnostic arms (replay-loss ablations)
    rerule demo --model smollm2          # SmolLM2-135M-Instruct (make smollm2), slow on a CPU

What runs (every setting is in ``rerule/configs/demo.yaml``):

1. the synthetic world; a BPE tokenizer trained on its text; a tiny Llama pre-trained on its QA
   pairs until greedy answers are right (cached under ``cache_dir``, see ``rerule.demo_world``);
2. the warm start (rejection steering) once, then four arms from that same model, with the same
   seed and step budget: RULE, RULE + prioritized prompt sampling (the on-policy control), ReRULE,
   ReRULE + prioritized sampling;
3. greedy evaluation on the forget, boundary and retain sets every ``eval.every`` steps;
4. a table on stdout, ``report.json``, ``report.md`` and PNG plots (``rerule.demo_report``).

Compute is counted per arm from the trainer's own per-step metrics: generated tokens, training
forward/backward tokens, wall time of the steps (evaluation excluded) and the process CPU time.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import time
from pathlib import Path

import yaml

from rerule.demo_report import ARM_EVAL_KEYS, summarize, table_notes, write_report

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"
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
    from rerule.config import TrainConfig

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
    """Stage 0 once, in place on ``world.model`` (rejection steering; ``rerule.stages.warm_start``)."""
    from rerule.stages import warm_start as stage0

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
    from rerule.trainer import Trainer

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
    from rerule.demo_world import _batch, qa_examples, unknown_people

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


def run_demo(args: argparse.Namespace) -> dict:
    """``rerule demo`` from parsed arguments; returns the report (or the sweep report)."""
    import logging

    import torch

    # rouge-score logs "Using default tokenizer." at INFO on every scorer it builds.
    logging.getLogger("absl").setLevel(logging.WARNING)
    settings = load_settings(args.config, args.set or [])
    if settings.get("torch_threads"):
        # Tiny matrices: more threads mostly add synchronization, and the CPU may be shared.
        torch.set_num_threads(int(settings["torch_threads"]))
    if args.out:
        settings["out_dir"] = args.out
    if args.steps is not None:
        settings["train"]["steps"] = args.steps
    if args.diagnose:
        settings["arms"] = {**settings["arms"], **(settings.get("diagnostic_arms") or {})}
    if args.sweep:
        from rerule.demo_sweep import run_sweep

        return run_sweep(settings, no_cache=args.no_cache)
    return run_single(settings, kind=args.model, no_cache=args.no_cache)


def run_single(settings: dict, *, kind: str = "tiny", no_cache: bool = False) -> dict:
    """The four-arm demo on one world. Writes the report files and prints the table."""
    from rerule.demo_world import prepare_world

    if kind not in KINDS:
        raise ValueError(f"--model must be one of {KINDS}, got {kind!r}")
    t0 = time.perf_counter()
    out = Path(settings["out_dir"]) / ("smollm2" if kind == "smollm2" else "")
    out.mkdir(parents=True, exist_ok=True)
    _say(f"rerule demo ({kind}): world {settings['world']}")
    arms = settings["smollm2"].get("arms") if kind == "smollm2" else None

    def announce(model, tokenizer, task, cached):
        if kind != "smollm2":
            return
        est = estimate_smollm2(model, tokenizer, task, settings, finetune=not cached)
        _say(
            f"smollm2 estimate: {est['fwd_bwd_s']:.1f}s per training forward/backward of "
            f"{settings['smollm2']['pretrain']['batch_size']} QA pairs; fine-tuning up to "
            f"{est['pretrain_s_max'] / 60:.0f} min, RL ~{est['rl_s'] / 60:.0f} min "
            f"({len(arms or settings['arms'])} arms); total ~{est['total_s'] / 60:.0f} min plus evaluation"
        )

    world = prepare_world(
        settings,
        kind=kind,
        cache_dir=settings.get("cache_dir"),
        use_cache=not no_cache,
        progress=_say,
        on_model=announce,
    )
    _say(f"world: {world.task.summary()}; pre-trained exact-match accuracy {world.info['accuracy']:.3f}")
    core = run_arms(world, settings, out, kind=kind, arms=arms)
    report = {
        "kind": kind,
        "settings": settings,
        "world": {
            "sizes": world.task.summary(),
            "hardness": world.task.meta["hardness"],
            "pretrain": world.info,
        },
        **core,
    }
    report["summary"] = summarize(report)
    report["timing"] = {"total_wall_s": time.perf_counter() - t0}
    paths = write_report(report, out)
    _say("\nat matched forgetting:\n" + report["summary"]["matched_text"])
    _say("\nfinal evaluation:\n" + report["summary"]["table_text"])
    for line in table_notes(report["summary"]) + report["summary"]["findings"]:
        _say(f"- {line}")
    _say(f"\nwrote {', '.join(str(p) for p in paths)}")
    _say(f"demo wall time {report['timing']['total_wall_s']:.0f}s")
    return report


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``demo`` to an argparse subparsers object (sets ``func=run_demo``)."""
    p = subparsers.add_parser(
        "demo",
        help="RULE vs ReRULE end to end on a CPU, with a report and plots",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(p)
    p.set_defaults(func=run_demo)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help=f"demo settings YAML (default {DEFAULT_CONFIG.name})")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a setting (repeatable)")
    p.add_argument("--out", default=None, help="output directory (default: out_dir of the config)")
    p.add_argument("--steps", type=int, default=None, help="RL steps per arm (train.steps)")
    p.add_argument("--model", choices=KINDS, default="tiny", help="tiny (default) or smollm2")
    p.add_argument("--sweep", action="store_true",
                   help="warm-start regime x hardness x seeds sweep (the config's sweep section), not the single demo")
    p.add_argument(
        "--diagnose",
        action="store_true",
        help="also run the diagnostic_arms of the config (why replay helps or hurts)",
    )
    p.add_argument("--no-cache", action="store_true", help="pre-train again even if a cached model exists")


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m rerule.demo [args]``."""
    p = argparse.ArgumentParser(
        prog="rerule demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_arguments(p)
    args = p.parse_args(argv)
    try:
        run_demo(args)
    except ValueError as e:
        print(f"rerule demo: error: {e}", file=sys.stderr)
        return 2
    return 0


__all__ = [
    "ARM_EVAL_KEYS",
    "add_demo_parser",
    "arm_config",
    "load_settings",
    "main",
    "run_arm",
    "run_arms",
    "run_demo",
    "run_single",
]

if __name__ == "__main__":
    sys.exit(main())
