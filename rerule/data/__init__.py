"""Benchmarks in one schema: TOFU, MUSE, RWKU and the embedded synthetic world.

Example:
    >>> from rerule.data import load_task, synthetic_world
    >>> task = load_task("synthetic", seed=0, hardness=0.5)
    >>> task.summary()["forget"]
    144
"""

from __future__ import annotations

from pathlib import Path

from rerule.data._hub import DataFormatError
from rerule.data.muse import load_muse
from rerule.data.rwku import load_rwku
from rerule.data.schema import ProbeRecord, ProbeSet, PromptRecord, UnlearningTask
from rerule.data.synthetic import synthetic_world
from rerule.data.tofu import load_tofu

BENCHMARKS = ("tofu", "muse", "rwku", "synthetic")
FIXTURES = Path(__file__).parent / "fixtures"


def load_task(
    benchmark: str,
    forget: str | None = None,
    data_dir: str | Path | None = None,
    **kwargs,
) -> UnlearningTask:
    """Load a benchmark into an :class:`UnlearningTask`.

    Args:
        benchmark: "tofu", "muse", "rwku" or "synthetic".
        forget: the forget split where the benchmark has several: TOFU
            "forget01" | "forget05" | "forget10" (default "forget10"); MUSE
            "books" | "news" (default "books"). Ignored by RWKU and synthetic.
        data_dir: None reads the hub through ``datasets.load_dataset``; a local
            directory of json / jsonl / parquet files goes through the same code.
        **kwargs: passed to the loader (``load_tofu``, ``load_muse``,
            ``load_rwku``, ``synthetic_world``).

    Example:
        >>> task = load_task("tofu", forget="forget01", data_dir=FIXTURES / "tofu",
        ...                  questions_per_author=4)
        >>> task.name
        'tofu/forget01'
    """
    if benchmark == "tofu":
        return load_tofu(forget or "forget10", data_dir, **kwargs)
    if benchmark == "muse":
        return load_muse(forget or "books", data_dir, **kwargs)
    if benchmark == "rwku":
        return load_rwku(data_dir=data_dir, **kwargs)
    if benchmark == "synthetic":
        return synthetic_world(**kwargs)
    raise ValueError(f"benchmark must be one of {BENCHMARKS}, got {benchmark!r}")


__all__ = [
    "BENCHMARKS",
    "FIXTURES",
    "DataFormatError",
    "ProbeRecord",
    "ProbeSet",
    "PromptRecord",
    "UnlearningTask",
    "load_muse",
    "load_rwku",
    "load_task",
    "load_tofu",
    "synthetic_world",
]
