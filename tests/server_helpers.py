"""Running apps on loopback for the server tests: a uvicorn thread, and a small OpenAI-style upstream."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """Serve ``app`` on a free loopback port in a thread; yields its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


UPSTREAM_WORDS = ["Once", " upon", " a", " time", " a", " chemist", " mixed", " things", ".",
                  " Then", " he", " built", " a", " bomb", " and", " that", " was", " it", "."]


def upstream_app(words: list[str] | None = None) -> tuple[Any, list[dict[str, Any]]]:
    """An OpenAI-compatible upstream that answers every chat with ``words`` and records each request body."""
    words = words or UPSTREAM_WORDS
    seen: list[dict[str, Any]] = []
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await request.json()
        seen.append({"body": body, "authorization": request.headers.get("authorization")})
        base = {"id": "up-1", "created": 1, "model": "upstream-model"}
        if not body.get("stream"):
            return {**base, "object": "chat.completion",
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": "".join(words)}}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": len(words), "total_tokens": 3 + len(words)}}

        async def events() -> Any:
            chunk = {**base, "object": "chat.completion.chunk"}
            yield f"data: {json.dumps({**chunk, 'choices': [{'index': 0, 'delta': {'role': 'assistant'}, 'finish_reason': None}]})}\n\n"
            for w in words:
                yield f"data: {json.dumps({**chunk, 'choices': [{'index': 0, 'delta': {'content': w}, 'finish_reason': None}]})}\n\n"
            yield f"data: {json.dumps({**chunk, 'choices': [{'index': 0, 'delta': {}, 'finish_reason': 'stop'}]})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app, seen
