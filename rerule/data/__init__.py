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
from rerule.data.custom import load_custom
from rerule.data.muse import load_muse
from rerule.data.rwku import load_rwku
from rerule.data.schema import ProbeRecord, ProbeSet, PromptRecord, UnlearningTask
from rerule.data.synthetic import synthetic_world
from rerule.data.tofu import load_tofu

BENCHMARKS = ("tofu", "muse", "rwku", "synthetic", "custom")
FIXTURES = Path(__file__).parent / "fixtures"


def load_task(
    benchmark: str,
    forget: str | None = None,
    data_dir: str | Path | None = None,
    **kwargs,
) -> UnlearningTask:
    """Load a benchmark into an :class:`UnlearningTask`.

    Args:
        benchmark: "tofu", "muse", "rwku", "synthetic" or "custom" (your own files:
            ``rerule.data.custom``; ``forget`` is then a hub dataset id, used when ``data_dir`` is None).
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
    loaders = {
        "tofu": lambda: load_tofu(forget or "forget10", data_dir, **kwargs),
        "muse": lambda: load_muse(forget or "books", data_dir, **kwargs),
        "rwku": lambda: load_rwku(data_dir=data_dir, **kwargs),
        "synthetic": lambda: synthetic_world(**kwargs),
        "custom": lambda: load_custom(data_dir=data_dir, hub_id=forget, **kwargs),
    }
    if benchmark not in loaders:
        raise ValueError(f"benchmark must be one of {BENCHMARKS}, got {benchmark!r}")
    try:
        return loaders[benchmark]()
    except TypeError as e:
        if "argument" not in str(e):
            raise
        # A task.kwargs key the loader does not take (often left over from another task's config).
        raise ValueError(f"task {benchmark!r}: bad task.kwargs {sorted(kwargs)}: {e}") from None


__all__ = [
    "BENCHMARKS",
    "FIXTURES",
    "DataFormatError",
    "ProbeRecord",
    "ProbeSet",
    "PromptRecord",
    "UnlearningTask",
    "load_custom",
    "load_muse",
    "load_rwku",
    "load_task",
    "load_tofu",
    "synthetic_world",
]
