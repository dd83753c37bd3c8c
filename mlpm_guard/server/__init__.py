"""Serving the guard over HTTP: an OpenAI-compatible app, a proxy mode, dynamic batching and metrics.

Needs the ``server`` extra (``pip install 'mlpm-guard[server]'``); the Ray Serve deployment in
:mod:`mlpm_guard.server.ray_serve` needs the ``ray`` extra.
"""

from __future__ import annotations

from typing import Any

from .settings import ServerSettings

__all__ = ["ServerSettings", "create_app", "run"]


def create_app(*args: Any, **kwargs: Any) -> Any:
    """See :func:`mlpm_guard.server.app.create_app` (imported lazily: FastAPI is an optional extra)."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)


def run(guard: Any, settings: ServerSettings) -> None:
    """Serve ``guard`` with uvicorn until interrupted."""
    import logging

    import uvicorn

    if settings.public and not settings.api_key:
        logging.getLogger(__name__).warning(
            "serving on %s, reachable from other machines, without an API key; set --api-key or MLPM_GUARD_API_KEY",
            settings.host)
    app = create_app(guard, settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", server_header=False,
                timeout_graceful_shutdown=5)
