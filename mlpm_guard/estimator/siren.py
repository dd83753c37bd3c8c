"""A neuron-probe scorer in the manner of SIREN ("LLM Safety From Within: Detecting Harmful Content
with Internal Representations", Jiao et al.): safety neurons picked by layer-wise L1 probes, and a
small MLP on them.

1. **Probe each reading** (a layer at the last token or mean-pooled, :mod:`.readings`): standardise
   its states, fit an L1 logistic regression on most of the training rows and score it on the rest
   (balanced accuracy).
2. **Pick the safety neurons** of each reading: the fewest whose absolute probe weights hold
   ``mass`` (0.9) of the reading's total. A reading no better than chance is dropped; the others
   are weighted by how far above chance their probe scored (SIREN's performance-weighted
   aggregation), and at most ``max_readings`` of the best are kept.
3. **Classify**: the selected neurons of every kept reading, standardised and weighted, go into a
   small MLP (scikit-learn's ``MLPClassifier``); P(unsafe) is its output.

:class:`NeuronProbe` has the verdict interface of :class:`~mlpm_guard.Prototypes` (``layer_ids_``,
``poolings_``, ``verdicts``, ``threshold_``, ``controversial_threshold_``, ``content_threshold``,
``other_language_threshold``, ``for_kind``, ``bind``), so a guard can score with it and keep its
policy, routes and views: ``Guard(backbone, NeuronProbe.load(folder, backbone=backbone))``. It
names no hazard category, has no heads for answers or content (it judges them itself), and its
``STEER`` route uses the unsafe-minus-safe mean difference of each candidate layer's last-token
states, as the prototypes' does. Folders are written without pickle: a JSON file with a strict
schema and digests, and the probe, scaler and MLP weights in a digest-named safetensors file.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from safetensors.numpy import save as save_bytes
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

from .._version import __version__
from ..vocabulary.errors import ConfigError, NotFittedError, PrototypeFileError
from .labels import parse_label
from .prototype_file import BackboneRecord, CheckedFolder
from .prototypes import as_states, candidate_layers, check_backbone, check_lines, fit_labels
from .readings import Reading, columns, layout, poolings_of
from ..vocabulary.types import Verdict
from ..vocabulary.verdicts import failed_verdict, make_verdict, tier_of

if TYPE_CHECKING:
    from ..model.backbone import Backbone

__all__ = ["NeuronProbe", "RELEASE_PARAMS", "select_neurons"]

FORMAT = "mlpm-guard-neuron-probe"
FORMAT_VERSION = 1
META_FILE = "neuron_probe.json"
#: What ``mlpm-guard fit-siren``, ``eval --baselines siren`` and ``benchmarks/siren.py`` fit: the
#: release recipe's lines (refuse from 0.8, safety prompt from 0.35, content from 0.5), so the
#: routes mean what they mean under the shipped prototypes; and the 16 best readings of the 60 a
#: 30-layer backbone has (last token and mean-pooled), which keeps the MLP's input near a thousand
#: neurons: with all of them, one fit on the release mix (about 6,000 rows) takes many minutes of CPU.
RELEASE_PARAMS: dict[str, Any] = {"pooling": "last+mean", "threshold": 0.8, "controversial_threshold": 0.35,
                                  "content_threshold": 0.5, "max_readings": 16}
_ACTIVATIONS = ("relu", "tanh")


def select_neurons(coef: np.ndarray, mass: float) -> np.ndarray:
    """The fewest indices of ``coef`` whose absolute values hold ``mass`` of their sum, ascending
    (empty when every weight is zero)."""
    weights = np.abs(coef)
    total = weights.sum()
    if total <= 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(-weights, kind="stable")
    n = int(np.searchsorted(np.cumsum(weights[order]), mass * total - 1e-12 * total) + 1)
    return np.sort(order[:n]).astype(np.int64)


def _mlp_forward(A: np.ndarray, coefs: Sequence[np.ndarray], intercepts: Sequence[np.ndarray],
                 activation: str) -> np.ndarray:
    """P(unsafe) of a binary MLP (hidden layers with ``activation``, a logistic output unit)."""
    for W, b in zip(coefs[:-1], intercepts[:-1]):
        A = A @ W + b
        A = np.maximum(A, 0.0) if activation == "relu" else np.tanh(A)
    z = (A @ coefs[-1] + intercepts[-1])[:, 0]
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-z))


class NeuronProbe(ClassifierMixin, BaseEstimator):
    """Layer-wise L1 probes pick safety neurons; a small MLP on them gives P(unsafe).

    Parameters are only stored here; they are checked when :meth:`fit` runs.

    Args:
        layers: candidate layer ids (``None``: every layer of the backbone or of the states).
        pooling: what is read of each candidate layer: ``"last"``, or ``"last+mean"`` (also the
            mean state over the request; SIREN reads mean-pooled states).
        C: inverse strength of the probes' L1 penalty (smaller keeps fewer neurons).
        mass: share of a probe's absolute weight its selected neurons hold.
        max_readings: most readings kept (the best probes; ``None``: every one above chance).
        hidden_layer_sizes: the MLP's hidden layers.
        activation: their activation, ``"relu"`` or ``"tanh"``.
        alpha: the MLP's L2 penalty.
        max_iter: most MLP epochs (training ends sooner once its loss stops improving). No early
            stopping on held-out accuracy: accuracy stops improving long before the probabilities
            are calibrated, and the guard reads them at lines far from 0.5 (refuse from 0.8).
        validation_fraction: training rows held out to score each probe.
        threshold, controversial_threshold, content_threshold, other_language_threshold: the
            lines of :class:`~mlpm_guard.Prototypes`, meaning the same.
        random_state: seed of the probe split and of the MLP.

    Fitted attributes end in ``_``: ``classes_``, ``readings_`` (kept readings, in feature order),
    ``layer_ids_``, ``neurons_`` (per reading, the selected neuron indices), ``means_``/``scales_``
    (their standardisation), ``probe_coef_``/``probe_intercept_`` (each probe's weights on its
    neurons, for the per-reading evidence in verdicts), ``reading_scores_`` (probe balanced
    accuracy on the held-out rows), ``reading_weights_``, ``mlp_coefs_``/``mlp_intercepts_``,
    ``threshold_``, ``controversial_threshold_``, ``steering_layers_``/``steering_directions_``,
    ``n_samples_``, ``training_summary_``, ``fit_seconds_``, ``backbone_identity_`` and
    ``provenance_``.
    """

    def __init__(self, *, layers: Sequence[int] | None = None, pooling: str = "last+mean", C: float = 0.05,
                 mass: float = 0.9, max_readings: int | None = None, hidden_layer_sizes: Sequence[int] = (128,),
                 activation: str = "relu", alpha: float = 1e-3, max_iter: int = 200,
                 validation_fraction: float = 0.2, threshold: float = 0.5, controversial_threshold: float = 0.25,
                 content_threshold: float | None = None, other_language_threshold: float | None = None,
                 random_state: int = 0) -> None:
        self.layers = layers
        self.pooling = pooling
        self.C = C
        self.mass = mass
        self.max_readings = max_readings
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.alpha = alpha
        self.max_iter = max_iter
        self.validation_fraction = validation_fraction
        self.threshold = threshold
        self.controversial_threshold = controversial_threshold
        self.content_threshold = content_threshold
        self.other_language_threshold = other_language_threshold
        self.random_state = random_state

    # ------------------------------------------------------------------ checks
    def _check_params(self) -> None:
        if not (isinstance(self.C, (int, float)) and self.C > 0):
            raise ConfigError(f"`C` must be a positive number, got {self.C!r}")
        if not (isinstance(self.mass, (int, float)) and 0 < self.mass <= 1):
            raise ConfigError(f"`mass` must be in (0, 1], got {self.mass!r}")
        if self.max_readings is not None and not (isinstance(self.max_readings, int) and self.max_readings >= 1):
            raise ConfigError(f"`max_readings` must be None or an int >= 1, got {self.max_readings!r}")
        sizes = tuple(self.hidden_layer_sizes) if isinstance(self.hidden_layer_sizes, (list, tuple)) else None
        if not sizes or not all(isinstance(n, int) and n >= 1 for n in sizes):
            raise ConfigError(f"`hidden_layer_sizes` must be a non-empty list of ints >= 1, got {self.hidden_layer_sizes!r}")
        if self.activation not in _ACTIVATIONS:
            raise ConfigError(f"`activation` must be one of {_ACTIVATIONS}, got {self.activation!r}")
        if not (isinstance(self.alpha, (int, float)) and self.alpha >= 0):
            raise ConfigError(f"`alpha` must be a number >= 0, got {self.alpha!r}")
        if not (isinstance(self.max_iter, int) and self.max_iter >= 1):
            raise ConfigError(f"`max_iter` must be an int >= 1, got {self.max_iter!r}")
        if not (isinstance(self.validation_fraction, (int, float)) and 0 < self.validation_fraction < 0.5):
            raise ConfigError(f"`validation_fraction` must be in (0, 0.5), got {self.validation_fraction!r}")
        check_lines(self)
        poolings_of(self.pooling)

    def _check_fitted(self) -> None:
        if not hasattr(self, "mlp_coefs_"):
            raise NotFittedError(f"This {type(self).__name__} instance is not fitted yet. Call 'fit' with labelled "
                                 "prompts, or 'NeuronProbe.load(path)'.")

    # ------------------------------------------------------------------ backbone
    @property
    def backbone(self) -> Any:
        """The bound backbone (used when texts are passed instead of states), or ``None``."""
        return getattr(self, "_backbone", None)

    def bind(self, backbone: Backbone) -> NeuronProbe:
        """Attach a backbone after checking that it is the one the probe was fitted on."""
        check_backbone(self.backbone_identity_, backbone)
        self._backbone = backbone
        return self

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in super().__getstate__().items() if k != "_backbone"}

    @property
    def poolings_(self) -> tuple[str, ...]:
        """The poolings the probe reads (what to ask the backbone for, with ``layer_ids_``)."""
        return poolings_of(self.pooling)

    def for_kind(self, kind: str) -> NeuronProbe:
        """The scorer of a kind of text: this one for every kind (it has no heads)."""
        return self

    # ------------------------------------------------------------------ fit
    def fit(self, X: Any, y: Sequence[Any], *, backbone: Backbone | None = None,
            sources: Sequence[str] | None = None) -> NeuronProbe:
        """Fit the probes, pick the neurons and train the MLP.

        Args:
            X: prompts (needs ``backbone``), or states (n_samples, n_poolings * n_layers, d) of the
                candidate ``layers`` at the ``pooling``'s poolings, pooling-major.
            y: labels, 0/1 or any accepted vocabulary.
            backbone: the backbone the states come from; recorded and bound.
            sources: training source of each sample, recorded in ``training_summary_``.

        Returns:
            self
        """
        self._check_params()
        start = time.perf_counter()
        if backbone is not None:
            self._backbone = backbone
        poolings = self.poolings_
        candidates = candidate_layers(self.layers, X, self.backbone, len(poolings))
        H = as_states(X, candidates, self.backbone, poolings)
        labels = fit_labels(y, len(H))
        train, held = train_test_split(np.arange(len(labels)), test_size=self.validation_fraction,
                                       stratify=labels, random_state=self.random_state)
        probes = [self._probe(H[:, j], labels, train, held) for j in range(H.shape[1])]
        order = sorted((j for j, p in enumerate(probes) if p["weight"] > 0), key=lambda j: -probes[j]["score"])
        kept = sorted(order[: self.max_readings] if self.max_readings else order)
        if not kept:
            raise ConfigError("no probe did better than chance on the held-out rows; give more (or cleaner) data "
                              "or a larger `C`")
        every = layout(candidates, poolings)
        self.classes_ = np.array([0, 1])
        self.readings_ = [every[j] for j in kept]
        self.layer_ids_ = sorted({r.layer for r in self.readings_})
        picked = [probes[j] for j in kept]
        self.neurons_ = [q["neurons"] for q in picked]
        self.means_, self.scales_ = [q["mean"] for q in picked], [q["scale"] for q in picked]
        self.probe_coef_, self.probe_intercept_ = [q["coef"] for q in picked], [q["intercept"] for q in picked]
        self.reading_scores_, self.reading_weights_ = [q["score"] for q in picked], [q["weight"] for q in picked]
        A = self._features(H[:, kept])
        mlp = MLPClassifier(hidden_layer_sizes=tuple(self.hidden_layer_sizes), activation=self.activation,
                            alpha=self.alpha, max_iter=self.max_iter, early_stopping=False,
                            random_state=self.random_state).fit(A, labels)
        self.mlp_coefs_ = [W.astype(np.float64) for W in mlp.coefs_]
        self.mlp_intercepts_ = [b.astype(np.float64) for b in mlp.intercepts_]
        self.threshold_ = float(self.threshold)
        self.controversial_threshold_ = float(self.controversial_threshold)
        last = [j for j, r in enumerate(every) if r.pooling == poolings[0]]
        self.steering_layers_ = list(candidates)
        self.steering_directions_ = np.stack([H[labels == 1, j].astype(np.float64).mean(axis=0)
                                              - H[labels == 0, j].astype(np.float64).mean(axis=0) for j in last])
        sources = list(sources) if sources is not None else ["all"] * len(labels)
        self.n_samples_ = int(len(labels))
        self.training_summary_ = {f"{src}/{'unsafe' if lab else 'safe'}": int(n)
                                  for (src, lab), n in sorted(Counter(zip(sources, labels.tolist())).items())}
        self.backbone_identity_ = backbone.identity() if backbone is not None else None
        self.provenance_ = getattr(self, "provenance_", None)
        self.fit_seconds_ = time.perf_counter() - start
        return self

    def _probe(self, S: np.ndarray, y: np.ndarray, train: np.ndarray, held: np.ndarray) -> dict[str, Any]:
        """One reading's L1 probe (fitted on ``train``, scored on ``held``) and its selected neurons."""
        S = S.astype(np.float64)
        mean, scale = S[train].mean(axis=0), S[train].std(axis=0)
        scale = np.where(scale > 1e-8, scale, 1.0)
        Z = (S - mean) / scale
        lr = LogisticRegression(C=self.C, l1_ratio=1.0, solver="liblinear", class_weight="balanced",
                                max_iter=1000, random_state=self.random_state).fit(Z[train], y[train])
        score = float(balanced_accuracy_score(y[held], lr.predict(Z[held])))
        neurons = select_neurons(lr.coef_[0], self.mass)
        return {"neurons": neurons, "mean": mean[neurons], "scale": scale[neurons], "coef": lr.coef_[0][neurons],
                "intercept": float(lr.intercept_[0]), "score": score,
                "weight": max(0.0, 2.0 * score - 1.0) if len(neurons) else 0.0}

    def _features(self, H: np.ndarray) -> np.ndarray:
        """The MLP's input from states (n, len(readings_), d) of the kept readings."""
        return np.concatenate([w * (H[:, k, n].astype(np.float64) - m) / s for k, (n, m, s, w) in
                               enumerate(zip(self.neurons_, self.means_, self.scales_, self.reading_weights_))],
                              axis=1)

    def _states(self, X: Any) -> np.ndarray:
        """The kept readings of prompts or of states of ``layer_ids_`` at ``poolings_``."""
        H = as_states(X, self.layer_ids_, self.backbone, self.poolings_)
        return H[:, columns(self.readings_, self.layer_ids_, self.poolings_)]

    # ------------------------------------------------------------------ predict
    def _proba(self, H: np.ndarray) -> np.ndarray:
        return _mlp_forward(self._features(H), self.mlp_coefs_, self.mlp_intercepts_, self.activation)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities (n_samples, 2): P(safe), P(unsafe), of prompts or of states of
        ``layer_ids_`` at ``poolings_`` (pooling-major)."""
        self._check_fitted()
        p = self._proba(self._states(X))
        return np.stack([1.0 - p, p], axis=1)

    def predict(self, X: Any) -> np.ndarray:
        """1 (unsafe) at or above ``threshold_``, else 0."""
        return (self.predict_proba(X)[:, 1] >= self.threshold_).astype(np.int64)

    def score(self, X: Any, y: Sequence[Any], sample_weight: Sequence[float] | None = None) -> float:
        """Mean accuracy of :meth:`predict` against labels ``y``."""
        labels = np.array([parse_label(v) for v in y], dtype=np.int64)
        return float(accuracy_score(labels, self.predict(X), sample_weight=sample_weight))

    def verdicts(self, X: Any, *, n_truncated: Sequence[int] | None = None) -> list[Verdict]:
        """Verdicts for prompts (needs a bound backbone) or for states of ``layer_ids_`` at ``poolings_``.

        A verdict's ``layer_scores`` hold each kept reading's probe P(unsafe) (the evidence the
        MLP reads); ``category`` is ``None`` (the probe names no hazard category).
        """
        self._check_fitted()
        if n_truncated is None and not isinstance(X, np.ndarray) and self.backbone is not None:
            rows = self.backbone.encode(list(X))
            n_truncated = [r.n_truncated for r in rows]
            X = self.backbone.layer_states(rows, self.layer_ids_, poolings=self.poolings_)
        H = self._states(X)
        with np.errstate(invalid="ignore", over="ignore"):
            p = self._proba(H)
            evidence = self._evidence(H)
        broken = ~np.isfinite(H).all(axis=(1, 2)) | ~np.isfinite(p)
        cut = list(n_truncated) if n_truncated else [0] * len(p)
        out = []
        for i, pi in enumerate(p):
            if broken[i]:
                out.append(failed_verdict("ScoringError: the backbone gave non-finite hidden states (NaN or inf)",
                                          threshold=self.threshold_, n_truncated_tokens=int(cut[i])))
                continue
            scores = {r.key: float(v) for r, v in zip(self.readings_, evidence[i])}
            out.append(make_verdict(pi, tier_of(pi, self.threshold_, self.controversial_threshold_),
                                    threshold=self.threshold_, layer_scores=scores, n_truncated_tokens=int(cut[i])))
        return out

    def _evidence(self, H: np.ndarray) -> np.ndarray:
        """Each kept reading's probe P(unsafe) on its selected neurons (n, len(readings_))."""
        z = np.stack([((H[:, k, n].astype(np.float64) - m) / s) @ c + b for k, (n, m, s, c, b) in
                      enumerate(zip(self.neurons_, self.means_, self.scales_, self.probe_coef_,
                                    self.probe_intercept_))], axis=1)
        return 1.0 / (1.0 + np.exp(-z))

    def digest(self) -> str:
        """A digest of everything the verdicts depend on (answer caches key on it)."""
        self._check_fitted()
        h = hashlib.sha256(repr((self.threshold_, self.controversial_threshold_, self.content_threshold,
                                 self.other_language_threshold, self.activation,
                                 [r.key for r in self.readings_])).encode())
        for name, value in sorted(_tensors(self).items()):
            h.update(name.encode())
            h.update(np.ascontiguousarray(value).tobytes())
        return h.hexdigest()[:24]

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write the probe into folder ``path``: ``neuron_probe.json`` and a digest-named tensors file."""
        self._check_fitted()
        return _save(self, Path(path))

    @classmethod
    def load(cls, path: str | Path, backbone: Backbone | None = None) -> NeuronProbe:
        """Load a folder written by :meth:`save`; with ``backbone``, check it is the one fitted on and bind it.

        Raises:
            PrototypeFileError: a missing, corrupted, edited or unknown file.
            BackboneMismatchError: ``backbone`` is not the recorded one.
        """
        probe = _load(Path(path), cls)
        return probe.bind(backbone) if backbone is not None else probe

    def __repr__(self) -> str:
        if not hasattr(self, "mlp_coefs_"):
            return super().__repr__()
        neurons = sum(len(n) for n in self.neurons_)
        return (f"NeuronProbe(readings={[r.key for r in self.readings_]}, neurons={neurons}, "
                f"mlp={[W.shape[1] for W in self.mlp_coefs_[:-1]]}, n={self.n_samples_})")


# ---------------------------------------------------------------------- the file format
_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)
_SHA256 = r"^[0-9a-f]{64}$"


class ProbeParams(BaseModel):
    """The estimator parameters of :class:`NeuronProbe` (``get_params``)."""

    model_config = _STRICT

    layers: list[int] | None
    pooling: Literal["last", "last+mean"]
    C: float = Field(gt=0)
    mass: float = Field(gt=0, le=1)
    max_readings: int | None = Field(ge=1)
    hidden_layer_sizes: list[int] = Field(min_length=1)
    activation: Literal["relu", "tanh"]
    alpha: float = Field(ge=0)
    max_iter: int = Field(ge=1)
    validation_fraction: float = Field(gt=0, lt=0.5)
    threshold: float = Field(gt=0, lt=1)
    controversial_threshold: float = Field(gt=0, lt=1)
    content_threshold: float | None = Field(gt=0, lt=1)
    other_language_threshold: float | None = Field(gt=0, lt=1)
    random_state: int | None


class ReadingInfo(BaseModel):
    """One kept reading: where it is read, how many neurons it gives, its probe's score and weight."""

    model_config = _STRICT

    layer: int = Field(ge=1)
    pooling: Literal["last", "mean"]
    n_neurons: int = Field(ge=1)
    probe_intercept: float
    score: float = Field(ge=0, le=1)
    weight: float = Field(gt=0, le=1)


class ProbeMeta(BaseModel):
    """The schema of ``neuron_probe.json``."""

    model_config = _STRICT

    format: Literal["mlpm-guard-neuron-probe"]
    format_version: Literal[1]
    mlpm_guard_version: str
    created: str
    backbone: BackboneRecord | None
    hidden_size: int = Field(ge=1)
    params: ProbeParams
    readings: list[ReadingInfo] = Field(min_length=1)
    mlp_sizes: list[int] = Field(min_length=2)
    threshold: float = Field(gt=0, lt=1)
    controversial_threshold: float = Field(gt=0, lt=1)
    steering_layers: list[int] = Field(min_length=1)
    n_samples: int = Field(ge=4)
    training_summary: dict[str, int]
    fit_seconds: float = Field(ge=0)
    provenance: dict[str, Any] | None = None
    tensors_sha256: str = Field(pattern=_SHA256)
    metadata_sha256: str = Field(pattern=_SHA256)


FOLDER = CheckedFolder(FORMAT, FORMAT_VERSION, META_FILE, "neuron_probe", "neuron probe", ProbeMeta)


def _tensors(p: NeuronProbe) -> dict[str, np.ndarray]:
    t: dict[str, np.ndarray] = {"steering_directions": p.steering_directions_.astype(np.float32)}
    for k, (n, m, s, c) in enumerate(zip(p.neurons_, p.means_, p.scales_, p.probe_coef_)):
        t.update({f"readings.{k}.neurons": n.astype(np.int64), f"readings.{k}.mean": m.astype(np.float32),
                  f"readings.{k}.scale": s.astype(np.float32), f"readings.{k}.probe": c.astype(np.float32)})
    for j, (W, b) in enumerate(zip(p.mlp_coefs_, p.mlp_intercepts_)):
        t[f"mlp.{j}.weight"], t[f"mlp.{j}.bias"] = np.ascontiguousarray(W, dtype=np.float32), b.astype(np.float32)
    return t


def _save(p: NeuronProbe, folder: Path) -> Path:
    tensors = _tensors(p)
    if not all(np.isfinite(v).all() for v in tensors.values() if v.dtype.kind == "f"):
        raise ConfigError("this neuron probe holds NaN or infinite values and cannot be saved (fit it again)")
    blob = save_bytes(tensors, metadata={"format": FORMAT})
    params = p.get_params()
    params["layers"] = [int(x) for x in params["layers"]] if params["layers"] is not None else None
    params["hidden_layer_sizes"] = [int(x) for x in params["hidden_layer_sizes"]]
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "mlpm_guard_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "backbone": p.backbone_identity_,
        "hidden_size": int(p.steering_directions_.shape[1]), "params": params,
        "readings": [{"layer": int(r.layer), "pooling": r.pooling, "n_neurons": int(len(n)), "probe_intercept": float(b),
                      "score": float(s), "weight": float(w)}
                     for r, n, b, s, w in zip(p.readings_, p.neurons_, p.probe_intercept_, p.reading_scores_,
                                              p.reading_weights_)],
        "mlp_sizes": [int(p.mlp_coefs_[0].shape[0]), *(int(W.shape[1]) for W in p.mlp_coefs_)],
        "threshold": float(p.threshold_), "controversial_threshold": float(p.controversial_threshold_),
        "steering_layers": [int(x) for x in p.steering_layers_], "n_samples": int(p.n_samples_),
        "training_summary": {str(k): int(v) for k, v in p.training_summary_.items()},
        "fit_seconds": float(p.fit_seconds_), "provenance": p.provenance_,
    }
    return FOLDER.write(folder, meta, blob)


def _read(folder: Path) -> tuple[ProbeMeta, dict[str, np.ndarray]]:
    """The checked metadata and tensors of a neuron-probe folder (schema, both digests)."""
    return FOLDER.read(folder)


def _load(folder: Path, cls: type[NeuronProbe]) -> NeuronProbe:
    meta, t = _read(folder)
    p = cls(**meta.params.model_dump())
    try:
        p._check_params()
    except ConfigError as exc:
        raise PrototypeFileError(f"{folder}: invalid `params`: {exc}") from None
    d, k = meta.hidden_size, len(meta.readings)
    expected = {"steering_directions", *(f"readings.{i}.{x}" for i in range(k) for x in ("neurons", "mean", "scale", "probe")),
                *(f"mlp.{j}.{x}" for j in range(len(meta.mlp_sizes) - 1) for x in ("weight", "bias"))}
    if set(t) != expected:
        raise PrototypeFileError(f"{folder}: the tensors file holds {sorted(set(t) ^ expected)} that "
                                 f"{META_FILE} does not describe (or lacks them)")
    p.readings_ = [Reading(r.layer, r.pooling) for r in meta.readings]
    if len(set(p.readings_)) != k or any(r.pooling not in p.poolings_ for r in p.readings_):
        raise PrototypeFileError(f"{folder}: readings {p.readings_} are repeated or use a pooling "
                                 f"params.pooling={p.pooling!r} does not read")
    p.layer_ids_ = sorted({r.layer for r in p.readings_})
    p.neurons_, p.means_, p.scales_, p.probe_coef_ = [], [], [], []
    for i, info in enumerate(meta.readings):
        n = t[f"readings.{i}.neurons"]
        parts = [t[f"readings.{i}.{x}"] for x in ("mean", "scale", "probe")]
        if (n.shape != (info.n_neurons,) or n.dtype.kind != "i" or len(np.unique(n)) != len(n)
                or n.min() < 0 or n.max() >= d or any(x.shape != n.shape for x in parts)):
            raise PrototypeFileError(f"{folder}: reading {i} has neuron tensors that do not match {META_FILE}")
        if not (parts[1] > 0).all():
            raise PrototypeFileError(f"{folder}: reading {i} has non-positive scales")
        p.neurons_.append(n.astype(np.int64))
        p.means_.append(parts[0].astype(np.float64))
        p.scales_.append(parts[1].astype(np.float64))
        p.probe_coef_.append(parts[2].astype(np.float64))
    p.probe_intercept_ = [r.probe_intercept for r in meta.readings]
    p.reading_scores_ = [r.score for r in meta.readings]
    p.reading_weights_ = [r.weight for r in meta.readings]
    sizes = meta.mlp_sizes
    if sizes[0] != sum(r.n_neurons for r in meta.readings) or sizes[-1] != 1:
        raise PrototypeFileError(f"{folder}: the MLP's sizes {sizes} do not fit the selected neurons")
    p.mlp_coefs_, p.mlp_intercepts_ = [], []
    for j in range(len(sizes) - 1):
        W, b = t[f"mlp.{j}.weight"], t[f"mlp.{j}.bias"]
        if W.shape != (sizes[j], sizes[j + 1]) or b.shape != (sizes[j + 1],):
            raise PrototypeFileError(f"{folder}: MLP layer {j} does not match {META_FILE}")
        p.mlp_coefs_.append(W.astype(np.float64))
        p.mlp_intercepts_.append(b.astype(np.float64))
    p.classes_ = np.array([0, 1])
    p.threshold_, p.controversial_threshold_ = meta.threshold, meta.controversial_threshold
    if p.controversial_threshold_ > p.threshold_:
        raise PrototypeFileError(f"{folder}: controversial_threshold exceeds threshold")
    p.steering_layers_ = list(meta.steering_layers)
    p.steering_directions_ = t["steering_directions"].astype(np.float64)
    if p.steering_directions_.shape != (len(p.steering_layers_), d):
        raise PrototypeFileError(f"{folder}: steering directions do not match {META_FILE}")
    if meta.backbone is not None and (meta.backbone.hidden_size != d
                                      or max(p.steering_layers_) > meta.backbone.num_layers):
        raise PrototypeFileError(f"{folder}: the layers or hidden size do not fit the recorded backbone")
    p.n_samples_, p.training_summary_ = meta.n_samples, dict(meta.training_summary)
    p.fit_seconds_, p.provenance_ = meta.fit_seconds, meta.provenance
    p.backbone_identity_ = meta.backbone.model_dump() if meta.backbone is not None else None
    return p
