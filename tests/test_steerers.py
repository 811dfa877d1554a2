"""The steering contract: a method defined here, in one class and one registry line, decodes through
``Directer.generate`` and the Ray pipeline with no change to the engine."""

from __future__ import annotations

import json
import sys

import pyarrow.dataset as pads
import pytest
import ray.cloudpickle
import torch
from conftest import tiny_model
from transformers import DynamicCache

from directer import STEERERS, Directer, Steerer, SteeringConfig, register_steerer
from directer.engine import Engine, Request
from directer.reference import copy_cache, forward, rank_layers, reference_generate
from directer.steering import DirecterSteerer
from pipeline.config import GenerateConfig
from pipeline.run import generate

MAX_NEW = 12


class AllLayersOnce(Steerer):
    """One trial over every layer, kept when plausible: Directer with one trial, and no ranking."""

    name = "all-layers-once"
    steers = True
    fields = ("alpha", "beta")

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


def test_a_method_that_does_not_say_it_steers_decodes_as_zero_shot(monkeypatch):
    """``steers`` is the one answer to "does this method steer": the report takes a method without it for
    the baseline, so the engine runs none of its layer sets either."""
    model = tiny_model("qwen3", seed=3)
    monkeypatch.setattr(AllLayersOnce, "steers", False)
    requests = [Request(list(range(5, 25)), list(range(8, 14)))]
    unsaid = Engine(model, [1], 0).generate(requests, SteeringConfig(method="all-layers-once", max_new_tokens=MAX_NEW))
    plain = Engine(model, [1], 0).generate(requests, SteeringConfig(method="zero-shot", max_new_tokens=MAX_NEW))
    assert unsaid[0].token_ids == plain[0].token_ids
    assert not any(step.trials or step.layers for step in unsaid[0].telemetry)


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


@torch.inference_mode()
def static_reference(model, prompt_ids, span, config: SteeringConfig, gate: bool, eos=(1,)) -> list[tuple]:
    """Plain static steering, one prompt: every step the instruction keys scaled by alpha in a fixed layer
    set of an explicit copy of the cache (eager attention), its top-1 emitted; with ``gate`` only when
    ``p_raw[j*] > beta * p_raw[i*]``, else the raw top-1. Returns ``(token, layers, token_raw_prob)`` per step."""
    previous, model.config._attn_implementation = model.config._attn_implementation, "eager"
    try:
        cache, count = DynamicCache(), len(model.get_decoder().layers)
        model(input_ids=torch.tensor([prompt_ids[:-1]]), cache=cache, use_cache=True)
        token, steps, layers = prompt_ids[-1], [], None
        for _ in range(config.max_new_tokens):
            before = copy_cache(cache, set(), span, config.alpha)
            p = torch.softmax(forward(model, token, cache), dim=-1)
            top = torch.topk(p, 2)
            if layers is None:
                order = rank_layers(model, token, before, span, config.alpha, config.ranking)
                layers = set(order[: config.static_layers] if config.static_layers else range(count))
            emitted, used = int(top.indices[0]), 0
            # the gate: when even the second-best token fails the test, only the raw top-1 could pass
            if not (gate and float(top.values[1]) < config.beta * float(top.values[0])):
                steered = int(torch.argmax(forward(model, token, copy_cache(before, layers, span, config.alpha))))
                if not gate or float(p[steered]) > config.beta * float(top.values[0]):
                    emitted, used = steered, len(layers)
            steps.append((emitted, used, float(p[emitted])))
            if emitted in eos:
                break
            token = emitted
        return steps
    finally:
        model.config._attn_implementation = previous


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("static_layers", [0, 3])
def test_static_steering_matches_its_reference(gate, static_layers):
    model = tiny_model("llama", seed=6)
    engine = Engine(model, [1], 0)
    config = SteeringConfig(
        method="static+gate" if gate else "static", static_layers=static_layers, max_new_tokens=MAX_NEW
    )
    requests = [Request(list(range(5, 25)), list(range(8, 14))), Request(list(range(30, 41)), [2, 3, 4])]
    changed = 0
    for request, generation in zip(requests, engine.generate(requests, config)):
        expected = static_reference(model, list(request.prompt_ids), list(request.span), config, gate)
        got = [(s.token, s.layers, s.token_raw_prob) for s in generation.telemetry]
        assert [g[:2] for g in got] == [e[:2] for e in expected]
        assert [g[2] for g in got] == pytest.approx([e[2] for e in expected], rel=1e-4)
        assert (generation.ranking is None) == (static_layers == 0)
        changed += generation.summary.changed
    assert changed > 0


def test_emitted_steered_tokens_pass_the_plausibility_test():
    """With Directer and every gated method, a steered token is emitted only when the unsteered model
    gives it more than beta times its top-1's probability (raw emissions are exempt)."""
    model = tiny_model("gemma3", seed=2)
    engine = Engine(model, [1], 0)
    requests = [Request(list(range(3, 3 + n)), list(range(1, n // 2))) for n in (9, 17, 26)]
    steered = 0
    for method in ("directer", "static+gate"):
        for beta in (0.1, 0.5, 0.9):
            config = SteeringConfig(method=method, beta=beta, max_new_tokens=MAX_NEW)
            for generation in engine.generate(requests, config):
                for step in generation.telemetry:
                    if step.layers > 0:
                        steered += 1
                        assert step.token_raw_prob > beta * step.raw_prob
                    else:
                        assert step.token == step.raw_token and step.token_raw_prob == step.raw_prob
    assert steered > 0
