"""Command line: ``rerule train | eval | demo | report``.

    rerule train --config smoke                    # a shipped config, by name (rerule/configs/smoke.yaml)
    rerule train --config x.yaml --replay.cap 1.5 --steps 10
    rerule train --config x.yaml --set replay.cap=1.5 --set steps=10     # the same, --set form
    rerule train --config x.yaml --resume          # continue exactly from the newest intact checkpoint
    rerule train --describe                        # every config key with its default and help
    rerule report runs/smoke                       # plots + summary of a run directory

One override syntax for every subcommand: ``--section.key value``, ``--section.key=value`` or
``--set section.key=value`` (repeatable). Values are read as YAML by OmegaConf (``true``, ``off``,
``1e-3``, ``[q_proj, v_proj]``); a bare ``--flag`` means true. Errors a user can cause (paths, the hub
offline, model type, data fields, the output directory) print one line; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import sys
from pathlib import Path

from rerule.train.config import TrainConfig, describe, parse_overrides, sections

# What a run writes under output_dir (removed by --overwrite; nothing else in the directory is touched).
RUN_FILES = ("metrics.jsonl", "run_info.json", "reference.pt", "checkpoints", "final", "tensorboard", "report")


def _config_epilog() -> str:
    lines = ["config sections (rerule train --describe lists every key with its default and help):"]
    lines += [f"  {name:<12} {help_}" for name, help_ in sections()]
    lines += ["", "config keys (override any with --KEY VALUE or --set KEY=VALUE):"]
    lines += [f"  {line}" for line in describe()]
    return "\n".join(lines)


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="RULE / ReRULE training",
        usage="rerule train [--config CONFIG] [--resume [{must,auto}]] [--overwrite] [--describe] "
              "[--eval-max-examples N] [--no-report] [--debug] [--SECTION.KEY VALUE | --set SECTION.KEY=VALUE ...]",
        description=__doc__,
        epilog=_config_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML config: a path or a shipped config's name (default: the defaults)")
    p.add_argument("--resume", nargs="?", const="must", choices=("must", "auto"), default=None,
                   help="continue from output_dir/checkpoints; an error when there is none, unless "
                        "--resume auto (then train from scratch)")
    p.add_argument("--overwrite", action="store_true",
                   help=f"train into a non-empty output_dir, removing the previous run's {', '.join(RUN_FILES)}")
    p.add_argument("--describe", action="store_true", help="list every config key with its default and help")
    p.add_argument("--eval-max-examples", type=int, default=32,
                   help="eval_every > 0: items of each probe set scored (default 32)")
    p.add_argument("--no-report", action="store_true", help="do not write report/ (plots) at the end")
    p.set_defaults(func=run_train)
    return p


def load_config(config: str | None, extra: list[str]) -> TrainConfig:
    """The TrainConfig of ``--config`` (path or shipped name) with the command line's overrides."""
    overrides = parse_overrides(extra)
    if config:
        return TrainConfig.from_yaml(config, overrides)
    return TrainConfig().apply_overrides(overrides)


def prepare_output_dir(out: str | Path, resume: str | None, overwrite: bool) -> None:
    """Refuse to mix two runs in one directory; check it is writable (before any model is loaded)."""
    from rerule.train.checkpoint import check_writable, list_checkpoints

    out = Path(out)
    present = [name for name in RUN_FILES if (out / name).exists()]
    # --resume auto with nothing to resume starts a fresh run: the same rule as no --resume.
    fresh = not resume or (resume == "auto" and not list_checkpoints(out / "checkpoints"))
    if present and fresh:
        if not overwrite:
            raise ValueError(
                f"output_dir {str(out)!r} already holds a run ({', '.join(present)}): pass --resume to continue "
                f"it, --overwrite to replace it, or another --output_dir"
            )
        for name in present:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    check_writable(out)


def make_evaluate_fn(max_examples: int | None):
    """``evaluate_fn(trainer)`` for ``eval_every``: the task's evaluator on the current policy (greedy)."""

    def evaluate_fn(trainer) -> dict:
        from rerule.eval import evaluate

        model = trainer.model
        was_training = model.training
        model.eval()
        try:
            return evaluate(model, trainer.tokenizer, trainer.task, max_examples=max_examples)
        finally:
            model.train(was_training)

    return evaluate_fn


def run_train(args: argparse.Namespace, extra: list[str]) -> list[dict]:
    if args.describe:
        print("\n".join(describe()))
        return []
    config = load_config(args.config, extra)
    if args.eval_max_examples is not None and args.eval_max_examples < 1:
        raise ValueError(f"--eval-max-examples must be >= 1, got {args.eval_max_examples}")
    if config.tensorboard == "on" and importlib.util.find_spec("tensorboard") is None:
        raise ValueError("tensorboard=on but tensorboard is not installed: pip install tensorboard (or "
                         "pip install -e '.[tensorboard]' in the clone), or --tensorboard off")
    if int(os.environ.get("RANK", "0")) == 0:  # one process prepares the directory of a launched run
        prepare_output_dir(config.output_dir, args.resume, args.overwrite)
    from rerule.train.trainer import Trainer

    evaluate_fn = make_evaluate_fn(args.eval_max_examples) if config.eval_every else None
    trainer = Trainer(config, resume=args.resume or False, evaluate_fn=evaluate_fn)
    history = trainer.train()
    if history and trainer.dist.is_main:
        last = history[-1]
        keys = ("step", "reward", "forget_reward", "boundary_reward", "forget_refusal_rate", "buffer_size")
        print(" ".join(f"{k}={last.get(k)}" for k in keys))
        _print_sizes(trainer)
        if not args.no_report:
            from rerule.train.report import write_report

            paths = write_report(trainer.out_dir)
            print(f"report: {paths[0].parent}")
    return history


def _print_sizes(trainer) -> None:
    from rerule.train.checkpoint import dir_size, human_size, latest_checkpoint

    latest = latest_checkpoint(trainer.ckpt_dir, verify=False)
    parts = []
    if latest is not None:
        parts.append(f"checkpoint {latest.name} {human_size(dir_size(latest))}")
    ref = trainer.out_dir / "reference.pt"
    parts.append(f"reference.pt {human_size(ref.stat().st_size)}" if ref.is_file()
                 else "reference: the initial model (not stored)")
    final = trainer.out_dir / "final"
    if final.is_dir():
        parts.append(f"final/ {human_size(dir_size(final))}")
    print("sizes: " + ", ".join(parts))


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("report", help="plots and a summary of a training run directory",
                              description="rerule report RUN_DIR: reward and refusal per source, eval quality, "
                                          "buffer size, IS weights and ESS, from RUN_DIR/metrics.jsonl")
    p.add_argument("run_dir", help="a training run's output_dir (holds metrics.jsonl)")
    p.add_argument("--out", default=None, help="where the plots go (default RUN_DIR/report)")
    p.set_defaults(func=run_report)
    return p


def run_report(args: argparse.Namespace) -> list[Path]:
    from rerule.train.report import write_report

    paths = write_report(args.run_dir, args.out)
    for path in paths:
        print(path)
    return paths


def _add_eval(subparsers) -> None:
    from rerule.eval.cli import add_eval_parser

    add_eval_parser(subparsers)


def _add_demo(subparsers) -> None:
    from rerule.demo.cli import add_demo_parser

    add_demo_parser(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rerule", description="RULE / ReRULE reinforcement unlearning",
                                     epilog="--debug (anywhere): show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    _add_eval(sub)
    _add_demo(sub)
    add_report_parser(sub)
    return parser


def _demo_overrides(args: argparse.Namespace, extra: list[str]) -> None:
    """``rerule demo --train.steps 5`` is ``--set train.steps=5``; ``--config NAME`` finds a shipped config."""
    from rerule.train.config import find_config

    args.set = list(args.set or []) + [f"{k}={v}" for k, v in parse_overrides(extra).items()]
    if getattr(args, "config", None):
        args.config = str(find_config(args.config))


class _StderrHandler(logging.StreamHandler):
    """Logs to whatever ``sys.stderr`` is at the time of the record (not the stream of the first call)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


USER_ERRORS = (ValueError, OSError, ImportError, KeyError)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not logging.getLogger().handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
        logging.getLogger().setLevel(logging.INFO)
    # rouge-score logs "Using default tokenizer." at INFO on every scorer it builds.
    logging.getLogger("absl").setLevel(logging.WARNING)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if args.command in ("train", "eval"):
            args.func(args, extra)
        elif args.command == "demo":
            _demo_overrides(args, extra)
            args.func(args)
        else:
            if extra:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            args.func(args)
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"rerule {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


def one_line(e: BaseException) -> str:
    """An exception as one line (its first line; the type name when it has no message)."""
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    lines = [x.strip() for x in text.strip().splitlines() if x.strip()]
    msg = lines[0] if lines else type(e).__name__
    if isinstance(e, (OSError, ImportError, KeyError)) and not isinstance(e, FileNotFoundError):
        msg = f"{type(e).__name__}: {msg}"
    elif isinstance(e, FileNotFoundError) and e.filename and str(e.filename) not in msg:
        msg = f"{msg}: {e.filename}"
    return msg + (" (--debug shows the traceback)" if len(lines) > 1 else "")


if __name__ == "__main__":
    sys.exit(main())
