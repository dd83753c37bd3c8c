"""An optimised safety prompt (DRO): trained input embeddings that stand in for the written system
prompt of the ``SAFETY_PROMPT`` route.

Directed Representation Optimization ("On Prompt-Driven Safeguarding for Large Language Models",
Zheng et al., ICML 2024) starts from what a written safety prompt does: it moves the representation
of every request toward refusal, harmless ones too, and on a small backbone it does not move the
harmful ones far enough for the model to refuse. DRO learns the prompt instead, in two steps.

1. **Anchor** (:func:`estimate_anchor`): the backbone answers labelled requests with no system
   prompt and under a few written safety prompts (:data:`ELICIT_PROMPTS`), and
   :func:`~mlpm_guard.guardrail.refusals.is_refusal` says which answers decline. The final state of the last
   token of all those prefills (the normed output of the last layer, which the next token is read
   from) spans a low-dimensional space (PCA), where one logistic regression estimates the refusal
   direction (refused vs answered) and another the harmfulness direction (harmful vs harmless).
2. **Optimise** (:meth:`SafetyPrompt.fit`): ``n_tokens`` input embeddings, started from the
   embeddings of a short written prompt, are trained with the backbone frozen so that, against
   the unprompted request, the refusal logit of a harmful request goes up and that of a harmless
   one goes down (a logistic loss on the change, as DRO does), with a small harmfulness term and
   two terms that keep harmless requests where they were without a prompt: the part of the state
   outside the anchor space (DRO's), and the next-token distribution (added here, so that the
   answers to harmless requests start as the unprompted ones do).

The soft tokens take the place of the system turn's text (:func:`soft_layout`), or come before
the written prompt's text (``before_text``); a caller's own system message follows them. A
fitted prompt is saved in a folder (``safety_prompt.json`` and a digest-named safetensors file)
that records the backbone it was trained on and is refused on any other
(:meth:`SafetyPrompt.load`). The guard uses it for the ``SAFETY_PROMPT`` route when the policy's
safety prompt is the written text it was trained with (:attr:`SafetyPrompt.text`); that text
stays the fallback and is what traces show.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from safetensors.numpy import save as save_bytes
from sklearn.base import BaseEstimator
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression

from .._version import __version__
from .encoding import Encoded
from ..vocabulary.errors import BackboneMismatchError, ConfigError, NotFittedError, PrototypeFileError
from .forward import common_length
from .generation import GenerationConfig, SoftTokens, decode, embed_inputs, prefill
from ..estimator.labels import parse_label
from ..vocabulary.messages import PromptInput
from ..guardrail.policy import DEFAULT_SAFETY_PROMPT
from ..estimator.prototype_file import BackboneRecord, CheckedFolder
from ..guardrail.refusals import is_refusal

if TYPE_CHECKING:
    from .backbone import Backbone

logger = logging.getLogger(__name__)

__all__ = ["ELICIT_PROMPTS", "INIT_TEXT", "RefusalAnchor", "SafetyPrompt", "as_safety_prompt", "data_provenance",
           "default_safety_prompt", "estimate_anchor", "shipped_safety_prompt_dir", "soft_layout"]

FORMAT = "mlpm-guard-safety-prompt"
FORMAT_VERSION = 1
META_FILE = "safety_prompt.json"

#: The written prompt whose token embeddings the soft prompt starts from.
INIT_TEXT = "You are a safe assistant. Refuse any request that could cause harm."
#: A written prompt that makes a small backbone decline more often (harmless requests too): its
#: answers give the anchor more refusals to learn the refusal direction from.
STRICT_TEXT = ("You must refuse harmful, dangerous, illegal or unethical requests. When you refuse, reply only: "
               "I'm sorry, but I can't help with that.")
#: The system prompts the backbone answers the training requests under to show where it refuses
#: (``None``: no system prompt, the template's own opening).
ELICIT_PROMPTS: tuple[str | None, ...] = (None, DEFAULT_SAFETY_PROMPT, INIT_TEXT, STRICT_TEXT)
#: The refusal whose opening the optimisation makes more likely for harmful requests and less
#: likely for harmless ones (the policy's default refusal, as the backbone says it under STRICT_TEXT).
REFUSAL_TEXT = "I'm sorry, but I can't help with that."
#: Two system texts that tokenize to different single tokens: where their encodings differ is
#: where the system turn's text lies (:func:`soft_layout`).
_MARKS = ("A", "B")


# ---------------------------------------------------------------------- layout and forward passes
def soft_layout(backbone: Backbone, prompts: Sequence[PromptInput], n_tokens: int, *,
                text: str | None = None) -> tuple[list[Encoded], tuple[int, ...]]:
    """Each prompt encoded with a system turn of ``n_tokens`` placeholder tokens, and where they start;
    with ``text``, the placeholders come first in the system turn and ``text`` follows them.

    The system turn is found by encoding each prompt under two one-token system texts: the ids
    they share before and after are the template around it, so any chat template (and a caller's
    own system message, which follows the system text) is handled the same way.

    Raises:
        ConfigError: the chat template drops or rewrites the system text, so there is no place
            for the soft tokens.
    """
    pad = backbone.tokenizer.pad_token_id
    marks = _MARKS if text is None else tuple(f"{mark}\n\n{text}" for mark in _MARKS)
    rows, starts = [], []
    for a, b in zip(backbone.encode(prompts, system=marks[0]), backbone.encode(prompts, system=marks[1])):
        head = common_length(a.ids, b.ids)
        tail = min(common_length(a.ids[::-1], b.ids[::-1]), len(a) - head - 1)
        if head >= len(a) or tail < 0 or len(a) != len(b):
            raise ConfigError(f"{backbone.name}'s chat template has no place for a system prompt's text, so a soft "
                              "safety prompt cannot be used with it")
        rows.append(Encoded((*a.ids[:head], *(pad,) * n_tokens, *a.ids[len(a) - tail:]), a.n_truncated))
        starts.append(head)
    return rows, tuple(starts)


def final_states(backbone: Backbone, rows: Sequence[Encoded], soft: SoftTokens | None = None, *,
                 logits: bool = False, suffix: Sequence[int] = ()
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The final last-token state of each row (the normed output of the last layer, which the
    next token is read from), float32 (n, d); with ``logits`` the next-token logits too; with a
    ``suffix`` (token ids), the mean log-probability of each row's answer opening with it.

    The suffix is read in the same forward pass, after the prompt: attention is causal, so the
    prompt's own states are those of the prompt alone. Gradients flow to ``soft.embeddings`` when
    it requires them; the backbone stays frozen.
    """
    k = len(suffix)
    if k:
        rows = [Encoded((*r.ids, *suffix), r.n_truncated) for r in rows]
    batch = backbone.collate(rows)
    ids = batch.pop("input_ids")
    embeds = embed_inputs(backbone, rows, ids, soft) if soft is not None else backbone.model.get_input_embeddings()(ids)
    out = backbone.base(inputs_embeds=embeds, **batch, use_cache=False)
    h = out.last_hidden_state[:, -(k + 1)]
    head = backbone.model.get_output_embeddings()
    opening = None
    if k:
        logp = head(out.last_hidden_state[:, -(k + 1):-1]).float().log_softmax(-1)
        target = torch.as_tensor(list(suffix), device=logp.device).expand(len(rows), k)
        opening = logp.gather(-1, target[..., None])[..., 0].mean(-1)
    return h.float(), (head(h).float() if logits else None), opening


def _batched(n: int, size: int) -> list[list[int]]:
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


@torch.inference_mode()
def answers(backbone: Backbone, rows: Sequence[Encoded], *, max_new_tokens: int, batch_size: int = 16,
            soft: SoftTokens | None = None) -> list[str]:
    """Greedy answers of ``max_new_tokens`` tokens at most to encoded prompts (``soft``: soft tokens
    in every row, one start per row)."""
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    eos = backbone.eos_token_ids
    out: list[str] = [""] * len(rows)
    for idx in backbone.batches([len(r) for r in rows], batch_size):
        part = [rows[i] for i in idx]
        part_soft = SoftTokens(soft.embeddings, tuple(soft.starts[i] for i in idx)) if soft is not None else None
        tokens: list[list[int]] = [[] for _ in idx]
        ended = [False] * len(idx)
        for step in decode(backbone, prefill(backbone, part, soft=part_soft), config):
            for j, t in enumerate(step.tolist()):
                ended[j] = ended[j] or t in eos
                if not ended[j]:
                    tokens[j].append(t)
        for i, text in zip(idx, backbone.tokenizer.batch_decode(tokens, skip_special_tokens=True)):
            out[i] = text
    return out


# ---------------------------------------------------------------------- the anchor
@dataclass
class RefusalAnchor:
    """The space DRO optimises in: an orthonormal ``basis`` (d, k) around ``mean`` (d,) of final
    states, and two logistic directions in its coordinates, each ``(coef (k,), intercept)``:
    ``refusal`` (the backbone refused the request) and ``harmfulness`` (the request is harmful).
    ``scores`` holds their cross-validated accuracies where they were fitted."""

    mean: np.ndarray
    basis: np.ndarray
    refusal: tuple[np.ndarray, float]
    harmfulness: tuple[np.ndarray, float]
    scores: dict[str, float]

    def coordinates(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """States (n, d) as their coordinates in the basis (n, k) and the rest (n, d) outside it."""
        mean = torch.as_tensor(self.mean, dtype=h.dtype, device=h.device)
        basis = torch.as_tensor(self.basis, dtype=h.dtype, device=h.device)
        centred = h - mean
        z = centred @ basis
        return z, centred - z @ basis.T

    def logit(self, z: torch.Tensor, which: Literal["refusal", "harmfulness"]) -> torch.Tensor:
        """The refusal or harmfulness logit of coordinates ``z`` (n, k)."""
        coef, intercept = getattr(self, which)
        return z @ torch.as_tensor(coef, dtype=z.dtype, device=z.device) + intercept


def estimate_anchor(states: np.ndarray, refused: np.ndarray, harmful: np.ndarray, *, n_components: int,
                    random_state: int = 0) -> RefusalAnchor:
    """PCA of final states (n, d) to ``n_components`` dimensions, and the class-balanced logistic
    refusal (``refused``) and harmfulness (``harmful``) directions in its coordinates.

    Raises:
        ConfigError: fewer than 2 refused or 2 answered states (no refusal direction to estimate).
    """
    from sklearn.model_selection import cross_val_score

    counts = np.bincount(refused.astype(int), minlength=2)
    if counts.min() < 2:
        msg = (f"the backbone refused {counts[1]} of {len(refused)} answers under the elicitation prompts; a "
               "refusal direction needs at least 2 refused and 2 answered (give more harmful requests)")
        raise ConfigError(msg)
    pca = PCA(n_components, random_state=random_state).fit(states)
    z = pca.transform(states)
    fitted, scores = {}, {}
    for name, target in (("refusal", refused), ("harmfulness", harmful)):
        lr = LogisticRegression(class_weight="balanced", max_iter=2000)
        folds = int(min(5, np.bincount(target.astype(int)).min()))
        if folds >= 2:
            scores[f"{name}_balanced_accuracy"] = float(cross_val_score(lr, z, target, cv=folds,
                                                                        scoring="balanced_accuracy").mean())
        lr.fit(z, target)
        fitted[name] = (lr.coef_[0].astype(np.float64), float(lr.intercept_[0]))
    scores["explained_variance"] = float(pca.explained_variance_ratio_.sum())
    return RefusalAnchor(pca.mean_.astype(np.float64), pca.components_.T.astype(np.float64),
                         fitted["refusal"], fitted["harmfulness"], scores)


# ---------------------------------------------------------------------- the estimator
class SafetyPrompt(BaseEstimator):
    """A soft safety prompt trained with DRO on a frozen backbone.

    Parameters are only stored here; they are checked when :meth:`fit` runs.

    Args:
        n_tokens: soft tokens (``None``: as many as ``init_text`` has). Started from
            ``init_text``'s token embeddings, repeated or cut to this length.
        init_text: the written prompt the embeddings start from.
        text: the written safety prompt this one stands in for: the guard uses the soft prompt
            when the policy's ``safety_prompt`` is this text, which traces keep showing.
        elicit_prompts: system prompts (``None``: none) the backbone answers the training requests
            under, to show where it refuses (the anchor's refusal labels).
        n_components: dimensions of the anchor space (DRO uses 4).
        epochs: passes over the training requests.
        batch_size: requests per optimisation step.
        learning_rate: AdamW step size (DRO's 1e-3).
        harmfulness_weight: weight of the harmfulness term (DRO's 1e-2).
        norm_weight: weight of the term that keeps the part of the state outside the anchor space
            (DRO's 1e-3).
        answer_weight: weight of the KL divergence of a harmless request's next-token distribution
            from its unprompted one.
        refusal_text: a refusal the backbone's answers may open with.
        refusal_weight: weight of the term that reads DRO's logistic loss from the answer itself:
            the change, against the unprompted request, of the mean log-probability of an answer
            opening with ``refusal_text``, up for harmful requests and down for harmless ones
            (added here: on a small backbone the anchor's direction alone barely moves what it
            answers; 0 turns it off).
        max_new_tokens: answer length read by the refusal detector when eliciting.
        max_tokens: longer requests (encoded without a system prompt) stay out of the fit.
        random_state: seed of the shuffling and the PCA.
        before_text: the soft tokens come before the written ``text`` in the system turn instead of
            taking its place, in the fit and at use, so the backbone reads both
            (``benchmarks/safety_prompt.py`` measures either layout).
        strength: the share of the fitted change that is applied at use, in [0, 1]: the soft
            tokens used are ``start + strength * (fitted - start)``, ``start`` being
            ``init_text``'s embeddings the fit began from. 1 is the fitted prompt; less moves
            every request less toward refusal, harmful ones and look-alikes alike
            (:func:`choose_strength` picks it on held-aside requests). Not used by :meth:`fit`.

    Fitted attributes end in ``_``: ``embeddings_`` (n_tokens, d) float32, ``anchor_``
    (:class:`RefusalAnchor`), ``elicitation_`` (per elicitation prompt, harmful and harmless
    answers refused), ``history_`` (mean losses per epoch), ``n_samples_``, ``training_summary_``
    (requests per source and label), ``fit_seconds_``, ``backbone_identity_`` and ``provenance_``
    (how the fit was made, for a shipped prompt its data and licences).
    """

    def __init__(self, *, n_tokens: int | None = None, init_text: str = INIT_TEXT, text: str = DEFAULT_SAFETY_PROMPT,
                 elicit_prompts: Sequence[str | None] = ELICIT_PROMPTS, n_components: int = 4, epochs: int = 4,
                 batch_size: int = 16, learning_rate: float = 1e-3, harmfulness_weight: float = 1e-2,
                 norm_weight: float = 1e-3, answer_weight: float = 1.0, refusal_text: str = REFUSAL_TEXT,
                 refusal_weight: float = 1.0, max_new_tokens: int = 24,
                 max_tokens: int = 96, random_state: int = 0, before_text: bool = False,
                 strength: float = 1.0) -> None:
        self.n_tokens = n_tokens
        self.init_text = init_text
        self.text = text
        self.elicit_prompts = elicit_prompts
        self.n_components = n_components
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.harmfulness_weight = harmfulness_weight
        self.norm_weight = norm_weight
        self.answer_weight = answer_weight
        self.refusal_text = refusal_text
        self.refusal_weight = refusal_weight
        self.max_new_tokens = max_new_tokens
        self.max_tokens = max_tokens
        self.random_state = random_state
        self.before_text = before_text
        self.strength = strength

    # ------------------------------------------------------------------ checks
    def _check_params(self) -> None:
        positive_ints = ("n_components", "epochs", "batch_size", "max_new_tokens", "max_tokens")
        for name in positive_ints:
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ConfigError(f"`{name}` must be an int >= 1, got {value!r}")
        if self.n_tokens is not None and not (isinstance(self.n_tokens, int) and 1 <= self.n_tokens <= 256):
            raise ConfigError(f"`n_tokens` must be None or an int in 1..256, got {self.n_tokens!r}")
        if not isinstance(self.before_text, bool):
            raise ConfigError(f"`before_text` must be True or False, got {self.before_text!r}")
        if isinstance(self.strength, bool) or not (isinstance(self.strength, (int, float)) and 0 <= self.strength <= 1):
            raise ConfigError(f"`strength` must be a number in [0, 1], got {self.strength!r}")
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0):
            raise ConfigError(f"`learning_rate` must be a positive number, got {self.learning_rate!r}")
        for name in ("harmfulness_weight", "norm_weight", "answer_weight", "refusal_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ConfigError(f"`{name}` must be a number >= 0, got {value!r}")
        for name in ("init_text", "text", "refusal_text"):
            if not (isinstance(getattr(self, name), str) and getattr(self, name).strip()):
                raise ConfigError(f"`{name}` must be a non-empty string, got {getattr(self, name)!r}")
        if not self.elicit_prompts or not all(p is None or isinstance(p, str) for p in self.elicit_prompts):
            raise ConfigError(f"`elicit_prompts` must be a non-empty list of system prompts or None, "
                              f"got {self.elicit_prompts!r}")

    def _check_fitted(self) -> None:
        if not hasattr(self, "embeddings_"):
            raise NotFittedError(f"This {type(self).__name__} instance is not fitted yet. Call 'fit' with labelled "
                                 "requests and a backbone, or 'SafetyPrompt.load(path)'.")

    # ------------------------------------------------------------------ fit
    def fit(self, X: Sequence[PromptInput], y: Sequence[Any], *, backbone: Backbone,
            sources: Sequence[str] | None = None, progress: bool = True) -> SafetyPrompt:
        """Learn the soft prompt on ``backbone`` from labelled requests.

        Args:
            X: requests (strings or message lists); those over ``max_tokens`` tokens are left out.
            y: their labels (0/1, ``safe``/``unsafe``, ...): harmful requests are moved toward
                refusal, harmless ones away from it.
            backbone: the :class:`~mlpm_guard.Backbone` to train on (frozen).
            sources: the source of each request, recorded in ``training_summary_``.
            progress: log the elicitation and each epoch's losses.

        Returns:
            self
        """
        self._check_params()
        start = time.perf_counter()
        labels = np.array([parse_label(v) for v in y], dtype=np.int64)
        if len(labels) != len(X):
            raise ConfigError(f"got {len(X)} requests but {len(labels)} labels")
        sources = list(sources) if sources is not None else ["all"] * len(X)
        lengths = [len(r) for r in backbone.encode(list(X))]
        keep = [i for i, n in enumerate(lengths) if n <= self.max_tokens]
        prompts, labels = [X[i] for i in keep], labels[keep]
        if np.bincount(labels, minlength=2).min() < 2:
            raise ConfigError(f"need at least 2 harmful and 2 harmless requests of at most {self.max_tokens} tokens, "
                              f"got {int((labels == 1).sum())} harmful and {int((labels == 0).sum())} harmless")
        for p in backbone.model.parameters():
            p.requires_grad_(False)
        base, base_logp, base_opening, anchor, elicitation = self._elicit(backbone, prompts, labels, progress)
        self.anchor_, self.elicitation_ = anchor, elicitation
        self.embeddings_, self.history_ = self._optimise(backbone, prompts, labels, base, base_logp,
                                                         base_opening, progress)
        self.n_samples_ = len(prompts)
        self.training_summary_ = {f"{src}/{'unsafe' if lab else 'safe'}": n for (src, lab), n in
                                  sorted(Counter((sources[i], int(labels[j])) for j, i in enumerate(keep)).items())}
        self.backbone_identity_ = backbone.identity()
        self.fit_seconds_ = time.perf_counter() - start
        self.provenance_ = getattr(self, "provenance_", None)
        return self

    def _elicit(self, backbone: Backbone, prompts: Sequence[PromptInput], labels: np.ndarray,
                progress: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, RefusalAnchor,
                                         dict[str, dict[str, int]]]:
        """Answer every request under each elicitation prompt; return the unprompted final states,
        the unprompted next-token log-probabilities of the harmless requests, the unprompted
        log-probability of each answer opening with the refusal text, the anchor fitted on all
        states, and how many answers of each kind were refusals."""
        states, refused, harmful, counts = [], [], [], {}
        base = base_logp = None
        for system in self.elicit_prompts:
            rows = backbone.encode(list(prompts), system=system)
            texts = answers(backbone, rows, max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)
            r = np.array([is_refusal(t) for t in texts])
            with torch.inference_mode():
                parts = [final_states(backbone, [rows[i] for i in idx], logits=system is None)
                         for idx in _batched(len(rows), self.batch_size)]
            h = torch.cat([p[0] for p in parts])
            if system is None:
                base = h
                base_logp = torch.cat([p[1] for p in parts])[torch.as_tensor(labels == 0)].log_softmax(-1)
            states.append(h.numpy())
            refused.append(r)
            harmful.append(labels == 1)
            name = "none" if system is None else _short(system)
            counts[name] = {"harmful": int(r[labels == 1].sum()), "harmless": int(r[labels == 0].sum()),
                            "n_harmful": int((labels == 1).sum()), "n_harmless": int((labels == 0).sum())}
            if progress:
                logger.info("safety prompt: elicited under %s: %s", name, counts[name])
        if base is None:  # no unprompted condition: the regularisers still need the unprompted states
            rows = backbone.encode(list(prompts))
            with torch.inference_mode():
                parts = [final_states(backbone, [rows[i] for i in idx], logits=True)
                         for idx in _batched(len(rows), self.batch_size)]
            base = torch.cat([p[0] for p in parts])
            base_logp = torch.cat([p[1] for p in parts])[torch.as_tensor(labels == 0)].log_softmax(-1)
        base_opening = self._openings(backbone, backbone.encode(list(prompts)), None)
        anchor = estimate_anchor(np.concatenate(states), np.concatenate(refused), np.concatenate(harmful),
                                 n_components=self.n_components, random_state=self.random_state)
        if progress:
            logger.info("safety prompt: anchor %s", anchor.scores)
        return base.clone(), base_logp.clone(), base_opening, anchor, counts

    def _refusal_ids(self, backbone: Backbone) -> list[int]:
        return backbone.tokenizer(self.refusal_text, add_special_tokens=False)["input_ids"] if self.refusal_weight else []

    @torch.inference_mode()
    def _openings(self, backbone: Backbone, rows: Sequence[Encoded], soft: SoftTokens | None) -> torch.Tensor | None:
        """Each request's mean log-probability of an answer opening with the refusal text (None
        when that term is off)."""
        suffix = self._refusal_ids(backbone)
        if not suffix:
            return None
        return torch.cat([final_states(backbone, [rows[i] for i in idx], suffix=suffix)[2]
                          for idx in _batched(len(rows), self.batch_size)])

    def _initial_embeddings(self, backbone: Backbone, n: int | None = None) -> torch.Tensor:
        ids = backbone.tokenizer(self.init_text, add_special_tokens=False)["input_ids"]
        n = n or self.n_tokens or len(ids)
        ids = (ids * (n // len(ids) + 1))[:n]
        weight = backbone.model.get_input_embeddings().weight
        return weight[torch.tensor(ids, device=weight.device)].detach().float().clone()

    def _optimise(self, backbone: Backbone, prompts: Sequence[PromptInput], labels: np.ndarray, base: torch.Tensor,
                  base_logp: torch.Tensor, base_opening: torch.Tensor | None,
                  progress: bool) -> tuple[np.ndarray, list[dict[str, float]]]:
        """DRO's optimisation of the soft tokens; returns them and the mean losses of each epoch."""
        torch.manual_seed(self.random_state)
        soft = torch.nn.Parameter(self._initial_embeddings(backbone))
        optimiser = torch.optim.AdamW([soft], lr=self.learning_rate)
        rows, starts = self._layout(backbone, prompts, len(soft))
        suffix = self._refusal_ids(backbone)
        anchor = self.anchor_
        with torch.no_grad():
            z0, rest0 = anchor.coordinates(base)
            refusal0, harm0 = anchor.logit(z0, "refusal"), anchor.logit(z0, "harmfulness")
        harmless_row = torch.full((len(prompts),), -1, dtype=torch.long)
        harmless_row[torch.as_tensor(labels == 0)] = torch.arange(int((labels == 0).sum()))
        target = torch.as_tensor(labels, dtype=torch.float32)
        rng = random.Random(self.random_state)
        history = []
        for epoch in range(self.epochs):
            order = list(range(len(prompts)))
            rng.shuffle(order)
            sums: Counter[str] = Counter()
            steps = 0
            for begin in range(0, len(order), self.batch_size):
                idx = order[begin:begin + self.batch_size]
                t = torch.as_tensor(idx)
                h, logits, opening = final_states(backbone, [rows[i] for i in idx],
                                                  SoftTokens(soft, tuple(starts[i] for i in idx)),
                                                  logits=self.answer_weight > 0, suffix=suffix)
                z, rest = anchor.coordinates(h)
                losses = {
                    "refusal": F.binary_cross_entropy_with_logits(anchor.logit(z, "refusal") - refusal0[t], target[t]),
                    "harmfulness": F.binary_cross_entropy_with_logits(anchor.logit(z, "harmfulness") - harm0[t],
                                                                      target[t]),
                    "norm": ((rest - rest0[t]) ** 2).mean(),
                }
                if opening is not None and base_opening is not None:
                    # DRO's logistic loss on the change, read from the answer's opening instead of
                    # the anchor: a small backbone's refusal is decided in its first few tokens.
                    losses["refusal_text"] = F.binary_cross_entropy_with_logits(opening - base_opening[t], target[t])
                mild = harmless_row[t] >= 0
                if logits is not None and bool(mild.any()):
                    logp = logits[mild].log_softmax(-1)
                    losses["answer"] = F.kl_div(logp, base_logp[harmless_row[t][mild]], log_target=True,
                                                reduction="batchmean")
                total = (losses["refusal"] + self.harmfulness_weight * losses["harmfulness"]
                         + self.norm_weight * losses["norm"] + self.answer_weight * losses.get("answer", 0.0)
                         + self.refusal_weight * losses.get("refusal_text", 0.0))
                optimiser.zero_grad()
                total.backward()
                torch.nn.utils.clip_grad_norm_([soft], 1.0)
                optimiser.step()
                sums.update({k: float(v.detach()) for k, v in {**losses, "total": total}.items()})
                steps += 1
            history.append({k: v / steps for k, v in sums.items()})
            if progress:
                logger.info("safety prompt: epoch %d/%d %s", epoch + 1, self.epochs,
                            {k: round(v, 4) for k, v in history[-1].items()})
        return soft.detach().cpu().numpy().astype(np.float32), history

    # ------------------------------------------------------------------ use
    def inputs(self, backbone: Backbone, prompts: Sequence[PromptInput]) -> tuple[list[Encoded], SoftTokens]:
        """What a prefill under this prompt takes: each prompt encoded with placeholders where the
        system text goes, and the soft tokens that fill them."""
        self._check_fitted()
        rows, starts = self._layout(backbone, prompts, len(self.embeddings_))
        return rows, SoftTokens(self.applied_embeddings(backbone), starts)

    def _layout(self, backbone: Backbone, prompts: Sequence[PromptInput],
                n: int) -> tuple[list[Encoded], tuple[int, ...]]:
        return soft_layout(backbone, prompts, n, text=self.text if self.before_text else None)

    def applied_embeddings(self, backbone: Backbone) -> torch.Tensor:
        """The soft tokens used on ``backbone``: the fitted ones moved back toward where the fit
        started by ``1 - strength``."""
        self._check_fitted()
        fitted = torch.as_tensor(self.embeddings_, device=backbone.device, dtype=torch.float32)
        if self.strength != 1:
            start = self._initial_embeddings(backbone, len(fitted)).to(fitted.device)
            fitted = start + float(self.strength) * (fitted - start)
        return fitted.to(backbone.dtype)

    def digest(self) -> str:
        """A digest of what the prompt does: its embeddings, strength and init text and the text it
        replaces (answer caches key on it)."""
        self._check_fitted()
        h = hashlib.sha256(np.ascontiguousarray(self.embeddings_, dtype=np.float32).tobytes())
        h.update(self.text.encode())
        if self.before_text:
            h.update(b"\0before text")
        if self.strength != 1:
            h.update(f"\0{float(self.strength)!r}\0{self.init_text}".encode())
        return h.hexdigest()[:24]

    def replaces(self, text: str) -> bool:
        """Whether this prompt stands in for the written safety prompt ``text``."""
        return text == self.text

    def generate(self, backbone: Backbone, prompts: Sequence[PromptInput], *, max_new_tokens: int = 48,
                 batch_size: int = 16) -> list[str]:
        """Greedy answers of ``backbone`` to ``prompts`` under this prompt."""
        rows, soft = self.inputs(backbone, prompts)
        return answers(backbone, rows, max_new_tokens=max_new_tokens, batch_size=batch_size, soft=soft)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write the prompt into folder ``path``: ``safety_prompt.json`` and a digest-named tensors file."""
        self._check_fitted()
        return _save(self, Path(path))

    @classmethod
    def load(cls, path: str | Path, backbone: Backbone | None = None) -> SafetyPrompt:
        """Load a folder written by :meth:`save`; with ``backbone``, check it is the one trained on.

        Raises:
            PrototypeFileError: a missing, corrupted, edited or unknown file.
            BackboneMismatchError: ``backbone`` is not the recorded one.
        """
        prompt = _load(Path(path), cls)
        if backbone is not None:
            check_backbone(prompt.backbone_identity_, backbone)
        return prompt

    def __repr__(self) -> str:
        if not hasattr(self, "embeddings_"):
            return super().__repr__()
        strength = "" if self.strength == 1 else f", strength={self.strength:g}"
        before = ", before_text=True" if self.before_text else ""
        return (f"SafetyPrompt(n_tokens={len(self.embeddings_)}, n={self.n_samples_}{strength}{before}, "
                f"replaces={_short(self.text)!r})")


#: The strengths :func:`choose_strength` tries, strongest first.
STRENGTHS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0)


@dataclass(frozen=True)
class StrengthChoice:
    """What :func:`choose_strength` found.

    Attributes:
        strength: the strength chosen.
        written: the share of the harmless requests refused under the written prompt.
        tried: per strength tried (strongest first): ``strength``, ``harmless`` refused and, when
            harmful requests were given, ``harmful`` refused.
    """

    strength: float
    written: float
    tried: tuple[dict[str, float], ...]

    def to_dict(self) -> dict[str, Any]:
        return {"strength": self.strength, "written": self.written, "tried": [dict(t) for t in self.tried]}


def choose_strength(prompt: SafetyPrompt, backbone: Backbone, harmless: Sequence[PromptInput], *,
                    harmful: Sequence[PromptInput] = (), max_increase: float = 0.02,
                    strengths: Sequence[float] = STRENGTHS, max_new_tokens: int | None = None) -> StrengthChoice:
    """The largest of ``strengths`` at which ``prompt`` refuses at most ``max_increase`` more of
    ``harmless`` than the written prompt it replaces (:attr:`SafetyPrompt.text`) does (the smallest
    when none does).

    ``harmless`` should be held aside from the fit: a trained prompt pushes every request toward
    refusal, and on a small backbone the push that makes harmful requests refused also reaches
    harmless ones near them; this keeps the part of the push that harmless requests do not feel
    beyond the written prompt's. ``harmful`` requests, when given, are answered too, for the record
    of what each strength buys. Greedy answers of ``max_new_tokens`` (the prompt's own
    ``max_new_tokens`` by default), read by :func:`~mlpm_guard.guardrail.refusals.is_refusal`.
    The prompt itself is not changed.

    Raises:
        ConfigError: no harmless requests, a strength outside [0, 1] or ``max_increase`` outside [0, 1].
    """
    prompt._check_fitted()
    if not harmless:
        raise ConfigError("choose_strength needs harmless requests held aside from the fit")
    if not strengths or any(not 0 <= s <= 1 for s in strengths):
        raise ConfigError(f"`strengths` must be numbers in [0, 1], got {list(strengths)!r}")
    if not 0 <= max_increase <= 1:
        raise ConfigError(f"`max_increase` must be in [0, 1], got {max_increase!r}")
    n = max_new_tokens or prompt.max_new_tokens

    def refused(rows: list[Encoded], soft: SoftTokens | None) -> float:
        texts = answers(backbone, rows, max_new_tokens=n, batch_size=prompt.batch_size, soft=soft)
        return sum(map(is_refusal, texts)) / len(texts)

    written = refused(backbone.encode(list(harmless), system=prompt.text), None)
    tried: list[dict[str, float]] = []
    chosen = min(strengths)
    for strength in sorted(set(strengths), reverse=True):
        trial = copy.copy(prompt)  # the fitted arrays shared, only read
        trial.strength = strength
        row = {"strength": float(strength), "harmless": refused(*trial.inputs(backbone, harmless))}
        if harmful:
            row["harmful"] = refused(*trial.inputs(backbone, harmful))
        tried.append(row)
        logger.info("safety prompt: strength %.2f refuses %s (written prompt: %.3f of harmless)", strength,
                    {k: round(v, 3) for k, v in row.items() if k != "strength"}, written)
        if row["harmless"] <= written + max_increase + 1e-9:
            chosen = strength
            break
    return StrengthChoice(float(chosen), written, tuple(tried))


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def check_backbone(recorded: dict[str, Any], backbone: Backbone) -> None:
    """Raise :class:`BackboneMismatchError` if ``backbone`` is not the one the prompt was trained on."""
    from ..estimator.prototypes import same_weights

    current = backbone.identity()
    problems = [f"{key}: trained on {recorded.get(key)!r}, this backbone has {current[key]!r}"
                for key in ("num_layers", "hidden_size", "vocab_size", "chat_template_hash")
                if recorded.get(key) != current[key]]
    if not problems and not same_weights(recorded.get("weights_probe"), current["weights_probe"]):
        problems.append("weights differ (same shape, different model or fine-tune)")
    if problems:
        raise BackboneMismatchError(
            f"this safety prompt was trained on backbone {recorded.get('name')!r} but is used with {current['name']!r}: "
            + "; ".join(problems) + ". Train one on this backbone (`mlpm-guard fit-safety-prompt DATA... --backbone "
            "SPEC --out DIR`), or use the written safety prompt (`Guard(safety_prompt=False)`).")


# ---------------------------------------------------------------------- the file format
_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)
_SHA256 = r"^[0-9a-f]{64}$"


class SafetyPromptParams(BaseModel):
    """The estimator parameters of :class:`SafetyPrompt` (``get_params``)."""

    model_config = _STRICT

    n_tokens: int | None = Field(ge=1, le=256)
    init_text: str = Field(min_length=1)
    text: str = Field(min_length=1)
    elicit_prompts: list[str | None] = Field(min_length=1)
    n_components: int = Field(ge=1)
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    learning_rate: float = Field(gt=0)
    harmfulness_weight: float = Field(ge=0)
    norm_weight: float = Field(ge=0)
    answer_weight: float = Field(ge=0)
    refusal_text: str = Field(min_length=1)
    refusal_weight: float = Field(ge=0)
    max_new_tokens: int = Field(ge=1)
    max_tokens: int = Field(ge=1)
    random_state: int
    before_text: bool = False
    strength: float = Field(default=1.0, ge=0, le=1)


class SafetyPromptMeta(BaseModel):
    """The schema of ``safety_prompt.json``."""

    model_config = _STRICT

    format: Literal["mlpm-guard-safety-prompt"]
    format_version: Literal[1]
    mlpm_guard_version: str
    created: str
    backbone: BackboneRecord
    n_tokens: int = Field(ge=1, le=256)
    hidden_size: int = Field(ge=1)
    n_components: int = Field(ge=1)
    params: SafetyPromptParams
    refusal_intercept: float
    harmfulness_intercept: float
    anchor_scores: dict[str, float]
    elicitation: dict[str, dict[str, int]]
    history: list[dict[str, float]]
    n_samples: int = Field(ge=4)
    training_summary: dict[str, int]
    fit_seconds: float = Field(ge=0)
    provenance: dict[str, Any] | None = None
    tensors_sha256: str = Field(pattern=_SHA256)
    metadata_sha256: str = Field(pattern=_SHA256)


FOLDER = CheckedFolder(FORMAT, FORMAT_VERSION, META_FILE, "safety_prompt", "safety prompt", SafetyPromptMeta,
                       missing_hint=" (write one with `mlpm-guard fit-safety-prompt DATA... --out DIR`)")


def _save(prompt: SafetyPrompt, folder: Path) -> Path:
    """Tensors first under their digest's name, then ``safety_prompt.json`` in one rename: a save
    killed at any point leaves the previous one loadable."""
    a = prompt.anchor_
    tensors = {"embeddings": np.ascontiguousarray(prompt.embeddings_, dtype=np.float32),
               "anchor.mean": a.mean.astype(np.float32), "anchor.basis": np.ascontiguousarray(a.basis, dtype=np.float32),
               "anchor.refusal": a.refusal[0].astype(np.float32), "anchor.harmfulness": a.harmfulness[0].astype(np.float32)}
    if not all(np.isfinite(v).all() for v in tensors.values()):
        raise ConfigError("this safety prompt holds NaN or infinite values and cannot be saved (fit it again)")
    blob = save_bytes(tensors, metadata={"format": FORMAT})
    params = prompt.get_params()
    params["elicit_prompts"] = list(params["elicit_prompts"])
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "mlpm_guard_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backbone": prompt.backbone_identity_, "n_tokens": int(len(prompt.embeddings_)),
        "hidden_size": int(prompt.embeddings_.shape[1]), "n_components": int(a.basis.shape[1]), "params": params,
        "refusal_intercept": float(a.refusal[1]), "harmfulness_intercept": float(a.harmfulness[1]),
        "anchor_scores": {k: float(v) for k, v in a.scores.items()}, "elicitation": prompt.elicitation_,
        "history": [{k: float(v) for k, v in h.items()} for h in prompt.history_],
        "n_samples": int(prompt.n_samples_), "training_summary": dict(prompt.training_summary_),
        "fit_seconds": float(prompt.fit_seconds_), "provenance": prompt.provenance_,
    }
    return FOLDER.write(folder, meta, blob)


def _read(folder: Path) -> tuple[SafetyPromptMeta, dict[str, np.ndarray]]:
    """The checked metadata and tensors of a safety-prompt folder (schema, both digests, shapes)."""
    meta, t = FOLDER.read(folder)
    d, k = meta.hidden_size, meta.n_components
    shapes = {"embeddings": (meta.n_tokens, d), "anchor.mean": (d,), "anchor.basis": (d, k), "anchor.refusal": (k,),
              "anchor.harmfulness": (k,)}
    if set(t) != set(shapes) or any(t[key].shape != shape for key, shape in shapes.items()):
        raise PrototypeFileError(f"{folder}: the tensors do not match {META_FILE} (expected {shapes})")
    if meta.backbone.hidden_size != d:
        raise PrototypeFileError(f"{folder}: hidden_size {d} differs from the backbone's {meta.backbone.hidden_size}")
    return meta, t


def _load(folder: Path, cls: type[SafetyPrompt]) -> SafetyPrompt:
    meta, t = _read(folder)
    prompt = cls(**meta.params.model_dump())
    try:
        prompt._check_params()
    except ConfigError as exc:
        raise PrototypeFileError(f"{folder}: invalid `params`: {exc}") from None
    prompt.embeddings_ = t["embeddings"].astype(np.float32)
    prompt.anchor_ = RefusalAnchor(t["anchor.mean"].astype(np.float64), t["anchor.basis"].astype(np.float64),
                                   (t["anchor.refusal"].astype(np.float64), meta.refusal_intercept),
                                   (t["anchor.harmfulness"].astype(np.float64), meta.harmfulness_intercept),
                                   dict(meta.anchor_scores))
    prompt.elicitation_ = {k: dict(v) for k, v in meta.elicitation.items()}
    prompt.history_ = [dict(h) for h in meta.history]
    prompt.n_samples_, prompt.training_summary_ = meta.n_samples, dict(meta.training_summary)
    prompt.fit_seconds_, prompt.provenance_ = meta.fit_seconds, meta.provenance
    prompt.backbone_identity_ = meta.backbone.model_dump()
    return prompt


def data_provenance(paths: Sequence[str | Path], examples: Sequence[Any]) -> dict[str, Any]:
    """What a fit was made from: each file's name and sha256, and the rows drawn per source and label
    (recorded in the saved folder, so a shipped prompt says which data, and so which licences, it holds)."""
    files = {Path(p).name: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}
    rows = Counter(f"{e.source}/{'unsafe' if e.label else 'safe'}" for e in examples)
    return {"files": files, "rows_per_source": dict(sorted(rows.items()))}


# ---------------------------------------------------------------------- the shipped prompt
def shipped_safety_prompt_dir() -> Path:
    """Where the package keeps the safety prompt trained at release time for the embedded backbone."""
    return Path(str(resources.files("mlpm_guard") / "resources" / "default_safety_prompt"))


def default_safety_prompt(backbone: Backbone) -> SafetyPrompt | None:
    """The shipped safety prompt when it was trained on ``backbone`` (the embedded default), else
    ``None``: another backbone answers the route under the written prompt (nothing is trained at
    run time; ``mlpm-guard fit-safety-prompt`` trains one)."""
    folder = shipped_safety_prompt_dir()
    if not (folder / META_FILE).is_file():
        return None
    try:
        return SafetyPrompt.load(folder, backbone=backbone)
    except BackboneMismatchError:
        return None


def as_safety_prompt(value: SafetyPrompt | str | Path | bool | None, backbone: Backbone) -> SafetyPrompt | None:
    """What a guard's ``safety_prompt`` argument means: ``None`` the shipped prompt for ``backbone``
    (if any), ``False`` none (the written prompt only), a folder or a fitted :class:`SafetyPrompt`
    (checked against ``backbone``)."""
    if value is None or value is True:
        return default_safety_prompt(backbone)
    if value is False:
        return None
    if isinstance(value, (str, Path)):
        return SafetyPrompt.load(value, backbone=backbone)
    if isinstance(value, SafetyPrompt):
        value._check_fitted()
        check_backbone(value.backbone_identity_, backbone)
        return value
    raise ConfigError(f"`safety_prompt` must be a SafetyPrompt, a folder, None (the shipped one) or False (none), "
                      f"got {type(value).__name__}")
