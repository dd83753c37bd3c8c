"""Forward passes over encoded prompts: padding and batching, per-request layer hooks (capture,
early exit, steering), the cached KV of the chat template's opening, and the states of layers at
the last token and mean-pooled over the request (:mod:`.readings`).

Scoring never runs the ``lm_head`` and stops the forward pass after the deepest layer it needs.
Layer ids follow Hugging Face's ``output_hidden_states`` numbering: layer ``l`` (1..L) is the
output of decoder block ``l - 1``; the embeddings (0) are never used.
"""

from __future__ import annotations

import contextvars
import copy
import inspect
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from ..estimator.readings import check_poolings
from ..vocabulary.errors import ConfigError
from .encoding import Encoded


class Model(Protocol):
    """What a forward pass reads of a loaded model (:class:`~mlpm_guard.Backbone` is one): the
    model and its decoder stack, where tensors go, the prefix-cache setting and cache, and how
    rows are encoded, batched, collated and hooked."""

    model: Any  # a transformers causal LM
    base: Any  # its decoder stack, without the lm_head
    device: torch.device
    hidden_size: int
    cache_kw: str
    prefix: PrefixCache

    @property
    def config(self) -> Any: ...

    def encode(self, prompts: Sequence[Any], *, system: str | None = None) -> list[Encoded]: ...

    def collate(self, rows: Sequence[Encoded], width: int = 0) -> dict[str, torch.Tensor]: ...

    def check_layers(self, layers: Sequence[int]) -> list[int]: ...

    def batches(self, lengths: Sequence[int], batch_size: int | None = None) -> list[list[int]]: ...

    def request(self, **state: Any) -> Any: ...


#: Rows are left-padded to a multiple of this many tokens, alone or in a batch (see `padded_length`).
PAD_MULTIPLE = 8


def padded_length(n: int) -> int:
    """The length a row of ``n`` tokens is left-padded to, whatever batch it runs in.

    In bfloat16 the amount of left padding changes a row's states (enough to move P(unsafe) of a
    prompt scored alone and in a batch apart), while the other rows of its batch do not. So
    every row gets the same padding alone as in company: up to a multiple of PAD_MULTIPLE,
    with batches formed of rows that share it (:func:`plan_batches`).
    """
    return -(-n // PAD_MULTIPLE) * PAD_MULTIPLE


def plan_batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Indices grouped into batches of one padded length, longest first, within the token budget."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current = [], []
    for i in order:
        longest = padded_length(lengths[current[0]] if current else lengths[i])
        if current and (len(current) >= batch_size or longest * (len(current) + 1) > max_batch_tokens
                        or padded_length(lengths[i]) != longest):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def collate(rows: Sequence[Encoded], *, pad_token_id: int, device: torch.device,
            width: int = 0) -> dict[str, torch.Tensor]:
    """Left-pad rows (to ``width`` at least) into ``input_ids``, ``attention_mask`` and ``position_ids``."""
    width = max(width, *(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        if len(r):
            ids[j, width - len(r):] = torch.tensor(r.ids, dtype=torch.long)
            mask[j, width - len(r):] = 1
    # Positions count real tokens only, as `generate` does, so a prompt's states do not
    # depend on how much padding its batch needed.
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": position_ids.to(device)}


def cache_keyword(model: torch.nn.Module) -> str:
    """The forward argument that takes the KV cache: ``cache`` from transformers 5.2x, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache a forward pass returned, under either name."""
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


# ---------------------------------------------------------------------- layer hooks
class _EarlyExit(Exception):
    """Raised inside the forward pass once the deepest needed layer has run."""


@dataclass
class LayerRequest:
    """Per-call state read by the layer hooks; lives in a ContextVar, so threads never share it."""

    capture: frozenset[int] = frozenset()
    stop_at: int | None = None
    steer: dict[int, torch.Tensor] = field(default_factory=dict)
    pool: torch.Tensor | None = None  # (batch, input width) weights of the mean-pooled states
    captured: dict[int, torch.Tensor] = field(default_factory=dict)
    pooled: dict[int, torch.Tensor] = field(default_factory=dict)


class LayerHooks:
    """Forward hooks on the decoder layers that act for the request of the current context only.

    The hooks are on the model only while at least one request needs them: a module with hooks
    takes PyTorch's slow call path, which would tax every plain decoding step.
    """

    def __init__(self, layers: torch.nn.ModuleList) -> None:
        self.layers = layers
        self._current: contextvars.ContextVar[LayerRequest | None] = contextvars.ContextVar(
            f"mlpm_guard_request_{id(self)}", default=None)
        self._handles: list[Any] = []
        self._lock = threading.Lock()
        self._active = 0

    @property
    def idle(self) -> bool:
        """No request is running in this context and no hook is on the model."""
        return self._current.get() is None and not self._handles and self._active == 0

    def attach(self) -> None:
        """Place the hooks (requests do it when they need them)."""
        if not self._handles:
            self._handles = [layer.register_forward_hook(self._hook(i + 1)) for i, layer in enumerate(self.layers)]

    def close(self) -> None:
        """Remove the hooks."""
        with self._lock:
            self._detach()

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @contextmanager
    def request(self, **state: Any) -> Iterator[LayerRequest]:
        """Scope hook state (captures, early exit, steering) to the current context."""
        req = LayerRequest(**state)
        with self._lock:
            self._active += 1
            self.attach()
        token = self._current.set(req)
        try:
            yield req
        finally:
            self._current.reset(token)
            with self._lock:
                self._active -= 1
                if self._active == 0:
                    self._detach()

    def _hook(self, layer_id: int):
        def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
            state = self._current.get()
            if state is None:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            vector = state.steer.get(layer_id)
            if vector is not None:
                hidden = hidden + vector.to(hidden.dtype)
                output = (hidden, *output[1:]) if isinstance(output, tuple) else hidden
            if layer_id in state.capture:
                state.captured[layer_id] = hidden[:, -1, :].detach()
                if state.pool is not None:
                    state.pooled[layer_id] = torch.einsum("bs,bsd->bd", state.pool, hidden.detach().float())
            if state.stop_at == layer_id:
                raise _EarlyExit
            return output if vector is not None else None

        return hook


# ---------------------------------------------------------------------- the template's opening
def common_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading token ids ``a`` and ``b`` share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class PrefixCache:
    """The token ids every single-turn prompt starts with (the template's opening) and their KV
    cache, each computed once per backbone."""

    def __init__(self) -> None:
        self._ids: tuple[int, ...] | None = None
        self._kv: Any = None
        self._lock = threading.Lock()

    def ids(self, backbone: Model) -> tuple[int, ...]:
        """Found by encoding two different prompts; the last common token is left out in case it
        merges with the text."""
        if self._ids is None:
            a, b = (backbone.encode([text])[0].ids for text in ("a", "Zebra 1"))
            self._ids = tuple(a[: max(common_length(a, b) - 1, 0)])
        return self._ids

    @torch.inference_mode()
    def kv(self, backbone: Model) -> Any:
        """The KV cache of the opening (all layers); callers copy it before extending it."""
        from transformers import DynamicCache

        with self._lock:
            if self._kv is None:
                ids = torch.tensor([self.ids(backbone)], device=backbone.device)
                cache = DynamicCache(config=backbone.model.config)
                backbone.base(input_ids=ids, use_cache=True, **{backbone.cache_kw: cache})
                self._kv = cache
            return self._kv


def model_inputs(backbone: Model, rows: Sequence[Encoded], *, reuse_prefix: bool = True) -> dict[str, Any]:
    """Forward-pass inputs for rows, with a KV cache always present (under ``backbone.cache_kw``).

    When every row starts with the template's shared opening, that opening comes from the
    cached prefix KV and only the rest runs: layout ``[prefix][padding][row]``, with positions
    counting real tokens, so the states equal those of the full prompt.
    """
    from transformers import DynamicCache

    prefix = backbone.prefix.ids(backbone) if (reuse_prefix and backbone.config.prefix_cache) else ()
    p = len(prefix)
    width = padded_length(max(len(r) for r in rows))
    if not p or not all(len(r) > p and r.ids[:p] == prefix for r in rows):
        return {**backbone.collate(rows, width), backbone.cache_kw: DynamicCache(config=backbone.model.config)}
    batch = backbone.collate([Encoded(r.ids[p:]) for r in rows], width - p)
    cache = copy.deepcopy(backbone.prefix.kv(backbone))
    cache.batch_repeat_interleave(len(rows))
    ones = torch.ones((len(rows), p), dtype=batch["attention_mask"].dtype, device=backbone.device)
    return {"input_ids": batch["input_ids"],
            "attention_mask": torch.cat([ones, batch["attention_mask"]], dim=1),
            "position_ids": batch["position_ids"] + p,
            backbone.cache_kw: cache}


def pool_weights(backbone: Model, rows: Sequence[Encoded], inputs: dict[str, Any]) -> torch.Tensor:
    """Weights over the input positions of :func:`model_inputs` that average each row's tokens
    after the chat template's shared opening (all of them for a template without one).

    The opening (system prompt, user header) is the same for every prompt, so it would only pull
    every mean towards one point. A row's pooled tokens are always the last ones of its input:
    the shared prefix, when cached, is not in the input at all.
    """
    prefix = backbone.prefix.ids(backbone)
    width = inputs["input_ids"].shape[1]
    weights = torch.zeros((len(rows), width), dtype=torch.float32)
    for j, r in enumerate(rows):
        n = len(r) - min(common_length(r.ids, prefix), len(r) - 1)
        weights[j, width - n:] = 1.0 / n
    return weights.to(inputs["input_ids"].device)


def stack_states(captured: dict[int, torch.Tensor], pooled: dict[int, torch.Tensor], layers: Sequence[int],
                 poolings: Sequence[str]) -> torch.Tensor:
    """Captured states as one (batch, len(poolings) * len(layers), d) tensor, pooling-major."""
    source = {"last": captured, "mean": pooled}
    return torch.stack([source[p][layer].float() for p in poolings for layer in layers], dim=1)


@torch.inference_mode()
def layer_states(backbone: Model, rows: Sequence[Encoded], layers: Sequence[int], *,
                 poolings: Sequence[str] = ("last",), batch_size: int | None = None,
                 progress: bool = False) -> np.ndarray:
    """Hidden states of ``layers`` at ``poolings`` for encoded prompts, from one forward pass per
    batch stopped after the deepest layer.

    Returns:
        float32 array of shape ``(len(rows), len(poolings) * len(layers), hidden_size)``,
        pooling-major (:mod:`.readings`).
    """
    layers = backbone.check_layers(layers)
    poolings = check_poolings(poolings)
    out = np.empty((len(rows), len(poolings) * len(layers), backbone.hidden_size), dtype=np.float32)
    if not rows:
        return out
    empty = [i for i, r in enumerate(rows) if len(r) == 0]
    if empty:
        raise ConfigError(f"prompts {empty[:5]} encode to no tokens; the backbone needs at least one token")
    bar = tqdm(total=len(rows), desc="hidden states", unit="prompt", disable=not progress, leave=False)
    with bar:
        for idx in backbone.batches([len(r) for r in rows], batch_size):
            part = [rows[i] for i in idx]
            batch = model_inputs(backbone, part)
            pool = pool_weights(backbone, part, batch) if "mean" in poolings else None
            with backbone.request(capture=frozenset(layers), stop_at=max(layers), pool=pool) as req:
                try:
                    backbone.base(**batch, use_cache=True)
                except _EarlyExit:
                    pass
            out[idx] = stack_states(req.captured, req.pooled, layers, poolings).cpu().numpy()
            bar.update(len(idx))
    return out
