"""The HTTP app: OpenAI-compatible chat completions and moderations, a batch check, health and metrics.

Everything that touches the model goes through the app's :class:`~mlpm_guard.server.batching.Lanes`
(dynamic batches on one model thread), except streamed local answers, which decode per request.
Errors never leave a stack trace in a response, and an internal error is a refusal or a flag,
never a pass (unless the policy says ``fail_open``).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from .._version import __version__
from ..guardrail.decision_log import DecisionLog, verdict_decision
from ..vocabulary.errors import InputError
from ..model.generation import GenerationConfig
from ..guardrail.guard import Guard, prototypes_version
from ..vocabulary.messages import to_messages
from ..guardrail.pipeline import failed_result
from ..vocabulary.types import GuardResult, Route, Verdict
from ..vocabulary.verdicts import failed_verdict
from . import schemas
from .batching import BatchedLanes, Lanes, Messages
from .metrics import Metrics
from .review import LOGIN_PATH, cookie_ok
from .settings import ServerSettings

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

ROUTES = ("/v1/chat/completions", "/v1/moderations", "/v1/guard/check", "/v1/models", "/healthz", "/metrics")
OPEN_ROUTES = ("/healthz", "/review/login")


class HTTPError(Exception):
    """An error answered with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind

    def response(self) -> JSONResponse:
        return JSONResponse(schemas.error_body(self.message, self.kind), status_code=self.status)  # type: ignore[arg-type]


class _Middleware:
    """Metrics for every request (latency to the last byte), the bearer key, the body size header,
    and a last-resort 500 without details."""

    def __init__(self, app: Any, settings: ServerSettings, metrics: Metrics) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in ROUTES else "other"
        start = time.perf_counter()
        status = {"code": 500, "started": False}

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.metrics.latency.labels(route).observe(time.perf_counter() - start)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        error = self._reject(path, headers)
        try:
            if error is not None:
                await error.response()(scope, receive, send_wrapper)
            else:
                await self.app(scope, receive, send_wrapper)
        except Exception:  # noqa: BLE001 - logged here, never shown to the caller
            logger.exception("unhandled error on %s", path)
            if not status["started"]:
                await HTTPError(500, "internal error", "server_error").response()(scope, receive, send_wrapper)
        finally:
            self.metrics.requests.labels(route, str(status["code"])).inc()

    def _reject(self, path: str, headers: dict[str, str]) -> HTTPError | _Redirect | None:
        key = self.settings.api_key
        if key and path not in OPEN_ROUTES:
            given = headers.get("authorization", "")
            review = path == "/review" or path.startswith("/review/")
            if review and cookie_ok(headers.get("cookie", ""), key):
                pass  # a browser signed in at /review/login
            elif review and not given:
                return _Redirect(LOGIN_PATH)
            elif not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return HTTPError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                                 "authentication_error")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.settings.max_request_bytes):
            return HTTPError(413, f"request body larger than {self.settings.max_request_bytes} bytes")
        return None


class _Redirect:
    """A browser sent to the review page's sign-in form."""

    def __init__(self, location: str) -> None:
        self.location = location

    def response(self) -> RedirectResponse:
        return RedirectResponse(self.location, status_code=303)


def _failed(exc: BaseException, guard: Guard) -> Verdict:
    """The verdict of a prompt or answer the server could not score: unsafe (fail closed) unless the policy fails open."""
    logger.error("scoring failed: %s: %s", type(exc).__name__, exc)
    return failed_verdict(type(exc).__name__, fail_open=guard.policy.fail_open)


class GuardService:
    """The state behind the routes: the guard, settings, lanes, metrics and (in proxy mode) the upstream."""

    def __init__(self, guard: Guard, settings: ServerSettings, lanes: Lanes, metrics: Metrics) -> None:
        self.guard, self.settings, self.lanes, self.metrics = guard, settings, lanes, metrics
        self.log: DecisionLog | None = guard.decision_log
        self.proxy = None
        if settings.upstream:
            from .proxy import UpstreamProxy

            self.proxy = UpstreamProxy(self)

    async def timed(self, awaitable: Awaitable[T]) -> T:
        try:
            return await asyncio.wait_for(awaitable, self.settings.request_timeout_s)
        except asyncio.TimeoutError:
            raise HTTPError(504, f"the guard did not answer within {self.settings.request_timeout_s:g} s",
                            "timeout") from None

    async def score(self, messages: Messages) -> Verdict:
        """One prompt's verdict through the scoring lane; internal errors fail closed."""
        try:
            verdict = await self.timed(self.lanes.score(messages))
        except HTTPError:
            raise
        except Exception as exc:  # noqa: BLE001
            verdict = _failed(exc, self.guard)
        if self.log is not None:
            # The lanes read the prototypes directly, not through Guard's logged methods; answers go
            # through `Guard.batch`/`Guard.stream`, which log them.
            self.log.record(verdict_decision(verdict, self.guard.policy), messages, source="server",
                            policy=self.guard.policy, prototypes_version=prototypes_version(self.guard.prototypes))
        return verdict

    async def score_answer(self, messages: Messages, text: str) -> Verdict:
        """An answer's verdict in the conversation it answers, through the answer lane (the
        judgement of ``Guard``'s own output moderation); internal errors fail closed."""
        try:
            return await self.timed(self.lanes.score_answer(messages, text))
        except HTTPError:
            raise
        except Exception as exc:  # noqa: BLE001
            return _failed(exc, self.guard)

    async def score_many(self, prompts: list[Messages]) -> list[Verdict]:
        # Submitted one by one, so they can share batches with other callers' prompts.
        return list(await asyncio.gather(*(self.score(p) for p in prompts)))

    def check_input(self, messages: Any) -> Messages:
        try:
            clean = to_messages(messages)
        except InputError as exc:
            raise HTTPError(400, str(exc)) from None
        size = sum(len(m["content"]) for m in clean)
        if size > self.settings.max_input_chars:
            raise HTTPError(400, f"input of {size} characters is over the limit of {self.settings.max_input_chars}")
        return clean

    def generation(self, req: schemas.ChatCompletionRequest) -> GenerationConfig:
        limit = self.settings.max_tokens_limit
        wanted = req.max_completion_tokens or req.max_tokens or limit
        if wanted > limit:
            raise HTTPError(400, f"max_tokens {wanted} is over this server's limit of {limit}")
        update: dict[str, Any] = {"max_new_tokens": wanted}
        for key in ("temperature", "top_p", "seed"):
            if getattr(req, key) is not None:
                update[key] = getattr(req, key)
        return self.guard.generation.model_copy(update=update)

    def record(self, route: Route, verdict: Verdict | None, output: Verdict | None = None) -> None:
        self.metrics.decisions.labels(route.value).inc()
        if verdict is not None and verdict.unsafe:
            self.metrics.flags.labels("input").inc()
        if output is not None and output.unsafe:
            self.metrics.flags.labels("output").inc()

    # ------------------------------------------------------------------ chat answered by the guard itself
    async def answer(self, messages: Messages, config: GenerationConfig) -> GuardResult:
        try:
            result = await self.timed(self.lanes.answer(messages, config))
        except HTTPError:
            raise
        except Exception as exc:  # noqa: BLE001 - fail closed
            logger.error("answering failed: %s: %s", type(exc).__name__, exc)
            result = failed_result(type(exc).__name__, self.guard.policy)
        self.record(result.route, result.verdict, result.output_verdict)
        return result

    def completion(self, result: GuardResult, config: GenerationConfig, model: str) -> dict[str, Any]:
        t = result.timings
        finish = "content_filter" if result.blocked else "length" if t.completion_tokens >= config.max_new_tokens \
            else "stop"
        return schemas.chat_completion(result.text, model=model, finish_reason=finish,
                                       decision=schemas.decision_body(result.decision()),
                                       prompt_tokens=t.prompt_tokens, completion_tokens=t.completion_tokens)

    async def stream_local(self, messages: Messages, config: GenerationConfig, model: str) -> AsyncIterator[bytes]:
        """The guard's own answer as OpenAI chunks; the last chunk carries the decision."""
        cid, created = schemas.completion_id(), int(time.time())
        yield schemas.sse(schemas.chat_chunk(cid, model, created, role="assistant", content=""))
        result: GuardResult | None = None
        stream = self.guard.astream(messages, **config.model_dump()).__aiter__()
        try:
            while True:
                try:
                    chunk = await self.timed(stream.__anext__())
                except StopAsyncIteration:
                    break
                if chunk.text:
                    yield schemas.sse(schemas.chat_chunk(cid, model, created, content=chunk.text))
                result = chunk.result or result
        except Exception as exc:  # noqa: BLE001 - a broken stream ends as a refusal, never silently
            logger.error("streaming failed: %s: %s", type(exc).__name__, exc)
            result = failed_result(type(exc).__name__, self.guard.policy)
        finally:
            await stream.aclose()
        assert result is not None
        self.record(result.route, result.verdict, result.output_verdict)
        n = result.timings.completion_tokens
        finish = "content_filter" if result.blocked else "length" if n >= config.max_new_tokens else "stop"
        yield schemas.sse(schemas.chat_chunk(cid, model, created, finish_reason=finish,
                                             decision=schemas.decision_body(result.decision())))
        yield schemas.SSE_DONE


async def read_json(request: Request, model: type[M], limit: int) -> M:
    """The request body as ``model``, read with a size cap (also when no Content-Length was sent)."""
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise HTTPError(413, f"request body larger than {limit} bytes")
    try:
        return model.model_validate_json(bytes(body))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:5])
        raise HTTPError(400, f"invalid request: {problems}") from None


def create_app(guard: Guard, settings: ServerSettings | None = None, *, lanes: Lanes | None = None) -> FastAPI:
    """The FastAPI app serving ``guard``.

    Args:
        settings: limits, batching, key and upstream (defaults: :class:`ServerSettings`).
        lanes: how model calls are batched; by default dynamic batchers on one model thread
            (``max_batch_size`` 1 when ``settings.batching`` is off).
    """
    settings = settings or ServerSettings()
    metrics = Metrics()
    owned_log = None
    if guard.decision_log is None and settings.decision_log is not None:
        # The guard logs what it answers; the service logs what the scoring lanes judge.
        guard.decision_log = owned_log = DecisionLog(settings.decision_log)
    reloader = None
    if settings.prototypes_store is not None:
        from ..estimator.prototype_store import PrototypeStore
        from .review import PrototypeReloader

        reloader = PrototypeReloader(guard, PrototypeStore(settings.prototypes_store))
        reloader.check()
    executor = None
    if lanes is None:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlpm-guard-model")
        lanes = BatchedLanes(guard, max_batch_size=settings.effective_batch_size, max_wait_ms=settings.max_wait_ms,
                             executor=executor, on_batch=metrics.observe_batch)
    service = GuardService(guard, settings, lanes, metrics)
    if service.log is not None:
        service.log.add_listener(metrics.observe_decision)
        metrics.watch_log(service.log)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        watcher = asyncio.create_task(reloader.watch(settings.reload_every_s)) if reloader is not None else None
        yield
        if watcher is not None:
            watcher.cancel()
        await lanes.close()
        if owned_log is not None:
            owned_log.close()
        if service.proxy is not None:
            await service.proxy.close()
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="mlpm-guard", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.service = service

    @app.exception_handler(HTTPError)
    async def _http_error(_: Request, exc: HTTPError) -> JSONResponse:
        return exc.response()

    _add_info_routes(app, service)
    _add_guard_routes(app, service)
    if service.log is not None:
        from ..estimator.prototype_store import harmful_probes
        from .review import Review, add_review_routes

        add_review_routes(app, Review(service, service.log, reloader, harmful_probes()))
    app.add_middleware(_Middleware, settings=settings, metrics=metrics)
    return app


def _add_info_routes(app: FastAPI, service: GuardService) -> None:
    """``/healthz``, ``/metrics`` and ``/v1/models``: what the server is, never touching the model."""
    settings = service.settings

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "backbone": service.guard.backbone.name, "batching": settings.batching,
                "max_batch_size": settings.effective_batch_size, "upstream": settings.upstream is not None,
                "prototypes_version": prototypes_version(service.guard.prototypes),
                "decision_log": service.log.stats.to_dict() if service.log is not None else None}

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = service.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "mlpm-guard"}]}


def _add_guard_routes(app: FastAPI, service: GuardService) -> None:
    """The routes that score or answer: moderations, the batch check and chat completions."""
    settings, guard = service.settings, service.guard

    @app.post("/v1/moderations")
    async def moderations(request: Request) -> dict[str, Any]:
        req = await read_json(request, schemas.ModerationRequest, settings.max_request_bytes)
        texts = req.inputs()
        if not texts or len(texts) > settings.max_batch_items:
            raise HTTPError(400, f"`input` must hold 1 to {settings.max_batch_items} texts, got {len(texts)}")
        verdicts = await service.score_many([service.check_input(t) for t in texts])
        service.metrics.flags.labels("input").inc(sum(v.unsafe for v in verdicts))
        return {"id": f"modr-{uuid.uuid4().hex}", "model": req.model or settings.model_name,
                "results": [schemas.moderation_result(v) for v in verdicts]}

    @app.post("/v1/guard/check")
    async def check(request: Request) -> dict[str, Any]:
        req = await read_json(request, schemas.CheckRequest, settings.max_request_bytes)
        if len(req.prompts) > settings.max_batch_items:
            raise HTTPError(400, f"`prompts` must hold at most {settings.max_batch_items} prompts")
        verdicts = await service.score_many([service.check_input(m) for m in req.messages()])
        return {"results": [{**schemas.VerdictInfo.of(v).model_dump(), "route": guard.policy.route(v).value}
                            for v in verdicts]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        req = await read_json(request, schemas.ChatCompletionRequest, settings.max_request_bytes)
        try:
            plain = req.plain_messages()
        except InputError as exc:  # a non-text content part
            raise HTTPError(400, str(exc)) from None
        messages = service.check_input(plain)
        config = service.generation(req)
        if service.proxy is not None:
            return await service.proxy.chat(req, messages, config)
        if req.stream:
            return StreamingResponse(service.stream_local(messages, config, settings.model_name),
                                     media_type="text/event-stream")
        return service.completion(await service.answer(messages, config), config, settings.model_name)
