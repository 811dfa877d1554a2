"""The one configuration object that travels from the command line to the engine and the actors."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from typing import Literal

Method = Literal["directer", "zero-shot"]
TrialSchedule = Literal["auto", "lazy", "batched"]
METHODS: tuple[str, ...] = ("directer", "zero-shot")


@dataclass(frozen=True)
class SteeringConfig:
    """Decoding and steering settings; the defaults are the paper's.

    alpha: factor applied to the attention keys of the instruction tokens.
    beta: plausibility threshold; a steered token is kept only when the unsteered model gives it
        more than ``beta`` times the probability of its own top-1 token.
    max_trials: steered passes allowed per step before falling back to the unsteered token.
    trial_schedule: ``batched`` runs all remaining trials of a step as variants of one pass; ``lazy``
        one trial per pass; ``auto`` is the engine's choice, ``batched`` (measured faster on a CPU in
        BENCHMARKS.md; memory-bound GPU decoding favours it further). All give the same tokens.
    """

    method: Method = "directer"
    alpha: float = 100.0
    beta: float = 0.5
    max_trials: int = 10
    max_new_tokens: int = 256
    trial_schedule: TrialSchedule = "auto"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must lie in [0, 1], got {self.beta}")
        if self.max_trials < 1:
            raise ValueError(f"max_trials must be at least 1, got {self.max_trials}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.trial_schedule not in ("auto", "lazy", "batched"):
            raise ValueError(f"trial_schedule must be auto, lazy or batched, got {self.trial_schedule!r}")

    @property
    def steers(self) -> bool:
        return self.method == "directer"

    def with_(self, **changes: object) -> SteeringConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def fingerprint(self) -> str:
        """Short stable hash of the fields that change tokens (the trial schedule does not)."""
        fields = {k: v for k, v in self.to_dict().items() if k != "trial_schedule"}
        if not self.steers:
            fields = {"method": self.method, "max_new_tokens": self.max_new_tokens}
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]
