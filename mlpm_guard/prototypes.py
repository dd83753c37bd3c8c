"""Multi-layer latent prototypes (MLPM): the estimator that turns hidden states into verdicts.

Per layer, each prototype set holds class means and one shared shrunk covariance; a prompt's
per-layer P(unsafe) is the Gaussian discriminant between the means. An L1 logistic regression
over the per-layer probabilities picks and weighs the layers. See ``_stats`` for the maths.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.numpy import load, save as save_bytes
from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from . import _stats
from .categories import category_label, category_name
from .data import parse_label
from .errors import BackboneMismatchError, ConfigError, NotFittedError, PrototypeFileError
from .prototype_file import FORMAT, FORMAT_VERSION, META_FILE, check_tensors, read_folder, write_folder
from .types import Tier, Verdict



def _version() -> str:
    from ._version import __version__

    return __version__


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
    """

    name: str
    labels: np.ndarray
    names: list[str]
    counts: np.ndarray
    means: np.ndarray
    cov: np.ndarray
    n: int

    def __post_init__(self) -> None:
        self.refresh()

    def refresh(self) -> None:
        """Recompute the precision and the linear logits from the statistics."""
        self.precision = np.stack([_stats.shrunk_precision(c, self.n) for c in self.cov])
        params = [_stats.linear_params(m, p) for m, p in zip(self.means, self.precision)]
        self.W = np.stack([w for w, _ in params])
        self.b = np.stack([b for _, b in params])

    def proba(self, H: np.ndarray) -> np.ndarray:
        """Per-layer P(unsafe): (n_samples, n_layers) for states H of shape (n_samples, n_layers, d)."""
        unsafe = self.labels.astype(bool)
        return np.stack([_stats.unsafe_probability(H[:, j], self.W[j], self.b[j], unsafe)
                         for j in range(H.shape[1])], axis=1)

    @classmethod
    def fit(cls, name: str, H: np.ndarray, y: np.ndarray) -> PrototypeSet:
        means, covs = [], []
        for j in range(H.shape[1]):
            m, counts = _stats.group_means(H[:, j].astype(np.float64), y, 2)
            means.append(m)
            covs.append(_stats.pooled_covariance(H[:, j].astype(np.float64), y, m))
        return cls(name, np.array([0, 1]), ["safe", "unsafe"], counts, np.stack(means), np.stack(covs), len(y))

    def select_layers(self, keep: np.ndarray) -> None:
        self.means, self.cov = self.means[keep], self.cov[keep]
        self.refresh()

    def add_group(self, H: np.ndarray, label: int, name: str) -> None:
        """Add samples as the prototype ``(label, name)``, creating it or moving its mean."""
        hits = [k for k, (lab, nm) in enumerate(zip(self.labels, self.names)) if lab == label and nm == name]
        m = len(H)
        new_mean = H.mean(axis=0)  # (n_layers, d)
        if hits:
            k = hits[0]
            total = self.counts[k] + m
            merged = (self.means[:, k] * self.counts[k] + new_mean * m) / total
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
            self.means = np.concatenate([self.means, new_mean[:, None, :]], axis=1)
        groups = np.zeros(m, dtype=np.int64)
        covs, n = [], self.n
        for j in range(self.means.shape[0]):
            c, n = _stats.merge_covariance(self.cov[j], self.n, H[:, j], self.means[j, k][None], groups)
            covs.append(c)
        self.cov, self.n = np.stack(covs), n
        self.refresh()


class Prototypes(BaseEstimator):
    """Multi-layer latent prototype moderator (MLPM).

    Parameters are only stored here; they are checked when :meth:`fit` runs.

    Args:
        layers: candidate layer ids (1-based; ``None`` means every layer of the backbone). The
            L1 combination keeps a subset; scoring then stops at the deepest kept layer.
        C: inverse strength of the L1 penalty of the layer combination (smaller keeps fewer layers).
        per_source: also fit one prototype set per training source that has both labels
            (at least ``min_source_count`` of each), each with its own covariance.
        min_source_count: smallest per-label count for a source to get its own set.
        cv: folds for cross-fitted per-layer probabilities when fitting the combination
            (``None`` fits it on in-sample probabilities, as the MLPM authors do).
        threshold: P(unsafe) at or above which a verdict is ``unsafe``.
        controversial_threshold: P(unsafe) at or above which a verdict's tier is at least
            ``controversial``.
        categories: fit per-category means so verdicts name the nearest hazard category.
        random_state: seed of the cross-fitting folds.

    Fitted attributes end in ``_``: ``layer_ids_``, ``sets_``, ``coef_``, ``intercept_``,
    ``threshold_``, ``category_labels_``, ``category_means_``, ``category_layer_``,
    ``steering_layers_``/``steering_directions_`` (unsafe-minus-safe mean difference of every
    candidate layer) and ``backbone_identity_``.
    """

    def __init__(self, *, layers: Sequence[int] | None = None, C: float = 1.0, per_source: bool = False,
                 min_source_count: int = 20, cv: int | None = None, threshold: float = 0.5,
                 controversial_threshold: float = 0.25, categories: bool = True, random_state: int = 0) -> None:
        self.layers = layers
        self.C = C
        self.per_source = per_source
        self.min_source_count = min_source_count
        self.cv = cv
        self.threshold = threshold
        self.controversial_threshold = controversial_threshold
        self.categories = categories
        self.random_state = random_state

    # ------------------------------------------------------------------ helpers
    def _check_params(self) -> None:
        if not (isinstance(self.C, (int, float)) and self.C > 0):
            raise ConfigError(f"`C` must be a positive number, got {self.C!r}")
        if not 0 < self.threshold < 1:
            raise ConfigError(f"`threshold` must be in (0, 1), got {self.threshold!r}")
        if not 0 < self.controversial_threshold <= self.threshold:
            msg = (f"`controversial_threshold` must be in (0, threshold={self.threshold}], "
                   f"got {self.controversial_threshold!r}")
            raise ConfigError(msg)
        if self.cv is not None and (not isinstance(self.cv, int) or self.cv < 2):
            raise ConfigError(f"`cv` must be None or an int >= 2, got {self.cv!r}")

    def _check_fitted(self) -> None:
        if not hasattr(self, "sets_"):
            msg = (f"This {type(self).__name__} instance is not fitted yet. Call 'fit' with labelled "
                   "prompts, or 'Prototypes.load(path)'.")
            raise NotFittedError(msg)

    @property
    def backbone(self) -> Any:
        """The backbone bound by ``fit``/``load`` (used when texts are passed instead of states)."""
        return getattr(self, "backbone_", None)

    def _states(self, X: Any, layers: Sequence[int], backbone: Any = None) -> np.ndarray:
        if isinstance(X, np.ndarray):
            if X.ndim != 3 or X.shape[1] != len(layers):
                msg = (f"hidden states must have shape (n_samples, {len(layers)}, hidden_size) for layers "
                       f"{list(layers)}, got {X.shape}")
                raise ConfigError(msg)
            return X
        if isinstance(X, str):
            raise ConfigError("pass a list of prompts, not a single string (e.g. `score([text])`)")
        backbone = backbone if backbone is not None else self.backbone
        if backbone is None:
            raise ConfigError("texts need a backbone: pass `backbone=` to fit/load, or pass hidden states")
        return backbone.hidden_states(list(X), layers)

    def _features(self, H: np.ndarray) -> np.ndarray:
        return np.concatenate([s.proba(H) for s in self.sets_], axis=1)

    # ------------------------------------------------------------------ fit
    def fit(self, X: Any, y: Sequence[Any], *, backbone: Any = None, sources: Sequence[str] | None = None,
            categories: Sequence[str | None] | None = None) -> Prototypes:
        """Fit prototypes and the layer combination.

        Args:
            X: prompts (str or message lists; needs ``backbone``), or hidden states of shape
                (n_samples, n_layers, d) for the candidate ``layers``.
            y: labels, 0/1 or any accepted vocabulary (``safe``/``unsafe``, ...).
            backbone: the :class:`~mlpm_guard.Backbone` the states come from; recorded so that
                loading against another backbone fails.
            sources: training source of each sample (for ``per_source``).
            categories: dataset category of each sample (unsafe samples only are used).

        Returns:
            self
        """
        self._check_params()
        if backbone is not None:
            self.backbone_ = backbone
        candidates = self._candidate_layers(X)
        H = self._states(X, candidates, backbone)
        y = np.array([parse_label(v) for v in y], dtype=np.int64)
        if len(y) != len(H):
            raise ConfigError(f"got {len(H)} samples but {len(y)} labels")
        counts = np.bincount(y, minlength=2)
        if counts.min() < 2:
            raise ConfigError(f"need at least 2 safe and 2 unsafe samples, got {counts[0]} safe, {counts[1]} unsafe")
        sources = np.array(sources if sources is not None else ["all"] * len(y), dtype=object)

        self.sets_ = [PrototypeSet.fit("all", H, y)]
        if self.per_source:
            for src in sorted(set(sources)):
                rows = sources == src
                c = np.bincount(y[rows], minlength=2)
                if src != "all" and c.min() >= self.min_source_count:
                    self.sets_.append(PrototypeSet.fit(str(src), H[rows], y[rows]))

        F = self._stacking_features(H, y, sources)
        lr = LogisticRegression(C=self.C, l1_ratio=1.0, solver="liblinear", class_weight="balanced",
                                max_iter=1000, random_state=self.random_state)
        lr.fit(F, y)
        coef = lr.coef_[0].reshape(len(self.sets_), len(candidates))
        keep = np.abs(coef).sum(axis=0) > 0
        if not keep.any():  # everything penalised away: keep the single best layer
            keep[np.argmax([abs(np.corrcoef(F[:, j], y)[0, 1]) for j in range(len(candidates))])] = True
            lr.fit(F[:, np.tile(keep, len(self.sets_))], y)
            coef = np.zeros_like(coef)
            coef[:, keep] = lr.coef_[0].reshape(len(self.sets_), -1)
        # The unsafe-minus-safe mean difference of every candidate layer, kept for activation steering.
        self.steering_layers_ = list(candidates)
        self.steering_directions_ = self.sets_[0].means[:, 1] - self.sets_[0].means[:, 0]
        for s in self.sets_:
            s.select_layers(keep)
        self.layer_ids_ = [layer for layer, k in zip(candidates, keep) if k]
        self.coef_ = coef[:, keep].reshape(-1)
        self.intercept_ = float(lr.intercept_[0])
        self.threshold_ = float(self.threshold)
        self.controversial_threshold_ = float(self.controversial_threshold)
        self._fit_categories(H[:, keep], y, categories)
        self.n_samples_ = int(len(y))
        self.training_summary_ = {f"{src}/{'unsafe' if lab else 'safe'}": int(n)
                                  for (src, lab), n in sorted(Counter(zip(sources, y)).items())}
        self.backbone_identity_ = backbone.identity() if backbone is not None else None
        return self

    def _candidate_layers(self, X: Any) -> list[int]:
        if self.layers is not None:
            layers = sorted({int(x) for x in self.layers})
        elif isinstance(X, np.ndarray):
            layers = list(range(1, X.shape[1] + 1))
        else:
            return list(range(1, self.backbone.num_layers + 1)) if self.backbone else []
        if not layers or min(layers) < 1:
            raise ConfigError(f"`layers` must be layer ids >= 1, got {self.layers!r}")
        return layers

    def _stacking_features(self, H: np.ndarray, y: np.ndarray, sources: np.ndarray) -> np.ndarray:
        """Per-(set, layer) probabilities on the training data, cross-fitted if ``cv`` is set."""
        if self.cv is None:
            return self._features(H)
        F = np.zeros((len(y), len(self.sets_) * H.shape[1]))
        folds = StratifiedKFold(self.cv, shuffle=True, random_state=self.random_state)
        for train, test in folds.split(H, y):
            sets = []
            for s in self.sets_:
                rows = np.ones(len(y), bool) if s.name == "all" else sources == s.name
                tr = train[rows[train]]
                sets.append(PrototypeSet.fit(s.name, H[tr], y[tr]) if np.bincount(y[tr], minlength=2).min() >= 2
                            else s)
            F[test] = np.concatenate([s.proba(H[test]) for s in sets], axis=1)
        return F

    def _fit_categories(self, H: np.ndarray, y: np.ndarray, categories: Sequence[str | None] | None) -> None:
        """Means per hazard category at the layer that tells categories apart best."""
        self.category_labels_, self.category_means_, self.category_layer_ = [], None, None
        if not self.categories or categories is None:
            return
        labels = np.array([category_label(c) if lab == 1 else None for c, lab in zip(categories, y)], dtype=object)
        kinds = sorted(c for c, n in Counter(labels[labels != None]).items() if n >= 3)  # noqa: E711
        if len(kinds) < 1:
            return
        rows = np.isin(labels, kinds)
        groups = np.array([kinds.index(c) for c in labels[rows]])
        best, best_acc = 0, -1.0
        for j in range(H.shape[1]):
            means, _ = _stats.group_means(H[rows, j].astype(np.float64), groups, len(kinds))
            d2 = _stats.mahalanobis_sq(H[rows, j], means, self.sets_[0].precision[j])
            acc = float((d2.argmin(axis=1) == groups).mean())
            if acc > best_acc:
                best, best_acc = j, acc
        self.category_layer_ = self.layer_ids_[best]
        self.category_labels_ = kinds
        self.category_means_, _ = _stats.group_means(H[rows, best].astype(np.float64), groups, len(kinds))

    # ------------------------------------------------------------------ score
    def predict_proba(self, X: Any) -> np.ndarray:
        """P(unsafe) for each sample: shape (n_samples,)."""
        self._check_fitted()
        H = self._states(X, self.layer_ids_)
        return self._combine(self._features(H))

    def _combine(self, F: np.ndarray) -> np.ndarray:
        z = F @ self.coef_ + self.intercept_
        with np.errstate(over="ignore"):  # exp(-z) overflows to inf for very negative z: p = 0, as it should
            return 1.0 / (1.0 + np.exp(-z))

    def predict(self, X: Any) -> np.ndarray:
        """1 for unsafe, 0 for safe."""
        return (self.predict_proba(X) >= self.threshold_).astype(np.int64)

    def score(self, X: Any, *, n_truncated: Sequence[int] | None = None) -> list[Verdict]:  # type: ignore[override]
        """Verdicts for prompts (needs a bound backbone) or for hidden states of ``layer_ids_``."""
        self._check_fitted()
        if n_truncated is None and not isinstance(X, np.ndarray) and self.backbone is not None:
            rows = self.backbone.encode(list(X))
            n_truncated = [r.n_truncated for r in rows]
            H = self.backbone.last_token_states(rows, self.layer_ids_)
        else:
            H = self._states(X, self.layer_ids_)
        return self.verdicts(H, n_truncated)

    def verdicts(self, H: np.ndarray, n_truncated: Sequence[int] | None = None) -> list[Verdict]:
        """Verdicts for hidden states of shape (n_samples, len(layer_ids_), d)."""
        self._check_fitted()
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite rows fail closed just below
            F = self._features(H)
        p = self._combine(F)
        per_layer = F[:, : len(self.layer_ids_)]
        # NaN compares false with every threshold and would land in the safe tier: such a row fails closed.
        broken = ~np.isfinite(H).all(axis=(1, 2)) | ~np.isfinite(p)
        nearest = self._nearest_category(np.where(broken[:, None, None], 0.0, H))
        out = []
        for i, pi in enumerate(p):
            if broken[i]:
                out.append(Verdict(1.0, "unsafe", Tier.UNSAFE, threshold=self.threshold_,
                                   n_truncated_tokens=int(n_truncated[i]) if n_truncated else 0,
                                   error="ScoringError: the backbone gave non-finite hidden states (NaN or inf)"))
                continue
            tier = (Tier.UNSAFE if pi >= self.threshold_ else
                    Tier.CONTROVERSIAL if pi >= self.controversial_threshold_ else Tier.SAFE)
            cat = nearest[i] if tier is not Tier.SAFE else None
            out.append(Verdict(
                p_unsafe=float(pi), label="unsafe" if tier is Tier.UNSAFE else "safe", tier=tier,
                category=cat, category_name=category_name(cat),
                layer_scores={layer: float(v) for layer, v in zip(self.layer_ids_, per_layer[i])},
                threshold=self.threshold_, n_truncated_tokens=int(n_truncated[i]) if n_truncated else 0,
            ))
        return out

    def _nearest_category(self, H: np.ndarray) -> list[str | None]:
        if not self.category_labels_:
            return [None] * len(H)
        j = self.layer_ids_.index(self.category_layer_)
        d2 = _stats.mahalanobis_sq(H[:, j].astype(np.float64), self.category_means_, self.sets_[0].precision[j])
        return [self.category_labels_[k] for k in d2.argmin(axis=1)]

    # ------------------------------------------------------------------ customise
    def add_examples(self, X: Any, labels: Sequence[Any], *, category: str | None = None,
                     name: str | None = None) -> Prototypes:
        """Teach the fitted prototypes a handful of examples without a refit.

        The examples of each label become (or move) a named prototype in every set; the layer
        combination is kept. Because every prototype counts with equal prior, a new safe group
        can only lower P(unsafe) and a new unsafe group can only raise it, and mostly for prompts
        close to the examples. Unsafe examples with a ``category`` also move (or create) that
        category's mean, so new categories can be named.

        Args:
            X: prompts (needs the bound backbone) or hidden states of ``layer_ids_``.
            labels: one label per example.
            category: hazard code or category name of the unsafe examples.
            name: group name (defaults to ``category`` or ``"custom-safe"``/``"custom-unsafe"``).

        Returns:
            self
        """
        self._check_fitted()
        H = self._states(X, self.layer_ids_)
        y = np.array([parse_label(v) for v in labels], dtype=np.int64)
        if len(y) != len(H) or len(y) == 0:
            raise ConfigError(f"add_examples needs one label per example, got {len(H)} examples and {len(y)} labels")
        for label in (0, 1):
            rows = y == label
            if not rows.any():
                continue
            group = name or (category_label(category) if label == 1 and category else None) \
                or f"custom-{'unsafe' if label else 'safe'}"
            for s in self.sets_:
                s.add_group(H[rows].astype(np.float64), label, group)
        cat = category_label(category)
        if cat is not None and (y == 1).any():
            self._add_category(H[y == 1], cat)
        return self

    def _add_category(self, H: np.ndarray, cat: str) -> None:
        j = self.layer_ids_.index(self.category_layer_) if self.category_layer_ else len(self.layer_ids_) // 2
        mean = H[:, j].astype(np.float64).mean(axis=0)
        if self.category_means_ is None:
            self.category_layer_ = self.layer_ids_[j]
            self.category_labels_, self.category_means_ = [cat], mean[None]
        elif cat in self.category_labels_:
            k = self.category_labels_.index(cat)
            self.category_means_[k] = 0.5 * (self.category_means_[k] + mean)
        else:
            self.category_labels_ = [*self.category_labels_, cat]
            self.category_means_ = np.vstack([self.category_means_, mean])

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write the prototypes into folder ``path``: ``prototypes.json`` and a digest-named tensors file.

        A save interrupted at any point (even ``kill -9``) leaves the previous save loadable;
        see :func:`~mlpm_guard.prototype_file.write_folder`.
        """
        self._check_fitted()
        tensors: dict[str, np.ndarray] = {
            "layer_ids": np.array(self.layer_ids_, dtype=np.int64),
            "coef": np.asarray(self.coef_, dtype=np.float64),
        }
        for i, s in enumerate(self.sets_):
            tensors[f"sets.{i}.labels"] = s.labels.astype(np.int64)
            tensors[f"sets.{i}.counts"] = s.counts.astype(np.int64)
            tensors[f"sets.{i}.means"] = s.means.astype(np.float32)
            tensors[f"sets.{i}.cov"] = s.cov.astype(np.float32)
        if self.category_means_ is not None:
            tensors["category_means"] = self.category_means_.astype(np.float32)
        tensors["steering_directions"] = self.steering_directions_.astype(np.float32)
        params = self.get_params()
        params["layers"] = [int(x) for x in params["layers"]] if params["layers"] is not None else None
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "mlpm_guard_version": _version(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "backbone": self.backbone_identity_,
            "hidden_size": int(self.sets_[0].means.shape[-1]),
            "layer_ids": [int(x) for x in self.layer_ids_],
            "params": params,
            "intercept": float(self.intercept_),
            "threshold": float(self.threshold_),
            "controversial_threshold": float(self.controversial_threshold_),
            "sets": [{"name": s.name, "n": int(s.n), "prototypes": list(s.names)} for s in self.sets_],
            "category_layer": self.category_layer_,
            "category_labels": list(self.category_labels_),
            "steering_layers": [int(x) for x in self.steering_layers_],
            "n_samples": int(self.n_samples_),
            "training_summary": {str(k): int(v) for k, v in self.training_summary_.items()},
            "provenance": getattr(self, "provenance_", None),
        }
        folder = Path(path)
        try:
            check_tensors(tensors, folder)
            write_folder(folder, meta, save_bytes(tensors, metadata={"format": FORMAT}))
        except (ValidationError, PrototypeFileError) as exc:
            raise ConfigError(f"these prototypes hold values that cannot be saved (refit them):\n{exc}") from None
        return folder

    @classmethod
    def load(cls, path: str | Path, backbone: Any = None) -> Prototypes:
        """Load prototypes saved by :meth:`save`; with ``backbone``, check it is the one they were fitted on.

        Every field is checked (types, ranges, finite numbers, digests of both files), and the
        loaded prototypes must still score their own unsafe mean unsafe and their safe mean safe.

        Raises:
            PrototypeFileError: missing, truncated, corrupted, edited or unknown files.
            BackboneMismatchError: the backbone differs from the recorded one (or none is recorded).
        """
        folder = Path(path)
        meta, blob = read_folder(folder)
        try:
            t = load(blob)
        except (SafetensorError, OSError, ValueError) as exc:
            raise PrototypeFileError(f"{folder}: the tensors file is truncated or corrupted: {exc}") from None
        check_tensors(t, folder)
        self = cls(**meta.params.model_dump())
        try:
            self._check_params()
        except ConfigError as exc:
            raise PrototypeFileError(f"{folder}: invalid `params`: {exc}") from None
        k, d = len(meta.layer_ids), meta.hidden_size
        try:
            self.layer_ids_ = [int(x) for x in t["layer_ids"]]
            if self.layer_ids_ != meta.layer_ids:
                raise PrototypeFileError(f"{folder}: the layer ids in {META_FILE} and the tensors file disagree")
            self.sets_ = []
            for i, info in enumerate(meta.sets):
                labels, counts = t[f"sets.{i}.labels"], t[f"sets.{i}.counts"]
                means, cov = t[f"sets.{i}.means"].astype(np.float64), t[f"sets.{i}.cov"].astype(np.float64)
                n_protos = len(info.prototypes)
                if (means.shape != (k, n_protos, d) or cov.shape != (k, d, d) or labels.shape != (n_protos,)
                        or counts.shape != (n_protos,)):
                    raise PrototypeFileError(f"{folder}: set {i} has tensor shapes that do not match {META_FILE}")
                self.sets_.append(PrototypeSet(info.name, labels, list(info.prototypes), counts, means, cov, info.n))
            if len(t) != 3 + 4 * len(meta.sets) + ("category_means" in t):
                raise PrototypeFileError(f"{folder}: the tensors file holds tensors {META_FILE} does not describe")
            self.coef_ = t["coef"].astype(np.float64)
            if self.coef_.shape != (len(self.sets_) * k,):
                raise PrototypeFileError(f"{folder}: the layer weights do not match {META_FILE}")
            self.intercept_ = meta.intercept
            self.threshold_ = meta.threshold
            self.controversial_threshold_ = meta.controversial_threshold
            self.category_layer_ = meta.category_layer
            self.category_labels_ = list(meta.category_labels)
            self.category_means_ = t["category_means"].astype(np.float64) if "category_means" in t else None
            n_categories = 0 if self.category_means_ is None else len(self.category_means_)
            if n_categories != len(self.category_labels_) or (
                    self.category_means_ is not None and self.category_means_.shape != (n_categories, d)):
                raise PrototypeFileError(f"{folder}: category means do not match the category labels")
            self.steering_layers_ = list(meta.steering_layers)
            self.steering_directions_ = t["steering_directions"].astype(np.float64)
            if self.steering_directions_.shape != (len(self.steering_layers_), d):
                raise PrototypeFileError(f"{folder}: steering directions do not match {META_FILE}")
            self.n_samples_ = meta.n_samples
            self.training_summary_ = dict(meta.training_summary)
            self.provenance_ = meta.provenance
            self.backbone_identity_ = meta.backbone.model_dump() if meta.backbone is not None else None
        except KeyError as exc:
            raise PrototypeFileError(f"{folder}: missing tensor {exc} (file truncated or from another tool)") from None
        except np.linalg.LinAlgError as exc:
            raise PrototypeFileError(f"{folder}: covariance is not usable ({exc})") from None
        self._self_check(folder)
        if backbone is not None:
            self.bind(backbone)
        return self

    def _self_check(self, where: Path) -> None:
        """Refuse prototypes whose layer combination is upside down, or whose maths gives NaN.

        A file that passes the schema can still be edited (and its digests recomputed) into
        passing everything, e.g. with a huge negative intercept. Whatever the fit, a prompt that
        every layer calls unsafe must come out unsafe, and no less unsafe than one that every
        layer calls safe. (A degenerate fit that calls everything unsafe is allowed: it fails closed.)
        """
        if not all(np.isfinite(x).all() for s in self.sets_ for x in (s.W, s.b)):
            raise PrototypeFileError(f"{where}: the covariance gives non-finite discriminants")
        p_safe, p_unsafe = self._combine(np.array([np.zeros_like(self.coef_), np.ones_like(self.coef_)]))
        if not (p_unsafe >= self.threshold_ and p_unsafe >= p_safe):
            msg = (f"{where}: the layer combination gives {p_unsafe:.3g} when every layer says unsafe and "
                   f"{p_safe:.3g} when every layer says safe, against threshold {self.threshold_:.3g}; "
                   "the file was edited into nonsense. Fit the prototypes again.")
            raise PrototypeFileError(msg)

    def bind(self, backbone: Any) -> Prototypes:
        """Attach a backbone after checking that it is the one these prototypes were fitted on."""
        check_backbone(self.backbone_identity_, backbone)
        self.backbone_ = backbone
        return self

    def __repr__(self) -> str:
        if not hasattr(self, "sets_"):
            return super().__repr__()
        return (f"Prototypes(layers={self.layer_ids_}, sets={[s.name for s in self.sets_]}, "
                f"prototypes={len(self.sets_[0].names)}, n={self.n_samples_})")


def check_backbone(recorded: dict[str, Any] | None, backbone: Any) -> None:
    """Raise :class:`BackboneMismatchError` if ``backbone`` is not the recorded one."""
    if recorded is None:
        # Without a record nothing says these states mean anything on this backbone.
        msg = ("these prototypes record no backbone (fitted on raw hidden states), so they cannot be checked "
               f"against {backbone.identity()['name']!r}; fit them with `backbone=` (or `mlpm-guard fit`), "
               "or use them on hidden states only")
        raise BackboneMismatchError(msg)
    current = backbone.identity()
    problems = [f"{key}: fitted on {recorded.get(key)!r}, this backbone has {current[key]!r}"
                for key in ("num_layers", "hidden_size", "vocab_size", "chat_template_hash")
                if recorded.get(key) != current[key]]
    probe_a, probe_b = recorded.get("weights_probe"), current["weights_probe"]
    if not problems and probe_a is not None and not np.allclose(probe_a, probe_b, rtol=2e-2, atol=2e-3):
        problems.append("weights differ (same shape, different model or fine-tune)")
    if problems:
        msg = (f"these prototypes were fitted on backbone {recorded.get('name')!r} (model {recorded.get('model')!r}) "
               f"but are used with {current['name']!r}: " + "; ".join(problems)
               + ". Refit them on this backbone (`mlpm-guard fit DATA --backbone SPEC --out DIR`), or choose the "
               "backbone they were fitted on yourself (`--backbone`, `Backbone(...)`): a prototypes folder never "
               "picks the model that is loaded.")
        raise BackboneMismatchError(msg)
