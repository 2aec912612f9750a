"""Command line: ``rerule train | eval | demo``.

    rerule train --config rerule/configs/tiny_synthetic.yaml --replay.cap 1.5 --steps 10
    rerule train --config x.yaml --resume          # continue exactly from the newest checkpoint
    rerule train --describe                        # every config key with its default and help

Any ``--section.key value`` (or ``--section.key=value``) after the known flags overrides the YAML;
values are parsed as YAML (``true``, ``1e-3``, ``[q_proj, v_proj]``). A bare ``--flag`` means true.
"""

from __future__ import annotations

import argparse
import logging
import sys

from rerule.config import TrainConfig, describe


def parse_overrides(tokens: list[str]) -> dict[str, str]:
    """``["--a.b", "1", "--c=2", "--flag"]`` -> ``{"a.b": "1", "c": "2", "flag": "true"}``."""
    out: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
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


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="RULE / ReRULE training",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML config (default: the TrainConfig defaults)")
    p.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoints (exactly)")
    p.add_argument("--describe", action="store_true", help="list every config key with its default and help")
    p.set_defaults(func=run_train)
    return p


def run_train(args: argparse.Namespace, extra: list[str]) -> list[dict]:
    if args.describe:
        print("\n".join(describe()))
        return []
    overrides = parse_overrides(extra)
    if args.config:
        config = TrainConfig.from_yaml(args.config, overrides)
    else:
        config = TrainConfig().apply_overrides(overrides)
    from rerule.trainer import Trainer

    trainer = Trainer(config, resume=args.resume)
    history = trainer.train()
    if history and trainer.dist.is_main:
        last = history[-1]
        keys = ("step", "reward", "forget_reward", "boundary_reward", "forget_refusal_rate", "buffer_size")
        print(" ".join(f"{k}={last.get(k)}" for k in keys))
    return history


def _add_eval(subparsers) -> None:
    try:
        from rerule.eval.cli import add_eval_parser, run_eval  # noqa: F401
    except ImportError:
        return
    add_eval_parser(subparsers)


def _add_demo(subparsers) -> None:
    try:
        from rerule.demo import add_demo_parser
    except ImportError:
        p = subparsers.add_parser("demo", help="the four-arm CPU demo (not wired yet)")
        p.set_defaults(func=_demo_placeholder)
        return
    add_demo_parser(subparsers)


def _demo_placeholder(args, extra=None):
    raise NotImplementedError("rerule demo is not wired yet (rerule/demo.py does not exist)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rerule", description="RULE / ReRULE reinforcement unlearning")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    _add_eval(sub)
    _add_demo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command != "train" and extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "train":
            args.func(args, extra)
        else:
            args.func(args)
    except ValueError as e:
        print(f"rerule {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
