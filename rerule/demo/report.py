"""The demo's report: summary numbers, a table, findings, ``report.json``, ``report.md`` and PNG plots.

Everything here is a function of the metric history the demo collected (``rerule.demo.run_arms``),
so it is tested on fake histories. A report dict holds::

    settings, steps, step0 (evaluation after the warm start),
    arms: {name: {history: [per-step trainer metrics], evals: [{step, forget_refusal_rate, ...}],
                  compute: {...}, buffer_counters: {...}, overrides}}

Definitions used in the table and the sweep:

- final: the last evaluation of an arm;
- steps to RULE's final boundary quality: the first evaluation step at which an arm's boundary
  quality is >= the reference arm's (RULE's) final boundary quality; ``None`` if it never gets there
  within the budget (the sweep plots those at budget + eval interval, marked as censored);
- replay diagnostics: share of hybrid steps that drew no group (buffer starvation), mean importance
  weight and ESS of the replayed tokens, share truncated at the cap, mean buffer age in steps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from rerule.demo import matched as dm
from rerule.demo.findings import REFERENCE_ARM, _fmt, findings
from rerule.demo.plots import PLOTS, plot_report

# Evaluation keys (rerule.eval.synthetic), with a label and whether higher is better.
ARM_EVAL_KEYS = {
    "forget_refusal_rate": ("forget refusal", True),
    "forget_leak": ("forget leak", False),
    "boundary_quality": ("boundary quality", True),
    "boundary_over_refusal": ("boundary over-refusal", False),
    "retain_quality": ("retain quality", True),
    "retain_refusal_rate": ("retain refusal", False),
}
# Per-step trainer metrics the report keeps as curves.
STEP_CURVES = (
    "grad_norm",
    "forget_refusal_rate",
    "boundary_reward",
    "forget_reward",
    "flat_group_frac",
    "buffer_size",
    "replay_groups",
    "is_weight_mean",
    "is_ess",
    "is_truncated_frac",
    "buffer_age_mean",
    "time_step_s",
    "generated_tokens",
    "train_tokens",
    "replay_ess",
    "replay_adv_sum_forget",
    "replay_adv_sum_boundary",
    "boundary_all_refuse_groups",
    "boundary_collapsed_prompts",
)


def _mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(xs)) if xs else None


def steps_to_reach(evals: list[dict], target: float, key: str = "boundary_quality") -> int | None:
    """First evaluation step whose ``key`` is >= ``target`` (None if none is)."""
    for e in evals:
        if e.get(key) is not None and e[key] >= target - 1e-9:
            return int(e["step"])
    return None


def steps_to_point(evals: list[dict], forget: float, boundary: float) -> int | None:
    """First evaluation step with forget refusal >= ``forget`` and boundary quality >= ``boundary``:
    when an arm first matches the reference arm's final operating point on both axes (None: never)."""
    for e in evals:
        f, b = e.get("forget_refusal_rate"), e.get("boundary_quality")
        if f is not None and b is not None and f >= forget - 1e-9 and b >= boundary - 1e-9:
            return int(e["step"])
    return None


def curve(history: list[dict], key: str) -> list:
    """[[step, value], ...] of a per-step metric (None values kept, JSON has null)."""
    return [[m["step"], m.get(key)] for m in history]


def replay_diagnostics(result: dict, staleness: int | None = None) -> dict:
    """Why replay did or did not matter: starvation, importance weights, staleness, admissions."""
    hist = result["history"]
    hybrid = [m for m in hist if m.get("stage") == "hybrid"]
    replayed = [m for m in hybrid if m.get("replay_groups")]
    return {
        "hybrid_steps": len(hybrid),
        "starved_frac": (1 - len(replayed) / len(hybrid)) if hybrid else None,
        "replay_groups_total": sum(m.get("replay_groups") or 0 for m in hist),
        "replay_forget_groups_total": sum(m.get("replay_forget_groups") or 0 for m in hist),
        "buffer_size_mean": _mean(m.get("buffer_size") for m in hist),
        "buffer_size_max": max((m.get("buffer_size") or 0 for m in hist), default=0),
        "is_weight_mean": _mean(m.get("is_weight_mean") for m in replayed),
        "is_weight_max": max((m.get("is_weight_max") or 0.0 for m in replayed), default=None),
        "is_ess_mean": _mean(m.get("is_ess") for m in replayed),
        "is_ess_min": min((m["is_ess"] for m in replayed if m.get("is_ess") is not None), default=None),
        "is_truncated_frac": _mean(m.get("is_truncated_frac") for m in replayed),
        "buffer_age_mean": _mean(m.get("buffer_age_mean") for m in hist),
        "staleness_limit": staleness,
        "flat_group_frac": _mean(m.get("flat_group_frac") for m in hist),
        # grad_clip rescales the summed gradient: when the replay term's norm is far above the fresh
        # one's, the clipped update is mostly replay.
        "grad_norm_on_policy": _mean(m.get("grad_norm") for m in hist if not m.get("replay_groups")),
        "grad_norm_with_replay": _mean(m.get("grad_norm") for m in replayed),
        "counters": result.get("buffer_counters", {}),
        # sequence-level ESS per replayed group (1..G) and, per source, the mean over replayed groups of
        # sum_i row_weight_i * A_i (0 for a consistent estimator; the first version's bias otherwise)
        "replay_ess_mean": _mean(m.get("replay_ess") for m in replayed),
        **{f"adv_sum_per_group_{src}": _per_group(hist, src) for src in ("forget", "boundary")},
        "boundary_collapsed_prompts_max": max((m.get("boundary_collapsed_prompts") or 0 for m in hist), default=0),
    }


def _per_group(hist: list[dict], source: str) -> float | None:
    groups = sum(m.get(f"replay_{source}_groups") or 0 for m in hist if m.get(f"replay_adv_sum_{source}") is not None)
    total = sum(m.get(f"replay_adv_sum_{source}") or 0.0 for m in hist)
    return total / groups if groups else None


def forget_dips(evals: list[dict], tol: float = 0.1) -> list[dict]:
    """Episodes where forget refusal fell more than ``tol`` below its running maximum: where each
    started, its running maximum, its lowest value, and the final value (one entry per episode)."""
    out, best, dip = [], None, None
    for e in evals:
        v = e.get("forget_refusal_rate")
        if v is None:
            continue
        if best is not None and v < best - tol:
            if dip is None:
                dip = {"step": e["step"], "from": best, "to": v}
                out.append(dip)
            dip["to"] = min(dip["to"], v)
        else:
            dip = None
        best = v if best is None else max(best, v)
    for d in out:
        d["final"] = evals[-1].get("forget_refusal_rate")
    return out


def summarize(report: dict) -> dict:
    """Per-arm finals, gains against RULE, compute, replay diagnostics, a table and findings."""
    arms = report["arms"]
    ref = REFERENCE_ARM if REFERENCE_ARM in arms else next(iter(arms))
    ref_final = arms[ref]["evals"][-1]["boundary_quality"]
    ref_forget = arms[ref]["evals"][-1]["forget_refusal_rate"]
    staleness = report.get("settings", {}).get("train", {}).get("replay", {}).get("staleness")
    out = {
        "reference_arm": ref,
        "reference_final_boundary_quality": ref_final,
        "reference_final_forget_refusal": ref_forget,
        "arms": {},
    }
    for name, r in arms.items():
        final = {k: r["evals"][-1].get(k) for k in ARM_EVAL_KEYS}
        comp = dict(r["compute"])
        comp["wall_s_per_step"] = comp["step_wall_s"] / max(comp["steps"], 1)
        out["arms"][name] = {
            "final": final,
            "boundary_quality_gain": None
            if final["boundary_quality"] is None
            else final["boundary_quality"] - ref_final,
            "steps_to_reference_final_bq": steps_to_reach(r["evals"], ref_final),
            "steps_to_reference_final_point": steps_to_point(r["evals"], ref_forget, ref_final),
            "best_boundary_quality": max((e["boundary_quality"] for e in r["evals"]), default=None),
            "compute": comp,
            "replay": replay_diagnostics(r, staleness),
            "beta": _arm_setting(report, name, "loss.beta"),
            "weight_kl": _arm_setting(report, name, "replay.weight_kl"),
            "normalize": _arm_setting(report, name, "replay.normalize"),
            "grad_clip": _arm_setting(report, name, "optim.grad_clip"),
            "forget_dips": forget_dips(r["evals"]),
            "matched": dm.arm_matched(r["evals"]),
        }
    out["matched_rows"] = matched_rows(out)
    out["matched_text"] = format_table(out["matched_rows"], MATCHED_COLUMNS)
    out["matched_md"] = format_table(out["matched_rows"], MATCHED_COLUMNS, markdown=True)
    out["table_rows"] = table_rows(out)
    out["table_text"] = format_table(out["table_rows"])
    out["table_md"] = format_table(out["table_rows"], markdown=True)
    out["findings"] = findings(out, report)
    return out


TABLE_COLUMNS = (
    "arm",
    "forget refusal",
    "forget leak",
    "boundary quality",
    "boundary over-refusal",
    "retain quality",
    "steps to RULE's final BQ",
    "steps to RULE's final F&BQ",
    "mean buffer",
    "mean w",
    "generated tokens",
    "train tokens",
    "wall s/step",
)


MATCHED_COLUMNS = ("arm", "front area") + tuple(
    f"{q} @ forget {L}" for L in dm.LEVELS for q in ("BQ", "RQ")
)


def matched_rows(summary: dict) -> list[list[str]]:
    """Per arm: front area, boundary / retain quality at each matched forgetting level ("-": never reached)."""
    rows = []
    for name, a in summary["arms"].items():
        m = a["matched"]
        row = [name, _fmt(m["front_area"], 3)]
        for L in dm.LEVELS:
            p = m["levels"][str(float(L))]
            row += ["-", "-"] if p is None else [_fmt(p["boundary_quality"], 3), _fmt(p["retain_quality"], 3)]
        rows.append(row)
    return rows


def table_rows(summary: dict) -> list[list[str]]:
    rows = []
    for name, a in summary["arms"].items():
        f, c, rp = a["final"], a["compute"], a["replay"]
        reach, point = a["steps_to_reference_final_bq"], a["steps_to_reference_final_point"]
        rows.append(
            [
                name,
                _fmt(f["forget_refusal_rate"]),
                _fmt(f["forget_leak"]),
                _fmt(f["boundary_quality"]),
                _fmt(f["boundary_over_refusal"]),
                _fmt(f["retain_quality"]),
                "never" if reach is None else str(reach),
                "never" if point is None else str(point),
                _fmt(rp["buffer_size_mean"], 1),
                _fmt(rp["is_weight_mean"]),
                _fmt(int(c["generated_tokens"])),
                _fmt(int(c["train_tokens"])),
                _fmt(c["wall_s_per_step"]),
            ]
        )
    return rows


def format_table(rows: list[list[str]], columns=TABLE_COLUMNS, markdown: bool = False) -> str:
    """A plain-text (aligned) or markdown table."""
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(str(c)), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*columns), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])


def _arm_setting(report: dict, arm: str, dotted: str):
    """An arm's effective train setting: its override, else the shared ``train`` section's value."""
    over = (report.get("arms", {}).get(arm) or {}).get("overrides") or {}
    if dotted in over:
        return over[dotted]
    node = report.get("settings", {}).get("train", {})
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def table_notes(summary: dict) -> list[str]:
    """How to read the table; the degenerate-metric note appears only when it applies."""
    notes = [
        "One seed per arm: seed-to-seed spread on this benchmark is large (run `rerule demo --sweep` for "
        "means and standard errors); read small differences as noise.",
        "Steps to RULE's final F&BQ: first evaluation step at which an arm has both RULE's final forget "
        "refusal and RULE's final boundary quality (or better).",
    ]
    reach = [a["steps_to_reference_final_bq"] for a in summary["arms"].values()]
    if reach and all(r == 0 for r in reach):
        notes.append(
            "Steps to RULE's final BQ is 0 for every arm: the warm-started model (step 0) already answers "
            "the boundary better than RULE ends, since boundary quality only falls while forgetting here. "
            "That metric is degenerate on this run; the F&BQ column is the informative one."
        )
    return notes


def report_markdown(report: dict) -> str:
    """report.md: settings in brief, the table, findings, compute and the plots."""
    s = report["summary"]
    pre = report.get("world", {}).get("pretrain", {})
    lines = [f"# rerule demo report ({report.get('kind', 'tiny')})", ""]
    w = report.get("settings", {}).get("world", {})
    took = "loaded from the cache" if pre.get("cached") else f"{_fmt(pre.get('time_s'), 0)} s"
    lines += [
        f"World: {w}. Pre-trained exact-match accuracy on the world's questions: "
        f"{_fmt(pre.get('accuracy'), 3)} after {pre.get('epochs')} epochs ({took}).",
        f"Every arm: {report.get('steps')} RL steps, seed {report.get('seed')}, from the same warm-started "
        f"model; reference arm for gains: {s['reference_arm']}.",
        "",
    ]
    lines += [
        "## At matched forgetting",
        "",
        "Boundary quality (BQ) and retain quality (RQ) where each arm's evaluation trajectory reaches forget "
        f"refusal {', '.join(str(x) for x in dm.LEVELS)} (the best point at or above it; segments between "
        "evaluations interpolated; '-': never reached). Front area: mean BQ at forgetting L over L in "
        f"[{dm.AREA_LO}, 1], 0 where not reached. One seed: `rerule demo --sweep` gives paired differences "
        "with standard errors.",
        "",
        s["matched_md"],
        "",
    ]
    lines += ["## Final evaluation (greedy) and compute", "", s["table_md"], ""]
    lines += [f"- {note}" for note in table_notes(s)] + [""]
    lines += ["## Findings (measured)", ""] + [f"- {x}" for x in s["findings"]] + [""]
    lines += [
        "## Compute per arm",
        "",
        "| arm | steps | generated tokens | train tokens | step wall s | "
        "rollout s | update s | eval s | total wall s | total CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, a in s["arms"].items():
        c = a["compute"]
        lines.append(
            f"| {name} | {c['steps']} | {c['generated_tokens']:,} | {c['train_tokens']:,} | "
            f"{c['step_wall_s']:.1f} | {c['rollout_wall_s']:.1f} | {c['update_wall_s']:.1f} | "
            f"{c['eval_wall_s']:.1f} | {c['total_wall_s']:.1f} | {c['total_cpu_s']:.1f} |"
        )
    t = report.get("timing", {})
    lines += ["", f"Demo wall time: {_fmt(t.get('total_wall_s'), 0)} s.", "", "## Plots", ""]
    lines += [f"![{p}]({p})" for p in PLOTS]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: str | Path) -> list[Path]:
    """Write report.json (with every curve), report.md and the plots into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report["curves"] = {
        name: {
            "eval": {k: [[e["step"], e.get(k)] for e in r["evals"]] for k in ARM_EVAL_KEYS},
            "step": {k: curve(r["history"], k) for k in STEP_CURVES},
        }
        for name, r in report["arms"].items()
    }
    paths = plot_report(report, out_dir)
    (out_dir / "report.md").write_text(report_markdown(report))
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, default=json_default))
    return [out_dir / "report.json", out_dir / "report.md", *paths]
