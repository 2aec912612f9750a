"""The synthetic world: determinism, structure, and what the hardness knob does."""

from difflib import SequenceMatcher

import pytest

from rerule.data import load_task, synthetic_world
from rerule.data.synthetic import ATTRIBUTES, SHAREABLE


def _pairs(task):
    ents = task.meta["entities"]
    by_name = {e["name"]: e for e in ents}
    return [(by_name[e["pair"]], e) for e in ents if e["role"] == "boundary"]


def _edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _overlap(task):
    """(mean name similarity, mean attribute overlap, share of shared first/last names) over pairs."""
    pairs = _pairs(task)
    names = sum(SequenceMatcher(None, f["name"], b["name"]).ratio() for f, b in pairs) / len(pairs)
    attrs = sum(sum(f["attrs"][k] == b["attrs"][k] for k in f["attrs"]) / len(f["attrs"]) for f, b in pairs)
    parts = sum((f["first"] == b["first"]) + (f["last"] == b["last"]) for f, b in pairs) / (2 * len(pairs))
    return names, attrs / len(pairs), parts


def test_same_seed_same_world_other_seed_other_world():
    a, b = synthetic_world(seed=3, hardness=0.6), synthetic_world(seed=3, hardness=0.6)
    assert a.forget == b.forget and a.boundary == b.boundary and a.retain == b.retain
    assert a.corpus() == b.corpus()
    c = synthetic_world(seed=4, hardness=0.6)
    assert [r.subject for r in c.forget] != [r.subject for r in a.forget]


def test_structure_and_sizes():
    task = synthetic_world(
        seed=0, hardness=0.8, n_forget=3, n_boundary=5, n_retain=2, n_attributes=4, n_templates=2
    )
    assert task.summary()["forget"] == 3 * 4 * 2
    assert len(task.boundary) == 5 * 4 * 2 and len(task.retain) == 2 * 4 * 2
    forget_names = {r.subject for r in task.forget}
    assert all(r.subject in r.prompt for r in task.forget + task.boundary + task.retain)
    assert all(b.pair in forget_names and b.subject not in forget_names for b in task.boundary)
    assert {r.meta["attribute"] for r in task.forget} == set(list(ATTRIBUTES)[:4])
    assert max(len(r.answer.split()) for r in task.forget + task.boundary + task.retain) <= 4
    corpus = task.corpus()
    for r in task.forget + task.boundary + task.retain:
        assert f"Question: {r.prompt}\nAnswer: {r.answer}" in corpus
    # The knowledge a boundary entity must keep differs from its forget entity's.
    for f, b in _pairs(task):
        assert all(f["attrs"][k] != b["attrs"][k] for k in ("year", "work", "award", "mentor"))
    assert task.probes["forget"].metrics[0] == "refusal_rate"
    assert load_task("synthetic", seed=0, hardness=0.8, n_forget=3, n_boundary=5, n_retain=2,
                     n_attributes=4, n_templates=2).forget == task.forget


def test_hardness_zero_shares_nothing():
    task = synthetic_world(seed=1, hardness=0.0)
    forget_first = {e["first"] for e in task.meta["entities"] if e["role"] == "forget"}
    forget_last = {e["last"] for e in task.meta["entities"] if e["role"] == "forget"}
    for f, b in _pairs(task):
        assert b["first"] not in forget_first and b["last"] not in forget_last
        assert all(f["attrs"][k] != b["attrs"][k] for k in f["attrs"])


def test_hardness_one_names_differ_by_one_letter():
    task = synthetic_world(seed=2, hardness=1.0)
    for f, b in _pairs(task):
        assert _edit_distance(f["name"], b["name"]) == 1
        assert all(f["attrs"][k] == b["attrs"][k] for k in SHAREABLE)
    assert len({e["name"] for e in task.meta["entities"]}) == len(task.meta["entities"])


@pytest.mark.parametrize("seed", [0, 5])
def test_hardness_raises_name_and_attribute_overlap(seed):
    low, mid, high = (
        _overlap(synthetic_world(seed=seed, hardness=h, n_boundary=16)) for h in (0.0, 0.5, 1.0)
    )
    for i in range(2):
        assert low[i] < mid[i] < high[i]
    assert low[2] == 0.0 and 0.15 < mid[2] < 0.85
    # One uniform per decision: raising the knob never removes a shared attribute from a pair.
    a, b = (_pairs(synthetic_world(seed=seed, hardness=h)) for h in (0.3, 0.7))
    for (f1, b1), (f2, b2) in zip(a, b):
        assert {k for k in SHAREABLE if f1["attrs"][k] == b1["attrs"][k]} <= {
            k for k in SHAREABLE if f2["attrs"][k] == b2["attrs"][k]
        }


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"hardness": 1.5}, "hardness"),
        ({"n_attributes": 7}, "n_attributes"),
        ({"n_templates": 0}, "n_templates"),
        ({"n_forget": 0}, "n_forget"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        synthetic_world(**kwargs)
