"""``directer generate``: sharded inputs -> Ray Data -> actor pool running the engine -> Parquet.

Every input row yields exactly one output row (``status`` ok or error). A rerun of the same command
processes only what the output lacks (``pipeline.resume``); ``overwrite`` starts over (the ranking
cache stays, its rankings do not depend on the run).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from directer.steering import STEERERS
from directer.telemetry import SteeringSummary
from pipeline.cluster import (
    RESTART_WARNING,
    ClusterError,
    actor_start_error,
    hide_native_lines,
    init_ray,
    largest_node_cpus,
    on_this_node,
)
from pipeline.config import GenerateConfig
from pipeline.inputs import InputError, duplicate_ids, read_dataset, resolve_inputs, survey
from pipeline.outputs import RunOutput, discard_partial
from pipeline.progress import WrittenRows
from pipeline.resume import check_precision, check_resumable, drop_done, plan_resume
from pipeline.sink import OutputWriteError, ParquetFiles
from pipeline.stage import GenerateStage


@dataclass
class RunReport:
    """What one invocation did (``rows`` counts only this invocation's rows)."""

    output: str
    rows: int = 0
    ok: int = 0
    errors: int = 0
    skipped: int = 0
    retried: int = 0  # error rows of the run's own failures (out of memory, say) run again
    completion_tokens: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    steering: dict[str, float] = field(default_factory=dict)
    ranking_cache: dict[str, int] = field(default_factory=dict)
    error_examples: list[str] = field(default_factory=list)
    command: str | None = None
    interrupted: bool = False

    @property
    def tokens_per_second(self) -> float:
        seconds = self.seconds.get("pipeline", 0.0)
        return self.completion_tokens / seconds if seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "tokens_per_second": self.tokens_per_second}


def check_model(config: GenerateConfig) -> None:
    """Fail before Ray starts when the model name cannot be resolved, its checkpoint is refused, or (for a
    run on this machine) the weights and a batch of the shortest prompts do not fit the device's memory."""
    from directer.memory import ModelShape, device_budget, plan_memory
    from directer.models import default_device_dtype, model_config

    shape_config = model_config(config.model, config.trust_remote_code)
    if config.address or os.environ.get("RAY_ADDRESS"):
        return  # the actors' devices are elsewhere: each batch is checked there before it runs
    try:
        device, dtype = default_device_dtype(config.actor_device, config.dtype)
    except ValueError:
        return  # no such device here: the actors say so (or wait for one) themselves
    fraction = config.actor_memory_fraction
    shape = ModelShape.of(shape_config, dtype)
    plan = plan_memory(shape, config.steering, 1, device=device.type, budget=device_budget(device, fraction))
    plan.check(config.batch_size or 1)


def plan_resources(
    config: GenerateConfig, resources: dict[str, float], node_cpus: float | None = None
) -> GenerateConfig:
    """Fill in actors, GPUs, CPUs and threads per actor from the cluster's ``resources`` (``node_cpus``: its
    largest node's CPUs; default: all of them on one node).

    With G GPUs and ``g`` GPUs per actor, G // g actors run (one GPU each by default); without GPUs,
    CPU actors get fractional CPUs so that one CPU stays free for Ray Data's read and write tasks
    (actors holding every CPU can starve them and hang). A CPU actor's torch threads share the CPUs
    between the actors, and never outnumber one node's.
    """
    cluster_gpus, cluster_cpus = resources.get("GPU", 0.0), resources.get("CPU", 1.0)
    gpus = config.gpus_per_actor
    if gpus is None:  # an actor told to decode elsewhere (--device cpu) holds no GPU
        gpus = 1.0 if cluster_gpus >= 1 and (config.device or "cuda").startswith("cuda") else 0.0
    actors = config.actors
    if actors is None:
        actors = max(1, int(cluster_gpus // gpus)) if gpus else 1
    cpus = config.cpus_per_actor
    if cpus is None:
        cpus = 1.0 if gpus else min(max((cluster_cpus - 1) / actors, 0.25), 4.0)
    node_cpus = cluster_cpus if node_cpus is None else min(node_cpus, cluster_cpus)
    threads = config.threads_per_actor or max(1, int(min(node_cpus, cluster_cpus // actors)))
    return replace(config, actors=actors, gpus_per_actor=gpus, cpus_per_actor=cpus, threads_per_actor=threads)


def rows_per_block(rows: int, config: GenerateConfig) -> int:
    """About four blocks per actor, each at most 256 rows (progress, resume) and at least the rows of one
    call (an actor's call takes whole blocks)."""
    return max(config.rows_per_call(rows), min(256, -(-rows // (4 * config.actors))))


def check_writable(folder: Path) -> None:
    """Create ``folder`` and write a file there, before any model loads: an output that cannot be
    written fails at once, naming the path and the reason."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as error:
        raise InputError(f"--output: cannot write to {folder}: {error.strerror or error}") from None


def generate(config: GenerateConfig, progress: bool = True, command: str | None = None) -> RunReport:
    """Run the pipeline; returns this invocation's report and writes ``run.json`` (with ``command``,
    the command line that asked for it, when given)."""
    started = time.perf_counter()
    sources = resolve_inputs(config.inputs)
    input_files = sorted(str(Path(path).resolve()) for source in sources for path in source.paths)
    check_model(config)
    check_resumable(config, input_files)
    output = config.run_output
    if config.overwrite and output.data_dir.exists():
        shutil.rmtree(output.data_dir)
    check_writable(output.data_dir)
    output.discard_partial()
    # what killed actors left in the ranking cache; another run sharing the folder writes its files in seconds
    discard_partial(config.ranking_cache_dir, older_than=3600)
    if config.overwrite or output.manifest() is None:
        write_manifest(config, None, input_files)  # before any row: an interrupted run is still checked
    inputs = survey(sources)
    ids = inputs.ids
    duplicates = duplicate_ids(ids)
    resume = plan_resume(output, ids, duplicates)
    report = RunReport(output=str(config.output_dir), command=command)

    import ray
    import ray.data

    init_ray(config.address, config.connect_timeout, config.ray_logs)
    context = ray.data.DataContext.get_current()
    # the run's one bar is ours (pipeline.progress); Ray Data's bars (its Parquet sampling's too) and
    # its INFO lines with --ray-logs
    context.enable_progress_bars = progress and config.ray_logs
    context.enable_operator_progress_bars = config.ray_logs
    context.print_on_execution_start = config.ray_logs
    # (its errors come back as exceptions, which the command words itself)
    logging.getLogger("ray.data").setLevel(logging.INFO if config.ray_logs else logging.CRITICAL)
    # a block of long generations on a slow device can legitimately take longer than Ray Data's
    # no-progress timeout (which would abort the run); blocks are kept small instead
    context.execution_no_progress_timeout_s = -1
    # actors that cannot be placed (no GPU of the kind asked for) would otherwise be waited for forever
    context.wait_for_min_actors_s = config.actor_start_timeout
    # Ray Data 2.60's second Parquet reader starts a task to list the files and an actor pool to read
    # their footers once the model actors are up: the first batch reached an actor 9.4-9.8 s after
    # it was ready, against 3.6-4.6 s with the first reader (BENCHMARKS.md)
    context.use_datasource_v2 = False
    config = plan_resources(config, ray.cluster_resources(), largest_node_cpus())
    report.seconds["startup"] = time.perf_counter() - started

    todo = resume.todo(ids)
    if todo:
        check_precision(output, config.actor_dtype)
    resume.settle(output)
    before = set(output.files())
    report.skipped, report.retried = len(ids) - todo, resume.retried
    if todo:
        # streaming re-blocking: enough blocks to keep every actor busy and to write (and resume) as
        # results come, whatever the input files' sizes
        block_rows = rows_per_block(todo, config)
        dataset = read_dataset(sources, inputs, on_this_node()).repartition(target_num_rows_per_block=block_rows)
        if report.skipped:  # a rerun
            dataset = dataset.map_batches(
                drop_done,
                batch_format="pyarrow",
                fn_kwargs={
                    "done": pa.array(sorted(resume.done), pa.string()),
                    "without_id_done": resume.without_id_done,
                },
            )
        dataset = dataset.map_batches(
            GenerateStage,
            # the method's class travels with the config: one registered outside this package reaches the actors
            fn_constructor_kwargs={
                "config": config,
                "duplicates": duplicates,
                "steerer": STEERERS[config.steering.method],
            },
            batch_size=config.rows_per_call(todo),
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=config.actors),
            num_cpus=config.cpus_per_actor,
            num_gpus=config.gpus_per_actor,
        )
        run_started = time.perf_counter()
        shown = WrittenRows(output, before, todo, config.steering.method) if progress else contextlib.nullcontext()
        try:
            with shown:
                failure = execute(dataset, ParquetFiles(output.data_dir), config)
        except KeyboardInterrupt:
            # what was written is kept (a rerun resumes after it): record it and its speed
            report.interrupted = True
            report.seconds["pipeline"] = time.perf_counter() - run_started
            _record(report, output, before, started, config, input_files)
            raise
        if failure is not None:
            # the dataset holds the execution and so the model actors: drop it, or a failed run's actors
            # outlive it and hold the CPUs that a next run in this process waits for
            del dataset
            gc.collect()
            raise failure
        report.seconds["pipeline"] = time.perf_counter() - run_started
    _record(report, output, before, started, config, input_files)
    return report


def _record(
    report: RunReport,
    output: RunOutput,
    before: set[Path],
    started: float,
    config: GenerateConfig,
    input_files: list[str],
) -> None:
    """Count the rows this invocation wrote (the files that were not there before it) into ``run.json``."""
    _summarise(report, output.read(SUMMARY_COLUMNS, files=sorted(set(output.files()) - before)).to_pylist())
    report.seconds["total"] = time.perf_counter() - started
    write_manifest(config, report, input_files)


def execute(dataset: Any, sink: ParquetFiles, config: GenerateConfig) -> Exception | None:
    """Run the pipeline into ``sink``. Ray's errors that a user can act on are returned as our own (for
    the caller to raise once it has dropped the dataset), not raised from Ray's, whose traceback holds
    the execution."""
    import ray

    quiet = contextlib.nullcontext() if config.ray_logs else hide_native_lines(RESTART_WARNING)
    try:
        with quiet:
            dataset.write_datasink(sink, ray_remote_args=on_this_node())
        return None
    except ray.exceptions.GetTimeoutError as error:
        if "starting actors" not in str(error):
            raise
        failure: Exception = actor_start_error(
            config.cpus_per_actor, config.gpus_per_actor, config.actors, config.actor_start_timeout
        )
    except ray.exceptions.ActorDiedError as error:
        if "creation task" not in str(error):
            raise
        # the model copy could not be built (a bad --device, a model that does not load): its own error
        cause = [line for line in str(error).splitlines() if line.strip()][-1]
        failure = ClusterError(f"the model actors could not start: {cause}")
    except OutputWriteError as error:
        cause = getattr(error, "cause", error)  # Ray's task error wraps the writer's
        failure = OutputWriteError(
            cause.errno, f"{cause.strerror}; the rows written before it are kept: rerun the same command to resume"
        )
    return failure


SUMMARY_COLUMNS = ["status", "error", "completion_tokens", "steering", "ranking_cache", "worker_load_seconds"]


def _summarise(report: RunReport, rows: list[dict]) -> None:
    """This invocation's counts, from the rows it wrote."""
    if not rows:
        return
    report.rows = len(rows)
    report.ok = sum(r["status"] == "ok" for r in rows)
    report.errors = report.rows - report.ok
    report.error_examples = [r["error"] for r in rows if r["status"] == "error"][:5]
    report.completion_tokens = sum(r["completion_tokens"] or 0 for r in rows)
    report.seconds["model_load"] = max(r["worker_load_seconds"] or 0.0 for r in rows)
    total = SteeringSummary.total(r["steering"] for r in rows if r["steering"])
    report.steering = {
        "steps": total.steps,
        "steered": total.steered,
        "changed": total.changed,
        "gate_skips": total.gate_skips,
        "fallbacks": total.fallbacks,
        "steered_passes": total.trials,
        "mean_layers": total.mean_layers,
    }
    cache = [r["ranking_cache"] for r in rows if r["ranking_cache"]]
    report.ranking_cache = {"hits": cache.count("hit"), "misses": cache.count("miss")}


def write_manifest(config: GenerateConfig, report: RunReport | None, input_files: list[str]) -> None:
    """``run.json``: the configuration, the input files, counts over the whole output, and every
    invocation's report (``report`` None: the run is starting)."""
    output = config.run_output
    before = output.manifest()
    previous = before.get("invocations", []) if before and not config.overwrite else []
    table = output.read(["status"])
    ok = (pc.sum(pc.equal(table["status"], "ok")).as_py() or 0) if table.num_rows else 0
    totals = {"rows": table.num_rows, "ok": ok, "error": table.num_rows - ok}
    manifest = {
        "config": {**config.to_dict(), "ranking_cache": str(config.ranking_cache_dir)},
        "config_fingerprint": config.steering.fingerprint(),
        "input_files": input_files,
        "output_dir": str(config.output_dir.resolve()),
        "totals": totals,
        "invocations": [*previous, report.to_dict()] if report else previous,
    }
    output.write_manifest(manifest)
