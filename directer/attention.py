"""The steering hook: one attention function over a static KV cache that can scale instruction keys.

While the engine runs, the model's config names ``"directer"`` as its attention implementation, so
every attention module of any ``transformers`` decoder calls :func:`directer_attention` with its
query/key/value (after RoPE and any q/k norm) and the :class:`ForwardPass` the engine passed to
``model(...)`` as a keyword. The function owns the cache: the model itself runs with ``cache=None``.

Multiplying a cached key by ``alpha`` multiplies its attention logit by ``alpha`` (before any
soft-capping), so steering is a score modifier: the cache is read, never copied or changed. A pass
may carry several *variants* per row (the layer-ranking probes, or all trials of a step): each
variant is one query of the same token that attends to the row's cache plus its own new key only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel

ATTENTION_NAME = "directer"


class KVCache:
    """Preallocated keys and values of every layer, one slot per position, left-padded rows.

    Buffers are allocated on the first write of each layer, so head counts and sizes come from the
    model itself. All rows share the slot index; ``pad[b]`` slots at the left of row ``b`` are padding.
    """

    def __init__(self, pad: torch.Tensor, span: torch.Tensor, max_len: int) -> None:
        self.pad = pad  # [B] left padding per row
        self.span = span  # [B, max_len] bool: slots whose keys are steered
        self.max_len = max_len
        self.length = 0  # slots written
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def write(self, layer: int, start: int, key: torch.Tensor, value: torch.Tensor) -> None:
        if layer not in self.keys:
            batch, heads, _, dim = key.shape
            shape = (batch, heads, self.max_len, dim)
            self.keys[layer] = key.new_zeros(shape)
            self.values[layer] = value.new_zeros(shape)
        end = start + key.shape[2]
        self.keys[layer][:, :, start:end] = key
        self.values[layer][:, :, start:end] = value

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop finished rows (one copy per event, so later passes stop paying for them)."""
        self.pad = self.pad[rows]
        self.span = self.span[rows]
        for layer in self.keys:
            self.keys[layer] = self.keys[layer][rows]
            self.values[layer] = self.values[layer][rows]

    def key_slots_valid(self, rows: torch.Tensor | None, length: int) -> torch.Tensor:
        """[N, length] bool: the slots each row may attend to (not padding)."""
        pad = self.pad if rows is None else self.pad[rows]
        slots = torch.arange(length, device=pad.device)
        return slots[None, :] >= pad[:, None]


@dataclass
class ForwardPass:
    """What one forward asks of attention.

    rows: cache row read by each batch row (``None``: batch row b reads cache row b).
    steer: ``[N, P, num_layers]`` bool, the layers in which each variant scales instruction keys.
    write: store this pass's keys and values in the cache (the raw pass and the prefill).
    """

    cache: KVCache
    prefill: bool = False
    rows: torch.Tensor | None = None
    steer: torch.Tensor | None = None
    alpha: float = 1.0
    write: bool = False
    _valid: dict[object, torch.Tensor] = field(default_factory=dict, repr=False)

    def raw_mask(self, length: int, sliding_window: int | None) -> torch.Tensor:
        """``[N, 1, 1, length + 1]`` bool: the cached slots plus the token's own slot."""
        key = ("raw", sliding_window)
        if key not in self._valid:
            own = torch.ones(self.cache.pad.shape[0], 1, dtype=torch.bool, device=self.cache.pad.device)
            self._valid[key] = torch.cat([self.valid_keys(length, sliding_window), own], dim=1)[:, None, None, :]
        return self._valid[key]

    def valid_keys(self, length: int, sliding_window: int | None) -> torch.Tensor:
        """Cached slots visible to the current query, per row; computed once per pass and window."""
        if sliding_window not in self._valid:
            valid = self.cache.key_slots_valid(self.rows, length)
            if sliding_window is not None:
                # the query sits at slot `length`; HF's window keeps keys with distance < window
                slots = torch.arange(length, device=valid.device)
                valid = valid & (slots > length - sliding_window)[None, :]
            self._valid[sliding_window] = valid
        return self._valid[sliding_window]


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
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    layer = module.layer_idx
    if directer_pass.prefill:
        return _prefill(directer_pass, layer, query, key, value, scaling, sliding_window, softcap), None
    if directer_pass.write and softcap is None:
        return _append(directer_pass, layer, query, key, value, scaling, sliding_window), None
    return _decode(directer_pass, layer, query, key, value, scaling, sliding_window, softcap), None


def _append(
    fp: ForwardPass,
    layer: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """The raw pass: store the token's key and value, then one fused SDPA call over the row's slots."""
    cache = fp.cache
    length = cache.length
    cache.write(layer, length, key, value)
    keys, values = cache.keys[layer][:, :, : length + 1], cache.values[layer][:, :, : length + 1]
    mask = fp.raw_mask(length, sliding_window)
    groups = query.shape[1] // key.shape[1]
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling, enable_gqa=groups > 1)
    return out.transpose(1, 2).contiguous()


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
    """Causal attention over the (left-padded) prompt, writing its keys and values to the cache."""
    fp.cache.write(layer, 0, key, value)
    length = query.shape[2]
    slots = torch.arange(length, device=query.device)
    allowed = slots[None, :] <= slots[:, None]
    if sliding_window is not None:
        allowed = allowed & (slots[:, None] - slots[None, :] < sliding_window)
    allowed = allowed[None] & fp.cache.key_slots_valid(None, length)[:, None, :]
    allowed = allowed | torch.eye(length, dtype=torch.bool, device=query.device)[None]  # pad rows
    allowed = allowed[:, None]  # [B, 1, T, T]
    groups = query.shape[1] // key.shape[1]
    if softcap is None:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scaling, enable_gqa=groups > 1)
    else:
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        scores = torch.matmul(query, key.transpose(2, 3)) * scaling
        scores = torch.tanh(scores / softcap) * softcap
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        out = torch.matmul(probs, value)
    return out.transpose(1, 2).contiguous()


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
    """One token per variant: attend to the row's cached slots plus the variant's own key."""
    cache = fp.cache
    length = cache.length
    rows, heads, variants, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    cached_k = cache.keys[layer][:, :, :length]
    cached_v = cache.values[layer][:, :, :length]
    if fp.rows is not None:
        cached_k, cached_v = cached_k[fp.rows], cached_v[fp.rows]

    # query heads kv*groups..kv*groups+groups-1 share key head kv: fold them into the query axis
    grouped_q = query.reshape(rows, kv_heads, groups * variants, dim)
    scores = torch.matmul(grouped_q, cached_k.transpose(2, 3)).view(rows, heads, variants, length)
    scores = scores * scaling
    if fp.steer is not None:
        steered = fp.steer[:, :, layer]  # [N, P]
        if bool(steered.any()):
            span = cache.span[:, :length] if fp.rows is None else cache.span[fp.rows, :length]
            boost = (span[:, None, :] & steered[:, :, None]).to(scores.dtype) * (fp.alpha - 1.0) + 1.0
            scores = scores * boost[:, None]
    own_key = key.repeat_interleave(groups, 1)
    own_score = (query * own_key).sum(-1, keepdim=True) * scaling  # [N, H, P, 1]
    scores = torch.cat([scores, own_score], dim=-1)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    valid = fp.valid_keys(length, sliding_window)
    scores[..., :length] = scores[..., :length].masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)

    grouped_p = probs[..., :length].reshape(rows, kv_heads, groups * variants, length)
    out = torch.matmul(grouped_p, cached_v).view(rows, heads, variants, dim)
    out = out + probs[..., length:] * value.repeat_interleave(groups, 1)
    if fp.write:
        cache.write(layer, length, key, value)
    return out.transpose(1, 2).contiguous()


AttentionInterface.register(ATTENTION_NAME, directer_attention)


@contextlib.contextmanager
def engine_attention(model: PreTrainedModel) -> Iterator[None]:
    """Route the model's attention through :func:`directer_attention` for the duration."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
