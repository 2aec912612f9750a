"""The demo report's findings in words: arm-against-arm differences at the final evaluation, and why
replay helped or hurt an arm (``replay_verdict``), from a ``summarize``d report."""

from __future__ import annotations

import numpy as np

REFERENCE_ARM = "RULE"
STANDARD_ARMS = ("RULE", "RULE+prio", "ReRULE", "ReRULE+prio")
# Differences in final quality smaller than this are reported as "no clear difference" on one seed.
NOISE = 0.02


def _fmt(v, digits=2):
    if v is None:
        return "-"
    if isinstance(v, (int, np.integer)):
        return f"{v:,}"
    return f"{v:.{digits}f}"


def _diff_line(summary, a, b) -> str | None:
    if a not in summary["arms"] or b not in summary["arms"]:
        return None
    fa, fb = summary["arms"][a]["final"], summary["arms"][b]["final"]
    d = fa["boundary_quality"] - fb["boundary_quality"]
    verdict = "no clear difference" if abs(d) < NOISE else ("higher" if d > 0 else "lower")
    return (
        f"{a} vs {b}: final boundary quality {fa['boundary_quality']:.3f} vs {fb['boundary_quality']:.3f} "
        f"({d:+.3f}, {verdict}); forget refusal {fa['forget_refusal_rate']:.2f} vs "
        f"{fb['forget_refusal_rate']:.2f}; retain quality {fa['retain_quality']:.2f} vs "
        f"{fb['retain_quality']:.2f}"
    )


def findings(summary: dict, report: dict) -> list[str]:
    """Plain statements of what was measured, and, where replay did not help, the measured reasons."""
    lines = []
    step0 = report.get("step0")
    if step0:
        lines.append(
            f"after the warm start (step 0): forget refusal {step0['forget_refusal_rate']:.2f}, boundary "
            f"quality {step0['boundary_quality']:.3f}, retain quality {step0['retain_quality']:.3f}"
        )
    for a, b in (
        ("ReRULE", "RULE"),
        ("RULE+prio", "RULE"),
        ("ReRULE", "RULE+prio"),
        ("ReRULE+prio", "RULE+prio"),
        ("ReRULE+prio", "RULE"),
    ):
        line = _diff_line(summary, a, b)
        if line:
            lines.append(line)
    # Diagnostic arms (rerule demo --diagnose) against their on-policy twin.
    for name in summary["arms"]:
        twin = _twin(summary, name)
        if name not in STANDARD_ARMS and twin is not None:
            lines.append(_diff_line(summary, name, twin))
    for name, a in summary["arms"].items():
        rp = a["replay"]
        if rp["hybrid_steps"]:
            lines.append(f"{name} replay: " + _replay_line(rp))
            lines.extend(f"{name}: {why}" for why in replay_verdict(summary, name))
        for d in a["forget_dips"][:3]:
            lines.append(
                f"{name}: forget refusal dipped from {d['from']:.2f} to {d['to']:.2f} at step {d['step']} "
                f"(final {d['final']:.2f})"
            )
    return lines


def _replay_line(rp: dict) -> str:
    c = rp["counters"]
    return (
        f"{rp['replay_groups_total']} groups replayed ({rp['replay_forget_groups_total']} forget) over "
        f"{rp['hybrid_steps']} hybrid steps; nothing to replay on {100 * rp['starved_frac']:.0f}% of them; "
        f"buffer mean {_fmt(rp['buffer_size_mean'], 1)} (max {rp['buffer_size_max']}), mean age "
        f"{_fmt(rp['buffer_age_mean'], 1)} steps (limit {rp['staleness_limit']}); "
        f"mean w {_fmt(rp['is_weight_mean'])}, ESS {_fmt(rp['is_ess_mean'])} (min {_fmt(rp['is_ess_min'])}), "
        f"truncated {_fmt(rp['is_truncated_frac'])}; sequence ESS per group {_fmt(rp.get('replay_ess_mean'))}; "
        f"weighted advantage sum per replayed group: forget {_fmt(rp.get('adv_sum_per_group_forget'), 3)}, "
        f"boundary {_fmt(rp.get('adv_sum_per_group_boundary'), 3)}; "
        f"grad norm {_fmt(rp['grad_norm_with_replay'])} on steps that replay vs "
        f"{_fmt(rp['grad_norm_on_policy'])} on those that do not; "
        f"offers: admitted {c.get('admitted', 0)}, flat {c.get('flat', 0)}, "
        f"above threshold {c.get('above_threshold', 0)}; "
        f"evicted solved {c.get('evicted_solved', 0)}, stale {c.get('evicted_stale', 0)}, "
        f"reused-out {c.get('evicted_reuse', 0)}"
    )


def _twin(summary: dict, name: str) -> str | None:
    """The on-policy arm a replay arm is judged against: its name with ReRULE -> RULE when that arm
    exists (ReRULE+prio -> RULE+prio, ReRULE-beta0 -> RULE-beta0), else RULE."""
    for twin in (name.replace("ReRULE", "RULE", 1), REFERENCE_ARM):
        if twin != name and twin in summary["arms"]:
            return twin
    return None


def replay_verdict(summary: dict, name: str) -> list[str]:
    """Whether a replay arm is ahead of its on-policy twin (RULE, or RULE+prio for a +prio arm) on
    boundary quality without forgetting less; if it is not, the measured reasons that fit."""
    twin = _twin(summary, name)
    if twin is None:
        return []
    me, other = summary["arms"][name]["final"], summary["arms"][twin]["final"]
    gain = me["boundary_quality"] - other["boundary_quality"]
    d_forget = me["forget_refusal_rate"] - other["forget_refusal_rate"]
    if gain >= NOISE and d_forget >= -NOISE:
        return [f"replay is ahead of {twin} by {gain:+.3f} boundary quality (forget refusal {d_forget:+.2f})"]
    if gain >= NOISE:
        return [
            f"higher boundary quality than {twin} ({gain:+.3f}) but less forgetting ({d_forget:+.2f}): "
            "another point on the trade-off, not a gain"
        ]
    a = summary["arms"][name]
    rp, out = a["replay"], []
    if rp["starved_frac"] is not None and rp["starved_frac"] > 0.5:
        out.append("buffer starvation: most hybrid steps had nothing to replay")
    c = rp["counters"]
    if c.get("flat", 0) > 2 * max(c.get("admitted", 0), 1):
        out.append(
            f"most low-reward groups were flat (all rewards equal: {c.get('flat')} flat vs "
            f"{c.get('admitted')} admitted), so there was little to store"
        )
    # sequence level when logged (per replayed group, in samples): under 2, a group carries ~one sample
    seq = rp.get("replay_ess_mean")
    if seq is not None and seq < 2.0:
        out.append(f"importance weights collapsed (sequence ESS {seq:.2f} samples per replayed group)")
    elif seq is None and rp["is_ess_mean"] is not None and rp["is_ess_mean"] < 0.5:
        out.append(f"importance weights collapsed (mean ESS {rp['is_ess_mean']:.2f})")
    if rp["is_weight_mean"] is not None and rp["is_weight_mean"] < 0.5:
        out.append(f"replayed tokens are unlikely under the current policy (mean w {rp['is_weight_mean']:.2f})")
    lim = rp["staleness_limit"]
    if lim and rp["buffer_age_mean"] is not None and rp["buffer_age_mean"] > lim / 2:
        out.append(f"stale groups: mean buffer age {rp['buffer_age_mean']:.1f} of a {lim}-step limit")
    g_rep, g_on, clip = rp["grad_norm_with_replay"], rp["grad_norm_on_policy"], a.get("grad_clip")
    if g_rep is not None and g_on and g_rep > 5 * g_on and (clip is None or g_rep > clip):
        why = (
            f"the replay term dominated the update: gradient norm {g_rep:.1f} on replay steps vs "
            f"{g_on:.2f} without replay"
        )
        if clip:
            why += f", so clipping at {clip:g} shrank the on-policy part about {g_rep / clip:.0f}x"
        if a.get("beta") and a.get("weight_kl") is False:
            why += (
                f"; the k3 KL term (beta {a['beta']:g}) is not weighted by w on replayed tokens "
                "(replay.weight_kl false), and its gradient beta * (1 - ref/pi) is unbounded for tokens "
                "the policy has moved away from"
            )
        if a.get("normalize") == "replay":
            why += "; L_replay is a mean over its own rows (replay.normalize replay), so a replayed row "
            why += "outweighs a fresh one about 1/fraction times"
        out.append(why)
    if not out:
        n, n_forget = rp["replay_groups_total"], rp["replay_forget_groups_total"]
        out.append(
            f"none of starvation, IS collapse, staleness or gradient dominance stands out; of {n} replayed "
            f"groups {n_forget} were forget and {n - n_forget} boundary groups"
        )
    if d_forget >= NOISE:
        out.append(f"it forgets more ({d_forget:+.2f} forget refusal): compare at equal forgetting in tradeoff.png")
    return [f"not ahead of {twin} ({gain:+.3f} boundary quality); measured: " + "; ".join(out)]
