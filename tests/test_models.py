"""Model loading by alias, folder and GGUF file; defaults and errors."""

from __future__ import annotations

import json

import pytest
import torch

from directer import Directer
from directer.models import (
    BUNDLED,
    RANDOM,
    ModelNotFoundError,
    RandomModel,
    UnsupportedModelError,
    cache_dir,
    default_device_dtype,
    load_model,
    load_tokenizer,
)
from pipeline.config import GenerateConfig
from pipeline.run import check_model


def test_alias_is_converted_once_and_cached(smollm2):
    folder = cache_dir() / "models" / "smollm2-135m"
    assert (folder / "config.json").is_file()
    assert smollm2.model.config.num_hidden_layers == 30
    assert smollm2.model.dtype == torch.float32 and smollm2.device.type == "cpu"
    assert 2 in smollm2.eos_token_ids
    assert smollm2.identity == "smollm2-135m@float32"


def test_folder_and_gguf_file_load_the_same_model(smollm2):
    from_folder = load_model(str(cache_dir() / "models" / "smollm2-135m"))
    assert torch.equal(from_folder.model.lm_head.weight, smollm2.model.lm_head.weight)
    from_gguf = load_model(str(BUNDLED["smollm2-135m"].gguf_path()))
    assert torch.allclose(from_gguf.model.model.embed_tokens.weight, smollm2.model.model.embed_tokens.weight)


def test_random_alias_has_the_published_size_and_the_bundled_tokenizer(smollm2):
    random = load_model("smollm2-1.7b-random", device="meta")  # sizes only, no memory
    assert 1.7e9 < sum(p.numel() for p in random.model.parameters()) < 1.72e9
    assert random.model.config.vocab_size == len(smollm2.tokenizer)
    assert random.eos_token_ids == smollm2.eos_token_ids
    assert random.identity == "smollm2-1.7b-random@float32"
    assert load_tokenizer("smollm2-1.7b-random").vocab == smollm2.tokenizer.vocab


def test_random_model_is_seeded_leaves_the_global_generator_alone_and_decodes(smollm2, monkeypatch):
    sizes = (("hidden_size", 64), ("intermediate_size", 128), ("num_hidden_layers", 2),
             ("num_attention_heads", 2), ("num_key_value_heads", 1))  # fmt: skip
    monkeypatch.setitem(RANDOM, "tiny-random", RandomModel("smollm2-135m", sizes))
    state = torch.random.get_rng_state()
    first, second = load_model("tiny-random"), load_model("tiny-random")
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(first.model.lm_head.weight, second.model.lm_head.weight)
    completion = Directer(first).generate("Write a haiku. Use no commas.", "Use no commas.", max_new_tokens=5)
    assert 1 <= len(completion.token_ids) <= 5 and completion.summary.steps == len(completion.token_ids)
    assert sorted(completion.ranking) == [0, 1]  # ranked and steered: both layers


@pytest.mark.parametrize(
    "name", ["no-such-model", "./missing-folder", "missing.gguf", "org/definitely-not-a-model-xyz"]
)
def test_unknown_models_fail_clearly(name):
    with pytest.raises(ModelNotFoundError):
        load_model(name)


def test_default_device_and_dtype():
    device, dtype = default_device_dtype(None, None)
    assert (device.type, dtype) == (("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32))
    assert default_device_dtype("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError, match="unknown dtype"):
        default_device_dtype("cpu", "int8")


def test_quantised_checkpoints_are_refused_before_their_weights_load(smollm2, tmp_path):
    """No quantised model has been checked against the reference: refused, naming the method, by the
    library and by ``generate`` before Ray starts (the folder holds no weights: nothing else could fail)."""
    smollm2.tokenizer.save_pretrained(tmp_path)
    config = smollm2.model.config.to_dict()
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=r"is quantised \(bitsandbytes\)"):
        load_model(str(tmp_path))
    with pytest.raises(UnsupportedModelError, match="unquantised"):
        check_model(GenerateConfig(inputs=("unread.jsonl",), output=str(tmp_path / "out"), model=str(tmp_path)))
