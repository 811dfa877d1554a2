"""``directer eval``: generate with several methods through the pipeline, score with IFEval's checkers.

Writes under the output folder: ``inputs.parquet``, ``runs/<method>/`` (each a ``directer
generate`` output, sharing one ranking cache), ``scores.parquet`` (one row per prompt, instruction
and method), and the report (``summary.json``, ``report.md``, ``report.html``, PNG plots).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from directer.config import SteeringConfig
from directer.ifeval import load_ifeval
from directer.models import DEFAULT_MODEL
from directer.scoring import score_response
from directer.steering import STEERERS
from pipeline.config import GenerateConfig
from pipeline.inputs import READ_ERROR, InputError, iter_rows, rows_to_table
from pipeline.outputs import RunOutput, replacing
from pipeline.resume import check_resumable
from pipeline.rows import user_message
from pipeline.run import generate


@dataclass(frozen=True)
class EvalConfig:
    """An evaluation: ``benchmark`` is ``ifeval`` or a Parquet/JSONL file of IFEval-style rows
    (``id``, ``prompt``, spans, ``instruction_id_list``, ``kwargs``).

    ``alphas``/``betas``: a sweep (the paper's sensitivity analysis): every method that has the field
    runs at each value (a grid when both are given); empty, the steering config's own value.
    ``overwrite``: start every run over; without it a rerun resumes, and one that would change the rows
    or the configuration of what the folder holds is refused before anything is written.
    """

    benchmark: str = "ifeval"
    output: str = "runs/eval"
    methods: tuple[str, ...] = ("zero-shot", "directer")
    data: str | None = None
    spans: str = "gold"
    limit: int | None = None
    model: str = DEFAULT_MODEL
    steering: SteeringConfig = field(default_factory=SteeringConfig)
    actors: int | None = None
    batch_size: int | None = None
    memory_fraction: float = 0.9
    address: str | None = None
    gpus_per_actor: float | None = None
    connect_timeout: float = 60.0
    actor_start_timeout: float = 1800.0
    device: str | None = None
    dtype: str | None = None
    ray_logs: bool = False
    trust_remote_code: bool = False
    alphas: tuple[float, ...] = ()
    betas: tuple[float, ...] = ()
    overwrite: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.methods) - set(STEERERS)
        if unknown or not self.methods:
            raise ValueError(f"--methods takes methods from {', '.join(STEERERS)}, got {', '.join(self.methods)}")
        if self.spans not in ("gold", "auto", "none"):
            raise ValueError(f"--spans must be gold, auto or none, got {self.spans!r}")
        self.variants()  # every point of a sweep is a valid config

    def variants(self) -> dict[str, SteeringConfig]:
        """Label -> config of every run: one per method, or, in a sweep, one per point of the grid of the
        swept fields the method has (``directer_alpha10_beta0.3``; zero-shot stays one run). The alphas
        are the outer loop, so each alpha's rankings are computed once and reused for every beta."""
        grid = {"alpha": self.alphas, "beta": self.betas}
        runs: dict[str, SteeringConfig] = {}
        for method in self.methods:
            swept = [name for name, values in grid.items() if len(values) > 1 and name in STEERERS[method].fields]
            base = replace(self.steering, method=method)
            base = base.with_(**{n: v[0] for n, v in grid.items() if len(v) == 1 and n in STEERERS[method].fields})
            points = [{}]
            for name in swept:
                points = [{**point, name: value} for point in points for value in grid[name]]
            for point in points:
                label = method + "".join(f"_{name}{value:g}" for name, value in point.items())
                runs[label] = base.with_(**point)
        return runs


CHECKER_FIELDS = ("instruction_id_list", "kwargs")


def load_rows(config: EvalConfig) -> list[dict[str, Any]]:
    """The benchmark's input rows. A user's own rows take every form ``generate`` takes (``prompt``,
    ``task``, ``messages``; ``instruction`` or ``instruction_spans``) plus IFEval's checker fields, or
    IFEval's own format (``key`` as the id)."""
    if config.benchmark == "ifeval":
        return load_ifeval(config.data, spans=config.spans, limit=config.limit)  # type: ignore[arg-type]
    path = Path(config.benchmark)
    if not path.is_file():
        raise InputError(f"benchmark is neither 'ifeval' nor a file: {config.benchmark}")
    rows = list(itertools.islice(iter_rows(path), config.limit))
    for index, row in enumerate(rows):
        if row.get("id") is None and row.get("key") is not None:
            row["id"] = str(row["key"])
        name = f"row {index}" + (f" (id {row['id']!r})" if row.get("id") is not None else "")
        if row.get(READ_ERROR):
            raise InputError(f"{name}: {row[READ_ERROR]}")
        for field_name in ("id", *CHECKER_FIELDS):
            if row.get(field_name) is None:
                raise InputError(
                    f"{name}: field {field_name!r} is missing; evaluation rows need an id (or IFEval's key) and "
                    "IFEval's checker fields instruction_id_list and kwargs"
                )
        if not isinstance(row["kwargs"], str):
            row["kwargs"] = json.dumps(row["kwargs"])
    if not rows:
        raise InputError(f"{config.benchmark} holds no rows")
    return rows


def evaluate(config: EvalConfig, progress: bool = True, command: str | None = None) -> dict[str, Any]:
    """Generate with every method, score, and write the report; returns the summary. ``command``, the
    command line that asked for it, is recorded in each run's ``run.json`` (an export's card shows it)."""
    from pipeline.report import build_report

    output = Path(config.output)
    inputs = output / "inputs.parquet"
    table = rows_to_table(load_rows(config))
    variants = config.variants()
    runs = [run_config(config, label, steering, inputs) for label, steering in variants.items()]
    # before anything is written: bad input or a changed configuration leaves the folder as it was
    if not config.overwrite:
        check_inputs_kept(inputs, table)
        for run in runs:
            check_resumable(run, [str(inputs.resolve())])
    output.mkdir(parents=True, exist_ok=True)
    with replacing(inputs) as partial:
        pq.write_table(table, partial)
    record = {**asdict(config), "variants": {label: steering.to_dict() for label, steering in variants.items()}}
    with replacing(output / "eval.json") as partial:
        partial.write_text(json.dumps(record, indent=2, default=str))
    for run in runs:
        generate(run, progress=progress, command=command)
    score_runs(output, list(variants))
    return build_report(output)


def run_config(config: EvalConfig, label: str, steering: SteeringConfig, inputs: Path) -> GenerateConfig:
    """The ``directer generate`` run of one method (or point of a sweep) in ``runs/<label>``."""
    return GenerateConfig(
        inputs=(str(inputs),),
        output=str(RunOutput.of_method(inputs.parent, label).folder),
        model=config.model,
        steering=steering,
        actors=config.actors,
        batch_size=config.batch_size,
        memory_fraction=config.memory_fraction,
        ranking_cache=str(inputs.parent / "ranking_cache"),
        address=config.address,
        connect_timeout=config.connect_timeout,
        device=config.device,
        dtype=config.dtype,
        ray_logs=config.ray_logs,
        actor_start_timeout=config.actor_start_timeout,
        gpus_per_actor=config.gpus_per_actor,
        # IFEval's rows carry their spans (gold or detected); a user's own rows are read as generate reads them
        spans="none" if config.benchmark == "ifeval" or config.spans == "gold" else config.spans,
        score_nll=True,
        trust_remote_code=config.trust_remote_code,
        overwrite=config.overwrite,
    )


def check_inputs_kept(inputs: Path, table: pa.Table) -> None:
    """A rerun may add prompts (a larger ``--limit``) but not drop or change those the runs already hold:
    their rows would be scored against prompts that are no longer there."""
    if not inputs.is_file():
        return
    now = {row["id"]: row for row in table.to_pylist()}
    changed = [row["id"] for row in pq.read_table(inputs).to_pylist() if now.get(row["id"]) != row]
    if changed:
        raise ValueError(
            f"{inputs.parent} holds an evaluation of prompts this one drops or changes ({len(changed)}, first "
            f"{changed[0]}): rerun with --overwrite to start over there, or choose another --output"
        )


def score_runs(output: Path, methods: tuple[str, ...] | list[str]) -> pa.Table:
    """``scores.parquet``: one row per (run label, prompt, instruction) with strict and loose verdicts."""
    inputs = {r["id"]: r for r in pq.read_table(output / "inputs.parquet").to_pylist()}
    records = []
    for method in methods:
        for row in RunOutput.of_method(output, method).rows(["id", "status", "completion"]):
            source = inputs[row["id"]]
            ids = list(source["instruction_id_list"])
            if row["status"] != "ok":
                verdict_strict = verdict_loose = [False] * len(ids)
            else:
                verdict = score_response(user_message(source), ids, source["kwargs"], row["completion"])
                verdict_strict, verdict_loose = verdict.strict, verdict.loose
            for instruction, strict, loose in zip(ids, verdict_strict, verdict_loose):
                records.append(
                    {
                        "method": method,
                        "id": row["id"],
                        "instruction_id": instruction,
                        "strict": strict,
                        "loose": loose,
                        "prompt_strict": all(verdict_strict),
                        "prompt_loose": all(verdict_loose),
                        "status": row["status"],
                    }
                )
    table = pa.Table.from_pylist(records)
    with replacing(output / "scores.parquet") as partial:
        pq.write_table(table, partial)
    return table
