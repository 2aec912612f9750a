"""Benchmarks of the loss op: correctness gates, then timings (see bench/impls.py for the impls)."""

import pytest

from bench.harness import gate_params, gate_test, timing_params, timing_test

OP = "loss"


@pytest.mark.parametrize("impl,case", gate_params(OP))
def test_gate(benchmark, impl, case):
    gate_test(benchmark, OP, impl, case)


@pytest.mark.parametrize("case,impl,mode", timing_params(OP))
def test_time(benchmark, case, impl, mode):
    timing_test(benchmark, OP, case, impl, mode)
