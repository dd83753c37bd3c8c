"""Prefill and token-by-token decoding on a backbone, so the guard can score a prompt from the same
forward pass that starts its answer and then continue from that pass's KV cache.

The loop mirrors ``model.generate`` for greedy decoding (left padding, positions from the
attention mask, ``logits_to_keep=1``), and yields each step's tokens as they come: streaming is
real, with no background thread.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from .backbone import Backbone
from .encoding import Encoded
from .forward import output_cache


class GenerationConfig(BaseModel):
    """Decoding settings. ``temperature=0`` is greedy decoding."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    repetition_penalty: float = Field(default=1.0, gt=0)
    seed: int | None = None


@dataclass
class Prefill:
    """The state after running the prompt: what decoding continues from."""

    cache: Any
    logits: torch.Tensor  # (batch, vocab) next-token logits
    attention_mask: torch.Tensor
    positions: torch.Tensor  # (batch,) position id of each row's last token
    input_ids: torch.Tensor
    states: dict[int, torch.Tensor]  # captured last-token states per layer id

    def select(self, rows: Sequence[int]) -> Prefill:
        """The prefill of a subset of the batch (the cache rows are copied)."""
        index = torch.tensor(list(rows), device=self.logits.device)
        cache = _copy_cache(self.cache)
        cache.batch_select_indices(index)
        return Prefill(cache, self.logits[index], self.attention_mask[index], self.positions[index],
                       self.input_ids[index], {k: v[index] for k, v in self.states.items()})


def _copy_cache(cache: Any) -> Any:
    import copy

    return copy.deepcopy(cache)


@torch.inference_mode()
def prefill(backbone: Backbone, rows: Sequence[Encoded], *, capture: Sequence[int] = (),
            steer: dict[int, torch.Tensor] | None = None) -> Prefill:
    """Run the prompts once through every layer, keeping the KV cache and the last-token logits.

    ``capture`` lists layer ids whose last-token states are kept (for scoring); ``steer`` adds
    per-layer vectors to every position.
    """
    # Steering acts on every token, so a steered prompt cannot reuse the unsteered prefix cache.
    batch = backbone.model_inputs(rows, reuse_prefix=not steer)
    with backbone.request(capture=frozenset(capture), steer=steer or {}) as req:
        out = backbone.model(**batch, use_cache=True, logits_to_keep=1)
    return Prefill(output_cache(out), out.logits[:, -1, :].float(), batch["attention_mask"],
                   batch["position_ids"][:, -1], batch["input_ids"], dict(req.captured))


def _pick(logits: torch.Tensor, config: GenerationConfig, generated: torch.Tensor | None,
          generator: torch.Generator | None) -> torch.Tensor:
    if config.repetition_penalty != 1.0 and generated is not None and generated.numel():
        seen = torch.gather(logits, 1, generated)
        seen = torch.where(seen < 0, seen * config.repetition_penalty, seen / config.repetition_penalty)
        logits = logits.scatter(1, generated, seen)
    if config.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / config.temperature
    if config.top_k:
        kth = torch.topk(logits, min(config.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > config.top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


@torch.inference_mode()
def decode(backbone: Backbone, state: Prefill, config: GenerationConfig, *,
           steer: dict[int, torch.Tensor] | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, one step at a time, until all rows end or the budget is spent.

    Rows that have ended keep receiving the pad token (their later tokens are to be ignored).
    The per-request context is entered around each forward pass only, so interleaved
    generators (two streams on one thread) never see each other's steering.
    """
    eos = torch.tensor(sorted(backbone.eos_token_ids), device=state.logits.device)
    pad = backbone.tokenizer.pad_token_id
    generator = None
    if config.seed is not None and config.temperature > 0:
        generator = torch.Generator(device=state.logits.device).manual_seed(config.seed)
    cache, logits, mask, positions = state.cache, state.logits, state.attention_mask, state.positions
    done = torch.zeros(len(logits), dtype=torch.bool, device=logits.device)
    history = state.input_ids if config.repetition_penalty != 1.0 else None
    for step in range(config.max_new_tokens):
        token = _pick(logits, config, history, generator)
        token = torch.where(done, torch.full_like(token, pad), token)
        yield token
        done |= torch.isin(token, eos)
        # Stop at the budget, or before the next position would leave the model's context window.
        if done.all() or step == config.max_new_tokens - 1 or int(positions.max()) + 2 >= backbone.context_window:
            return
        if history is not None:
            history = torch.cat([history, token[:, None]], dim=1)
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
