"""Comparisons at matched forgetting: what the demo and the sweep lead with.

Arms forget at different speeds, so comparing their boundary quality at the same step mixes two
effects (an arm that forgets less keeps more). Here every arm is read at the same forget refusal.

- Trajectory: an arm's evaluations (step 0 = after the warm start, then every ``eval.every`` steps)
  as points (forget refusal f, boundary quality b, retain quality r), joined by straight segments.
- Operating point at level L: among the trajectory's points with f >= L (evaluations, and the
  points where a segment crosses f = L, linearly interpolated), the one with the highest boundary
  quality; its b and r are the arm's quality "at forgetting L". None when the arm never reaches L.
- Front: L -> b at L, non-increasing in L. Front area: the mean of b at L over an even grid of L in
  [``AREA_LO``, 1], with 0 where the arm never reaches L (the area rewards forgetting and keeping).
- Paired differences: per seed, arm minus baseline at each level (seeds where both reach it) and
  of the area (every seed); mean and standard error over seeds (ddof 1).

The levels are fixed before any run (0.5, 0.75, 0.9): none of them is chosen from results.
"""

from __future__ import annotations

import numpy as np

LEVELS = (0.5, 0.75, 0.9)
AREA_LO = 0.5
AREA_POINTS = 51
# (arm, baseline) pairs every table reports; the on-policy prioritized control is in each.
PAIRS = (
    ("ReRULE", "RULE"),
    ("ReRULE", "RULE+prio"),
    ("RULE+prio", "RULE"),
    ("ReRULE+prio", "RULE"),
    ("ReRULE+prio", "RULE+prio"),
)


def _points(evals: list[dict]) -> list[tuple[float, float, float, float]]:
    """(f, b, r, step) per evaluation that has all three values."""
    out = []
    for e in evals:
        f, b, r = e.get("forget_refusal_rate"), e.get("boundary_quality"), e.get("retain_quality")
        if f is not None and b is not None:
            out.append((float(f), float(b), float(r) if r is not None else float("nan"), float(e["step"])))
    return out


def at_forgetting(evals: list[dict], level: float) -> dict | None:
    """The operating point at forget refusal >= ``level`` (module docstring): {boundary_quality,
    retain_quality, step}, or None if the trajectory never reaches ``level``."""
    pts = _points(evals)
    cands = [p for p in pts if p[0] >= level]
    for a, c in zip(pts, pts[1:]):
        if (a[0] - level) * (c[0] - level) < 0:
            t = (level - a[0]) / (c[0] - a[0])
            cands.append(tuple(x + t * (y - x) for x, y in zip(a, c)))
    if not cands:
        return None
    best = max(cands, key=lambda p: (p[1], -p[3]))
    return {"boundary_quality": best[1], "retain_quality": best[2], "step": best[3]}


def front(evals: list[dict], levels=LEVELS) -> dict[float, dict | None]:
    return {float(L): at_forgetting(evals, L) for L in levels}


def front_area(evals: list[dict], lo: float = AREA_LO, n: int = AREA_POINTS) -> float:
    """Mean boundary quality at forgetting L over L in linspace(lo, 1, n) (0 where never reached)."""
    vals = []
    for L in np.linspace(lo, 1.0, n):
        p = at_forgetting(evals, float(L))
        vals.append(0.0 if p is None else p["boundary_quality"])
    return float(np.mean(vals))


def front_curve(evals: list[dict], lo: float = AREA_LO, n: int = AREA_POINTS) -> tuple[list, list]:
    """(levels, boundary quality at each level or nan) for plots."""
    xs = [float(x) for x in np.linspace(lo, 1.0, n)]
    ys = []
    for L in xs:
        p = at_forgetting(evals, L)
        ys.append(float("nan") if p is None else p["boundary_quality"])
    return xs, ys


def arm_matched(evals: list[dict], levels=LEVELS) -> dict:
    """One arm's matched-forgetting numbers: per level b, r (None if not reached) and the front area."""
    fr = front(evals, levels)
    return {
        "levels": {
            str(L): (None if p is None else {"boundary_quality": p["boundary_quality"],
                                             "retain_quality": p["retain_quality"], "step": p["step"]})
            for L, p in fr.items()
        },
        "front_area": front_area(evals),
    }


def mean_se(xs) -> tuple[float | None, float | None, int]:
    xs = [float(x) for x in xs if x is not None and x == x]
    if not xs:
        return None, None, 0
    a = np.asarray(xs)
    se = float(a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else None
    return float(a.mean()), se, len(a)


def paired(per_seed: list[dict], arm: str, base: str, levels=LEVELS) -> dict:
    """Paired per-seed differences arm - base. ``per_seed``: [{arm_name: arm_matched(...)}] one per seed.

    Returns {"area": (mean, se, n), "levels": {L: {"boundary_quality": (mean, se, n),
    "retain_quality": (mean, se, n), "reached": (n arm reached, n base reached, n seeds)}}}."""
    seeds = [s for s in per_seed if arm in s and base in s]
    out = {"area": mean_se([s[arm]["front_area"] - s[base]["front_area"] for s in seeds]), "levels": {}}
    for L in levels:
        key = str(float(L))
        both = [(s[arm]["levels"][key], s[base]["levels"][key]) for s in seeds]
        ok = [(a, b) for a, b in both if a is not None and b is not None]
        out["levels"][key] = {
            q: mean_se([a[q] - b[q] for a, b in ok]) for q in ("boundary_quality", "retain_quality")
        }
        out["levels"][key]["reached"] = (
            sum(a is not None for a, _ in both),
            sum(b is not None for _, b in both),
            len(both),
        )
    return out


def fmt_mse(t, digits: int = 3, signed: bool = True) -> str:
    m, se, n = t
    if m is None:
        return "n/a"
    s = f"{m:+.{digits}f}" if signed else f"{m:.{digits}f}"
    return s + (f" ± {se:.{digits}f}" if se is not None else "") + f" (n={n})"
