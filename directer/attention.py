"""The steering hook: one attention function over a static KV cache that can scale instruction keys.

While the engine runs, the model's config names ``"directer"`` as its attention implementation, so
every attention module of any ``transformers`` decoder calls :func:`directer_attention` with its
query/key/value (after RoPE and any q/k norm) and the :class:`ForwardPass` the engine passed to
``model(...)`` as a keyword. The function owns the cache: the model itself runs with ``cache=None``.

Multiplying a cached key by ``alpha`` multiplies its attention logit by ``alpha`` (before any
soft-capping), so steering is a score modifier: the cache is read, never copied or changed.

A decoding pass is one *packed* sequence: each cache row contributes one or more tokens (its raw
token, or the variants of its steering trials or ranking probes), laid out row after row. Every
token attends to its row's cached slots before the row's current slot, plus its own key; a raw token
also stores its key and value at that slot. Rows may sit at different slots, so one pass can carry
the raw tokens of some rows next to the trials of others.
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
    model itself. ``pad[b]`` slots at the left of row ``b`` are padding; ``lengths[b]`` slots are
    written (rows advance independently).
    """

    def __init__(self, pad: torch.Tensor, span: torch.Tensor, max_len: int) -> None:
        self.pad = pad  # [B] left padding per row
        self.span = span  # [B, max_len] bool: slots whose keys are steered
        self.max_len = max_len
        self.lengths = torch.zeros_like(pad)  # [B] slots written per row
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def _buffers(self, layer: int, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.keys:
            shape = (len(self.pad), key.shape[-3], self.max_len, key.shape[-1])
            self.keys[layer] = key.new_zeros(shape)
            self.values[layer] = key.new_zeros(shape)
        return self.keys[layer], self.values[layer]

    def write_prompt(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """``key``/``value`` ``[B, kv_heads, T, dim]`` into slots ``0..T-1`` of every row."""
        keys, values = self._buffers(layer, key)
        keys[:, :, : key.shape[2]] = key
        values[:, :, : key.shape[2]] = value

    def write_tokens(
        self, layer: int, rows: torch.Tensor, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> None:
        """One token per row: ``key``/``value`` ``[n, kv_heads, dim]`` into slot ``slots[i]`` of row ``rows[i]``."""
        keys, values = self._buffers(layer, key)
        keys[rows, :, slots] = key
        values[rows, :, slots] = value

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop finished rows (one copy per event, so later passes stop paying for them)."""
        self.pad, self.span, self.lengths = self.pad[rows], self.span[rows], self.lengths[rows]
        for layer in self.keys:
            self.keys[layer] = self.keys[layer][rows]
            self.values[layer] = self.values[layer][rows]


@dataclass
class ForwardPass:
    """What one forward asks of attention.

    rows: cache row of each pass row (``None``: every cache row, in order).
    variants: tokens of each pass row in the packed input (an int when all rows have as many).
    slots: ``[T]`` slot of each packed token: it attends to its row's slots before it, and its own key.
    write: ``[T]`` bool, the raw tokens, which store their key and value at their slot.
    steer: ``[N, P, num_layers]`` bool, the layers in which each token scales instruction keys.
    """

    cache: KVCache
    prefill: bool = False
    rows: torch.Tensor | None = None
    variants: int | torch.Tensor = 1
    slots: torch.Tensor | None = None
    write: torch.Tensor | None = None
    steer: torch.Tensor | None = None
    alpha: float = 1.0
    _memo: dict[object, object] = field(default_factory=dict, repr=False)

    def _once(self, key: object, make):
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    @property
    def length(self) -> int:
        """Cached slots any token of the pass may read."""
        return self._once("length", lambda: int(self.slots.max()))

    @property
    def raw_only(self) -> bool:
        """One raw token per cache row: plain attention over each row's slots up to its own."""

        def make() -> bool:
            single = isinstance(self.variants, int) and self.variants == 1
            return single and self.rows is None and self.write is not None and bool(self.write.all())

        return self._once("raw_only", make)

    def layout(self) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
        """``(P, gather, scatter)``: the width of the ``[N, P]`` grid of the packed tokens, the packed
        index of each grid cell (short rows repeat their last token) and the grid cell of each packed
        token; both ``None`` when every row has ``P`` tokens."""

        def make():
            if isinstance(self.variants, int):
                return self.variants, None, None
            counts = self.variants
            width = int(counts.max())
            starts = torch.cumsum(counts, 0) - counts
            offsets = torch.arange(width, device=counts.device)
            gather = starts[:, None] + torch.minimum(offsets[None, :], counts[:, None] - 1)
            row = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
            scatter = row * width + torch.arange(len(row), device=counts.device) - starts[row]
            return width, gather.reshape(-1), scatter

        return self._once("layout", make)

    def row_of_token(self) -> torch.Tensor:
        """``[T]`` cache row of each packed token."""

        def make():
            counts = self.variants
            if isinstance(counts, int):
                rows = len(self.slots) // counts
                counts = torch.full((rows,), counts, dtype=torch.long, device=self.slots.device)
            pass_rows = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
            return pass_rows if self.rows is None else self.rows[pass_rows]

        return self._once("row_of_token", make)

    def bias(self, sliding_window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """``[N, 1, P, length + 1]`` additive mask: 0 for the slots each token may read and its own key
        (last column), ``-inf`` for padding, its own and later slots, and slots outside a sliding window."""

        def make():
            pad = self.cache.pad if self.rows is None else self.cache.pad[self.rows]
            width, gather, _ = self.layout()
            slots = (self.slots if gather is None else self.slots[gather]).view(len(pad), width, 1)
            slot_ids = torch.arange(self.length, device=pad.device)
            visible = (slot_ids >= pad[:, None, None]) & (slot_ids < slots)
            if sliding_window is not None:  # HF's window keeps keys at distance < window from the query
                visible = visible & (slot_ids > slots - sliding_window)
            visible = torch.cat([visible, torch.ones_like(visible[..., :1])], dim=-1)
            zeros = torch.zeros(visible.shape, dtype=dtype, device=pad.device)
            return zeros.masked_fill(~visible, float("-inf"))[:, None]

        return self._once(("bias", sliding_window, dtype), make)

    def raw_mask(self, sliding_window: int | None) -> torch.Tensor:
        """``[N, 1, 1, length + 1]`` bool for :attr:`raw_only` passes: slots from the padding to the token's own."""

        def make():
            slot_ids = torch.arange(self.length + 1, device=self.slots.device)
            visible = (slot_ids >= self.cache.pad[:, None]) & (slot_ids <= self.slots[:, None])
            if sliding_window is not None:
                visible = visible & (slot_ids > self.slots[:, None] - sliding_window)
            return visible[:, None, None, :]

        return self._once(("raw_mask", sliding_window), make)

    def span(self) -> torch.Tensor:
        """``[N, length]`` bool: which of the readable slots hold instruction tokens."""
        return self._once(
            "span", lambda: (self.cache.span if self.rows is None else self.cache.span[self.rows])[:, : self.length]
        )


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
    return _decode(directer_pass, layer, query, key, value, scaling, sliding_window, softcap), None


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
    fp.cache.write_prompt(layer, key, value)
    length = query.shape[2]
    slots = torch.arange(length, device=query.device)
    allowed = slots[None, :] <= slots[:, None]
    if sliding_window is not None:
        allowed = allowed & (slots[:, None] - slots[None, :] < sliding_window)
    allowed = allowed[None] & (slots[None, :] >= fp.cache.pad[:, None])[:, None, :]
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
    if fp.write is not None:
        writers = fp.write.nonzero().squeeze(1)
        if writers.numel():
            new_k, new_v = key[0, :, writers].transpose(0, 1), value[0, :, writers].transpose(0, 1)
            cache.write_tokens(layer, fp.row_of_token()[writers], fp.slots[writers], new_k, new_v)
    if fp.raw_only and softcap is None:
        return _attend_raw(fp, layer, query, scaling, sliding_window)
    q, own_k, own_v = _to_grid(fp, query), _to_grid(fp, key), _to_grid(fp, value)
    rows, heads, width, dim = q.shape
    kv_heads = own_k.shape[1]
    groups = heads // kv_heads
    length = fp.length
    cached_k = cache.keys[layer][:, :, :length]
    cached_v = cache.values[layer][:, :, :length]
    if fp.rows is not None:
        cached_k, cached_v = cached_k[fp.rows], cached_v[fp.rows]

    # query heads kv*groups..kv*groups+groups-1 share key head kv: fold them into the query axis
    grouped_q = q.reshape(rows, kv_heads, groups * width, dim)
    scores = torch.matmul(grouped_q, cached_k.transpose(2, 3)).view(rows, heads, width, length) * scaling
    if fp.steer is not None:
        steered = fp.steer[:, :, layer]  # [N, P]
        if bool(steered.any()):
            boost = (fp.span()[:, None, :] & steered[:, :, None]).to(scores.dtype) * (fp.alpha - 1.0) + 1.0
            scores = scores * boost[:, None]
    grouped_q = grouped_q.view(rows, kv_heads, groups, width, dim)
    own_score = (grouped_q * own_k[:, :, None]).sum(-1).view(rows, heads, width, 1) * scaling
    scores = torch.cat([scores, own_score], dim=-1)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    probs = torch.softmax(scores + fp.bias(sliding_window, scores.dtype), dim=-1, dtype=torch.float32).to(q.dtype)

    grouped_p = probs[..., :length].reshape(rows, kv_heads, groups * width, length)
    out = torch.matmul(grouped_p, cached_v).view(rows, kv_heads, groups, width, dim)
    own_p = probs[..., length:].view(rows, kv_heads, groups, width, 1)
    out = (out + own_p * own_v[:, :, None]).view(rows, heads, width, dim)
    return _from_grid(fp, out)


def _attend_raw(
    fp: ForwardPass, layer: int, query: torch.Tensor, scaling: float, sliding_window: int | None
) -> torch.Tensor:
    """A pass of raw tokens only (the common case): one fused SDPA call over each row's written slots."""
    length = fp.length + 1
    keys, values = fp.cache.keys[layer][:, :, :length], fp.cache.values[layer][:, :, :length]
    grid_q = query[0].transpose(0, 1)[:, :, None]  # [N, heads, 1, dim]
    groups = query.shape[1] // keys.shape[1]
    out = F.scaled_dot_product_attention(
        grid_q, keys, values, attn_mask=fp.raw_mask(sliding_window), scale=scaling, enable_gqa=groups > 1
    )
    return out.transpose(1, 2).reshape(1, -1, query.shape[1], query.shape[3])


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
