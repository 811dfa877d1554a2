"""The decoding loop: batched greedy decoding with dynamic rejection steering.

Every row runs the algorithm of the paper independently (see DESIGN §1):

1. prefill all prompt tokens but the last; the last is the input of the first step;
2. each step: a *raw* pass appends the token's keys/values and gives the unsteered distribution;
   on the first step the layers are ranked once (one batched probe pass); from the second step on a
   gate skips steering when no steered token could pass the plausibility test; otherwise steered
   *trials* over all layers, then the most sensitive half, quarter, ... until one passes
   ``p[j*] > beta * p[i*]`` or the unsteered token is emitted (fallback);
3. stop at any end-of-sequence id or at ``max_new_tokens``.

Trials read the cache as it was before the raw pass and never write to it. Rows advance
independently: each forward is one packed pass in which every row brings what its step needs next
(its raw token, or its trials plus speculative next raw tokens), so nobody waits for another row's
trials. A step can only emit a token the unsteered model finds plausible, so the pass that settles a
step also runs the next step's raw token for each such candidate and keeps the one emitted.
Zero-shot is the same loop without steering.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import PreTrainedModel

from directer.attention import ForwardPass, KVCache, engine_attention
from directer.config import SteeringConfig
from directer.linears import column_linears
from directer.ranking import AttentionCapture, Sensitivity, rank_layers

FinishReason = Literal["stop", "length"]

# most plausible tokens guessed as the next raw token in a settling pass: the emitted token was among
# the first 3 in 98.5% of settled steps on IFEval (BENCHMARKS.md); beyond them, the next raw token
# runs in a pass of its own
MAX_GUESSES = 3


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
        with torch.inference_mode(), engine_attention(self.model), column_linears(self.model):
            return _Decoding(self, requests, config).run()

    def trial_chunk(self, config: SteeringConfig, remaining: torch.Tensor) -> torch.Tensor:
        """How many of its remaining trials each trial row runs in this pass: one (``lazy``) or all
        (``batched``, and ``auto``: a few more tokens cost a CPU or GPU pass little, a pass saved costs
        a whole one; BENCHMARKS.md)."""
        return torch.ones_like(remaining) if config.trial_schedule == "lazy" else remaining

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, fp: ForwardPass, logits: bool = True
    ) -> torch.Tensor:
        """Logits ``[T, vocab]`` (float32) of the packed tokens ``[T]`` at ``positions [T]`` (with
        ``logits=False`` only the last token's: the ranking probes need hidden states only)."""
        out = self.model(
            input_ids=tokens[None],
            position_ids=positions[None],
            use_cache=False,
            logits_to_keep=0 if logits else 1,
            directer_pass=fp,
        )
        return out.logits[0].float()


@dataclass
class _Layout:
    """Where the tokens of one pass sit: row ``r``'s tokens start at packed index ``starts[r]``."""

    raw_rows: torch.Tensor
    trial_rows: torch.Tensor
    chunk: torch.Tensor | None  # trials each trial row runs in this pass
    guesses: torch.Tensor | None  # speculative next raw tokens of each trial row (0 unless the pass settles)
    sizes: torch.Tensor | None  # [R, W] layer-set size of each trial cell
    starts: torch.Tensor
    tokens: torch.Tensor
    positions: torch.Tensor
    fp: ForwardPass


# per-row decoding state, one entry per active cache row (compacted together when rows finish)
_ROW_STATE = (
    "order", "token", "emitted", "steerable", "next_trial", "rank_of", "raw_probs", "candidates",
    "plausible", "raw_token", "top1", "top2", "gate_skipped", "trials", "layers", "out_token",
)  # fmt: skip


class _Decoding:
    """State of one batch being decoded. Rows advance independently: each pass carries the raw token
    of every row starting a step next to the trial variants of every row whose step passed the gate,
    so no row waits while others run trials. Rows leave the batch as they finish."""

    def __init__(self, engine: Engine, requests: Sequence[Request], config: SteeringConfig) -> None:
        self.engine, self.requests, self.config = engine, requests, config
        device = engine.device
        count = len(requests)
        lengths = torch.tensor([len(r.prompt_ids) for r in requests], device=device)
        width = int(lengths.max())
        ids = torch.full((count, width), engine.pad_token_id, dtype=torch.long, device=device)
        span = torch.zeros(count, width + config.max_new_tokens, dtype=torch.bool, device=device)
        for row, request in enumerate(requests):
            ids[row, width - len(request.prompt_ids) :] = torch.tensor(request.prompt_ids, device=device)
            span[row, [width - len(request.prompt_ids) + p for p in request.span]] = True
        self.sizes = trial_sizes(engine.num_layers, config.max_trials)
        tokens_per_row = len(self.sizes) + MAX_GUESSES if config.steers else 0  # probes gather their rows instead
        self.cache = KVCache(width - lengths, span, width + config.max_new_tokens, tokens_per_row, config.alpha)
        self.prompt = ids
        self.rankings: list[list[int] | None] = [
            list(r.ranking) if r.ranking is not None and r.span else None for r in requests
        ]
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.finished: dict[int, FinishReason] = {}

        def zeros(dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.zeros(count, dtype=dtype, device=device)

        self.order = torch.arange(count, device=device)  # original row of each active row
        self.token = ids[:, -1]  # input of the row's next pass
        self.emitted = zeros()  # tokens emitted so far
        # a row without an instruction span has nothing to steer: it decodes as zero-shot
        self.steerable = torch.tensor([bool(r.span) and config.steers for r in requests], device=device)
        self.next_trial = zeros() - 1  # index into ``sizes`` of the row's next trial; -1: next pass is raw
        self.rank_of = torch.zeros(count, engine.num_layers, dtype=torch.long, device=device)  # layer -> rank
        self.raw_probs = torch.zeros(count, 0, device=device)  # [N, vocab] once some row runs trials
        self.candidates = torch.zeros(count, MAX_GUESSES, dtype=torch.long, device=device)  # most probable first
        self.plausible = zeros()  # how many of ``candidates`` the step could emit (p > beta * top-1)
        # the current step of each row: its raw pass, then its trials
        self.raw_token, self.top1, self.top2 = zeros(), zeros(torch.float32), zeros(torch.float32)
        self.gate_skipped = zeros(torch.bool)
        self.trials, self.layers, self.out_token = zeros(), zeros(), zeros()

    def run(self) -> list[Generation]:
        engine, cache = self.engine, self.cache
        if self.prompt.shape[1] > 1:
            context = self.prompt[:, :-1]
            positions = (torch.arange(context.shape[1], device=context.device)[None] - cache.pad[:, None]).clamp(min=0)
            engine.model(
                input_ids=context,
                position_ids=positions,
                use_cache=False,
                logits_to_keep=1,
                directer_pass=ForwardPass(cache, prefill=True),
            )
        cache.lengths += self.prompt.shape[1] - 1
        first = True
        while len(self.order):
            self._pass(first)
            first = False
        return self._results()

    def _pass(self, first: bool) -> None:
        """One forward for every active row (see :meth:`_layout`), then each row's step moves on."""
        layout = self._layout()
        probe_rows = self._rows_to_rank() if first and bool(self.steerable.any()) else None
        capture = AttentionCapture()
        with capture.recording(self.engine.model) if probe_rows is not None else contextlib.nullcontext():
            logits = self.engine.forward(layout.tokens, layout.positions, layout.fp)
        ends = self._raw_step(layout.raw_rows, logits[layout.starts[layout.raw_rows]], first)
        if probe_rows is not None:
            self._rank(probe_rows, capture)
        confirmed = guessed = None
        if layout.chunk is not None:
            confirmed, guessed = self._settle_trials(layout, logits, ends)
        done = self._emit(ends.nonzero().squeeze(1))
        if confirmed is not None and confirmed.numel():
            live = ~done[confirmed]
            confirmed, guessed = confirmed[live], guessed[live]
            self._keep_guesses(layout.fp, confirmed, guessed)
            again = self._raw_step(confirmed, logits[guessed], first=False)
            done |= self._emit(again.nonzero().squeeze(1))
        if bool(done.any()):
            self._drop((~done).nonzero().squeeze(1))

    def _layout(self) -> _Layout:
        """The packed tokens of one pass: one raw token for each row starting a step; for each row whose
        step passed the gate, its trial variants and, when they settle the step, its next raw token for
        every token the step could emit (speculative: their keys and values are stashed, not written)."""
        engine, cache = self.engine, self.cache
        device = self.token.device
        raw = self.next_trial < 0
        raw_rows, trial_rows = raw.nonzero().squeeze(1), (~raw).nonzero().squeeze(1)
        counts = torch.ones_like(self.token)
        chunk = guesses = sizes = steer = stash = None
        if trial_rows.numel():
            remaining = len(self.sizes) - self.next_trial[trial_rows]
            chunk = engine.trial_chunk(self.config, remaining)
            guesses = torch.where(chunk == remaining, self.plausible[trial_rows], 0)
            counts[trial_rows] = chunk + guesses
        width = int(counts.max())
        cells = torch.arange(width, device=device)[None, :]
        valid = cells < counts[:, None]  # [N, W]: row r's tokens in cells 0..counts[r]-1
        tokens = self.token[:, None].expand(-1, width).clone()
        slots = cache.lengths[:, None].expand(-1, width).clone()  # raw tokens go to the next free slot
        write = raw[:, None] & (cells == 0)
        if chunk is not None:
            # trial cells 0..chunk-1 hold the step's token at its slot; cells chunk.., the guesses
            variant = cells < chunk[:, None]
            slots[trial_rows] -= variant.long()
            guess = (cells - chunk[:, None]).clamp(0, MAX_GUESSES - 1)
            tokens[trial_rows] = torch.where(variant, tokens[trial_rows], self.candidates[trial_rows].gather(1, guess))
            stash = torch.zeros_like(write)
            stash[trial_rows] = ~variant
            tried = (self.next_trial[trial_rows, None] + cells).clamp(max=len(self.sizes) - 1)
            sizes = torch.tensor(self.sizes, device=device)[tried]  # [R, W]: layers each variant steers
            steer = torch.zeros(len(counts), width, engine.num_layers, dtype=torch.bool, device=device)
            steer[trial_rows] = (self.rank_of[trial_rows][:, None, :] < sizes[:, :, None]) & variant[:, :, None]
        packed_slots = slots[valid]
        fp = ForwardPass(
            cache, variants=width if bool(valid.all()) else counts, slots=packed_slots, write=write[valid],
            stash=None if stash is None else stash[valid], steer=steer,
        )  # fmt: skip
        return _Layout(
            raw_rows=raw_rows, trial_rows=trial_rows, chunk=chunk, guesses=guesses, sizes=sizes,
            starts=torch.cumsum(counts, 0) - counts, tokens=tokens[valid],
            positions=packed_slots - cache.pad.repeat_interleave(counts), fp=fp,
        )  # fmt: skip

    def _settle_trials(
        self, layout: _Layout, logits: torch.Tensor, ends: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Trial rows keep their first accepted variant; rows out of trials fall back to the unsteered
        token. Marks settled steps in ``ends``; returns the rows that guessed the token their step
        emitted, and the packed index of that guess."""
        rows, chunk, sizes = layout.trial_rows, layout.chunk, layout.sizes
        cells = torch.arange(sizes.shape[1], device=rows.device)[None, :]
        variant_cells = torch.minimum(cells, chunk[:, None] - 1)
        steered = logits[layout.starts[rows, None] + variant_cells].argmax(-1)  # [R, W]
        accepted = self.raw_probs[rows].gather(1, steered) > self.config.beta * self.top1[rows, None]
        accepted &= cells < chunk[:, None]
        won = accepted.any(dim=1)
        pick = accepted.int().argmax(dim=1)
        self.trials[rows] += torch.where(won, pick + 1, chunk)
        self.out_token[rows[won]] = steered[won, pick[won]]
        self.layers[rows[won]] = sizes[won, pick[won]]
        self.next_trial[rows] += chunk
        settled = won | (self.next_trial[rows] >= len(self.sizes))
        self.next_trial[rows[settled]] = -1
        ends[rows[settled]] = True
        guessed = self.candidates[rows] == self.out_token[rows, None]
        guessed &= torch.arange(MAX_GUESSES, device=rows.device)[None, :] < layout.guesses[:, None]
        right = guessed.any(dim=1)
        return rows[right], layout.starts[rows[right]] + chunk[right] + guessed[right].int().argmax(dim=1)

    def _keep_guesses(self, fp: ForwardPass, rows: torch.Tensor, packed: torch.Tensor) -> None:
        """Write the stashed keys and values of the right guesses (packed indices) to their rows' next slot."""
        stashed = torch.cumsum(fp.stash.long(), 0) - 1  # packed index -> stash index
        index, slots = stashed[packed], self.cache.lengths[rows]
        for layer, (keys, values) in fp.stashed.items():
            self.cache.write_tokens(layer, rows, slots, keys[index], values[index])

    def _raw_step(self, rows: torch.Tensor, logits: torch.Tensor, first: bool) -> torch.Tensor:
        """The raw results of ``rows`` (their token now sits in the cache): unsteered top-1/top-2, the
        gate (not on a row's first step); rows past the gate run trials next. Returns ``[N]`` bool, the rows
        whose step ends here."""
        self.cache.lengths[rows] += 1
        probs = torch.softmax(logits, dim=-1)
        top = probs.topk(max(2, MAX_GUESSES), dim=-1)
        self.raw_token[rows], self.out_token[rows] = top.indices[:, 0], top.indices[:, 0]
        self.top1[rows], self.top2[rows] = top.values[:, 0], top.values[:, 1]
        self.trials[rows], self.layers[rows] = 0, 0
        steerable = self.steerable[rows]
        skipped = steerable & (top.values[:, 1] < self.config.beta * top.values[:, 0]) & (not first)
        self.gate_skipped[rows] = skipped
        need = steerable & ~skipped if self.sizes else torch.zeros_like(steerable)
        if bool(need.any()):
            if self.raw_probs.shape[1] == 0:
                self.raw_probs = torch.zeros(len(self.token), probs.shape[-1], device=probs.device)
            self.raw_probs[rows[need]] = probs[need]
            self.candidates[rows[need]] = top.indices[need, :MAX_GUESSES]
            plausible = top.values[need, :MAX_GUESSES] > self.config.beta * top.values[need, :1]
            self.plausible[rows[need]] = plausible.sum(dim=1)
            self.next_trial[rows[need]] = 0  # their next pass runs the trials
        ends = torch.zeros_like(self.steerable)
        ends[rows[~need]] = True
        return ends

    def _emit(self, rows: torch.Tensor) -> torch.Tensor:
        """Record the finished steps of ``rows`` and feed their tokens back. Returns ``[N]`` bool, the
        rows that are done (end of sequence or ``max_new_tokens``)."""
        done = torch.zeros_like(self.steerable)
        if rows.numel() == 0:
            return done
        token = self.out_token[rows]
        record = torch.stack(
            [self.raw_token[rows].double(), self.top1[rows].double(), self.top2[rows].double(),
             self.gate_skipped[rows].double(), self.trials[rows].double(), self.layers[rows].double(), token.double()],
            dim=1,
        )  # fmt: skip
        self.records.append((self.order[rows].cpu(), record.cpu()))
        self.token[rows] = token
        self.emitted[rows] += 1
        stop = torch.isin(token, self.engine.eos)
        finished = stop | (self.emitted[rows] >= self.config.max_new_tokens)
        for row, stopped in zip(self.order[rows[finished]].tolist(), stop[finished].tolist()):
            self.finished[row] = "stop" if stopped else "length"
        done[rows[finished]] = True
        return done

    def _drop(self, keep: torch.Tensor) -> None:
        """Keep only the rows ``keep`` (one copy per event, so later passes stop paying for the rest)."""
        self.cache.keep_rows(keep)
        for name in _ROW_STATE:
            setattr(self, name, getattr(self, name)[keep])

    def _rows_to_rank(self) -> torch.Tensor | None:
        """Rows without a given ranking (on the first pass every row is still active)."""
        missing = [row for row, r in enumerate(self.requests) if self.rankings[row] is None and r.span]
        for row, ranking in enumerate(self.rankings):
            if ranking is not None:
                self.rank_of[row] = torch.argsort(torch.tensor(ranking, device=self.engine.device))
        return torch.tensor(missing, dtype=torch.long, device=self.engine.device) if missing else None

    def _rank(self, rows: torch.Tensor, raw: AttentionCapture) -> None:
        """One pass with one probe per layer for each row in ``rows``; stores their layer order."""
        engine, num_layers = self.engine, self.engine.num_layers
        steer = torch.eye(num_layers, dtype=torch.bool, device=rows.device).expand(len(rows), -1, -1)
        # the raw pass has written the token's slot; each probe reads the slots before it
        slots = (self.cache.lengths[rows] - 1).repeat_interleave(num_layers)
        probe = ForwardPass(self.cache, rows=rows, variants=num_layers, slots=slots, steer=steer)
        raw_pre, raw_post = ([t[0, rows, None] for t in captured] for captured in (raw.pre, raw.post))
        probes = Sensitivity(raw_pre, raw_post)
        with AttentionCapture(on_layer=probes.add).recording(engine.model):
            positions = slots - self.cache.pad[rows].repeat_interleave(num_layers)
            engine.forward(self.token[rows].repeat_interleave(num_layers), positions, probe, logits=False)
        # a probe that sees none of the scaled keys in its layer (all outside a sliding window, or the span
        # is the current token alone) computes exactly the raw pass: give it exactly the raw pass's score,
        # so such layers tie as they do in the reference, whatever the rounding of the batched products
        unsteered = Sensitivity(raw_pre, raw_post)
        for layer in range(num_layers):
            unsteered.add(layer, raw_pre[layer], raw_post[layer])
        reached = torch.stack([probe.reaches[layer][:, layer] for layer in range(num_layers)], dim=1)
        order = rank_layers(torch.where(reached, probes.scores(), unsteered.scores()))
        self.rank_of[rows] = torch.argsort(order, dim=-1)
        for row, ranking in zip(rows.tolist(), order.tolist()):
            self.rankings[row] = ranking

    def _results(self) -> list[Generation]:
        per_row: list[list[StepTelemetry]] = [[] for _ in self.requests]
        for order, record in self.records:
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
