"""What a rerun into an output folder may resume, and which input rows it runs again.

A row is keyed by its id. A rerun runs the rows whose id the output lacks, and runs again:
- the rows whose generation failed for a reason of the run, not of the row (out of memory, a lost
  device: :data:`pipeline.stage.RUN_ERRORS`); their error rows are removed first;
- the rows without a usable key (no id, or an id the input repeats: error rows, written without
  running the model), as a group, when the output holds fewer of them than the input does: which of
  them were written cannot be told apart.
So a finished folder is left as it is, and every input row has exactly one output row.
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from directer.config import SteeringConfig
from pipeline.config import GenerateConfig
from pipeline.outputs import RunOutput
from pipeline.stage import RUN_ERRORS

# what a run's rows depend on: a rerun into the same folder must keep them (the dtype: see check_precision)
RESUME_FIELDS = ("model", "steering", "spans", "score_nll")


def check_resumable(config: GenerateConfig, input_files: list[str]) -> None:
    """Resume only a run of the same configuration and inputs: rows of two runs never mix in one folder."""
    manifest = config.run_output.manifest()
    if config.overwrite or manifest is None:
        return
    before, now = manifest.get("config", {}), config.to_dict()
    differences = []
    for name in RESUME_FIELDS:
        old, new = before.get(name), now[name]
        if name == "steering":
            # what changes tokens only (the trial schedule does not); a field added since that run was
            # written ran with its default
            old = {**SteeringConfig().to_dict(), **(old or {})}
            fields = config.steering.token_fields().items()
            differences += [
                f"steering.{key} {old.get(key)!r} -> {value!r}" for key, value in fields if old.get(key) != value
            ]
        elif old != new:
            differences.append(f"{name} {old!r} -> {new!r}")
    if not same_inputs(manifest, input_files, config.output_dir):
        differences.append(f"inputs {', '.join(manifest['input_files'])} -> {', '.join(input_files)}")
    if differences:
        raise ValueError(
            f"{config.output} holds a run with another configuration ({'; '.join(differences)}): "
            "rerun with --overwrite to start over there, or choose another --output"
        )


def same_inputs(manifest: dict[str, Any], input_files: list[str], output_dir: Path) -> bool:
    """The run in ``manifest`` read ``input_files``: the same paths, or, for a folder moved with its
    inputs (an evaluation folder holds its ``inputs.parquet``), the same paths relative to the run."""
    before = manifest.get("input_files", input_files)
    if before == input_files:
        return True
    if "output_dir" not in manifest:
        return False
    relative = [os.path.relpath(path, manifest["output_dir"]) for path in before]
    return relative == [os.path.relpath(path, output_dir.resolve()) for path in input_files]


def check_precision(output: RunOutput, dtype: str) -> None:
    """Refuse to add rows in ``dtype`` (the resolved one: ``--dtype`` or the actors' device's default) to
    rows written in another: a run begun on a CPU (float32) and resumed on a GPU (bfloat16) would mix
    precisions without a changed option to show it. Each row's ``model`` ends in ``@<dtype>``."""
    written: set[str] = set()
    for batch in output.batches(["model"]):
        written.update(v.rpartition("@")[2] for v in pc.unique(batch.column("model")).to_pylist() if v)
    if written - {dtype}:
        raise ValueError(
            f"{output.folder} holds rows generated in {', '.join(sorted(written))}; this run would generate in "
            f"{dtype}: pass --dtype {sorted(written)[0]} to finish it in the same precision, or --overwrite to "
            "start over"
        )


KEYS = ["id", "status", "error"]  # the columns a rerun decides by


@dataclass(frozen=True)
class Resume:
    """What a rerun skips (``done``: the ids kept, and whether the rows without an id are) and what it
    runs again: the written rows :meth:`runs_again` picks, removed by :meth:`settle`."""

    done: frozenset[str]
    without_id_done: bool
    repeated_again: pa.Array  # repeated ids whose rows run again (the output holds fewer than the input)
    retried: int  # error rows of the run's own failures
    removed: int  # written rows that run again

    def todo(self, ids: list[object]) -> int:
        """Input rows (their ids, in input order) this rerun runs."""
        return sum(not (self.without_id_done if i is None else str(i) in self.done) for i in ids)

    def runs_again(self, rows: pa.Table) -> pa.Array:
        """Which written ``rows`` (their ``KEYS``) run again."""
        unkeyed = pc.is_in(rows.column("id"), value_set=self.repeated_again)
        if not self.without_id_done:
            unkeyed = pc.or_(unkeyed, pc.is_null(rows.column("id")))
        return pc.or_(pc.fill_null(unkeyed, False), failed_by_the_run(rows))

    def settle(self, output: RunOutput) -> None:
        """Remove from ``output`` the rows that run again."""
        if self.removed:
            output.remove_rows(self.runs_again, KEYS)


def failed_by_the_run(rows: pa.Table) -> pa.Array:
    """Which of ``rows`` (their ``KEYS``) are error rows of the run's own failures."""
    errors = pc.fill_null(rows.column("error"), "")
    failure = functools.reduce(pc.or_, [pc.starts_with(errors, prefix) for prefix in RUN_ERRORS])
    return pc.fill_null(pc.and_(pc.equal(rows.column("status"), "error"), failure), False)


def plan_resume(output: RunOutput, ids: list[object], duplicates: dict[str, int]) -> Resume:
    """What a rerun over input rows with ``ids`` (``duplicates``: the ids repeated, with their counts)
    skips and runs again, from what ``output`` holds; changes nothing there but setting aside unreadable
    files (:meth:`RunOutput.read_keys`)."""
    written = output.read_keys(KEYS)
    counts = Counter(i for i in written.column("id").to_pylist() if i is None or i in duplicates)
    repeated_again = sorted(key for key, count in duplicates.items() if counts[key] < count)
    without_id_done = counts[None] >= sum(1 for i in ids if i is None)
    retried = pc.sum(failed_by_the_run(written)).as_py() or 0
    resume = Resume(frozenset(), without_id_done, pa.array(repeated_again, pa.string()), retried, 0)
    again = resume.runs_again(written)
    kept = written.filter(pc.invert(again)).column("id").drop_null().to_pylist()
    return replace(resume, done=frozenset(kept), removed=pc.sum(again).as_py() or 0)


def drop_done(batch: pa.Table, done: pa.Array, without_id_done: bool) -> pa.Table:
    """The rows of ``batch`` a rerun runs (for ``Dataset.map_batches``; ``done``: :attr:`Resume.done`)."""
    if "id" not in batch.column_names:
        return batch.slice(0, 0) if without_id_done else batch
    keep = pc.invert(pc.is_in(pc.cast(batch.column("id"), pa.string()), value_set=done))
    return batch.filter(pc.fill_null(keep, not without_id_done))
