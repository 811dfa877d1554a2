"""Faults injected on purpose, so that tests can check what a run survives. Nothing sets them in a
real run: ``DIRECTER_INJECT_FAULT`` (read by the model actors and the output writer) holds one of

- ``actor-exit:<marker>``: the first model actor to finish a batch while ``<marker>`` does not exist
  creates it and dies at once, before returning the batch (as the kernel's out-of-memory killer or a
  lost node would end it);
- ``disk-full:<n>``: a write into an output folder that already holds ``n`` complete files fails as a
  full disk does (``ENOSPC``), after part of the file is written;
- ``out-of-memory:<id>``: the engine fails on every call holding the row ``<id>`` as a device out of
  memory does;
- ``out-of-memory-above:<n>``: the engine fails so on every call decoding more than ``n`` rows together.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

VARIABLE = "DIRECTER_INJECT_FAULT"


def _fault(kind: str) -> str | None:
    name, _, argument = os.environ.get(VARIABLE, "").partition(":")
    return argument if name == kind else None


def maybe_exit_actor() -> None:
    """``actor-exit``: die once per marker, without cleanup."""
    marker = _fault("actor-exit")
    if marker is None:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os._exit(1)


def maybe_fill_disk(folder: Path) -> None:
    """``disk-full``: raise what a full disk raises once ``folder`` holds ``n`` files."""
    limit = _fault("disk-full")
    if limit is not None and len(list(Path(folder).glob("*.parquet"))) >= int(limit):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def maybe_run_out_of_memory(ids: list[str | None], batch_size: int) -> None:
    """``out-of-memory`` and ``out-of-memory-above``: raise what a device out of memory raises for a call
    decoding the rows ``ids``, ``batch_size`` of them together."""
    row, above = _fault("out-of-memory"), _fault("out-of-memory-above")
    if (row is not None and row in ids) or (above is not None and batch_size > int(above)):
        import torch

        raise torch.OutOfMemoryError(f"injected for rows {', '.join(map(str, ids))}, {batch_size} together")
