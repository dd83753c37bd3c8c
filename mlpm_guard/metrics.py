"""Moderation metrics with unsafe as the positive class (pure functions over labels and scores)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score


def moderation_metrics(y_true: Sequence[int], p_unsafe: Sequence[float], threshold: float = 0.5) -> dict[str, Any]:
    """Metrics for one dataset.

    Returns:
        ``n``, ``n_unsafe``; ``f1``, ``precision``, ``recall`` (``None`` without unsafe rows);
        ``flag_rate_safe`` (share of safe rows flagged; ``None`` without safe rows); ``auroc``
        (``None`` unless both labels occur). Fractions are in [0, 1].
    """
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(p_unsafe, dtype=np.float64)
    pred = (p >= threshold).astype(np.int64)
    n_unsafe = int(y.sum())
    has_unsafe, has_safe = n_unsafe > 0, n_unsafe < len(y)
    out: dict[str, Any] = {"n": int(len(y)), "n_unsafe": n_unsafe}
    if has_unsafe:
        out["f1"] = float(f1_score(y, pred, zero_division=0.0))
        out["precision"] = float(precision_score(y, pred, zero_division=0.0))
        out["recall"] = float(recall_score(y, pred, zero_division=0.0))
    else:
        out["f1"] = out["precision"] = out["recall"] = None
    out["flag_rate_safe"] = float(pred[y == 0].mean()) if has_safe else None
    out["auroc"] = float(roc_auc_score(y, p)) if has_safe and has_unsafe else None
    return out


def average_f1(per_dataset: dict[str, dict[str, Any]]) -> float | None:
    """Mean F1 over the datasets that have one."""
    values = [m["f1"] for m in per_dataset.values() if m.get("f1") is not None]
    return float(np.mean(values)) if values else None
