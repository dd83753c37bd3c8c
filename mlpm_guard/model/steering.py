"""Steering vectors for the ``STEER`` route, from the prototypes' own class-mean differences."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..guardrail.policy import SteeringConfig
from ..vocabulary.errors import ConfigError

if TYPE_CHECKING:
    from ..estimator.prototypes import Prototypes


def default_layers(num_layers: int) -> list[int]:
    """The layers 40-75% deep, where steering changes behaviour without breaking fluency."""
    lo, hi = max(1, round(0.4 * num_layers)), max(1, round(0.75 * num_layers))
    return list(range(lo, hi + 1))


def steering_vectors(config: SteeringConfig, *, num_layers: int, prototypes: Prototypes | None = None,
                     vectors: Mapping[int, Sequence[float]] | None = None, device: Any = "cpu",
                     dtype: torch.dtype = torch.float32) -> dict[int, torch.Tensor]:
    """Per-layer vectors to add to the residual stream: ``alpha * (mu_unsafe - mu_safe)``.

    That is ``alpha * s * v`` with ``v`` the unit unsafe-minus-safe direction and ``s`` the
    distance between the class means, so ``alpha = 1`` moves a state one class distance.
    User ``vectors`` (layer id to vector) replace the prototypes' and are scaled by ``alpha`` as given.
    """
    layers = config.layers or (sorted(vectors) if vectors else default_layers(num_layers))
    bad = [layer for layer in layers if not 1 <= layer <= num_layers]
    if bad:
        raise ConfigError(f"steering layers {bad} are outside 1..{num_layers}")
    out: dict[int, torch.Tensor] = {}
    for layer in layers:
        if vectors is not None:
            if layer not in vectors:
                raise ConfigError(f"no steering vector given for layer {layer}; given: {sorted(vectors)}")
            vec = np.asarray(vectors[layer], dtype=np.float64)
        else:
            if prototypes is None or layer not in getattr(prototypes, "steering_layers_", []):
                known = getattr(prototypes, "steering_layers_", [])
                raise ConfigError(f"the prototypes hold no steering direction for layer {layer} (they have {known})")
            vec = prototypes.steering_directions_[prototypes.steering_layers_.index(layer)]
        out[layer] = torch.as_tensor(config.alpha * vec, dtype=dtype, device=device)
    return out


class SteeringCache:
    """The vectors of each steering config, computed once and shared by concurrent requests."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._vectors: dict[SteeringConfig, dict[int, torch.Tensor]] = {}

    def get(self, config: SteeringConfig,
            compute: Callable[[SteeringConfig], dict[int, torch.Tensor]]) -> dict[int, torch.Tensor]:
        with self._lock:
            if config not in self._vectors:
                self._vectors[config] = compute(config)
            return self._vectors[config]
