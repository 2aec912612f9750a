"""``rerule demo``: RULE vs ReRULE end to end on a CPU, with a report and plots.

    rerule demo                          # ~1.5 min on 2 CPU cores (world cached); runs/demo/report.{json,md} + PNGs
    rerule demo --set train.steps=20     # any demo.yaml key, dotted
    rerule demo --sweep                  # regimes x hardness x seeds at matched forgetting (~26 min)
    rerule demo --diagnose               # + the config's diagnostic arms (replay-loss ablations)
    rerule demo --model smollm2          # SmolLM2-135M-Instruct (make smollm2), slow on a CPU

What runs (every setting is in ``rerule/configs/demo.yaml``):

1. the synthetic world; a BPE tokenizer trained on its text; a tiny Llama pre-trained on its QA
   pairs until greedy answers are right (cached under ``cache_dir``, see ``rerule.demo.world``);
2. the warm start once (``warm_start.mode``: with_answers, or RULE's refusals-only
   rejection_steering), then four arms from that same model, with the same seed and step budget:
   RULE, RULE + prioritized prompt sampling (the on-policy control), ReRULE, ReRULE + prioritized;
3. greedy evaluation on the forget, boundary and retain sets every ``eval.every`` steps;
4. the arms at matched forgetting (``rerule.demo.matched``), then the final table on stdout,
   ``report.json``, ``report.md`` and PNG plots (``rerule.demo.report``).

Compute is counted per arm from the trainer's own per-step metrics: generated tokens, training
forward/backward tokens, wall time of the steps (evaluation excluded) and the process CPU time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rerule.demo.arms import DEFAULT_CONFIG, KINDS, _say, estimate_smollm2, load_settings, run_arms
from rerule.demo.report import summarize, table_notes, write_report


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
        from rerule.demo.sweep import run_sweep

        return run_sweep(settings, no_cache=args.no_cache)
    return run_single(settings, kind=args.model, no_cache=args.no_cache)


def run_single(settings: dict, *, kind: str = "tiny", no_cache: bool = False) -> dict:
    """The four-arm demo on one world. Writes the report files and prints the table."""
    from rerule.demo.world import prepare_world

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
    """Stand-alone entry point: ``python -m rerule.demo.cli [args]``."""
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


__all__ = ["add_demo_parser", "main", "run_demo", "run_single"]

if __name__ == "__main__":
    sys.exit(main())
