"""The same app on Ray Serve: replicas, autoscaling, and ``serve.batch`` for the dynamic batches.

Each replica loads one guard and serves :func:`~mlpm_guard.server.app.create_app` unchanged; only
its lanes differ: ``serve.batch`` methods of the deployment instead of the local batchers. Run it
with a config file (``docs/ray-serve.yaml``)::

    serve run docs/ray-serve.yaml

or from Python: ``serve.run(app_builder({"prototypes": "protos"}))``. Needs the ``ray`` extra.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from ..model import cpu
from ..model.backbone import Backbone
from ..guardrail import scoring
from ..model.generation import GenerationConfig
from ..guardrail.guard import Guard
from ..vocabulary.types import GuardResult, Verdict
from .batching import DynamicBatcher, Messages, Reading, answer_batch, judge_in_readings, read_batch
from .settings import ServerSettings


class GuardArgs(BaseModel):
    """The ``args`` of the Serve application: what each replica loads, and the server settings."""

    model_config = ConfigDict(extra="forbid")

    backbone: str = "embedded"
    device: str = "auto"
    dtype: str = "auto"
    prototypes: str | None = Field(default=None, description="a folder written by `fit` or `fit-siren` "
                                                             "(default: the shipped prototypes)")
    policy: str | None = Field(default=None, description="a policy YAML or JSON file")
    max_new_tokens: int = Field(default=256, ge=1)
    server: dict[str, Any] = Field(default_factory=dict, description="ServerSettings fields (batching, limits, ...)")


# OpenMP reads OMP_WAIT_POLICY when the replica imports torch, so it goes in the replica's environment.
@serve.deployment(ray_actor_options={"num_cpus": 1, "runtime_env": {"env_vars": cpu.passive_env()}},
                  max_ongoing_requests=64)
@serve.ingress()
class GuardDeployment:
    """One replica: a guard, its model thread, and the app with ``serve.batch`` lanes."""

    def __init__(self, args: dict[str, Any]) -> None:
        options = GuardArgs(**args)
        backbone = Backbone(options.backbone, device=options.device, dtype=options.dtype)
        self.guard = Guard(backbone, options.prototypes, options.policy,
                           generation=GenerationConfig(max_new_tokens=options.max_new_tokens))
        self.settings = ServerSettings(**options.server)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlpm-guard-model")
        self._answer.set_max_batch_size(self.settings.effective_batch_size)
        self._answer.set_batch_wait_timeout_s(self.settings.max_wait_ms / 1000.0)
        # Readings take turns by request (as on the local server), on the replica's one model thread.
        self._read = DynamicBatcher(lambda items: read_batch(self.guard, items),
                                    max_batch_size=self.settings.effective_batch_size,
                                    max_wait_ms=self.settings.max_wait_ms, executor=self.executor,
                                    on_batch=lambda n: self._observe("score", n))
        self.metrics: Any = None

    def __serve_build_asgi_app__(self) -> Any:
        from .app import create_app

        app = create_app(self.guard, self.settings, lanes=self)
        self.metrics = app.state.service.metrics
        return app

    # The lanes the app calls (see batching.Lanes).
    async def score(self, prompt: Messages) -> Verdict:
        return await judge_in_readings(self.guard, prompt, kind="request", read=self._read_all)

    async def score_answer(self, messages: Messages, text: str) -> Verdict:
        return await judge_in_readings(self.guard, scoring.Answer(messages, text), kind="answer", read=self._read_all)

    def _read_all(self, readings: list[Reading]) -> Any:
        return self._read.submit_all(readings)

    async def answer(self, prompt: Messages, config: GenerationConfig) -> GuardResult:
        return await self._answer((prompt, config))

    async def close(self) -> None:
        await self._read.close()
        self.executor.shutdown(wait=False, cancel_futures=True)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _answer(self, items: list[tuple[Messages, GenerationConfig]]) -> list[GuardResult]:
        self._observe("answer", len(items))
        return await asyncio.get_running_loop().run_in_executor(self.executor, answer_batch, self.guard, items)

    def _observe(self, lane: str, size: int) -> None:
        if self.metrics is not None:
            self.metrics.observe_batch(lane, size)


def app_builder(args: dict[str, Any]) -> Any:
    """The Serve application (``import_path: mlpm_guard.server.ray_serve:app_builder``)."""
    GuardArgs(**args)  # fail on the driver, with a clear message, before any replica starts
    return GuardDeployment.bind(args)
