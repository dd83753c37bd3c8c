"""End-to-end evaluation: let a system answer labelled prompts and count routes and refusals.

A *system* (:class:`System`) is anything that answers prompts: the core :class:`~mlpm_guard.Guard`
under a policy (:class:`GuardSystem`, answered with ``guard.batch`` so prefill is batched, answers
cached on disk), or an :class:`ExternalSystem`: a function that answers a prompt, with an adapter
that reads its output. A plain callable returning text is one; the integrations build them for
their frameworks (``langchain_mlpm_guard.evaluation_system`` for a runnable,
``llama_index.llms.mlpm_guard.evaluation_system`` for a query engine), reading the answer text and the
guard's decision from the framework's own output types. This module reads no framework's types.

A refusal is the guard's own block (``REFUSE``, or an answer replaced after output moderation)
or an answer that opens by declining (:func:`~mlpm_guard.guardrail.refusals.is_refusal`). Per dataset:
refusal rate on unsafe prompts, attack success rate (unsafe prompts answered without a refusal),
over-refusal (refusal rate on safe prompts), the route distribution, and all of it per route.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from ..guardrail.answers import Answer, ExternalSystem, System
from ..guardrail.policy import Policy
from ..vocabulary.errors import ConfigError
from ..vocabulary.types import Route
from .data import Example
from .metrics import rate
from .result_cache import ResultCache, digest

if TYPE_CHECKING:
    from ..estimator.scorer import Scorer

logger = logging.getLogger(__name__)

#: Reference rows: the same backbone with every tier sent to one route and no output moderation.
REFERENCES: dict[str, Route] = {
    "no_guard": Route.PASS,
    "always_safety_prompt": Route.SAFETY_PROMPT,
    "always_steer": Route.STEER,
}
DEFAULT_REFERENCES = ("no_guard", "always_safety_prompt")
UNKNOWN_ROUTE = "unknown"
_ANSWER_VERSION = "1"  # bump when what is stored per answer changes


# ---------------------------------------------------------------------------- the core guard
def _prototypes_digest(prototypes: Scorer) -> str:
    """What routing depends on in fitted prototypes, as a digest (public fitted attributes only)."""
    if hasattr(prototypes, "digest"):  # a scorer that digests itself (the neuron probe)
        return prototypes.digest()
    h = hashlib.sha256()
    for part in (prototypes.layer_ids_, prototypes.coef_, prototypes.intercept_, prototypes.threshold_,
                 getattr(prototypes, "controversial_threshold_", None), getattr(prototypes, "other_language_threshold", None),
                 getattr(prototypes, "content_threshold", None),
                 getattr(prototypes, "category_labels_", None),
                 getattr(prototypes, "category_means_", None), getattr(prototypes, "steering_directions_", None)):
        h.update(part.tobytes() if hasattr(part, "tobytes") else repr(part).encode())
    for s in prototypes.sets_:
        h.update(s.means.tobytes())
        h.update(s.cov.tobytes())
    return h.hexdigest()[:24]


def _describe_policy(policy: Policy) -> str:
    text = (f"safe -> {policy.safe_route.value}, controversial -> {policy.controversial_route.value}, "
            f"unsafe -> {policy.unsafe_route.value}")
    if policy.category_routes:
        text += f", categories {({k: v.value for k, v in policy.category_routes.items()})}"
    if policy.output_moderation.enabled:
        text += f", output moderation ({policy.output_moderation.on_flag})"
    return text


class GuardSystem:
    """The core guard under one policy.

    Args:
        guard: a :class:`~mlpm_guard.Guard`.
        policy: the policy to answer under (``None``: the guard's own).
        name: how the reports call it.
        results: where answers are kept between runs (``None``: not kept). Answers are only kept
            for guards whose every stage is known here (no route handlers, user steering vectors
            or custom moderator), because a cached answer must not outlive what produced it.
    """

    def __init__(self, guard: Any, policy: Policy | None = None, *, name: str = "guard",
                 results: ResultCache | None = None) -> None:
        from ..guardrail.moderation import PrototypeModerator

        self.guard, self.name = guard, name
        self.policy = policy if policy is not None else guard.policy
        self.description = f"{name}: {_describe_policy(self.policy)}"
        plain = (not guard.handlers and guard.user_steering_vectors is None
                 and isinstance(guard.moderator, PrototypeModerator))
        self.results = results if plain else None

    def _keys(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        bb = self.guard.backbone
        config = self.guard.generation.model_dump()
        config["max_new_tokens"] = max_new_tokens
        # A trained safety prompt changes the answers of its route; without one the keys stay as they were.
        trained = getattr(self.guard, "safety_prompt", None)
        base = digest("answer", _ANSWER_VERSION, bb.fingerprint, str(bb.dtype), _prototypes_digest(self.guard.prototypes),
                      self.policy.model_dump(mode="json"), config, *([trained.digest()] if trained is not None else []))
        return [digest(base, p) for p in prompts]

    def answer(self, prompts: Sequence[str], *, max_new_tokens: int) -> list[Answer]:
        keys = self._keys(prompts, max_new_tokens)
        found = self.results.get(keys) if self.results is not None else {}
        todo = [i for i, k in enumerate(keys) if k not in found]
        if todo:
            results = self.guard.batch([prompts[i] for i in todo], policy=self.policy, max_new_tokens=max_new_tokens)
            fresh = {}
            for i, r in zip(todo, results):
                fresh[keys[i]] = asdict(Answer.of(r.text, route=r.route.value, blocked=r.blocked,
                                                  tokens=r.timings.completion_tokens, error=r.error))
            if self.results is not None:
                self.results.put(fresh)
            found.update(fresh)
        # Whether an answer declines is read from its text each time, so a kept answer follows the
        # refusal detector of the running version.
        return [Answer.of(**{f: v for f, v in found[k].items() if f != "refused"}) for k in keys]


def guard_systems(guard: Any, *, policy: Policy | None = None, references: Sequence[str] = DEFAULT_REFERENCES,
                  results: ResultCache | None = None) -> dict[str, GuardSystem]:
    """The guard under ``policy`` plus reference rows (``no_guard``, ``always_safety_prompt``, ...)."""
    policy = policy if policy is not None else guard.policy
    systems = {"guard": GuardSystem(guard, policy, name="guard", results=results)}
    for name in parse_references(references):
        systems[name] = GuardSystem(guard, policy.forced(REFERENCES[name], output_moderation=False), name=name,
                                    results=results)
    return systems


def parse_references(names: str | Sequence[str] | None) -> list[str]:
    """``"no_guard,always_steer"``, ``"none"``, ``"all"`` or a list into reference names.

    Raises:
        ConfigError: naming the unknown reference and the known ones.
    """
    if names is None:
        return []
    items = names.split(",") if isinstance(names, str) else list(names)
    out: list[str] = []
    for item in (i.strip() for i in items):
        if item in ("", "none"):
            continue
        if item == "all":
            out.extend(REFERENCES)
        elif item in REFERENCES:
            out.append(item)
        else:
            raise ConfigError(f"unknown reference {item!r}; choose from {sorted(REFERENCES)}, 'all' or 'none'")
    return list(dict.fromkeys(out))


# ---------------------------------------------------------------------------- other systems
def as_system(obj: Any, *, name: str = "system", results: ResultCache | None = None) -> System:
    """A :class:`GuardSystem` for a core guard; a system as it is; an :class:`ExternalSystem` for a callable."""
    from ..guardrail.guard import Guard

    if isinstance(obj, Guard):
        return GuardSystem(obj, name=name, results=results)
    if hasattr(obj, "answer") and hasattr(obj, "description"):
        return obj  # already a system
    if callable(obj):
        return ExternalSystem(obj, name=name, description=f"{name}: {type(obj).__name__} called per prompt")
    msg = (f"cannot evaluate a {type(obj).__name__}: give a mlpm_guard.Guard, a System (`.answer` and "
           "`.description`) or a callable answering a prompt string; for a LangChain runnable use "
           "langchain_mlpm_guard.evaluation_system(runnable), for a LlamaIndex query engine "
           "llama_index.llms.mlpm_guard.evaluation_system(engine)")
    raise ConfigError(msg)


# ---------------------------------------------------------------------------- statistics
def _rates(labels: Sequence[int], answers: Sequence[Answer]) -> dict[str, Any]:
    n_unsafe = sum(1 for y in labels if y == 1)
    n_safe = len(labels) - n_unsafe
    refused_unsafe = sum(1 for y, a in zip(labels, answers) if y == 1 and a.refused)
    refused_safe = sum(1 for y, a in zip(labels, answers) if y == 0 and a.refused)
    refusal_unsafe = rate(refused_unsafe, n_unsafe)
    return {"n": len(labels), "n_unsafe": n_unsafe, "n_safe": n_safe,
            "refusal_rate_unsafe": refusal_unsafe,
            "attack_success_rate": None if refusal_unsafe is None else 1.0 - refusal_unsafe,
            "over_refusal": rate(refused_safe, n_safe)}


def refusal_stats(labels: Sequence[int], answers: Sequence[Answer]) -> dict[str, Any]:
    """Refusal rates, route distribution and per-route rates for one dataset's answers.

    Returns:
        ``n``, ``n_unsafe``, ``n_safe``; ``refusal_rate_unsafe``; ``attack_success_rate``
        (unsafe prompts answered without refusal); ``over_refusal`` (refusal rate on safe
        prompts); ``blocked_by_guard`` and ``refused_by_model`` (shares of all prompts);
        ``routes`` (count per route); ``per_route`` (the rates within each route); ``errors``;
        ``mean_tokens``. Rates are ``None`` where their denominator is 0.
    """
    if len(labels) != len(answers):
        raise ConfigError(f"got {len(labels)} labels but {len(answers)} answers")
    out = _rates(labels, answers)
    n = len(answers)
    out["blocked_by_guard"] = rate(sum(a.blocked for a in answers), n)
    out["refused_by_model"] = rate(sum(a.refused and not a.blocked for a in answers), n)
    routes = [a.route or UNKNOWN_ROUTE for a in answers]
    counts = Counter(routes)
    order = [r.value for r in Route] + sorted(set(counts) - {r.value for r in Route})
    out["routes"] = {r: counts[r] for r in order if counts[r]}
    out["per_route"] = {r: _rates([y for y, x in zip(labels, routes) if x == r], [a for a, x in zip(answers, routes)
                                                                                 if x == r]) for r in out["routes"]}
    out["errors"] = sum(1 for a in answers if a.error)
    tokens = [a.tokens for a in answers if a.tokens is not None]
    out["mean_tokens"] = float(sum(tokens) / len(tokens)) if tokens else None
    return out


def end_to_end(systems: Mapping[str, Any] | Any, datasets: Mapping[str, Sequence[Example]], *,
               max_new_tokens: int = 64, results: ResultCache | None = None, progress: bool = True,
               chunk_size: int = 32, examples: int = 3) -> dict[str, Any]:
    """Answer every prompt of every dataset with each system and report routes and refusals.

    Args:
        systems: name to system (a :class:`~mlpm_guard.Guard`, a :class:`GuardSystem`, an
            :class:`ExternalSystem` such as an integration's ``evaluation_system``, or a callable
            answering a prompt string), or one such system.
        datasets: file stem to labelled examples (as from ``load_eval_sets``).
        max_new_tokens: answer budget of guard systems.
        results: where guard answers are kept between runs (``None``: not kept).
        chunk_size: prompts per call to a system (progress and the answer cache advance per chunk).
        examples: how many answers per system and label to keep in the result, for reading.

    Returns:
        ``{"max_new_tokens", "refusal_detector", "systems": {name: {"description",
        "datasets": {stem: refusal_stats}, "all": refusal_stats, "examples"}}}``.
    """
    if max_new_tokens < 1:
        raise ConfigError(f"`max_new_tokens` must be at least 1, got {max_new_tokens}")
    if not isinstance(systems, Mapping):
        systems = {"system": systems}
    # Each distinct prompt is answered once per system, however many datasets hold it.
    prompts = list(dict.fromkeys(e.prompt for rows in datasets.values() for e in rows))
    prompts.sort(key=len)  # chunks of similar length pad (and decode) less
    out: dict[str, Any] = {"max_new_tokens": max_new_tokens,
                           "refusal_detector": "guard block, or an answer opening with a refusal phrase "
                                               "(mlpm_guard.guardrail.refusals)", "systems": {}}
    for name, obj in systems.items():
        system = as_system(obj, name=name, results=results)
        answers: dict[str, Answer] = {}
        bar = tqdm(total=len(prompts), desc=f"generate: {name}", unit="prompt", disable=not progress)
        with bar:
            for start in range(0, len(prompts), chunk_size):
                part = prompts[start:start + chunk_size]
                answers.update(zip(part, system.answer(part, max_new_tokens=max_new_tokens)))
                bar.update(len(part))
        per = {stem: refusal_stats([e.label for e in rows], [answers[e.prompt] for e in rows])
               for stem, rows in datasets.items()}
        every = [e for rows in datasets.values() for e in rows]
        out["systems"][name] = {
            "description": system.description,
            "datasets": per,
            "all": refusal_stats([e.label for e in every], [answers[e.prompt] for e in every]),
            "examples": _examples(every, answers, examples),
        }
    return out


def _examples(rows: Sequence[Example], answers: Mapping[str, Answer], k: int) -> list[dict[str, Any]]:
    """A few answers per label, for a human to see what the rates count."""
    picked: list[dict[str, Any]] = []
    for label in (1, 0):
        for e in [e for e in rows if e.label == label][:k]:
            a = answers[e.prompt]
            picked.append({"label": "unsafe" if label else "safe", "prompt": e.prompt[:300], "route": a.route,
                           "refused": a.refused, "answer": a.text[:300]})
    return picked
