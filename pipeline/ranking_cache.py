"""Layer rankings that outlive a run: Parquet files in one folder, shared by every actor.

A ranking depends on the model, the prompt's token ids, the steered span, the factor the probes scale
the span's keys by (the steerer's ``key_scale``: ``alpha`` for every built-in method) and the ranking
rule (``caused`` or ``received``) only, so a rerun, or a run with another ``beta`` or token budget,
reuses it. Each actor reads the folder when it
starts and adds one new file per batch (written under a hidden name, then renamed).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from directer.prompts import Prompt
from pipeline.outputs import replacing

SCHEMA = pa.schema([("key", pa.string()), ("ranking", pa.list_(pa.int16()))])


class RankingCache:
    def __init__(self, folder: Path, model_identity: str, key_scale: float, ranking: str) -> None:
        self.folder = folder
        self.model_identity = model_identity
        self.key_scale = key_scale
        self.ranking = ranking
        self.rankings: dict[str, list[int]] = {}
        self.pending: dict[str, list[int]] = {}
        folder.mkdir(parents=True, exist_ok=True)
        for path in sorted(folder.glob("*.parquet")):
            try:
                table = pq.read_table(path, schema=SCHEMA)
            except (pa.ArrowInvalid, OSError):
                continue
            self.rankings.update(zip(table.column("key").to_pylist(), table.column("ranking").to_pylist()))

    def key(self, prompt: Prompt) -> str:
        blob = json.dumps([self.model_identity, prompt.token_ids, prompt.span, self.key_scale, self.ranking])
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, prompt: Prompt) -> list[int] | None:
        return self.rankings.get(self.key(prompt))

    def put(self, prompt: Prompt, ranking: list[int]) -> None:
        key = self.key(prompt)
        if key not in self.rankings:
            self.rankings[key] = self.pending[key] = ranking

    def flush(self) -> None:
        if not self.pending:
            return
        table = pa.table({"key": list(self.pending), "ranking": list(self.pending.values())}, schema=SCHEMA)
        with replacing(self.folder / f"rankings-{uuid.uuid4().hex}.parquet") as staging:
            pq.write_table(table, staging)
        self.pending.clear()
