"""Server settings: one pydantic model shared by ``mlpm-guard serve``, the app and the Ray Serve deployment."""

from __future__ import annotations

import ipaddress
import os

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..guardrail.decision_log import DecisionLogSettings

LOOPBACK = "127.0.0.1"


class ServerSettings(BaseModel):
    """How the guard is served.

    The defaults are the safe ones for a network service: loopback only, bounded request sizes,
    timeouts, and internal errors answered as refusals (never as a pass, never with a trace).

    Attributes:
        host / port: where uvicorn binds (``127.0.0.1`` unless told otherwise).
        api_key: when set, every route but ``/healthz`` needs ``Authorization: Bearer <api_key>``
            (default: ``$MLPM_GUARD_API_KEY``).
        model_name: the ``model`` reported in responses when the guard answers itself.
        upstream: base URL of an OpenAI-compatible server (``http://host:port/v1``); when set the
            guard scores locally and forwards chat completions there (proxy mode).
        upstream_api_key: bearer key sent upstream (default: ``$MLPM_GUARD_UPSTREAM_API_KEY``).
        batching: score (and answer) concurrent requests in shared batches; off means one
            request per forward pass, queued one by one.
        max_batch_size / max_wait_ms: a batch closes when full or this long after its first request.
        max_request_bytes: largest request body accepted.
        max_input_chars: largest total text of one prompt (all its messages), and of each moderation input.
        max_batch_items: most inputs in one moderation or check request.
        max_tokens_limit: largest ``max_tokens`` a chat request may ask for; also the default.
        request_timeout_s: a request still waiting for the model after this long gets a 504.
        upstream_timeout_s: connect/read timeout of upstream calls.
        decision_log: where every decision is logged (``None``: not logged, unless the guard
            has a log of its own); with a log the app also serves the review page at ``/review``.
        prototypes_store: a prototypes store folder (:mod:`mlpm_guard.estimator.prototype_store`): the app
            serves its current version, follows teaching and rollbacks without a restart, and the
            review page can apply corrections to it.
        reload_every_s: how often the store's current version is checked.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = LOOPBACK
    port: int = Field(default=8000, ge=0, le=65535)
    api_key: str | None = Field(default_factory=lambda: os.environ.get("MLPM_GUARD_API_KEY") or None)
    model_name: str = "mlpm-guard"
    upstream: str | None = None
    upstream_api_key: str | None = Field(default_factory=lambda: os.environ.get("MLPM_GUARD_UPSTREAM_API_KEY") or None)
    batching: bool = True
    max_batch_size: int = Field(default=16, ge=1, le=256)
    max_wait_ms: float = Field(default=5.0, ge=0, le=1000)
    max_request_bytes: int = Field(default=1 << 20, ge=1024)
    max_input_chars: int = Field(default=32_000, ge=1)
    max_batch_items: int = Field(default=256, ge=1)
    max_tokens_limit: int = Field(default=512, ge=1)
    request_timeout_s: float = Field(default=120.0, gt=0)
    upstream_timeout_s: float = Field(default=120.0, gt=0)
    decision_log: DecisionLogSettings | None = None
    prototypes_store: str | None = None
    reload_every_s: float = Field(default=2.0, gt=0)

    @field_validator("api_key")
    @classmethod
    def _api_key(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            # An empty key would look like authentication while checking nothing.
            raise ValueError("`api_key` is empty; give a real key, or leave it out to serve without one")
        return value

    @field_validator("upstream")
    @classmethod
    def _upstream_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"`upstream` must be an http(s) URL such as http://127.0.0.1:8001/v1, got {value!r}")
        return value.rstrip("/")

    @property
    def effective_batch_size(self) -> int:
        """1 with batching off: the same queue, one request per forward pass."""
        return self.max_batch_size if self.batching else 1

    @property
    def public(self) -> bool:
        """Whether the bind address is reachable from other machines."""
        try:
            return not ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host != "localhost"
