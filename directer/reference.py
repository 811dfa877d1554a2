"""A plain, per-prompt implementation of Directer: the oracle the engine is tested against, and the
baseline ``directer bench`` compares it with (it works like the official implementation).

Deliberately slow and obvious: one prompt at a time, the model's own eager attention, a
``DynamicCache``, and for every steered pass an explicit copy of the cache with the instruction keys
multiplied by ``alpha`` in the steered layers. It shares no code with the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache


@dataclass
class ReferenceStep:
    raw_token: int
    gate_skipped: bool
    trials: int
    layers: int
    token: int


@dataclass
class ReferenceOutput:
    token_ids: list[int]
    steps: list[ReferenceStep]
    ranking: list[int] | None


def copy_cache(cache: DynamicCache, steered_layers: set[int], positions: list[int], alpha: float) -> DynamicCache:
    """A new cache holding copies of every key and value; keys at ``positions`` scaled in ``steered_layers``."""
    copy = DynamicCache()
    for index, layer in enumerate(cache.layers):
        keys, values = layer.keys.clone(), layer.values.clone()
        if index in steered_layers:
            visible = [p for p in positions if p < keys.shape[2]]
            keys[:, :, visible] = keys[:, :, visible] * alpha
        copy.update(keys, values, index)
    return copy


def forward(model, token: int, cache: DynamicCache) -> torch.Tensor:
    out = model(input_ids=torch.tensor([[token]], device=model.device), cache=cache, use_cache=True)
    return out.logits[0, -1].float()


def capture_attention(model, token: int, cache: DynamicCache) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Input (normed hidden state) and output of every self-attention block for one token."""
    pre, post, handles = {}, {}, []
    for index, layer in enumerate(model.get_decoder().layers):

        def pre_hook(module, args, kwargs, index=index):
            pre[index] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

        def post_hook(module, args, output, index=index):
            post[index] = output[0]

        handles.append(layer.self_attn.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(layer.self_attn.register_forward_hook(post_hook))
    try:
        forward(model, token, cache)
    finally:
        for handle in handles:
            handle.remove()
    count = len(model.get_decoder().layers)
    return [pre[j][0, -1].float() for j in range(count)], [post[j][0, -1].float() for j in range(count)]


def rank_layers(
    model, token: int, cache: DynamicCache, span: list[int], alpha: float, ranking: str = "caused"
) -> list[int]:
    """Layers, most sensitive first. ``D[l][j]``: the disturbance at layer ``j`` when layer ``l`` alone is
    steered. ``caused``: layer ``l`` scores ``mean_j D[l][j]``; ``received``: layer ``j`` scores ``mean_l D[l][j]``."""
    count = len(model.get_decoder().layers)
    raw_pre, raw_post = capture_attention(model, token, copy_cache(cache, set(), span, alpha))
    matrix = []
    for probed in range(count):
        pre, post = capture_attention(model, token, copy_cache(cache, {probed}, span, alpha))
        row = []
        for j in range(count):
            d = (1 - F.cosine_similarity(raw_pre[j], post[j], dim=0)) + (
                1 - F.cosine_similarity(raw_post[j], pre[j], dim=0)
            )
            row.append(max(float(d), 0.0))
        matrix.append(row)
    if ranking == "caused":
        score = [sum(matrix[layer]) / count for layer in range(count)]
    else:
        score = [sum(matrix[probed][layer] for probed in range(count)) / count for layer in range(count)]
    return sorted(range(count), key=lambda layer: -score[layer])


@torch.inference_mode()
def reference_generate(
    model,
    prompt_ids: list[int],
    span: list[int],
    *,
    steer: bool = True,
    alpha: float = 100.0,
    beta: float = 0.5,
    max_trials: int = 10,
    max_new_tokens: int = 16,
    ranking: str = "caused",
    eos_token_ids: tuple[int, ...] = (),
) -> ReferenceOutput:
    previous = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        cache = DynamicCache()
        if len(prompt_ids) > 1:
            model(input_ids=torch.tensor([prompt_ids[:-1]], device=model.device), cache=cache, use_cache=True)
        token = prompt_ids[-1]
        count = len(model.get_decoder().layers)
        order = None
        tokens, steps = [], []
        for step in range(max_new_tokens):
            before = copy_cache(cache, set(), span, alpha)  # the cache as it was before the raw pass
            p = torch.softmax(forward(model, token, cache), dim=-1)
            top = torch.topk(p, 2)
            i_star, p1, p2 = int(top.indices[0]), float(top.values[0]), float(top.values[1])
            emitted, trials, layers, skipped = i_star, 0, 0, False
            if steer:
                if step == 0:
                    order = rank_layers(model, token, before, span, alpha, ranking)
                elif p2 < beta * p1:
                    skipped = True
                if not skipped:
                    steered_layers = list(range(count))
                    k = 1
                    while len(steered_layers) > 1 and k <= max_trials:
                        z = forward(model, token, copy_cache(before, set(steered_layers), span, alpha))
                        j_star = int(torch.argmax(z))
                        trials += 1
                        if float(p[j_star]) > beta * float(p[i_star]):
                            emitted, layers = j_star, len(steered_layers)
                            break
                        steered_layers = order[: max(1, count // 2**k)]
                        k += 1
            tokens.append(emitted)
            steps.append(ReferenceStep(i_star, skipped, trials, layers, emitted))
            if emitted in eos_token_ids:
                break
            token = emitted
        return ReferenceOutput(tokens, steps, order)
    finally:
        model.config._attn_implementation = previous
