"""The engine's KV cache: preallocated, left-padded, one slot per position, rows advancing independently.

The model runs with ``cache=None``: the attention function of :mod:`directer.attention` reads and
writes this cache itself. It keeps only raw keys and values; the scaled instruction keys a steered
pass reads are one gathered copy per row and layer, so a trial never copies the cache.
"""

from __future__ import annotations

import copy

import torch


def scratch_slots(tokens_per_row: int, span_width: int) -> int:
    """Slots past a row's end for a packed pass: its own tokens, then the scaled instruction keys (none
    when passes carry one token a row)."""
    return tokens_per_row + span_width if tokens_per_row else 0


class KVCache:
    """Preallocated keys and values of every layer, one slot per position, left-padded rows.

    Buffers are allocated on the first write of each layer, so head counts and sizes come from the
    model itself. ``pad[b]`` slots at the left of row ``b`` are padding; ``lengths[b]`` slots are
    written (rows advance independently). When a pass may carry up to ``tokens_per_row`` tokens of a
    row, scratch slots at the end let it place their own keys and the scaled instruction keys right
    after the slots it reads.
    """

    def __init__(
        self,
        pad: torch.Tensor,
        span: torch.Tensor,
        max_len: int,
        tokens_per_row: int = 0,
        prompt_end: int = 0,
        span_width: int | None = None,
    ) -> None:
        self.pad = pad  # [B] left padding per row
        self.span = span  # [B, max_len] bool: slots whose keys are steered
        self.max_len = max_len
        self.prompt_end = prompt_end  # slots before it hold prompt tokens (or padding), the rest generated ones
        self.lengths = torch.zeros_like(pad)  # [B] slots written per row
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        # the instruction keys of each row, gathered: [B, S] slots (valid where ``span_valid``; S the
        # widest instruction of the rows this cache will hold), and per layer their scaled keys and their
        # values, [B, kv_heads, S, dim], taken on the first steered pass (the prompt's last token is
        # written by the first raw pass, not the prefill)
        self.span_width = int(span.sum(dim=1).max()) if span_width is None else span_width
        self.span_slots, self.span_valid = self._gathered(span)
        self.span_keys: dict[tuple[int, float], torch.Tensor] = {}
        self.span_values: dict[tuple[int, float], torch.Tensor] = {}
        self.scratch = scratch_slots(tokens_per_row, self.span_width)

    def _gathered(self, span: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        slot_ids = torch.arange(span.shape[1], device=span.device).expand_as(span)
        slots = torch.where(span, slot_ids, span.shape[1]).sort(dim=1).values[:, : self.span_width]
        return slots.clamp(max=span.shape[1] - 1), slots < span.shape[1]

    def admit(self, rows: torch.Tensor, pad: torch.Tensor, span: torch.Tensor) -> None:
        """Rows of finished sequences take new ones (continuous batching): their padding and instruction,
        nothing written yet. The scaled instruction copies are taken again on the next steered pass."""
        self.pad[rows], self.span[rows], self.lengths[rows] = pad, span, 0
        self.span_slots[rows], self.span_valid[rows] = self._gathered(span)
        self.span_keys.clear()
        self.span_values.clear()

    def on(self, device: torch.device) -> KVCache:
        """This cache as a layer on ``device`` sees it (a model split over GPUs): the rows' bookkeeping
        there, the buffers shared (each layer's live on that layer's device, allocated by its first write)."""
        if device == self.pad.device:
            return self
        view = copy.copy(self)
        for name in ("pad", "span", "lengths", "span_slots", "span_valid"):
            setattr(view, name, getattr(self, name).to(device))
        return view

    def _buffers(self, layer: int, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.keys:
            shape = (len(self.pad), key.shape[-3], self.max_len + self.scratch, key.shape[-1])
            self.keys[layer] = key.new_zeros(shape)
            self.values[layer] = key.new_zeros(shape)
        return self.keys[layer], self.values[layer]

    def write_prompt(
        self, layer: int, key: torch.Tensor, value: torch.Tensor, rows: torch.Tensor, first_slot: int
    ) -> None:
        """``key``/``value`` ``[N, kv_heads, T, dim]`` into slots ``first_slot..first_slot+T-1`` of ``rows``."""
        keys, values = self._buffers(layer, key)
        rows, end = rows.to(keys.device), first_slot + key.shape[2]
        keys[rows, :, first_slot:end] = key
        values[rows, :, first_slot:end] = value

    def scaled_span(self, layer: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The instruction keys of every row times ``scale``, and their values (kept once made)."""
        if (layer, scale) not in self.span_keys:
            rows = torch.arange(len(self.pad), device=self.pad.device)[:, None]
            keys, values = self.keys[layer][rows, :, self.span_slots], self.values[layer][rows, :, self.span_slots]
            self.span_keys[layer, scale] = (keys * scale).transpose(1, 2).contiguous()
            self.span_values[layer, scale] = values.transpose(1, 2).contiguous()
        return self.span_keys[layer, scale], self.span_values[layer, scale]

    def write_tokens(
        self,
        layer: int,
        rows: torch.Tensor | None,
        slots: torch.Tensor | int,
        key: torch.Tensor,
        value: torch.Tensor,
    ) -> None:
        """One token per row: ``key``/``value`` ``[n, kv_heads, dim]`` into slot ``slots[i]`` (an int: the same
        slot for all) of row ``rows[i]`` (``None``: every row, in order)."""
        keys, values = self._buffers(layer, key)
        if rows is None and isinstance(slots, int):
            keys[:, :, slots] = key
            values[:, :, slots] = value
            return
        rows = torch.arange(len(keys), device=keys.device) if rows is None else rows.to(keys.device)
        slots = torch.as_tensor(slots, device=keys.device)
        keys[rows, :, slots] = key
        values[rows, :, slots] = value

    def with_scratch(
        self,
        layer: int,
        rows: torch.Tensor | None,
        length: int,
        own_key: torch.Tensor,
        own_value: torch.Tensor,
        key_scale: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[N, kv_heads, length + P (+ S), dim]`` of the pass rows: their first ``length``
        slots, then the own key of each of their ``P`` grid cells, then (when a ``key_scale`` is given)
        the scaled instruction keys. Written in place to the scratch slots for a decoding pass (every row); the
        ranking probes (``rows`` given, one token per layer in a row) gather theirs."""
        parts, value_parts = [own_key], [own_value]
        if key_scale is not None:
            span_keys, span_values = self.scaled_span(layer, key_scale)
            parts.append(span_keys)
            value_parts.append(span_values)
        if rows is not None:
            parts[1:] = [part[rows] for part in parts[1:]]
            value_parts[1:] = [part[rows] for part in value_parts[1:]]
            keys = torch.cat([self.keys[layer][rows, :, :length], *parts], dim=2)
            return keys, torch.cat([self.values[layer][rows, :, :length], *value_parts], dim=2)
        keys, values = self.keys[layer], self.values[layer]
        end = length
        for part, value_part in zip(parts, value_parts):
            keys[:, :, end : end + part.shape[2]] = part
            values[:, :, end : end + part.shape[2]] = value_part
            end += part.shape[2]
        return keys[:, :, :end], values[:, :, :end]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop finished rows (one copy per event, so later passes stop paying for them)."""
        self.pad, self.span, self.lengths = self.pad[rows], self.span[rows], self.lengths[rows]
        self.span_slots, self.span_valid = self.span_slots[rows], self.span_valid[rows]
        for store in (self.keys, self.values, self.span_keys, self.span_values):
            for key in store:
                store[key] = store[key][rows.to(store[key].device)]
