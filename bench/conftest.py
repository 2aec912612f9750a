"""pytest set-up of the kernel benchmarks (``make bench`` = ``pytest bench --benchmark-only``).

Runs gates first, then the timings in priority order (the issue's goal shapes first, torch.compile
last, so a deadline cuts the least useful part), and writes the results JSON at the end.

Under pytest-benchmark's ``--benchmark-disable`` every benchmark runs once as a plain test (gates
still judge correctness; timings run their call once) and no results file is written.
"""

import os

import torch

# The Triton interpreter must be on before triton is imported, and only where there is no GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.common import SESSION, device, pin_malloc_threshold, profile  # noqa: E402
from bench.harness import PRIORITY  # noqa: E402

if not torch.cuda.is_available():
    torch.set_num_threads(int(os.environ.get("RERULE_BENCH_THREADS", "1")))
    pin_malloc_threshold()


def pytest_collection_modifyitems(session, config, items):
    def prio(item):
        op = getattr(item.module, "OP", None)
        callspec = getattr(item, "callspec", None)
        return PRIORITY.get((op, item.originalname, callspec.id if callspec else None), 5)

    items.sort(key=prio)  # stable: file and parameter order within one priority


def _disabled(config) -> bool:
    return bool(config.getoption("benchmark_disable", False))


def pytest_runtest_teardown(item):
    # Written after every test, so a run stopped at its deadline or killed keeps what it measured.
    if not _disabled(item.config):
        SESSION.write(device(), profile())


def pytest_sessionfinish(session, exitstatus):
    if _disabled(session.config):
        return
    path = SESSION.write(device(), profile())
    if path is not None:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        msg = f"rerule bench: {len(SESSION.rows)} timing rows, {len(SESSION.gates)} gates -> {path}"
        if reporter is not None:
            reporter.write_line(msg)
        else:
            print(msg)
