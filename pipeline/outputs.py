"""A ``directer generate`` output folder: ``data/*.parquet`` (one row per input row) and ``run.json``.

The one place that knows the folder's layout; generate (resume, summary, manifest), evaluation, the
report, export and the CLI's examples all read a run through it (generate writes it through
``pipeline.sink``).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from directer.telemetry import SteeringSummary, StepTelemetry, arrow_fields

# the struct columns a run writes (``pipeline.stage``) and an export passes on
TELEMETRY = pa.struct([(name, pa.type_for_alias(kind)) for name, kind in arrow_fields(StepTelemetry)])
SUMMARY = pa.struct([(name, pa.type_for_alias(kind)) for name, kind in arrow_fields(SteeringSummary)])

# what an interrupted write leaves (``.<name>.parquet.partial``, see ``pipeline.sink``); never a complete file
PARTIAL_SUFFIX = ".partial"

# rows a reader of a whole run takes into Python at a time (the report's counts, export, the examples)
BATCH_ROWS = 10_000


def discard_partial(folder: Path, older_than: float = 0.0) -> None:
    """Remove the partial files in ``folder`` last written more than ``older_than`` seconds ago."""
    now = time.time()
    for path in folder.glob(f".*{PARTIAL_SUFFIX}") if folder.is_dir() else []:
        with contextlib.suppress(FileNotFoundError):
            if now - path.stat().st_mtime > older_than:
                path.unlink()


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A hidden path beside ``path`` to write to, renamed to ``path`` once written: a reader (or a rerun
    after a kill) finds the old file or the whole new one, never a truncated one that looks complete."""
    partial = path.with_name(f".{path.name}{PARTIAL_SUFFIX}")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


@dataclass(frozen=True)
class RunOutput:
    folder: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "folder", Path(self.folder))

    @property
    def data_dir(self) -> Path:
        return self.folder / "data"

    @property
    def broken_dir(self) -> Path:
        return self.folder / "broken"

    @property
    def manifest_path(self) -> Path:
        return self.folder / "run.json"

    def files(self) -> list[Path]:
        return sorted(self.data_dir.glob("*.parquet")) if self.data_dir.is_dir() else []

    def discard_partial(self) -> None:
        """Remove what an interrupted write left (never a complete file)."""
        discard_partial(self.data_dir)

    def read(self, columns: list[str] | None = None, files: list[Path] | None = None) -> pa.Table:
        """The rows of ``files`` (default: all), with the ``columns`` present (default: all); an empty table
        when there are none."""
        files = self.files() if files is None else files
        if not files:
            return pa.table({})
        dataset = self._dataset(files)
        return dataset.to_table(columns=self._present(dataset, columns))

    def rows(self, columns: list[str] | None = None) -> list[dict[str, Any]]:
        return self.read(columns).to_pylist()

    def batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        """The rows, ``BATCH_ROWS`` at a time, with the ``columns`` present: a run of any length in bounded
        memory."""
        if files := self.files():
            dataset = self._dataset(files)
            yield from dataset.to_batches(columns=self._present(dataset, columns), batch_size=BATCH_ROWS)

    def rows_with_ids(self, ids: Iterable[str], columns: list[str]) -> list[dict[str, Any]]:
        """The rows with these ids, read a batch at a time: a few rows of a long run, in little memory."""
        wanted = pa.array(sorted(set(ids)), type=pa.string())
        return [
            row
            for batch in self.batches(["id", *columns])
            for row in batch.filter(pc.is_in(batch.column("id"), value_set=wanted)).to_pylist()
        ]

    def count(self) -> int:
        """Rows written, from the files' footers."""
        return sum(self.rows_in(path) for path in self.files())

    @staticmethod
    def rows_in(path: Path) -> int:
        """Rows of one written file, from its footer."""
        return pq.ParquetFile(path).metadata.num_rows

    @staticmethod
    def _dataset(files: list[Path]) -> pads.Dataset:
        # files of one run may type a passthrough column apart (all null in one block, text in another)
        schema = pa.unify_schemas([pq.read_schema(f) for f in files], promote_options="permissive")
        return pads.dataset([str(f) for f in files], format="parquet", schema=schema)

    @staticmethod
    def _present(dataset: pads.Dataset, columns: list[str] | None) -> list[str] | None:
        return None if columns is None else [c for c in columns if c in dataset.schema.names]

    def read_keys(self, columns: list[str]) -> pa.Table:
        """Text ``columns`` of every row written (what a rerun decides by). An unreadable file (not one this
        version writes: a disk's damage) is moved to ``broken/``, out of the way of every reader of
        ``data/``, and its rows run again."""
        tables = [pa.table({name: pa.array([], pa.string()) for name in columns})]
        for path in self.files():
            try:
                tables.append(pads.dataset(str(path), format="parquet").to_table(columns=columns))
            except (pa.ArrowInvalid, OSError):
                self.broken_dir.mkdir(exist_ok=True)
                path.rename(self.broken_dir / path.name)
        return pa.concat_tables(tables, promote_options="permissive")

    def remove_rows(self, drop: Callable[[pa.Table], pa.Array], columns: list[str]) -> None:
        """Remove the rows for which ``drop`` (given their ``columns``) is true; a file holding any is
        replaced whole."""
        for path in self.files():
            dropped = drop(pq.read_table(path, columns=columns))
            if not pc.any(dropped).as_py():
                continue
            kept = pq.read_table(path).filter(pc.invert(dropped))
            if not kept.num_rows:
                path.unlink()
                continue
            with replacing(path) as partial:
                pq.write_table(kept, partial)

    def manifest(self) -> dict[str, Any] | None:
        return json.loads(self.manifest_path.read_text()) if self.manifest_path.is_file() else None

    @classmethod
    def of_method(cls, evaluation: Path, method: str) -> RunOutput:
        """The run of one method inside a ``directer eval`` output folder (``runs/<method>``)."""
        return cls(Path(evaluation) / "runs" / method)

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with replacing(self.manifest_path) as partial:
            partial.write_text(json.dumps(manifest, indent=2, default=str))
