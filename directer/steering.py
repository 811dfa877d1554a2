"""Steering methods behind one contract, registered by name (as ``transformers``' logits processors are).

The engine owns the batch: rows, caches, packed passes, speculation. At every step of every row it
runs the raw pass and then asks the row's :class:`Steerer`:

- :meth:`~Steerer.layer_sets`: the steered variants the row may run, in the order tried, each the
  ``k`` first layers of the ranking (empty: the method never steers);
- :attr:`~Steerer.ranking`: the layer order those sets need, computed once per row by the probes of
  :mod:`directer.ranking` (``None``: no probes; the sets then take the lowest layers);
- :meth:`~Steerer.plausible`: which tokens a step may emit, judged by the unsteered distribution;
  the first variant whose top-1 token is plausible is emitted, else the raw top-1 (fallback);
- :meth:`~Steerer.gated`: whether a step whose second-best raw token is not plausible skips its
  variants (no steered token could then be emitted: it is exact, not a heuristic);
- :attr:`~Steerer.key_scale`: what a steered layer changes in attention, the factor on the keys of
  the instruction tokens (``alpha`` unless a method says otherwise).

A method is one subclass and one :func:`register_steerer` line; ``SteeringConfig.method`` is validated
against the registry, and the pipeline, evaluation, report and CLI ask the registry, never a name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch

    from directer.config import Ranking, SteeringConfig


class Steerer:
    """Zero-shot decoding: no variant, every step emits the raw top-1. Subclasses steer."""

    name: ClassVar[str] = "zero-shot"
    #: whether the method steers rows that have an instruction span
    steers: ClassVar[bool] = False
    #: the ``SteeringConfig`` fields that change this method's tokens (besides ``max_new_tokens``)
    fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: SteeringConfig) -> None:
        self.config = config

    @property
    def ranking(self) -> Ranking | None:
        return None

    @property
    def key_scale(self) -> float:
        return self.config.alpha

    def layer_sets(self, num_layers: int) -> list[int]:
        return []

    def gated(self, first_step: bool) -> bool:
        return False

    def plausible(self, probs: torch.Tensor, top1: torch.Tensor) -> torch.Tensor:
        """Bool, broadcast: whether tokens of raw probability ``probs`` may be emitted at a step whose raw
        top-1 has probability ``top1``. By default every token: the first variant is always emitted."""
        return (probs >= 0) | (top1 >= 0)


class DirecterSteerer(Steerer):
    """Dynamic rejection steering (the paper): all layers, then the most sensitive half, quarter, ...
    until the steered token is plausible, ``p[j*] > beta * p[i*]``; the gate from the second step on
    (the first step runs the ranking probes)."""

    name = "directer"
    steers = True
    fields = ("alpha", "beta", "max_trials", "ranking")

    @property
    def ranking(self) -> Ranking:
        return self.config.ranking

    def layer_sets(self, num_layers: int) -> list[int]:
        return trial_sizes(num_layers, self.config.max_trials)

    def gated(self, first_step: bool) -> bool:
        return not first_step

    def plausible(self, probs: torch.Tensor, top1: torch.Tensor) -> torch.Tensor:
        return probs > self.config.beta * top1


class StaticSteerer(Steerer):
    """The instruction keys scaled by ``alpha`` in one fixed layer set at every step, its token emitted
    whatever the unsteered model thinks of it: the oversteering baseline. ``static_layers`` 0 steers
    every layer; ``k`` the ``k`` most sensitive layers of the ranking."""

    name = "static"
    steers = True
    fields = ("alpha", "static_layers", "ranking")

    @property
    def ranking(self) -> Ranking | None:
        return self.config.ranking if self.config.static_layers else None

    def layer_sets(self, num_layers: int) -> list[int]:
        return [min(self.config.static_layers or num_layers, num_layers)]


class StaticGateSteerer(StaticSteerer):
    """``static`` under the paper's plausibility filter: one steered pass, whose token is emitted when
    ``p[j*] > beta * p[i*]``, else the unsteered token (no weakening: halving the layer set over the
    ranking would be Directer itself). The gate applies from the first step (it is exact)."""

    name = "static+gate"
    fields = (*StaticSteerer.fields, "beta")

    plausible = DirecterSteerer.plausible  # the paper's test, p[j*] > beta * p[i*]

    def gated(self, first_step: bool) -> bool:
        return True


def trial_sizes(num_layers: int, max_trials: int) -> list[int]:
    """Layer-set sizes tried in order: L, L//2, L//4, ... while more than one layer and trials remain."""
    sizes, size, trial = [], num_layers, 1
    while trial <= max_trials and size > 1:
        sizes.append(size)
        size = max(1, num_layers // 2**trial)
        trial += 1
    return sizes


STEERERS: dict[str, type[Steerer]] = {}


def register_steerer(steerer: type[Steerer]) -> type[Steerer]:
    """Make a method selectable by its ``name`` (usable as a class decorator)."""
    STEERERS[steerer.name] = steerer
    return steerer


def steerer_for(config: SteeringConfig) -> Steerer:
    return STEERERS[config.method](config)


register_steerer(Steerer)
register_steerer(DirecterSteerer)
register_steerer(StaticSteerer)
register_steerer(StaticGateSteerer)
