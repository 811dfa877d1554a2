"""``directer bench``: tokens per second and peak memory, measured side by side in one process.

On the same IFEval prompts (gold spans, chat template): ``transformers``' ``model.generate``
(greedy, its default attention), the engine zero-shot, the engine with the steering method (Directer
by default; measurements and ratios are named after it), for Directer the plain per-prompt reference
implementation (the tests' oracle; like the official implementation, it copies the whole KV cache for
every steered pass), and the Ray pipeline with one actor. Batch-size-1
figures use the first ``b1_prompts`` prompts (the reference is slow), every method on one prompt
after another; the others use all.
"""

from __future__ import annotations

import functools
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from directer import Directer, SteeringConfig
from directer.ifeval import load_ifeval
from directer.reference import reference_generate


@dataclass
class Measurement:
    tokens: int
    seconds: float
    peak_bytes: int

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


@dataclass
class BenchResult:
    config: dict[str, Any]
    measurements: dict[str, dict[str, float]] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    pipeline: dict[str, float] = field(default_factory=dict)


class PeakMemory:
    """Peak resident memory while a block runs: on a CPU the kernel's own high-water mark (``VmHWM``,
    restarted through ``/proc/self/clear_refs``; sampling ``/proc`` from a thread every 2 ms instead slowed
    the engine at batch size 1 by 6%); on CUDA, the allocator's peak."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
            return
        with open("/proc/self/status") as status:
            kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
        self.peak = kib * 1024


def measure(device: torch.device, run: Callable[[], int]) -> Measurement:
    """Run once; ``run`` returns the number of generated tokens."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    with PeakMemory(device) as memory:
        started = time.perf_counter()
        tokens = run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    return Measurement(tokens, seconds, memory.peak)


def _interleaved(
    device: torch.device, methods: dict[str, Callable[[list], int]], batch: list, size: int
) -> dict[str, Measurement]:
    """Every method on one batch of ``size`` prompts after another, batch after batch, the order rotating:
    slow spells of a shared machine fall on all methods alike."""
    totals = {name: Measurement(0, 0.0, 0) for name in methods}
    names = list(methods)
    for index, start in enumerate(range(0, len(batch), size)):
        chunk = batch[start : start + size]
        turn = index % len(names)
        for name in names[turn:] + names[:turn]:
            m = measure(device, functools.partial(methods[name], chunk))
            total = totals[name]
            totals[name] = Measurement(
                total.tokens + m.tokens, total.seconds + m.seconds, max(total.peak_bytes, m.peak_bytes)
            )
    return totals


def run_benchmark(
    prompts: int = 16,
    batch_sizes: tuple[int, ...] = (1, 16),
    steering: SteeringConfig = SteeringConfig(max_new_tokens=64),
    model: str = "smollm2-135m",
    b1_prompts: int = 4,
    pipeline: bool = True,
    device: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    log: Callable[[str], None] = print,
) -> BenchResult:
    steerer = Directer.from_pretrained(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    loaded = steerer.loaded
    built = [
        steerer.prompt(message=r["prompt"], instruction_spans=r["instruction_spans"])
        for r in load_ifeval(limit=prompts)
    ]
    max_new_tokens = steering.max_new_tokens
    zero_shot = steering.with_(method="zero-shot")
    method = steering.method
    tokenizer = loaded.tokenizer
    result = BenchResult(
        config={"prompts": prompts, "b1_prompts": b1_prompts, "batch_sizes": list(batch_sizes),
                "steering": steering.to_dict(), "model": loaded.identity, "device": str(loaded.device),
                "torch_threads": torch.get_num_threads()},
    )  # fmt: skip

    def hf_generate(batch: list, size: int) -> int:
        tokens = 0
        tokenizer.padding_side = "left"
        for start in range(0, len(batch), size):
            chunk = batch[start : start + size]
            encoded = tokenizer([p.text for p in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
            encoded = encoded.to(loaded.device)
            out = loaded.model.generate(
                **encoded, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=loaded.pad_token_id,
                eos_token_id=list(loaded.eos_token_ids),
            )  # fmt: skip
            for row in out[:, encoded["input_ids"].shape[1] :].tolist():
                ended = [i for i, t in enumerate(row) if t in loaded.eos_token_ids]
                tokens += ended[0] + 1 if ended else len(row)
        return tokens

    def engine(batch: list, size: int, config: SteeringConfig) -> int:
        return sum(len(c.token_ids) for c in steerer.complete(batch, config, batch_size=size))

    def reference(batch: list) -> int:
        return sum(
            len(reference_generate(loaded.model, p.token_ids, p.span, alpha=steering.alpha, beta=steering.beta,
                                   max_trials=steering.max_trials, max_new_tokens=max_new_tokens,
                                   eos_token_ids=loaded.eos_token_ids, ranking=steering.ranking).token_ids)
            for p in batch
        )  # fmt: skip

    with torch.inference_mode():
        engine(built[:2], 2, steering)  # warm-up
        for size in batch_sizes:
            batch = built[:b1_prompts] if size == 1 else built
            methods: dict[str, Callable[[list], int]] = {
                f"hf_b{size}": lambda chunk, s=size: hf_generate(chunk, s),
                f"zero_shot_b{size}": lambda chunk, s=size: engine(chunk, s, zero_shot),
                f"{method}_b{size}": lambda chunk, s=size: engine(chunk, s, steering),
            }
            if size == 1 and method == "directer":
                methods["plain_b1"] = reference
            for name, m in _interleaved(loaded.device, methods, batch, size).items():
                result.measurements[name] = {
                    "tokens": m.tokens, "seconds": m.seconds, "tokens_per_second": m.tokens_per_second,
                    "peak_bytes": m.peak_bytes,
                }  # fmt: skip
                log(f"{name:>16}: {m.tokens_per_second:8.1f} tokens/s ({m.tokens} tokens in {m.seconds:.1f}s)")
    largest = max(batch_sizes)
    if pipeline:
        result.pipeline = _pipeline(
            load_ifeval(limit=prompts), steering, model, largest, device, dtype, trust_remote_code
        )
        log(f"{'pipeline_b' + str(largest):>16}: {result.pipeline['tokens_per_second']:8.1f} tokens/s "
            f"(Ray start-up {result.pipeline['startup_seconds']:.1f}s and model load "
            f"{result.pipeline['model_load_seconds']:.1f}s excluded)")  # fmt: skip
    result.ratios = _ratios(result, method, largest)
    return result


def _pipeline(rows, config, model, batch_size, device, dtype, trust_remote_code) -> dict[str, float]:
    """The same prompts through ``directer generate`` with one actor (start-up and model load excluded)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.config import GenerateConfig
    from pipeline.run import generate

    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "prompts.parquet"
        pq.write_table(
            pa.Table.from_pylist([{k: r[k] for k in ("id", "prompt", "instruction_spans")} for r in rows]), source
        )
        run = GenerateConfig(
            inputs=(str(source),), output=str(Path(folder) / "out"), model=model, steering=config, actors=1,
            batch_size=batch_size, device=device, dtype=dtype, spans="none", trust_remote_code=trust_remote_code,
        )  # fmt: skip
        report = generate(run, progress=False)
    net = report.seconds["pipeline"] - report.seconds["model_load"]
    return {
        "tokens": report.completion_tokens,
        "seconds": net,
        "tokens_per_second": report.completion_tokens / net,
        "startup_seconds": report.seconds["startup"],
        "model_load_seconds": report.seconds["model_load"],
    }


def _ratios(result: BenchResult, method: str, largest: int) -> dict[str, float]:
    m = {name: v["tokens_per_second"] for name, v in result.measurements.items()}
    peak = {name: v["peak_bytes"] for name, v in result.measurements.items()}
    ratios = {
        "zero_shot_vs_hf_b1": m["zero_shot_b1"] / m["hf_b1"],
        f"zero_shot_vs_hf_b{largest}": m[f"zero_shot_b{largest}"] / m[f"hf_b{largest}"],
        f"{method}_vs_zero_shot_b1": m[f"{method}_b1"] / m["zero_shot_b1"],
        f"{method}_vs_zero_shot_b{largest}": m[f"{method}_b{largest}"] / m[f"zero_shot_b{largest}"],
        f"memory_{method}_vs_zero_shot": peak[f"{method}_b{largest}"] / peak[f"zero_shot_b{largest}"],
    }
    if "plain_b1" in m:
        ratios[f"{method}_b1_vs_plain_b1"] = m[f"{method}_b1"] / m["plain_b1"]
        ratios[f"{method}_b{largest}_vs_plain_b1"] = m[f"{method}_b{largest}"] / m["plain_b1"]
    if result.pipeline:
        ratios[f"pipeline_vs_engine_b{largest}"] = result.pipeline["tokens_per_second"] / m[f"{method}_b{largest}"]
    return ratios


def to_json(result: BenchResult) -> str:
    return json.dumps({"config": result.config, "measurements": result.measurements, "pipeline": result.pipeline,
                       "ratios": result.ratios})  # fmt: skip
