"""The demo's PNG plots (matplotlib, Agg backend): curves per arm of one run, and the sweep's gain.

Inputs are the report dicts of ``rerule.demo.report`` (arms with ``history`` and ``evals``; the
sweep's ``summary["stats"]``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

PLOTS = (
    "forget_refusal.png",
    "boundary_quality.png",
    "retain_quality.png",
    "tradeoff.png",
    "buffer_is.png",
    "compute.png",
)
REFERENCE_ARM = "RULE"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(ax, title, xlabel, fontsize=None) -> None:
    """Title, x label, a light grid and a small legend: every panel's finish."""
    ax.set_title(title, fontsize=fontsize)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _eval_series(r: dict, key: str):
    xs = [e["step"] for e in r["evals"] if e.get(key) is not None]
    return xs, [e[key] for e in r["evals"] if e.get(key) is not None]


def _step_series(r: dict, key: str):
    pts = [(m["step"], m[key]) for m in r["history"] if m.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_report(report: dict, out_dir: Path) -> list[Path]:
    """The PNGs (``PLOTS``) of a single demo run."""
    plt = _plt()
    arms, paths = report["arms"], []
    colors = dict(zip(arms, plt.rcParams["axes.prop_cycle"].by_key()["color"]))

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        paths.append(out_dir / name)

    for draw in (_plot_eval_curves, _plot_tradeoff, _plot_buffer, _plot_compute):
        draw(plt, arms, colors, save)
    return paths


def _plot_eval_curves(plt, arms: dict, colors: dict, save) -> None:
    """forget_refusal.png, boundary_quality.png, retain_quality.png: greedy evaluations per arm."""

    def panel(ax, key, title, per_step=None):
        for a, r in arms.items():
            ax.plot(*_eval_series(r, key), "o-", color=colors[a], label=f"{a} (greedy eval)")
            if per_step:
                ax.plot(*_step_series(r, per_step), ":", color=colors[a], alpha=0.6)
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    panel(ax, "forget_refusal_rate", "forget refusal rate (dotted: training rollouts)", "forget_refusal_rate")
    ax.legend(fontsize=8)
    save(fig, "forget_refusal.png")
    fig, axs = plt.subplots(1, 2, figsize=(12, 4.5))
    panel(axs[0], "boundary_quality", "boundary quality (ROUGE-L recall; hard cases)")
    panel(axs[1], "boundary_over_refusal", "boundary over-refusal")
    axs[0].legend(fontsize=8)
    save(fig, "boundary_quality.png")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    panel(ax, "retain_quality", "retain quality (ROUGE-L recall)")
    ax.legend(fontsize=8)
    save(fig, "retain_quality.png")


def _plot_tradeoff(plt, arms: dict, colors: dict, save) -> None:
    """tradeoff.png: boundary and retain quality against forget refusal."""
    # Arms that forget at different speeds are compared at equal forgetting: quality against refusal.
    fig, axs = plt.subplots(1, 2, figsize=(12, 4.5))
    for a, r in arms.items():
        fr = [e.get("forget_refusal_rate") for e in r["evals"]]
        for ax, key in zip(axs, ("boundary_quality", "retain_quality")):
            ax.plot(fr, [e.get(key) for e in r["evals"]], "o-", color=colors[a], label=a, alpha=0.8)
            ax.plot(fr[-1:], [r["evals"][-1].get(key)], "*", color=colors[a], ms=14)
    for ax, t in zip(axs, ("boundary quality", "retain quality")):
        _finish(ax, f"{t} against forget refusal (star: last evaluation)", "forget refusal rate (greedy eval)")
    save(fig, "tradeoff.png")


def _plot_buffer(plt, arms: dict, colors: dict, save) -> None:
    """buffer_is.png: buffer size, importance weights, ESS and gradient norms per step."""
    fig, axs = plt.subplots(1, 4, figsize=(20, 4.5))
    for a, r in arms.items():
        axs[0].plot(*_step_series(r, "buffer_size"), "-", color=colors[a], label=a)
        axs[1].plot(*_step_series(r, "is_weight_mean"), "o-", color=colors[a], label=f"{a} mean w")
        axs[2].plot(*_step_series(r, "is_ess"), "o-", color=colors[a], label=f"{a} ESS")
        axs[3].plot(*_step_series(r, "grad_norm"), "-", color=colors[a], label=a)
    # Gradient norms span orders of magnitude when a replayed term dominates (a flat batch gives 0).
    if any((m.get("grad_norm") or 0) > 0 for r in arms.values() for m in r["history"]):
        axs[3].set_yscale("log")
    for ax, t in zip(
        axs,
        (
            "replay buffer size (groups)",
            "mean importance weight of replayed tokens",
            "normalized ESS of replayed tokens",
            "gradient norm before clipping",
        ),
    ):
        _finish(ax, t, "RL step")
    save(fig, "buffer_is.png")


def _plot_compute(plt, arms: dict, colors: dict, save) -> None:
    """compute.png: wall time per step and tokens per arm."""
    fig, axs = plt.subplots(1, 2, figsize=(12, 4.5))
    for a, r in arms.items():
        axs[0].plot(*_step_series(r, "time_step_s"), "-", color=colors[a], label=a)
    _finish(axs[0], "wall time per step (s; rollout + update, no eval)", "RL step")
    names = list(arms)
    x = np.arange(len(names))
    gen = [arms[a]["compute"]["generated_tokens"] for a in names]
    trn = [arms[a]["compute"]["train_tokens"] for a in names]
    axs[1].bar(x - 0.2, gen, 0.4, label="generated tokens")
    axs[1].bar(x + 0.2, trn, 0.4, label="train fwd/bwd tokens")
    axs[1].set_xticks(x, names)
    axs[1].set_title("compute per arm (tokens)")
    axs[1].legend(fontsize=8)
    save(fig, "compute.png")


def _sweep_panels(stats: dict) -> list[tuple[str, str]]:
    return [(reg, h) for reg in stats for h in sorted(stats[reg], key=float)]


def plot_sweep(report: dict, out_dir: Path) -> Path:
    """Per regime, against hardness (mean ± standard error over seeds): front area, final boundary
    quality gain over RULE, steps to RULE's final boundary quality, final forget refusal."""
    plt = _plt()
    stats = report["summary"]["stats"]
    regimes = list(stats)
    panels = (
        ("area", "trade-off front area (mean BQ at forgetting >= L)"),
        ("gain", "final boundary quality gain over RULE"),
        ("reach", "steps to reach RULE's final boundary quality\n(never = budget + eval interval)"),
        ("fr", "final forget refusal"),
    )
    fig, axs = plt.subplots(len(regimes), 4, figsize=(20, 4.5 * len(regimes)), squeeze=False)
    for row, reg in zip(axs, regimes):
        hs = sorted(stats[reg], key=float)
        names = list(stats[reg][hs[0]])
        for i, arm in enumerate(names):
            x = np.array([float(h) for h in hs]) + (i - len(names) / 2) * 0.01
            ref = arm == REFERENCE_ARM
            for ax, (key, _) in zip(row, panels):
                if ref and key == "gain":
                    continue
                ax.errorbar(x, [stats[reg][h][arm][key][0] for h in hs], yerr=[stats[reg][h][arm][key][1] for h in hs],
                            fmt="s--" if ref else "o-", color="k" if ref else None, capsize=3, label=arm)
        row[1].axhline(0, color="k", lw=0.8)
        for ax, (_, title) in zip(row, panels):
            _finish(ax, f"{reg}: {title}", "hardness (boundary/forget similarity)", fontsize=10)
    fig.suptitle("mean ± standard error over seeds")
    fig.tight_layout()
    path = out_dir / "sweep_gain.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_sweep_fronts(report: dict, out_dir: Path) -> Path:
    """The trade-off fronts (boundary quality at forget refusal >= L, against L) per regime and hardness:
    mean over seeds with a ± standard-error band (seeds that reach L)."""
    from rerule.demo.matched import front_curve

    plt = _plt()
    cells = report["cells"]
    keys = sorted({(c.get("regime") or "with_answers", str(c["hardness"])) for c in cells},
                  key=lambda k: (k[0], float(k[1])))
    regimes = sorted({k[0] for k in keys})
    hards = sorted({k[1] for k in keys}, key=float)
    fig, axs = plt.subplots(len(regimes), len(hards), figsize=(5.5 * len(hards), 4.2 * len(regimes)), squeeze=False)
    for i, reg in enumerate(regimes):
        for j, h in enumerate(hards):
            ax = axs[i][j]
            mine = [c for c in cells if (c.get("regime") or "with_answers") == reg and str(c["hardness"]) == h]
            arms = list(mine[0]["arms"]) if mine else []
            for arm in arms:
                curves = [front_curve(c["arms"][arm]["evals"]) for c in mine]
                xs = np.array(curves[0][0])
                ys = np.array([cv[1] for cv in curves], dtype=float)
                n = np.sum(~np.isnan(ys), axis=0)
                # levels no seed (or one seed) reaches have no mean (no standard error): nan, not plotted
                with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
                    warnings.simplefilter("ignore", RuntimeWarning)
                    mean = np.nanmean(ys, axis=0)
                    se = np.nanstd(ys, axis=0, ddof=1) / np.sqrt(n) if len(ys) > 1 else np.zeros_like(xs)
                ref = arm == REFERENCE_ARM
                line = ax.plot(xs, mean, "--" if ref else "-", color="k" if ref else None, label=arm)[0]
                ax.fill_between(xs, mean - se, mean + se, color=line.get_color(), alpha=0.15)
            ax.set_ylabel("best boundary quality at forget refusal >= L")
            _finish(ax, f"{reg}, hardness {h}", "forget refusal L", fontsize=10)
    fig.suptitle("trade-off fronts: mean ± standard error over the seeds that reach L")
    fig.tight_layout()
    path = out_dir / "sweep_front.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
