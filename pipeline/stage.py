"""The engine stage: a Ray Data actor that holds one model copy and runs Directer on each batch.

Preprocessing (row checks, chat template, spans), the engine, and postprocessing (Arrow columns)
run inside the actor, so each batch is one call and every input row gives exactly one output row.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from dataclasses import asdict
from typing import Any

import psutil
import pyarrow as pa

from directer.quality import completion_nll, distinct_n
from directer.spans import DETECTOR
from directer.steering import Steerer, register_steerer
from pipeline.config import GenerateConfig
from pipeline.faults import maybe_exit_actor, maybe_run_out_of_memory
from pipeline.inputs import READ_ERROR, TYPE_ERRORS
from pipeline.outputs import SUMMARY, TELEMETRY
from pipeline.ranking_cache import RankingCache
from pipeline.rows import RowError, prepare_row, row_id

GENERATED = pa.schema(
    [
        ("status", pa.string()),
        ("error", pa.string()),
        ("completion", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        ("token_ids", pa.list_(pa.int32())),
        ("instruction_tokens", pa.int32()),
        ("span_source", pa.string()),
        ("span_detector", pa.string()),
        ("nll", pa.float32()),
        ("distinct_2", pa.float32()),
        ("method", pa.string()),
        ("config_fingerprint", pa.string()),
        ("config", pa.string()),
        ("model", pa.string()),
        ("ranking", pa.list_(pa.int16())),
        ("ranking_cache", pa.string()),
        ("steering", SUMMARY),
        ("telemetry", pa.list_(TELEMETRY)),
        ("batch_seconds", pa.float64()),
        ("worker_load_seconds", pa.float64()),
        ("worker", pa.string()),
    ]
)

# how the errors of the run, not of the row (out of memory, a lost device), begin: a rerun runs those rows
# again (``pipeline.resume``); every other error row names the input field at fault and stays
ENGINE_ERROR, NLL_ERROR, NOT_GENERATED = "engine: ", "nll: ", "not generated"
RUN_ERRORS = (ENGINE_ERROR, NLL_ERROR, NOT_GENERATED)


def passed_name(column: str) -> str:
    """The output name of an input column passed through: its own, or ``input_<name>`` where the run
    writes a column of that name."""
    return f"input_{column}" if column in GENERATED.names else column


class GenerateStage:
    """Callable class for ``Dataset.map_batches`` (``batch_format="pyarrow"``)."""

    def __init__(self, config: GenerateConfig, duplicates: dict[str, int], steerer: type[Steerer]) -> None:
        register_steerer(steerer)
        import torch

        from directer import Directer

        device = config.actor_device or "cpu"  # the cluster's resources have filled in gpus_per_actor
        if device == "cpu" and config.threads_per_actor:
            torch.set_num_threads(config.threads_per_actor)
        self.config = config
        self.duplicates = duplicates
        self.directer = Directer.from_pretrained(
            config.model, device=device, dtype=config.dtype, trust_remote_code=config.trust_remote_code,
            # an actor holding part of a GPU plans within its part; one holding several splits the model
            memory_fraction=config.actor_memory_fraction,
            gpus=max(1, math.ceil(config.gpus_per_actor or 1)) if device.startswith("cuda") else 1,
        )  # fmt: skip
        self.steering = config.steering
        steerer = config.steering.steerer  # a ranking depends on what the probes do: scale keys by key_scale
        self.cache = (
            RankingCache(config.ranking_cache_dir, self.directer.loaded.identity, steerer.key_scale, steerer.ranking)
            if steerer.ranking is not None
            else None
        )
        self.constant = {
            "method": self.steering.method,
            "config_fingerprint": self.steering.fingerprint(),
            "config": json.dumps(self.steering.to_dict(), sort_keys=True),
            "model": self.directer.loaded.identity,
            "worker": f"{socket.gethostname()}:{os.getpid()}",
            # since the worker process started: its imports and the model load
            "worker_load_seconds": time.time() - psutil.Process().create_time(),
        }

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        loaded = self.directer.loaded
        prompts, errors = {}, {}
        for index, row in enumerate(rows):
            try:
                prompts[index] = prepare_row(
                    row,
                    loaded.tokenizer,
                    duplicates=self.duplicates,
                    context_length=loaded.context_length,
                    max_new_tokens=self.steering.max_new_tokens,
                    spans=self.config.spans,
                )
            except RowError as error:
                errors[index] = str(error)
            except Exception as error:  # nothing one row holds may fail the batch: it becomes that row's error
                errors[index] = f"prompt: {type(error).__name__}: {error}"
        started = time.perf_counter()
        completions, cache_hits = self._generate(rows, prompts, errors)
        nlls = self._nlls(completions, errors) if self.config.score_nll else {}
        seconds = time.perf_counter() - started
        records = [
            self._record(completions.get(i), errors.get(i), cache_hits.get(i), nlls.get(i), seconds)
            for i in range(len(rows))
        ]
        generated = pa.Table.from_pylist(records, schema=GENERATED)
        passthrough = batch.drop_columns([c for c in batch.column_names if c in ("id", TYPE_ERRORS, READ_ERROR)])
        ids = pa.array([row_id(row) for row in rows], type=pa.string())
        # an input column named as one the run writes (a dataset's own ``model`` or ``completion``) is kept
        # beside it, renamed
        columns = {"id": ids, **{passed_name(c): passthrough.column(c) for c in passthrough.column_names}}
        columns.update({c: generated.column(c) for c in generated.column_names})
        maybe_exit_actor()
        return pa.table(columns)

    def _generate(self, rows: list[dict], prompts: dict, errors: dict) -> tuple[dict, dict]:
        """Completions of the well-formed rows. A call that fails (a device out of memory, one row's failure)
        is split in two, each half decoding at most half as many rows together, down to single rows: only
        a row that fails alone becomes an error row, and a batch too large for the device is retried
        smaller, not row by row (on a GPU a pass of dozens of rows costs about what a pass of one does)."""
        rankings = {i: self.cache.get(prompt) if self.cache else None for i, prompt in prompts.items()}
        # a row without an instruction span is not steered and has no ranking: no cache status
        hits = {i: "hit" if r is not None else "miss" for i, r in rankings.items() if self.cache and prompts[i].span}
        completions: dict = {}
        pending = [(list(prompts), self.config.batch_size)]
        while pending:
            indices, batch_size = pending.pop()
            batch = [prompts[i] for i in indices]
            try:
                ids = [row_id(rows[i]) for i in indices]
                completions.update(zip(indices, self._complete(batch, batch_size, [rankings[i] for i in indices], ids)))
            except Exception as error:
                if len(indices) == 1:
                    errors[indices[0]] = f"{ENGINE_ERROR}{type(error).__name__}: {error}"
                    continue
                smaller = max(1, self.directer.batch_size_for(batch, self.steering, batch_size) // 2)
                middle = len(indices) // 2
                pending += [(indices[middle:], smaller), (indices[:middle], smaller)]
        if self.cache:
            for index, completion in completions.items():
                if completion.ranking is not None:
                    self.cache.put(prompts[index], completion.ranking)
            self.cache.flush()
        return completions, hits

    def _complete(self, prompts: list, batch_size: int | None, rankings: list, ids: list[str | None]) -> list:
        maybe_run_out_of_memory(ids, min(len(ids), batch_size or len(ids)))
        return self.directer.complete(prompts, self.steering, batch_size, rankings, ids)

    def _nlls(self, completions: dict, errors: dict) -> dict[int, float]:
        """Each completion's mean NLL under the unsteered model; a row whose scoring fails (a long row out
        of memory, say) becomes an error row instead of failing the batch."""
        model, nlls = self.directer.loaded.model, {}
        for index, completion in list(completions.items()):
            try:
                nlls[index] = completion_nll(model, completion.prompt.token_ids, completion.token_ids)
            except Exception as error:
                errors[index] = f"{NLL_ERROR}{type(error).__name__}: {error}"
                del completions[index]
        return nlls

    def _record(
        self, completion, error: str | None, cache: str | None, nll: float | None, seconds: float
    ) -> dict[str, Any]:
        if completion is None:
            return {"status": "error", "error": error or NOT_GENERATED, **self.constant}
        return {
            "status": "ok",
            "error": None,
            "completion": completion.text,
            "finish_reason": completion.finish_reason,
            "prompt_tokens": len(completion.prompt.token_ids),
            "completion_tokens": len(completion.token_ids),
            "token_ids": completion.token_ids,
            "instruction_tokens": len(completion.prompt.span),
            "span_source": completion.prompt.span_source,
            "span_detector": DETECTOR if completion.prompt.span_source == "auto" else None,
            "nll": nll,
            "distinct_2": distinct_n(completion.text),
            "ranking": completion.ranking,
            "ranking_cache": cache,
            "steering": asdict(completion.summary),
            "telemetry": [asdict(step) for step in completion.telemetry],
            "batch_seconds": seconds,
            **self.constant,
        }
