"""Fitting prototypes on labelled files; the default prototypes shipped in the package and their recipe."""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from ..prototypes import Prototypes
from ..shipped import seed_digest
from ..views import segments
from .data import Example, cap_per_source, load_examples, seed_examples
from .features import FeatureCache, extract

logger = logging.getLogger(__name__)

#: Sentences of a benign multi-sentence prompt added to a fit (see :func:`with_sentence_views`).
SENTENCES_PER_PROMPT = 2
# Chosen on held-out sources (see benchmarks/quality.py and the README's quality table).
DEFAULT_PARAMS: dict[str, Any] = {"C": 1.0}
HELD_OUT_SPLITS = ("test",)


def load_training_examples(paths: Sequence[str | Path], *, max_per_source: int | None = None,
                           seed: int = 0, exclude_splits: Sequence[str] = HELD_OUT_SPLITS,
                           with_seed_set: bool = True) -> list[Example]:
    """Read labelled files for fitting: rows of a held-out split (``test``) are left out, the
    built-in seed set joins as one more source (``with_seed_set``), then each source is capped at
    ``max_per_source`` with its labels balanced.

    The seed set carries what public data rarely has: benign look-alikes written next to the
    harmful requests they resemble ("how do I kill a Python process"). Fitted along with the
    user's files it lowers the false flags on look-alikes held out from the fit (F1 0.72 -> 0.79
    and 39% -> 32% flagged, leave-one-source-out over the shared data, ``benchmarks/quality.py``).
    """
    examples: list[Example] = []
    for path in paths:
        rows = [e for e in load_examples(path) if e.split not in exclude_splits]
        if not rows:
            raise DataError(f"{path}: every row is in a held-out split {tuple(exclude_splits)}; nothing to fit on")
        examples.extend(rows)
    if with_seed_set:
        examples.extend(seed_examples())
    return training_mix(examples, max_per_source=max_per_source, seed=seed)


def training_mix(examples: Sequence[Example], *, max_per_source: int | None = None, seed: int = 0) -> list[Example]:
    """The examples a fit uses: each source capped at ``max_per_source`` with its labels balanced,
    then the sentence readings of its benign prompts (:func:`with_sentence_views`).

    ``load_training_examples`` and the benchmarks go through here, so they measure exactly what
    ``mlpm-guard fit`` does.
    """
    return with_sentence_views(cap_per_source(examples, max_per_source, seed), seed=seed)


def with_sentence_views(examples: Sequence[Example], *, per_prompt: int = SENTENCES_PER_PROMPT,
                        seed: int = 0) -> list[Example]:
    """The examples plus up to ``per_prompt`` sentences of each benign multi-sentence prompt, as
    safe examples of the same source.

    The guard reads each sentence of a request on its own (:mod:`.views`), so the fit must know
    what ordinary sentences look like alone: without them a sentence of a maths word problem or of
    a security question was flagged far more often than the whole prompt (gsm8k held out: 29% of
    prompts flagged with sentence readings against 0% read whole; ``benchmarks/generalisation.py``).
    Only benign prompts are split: a sentence of a harmful request need not be harmful.
    """
    out = list(examples)
    for e in examples:
        if e.label != 0:
            continue
        pieces = segments(e.prompt)
        if len(pieces) > 1:
            picked = random.Random(f"{seed}:{e.prompt}").sample(pieces, min(per_prompt, len(pieces)))
            out.extend(Example(p, 0, None, e.source, e.split) for p in picked)
    return out


def recipe_poolings(params: dict[str, Any]) -> tuple[str, ...]:
    """The poolings prototypes fitted with ``params`` (over :data:`DEFAULT_PARAMS`) read, so their
    states can be extracted before the fit."""
    return Prototypes(**{**DEFAULT_PARAMS, **params}).poolings_


def fit_examples(backbone: Any, examples: Sequence[Example], *, states: np.ndarray | None = None,
                 cache: FeatureCache | bool = True, progress: bool = True, **params: Any) -> Prototypes:
    """Extract (cached) states for ``examples`` and fit :class:`Prototypes` on them.

    Args:
        states: the examples' states for the candidate layers at the ``pooling``'s poolings, if
            already at hand (shape (len(examples), n_poolings * n_layers, hidden_size),
            pooling-major); otherwise they are extracted.
        params: :class:`Prototypes` parameters over :data:`DEFAULT_PARAMS`.
    """
    merged = {**DEFAULT_PARAMS, **params}
    layers = list(merged.get("layers") or range(1, backbone.num_layers + 1))
    if states is None:
        states = extract(backbone, [e.prompt for e in examples], layers, poolings=recipe_poolings(merged), cache=cache,
                         progress=progress, desc="fit: hidden states")
    merged["layers"] = layers
    return Prototypes(**merged).fit(states, [e.label for e in examples], backbone=backbone,
                                    sources=[e.source for e in examples],
                                    categories=[e.category for e in examples])


#: The files of the shipped prototypes' fit (file stem -> licence). Only permissive licences: the
#: fitted statistics ship in an Apache-2.0 package. Alpaca and ToxicChat (CC-BY-NC) and sets with
#: no stated licence stay out of the fit; the generalisation benchmark uses them as held-out sets.
RELEASE_SOURCES: dict[str, str] = {
    "advbench": "MIT", "coconot": "MIT / ODC-BY", "cyberseceval_frr": "MIT", "do_not_answer": "Apache-2.0",
    "harmbench_val": "MIT", "strongreject": "MIT", "tdc2023": "MIT", "gsm8k": "MIT", "humaneval": "MIT",
    "self_instruct": "Apache-2.0", "chat_prompts": "Apache-2.0",
}
RELEASE_MAX_PER_SOURCE = 400
#: The shipped default refuses only when confidently unsafe: P(unsafe) >= 0.8 is the unsafe tier
#: (refusal); 0.35-0.8 is controversial and takes the safety-prompt route, which still answers.
#: Chosen on the held-out families of ``benchmarks/generalisation.py``: refusing from 0.5 flagged
#: one Alpaca instruction in eight, from 0.8 one in twenty-six, while held-out direct requests
#: lost 0-4 points of recall; the wide controversial band keeps borderline harmful requests (a
#: bomb request in French scored 0.46) off the plain ``PASS`` route. No separate line for other
#: languages (``other_language_threshold``): from 0.7, held-out-language harmful requests were
#: refused 56% of the time instead of 40.5%, but the shipped fit then refused 16.8% of ordinary
#: requests in its ten seed languages instead of 8.8% (docs/quality.md).
#: Mean-pooled readings next to the last token: held out of the fit, harmful follow-ups caught 65 -> 85%,
#: held-out languages 40.5 -> 50%, ordinary ToxicChat prompts refused 12.5 -> 11.2% (docs/quality.md).
#: ``source_invariance`` 1 (stop 27): Arena prompts flagged 12.5 -> 8.8%, look-alikes 16.2 -> 13.8%,
#: ToxicChat toxic prompts refused 57.5 -> 62.5% with ordinary ones 11.2 -> 10%, harmful F1 mean
#: 0.844 -> 0.840; 3 and 10 traded more recall for little more (docs/quality.md).
#: ``content_threshold`` 0.5 (stop 29): a passage is kept or dropped, an answer sent or replaced, so
#: content is decided at even odds; held out, harmful passages caught 60 -> 88% with none of 75
#: ordinary ones dropped, ordinary long documents still 0 of 6.
RELEASE_PARAMS: dict[str, Any] = {**DEFAULT_PARAMS, "threshold": 0.8, "controversial_threshold": 0.35,
                                  "pooling": "last+mean", "source_invariance": 1.0, "content_threshold": 0.5}
#: Longer prompts stay out of the fit: the guard never scores a reading longer than the views'
#: context budget (longer text is read sentence by sentence), so they would teach nothing it uses.
RELEASE_MAX_WORDS = 160
SEED_LICENCE = "Apache-2.0 (written by the mlpm-guard project)"


def release_files(data_dir: str | Path) -> dict[str, Path]:
    """The release recipe's files in ``data_dir`` (all of them must be there)."""
    folder = Path(data_dir)
    files = {stem: folder / f"{stem}.jsonl" for stem in RELEASE_SOURCES}
    missing = sorted(stem for stem, path in files.items() if not path.is_file())
    if missing:
        raise DataError(f"{folder}: the release recipe needs {', '.join(f'{m}.jsonl' for m in missing)}")
    return files


def release_examples(data_dir: str | Path, *, exclude: Any = None) -> list[Example]:
    """The release fit's training mix: each public source capped, the whole seed set (written for
    exactly the gaps public data leaves: follow-ups, sensitive questions, other languages, content).
    ``exclude(example)`` drops rows first (to hold a family out, as the generalisation benchmark does).
    """
    keep = (lambda e: not exclude(e)) if exclude is not None else (lambda e: True)
    rows = [e for path in release_files(data_dir).values() for e in load_examples(path)
            if e.split not in HELD_OUT_SPLITS and keep(e) and len(e.prompt.split()) <= RELEASE_MAX_WORDS]
    return (training_mix(rows, max_per_source=RELEASE_MAX_PER_SOURCE)
            + with_sentence_views([e for e in seed_examples() if keep(e)]))


def fit_release(backbone: Any, data_dir: str | Path, *, progress: bool = True) -> Prototypes:
    """Fit the default prototypes with the release recipe: :data:`RELEASE_SOURCES` from ``data_dir``
    plus the seed set, each source capped at :data:`RELEASE_MAX_PER_SOURCE`, labels balanced.

    The training mix and each file's licence are recorded in ``prototypes.json`` (``provenance``).
    """
    files = release_files(data_dir)
    examples = release_examples(data_dir)
    prototypes = fit_examples(backbone, examples, progress=progress, **RELEASE_PARAMS)
    used: dict[str, int] = {}
    for e in examples:
        used[e.source] = used.get(e.source, 0) + 1
    prototypes.provenance_ = {
        "recipe": "mlpm_guard.toolkit.training.fit_release",
        "max_per_source": RELEASE_MAX_PER_SOURCE,
        "max_words": RELEASE_MAX_WORDS,
        "params": RELEASE_PARAMS,
        "files": {f"{stem}.jsonl": {"licence": lic, "sha256": _digest(files[stem])} for stem, lic in RELEASE_SOURCES.items()},
        "seed_set": {"licence": SEED_LICENCE, "sha256": seed_digest()},
        "rows_per_source": dict(sorted(used.items())),
    }
    return prototypes


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
