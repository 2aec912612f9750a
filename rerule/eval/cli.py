"""``rerule eval``: score a saved model on a task, write a JSON report, print a table.

    rerule eval --model runs/smoke/final --config smoke          # the task of a training config
    rerule eval --model runs/me/checkpoints/step-000010 --task.name custom --task.data_dir my_data
    rerule eval --model out/ckpt --benchmark tofu --forget forget10 --retain-log retain_report.json

The task comes from a training config (``--config``: a YAML path or a shipped config's name, the same
files as ``rerule train``), changed by the same overrides (``--task.data_dir DIR`` or ``--set
task.data_dir=DIR``); ``--benchmark``, ``--data-dir`` and ``--forget`` are shorthands for ``task.name``,
``task.data_dir`` and ``task.forget``. ``--model`` is any folder ``rerule train`` wrote (``final/`` or a
checkpoint ``step-N/``), a ``save_pretrained`` folder, a ``.gguf`` file, ``smollm2`` or a hub id; with
``--config`` it defaults to the config's ``output_dir/final``.

The report holds the metrics and the per-sample values behind them. A TOFU
report's ``samples["forget_truth_ratios"]`` makes it the ``--retain-log`` of
another model's Forget Quality (run ``rerule eval`` once on the retain model);
a MUSE or TOFU report's ``metrics["privleak_auc"]`` makes it the reference for
PrivLeak (run it on the retrained / retain model; without one, MUSE uses its
published retrained AUC, Books 0.5393 / News 0.4772, and TOFU uses 0.5).

``rerule/cli.py`` wires :func:`add_eval_parser` and :func:`run_eval` in.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

from rerule.data import BENCHMARKS, load_task

DEFAULT_OUT = "eval_report.json"
FORGET_SPLITS = re.compile(r"^(forget\d\d|books|news)$")
log = logging.getLogger(__name__)


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``eval`` sub-command to an ``argparse`` subparsers object (sets ``func=run_eval``)."""
    p = subparsers.add_parser(
        "eval",
        help="score a model on tofu / muse / rwku / synthetic / custom",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default=None,
                   help="model folder (final/, a checkpoint step-N/), .gguf file, smollm2 or hub id "
                        "(default with --config: its output_dir/final)")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: --model)")
    p.add_argument("--config", default=None,
                   help="training config YAML (path or shipped name) whose task is scored")
    p.add_argument("--benchmark", default=None, choices=BENCHMARKS, help="task.name (default: synthetic)")
    p.add_argument("--data-dir", default=None, help="task.data_dir: local benchmark files (default: the hub)")
    p.add_argument("--forget", default=None,
                   help="task.forget: TOFU forget01|forget05|forget10 (default forget10); MUSE books|news "
                        "(default books); custom: a hub dataset id")
    p.add_argument("--retain-log", default=None,
                   help="report of a retain (TOFU: Forget Quality, PrivLeak) or retrained (MUSE: PrivLeak) "
                        "model from rerule eval")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"JSON report path (default {DEFAULT_OUT})")
    p.add_argument("--max-examples", type=int, default=None, help="first N items of every probe set")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None, help="override each probe set's length")
    p.add_argument("--seed", type=int, default=None, help="synthetic: task.kwargs.seed (default 0)")
    p.add_argument("--hardness", type=float, default=None, help="synthetic: task.kwargs.hardness (default 0.8)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run_eval)
    return p


def _retain_log(path: str, benchmark: str) -> dict[str, Any]:
    """The evaluator keyword that a reference model's report provides."""
    report = json.loads(Path(path).read_text())
    if benchmark == "tofu":
        ratios = report.get("samples", {}).get("forget_truth_ratios")
        if not ratios:
            raise ValueError(
                f"{path}: no samples.forget_truth_ratios; make it with rerule eval --benchmark tofu"
            )
        out = {"retain_truth_ratios": ratios}
        auc = report.get("metrics", {}).get("privleak_auc")
        if auc is not None:  # the retain model's PrivLeak AUC is the reference for TOFU's PrivLeak
            out["reference_auc"] = auc
        return out
    if benchmark == "muse":
        auc = report.get("metrics", {}).get("privleak_auc")
        if auc is None:
            raise ValueError(f"{path}: no metrics.privleak_auc; make it with rerule eval --benchmark muse")
        return {"reference_auc": auc}
    raise ValueError(f"--retain-log is used by tofu and muse, not {benchmark}")


def _table(metrics: dict[str, float]) -> str:
    width = max(len(k) for k in metrics) if metrics else 6
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    lines += [f"{k:<{width}}  {v:.4f}" for k, v in metrics.items()]
    return "\n".join(lines)


def resolve_task_config(args: argparse.Namespace, extra: list[str] | None = None):
    """The TrainConfig whose ``task`` is scored: ``--config`` + overrides + the shorthand flags."""
    from rerule.train.config import TrainConfig, find_config, parse_overrides

    config = args.config
    if config and FORGET_SPLITS.match(config) and not Path(config).is_file():
        # Older spelling: --config was another name for --forget.
        log.warning("rerule eval --config %s: use --forget %s (--config now takes a YAML config)", config, config)
        args.forget, config = args.forget or config, None
    overrides = parse_overrides(list(extra or []))
    if args.benchmark:
        overrides["task.name"] = args.benchmark
    if args.data_dir:
        overrides["task.data_dir"] = args.data_dir
    if args.forget:
        overrides["task.forget"] = args.forget
    name = overrides.get("task.name")
    if args.seed is not None:
        overrides["task.kwargs.seed"] = str(args.seed)
    if args.hardness is not None:
        overrides["task.kwargs.hardness"] = str(args.hardness)
    if config:
        return TrainConfig.from_yaml(find_config(config), overrides)
    if name in (None, "synthetic"):
        overrides.setdefault("task.kwargs.seed", "0")
        overrides.setdefault("task.kwargs.hardness", "0.8")
    return TrainConfig().apply_overrides(overrides)


def run_eval(args: argparse.Namespace, extra: list[str] | None = None) -> dict[str, Any]:
    """Run ``rerule eval`` from parsed arguments (and ``--section.key value`` overrides); returns the report
    it wrote."""
    import torch

    from rerule.eval import evaluate
    from rerule.train.model import load_pretrained
    from rerule.version import __version__

    cfg = resolve_task_config(args, extra)
    if args.model is None:
        if not args.config:
            raise ValueError("--model is required (or --config, to score its output_dir/final)")
        args.model = str(Path(cfg.output_dir) / "final")
    args.benchmark = cfg.task.name
    t = cfg.task
    task = load_task(t.name, forget=t.forget, data_dir=t.data_dir, **t.kwargs)
    extra = _retain_log(args.retain_log, args.benchmark) if args.retain_log else {}

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {args.dtype!r}")
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model, tokenizer = load_pretrained(args.model, args.tokenizer, dtype=dtype)
    model = model.to(device)

    metrics, samples = evaluate(
        model, tokenizer, task, batch_size=args.batch_size, max_examples=args.max_examples,
        max_new_tokens=args.max_new_tokens, progress=not args.no_progress, return_samples=True, **extra,
    )
    report = {
        "benchmark": args.benchmark,
        "task": task.name,
        "model": str(args.model),
        "rerule_version": __version__,
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "sizes": task.summary(),
        "metrics": metrics,
        "samples": samples,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    print(f"{task.name} · {args.model}\n{_table(metrics)}\nreport: {out}", file=sys.stdout)
    return report
