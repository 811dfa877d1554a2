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
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel


def attention_modules(model: PreTrainedModel) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    layers = model.get_decoder().layers
    return [layer.self_attn for layer in layers]


class AttentionCapture:
    """Records each attention block's input and output during one forward."""

    def __init__(self) -> None:
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
            self.post[index] = output[0] if isinstance(output, tuple) else output

        return hook


def sensitivity(
    raw_pre: list[torch.Tensor],
    raw_post: list[torch.Tensor],
    probe_pre: list[torch.Tensor],
    probe_post: list[torch.Tensor],
) -> torch.Tensor:
    """Sensitivity of each probed layer, accumulated layer by layer (no stacked copies).

    raw_*: per layer ``[N, 1, H]`` (one raw token per row); probe_*: per layer ``[N, P, H]`` (probe
    ``p`` steers layer ``p``). Returns ``[N, P]``.
    """
    total = torch.zeros(())
    for pre, post, steered_pre, steered_post in zip(raw_pre, raw_post, probe_pre, probe_post):
        direct = 1.0 - F.cosine_similarity(pre.float(), steered_post.float(), dim=-1)
        propagated = 1.0 - F.cosine_similarity(post.float(), steered_pre.float(), dim=-1)
        total = total + (direct + propagated).clamp(min=0.0)
    return total / len(raw_pre)


def rank_layers(scores: torch.Tensor) -> torch.Tensor:
    """Layer indices, most sensitive first (ties: lower layer first). ``[N, L] -> [N, L]``."""
    return torch.argsort(-scores, dim=-1, stable=True)
