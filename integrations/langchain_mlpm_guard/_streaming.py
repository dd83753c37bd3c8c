"""Streaming through ``_transform``/``_atransform``, shared by the runnables of this package."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.runnables import RunnableConfig


class StreamsByTransform:
    """``stream``/``astream`` feed ``transform``/``atransform``, which run the subclass's
    ``_transform``/``_atransform`` generators under LangChain's callback and tracing machinery,
    so tokens reach the caller as they are produced (not after an ``invoke``)."""

    def stream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[Any]:
        yield from self.transform(iter([input]), config, **kwargs)

    def transform(self, input: Iterator[Any], config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[Any]:
        yield from self._transform_stream_with_config(input, self._transform, config, **kwargs)  # type: ignore[attr-defined]

    async def astream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> AsyncIterator[Any]:
        async def one() -> AsyncIterator[Any]:
            yield input

        async for chunk in self.atransform(one(), config, **kwargs):
            yield chunk

    async def atransform(self, input: AsyncIterator[Any], config: RunnableConfig | None = None,
                         **kwargs: Any) -> AsyncIterator[Any]:
        async for chunk in self._atransform_stream_with_config(  # type: ignore[attr-defined]
                input, self._atransform, config, **kwargs):  # type: ignore[attr-defined]
            yield chunk
