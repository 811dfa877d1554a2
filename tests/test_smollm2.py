"""The bundled SmolLM2-135M-Instruct on IFEval prompts with their gold spans, against the oracle."""

from __future__ import annotations

import pytest

from directer import Directer, SteeringConfig, build_prompt
from directer.reference import reference_generate

MAX_NEW = 20
PROMPTS = 8


@pytest.fixture(scope="module")
def ifeval_prompts(smollm2, ifeval_rows):
    rows = [row for row in ifeval_rows if row["instruction_spans"]][:PROMPTS]
    return [build_prompt(smollm2.tokenizer, row["prompt"], spans=row["instruction_spans"]) for row in rows]


@pytest.fixture(scope="module")
def steered(smollm2, ifeval_prompts):
    steerer = Directer(smollm2, SteeringConfig(max_new_tokens=MAX_NEW))
    return steerer.complete(ifeval_prompts, steerer.config, batch_size=4)


def test_gold_spans_map_to_instruction_tokens(smollm2, ifeval_prompts, ifeval_rows):
    for prompt in ifeval_prompts:
        assert prompt.span, "every chosen prompt has an instruction"
        steered_text = smollm2.tokenizer.decode([prompt.token_ids[i] for i in prompt.span])
        for start, end in prompt.char_spans:
            assert prompt.text[start:end].strip() in steered_text


def test_engine_matches_oracle(smollm2, ifeval_prompts, steered):
    for prompt, completion in zip(ifeval_prompts, steered):
        expected = reference_generate(
            smollm2.model, prompt.token_ids, prompt.span, max_new_tokens=MAX_NEW, eos_token_ids=smollm2.eos_token_ids
        )
        assert completion.token_ids == expected.token_ids
        assert completion.ranking == expected.ranking
        assert [(s.trials, s.layers) for s in completion.telemetry] == [(s.trials, s.layers) for s in expected.steps]


def test_received_ranking_matches_oracle(smollm2, ifeval_prompts, steered):
    """The authors' ranking (layers by the disturbance they receive) on the same prompts; it orders the
    layers otherwise than the paper's formula."""
    config = SteeringConfig(max_new_tokens=MAX_NEW, ranking="received")
    prompts = ifeval_prompts[:4]
    received = Directer(smollm2, config).complete(prompts, config, batch_size=4)
    for prompt, completion, caused in zip(prompts, received, steered):
        expected = reference_generate(
            smollm2.model, prompt.token_ids, prompt.span, max_new_tokens=MAX_NEW,
            eos_token_ids=smollm2.eos_token_ids, ranking="received",
        )  # fmt: skip
        assert completion.token_ids == expected.token_ids
        assert completion.ranking == expected.ranking != caused.ranking
        assert [(s.trials, s.layers) for s in completion.telemetry] == [(s.trials, s.layers) for s in expected.steps]


def test_telemetry_follows_the_algorithm(steered):
    layer_counts, steps = set(), 0
    for completion in steered:
        assert sorted(completion.ranking) == list(range(30))
        for index, step in enumerate(completion.telemetry):
            steps += 1
            layer_counts.add(step.layers)
            assert step.trials <= 4
            assert step.changed == (step.token != step.raw_token)
            if step.gate_skipped:
                assert index > 0, "the gate is not applied on the first step"
                assert step.token == step.raw_token and step.trials == 0 and step.layers == 0
                assert step.top2_prob < 0.5 * step.raw_prob
            elif step.layers == 0:
                assert step.token == step.raw_token
            else:
                assert step.trials == [30, 15, 7, 3].index(step.layers) + 1
        assert completion.summary.steps == len(completion.token_ids)
    assert layer_counts <= {30, 15, 7, 3, 0}
    assert len(layer_counts) > 1
