"""Running prototypes over labelled files and writing ``metrics.json``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._io import atomic_write_text
from .data import Example, load_examples
from .errors import DataError
from .features import FeatureCache, extract
from .metrics import average_f1, moderation_metrics
from .prototypes import Prototypes


def load_eval_sets(paths: Sequence[str | Path], *, split: str | None = None) -> dict[str, list[Example]]:
    """Read evaluation files keyed by file stem; with ``split``, keep only rows of that split."""
    sets: dict[str, list[Example]] = {}
    for path in paths:
        stem = Path(path).stem
        if stem in sets:
            raise DataError(f"{path}: another file is also named {stem!r}; eval keys datasets by file name")
        rows = load_examples(path)
        if split is not None:
            rows = [e for e in rows if e.split == split]
            if not rows:
                raise DataError(f"{path}: no rows with split {split!r}")
        sets[stem] = rows
    return sets


def evaluate(prototypes: Prototypes, datasets: dict[str, Sequence[Example]], *,
             cache: FeatureCache | bool = True, progress: bool = True) -> dict[str, Any]:
    """Score every dataset and return the ``metrics.json`` structure (plus per-row scores under ``_scores``)."""
    backbone = prototypes.backbone
    per_dataset: dict[str, dict[str, Any]] = {}
    scores: dict[str, list[float]] = {}
    for name, rows in datasets.items():
        H = extract(backbone, [e.prompt for e in rows], prototypes.layer_ids_, cache=cache, progress=progress,
                    desc=f"eval {name}")
        p = prototypes.predict_proba(H)
        per_dataset[name] = moderation_metrics([e.label for e in rows], p, prototypes.threshold_)
        scores[name] = p.tolist()
    return {
        "datasets": per_dataset,
        "avg_f1": average_f1(per_dataset),
        "threshold": prototypes.threshold_,
        "layers": prototypes.layer_ids_,
        "backbone": backbone.name if backbone is not None else None,
        "_scores": scores,
    }


def write_metrics(result: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``metrics.json`` (without the per-row scores) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    public = {k: v for k, v in result.items() if not k.startswith("_")}
    atomic_write_text(out / "metrics.json", json.dumps(public, indent=2))
    return out / "metrics.json"
