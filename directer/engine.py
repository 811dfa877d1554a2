"""The decoding loop: batched greedy decoding with dynamic rejection steering.

Every row runs the algorithm of the paper independently (see DESIGN §1):

1. prefill all prompt tokens but the last; the last is the input of the first step;
2. each step: a *raw* pass appends the token's keys/values and gives the unsteered distribution;
   on the first step the layers are ranked once (one batched probe pass); from the second step on a
   gate skips steering when no steered token could pass the plausibility test; otherwise steered
   *trials* over all layers, then the most sensitive half, quarter, ... until one passes
   ``p[j*] > beta * p[i*]`` or the unsteered token is emitted (fallback);
3. stop at any end-of-sequence id or at ``max_new_tokens``.

Steered passes read the cache as it was before the raw pass and never write to it; they run only for
the rows that still need them. Zero-shot is the same loop without steering.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import PreTrainedModel

from directer.attention import ForwardPass, KVCache, engine_attention
from directer.config import SteeringConfig
from directer.ranking import AttentionCapture, rank_layers, sensitivity

FinishReason = Literal["stop", "length"]
# up to this many variant tokens, one batched trial pass beats lazy trials on a CPU (memory-bound)
CPU_BATCHED_TRIAL_TOKENS = 64


@dataclass
class Request:
    """One row to decode: prompt token ids and the token positions of the instruction.

    ``ranking``: a layer order from an earlier run of the same prompt, span and alpha (skips the probes).
    """

    prompt_ids: Sequence[int]
    span: Sequence[int] = ()
    ranking: Sequence[int] | None = None


@dataclass(frozen=True)
class StepTelemetry:
    """What happened at one decoding step of one row (``layers == 0``: no steered token emitted)."""

    raw_token: int
    raw_prob: float
    top2_prob: float
    gate_skipped: bool
    trials: int
    layers: int
    token: int
    changed: bool


@dataclass(frozen=True)
class SteeringSummary:
    steps: int
    steered: int
    changed: int
    gate_skips: int
    fallbacks: int
    trials: int
    mean_layers: float

    @classmethod
    def of(cls, steps: Sequence[StepTelemetry]) -> SteeringSummary:
        steered = [s.layers for s in steps if s.layers > 0]
        return cls(
            steps=len(steps),
            steered=len(steered),
            changed=sum(s.changed for s in steps),
            gate_skips=sum(s.gate_skipped for s in steps),
            fallbacks=sum(s.trials > 0 and s.layers == 0 for s in steps),
            trials=sum(s.trials for s in steps),
            mean_layers=sum(steered) / len(steered) if steered else 0.0,
        )


@dataclass
class Generation:
    token_ids: list[int]
    finish_reason: FinishReason
    telemetry: list[StepTelemetry]
    ranking: list[int] | None = None
    ranking_reused: bool = False
    summary: SteeringSummary = field(init=False)

    def __post_init__(self) -> None:
        self.summary = SteeringSummary.of(self.telemetry)


def trial_sizes(num_layers: int, max_trials: int) -> list[int]:
    """Layer-set sizes tried in order: L, L//2, L//4, ... while more than one layer and trials remain."""
    sizes, size, trial = [], num_layers, 1
    while trial <= max_trials and size > 1:
        sizes.append(size)
        size = max(1, num_layers // 2**trial)
        trial += 1
    return sizes


class Engine:
    """Batched steered decoding on one ``transformers`` causal LM."""

    def __init__(self, model: PreTrainedModel, eos_token_ids: Iterable[int], pad_token_id: int = 0) -> None:
        self.model = model.eval()
        self.eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=model.device)
        self.pad_token_id = pad_token_id
        self.num_layers = model.config.get_text_config().num_hidden_layers
        self.device = model.device

    def generate(self, requests: Sequence[Request], config: SteeringConfig) -> list[Generation]:
        """Decode one batch; each row gets the tokens it would get alone."""
        if not requests:
            return []
        for index, request in enumerate(requests):
            if len(request.prompt_ids) == 0:
                raise ValueError(f"request {index}: empty prompt")
            if any(not 0 <= p < len(request.prompt_ids) for p in request.span):
                raise ValueError(f"request {index}: span positions must lie in [0, {len(request.prompt_ids)})")
        with torch.inference_mode(), engine_attention(self.model):
            return _Decoding(self, requests, config).run()

    def batched_trials(self, config: SteeringConfig, rows: int) -> bool:
        """Run this step's trials as one pass? Yes where a forward costs about the same for a few more
        tokens (GPUs; a CPU up to a few dozen tokens, as measured in BENCHMARKS.md), else one by one."""
        if config.trial_schedule == "auto":
            trials = len(trial_sizes(self.num_layers, config.max_trials))
            return self.device.type != "cpu" or rows * trials <= CPU_BATCHED_TRIAL_TOKENS
        return config.trial_schedule == "batched"

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, fp: ForwardPass, logits: bool = True
    ) -> torch.Tensor:
        """Logits of every variant: ``tokens [N, P]`` at ``positions [N]`` -> ``[N, P, vocab]`` float32
        (with ``logits=False``, only the last variant's: the ranking probes need hidden states only)."""
        variants = tokens.shape[1]
        out = self.model(
            input_ids=tokens,
            position_ids=positions[:, None].expand(-1, variants),
            use_cache=False,
            logits_to_keep=variants if logits else 1,
            directer_pass=fp,
        )
        return out.logits.float()


class _Decoding:
    """State of one batch being decoded; rows leave the batch as they finish."""

    def __init__(self, engine: Engine, requests: Sequence[Request], config: SteeringConfig) -> None:
        self.engine, self.requests, self.config = engine, requests, config
        device = engine.device
        lengths = torch.tensor([len(r.prompt_ids) for r in requests], device=device)
        width = int(lengths.max())
        pad = width - lengths
        ids = torch.full((len(requests), width), engine.pad_token_id, dtype=torch.long, device=device)
        span = torch.zeros(len(requests), width + config.max_new_tokens, dtype=torch.bool, device=device)
        for row, request in enumerate(requests):
            ids[row, width - len(request.prompt_ids) :] = torch.tensor(request.prompt_ids, device=device)
            span[row, [width - len(request.prompt_ids) + p for p in request.span]] = True
        self.cache = KVCache(pad, span, width + config.max_new_tokens)
        self.prompt = ids
        self.order = torch.arange(len(requests), device=device)  # original row of each active row
        self.rank_of: torch.Tensor | None = None  # [N, L]: position of each layer in its row's ranking
        self.rankings: list[list[int] | None] = [
            list(r.ranking) if r.ranking is not None and r.span else None for r in requests
        ]
        # a row without an instruction span has nothing to steer: it decodes as zero-shot
        self.steerable = torch.tensor([bool(r.span) for r in requests], device=device)
        self.steps: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.finished: dict[int, FinishReason] = {}

    def run(self) -> list[Generation]:
        engine, cache, config = self.engine, self.cache, self.config
        if self.prompt.shape[1] > 1:
            context = self.prompt[:, :-1]
            positions = (torch.arange(context.shape[1], device=context.device)[None] - cache.pad[:, None]).clamp(min=0)
            engine.model(
                input_ids=context,
                position_ids=positions,
                use_cache=False,
                logits_to_keep=1,
                directer_pass=ForwardPass(cache, prefill=True, write=True),
            )
        cache.length = self.prompt.shape[1] - 1
        token = self.prompt[:, -1]
        for step in range(config.max_new_tokens):
            emitted = self._step(token, first=step == 0)
            done = torch.isin(emitted, engine.eos)
            if step + 1 == config.max_new_tokens:
                for row in self.order[~done].tolist():
                    self.finished[row] = "length"
                done = torch.ones_like(done)
            if bool(done.any()):
                for row in self.order[done].tolist():
                    self.finished.setdefault(row, "stop")
                if bool(done.all()):
                    break
                keep = (~done).nonzero().squeeze(1)
                cache.keep_rows(keep)
                self.order = self.order[keep]
                self.steerable = self.steerable[keep]
                if self.rank_of is not None:
                    self.rank_of = self.rank_of[keep]
                emitted = emitted[keep]
            token = emitted
        return self._results()

    def _step(self, token: torch.Tensor, first: bool) -> torch.Tensor:
        """One decoding step for every active row; returns the emitted tokens."""
        engine, cache, config = self.engine, self.cache, self.config
        positions = cache.length - cache.pad
        steering = config.steers and bool(self.steerable.any())
        probe_rows = self._rows_to_rank() if first and steering else None
        capture = AttentionCapture()
        raw_pass = ForwardPass(cache, write=True)
        if probe_rows is not None:
            with capture.recording(engine.model):
                logits = engine.forward(token[:, None], positions, raw_pass)[:, -1]
            raw_pre, raw_post = capture.pre, capture.post
        else:
            logits = engine.forward(token[:, None], positions, raw_pass)[:, -1]
        probs = torch.softmax(logits, dim=-1)
        top = probs.topk(2, dim=-1)
        top1_prob, raw_token, top2_prob = top.values[:, 0], top.indices[:, 0], top.values[:, 1]
        emitted = raw_token.clone()
        trials = torch.zeros_like(raw_token)
        layers = torch.zeros_like(raw_token)
        gate_skipped = torch.zeros_like(raw_token, dtype=torch.bool)
        if steering:
            if probe_rows is not None:
                self._rank(token, positions, probe_rows, raw_pre, raw_post)
            if first:
                need = self.steerable.clone()  # no gate on the first step
            else:
                gate_skipped = (top2_prob < config.beta * top1_prob) & self.steerable
                need = self.steerable & ~gate_skipped
            pending = need.nonzero().squeeze(1)
            if pending.numel():
                trial = self._batched_trials if engine.batched_trials(config, len(pending)) else self._lazy_trials
                trial(token, positions, pending, probs, top1_prob, emitted, trials, layers)
        cache.length += 1
        record = torch.stack(
            [
                raw_token.double(),
                top1_prob.double(),
                top2_prob.double(),
                gate_skipped.double(),
                trials.double(),
                layers.double(),
                emitted.double(),
            ],
            dim=1,
        )
        self.steps.append((self.order.cpu(), record.cpu()))
        return emitted

    def _rows_to_rank(self) -> torch.Tensor | None:
        """Active rows without a given ranking (on the first step every row is still active)."""
        missing = [row for row, r in enumerate(self.requests) if self.rankings[row] is None and r.span]
        self.rank_of = torch.zeros(
            len(self.requests), self.engine.num_layers, dtype=torch.long, device=self.engine.device
        )
        for row, ranking in enumerate(self.rankings):
            if ranking is not None:
                self.rank_of[row] = torch.argsort(torch.tensor(ranking, device=self.engine.device))
        return torch.tensor(missing, dtype=torch.long, device=self.engine.device) if missing else None

    def _rank(self, token, positions, rows, raw_pre, raw_post) -> None:
        """One pass with one probe per layer for each row in ``rows``; stores their layer order."""
        engine, num_layers = self.engine, self.engine.num_layers
        steer = torch.eye(num_layers, dtype=torch.bool, device=token.device).expand(len(rows), -1, -1)
        probe = ForwardPass(self.cache, rows=_maybe_all(rows, len(token)), steer=steer, alpha=self.config.alpha)
        capture = AttentionCapture()
        with capture.recording(engine.model):
            engine.forward(token[rows, None].expand(-1, num_layers), positions[rows], probe, logits=False)
        subset = [t[rows] for t in raw_pre], [t[rows] for t in raw_post]
        scores = sensitivity(*subset, capture.pre, capture.post)
        order = rank_layers(scores)
        self.rank_of[rows] = torch.argsort(order, dim=-1)
        for row, ranking in zip(rows.tolist(), order.tolist()):
            self.rankings[row] = ranking

    def _lazy_trials(self, token, positions, pending, probs, top1_prob, emitted, trials, layers) -> None:
        """One trial at a time, each for the rows whose earlier trials were all rejected."""
        for size in trial_sizes(self.engine.num_layers, self.config.max_trials):
            steer = (self.rank_of[pending] < size)[:, None, :]
            fp = ForwardPass(self.cache, rows=_maybe_all(pending, len(token)), steer=steer, alpha=self.config.alpha)
            steered = self.engine.forward(token[pending, None], positions[pending], fp)[:, -1].argmax(-1)
            trials[pending] += 1
            accepted = probs[pending, steered] > self.config.beta * top1_prob[pending]
            emitted[pending[accepted]] = steered[accepted]
            layers[pending[accepted]] = size
            pending = pending[~accepted]
            if pending.numel() == 0:
                return

    def _batched_trials(self, token, positions, pending, probs, top1_prob, emitted, trials, layers) -> None:
        """Every trial of the step as one variant of one pass; each row keeps its first accepted trial."""
        sizes = trial_sizes(self.engine.num_layers, self.config.max_trials)
        if not sizes:
            return
        size_t = torch.tensor(sizes, device=token.device)
        steer = self.rank_of[pending][:, None, :] < size_t[None, :, None]  # [R, K, L]
        fp = ForwardPass(self.cache, rows=_maybe_all(pending, len(token)), steer=steer, alpha=self.config.alpha)
        steered = self.engine.forward(token[pending, None].expand(-1, len(sizes)), positions[pending], fp).argmax(-1)
        accepted = probs[pending].gather(1, steered) > self.config.beta * top1_prob[pending, None]  # [R, K]
        any_accepted = accepted.any(dim=1)
        first = accepted.int().argmax(dim=1)
        trials[pending] = torch.where(any_accepted, first + 1, len(sizes))
        winners = pending[any_accepted]
        emitted[winners] = steered[any_accepted, first[any_accepted]]
        layers[winners] = size_t[first[any_accepted]]

    def _results(self) -> list[Generation]:
        per_row: list[list[StepTelemetry]] = [[] for _ in self.requests]
        for order, record in self.steps:
            for row, values in zip(order.tolist(), record.tolist()):
                raw, p1, p2, skipped, trials, layers, token = values
                per_row[row].append(
                    StepTelemetry(
                        raw_token=int(raw),
                        raw_prob=p1,
                        top2_prob=p2,
                        gate_skipped=bool(skipped),
                        trials=int(trials),
                        layers=int(layers),
                        token=int(token),
                        changed=int(token) != int(raw),
                    )
                )
        return [
            Generation(
                token_ids=[s.token for s in steps],
                finish_reason=self.finished[row],
                telemetry=steps,
                ranking=self.rankings[row] if self.config.steers else None,
                ranking_reused=self.rankings[row] is not None and self.requests[row].ranking is not None,
            )
            for row, steps in enumerate(per_row)
        ]


def _maybe_all(rows: torch.Tensor, total: int) -> torch.Tensor | None:
    """``None`` when ``rows`` is every row in order (no gather needed)."""
    if len(rows) == total:
        return None
    return rows
