"""The on-disk form of fitted prototypes: a strict schema for ``prototypes.json`` and its digests,
and the writing and reading of a plain record of an estimator (:class:`PrototypeRecord`,
:func:`save_record`, :func:`load_record`; ``Prototypes.save``/``load`` turn the estimator into
one and back).

A prototypes folder decides verdicts, so nothing in it is taken on trust: every field is checked
for type and range (no NaN, no threshold outside (0, 1), no unknown keys), the metadata and the
tensors are both covered by SHA-256 digests, and the tensors file is named by its own digest so
that ``prototypes.json`` is the single commit point of a save (see :func:`write_folder`).
The digests catch corruption and files from two different saves; a person who edits the folder
and recomputes them is caught by the schema and by the self-check in ``Prototypes.load`` (the
prototypes must still call their own unsafe mean unsafe), not by the digests.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from safetensors import SafetensorError
from safetensors.numpy import load as load_bytes, save as save_bytes

from .._io import atomic_write_bytes, atomic_write_text, remove_stale_temporaries
from .._version import __version__
from ..vocabulary.errors import ConfigError, PrototypeFileError
from .prototype_set import PrototypeSet
from .readings import Reading, poolings_of

FORMAT = "mlpm-guard-prototypes"
#: 2: digest-named tensors file, metadata digest, strict schema (1 had a fixed tensors file name).
#: 3: ``readings`` (layer and pooling of each input; a version-2 file reads last tokens only).
FORMAT_VERSION = 4
META_FILE = "prototypes.json"
_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)
_SHA256 = r"^[0-9a-f]{64}$"


def tensors_file_name(tensors_sha256: str) -> str:
    """The tensors file of a save: named by its digest, so a new save never overwrites the old one."""
    return f"prototypes.{tensors_sha256[:16]}.safetensors"


class BackboneRecord(BaseModel):
    """What a prototypes folder records about the backbone it was fitted on (``Backbone.identity``).

    ``model`` is kept for people reading the file; it never chooses what gets loaded.
    """

    model_config = _STRICT

    name: str
    model: str
    model_type: str | None
    num_layers: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    vocab_size: int = Field(ge=1)
    chat_template_hash: str
    weights_probe: list[float]


class FitParams(BaseModel):
    """The estimator parameters of ``Prototypes`` (``get_params``)."""

    model_config = _STRICT

    layers: list[int] | None
    C: float = Field(gt=0)
    per_source: bool
    min_source_count: int = Field(ge=1)
    cv: int | None = Field(ge=2)
    threshold: float = Field(gt=0, lt=1)
    controversial_threshold: float = Field(gt=0, lt=1)
    pooling: Literal["last", "last+mean"] = "last"
    other_language_threshold: float | None = Field(default=None, gt=0, lt=1)
    content_threshold: float | None = Field(default=None, gt=0, lt=1)
    source_invariance: float = Field(default=0.0, ge=0)
    categories: bool
    random_state: int | None


class SetRecord(BaseModel):
    model_config = _STRICT

    name: str
    n: int = Field(ge=2)
    prototypes: list[str] = Field(min_length=2)


class ReadingRecord(BaseModel):
    """One input of the prototypes (:class:`~mlpm_guard.estimator.readings.Reading`)."""

    model_config = _STRICT

    layer: int = Field(ge=1)
    pooling: Literal["last", "mean"]


class HeadRecord(BaseModel):
    """Where a head is saved (``heads/<folder>``) and the digest of its metadata."""

    model_config = _STRICT

    folder: str = Field(pattern=r"^(answer|content)-[0-9a-f]{16}$")
    metadata_sha256: str = Field(pattern=_SHA256)


class PrototypeMeta(BaseModel):
    """The schema of ``prototypes.json``."""

    model_config = _STRICT

    format: Literal["mlpm-guard-prototypes"]
    format_version: Literal[2, 3, 4]
    mlpm_guard_version: str
    created: str
    backbone: BackboneRecord | None
    hidden_size: int = Field(ge=1)
    layer_ids: list[int] = Field(min_length=1)
    readings: list[ReadingRecord] | None = None  # None (version 2): the last token of each layer
    params: FitParams
    intercept: float
    threshold: float = Field(gt=0, lt=1)
    controversial_threshold: float = Field(gt=0, lt=1)
    sets: list[SetRecord] = Field(min_length=1)
    category_layer: int | None
    category_labels: list[str]
    steering_layers: list[int] = Field(min_length=1)
    n_samples: int = Field(ge=0)
    training_summary: dict[str, int]
    provenance: dict[str, Any] | None = None  # how the fit was made (the shipped default records its data and licences)
    # Version 4: heads (prototypes of their own for another kind of text), by kind: the subfolder of
    # `heads/` that holds each, and its metadata_sha256, so that an edited head is refused.
    heads: dict[Literal["answer", "content"], HeadRecord] = Field(default_factory=dict)
    tensors_sha256: str = Field(pattern=_SHA256)
    metadata_sha256: str = Field(pattern=_SHA256)

    @field_validator("layer_ids", "steering_layers")
    @classmethod
    def _ascending_layer_ids(cls, value: list[int]) -> list[int]:
        if value[0] < 1 or any(a >= b for a, b in zip(value, value[1:])):
            raise ValueError(f"must be distinct ascending layer ids >= 1, got {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> PrototypeMeta:
        if self.controversial_threshold > self.threshold:
            raise ValueError(f"controversial_threshold {self.controversial_threshold} exceeds threshold {self.threshold}")
        if self.category_layer is not None and self.category_layer not in self.layer_ids:
            raise ValueError(f"category_layer {self.category_layer} is not one of layer_ids {self.layer_ids}")
        if self.category_labels and self.category_layer is None:
            raise ValueError("category_labels are given but category_layer is null")
        if not set(self.layer_ids) <= set(self.steering_layers):
            raise ValueError("layer_ids must be a subset of steering_layers (the candidate layers of the fit)")
        readings = self.reading_list()
        if len(set(readings)) != len(readings) or sorted({layer for layer, _ in readings}) != self.layer_ids:
            raise ValueError(f"readings {readings} must be distinct and read exactly layer_ids {self.layer_ids}")
        if any(pooling not in poolings_of(self.params.pooling) for _, pooling in readings):
            raise ValueError(f"readings {readings} use a pooling that params.pooling={self.params.pooling!r} does not read")
        if self.category_layer is not None and Reading(self.category_layer, "last") not in readings:
            raise ValueError(f"category_layer {self.category_layer} has no last-token reading")
        if self.backbone is not None:
            if self.backbone.hidden_size != self.hidden_size:
                raise ValueError(f"hidden_size {self.hidden_size} differs from the backbone's "
                                 f"{self.backbone.hidden_size}")
            if self.steering_layers[-1] > self.backbone.num_layers:
                raise ValueError(f"layer ids go beyond the backbone's {self.backbone.num_layers} layers")
        return self

    def reading_list(self) -> list[Reading]:
        """The prototypes' inputs in the order of their statistics (last tokens of ``layer_ids`` in version 2)."""
        if self.readings is None:
            return [Reading(layer, "last") for layer in self.layer_ids]
        return [Reading(r.layer, r.pooling) for r in self.readings]


def _canonical(meta: dict[str, Any]) -> bytes:
    body = {k: v for k, v in meta.items() if k != "metadata_sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")


def metadata_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of the metadata (all but the digest itself; the tensors digest is part of it)."""
    return hashlib.sha256(_canonical(meta)).hexdigest()


def write_folder(folder: Path, meta: dict[str, Any], blob: bytes) -> None:
    """Save metadata and tensors so that a crash at any point leaves a loadable folder.

    The tensors go to a new file named by their digest; replacing ``prototypes.json`` then
    switches to them in one rename. Before it, the old metadata still names the old tensors,
    which are only deleted after it. Temporary files of saves killed earlier are removed first.
    """
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder)
    meta = {**meta, "tensors_sha256": hashlib.sha256(blob).hexdigest()}
    meta["metadata_sha256"] = metadata_digest(meta)
    PrototypeMeta.model_validate(meta)  # never write a file that would not load
    name = tensors_file_name(meta["tensors_sha256"])
    atomic_write_bytes(folder / name, blob)
    atomic_write_text(folder / META_FILE, json.dumps(meta, indent=2, allow_nan=False))
    for old in folder.glob("prototypes*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def read_folder(folder: Path) -> tuple[PrototypeMeta, bytes]:
    """Read and check a prototypes folder: schema, then both digests.

    Raises:
        PrototypeFileError: naming the file and what is wrong with it.
    """
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise PrototypeFileError(f"{folder} is not a prototypes folder: it has no {META_FILE} "
                                 "(write one with `mlpm-guard fit DATA... --out DIR` or `Prototypes.save`)")
    try:
        raw = json.loads(meta_path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, NaN, absurd nesting
        raise PrototypeFileError(f"{meta_path} is corrupted (not valid JSON: {exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise PrototypeFileError(f"{meta_path} is not an mlpm-guard prototypes file")
    version = raw.get("format_version")
    if type(version) is not int:
        raise PrototypeFileError(f"{meta_path}: `format_version` must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise PrototypeFileError(f"{meta_path} has format version {version}, newer than this mlpm-guard "
                                 f"understands ({FORMAT_VERSION}); upgrade mlpm-guard")
    if version < 2:
        raise PrototypeFileError(f"{meta_path} has format version {version}, from an older mlpm-guard without "
                                 "digests over the metadata; fit the prototypes again (`mlpm-guard fit ... --out DIR`)")
    try:
        meta = PrototypeMeta.model_validate(raw)
    except ValidationError as exc:
        raise PrototypeFileError(f"{meta_path} has invalid fields (refusing to load prototypes that decide "
                                 f"verdicts from it):\n{exc}") from None
    if metadata_digest(raw) != meta.metadata_sha256:
        raise PrototypeFileError(f"{meta_path} was changed after it was saved (its metadata_sha256 does not match); "
                                 "change prototypes through the Python API and `save`, or fit them again")
    tensor_path = folder / tensors_file_name(meta.tensors_sha256)
    if not tensor_path.is_file():
        raise PrototypeFileError(f"{folder}: the tensors file {tensor_path.name} named by {META_FILE} is missing "
                                 "(files copied from two different saves?); save the prototypes again")
    blob = tensor_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != meta.tensors_sha256:
        raise PrototypeFileError(f"{tensor_path} does not match {META_FILE} (corrupted, or from another save); "
                                 "save the prototypes again")
    return meta, blob


@dataclass(frozen=True)
class CheckedFolder:
    """A strict folder format of one kind of fitted artefact (a neuron probe, a safety prompt): a
    JSON metadata file with a schema and its own digest, beside a safetensors file named by its
    digest. The tensors are written first and the metadata last, each in one rename, so a save
    killed at any point leaves the previous one loadable."""

    format: str
    version: int
    meta_file: str
    stem: str  # the tensors file is ``<stem>.<digest>.safetensors``
    what: str  # "neuron probe", "safety prompt": named in errors
    schema: type[BaseModel]
    missing_hint: str = ""

    def tensors_file_name(self, digest: str) -> str:
        return f"{self.stem}.{digest[:16]}.safetensors"

    def write(self, folder: Path, meta: dict[str, Any], blob: bytes) -> Path:
        """Write ``meta`` (without its digests, which are added here) and the tensors ``blob``."""
        meta["tensors_sha256"] = hashlib.sha256(blob).hexdigest()
        meta["metadata_sha256"] = metadata_digest(meta)
        try:
            self.schema.model_validate(meta)  # never write a file that would not load
        except ValidationError as exc:
            raise ConfigError(f"this {self.what} holds values that cannot be saved:\n{exc}") from None
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(folder)
        name = self.tensors_file_name(meta["tensors_sha256"])
        atomic_write_bytes(folder / name, blob)
        atomic_write_text(folder / self.meta_file, json.dumps(meta, indent=2, allow_nan=False))
        for old in folder.glob(f"{self.stem}.*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)
        return folder

    def read(self, folder: Path) -> tuple[Any, dict[str, np.ndarray]]:
        """The checked metadata (schema, both digests) and the finite tensors of a folder."""
        meta_path = folder / self.meta_file
        if not meta_path.is_file():
            raise PrototypeFileError(f"{folder} is not a {self.what} folder: it has no {self.meta_file}{self.missing_hint}")
        try:
            raw = json.loads(meta_path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            raise PrototypeFileError(f"{meta_path} is corrupted (not valid JSON: {exc})") from None
        if not isinstance(raw, dict) or raw.get("format") != self.format:
            raise PrototypeFileError(f"{meta_path} is not an mlpm-guard {self.what} file")
        if type(raw.get("format_version")) is int and raw["format_version"] > self.version:
            raise PrototypeFileError(f"{meta_path} has format version {raw['format_version']}, newer than this "
                                     f"mlpm-guard understands ({self.version}); upgrade mlpm-guard")
        try:
            meta = self.schema.model_validate(raw)
        except ValidationError as exc:
            raise PrototypeFileError(f"{meta_path} has invalid fields (refusing to load a {self.what} from it):\n"
                                     f"{exc}") from None
        if metadata_digest(raw) != raw["metadata_sha256"]:
            raise PrototypeFileError(f"{meta_path} was changed after it was saved (its metadata_sha256 does not "
                                     f"match); fit the {self.what} again")
        tensor_path = folder / self.tensors_file_name(raw["tensors_sha256"])
        if not tensor_path.is_file():
            raise PrototypeFileError(f"{folder}: the tensors file {tensor_path.name} named by {self.meta_file} is missing")
        blob = tensor_path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != raw["tensors_sha256"]:
            raise PrototypeFileError(f"{tensor_path} does not match {self.meta_file} (corrupted, or from another save)")
        try:
            tensors = load_bytes(blob)
        except (SafetensorError, OSError, ValueError) as exc:
            raise PrototypeFileError(f"{folder}: the tensors file is truncated or corrupted: {exc}") from None
        if not all(np.isfinite(v).all() for v in tensors.values() if v.dtype.kind == "f"):
            raise PrototypeFileError(f"{folder}: the tensors hold NaN or infinite values")
        return meta, tensors


def _reject_constant(name: str) -> Any:
    # Python's json reads NaN/Infinity, which are not JSON; a prototypes file never holds them.
    raise ValueError(f"{name} is not a number JSON allows")


def check_tensors(t: dict[str, np.ndarray], where: Path) -> None:
    """Every tensor finite; labels 0/1; counts positive."""
    for key, value in t.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise PrototypeFileError(f"{where}: tensor {key!r} holds NaN or infinite values")
        if key.endswith(".labels") and (not np.isin(value, (0, 1)).all() or not {0, 1} <= set(value.tolist())):
            raise PrototypeFileError(f"{where}: tensor {key!r} must hold labels 0 and 1, got {sorted(set(value.tolist()))}")
        if key.endswith(".counts") and not (value > 0).all():
            raise PrototypeFileError(f"{where}: tensor {key!r} must hold positive counts")
        if key.endswith(".log_priors") and not (value <= 0).all():
            raise PrototypeFileError(f"{where}: tensor {key!r} must hold log priors of at most 0")
        if key.endswith(".sharpness") and not (value >= 1).all():
            raise PrototypeFileError(f"{where}: tensor {key!r} must hold sharpness values of at least 1")


# ---------------------------------------------------------------------- a record <-> a folder
@dataclass
class PrototypeRecord:
    """What a prototypes folder holds, as plain values: an estimator's parameters (``params``, as
    ``get_params`` gives them) and its fitted attributes (named as on the estimator, without the
    trailing ``_``), with the heads as records of their own.

    :meth:`~mlpm_guard.Prototypes.save` and :meth:`~mlpm_guard.Prototypes.load` turn an
    estimator into a record and back; this module only writes and reads records.
    """

    params: dict[str, Any]
    readings: list[Reading]
    layer_ids: list[int]
    sets: list[PrototypeSet]
    coef: np.ndarray
    intercept: float
    threshold: float
    controversial_threshold: float
    category_layer: int | None
    category_labels: list[str]
    category_means: np.ndarray | None
    steering_layers: list[int]
    steering_directions: np.ndarray
    n_samples: int
    training_summary: dict[str, int]
    provenance: dict[str, Any] | None
    backbone_identity: dict[str, Any] | None
    heads: dict[str, PrototypeRecord] = field(default_factory=dict)


def save_record(record: PrototypeRecord, path: str | Path) -> Path:
    """Write a record into folder ``path``: ``prototypes.json`` and a digest-named tensors file.

    A save interrupted at any point (even ``kill -9``) leaves the previous save loadable; see
    :func:`write_folder`.
    """
    folder = Path(path)
    tensors = _tensors(record)
    try:
        check_tensors(tensors, folder)
        heads = {kind: _save_head(head, folder / HEADS_DIR, kind) for kind, head in record.heads.items()}
        write_folder(folder, {**_metadata(record), "heads": heads}, save_bytes(tensors, metadata={"format": FORMAT}))
    except (ValidationError, PrototypeFileError) as exc:
        raise ConfigError(f"these prototypes hold values that cannot be saved (refit them):\n{exc}") from None
    # Heads of earlier saves go once the new metadata names the new ones (a killed save keeps the old).
    kept = {h["folder"] for h in heads.values()}
    for old in (folder / HEADS_DIR).glob("*") if (folder / HEADS_DIR).is_dir() else ():
        if old.name not in kept:
            shutil.rmtree(old, ignore_errors=True)
    return folder


#: The subfolder that holds a prototypes folder's heads, each a prototypes folder of its own.
HEADS_DIR = "heads"


def _save_head(head: PrototypeRecord, root: Path, kind: str) -> dict[str, str]:
    """Save a head into ``root/<kind>-<digest>`` (written aside first, then renamed into place)."""
    if head.heads:
        raise PrototypeFileError("a head cannot have heads of its own")
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{kind}.", suffix=".tmp", dir=root))
    save_record(head, scratch)
    digest = json.loads((scratch / META_FILE).read_text(encoding="utf-8"))["metadata_sha256"]
    final = root / f"{kind}-{digest[:16]}"
    if final.is_dir():
        shutil.rmtree(scratch)
    else:
        scratch.rename(final)
    return {"folder": final.name, "metadata_sha256": digest}


def _tensors(r: PrototypeRecord) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {
        "layer_ids": np.array(r.layer_ids, dtype=np.int64),
        "coef": np.asarray(r.coef, dtype=np.float64),
    }
    for i, s in enumerate(r.sets):
        tensors[f"sets.{i}.labels"] = s.labels.astype(np.int64)
        tensors[f"sets.{i}.counts"] = s.counts.astype(np.int64)
        if s.log_priors.any():  # equal priors are the default: files without taught priors stay as they were
            tensors[f"sets.{i}.log_priors"] = s.log_priors.astype(np.float64)
        if (s.sharpness != 1).any():  # likewise: only taught prototypes are sharper than the class means
            tensors[f"sets.{i}.sharpness"] = s.sharpness.astype(np.float64)
        tensors[f"sets.{i}.means"] = s.means.astype(np.float32)
        # A covariance is symmetric: its upper triangle is all there is to keep (half the file).
        rows, cols = np.triu_indices(s.cov.shape[-1])
        tensors[f"sets.{i}.cov_triu"] = np.ascontiguousarray(s.cov[:, rows, cols], dtype=np.float32)
    if r.category_means is not None:
        tensors["category_means"] = r.category_means.astype(np.float32)
    tensors["steering_directions"] = r.steering_directions.astype(np.float32)
    # safetensors writes an array's buffer as it lies in memory: every tensor must be C-contiguous.
    return {k: np.ascontiguousarray(v) for k, v in tensors.items()}


def _metadata(r: PrototypeRecord) -> dict[str, Any]:
    params = dict(r.params)
    params["layers"] = [int(x) for x in params["layers"]] if params["layers"] is not None else None
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "mlpm_guard_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backbone": r.backbone_identity,
        "hidden_size": int(r.sets[0].means.shape[-1]),
        "layer_ids": [int(x) for x in r.layer_ids],
        "readings": [{"layer": int(x.layer), "pooling": x.pooling} for x in r.readings],
        "params": params,
        "intercept": float(r.intercept),
        "threshold": float(r.threshold),
        "controversial_threshold": float(r.controversial_threshold),
        "sets": [{"name": s.name, "n": int(s.n), "prototypes": list(s.names)} for s in r.sets],
        "category_layer": r.category_layer,
        "category_labels": list(r.category_labels),
        "steering_layers": [int(x) for x in r.steering_layers],
        "n_samples": int(r.n_samples),
        "training_summary": {str(k): int(v) for k, v in r.training_summary.items()},
        "provenance": r.provenance,
    }


def load_record(path: str | Path) -> PrototypeRecord:
    """Read a folder written by :func:`save_record`, its heads included.

    Every field is checked (types, ranges, finite numbers, digests of both files, every tensor's
    shape against the metadata); what the numbers mean is the estimator's to check
    (``Prototypes.load`` refuses a layer combination that no longer calls its own unsafe mean unsafe).

    Raises:
        PrototypeFileError: missing, truncated, corrupted, edited or unknown files.
    """
    folder = Path(path)
    meta, blob = read_folder(folder)
    try:
        t = load_bytes(blob)
    except (SafetensorError, OSError, ValueError) as exc:
        raise PrototypeFileError(f"{folder}: the tensors file is truncated or corrupted: {exc}") from None
    check_tensors(t, folder)
    try:
        record = _restore(meta, t, folder)
    except KeyError as exc:
        raise PrototypeFileError(f"{folder}: missing tensor {exc} (file truncated or from another tool)") from None
    except np.linalg.LinAlgError as exc:
        raise PrototypeFileError(f"{folder}: covariance is not usable ({exc})") from None
    record.heads = {kind: _load_head(folder, kind, head, meta) for kind, head in meta.heads.items()}
    return record


def _load_head(folder: Path, kind: str, record: HeadRecord, meta: PrototypeMeta) -> PrototypeRecord:
    """A head, checked like any prototypes folder, and against what its parent recorded."""
    where = folder / HEADS_DIR / record.folder
    if not (where / META_FILE).is_file():
        raise PrototypeFileError(f"{folder}: the {kind} head {HEADS_DIR}/{record.folder} named by {META_FILE} is missing")
    head = load_record(where)
    head_meta, _ = read_folder(where)
    if head_meta.metadata_sha256 != record.metadata_sha256:
        raise PrototypeFileError(f"{where} is not the {kind} head {folder / META_FILE} was saved with")
    if head_meta.heads or head.backbone_identity != (meta.backbone.model_dump() if meta.backbone else None):
        raise PrototypeFileError(f"{where}: a head must be plain prototypes fitted on its parent's backbone")
    return head


def _restore(meta: PrototypeMeta, t: dict[str, np.ndarray], folder: Path) -> PrototypeRecord:
    """The record of checked metadata and tensors, every shape checked against the metadata."""
    readings = meta.reading_list()
    k, d = len(readings), meta.hidden_size
    layer_ids = [int(x) for x in t["layer_ids"]]
    if layer_ids != meta.layer_ids:
        raise PrototypeFileError(f"{folder}: the layer ids in {META_FILE} and the tensors file disagree")
    sets = [_restore_set(i, info, t, k, d, folder) for i, info in enumerate(meta.sets)]
    optional = sum(f"sets.{i}.{name}" in t for i in range(len(meta.sets)) for name in ("log_priors", "sharpness"))
    if len(t) != 3 + 4 * len(meta.sets) + optional + ("category_means" in t):
        raise PrototypeFileError(f"{folder}: the tensors file holds tensors {META_FILE} does not describe")
    coef = t["coef"].astype(np.float64)
    if coef.shape != (len(sets) * k,):
        raise PrototypeFileError(f"{folder}: the layer weights do not match {META_FILE}")
    category_means = t["category_means"].astype(np.float64) if "category_means" in t else None
    n_categories = 0 if category_means is None else len(category_means)
    if n_categories != len(meta.category_labels) or (
            category_means is not None and category_means.shape != (n_categories, d)):
        raise PrototypeFileError(f"{folder}: category means do not match the category labels")
    steering_directions = t["steering_directions"].astype(np.float64)
    if steering_directions.shape != (len(meta.steering_layers), d):
        raise PrototypeFileError(f"{folder}: steering directions do not match {META_FILE}")
    return PrototypeRecord(
        params=meta.params.model_dump(), readings=readings, layer_ids=layer_ids, sets=sets, coef=coef,
        intercept=meta.intercept, threshold=meta.threshold, controversial_threshold=meta.controversial_threshold,
        category_layer=meta.category_layer, category_labels=list(meta.category_labels), category_means=category_means,
        steering_layers=list(meta.steering_layers), steering_directions=steering_directions,
        n_samples=meta.n_samples, training_summary=dict(meta.training_summary), provenance=meta.provenance,
        backbone_identity=meta.backbone.model_dump() if meta.backbone is not None else None)


def _restore_set(i: int, info: SetRecord, t: dict[str, np.ndarray], k: int, d: int, folder: Path) -> PrototypeSet:
    labels, counts = t[f"sets.{i}.labels"], t[f"sets.{i}.counts"]
    means = t[f"sets.{i}.means"].astype(np.float64)
    cov = t[f"sets.{i}.cov"].astype(np.float64) if f"sets.{i}.cov" in t else _symmetric(t[f"sets.{i}.cov_triu"], d, folder)
    n_protos = len(info.prototypes)
    log_priors = t.get(f"sets.{i}.log_priors", np.zeros(n_protos)).astype(np.float64)
    sharpness = t.get(f"sets.{i}.sharpness", np.ones(n_protos)).astype(np.float64)
    if (means.shape != (k, n_protos, d) or cov.shape != (k, d, d) or labels.shape != (n_protos,)
            or counts.shape != (n_protos,) or log_priors.shape != (n_protos,) or sharpness.shape != (n_protos,)):
        raise PrototypeFileError(f"{folder}: set {i} has tensor shapes that do not match {META_FILE}")
    return PrototypeSet(info.name, labels, list(info.prototypes), counts, means, cov, info.n, log_priors, sharpness)


def _symmetric(triu: np.ndarray, d: int, folder: Path) -> np.ndarray:
    """Covariances (k, d, d) from their upper triangles (k, d * (d + 1) / 2)."""
    if triu.ndim != 2 or triu.shape[1] != d * (d + 1) // 2:
        raise PrototypeFileError(f"{folder}: a covariance's upper triangle has shape {triu.shape}, not (k, {d * (d + 1) // 2})")
    cov = np.zeros((triu.shape[0], d, d))
    rows, cols = np.triu_indices(d)
    cov[:, rows, cols] = triu
    cov[:, cols, rows] = triu
    return cov
