"""The LCEL plumbing shared by the guarded runnables: streaming and batching through LangChain's
config machinery, so callbacks, tracing and ``return_exceptions`` behave as for any runnable."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.runnables import RunnableConfig


class LCELPlumbing:
    """``stream``/``astream`` feed ``transform``/``atransform``, which run the subclass's
    ``_transform``/``_atransform`` generators under LangChain's callback and tracing machinery,
    so tokens reach the caller as they are produced (not after an ``invoke``); ``batch``/``abatch``
    hand the whole list to the subclass's ``_batch``/``_abatch`` (one batched call on the backbone,
    not a thread pool)."""

    def batch(self, inputs: list[Any], config: RunnableConfig | list[RunnableConfig] | None = None, *,
              return_exceptions: bool = False, **kwargs: Any) -> list[Any]:
        return self._batch_with_config(self._batch, inputs, config,  # type: ignore[attr-defined]
                                       return_exceptions=return_exceptions, **kwargs)

    async def abatch(self, inputs: list[Any], config: RunnableConfig | list[RunnableConfig] | None = None, *,
                     return_exceptions: bool = False, **kwargs: Any) -> list[Any]:
        return await self._abatch_with_config(self._abatch, inputs, config,  # type: ignore[attr-defined]
                                              return_exceptions=return_exceptions, **kwargs)

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
