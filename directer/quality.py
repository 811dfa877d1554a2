"""Quality guards for steered text: fluency under the unsteered model, and repetition."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel


@torch.inference_mode()
def completion_nll(model: PreTrainedModel, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> float | None:
    """Mean negative log-likelihood per completion token under the plain (unsteered) model.

    Oversteering shows up here: tokens the model itself finds implausible raise it.
    """
    if not completion_ids:
        return None
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)], device=model.device)
    logits = model(input_ids=ids[:, :-1], logits_to_keep=len(completion_ids)).logits[0].float()
    targets = ids[0, -len(completion_ids) :]
    return float(torch.nn.functional.cross_entropy(logits, targets))


def distinct_n(text: str, n: int = 2) -> float | None:
    """Share of distinct word n-grams (1.0: no repetition); ``None`` for texts shorter than ``n`` words."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None
