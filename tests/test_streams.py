"""PASTA and SpotLight (stream methods) and their ``+gate`` variants against a plain per-prompt reference
written here from the papers and reference code: one prompt at a time, two ``DynamicCache``s (raw and
steered), eager attention with explicit masks and the method's edit of the scores."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import ARCHITECTURES, tiny_model
from transformers import AttentionInterface, DynamicCache

from directer import SteeringConfig
from directer.engine import Engine, Request

MAX_NEW = 10
EDIT: dict[str, object] = {}  # "scores": the active edit of the reference's attention, or absent


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                        softcap=None, **kwargs):  # fmt: skip
    """Eager attention for one unpadded prompt: causal (and sliding-window) mask built here, soft-cap,
    then the active edit of the scores."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = query @ key.transpose(2, 3) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    queries, keys = scores.shape[-2:]
    query_pos = torch.arange(keys - queries, keys)[:, None]
    key_pos = torch.arange(keys)[None, :]
    visible = key_pos <= query_pos
    if sliding_window is not None:
        visible &= query_pos - key_pos < sliding_window
    scores = scores.masked_fill(~visible, float("-inf"))
    if "scores" in EDIT:
        scores = EDIT["scores"](module.layer_idx, scores)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return (probs @ value).transpose(1, 2).contiguous(), probs


AttentionInterface.register("test_reference", reference_attention)


def pasta_edit(heads: dict[int, list[int] | None], prompt_len: int, span: list[int], coef: float):
    """PASTA: ``log(coef)`` on the scores of prompt tokens outside the span, in the chosen heads."""

    def edit(layer, scores):
        if layer not in heads or not span:
            return scores
        outside = torch.zeros(scores.shape[-1], dtype=torch.bool)
        outside[:prompt_len] = True
        outside[span] = False
        chosen = list(range(scores.shape[1])) if heads[layer] is None else heads[layer]
        scores = scores.clone()
        scores[:, chosen] += outside.float() * math.log(coef)
        return scores

    return edit


def spotlight_edit(span: list[int], target: float, exact: bool):
    """SpotLight: the mass on the span pooled over heads and queries; below the target, a bias on the span."""

    def edit(layer, scores):
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32)
        p = float(weights[..., span].sum() / weights.sum())
        if not 0 < p < target:
            return scores
        bias = math.log(target * (1 - p) / (p * (1 - target))) if exact else math.log(target / p)
        scores = scores.clone()
        scores[..., span] += bias
        return scores

    return edit


def forward(model, ids: list[int], cache: DynamicCache, edit=None) -> torch.Tensor:
    if edit is not None:
        EDIT["scores"] = edit
    try:
        out = model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True)
    finally:
        EDIT.pop("scores", None)
    return out.logits[0, -1].float()


@torch.inference_mode()
def stream_reference(model, prompt_ids, span, edit, *, gate_beta=None, max_new_tokens=MAX_NEW, eos=(1,)):
    """Tokens and per-step (raw token, steered emitted) of a stream method on one prompt."""
    previous = model.config._attn_implementation
    model.config._attn_implementation = "test_reference"
    try:
        raw, steered = DynamicCache(), DynamicCache()
        if len(prompt_ids) > 1:
            forward(model, prompt_ids[:-1], raw)
            forward(model, prompt_ids[:-1], steered, edit if span else None)
        token, tokens, steps = prompt_ids[-1], [], []
        for _ in range(max_new_tokens):
            p = torch.softmax(forward(model, [token], raw), dim=-1)
            z = forward(model, [token], steered, edit if span else None)
            i_star, j_star = int(p.argmax()), int(z.argmax())
            keep = bool(span) and (gate_beta is None or float(p[j_star]) > gate_beta * float(p[i_star]))
            token = j_star if keep else i_star
            tokens.append(token)
            steps.append((i_star, keep, float(p[token])))
            if token in eos:
                break
        return tokens, steps
    finally:
        model.config._attn_implementation = previous


REQUESTS = [
    Request(list(range(5, 25)), list(range(8, 14))),
    Request(list(range(30, 41)), [2, 3, 4]),
    Request(list(range(60, 90)), [1, 2, 20, 21, 22]),  # two spans
    Request(list(range(40, 52)), []),  # nothing to steer: zero-shot
]


def check_against_reference(model, config: SteeringConfig, edit_for, gate_beta=None, kernel="auto"):
    num_layers = model.config.num_hidden_layers
    generations = Engine(model, [1], 0, kernel=kernel).generate(REQUESTS, config)
    changed = 0
    for request, generation in zip(REQUESTS, generations):
        prompt, span = list(request.prompt_ids), list(request.span)
        tokens, steps = stream_reference(model, prompt, span, edit_for(len(prompt), span), gate_beta=gate_beta)
        assert generation.token_ids == tokens
        telemetry = generation.telemetry
        assert [s.raw_token for s in telemetry] == [raw for raw, _, _ in steps]
        assert [s.layers > 0 for s in telemetry] == [kept for _, kept, _ in steps]
        assert all(s.layers in (0, config.steerer.layer_sets(num_layers)[0]) for s in telemetry)
        assert [s.token_raw_prob for s in telemetry] == pytest.approx([p for _, _, p in steps], rel=1e-4, abs=1e-6)
        changed += sum(s.changed for s in telemetry)
    return changed


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("kernel", ["matmul", "sdpa"])  # sdpa: the bias joins the fused call's mask, as on a GPU
def test_pasta_matches_reference(architecture, kernel):
    model = tiny_model(architecture, seed=4)
    heads = {2: [1, 3], 5: None}
    config = SteeringConfig(method="pasta", pasta_heads=json.dumps({"2": [3, 1], "5": [0, 1, 2, 3]}),
                            max_new_tokens=MAX_NEW)  # fmt: skip
    heads[5] = [0, 1, 2, 3]
    changed = check_against_reference(model, config, lambda n, span: pasta_edit(heads, n, span, 0.01), kernel=kernel)
    assert changed > 0  # steering changed some token


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("bias", ["reference", "exact"])
def test_spotlight_matches_reference(architecture, bias):
    model = tiny_model(architecture, seed=5)
    config = SteeringConfig(method="spotlight", spotlight_target=0.4, spotlight_bias=bias, max_new_tokens=MAX_NEW)
    changed = check_against_reference(model, config, lambda n, span: spotlight_edit(span, 0.4, bias == "exact"))
    assert changed > 0


@pytest.mark.parametrize("method", ["pasta+gate", "spotlight+gate"])
def test_gated_stream_methods_match_reference(method):
    model = tiny_model("qwen3", seed=6)
    config = SteeringConfig(method=method, beta=0.5, spotlight_target=0.5, pasta_coef=0.001, max_new_tokens=MAX_NEW)
    num_layers = model.config.num_hidden_layers
    middle = dict.fromkeys(range(num_layers // 4, num_layers // 4 + num_layers // 2))
    if method == "pasta+gate":
        edit_for = lambda n, span: pasta_edit(middle, n, span, 0.001)  # noqa: E731
    else:
        edit_for = lambda n, span: spotlight_edit(span, 0.5, exact=False)  # noqa: E731
    check_against_reference(model, config, edit_for, gate_beta=0.5)
    for generation in Engine(model, [1], 0).generate(REQUESTS, config):
        for step in generation.telemetry:
            if step.layers > 0:  # an emitted steered token is plausible under the raw stream
                assert step.token_raw_prob > 0.5 * step.raw_prob


def test_default_pasta_heads_are_the_middle_layers():
    steerer = SteeringConfig(method="pasta").steerer
    assert steerer.head_config(30) == dict.fromkeys(range(7, 22))
    with pytest.raises(ValueError, match="layer 40 is not a layer"):
        SteeringConfig(method="pasta", pasta_heads='{"40": [1]}').steerer.layer_sets(30)
    for bad, message in [("[1]", "JSON object"), ('{"x": [1]}', "not a layer number"), ("{", "not JSON"),
                         ('{"1": []}', "non-empty list")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            SteeringConfig(method="pasta", pasta_heads=bad)


@pytest.mark.parametrize("method", ["pasta", "spotlight+gate"])
def test_stream_methods_on_the_bundled_model(smollm2, ifeval_rows, method):
    from directer import Directer, build_prompt

    rows = [row for row in ifeval_rows if row["instruction_spans"]][:3]
    prompts = [build_prompt(smollm2.tokenizer, row["prompt"], spans=row["instruction_spans"]) for row in rows]
    config = SteeringConfig(method=method, max_new_tokens=16)
    completions = Directer(smollm2, config).complete(prompts, config, batch_size=3)
    if method == "pasta":
        edit_for = lambda n, span: pasta_edit(dict.fromkeys(range(7, 22)), n, span, 0.01)  # noqa: E731
    else:
        edit_for = lambda n, span: spotlight_edit(span, 0.2, exact=False)  # noqa: E731
    steered = 0
    for prompt, completion in zip(prompts, completions):
        tokens, steps = stream_reference(
            smollm2.model, prompt.token_ids, prompt.span, edit_for(len(prompt.token_ids), prompt.span),
            gate_beta=0.5 if method.endswith("+gate") else None, max_new_tokens=16, eos=smollm2.eos_token_ids,
        )  # fmt: skip
        assert completion.token_ids == tokens
        assert [s.layers > 0 for s in completion.telemetry] == [kept for _, kept, _ in steps]
        steered += sum(s.changed for s in completion.telemetry)
    assert steered > 0
