"""The one-time layer ranking: how much does steering layer l disturb the attention blocks?

For every layer ``l`` a probe runs the first decoding token with instruction keys scaled in layer
``l`` only. At every layer ``j`` we compare the attention block's input ``pre_j`` (the normed hidden
state entering self-attention) and output ``post_j`` between the raw pass and the probe:

    D_j(l) = (1 - cos(pre_j_raw, post_j_probe)) + (1 - cos(post_j_raw, pre_j_probe)),

clamped at 0 and averaged over tokens; ``Sensitivity(l) = mean_j D_j(l)``. Layers are ranked most
sensitive first. (The paper subtracts a baseline ``dist(pre_j, post_j)`` twice; it is the same for
every ``l`` and does not change the order.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel


def attention_modules(model: PreTrainedModel) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    layers = model.get_decoder().layers
    return [layer.self_attn for layer in layers]


class AttentionCapture:
    """Records each attention block's input and output during one forward; with ``on_layer``, hands
    them to it as each block finishes and keeps only the inputs until then (the ranking probes of a
    batch would otherwise hold ``2 × layers`` hidden states per probe at once)."""

    def __init__(self, on_layer: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> None:
        self.on_layer = on_layer
        self.pre: list[torch.Tensor | None] = []
        self.post: list[torch.Tensor | None] = []

    @contextlib.contextmanager
    def recording(self, model: PreTrainedModel) -> Iterator[AttentionCapture]:
        modules = attention_modules(model)
        self.pre = [None] * len(modules)
        self.post = [None] * len(modules)
        handles = []
        for index, module in enumerate(modules):
            handles.append(module.register_forward_pre_hook(self._pre_hook(index), with_kwargs=True))
            handles.append(module.register_forward_hook(self._post_hook(index)))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _pre_hook(self, index: int):
        def hook(module, args, kwargs):
            self.pre[index] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

        return hook

    def _post_hook(self, index: int):
        def hook(module, args, output):
            post = output[0] if isinstance(output, tuple) else output
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


class Sensitivity:
    """``Sensitivity(l) = mean_j D_j(l)``, summed layer by layer as the probes' forward reaches each
    layer ``j`` (pass :meth:`add` as an :class:`AttentionCapture`'s ``on_layer``).

    raw_*: per layer ``[N, 1, H]``; probes: ``P`` per row, packed row after row (probe ``p`` steers layer ``p``).
    """

    def __init__(self, raw_pre: list[torch.Tensor], raw_post: list[torch.Tensor]) -> None:
        self.raw_pre, self.raw_post = raw_pre, raw_post
        self.total = torch.zeros(())

    def add(self, layer: int, pre: torch.Tensor, post: torch.Tensor) -> None:
        rows = len(self.raw_pre[layer])
        steered_pre, steered_post = pre.reshape(rows, -1, pre.shape[-1]), post.reshape(rows, -1, post.shape[-1])
        self.total = self.total + disturbance(self.raw_pre[layer], self.raw_post[layer], steered_pre, steered_post)

    def scores(self) -> torch.Tensor:
        """``[N, P]``."""
        return self.total / len(self.raw_pre)


def rank_layers(scores: torch.Tensor) -> torch.Tensor:
    """Layer indices, most sensitive first (ties: lower layer first). ``[N, L] -> [N, L]``."""
    return torch.argsort(-scores, dim=-1, stable=True)
