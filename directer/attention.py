"""The steering hook: the attention function registered with ``transformers`` as ``"directer"``.

While the engine runs, the model's config names ``"directer"`` as its attention implementation, so
every attention module of any ``transformers`` decoder calls :func:`directer_attention` with its
query/key/value (after RoPE and any q/k norm) and the :class:`~directer.passes.ForwardPass` the
engine passed to ``model(...)`` as a keyword. The function owns the cache
(:class:`~directer.cache.KVCache`): the model itself runs with ``cache=None``.

Steering multiplies the keys of the instruction tokens by the steerer's ``key_scale`` in the steered
layers. The cache keeps one scaled copy of those keys per row and layer (made on the first steered
pass); a steered token attends to the scaled copies in place of the originals, so the cache is never
copied for a trial and its keys never change (as in the plain reference, the scale applies to the
keys, not the scores).

A stream method (PASTA, SpotLight) steers a second copy of every row instead, the second half of the
cache rows: those rows' scores get the steerer's bias (:func:`_steered_attend`), from the prefill on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel

from directer.passes import ForwardPass
from directer.steering import KeyRoles, Steerer

ATTENTION_NAME = "directer"


def directer_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    directer_pass: ForwardPass | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Attention for the engine's passes; signature of ``transformers``' attention interface."""
    if directer_pass is None:
        raise RuntimeError("the 'directer' attention runs only inside the directer engine")
    directer_pass = directer_pass.on(query.device)  # a model split over GPUs: this layer's device
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    layer = module.layer_idx
    joined = directer_pass.joined
    if joined is None:
        return _decode(directer_pass, layer, query, key, value, scaling, sliding_window, softcap), None
    # new rows' prompts first: their keys and values must be in the cache before their first raw tokens attend
    split, width = directer_pass.joined_tokens, joined.variants

    def prompts(x: torch.Tensor) -> torch.Tensor:  # packed [1, heads, R * width, dim] -> [R, heads, width, dim]
        return x[0, :, :split].unflatten(1, (-1, width)).transpose(0, 1)

    prefilled = _prefill(joined, layer, prompts(query), prompts(key), prompts(value), scaling, sliding_window, softcap)
    decoded = _decode(
        directer_pass, layer, query[:, :, split:], key[:, :, split:], value[:, :, split:], scaling, sliding_window,
        softcap,
    )  # fmt: skip
    return torch.cat([prefilled.flatten(0, 1)[None], decoded], dim=1), None


def _prefill(
    fp: ForwardPass,
    layer: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    sliding_window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    """Causal attention over the (left-padded) prompts of the pass rows, ``[R, heads, width, dim]``,
    writing their keys and values to the cache. Returns ``[R, width, heads, dim]``."""
    fp.cache.write_prompt(layer, key, value, fp.rows, fp.first_slot)
    pad = fp._pass_rows(fp.cache.pad)
    length = query.shape[2]
    slots = torch.arange(fp.first_slot, fp.first_slot + length, device=query.device)
    allowed = slots[None, :] <= slots[:, None]
    if sliding_window is not None:
        allowed = allowed & (slots[:, None] - slots[None, :] < sliding_window)
    allowed = allowed[None] & (slots[None, :] >= pad[:, None])[:, None, :]
    allowed = allowed | torch.eye(length, dtype=torch.bool, device=query.device)[None]  # pad rows
    allowed = allowed[:, None]
    if fp.stream is None:
        out = _attend(query, key, value, allowed, scaling, softcap)
    else:
        half = len(query) // 2
        real = slots[None, :] >= pad[half:, None]
        roles = KeyRoles(fp._pass_rows(fp.cache.span)[half:, slots], real, real, query.shape[1])
        out = _both_streams(fp, layer, roles, query, key, value, allowed, scaling, softcap)
    return out.transpose(1, 2)


def _to_grid(fp: ForwardPass, x: torch.Tensor) -> torch.Tensor:
    """Packed ``[1, heads, T, dim]`` -> ``[N, heads, P, dim]``."""
    width, gather, _ = fp.layout()
    packed = x[0] if gather is None else x[0][:, gather]
    return packed.view(x.shape[1], -1, width, x.shape[3]).transpose(0, 1)


def _from_grid(fp: ForwardPass, out: torch.Tensor) -> torch.Tensor:
    """``[N, heads, P, dim]`` -> packed ``[1, T, heads, dim]``."""
    rows, heads, width, dim = out.shape
    flat = out.transpose(1, 2).reshape(rows * width, heads, dim)
    _, _, scatter = fp.layout()
    return (flat if scatter is None else flat[scatter])[None]


def _decode(
    fp: ForwardPass,
    layer: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    sliding_window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    """Every token of the pass: attend to its row's cached slots before its slot, plus its own key."""
    cache = fp.cache
    if fp.raw_only:  # every token writes: token i is row i's
        slots = fp.slots if fp.common_slot is None else fp.common_slot
        cache.write_tokens(layer, None, slots, key[0].transpose(0, 1), value[0].transpose(0, 1))
        first, mask = fp.raw_mask(sliding_window)
        keys, values = cache.keys[layer][:, :, first : fp.length + 1], cache.values[layer][:, :, first : fp.length + 1]
        queries = query[0].transpose(0, 1)[:, :, None]
        if fp.stream is None:
            out = _attend(queries, keys, values, mask, scaling, softcap)
        else:
            roles = fp.stream_roles(query.shape[1])
            out = _both_streams(fp, layer, roles, queries, keys, values, mask, scaling, softcap)
        return out.transpose(1, 2).reshape(1, -1, query.shape[1], query.shape[3])
    if fp.write is not None:
        writers = fp._once("writers", lambda: fp.write.nonzero().squeeze(1))
        if writers.numel():
            new_k, new_v = key[0, :, writers].transpose(0, 1), value[0, :, writers].transpose(0, 1)
            cache.write_tokens(layer, fp.row_of_token()[writers], fp.slots[writers], new_k, new_v)
    if fp.stash is not None:
        kept = fp._once("stashers", lambda: fp.stash.nonzero().squeeze(1))
        fp.stashed[layer] = (key[0, :, kept].transpose(0, 1), value[0, :, kept].transpose(0, 1))
    own_key, own_value = _to_grid(fp, key), _to_grid(fp, value)
    scale = fp.key_scale if fp.steers(layer) else None
    keys, values = cache.with_scratch(layer, fp.rows, fp.length + 1, own_key, own_value, scale)
    mask = fp.mask(layer, sliding_window)
    out = _attend(_to_grid(fp, query), keys, values, mask, scaling, softcap, fused=fp.kernel == "sdpa")
    return _from_grid(fp, out)


def _attend(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
    fused: bool = True,
) -> torch.Tensor:
    """Masked attention ``[N, heads, P, dim]`` over ``keys``/``values`` ``[N, kv_heads, K, dim]``: one SDPA
    call when ``fused`` and the model does not soft-cap its logits, else the product written out with
    the query heads of each key head folded together (faster on a CPU for a few queries per row)."""
    if fused and softcap is None:
        rows, heads, width, dim = query.shape
        kv_heads = keys.shape[1]
        if width == 1 and heads > kv_heads and (mask is None or mask.shape[1] == 1):
            # one query a row: the query heads of each key head as its queries, one plain call (as
            # ``transformers``' SDPA does; 20% faster than ``enable_gqa`` at batch 16 on a CPU)
            grouped = query.reshape(rows, kv_heads, heads // kv_heads, dim)
            out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=scaling)
            return out.view(rows, heads, 1, dim)
        gqa = heads > kv_heads
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling, enable_gqa=gqa)
    scores = _masked_scores(query, keys, mask, scaling, softcap)
    return _weighted(torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype), values)


def _both_streams(
    fp: ForwardPass,
    layer: int,
    roles: KeyRoles,
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
    softcap: float | None,
) -> torch.Tensor:
    """A stream method's pass: the rows of the first half attend plainly, their steered copies (the
    second half, whose key ``roles`` are given) with the steerer's bias."""
    half = len(query) // 2
    raw = _attend(query[:half], keys[:half], values[:half], mask[:half], scaling, softcap)
    steered = _steered_attend(
        fp.stream, layer, roles, query[half:], keys[half:], values[half:], mask[half:], scaling, softcap,
        fused=fp.kernel == "sdpa",
    )  # fmt: skip
    return torch.cat([raw, steered])


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``mask`` as a float mask to add to scores: 0 where a key is seen, ``-inf`` where it is hidden."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _steered_attend(
    steerer: Steerer,
    layer: int,
    roles: KeyRoles,
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
    softcap: float | None,
    fused: bool,
) -> torch.Tensor:
    """:func:`_attend` with the steerer's bias on the scores: a fixed bias joins the mask of the fused
    call; a bias computed from the attention weights (``needs_weights``) takes the written-out path."""
    if steerer.needs_weights:
        scores = _masked_scores(query, keys, mask, scaling, softcap)
        bias = steerer.score_bias(layer, roles, torch.softmax(scores, dim=-1, dtype=torch.float32))
    else:
        bias = steerer.score_bias(layer, roles, None)
        if bias is None:
            return _attend(query, keys, values, mask, scaling, softcap, fused)
        if fused and softcap is None:
            edited = _additive(mask, query.dtype) + bias.to(query.dtype)
            gqa = query.shape[1] > keys.shape[1]
            return F.scaled_dot_product_attention(query, keys, values, attn_mask=edited, scale=scaling, enable_gqa=gqa)
        scores = _masked_scores(query, keys, mask, scaling, softcap)
    if bias is not None:
        scores = scores + bias
    return _weighted(torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype), values)


def _masked_scores(
    query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None, scaling: float, softcap: float | None
) -> torch.Tensor:
    """Scores ``[N, heads, P, K]``, soft-capped, ``-inf`` where ``mask`` hides the key; the query heads of
    each key head folded together for one product (faster on a CPU for a few queries per row)."""
    rows, heads, width, dim = query.shape
    kv_heads = keys.shape[1]
    grouped = query.reshape(rows, kv_heads, heads // kv_heads * width, dim)
    scores = torch.matmul(grouped, keys.transpose(2, 3)).view(rows, heads, width, -1) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    return scores if mask is None else scores + _additive(mask, scores.dtype)


def _weighted(probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``probs [N, heads, P, K]`` times ``values [N, kv_heads, K, dim]``: ``[N, heads, P, dim]``."""
    rows, heads, width, keys = probs.shape
    kv_heads = values.shape[1]
    out = torch.matmul(probs.reshape(rows, kv_heads, heads // kv_heads * width, keys), values)
    return out.view(rows, heads, width, -1)


AttentionInterface.register(ATTENTION_NAME, directer_attention)


@contextlib.contextmanager
def engine_attention(model: PreTrainedModel) -> Iterator[None]:
    """Route the attention of the model's language layers through :func:`directer_attention` for the
    duration. The choice of every sub-config (a vision tower's, say) is kept and restored: setting the
    top-level choice alone writes it into every sub-config."""
    config = model.config
    subs = {key: getattr(config, key, None) for key in config.sub_configs}
    previous = {"": config._attn_implementation}
    previous.update({key: sub._attn_implementation for key, sub in subs.items() if sub is not None})
    text = config.get_text_config()
    config._attn_implementation = {
        **previous, "": ATTENTION_NAME, **{key: ATTENTION_NAME for key, sub in subs.items() if sub is text}
    }  # fmt: skip
    try:
        yield
    finally:
        config._attn_implementation = previous
