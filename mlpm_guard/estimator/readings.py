"""What prototypes read of a prompt's hidden states: a layer at a pooling.

- ``"last"``: the state of the last token (the end of the generation prompt), what the model is
  about to answer from;
- ``"mean"``: the mean state over every token after the chat template's shared opening (the
  request itself, from its first token to the generation prompt), so a request is not only
  judged by the one position the template ends on.

Arrays of states are pooling-major: for layers ``(l1, .., lk)`` read at poolings
``("last", "mean")`` their columns are ``[last l1 .. last lk, mean l1 .. mean lk]``
(:func:`layout`); :func:`select` picks the columns of fewer layers out of such an array.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from ..vocabulary.errors import ConfigError

#: The poolings a backbone can read, in the order they lie in an array of states.
POOLINGS = ("last", "mean")

#: The ``pooling`` settings of :class:`~mlpm_guard.Prototypes` and what each reads.
POOLING_SETTINGS = {"last": ("last",), "last+mean": ("last", "mean")}


class Reading(NamedTuple):
    """One input of the prototypes: the state of ``layer`` at ``pooling``."""

    layer: int
    pooling: str = "last"

    @property
    def key(self) -> int | str:
        """The reading's key in ``Verdict.layer_scores``: the layer id for a last-token reading
        (as before pooled readings existed), ``"mean <layer>"`` for a pooled one."""
        return self.layer if self.pooling == "last" else f"{self.pooling} {self.layer}"


def poolings_of(setting: str) -> tuple[str, ...]:
    """The poolings a ``pooling`` setting reads (``"last"`` or ``"last+mean"``)."""
    try:
        return POOLING_SETTINGS[setting]
    except (KeyError, TypeError):
        raise ConfigError(f"`pooling` must be one of {sorted(POOLING_SETTINGS)}, got {setting!r}") from None


def check_poolings(poolings: Sequence[str]) -> tuple[str, ...]:
    """Poolings as a tuple of known names (:data:`POOLINGS`), in the order given, each once."""
    out = tuple(poolings)
    if not out or len(set(out)) != len(out) or not set(out) <= set(POOLINGS):
        raise ConfigError(f"`poolings` must be distinct names from {POOLINGS}, got {list(out)}")
    return out


def layout(layers: Sequence[int], poolings: Sequence[str]) -> list[Reading]:
    """The readings behind the columns of an array of states of ``layers`` at ``poolings``."""
    return [Reading(int(layer), pooling) for pooling in poolings for layer in layers]


def columns(readings: Sequence[Reading], layers: Sequence[int], poolings: Sequence[str]) -> list[int]:
    """Where each of ``readings`` lies in an array of states of ``layers`` at ``poolings``."""
    index = {r: i for i, r in enumerate(layout(layers, poolings))}
    missing = [r for r in readings if r not in index]
    if missing:
        raise ConfigError(f"readings {missing} are not in states of layers {list(layers)} at poolings {list(poolings)}")
    return [index[r] for r in readings]


def select(H: np.ndarray, have: Sequence[int], want: Sequence[int], poolings: Sequence[str]) -> np.ndarray:
    """The columns of layers ``want`` out of states ``H`` of layers ``have`` (both at ``poolings``)."""
    return H[:, columns(layout(want, poolings), have, poolings)]
