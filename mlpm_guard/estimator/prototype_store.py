"""Versioned prototypes: teaching corrections without training, with history, diff and rollback.

A store is a folder of prototypes folders, one per version, and a ``CURRENT`` file naming the one
in use::

    store/
      CURRENT          "v0003"
      v0001/           the prototypes the store was started from
      v0002/           v0001 + the corrections taught to it
      v0003/           ...

Teaching (:meth:`PrototypeStore.teach`) loads the current version, adds each corrected text as a
prototype of its own (:meth:`~mlpm_guard.Prototypes.add_examples`: no refit, the layer combination
is kept), a "fine" one with the strongest prior that leaves the calibration probes refused
(:func:`_teach`), and saves a new version. What was taught is part of that version's ``prototypes.json``
(``provenance.store``: its parent, the parent's metadata digest, the corrections), covered by the
file's digest, so the record cannot drift from the prototypes it describes. Versions are never
changed after they are written: rollback only moves ``CURRENT``, and the rolled-back version reloads
bit for bit. A server started with ``--prototypes-store`` watches ``CURRENT`` and loads a new
version without a restart (:class:`mlpm_guard.server.review.PrototypeReloader`).
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from .._io import atomic_write_text
from ..guardrail.decision_log import Correction, teachable_prompt, text_sha256
from ..vocabulary.errors import ConfigError
from .prototype_file import META_FILE
from .prototypes import Prototypes

if TYPE_CHECKING:
    from ..model.backbone import Backbone

__all__ = ["PrototypeStore", "TaughtCorrection", "TeachingCost", "VersionDiff", "VersionInfo", "calibration_probes",
           "harmful_probes", "teach_in_memory", "teaching_cost"]

CURRENT_FILE = "CURRENT"
_VERSION = re.compile(r"^v(\d{4,})$")


class TaughtCorrection(BaseModel):
    """A correction as a version records it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    text: str
    label: str
    category: str | None = None
    correction_id: int | None = None
    group: str
    log_prior: float = 0.0
    sharpness: float = 1.0

    @property
    def text_sha256(self) -> str:
        return text_sha256(self.text)


class VersionInfo(BaseModel):
    """One version of a store, read from its ``prototypes.json`` without loading its tensors."""

    model_config = ConfigDict(frozen=True)

    version: str
    parent: str | None
    created: str
    metadata_sha256: str
    corrections: list[TaughtCorrection]
    n_prototypes: int
    current: bool = False


class VersionDiff(BaseModel):
    """What lies between two versions: the corrections taught on the way and the prototypes that differ."""

    model_config = ConfigDict(frozen=True)

    old: str
    new: str
    added: list[TaughtCorrection]
    removed: list[TaughtCorrection]
    prototypes_added: list[str]
    prototypes_removed: list[str]
    threshold: tuple[float, float]


class PrototypeStore:
    """A folder of prototype versions (see the module docstring).

    Args:
        root: the store's folder (made by :meth:`create`).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not (self.root / CURRENT_FILE).is_file():
            msg = (f"{self.root} is not a prototypes store (no {CURRENT_FILE} file); start one with "
                   f"`mlpm-guard prototypes init {self.root}`")
            raise ConfigError(msg)

    @classmethod
    def create(cls, root: str | Path, prototypes: Prototypes | str | Path) -> PrototypeStore:
        """Start a store at ``root`` whose first version ``v0001`` is ``prototypes`` (fitted, or a saved folder)."""
        root = Path(root)
        if (root / CURRENT_FILE).exists():
            raise ConfigError(f"{root} already holds a prototypes store; teach or roll back there instead")
        root.mkdir(parents=True, exist_ok=True)
        first = root / "v0001"
        if isinstance(prototypes, Prototypes):
            kept = getattr(prototypes, "provenance_", None)  # the caller's prototypes are left as they were
            try:
                _with_record(prototypes, {"version": "v0001", "parent": None, "parent_metadata_sha256": None,
                                          "corrections": []}).save(first)
            finally:
                prototypes.provenance_ = kept
        else:
            shutil.copytree(prototypes, first)
        atomic_write_text(root / CURRENT_FILE, "v0001\n")
        return cls(root)

    # ------------------------------------------------------------------ reading
    @property
    def current(self) -> str:
        name = (self.root / CURRENT_FILE).read_text(encoding="utf-8").strip()
        if not _VERSION.match(name) or not (self.root / name / META_FILE).is_file():
            raise ConfigError(f"{self.root / CURRENT_FILE} names {name!r}, which is not a version of this store")
        return name

    def path(self, version: str | None = None) -> Path:
        version = version or self.current
        folder = self.root / version
        if not _VERSION.match(version) or not (folder / META_FILE).is_file():
            raise ConfigError(f"no version {version!r} in {self.root}; the versions are "
                              f"{', '.join(self.version_names()) or 'none'}")
        return folder

    def version_names(self) -> list[str]:
        return sorted((p.name for p in self.root.iterdir() if _VERSION.match(p.name) and (p / META_FILE).is_file()),
                      key=lambda n: int(n[1:]))

    def info(self, version: str | None = None) -> VersionInfo:
        version = version or self.current
        meta = json.loads((self.path(version) / META_FILE).read_text(encoding="utf-8"))
        record = (meta.get("provenance") or {}).get("store") or {}
        return VersionInfo(version=version, parent=record.get("parent"), created=meta["created"],
                           metadata_sha256=meta["metadata_sha256"],
                           corrections=[TaughtCorrection(**c) for c in record.get("corrections", [])],
                           n_prototypes=sum(len(s["prototypes"]) for s in meta["sets"]),
                           current=version == self.current)

    def history(self) -> list[VersionInfo]:
        """Every version, oldest first."""
        return [self.info(v) for v in self.version_names()]

    def lineage(self, version: str | None = None) -> list[str]:
        """The version and its ancestors, newest first."""
        out, at = [], version or self.current
        while at is not None and at not in out:
            out.append(at)
            at = self.info(at).parent
        return out

    def load(self, version: str | None = None, backbone: Backbone | None = None) -> Prototypes:
        """The prototypes of ``version`` (default: the current one), with ``version_`` set to its name."""
        version = version or self.current
        prototypes = Prototypes.load(self.path(version), backbone=backbone)
        prototypes.version_ = version
        return prototypes

    def diff(self, old: str, new: str | None = None) -> VersionDiff:
        """Corrections taught between ``old`` and ``new`` (default: current), and the prototype groups that differ."""
        new = new or self.current
        old_line, new_line = self.lineage(old), self.lineage(new)

        def taught(line: list[str], others: list[str]) -> list[TaughtCorrection]:
            return [c for v in reversed(line) if v not in others for c in self.info(v).corrections]

        groups = {v: _groups(self.path(v)) for v in (old, new)}
        return VersionDiff(old=old, new=new, added=taught(new_line, old_line), removed=taught(old_line, new_line),
                           prototypes_added=sorted(groups[new] - groups[old]),
                           prototypes_removed=sorted(groups[old] - groups[new]),
                           threshold=(_threshold(self.path(old)), _threshold(self.path(new))))

    # ------------------------------------------------------------------ writing
    def teach(self, corrections: Sequence[Correction], backbone: Backbone, *, base: str | None = None,
              loaded: Prototypes | None = None) -> VersionInfo:
        """A new version: ``base`` (default: the current one) plus ``corrections``, made current.

        Each corrected text becomes a prototype of its own (``taught-safe-<hash>`` or
        ``taught-unsafe-<hash>``), so one correction moves the verdicts of texts like it and no
        other correction's prototype; harmful corrections with a category also move that category.

        ``loaded``: the base version already in memory (a server's), copied instead of read again.
        """
        if not corrections:
            raise ConfigError("there are no corrections to teach")
        base = base or self.current
        parent = self.info(base)
        if loaded is not None and getattr(loaded, "version_", None) == base:
            prototypes = copy.deepcopy(loaded)  # its pickled state leaves the backbone out
            prototypes.bind(backbone)
        else:
            prototypes = self.load(base, backbone=backbone)
        taught = _teach(prototypes, corrections)
        version = self._next_name()
        record = {"version": version, "parent": base, "parent_metadata_sha256": parent.metadata_sha256,
                  "corrections": [t.model_dump() for t in taught]}
        _with_record(prototypes, record).save(self.root / version)
        self.set_current(version)
        return self.info(version)

    def set_current(self, version: str) -> None:
        self.path(version)  # checks it exists
        atomic_write_text(self.root / CURRENT_FILE, version + "\n")

    def rollback(self, version: str | None = None) -> str:
        """Make ``version`` (default: the current version's parent) current again; returns it."""
        if version is None:
            version = self.info().parent
            if version is None:
                raise ConfigError(f"{self.current} is the first version of {self.root}; there is nothing to roll back to")
        self.set_current(version)
        return version

    def _next_name(self) -> str:
        names = self.version_names()
        return f"v{(int(names[-1][1:]) + 1 if names else 1):04d}"

    def __repr__(self) -> str:
        return f"PrototypeStore({str(self.root)!r}, current={self.current!r})"


class TeachingCost(BaseModel):
    """What teaching some corrections would do, measured before they are applied.

    Attributes:
        n_probes: held-back harmful prompts scored (the project's own probes, never taught).
        flagged_before / flagged_after: how many of them reach the unsafe line.
        flipped: the probes flagged before and not after.
        corrected_before / corrected_after: P(unsafe) of each corrected text.
    """

    model_config = ConfigDict(frozen=True)

    n_probes: int
    flagged_before: int
    flagged_after: int
    flipped: list[str]
    corrected_before: list[float]
    corrected_after: list[float]

    @property
    def recall_before(self) -> float:
        return self.flagged_before / self.n_probes if self.n_probes else 1.0

    @property
    def recall_after(self) -> float:
        return self.flagged_after / self.n_probes if self.n_probes else 1.0


#: How many times narrower than the shared covariance a taught "fine" prototype's spread is. With
#: the shared covariance a prototype made from one text wins a half-space: every request lying
#: beyond the text as seen from the class means, harmful ones included. Narrower, it wins an
#: ellipsoid around the text, and one correction moves texts like it and little else (see
#: docs/review.md for the sharpness against held-out siblings and harmful probes).
TAUGHT_SHARPNESS = 3.0


def prior_grid(sharpness: float, d: int) -> tuple[float, ...]:
    """The log priors tried for a taught "fine" prototype of ``sharpness`` on states of size ``d``,
    strongest first, in steps of 0.5: from 0 (a class mean's) to 16 below the prior that cancels
    its density's normalisation, ``(d / 2) log sharpness`` (0 at sharpness 1)."""
    lowest = 0.5 * d * math.log(sharpness) + 16.0
    return tuple(-0.5 * i for i in range(int(2 * lowest) + 1))


def teach_in_memory(prototypes: Prototypes, corrections: Sequence[Correction], *,
                    sharpness: float = TAUGHT_SHARPNESS) -> Prototypes:
    """A copy of ``prototypes`` taught ``corrections`` (the original is left as it is); ``sharpness``
    of the "fine" prototypes as :data:`TAUGHT_SHARPNESS` describes (1: the shared covariance)."""
    backbone = prototypes.backbone
    taught = copy.deepcopy(prototypes)  # the estimator's pickled state leaves the backbone out
    if backbone is not None:
        taught.bind(backbone)
    _teach(taught, corrections, sharpness)
    return taught


def teaching_cost(prototypes: Prototypes, corrections: Sequence[Correction], backbone: Backbone,
                  probes: Sequence[str]) -> TeachingCost:
    """Score ``probes`` (harmful prompts) and the corrected texts before and after teaching ``corrections``."""
    after = teach_in_memory(prototypes, corrections)
    texts = [teachable_prompt(c.text) for c in corrections]
    H = backbone.hidden_states(list(probes) + texts, prototypes.layer_ids_, poolings=prototypes.poolings_)
    old, new = prototypes.verdicts(H), after.verdicts(H)
    n = len(probes)
    flipped = [t for t, a, b in zip(probes, old[:n], new[:n]) if a.unsafe and not b.unsafe]
    return TeachingCost(n_probes=n, flagged_before=sum(v.unsafe for v in old[:n]),
                        flagged_after=sum(v.unsafe for v in new[:n]), flipped=flipped,
                        corrected_before=[v.p_unsafe for v in old[n:]], corrected_after=[v.p_unsafe for v in new[n:]])


def _probes(name: str, keep: Callable[[dict[str, Any]], bool]) -> list[str]:
    from importlib.resources import files

    text = files("mlpm_guard").joinpath(f"resources/probes/{name}.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [r["prompt"] for r in rows if keep(r)]


def calibration_probes() -> list[str]:
    """The held-back harmful requests a taught "fine" prototype must leave refused
    (``resources/probes/adversarial.jsonl``, label unsafe; see :func:`_teach`)."""
    return _probes("adversarial", lambda r: r.get("label") == "unsafe")


def harmful_probes() -> list[str]:
    """The held-back harmful requests the cost of teaching is shown on: the calibration probes,
    malware requests and harmful requests rephrased (past and future tense, personas, fiction),
    all from ``resources/probes``, none of them ever taught."""
    return (calibration_probes() + _probes("malware", lambda r: r.get("kind") == "malware")
            + _probes("framings", lambda r: r.get("label") == "unsafe"))


def _teach(prototypes: Prototypes, corrections: Sequence[Correction],
           sharpness: float = TAUGHT_SHARPNESS) -> list[TaughtCorrection]:
    """Add each correction as a prototype of its own (see :meth:`PrototypeStore.teach`).

    A "fine" prototype made from one short text lies nearer to most short requests, harmful ones
    included, than the safe and unsafe means averaged over thousands of texts do: at the equal
    prior, three corrections per look-alike family left most harmful requests unflagged. So each
    one is made ``sharpness`` times narrower than the shared covariance and gets a prior of
    :func:`prior_grid`, judged on its own (the batch's other corrections switched off): the
    strongest at which every calibration probe (:func:`calibration_probes`) refused before
    teaching is still refused, unless the corrected text itself would then still not pass; then
    the weakest at which it passes (the operator's word on that text wins, and the cost preview
    shows what it costs). Together, corrections can let through a probe that each alone leaves
    refused: then all of them are weakened a step of the grid at a time until none is. Judged one
    after another instead, the first correction used up the margin of the probe nearest the
    threshold and left the rest almost no room. Unbound prototypes (no backbone to read texts
    with) keep equal priors and the shared covariance, as do harmful corrections.
    """
    texts = [teachable_prompt(c.text) for c in corrections]
    safe = [i for i, c in enumerate(corrections) if c.label == "safe"]
    probes = own = None
    if safe and prototypes.backbone is not None:
        probes = calibration_probes()
        states = prototypes.backbone.hidden_states(probes + [texts[i] for i in safe], prototypes.layer_ids_,
                                                   poolings=prototypes.poolings_)
        probes, own = states[: len(probes)], dict(zip(safe, states[len(probes):]))
        probes = probes[_p_unsafe(prototypes, probes) >= prototypes.threshold_]
    groups = [f"taught-{c.label}-{c.text_sha256[:12]}" for c in corrections]
    local: dict[str, Any] = {}  # group -> the corrected text's states, for the groups given a prior here
    for i, (c, text, group) in enumerate(zip(corrections, texts, groups)):
        is_local = own is not None and i in own
        prototypes.add_examples([text], [c.label], category=c.category if c.label == "unsafe" else None, name=group,
                                sharpness=sharpness if is_local else 1.0)
        if is_local:
            local[group] = own[i][None]
            prototypes.set_log_prior(group, _OFF)
    priors = {}
    for group, states in local.items():
        priors[group] = _prior(prototypes, group, probes, states, _grid_of(prototypes, group))
        prototypes.set_log_prior(group, _OFF)
    priors = _together(prototypes, priors, probes)
    first = prototypes.sets_[0]
    return [TaughtCorrection(text=c.text, label=c.label, category=c.category, correction_id=c.id, group=group,
                             log_prior=priors.get(group, 0.0),
                             sharpness=float(first.sharpness[first.names.index(group)]))
            for c, group in zip(corrections, groups)]


#: A log prior at which a taught prototype moves no verdict (its weight underflows to 0): how one
#: correction is judged with the others of its batch switched off.
_OFF = -1e9


def _grid_of(prototypes: Prototypes, group: str) -> tuple[float, ...]:
    first = prototypes.sets_[0]
    return prior_grid(float(first.sharpness[first.names.index(group)]), first.means.shape[-1])


def _together(prototypes: Prototypes, priors: dict[str, float], refused: Any) -> dict[str, float]:
    """Set each group's prior, weakened together by steps of 0.5 until the probes that every group
    alone leaves refused are refused with all of them (see :func:`_teach`); the priors set."""
    if not priors or not len(refused):
        for group, log_prior in priors.items():
            prototypes.set_log_prior(group, log_prior)
        return priors
    keep = np.ones(len(refused), dtype=bool)
    for group, log_prior in priors.items():
        prototypes.set_log_prior(group, log_prior)
        keep &= _p_unsafe(prototypes, refused) >= prototypes.threshold_
        prototypes.set_log_prior(group, _OFF)
    floors = {group: _grid_of(prototypes, group)[-1] for group in priors}
    step = 0.0
    while True:
        now = {group: max(p - step, floors[group]) for group, p in priors.items()}
        for group, log_prior in now.items():
            prototypes.set_log_prior(group, log_prior)
        if (_p_unsafe(prototypes, refused[keep]) >= prototypes.threshold_).all() or all(
                now[g] == floors[g] for g in now):
            return now
        step += 0.5


def _p_unsafe(prototypes: Prototypes, states: Any) -> Any:
    return prototypes.predict_proba(states)[:, 1]


def _prior(prototypes: Prototypes, group: str, refused: Any, own: Any, grid: Sequence[float]) -> float:
    """The prior of taught prototype ``group`` (see :func:`_teach`): ``refused`` are the states that
    must stay refused, ``own`` the corrected text's. A stronger prior only lowers P(unsafe), so
    each condition holds on one side of a point of the grid, found by bisection."""
    def first(holds: Callable[[], bool]) -> int:
        lo, hi = 0, len(grid)  # the first index where `holds` is true, or len(grid)
        while lo < hi:
            mid = (lo + hi) // 2
            prototypes.set_log_prior(group, grid[mid])
            lo, hi = (lo, mid) if holds() else (mid + 1, hi)
        return lo

    keeps = first(lambda: bool((_p_unsafe(prototypes, refused) >= prototypes.threshold_).all()))
    # The weakest prior at which the corrected text passes: one before the first at which it does not.
    passes = first(lambda: bool(_p_unsafe(prototypes, own)[0] >= prototypes.controversial_threshold_)) - 1
    at = min(keeps, passes) if passes >= 0 else keeps
    at = min(at, len(grid) - 1)
    prototypes.set_log_prior(group, grid[at])
    return grid[at]


def _with_record(prototypes: Prototypes, record: dict[str, Any]) -> Prototypes:
    record = {**record, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    prototypes.provenance_ = {**(getattr(prototypes, "provenance_", None) or {}), "store": record}
    return prototypes


def _groups(folder: Path) -> set[str]:
    meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    return {f"{s['name']}/{name}" for s in meta["sets"] for name in s["prototypes"]}


def _threshold(folder: Path) -> float:
    return float(json.loads((folder / META_FILE).read_text(encoding="utf-8"))["threshold"])
