"""The ``directer`` command line."""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import shlex
import sys
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from directer.config import RANKINGS, SPOTLIGHT_BIASES, SteeringConfig
from directer.steering import STEERERS
from jobs import render
from jobs.signals import Interrupted, stop_on_signals


class Command(typer.core.TyperCommand):
    """Usage lines as other tools write them: ``run [OPTIONS] PROMPT``, not ``{PROMPT}``."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        return [re.sub(r"^\{(.*)\}", r"\1", piece) for piece in super().collect_usage_pieces(ctx)]


def current_command() -> str:
    """The command line that is running, as a user would type it (recorded in ``run.json``, shown in an
    export's card)."""
    return shlex.join(["directer", *sys.argv[1:]])


app = typer.Typer(
    name="directer",
    help="Steer language models to follow instructions (Directer: dynamic rejection steering).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
console = Console(stderr=True)

ModelOption = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Alias (smollm2-135m; smollm2-1.7b-random: random weights, for timing), Hugging Face id, "
        "local folder or .gguf file.",
    ),
]
MethodOption = Annotated[str, typer.Option(help=f"Steering method: {', '.join(STEERERS)}.")]
RankingOption = Annotated[
    str,
    typer.Option(
        help=f"Layer order of the trials ({', '.join(RANKINGS)}): the disturbance steering a layer causes (the "
        "paper's formula) or receives (the authors' code)."
    ),
]
StaticLayersOption = Annotated[
    int, typer.Option(help="static, static+gate: layers steered, 0 for all, k for the k most sensitive.", min=0)
]
PastaCoefOption = Annotated[
    float, typer.Option(help="pasta: factor on the attention to prompt tokens outside the instruction.")
]
PastaHeadsOption = Annotated[
    str,
    typer.Option(
        help='pasta: heads to steer, JSON {"layer": [head, ...]} (pastalib\'s head_config) or a .json file; '
        "default every head of the middle half of the layers.",
        metavar="JSON|FILE",
    ),
]
SpotLightTargetOption = Annotated[
    float, typer.Option(help="spotlight: attention mass on the instruction that rows are lifted to.")
]
SpotLightBiasOption = Annotated[
    str,
    typer.Option(
        help=f"spotlight: the bias added, {' or '.join(SPOTLIGHT_BIASES)}: log(c/p) as the reference code, or "
        "the bias that reaches c exactly."
    ),
]
TemperatureOption = Annotated[
    float, typer.Option(help="0 decodes greedily; above 0 every method samples (the gate judges the raw distribution).")
]
TopPOption = Annotated[float, typer.Option(help="Sampling: keep the most probable tokens up to this mass.")]
TopKOption = Annotated[int, typer.Option(help="Sampling: keep the k most probable tokens (0: all).", min=0)]
SeedOption = Annotated[int, typer.Option(help="Sampling: with each row's id, the key of the row's draws.")]
AlphaOption = Annotated[float, typer.Option(help="Scale of the instruction tokens' attention keys.")]
BetaOption = Annotated[
    float, typer.Option(help="Plausibility threshold: keep a steered token only above beta x raw top-1.")
]
MaxTrialsOption = Annotated[int, typer.Option(help="Steered passes allowed per step before falling back.")]
MaxNewTokensOption = Annotated[int, typer.Option(help="Tokens to generate at most per prompt.")]
DeviceOption = Annotated[str | None, typer.Option(help="torch device; default cuda when available, else cpu.")]
DtypeOption = Annotated[
    str | None, typer.Option(help="float32, bfloat16 or float16; default bf16 on GPU, fp32 on CPU.")
]
TrustOption = Annotated[
    bool,
    typer.Option(help="Run the model repository's own Python code (off: a model that needs it is refused)."),
]
SpansOption = Annotated[str, typer.Option(help="When no instruction is given: auto detects one, none steers nothing.")]
AddressOption = Annotated[
    str | None,
    typer.Option(help="Ray cluster to join (GCS host:port); default $RAY_ADDRESS, else an embedded local Ray."),
]
ConnectTimeoutOption = Annotated[
    float, typer.Option(help="Seconds to wait for the cluster at --address to answer.", min=1)
]
ActorStartTimeoutOption = Annotated[
    float,
    typer.Option(
        help="Seconds to wait for the model actors to start (placed, model loaded); the default covers an "
        "autoscaler starting GPU nodes.",
        min=1,
    ),
]
DashboardOption = Annotated[
    str | None, typer.Option(help="Ray dashboard address; default $RAY_ADDRESS or http://127.0.0.1:8265.")
]
UnreachableOption = Annotated[
    float,
    typer.Option(help="Seconds to keep retrying a job server that stopped answering before giving up.", min=1),
]
BatchSizeOption = Annotated[
    int | None,
    typer.Option(
        help="Rows decoded together by one actor; default the most that fit its memory (directer plan), "
        "at most 16 on a CPU, 128 on a GPU.",
        min=1,
    ),
]
ActorsOption = Annotated[
    int | None,
    typer.Option(
        help="Model copies (Ray actors); default the cluster's GPUs divided by --gpus-per-actor, or one without GPUs.",
        min=1,
    ),
]
GpusPerActorOption = Annotated[
    float | None,
    typer.Option(help="GPUs per actor (2 splits a model over two by layers); default 1 with GPUs.", min=0),
]
OverwriteOption = Annotated[bool, typer.Option("--overwrite", help="Start over instead of resuming.")]
JobIdArgument = Annotated[str, typer.Argument(metavar="JOB_ID", help="The job's submission id (raysubmit_...).")]
MemoryFractionOption = Annotated[
    float, typer.Option(help="Share of an actor's device memory its batches may fill.", min=0.01, max=1.0)
]
LimitOption = Annotated[int | None, typer.Option(help="Only the first N prompts.", min=1)]
RayLogsOption = Annotated[
    bool, typer.Option("--ray-logs", help="Show Ray's own log lines, per-operator bars and the workers' output.")
]
RESUME = "interrupted: the rows written so far are kept; rerun the same command to resume"


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"directer {version('directer')}")
        raise typer.Exit()


@app.callback(epilog='Example: directer run "Describe Paris. Use two sentences." -i "Use two sentences." --compare')
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Steer language models to follow instructions (Directer: dynamic rejection steering)."""


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _fail(message: str) -> typer.Exit:
    console.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)
    return typer.Exit(code=2)


def _steering(options: dict[str, object]) -> SteeringConfig:
    if options.get("trust_remote_code"):
        from directer.models import TRUST_WARNING

        console.print(Text.assemble(("warning: ", "bold yellow"), TRUST_WARNING.format(name=options.get("model"))))
    return _steering_config(options)


def _steering_config(options: dict[str, object]) -> SteeringConfig:
    """The command's one :class:`SteeringConfig`, from those of its options that are config fields
    (``--pasta-heads`` may name a JSON file: its text is the field)."""
    heads = str(options.get("pasta_heads") or "")
    if heads.endswith(".json"):
        try:
            options = {**options, "pasta_heads": Path(heads).read_text()}
        except OSError as error:
            raise _fail(f"--pasta-heads: cannot read {heads}: {error.strerror}") from None
    try:
        return SteeringConfig(**{f.name: options[f.name] for f in fields(SteeringConfig) if f.name in options})
    except ValueError as error:
        raise _fail(str(error)) from None


def _numbers(text: str, option: str) -> tuple[float, ...]:
    """``10,30,100`` -> ``(10.0, 30.0, 100.0)``: the values of a swept option."""
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise _fail(f"{option} takes a number or a comma-separated list of numbers, got {text!r}") from None
    if not values:
        raise _fail(f"{option} takes a number or a comma-separated list of numbers, got {text!r}")
    return values


@contextlib.contextmanager
def _interruptible(message: str) -> Iterator[None]:
    """SIGINT/SIGTERM stop the block within seconds, print ``message`` and exit 128 + the signal."""
    try:
        with stop_on_signals(message):
            yield
    except Interrupted as stop:
        console.print(Text(message, style="yellow"), soft_wrap=True)
        raise typer.Exit(code=stop.exit_code) from None


@app.command(cls=Command)
def run(
    prompt: Annotated[str, typer.Argument(metavar="PROMPT", help="The user message.")],
    instruction: Annotated[
        str | None,
        typer.Option(
            "--instruction",
            "-i",
            help="The instruction to steer: its first occurrence in PROMPT, or, when PROMPT does not contain it, "
            "appended to PROMPT after a blank line.",
        ),
    ] = None,
    model: ModelOption = "smollm2-135m",
    method: MethodOption = "directer",
    alpha: AlphaOption = 100.0,
    beta: BetaOption = 0.5,
    max_trials: MaxTrialsOption = 10,
    ranking: RankingOption = "caused",
    static_layers: StaticLayersOption = 0,
    pasta_coef: PastaCoefOption = 0.01,
    pasta_heads: PastaHeadsOption = "",
    spotlight_target: SpotLightTargetOption = 0.2,
    spotlight_bias: SpotLightBiasOption = "reference",
    temperature: TemperatureOption = 0.0,
    top_p: TopPOption = 1.0,
    top_k: TopKOption = 0,
    seed: SeedOption = 0,
    max_new_tokens: MaxNewTokensOption = 256,
    spans: SpansOption = "auto",
    compare: Annotated[
        bool, typer.Option("--compare", help="Show zero-shot beside the method (default directer).")
    ] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    trust_remote_code: TrustOption = False,
) -> None:
    """Steer one prompt and print the completion.

    \b
    Example:
      directer run "Write a haiku about the sea. Answer in all capital letters." \\
          -i "Answer in all capital letters." --compare
    """
    from directer import Directer, ModelNotFoundError, SpanError

    config = _steering(locals())
    _quiet_transformers()
    try:
        with console.status(f"loading {model}"):
            runner = Directer.from_pretrained(
                model, device=device, dtype=dtype, trust_remote_code=trust_remote_code, spans=spans
            )
        if instruction is not None and instruction not in prompt:
            prompt = f"{prompt}\n\n{instruction}"
        built = runner.prompt(prompt, instruction)
        if not built.span and config.steers:
            console.print("[yellow]no instruction given or found: nothing to steer, the output is zero-shot[/]")
        elif built.span and built.span_source == "auto":
            detected = " | ".join(built.text[start:end] for start, end in built.char_spans)
            console.print(f"[dim]instruction detected: {detected}[/]")
    except (ModelNotFoundError, SpanError, ValueError) as error:
        raise _fail(str(error)) from None
    baseline = next(name for name, kind in STEERERS.items() if not kind.steers)
    if compare and not config.steers:
        raise _fail(f"--compare shows {baseline} beside a steering method; --method {config.method} does not steer")
    methods = [baseline, config.method] if compare else [config.method]
    results = {}
    try:
        for name in methods:
            with console.status(f"generating ({name})"):
                results[name] = runner.complete([built], config.with_(method=name))[0]
    except ValueError as error:  # a prompt longer than the model's context
        raise _fail(str(error)) from None
    if json_output:
        payload = results[config.method].to_dict() if not compare else {m: r.to_dict() for m, r in results.items()}
        json.dump(payload, sys.stdout)
        sys.stdout.write("\n")
        return
    out = Console()
    if not compare:
        out.print(render.highlight_steered(runner.tokenizer, results[config.method]))
        if config.steers:
            out.print(render.summary_line(results[config.method]), style="dim")
        return
    steered = " | ".join(built.text[start:end] for start, end in built.char_spans)
    label = instruction or (f"{steered} (detected)" if steered else "(none: nothing steered)")
    out.print(Text.assemble("instruction: ", (label, "bold")))
    out.print(render.comparison(runner.tokenizer, baseline, config.method, results))
    out.print(render.summary_line(results[config.method]), style="dim")


@app.command(cls=Command, short_help="Run Directer over a dataset (Ray), resumable.")
def generate(
    inputs: Annotated[
        list[str], typer.Argument(metavar="INPUT", help="Parquet/JSONL files, folders, globs, or datasets folders.")
    ],
    output: Annotated[str, typer.Option("--output", "-o", help="Output folder (data/*.parquet, run.json).")],
    model: ModelOption = "smollm2-135m",
    method: MethodOption = "directer",
    actors: ActorsOption = None,
    gpus_per_actor: GpusPerActorOption = None,
    cpus_per_actor: Annotated[
        float | None, typer.Option(help="CPUs per actor; default shares the CPUs left after one for reads/writes.")
    ] = None,
    batch_size: BatchSizeOption = None,
    memory_fraction: MemoryFractionOption = 0.9,
    max_new_tokens: MaxNewTokensOption = 256,
    alpha: AlphaOption = 100.0,
    beta: BetaOption = 0.5,
    max_trials: MaxTrialsOption = 10,
    ranking: RankingOption = "caused",
    static_layers: StaticLayersOption = 0,
    pasta_coef: PastaCoefOption = 0.01,
    pasta_heads: PastaHeadsOption = "",
    spotlight_target: SpotLightTargetOption = 0.2,
    spotlight_bias: SpotLightBiasOption = "reference",
    temperature: TemperatureOption = 0.0,
    top_p: TopPOption = 1.0,
    top_k: TopKOption = 0,
    seed: SeedOption = 0,
    ranking_cache: Annotated[
        str | None, typer.Option(help="Folder of cached layer rankings; default OUTPUT/ranking_cache.")
    ] = None,
    spans: SpansOption = "auto",
    address: AddressOption = None,
    connect_timeout: ConnectTimeoutOption = 60.0,
    actor_start_timeout: ActorStartTimeoutOption = 1800.0,
    ray_logs: RayLogsOption = False,
    overwrite: OverwriteOption = False,
    score_nll: Annotated[
        bool, typer.Option("--score-nll", help="Store each completion's mean NLL under the unsteered model.")
    ] = False,
    examples: Annotated[int, typer.Option(help="Side-by-side examples to print at the end.")] = 3,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    trust_remote_code: TrustOption = False,
) -> None:
    """Run Directer over a dataset with a Ray actor pool; one output row per input row, resumable.

    \b
    Example:
      directer generate examples/sample_prompts.jsonl --output runs/sample --max-new-tokens 96
    """
    from directer.models import ModelNotFoundError
    from pipeline.cluster import ClusterError
    from pipeline.config import GenerateConfig
    from pipeline.inputs import InputError
    from pipeline.run import generate as run_generate
    from pipeline.sink import OutputWriteError

    steering = _steering(locals())
    try:
        config = GenerateConfig(
            inputs=tuple(inputs), output=output, model=model, steering=steering, actors=actors,
            gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor, batch_size=batch_size,
            memory_fraction=memory_fraction,
            ranking_cache=ranking_cache, spans=spans, score_nll=score_nll,
            address=address, connect_timeout=connect_timeout, actor_start_timeout=actor_start_timeout,
            ray_logs=ray_logs, overwrite=overwrite, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
        )  # fmt: skip
        _quiet_transformers()
        with _interruptible(RESUME):
            report = run_generate(config, command=current_command())
    except (InputError, ModelNotFoundError, ClusterError, OutputWriteError, ValueError) as error:
        raise _fail(str(error)) from None
    Console().print(render.generate_report(report))
    if examples and (table := render.examples(config.output_dir, steering.method, examples)):
        Console().print(table)


@app.command("eval", cls=Command, short_help="Generate, score with IFEval's checkers, report.")
def evaluate(
    benchmark: Annotated[
        str, typer.Argument(metavar="BENCHMARK", help="ifeval, or a Parquet/JSONL file of IFEval-style rows.")
    ] = "ifeval",
    output: Annotated[str, typer.Option("--output", "-o", help="Output folder.")] = "runs/eval",
    methods: Annotated[str, typer.Option(help=f"Comma-separated, from: {', '.join(STEERERS)}.")] = "zero-shot,directer",
    data: Annotated[str | None, typer.Option(help="IFEval input_data.jsonl; default the packaged copy.")] = None,
    spans: Annotated[
        str,
        typer.Option(
            help="ifeval: gold, auto (detected) or none. Own rows: their own instruction or spans; auto also "
            "detects one where a row gives none."
        ),
    ] = "gold",
    limit: LimitOption = None,
    model: ModelOption = "smollm2-135m",
    max_new_tokens: MaxNewTokensOption = 256,
    alpha: Annotated[
        str, typer.Option(help="Scale of the instruction tokens' attention keys; a comma-separated list sweeps it.")
    ] = "100",
    beta: Annotated[
        str, typer.Option(help="Plausibility threshold; a comma-separated list sweeps it (with --alpha: the grid).")
    ] = "0.5",
    ranking: RankingOption = "caused",
    static_layers: StaticLayersOption = 0,
    pasta_coef: PastaCoefOption = 0.01,
    pasta_heads: PastaHeadsOption = "",
    spotlight_target: SpotLightTargetOption = 0.2,
    spotlight_bias: SpotLightBiasOption = "reference",
    temperature: TemperatureOption = 0.0,
    top_p: TopPOption = 1.0,
    top_k: TopKOption = 0,
    seed: SeedOption = 0,
    actors: ActorsOption = None,
    batch_size: BatchSizeOption = None,
    memory_fraction: MemoryFractionOption = 0.9,
    gpus_per_actor: GpusPerActorOption = None,
    max_trials: MaxTrialsOption = 10,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    trust_remote_code: TrustOption = False,
    address: AddressOption = None,
    connect_timeout: ConnectTimeoutOption = 60.0,
    actor_start_timeout: ActorStartTimeoutOption = 1800.0,
    ray_logs: RayLogsOption = False,
    overwrite: OverwriteOption = False,
) -> None:
    """Generate with each method, score with IFEval's checkers, write scores, summary and reports.

    \b
    Examples:
      directer eval ifeval --methods zero-shot,directer --limit 50 --output runs/eval
      directer eval ifeval --alpha 10,30,100 --beta 0.3,0.5,0.7 --limit 100 --output runs/sweep
    """
    from directer.models import ModelNotFoundError
    from pipeline.cluster import ClusterError
    from pipeline.evaluate import EvalConfig
    from pipeline.evaluate import evaluate as run_evaluation
    from pipeline.inputs import InputError
    from pipeline.sink import OutputWriteError

    alphas, betas = _numbers(alpha, "--alpha"), _numbers(beta, "--beta")
    steering = _steering({**locals(), "alpha": alphas[0], "beta": betas[0]})
    try:
        config = EvalConfig(
            benchmark=benchmark, output=output, methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
            data=data, spans=spans, limit=limit, model=model, actors=actors, batch_size=batch_size, address=address,
            memory_fraction=memory_fraction,
            gpus_per_actor=gpus_per_actor, connect_timeout=connect_timeout, actor_start_timeout=actor_start_timeout,
            device=device, dtype=dtype, ray_logs=ray_logs, trust_remote_code=trust_remote_code,
            steering=steering, alphas=alphas if len(alphas) > 1 else (), betas=betas if len(betas) > 1 else (),
            overwrite=overwrite,
        )  # fmt: skip
        _quiet_transformers()
        with _interruptible(RESUME):
            summary = run_evaluation(config, command=current_command())
    except (InputError, ModelNotFoundError, ClusterError, OutputWriteError, FileNotFoundError, ValueError) as error:
        raise _fail(str(error)) from None
    Console().print(render.accuracy(summary, output))


@app.command(cls=Command, short_help="Rebuild an evaluation's reports.")
def report(run_dir: Annotated[str, typer.Argument(metavar="EVAL_DIR", help="A directer eval output folder.")]) -> None:
    """Rebuild summary.json, the plots, report.md and report.html of an evaluation.

    \b
    Example:
      directer report runs/eval
    """
    from pipeline.report import build_report

    if not Path(run_dir).is_dir():
        raise _fail(f"no such folder: {run_dir}")
    if not (Path(run_dir) / "scores.parquet").is_file():
        raise _fail(f"{run_dir} holds no scores.parquet; is it a directer eval output?")
    _quiet_transformers()
    Console().print(render.accuracy(build_report(Path(run_dir)), run_dir))


@app.command(cls=Command, short_help="Speed and memory, side by side.")
def bench(
    prompts: Annotated[int, typer.Option(help="IFEval prompts to decode (gold spans).")] = 16,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated; 1 and one larger size.")] = "1,16",
    max_new_tokens: MaxNewTokensOption = 64,
    method: MethodOption = "directer",
    alpha: AlphaOption = 100.0,
    beta: BetaOption = 0.5,
    max_trials: MaxTrialsOption = 10,
    ranking: RankingOption = "caused",
    static_layers: StaticLayersOption = 0,
    pasta_coef: PastaCoefOption = 0.01,
    pasta_heads: PastaHeadsOption = "",
    spotlight_target: SpotLightTargetOption = 0.2,
    spotlight_bias: SpotLightBiasOption = "reference",
    model: ModelOption = "smollm2-135m",
    b1_prompts: Annotated[int, typer.Option(help="Prompts for the batch-size-1 runs (the reference is slow).")] = 4,
    pipeline: Annotated[bool, typer.Option("--pipeline/--no-pipeline", help="Also time the Ray pipeline.")] = True,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    trust_remote_code: TrustOption = False,
) -> None:
    """Tokens/s and peak memory of transformers' generate, the engine (zero-shot and --method, default
    directer), Directer's plain reference implementation and the pipeline, side by side in one process.

    \b
    Example:
      directer bench --prompts 16 --max-new-tokens 64 --json
    """
    from pipeline.benchmark import run_benchmark, to_json

    steering = _steering(locals())
    sizes = tuple(int(size) for size in batch_sizes.split(","))
    if 1 not in sizes or len(sizes) != 2:
        raise _fail("--batch-sizes takes 1 and one larger size, e.g. 1,16")
    _quiet_transformers()
    with _interruptible("interrupted"):
        result = run_benchmark(
            prompts=prompts, batch_sizes=sizes, steering=steering, model=model, b1_prompts=b1_prompts,
            pipeline=pipeline, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
            log=lambda line: console.print(line),
        )  # fmt: skip
    if json_output:
        print(to_json(result))
        return
    Console().print(render.ratios(result.ratios))


@app.command(cls=Command, short_help="Memory per actor and the largest batch that fits, before any load.")
def plan(
    inputs: Annotated[
        list[str] | None,
        typer.Argument(metavar="INPUT", help="Parquet/JSONL files: plan for their longest prompt."),
    ] = None,
    model: ModelOption = "smollm2-135m",
    method: MethodOption = "directer",
    max_new_tokens: MaxNewTokensOption = 256,
    max_trials: MaxTrialsOption = 10,
    static_layers: StaticLayersOption = 0,
    prompt_tokens: Annotated[
        int | None, typer.Option(help="Plan for prompts of this many tokens (instead of INPUT files).", min=1)
    ] = None,
    instruction_tokens: Annotated[
        int | None,
        typer.Option(help="Instruction tokens per prompt; default the longest in INPUT, or the whole prompt."),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Check this batch size; exit 1 when it does not fit.", min=1)
    ] = None,
    memory: Annotated[
        float | None, typer.Option(help="Device memory in GiB, to plan for a device this machine lacks.", min=0.01)
    ] = None,
    memory_fraction: MemoryFractionOption = 0.9,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    trust_remote_code: TrustOption = False,
) -> None:
    """Weights, KV cache and every other buffer the engine allocates per row, and the largest batch that
    fits the device's memory, from the model's configuration alone (no weights load).

    \b
    Examples:
      directer plan --model smollm2-1.7b-random --device cuda --memory 80 --prompt-tokens 1024
      directer plan examples/sample_prompts.jsonl --max-new-tokens 256
    """
    from directer.models import ModelNotFoundError
    from pipeline.inputs import InputError
    from pipeline.planning import plan_run

    steering = _steering(locals())
    _quiet_transformers()
    try:
        result = plan_run(
            model, steering, inputs or [], prompt_tokens=prompt_tokens, instruction_tokens=instruction_tokens,
            device=device, dtype=dtype, memory_gib=memory, memory_fraction=memory_fraction, batch_size=batch_size,
            trust_remote_code=trust_remote_code,
        ).to_dict()  # fmt: skip
    except (InputError, ModelNotFoundError, ValueError, OSError) as error:
        raise _fail(str(error)) from None
    if json_output:
        print(json.dumps(result))
    else:
        Console().print(render.memory_plan(result))
    if batch_size and not result["fits"]:
        raise typer.Exit(code=1)


@app.command(cls=Command, short_help="Build a training set from generate outputs.")
def export(
    runs: Annotated[
        list[str],
        typer.Argument(metavar="RUN_DIR", help="directer generate output folders (several with --best-of)."),
    ],
    output: Annotated[str, typer.Option("--output", "-o", help="Folder for the training set and its card.")],
    format: Annotated[str, typer.Option("--format", help="hf (save_to_disk), jsonl or parquet.")] = "hf",
    verify: Annotated[bool, typer.Option("--verify", help="Keep rows whose IFEval checkers pass.")] = False,
    loose: Annotated[bool, typer.Option("--loose", help="Verify with IFEval's loose checks.")] = False,
    min_tokens: Annotated[int, typer.Option(help="Drop completions shorter than this.")] = 0,
    max_nll: Annotated[float | None, typer.Option(help="Drop completions with a higher mean NLL.")] = None,
    max_repetition: Annotated[float | None, typer.Option(help="Drop completions with 1 - distinct-2 above.")] = None,
    dedupe: Annotated[bool, typer.Option("--dedupe", help="Remove exact and near-duplicate completions.")] = False,
    require_finish: Annotated[str | None, typer.Option(help="eos: keep only completions that ended by EOS.")] = None,
    best_of: Annotated[
        bool,
        typer.Option(
            "--best-of",
            help="Per prompt, of the completions that pass the other filters (--verify: its checks), the one "
            "with the lowest NLL (runs made with --score-nll; a row without one comes last).",
        ),
    ] = False,
) -> None:
    """Build a training set of chat records from generate outputs: verify, filter, dedupe, export.

    \b
    Example:
      directer export runs/steered --output train --verify --dedupe --require-finish eos
    """
    from pipeline.export import ExportConfig
    from pipeline.export import export as run_export
    from pipeline.inputs import InputError

    try:
        config = ExportConfig(
            runs=tuple(runs), output=output, format=format, verify=verify, loose=loose, min_tokens=min_tokens,
            max_nll=max_nll, max_repetition=max_repetition, dedupe=dedupe, require_finish=require_finish,
            best_of=best_of,
        )  # fmt: skip
        report = run_export(config, command=current_command(), progress=True)
    except (InputError, ValueError) as error:
        raise _fail(str(error)) from None
    Console().print(render.export_counts(report, output))


@app.command(cls=Command, short_help="Show the instruction spans detected in prompts.")
def spans(
    source: Annotated[
        str, typer.Argument(metavar="SOURCE", help="A prompt, or a .jsonl or .parquet file of input rows.")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per prompt.")] = False,
    limit: LimitOption = None,
) -> None:
    """Mark the spans `--spans auto` would steer, to check detection on your data before a run.

    \b
    Example:
      directer spans "Describe Rome. Answer in exactly two sentences."
      directer spans prompts.jsonl --limit 20 --json
    """

    from directer.spans import DETECTOR, find_instruction_spans
    from pipeline.inputs import JSON_SUFFIXES, READ_ERROR, iter_rows
    from pipeline.rows import user_message

    path = Path(source)
    if path.suffix in (*JSON_SUFFIXES, ".parquet") and path.is_file():
        rows = iter_rows(path)
    else:
        rows = iter([{"id": None, "prompt": source}])
    console = Console()
    for index, row in enumerate(itertools.islice(rows, limit)):
        name = row.get("id") or (f"row {index}" if path.is_file() else "prompt")
        try:
            message = None if row.get(READ_ERROR) else user_message(row)
        except (KeyError, TypeError, IndexError):
            message = None
        if not isinstance(message, str):
            console.print(f"{name}: no prompt to read", style="red")
            continue
        found = find_instruction_spans(message)
        if as_json:
            texts = [message[start:end] for start, end in found]
            record = {"id": row.get("id"), "prompt": message, "spans": found, "texts": texts, "detector": DETECTOR}
            print(json.dumps(record, ensure_ascii=False))
        else:
            console.print(Text(f"{name} ({len(found)} span{'s' * (len(found) != 1)}, {DETECTOR})", style="dim"))
            console.print(render.marked_spans(message, found))


@app.command("ifeval", cls=Command)
def ifeval_rows(
    output: Annotated[str, typer.Option("--output", "-o", help="File to write the input rows to: .parquet or .jsonl.")],
    data: Annotated[str | None, typer.Option(help="IFEval input_data.jsonl; default the packaged copy.")] = None,
    spans: Annotated[str, typer.Option(help="gold (instruction_spans.jsonl beside it), auto or none.")] = "gold",
    limit: LimitOption = None,
) -> None:
    """Write IFEval's prompts as input rows for directer generate.

    \b
    Example:
      directer ifeval --output prompts.parquet --spans auto
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from directer.ifeval import load_ifeval
    from pipeline.outputs import replacing

    path = Path(output)
    if path.is_dir():
        raise _fail(f"--output {output} is a folder: name a .parquet or .jsonl file")
    if path.suffix not in (".parquet", ".jsonl"):
        raise _fail(f"--output {output}: name a .parquet or .jsonl file")
    try:
        rows = load_ifeval(data, spans=spans, limit=limit)  # type: ignore[arg-type]
    except (FileNotFoundError, ValueError) as error:
        raise _fail(str(error)) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as partial:
        if path.suffix == ".jsonl":
            partial.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        else:
            pq.write_table(pa.Table.from_pylist(rows), partial)
    steered = sum(bool(r["instruction_spans"]) for r in rows)
    Console().print(f"{len(rows)} IFEval rows ({steered} with spans, {spans}) -> {output}")


@app.command(cls=Command, context_settings={"ignore_unknown_options": True})
def submit(
    command: Annotated[list[str], typer.Argument(metavar="-- COMMAND", help="The directer command to run, after --.")],
    address: DashboardOption = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait for the job to end.")] = False,
    follow: Annotated[bool, typer.Option("--follow", help="Stream the job's logs until it ends.")] = False,
    unreachable_timeout: UnreachableOption = 120.0,
    env: Annotated[
        list[str] | None,
        typer.Option(metavar="KEY=VALUE", help="A variable set in the job's environment (repeatable)."),
    ] = None,
    pip: Annotated[
        list[str] | None, typer.Option(metavar="REQUIREMENT", help="Extra pip requirement for the job (repeatable).")
    ] = None,
) -> None:
    """Submit a directer command as a Ray job.

    \b
    Example:
      directer submit --wait -- generate /data/prompts/ --output /data/runs/a

    When the job server asks for a token, it is read from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token (ray get-auth-token). Ctrl-C while waiting detaches; the job keeps running.
    """
    from jobs import submit as jobs

    try:
        variables = dict(item.split("=", 1) for item in env or [])
    except ValueError:
        raise _fail("--env takes KEY=VALUE") from None
    try:
        job_id = jobs.submit(command, address=address, env=variables, pip=pip)
    except (jobs.JobServerError, ValueError) as error:
        raise _fail(f"could not submit the job: {error}") from None
    print(job_id, flush=True)
    if not (follow or wait):
        return
    where = f" --address {address}" if address else ""
    detach = (
        f"detached; job {job_id} keeps running. Follow it: directer jobs logs {job_id} --follow{where}; "
        f"stop it: directer jobs stop {job_id}{where}"
    )
    try:
        with _interruptible(detach):
            if follow:
                final = jobs.follow(job_id, address, unreachable_timeout)
            else:
                with console.status(f"waiting for {job_id}"):
                    final = jobs.wait(job_id, address, unreachable_timeout)
    except jobs.JobServerError as error:
        raise _fail(str(error)) from None
    console.print(f"job {job_id}: {final}")
    if final != "SUCCEEDED":
        raise typer.Exit(code=1)


jobs_app = typer.Typer(
    help="Follow and control submitted Ray jobs.\n\n\b\nExample:\n  directer jobs status raysubmit_XXXX",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(jobs_app, name="jobs")


@jobs_app.command("status", cls=Command)
def job_status(job_id: JobIdArgument, address: DashboardOption = None) -> None:
    """Print the job's status.

    \b
    Example:
      directer jobs status raysubmit_XXXX --address http://127.0.0.1:8265
    """
    from jobs import submit as jobs

    try:
        print(jobs.status(job_id, address))
    except jobs.JobServerError as error:
        raise _fail(str(error)) from None


@jobs_app.command("logs", cls=Command)
def job_logs(
    job_id: JobIdArgument,
    address: DashboardOption = None,
    follow: Annotated[bool, typer.Option("--follow", help="Stream until the job ends.")] = False,
    unreachable_timeout: UnreachableOption = 120.0,
) -> None:
    """Print the job's logs.

    \b
    Example:
      directer jobs logs raysubmit_XXXX --follow
    """
    from jobs import submit as jobs

    try:
        if follow:
            with _interruptible(f"stopped following; job {job_id} keeps running"):
                jobs.follow(job_id, address, unreachable_timeout)
        else:
            sys.stdout.write(jobs.logs(job_id, address))
    except jobs.JobServerError as error:
        raise _fail(str(error)) from None


@jobs_app.command("stop", cls=Command)
def job_stop(job_id: JobIdArgument, address: DashboardOption = None) -> None:
    """Stop the job.

    \b
    Example:
      directer jobs stop raysubmit_XXXX
    """
    from jobs import submit as jobs

    try:
        print("stopped" if jobs.stop(job_id, address) else "not running")
    except jobs.JobServerError as error:
        raise _fail(str(error)) from None


if __name__ == "__main__":
    app()
