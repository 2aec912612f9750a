"""``rerule eval``: score a saved model on a benchmark, write a JSON report, print a table.

    rerule eval --model out/ckpt --benchmark tofu --forget forget10 --retain-log retain_report.json

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
import sys
from pathlib import Path
from typing import Any

from rerule.data import BENCHMARKS, load_task, synthetic_world

DEFAULT_OUT = "eval_report.json"


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``eval`` sub-command to an ``argparse`` subparsers object (sets ``func=run_eval``)."""
    p = subparsers.add_parser(
        "eval",
        help="score a model on tofu / muse / rwku / synthetic",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="model directory or hub id (AutoModelForCausalLM)")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: --model)")
    p.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    p.add_argument("--data-dir", default=None, help="local benchmark files (default: the hub)")
    p.add_argument(
        "--forget",
        "--config",
        dest="forget",
        default=None,
        help="TOFU forget01|forget05|forget10 (default forget10); MUSE books|news (default books)",
    )
    p.add_argument("--retain-log", default=None,
                   help="report of a retain (TOFU: Forget Quality, PrivLeak) or retrained (MUSE: PrivLeak) "
                        "model from rerule eval")  # fmt: skip
    p.add_argument("--out", default=DEFAULT_OUT, help=f"JSON report path (default {DEFAULT_OUT})")
    p.add_argument("--max-examples", type=int, default=None, help="first N items of every probe set")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None, help="override each probe set's length")
    p.add_argument("--seed", type=int, default=0, help="synthetic world seed")
    p.add_argument("--hardness", type=float, default=0.8, help="synthetic world hardness in [0, 1]")
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


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``rerule eval`` from parsed arguments; returns the report it wrote."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rerule.eval import evaluate
    from rerule.version import __version__

    if args.benchmark == "synthetic":
        task = synthetic_world(seed=args.seed, hardness=args.hardness)
    else:
        task = load_task(args.benchmark, forget=args.forget, data_dir=args.data_dir)
    extra = _retain_log(args.retain_log, args.benchmark) if args.retain_log else {}

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)

    metrics, samples = evaluate(
        model, tokenizer, task, batch_size=args.batch_size, max_examples=args.max_examples,
        max_new_tokens=args.max_new_tokens, progress=not args.no_progress, return_samples=True, **extra,
    )  # fmt: skip
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
