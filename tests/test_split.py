"""A model split over devices by layers: loading with a ``device_map``, the engine through
``accelerate``'s device hooks, and the masks and row bookkeeping following each layer's device.

This machine has one device, so every layer is mapped to the CPU: the code path of a split (a
placement map, hooks that move each layer's inputs, attention that asks for its pass on its own
device) runs, and its tokens must be those of the plain model. The ``meta`` device stands in for
a second device where only placement is checked."""

from __future__ import annotations

import pytest
import torch
from accelerate import dispatch_model

from directer import Directer, SteeringConfig
from directer.cache import KVCache
from directer.models import load_model
from directer.passes import ForwardPass


def layer_map(model) -> dict[str, str]:
    """Every decoder layer, the embeddings, the final norm and the head placed by name, as a split names them."""
    names = ["model.embed_tokens", *(f"model.layers.{i}" for i in range(model.config.num_hidden_layers))]
    return {name: "cpu" for name in [*names, "model.norm", "model.rotary_emb", "lm_head"]}


@pytest.fixture(scope="module")
def prompts(smollm2, ifeval_rows):
    plain = Directer(smollm2)
    return [plain.prompt(message=r["prompt"], instruction_spans=r["instruction_spans"]) for r in ifeval_rows[:3]]


@pytest.mark.parametrize("method", ["directer", "pasta"])
def test_a_model_loaded_with_a_layer_map_and_device_hooks_decodes_the_same_tokens(smollm2, prompts, method):
    mapping = layer_map(smollm2.model)
    split = load_model("smollm2-135m", device="cpu", device_map=mapping)
    dispatch_model(split.model, device_map=mapping, force_hooks=True)  # each layer's inputs moved by hooks
    assert split.model.hf_device_map == mapping and hasattr(split.model.model.layers[3], "_hf_hook")
    config = SteeringConfig(method=method, max_new_tokens=8)
    expected = Directer(smollm2).complete(prompts, config, batch_size=3)
    got = Directer(split).complete(prompts, config, batch_size=3)
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]


def test_a_pass_seen_from_another_device_has_its_masks_and_rows_there():
    """What a layer on another device reads (row bookkeeping, masks, indices) is there; the cache buffers
    and what attention hands back stay shared."""
    rows, width, layers = 2, 6, 4
    span = torch.zeros(rows, width + 4, dtype=torch.bool)
    span[:, 1:3] = True
    cache = KVCache(torch.tensor([0, 2]), span, width + 4, tokens_per_row=3, prompt_end=width)
    cache.lengths += width
    steer = torch.zeros(rows, 2, layers, dtype=torch.bool)
    steer[:, 0, :2] = True
    fp = ForwardPass(cache, variants=2, slots=torch.tensor([5, 6, 5, 6]), steer=steer, key_scale=4.0)
    fp.joined = ForwardPass(cache, rows=torch.tensor([1]), variants=3, first_slot=2)  # a new row's prompt
    meta = torch.device("meta")
    seen = fp.on(meta)
    assert seen is fp.on(meta)  # made once per device and pass
    assert fp.on(torch.device("cpu")) is fp
    assert seen.cache.pad.device == meta and seen.cache.span_slots.device == meta
    assert seen.slots.device == meta and seen.steer.device == meta
    assert seen.joined.rows.device == meta and seen.joined.cache.pad.device == meta and seen.joined_tokens == 3
    assert seen.cache.keys is cache.keys and seen.stashed is fp.stashed and seen.reaches is fp.reaches
    assert seen.mask(0, None).device == meta and seen.mask(0, None).shape == fp.mask(0, None).shape
    assert cache.pad.device == torch.device("cpu")
