"""Metric maths checked against scikit-learn on small arrays (no model involved)."""

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    precision_recall_curve,
    roc_curve,
)

from mlpm_guard import Policy
from mlpm_guard.vocabulary.errors import ConfigError
from mlpm_guard.toolkit.metrics import (at_threshold, average_f1, calibration, curves, moderation_metrics,
                                        threshold_for_flag_rate)


def sample(seed: int, n: int = 60, ties: bool = False):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    p = np.clip(0.35 * y + rng.normal(0.35, 0.2, n), 0, 1)
    if ties:
        p = np.round(p, 1)  # many equal scores, the hard case for thresholds
    return y, p


def test_moderation_metrics_keys_and_missing_labels():
    m = moderation_metrics([0, 0, 1, 1], [0.1, 0.6, 0.7, 0.2])
    assert m == {"n": 4, "n_unsafe": 2, "f1": 0.5, "precision": 0.5, "recall": 0.5, "flag_rate_safe": 0.5,
                 "auroc": 0.75}
    only_safe = moderation_metrics([0, 0], [0.1, 0.9])
    assert only_safe["f1"] is None and only_safe["recall"] is None and only_safe["flag_rate_safe"] == 0.5
    only_unsafe = moderation_metrics([1, 1], [0.1, 0.9])
    assert only_unsafe["flag_rate_safe"] is None and only_unsafe["auroc"] is None and only_unsafe["recall"] == 0.5


def test_average_f1_skips_datasets_without_one_and_reads_dotted_keys():
    per = {"a": {"f1": 0.5, "at_target": {"f1": 0.2}}, "b": {"f1": None, "at_target": {"f1": None}},
           "c": {"f1": 1.0, "at_target": {"f1": 0.4}}}
    assert average_f1(per) == 0.75
    assert average_f1(per, "at_target.f1") == pytest.approx(0.3)
    assert average_f1({"b": {"f1": None}}) is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_curves_match_sklearn(seed):
    y, p = sample(seed, ties=seed == 2)
    c = curves(y, p, max_points=10_000)
    fpr, tpr, t = roc_curve(y, p)
    np.testing.assert_allclose(c["roc"]["x"], fpr, atol=1e-5)
    np.testing.assert_allclose(c["roc"]["y"], tpr, atol=1e-5)
    np.testing.assert_allclose(c["roc"]["thresholds"][1:], t[1:], atol=1e-5)  # t[0] is inf in sklearn
    precision, recall, _ = precision_recall_curve(y, p)
    np.testing.assert_allclose(c["pr"]["x"], recall, atol=1e-5)
    np.testing.assert_allclose(c["pr"]["y"], precision, atol=1e-5)
    assert c["auprc"] == pytest.approx(average_precision_score(y, p))


def test_curves_are_thinned_keeping_both_ends_and_need_both_labels():
    y, p = sample(3, n=500)
    full = curves(y, p, max_points=100_000)
    thin = curves(y, p, max_points=20)
    for kind in ("roc", "pr"):
        assert len(thin[kind]["x"]) <= 20
        assert thin[kind]["x"][0] == full[kind]["x"][0] and thin[kind]["x"][-1] == full[kind]["x"][-1]
        assert set(zip(thin[kind]["x"], thin[kind]["y"])) <= set(zip(full[kind]["x"], full[kind]["y"]))
    assert curves([1, 1, 1], [0.2, 0.5, 0.9]) is None
    assert curves([0, 0], [0.2, 0.5]) is None


@pytest.mark.parametrize("n_bins", [1, 5, 10])
@pytest.mark.parametrize("seed", [0, 4])
def test_calibration_matches_sklearn(seed, n_bins):
    y, p = sample(seed)
    p[:3] = [0.0, 1.0, 0.5]  # edges: sklearn puts a score on an inner edge in the lower bin
    cal = calibration(y, p, n_bins=n_bins)
    frac, mean_p = calibration_curve(y, p, n_bins=n_bins, strategy="uniform")
    np.testing.assert_allclose(cal["fraction_unsafe"], frac, atol=1e-5)
    np.testing.assert_allclose(cal["mean_predicted"], mean_p, atol=1e-5)
    assert sum(cal["count"]) == len(y)
    counts = np.array(cal["count"])
    assert cal["ece"] == pytest.approx(float(np.sum(counts / len(y) * np.abs(frac - mean_p))))
    assert cal["brier"] == pytest.approx(brier_score_loss(y, p))


def test_calibration_of_perfect_and_constant_scores():
    assert calibration([0, 1, 1], [0.0, 1.0, 1.0])["ece"] == 0.0
    cal = calibration([0, 0, 1, 1], [0.5] * 4, n_bins=10)
    assert cal["count"] == [4] and cal["ece"] == pytest.approx(0.0) and cal["brier"] == pytest.approx(0.25)
    cal = calibration([0, 0, 0, 0], [0.9] * 4)
    assert cal["ece"] == pytest.approx(0.9)
    with pytest.raises(ConfigError, match="n_bins"):
        calibration([0, 1], [0.1, 0.9], n_bins=0)


@pytest.mark.parametrize("rate", [0.0, 0.05, 0.1, 0.25, 0.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_threshold_for_flag_rate_is_the_best_roc_point_within_the_rate(seed, rate):
    y, p = sample(seed, ties=seed == 2)
    benign = p[y == 0]
    t = threshold_for_flag_rate(benign, rate)
    flag_rate = float(np.mean(benign >= t))
    assert flag_rate <= rate
    # No lower threshold keeps the rate: the highest recall sklearn's ROC allows at fpr <= rate.
    fpr, tpr, _ = roc_curve(y, p)
    best_recall = tpr[fpr <= rate + 1e-12].max()
    assert float(np.mean(p[y == 1] >= t)) == pytest.approx(best_recall)
    # The same rule as a policy calibrated on that benign set, so the number can be deployed.
    assert t == Policy().calibrated(benign, max_flag_rate=rate).unsafe_at


def test_threshold_for_flag_rate_rejects_bad_input():
    with pytest.raises(ConfigError, match="empty"):
        threshold_for_flag_rate([], 0.05)
    with pytest.raises(ConfigError, match="target_flag_rate"):
        threshold_for_flag_rate([0.1], 1.0)


def test_at_threshold_is_moderation_metrics_at_that_threshold():
    y, p = sample(5)
    m = moderation_metrics(y, p, 0.42)
    assert at_threshold(y, p, 0.42) == {"threshold": 0.42, **{k: m[k] for k in ("f1", "precision", "recall",
                                                                                  "flag_rate_safe")}}
