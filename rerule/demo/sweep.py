"""``rerule demo --sweep``: warm-start regime x hardness x seeds, compared at matched forgetting.

Each hardness is its own world (pre-trained once, cached); each seed is the RL seed (sampling, buffer
draws, warm-start subset) on that world; each regime is a warm-start mode (``warm_start.mode``:
``with_answers``, or RULE's ``rejection_steering``, refusals only, where boundary prompts can
collapse into refusing). Per regime and hardness the report leads with comparisons at matched
forgetting (``rerule.demo.matched``): paired per-seed differences (mean ± standard error) of the
boundary and retain quality at forget refusal 0.5 / 0.75 / 0.9 and of the trade-off front's area,
for ReRULE against RULE and against the on-policy prioritized-sampling control (RULE+prio). Then,
per arm, mean ± standard error over seeds of the front area, the final boundary quality and its gain
over RULE, the final forget refusal and retain quality, and the steps to reach RULE's final
boundary quality / (forget refusal, boundary quality) point, censored at budget + eval interval
("never" in the table).

sweep.json keeps every cell (regime, hardness, seed) with each arm's per-step history, its
evaluations (``arms[arm]["evals"]``) and its summary (``summary["arms"][arm]["final"]``).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np

from rerule.demo import matched as dm
from rerule.demo.plots import plot_sweep, plot_sweep_fronts
from rerule.demo.report import format_table, json_default, summarize


def _say(msg: str) -> None:
    print(msg, flush=True)


def run_sweep(settings: dict, *, no_cache: bool = False) -> dict:
    """Regimes x hardness x seeds (``sweep`` section of the demo settings); writes sweep.json / sweep.md /
    sweep_front.png / sweep_gain.png under ``<out_dir>/sweep`` and prints the tables."""
    from rerule.demo.arms import run_arms
    from rerule.demo.world import prepare_world

    sw = settings.get("sweep") or {}
    hardness, seeds = list(sw.get("hardness", [])), list(sw.get("seeds", []))
    if not hardness or not seeds:
        raise ValueError("demo config: sweep.hardness and sweep.seeds must be non-empty lists")
    regimes = list(sw.get("regimes") or [settings["train"].get("warm_start", {}).get("mode", "with_answers")])
    arms = sw.get("arms") or list(settings["arms"])
    out = Path(settings["out_dir"]) / "sweep"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cells = []
    for regime in regimes:
        for h in hardness:
            s = copy.deepcopy(settings)
            s["world"]["hardness"] = h
            s["train"].setdefault("warm_start", {})["mode"] = regime
            if "eval_every" in sw:
                s["eval"]["every"] = sw["eval_every"]
            for seed in seeds:
                _say(f"sweep: {regime} hardness {h} seed {seed} ({time.perf_counter() - t0:.0f}s so far)")
                world = prepare_world(s, cache_dir=s.get("cache_dir"), use_cache=not no_cache, progress=_say)
                core = run_arms(world, s, out / f"{regime}-h{h}-s{seed}", seed=seed, steps=sw.get("steps"),
                                arms=arms, quiet=True)
                cell = {"regime": regime, "hardness": h, "seed": seed, "pretrain_accuracy": world.info["accuracy"],
                        **core}
                cell["summary"] = summarize({"settings": s, **cell})
                cells.append(cell)
                _say("  " + "  ".join(f"{a}: bq {r['final']['boundary_quality']:.2f} fr "
                                      f"{r['final']['forget_refusal_rate']:.2f}"
                                      for a, r in cell["summary"]["arms"].items()))
    report = {"settings": settings, "cells": cells, "timing": {"total_wall_s": time.perf_counter() - t0}}
    report["summary"] = sweep_summary(report)
    paths = write_sweep_report(report, out)
    _say("\n" + report["summary"]["matched_text"] + "\n\n" + report["summary"]["table_text"])
    _say(f"\nwrote {', '.join(str(p) for p in paths)}; sweep wall time {report['timing']['total_wall_s']:.0f}s")
    return report


def _steps_cell(st: dict, key: str) -> str:
    never = st[f"{key}_never"]
    return f"{st[key][0]:.1f} ± {st[key][1]:.1f}" + (f" ({never} never)" if never else "")


def _regime(cell: dict) -> str:
    return cell.get("regime") or "with_answers"


def sweep_summary(report: dict) -> dict:
    """Matched-forgetting comparisons and per-arm statistics per (regime, hardness); see the module
    docstring. ``stats[regime][hardness][arm]`` holds (mean, se) pairs: bq, gain, fr, rq, area, reach,
    point (+ reach_never, point_never, n); ``matched[regime][hardness]["A - B"]`` the paired differences."""
    cells = report["cells"]
    every = report["settings"].get("sweep", {}).get("eval_every") or report["settings"]["eval"]["every"]
    by: dict = {}
    per_seed: dict = {}
    caps: dict = {}
    for c in cells:
        reg, h = _regime(c), str(c["hardness"])
        matched = per_seed.setdefault((reg, h), {}).setdefault(c["seed"], {})
        for arm, a in c["summary"]["arms"].items():
            d = by.setdefault((reg, h, arm), {k: [] for k in ("bq", "gain", "fr", "rq", "area", "reach", "point")})
            d["bq"].append(a["final"]["boundary_quality"])
            d["gain"].append(a["boundary_quality_gain"])
            d["fr"].append(a["final"]["forget_refusal_rate"])
            d["rq"].append(a["final"]["retain_quality"])
            evals = c["arms"][arm]["evals"] if "arms" in c else a.get("evals", [])
            matched[arm] = a.get("matched") or dm.arm_matched(evals)
            d["area"].append(matched[arm]["front_area"])
            d["reach"].append(a["steps_to_reference_final_bq"])
            d["point"].append(a["steps_to_reference_final_point"])
        caps[(reg, h)] = c["steps"] + every

    def ms(xs):
        xs = np.asarray(xs, dtype=float)
        return float(xs.mean()), float(xs.std(ddof=1) / np.sqrt(len(xs))) if len(xs) > 1 else 0.0

    stats, rows = {}, []
    for (reg, h, arm), d in sorted(by.items(), key=lambda kv: (kv[0][0], float(kv[0][1]), kv[0][2])):
        cap = caps[(reg, h)]
        st = {k: ms(d[k]) for k in ("bq", "gain", "fr", "rq", "area")}
        for key in ("reach", "point"):
            st[key] = ms([cap if x is None else x for x in d[key]])
            st[f"{key}_never"] = sum(x is None for x in d[key])
        st["n"] = len(d["bq"])
        stats.setdefault(reg, {}).setdefault(h, {})[arm] = st
        rows.append([reg, h, arm, f"{st['area'][0]:.3f} ± {st['area'][1]:.3f}",
                     f"{st['bq'][0]:.3f} ± {st['bq'][1]:.3f}", f"{st['gain'][0]:+.3f} ± {st['gain'][1]:.3f}",
                     f"{st['fr'][0]:.2f} ± {st['fr'][1]:.2f}", f"{st['rq'][0]:.2f} ± {st['rq'][1]:.2f}",
                     _steps_cell(st, "reach"), _steps_cell(st, "point"), str(st["n"])])
    cols = ("regime", "hardness", "arm", "front area", "final boundary quality", "gain vs RULE (final)",
            "final forget refusal", "final retain quality", "steps to RULE's final BQ", "steps to RULE's final F&BQ",
            "seeds")
    matched, mrows = {}, []
    for (reg, h), seeds in sorted(per_seed.items(), key=lambda kv: (kv[0][0], float(kv[0][1]))):
        lst = list(seeds.values())
        for arm, base in dm.PAIRS:
            if not any(arm in x and base in x for x in lst):
                continue
            pr = dm.paired(lst, arm, base)
            matched.setdefault(reg, {}).setdefault(h, {})[f"{arm} - {base}"] = pr
            lv = pr["levels"]
            mrows.append([reg, h, f"{arm} - {base}", dm.fmt_mse(pr["area"])]
                         + [dm.fmt_mse(lv[str(float(L))]["boundary_quality"]) for L in dm.LEVELS]
                         + [dm.fmt_mse(lv[str(float(dm.LEVELS[-1]))]["retain_quality"])])
    mcols = (("regime", "hardness", "paired difference", "Δ front area")
             + tuple(f"Δ BQ @ forget {L}" for L in dm.LEVELS) + (f"Δ RQ @ forget {dm.LEVELS[-1]}",))
    return {
        "stats": stats,
        "matched": matched,
        "table_text": format_table(rows, cols),
        "table_md": format_table(rows, cols, markdown=True),
        "matched_text": format_table(mrows, mcols),
        "matched_md": format_table(mrows, mcols, markdown=True),
        "columns": cols,
        "rows": rows,
        "matched_columns": mcols,
        "matched_rows": mrows,
    }


def write_sweep_report(report: dict, out_dir: str | Path) -> list[Path]:
    """sweep.json (every cell's curves and summary), sweep.md, sweep_front.png and sweep_gain.png."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    front_png = plot_sweep_fronts(report, out_dir)
    png = plot_sweep(report, out_dir)
    s, sw = report["summary"], report["settings"]["sweep"]
    md = [
        "# rerule demo sweep",
        "",
        f"Regimes {sw.get('regimes') or ['with_answers']} x hardness {sw['hardness']} x seeds {sw['seeds']}; "
        f"wall time {report['timing']['total_wall_s']:.0f} s.",
        "",
        "## At matched forgetting (paired per-seed differences, mean ± standard error, n seeds)",
        "",
        f"Boundary quality (BQ) and retain quality (RQ) read where each arm's evaluation trajectory reaches "
        f"forget refusal {', '.join(str(x) for x in dm.LEVELS)} (best point at or above it, segments "
        f"interpolated; seeds where both arms reach the level); front area = mean BQ at forgetting L over "
        f"L in [{dm.AREA_LO}, 1] (0 where not reached).",
        "",
        s["matched_md"],
        "",
        f"![fronts]({front_png.name})",
        "",
        "## Per arm (mean ± standard error over seeds)",
        "",
        s["table_md"],
        "",
        f"![sweep]({png.name})",
        "",
    ]
    (out_dir / "sweep.md").write_text("\n".join(md))
    (out_dir / "sweep.json").write_text(json.dumps(report, indent=1, default=json_default))
    return [out_dir / "sweep.json", out_dir / "sweep.md", front_png, png]
