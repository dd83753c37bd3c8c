"""Prefill and token-by-token decoding on a backbone, so the guard can score a prompt from the same
forward pass that starts its answer and then continue from that pass's KV cache.

The loop mirrors ``model.generate`` (left padding, positions from the attention mask,
``logits_to_keep=1``) with transformers' own pieces for the choice of each token
(:func:`logits_processors`: repetition penalty, temperature, top-k, top-p) and for stop strings
(:class:`~transformers.generation.stopping_criteria.StopStringCriteria`), and yields each step's
tokens as they come: streaming is real, with no background thread. A prefill may put trained
input embeddings in place of some of each row's tokens (:class:`SoftTokens`: an optimised safety
prompt, :mod:`.safety_prompt`).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                          TopKLogitsWarper, TopPLogitsWarper)
from transformers.generation.stopping_criteria import StoppingCriteriaList, StopStringCriteria

from .backbone import Backbone
from .encoding import Encoded
from ..vocabulary.errors import ConfigError
from .forward import output_cache, pool_weights, stack_states


class GenerationConfig(BaseModel):
    """Decoding settings. ``temperature=0`` is greedy decoding.

    ``stop``: strings that end the answer. Generation stops at the token that completes one, and
    the answer's text ends just before it (as the stop sequences of chat APIs do).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    repetition_penalty: float = Field(default=1.0, gt=0)
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, value: Any) -> Any:
        if value is None:
            return ()
        if isinstance(value, str):  # one stop string, as the OpenAI API allows
            value = (value,)
        return tuple(s for s in value if s) if isinstance(value, (list, tuple)) else value

    def updated(self, overrides: Mapping[str, Any]) -> GenerationConfig:
        """These settings with per-call ``overrides`` (validated; an invalid one raises ConfigError)."""
        if not overrides:
            return self
        try:
            return GenerationConfig(**{**self.model_dump(), **overrides})
        except ValidationError as exc:
            raise ConfigError(f"invalid generation settings {dict(overrides)}:\n{exc}") from None


@dataclass
class Prefill:
    """The state after running the prompt: what decoding continues from."""

    cache: Any
    logits: torch.Tensor  # (batch, vocab) next-token logits
    attention_mask: torch.Tensor
    positions: torch.Tensor  # (batch,) position id of each row's last token
    input_ids: torch.Tensor
    states: dict[int, torch.Tensor]  # captured last-token states per layer id
    pooled: dict[int, torch.Tensor] = field(default_factory=dict)  # mean-pooled, when asked for

    def select(self, rows: Sequence[int]) -> Prefill:
        """The prefill of a subset of the batch (the cache rows are copied)."""
        index = torch.tensor(list(rows), device=self.logits.device)
        cache = copy.deepcopy(self.cache)
        cache.batch_select_indices(index)
        return Prefill(cache, self.logits[index], self.attention_mask[index], self.positions[index],
                       self.input_ids[index], {k: v[index] for k, v in self.states.items()},
                       {k: v[index] for k, v in self.pooled.items()})

    def layer_states(self, layers: Sequence[int], poolings: Sequence[str] = ("last",)) -> np.ndarray:
        """Captured states of ``layers`` at ``poolings`` as a float32 array
        (batch, len(poolings) * len(layers), d), pooling-major as ``Backbone.layer_states`` gives them."""
        return stack_states(self.states, self.pooled, layers, poolings).cpu().numpy()


@dataclass(frozen=True)
class SoftTokens:
    """Trained input embeddings that take the place of some tokens of every row of a prefill.

    ``embeddings`` (n, hidden_size) replace, in row ``j``, the ``n`` tokens that start at
    ``starts[j]`` (an index into the row's own ids, before padding); those ids are placeholders
    the model never reads.
    """

    embeddings: torch.Tensor
    starts: tuple[int, ...]


def embed_inputs(backbone: Backbone, rows: Sequence[Encoded], input_ids: torch.Tensor,
                 soft: SoftTokens) -> torch.Tensor:
    """The input embeddings of left-padded ``input_ids`` (the rows of a batch), with ``soft`` in place."""
    if len(soft.starts) != len(rows):
        raise ConfigError(f"soft tokens give {len(soft.starts)} starts for {len(rows)} rows")
    embeds = backbone.model.get_input_embeddings()(input_ids)
    values = soft.embeddings.to(device=embeds.device, dtype=embeds.dtype)
    n, width = len(values), input_ids.shape[1]
    for j, (row, start) in enumerate(zip(rows, soft.starts)):
        if not 0 <= start <= len(row) - n:
            raise ConfigError(f"soft tokens at {start}..{start + n} do not fit in row {j} of {len(row)} tokens")
        at = width - len(row) + start
        embeds[j, at:at + n] = values
    return embeds


@torch.inference_mode()
def prefill(backbone: Backbone, rows: Sequence[Encoded], *, capture: Sequence[int] = (), pool: bool = False,
            steer: dict[int, torch.Tensor] | None = None, soft: SoftTokens | None = None) -> Prefill:
    """Run the prompts once through every layer, keeping the KV cache and the last-token logits.

    ``capture`` lists layer ids whose last-token states are kept (for scoring), with ``pool``
    their mean-pooled states too; ``steer`` adds per-layer vectors to every position; ``soft``
    puts trained embeddings in place of some tokens of each row.
    """
    # Steering acts on every token, and soft tokens replace some of the opening, so neither can
    # reuse the plain prompt's prefix cache.
    batch = backbone.model_inputs(rows, reuse_prefix=not steer and soft is None)
    weights = pool_weights(backbone, rows, batch) if pool and capture else None
    inputs = dict(batch)
    if soft is not None:
        inputs["inputs_embeds"] = embed_inputs(backbone, rows, inputs.pop("input_ids"), soft)
    with backbone.request(capture=frozenset(capture), steer=steer or {}, pool=weights) as req:
        out = backbone.model(**inputs, use_cache=True, logits_to_keep=1)
    return Prefill(output_cache(out), out.logits[:, -1, :].float(), batch["attention_mask"],
                   batch["position_ids"][:, -1], batch["input_ids"], dict(req.captured), dict(req.pooled))


def logits_processors(config: GenerationConfig) -> LogitsProcessorList:
    """What turns next-token logits into the scores a token is chosen from, in ``generate``'s order:
    the repetition penalty, then (when sampling) temperature, top-k and top-p."""
    processors = LogitsProcessorList()
    if config.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if config.temperature > 0:
        processors.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k:
            processors.append(TopKLogitsWarper(config.top_k))
        if config.top_p < 1.0:
            processors.append(TopPLogitsWarper(config.top_p))
    return processors


@functools.lru_cache(maxsize=16)
def _stop_criteria(tokenizer: Any, stop: tuple[str, ...]) -> StoppingCriteriaList:
    # Building the criterion reads the whole vocabulary (~0.1 s): once per tokenizer and stop strings.
    return StoppingCriteriaList([StopStringCriteria(tokenizer, list(stop))])


def stopping_criteria(backbone: Backbone, config: GenerationConfig) -> StoppingCriteriaList | None:
    """The stop-string criteria of ``config`` (``None`` without stop strings)."""
    return _stop_criteria(backbone.tokenizer, config.stop) if config.stop else None


def _choose(scores: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    if config.temperature == 0:
        return scores.argmax(dim=-1)
    return torch.multinomial(scores.softmax(-1), 1, generator=generator)[:, 0]


@torch.inference_mode()
def decode(backbone: Backbone, state: Prefill, config: GenerationConfig, *,
           steer: dict[int, torch.Tensor] | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, one step at a time, until all rows end or the budget is spent.

    A row ends with an end-of-sequence token or with the token that completes a stop string;
    from the next step on it receives an end-of-sequence token (its later tokens are to be
    ignored). The per-request context is entered around each forward pass only, so interleaved
    generators (two streams on one thread) never see each other's steering.
    """
    eos_ids = sorted(backbone.eos_token_ids)
    eos = torch.tensor(eos_ids, device=state.logits.device)
    ended_token = eos_ids[0] if eos_ids else backbone.tokenizer.pad_token_id
    generator = None
    if config.seed is not None and config.temperature > 0:
        generator = torch.Generator(device=state.logits.device).manual_seed(config.seed)
    processors, stopping = logits_processors(config), stopping_criteria(backbone, config)
    cache, logits, mask, positions = state.cache, state.logits, state.attention_mask, state.positions
    done = torch.zeros(len(logits), dtype=torch.bool, device=logits.device)
    history = state.input_ids  # the prompt, then every token chosen (the repetition penalty reads it)
    for step in range(config.max_new_tokens):
        token = _choose(processors(history, logits), config, generator)
        token = torch.where(done, torch.full_like(token, ended_token), token)
        yield token
        history = torch.cat([history, token[:, None]], dim=1)
        done |= torch.isin(token, eos)
        if stopping is not None:  # on the answer only: a stop string in the prompt must not end it
            done |= stopping(history[:, state.input_ids.shape[1]:], None)
        # Stop at the budget, or before the next position would leave the model's context window.
        if done.all() or step == config.max_new_tokens - 1 or int(positions.max()) + 2 >= backbone.context_window:
            return
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions + 1
        step_inputs = {"input_ids": token[:, None], "attention_mask": mask, "position_ids": positions[:, None],
                       backbone.cache_kw: cache, "use_cache": True, "logits_to_keep": 1}
        if steer:
            with backbone.request(steer=steer):
                out = backbone.model(**step_inputs)
        else:
            out = backbone.model(**step_inputs)
        cache, logits = output_cache(out), out.logits[:, -1, :].float()
