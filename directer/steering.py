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

A method whose steering shapes the cache from the prompt on (PASTA, SpotLight) sets ``stream``: each
row then decodes a second, *steered* stream with a cache of its own beside the raw one, both fed the
emitted token; its attention scores get :meth:`~Steerer.score_bias` in every pass, prefill
included, and its top-1 is the step's one variant (``layer_sets`` has one entry, the layers it edits).

A method is one subclass and one :func:`register_steerer` line; ``SteeringConfig.method`` is validated
against the registry, and the pipeline, evaluation, report and CLI ask the registry, never a name.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch

    from directer.config import Ranking, SteeringConfig


@dataclass
class KeyRoles:
    """What the keys and queries of one attention call of the steered stream are.

    instruction: ``[N, K]`` bool, keys of instruction tokens.
    prompt: ``[N, K]`` bool, keys of prompt tokens (not padding, not generated tokens).
    queries: ``[N, P]`` bool, real queries (not padding: the prefill's left-padded rows).
    num_heads: query heads of the layer.
    """

    instruction: torch.Tensor
    prompt: torch.Tensor
    queries: torch.Tensor
    num_heads: int


class Steerer:
    """Zero-shot decoding: no variant, every step emits the raw top-1. Subclasses steer."""

    name: ClassVar[str] = "zero-shot"
    #: whether the method steers rows that have an instruction span: without it the engine runs no
    #: variant whatever :meth:`layer_sets` gives, and the report takes the method for the baseline
    steers: ClassVar[bool] = False
    #: the ``SteeringConfig`` fields that change this method's tokens (besides ``max_new_tokens``)
    fields: ClassVar[tuple[str, ...]] = ()
    #: whether the method decodes a steered stream with a cache of its own (see the module docstring)
    stream: ClassVar[bool] = False
    #: whether :meth:`score_bias` reads the pass's attention weights (the written-out attention path)
    needs_weights: ClassVar[bool] = False

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

    def score_bias(self, layer: int, roles: KeyRoles, weights: torch.Tensor | None) -> torch.Tensor | None:
        """Stream methods: the additive bias on the steered stream's attention scores ``[N, heads, P, K]``
        (after any soft-cap) in ``layer``, broadcastable to them; ``None`` leaves the layer as it is.
        ``weights``: the layer's unbiased attention weights, given when ``needs_weights``."""
        return None


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


class PastaSteerer(Steerer):
    """PASTA (Zhang et al., 2024; reference code: the ``pastalib`` package): in the heads of
    ``pasta_heads``, the scores of every prompt token outside the instruction get ``log(pasta_coef)``, for
    every query, prefill included; generated tokens are not down-weighted. With several instruction
    spans, what lies outside their union is down-weighted once (pastalib's loop over spans would also
    down-weight each span by the others). Its token is always emitted."""

    name = "pasta"
    steers = True
    stream = True
    fields = ("pasta_coef", "pasta_heads")

    def head_config(self, num_layers: int) -> dict[int, list[int] | None]:
        """Layer -> steered heads (``None``: every head). Default: every head of the middle half of the
        layers, ``[L // 4, L // 4 + L // 2)``: PASTA profiles its heads on a validation set per task, and
        without such a profile this is a documented default, not a tuned choice."""
        if not self.config.pasta_heads:
            start = num_layers // 4
            return dict.fromkeys(range(start, start + max(1, num_layers // 2)))
        config = {int(layer): sorted(set(heads)) for layer, heads in json.loads(self.config.pasta_heads).items()}
        if bad := [layer for layer in config if not 0 <= layer < num_layers]:
            raise ValueError(f"pasta_heads: layer {bad[0]} is not a layer of this model (0..{num_layers - 1})")
        return config

    def layer_sets(self, num_layers: int) -> list[int]:
        self._heads = self.head_config(num_layers)  # the engine asks for the layer sets before any pass
        return [len(self._heads)]

    def score_bias(self, layer: int, roles: KeyRoles, weights: torch.Tensor | None) -> torch.Tensor | None:
        if layer not in self._heads:
            return None
        outside = roles.prompt & ~roles.instruction & roles.instruction.any(dim=1, keepdim=True)  # [N, K]
        bias = outside[:, None, None, :] * math.log(self.config.pasta_coef)  # [N, 1, 1, K]
        heads = self._heads[layer]
        if heads is None:
            return bias
        num_heads = roles.num_heads
        if heads[-1] >= num_heads or heads[0] < 0:
            raise ValueError(f"pasta_heads: layer {layer} has heads 0..{num_heads - 1}, got {heads}")
        chosen = bias.new_zeros(num_heads, 1, 1)
        chosen[heads] = 1
        return bias * chosen


class SpotLightSteerer(Steerer):
    """SpotLight (Venkateswaran & Contractor, 2025; reference code: IBM's agent-lifecycle-toolkit,
    ``SpotLightComponent``): in every layer and pass, prefill included, the attention mass ``p`` on the
    instruction tokens, pooled over heads and (real) queries per row; when ``p`` is below the target
    ``c = spotlight_target`` (reference default 0.2), the instruction's scores get a bias, the same for
    every head and query. ``spotlight_bias="reference"``: ``log(c / p)``, as the reference adds, which
    lifts the mass only to ``c / (1 + c - p)``; ``"exact"``: ``log(c (1 - p) / (p (1 - c)))``, which
    lifts it to ``c``. At ``p = 0`` (the instruction is out of every query's sight, or its weights
    underflow) no bias is added (the reference's ``log(c / 0)`` would make the attention NaN). Its token
    is always emitted."""

    name = "spotlight"
    steers = True
    stream = True
    needs_weights = True
    fields = ("spotlight_target", "spotlight_bias")

    def layer_sets(self, num_layers: int) -> list[int]:
        return [num_layers]

    def score_bias(self, layer: int, roles: KeyRoles, weights: torch.Tensor | None) -> torch.Tensor | None:
        target = self.config.spotlight_target
        queries = roles.queries[:, None, :, None]  # [N, 1, P, 1]
        on_span = (weights * (roles.instruction[:, None, None, :] & queries)).sum(dim=(1, 2, 3))
        p = on_span / (weights.shape[1] * roles.queries.sum(dim=1))  # [N]
        low = (p > 0) & (p < target)
        p = p.where(low, target / 2)  # any value in (0, 1): the bias is masked off outside ``low``
        if self.config.spotlight_bias == "exact":
            bias = (target * (1 - p) / (p * (1 - target))).log()
        else:
            bias = (target / p).log()
        bias = bias.where(low, 0.0)
        return (bias[:, None, None, None] * roles.instruction[:, None, None, :]).to(weights.dtype)


class PastaGateSteerer(PastaSteerer):
    """``pasta`` under the paper's plausibility filter: its token is emitted when ``p[j*] > beta * p[i*]``
    under the raw stream, else the raw token."""

    name = "pasta+gate"
    fields = (*PastaSteerer.fields, "beta")
    plausible = DirecterSteerer.plausible


class SpotLightGateSteerer(SpotLightSteerer):
    """``spotlight`` under the paper's plausibility filter (see :class:`PastaGateSteerer`)."""

    name = "spotlight+gate"
    fields = (*SpotLightSteerer.fields, "beta")
    plausible = DirecterSteerer.plausible


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
register_steerer(PastaSteerer)
register_steerer(PastaGateSteerer)
register_steerer(SpotLightSteerer)
register_steerer(SpotLightGateSteerer)
