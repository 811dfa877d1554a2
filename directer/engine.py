"""The decoding loop: batched decoding, greedy or sampled (:mod:`directer.sampling`), with a steering
method (:mod:`directer.steering`).

Every row runs the algorithm of the README's "How the engine works" independently:

1. prefill all prompt tokens but the last, joined to the forward of the row's first pass; the last is
   the input of the first step, in that pass;
2. each step: a *raw* pass appends the token's keys/values and gives the unsteered distribution;
   on the first step the layers are ranked once (one batched probe pass, :mod:`directer.ranking`)
   when the method needs an order; unless the method's gate skips the step, steered *trials* over
   the method's layer sets follow, until one emits a token the unsteered model finds plausible or
   the unsteered token is emitted (fallback);
3. stop at any end-of-sequence id or at ``max_new_tokens``; the row's cache row then takes the next
   waiting request (continuous batching), whose prompt joins the next pass, until none waits.

Trials read the cache as it was before the raw pass and never write to it. Rows advance
independently: each forward is one packed pass (:mod:`directer.layout`) in which every row brings
what its step needs next (its raw token, or its trials plus speculative next raw tokens), so nobody
waits for another row's trials. A step can only emit a plausible token, so the pass that settles a
step also runs the next step's raw token for each such candidate and keeps the one emitted.
Zero-shot is the same loop with a method that never steers.

A stream method (PASTA, SpotLight) runs a simpler loop, :meth:`_Decoding._stream_pass`: every row
has a steered copy in the second half of the cache rows, and one pass per step runs both copies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from directer.attention import engine_attention
from directer.cache import KVCache
from directer.config import SteeringConfig
from directer.layout import PassPlan, plan_pass
from directer.passes import ForwardPass, Kernel
from directer.ranking import AttentionCapture, probe_rankings
from directer.row_state import RowState
from directer.sampling import Sampler, uniforms
from directer.telemetry import FinishReason, SteeringSummary, StepTelemetry

KernelChoice = Literal["auto", "sdpa", "matmul"]

# on a CPU, MKL multiplies 8-15 rows by a tall matrix like the output embedding more slowly than 16
# (bundled model: 14.5 ms for 15 rows, 6.9 for 16; other sizes gain nothing; BENCHMARKS.md "Logit
# rows"): logits of that many rows are computed as 16, the padding rows dropped
PADDED_LOGIT_ROWS = range(8, 16)

# most plausible tokens guessed as the next raw token in a settling pass: the emitted token was among
# the first 3 in 98.5% of settled steps on IFEval (BENCHMARKS.md); beyond them, the next raw token
# runs in a pass of its own
MAX_GUESSES = 3


def trial_tokens(layer_sets: list[int], stream: bool, max_guesses: int = MAX_GUESSES) -> int:
    """Tokens a row brings to the pass that settles its step: its steered variants and the guesses of its
    next raw token; 0 for a method without trials (no layer sets, or a stream method's steered copy)."""
    return len(layer_sets) + max_guesses if layer_sets and not stream else 0


@dataclass
class Request:
    """One row to decode: prompt token ids and the token positions of the instruction.

    ``ranking``: a layer order from an earlier run of the same prompt, span, key scale and ranking rule
    (skips the probes). ``sample_key``: the key of the row's draws when sampling
    (:func:`directer.sampling.row_key`).
    """

    prompt_ids: Sequence[int]
    span: Sequence[int] = ()
    ranking: Sequence[int] | None = None
    sample_key: int = 0


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


def check_batch_size(batch_size: int | None) -> None:
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1 (None: chosen), got {batch_size}")


class Engine:
    """Batched steered decoding on one ``transformers`` causal LM.

    kernel: how packed trial and probe passes attend: ``sdpa`` (one fused call, what GPUs want),
        ``matmul`` (the product written out: faster on a CPU for a few queries per row, and what
        models that soft-cap their logits need), or ``auto`` (``sdpa`` off-CPU, ``matmul`` on a CPU).
        Unsteered attention in prefill and raw-only passes uses SDPA whatever the kernel; a stream
        method's steered copy follows it, and SpotLight's (which reads the weights) and a model that
        soft-caps its logits always write the product out. Both kernels give the same tokens up to rounding.
    max_guesses: speculative next raw tokens per settling step (see ``MAX_GUESSES``).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        eos_token_ids: Iterable[int],
        pad_token_id: int = 0,
        *,
        kernel: KernelChoice = "auto",
        max_guesses: int = MAX_GUESSES,
    ) -> None:
        if kernel not in get_args(KernelChoice):
            raise ValueError(f"kernel must be auto, sdpa or matmul, got {kernel!r}")
        if max_guesses < 1:
            raise ValueError(
                f"max_guesses must be at least 1 (a settling pass guesses the next token), got {max_guesses}"
            )
        self.model = model.eval()
        self.eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=model.device)
        self.pad_token_id = pad_token_id
        self.num_layers = model.config.get_text_config().num_hidden_layers
        self.device = model.device
        self.kernel: Kernel = ("matmul" if model.device.type == "cpu" else "sdpa") if kernel == "auto" else kernel
        self.max_guesses = max_guesses

    def generate(
        self, requests: Sequence[Request], config: SteeringConfig, batch_size: int | None = None
    ) -> list[Generation]:
        """Decode ``requests``, at most ``batch_size`` at a time (default all), a finished row's place
        taken by the next request in order; each row gets the tokens it would get alone."""
        check_batch_size(batch_size)
        if not requests:
            return []
        for index, request in enumerate(requests):
            if len(request.prompt_ids) == 0:
                raise ValueError(f"request {index}: empty prompt")
            if any(not 0 <= p < len(request.prompt_ids) for p in request.span):
                raise ValueError(f"request {index}: span positions must lie in [0, {len(request.prompt_ids)})")
        with torch.inference_mode(), engine_attention(self.model), _padded_logit_rows(self.model):
            return _Decoding(self, requests, config, batch_size or len(requests)).run()

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, fp: ForwardPass, logits: bool = True
    ) -> torch.Tensor:
        """Logits ``[T, vocab]`` (float32) of the packed tokens ``[T]`` at ``positions [T]``, but for the
        prompt tokens of a joined prefill (``fp.joined``, packed first), which need none (with
        ``logits=False`` only the last token's: the ranking probes need hidden states only)."""
        out = self.model(
            input_ids=tokens[None],
            position_ids=positions[None],
            use_cache=False,
            logits_to_keep=len(tokens) - fp.joined_tokens if logits else 1,
            directer_pass=fp,
        )
        return out.logits[0].float().to(self.device)


@contextlib.contextmanager
def _padded_logit_rows(model: PreTrainedModel) -> Iterator[None]:
    """On a CPU, the output embedding computes :data:`PADDED_LOGIT_ROWS` rows as 16 for the duration (a
    plain ``nn.Linear`` only: a quantised head or one whose ``forward`` a library hooked keeps its own)."""
    head = model.get_output_embeddings()
    if model.device.type != "cpu" or type(head) is not torch.nn.Linear or "forward" in vars(head):
        yield
        return

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        rows = len(flat)
        if rows in PADDED_LOGIT_ROWS:
            flat = torch.cat([flat, flat.new_zeros(PADDED_LOGIT_ROWS.stop - rows, flat.shape[1])])
        return F.linear(flat, head.weight, head.bias)[:rows].view(*hidden.shape[:-1], -1)

    head.forward = forward
    try:
        yield
    finally:
        del head.forward


@dataclass
class _Prompts:
    """Prompts waiting to be prefilled: active ``rows`` and their left-padded ids ``[R, width]`` for the
    slots from ``first_slot`` on (every row's padding before it, the last prompt token after it)."""

    rows: torch.Tensor
    ids: torch.Tensor
    first_slot: int


class _Decoding:
    """The rows being decoded: the cache, each row's state, and the passes that move them on. Rows
    advance independently. New rows' prompts are prefilled in the forward of their first pass (their
    first raw tokens read them there). A row that finishes hands its cache row to the next waiting
    request (continuous batching: the batch keeps its size until the input runs out); then the batch
    shrinks as rows finish."""

    def __init__(self, engine: Engine, requests: Sequence[Request], config: SteeringConfig, batch_size: int) -> None:
        self.engine, self.requests, self.config = engine, requests, config
        self.steerer = config.steerer
        # every row is left-padded to the longest prompt of all requests, so any may take any cache row
        self.width = max(len(r.prompt_ids) for r in requests)
        # ``steers`` is what the report and the CLI read too (the baseline is the method that does not)
        self.layer_sets = self.steerer.layer_sets(engine.num_layers) if self.steerer.steers else []
        tokens_per_row = trial_tokens(self.layer_sets, self.steerer.stream, engine.max_guesses)
        # a stream method's steered stream: a second copy of every row, the second half of the cache rows
        self.streams = 2 if self.steerer.stream else 1
        self.sampler = Sampler(config.temperature, config.top_p, config.top_k)
        self.rankings: list[list[int] | None] = [None] * len(requests)
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.finished: dict[int, FinishReason] = {}
        first = list(range(min(batch_size, len(requests))))
        self.waiting = list(range(len(first), len(requests)))  # request indices, in the order given
        ids, pad, span, self.state = self._new_rows(first)
        self.cache = KVCache(
            pad.repeat(self.streams), span.repeat(self.streams, 1), self.width + config.max_new_tokens,
            tokens_per_row, prompt_end=self.width,
            span_width=max(len(set(r.span)) for r in requests),
        )  # fmt: skip
        self.prompts: _Prompts | None = None
        self._wait_for_prefill(torch.arange(len(first), device=engine.device), ids, pad)

    def _new_rows(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, RowState]:
        """Requests ``indices`` laid out for the cache: prompt ids ``[n, width]``, left padding, instruction
        slots, and their rows' starting state."""
        device, width, engine = self.engine.device, self.width, self.engine
        requests = [self.requests[i] for i in indices]
        ids = torch.full((len(requests), width), engine.pad_token_id, dtype=torch.long, device=device)
        span = torch.zeros(len(requests), width + self.config.max_new_tokens, dtype=torch.bool, device=device)
        for row, request in enumerate(requests):
            ids[row, width - len(request.prompt_ids) :] = torch.tensor(request.prompt_ids, device=device)
            span[row, [width - len(request.prompt_ids) + p for p in request.span]] = True
        pad = torch.tensor([width - len(r.prompt_ids) for r in requests], device=device)
        # a row without an instruction span has nothing to steer: it decodes as zero-shot
        steerable = torch.tensor([bool(r.span) and bool(self.layer_sets) for r in requests], device=device)
        keys = torch.tensor([r.sample_key for r in requests], dtype=torch.long, device=device)
        order = torch.tensor(indices, dtype=torch.long, device=device)
        state = RowState.start(ids[:, -1], steerable, keys, engine.num_layers, engine.max_guesses, order)
        if self.steerer.ranking is not None:
            for row, (index, request) in enumerate(zip(indices, requests)):
                if request.ranking is not None and request.span:
                    self.rankings[index] = list(request.ranking)
                    state.rank_of[row] = torch.argsort(torch.tensor(request.ranking, device=device))
        return ids, pad, span, state

    def run(self) -> list[Generation]:
        while len(self.state):
            if self.steerer.stream:
                self._stream_pass()
            else:
                self._pass()
        return self._results()

    def _wait_for_prefill(self, rows: torch.Tensor, ids: torch.Tensor, pad: torch.Tensor) -> None:
        """Active ``rows`` (prompt ids ``[R, width]``, left padding ``pad``) are new: their prompts but the
        last token join the next pass (:meth:`_join_prompts`), which their first raw tokens also run in."""
        self.cache.lengths[self._cache_rows(rows)] = self.width - 1
        first_slot = int(pad.min())  # the slots before it are every new row's padding: nothing to compute
        if first_slot < self.width - 1:
            self.prompts = _Prompts(rows, ids[:, first_slot:-1], first_slot)

    def _join_prompts(
        self, tokens: torch.Tensor, positions: torch.Tensor, fp: ForwardPass
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed input of a decoding pass with the waiting prompts joined to it (packed first, as
        ``fp.joined``; :meth:`Engine.forward` computes no logits for them)."""
        prompts, self.prompts = self.prompts, None
        if prompts is not None:
            cache_rows = self._cache_rows(prompts.rows)
            ids = prompts.ids.repeat(self.streams, 1)
            slots = torch.arange(prompts.first_slot, prompts.first_slot + ids.shape[1], device=ids.device)
            fp.joined = ForwardPass(
                self.cache, rows=cache_rows, variants=ids.shape[1], first_slot=prompts.first_slot,
                kernel=fp.kernel, stream=fp.stream,
            )  # fmt: skip
            tokens = torch.cat([ids.flatten(), tokens])
            positions = torch.cat([(slots[None] - self.cache.pad[cache_rows, None]).clamp(min=0).flatten(), positions])
        return tokens, positions

    def _pass(self) -> None:
        """One forward for every active row (see :func:`~directer.layout.plan_pass`), then each row's
        step moves on."""
        engine, steerer = self.engine, self.steerer
        plan = plan_pass(
            self.state, self.cache, self.layer_sets, self.config.trial_schedule, steerer.key_scale, engine.kernel
        )
        tokens, positions = self._join_prompts(plan.tokens, plan.positions, plan.fp)
        probe_rows = self._rows_to_rank(plan.raw_rows)
        capture = None  # rows to rank: their raw tokens' hidden states at every attention block
        if probe_rows is not None:
            capture = AttentionCapture(tokens=plan.starts[probe_rows] + plan.fp.joined_tokens)
        with contextlib.nullcontext() if capture is None else capture.recording(engine.model):
            logits = engine.forward(tokens, positions, plan.fp)
        ends = self._raw_step(plan.raw_rows, logits[plan.starts[plan.raw_rows]])
        if capture is not None:
            self._rank(probe_rows, capture)
        confirmed = guessed = None
        if plan.chunk is not None:
            confirmed, guessed = self._settle_trials(plan, logits, ends)
        done = self._emit(ends.nonzero().squeeze(1))
        if confirmed is not None and confirmed.numel():
            live = ~done[confirmed]
            confirmed, guessed = confirmed[live], guessed[live]
            self._keep_guesses(plan.fp, confirmed, guessed)
            again = self._raw_step(confirmed, logits[guessed])
            done |= self._emit(again.nonzero().squeeze(1))
        self._drop(done)

    def _draws(self, rows: torch.Tensor) -> torch.Tensor | None:
        """The uniform number of each row's current step when sampling (:mod:`directer.sampling`)."""
        return None if self.sampler.greedy else uniforms(self.state.key[rows], self.state.emitted[rows])

    def _stream_pass(self) -> None:
        """One pass of both streams of every active row (a stream method): the raw half gives the
        unsteered distribution, the steered half the method's token, emitted when the steerer finds it
        plausible, else the raw top-1; the step's token then feeds both streams."""
        state, cache, count = self.state, self.cache, len(self.state)
        tokens = state.token.repeat(2)
        write = torch.ones_like(tokens, dtype=torch.bool)
        fp = ForwardPass(
            cache, slots=cache.lengths.clone(), write=write, kernel=self.engine.kernel, stream=self.steerer
        )
        logits = self.engine.forward(*self._join_prompts(tokens, cache.lengths - cache.pad, fp), fp)
        cache.lengths += 1
        probs = torch.softmax(logits[:count], dim=-1)
        top = probs.topk(2, dim=-1)
        draws = self._draws(torch.arange(count, device=tokens.device))
        raw_token = self.sampler.choose(logits[:count], draws)
        steered = self.sampler.choose(logits[count:], draws)
        steered_prob = probs.gather(1, steered[:, None])[:, 0]
        accepted = state.steerable & self.steerer.plausible(steered_prob, top.values[:, 0])
        state.raw_token, state.top1, state.top2 = raw_token, top.values[:, 0], top.values[:, 1]
        state.gate_skipped[:] = False
        state.trials = state.steerable.long()
        state.layers = torch.where(accepted, self.layer_sets[0], 0)
        state.out_token = torch.where(accepted, steered, state.raw_token)
        state.out_prob = torch.where(accepted, steered_prob, probs.gather(1, raw_token[:, None])[:, 0])
        self._drop(self._emit(torch.arange(count, device=tokens.device)))

    def _drop(self, done: torch.Tensor) -> None:
        """The rows that are ``done`` take the next waiting requests; once none waits, their cache rows
        (both streams' for a stream method) are freed."""
        if not bool(done.any()):
            return
        if self.waiting:
            taken = done.nonzero().squeeze(1)[: len(self.waiting)]
            indices, self.waiting = self.waiting[: len(taken)], self.waiting[len(taken) :]
            self._admit(taken, indices)
            done = done.clone()
            done[taken] = False
        if bool(done.any()):
            keep = (~done).nonzero().squeeze(1)
            self.cache.keep_rows(self._cache_rows(keep))
            self.state.keep(keep)  # rows just admitted are the first done ones: their numbers stay

    def _cache_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The cache rows of active ``rows``: for a stream method, also their steered copies."""
        return torch.cat([rows, rows + len(self.state)]) if self.steerer.stream else rows

    def _admit(self, rows: torch.Tensor, indices: list[int]) -> None:
        """Active ``rows`` start over as requests ``indices``; their prompts join the next pass."""
        ids, pad, span, state = self._new_rows(indices)
        self.cache.admit(self._cache_rows(rows), pad.repeat(self.streams), span.repeat(self.streams, 1))
        self.state.admit(rows, state)
        self._wait_for_prefill(rows, ids, pad)

    def _settle_trials(
        self, plan: PassPlan, logits: torch.Tensor, ends: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Trial rows keep their first variant whose token the steerer finds plausible; rows out of trials
        fall back to the unsteered token. Marks settled steps in ``ends``; returns the rows that guessed
        the token their step emitted, and the packed index of that guess."""
        state = self.state
        rows, chunk, sizes = plan.trial_rows, plan.chunk, plan.sizes
        cells = torch.arange(sizes.shape[1], device=rows.device)[None, :]
        variant_cells = torch.minimum(cells, chunk[:, None] - 1)
        steered = self.sampler.choose(logits[plan.starts[rows, None] + variant_cells], self._draws(rows))
        steered_probs = state.raw_probs[rows].gather(1, steered)
        accepted = self.steerer.plausible(steered_probs, state.top1[rows, None])
        accepted &= cells < chunk[:, None]
        won = accepted.any(dim=1)
        pick = accepted.int().argmax(dim=1)
        state.trials[rows] += torch.where(won, pick + 1, chunk)
        state.out_token[rows[won]] = steered[won, pick[won]]
        state.out_prob[rows[won]] = steered_probs[won, pick[won]]
        state.layers[rows[won]] = sizes[won, pick[won]]
        state.next_trial[rows] += chunk
        settled = won | (state.next_trial[rows] >= len(self.layer_sets))
        state.next_trial[rows[settled]] = -1
        ends[rows[settled]] = True
        guessed = state.candidates[rows] == state.out_token[rows, None]
        guessed &= torch.arange(guessed.shape[1], device=rows.device)[None, :] < plan.guesses[:, None]
        right = guessed.any(dim=1)
        return rows[right], plan.starts[rows[right]] + chunk[right] + guessed[right].int().argmax(dim=1)

    def _keep_guesses(self, fp: ForwardPass, rows: torch.Tensor, packed: torch.Tensor) -> None:
        """Write the stashed keys and values of the right guesses (packed indices) to their rows' next slot."""
        stashed = torch.cumsum(fp.stash.long(), 0) - 1  # packed index -> stash index
        index, slots = stashed[packed], self.cache.lengths[rows]
        for layer, (keys, values) in fp.stashed.items():
            here = index.to(keys.device)
            self.cache.write_tokens(layer, rows, slots, keys[here], values[here])

    def _raw_step(self, rows: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The raw results of ``rows`` (their token now sits in the cache): unsteered top-1/top-2, the
        steerer's gate; rows past the gate run trials next. Returns ``[N]`` bool, the rows whose step
        ends here."""
        state, steerer = self.state, self.steerer
        self.cache.lengths[rows] += 1
        probs = torch.softmax(logits, dim=-1)
        guesses = state.candidates.shape[1]
        top = probs.topk(max(2, guesses), dim=-1)
        raw_token = top.indices[:, 0] if self.sampler.greedy else self.sampler.choose(logits, self._draws(rows))
        state.raw_token[rows], state.out_token[rows] = raw_token, raw_token
        state.top1[rows], state.top2[rows] = top.values[:, 0], top.values[:, 1]
        state.out_prob[rows] = probs.gather(1, raw_token[:, None])[:, 0]
        state.trials[rows], state.layers[rows] = 0, 0
        steerable = state.steerable[rows]
        ends = torch.zeros_like(state.steerable)
        if not bool(steerable.any()):  # zero-shot, rows without a span: every step ends here
            state.gate_skipped[rows] = False
            ends[rows] = True
            return ends
        # no steered token can be emitted when even the second-best raw token is not plausible
        first = state.emitted[rows] == 0
        gated = first.new_tensor([steerer.gated(False), steerer.gated(True)])[first.long()]
        skipped = steerable & ~steerer.plausible(top.values[:, 1], top.values[:, 0]) & gated
        state.gate_skipped[rows] = skipped
        need = steerable & ~skipped
        if bool(need.any()):
            state.store_raw_probs(rows[need], probs[need])
            state.candidates[rows[need]] = top.indices[need, :guesses]
            plausible = steerer.plausible(top.values[need, :guesses], top.values[need, :1])
            state.plausible[rows[need]] = plausible.sum(dim=1)
            state.next_trial[rows[need]] = 0  # their next pass runs the trials
        ends[rows[~need]] = True
        return ends

    def _emit(self, rows: torch.Tensor) -> torch.Tensor:
        """Record the finished steps of ``rows`` and feed their tokens back. Returns ``[N]`` bool, the
        rows that are done (end of sequence or ``max_new_tokens``)."""
        state = self.state
        done = torch.zeros_like(state.steerable)
        if rows.numel() == 0:
            return done
        token = state.out_token[rows]
        record = torch.stack(
            [state.raw_token[rows].double(), state.top1[rows].double(), state.top2[rows].double(),
             state.gate_skipped[rows].double(), state.trials[rows].double(), state.layers[rows].double(),
             token.double(), state.out_prob[rows].double()],
            dim=1,
        )  # fmt: skip
        self.records.append((state.order[rows].cpu(), record.cpu()))
        state.token[rows] = token
        state.emitted[rows] += 1
        stop = torch.isin(token, self.engine.eos)
        finished = stop | (state.emitted[rows] >= self.config.max_new_tokens)
        for row, stopped in zip(state.order[rows[finished]].tolist(), stop[finished].tolist()):
            self.finished[row] = "stop" if stopped else "length"
        done[rows[finished]] = True
        return done

    def _rows_to_rank(self, raw_rows: torch.Tensor) -> torch.Tensor | None:
        """Rows that need the probes in this pass: the method orders layers, and the row runs its first
        step here, has a span and no given ranking."""
        if self.steerer.ranking is None:
            return None
        state = self.state
        first = raw_rows[state.steerable[raw_rows] & (state.emitted[raw_rows] == 0)]
        missing = [
            row for row, index in zip(first.tolist(), state.order[first].tolist()) if self.rankings[index] is None
        ]
        return torch.tensor(missing, dtype=torch.long, device=self.engine.device) if missing else None

    def _rank(self, rows: torch.Tensor, raw: AttentionCapture) -> None:
        """Rank the layers of ``rows`` from their raw pass (``raw``: its record of their tokens)."""
        engine = self.engine
        order = probe_rankings(
            engine.forward, engine.model, self.cache, rows, self.state.token[rows], raw,
            self.steerer.key_scale, self.steerer.ranking, engine.kernel,
        )  # fmt: skip
        self.state.rank_of[rows] = torch.argsort(order, dim=-1)
        for index, ranking in zip(self.state.order[rows].tolist(), order.tolist()):
            self.rankings[index] = ranking

    def _results(self) -> list[Generation]:
        per_row: list[list[StepTelemetry]] = [[] for _ in self.requests]
        for order, record in self.records:
            for row, values in zip(order.tolist(), record.tolist()):
                raw, p1, p2, skipped, trials, layers, token, token_prob = values
                per_row[row].append(
                    StepTelemetry(
                        raw_token=int(raw),
                        raw_prob=p1,
                        top2_prob=p2,
                        gate_skipped=bool(skipped),
                        trials=int(trials),
                        layers=int(layers),
                        token=int(token),
                        token_raw_prob=token_prob,
                        changed=int(token) != int(raw),
                    )
                )
        return [
            Generation(
                token_ids=[s.token for s in steps],
                finish_reason=self.finished[row],
                telemetry=steps,
                ranking=self.rankings[row],
                ranking_reused=self.rankings[row] is not None and self.requests[row].ranking is not None,
            )
            for row, steps in enumerate(per_row)
        ]
