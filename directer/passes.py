"""What one forward asks of attention: which tokens of which rows, at which slots, steered where.

A decoding pass is one *packed* sequence: each cache row contributes one or more tokens (its raw
token, or the variants of its steering trials or ranking probes), laid out row after row. Every
token attends to its row's cached slots before the row's current slot, plus its own key; a raw token
also stores its key and value at that slot. Rows may sit at different slots, so one pass can carry
the raw tokens of some rows next to the trials of others. Each layer runs one attention call per
pass: the own keys of the pass's tokens and the scaled instruction keys go to scratch slots after the
last slot the pass reads, and the masks built here say which token sees what.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from directer.cache import KVCache
from directer.steering import KeyRoles, Steerer

Kernel = Literal["sdpa", "matmul"]


@dataclass
class ForwardPass:
    """What one forward asks of attention.

    rows: cache row of each pass row (``None``: every cache row, in order).
    variants: tokens of each pass row in the packed input (an int when all rows have as many).
    first_slot: a :attr:`joined` prefill's first slot (the slots before it are every row's padding).
    slots: ``[T]`` slot of each packed token: it attends to its row's slots before it, and its own key.
    write: ``[T]`` bool, the raw tokens, which store their key and value at their slot.
    stash: ``[T]`` bool, tokens whose keys and values are kept aside in ``stashed`` (per layer,
        ``[n, kv_heads, dim]`` each) rather than written: guesses of which only one may be kept.
    steer: ``[N, P, num_layers]`` bool, the layers in which each token scales instruction keys.
    key_scale: the factor on the instruction keys in a steered layer (the steerer's).
    kernel: how packed passes attend: ``sdpa`` (one fused call) or ``matmul`` (the product written out);
        see :class:`directer.engine.Engine`.
    reaches: per steered layer, ``[N, P]`` bool: which tokens saw any scaled key there (a sliding
        window may hide them all; then steering that layer changes nothing).
    stream: a stream method's steerer: the second half of the cache rows is the steered stream of the
        first, and its attention scores get the steerer's :meth:`~directer.steering.Steerer.score_bias`.
    joined: a prefill run in the same forward: new rows' prompts, each row's ``variants`` tokens from
        slot ``first_slot`` on, causal, packed before this pass's tokens; each layer writes their keys
        and values before this pass's tokens attend, so a new row's first raw token, in this pass,
        reads its prompt.
    """

    cache: KVCache
    rows: torch.Tensor | None = None
    variants: int | torch.Tensor = 1
    first_slot: int = 0
    slots: torch.Tensor | None = None
    write: torch.Tensor | None = None
    stash: torch.Tensor | None = None
    steer: torch.Tensor | None = None
    key_scale: float = 1.0
    kernel: Kernel = "sdpa"
    stream: Steerer | None = None
    joined: ForwardPass | None = None
    stashed: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)
    reaches: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    _memo: dict[object, object] = field(default_factory=dict, repr=False)

    def on(self, device: torch.device) -> ForwardPass:
        """This pass as a layer on ``device`` sees it (a model split over GPUs): its tensors and masks
        there; what attention hands back (``stashed``, ``reaches``) is shared, on each layer's device."""
        if device == self.cache.pad.device:
            return self

        def make() -> ForwardPass:
            def move(value):
                return value.to(device) if isinstance(value, torch.Tensor) else value

            names = ("rows", "variants", "slots", "write", "stash", "steer")
            tensors = {name: move(getattr(self, name)) for name in names}
            if self.joined is not None:
                tensors["joined"] = self.joined.on(device)
            # what the pass's host-side decisions read, read once (no device sync per layer)
            decided = {"raw_only": self.raw_only, "steered": self._steered()}
            if self.slots is not None:  # a decoding pass (a prefill reads no cached slots)
                decided["length"] = self.length
                decided["common_slot"] = self.common_slot
            return replace(self, cache=self.cache.on(device), _memo=decided, **tensors)

        return self._once(("on", device), make)

    def _once(self, key: object, make):
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    @property
    def joined_tokens(self) -> int:
        """Tokens of the :attr:`joined` prefill, at the start of the packed input."""
        return 0 if self.joined is None else len(self.joined.rows) * self.joined.variants

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

    def steers(self, layer: int) -> bool:
        """Whether any token of the pass scales the instruction keys in ``layer``."""
        steered = self._steered()
        return bool(steered) and steered[layer]

    def _steered(self) -> list[bool]:
        """Whether each layer is steered by any token (one read for the pass)."""
        return self._once("steered", lambda: [] if self.steer is None else self.steer.any(dim=(0, 1)).tolist())

    def _pass_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.rows is None else tensor[self.rows]

    def _grid_slots(self) -> torch.Tensor:
        """``[N, P]`` slot of each grid cell."""

        def make():
            width, gather, _ = self.layout()
            return (self.slots if gather is None else self.slots[gather]).view(-1, width)

        return self._once("grid_slots", make)

    def mask(self, layer: int, sliding_window: int | None) -> torch.Tensor:
        """``[N, 1, P, length + 1 + P (+ S)]`` bool over the keys of :meth:`KVCache.with_scratch`: each
        token sees its row's slots from the padding to before its own, its own key, and, in the layers
        it steers, the scaled instruction keys in place of the originals (sliding windows apply)."""
        base = self._once(("visible", sliding_window), lambda: self._visible(sliding_window))
        if not self.steers(layer):
            return base
        steered = self.steer[:, :, layer, None]
        span_seen = self._once(("span_seen", sliding_window), lambda: self._span_seen(sliding_window)) & steered
        self.reaches[layer] = span_seen.any(dim=-1)
        hidden = torch.zeros_like(base[:, 0])
        hidden[..., : self.length] = self.span()[:, None, :] & steered
        return torch.cat([base[:, 0] & ~hidden, span_seen], dim=-1)[:, None]

    def _visible(self, sliding_window: int | None) -> torch.Tensor:
        """``[N, 1, P, length + 1 + P]``: the cached slots each token reads, then its own key."""
        pad = self._pass_rows(self.cache.pad)
        slots = self._grid_slots()
        slot_ids = torch.arange(self.length + 1, device=pad.device)
        visible = _readable(slot_ids, pad[:, None, None], slots[:, :, None], sliding_window)
        own = torch.eye(slots.shape[1], dtype=torch.bool, device=pad.device).expand(len(pad), -1, -1)
        return torch.cat([visible, own], dim=-1)[:, None]

    def _span_seen(self, sliding_window: int | None) -> torch.Tensor:
        """``[N, P, S]``: the instruction keys each token would read (a steered token reads their scaled copies)."""
        pad, valid = self._pass_rows(self.cache.pad), self._pass_rows(self.cache.span_valid)
        span_slots, slots = self._pass_rows(self.cache.span_slots)[:, None, :], self._grid_slots()[:, :, None]
        return valid[:, None, :] & _readable(span_slots, pad[:, None, None], slots, sliding_window)

    def raw_mask(self, sliding_window: int | None) -> tuple[int, torch.Tensor | None]:
        """``(first, mask)`` for :attr:`raw_only` passes: the first slot any token reads, and ``[N, 1, 1,
        length + 1 - first]`` bool over the slots from there (from the padding to the token's own);
        ``None`` when every token reads them all (a batch of one). A stream method reads from slot 0."""

        def make():
            slot_ids = torch.arange(self.length + 1, device=self.slots.device)
            slots = self.slots[:, None]
            visible = _readable(slot_ids, self.cache.pad[:, None], slots, sliding_window) | (slot_ids == slots)
            first = 0 if self.stream is not None else int(visible.any(dim=0).int().argmax())
            visible = visible[:, first:]
            return first, None if self.stream is None and bool(visible.all()) else visible[:, None, None, :]

        return self._once(("raw_mask", sliding_window), make)

    @property
    def common_slot(self) -> int | None:
        """The slot every token of a :attr:`raw_only` pass writes, when it is the same for all (rows in
        step, as in zero-shot decoding): one strided copy instead of an indexed write."""

        def make() -> int | None:
            if not self.raw_only:
                return None
            first = int(self.slots[0])
            return first if bool((self.slots == first).all()) else None

        return self._once("common_slot", make)

    def stream_roles(self, num_heads: int) -> KeyRoles:
        """The steered stream's keys in a :attr:`raw_only` pass (slots up to the last one written)."""

        def make() -> KeyRoles:
            cache, half = self.cache, len(self.cache.pad) // 2
            slot_ids = torch.arange(self.length + 1, device=cache.pad.device)
            prompt = (slot_ids >= cache.pad[half:, None]) & (slot_ids < cache.prompt_end)
            queries = torch.ones(half, 1, dtype=torch.bool, device=cache.pad.device)
            return KeyRoles(cache.span[half:, : self.length + 1], prompt, queries, num_heads)

        return self._once(("stream_roles", num_heads), make)

    def span(self) -> torch.Tensor:
        """``[N, length]`` bool: which of the readable slots hold instruction tokens."""
        return self._once("span", lambda: self._pass_rows(self.cache.span)[:, : self.length])


def _readable(
    slot_ids: torch.Tensor, pad: torch.Tensor, slots: torch.Tensor, sliding_window: int | None
) -> torch.Tensor:
    """Bool, broadcast: which cached ``slot_ids`` a token at ``slots`` reads: from its row's padding to
    before its own slot, and within the sliding window if the layer has one."""
    visible = (slot_ids >= pad) & (slot_ids < slots)
    if sliding_window is not None:  # HF's window keeps keys at distance < window from the query
        visible = visible & (slot_ids > slots - sliding_window)
    return visible
