"""Hugging Face datasets on disk as `prepare` sources: a folder written by `save_to_disk` (arrow;
a `DatasetDict` gives its splits in name order) or `.parquet` files. Each row's text column is
one document. `datasets` / `pyarrow` are the optional extra `titans-scale[datasets]`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from titans_scale.errors import DataError

_BATCH_ROWS = 1024
_EXTRA = "pip install 'titans-scale[datasets]'"


def is_saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def _strings(values: list, path: Path, column: str) -> Iterator[str]:
    for v in values:
        if v is None:
            continue
        if not isinstance(v, str):
            raise DataError(f"{path}: column '{column}' holds {type(v).__name__} values, not text; "
                            "pass --text-column naming a string column")
        yield v


def _missing(path: Path, column: str, columns: list[str]) -> DataError:
    return DataError(f"{path}: no column '{column}' (columns: {', '.join(columns) or 'none'}); "
                     "pass --text-column naming the text column")


def _parquet_texts(path: Path, column: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow; {_EXTRA}") from None
    try:
        f = pq.ParquetFile(path)
    except Exception as e:                       # pyarrow raises its own ArrowInvalid on a bad file
        raise DataError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    if column not in f.schema_arrow.names:
        raise _missing(path, column, f.schema_arrow.names)
    for batch in f.iter_batches(batch_size=_BATCH_ROWS, columns=[column]):
        yield from _strings(batch.column(0).to_pylist(), path, column)


def _saved_texts(path: Path, column: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading a saved Hugging Face dataset needs `datasets`; {_EXTRA}") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"{path}: not a readable saved Hugging Face dataset ({str(e).splitlines()[0]})") from None
    parts = [ds[k] for k in sorted(ds)] if isinstance(ds, datasets.DatasetDict) else [ds]
    for part in parts:
        if column not in part.column_names:
            raise _missing(path, column, part.column_names)
        for batch in part.select_columns([column]).iter(batch_size=_BATCH_ROWS):
            yield from _strings(batch[column], path, column)


def iter_texts(path: Path, column: str) -> Iterator[str]:
    """The non-null texts of `column`, row by row, streamed in batches (a .parquet file or a saved folder)."""
    return _parquet_texts(path, column) if path.suffix == ".parquet" else _saved_texts(path, column)


__all__ = ["is_saved_dataset", "iter_texts"]
