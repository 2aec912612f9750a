"""The evaluators' shared probe -> generate -> score loop (rerule.eval.common.score_probes)."""

from __future__ import annotations

import pytest

from rerule.data.schema import ProbeRecord, ProbeSet
from rerule.eval.common import score_probes


def _probe(name, n, stop_at_newline=False):
    recs = [ProbeRecord(f"q{i}", f"a{i}") for i in range(n)]
    fmt = "Q: {prompt}\nA:"
    return ProbeSet(name, recs, ("rouge_l_recall",), fmt, max_new_tokens=7, stop_at_newline=stop_at_newline)


@pytest.fixture
def calls(monkeypatch):
    """Each generate_greedy call's arguments; replies echo the prompt padded with spaces."""
    seen = []

    def fake(model, tokenizer, prompts, max_new_tokens, batch_size, *, stop_at_newline, progress, desc):
        seen.append(dict(prompts=list(prompts), max_new_tokens=max_new_tokens, batch_size=batch_size,
                         stop_at_newline=stop_at_newline, desc=desc))
        return [f"  {p}  " for p in prompts]

    monkeypatch.setattr("rerule.eval.common.generate_greedy", fake)
    return seen


def _score(name, probe, recs, replies):
    return {f"{name}_n": len(recs)}, {f"{name}_replies": replies}


def test_score_probes_loops_limits_and_merges_in_order(calls):
    probes = {"b": _probe("b", 3, stop_at_newline=True), "empty": _probe("empty", 0), "a": _probe("a", 1)}
    m, s = score_probes(None, None, probes, _score, batch_size=4, max_examples=2)
    assert list(m) == ["b_n", "a_n"] and m == {"b_n": 2, "a_n": 1}  # the empty set is skipped
    assert s["b_replies"] == ["Q: q0\nA:", "Q: q1\nA:"]  # stripped
    assert [c["desc"] for c in calls] == ["b", "a"]
    assert calls[0] == dict(prompts=["Q: q0\nA:", "Q: q1\nA:"], max_new_tokens=7, batch_size=4,
                            stop_at_newline=True, desc="b")
    assert calls[1]["stop_at_newline"] is False


def test_score_probes_options(calls):
    probes = {"x": _probe("x", 2), "empty": _probe("empty", 0)}
    m, s = score_probes(
        None, None, probes, _score, batch_size=1, max_new_tokens=3, strip=False, skip_empty=False,
        stop_at_newline=True, prompts=lambda name, recs: [f"{name}:{r.prompt}" for r in recs],
    )
    assert m == {"x_n": 2, "empty_n": 0}
    assert s["x_replies"] == ["  x:q0  ", "  x:q1  "]  # not stripped, prompts from the callable
    assert [(c["max_new_tokens"], c["stop_at_newline"]) for c in calls] == [(3, True), (3, True)]


def test_score_probes_rejects_bad_max_examples(calls):
    with pytest.raises(ValueError, match="max_examples"):
        score_probes(None, None, {"x": _probe("x", 2)}, _score, batch_size=1, max_examples=0)
