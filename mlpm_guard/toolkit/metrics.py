"""Moderation metrics with unsafe as the positive class (pure functions over labels and scores).

Everything here is numpy/scikit-learn maths with no model in sight, so the evaluation code and
the tests can check it on small arrays. Fractions are in [0, 1]; a metric that needs a label the
data lacks is ``None`` rather than a misleading 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from ..vocabulary.errors import ConfigError


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


def average_f1(per_dataset: dict[str, dict[str, Any]], key: str = "f1") -> float | None:
    """Mean F1 over the datasets that have one (a dotted ``key`` such as ``"at_target.f1"`` picks another F1)."""
    values = [v for m in per_dataset.values() if (v := _dig(m, key)) is not None]
    return float(np.mean(values)) if values else None


def _dig(mapping: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(part)  # type: ignore[assignment]
    return mapping


def threshold_for_flag_rate(benign_scores: Sequence[float], target_flag_rate: float) -> float:
    """The lowest threshold that flags at most ``target_flag_rate`` of a benign set.

    A prompt is flagged when its score is at or above the threshold, so the threshold sits just
    above the ``floor(rate * n) + 1``-th highest benign score; any lower threshold would flag one
    benign prompt too many. This is the rule :meth:`mlpm_guard.Policy.calibrated` applies, so a
    threshold reported by ``eval`` can be deployed as a policy's ``unsafe_at`` unchanged.

    Raises:
        ConfigError: for an empty benign set or a rate outside [0, 1).
    """
    scores = np.sort(np.asarray(benign_scores, dtype=np.float64))
    if scores.size == 0:
        raise ConfigError("`benign_scores` is empty; the target flag rate needs at least one benign prompt")
    if not 0 <= target_flag_rate < 1:
        raise ConfigError(f"`target_flag_rate` must be in [0, 1), got {target_flag_rate}")
    allowed = int(np.floor(target_flag_rate * scores.size))
    t = scores[scores.size - allowed - 1]
    # Policies keep thresholds inside (0, 1); the same clip here keeps the two numbers identical.
    return float(min(max(np.nextafter(t, np.inf), 1e-6), 1 - 1e-6))


def _thin(x: np.ndarray, y: np.ndarray, t: np.ndarray, max_points: int) -> dict[str, list[float]]:
    """Keep at most ``max_points`` points of a curve (always the ends), rounded for a small JSON file."""
    if len(x) > max_points:
        keep = np.unique(np.linspace(0, len(x) - 1, max_points).round().astype(int))
        x, y, t = x[keep], y[keep], t[keep]
    return {"x": _rounded(x), "y": _rounded(y), "thresholds": _rounded(t)}


def _rounded(a: np.ndarray) -> list[float]:
    # Infinite thresholds (roc_curve's first point) do not exist in JSON; 1.0 is where no score reaches.
    return [round(float(v), 5) for v in np.clip(np.nan_to_num(a, posinf=1.0, neginf=0.0), -1e9, 1e9)]


def curves(y_true: Sequence[int], p_unsafe: Sequence[float], *, max_points: int = 101) -> dict[str, Any] | None:
    """ROC and precision-recall curves, ``None`` unless both labels occur.

    Returns:
        ``{"roc": {"x": fpr, "y": tpr, "thresholds"}, "pr": {"x": recall, "y": precision,
        "thresholds"}, "auprc": average precision}`` with at most ``max_points`` points per curve.
    """
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(p_unsafe, dtype=np.float64)
    if len(np.unique(y)) < 2:
        return None
    fpr, tpr, t_roc = roc_curve(y, p)
    precision, recall, t_pr = precision_recall_curve(y, p)
    # precision_recall_curve has one more point than thresholds (recall 0 at the top end).
    t_pr = np.append(t_pr, 1.0)
    return {"roc": _thin(fpr, tpr, t_roc, max_points), "pr": _thin(recall, precision, t_pr, max_points),
            "auprc": float(average_precision_score(y, p))}


def calibration(y_true: Sequence[int], p_unsafe: Sequence[float], *, n_bins: int = 10) -> dict[str, Any]:
    """Reliability curve, expected calibration error and Brier score.

    Scores are put in ``n_bins`` equal-width bins of [0, 1] (the bins of
    ``sklearn.calibration.calibration_curve(strategy="uniform")``); empty bins are left out.

    Returns:
        ``mean_predicted`` and ``fraction_unsafe`` per non-empty bin, ``count`` per bin,
        ``ece`` (count-weighted mean of ``|fraction_unsafe - mean_predicted|``) and ``brier``
        (mean squared error of the scores against the labels).
    """
    if n_bins < 1:
        raise ConfigError(f"`n_bins` must be at least 1, got {n_bins}")
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(p_unsafe, dtype=np.float64)
    if y.size == 0:
        raise ConfigError("calibration needs at least one scored prompt")
    # calibration_curve's binning: edges at linspace(0, 1, n_bins + 1), right edge inclusive.
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.searchsorted(edges[1:-1], p)
    count = np.bincount(bins, minlength=n_bins)
    sum_p = np.bincount(bins, weights=p, minlength=n_bins)
    sum_y = np.bincount(bins, weights=y, minlength=n_bins)
    full = count > 0
    mean_p, frac = sum_p[full] / count[full], sum_y[full] / count[full]
    ece = float(np.sum(count[full] / y.size * np.abs(frac - mean_p)))
    return {"mean_predicted": _rounded(mean_p), "fraction_unsafe": _rounded(frac), "count": count[full].tolist(),
            "ece": ece, "brier": float(np.mean((p - y) ** 2))}


def at_threshold(y_true: Sequence[int], p_unsafe: Sequence[float], threshold: float) -> dict[str, Any]:
    """F1, precision, recall and safe flag rate at one threshold (the subset of :func:`moderation_metrics`)."""
    m = moderation_metrics(y_true, p_unsafe, threshold)
    return {"threshold": float(threshold), **{k: m[k] for k in ("f1", "precision", "recall", "flag_rate_safe")}}


def rate(hits: int, total: int) -> float | None:
    """``hits / total``, or ``None`` when there is nothing to count."""
    return float(hits / total) if total else None
