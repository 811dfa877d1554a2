"""Sampling: the per-row draws, the truncations, and tokens that depend on the seed and the row only."""

from __future__ import annotations

import json

import pyarrow.dataset as pads
import pytest
import torch
from conftest import tiny_model
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from directer import SteeringConfig
from directer.engine import Engine, Request
from directer.sampling import Sampler, row_key, uniforms
from pipeline.config import GenerateConfig
from pipeline.run import generate

MASK = (1 << 64) - 1


def splitmix64(value: int) -> int:
    """The textbook splitmix64 output function on Python integers."""
    value = (value ^ (value >> 30)) * 0xBF58476D1CE4E5B9 & MASK
    value = (value ^ (value >> 27)) * 0x94D049BB133111EB & MASK
    return value ^ (value >> 31)


def test_draws_are_splitmix64_of_key_and_step():
    keys = [row_key(0, "a"), row_key(1, "a"), row_key(0, "b"), -1, 0, (1 << 63) - 1]
    steps = [0, 5, 17, 255, 1, 3]
    got = uniforms(torch.tensor(keys), torch.tensor(steps)).tolist()
    expected = [(splitmix64((k + (s + 1) * 0x9E3779B97F4A7C15) & MASK) >> 11) / 2**53 for k, s in zip(keys, steps)]
    assert got == expected
    assert len(set(keys[:3])) == 3  # seed and id both change the key


def test_sampler_draws_each_token_with_the_probability_transformers_warpers_give_it():
    """Each token is drawn as often as ``generate``'s temperature, top-k and top-p warpers (in that order)
    make it likely: with top_k=2 and top_p=0.7, top-p measures the two kept tokens' renormalised mass, where
    the first has 0.73, and keeps one (it kept both measured on the whole distribution, where it has 0.56)."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    grid = (torch.arange(10_000, dtype=torch.float64) + 0.5) / 10_000  # evenly spaced draws: exact quantiles
    samplers = [Sampler(1.0), Sampler(0.7, top_k=3), Sampler(1.0, top_p=0.8), Sampler(1.0, top_k=2, top_p=0.7)]
    for sampler, kept in zip(samplers, [6, 3, 3, 1]):
        warpers = LogitsProcessorList([TemperatureLogitsWarper(sampler.temperature)])
        if sampler.top_k:
            warpers.append(TopKLogitsWarper(sampler.top_k))
        if sampler.top_p < 1:
            warpers.append(TopPLogitsWarper(sampler.top_p))
        probs = torch.softmax(warpers(torch.zeros(1, 1, dtype=torch.long), logits[None].clone())[0], dim=-1)
        tokens = sampler.choose(logits.expand(len(grid), -1), grid)
        assert sampler.choose(logits.expand(len(grid), 2, -1), grid).tolist() == torch.stack([tokens] * 2, 1).tolist()
        counts = torch.bincount(tokens, minlength=6).double() / len(grid)
        assert torch.allclose(counts, probs.double(), atol=2e-4)
        assert int((counts > 0).sum()) == int((probs > 0).sum()) == kept
    assert Sampler(0.0).choose(logits[None], None).tolist() == [0]


REQUESTS = [
    Request(list(range(5, 25)), list(range(8, 14)), sample_key=row_key(3, "first")),
    Request(list(range(30, 41)), [2, 3, 4], sample_key=row_key(3, "second")),
    Request(list(range(60, 90)), [1, 2, 20, 21], sample_key=row_key(3, "third")),
    Request(list(range(40, 52)), [], sample_key=row_key(3, "fourth")),
]


@pytest.mark.parametrize(
    "method", ["zero-shot", "directer", "static+gate", "pasta+gate", "spotlight", "spotlight+gate"]
)
def test_a_rows_tokens_depend_on_its_seed_and_id_only(method):
    model = tiny_model("llama", seed=7)
    engine = Engine(model, [1], 0)
    config = SteeringConfig(method=method, temperature=1.0, top_p=0.95, max_new_tokens=16, beta=0.3)
    together = engine.generate(REQUESTS, config)
    again = engine.generate(REQUESTS, config)
    alone = [engine.generate([request], config)[0] for request in REQUESTS]
    reversed_ = engine.generate(REQUESTS[::-1], config)[::-1]
    lazy = engine.generate(REQUESTS, config.with_(trial_schedule="lazy"))
    for runs in zip(together, again, alone, reversed_, lazy):
        assert len({tuple(run.token_ids) for run in runs}) == 1
    greedy = engine.generate(REQUESTS, config.with_(temperature=0.0))
    other_seed = [Request(r.prompt_ids, r.span, sample_key=r.sample_key + 1) for r in REQUESTS]
    reseeded = engine.generate(other_seed, config)
    assert [g.token_ids for g in together] != [g.token_ids for g in greedy]
    assert [g.token_ids for g in together] != [g.token_ids for g in reseeded]
    # the gate judges a drawn steered token by the unsteered distribution before temperature and truncation
    if config.steerer.plausible(torch.tensor(0.0), torch.tensor(1.0)).item() is False:
        for generation in together + reseeded:
            for step in generation.telemetry:
                if step.layers > 0:
                    assert step.token_raw_prob > config.beta * step.raw_prob


def test_sampled_rows_are_the_same_across_actor_counts_and_batch_sizes(tmp_path):
    topics = ["rain", "cats", "tea", "maps", "owls"]
    rows = [{"id": f"row-{i}", "prompt": f"Write one sentence about {topic}. Answer in French.",
             "instruction": "Answer in French."} for i, topic in enumerate(topics)]  # fmt: skip
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    steering = SteeringConfig(temperature=0.9, top_k=50, seed=11, max_new_tokens=8)
    outputs = []
    for actors, batch_size in [(1, 5), (2, 2)]:
        output = tmp_path / f"out-{actors}"
        report = generate(GenerateConfig(inputs=(str(source),), output=str(output), steering=steering,
                                         actors=actors, batch_size=batch_size), progress=False)  # fmt: skip
        assert report.ok == len(rows)
        table = pads.dataset(str(output / "data")).to_table().to_pylist()
        outputs.append({row["id"]: row["token_ids"] for row in table})
        assert all('"seed": 11' in row["config"] and '"temperature": 0.9' in row["config"] for row in table)
    assert outputs[0] == outputs[1]
