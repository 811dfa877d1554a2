"""``directer plan``: the memory plan of a run (:mod:`directer.memory`) before any weight loads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from directer.config import SteeringConfig
from directer.memory import GIB, MemoryPlan, ModelShape, device_budget, plan_memory
from directer.models import default_dtype, load_tokenizer, model_config, parse_dtype
from directer.prompts import PromptError, prompt_from_row
from pipeline.inputs import JSON_SUFFIXES, InputError, iter_rows


@dataclass
class RunPlan:
    model: str
    device: str
    dtype: str
    method: str
    prompts: int | None  # prompts read from the inputs (None: --prompt-tokens was given)
    plan: MemoryPlan
    batch_size: int | None  # a size to check; None: the chosen one

    def to_dict(self) -> dict[str, object]:
        chosen = self.plan.chosen_batch(self.device)
        size = self.batch_size or chosen or 1
        return {
            "model": self.model, "device": self.device, "dtype": self.dtype, "method": self.method,
            "prompts": self.prompts, **self.plan.to_dict(), "chosen_batch": chosen,
            "batch_size": size, "batch_total": self.plan.total(size),
            "fits": self.plan.budget is None or self.plan.total(size) <= self.plan.budget,
        }  # fmt: skip


def plan_run(
    model: str,
    steering: SteeringConfig,
    inputs: list[str],
    *,
    prompt_tokens: int | None = None,
    instruction_tokens: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    memory_gib: float | None = None,
    memory_fraction: float = 0.9,
    batch_size: int | None = None,
    trust_remote_code: bool = False,
) -> RunPlan:
    """The plan for ``model`` on ``device``: for the longest prompt (and instruction) of ``inputs`` once
    templated and tokenized, or for ``prompt_tokens``. ``memory_gib`` plans for a device of that size
    (one this machine may not have); else the device's own memory is the budget."""
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    resolved_dtype = parse_dtype(dtype) if dtype else default_dtype(target.type)  # the device need not be here
    config = model_config(model, trust_remote_code)
    prompts = None
    if inputs:
        prompt_tokens, longest_span, prompts = _longest(model, inputs, trust_remote_code)
        instruction_tokens = longest_span if instruction_tokens is None else instruction_tokens
    if prompt_tokens is None:
        raise ValueError("give input files or --prompt-tokens")
    if memory_gib is not None:
        budget = int(memory_gib * GIB * memory_fraction)
    else:
        if target.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("torch sees no CUDA device here: give --memory GIB to plan for one")
        budget = device_budget(target, memory_fraction)
    plan = plan_memory(
        ModelShape.of(config, resolved_dtype), steering, prompt_tokens, span_tokens=instruction_tokens,
        device=target.type, budget=budget,
    )  # fmt: skip
    name = str(resolved_dtype).replace("torch.", "")
    return RunPlan(model, target.type, name, steering.method, prompts, plan, batch_size)


def _longest(model: str, inputs: list[str], trust: bool) -> tuple[int, int, int]:
    """Longest prompt and longest instruction (tokens) over the rows of ``inputs``; rows that would be
    error rows in a run are skipped."""
    tokenizer = load_tokenizer(model, trust)
    longest = span = count = 0
    for name in inputs:
        path = Path(name)
        if not path.is_file() or path.suffix not in (*JSON_SUFFIXES, ".parquet"):
            raise InputError(f"{name}: not a .jsonl or .parquet file")
        for row in iter_rows(path):
            try:
                prompt = prompt_from_row(tokenizer, row)
            except (PromptError, KeyError, TypeError, ValueError):
                continue
            count += 1
            longest, span = max(longest, len(prompt.token_ids)), max(span, len(prompt.span))
    if not count:
        raise InputError(f"no usable prompt in {', '.join(inputs)}")
    return longest, span, count
