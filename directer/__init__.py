"""Directer: instruction following by activation steering with dynamic rejection (ICLR 2026)."""

from directer.api import Completion, Directer
from directer.config import SteeringConfig
from directer.engine import Engine, Generation, Request
from directer.models import DEFAULT_MODEL, LoadedModel, ModelNotFoundError, load_model
from directer.prompts import Prompt, PromptError, SpanError, build_prompt, prompt_from_row
from directer.spans import find_instruction_spans
from directer.steering import STEERERS, Steerer, register_steerer
from directer.telemetry import SteeringSummary, StepTelemetry

__all__ = [
    "DEFAULT_MODEL",
    "STEERERS",
    "Completion",
    "Directer",
    "Engine",
    "Generation",
    "LoadedModel",
    "ModelNotFoundError",
    "Prompt",
    "PromptError",
    "Request",
    "SpanError",
    "SteeringConfig",
    "Steerer",
    "SteeringSummary",
    "StepTelemetry",
    "build_prompt",
    "find_instruction_spans",
    "load_model",
    "prompt_from_row",
    "register_steerer",
]
