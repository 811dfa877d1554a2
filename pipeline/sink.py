"""Writes a run's ``data/`` folder so that every ``*.parquet`` file in it is complete."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor

from pipeline.faults import maybe_fill_disk
from pipeline.outputs import PARTIAL_SUFFIX


class OutputWriteError(OSError):
    """A block of rows could not be written (a full disk, a lost mount): says which file and why."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


class ParquetFiles(Datasink[None]):
    """Ray Data's own Parquet sink writes each file in place, so a reader that lists the folder mid-write
    (a resume, a user's ``pyarrow``, a monitor) or after a kill meets a file without its footer. Here
    each write task writes a hidden ``.<name>.partial``, syncs it and renames it: a file named
    ``*.parquet`` is always complete, and a retried task replaces its own file rather than adding one."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.invocation = uuid.uuid4().hex  # file names of earlier invocations (resume) never collide

    def on_write_start(self, schema: pa.Schema | None = None) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)

    def write(self, blocks: Iterable[Block], ctx: Any) -> None:
        tables = [t for t in (BlockAccessor.for_block(b).to_arrow() for b in blocks) if t.num_rows]
        if not tables:
            return
        final = self.folder / f"{self.invocation}_{ctx.task_idx:06d}.parquet"
        partial = final.with_name(f".{final.name}{PARTIAL_SUFFIX}")
        try:
            with open(partial, "wb") as file:
                pq.write_table(pa.concat_tables(tables, promote_options="permissive"), file)
                maybe_fill_disk(self.folder)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, final)
        except OSError as error:
            partial.unlink(missing_ok=True)
            raise OutputWriteError(error.errno, f"cannot write {final}: {error.strerror or error}") from None
