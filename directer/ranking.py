"""The one-time layer ranking: how much does steering layer l disturb the attention blocks?

For every layer ``l`` a probe runs the first decoding token with instruction keys scaled in layer
``l`` only. At every layer ``j`` we compare the attention block's input ``pre_j`` (the normed hidden
state entering self-attention) and output ``post_j`` between the raw pass and the probe:

    D_j(l) = (1 - cos(pre_j_raw, post_j_probe)) + (1 - cos(post_j_raw, pre_j_probe)),

clamped at 0 and averaged over tokens. Two orders are built from this ``L x L`` matrix, largest first
(ties: lower layer first):

- ``caused`` (the paper's formula): ``Sensitivity(l) = mean_j D_j(l)``, the disturbance steering
  layer ``l`` causes;
- ``received`` (the authors' released code, ``src/generator.py``, ``_rank_layers``: ``per_layer =
  attn_mat.mean(dim=0)`` over the probes): ``mean_l D_j(l)``, the disturbance layer ``j`` receives.
  Their ``torch.argsort`` is not stable, so exact ties (probes that see no scaled key) may come out
  in another order there.

The paper subtracts a baseline ``dist(pre_j, post_j)`` twice. It is the same for every probe ``l``,
so it cannot change the ``caused`` order; it differs between layers ``j`` and would change the
``received`` order, but the authors' code does not subtract it, so neither do we.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from directer.cache import KVCache
from directer.config import Ranking
from directer.passes import ForwardPass, Kernel


def attention_modules(model: PreTrainedModel) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    layers = model.get_decoder().layers
    return [layer.self_attn for layer in layers]


class AttentionCapture:
    """Records each attention block's input and output during one forward, ``[1, T, H]``, or only the
    packed ``tokens`` given (a pass that also prefills prompts would otherwise keep ``2 × layers``
    hidden states of every prompt token); with ``on_layer``, hands them to it as each block finishes
    and keeps only the inputs until then (the ranking probes of a batch would otherwise hold
    ``2 × layers`` hidden states per probe at once)."""

    def __init__(
        self,
        on_layer: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
        tokens: torch.Tensor | None = None,
    ) -> None:
        self.on_layer = on_layer
        self.tokens = tokens
        self._kept_buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._devices: list[torch.device] = []
        self.pre: list[torch.Tensor | None] = []
        self.post: list[torch.Tensor | None] = []

    @contextlib.contextmanager
    def recording(self, model: PreTrainedModel) -> Iterator[AttentionCapture]:
        modules = attention_modules(model)
        self.pre = [None] * len(modules)
        self.post = [None] * len(modules)
        if self.tokens is not None:  # where each layer's kept tokens go (a model split over devices)
            self._devices = [next(module.parameters()).device for module in modules]
        handles = []
        for index, module in enumerate(modules):
            handles.append(module.register_forward_pre_hook(self._pre_hook(index), with_kwargs=True))
            handles.append(module.register_forward_hook(self._post_hook(index)))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _kept(self, index: int, side: int, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` or its ``tokens``, copied to buffers made for every layer at the first block: made
        amid the pass's large transient tensors one by one, they would keep the allocator from giving
        that memory back (measured: 60-100 MB more peak memory in a third of the runs)."""
        if self.tokens is None:
            return hidden
        if not self._kept_buffers:
            shape = (1, len(self.tokens), hidden.shape[-1])
            self._kept_buffers = [
                (hidden.new_empty(shape, device=device), hidden.new_empty(shape, device=device))
                for device in self._devices
            ]
        return torch.index_select(hidden, 1, self.tokens.to(hidden.device), out=self._kept_buffers[index][side])

    def _pre_hook(self, index: int):
        def hook(module, args, kwargs):
            self.pre[index] = self._kept(index, 0, kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

        return hook

    def _post_hook(self, index: int):
        def hook(module, args, output):
            post = self._kept(index, 1, output[0] if isinstance(output, tuple) else output)
            if self.on_layer is None:
                self.post[index] = post
            else:
                self.on_layer(index, self.pre[index], post)
                self.pre[index] = None

        return hook


def disturbance(
    pre: torch.Tensor, post: torch.Tensor, steered_pre: torch.Tensor, steered_post: torch.Tensor
) -> torch.Tensor:
    """``D_j`` at one layer: raw ``pre``/``post`` ``[N, 1, H]`` (one raw token per row) against the probes'
    ``[N, P, H]``. Returns ``[N, P]``."""
    direct = 1.0 - F.cosine_similarity(pre.float(), steered_post.float(), dim=-1)
    propagated = 1.0 - F.cosine_similarity(post.float(), steered_pre.float(), dim=-1)
    return (direct + propagated).clamp(min=0.0)


class Disturbances:
    """The matrix ``D[n, l, j]`` of each row ``n``, filled column by column as the probes' forward reaches
    each layer ``j`` (pass :meth:`add` as an :class:`AttentionCapture`'s ``on_layer``).

    raw_*: per layer ``[N, 1, H]``; probes: ``P`` per row, packed row after row (probe ``p`` steers layer ``p``).
    """

    def __init__(self, raw_pre: list[torch.Tensor], raw_post: list[torch.Tensor]) -> None:
        self.raw_pre, self.raw_post = raw_pre, raw_post
        self.columns: list[torch.Tensor] = []

    def add(self, layer: int, pre: torch.Tensor, post: torch.Tensor) -> None:
        rows = len(self.raw_pre[layer])
        steered_pre, steered_post = pre.reshape(rows, -1, pre.shape[-1]), post.reshape(rows, -1, post.shape[-1])
        self.columns.append(disturbance(self.raw_pre[layer], self.raw_post[layer], steered_pre, steered_post))

    def matrix(self) -> torch.Tensor:
        """``[N, P, L]``: probe ``l`` (row of the matrix), measured at layer ``j`` (column)."""
        device = self.columns[0].device  # a model split over GPUs: the first layer's
        return torch.stack([column.to(device) for column in self.columns], dim=-1)


def layer_scores(matrix: torch.Tensor, ranking: Ranking) -> torch.Tensor:
    """``[N, L]`` score of each layer: the mean disturbance it causes (over the layers measured) or
    receives (over the probes)."""
    return matrix.mean(dim=-1) if ranking == "caused" else matrix.mean(dim=-2)


def rank_layers(scores: torch.Tensor) -> torch.Tensor:
    """Layer indices, most sensitive first (ties: lower layer first). ``[N, L] -> [N, L]``."""
    return torch.argsort(-scores, dim=-1, stable=True)


def probe_rankings(
    forward: Callable[..., torch.Tensor],
    model: PreTrainedModel,
    cache: KVCache,
    rows: torch.Tensor,
    tokens: torch.Tensor,
    raw: AttentionCapture,
    key_scale: float,
    rule: Ranking,
    kernel: Kernel,
) -> torch.Tensor:
    """The layer order ``[R, L]`` of each row in ``rows`` (cache rows at their first step, whose raw pass
    wrote the token's slot and ``raw`` recorded, the rows' tokens only, in order): one packed pass with
    one probe per layer and row, each reading the slots before that token."""
    num_layers = len(raw.pre)
    steer = torch.eye(num_layers, dtype=torch.bool, device=rows.device).expand(len(rows), -1, -1)
    slots = (cache.lengths[rows] - 1).repeat_interleave(num_layers)
    probe = ForwardPass(
        cache, rows=rows, variants=num_layers, slots=slots, steer=steer, key_scale=key_scale, kernel=kernel
    )
    raw_pre, raw_post = ([t[0, :, None] for t in captured] for captured in (raw.pre, raw.post))
    probes = Disturbances(raw_pre, raw_post)
    with AttentionCapture(on_layer=probes.add).recording(model):
        positions = slots - cache.pad[rows].repeat_interleave(num_layers)
        forward(tokens.repeat_interleave(num_layers), positions, probe, logits=False)
    # a probe that sees none of the scaled keys in its layer (all outside a sliding window, or the span
    # is the current token alone) computes exactly the raw pass: give it exactly the raw pass's
    # disturbances, so such layers tie as they do in the reference, whatever the rounding of the
    # batched products
    unsteered = Disturbances(raw_pre, raw_post)
    for layer in range(num_layers):
        unsteered.add(layer, raw_pre[layer], raw_post[layer])
    reached = torch.stack([probe.reaches[layer][:, layer].to(rows.device) for layer in range(num_layers)], dim=1)
    matrix = torch.where(reached[:, :, None], probes.matrix().to(rows.device), unsteered.matrix().to(rows.device))
    return rank_layers(layer_scores(matrix, rule))
