"""Fitting prototypes on labelled files; the default prototypes shipped in the package and their recipe."""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..vocabulary.errors import DataError
from ..estimator.prototypes import Prototypes
from ..guardrail.views import segments
from .data import Example, Turn, cap_per_source, load_examples, seed_answers, seed_content, seed_digest, seed_examples
from .features import FeatureCache, extract

if TYPE_CHECKING:
    from ..model.backbone import Backbone

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
    user's files it lowers the false flags on look-alikes held out from the fit
    (``benchmarks/quality.py`` measures it, leaving one source out at a time).
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
    a security question is flagged far more often than the whole prompt
    (``benchmarks/generalisation.py`` measures both readings).
    Only benign prompts are split: a sentence of a harmful request need not be harmful.
    """
    out = list(examples)
    for e in examples:
        if e.label != 0 or not isinstance(e.prompt, str):
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


def fit_examples(backbone: Backbone, examples: Sequence[Example], *, states: np.ndarray | None = None,
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
#: The release recipe's parameters (why each, with the numbers behind it, in docs/quality.md):
#:
#: - ``threshold`` 0.8 / ``controversial_threshold`` 0.35: requests are refused only when confidently
#:   unsafe; in between they are answered under the safety prompt, so a borderline harmful request
#:   does not take the plain ``PASS`` route either;
#: - ``pooling`` ``"last+mean"``: each layer read at the last token and averaged over the request, so
#:   a goal stated turns earlier still counts when the last turn only asks for it;
#: - ``source_invariance`` 1: the spread between the training sources' class means counts as noise,
#:   so the prototypes lean on what tells safe from unsafe inside each source, not on what tells the
#:   sources apart;
#: - no line of its own for other languages or for content: content is judged by the content head
#:   (:data:`CONTENT_HEAD_PARAMS`), answers by the answer head.
RELEASE_PARAMS: dict[str, Any] = {**DEFAULT_PARAMS, "threshold": 0.8, "controversial_threshold": 0.35,
                                  "pooling": "last+mean", "source_invariance": 1.0}
#: The content head's lines: those of requests (a passage is kept or dropped at the refusal line); a
#: stronger penalty than the request fit's, as its texts are fewer (benchmarks/adversarial.py, content).
CONTENT_HEAD_PARAMS: dict[str, Any] = {"threshold": 0.8, "controversial_threshold": 0.35, "C": 0.1}
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
            if e.split not in HELD_OUT_SPLITS and keep(e) and len(e.text.split()) <= RELEASE_MAX_WORDS]
    return (training_mix(rows, max_per_source=RELEASE_MAX_PER_SOURCE)
            + with_sentence_views([e for e in seed_examples() if keep(e)]))


def fit_answer_head(backbone: Backbone, parent: Prototypes, *, examples: Sequence[Example] | None = None,
                    cache: FeatureCache | bool = True, progress: bool = True) -> Prototypes:
    """Prototypes that judge answers (:meth:`Prototypes.set_head`), fitted on the readings the guard
    takes of ``examples`` (:func:`answer_readings`; default: the built-in answers,
    :func:`~mlpm_guard.toolkit.data.seed_answers`) with the
    parent's readings, penalty and lines.

    An answer read after its request is a form of text the request prototypes barely know; fitted
    on answers alone, its own discriminant tells a harmful answer from a helpful one to an alarming
    question (``benchmarks/holdback.py`` measures both).
    """
    rows = list(examples) if examples is not None else seed_answers()
    params = {k: v for k, v in parent.get_params().items() if k in ANSWER_HEAD_PARAMS}
    return fit_examples(backbone, answer_readings(backbone, rows), cache=cache, progress=progress, **params)


def answer_readings(backbone: Backbone, examples: Sequence[Example]) -> list[Example]:
    """The readings the guard takes of each answer (:func:`mlpm_guard.guardrail.views.answer_views`: after its
    conversation, in windows when long, and alone), each labelled as its answer."""
    from ..guardrail.scoring import token_counter
    from ..guardrail.views import answer_views

    count = token_counter(backbone)
    out = []
    for e in examples:
        if isinstance(e.prompt, str) or e.prompt[-1].role != "assistant":
            out.append(e)
            continue
        messages = [{"role": t.role, "content": t.content} for t in e.prompt[:-1]]
        for view in answer_views(messages, e.prompt[-1].content, count):
            turns = tuple(Turn(role, text) for role, text in view.messages)
            out.append(Example(turns[0].content if len(turns) == 1 and turns[0].role == "user" else turns,
                               e.label, e.category, e.source, e.split))
    return list(dict.fromkeys(out))


#: The parent's parameters a head takes (one source, so no per-source sets or invariance).
ANSWER_HEAD_PARAMS = ("C", "layers", "pooling", "threshold", "controversial_threshold", "random_state")


def content_readings(backbone: Backbone, examples: Sequence[Example], spans: Sequence[str | None]) -> list[Example]:
    """The readings the guard takes of each text judged as content (:func:`mlpm_guard.guardrail.views.content_views`:
    inside the content request, whole when it fits and in windows), labelled for a content head.

    A reading of a safe text is safe. A reading of an unsafe text is unsafe when it holds the
    text's harmful part (``span``: the injected instruction, the harmful paragraph; ``None``: the
    whole text is), safe when it holds none of it, and left out when it holds only some.
    """
    from ..guardrail.scoring import token_counter
    from ..guardrail.views import CONTENT_TEMPLATE, content_views

    count = token_counter(backbone)
    before, _, after = CONTENT_TEMPLATE.partition("{text}")
    out = []
    for e, span in zip(examples, spans):
        text = e.text
        for view in content_views(text, count):
            reading = view.messages[0][1]
            body = reading[len(before):len(reading) - len(after)]
            if e.label == 0:
                label = 0
            elif span is None or span in body:
                label = 1
            elif not _overlaps(span, body):
                label = 0
            else:
                continue
            out.append(Example(view.messages[0][1], label, e.category if label else None, e.source, e.split))
    return out


def _overlaps(span: str, body: str, words: int = 4) -> bool:
    """Whether ``body`` holds any run of ``words`` consecutive words of ``span``."""
    tokens = span.split()
    return any(" ".join(tokens[i:i + words]) in body for i in range(max(1, len(tokens) - words + 1)))


def fit_content_head(backbone: Backbone, parent: Prototypes, examples: Sequence[Example], spans: Sequence[str | None], *,
                     cache: FeatureCache | bool = True, progress: bool = True, **params: Any) -> Prototypes:
    """Prototypes that judge content (retrieved passages, tool results: :meth:`Prototypes.set_head`),
    fitted on the readings the guard takes of ``examples`` judged as content (:func:`content_readings`),
    with the parent's readings and penalty, and ``params`` over them (e.g. its line)."""
    rows = content_readings(backbone, examples, spans)
    merged = {**{k: v for k, v in parent.get_params().items() if k in ANSWER_HEAD_PARAMS}, **params}
    return fit_examples(backbone, rows, cache=cache, progress=progress, **merged)


def release_heads(backbone: Backbone, parent: Prototypes, *, progress: bool = True) -> dict[str, Prototypes]:
    """The release recipe's heads for ``parent``: the content head on the built-in documents, tool
    results and answers (:data:`CONTENT_HEAD_PARAMS`), which judges answers too
    (:meth:`Prototypes.for_kind`): on answers it was not fitted on it tells harmful from helpful
    better than a head fitted on answers in their conversation, which learns the request's harm
    (``benchmarks/holdback.py``)."""
    return {"content": fit_content_head(backbone, parent, *seed_content(), progress=progress, **CONTENT_HEAD_PARAMS)}


def fit_release(backbone: Backbone, data_dir: str | Path, *, progress: bool = True) -> Prototypes:
    """Fit the default prototypes with the release recipe: :data:`RELEASE_SOURCES` from ``data_dir``
    plus the seed set, each source capped at :data:`RELEASE_MAX_PER_SOURCE`, labels balanced; and
    their heads (:func:`release_heads`).

    The training mix and each file's licence are recorded in ``prototypes.json`` (``provenance``).
    """
    files = release_files(data_dir)
    examples = release_examples(data_dir)
    prototypes = fit_examples(backbone, examples, progress=progress, **RELEASE_PARAMS)
    for kind, head in release_heads(backbone, prototypes, progress=progress).items():
        prototypes.set_head(kind, head)
    documents, _ = seed_content()
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
        "content_head": {"recipe": "mlpm_guard.toolkit.training.fit_content_head", "licence": SEED_LICENCE,
                         "sha256": {name: seed_digest(name) for name in ("seed_content.jsonl", "seed_answers.jsonl")},
                         "texts": len(documents),
                         "params": CONTENT_HEAD_PARAMS},
    }
    return prototypes


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
