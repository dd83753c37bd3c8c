"""Proxy mode: the guard in front of any OpenAI-compatible server.

The prompt is scored on the local backbone. ``REFUSE`` is answered locally and nothing goes
upstream; ``PASS`` is forwarded as it came (streams are passed through chunk by chunk);
``SAFETY_PROMPT`` is forwarded with the safety system prompt added. ``STEER`` needs the local
model's activations, which a remote model does not expose, so upstream it takes the closest
route it can: the safety prompt.

With output moderation on (the policy's ``output_moderation``), the upstream answer is judged in
the conversation it answers by the same prototypes, on the server's answer lane: the judgement the
guard makes of its own answers in process. A streamed answer is held back as ``Guard.stream`` holds
back its own (:class:`~mlpm_guard.guardrail.streaming.OutputWatch`): a chunk reaches the caller only after a
check that read it and the ``hold_back`` tokens after it found the answer confidently safe, and a
flagged answer's held text never does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi.responses import JSONResponse, StreamingResponse

from ..guardrail import external
from ..guardrail.moderation import PrototypeModerator, to_verdict
from ..guardrail.streaming import OutputWatch
from ..model.generation import GenerationConfig
from ..vocabulary.messages import with_system_prompt
from ..vocabulary.types import Decision, Route, Verdict
from . import schemas
from .batching import Messages
from .schemas import SSE_DONE, sse
from .service import Service

logger = logging.getLogger(__name__)


def _delta_text(event: dict[str, Any]) -> str:
    choices = event.get("choices") or []
    if not choices:
        return ""
    return (choices[0].get("delta") or {}).get("content") or ""


class UpstreamProxy:
    def __init__(self, service: Service) -> None:
        self.service = service
        settings = service.settings
        headers = {"Authorization": f"Bearer {settings.upstream_api_key}"} if settings.upstream_api_key else {}
        self.url = f"{settings.upstream}/chat/completions"
        self.client = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(settings.upstream_timeout_s))

    async def close(self) -> None:
        await self.client.aclose()

    # ------------------------------------------------------------------ one request
    async def chat(self, req: schemas.ChatCompletionRequest, messages: Messages, config: GenerationConfig) -> Any:
        service, policy = self.service, self.service.guard.policy
        verdict = await service.score(messages)
        decision = external.decide(verdict, policy)
        if decision.blocked:
            service.record(decision.route, verdict)
            return self._local(req, policy.refusal_message, decision)
        body = req.model_dump(exclude_none=True)
        body["max_tokens"] = config.max_new_tokens
        body.pop("max_completion_tokens", None)
        if decision.applied_route is Route.SAFETY_PROMPT:
            body["messages"] = with_system_prompt(body["messages"], policy.safety_prompt)
        if req.stream:
            return await self._stream(body, messages, decision)
        return await self._complete(body, messages, decision)

    def _local(self, req: schemas.ChatCompletionRequest, text: str, decision: Decision) -> Any:
        model = req.model or self.service.settings.model_name
        body = schemas.decision_body(decision)
        if not req.stream:
            return schemas.chat_completion(text, model=model, finish_reason="content_filter", decision=body)

        async def events() -> AsyncIterator[bytes]:
            cid, created = schemas.completion_id(), int(time.time())
            yield sse(schemas.chat_chunk(cid, model, created, role="assistant", content=text))
            yield sse(schemas.chat_chunk(cid, model, created, finish_reason="content_filter", decision=body))
            yield SSE_DONE

        return StreamingResponse(events(), media_type="text/event-stream")

    async def moderate(self, messages: Messages, text: str) -> Verdict:
        """The answer judged as ``Guard.check_answer`` judges it: with the prototypes, its readings on
        the answer lane (batched with other requests'); with any other moderator, by that moderator."""
        guard = self.service.guard
        if not isinstance(guard.moderator, PrototypeModerator):
            return await asyncio.to_thread(guard.check_answer, messages, text)
        return to_verdict(await self.service.score_answer(messages, text), guard.policy.output_moderation.threshold)

    def moderated(self, decision: Decision, output: Verdict | None, *, broken: bool = False) -> Decision:
        """``decision`` once the answer was judged (``output``) or its stream broke, which ends as a refusal."""
        self.service.record(decision.route, decision.verdict, output)
        return external.answered(decision, output, self.service.guard.policy, broken=broken)

    @staticmethod
    def _upstream_error(exc: Exception | None = None, status: int = 502) -> JSONResponse:
        if exc is not None:
            logger.error("upstream call failed: %s: %s", type(exc).__name__, exc)
        return JSONResponse(schemas.error_body("the upstream model server failed to answer", "upstream_error"),
                            status_code=status)

    async def _complete(self, body: dict[str, Any], messages: Messages, decision: Decision) -> Any:
        policy = self.service.guard.policy
        try:
            response = await self.client.post(self.url, json=body)
        except httpx.HTTPError as exc:
            return self._upstream_error(exc)
        if response.status_code != 200:
            logger.warning("upstream answered %s: %s", response.status_code, response.text[:500])
            return self._upstream_error(status=502 if response.status_code >= 500 else response.status_code)
        try:
            data = response.json()
            message = data["choices"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            return self._upstream_error(exc)
        output = None
        if policy.output_moderation.enabled:
            output = await self.moderate(messages, message.get("content") or "")
        decision = self.moderated(decision, output)
        if decision.replaced:
            message["content"] = policy.refusal_message
            data["choices"][0]["finish_reason"] = "content_filter"
        data[schemas.EXTENSION] = schemas.decision_body(decision, upstream=True)
        return data

    async def _stream(self, body: dict[str, Any], messages: Messages, decision: Decision) -> Any:
        request = self.client.build_request("POST", self.url, json=body)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            return self._upstream_error(exc)
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            await response.aclose()
            logger.warning("upstream answered %s: %s", response.status_code, text[:500])
            return self._upstream_error(status=502 if response.status_code >= 500 else response.status_code)
        return StreamingResponse(self._held_back(response, _HeldBack(self, messages), decision),
                                 media_type="text/event-stream")

    async def _held_back(self, response: httpx.Response, held: _HeldBack, decision: Decision) -> AsyncIterator[bytes]:
        last: dict[str, Any] = {}
        broken = False
        try:
            async for event in _events(response):
                last = event
                for released in await held.add(event):
                    yield sse(released)
                if held.watch.stopped:
                    break
            else:
                await held.finish()
        except Exception as exc:  # noqa: BLE001 - a broken stream releases nothing more and ends as a refusal
            logger.error("upstream stream failed: %s: %s", type(exc).__name__, exc)
            broken = True
        finally:
            await response.aclose()
        decision = self.moderated(decision, held.verdict, broken=broken)
        cid, model = last.get("id") or schemas.completion_id(), last.get("model") or ""
        created = last.get("created") or int(time.time())
        if decision.replaced:
            yield sse(schemas.chat_chunk(cid, model, created, content=self.service.guard.policy.refusal_message,
                                         finish_reason="content_filter"))
        else:
            for released in held.release():
                yield sse(released)
        final = schemas.chat_chunk(cid, model, created, decision=schemas.decision_body(decision, upstream=True))
        final["choices"] = []
        yield sse(final)
        yield SSE_DONE


class _HeldBack:
    """Output moderation of one upstream stream under :class:`~mlpm_guard.guardrail.streaming.OutputWatch`'s
    rule (as ``Guard.stream``): a chunk goes to the caller only after a check that read it and the
    ``hold_back`` tokens after it found the answer confidently safe; the whole answer's verdict
    decides the rest. With output moderation off every chunk goes out as it comes."""

    def __init__(self, proxy: UpstreamProxy, messages: Messages) -> None:
        self.proxy, self.messages = proxy, messages
        moderation = proxy.service.guard.policy.output_moderation
        self.enabled = moderation.enabled
        self.watch: OutputWatch[dict[str, Any]] = OutputWatch(moderation.check_every, moderation.hold_back,
                                                              moderation.stop_at)
        self.tokenizer = proxy.service.guard.backbone.tokenizer

    @property
    def verdict(self) -> Verdict | None:
        return self.watch.verdict

    async def add(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """Take an upstream chunk; returns the chunks that may go to the caller now."""
        if not self.enabled:
            return [event]
        piece = _delta_text(event)
        tokens = len(self.tokenizer(piece, add_special_tokens=False)["input_ids"]) if piece else 0
        if not self.watch.add(event, piece, tokens):
            return []
        return self.watch.checked(await self.proxy.moderate(self.messages, self.watch.text))

    async def finish(self) -> None:
        """The whole answer's check at the end of the stream, unless the last one already read all of it."""
        if self.enabled and self.watch.due_at_end:
            self.watch.checked(await self.proxy.moderate(self.messages, self.watch.text))

    def release(self) -> list[dict[str, Any]]:
        return self.watch.rest()


async def _events(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON payloads of an SSE stream, up to ``[DONE]``."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        yield json.loads(payload)
