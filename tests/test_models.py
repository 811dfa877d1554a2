"""Model loading by alias, folder and GGUF file; defaults and errors."""

from __future__ import annotations

import pytest
import torch

from directer.models import BUNDLED, ModelNotFoundError, cache_dir, default_device_dtype, load_model


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
