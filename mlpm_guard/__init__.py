"""mlpm-guard: a guardrail that reads a local LLM's own hidden states (multi-layer latent prototypes)."""

from ._version import __version__
from .estimator.prototypes import Prototypes
from .guardrail.answers import Answer, ExternalSystem
from .guardrail.decision_log import Correction, DecisionLog, DecisionLogSettings
from .guardrail.defaults import default_guard
from .guardrail.guard import Guard, as_policy
from .guardrail.moderation import Moderator, PrototypeModerator, to_verdict
from .guardrail.policy import OutputModerationConfig, Policy, SteeringConfig
from .guardrail.presets import PRESETS, policy_preset
from .model.backbone import Backbone, BackboneConfig
from .model.embedding import content_embeddings
from .model.generation import GenerationConfig
from .model.loading import resolve_dtype  # public for benchmarks: the dtype "auto" picks on a device
from .vocabulary.errors import (
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
from .vocabulary.types import Decision, GuardChunk, GuardResult, Route, Tier, Timings, Verdict
from .vocabulary.verdicts import make_verdict, tier_of

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
