"""Shared fixtures: the bundled model, tiny random-weight models of several architectures, IFEval rows."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
import transformers

IFEVAL = Path(__file__).resolve().parents[1] / "directer" / "data" / "ifeval"

ARCHITECTURES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"]


def tiny_model(architecture: str, seed: int = 0) -> transformers.PreTrainedModel:
    """An 8-layer random-weight model; weights large enough that its distributions are not flat."""
    common = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        initializer_range=0.2,
        eos_token_id=1,
        bos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    configs = {
        "llama": lambda: transformers.LlamaConfig(**common),
        "mistral": lambda: transformers.MistralConfig(**common, sliding_window=12),
        "qwen2": lambda: transformers.Qwen2Config(**common),
        "qwen3": lambda: transformers.Qwen3Config(**common),
        "gemma2": lambda: transformers.Gemma2Config(
            **common,
            sliding_window=12,
            attn_logit_softcapping=20.0,
            final_logit_softcapping=15.0,
            query_pre_attn_scalar=16,
        ),
        "gemma3": lambda: transformers.Gemma3TextConfig(**common, sliding_window=12, query_pre_attn_scalar=16),
    }
    config = configs[architecture]()
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def smollm2():
    from directer.models import load_model

    return load_model("smollm2-135m", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def ifeval_rows() -> list[dict]:
    prompts = [json.loads(line) for line in (IFEVAL / "input_data.jsonl").read_text().splitlines()]
    spans = {
        row["key"]: row["instruction_spans"]
        for row in map(json.loads, (IFEVAL / "instruction_spans.jsonl").read_text().splitlines())
    }
    return [dict(row, instruction_spans=spans[row["key"]]) for row in prompts]
