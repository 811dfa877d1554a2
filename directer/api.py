"""The Python API: load once, then steer one prompt or many, as simply as ``model.generate``.

>>> import directer
>>> steerer = directer.Directer.from_pretrained()          # the bundled SmolLM2-135M-Instruct
>>> out = steerer.generate("Write a haiku about the sea. Answer in all capital letters.",
...                        instruction="Answer in all capital letters.")
>>> print(out.text, out.summary)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any, overload

import torch

from directer.config import SteeringConfig
from directer.engine import Engine, Generation, KernelChoice, Request, check_batch_size
from directer.memory import MemoryPlan, ModelShape, device_budget, plan_memory
from directer.models import DEFAULT_MODEL, LoadedModel, load_model
from directer.prompts import Prompt, SpanMode, check_fits, prompt_from_row
from directer.sampling import row_key
from directer.telemetry import SteeringSummary, StepTelemetry

PromptInput = str | tuple[str, str | None]


@dataclass
class Completion:
    """One prompt's result: the text, its tokens, and what steering did (its repr leaves out the token
    ids and the per-step telemetry, hundreds of entries a row)."""

    prompt: Prompt
    text: str
    token_ids: list[int] = field(repr=False)
    finish_reason: str
    telemetry: list[StepTelemetry] = field(repr=False)
    summary: SteeringSummary
    ranking: list[int] | None
    ranking_reused: bool
    method: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "completion": self.text,
            "token_ids": self.token_ids,
            "prompt_token_ids": self.prompt.token_ids,
            "instruction_token_span": list(self.prompt.token_span) if self.prompt.token_span else None,
            "finish_reason": self.finish_reason,
            "method": self.method,
            "summary": asdict(self.summary),
            "ranking": self.ranking,
            "telemetry": [asdict(step) for step in self.telemetry],
        }


class Directer:
    """A loaded model with its engine and a default :class:`SteeringConfig`.

    memory_fraction: the share of the device's memory batches may fill (:mod:`directer.memory`): a
    GPU's total, or on a CPU this process's memory plus what the host has free when first asked.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        config: SteeringConfig | None = None,
        spans: SpanMode = "auto",
        kernel: KernelChoice = "auto",
        memory_fraction: float = 0.9,
    ) -> None:
        self.loaded = loaded
        self.config = config or SteeringConfig()
        self.spans = spans  # rows without an instruction: detect one ("auto") or steer nothing ("none")
        self.engine = Engine(loaded.model, loaded.eos_token_ids, loaded.pad_token_id, kernel=kernel)
        self.memory_fraction = memory_fraction

    @classmethod
    def from_pretrained(
        cls,
        name: str = DEFAULT_MODEL,
        *,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        trust_remote_code: bool = False,
        spans: SpanMode = "auto",
        kernel: KernelChoice = "auto",
        memory_fraction: float = 0.9,
        gpus: int = 1,
        **config: Any,
    ) -> Directer:
        """Load a model (alias, Hugging Face id, folder or GGUF file); keyword config fields override defaults.
        ``kernel``: the attention kernel of packed passes (see :class:`~directer.engine.Engine`); ``gpus``:
        split the model over that many GPUs (see :func:`~directer.models.load_model`)."""
        loaded = load_model(name, device=device, dtype=dtype, trust_remote_code=trust_remote_code, gpus=gpus)
        return cls(loaded, SteeringConfig(**config), spans, kernel, memory_fraction)

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def prompt(self, message: str | None = None, instruction: str | None = None, **fields: Any) -> Prompt:
        """Build a prompt from a user message and its instruction, or from any input-row form
        (``messages=``, ``instruction_spans=``, ``task=``); see :func:`directer.prompts.prompt_from_row`."""
        return prompt_from_row(self.tokenizer, {"prompt": message, "instruction": instruction, **fields}, self.spans)

    @overload
    def generate(
        self, prompts: str | Prompt | dict, instruction: str | None = None, **overrides: Any
    ) -> Completion: ...

    @overload
    def generate(
        self, prompts: Sequence[PromptInput | Prompt], instruction: None = None, **overrides: Any
    ) -> list[Completion]: ...

    def generate(self, prompts, instruction=None, *, batch_size: int | None = None, **overrides):
        """Steer one prompt (with its ``instruction``) or a list of prompts, ``(prompt, instruction)`` pairs,
        input-row dicts or built prompts.

        ``overrides`` change fields of the config for this call, e.g. ``method="zero-shot"``; ``batch_size``:
        see :meth:`complete`.
        """
        single = isinstance(prompts, (str, Prompt, dict))
        items = [(prompts, instruction)] if single else [p if isinstance(p, tuple) else (p, None) for p in prompts]
        built = [self._build(p, i) for p, i in items]
        completions = self.complete(built, self.config.with_(**overrides) if overrides else self.config, batch_size)
        return completions[0] if single else completions

    def complete(
        self,
        prompts: Sequence[Prompt],
        config: SteeringConfig,
        batch_size: int | None = None,
        rankings: Sequence[list[int] | None] | None = None,
        row_ids: Sequence[str] | None = None,
    ) -> list[Completion]:
        """Decode built prompts, results in input order: ``batch_size`` rows at a time in order of length,
        each finished row's place taken by the next prompt (continuous batching).

        ``batch_size``: rows decoded together; ``None``, as many as the memory plan lets fit (at most
        :data:`~directer.memory.MAX_AUTO_BATCH` for the device). ``row_ids`` key the rows' draws when
        ``config`` samples (default: each prompt's index here), so a row's tokens do not depend on the
        batch it is decoded in.

        Raises :class:`PromptError` before decoding anything when a prompt would not fit the model's
        context, and :class:`~directer.memory.MemoryPlanError` when the batch would not fit memory."""
        check_batch_size(batch_size)
        if not prompts:
            return []
        for prompt in prompts:
            check_fits(prompt, config.max_new_tokens, self.loaded.context_length)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].token_ids))
        size = self.batch_size_for(prompts, config, batch_size)
        self.plan_batch(prompts, config).check(size)
        requests = [
            Request(
                prompts[i].token_ids,
                prompts[i].span,
                rankings[i] if rankings else None,
                row_key(config.seed, row_ids[i] if row_ids else str(i)),
            )
            for i in order
        ]
        # one row at a time has no place to refill: each decodes alone, unpadded
        groups = [[k] for k in range(len(order))] if size == 1 else [list(range(len(order)))]
        results: list[Completion | None] = [None] * len(prompts)
        for group in groups:
            generations = self.engine.generate([requests[k] for k in group], config, size)
            for k, generation in zip(group, generations):
                results[order[k]] = self._completion(prompts[order[k]], generation, config)
        return results  # type: ignore[return-value]

    @cached_property
    def model_shape(self) -> ModelShape:
        model = self.loaded.model
        return ModelShape.of(model.config, model.dtype, parameters=sum(p.numel() for p in model.parameters()))

    @cached_property
    def memory_budget(self) -> int:
        """The memory batches may fill: of every device holding part of the model."""
        devices = {parameter.device for parameter in self.loaded.model.parameters()}
        return sum(device_budget(device, self.memory_fraction) for device in devices)

    def batch_size_for(self, prompts: Sequence[Prompt], config: SteeringConfig, batch_size: int | None = None) -> int:
        """The rows :meth:`complete` decodes together: ``batch_size``, else as many as the memory plan lets
        fit (every row is laid out for the longest prompt); never more than there are prompts."""
        chosen = batch_size or self.plan_batch(prompts, config).chosen_batch(self.loaded.device.type) or 1
        return min(len(prompts), chosen)

    def plan_batch(self, prompts: Sequence[Prompt], config: SteeringConfig) -> MemoryPlan:
        """The memory plan of one batch of ``prompts`` (its longest prompt and longest instruction)."""
        return plan_memory(
            self.model_shape, config, max(len(p.token_ids) for p in prompts),
            span_tokens=max(len(p.span) for p in prompts), device=self.loaded.device.type, budget=self.memory_budget,
        )  # fmt: skip

    def _build(self, item: str | Prompt | dict, instruction: str | None) -> Prompt:
        if isinstance(item, Prompt):
            return item
        if isinstance(item, dict):
            return prompt_from_row(self.tokenizer, item, self.spans)
        return self.prompt(item, instruction)

    def _completion(self, prompt: Prompt, generation: Generation, config: SteeringConfig) -> Completion:
        return Completion(
            prompt=prompt,
            text=self.tokenizer.decode(generation.token_ids, skip_special_tokens=True),
            token_ids=generation.token_ids,
            finish_reason=generation.finish_reason,
            telemetry=generation.telemetry,
            summary=generation.summary,
            ranking=generation.ranking,
            ranking_reused=generation.ranking_reused,
            method=config.method,
        )
