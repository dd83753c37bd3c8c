"""mlpm-guard: a guardrail that reads a local LLM's own hidden states (multi-layer latent prototypes)."""

from ._version import __version__
from .answers import Answer, ExternalSystem
from .backbone import Backbone, BackboneConfig
from .decision_log import Correction, DecisionLog, DecisionLogSettings
from .defaults import default_guard
from .embedding import content_embeddings
from .errors import (
    BackboneLoadError,
    BackboneMismatchError,
    ConfigError,
    DataError,
    InputError,
    InputTypeError,
    MlpmGuardError,
    NotFittedError,
    PrototypeFileError,
)
from .generation import GenerationConfig
from .guard import Guard, as_policy
from .loading import resolve_dtype  # public for benchmarks: the dtype "auto" picks on a device
from .moderation import Moderator, PrototypeModerator, to_verdict
from .policy import OutputModerationConfig, Policy, SteeringConfig
from .presets import PRESETS, policy_preset
from .prototypes import Prototypes
from .types import Decision, GuardChunk, GuardResult, Route, Tier, Timings, Verdict
from .verdicts import make_verdict, tier_of

__all__ = [
    "Answer",
    "Backbone",
    "BackboneConfig",
    "BackboneLoadError",
    "BackboneMismatchError",
    "ConfigError",
    "Correction",
    "DataError",
    "Decision",
    "DecisionLog",
    "DecisionLogSettings",
    "ExternalSystem",
    "GenerationConfig",
    "Guard",
    "GuardChunk",
    "GuardResult",
    "InputError",
    "InputTypeError",
    "MlpmGuardError",
    "Moderator",
    "NotFittedError",
    "OutputModerationConfig",
    "PRESETS",
    "Policy",
    "PrototypeFileError",
    "PrototypeModerator",
    "Prototypes",
    "Route",
    "SteeringConfig",
    "Tier",
    "Timings",
    "Verdict",
    "__version__",
    "as_policy",
    "content_embeddings",
    "default_guard",
    "resolve_dtype",
    "to_verdict",
    "make_verdict",
    "policy_preset",
    "tier_of",
]
