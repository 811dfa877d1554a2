"""Planning one packed pass: which tokens each active row brings, at which slots, steered in which layers.

Each row starting a step brings its raw token. Each row whose step passed the gate brings its trial
variants (one or all remaining, by the trial schedule) and, when they settle the step, one
speculative next raw token for every token the step could emit (their keys and values are stashed,
not written; the one emitted is kept). What the pass's logits decide is the engine's business.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from directer.cache import KVCache
from directer.config import TrialSchedule
from directer.passes import ForwardPass, Kernel
from directer.row_state import RowState


@dataclass
class PassPlan:
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


def trial_chunk(schedule: TrialSchedule, remaining: torch.Tensor) -> torch.Tensor:
    """How many of its remaining trials each trial row runs in this pass: one (``lazy``) or all
    (``batched``, and ``auto``: a few more tokens cost a CPU or GPU pass little, a pass saved costs a
    whole one; BENCHMARKS.md)."""
    return torch.ones_like(remaining) if schedule == "lazy" else remaining


def plan_pass(
    state: RowState, cache: KVCache, layer_sets: list[int], schedule: TrialSchedule, key_scale: float, kernel: Kernel
) -> PassPlan:
    """The packed tokens of the next pass of every active row."""
    device = state.token.device
    num_layers = state.rank_of.shape[1]
    raw = state.next_trial < 0
    if bool(raw.all()):  # every row starts a step (zero-shot, and most passes): one raw token each
        slots = cache.lengths.clone()
        fp = ForwardPass(cache, slots=slots, write=torch.ones_like(raw), kernel=kernel)
        rows = torch.arange(len(raw), device=device)
        return PassPlan(
            raw_rows=rows, trial_rows=rows[:0], chunk=None, guesses=None, sizes=None, starts=rows,
            tokens=state.token.clone(), positions=slots - cache.pad, fp=fp,
        )  # fmt: skip
    raw_rows, trial_rows = raw.nonzero().squeeze(1), (~raw).nonzero().squeeze(1)
    counts = torch.ones_like(state.token)
    chunk = guesses = sizes = steer = stash = None
    if trial_rows.numel():
        remaining = len(layer_sets) - state.next_trial[trial_rows]
        chunk = trial_chunk(schedule, remaining)
        guesses = torch.where(chunk == remaining, state.plausible[trial_rows], 0)
        counts[trial_rows] = chunk + guesses
    width = int(counts.max())
    cells = torch.arange(width, device=device)[None, :]
    valid = cells < counts[:, None]  # [N, W]: row r's tokens in cells 0..counts[r]-1
    tokens = state.token[:, None].expand(-1, width).clone()
    slots = cache.lengths[:, None].expand(-1, width).clone()  # raw tokens go to the next free slot
    write = raw[:, None] & (cells == 0)
    if chunk is not None:
        # trial cells 0..chunk-1 hold the step's token at its slot; cells chunk.., the guesses
        variant = cells < chunk[:, None]
        slots[trial_rows] -= variant.long()
        guess = (cells - chunk[:, None]).clamp(0, state.candidates.shape[1] - 1)
        tokens[trial_rows] = torch.where(variant, tokens[trial_rows], state.candidates[trial_rows].gather(1, guess))
        stash = torch.zeros_like(write)
        stash[trial_rows] = ~variant
        tried = (state.next_trial[trial_rows, None] + cells).clamp(max=len(layer_sets) - 1)
        sizes = torch.tensor(layer_sets, device=device)[tried]  # [R, W]: layers each variant steers
        steer = torch.zeros(len(counts), width, num_layers, dtype=torch.bool, device=device)
        steer[trial_rows] = (state.rank_of[trial_rows][:, None, :] < sizes[:, :, None]) & variant[:, :, None]
    packed_slots = slots[valid]
    fp = ForwardPass(
        cache, variants=width if bool(valid.all()) else counts, slots=packed_slots, write=write[valid],
        stash=None if stash is None else stash[valid], steer=steer, key_scale=key_scale, kernel=kernel,
    )  # fmt: skip
    return PassPlan(
        raw_rows=raw_rows, trial_rows=trial_rows, chunk=chunk, guesses=guesses, sizes=sizes,
        starts=torch.cumsum(counts, 0) - counts, tokens=tokens[valid],
        positions=packed_slots - cache.pad.repeat_interleave(counts), fp=fp,
    )  # fmt: skip
