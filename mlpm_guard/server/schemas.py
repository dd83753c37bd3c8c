"""The wire formats: OpenAI-style requests, and the guard decision carried in every response.

Requests accept the OpenAI fields the guard can honour and ignore the rest (``n``, ``tools``...),
so the official ``openai`` client works unchanged. The guard's decision record travels under
the ``mlpm_guard`` key of a chat completion (of the last chunk when streaming); each moderation
result carries its verdict there.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..vocabulary.categories import HAZARDS
from ..vocabulary.errors import InputError
from ..vocabulary.types import Decision, Verdict

EXTENSION = "mlpm_guard"

# OpenAI moderation categories each hazard code counts towards (S6 specialised advice and
# S13 elections have no OpenAI counterpart: they flag, with no OpenAI category set).
OPENAI_CATEGORIES: dict[str, tuple[str, ...]] = {
    "S1": ("violence",),
    "S2": ("illicit",),
    "S3": ("sexual",),
    "S4": ("sexual/minors", "sexual"),
    "S5": ("harassment",),
    "S6": (),
    "S7": ("illicit",),
    "S8": ("illicit",),
    "S9": ("illicit/violent", "illicit", "violence"),
    "S10": ("hate", "harassment"),
    "S11": ("self-harm",),
    "S12": ("sexual",),
    "S13": (),
    "S14": ("illicit",),
}
OPENAI_CATEGORY_NAMES = ("harassment", "harassment/threatening", "hate", "hate/threatening", "illicit",
                         "illicit/violent", "self-harm", "self-harm/intent", "self-harm/instructions", "sexual",
                         "sexual/minors", "violence", "violence/graphic")


# ---------------------------------------------------------------------- requests
class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The text of the message; only text parts are accepted."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InputError(f"only text content parts are supported, got a {part.get('type')!r} part")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``: the OpenAI fields the guard honours."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None

    def plain_messages(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class ModerationRequest(BaseModel):
    """``POST /v1/moderations``."""

    model_config = ConfigDict(extra="allow")

    input: str | list[str]
    model: str | None = None

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class CheckRequest(BaseModel):
    """``POST /v1/guard/check``: many prompts, each a string or a message list, scored in one call."""

    model_config = ConfigDict(extra="forbid")

    prompts: list[str | list[ChatMessage]] = Field(min_length=1)

    def messages(self) -> list[list[dict[str, str]]]:
        return [[{"role": "user", "content": p}] if isinstance(p, str)
                else [{"role": m.role, "content": m.text()} for m in p] for p in self.prompts]


# ---------------------------------------------------------------------- the guard's decision
class VerdictInfo(BaseModel):
    """A verdict as sent on the wire (the error text stays in the server log)."""

    p_unsafe: float
    flagged: bool
    tier: str
    category: str | None = None
    category_name: str | None = None
    error: bool = False

    @classmethod
    def of(cls, v: Verdict) -> VerdictInfo:
        return cls(p_unsafe=v.p_unsafe, flagged=v.unsafe, tier=v.tier.value, category=v.category,
                   category_name=v.category_name, error=v.error is not None)


def decision_body(decision: Decision, *, upstream: bool = False) -> dict[str, Any]:
    """The ``mlpm_guard`` field of a chat completion: the guard's decision record.

    The keys of :meth:`mlpm_guard.Decision.to_dict` (error texts cut to their kind: the text
    stays in the server log), plus the wire's own: ``input`` and ``output``, the input and output
    verdicts as :class:`VerdictInfo` (the moderation endpoint's form), and ``upstream``, true when
    the answer came from the upstream server (proxy mode).
    """
    v, o = decision.verdict, decision.output_verdict
    return {**decision.to_dict(redact_errors=True),
            "input": VerdictInfo.of(v).model_dump() if v is not None else None,
            "output": VerdictInfo.of(o).model_dump() if o is not None else None,
            "upstream": upstream}


# ---------------------------------------------------------------------- responses
def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def chat_completion(text: str, *, model: str, finish_reason: str, decision: dict[str, Any], prompt_tokens: int = 0,
                    completion_tokens: int = 0) -> dict[str, Any]:
    return {
        "id": completion_id(), "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                     "logprobs": None}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
        EXTENSION: decision,
    }


def chat_chunk(cid: str, model: str, created: int, *, content: str | None = None, role: str | None = None,
               finish_reason: str | None = None, decision: dict[str, Any] | None = None) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    chunk: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                             "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
    if decision is not None:
        chunk[EXTENSION] = decision
    return chunk


def moderation_result(v: Verdict) -> dict[str, Any]:
    """One OpenAI moderation result; S1-S14 flags and scores under ``mlpm_guard``.

    The prototypes give one P(unsafe) and the nearest hazard category, so a flagged input has
    that category (and the OpenAI categories it maps to) set, with ``p_unsafe`` as its score.
    """
    codes = {code: False for code in HAZARDS}
    scores = {code: 0.0 for code in HAZARDS}
    openai = dict.fromkeys(OPENAI_CATEGORY_NAMES, False)
    openai_scores = dict.fromkeys(OPENAI_CATEGORY_NAMES, 0.0)
    if v.category in HAZARDS:
        scores[v.category] = v.p_unsafe
        codes[v.category] = v.unsafe
        for name in OPENAI_CATEGORIES[v.category]:
            openai[name] = v.unsafe
            openai_scores[name] = v.p_unsafe
    return {
        "flagged": v.unsafe, "categories": openai, "category_scores": openai_scores,
        "category_applied_input_types": {name: ["text"] for name in OPENAI_CATEGORY_NAMES},
        EXTENSION: {**VerdictInfo.of(v).model_dump(), "hazard_categories": codes, "hazard_scores": scores},
    }


def sse(obj: Any) -> bytes:
    """One server-sent event carrying ``obj`` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"


def error_body(message: str, kind: Literal["invalid_request_error", "authentication_error", "server_error",
                                           "timeout", "upstream_error"]) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}
