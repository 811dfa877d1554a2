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

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``pre`` and ``post`` as ``[num_layers, N, tokens, hidden]`` float32 tensors."""
        pre = torch.stack([t.float() for t in self.pre])
        post = torch.stack([t.float() for t in self.post])
        return pre, post


def sensitivity(
    raw_pre: torch.Tensor, raw_post: torch.Tensor, probe_pre: torch.Tensor, probe_post: torch.Tensor
) -> torch.Tensor:
    """Sensitivity of each probed layer.

    raw_*: ``[J, N, 1, H]`` (one raw token per row); probe_*: ``[J, N, P, H]`` (probe ``p`` steers
    layer ``p``). Returns ``[N, P]``.
    """
    direct = 1.0 - F.cosine_similarity(raw_pre, probe_post, dim=-1)
    propagated = 1.0 - F.cosine_similarity(raw_post, probe_pre, dim=-1)
    disturbance = (direct + propagated).clamp(min=0.0)  # [J, N, P]
    return disturbance.mean(dim=0)


def rank_layers(scores: torch.Tensor) -> torch.Tensor:
    """Layer indices, most sensitive first (ties: lower layer first). ``[N, L] -> [N, L]``."""
    return torch.argsort(-scores, dim=-1, stable=True)
