"""One code path from a benchmark's (config, split) to validated rows.

``data_dir=None`` reads the hub dataset through ``datasets.load_dataset(hub_id,
config, split=split)``. A local directory goes through ``datasets.load_dataset``
too (the json or parquet builder), then the same validation, so a test on the
shipped fixtures exercises what a user on the hub gets.

Local layouts searched, first match wins (``ext`` is jsonl, json or parquet):

- ``{data_dir}/{config}/{split}.{ext}``
- ``{data_dir}/{config}/{split}-*.parquet`` (the hub's own parquet layout)
- ``{data_dir}/{config}.{ext}`` (TOFU's hub layout: one file per config)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

EXTENSIONS = ("jsonl", "json", "parquet")


class DataFormatError(ValueError):
    """A benchmark file is not in the benchmark's schema (names file, row, field)."""


def check_config(benchmark: str, config: str, known: Iterable[str]) -> None:
    """Raise ValueError naming ``config`` and the known ones if it is not one of them."""
    known = list(known)
    if config not in known:
        raise ValueError(f"{benchmark}: unknown config {config!r}; expected one of {known}")


def resolve_local(data_dir: str | Path, config: str, split: str) -> Path:
    """The file holding ``config``/``split`` under ``data_dir`` (layouts in the module doc)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"data_dir {str(root)!r} is not a directory")
    tried = []
    for ext in EXTENSIONS:
        tried.append(root / config / f"{split}.{ext}")
    tried.append(root / config / f"{split}-*.parquet")
    for ext in EXTENSIONS:
        tried.append(root / f"{config}.{ext}")
    for path in tried:
        if "*" in path.name:
            hits = sorted(path.parent.glob(path.name)) if path.parent.is_dir() else []
            if hits:
                return hits[0]
        elif path.is_file():
            return path
    raise FileNotFoundError(
        f"no file for config {config!r} split {split!r} under {str(root)!r}; tried: "
        + ", ".join(str(p.relative_to(root)) for p in tried)
    )


def load_rows(
    hub_id: str,
    config: str,
    split: str,
    *,
    data_dir: str | Path | None,
    required: Sequence[str],
    list_fields: Sequence[str] = (),
    optional: Sequence[str] = (),
) -> tuple[list[dict[str, Any]], str]:
    """Load one (config, split) and check its fields.

    Args:
        hub_id: e.g. "locuslab/TOFU".
        config, split: the hub's names.
        data_dir: None for the hub, else a local directory (module doc).
        required: string fields every row must have (non-null).
        list_fields: fields (among ``required``) that are lists of strings.
        optional: string fields kept when present (null allowed).

    Returns:
        (rows, origin): rows as dicts with only the named fields, and the file
        path (or ``hub_id:config/split``) that error messages and reports cite.

    Raises:
        DataFormatError: a missing or mistyped field, naming file, row and field.
        FileNotFoundError: no local file for (config, split).
    """
    import datasets

    if data_dir is None:
        origin = f"{hub_id}:{config}/{split}"
        try:
            ds = datasets.load_dataset(hub_id, config, split=split)
        except Exception as e:  # offline, unknown id, network: one line that says what to do
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"cannot load {origin} from the Hugging Face hub ({type(e).__name__}: {first}); "
                             f"offline? download it and pass a local folder (--data-dir / task.data_dir)") from None
    else:
        path = resolve_local(data_dir, config, split)
        origin = str(path)
        builder = "parquet" if path.suffix == ".parquet" else "json"
        try:
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as e:
            # datasets reports schema clashes deep in pyarrow; say which file it was.
            raise DataFormatError(f"{origin}: could not be read as {builder}: {e}") from e
    columns = set(ds.column_names)
    for name in required:
        if name not in columns:
            raise DataFormatError(
                f"{origin}: row 0: missing field {name!r} (config {config!r}; columns: {sorted(columns)})"
            )
    keep = [*required, *(f for f in optional if f in columns)]
    rows = []
    for i, row in enumerate(ds.select_columns(keep).to_list()):
        for name in required:
            value = row[name]
            if name in list_fields:
                ok = isinstance(value, list) and value and all(isinstance(v, str) for v in value)
                want = "a non-empty list of strings"
            else:
                ok = isinstance(value, str)
                want = "a string"
            if not ok:
                if value is None:
                    raise DataFormatError(f"{origin}: row {i}: missing field {name!r}")
                raise DataFormatError(
                    f"{origin}: row {i}: field {name!r} must be {want}, got {type(value).__name__}"
                )
        rows.append(row)
    return rows, origin
