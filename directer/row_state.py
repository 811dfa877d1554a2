"""The decoding loop's per-row state: one tensor entry per active cache row, kept and dropped together."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class RowState:
    """Where each active row stands. Index ``i`` is the ``i``-th active row; :meth:`keep` compacts them
    all when rows finish (the cache is compacted alongside)."""

    order: torch.Tensor  # original row of each active row
    key: torch.Tensor  # the key of the row's draws when sampling (:mod:`directer.sampling`)
    token: torch.Tensor  # input of the row's next pass
    emitted: torch.Tensor  # tokens emitted so far
    steerable: torch.Tensor  # bool: has a span and a method that steers
    next_trial: torch.Tensor  # index into the layer sets of the row's next trial; -1: its next pass is raw
    rank_of: torch.Tensor  # [N, L] layer -> its rank in the row's layer order
    raw_probs: torch.Tensor  # [N, vocab] once some row runs trials, else [N, 0]
    candidates: torch.Tensor  # [N, guesses] most probable raw tokens, first first
    plausible: torch.Tensor  # how many of ``candidates`` the step could emit
    # the current step: its raw pass, then its trials
    raw_token: torch.Tensor
    top1: torch.Tensor
    top2: torch.Tensor
    gate_skipped: torch.Tensor
    trials: torch.Tensor
    layers: torch.Tensor
    out_token: torch.Tensor
    out_prob: torch.Tensor  # raw probability of ``out_token``

    @classmethod
    def start(
        cls,
        last_tokens: torch.Tensor,
        steerable: torch.Tensor,
        keys: torch.Tensor,
        num_layers: int,
        guesses: int,
        order: torch.Tensor,
    ) -> RowState:
        """Rows (requests ``order``) about to run their first step on ``last_tokens`` (each prompt's last token)."""
        count, device = len(last_tokens), last_tokens.device

        def zeros(dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.zeros(count, dtype=dtype, device=device)

        return cls(
            order=order,
            key=keys,
            token=last_tokens.clone(),
            emitted=zeros(),
            steerable=steerable,
            next_trial=zeros() - 1,
            rank_of=torch.arange(num_layers, device=device).expand(count, -1).clone(),
            raw_probs=torch.zeros(count, 0, device=device),
            candidates=torch.zeros(count, guesses, dtype=torch.long, device=device),
            plausible=zeros(),
            raw_token=zeros(),
            top1=zeros(torch.float32),
            top2=zeros(torch.float32),
            gate_skipped=zeros(torch.bool),
            trials=zeros(),
            layers=zeros(),
            out_token=zeros(),
            out_prob=zeros(torch.float32),
        )

    def __len__(self) -> int:
        return len(self.order)

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (one copy per event, so later passes stop paying for the rest)."""
        for item in fields(self):
            setattr(self, item.name, getattr(self, item.name)[rows])

    def admit(self, rows: torch.Tensor, new: RowState) -> None:
        """Rows ``rows`` start over as the rows of ``new`` (continuous batching)."""
        for item in fields(self):
            if item.name == "raw_probs":
                if self.raw_probs.shape[1]:
                    self.raw_probs[rows] = 0.0
                continue
            getattr(self, item.name)[rows] = getattr(new, item.name)

    def store_raw_probs(self, rows: torch.Tensor, probs: torch.Tensor) -> None:
        """Keep the raw distribution of rows that run trials (allocated when the first one does)."""
        if self.raw_probs.shape[1] == 0:
            self.raw_probs = torch.zeros(len(self), probs.shape[-1], device=probs.device)
        self.raw_probs[rows] = probs
