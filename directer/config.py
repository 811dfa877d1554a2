"""The one configuration object that travels from the command line to the engine and the actors."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from typing import Literal, get_args

from directer.steering import STEERERS, Steerer, steerer_for

TrialSchedule = Literal["auto", "lazy", "batched"]
Ranking = Literal["caused", "received"]
RANKINGS: tuple[str, ...] = get_args(Ranking)
SpotLightBias = Literal["reference", "exact"]
SPOTLIGHT_BIASES: tuple[str, ...] = get_args(SpotLightBias)


@dataclass(frozen=True)
class SteeringConfig:
    """Decoding and steering settings; the defaults are the paper's.

    method: a registered steering method (:data:`directer.steering.STEERERS`): ``directer``, ``zero-shot``,
        ``static``, ``static+gate``, ``pasta``, ``pasta+gate``, ``spotlight``, ``spotlight+gate``.
    alpha: factor applied to the attention keys of the instruction tokens.
    beta: plausibility threshold; a steered token is kept only when the unsteered model gives it
        more than ``beta`` times the probability of its own top-1 token.
    max_trials: steered passes allowed per step before falling back to the unsteered token.
    ranking: how the layers are ordered for the trials after the first (see :mod:`directer.ranking`):
        ``caused``, the paper's formula (the disturbance steering a layer causes, averaged over the
        layers measured); ``received``, the authors' released code (github.com/mjk0618/directer,
        ``src/generator.py``, ``DirecterGenerator._rank_layers``: the disturbance a layer receives,
        averaged over the single-layer probes), for reproducing the authors' runs.
    static_layers: the layers ``static`` and ``static+gate`` steer: 0, every layer; ``k``, the ``k`` most
        sensitive of the ranking.
    pasta_coef: ``pasta``: the factor on the attention weights of the prompt tokens outside the
        instruction (``log(pasta_coef)`` added to their scores); pastalib's default, 0.01.
    pasta_heads: ``pasta``: JSON ``{"layer": [head, ...]}`` as pastalib's ``head_config``; empty, every
        head of the middle half of the layers (:class:`~directer.steering.PastaSteerer`).
    spotlight_target: ``spotlight``: the attention mass on the instruction it lifts rows to; the
        reference's default, 0.2.
    spotlight_bias: ``spotlight``: ``reference`` (``log(c / p)``, as the reference code) or ``exact``
        (the bias that reaches the target exactly); see :class:`~directer.steering.SpotLightSteerer`.
    temperature: 0 decodes greedily (the default, token-exact with the plain references); above 0
        every method samples (:mod:`directer.sampling`): the raw token and each steered variant are drawn
        with the row's number for the step, and the plausibility test still judges the drawn steered
        token by the unsteered distribution before temperature and truncation.
    top_p, top_k: truncation when sampling (1.0 and 0: none).
    seed: with the row's id, the key of a sampled row's draws.
    trial_schedule: ``batched`` runs all remaining trials of a step as variants of one pass; ``lazy``
        one trial per pass; ``auto`` is the engine's choice, ``batched`` (measured faster on a CPU in
        BENCHMARKS.md; memory-bound GPU decoding favours it further). All give the same tokens.
    """

    method: str = "directer"
    alpha: float = 100.0
    beta: float = 0.5
    max_trials: int = 10
    max_new_tokens: int = 256
    ranking: Ranking = "caused"
    static_layers: int = 0
    pasta_coef: float = 0.01
    pasta_heads: str = ""
    spotlight_target: float = 0.2
    spotlight_bias: SpotLightBias = "reference"
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    trial_schedule: TrialSchedule = "auto"

    def __post_init__(self) -> None:
        if self.method not in STEERERS:
            raise ValueError(f"method must be one of {', '.join(STEERERS)}, got {self.method!r}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must lie in [0, 1], got {self.beta}")
        if self.max_trials < 1:
            raise ValueError(f"max_trials must be at least 1, got {self.max_trials}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.static_layers < 0:
            raise ValueError(f"static_layers must be 0 (every layer) or a layer count, got {self.static_layers}")
        if self.ranking not in RANKINGS:
            raise ValueError(f"ranking must be one of {', '.join(RANKINGS)}, got {self.ranking!r}")
        if not 0.0 < self.pasta_coef <= 1.0:
            raise ValueError(f"pasta_coef must lie in (0, 1], got {self.pasta_coef}")
        if self.pasta_heads:
            _check_head_config(self.pasta_heads)
        if not 0.0 < self.spotlight_target < 1.0:
            raise ValueError(f"spotlight_target must lie in (0, 1), got {self.spotlight_target}")
        if self.spotlight_bias not in SPOTLIGHT_BIASES:
            choices = ", ".join(SPOTLIGHT_BIASES)
            raise ValueError(f"spotlight_bias must be one of {choices}, got {self.spotlight_bias!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be 0 (greedy) or positive, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 (no limit) or positive, got {self.top_k}")
        if self.trial_schedule not in get_args(TrialSchedule):
            raise ValueError(f"trial_schedule must be auto, lazy or batched, got {self.trial_schedule!r}")

    @property
    def steerer(self) -> Steerer:
        """The method's :class:`~directer.steering.Steerer`, configured by this object."""
        return steerer_for(self)

    @property
    def steers(self) -> bool:
        return STEERERS[self.method].steers

    def with_(self, **changes: object) -> SteeringConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def token_fields(self) -> dict[str, object]:
        """The fields that change this method's tokens: the method, the token budget, the fields its
        steerer names (zero-shot: none; the trial schedule never does) and, when sampling, the sampling
        fields (so greedy fingerprints stay those of configs written before sampling existed)."""
        sampling = ("temperature", "top_p", "top_k", "seed") if self.temperature else ()
        names = ("method", "max_new_tokens", *STEERERS[self.method].fields, *sampling)
        return {name: getattr(self, name) for name in names}

    def fingerprint(self) -> str:
        """Short stable hash of :meth:`token_fields`."""
        blob = json.dumps(self.token_fields(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def _check_head_config(text: str) -> None:
    """A PASTA head config: a JSON object, layer (a number, as a string key) -> list of head numbers."""
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"pasta_heads is not JSON ({error})") from None
    if not isinstance(config, dict) or not config:
        raise ValueError('pasta_heads must be a JSON object such as {"3": [17, 7], "8": [28]}')
    for layer, heads in config.items():
        if not str(layer).isdigit():
            raise ValueError(f"pasta_heads: {layer!r} is not a layer number")
        if not isinstance(heads, list) or not heads or not all(isinstance(h, int) and h >= 0 for h in heads):
            raise ValueError(f"pasta_heads: layer {layer} needs a non-empty list of head numbers, got {heads!r}")
