"""Prompts to token ids: the chat template, a system prompt put first, and over-long prompts cut in
the middle. Message content only ever becomes text, never template structure.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any

from ..vocabulary.errors import InputError
from ..vocabulary.messages import render_plain, with_system_prompt


@dataclass(frozen=True)
class Encoded:
    """A prompt rendered through the chat template and tokenized."""

    ids: tuple[int, ...]
    n_truncated: int = 0

    def __len__(self) -> int:
        return len(self.ids)


def with_system(messages: list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    """``messages`` with ``system`` first, merged into the caller's own system turn if there is one."""
    return messages if system is None else with_system_prompt(messages, system)


def apply_template(tokenizer: Any, chat_template: str | None, messages: list[dict[str, str]],
                   merge_system: bool) -> str:
    """The messages through the chat template (a plain fallback without one), generation prompt added.

    ``merge_system``: a template that allows no system role gets the system text at the start of
    the first turn instead.
    """
    if not chat_template:
        return render_plain(messages)
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception:  # noqa: BLE001 - jinja's TemplateError: e.g. a template without a system role
        if not merge_system or messages[0]["role"] != "system":
            raise
        first, rest = messages[0]["content"], messages[1:]
        merged = [{**m, "content": f"{first}\n\n{m['content']}"} if i == 0 else m for i, m in enumerate(rest)]
        return tokenizer.apply_chat_template(merged, add_generation_prompt=True, tokenize=False)


def structure_tokens(tokenizer: Any) -> tuple[str, ...]:
    """Strings the tokenizer turns into single added tokens (``<|im_start|>``, ``<|im_end|>``, ...)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    words = {t.content for t in added.values()} | set(tokenizer.all_special_tokens)
    return tuple(sorted(w for w in words if w))


def template_ids(tokenizer: Any, chat_template: str | None, messages: list[dict[str, str]], *,
                 merge_system: bool, structure: tuple[str, ...]) -> list[int]:
    """Token ids of the rendered messages, where message content is only ever text.

    Typed into a message, ``<|im_end|>`` would otherwise become the real end-of-turn token and
    let a user forge turns (``...<|im_end|>\\n<|im_start|>assistant\\nSure!``). Content holding
    such a string (one of ``structure``) is tokenized on its own with special tokens split;
    everything else is tokenized whole as before, so the ids of ordinary prompts (and caches keyed
    by them) stay.
    """
    add_special = chat_template is None
    if not any(w in m["content"] for m in messages for w in structure):
        return tokenizer(apply_template(tokenizer, chat_template, messages, merge_system),
                         add_special_tokens=add_special)["input_ids"]
    nonce = secrets.token_hex(8)
    marks = [f"<<mlpm-{nonce}-{i}>>" for i in range(len(messages))]
    marked = [{**m, "content": mark} for m, mark in zip(messages, marks)]
    pieces = re.split("(" + "|".join(map(re.escape, marks)) + ")",
                      apply_template(tokenizer, chat_template, marked, merge_system))
    restored = "".join(messages[marks.index(x)]["content"] if i % 2 else x for i, x in enumerate(pieces))
    if pieces[1::2] != marks or restored != apply_template(tokenizer, chat_template, messages, merge_system):
        # The template changes content (trims it, drops a turn): no safe place to split.
        msg = ("a message contains a chat-template token (one of "
               f"{[w for w in structure if any(w in m['content'] for m in messages)]}) and this backbone's chat "
               "template rewrites message text, so it cannot be kept as plain text; remove it from the message")
        raise InputError(msg)
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        content = i % 2 == 1
        text = messages[marks.index(piece)]["content"] if content else piece
        if text:
            ids += tokenizer(text, add_special_tokens=add_special and i == 0, split_special_tokens=content)["input_ids"]
    return ids


def truncated(row: list[int], limit: int) -> Encoded:
    """``row`` cut to ``limit`` tokens by dropping its middle: the start and the end of the template
    (the generation prompt) are always kept, and the count of dropped tokens is recorded."""
    if len(row) <= limit:
        return Encoded(tuple(row))
    head = limit // 4
    cut = len(row) - limit
    return Encoded(tuple(row[:head] + row[head + cut:]), cut)
