"""One prototype set: class (and group) means with one shared covariance per layer, and the
per-layer P(unsafe) they give. :class:`~mlpm_guard.Prototypes` holds one pooled set, and one per
training source with ``per_source``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _stats
from .labels import SAFE, UNSAFE

#: The two classes, as ``parse_label`` reads labels: 0 safe, 1 unsafe. They order the columns of
#: ``Prototypes.predict_proba`` (``classes_``) and label the two prototypes every set starts with.
CLASSES = np.array([SAFE, UNSAFE])


@dataclass
class PrototypeSet:
    """Prototypes that share one covariance per layer (the pooled set, or one training source).

    Attributes:
        name: ``"all"`` for the pooled set, else the training source.
        labels: (K,) 0 safe / 1 unsafe, one per prototype.
        names: K prototype names (``"safe"``, ``"unsafe"``, or a custom group).
        counts: (K,) samples behind each mean.
        means: (n_layers, K, d).
        cov: (n_layers, d, d) pooled within-prototype covariance.
        n: samples behind ``cov``.
        log_priors: (K,) log prior weight of each prototype, 0 (equal priors) unless a taught
            prototype was given a smaller one (:meth:`set_log_prior`).
        sharpness: (K,) how many times narrower than the shared covariance each prototype's
            spread is: 1 for the class means; above 1 for a taught prototype that should decide
            only near its examples (:func:`._stats.local_offsets`).
    """

    name: str
    labels: np.ndarray
    names: list[str]
    counts: np.ndarray
    means: np.ndarray
    cov: np.ndarray
    n: int
    log_priors: np.ndarray | None = None
    sharpness: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.log_priors is None:
            self.log_priors = np.zeros(len(self.labels))
        if self.sharpness is None:
            self.sharpness = np.ones(len(self.labels))
        self.refresh()

    def refresh(self) -> None:
        """Recompute the precision and the linear logits from the statistics."""
        self.precision = np.stack([_stats.shrunk_precision(c, self.n) for c in self.cov])
        params = [_stats.linear_params(m, p) for m, p in zip(self.means, self.precision)]
        self.W = np.stack([w for w, _ in params])
        self._b = np.stack([b for _, b in params])
        self.b = self._b + self.log_priors

    def set_log_prior(self, name: str, log_prior: float) -> None:
        """Give the prototype ``name`` the prior weight ``exp(log_prior)`` against the others' 1.

        A prototype made from a few taught examples lies nearer to most short texts than a class
        mean averaged over thousands does; with a smaller prior it decides only near its examples.
        """
        k = self.names.index(name)
        self.log_priors[k] = log_prior
        self.b = self._b + self.log_priors

    def proba(self, H: np.ndarray) -> np.ndarray:
        """Per-layer P(unsafe): (n_samples, n_layers) for states H of shape (n_samples, n_layers, d)."""
        unsafe = self.labels.astype(bool)
        local = np.flatnonzero(self.sharpness > 1.0)
        out = []
        for j in range(H.shape[1]):
            offsets = None
            if local.size:
                offsets = np.zeros((len(H), len(self.labels)))
                linear = H[:, j] @ self.W[j, local].T + self._b[j, local]
                offsets[:, local] = _stats.local_offsets(H[:, j], linear, self.precision[j], self.sharpness[local])
            out.append(_stats.unsafe_probability(H[:, j], self.W[j], self.b[j], unsafe, offsets))
        return np.stack(out, axis=1)

    @classmethod
    def fit(cls, name: str, H: np.ndarray, y: np.ndarray, *, sources: np.ndarray | None = None,
            source_invariance: float = 0.0, min_source_count: int = 20) -> PrototypeSet:
        """Class means and shared covariance of states ``H`` (n_samples, n_layers, d).

        With ``source_invariance`` > 0, that many times the spread between the ``sources``' class
        means (:func:`._stats.source_scatter`, sources of at least ``min_source_count`` samples of a
        class) is added to each layer's covariance, so the discriminant counts what tells one
        training source from another as noise.
        """
        means, covs = [], []
        for j in range(H.shape[1]):
            X = H[:, j].astype(np.float64)
            m, counts = _stats.group_means(X, y, 2)
            means.append(m)
            cov = _stats.pooled_covariance(X, y, m)
            if source_invariance and sources is not None:
                cov += source_invariance * _stats.source_scatter(X, y, sources, m, min_source_count)
            covs.append(cov)
        return cls(name, CLASSES.copy(), ["safe", "unsafe"], counts, np.stack(means), np.stack(covs), len(y))

    def select_layers(self, keep: np.ndarray) -> None:
        self.means, self.cov = self.means[keep], self.cov[keep]
        self.refresh()

    def add_group(self, H: np.ndarray, label: int, name: str, sharpness: float = 1.0) -> None:
        """Add samples as the prototype ``(label, name)``, creating it or moving its mean; a new
        prototype gets ``sharpness``.

        The samples' scatter joins the shared covariance, unless the prototype is sharper than the
        class means: it has a spread of its own, and the shared one (with every other prototype's
        logits) stays exactly as it was, so priors set on earlier taught prototypes still hold.
        """
        hits = [k for k, (lab, nm) in enumerate(zip(self.labels, self.names)) if lab == label and nm == name]
        m = len(H)
        new_mean = H.mean(axis=0)  # (n_layers, d)
        if hits:
            k = hits[0]
            total = self.counts[k] + m
            merged = (self.means[:, k] * self.counts[k] + new_mean * m) / total
            if self.sharpness[k] <= 1.0:
                # Chan et al.: moving an old mean adds n_old * (old - merged)^2 to the scatter.
                shift = self.means[:, k] - merged
                extra = np.einsum("ld,le->lde", shift, shift) * self.counts[k]
                self.cov = (self.cov * max(self.n - 1, 1) + extra) / max(self.n - 1, 1)
            self.means[:, k] = merged
            self.counts[k] = total
        else:
            k = len(self.labels)
            self.labels = np.append(self.labels, label)
            self.names.append(name)
            self.counts = np.append(self.counts, m)
            # A sharper prototype starts at the prior that cancels its density's normalisation: then
            # it outweighs the class means nowhere more than the same group with the shared covariance.
            self.log_priors = np.append(self.log_priors, -0.5 * self.means.shape[-1] * np.log(sharpness))
            self.sharpness = np.append(self.sharpness, float(sharpness))
            self.means = np.concatenate([self.means, new_mean[:, None, :]], axis=1)
        if self.sharpness[k] > 1.0:
            self.refresh()
            return
        groups = np.zeros(m, dtype=np.int64)
        covs, n = [], self.n
        for j in range(self.means.shape[0]):
            c, n = _stats.merge_covariance(self.cov[j], self.n, H[:, j], self.means[j, k][None], groups)
            covs.append(c)
        self.cov, self.n = np.stack(covs), n
        self.refresh()
