"""The engine against the plain per-prompt oracle on tiny random models of six architectures."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import ARCHITECTURES, tiny_model

from directer.config import SteeringConfig
from directer.engine import Engine, Request, _padded_logit_rows
from directer.reference import reference_generate
from directer.steering import STEERERS, trial_sizes

MAX_NEW = 16


def random_requests(count: int, seed: int) -> list[Request]:
    """Prompts of different lengths (longer than the sliding windows) with spans in different places."""
    rng = random.Random(seed)
    requests = []
    for _ in range(count):
        length = rng.randint(3, 30)
        ids = [rng.randint(3, 127) for _ in range(length)]
        start = rng.randint(0, length - 2)
        requests.append(Request(ids, list(range(start, rng.randint(start + 1, length)))))
    return requests


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch_model(request):
    return request.param, tiny_model(request.param)


def oracle(model, request: Request, eos=(1,), **kwargs):
    return reference_generate(
        model, list(request.prompt_ids), list(request.span), max_new_tokens=MAX_NEW, eos_token_ids=eos, **kwargs
    )


def assert_matches(generation, expected):
    assert generation.token_ids == expected.token_ids
    assert generation.ranking == expected.ranking
    got = [(s.raw_token, s.gate_skipped, s.trials, s.layers, s.token) for s in generation.telemetry]
    want = [(s.raw_token, s.gate_skipped, s.trials, s.layers, s.token) for s in expected.steps]
    assert got == want


@pytest.mark.parametrize("schedule", ["lazy", "batched"])
def test_batch_of_one_matches_oracle(arch_model, schedule):
    _, model = arch_model
    engine = Engine(model, [1], 0)
    for request in random_requests(3, seed=11):
        (generation,) = engine.generate([request], SteeringConfig(max_new_tokens=MAX_NEW, trial_schedule=schedule))
        assert_matches(generation, oracle(model, request))


@pytest.mark.parametrize("schedule", ["lazy", "batched"])
def test_padded_batch_matches_oracle(arch_model, schedule):
    _, model = arch_model
    engine = Engine(model, [1], 0)
    requests = random_requests(5, seed=3)
    generations = engine.generate(requests, SteeringConfig(max_new_tokens=MAX_NEW, trial_schedule=schedule))
    steered = 0
    for request, generation in zip(requests, generations):
        assert_matches(generation, oracle(model, request))
        steered += generation.summary.steered
    assert steered > 0, "the test prompts should exercise accepted steering"


def test_received_ranking_matches_oracle(arch_model):
    """The authors' ranking through the padded batch: tokens, telemetry and order as the oracle's, and an
    order unlike the paper's formula for some prompt (else this test could not tell them apart)."""
    _, model = arch_model
    engine = Engine(model, [1], 0)
    requests = random_requests(4, seed=5)
    config = SteeringConfig(max_new_tokens=MAX_NEW, ranking="received")
    generations = engine.generate(requests, config)
    caused = engine.generate(requests, config.with_(ranking="caused"))
    for request, generation in zip(requests, generations):
        assert_matches(generation, oracle(model, request, ranking="received"))
    assert any(g.ranking != c.ranking for g, c in zip(generations, caused))


def test_rows_stop_at_eos_independently(arch_model):
    """EOS ids taken from a first run make rows stop at different steps (and leave the batch)."""
    _, model = arch_model
    engine = Engine(model, [1], 0)
    requests = random_requests(5, seed=5)
    first = engine.generate(requests, SteeringConfig(max_new_tokens=MAX_NEW))
    eos = (first[0].token_ids[3], first[2].token_ids[6])
    engine = Engine(model, eos, 0)
    generations = engine.generate(requests, SteeringConfig(max_new_tokens=MAX_NEW))
    assert any(g.finish_reason == "stop" for g in generations)
    assert len({len(g.token_ids) for g in generations}) > 1
    for request, generation in zip(requests, generations):
        assert_matches(generation, oracle(model, request, eos=eos))
        assert (generation.finish_reason == "stop") == (generation.token_ids[-1] in eos)


def test_zero_shot_equals_transformers_generate(arch_model):
    _, model = arch_model
    engine = Engine(model, [1], 0)
    requests = random_requests(4, seed=7)
    generations = engine.generate(requests, SteeringConfig(method="zero-shot", max_new_tokens=MAX_NEW))
    for request, generation in zip(requests, generations):
        ids = torch.tensor([list(request.prompt_ids)])
        expected = model.generate(ids, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=1, pad_token_id=0)
        assert generation.token_ids == expected[0, ids.shape[1] :].tolist()
        assert generation.ranking is None
        assert all(s.trials == 0 and not s.changed for s in generation.telemetry)


def test_batch_gives_each_row_its_tokens_alone():
    model = tiny_model("llama", seed=4)
    engine = Engine(model, [1], 0)
    requests = random_requests(6, seed=9)
    config = SteeringConfig(max_new_tokens=MAX_NEW)
    together = engine.generate(requests, config)
    for request, generation in zip(requests, together):
        (alone,) = engine.generate([request], config)
        assert alone.token_ids == generation.token_ids
        discrete = [(s.raw_token, s.gate_skipped, s.trials, s.layers, s.token) for s in generation.telemetry]
        assert [(s.raw_token, s.gate_skipped, s.trials, s.layers, s.token) for s in alone.telemetry] == discrete
        assert [s.raw_prob for s in alone.telemetry] == pytest.approx(
            [s.raw_prob for s in generation.telemetry], rel=1e-4
        )


def test_settling_pass_runs_the_next_raw_token_of_every_plausible_token():
    """A step that passes the gate costs one trial pass: it can only emit a token the unsteered model
    finds plausible, and the pass that settles it has run the next raw token of each, so no separate
    raw pass follows (here every plausible token is guessed; by default the most probable few)."""
    model = tiny_model("llama", seed=5)
    engine = Engine(model, [1], 0, max_guesses=128)  # the tiny models' vocabulary
    forwards = []
    handle = model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    try:
        changed = 0
        for request in random_requests(4, seed=12):
            forwards.clear()
            (generation,) = engine.generate([request], SteeringConfig(max_new_tokens=MAX_NEW, trial_schedule="batched"))
            steps = generation.telemetry
            trial_steps = sum(s.trials > 0 for s in steps)
            folded = sum(s.trials > 0 for s in steps[:-1])
            # the prefill runs in the first step's raw pass; the probes in a pass of their own
            assert len(forwards) == 1 + len(steps) + trial_steps - folded
            assert_matches(generation, oracle(model, request))
            changed += sum(s.trials > 0 and s.changed for s in steps[:-1])
    finally:
        handle.remove()
    assert changed > 0, "the test prompts should fold steps whose steered token differs from the unsteered one"


def test_probes_that_see_no_scaled_key_tie_in_layer_order(arch_model):
    """A span that is only the prompt's last token is the first step's own token, which no probe scales:
    every probe computes the raw pass, all layers tie, and the ranking is the layer order, as in the
    reference (however the batched products round)."""
    _, model = arch_model
    request = Request(list(range(3, 20)), [16])
    (generation,) = Engine(model, [1], 0).generate([request], SteeringConfig(max_new_tokens=MAX_NEW))
    assert generation.ranking == list(range(model.config.num_hidden_layers))
    assert_matches(generation, oracle(model, request))


def test_given_ranking_skips_probes_and_keeps_tokens():
    model = tiny_model("qwen3", seed=2)
    engine = Engine(model, [1], 0)
    requests = random_requests(3, seed=1)
    config = SteeringConfig(max_new_tokens=MAX_NEW)
    computed = engine.generate(requests, config)
    reused = engine.generate([Request(r.prompt_ids, r.span, g.ranking) for r, g in zip(requests, computed)], config)
    for a, b in zip(computed, reused):
        assert not a.ranking_reused and b.ranking_reused
        assert a.token_ids == b.token_ids and a.ranking == b.ranking
        assert [(s.gate_skipped, s.trials, s.layers) for s in a.telemetry] == [
            (s.gate_skipped, s.trials, s.layers) for s in b.telemetry
        ]


def test_rows_without_a_span_decode_as_zero_shot_beside_steered_rows():
    model = tiny_model("gemma2", seed=3)
    engine = Engine(model, [1], 0)
    requests = random_requests(4, seed=8)
    mixed = [requests[0], Request(requests[1].prompt_ids), requests[2], Request(requests[3].prompt_ids)]
    generations = engine.generate(mixed, SteeringConfig(max_new_tokens=MAX_NEW))
    plain = engine.generate(mixed, SteeringConfig(method="zero-shot", max_new_tokens=MAX_NEW))
    for index in (1, 3):
        assert generations[index].token_ids == plain[index].token_ids
        assert generations[index].ranking is None
        assert all(s.trials == 0 and not s.gate_skipped for s in generations[index].telemetry)
    for index in (0, 2):
        assert_matches(generations[index], oracle(model, mixed[index]))


def test_alpha_one_is_zero_shot():
    """Scaling keys by 1 steers nothing: every trial reproduces the raw token."""
    model = tiny_model("mistral", seed=6)
    engine = Engine(model, [1], 0)
    requests = random_requests(3, seed=2)
    steered = engine.generate(requests, SteeringConfig(alpha=1.0, max_new_tokens=MAX_NEW))
    plain = engine.generate(requests, SteeringConfig(method="zero-shot", max_new_tokens=MAX_NEW))
    assert [g.token_ids for g in steered] == [g.token_ids for g in plain]


def test_trial_sizes_halve_to_fallback():
    assert trial_sizes(30, 10) == [30, 15, 7, 3]
    assert trial_sizes(8, 10) == [8, 4, 2]
    assert trial_sizes(30, 2) == [30, 15]
    assert trial_sizes(1, 10) == []


def test_bad_requests_are_rejected():
    engine = Engine(tiny_model("llama"), [1], 0)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate([Request([])], SteeringConfig())
    with pytest.raises(ValueError, match="span positions"):
        engine.generate([Request([5, 6, 7], [3])], SteeringConfig())
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        engine.generate([Request([5, 6, 7], [1])], SteeringConfig(), batch_size=0)
    with pytest.raises(ValueError, match="max_guesses must be at least 1"):
        Engine(tiny_model("llama"), [1], 0, max_guesses=0)


@pytest.mark.parametrize("kernel", ["sdpa", "matmul"])
def test_both_attention_kernels_match_oracle(arch_model, kernel):
    """The fused SDPA branch that GPUs take for packed trial and probe passes, run here on a CPU, and the
    written-out product: token-exact against the oracle in fp32."""
    _, model = arch_model
    engine = Engine(model, [1], 0, kernel=kernel)
    requests = random_requests(4, seed=21)
    for request, generation in zip(requests, engine.generate(requests, SteeringConfig(max_new_tokens=MAX_NEW))):
        assert_matches(generation, oracle(model, request))


def test_the_kernel_is_chosen_by_device():
    model = tiny_model("llama")
    assert Engine(model, [1]).kernel == "matmul"  # on a CPU
    assert Engine(model, [1], kernel="sdpa").kernel == "sdpa"
    with pytest.raises(ValueError, match="kernel must be"):
        Engine(model, [1], kernel="flash")


@pytest.mark.parametrize("kernel", ["sdpa", "matmul"])
def test_bf16_decodes_through_both_kernels(kernel):
    """bf16, as GPUs run it, through the fused branch too: every row decodes and follows the algorithm's
    bookkeeping. Its tokens agree with a bf16 reference about as often as zero-shot's do (rounding of a
    batched, padded pass; ``benchmarks/attention_kernels.py`` and BENCHMARKS.md measure it), so they are
    not compared."""
    model = tiny_model("qwen3", seed=1).to(torch.bfloat16)
    requests = random_requests(4, seed=2)
    generations = Engine(model, [1], 0, kernel=kernel).generate(requests, SteeringConfig(max_new_tokens=MAX_NEW))
    sizes = trial_sizes(model.config.num_hidden_layers, 10)
    for generation in generations:
        assert 0 < len(generation.token_ids) <= MAX_NEW and sorted(generation.ranking) == list(range(8))
        for step in generation.telemetry:
            assert step.changed == (step.token != step.raw_token)
            assert step.layers == 0 or step.trials == sizes.index(step.layers) + 1
    assert sum(g.summary.steered for g in generations) > 0


@pytest.mark.parametrize("architecture", ["llama", "gemma2"])
@pytest.mark.parametrize("method", sorted(STEERERS))
def test_continuous_batching_gives_each_row_its_tokens_alone(architecture, method):
    """Two cache rows for seven requests of different lengths: each finished row's place is taken by the
    next request (its prompt prefilled in its first pass, its layers ranked at its own first step), and
    every row gets exactly what it gets alone: tokens, telemetry and ranking."""
    engine = Engine(tiny_model(architecture, seed=5), [1], 0)
    requests = random_requests(7, seed=11)
    config = SteeringConfig(method=method, max_new_tokens=MAX_NEW, static_layers=3 if "static" in method else 0)
    rolling = engine.generate(requests, config, batch_size=2)
    for request, generation in zip(requests, rolling):
        (alone,) = engine.generate([request], config)
        assert generation.token_ids == alone.token_ids
        assert generation.ranking == alone.ranking
        steps = [(s.raw_token, s.gate_skipped, s.trials, s.layers, s.token) for s in generation.telemetry]
        assert steps == [(s.raw_token, s.gate_skipped, s.trials, s.layers, s.token) for s in alone.telemetry]


def test_cpu_logits_of_8_to_15_rows_are_computed_as_16_and_the_head_is_restored():
    model = tiny_model("llama")
    head = model.get_output_embeddings()
    calls: list[int] = []
    handle = torch.nn.functional.linear

    def counting(x, weight, bias=None):
        calls.append(x.reshape(-1, x.shape[-1]).shape[0])
        return handle(x, weight, bias)

    hidden = torch.randn(1, 11, head.in_features)
    torch.nn.functional.linear = counting
    try:
        with _padded_logit_rows(model):
            padded = head(hidden)
            head(hidden[:, :4])  # outside the band: as is
    finally:
        torch.nn.functional.linear = handle
    assert calls == [16, 4]
    assert padded.shape == (1, 11, head.out_features)
    torch.testing.assert_close(padded, handle(hidden, head.weight, head.bias))
    assert "forward" not in vars(head)
    # a head whose forward a library replaced (offloading hooks) keeps it
    hooked = lambda x: handle(x, head.weight)  # noqa: E731
    head.forward = hooked
    with _padded_logit_rows(model):
        assert head.forward is hooked
    assert head.forward is hooked


def test_engine_attention_routes_the_language_layers_and_restores_every_sub_config():
    """A vision-language config whose towers chose different attention: the engine's attention takes the
    language layers only, and each sub-config gets its own choice back (setting the top-level one alone
    would write it into all of them)."""
    from types import SimpleNamespace

    from transformers import Gemma3Config

    from directer.attention import ATTENTION_NAME, engine_attention

    config = Gemma3Config()
    config._attn_implementation = {"": "sdpa", "text_config": "sdpa", "vision_config": "eager"}
    with engine_attention(SimpleNamespace(config=config)):
        assert config.text_config._attn_implementation == ATTENTION_NAME
        assert config.vision_config._attn_implementation == "eager"
    assert (config._attn_implementation, config.text_config._attn_implementation) == ("sdpa", "sdpa")
    assert config.vision_config._attn_implementation == "eager"
