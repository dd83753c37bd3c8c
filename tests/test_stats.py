"""The maths of the prototypes against direct numpy computations."""

import numpy as np
import pytest

from mlpm_guard.estimator import _stats


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 5))
    groups = rng.integers(0, 2, 60)
    X[groups == 1] += 1.5
    return X, groups


def test_group_means_and_counts(data):
    X, g = data
    means, counts = _stats.group_means(X, g, 2)
    for k in range(2):
        np.testing.assert_allclose(means[k], X[g == k].mean(axis=0))
        assert counts[k] == (g == k).sum()


def test_pooled_covariance_is_within_class_scatter(data):
    X, g = data
    means, _ = _stats.group_means(X, g, 2)
    expected = sum((X[g == k] - means[k]).T @ (X[g == k] - means[k]) for k in range(2)) / (len(X) - 1)
    np.testing.assert_allclose(_stats.pooled_covariance(X, g, means), expected)


def test_source_scatter_is_the_part_of_the_within_class_covariance_between_sources(data):
    X, g = data
    sources = np.array(["a", "b", "c"])[np.arange(len(X)) % 3]
    X = X + (sources == "b")[:, None] * 2.0  # source b sits apart within each class
    means, _ = _stats.group_means(X, g, 2)
    pairs = [(s, k) for s in "abc" for k in range(2)]
    within_sources = sum((X[(sources == s) & (g == k)] - X[(sources == s) & (g == k)].mean(0)).T
                         @ (X[(sources == s) & (g == k)] - X[(sources == s) & (g == k)].mean(0)) for s, k in pairs)
    scatter = _stats.source_scatter(X, g, sources, means, min_count=1)
    np.testing.assert_allclose(within_sources / (len(X) - 1) + scatter, _stats.pooled_covariance(X, g, means))
    # Sources smaller than min_count are left out of the scatter.
    assert not _stats.source_scatter(X, g, sources, means, min_count=len(X)).any()


def test_shrunk_precision_formula(data):
    X, g = data
    means, _ = _stats.group_means(X, g, 2)
    S = _stats.pooled_covariance(X, g, means)
    n, d = len(X), X.shape[1]
    expected = d * np.linalg.inv((n - 1) * S + np.trace(S) * np.eye(d))
    np.testing.assert_allclose(_stats.shrunk_precision(S, n), expected)


def test_linear_logits_equal_mahalanobis_softmax(data):
    """The discriminant is the softmax of -1/2 squared Mahalanobis distance: the quadratic term cancels."""
    X, g = data
    means, _ = _stats.group_means(X, g, 2)
    P = _stats.shrunk_precision(_stats.pooled_covariance(X, g, means), len(X))
    W, b = _stats.linear_params(means, P)
    p = _stats.unsafe_probability(X, W, b, np.array([False, True]))
    d2 = np.array([[(x - m) @ P @ (x - m) for m in means] for x in X])
    direct = np.exp(-0.5 * d2[:, 1]) / np.exp(-0.5 * d2).sum(axis=1)
    np.testing.assert_allclose(p, direct, rtol=1e-10)
    np.testing.assert_allclose(_stats.mahalanobis_sq(X, means, P), d2, rtol=1e-9)


def test_a_sharper_prototype_is_a_gaussian_of_the_narrower_covariance(data):
    """Offsets turn the shared-covariance softmax into the one of Gaussians whose covariance is
    the shared one divided by each prototype's sharpness (log densities up to a shared term)."""
    X, g = data
    means, _ = _stats.group_means(X, g, 2)
    P = _stats.shrunk_precision(_stats.pooled_covariance(X, g, means), len(X))
    W, b = _stats.linear_params(means, P)
    sharpness, d = np.array([1.0, 3.0]), X.shape[1]
    offsets = np.zeros((len(X), 2))
    offsets[:, 1:] = _stats.local_offsets(X, X @ W[1:].T + b[1:], P, sharpness[1:])
    p = _stats.unsafe_probability(X, W, b, np.array([False, True]), offsets)
    d2 = np.array([[(x - m) @ P @ (x - m) for m in means] for x in X])
    log_density = -0.5 * sharpness * d2 + 0.5 * d * np.log(sharpness)
    direct = 1.0 / (1.0 + np.exp(log_density[:, 0] - log_density[:, 1]))
    np.testing.assert_allclose(p, direct, rtol=1e-8)
    # Far from its mean a sharper prototype loses where the shared covariance would let it win.
    far = means[1] + 10.0 * (means[1] - means[0])
    plain = _stats.unsafe_probability(far[None], W, b, np.array([False, True]))
    far_offsets = _stats.local_offsets(far[None], far[None] @ W[1:].T + b[1:], P, sharpness[1:])
    sharp = _stats.unsafe_probability(far[None], W, b, np.array([False, True]),
                                      np.concatenate([[[0.0]], far_offsets], axis=1))
    assert plain[0] > 0.99 and sharp[0] < 0.01


def test_merge_covariance_matches_refit(data):
    X, g = data
    old, new = slice(0, 40), slice(40, 60)
    means_all, _ = _stats.group_means(X, g, 2)
    # Pool the old samples around the final means so that only the merge is under test.
    cov_old = _stats.pooled_covariance(X[old], g[old], means_all)
    merged, n = _stats.merge_covariance(cov_old, 40, X[new], means_all, g[new])
    assert n == 60
    np.testing.assert_allclose(merged, _stats.pooled_covariance(X, g, means_all))
