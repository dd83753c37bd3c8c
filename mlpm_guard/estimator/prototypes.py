"""Multi-layer latent prototypes (MLPM): the estimator that turns hidden states into verdicts.

Per layer, each prototype set holds class means and one shared shrunk covariance; a prompt's
per-layer P(unsafe) is the Gaussian discriminant between the means. An L1 logistic regression
over the per-layer probabilities picks and weighs the layers. See ``_stats`` for the maths.

The estimator follows scikit-learn: ``predict_proba`` gives one column per class of ``classes_``
(0 safe, 1 unsafe), ``predict`` the class, ``score`` the mean accuracy; :meth:`Prototypes.verdicts`
gives the guard's :class:`~mlpm_guard.Verdict` objects. Files are read and written by
:mod:`.prototype_file`, on a plain record of the estimator.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score
from sklearn.model_selection import StratifiedKFold

from . import _stats, prototype_file
from ..vocabulary.categories import category_label
from ..vocabulary.errors import BackboneMismatchError, ConfigError, NotFittedError, PrototypeFileError
from .labels import parse_label
from .prototype_file import PrototypeRecord
from .prototype_set import CLASSES, PrototypeSet
from .readings import Reading, columns, layout, poolings_of
from ..vocabulary.types import Verdict
from ..vocabulary.verdicts import failed_verdict, make_verdict, tier_of

if TYPE_CHECKING:
    from ..model.backbone import Backbone


#: The kinds of text a head may judge (:meth:`Prototypes.set_head`).
HEAD_KINDS = ("answer", "content")


def as_states(X: Any, layers: Sequence[int], backbone: Backbone | None,
              poolings: Sequence[str] = ("last",)) -> np.ndarray:
    """Hidden states (n_samples, len(poolings) * len(layers), d), pooling-major (:mod:`.readings`):
    given as such, or read from prompts on ``backbone``."""
    if isinstance(X, np.ndarray):
        width = len(poolings) * len(layers)
        if X.ndim != 3 or X.shape[1] != width:
            at = "" if tuple(poolings) == ("last",) else f" at poolings {list(poolings)} (pooling-major)"
            msg = (f"hidden states must have shape (n_samples, {width}, hidden_size) for layers "
                   f"{list(layers)}{at}, got {X.shape}")
            raise ConfigError(msg)
        return X
    if isinstance(X, str):
        raise ConfigError("pass a list of prompts, not a single string (e.g. `verdicts([text])`)")
    if backbone is None:
        raise ConfigError("texts need a backbone: pass `backbone=` to fit/load, or pass hidden states")
    return backbone.hidden_states(list(X), layers, poolings=poolings)


def candidate_layers(layers: Sequence[int] | None, X: Any, backbone: Backbone | None, n_poolings: int = 1) -> list[int]:
    """The layer ids a fit starts from: ``layers``, else every layer of the states or of the backbone."""
    if layers is not None:
        out = sorted({int(x) for x in layers})
    elif isinstance(X, np.ndarray):
        out = list(range(1, X.shape[1] // n_poolings + 1))
    else:
        return list(range(1, backbone.num_layers + 1)) if backbone else []
    if not out or min(out) < 1:
        raise ConfigError(f"`layers` must be layer ids >= 1, got {layers!r}")
    return out


def fit_labels(y: Sequence[Any], n_samples: int) -> np.ndarray:
    """Labels as 0 (safe) / 1 (unsafe), one per sample and at least two of each."""
    labels = np.array([parse_label(v) for v in y], dtype=np.int64)
    if len(labels) != n_samples:
        raise ConfigError(f"got {n_samples} samples but {len(labels)} labels")
    counts = np.bincount(labels, minlength=2)
    if counts.min() < 2:
        raise ConfigError(f"need at least 2 safe and 2 unsafe samples, got {counts[0]} safe, {counts[1]} unsafe")
    return labels


def fit_sets(H: np.ndarray, y: np.ndarray, sources: np.ndarray, *, per_source: bool,
             min_source_count: int, source_invariance: float) -> list[PrototypeSet]:
    """The pooled set, and with ``per_source`` one set per source with ``min_source_count`` of each label."""
    sets = [PrototypeSet.fit("all", H, y, sources=sources, source_invariance=source_invariance,
                             min_source_count=min_source_count)]
    if per_source:
        for src in sorted(set(sources)):
            rows = sources == src
            if src != "all" and np.bincount(y[rows], minlength=2).min() >= min_source_count:
                sets.append(PrototypeSet.fit(str(src), H[rows], y[rows]))
    return sets


def stacking_features(sets: Sequence[PrototypeSet], H: np.ndarray, y: np.ndarray, sources: np.ndarray, *,
                      cv: int | None, random_state: int | None, source_invariance: float,
                      min_source_count: int) -> np.ndarray:
    """Per-(set, layer) probabilities on the training data, cross-fitted over ``cv`` folds if set."""
    if cv is None:
        return np.concatenate([s.proba(H) for s in sets], axis=1)
    F = np.zeros((len(y), len(sets) * H.shape[1]))
    folds = StratifiedKFold(cv, shuffle=True, random_state=random_state)
    for train, test in folds.split(H, y):
        fold_sets = []
        for s in sets:
            rows = np.ones(len(y), bool) if s.name == "all" else sources == s.name
            tr = train[rows[train]]
            enough = np.bincount(y[tr], minlength=2).min() >= 2
            fold_sets.append(PrototypeSet.fit(s.name, H[tr], y[tr], sources=sources[tr],
                                              source_invariance=source_invariance,
                                              min_source_count=min_source_count) if enough else s)
        F[test] = np.concatenate([s.proba(H[test]) for s in fold_sets], axis=1)
    return F


def fit_combination(F: np.ndarray, y: np.ndarray, n_sets: int, *, C: float,
                    random_state: int | None) -> tuple[np.ndarray, float, np.ndarray]:
    """The L1 logistic combination of per-(set, layer) probabilities ``F``.

    Returns:
        the weights (n_sets, n_layers) with zeros for dropped layers, the intercept, and the
        mask of the layers kept (a layer is kept when any set's weight for it is non-zero).
    """
    n_layers = F.shape[1] // n_sets
    lr = LogisticRegression(C=C, l1_ratio=1.0, solver="liblinear", class_weight="balanced",
                            max_iter=1000, random_state=random_state)
    lr.fit(F, y)
    coef = lr.coef_[0].reshape(n_sets, n_layers)
    keep = np.abs(coef).sum(axis=0) > 0
    if not keep.any():  # everything penalised away: keep the single best layer
        keep[np.argmax([abs(np.corrcoef(F[:, j], y)[0, 1]) for j in range(n_layers)])] = True
        lr.fit(F[:, np.tile(keep, n_sets)], y)
        coef = np.zeros_like(coef)
        coef[:, keep] = lr.coef_[0].reshape(n_sets, -1)
    return coef, float(lr.intercept_[0]), keep


def fit_categories(H: np.ndarray, y: np.ndarray, categories: Sequence[str | None],
                   precision: np.ndarray) -> tuple[list[str], np.ndarray | None, int | None]:
    """Means per hazard category at the layer that tells categories apart best.

    Args:
        H: states (n_samples, n_layers, d) of the kept layers; ``precision`` (n_layers, d, d) theirs.
        categories: dataset category of each sample (unsafe samples only are used).

    Returns:
        the category labels (those with 3 samples or more), their means (n_categories, d) and
        the index into the kept layers that they live at; ``([], None, None)`` without categories.
    """
    labels = np.array([category_label(c) if lab == 1 else None for c, lab in zip(categories, y)], dtype=object)
    kinds = sorted(c for c, n in Counter(labels[labels != None]).items() if n >= 3)  # noqa: E711
    if not kinds:
        return [], None, None
    rows = np.isin(labels, kinds)
    groups = np.array([kinds.index(c) for c in labels[rows]])
    best, best_acc = 0, -1.0
    for j in range(H.shape[1]):
        means, _ = _stats.group_means(H[rows, j].astype(np.float64), groups, len(kinds))
        acc = float((_stats.mahalanobis_sq(H[rows, j], means, precision[j]).argmin(axis=1) == groups).mean())
        if acc > best_acc:
            best, best_acc = j, acc
    means, _ = _stats.group_means(H[rows, best].astype(np.float64), groups, len(kinds))
    return kinds, means, best


class Prototypes(ClassifierMixin, BaseEstimator):
    """Multi-layer latent prototype moderator (MLPM).

    Parameters are only stored here; they are checked when :meth:`fit` runs.

    Args:
        layers: candidate layer ids (1-based; ``None`` means every layer of the backbone). The
            L1 combination keeps a subset; scoring then stops at the deepest kept layer.
        C: inverse strength of the L1 penalty of the layer combination (smaller keeps fewer layers).
        per_source: also fit one prototype set per training source that has both labels
            (at least ``min_source_count`` of each), each with its own covariance.
        min_source_count: smallest per-label count for a source to get its own set (and, for
            ``source_invariance``, for a source's class mean to count).
        source_invariance: how many times the spread between the training sources' class means
            is added to each reading's covariance (0: none). That spread is what tells one
            source's style or topic from another's (maths problems from chat prompts); counted as
            noise, it leaves the discriminant what separates the classes inside every source, which
            is what carries over to text from sources never fitted (docs/quality.md, "Source invariance").
            Needs ``sources`` when fitting; the release recipe uses 1.
        cv: folds for cross-fitted per-layer probabilities when fitting the combination
            (``None`` fits it on in-sample probabilities, as the MLPM authors do).
        threshold: P(unsafe) at or above which a verdict is ``unsafe``.
        controversial_threshold: P(unsafe) at or above which a verdict's tier is at least
            ``controversial``.
        pooling: what is read of each candidate layer (:mod:`.readings`): ``"last"``, the state of
            the last token, or ``"last+mean"``, that and the mean state over the request's own
            tokens, each a candidate of its own for the L1 combination.
        other_language_threshold: where the guard refuses a text in another language than English
            (:mod:`.language`) instead of ``threshold``; ``None`` uses ``threshold`` for every
            text. For a backbone that reads other languages less surely than English. Read when
            scoring, so ``set_params`` switches it on for fitted prototypes too (the shipped
            default leaves it off; docs/quality.md has what it trades).
        content_threshold: where a text judged as *content* (a retrieved passage, a tool result,
            an answer: :meth:`mlpm_guard.Guard.check_content`, the integrations' filters, output
            moderation) counts as unsafe instead of ``threshold``; ``None`` uses ``threshold``.
            Content has no middle route (a passage is kept or dropped, an answer sent or
            replaced). The shipped prototypes judge content with a head of their own instead
            (:meth:`set_head`) and leave this ``None``. Read when scoring, like
            ``other_language_threshold``; where both apply, the lower line does.
        categories: fit per-category means so verdicts name the nearest hazard category.
        random_state: seed of the cross-fitting folds.

    Fitted attributes end in ``_``: ``classes_`` (``[0, 1]``: safe, unsafe), ``readings_`` (the
    kept :class:`~mlpm_guard.estimator.readings.Reading` inputs, in the order of the sets' statistics),
    ``layer_ids_`` (the layers they read, ascending), ``sets_``, ``coef_``, ``intercept_``,
    ``threshold_`` (and ``controversial_threshold_``), ``category_labels_``, ``category_means_``,
    ``category_layer_`` (a layer with a kept last-token reading), ``steering_layers_``/
    ``steering_directions_`` (unsafe-minus-safe last-token mean difference of every candidate
    layer) and ``backbone_identity_``; ``poolings_`` says what to ask the backbone for. The backbone itself is no
    fitted state: :meth:`bind` attaches it (``fit``/``load`` with ``backbone=`` do too) so that
    prompts can be passed instead of states, and it is neither pickled nor saved.
    """

    def __init__(self, *, layers: Sequence[int] | None = None, C: float = 1.0, per_source: bool = False,
                 min_source_count: int = 20, cv: int | None = None, threshold: float = 0.5,
                 controversial_threshold: float = 0.25, pooling: str = "last",
                 other_language_threshold: float | None = None, content_threshold: float | None = None,
                 source_invariance: float = 0.0, categories: bool = True, random_state: int = 0) -> None:
        self.layers = layers
        self.C = C
        self.per_source = per_source
        self.min_source_count = min_source_count
        self.cv = cv
        self.threshold = threshold
        self.controversial_threshold = controversial_threshold
        self.pooling = pooling
        self.other_language_threshold = other_language_threshold
        self.content_threshold = content_threshold
        self.source_invariance = source_invariance
        self.categories = categories
        self.random_state = random_state

    # ------------------------------------------------------------------ helpers
    def _check_params(self) -> None:
        if not (isinstance(self.C, (int, float)) and self.C > 0):
            raise ConfigError(f"`C` must be a positive number, got {self.C!r}")
        if not (isinstance(self.source_invariance, (int, float)) and self.source_invariance >= 0):
            raise ConfigError(f"`source_invariance` must be a number >= 0, got {self.source_invariance!r}")
        check_lines(self)
        poolings_of(self.pooling)
        if self.cv is not None and (not isinstance(self.cv, int) or self.cv < 2):
            raise ConfigError(f"`cv` must be None or an int >= 2, got {self.cv!r}")

    def _check_fitted(self) -> None:
        if not hasattr(self, "sets_"):
            msg = (f"This {type(self).__name__} instance is not fitted yet. Call 'fit' with labelled "
                   "prompts, or 'Prototypes.load(path)'.")
            raise NotFittedError(msg)

    @property
    def backbone(self) -> Any:
        """The bound backbone (used when texts are passed instead of states), or ``None``."""
        return getattr(self, "_backbone", None)

    def bind(self, backbone: Backbone) -> Prototypes:
        """Attach a backbone (to the heads too) after checking that it is the one these prototypes were fitted on."""
        check_backbone(self.backbone_identity_, backbone)
        self._backbone = backbone
        for head in getattr(self, "heads_", {}).values():
            head._backbone = backbone
        return self

    def __getstate__(self) -> dict[str, Any]:
        # A live model is no part of the estimator: a copy or a pickle is bound again with `bind`.
        return {k: v for k, v in super().__getstate__().items() if k != "_backbone"}

    def _features(self, H: np.ndarray) -> np.ndarray:
        return np.concatenate([s.proba(H) for s in self.sets_], axis=1)

    @property
    def poolings_(self) -> tuple[str, ...]:
        """The poolings the fitted prototypes read (what to ask the backbone for, with ``layer_ids_``)."""
        return poolings_of(self.pooling)

    def _states(self, X: Any) -> np.ndarray:
        """The kept readings, in ``readings_`` order, of prompts or of states of ``layer_ids_`` at ``poolings_``."""
        H = as_states(X, self.layer_ids_, self.backbone, self.poolings_)
        return H[:, columns(self.readings_, self.layer_ids_, self.poolings_)]

    # ------------------------------------------------------------------ fit
    def fit(self, X: Any, y: Sequence[Any], *, backbone: Backbone | None = None, sources: Sequence[str] | None = None,
            categories: Sequence[str | None] | None = None) -> Prototypes:
        """Fit prototypes and the layer combination.

        Args:
            X: prompts (str or message lists; needs ``backbone``), or hidden states of shape
                (n_samples, n_poolings * n_layers, d) for the candidate ``layers`` at the
                ``pooling``'s poolings, pooling-major (:mod:`.readings`).
            y: labels, 0/1 or any accepted vocabulary (``safe``/``unsafe``, ...).
            backbone: the :class:`~mlpm_guard.Backbone` the states come from; recorded so that
                loading against another backbone fails, and bound.
            sources: training source of each sample (for ``per_source``).
            categories: dataset category of each sample (unsafe samples only are used).

        Returns:
            self
        """
        self._check_params()
        if backbone is not None:
            self._backbone = backbone
        poolings = poolings_of(self.pooling)
        candidates = candidate_layers(self.layers, X, self.backbone, len(poolings))
        H = as_states(X, candidates, self.backbone, poolings)
        y = fit_labels(y, len(H))
        sources = np.array(sources if sources is not None else ["all"] * len(y), dtype=object)
        self.classes_ = CLASSES.copy()
        self.sets_ = fit_sets(H, y, sources, per_source=self.per_source, min_source_count=self.min_source_count,
                              source_invariance=self.source_invariance)
        F = stacking_features(self.sets_, H, y, sources, cv=self.cv, random_state=self.random_state,
                              source_invariance=self.source_invariance, min_source_count=self.min_source_count)
        coef, self.intercept_, keep = fit_combination(F, y, len(self.sets_), C=self.C, random_state=self.random_state)
        # The unsafe-minus-safe mean difference of every candidate layer at its last token (steering
        # adds it to the states the model answers from), kept for activation steering.
        self.steering_layers_ = list(candidates)
        last = slice(0, len(candidates))  # pooling-major: the last-token readings come first
        self.steering_directions_ = self.sets_[0].means[last, 1] - self.sets_[0].means[last, 0]
        for s in self.sets_:
            s.select_layers(keep)
        self.readings_ = [r for r, k in zip(layout(candidates, poolings), keep) if k]
        self.layer_ids_ = sorted({r.layer for r in self.readings_})
        self.coef_ = coef[:, keep].reshape(-1)
        self.threshold_ = float(self.threshold)
        self.controversial_threshold_ = float(self.controversial_threshold)
        self.category_labels_, self.category_means_, self.category_layer_ = [], None, None
        # Categories are told apart at one kept last-token reading.
        at = [j for j, r in enumerate(self.readings_) if r.pooling == "last"]
        if self.categories and categories is not None and at:
            self.category_labels_, self.category_means_, j = fit_categories(
                H[:, keep][:, at], y, categories, self.sets_[0].precision[at])
            self.category_layer_ = self.readings_[at[j]].layer if j is not None else None
        self.n_samples_ = int(len(y))
        self.training_summary_ = {f"{src}/{'unsafe' if lab else 'safe'}": int(n)
                                  for (src, lab), n in sorted(Counter(zip(sources, y)).items())}
        self.backbone_identity_ = backbone.identity() if backbone is not None else None
        self.heads_ = {}
        return self

    # ------------------------------------------------------------------ heads
    def set_head(self, kind: str, head: Prototypes) -> Prototypes:
        """Judge texts of ``kind`` with ``head`` instead of these prototypes (see :meth:`for_kind`).

        A head is fitted prototypes of its own (its own readings, layer combination and lines),
        on the same backbone, for a kind of text whose form differs from a request's: ``"answer"``
        (an answer read in its conversation) or ``"content"`` (a passage or tool result).

        Returns:
            self
        """
        self._check_fitted()
        if kind not in HEAD_KINDS:
            raise ConfigError(f"a head judges one of {HEAD_KINDS}, got {kind!r}")
        head._check_fitted()
        if getattr(head, "heads_", {}):
            raise ConfigError("a head cannot have heads of its own")
        if head.backbone_identity_ != self.backbone_identity_:
            raise ConfigError(f"the {kind} head was fitted on another backbone than these prototypes")
        self.heads_ = {**getattr(self, "heads_", {}), kind: head}
        if self.backbone is not None:
            head._backbone = self.backbone
        return self

    def for_kind(self, kind: str) -> Prototypes:
        """The prototypes that judge a text of ``kind`` (``"request"``, ``"content"``, ``"answer"``):
        its head when there is one; an answer without a head of its own is text the model wrote, so
        the content head judges it when there is one; else these."""
        heads = getattr(self, "heads_", {})
        if kind == "answer" and kind not in heads:
            kind = "content"
        return heads.get(kind, self)

    # ------------------------------------------------------------------ predict
    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities: shape (n_samples, 2), columns in ``classes_`` order (P(safe), P(unsafe))."""
        self._check_fitted()
        p = self._combine(self._features(self._states(X)))
        return np.stack([1.0 - p, p], axis=1)

    def _combine(self, F: np.ndarray) -> np.ndarray:
        """P(unsafe) from per-(set, layer) probabilities."""
        z = F @ self.coef_ + self.intercept_
        with np.errstate(over="ignore"):  # exp(-z) overflows to inf for very negative z: p = 0, as it should
            return 1.0 / (1.0 + np.exp(-z))

    def predict(self, X: Any) -> np.ndarray:
        """The class of each sample: 1 (unsafe) at or above ``threshold_``, else 0 (safe)."""
        return (self.predict_proba(X)[:, 1] >= self.threshold_).astype(np.int64)

    def score(self, X: Any, y: Sequence[Any], sample_weight: Sequence[float] | None = None) -> float:
        """Mean accuracy of :meth:`predict` against labels ``y`` (any vocabulary ``fit`` accepts)."""
        labels = np.array([parse_label(v) for v in y], dtype=np.int64)
        return float(accuracy_score(labels, self.predict(X), sample_weight=sample_weight))

    def verdicts(self, X: Any, *, n_truncated: Sequence[int] | None = None) -> list[Verdict]:
        """Verdicts for prompts (needs a bound backbone) or for hidden states of ``layer_ids_``.

        Args:
            X: prompts, or states of ``layer_ids_`` at ``poolings_``: shape
                (n_samples, len(poolings_) * len(layer_ids_), d), pooling-major.
            n_truncated: tokens cut from each prompt the states come from (prompts count their own).
        """
        self._check_fitted()
        if n_truncated is None and not isinstance(X, np.ndarray) and self.backbone is not None:
            rows = self.backbone.encode(list(X))
            n_truncated = [r.n_truncated for r in rows]
            X = self.backbone.layer_states(rows, self.layer_ids_, poolings=self.poolings_)
        H = self._states(X)
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite rows fail closed just below
            F = self._features(H)
        p = self._combine(F)
        per_layer = F[:, : len(self.readings_)]
        # NaN compares false with every threshold and would land in the safe tier: such a row fails closed.
        broken = ~np.isfinite(H).all(axis=(1, 2)) | ~np.isfinite(p)
        j = self._category_column()
        nearest = nearest_category(np.where(broken[:, None], 0.0, H[:, j]), self.category_labels_,
                                   self.category_means_, self.sets_[0].precision[j])
        cut = list(n_truncated) if n_truncated else [0] * len(p)
        out = []
        for i, pi in enumerate(p):
            if broken[i]:
                out.append(failed_verdict("ScoringError: the backbone gave non-finite hidden states (NaN or inf)",
                                          threshold=self.threshold_, n_truncated_tokens=int(cut[i])))
                continue
            scores = {r.key: float(v) for r, v in zip(self.readings_, per_layer[i])}
            out.append(make_verdict(pi, tier_of(pi, self.threshold_, self.controversial_threshold_),
                                    threshold=self.threshold_, category=nearest[i], layer_scores=scores,
                                    n_truncated_tokens=int(cut[i])))
        return out

    # ------------------------------------------------------------------ customise
    def add_examples(self, X: Any, labels: Sequence[Any], *, category: str | None = None,
                     name: str | None = None, sharpness: float = 1.0) -> Prototypes:
        """Teach the fitted prototypes a handful of examples without a refit.

        The examples of each label become (or move) a named prototype in every set; the layer
        combination is kept. Because a new group only adds weight to its own label, a new safe group
        can only lower P(unsafe) and a new unsafe group can only raise it, and mostly for prompts
        close to the examples. Unsafe examples with a ``category`` also move (or create) that
        category's mean, so new categories can be named.

        Args:
            X: prompts (needs the bound backbone) or hidden states of ``layer_ids_`` at ``poolings_``.
            labels: one label per example.
            category: hazard code or category name of the unsafe examples.
            name: group name (defaults to ``category`` or ``"custom-safe"``/``"custom-unsafe"``).
            sharpness: for a new group, how many times narrower than the shared covariance its
                spread is. At 1 it decides a half-space, as the class means do; above 1 only an
                ellipsoid around its examples (what a correction of one text wants). A sharper
                group starts at the log prior ``-(d / 2) log(sharpness)``, at which it outweighs
                the class means nowhere more than the same group at 1 would; raise it with
                :meth:`set_log_prior` to widen its reach.

        Returns:
            self
        """
        self._check_fitted()
        if not (math.isfinite(sharpness) and sharpness >= 1):
            raise ConfigError(f"sharpness must be a finite number of at least 1, got {sharpness!r}")
        H = self._states(X)
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
                s.add_group(H[rows].astype(np.float64), label, group, sharpness)
        cat = category_label(category)
        if cat is not None and (y == 1).any():
            j = self._category_column()
            self.category_layer_ = self.readings_[j].layer
            self.category_labels_, self.category_means_ = add_category(
                self.category_labels_, self.category_means_, cat, H[y == 1, j].astype(np.float64).mean(axis=0))
        return self

    def set_log_prior(self, name: str, log_prior: float) -> Prototypes:
        """Give the prototype group ``name`` (added by :meth:`add_examples`) the prior weight
        ``exp(log_prior)`` against the others' 1, in every set: it then decides only for texts
        nearer to its examples than that. ``0`` is the class means' prior, which a group of
        sharpness 1 starts with (a sharper one starts lower: see :meth:`add_examples`).

        Returns:
            self
        """
        self._check_fitted()
        if not (math.isfinite(log_prior) and log_prior <= 0):
            raise ConfigError(f"a log prior must be a finite number of at most 0, got {log_prior!r}")
        if name not in self.sets_[0].names or name in ("safe", "unsafe"):
            raise ConfigError(f"there is no taught prototype named {name!r}")
        for s in self.sets_:
            s.set_log_prior(name, log_prior)
        return self

    def _category_column(self) -> int:
        """Where the category means live in ``readings_``: the last-token reading of ``category_layer_``,
        else (no categories yet) the middle last-token reading, else the middle reading."""
        if self.category_layer_ is not None:
            return self.readings_.index(Reading(self.category_layer_, "last"))
        at = [j for j, r in enumerate(self.readings_) if r.pooling == "last"] or list(range(len(self.readings_)))
        return at[len(at) // 2]

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write the prototypes into folder ``path``: ``prototypes.json`` and a digest-named tensors
        file (see :func:`~mlpm_guard.estimator.prototype_file.save_record`)."""
        self._check_fitted()
        return prototype_file.save_record(self._record(), path)

    @classmethod
    def load(cls, path: str | Path, backbone: Backbone | None = None) -> Prototypes:
        """Load a prototypes folder; with ``backbone``, check it is the one they were fitted on.

        Every field is checked (:func:`~mlpm_guard.estimator.prototype_file.load_record`), and the loaded
        prototypes must still score their own unsafe mean unsafe and their safe mean safe.

        Raises:
            PrototypeFileError: missing, truncated, corrupted, edited or unknown files.
            BackboneMismatchError: the backbone differs from the recorded one (or none is recorded).
        """
        folder = Path(path)
        prototypes = cls._from_record(prototype_file.load_record(folder), folder)
        return prototypes.bind(backbone) if backbone is not None else prototypes

    def _record(self) -> PrototypeRecord:
        return PrototypeRecord(
            params=self.get_params(), readings=list(self.readings_), layer_ids=list(self.layer_ids_),
            sets=list(self.sets_), coef=self.coef_, intercept=self.intercept_, threshold=self.threshold_,
            controversial_threshold=self.controversial_threshold_, category_layer=self.category_layer_,
            category_labels=list(self.category_labels_), category_means=self.category_means_,
            steering_layers=list(self.steering_layers_), steering_directions=self.steering_directions_,
            n_samples=self.n_samples_, training_summary=dict(self.training_summary_),
            provenance=getattr(self, "provenance_", None), backbone_identity=self.backbone_identity_,
            heads={kind: head._record() for kind, head in getattr(self, "heads_", {}).items()})

    @classmethod
    def _from_record(cls, record: PrototypeRecord, where: Path) -> Prototypes:
        """The estimator a checked record describes, refused when its numbers are nonsense."""
        p = cls(**record.params)
        try:
            p._check_params()
        except ConfigError as exc:
            raise PrototypeFileError(f"{where}: invalid `params`: {exc}") from None
        p.readings_, p.classes_, p.layer_ids_, p.sets_ = record.readings, CLASSES.copy(), record.layer_ids, record.sets
        p.coef_, p.intercept_ = record.coef, record.intercept
        p.threshold_, p.controversial_threshold_ = record.threshold, record.controversial_threshold
        p.category_layer_, p.category_labels_ = record.category_layer, record.category_labels
        p.category_means_ = record.category_means
        p.steering_layers_, p.steering_directions_ = record.steering_layers, record.steering_directions
        p.n_samples_, p.training_summary_ = record.n_samples, record.training_summary
        p.provenance_, p.backbone_identity_ = record.provenance, record.backbone_identity
        p._self_check(where)
        p.heads_ = {kind: cls._from_record(head, where / prototype_file.HEADS_DIR / kind)
                    for kind, head in record.heads.items()}
        return p

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

    def __repr__(self) -> str:
        if not hasattr(self, "sets_"):
            return super().__repr__()
        last = [r.layer for r in self.readings_ if r.pooling == "last"]
        pooled = [r.layer for r in self.readings_ if r.pooling != "last"]
        mean = f", mean={pooled}" if pooled else ""
        return (f"Prototypes(layers={last}{mean}, sets={[s.name for s in self.sets_]}, "
                f"prototypes={len(self.sets_[0].names)}, n={self.n_samples_})")


def nearest_category(H: np.ndarray, labels: Sequence[str], means: np.ndarray | None,
                     precision: np.ndarray) -> list[str | None]:
    """The nearest category mean (Mahalanobis) of each state (n_samples, d); ``None`` without categories."""
    if not labels or means is None:
        return [None] * len(H)
    d2 = _stats.mahalanobis_sq(H.astype(np.float64), means, precision)
    return [labels[k] for k in d2.argmin(axis=1)]


def add_category(labels: list[str], means: np.ndarray | None, cat: str,
                 mean: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Category labels and means with ``cat`` added at ``mean``, or moved half-way to it if known."""
    if means is None:
        return [cat], mean[None]
    if cat in labels:
        means = means.copy()
        k = labels.index(cat)
        means[k] = 0.5 * (means[k] + mean)
        return list(labels), means
    return [*labels, cat], np.vstack([means, mean])


def check_lines(estimator: Any) -> None:
    """A scorer's lines: ``threshold`` in (0, 1), ``controversial_threshold`` in (0, threshold],
    and its lines for some texts (:func:`check_line`)."""
    threshold, controversial = estimator.threshold, estimator.controversial_threshold
    if not 0 < threshold < 1:
        raise ConfigError(f"`threshold` must be in (0, 1), got {threshold!r}")
    if not 0 < controversial <= threshold:
        raise ConfigError(f"`controversial_threshold` must be in (0, threshold={threshold}], got {controversial!r}")
    check_line("other_language_threshold", estimator.other_language_threshold, controversial, threshold)
    check_line("content_threshold", estimator.content_threshold, controversial, threshold)


def check_line(name: str, line: float | None, controversial: float, threshold: float) -> None:
    """A refusal line for some texts (``other_language_threshold``, ``content_threshold``) is None
    or lies between the controversial and refusal lines."""
    if line is not None and not controversial <= line <= threshold:
        msg = (f"`{name}` must be None or in [controversial_threshold={controversial}, "
               f"threshold={threshold}], got {line!r}")
        raise ConfigError(msg)


def same_weights(recorded: Any, current: Any) -> bool:
    """Whether two weights probes agree, up to bf16 rounding; a probe of another length never does
    (an edited file can record any list)."""
    a, b = np.asarray(recorded, dtype=float), np.asarray(current, dtype=float)
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=2e-2, atol=2e-3))


def check_backbone(recorded: dict[str, Any] | None, backbone: Backbone) -> None:
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
    if not problems and probe_a is not None and not same_weights(probe_a, probe_b):
        problems.append("weights differ (same shape, different model or fine-tune)")
    if problems:
        msg = (f"these prototypes were fitted on backbone {recorded.get('name')!r} (model {recorded.get('model')!r}) "
               f"but are used with {current['name']!r}: " + "; ".join(problems)
               + ". Refit them on this backbone (`mlpm-guard fit DATA --backbone SPEC --out DIR`), or choose the "
               "backbone they were fitted on yourself (`--backbone`, `Backbone(...)`): a prototypes folder never "
               "picks the model that is loaded.")
        raise BackboneMismatchError(msg)
