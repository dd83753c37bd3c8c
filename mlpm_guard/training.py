"""Fitting prototypes on labelled files, and the default prototypes fitted on the built-in seed set."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ._io import cache_home
from .data import Example, cap_per_source, load_examples, seed_examples
from .errors import DataError
from .features import FeatureCache, extract
from .prototypes import Prototypes

logger = logging.getLogger(__name__)

# Chosen on held-out sources (see benchmarks/quality.py and the README's quality table).
DEFAULT_PARAMS: dict[str, Any] = {"C": 1.0}
HELD_OUT_SPLITS = ("test",)


def load_training_examples(paths: Sequence[str | Path], *, max_per_source: int | None = None,
                           seed: int = 0, exclude_splits: Sequence[str] = HELD_OUT_SPLITS,
                           with_seed_set: bool = True) -> list[Example]:
    """Read labelled files for fitting: rows of a held-out split (``test``) are left out, the
    built-in seed set joins as one more source (``with_seed_set``), then each source is capped at
    ``max_per_source`` with its labels balanced.

    The seed set carries what public data rarely has: benign look-alikes written next to the
    harmful requests they resemble ("how do I kill a Python process"). Fitted along with the
    user's files it lowers the false flags on look-alikes held out from the fit (F1 0.72 -> 0.79
    and 39% -> 32% flagged, leave-one-source-out over the shared data, ``benchmarks/quality.py``).
    """
    examples: list[Example] = []
    for path in paths:
        rows = [e for e in load_examples(path) if e.split not in exclude_splits]
        if not rows:
            raise DataError(f"{path}: every row is in a held-out split {tuple(exclude_splits)}; nothing to fit on")
        examples.extend(rows)
    if with_seed_set:
        examples.extend(seed_examples())
    return training_mix(examples, max_per_source=max_per_source, seed=seed)


def training_mix(examples: Sequence[Example], *, max_per_source: int | None = None, seed: int = 0) -> list[Example]:
    """The examples a fit uses: each source capped at ``max_per_source`` with its labels balanced.

    ``load_training_examples`` and the quality benchmark both go through here, so the benchmark
    measures exactly what ``mlpm-guard fit`` does.
    """
    return cap_per_source(examples, max_per_source, seed)


def fit_examples(backbone: Any, examples: Sequence[Example], *, states: np.ndarray | None = None,
                 cache: FeatureCache | bool = True, progress: bool = True, **params: Any) -> Prototypes:
    """Extract (cached) states for ``examples`` and fit :class:`Prototypes` on them.

    Args:
        states: the examples' states for the candidate layers, if already at hand (shape
            (len(examples), n_layers, hidden_size)); otherwise they are extracted.
        params: :class:`Prototypes` parameters over :data:`DEFAULT_PARAMS`.
    """
    merged = {**DEFAULT_PARAMS, **params}
    layers = list(merged.get("layers") or range(1, backbone.num_layers + 1))
    if states is None:
        states = extract(backbone, [e.prompt for e in examples], layers, cache=cache, progress=progress,
                         desc="fit: hidden states")
    merged["layers"] = layers
    return Prototypes(**merged).fit(states, [e.label for e in examples], backbone=backbone,
                                    sources=[e.source for e in examples],
                                    categories=[e.category for e in examples])


def _seed_digest() -> str:
    ref = resources.files("mlpm_guard") / "resources" / "seed_prompts.jsonl"
    return hashlib.sha256(ref.read_bytes()).hexdigest()[:12]


def default_prototypes(backbone: Any, *, progress: bool = True) -> Prototypes:
    """Prototypes fitted on the built-in seed set for ``backbone``: loaded from the cache, or
    fitted on first use (then cached)."""
    from . import __version__
    from .prototype_file import FORMAT_VERSION

    params = hashlib.sha256(repr(sorted(DEFAULT_PARAMS.items())).encode()).hexdigest()[:8]
    name = f"seed-{backbone.fingerprint}-{_seed_digest()}-{params}-v{__version__}-f{FORMAT_VERSION}"
    folder = cache_home() / "prototypes" / name
    if (folder / "prototypes.json").is_file():
        return Prototypes.load(folder, backbone=backbone)
    logger.info("fitting the default prototypes on the built-in seed set (first use only)")
    prototypes = fit_examples(backbone, seed_examples(), progress=progress)
    prototypes.save(folder)
    return prototypes
