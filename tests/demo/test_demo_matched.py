"""Matched-forgetting comparisons (rerule.demo.matched) on hand-made trajectories."""

from __future__ import annotations

import math

import pytest

from rerule.demo import matched as dm


def traj(*pts):
    return [{"step": 5 * i, "forget_refusal_rate": f, "boundary_quality": b, "retain_quality": r}
            for i, (f, b, r) in enumerate(pts)]


def test_operating_point_interpolates_the_crossing_and_takes_the_best_point_above():
    ev = traj((0.3, 0.8, 0.9), (0.7, 0.6, 0.7), (1.0, 0.2, 0.5))
    # L = 0.5 is crossed halfway between step 0 and 5: b = 0.7, r = 0.8, step 2.5; better than 0.6 and 0.2
    p = dm.at_forgetting(ev, 0.5)
    assert p == pytest.approx({"boundary_quality": 0.7, "retain_quality": 0.8, "step": 2.5})
    # L = 0.9: crossing between (0.7, 0.6) and (1.0, 0.2) at t = 2/3: b = 0.6 - 0.4 * 2/3
    assert dm.at_forgetting(ev, 0.9)["boundary_quality"] == pytest.approx(0.6 - 0.4 * 2 / 3)
    assert dm.at_forgetting(ev, 1.0)["boundary_quality"] == pytest.approx(0.2)
    assert dm.at_forgetting(traj((0.3, 0.8, 0.9), (0.6, 0.5, 0.5)), 0.75) is None


def test_non_monotone_trajectory_and_area():
    # forgetting dips and recovers: the best point at >= 0.75 is the later, better one
    ev = traj((0.8, 0.5, 0.5), (0.6, 0.9, 0.9), (0.8, 0.7, 0.6))
    # crossings: 0.8 -> 0.6 at t = 1/4 (b = 0.6), 0.6 -> 0.8 at t = 3/4 (b = 0.9 - 0.2 * 3/4 = 0.75)
    assert dm.at_forgetting(ev, 0.75)["boundary_quality"] == pytest.approx(0.75)
    # area over L in [0.5, 1] with 51 points: a flat trajectory at (1.0, b) has area b
    assert dm.front_area(traj((1.0, 0.4, 0.4))) == pytest.approx(0.4)
    # reaching only L <= 0.75: 26 of 51 grid points at b = 0.5, the rest 0
    assert dm.front_area(traj((0.75, 0.5, 0.5))) == pytest.approx(0.5 * 26 / 51)


def test_paired_differences_mean_and_standard_error():
    seeds = []
    for d in (0.1, 0.3):
        seeds.append({"A": dm.arm_matched(traj((1.0, 0.5 + d, 0.5))), "B": dm.arm_matched(traj((1.0, 0.5, 0.5)))})
    seeds.append({"A": dm.arm_matched(traj((0.6, 0.9, 0.9))), "B": dm.arm_matched(traj((1.0, 0.5, 0.5)))})
    pr = dm.paired(seeds, "A", "B")
    m, se, n = pr["levels"]["0.9"]["boundary_quality"]
    assert (m, n) == (pytest.approx(0.2), 2) and se == pytest.approx(math.sqrt(0.02) / math.sqrt(2))
    assert pr["levels"]["0.9"]["reached"] == (2, 3, 3)
    # the area counts every seed: the third A never reaches 0.75, area 0.9 * 11 / 51
    areas = [0.1, 0.3, 0.9 * 11 / 51 - 0.5]
    assert pr["area"][0] == pytest.approx(sum(areas) / 3) and pr["area"][2] == 3
    assert dm.fmt_mse(pr["area"]).endswith("(n=3)") and dm.fmt_mse((None, None, 0)) == "n/a"
