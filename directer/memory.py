"""Memory planning: what the engine allocates for a batch, and the largest batch a device holds.

Every buffer :class:`~directer.engine.Engine` allocates per row is counted from the model's
configuration alone (no weights are loaded): the KV cache of ``prompt + max_new_tokens`` slots plus
the scratch slots of packed passes (:class:`~directer.cache.KVCache`), the scaled instruction keys
and their values, the raw distribution kept for rows in trials, and the largest transient of a
pass (the prefill's activations, a decoding pass's logits and attention scores, the ranking
probes). ``benchmarks/memory_plan.py`` checks the sum against measured peak memory (BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from directer.cache import scratch_slots
from directer.config import SteeringConfig
from directer.engine import trial_tokens

GIB = 1024**3
MIB = 1024**2
# the batch size chosen when none is given is capped: beyond this a CPU gains nothing, and a GPU's
# pass costs grow with the batch (BENCHMARKS.md)
MAX_AUTO_BATCH = {"cpu": 16, "cuda": 128}
# besides weights and batch: the tokenizer and the model's Python objects (measured about 60 MiB on a
# CPU for both sizes in BENCHMARKS.md); on a GPU, the CUDA context, which allocations do not show
RUNTIME = {"cpu": 64 * MIB, "cuda": 512 * MIB}
# on a CPU, a product of more than this many tokens has MKL repack the weight it multiplies (measured
# with benchmarks/memory_plan.py: smaller passes show no repacked copy)
REPACK_ABOVE_TOKENS = 64


class MemoryPlanError(ValueError):
    """A batch (or the model alone) does not fit the memory budget."""


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a causal LM that decide its memory."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    parameters: int
    dtype_bytes: int

    @classmethod
    def of(cls, config: PretrainedConfig, dtype: torch.dtype, parameters: int | None = None) -> ModelShape:
        """From a configuration; unless given, parameters are counted on the ``meta`` device (no memory)."""
        text = config.get_text_config()
        if parameters is None:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
            parameters = sum(p.numel() for p in model.parameters())
        heads = text.num_attention_heads
        return cls(
            layers=text.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            hidden=text.hidden_size,
            intermediate=getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
            vocab=text.vocab_size,
            parameters=parameters,
            dtype_bytes=torch.finfo(dtype).bits // 8,
        )


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per actor: the runtime and the weights, each buffer one row keeps for its whole batch
    (``per_row``), the largest transient of a pass per row (``pass_per_row``) and per batch
    (``workspace``: weights repacked on a CPU, by every prefill and by decoding passes of batches of
    at least ``workspace_rows`` rows), and the largest batch within ``budget``."""

    prompt_tokens: int
    max_new_tokens: int
    runtime: int
    weights: int
    workspace: dict[str, int]
    workspace_rows: int
    per_row: dict[str, int]
    pass_per_row: dict[str, int]
    budget: int | None = None

    @property
    def row_bytes(self) -> int:
        """One row's share of a batch's peak: its buffers plus its largest pass transient."""
        return sum(self.per_row.values()) + max(self.pass_per_row.values())

    def batch_bytes(self, rows: int) -> int:
        return self._workspace(rows) + rows * self.row_bytes

    def _workspace(self, rows: int) -> int:
        decode = self.workspace.get("decode", 0) if rows >= self.workspace_rows else 0
        return max(decode, self.workspace.get("prefill", 0))

    def total(self, rows: int) -> int:
        return self.runtime + self.weights + self.batch_bytes(rows)

    @property
    def max_batch(self) -> int | None:
        """The most rows that fit ``budget`` beside the weights (0: not even one); ``None`` without a budget."""
        if self.budget is None:
            return None
        free = self.budget - self.runtime - self.weights
        rows = (free - self._workspace(1)) // self.row_bytes
        if rows >= self.workspace_rows:
            rows = max(self.workspace_rows - 1, (free - self._workspace(rows)) // self.row_bytes)
        return max(0, rows)

    def chosen_batch(self, device: str) -> int | None:
        """The batch size used when none is given: the most that fit, at most ``MAX_AUTO_BATCH``."""
        fits = self.max_batch
        return None if fits is None else min(fits, MAX_AUTO_BATCH.get(device, MAX_AUTO_BATCH["cuda"]))

    def check(self, rows: int) -> None:
        """Raise :class:`MemoryPlanError` when ``rows`` rows would not fit the budget."""
        if self.budget is None or self.total(rows) <= self.budget:
            return
        fits = self.max_batch
        advice = f"the most that fit is {fits}" if fits else "not even one row fits beside the weights"
        raise MemoryPlanError(
            f"a batch of {rows} rows of {self.prompt_tokens} prompt + {self.max_new_tokens} new tokens needs "
            f"{self.total(rows) / GIB:.2f} GiB (weights {self.weights / GIB:.2f} GiB), over the budget of "
            f"{self.budget / GIB:.2f} GiB: {advice}; lower the batch size (--batch-size) or max_new_tokens, "
            "or leave the batch size unset to have it chosen"
        )

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "row_bytes": self.row_bytes, "max_batch": self.max_batch}


def plan_memory(
    shape: ModelShape,
    steering: SteeringConfig,
    prompt_tokens: int,
    *,
    span_tokens: int | None = None,
    device: str = "cpu",
    budget: int | None = None,
) -> MemoryPlan:
    """The engine's memory for rows of ``prompt_tokens`` (the batch's longest prompt) with instructions of
    ``span_tokens`` (default: the whole prompt, an upper bound) under ``steering``."""
    s = shape
    steerer = steering.steerer
    span = prompt_tokens if span_tokens is None else min(span_tokens, prompt_tokens)
    layer_sets = steerer.layer_sets(s.layers) if steerer.steers else []
    streams = 2 if steerer.stream else 1
    # tokens one row brings to a packed pass: its trials and next-token guesses (else its raw token)
    trials = trial_tokens(layer_sets, steerer.stream)
    pass_tokens = trials or 1
    scratch = scratch_slots(trials, span)
    slots = prompt_tokens + steering.max_new_tokens + scratch
    per_token_kv = s.layers * 2 * s.kv_heads * s.head_dim * s.dtype_bytes
    per_row = {"kv_cache": streams * slots * per_token_kv}
    if trials:
        per_row["instruction_keys"] = span * per_token_kv  # scaled keys and their values, every layer
        per_row["raw_probs"] = s.vocab * 4
    # a decoding pass: float32 logits of every packed token (a half-precision model's own logits besides),
    # the variants' logits gathered, and one layer's written-out attention scores (scores, mask, softmax)
    logits = pass_tokens * s.vocab * (4 + (s.dtype_bytes if s.dtype_bytes != 4 else 0))
    gathered = (len(layer_sets) if trials else 0) * s.vocab * 4
    scores = streams * s.heads * pass_tokens * slots * 4 * 3
    decode = logits + gathered + scores + streams * pass_tokens * (2 * s.hidden + 3 * s.intermediate) * s.dtype_bytes
    prefill = _prefill_bytes(s, prompt_tokens, False)
    if steerer.stream:
        prefill += _prefill_bytes(s, prompt_tokens, True)
    passes = {"decode_pass": decode, "prefill": prefill}
    if steerer.ranking is not None:
        # one probe per layer: its scores over the row's slots and the keys and values it gathers
        probe_keys = 2 * s.kv_heads * (prompt_tokens + s.layers + span) * s.head_dim * s.dtype_bytes
        probe_scores = s.heads * s.layers * (prompt_tokens + s.layers + span) * 4 * 3
        passes["ranking_probes"] = probe_keys + probe_scores + s.layers * s.hidden * s.dtype_bytes * 6
    # on a CPU, a pass of more than REPACK_ABOVE_TOKENS tokens has MKL repack each weight it multiplies:
    # a prefill, a copy of a layer's largest; a decoding pass, of the output embedding
    workspace = {}
    if device == "cpu":
        layer_weight = max(s.intermediate * s.hidden, (s.heads + 2 * s.kv_heads) * s.head_dim * s.hidden)
        workspace = {"prefill": layer_weight * s.dtype_bytes, "decode": s.vocab * s.hidden * s.dtype_bytes}
    workspace_rows = REPACK_ABOVE_TOKENS // pass_tokens + 1
    weights = s.parameters * s.dtype_bytes
    runtime = RUNTIME.get(device, RUNTIME["cuda"])
    return MemoryPlan(
        prompt_tokens, steering.max_new_tokens, runtime, weights, workspace, workspace_rows, per_row, passes, budget
    )


def _prefill_bytes(s: ModelShape, tokens: int, biased: bool) -> int:
    """The prefill's largest transient for one cache row: one layer's activations (residual, normed
    input, queries/keys/values, the MLP's three intermediates) and its causal mask; for a stream
    method's steered copy, its biased attention scores written out (scores, bias, additive mask and
    softmax in float32: six copies, measured on a CPU for PASTA in BENCHMARKS.md)."""
    activations = tokens * (3 * s.hidden + (s.heads + 2 * s.kv_heads) * s.head_dim + 3 * s.intermediate)
    scores = 6 * s.heads * tokens * tokens * 4 if biased else 0
    return activations * s.dtype_bytes + tokens * tokens + scores


def device_budget(device: torch.device, fraction: float) -> int:
    """``fraction`` of the memory this process may use on ``device``: a GPU's total, or on a CPU what the
    process holds now plus what the host has free."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"memory fraction must lie in (0, 1], got {fraction}")
    if device.type == "cuda":
        _, total = torch.cuda.mem_get_info(device)
        return int(total * fraction)
    import psutil

    return int((psutil.Process().memory_info().rss + psutil.virtual_memory().available) * fraction)
