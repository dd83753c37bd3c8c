"""Running prototypes and baselines over labelled files: the ``metrics.json`` structure.

:func:`evaluate` scores every dataset with the prototypes (MLPM) and with any baselines, on the
same prompts, and adds curves, calibration, metrics at a threshold that meets a target flag rate
on a benign set, and recall under jailbreak framings. :func:`~mlpm_guard.toolkit.endtoend.end_to_end`
(answers, routes, refusals) and :func:`~mlpm_guard.toolkit.report.write_report` (report.md and plots)
complete the ``eval`` command. Hidden states come from the on-disk feature cache, so a resumed
or repeated run does not run the backbone again for prompts it has seen.
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._io import atomic_write_text
from ..vocabulary.errors import ConfigError, DataError
from ..estimator.prototypes import Prototypes
from ..estimator.readings import select
from .result_cache import ResultCache
from .baselines import make_baseline, parse_baselines
from .data import Example, load_examples, seed_examples
from .features import FeatureCache, extract
from .jailbreaks import JAILBREAK_TEMPLATES, jailbreak_variants
from .metrics import (at_threshold, average_f1, calibration, curves, moderation_metrics,
                      threshold_for_flag_rate)

if TYPE_CHECKING:
    from ..model.backbone import Backbone

logger = logging.getLogger(__name__)

#: Scores prompts for one method: (prompts, progress label) -> P(unsafe) per prompt.
Scorer = Callable[[Sequence[str], str], np.ndarray]


def load_eval_sets(paths: Sequence[str | Path], *, split: str | None = None, sample: int | None = None,
                   seed: int = 0) -> dict[str, list[Example]]:
    """Read evaluation files keyed by file stem.

    Args:
        split: keep only rows of that split.
        sample: keep a seeded random sample of at most this many rows per file (in file order),
            for quick runs on large files.
    """
    if sample is not None and sample < 1:
        raise ConfigError(f"`sample` must be at least 1, got {sample}")
    sets: dict[str, list[Example]] = {}
    for path in paths:
        stem = Path(path).stem
        if stem in sets:
            raise DataError(f"{path}: another file is also named {stem!r}; eval keys datasets by file name")
        rows = load_examples(path)
        if split is not None:
            rows = [e for e in rows if e.split == split]
            if not rows:
                raise DataError(f"{path}: no rows with split {split!r}")
        if sample is not None and len(rows) > sample:
            keep = sorted(random.Random(seed).sample(range(len(rows)), sample))
            rows = [rows[i] for i in keep]
        sets[stem] = rows
    return sets


@contextmanager
def eval_caches(backbone: Backbone,
                cache: FeatureCache | str | Path | bool = True) -> Iterator[tuple[FeatureCache, ResultCache]]:
    """The feature cache and the result cache (judge scores, answers) of one run.

    Args:
        cache: ``True`` for the persistent defaults under the cache home; ``False`` for a
            temporary folder removed after the run (nothing is read from or kept on disk, but a
            prompt shared by the prototypes and a baseline still runs once); a folder path to
            keep both there; or a :class:`FeatureCache`, with the results kept beside its file.
    """
    if cache is False or cache is None:
        with tempfile.TemporaryDirectory(prefix="mlpm-guard-eval-") as tmp:
            yield FeatureCache.for_backbone(backbone, root=tmp), ResultCache(Path(tmp) / "results.sqlite")
        return
    if cache is True:
        yield FeatureCache.for_backbone(backbone), ResultCache()
    elif isinstance(cache, FeatureCache):
        yield cache, ResultCache(cache.path.with_name("eval-results.sqlite"))
    elif isinstance(cache, (str, Path)):
        root = Path(cache)
        yield FeatureCache.for_backbone(backbone, root=root / "features"), ResultCache(root / "results.sqlite")
    else:
        raise ConfigError(f"`cache` must be True, False, a folder or a FeatureCache, got {type(cache).__name__}")


def _dataset_metrics(y: np.ndarray, p: np.ndarray, threshold: float, *, bins: int, points: int) -> dict[str, Any]:
    """The contract keys of one dataset, then AUPRC, ECE, Brier, curves and the reliability curve."""
    m = moderation_metrics(y, p, threshold)
    c = curves(y, p, max_points=points)
    cal = calibration(y, p, n_bins=bins)
    m["auprc"] = c.pop("auprc") if c else None
    m["ece"], m["brier"] = cal.pop("ece"), cal.pop("brier")
    m["curves"] = c
    m["reliability"] = cal
    return m


def _benign_source(benign: str | Path | None, datasets: dict[str, Sequence[Example]]) -> tuple[str, str | None, list[str]]:
    """(name, dataset stem or None, prompts) of the benign set that sets the target threshold."""
    key = str(benign)
    if key in datasets:
        prompts = [e.prompt for e in datasets[key] if e.label == 0]
        if not prompts:
            raise ConfigError(f"`benign` dataset {key!r} has no safe rows; pick a dataset with safe prompts")
        return key, key, prompts
    path = Path(key)
    if path.is_file():
        prompts = [e.prompt for e in load_examples(path) if e.label == 0]
        if not prompts:
            raise ConfigError(f"`benign` file {path} has no safe rows")
        return path.stem, None, prompts
    raise ConfigError(f"`benign` {key!r} is neither an evaluated dataset ({', '.join(datasets)}) nor a file; "
                      "give a dataset's file stem or a labelled file of benign prompts")


def _method(score: Scorer, threshold: float, datasets: dict[str, Sequence[Example]], *,
            benign: tuple[str, str | None, list[str]] | None, target_flag_rate: float,
            framings: Sequence[str], bins: int, points: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Every metric of one scoring method (MLPM or a baseline) on every dataset, and its raw scores."""
    labels = {stem: np.array([e.label for e in rows], dtype=np.int64) for stem, rows in datasets.items()}
    raw = {stem: np.asarray(score([e.prompt for e in rows], stem), dtype=np.float64) for stem, rows in datasets.items()}
    per = {stem: _dataset_metrics(labels[stem], raw[stem], threshold, bins=bins, points=points) for stem in datasets}
    block: dict[str, Any] = {"datasets": per, "avg_f1": average_f1(per), "threshold": float(threshold)}
    target = None
    if benign is not None:
        name, stem, prompts = benign
        benign_p = raw[stem][labels[stem] == 0] if stem is not None else score(prompts, f"benign {name}")
        target = threshold_for_flag_rate(benign_p, target_flag_rate)
        for s in datasets:
            per[s]["at_target"] = at_threshold(labels[s], raw[s], target)
        block["target"] = {"benign": name, "n_benign": len(benign_p), "target_flag_rate": target_flag_rate,
                           "threshold": target, "flag_rate": float(np.mean(np.asarray(benign_p) >= target))}
        block["avg_f1_at_target"] = average_f1(per, "at_target.f1")
    if framings:
        block["jailbreaks"] = {}
        for stem, rows in datasets.items():
            variants = jailbreak_variants(rows, framings)
            n_unsafe = int(labels[stem].sum())
            if not n_unsafe:
                continue
            wrapped = score([e.prompt for name in framings for e in variants[name]], f"jailbreaks {stem}")
            per_framing = {"plain": raw[stem][labels[stem] == 1],
                           **{name: wrapped[i * n_unsafe:(i + 1) * n_unsafe] for i, name in enumerate(framings)}}
            entry: dict[str, Any] = {
                "n_unsafe": n_unsafe,
                "recall": {k: float(np.mean(v >= threshold)) for k, v in per_framing.items()},
                "mean_p_unsafe": {k: float(np.mean(v)) for k, v in per_framing.items()},
            }
            if target is not None:
                entry["recall_at_target"] = {k: float(np.mean(v >= target)) for k, v in per_framing.items()}
            block["jailbreaks"][stem] = entry
    return block, raw


def layer_weights(prototypes: Prototypes) -> dict[str, dict[str, float]]:
    """The layer combination's weight per prototype set and reading (layer id, or ``"mean <layer>"``)."""
    coef = np.asarray(prototypes.coef_).reshape(len(prototypes.sets_), len(prototypes.readings_))
    return {s.name: {str(r.key): float(w) for r, w in zip(prototypes.readings_, row)}
            for s, row in zip(prototypes.sets_, coef)}


def _warn_if_not_seed(prototypes: Prototypes) -> None:
    summary = getattr(prototypes, "training_summary_", None) or {}
    sources = {key.rsplit("/", 1)[0] for key in summary}
    if sources and sources != {"seed"}:
        logger.warning("the baselines are fitted on the built-in seed set, but the prototypes were fitted on %s; "
                       "pass `train=` (`--train FILE...`) with their training files for a like-for-like comparison",
                       sorted(sources))


def evaluate(prototypes: Prototypes, datasets: dict[str, Sequence[Example]], *,
             cache: FeatureCache | str | Path | bool = True, progress: bool = True,
             baselines: str | Sequence[str] = (), train: Sequence[Example] | None = None,
             benign: str | Path | None = None, target_flag_rate: float = 0.05, jailbreaks: bool | Sequence[str] = False,
             calibration_bins: int = 10, curve_points: int = 101) -> dict[str, Any]:
    """Score every dataset and return the ``metrics.json`` structure.

    Args:
        prototypes: fitted prototypes with their backbone bound.
        datasets: file stem to labelled examples (see :func:`load_eval_sets`).
        cache: where hidden states and judge scores are kept (see :func:`eval_caches`).
        baselines: names from :data:`~mlpm_guard.toolkit.baselines.BASELINES` (``"judge,tfidf"``, ``"all"``).
        train: what the trained baselines are fitted on; ``None`` means the built-in seed set,
            the training data of the default prototypes.
        benign: a dataset stem or a labelled file whose safe prompts set, per method, the
            threshold that flags at most ``target_flag_rate`` of them.
        jailbreaks: ``True`` for every framing of :data:`~mlpm_guard.toolkit.jailbreaks.JAILBREAK_TEMPLATES`,
            or a list of framing names; recall is reported per framing.

    Returns:
        ``datasets`` (per stem: ``n``, ``n_unsafe``, ``f1``, ``precision``, ``recall``,
        ``flag_rate_safe``, ``auroc``, then ``auprc``, ``ece``, ``brier``, ``curves``,
        ``reliability`` and ``at_target``), ``avg_f1``, ``threshold``, ``layers``, ``backbone``,
        ``layer_weights``, ``settings``, optional ``target``/``avg_f1_at_target``/``jailbreaks``,
        and ``baselines`` (name to the same keys). Keys starting with ``_`` hold per-row scores
        and labels for the report and are not written to ``metrics.json``.
    """
    framings = _check_arguments(prototypes, datasets, target_flag_rate, jailbreaks)
    names = parse_baselines(baselines)
    benign_set = _benign_source(benign, datasets) if benign is not None else None
    options = {"benign": benign_set, "target_flag_rate": target_flag_rate, "framings": framings,
               "bins": calibration_bins, "points": curve_points}
    with eval_caches(prototypes.backbone, cache) as (features, results):
        result = _mlpm_block(prototypes, datasets, features, options, last_layer="last_layer" in names,
                             progress=progress)
        if names:
            if train is None:
                _warn_if_not_seed(prototypes)
            result["baselines"], result["_baseline_scores"] = _baseline_blocks(
                names, prototypes.backbone, list(train) if train is not None else seed_examples(), datasets,
                options, features=features, results=results, progress=progress)
    result["settings"] = {
        "baselines": names,
        "baselines_trained_on": None if not names else
        ("built-in seed set" if train is None else f"{len(train)} training examples"),
        "benign": benign_set[0] if benign_set else None, "target_flag_rate": target_flag_rate if benign_set else None,
        "jailbreak_framings": framings, "calibration_bins": calibration_bins,
    }
    return result


def _check_arguments(prototypes: Prototypes, datasets: dict[str, Sequence[Example]], target_flag_rate: float,
                     jailbreaks: bool | Sequence[str]) -> list[str]:
    """Reject what :func:`evaluate` cannot run on, before any model work; returns the jailbreak framings."""
    if prototypes.backbone is None:
        raise ConfigError("`prototypes` have no backbone: load them with `Prototypes.load(path, backbone=...)` "
                          "or fit them with `backbone=`")
    if not datasets:
        raise ConfigError("`datasets` is empty; give at least one labelled file")
    if not 0 <= target_flag_rate < 1:
        raise ConfigError(f"`target_flag_rate` must be in [0, 1), got {target_flag_rate}")
    framings = list(JAILBREAK_TEMPLATES) if jailbreaks is True else list(jailbreaks or [])
    unknown = [f for f in framings if f not in JAILBREAK_TEMPLATES]
    if unknown:
        raise ConfigError(f"unknown jailbreak framings {unknown}; known framings: {sorted(JAILBREAK_TEMPLATES)}")
    return framings


def _baseline_blocks(names: Sequence[str], backbone: Backbone, train: list[Example], datasets: dict[str, Sequence[Example]],
                     options: dict[str, Any], *, features: FeatureCache, results: ResultCache,
                     progress: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Each baseline fitted on ``train`` and scored like the prototypes: its metrics, and its per-row scores."""
    blocks, scores = {}, {}
    for name in names:
        model = make_baseline(name, backbone, cache=features, results=results, progress=progress)
        model.fit(train)
        block, raw = _method(lambda prompts, label, m=model: m.predict_proba(prompts), model.threshold, datasets,
                             **options)
        blocks[name] = {"description": model.description, **block}
        scores[name] = {stem: p.tolist() for stem, p in raw.items()}
    return blocks, scores


def _mlpm_block(prototypes: Prototypes, datasets: dict[str, Sequence[Example]], features: FeatureCache,
                options: dict[str, Any], *, last_layer: bool, progress: bool) -> dict[str, Any]:
    """The prototypes' metrics, with their per-row scores and labels for the report."""
    backbone = prototypes.backbone
    layers = list(prototypes.layer_ids_)
    # With the last-layer baseline the states are read once down to the last layer, and the
    # baseline's own read is then a cache hit.
    depth = sorted(set(layers) | ({backbone.num_layers} if last_layer else set()))
    poolings = prototypes.poolings_

    def mlpm(prompts: Sequence[str], label: str) -> np.ndarray:
        H = extract(backbone, list(prompts), depth, poolings=poolings, cache=features, progress=progress,
                    desc=f"eval {label}")
        return prototypes.predict_proba(select(H, depth, layers, poolings))[:, 1]

    result, scores = _method(mlpm, prototypes.threshold_, datasets, **options)
    result.update(layers=layers, backbone=backbone.name, num_layers=backbone.num_layers,
                  layer_weights=layer_weights(prototypes))
    result["_scores"] = {stem: p.tolist() for stem, p in scores.items()}
    result["_labels"] = {stem: [e.label for e in rows] for stem, rows in datasets.items()}
    return result


def write_metrics(result: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``metrics.json`` (without the per-row scores) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    public = {k: v for k, v in result.items() if not k.startswith("_")}
    atomic_write_text(out / "metrics.json", json.dumps(public, indent=2))
    return out / "metrics.json"
