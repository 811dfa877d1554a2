"""What decoding reports: per-step telemetry, per-row summaries, and one definition of every count.

The pipeline builds its Arrow columns from these dataclasses (``metadata["arrow"]`` names a narrower
type than the default for a field), so a field added here reaches the output files by itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Literal

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class StepTelemetry:
    """What happened at one decoding step of one row (``layers == 0``: no steered token emitted).

    raw_token: the unsteered token (its top-1, or its draw when sampling); raw_prob, top2_prob: the
    unsteered top-1's probability and the second-best's (the gate's inputs).
    trials: steered variants tried, counted as the sequential loop of DESIGN.md counts them (up to and
    including the accepted one; a batched schedule may compute more in the same pass);
    layers: the layer count of the one emitted (0: none was).
    token, token_raw_prob: the emitted token and its unsteered probability.
    """

    raw_token: int
    raw_prob: float
    top2_prob: float
    gate_skipped: bool
    trials: int = field(metadata={"arrow": "int8"})
    layers: int = field(metadata={"arrow": "int16"})
    token: int
    token_raw_prob: float
    changed: bool

    @property
    def steered(self) -> bool:
        """A steered token was emitted (it may equal the raw top-1)."""
        return self.layers > 0

    @property
    def fell_back(self) -> bool:
        """Steered variants were tried and none was plausible: the raw token was emitted."""
        return self.trials > 0 and self.layers == 0


@dataclass(frozen=True)
class SteeringSummary:
    """Counts over a row's steps (or, through :meth:`total`, over many rows)."""

    steps: int
    steered: int
    changed: int
    gate_skips: int
    fallbacks: int
    trials: int
    mean_layers: float

    @classmethod
    def of(cls, steps: Sequence[StepTelemetry]) -> SteeringSummary:
        steered = [s.layers for s in steps if s.steered]
        return cls(
            steps=len(steps),
            steered=len(steered),
            changed=sum(s.changed for s in steps),
            gate_skips=sum(s.gate_skipped for s in steps),
            fallbacks=sum(s.fell_back for s in steps),
            trials=sum(s.trials for s in steps),
            mean_layers=sum(steered) / len(steered) if steered else 0.0,
        )

    @classmethod
    def total(cls, summaries: Iterable[SteeringSummary | dict]) -> SteeringSummary:
        """The summary of all their steps together (summaries as objects or as their dicts)."""
        parts = [s if isinstance(s, SteeringSummary) else cls(**s) for s in summaries]
        steered = sum(s.steered for s in parts)
        return cls(
            steps=sum(s.steps for s in parts),
            steered=steered,
            changed=sum(s.changed for s in parts),
            gate_skips=sum(s.gate_skips for s in parts),
            fallbacks=sum(s.fallbacks for s in parts),
            trials=sum(s.trials for s in parts),
            mean_layers=sum(s.mean_layers * s.steered for s in parts) / steered if steered else 0.0,
        )

    def shares(self) -> dict[str, float]:
        """Each count per step."""
        steps = self.steps or 1
        return {
            "steered_share": self.steered / steps,
            "changed_share": self.changed / steps,
            "gate_skip_share": self.gate_skips / steps,
            "fallback_share": self.fallbacks / steps,
            "steered_passes_per_step": self.trials / steps,
        }


def arrow_fields(cls: type) -> list[tuple[str, str]]:
    """``(name, Arrow type alias)`` of each field of a telemetry dataclass."""
    defaults = {"int": "int32", "float": "float32", "bool": "bool"}
    return [(f.name, f.metadata.get("arrow", defaults[str(f.type)])) for f in fields(cls)]
