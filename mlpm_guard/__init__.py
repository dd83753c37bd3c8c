"""mlpm-guard: a guardrail that reads a local LLM's own hidden states (multi-layer latent prototypes)."""

__version__ = "0.1.0"

from .backbone import Backbone, BackboneConfig
from .errors import (
    BackboneLoadError,
    BackboneMismatchError,
    ConfigError,
    DataError,
    InputError,
    MlpmGuardError,
    NotFittedError,
    PrototypeFileError,
)
from .prototypes import Prototypes
from .types import Tier, Verdict

__all__ = [
    "Backbone",
    "BackboneConfig",
    "BackboneLoadError",
    "BackboneMismatchError",
    "ConfigError",
    "DataError",
    "InputError",
    "MlpmGuardError",
    "NotFittedError",
    "PrototypeFileError",
    "Prototypes",
    "Tier",
    "Verdict",
    "__version__",
]
