"""The demo pipeline at a minimal size (seconds), and its report on fake metric histories."""

from __future__ import annotations

import json
import math

import pytest

from rerule.demo import findings as fnd
from rerule.demo import report as rep
from rerule.demo.arms import load_settings
from rerule.demo.cli import run_single
from rerule.demo.sweep import run_sweep, sweep_summary

ARMS = ("RULE", "RULE+prio", "ReRULE", "ReRULE+prio")
MINIMAL = [
    "world={seed: 0, hardness: 0.8, n_forget: 2, n_boundary: 2, n_retain: 1, n_attributes: 1, n_templates: 1}",
    "model={hidden_size: 16, intermediate_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 1,"
    " max_position_embeddings: 64}",
    "tokenizer.vocab_size=300",
    "pretrain.max_epochs=2",
    "pretrain.check_every=1",
    "train.steps=3",
    "train.rollout.prompts_per_step=2",
    "train.rollout.group_size=2",
    "train.rollout.max_new_tokens=4",
    "train.warm_start.epochs=1",
    "eval.every=2",
    "eval.max_examples=2",
]


def minimal_settings(tmp_path, *extra):
    s = load_settings(None, [*MINIMAL, f"cache_dir={tmp_path / 'cache'}", *extra])
    s["out_dir"] = str(tmp_path / "demo")
    return s


def test_minimal_demo_writes_every_curve_for_all_four_arms(tmp_path):
    settings = minimal_settings(tmp_path)
    report = run_single(settings)
    out = tmp_path / "demo"
    for name in ("report.json", "report.md", *rep.PLOTS):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    data = json.loads((out / "report.json").read_text())
    assert tuple(data["arms"]) == ARMS
    for arm in ARMS:
        curves = data["curves"][arm]
        assert set(curves["eval"]) == set(rep.ARM_EVAL_KEYS)
        assert set(curves["step"]) == set(rep.STEP_CURVES)
        # Evaluations at step 0 (the shared warm start), every eval.every steps, and the last step.
        assert [p[0] for p in curves["eval"]["boundary_quality"]] == [0, 2]
        assert [p[0] for p in curves["step"]["forget_refusal_rate"]] == [1, 2, 3]
        comp = data["summary"]["arms"][arm]["compute"]
        assert comp["generated_tokens"] > 0 and comp["train_tokens"] >= comp["generated_tokens"]
        assert comp["step_wall_s"] > 0 and comp["total_cpu_s"] > 0
    md = (out / "report.md").read_text()
    assert all(f"| {arm} |" in md for arm in ARMS) and all(p in md for p in rep.PLOTS)
    # Same seed, same warm-started model: RULE and ReRULE are the same run until replay starts.
    h_rule, h_re = report["arms"]["RULE"]["history"], report["arms"]["ReRULE"]["history"]
    for key in ("reward", "generated_tokens", "loss_on"):
        assert h_rule[0][key] == h_re[0][key]
    assert h_re[-1]["stage"] == "hybrid" and h_rule[-1]["stage"] == "on_policy"

    # The second run loads the pre-trained model from the cache.
    settings["arms"] = {"RULE": settings["arms"]["RULE"]}
    again = run_single(settings)
    assert again["world"]["pretrain"]["cached"] and not report["world"]["pretrain"]["cached"]
    # Same cached model, same warm start: the same step-0 evaluation (timings aside).
    assert {k: v for k, v in again["step0"].items() if k != "eval_time_s"} == {
        k: v for k, v in report["step0"].items() if k != "eval_time_s"
    }


def test_minimal_sweep_plots_gain_against_hardness(tmp_path):
    settings = minimal_settings(
        tmp_path,
        "sweep.hardness=[0.0, 1.0]",
        "sweep.seeds=[0, 1]",
        "sweep.arms=[RULE, ReRULE]",
        "sweep.steps=2",
        "sweep.eval_every=1",
    )
    settings["sweep"]["regimes"] = ["rejection_steering"]
    report = run_sweep(settings)
    out = tmp_path / "demo" / "sweep"
    assert (out / "sweep_gain.png").stat().st_size > 0 and (out / "sweep.md").is_file()
    assert (out / "sweep_front.png").stat().st_size > 0
    saved = json.loads((out / "sweep.json").read_text())
    stats = saved["summary"]["stats"]["rejection_steering"]
    assert set(stats) == {"0.0", "1.0"} and set(stats["1.0"]) == {"RULE", "ReRULE"}
    # the held-out check's interface: per cell, each arm's final values and its per-evaluation values
    cell = saved["cells"][0]
    assert cell["regime"] == "rejection_steering" and len(saved["cells"]) == 4
    assert {"boundary_quality", "forget_refusal_rate"} <= set(cell["summary"]["arms"]["ReRULE"]["final"])
    assert [e["step"] for e in cell["arms"]["ReRULE"]["evals"]] == [0, 1, 2]
    pair = saved["summary"]["matched"]["rejection_steering"]["1.0"]["ReRULE - RULE"]
    assert pair["area"][2] == 2 and "Δ front area" in (out / "sweep.md").read_text()
    # RULE against itself: zero gain, and it reaches its own final quality within the budget.
    assert stats["0.0"]["RULE"]["gain"] == [0.0, 0.0] and stats["0.0"]["RULE"]["reach_never"] == 0
    assert stats["0.0"]["RULE"]["point_never"] == 0
    assert stats["1.0"]["ReRULE"]["n"] == 2
    assert report["timing"]["total_wall_s"] > 0


def _fake_arm(bq, fr, replay_groups=0, w=None, ess=None, buffer=0, stage_from=None):
    history = []
    for s in range(1, len(bq) * 2 + 1):
        hybrid = stage_from is not None and s > stage_from
        history.append(
            {
                "step": s,
                "stage": "hybrid" if hybrid else "on_policy",
                "forget_refusal_rate": 0.5,
                "boundary_reward": 0.5,
                "forget_reward": 0.5,
                "flat_group_frac": 0.2,
                "buffer_size": buffer,
                "replay_groups": replay_groups if hybrid else 0,
                "replay_forget_groups": 0,
                "is_weight_mean": w if hybrid else None,
                "is_ess": ess if hybrid else None,
                "is_truncated_frac": 0.0 if hybrid else None,
                "buffer_age_mean": 3.0 if buffer else None,
                "time_step_s": 0.5,
                "generated_tokens": 100,
                "train_tokens": 120,
                "grad_norm": 50.0 if hybrid and replay_groups else 0.5,
            }
        )
    evals = [
        {
            "step": 2 * i,
            "boundary_quality": b,
            "forget_refusal_rate": f,
            "forget_leak": 0.1,
            "boundary_over_refusal": 0.2,
            "retain_quality": 0.9,
            "retain_refusal_rate": 0.0,
        }
        for i, (b, f) in enumerate(zip(bq, fr))
    ]
    compute = {
        "steps": len(history),
        "generated_tokens": 100 * len(history),
        "train_tokens": 120 * len(history),
        "step_wall_s": 0.5 * len(history),
        "rollout_wall_s": 0.3,
        "update_wall_s": 0.2,
        "eval_wall_s": 1.0,
        "total_wall_s": 9.0,
        "total_cpu_s": 8.0,
    }
    counters = {"admitted": 3, "flat": 20, "above_threshold": 4}
    return {
        "overrides": {},
        "history": history,
        "evals": evals,
        "compute": compute,
        "buffer_counters": counters,
    }


def fake_report():
    arms = {
        "RULE": _fake_arm([0.6, 0.4, 0.5], [0.2, 0.8, 0.9]),
        "RULE+prio": _fake_arm([0.6, 0.5, 0.55], [0.2, 0.6, 0.9]),
        "ReRULE": _fake_arm([0.6, 0.3, 0.51], [0.2, 0.9, 0.7], replay_groups=0, buffer=0, stage_from=1),
        "ReRULE+prio": _fake_arm(
            [0.6, 0.45, 0.7], [0.2, 0.8, 0.9], replay_groups=2, w=0.3, ess=0.2, buffer=5, stage_from=1
        ),
    }
    return {
        "settings": {
            "train": {
                "replay": {"staleness": 4, "weight_kl": False, "normalize": "replay"},
                "loss": {"beta": 0.01},
                "optim": {"grad_clip": 1.0},
            },
            "world": {"hardness": 0.8},
        },
        "steps": 6,
        "seed": 0,
        "step0": arms["RULE"]["evals"][0],
        "arms": arms,
        "timing": {"total_wall_s": 12.0},
    }


def test_summary_gains_and_diagnostics_on_fake_history(tmp_path):
    report = fake_report()
    s = rep.summarize(report)
    assert s["reference_arm"] == "RULE" and s["reference_final_boundary_quality"] == 0.5
    a = s["arms"]
    assert a["RULE"]["boundary_quality_gain"] == 0.0 and a["RULE"]["steps_to_reference_final_bq"] == 0
    assert a["ReRULE+prio"]["boundary_quality_gain"] == pytest.approx(0.2)
    # ReRULE's curve dips to 0.3 then ends at 0.51: it first reaches 0.5 at step 0 (the shared start).
    assert a["ReRULE"]["steps_to_reference_final_bq"] == 0
    assert rep.steps_to_reach(report["arms"]["RULE"]["evals"][1:], 0.5) == 4
    assert rep.steps_to_reach(report["arms"]["RULE"]["evals"], 0.99) is None
    # ReRULE never replayed: the verdict must name starvation; ReRULE+prio is ahead of its twin.
    text = "\n".join(s["findings"])
    assert "ReRULE: not ahead of RULE" in text and "buffer starvation" in text
    assert "replay is ahead of RULE+prio by +0.150" in text
    # RULE's final point is (forget 0.9, boundary 0.5): ReRULE never matches both, RULE+prio does at 4.
    assert a["RULE"]["steps_to_reference_final_point"] == 4
    assert a["RULE+prio"]["steps_to_reference_final_point"] == 4
    assert a["ReRULE"]["steps_to_reference_final_point"] is None
    assert a["ReRULE+prio"]["steps_to_reference_final_point"] == 4
    assert a["ReRULE+prio"]["replay"]["is_ess_mean"] == pytest.approx(0.2)
    assert a["ReRULE"]["forget_dips"] == [{"step": 4, "from": 0.9, "to": 0.7, "final": 0.7}]
    assert "dipped from 0.90 to 0.70 at step 4" in text
    assert len(s["table_rows"]) == 4 and s["table_rows"][2][7] == "never"
    report["summary"] = s
    paths = rep.write_report(report, tmp_path)
    assert {p.name for p in paths} == {"report.json", "report.md", *rep.PLOTS}
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["curves"]["ReRULE+prio"]["step"]["is_weight_mean"][-1] == [6, 0.3]


def test_forget_dips_are_reported_once_per_episode():
    evals = [{"step": i, "forget_refusal_rate": f} for i, f in enumerate([0.5, 0.9, 0.6, 0.55, 0.95, 0.7, 0.9])]
    assert rep.forget_dips(evals) == [
        {"step": 2, "from": 0.9, "to": 0.55, "final": 0.9},
        {"step": 5, "from": 0.95, "to": 0.7, "final": 0.9},
    ]
    assert rep.forget_dips(evals, tol=0.4) == []


def test_replay_verdict_names_collapsed_weights_and_stale_groups():
    report = fake_report()
    report["arms"]["ReRULE"] = _fake_arm(
        [0.6, 0.3, 0.4], [0.2, 0.9, 0.9], replay_groups=2, w=0.2, ess=0.1, buffer=4, stage_from=1
    )
    for m in report["arms"]["ReRULE"]["history"]:
        m["buffer_age_mean"] = 3.5
    verdict = " ".join(fnd.replay_verdict(rep.summarize(report), "ReRULE"))
    assert "importance weights collapsed" in verdict and "mean w 0.20" in verdict
    assert "stale groups" in verdict and "starvation" not in verdict
    assert "flat" in verdict  # 20 flat offers against 3 admitted
    # 50 on replay steps against 0.5: the replay term dominates, and the default clip 1.0 is named.
    assert "dominated the update" in verdict and "about 50x" in verdict and "k3" in verdict
    assert "mean over its own rows" in verdict
    # With the trainer's fixes (w weighs the replayed KL, one normalizer) neither cause is named.
    for name, value in (("replay.weight_kl", True), ("replay.normalize", "batch")):
        report["arms"]["ReRULE"]["overrides"][name] = value
    verdict = " ".join(fnd.replay_verdict(rep.summarize(report), "ReRULE"))
    assert "dominated the update" in verdict and "k3" not in verdict and "own rows" not in verdict


def test_replay_verdict_without_a_fault_says_what_was_replayed():
    report = fake_report()
    report["arms"]["ReRULE"] = _fake_arm([0.6, 0.3, 0.4], [0.2, 0.9, 0.99], replay_groups=2, w=1.0, ess=0.9,
                                         buffer=4, stage_from=1)
    for m in report["arms"]["ReRULE"]["history"]:
        m["grad_norm"], m["replay_forget_groups"] = 0.6, 2 if m["replay_groups"] else 0
        m["buffer_age_mean"] = 1.0
    report["arms"]["ReRULE"]["buffer_counters"] = {"admitted": 10, "flat": 5}
    verdict = " ".join(fnd.replay_verdict(rep.summarize(report), "ReRULE"))
    assert "none of starvation" in verdict and "of 10 replayed groups 10 were forget and 0 boundary" in verdict
    assert "forgets more (+0.09" in verdict


def test_diagnostic_arm_is_judged_against_its_twin():
    report = fake_report()
    report["arms"]["RULE-beta0"] = _fake_arm([0.6, 0.5, 0.6], [0.2, 0.8, 0.9])
    report["arms"]["ReRULE-beta0"] = _fake_arm(
        [0.6, 0.5, 0.5], [0.2, 0.8, 0.9], replay_groups=2, w=1.0, ess=0.9, buffer=4, stage_from=1
    )
    for name in ("RULE-beta0", "ReRULE-beta0"):
        report["arms"][name]["overrides"] = {"loss.beta": 0.0}
    s = rep.summarize(report)
    assert fnd._twin(s, "ReRULE-beta0") == "RULE-beta0" and fnd._twin(s, "ReRULE+prio") == "RULE+prio"
    assert s["arms"]["ReRULE-beta0"]["beta"] == 0.0 and s["arms"]["ReRULE"]["beta"] == 0.01
    text = "\n".join(s["findings"])
    assert "ReRULE-beta0 vs RULE-beta0: final boundary quality 0.500 vs 0.600" in text
    verdict = " ".join(fnd.replay_verdict(s, "ReRULE-beta0"))
    assert "not ahead of RULE-beta0" in verdict and "dominated" in verdict and "k3" not in verdict


def test_sweep_summary_means_and_censoring():
    cells = []
    for h in (0.2, 0.8):
        for seed, bq in ((0, 0.4), (1, 0.6)):
            r = fake_report()
            r["arms"]["ReRULE"]["evals"][-1]["boundary_quality"] = bq if h == 0.8 else 0.45
            cells.append({"hardness": h, "seed": seed, "steps": 6, "summary": rep.summarize(r)})
    report = {
        "settings": {"eval": {"every": 2}, "sweep": {"hardness": [0.2, 0.8], "seeds": [0, 1]}},
        "cells": cells,
    }
    s = sweep_summary(report)
    assert list(s["stats"]) == ["with_answers"]  # cells without a regime: the default warm start
    st = s["stats"]["with_answers"]["0.8"]["ReRULE"]
    assert st["gain"][0] == pytest.approx(0.0) and st["gain"][1] == pytest.approx(math.sqrt(2 * 0.1**2) / math.sqrt(2))
    # At 0.2 ReRULE ends at 0.45 < RULE's 0.5 after starting at 0.6 (reached at step 0).
    assert s["stats"]["with_answers"]["0.2"]["ReRULE"]["reach"] == (0.0, 0.0)
    # A curve that never reaches the target is censored at budget + eval interval.
    for c in cells:
        c["summary"]["arms"]["ReRULE"]["steps_to_reference_final_bq"] = None
    s = sweep_summary(report)
    st = s["stats"]["with_answers"]["0.8"]["ReRULE"]
    assert st["reach"][0] == 8 and st["reach_never"] == 2
    assert "(2 never)" in s["table_text"]


def test_bad_settings_fail_before_training():
    with pytest.raises(ValueError, match="key=value"):
        load_settings(None, ["train.steps"])
    with pytest.raises(ValueError, match="unknown key"):
        load_settings(None, ["arms={RULE: {replay.enabld: false}}"])
    with pytest.raises(ValueError, match="eval.every"):
        load_settings(None, ["eval.every=0"])


def test_cli_dispatches_demo():
    from rerule.cli import build_parser
    from rerule.demo.cli import run_demo

    args = build_parser().parse_args(["demo", "--steps", "3", "--set", "eval.every=1", "--sweep"])
    assert args.func is run_demo and args.steps == 3 and args.set == ["eval.every=1"] and args.sweep
