"""The steering contract: a method defined here, in one class and one registry line, decodes through
``Directer.generate`` and the Ray pipeline with no change to the engine."""

from __future__ import annotations

import json
import sys

import pyarrow.dataset as pads
import pytest
import ray.cloudpickle
from conftest import tiny_model

from directer import STEERERS, Directer, Steerer, SteeringConfig, register_steerer
from directer.engine import Engine, Request
from directer.reference import reference_generate
from directer.steering import DirecterSteerer
from pipeline.config import GenerateConfig
from pipeline.run import generate

MAX_NEW = 12


class AllLayersOnce(Steerer):
    """One trial over every layer, kept when plausible: Directer with one trial, and no ranking."""

    name = "all-layers-once"
    steers = True
    fields = ("alpha", "beta")

    @property
    def key_scale(self) -> float:
        return self.config.alpha

    def layer_sets(self, num_layers: int) -> list[int]:
        return [num_layers]

    def gated(self, first_step: bool) -> bool:
        return not first_step

    def plausible(self, probs, top1):
        return probs > self.config.beta * top1


register_steerer(AllLayersOnce)
# the pipeline's actors cannot import tests/: the class travels by value (a user's installed package would not)
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_registry_names_the_methods_and_validates_the_config():
    assert {"zero-shot", "directer", "all-layers-once"} <= set(STEERERS)
    assert isinstance(SteeringConfig(method="all-layers-once").steerer, AllLayersOnce)
    assert isinstance(SteeringConfig().steerer, DirecterSteerer)
    with pytest.raises(ValueError, match="method must be one of"):
        SteeringConfig(method="no-such-method")
    # the fingerprint covers the fields that change a method's tokens, and only those
    config = SteeringConfig(method="all-layers-once")
    assert config.fingerprint() != config.with_(alpha=50.0).fingerprint()
    assert config.fingerprint() == config.with_(max_trials=3, ranking="received").fingerprint()


def test_a_method_defined_outside_the_engine_decodes_as_its_oracle():
    model = tiny_model("qwen3", seed=3)
    engine = Engine(model, [1], 0)
    requests = [Request(list(range(5, 25)), list(range(8, 14))), Request(list(range(30, 41)), [2, 3, 4])]
    generations = engine.generate(requests, SteeringConfig(method="all-layers-once", max_new_tokens=MAX_NEW))
    steered = 0
    for request, generation in zip(requests, generations):
        expected = reference_generate(
            model, list(request.prompt_ids), list(request.span), max_trials=1, max_new_tokens=MAX_NEW,
            eos_token_ids=(1,),
        )  # fmt: skip
        assert generation.token_ids == expected.token_ids
        assert generation.ranking is None  # no probes ran
        got = [(s.gate_skipped, s.trials, s.layers) for s in generation.telemetry]
        assert got == [(s.gate_skipped, s.trials, s.layers) for s in expected.steps]
        steered += generation.summary.steered
    assert steered > 0


def test_a_method_defined_outside_the_engine_runs_through_the_api_and_the_pipeline(smollm2, tmp_path):
    rows = [
        {"id": "sea", "prompt": "Write a haiku about the sea. Answer in all capital letters.",
         "instruction": "Answer in all capital letters."},
        {"id": "tea", "prompt": "Describe tea. Use exactly two sentences.",
         "instruction": "Use exactly two sentences."},
    ]  # fmt: skip
    config = SteeringConfig(method="all-layers-once", max_new_tokens=MAX_NEW)
    steerer = Directer(smollm2, config)
    direct = steerer.generate([(r["prompt"], r["instruction"]) for r in rows])
    assert all(c.method == "all-layers-once" and c.ranking is None for c in direct)
    assert sum(c.summary.steered for c in direct) > 0

    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = generate(GenerateConfig(inputs=(str(source),), output=str(tmp_path / "out"), steering=config, actors=1),
                      progress=False)  # fmt: skip
    assert report.ok == 2
    written = {r["id"]: r for r in pads.dataset(str(tmp_path / "out" / "data")).to_table().to_pylist()}
    for row, completion in zip(rows, direct):
        assert written[row["id"]]["method"] == "all-layers-once"
        assert written[row["id"]]["token_ids"] == completion.token_ids
