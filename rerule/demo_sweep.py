"""``rerule demo --sweep``: hardness x seeds, and ReRULE's gain against hardness.

Each hardness is its own world (pre-trained once, cached); each seed is the RL seed (sampling, buffer
draws, warm-start subset) on that world. Per hardness and arm the sweep reports the mean and standard
error over seeds of: the final boundary quality and its gain over RULE, the final forget refusal and
retain quality, the steps to reach RULE's final boundary quality, and the steps to reach RULE's final
(forget refusal, boundary quality) point; a run that never gets there counts as budget + eval interval
("never" in the table).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np

from rerule.demo_plots import plot_sweep
from rerule.demo_report import format_table, json_default, summarize


def _say(msg: str) -> None:
    print(msg, flush=True)


def run_sweep(settings: dict, *, no_cache: bool = False) -> dict:
    """Hardness x seeds (``sweep`` section of the demo settings); writes sweep.json / sweep.md /
    sweep_gain.png under ``<out_dir>/sweep`` and prints the table."""
    from rerule.demo import run_arms
    from rerule.demo_world import prepare_world

    sw = settings.get("sweep") or {}
    hardness, seeds = list(sw.get("hardness", [])), list(sw.get("seeds", []))
    if not hardness or not seeds:
        raise ValueError("demo config: sweep.hardness and sweep.seeds must be non-empty lists")
    arms = sw.get("arms") or list(settings["arms"])
    out = Path(settings["out_dir"]) / "sweep"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cells = []
    for h in hardness:
        s = copy.deepcopy(settings)
        s["world"]["hardness"] = h
        if "eval_every" in sw:
            s["eval"]["every"] = sw["eval_every"]
        for seed in seeds:
            _say(f"sweep: hardness {h} seed {seed} ({time.perf_counter() - t0:.0f}s so far)")
            world = prepare_world(s, cache_dir=s.get("cache_dir"), use_cache=not no_cache, progress=_say)
            core = run_arms(world, s, out / f"h{h}-s{seed}", seed=seed, steps=sw.get("steps"), arms=arms, quiet=True)
            cell = {"hardness": h, "seed": seed, "pretrain_accuracy": world.info["accuracy"], **core}
            cell["summary"] = summarize({"settings": s, **cell})
            cells.append(cell)
            _say(
                "  "
                + "  ".join(f"{a}: bq {r['final']['boundary_quality']:.2f}" for a, r in cell["summary"]["arms"].items())
            )
    report = {"settings": settings, "cells": cells, "timing": {"total_wall_s": time.perf_counter() - t0}}
    report["summary"] = sweep_summary(report)
    paths = write_sweep_report(report, out)
    _say("\n" + report["summary"]["table_text"])
    _say(f"\nwrote {', '.join(str(p) for p in paths)}; sweep wall time {report['timing']['total_wall_s']:.0f}s")
    return report


def _steps_cell(st: dict, key: str) -> str:
    never = st[f"{key}_never"]
    return f"{st[key][0]:.1f} ± {st[key][1]:.1f}" + (f" ({never} never)" if never else "")


def sweep_summary(report: dict) -> dict:
    """Per hardness and arm, mean and standard error over seeds of: final boundary quality, its gain
    over RULE, final forget refusal, steps to RULE's final boundary quality and steps to RULE's final
    (forget refusal, boundary quality) point, both censored at budget + eval interval ("never")."""
    cells = report["cells"]
    every = report["settings"].get("sweep", {}).get("eval_every") or report["settings"]["eval"]["every"]
    by: dict = {}
    for c in cells:
        cap = c["steps"] + every
        for arm, a in c["summary"]["arms"].items():
            d = by.setdefault((c["hardness"], arm), {k: [] for k in ("bq", "gain", "fr", "rq", "reach", "point")})
            d["bq"].append(a["final"]["boundary_quality"])
            d["gain"].append(a["boundary_quality_gain"])
            d["fr"].append(a["final"]["forget_refusal_rate"])
            d["rq"].append(a["final"]["retain_quality"])
            for key, name in (
                ("reach", "steps_to_reference_final_bq"),
                ("point", "steps_to_reference_final_point"),
            ):
                d[key].append(a[name])

    def ms(xs):
        xs = np.asarray(xs, dtype=float)
        return float(xs.mean()), float(xs.std(ddof=1) / np.sqrt(len(xs))) if len(xs) > 1 else 0.0

    stats, rows = {}, []
    for (h, arm), d in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        cap = next(c["steps"] for c in cells if c["hardness"] == h) + every
        st = {k: ms(d[k]) for k in ("bq", "gain", "fr", "rq")}
        for key in ("reach", "point"):
            st[key] = ms([cap if x is None else x for x in d[key]])
            st[f"{key}_never"] = sum(x is None for x in d[key])
        st["n"] = len(d["bq"])
        stats.setdefault(str(h), {})[arm] = st

        rows.append(
            [
                str(h),
                arm,
                f"{st['bq'][0]:.3f} ± {st['bq'][1]:.3f}",
                f"{st['gain'][0]:+.3f} ± {st['gain'][1]:.3f}",
                f"{st['fr'][0]:.2f} ± {st['fr'][1]:.2f}",
                f"{st['rq'][0]:.2f} ± {st['rq'][1]:.2f}",
                _steps_cell(st, "reach"),
                _steps_cell(st, "point"),
                str(st["n"]),
            ]
        )
    cols = (
        "hardness",
        "arm",
        "final boundary quality",
        "gain vs RULE",
        "final forget refusal",
        "final retain quality",
        "steps to RULE's final BQ",
        "steps to RULE's final F&BQ",
        "seeds",
    )
    return {
        "stats": stats,
        "table_text": format_table(rows, cols),
        "table_md": format_table(rows, cols, markdown=True),
        "columns": cols,
        "rows": rows,
    }


def write_sweep_report(report: dict, out_dir: str | Path) -> list[Path]:
    """sweep.json (every cell's curves and summary), sweep.md and sweep_gain.png."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot_sweep(report, out_dir)
    s = report["summary"]
    md = [
        "# rerule demo sweep",
        "",
        f"Hardness {report['settings']['sweep']['hardness']} x seeds "
        f"{report['settings']['sweep']['seeds']}; wall time {report['timing']['total_wall_s']:.0f} s.",
        "",
        s["table_md"],
        "",
        f"![sweep]({png.name})",
        "",
    ]
    (out_dir / "sweep.md").write_text("\n".join(md))
    (out_dir / "sweep.json").write_text(json.dumps(report, indent=1, default=json_default))
    return [out_dir / "sweep.json", out_dir / "sweep.md", png]
