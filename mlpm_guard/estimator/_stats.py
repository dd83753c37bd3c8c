"""The numerical core of the prototypes, in plain numpy.

Per layer the model is a Gaussian mixture with one covariance shared by every prototype
(a prototype is a class mean, or the mean of a named group inside a class). With equal priors
the quadratic term cancels and each prototype's log-density is linear in ``h``:

    logit_k(h) = h . (P mu_k) - 1/2 mu_k . P mu_k

and P(unsafe | h) is the softmax mass of the unsafe prototypes. ``P`` is the shrunk precision
of the MLPM authors, ``P = d * inv((n - 1) S + tr(S) I)`` with ``S`` the pooled within-prototype
covariance of ``n`` samples in ``d`` dimensions.
"""

from __future__ import annotations

import numpy as np


def group_means(X: np.ndarray, groups: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and count of each group.

    Args:
        X: array of shape (n_samples, n_features).
        groups: int array of shape (n_samples,), values in ``range(n_groups)``.

    Returns:
        means of shape (n_groups, n_features) and counts of shape (n_groups,).
    """
    counts = np.bincount(groups, minlength=n_groups).astype(np.int64)
    sums = np.zeros((n_groups, X.shape[1]), dtype=np.float64)
    np.add.at(sums, groups, X)
    means = sums / np.maximum(counts, 1)[:, None]
    return means, counts


def pooled_covariance(X: np.ndarray, groups: np.ndarray, means: np.ndarray) -> np.ndarray:
    """Within-group covariance pooled over all groups: ``sum (x - mu_g)(x - mu_g)^T / (n - 1)``.

    Returns:
        array of shape (n_features, n_features).
    """
    centered = X - means[groups]
    return centered.T @ centered / max(len(X) - 1, 1)


def source_scatter(X: np.ndarray, y: np.ndarray, sources: np.ndarray, class_means: np.ndarray,
                   min_count: int) -> np.ndarray:
    """The part of the within-class covariance that tells training sources apart.

    ``sum n_g (mu_g - mu_c)(mu_g - mu_c)^T / (n - 1)`` over the (source, class) groups ``g`` of at
    least ``min_count`` samples, ``mu_c`` being the mean of the group's class: how far each
    source's mean of a class sits from that class's mean (a source's style or topic: maths
    problems against chat prompts).

    Returns:
        array of shape (n_features, n_features).
    """
    pairs, groups = np.unique(np.stack([np.asarray(sources, dtype=str), y.astype(str)], axis=1),
                              axis=0, return_inverse=True)
    means, counts = group_means(X, groups.reshape(-1), len(pairs))
    big = counts >= min_count
    shifts = means[big] - class_means[pairs[big, 1].astype(np.int64)]
    return (shifts.T * counts[big]) @ shifts / max(len(X) - 1, 1)


def merge_covariance(cov: np.ndarray, n: int, X_new: np.ndarray, new_means: np.ndarray,
                     groups_new: np.ndarray) -> tuple[np.ndarray, int]:
    """Add new samples' within-group scatter to a pooled covariance of ``n`` samples.

    ``new_means`` are the (already updated) means of the groups the new samples belong to.
    Returns the new covariance and sample count.
    """
    m = len(X_new)
    centered = X_new - new_means[groups_new]
    scatter = cov * max(n - 1, 1) + centered.T @ centered
    return scatter / max(n + m - 1, 1), n + m


def shrunk_precision(cov: np.ndarray, n: int) -> np.ndarray:
    """``d * inv((n - 1) * cov + trace(cov) * I)``: the MLPM authors' Bayesian precision estimate."""
    d = cov.shape[0]
    reg = (n - 1) * cov + np.trace(cov) * np.eye(d)
    return d * np.linalg.inv(reg)


def linear_params(means: np.ndarray, precision: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weights (n_protos, d) and biases (n_protos,) of the per-prototype linear logits."""
    W = means @ precision
    b = -0.5 * np.einsum("kd,kd->k", W, means)
    return W, b


def unsafe_probability(X: np.ndarray, W: np.ndarray, b: np.ndarray, unsafe: np.ndarray,
                       offsets: np.ndarray | None = None) -> np.ndarray:
    """Softmax mass of the unsafe prototypes for each row of ``X``.

    Args:
        X: (n_samples, d). W: (n_protos, d). b: (n_protos,). unsafe: bool (n_protos,).
        offsets: (n_samples, n_protos) added to the linear logits (:func:`local_offsets`).

    Returns:
        array of shape (n_samples,) in [0, 1].
    """
    logits = X @ W.T + b
    if offsets is not None:
        logits += offsets
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e[:, unsafe].sum(axis=1) / e.sum(axis=1)


def mahalanobis_sq(X: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance of each row to each mean: (n_samples, n_means)."""
    XP = X @ precision
    return (np.einsum("nd,nd->n", XP, X)[:, None] - 2 * XP @ means.T
            + np.einsum("kd,de,ke->k", means, precision, means)[None, :])


def local_offsets(X: np.ndarray, linear: np.ndarray, precision: np.ndarray, sharpness: np.ndarray) -> np.ndarray:
    """What moves the linear logits of prototypes whose covariance is the shared one divided by
    ``sharpness`` to theirs: (n_samples, n_means).

    Under the shared precision ``P`` a prototype's logit is ``-q / 2`` up to a term all share,
    ``q`` the squared Mahalanobis distance; with the covariance divided by ``s`` its log density
    is ``-s q / 2 + (d / 2) log s``. Above ``s = 1`` the prototype wins only inside an ellipsoid
    around its mean, where the shared covariance would give it a half-space.

    Args:
        X: (n_samples, d). linear: (n_samples, n_means), the prototypes' linear logits without
            priors (``X @ W.T + b`` of :func:`linear_params`), so that ``q = x^T P x - 2 linear``
            costs one product with ``P`` per sample, however many prototypes there are.
        precision: (d, d). sharpness: (n_means,).
    """
    q = np.maximum(np.einsum("nd,nd->n", X @ precision, X)[:, None] - 2.0 * linear, 0.0)
    return 0.5 * X.shape[1] * np.log(sharpness)[None, :] - 0.5 * (sharpness - 1.0)[None, :] * q
