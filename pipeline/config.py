"""The pipeline's configuration: one object from the command line to every actor."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from directer.config import SteeringConfig
from directer.memory import MAX_AUTO_BATCH
from directer.models import DEFAULT_MODEL, default_dtype, parse_dtype
from pipeline.outputs import RunOutput


@dataclass(frozen=True)
class GenerateConfig:
    """A ``directer generate`` run.

    actors: model copies; ``None``: one per ``gpus_per_actor`` GPUs in the cluster, or one without GPUs.
    gpus_per_actor: ``None`` gives each actor one GPU when the cluster has GPUs, else none.
    cpus_per_actor: ``None`` shares the CPUs left after one for Ray Data's read and write tasks.
    threads_per_actor: torch threads of a CPU actor; ``None`` shares the cluster's CPUs between actors, at most
        one node's.
    batch_size: rows an actor decodes together; ``None``, each batch as large as the memory plan lets it
        be (:mod:`directer.memory`), at most 16 on a CPU and 128 on a GPU.
    memory_fraction: the share of an actor's device memory its batches may fill (of its GPUs' share
        when it holds a fraction of one).
    ranking_cache: folder of cached layer rankings; default ``OUTPUT/ranking_cache``.
    spans: for rows that name no instruction, ``auto`` detects one and ``none`` steers nothing.
    score_nll: also store each completion's mean negative log-likelihood under the unsteered model.
    address: the Ray cluster to join (GCS ``host:port``); ``None``: ``$RAY_ADDRESS`` (set inside a Ray job),
        else a local Ray started for the run.
    connect_timeout: seconds to wait for the cluster at ``address`` to answer.
    actor_start_timeout: seconds to wait for the model actors to start (placed and model loaded); the
        default covers an autoscaler starting GPU nodes and a large model's download.
    ray_logs: show Ray's INFO lines, its per-operator progress bars and the workers' output.
    """

    inputs: tuple[str, ...]
    output: str
    model: str = DEFAULT_MODEL
    steering: SteeringConfig = field(default_factory=SteeringConfig)
    actors: int | None = None
    gpus_per_actor: float | None = None
    cpus_per_actor: float | None = None
    threads_per_actor: int | None = None
    batch_size: int | None = None
    memory_fraction: float = 0.9
    ranking_cache: str | None = None
    spans: str = "auto"
    score_nll: bool = False
    address: str | None = None
    connect_timeout: float = 60.0
    actor_start_timeout: float = 1800.0
    ray_logs: bool = False
    overwrite: bool = False
    device: str | None = None
    dtype: str | None = None
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("give at least one input")
        if "://" in self.output:
            raise ValueError(f"--output {self.output}: remote URIs are not written yet; give a path on this machine")
        if self.actors is not None and self.actors < 1:
            raise ValueError(f"--actors must be at least 1, got {self.actors}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ValueError(f"--memory-fraction must lie in (0, 1], got {self.memory_fraction}")
        if self.spans not in ("auto", "none"):
            raise ValueError(f"--spans must be auto or none, got {self.spans!r}")
        if self.connect_timeout <= 0 or self.actor_start_timeout <= 0:
            raise ValueError("--connect-timeout and --actor-start-timeout must be positive seconds")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise ValueError(f"--gpus-per-actor must not be negative, got {self.gpus_per_actor}")

    def rows_per_call(self, rows: int) -> int:
        """Rows Ray Data hands an actor per call, of ``rows`` to generate. A GPU actor gets four batches'
        worth, so continuous batching refills finished rows from the same call; a CPU actor one batch (on
        a CPU, where a pass costs about its tokens, continuous batching measured 4-8% slower than static
        batches: BENCHMARKS.md). Never more than an equal share of the rows: Ray Data gathers a call's
        rows before it starts, so 541 rows in calls of 512 would keep 7 of 8 actors idle."""
        gpu = (self.actor_device or "").startswith("cuda")
        batch = self.batch_size or MAX_AUTO_BATCH["cuda" if gpu else "cpu"]
        return min(4 * batch if gpu else batch, max(1, -(-rows // (self.actors or 1))))

    @property
    def actor_device(self) -> str | None:
        """Where an actor decodes: ``device``; else CUDA when actors hold GPUs, the CPU when they hold none
        (``--gpus-per-actor 0``), and ``None`` (CUDA if the cluster has GPUs) until ``gpus_per_actor`` is
        filled in from the cluster's resources."""
        if self.device or self.gpus_per_actor is None:
            return self.device
        return "cuda" if self.gpus_per_actor else "cpu"

    @property
    def actor_dtype(self) -> str:
        """The dtype an actor loads the model in, as its rows' ``model`` names it: ``dtype``, else its
        device's default (known once ``gpus_per_actor`` is filled in)."""
        device_type = (self.actor_device or "cpu").split(":")[0]
        dtype = parse_dtype(self.dtype) if self.dtype else default_dtype(device_type)
        return str(dtype).removeprefix("torch.")

    @property
    def actor_memory_fraction(self) -> float:
        """The share of its device an actor's batches may fill: an actor holding part of a GPU plans within
        its part."""
        return self.memory_fraction * min(1.0, self.gpus_per_actor or 1.0)

    @property
    def output_dir(self) -> Path:
        return Path(self.output)

    @property
    def run_output(self) -> RunOutput:
        return RunOutput(self.output_dir)

    @property
    def ranking_cache_dir(self) -> Path:
        return Path(self.ranking_cache) if self.ranking_cache else self.output_dir / "ranking_cache"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)
