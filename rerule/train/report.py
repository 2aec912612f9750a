"""``rerule report RUN_DIR``: plots and a text summary of a training run, from its ``metrics.jsonl``.

``rerule train`` writes the same report to ``output_dir/report/`` when it ends (``--no-report`` skips
it). Panels (a panel is left out when the run logged none of its keys):

- ``reward.png``: mean reward of the fresh groups, per source (forget, boundary) and overall;
- ``refusal.png``: refusal rate of the sampled completions, per source;
- ``eval.png``: the ``eval/*`` scores of ``eval_every`` (greedy: boundary / retain quality, refusal ...);
- ``buffer.png``: replay buffer size (forget / boundary groups) and groups replayed per step;
- ``importance.png``: the replayed tokens' IS weights (mean, max, truncated share) and their ESS;
- ``summary.md``: first / last / best value of every logged number.

Example:
    >>> from rerule.train.report import write_report   # doctest: +SKIP
    >>> write_report("runs/smoke")               # doctest: +SKIP
    [PosixPath('runs/smoke/report/reward.png'), ..., PosixPath('runs/smoke/report/summary.md')]
"""

from __future__ import annotations

import json
import math
from pathlib import Path

PANELS = {
    "reward.png": ("reward per source (fresh groups)", ("forget_reward", "boundary_reward", "reward")),
    "refusal.png": ("refusal rate of sampled completions", ("forget_refusal_rate", "boundary_refusal_rate")),
    "eval.png": ("evaluation every eval_every steps (greedy)", ("eval/*",)),
    "buffer.png": ("replay buffer", ("buffer_size", "buffer_forget", "buffer_boundary", "replay_groups")),
    "importance.png": ("importance weights of replayed tokens", ("is_weight_mean", "is_weight_max",
                                                                  "is_truncated_frac", "is_ess")),
}


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of ``run_dir/metrics.jsonl`` (ValueError naming the file and line when unreadable)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path} does not exist: RUN_DIR must be a training run's output_dir")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON line ({e.msg})") from None
    if not rows:
        raise ValueError(f"{path} has no rows yet")
    return rows


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def _keys(rows: list[dict], patterns) -> list[str]:
    seen = []
    for p in patterns:
        if p.endswith("*"):
            seen += sorted({k for r in rows for k in r if k.startswith(p[:-1]) and k not in seen})
        elif p not in seen:
            seen.append(p)
    return [k for k in seen if _series(rows, k)[0]]


def summary(rows: list[dict]) -> str:
    """A markdown table: first, last, min and max of every numeric key."""
    keys = [k for k in rows[-1] if k != "step" and _series(rows, k)[0]]
    for r in rows:
        keys += [k for k in r if k not in keys and k != "step" and _series(rows, k)[0]]
    lines = [f"# run summary ({len(rows)} steps logged, last step {rows[-1]['step']})", "",
             "| metric | first | last | min | max |", "|---|---|---|---|---|"]
    for k in keys:
        _, ys = _series(rows, k)
        lines.append(f"| {k} | {ys[0]:.4g} | {ys[-1]:.4g} | {min(ys):.4g} | {max(ys):.4g} |")
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Write the plots and ``summary.md`` of ``run_dir`` into ``out`` (default ``run_dir/report``);
    returns the paths written (summary last)."""
    rows = read_metrics(run_dir)
    out = Path(out) if out is not None else Path(run_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name, (title, patterns) in PANELS.items():
        keys = _keys(rows, patterns)
        if not keys:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        ess_ax = None
        for k in keys:
            xs, ys = _series(rows, k)
            if k == "is_ess":
                ess_ax = ess_ax or ax.twinx()
                ess_ax.plot(xs, ys, "k--", marker=".", label="ESS / n (right)")
                ess_ax.set_ylim(0, 1.05)
                ess_ax.legend(loc="lower right", fontsize=8)
            else:
                ax.plot(xs, ys, marker=".", label=k)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        paths.append(out / name)
    (out / "summary.md").write_text(summary(rows))
    paths.append(out / "summary.md")
    return paths
