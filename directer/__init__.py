"""Directer: instruction following by activation steering with dynamic rejection (ICLR 2026)."""

from directer.api import Completion, Directer
from directer.config import SteeringConfig
from directer.engine import Engine, Generation, Request, SteeringSummary, StepTelemetry
from directer.models import DEFAULT_MODEL, LoadedModel, ModelNotFoundError, load_model
from directer.prompts import Prompt, PromptError, SpanError, build_prompt

__all__ = [
    "DEFAULT_MODEL",
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
    "SteeringSummary",
    "StepTelemetry",
    "build_prompt",
    "load_model",
]
