"""mlpm-guard for LlamaIndex retrieval: a node postprocessor that drops or flags retrieved nodes
the guard judges unsafe as content, and the instrumentation events every guarded piece dispatches.

:class:`MLPMGuardNodePostprocessor` takes a :class:`mlpm_guard.Guard`, or none for the process's
shared default (:func:`mlpm_guard.default_guard`, built on first use).
"""

from .base import MLPMGuardNodePostprocessor
from .common import METADATA_KEY
from .events import GuardDecisionEvent, GuardNodesEvent

__all__ = ["METADATA_KEY", "GuardDecisionEvent", "GuardNodesEvent", "MLPMGuardNodePostprocessor"]
