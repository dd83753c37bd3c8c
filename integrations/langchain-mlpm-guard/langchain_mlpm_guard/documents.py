"""``MLPMDocumentFilter``: score retrieved documents and drop or flag the unsafe ones (RAG).

Retrieved text is an attack surface of its own (poisoned pages, injected instructions), so the
filter scores each document in batched forward passes (``Guard.check_batch``) that stop at the
deepest layer the prototypes use.

Documents are judged as *content* with :meth:`mlpm_guard.Guard.check_content_batch`, the one way
both integrations score retrieved text: inside a request for it, as a whole and in windows of a
few sentences (prototypes are fitted on requests, and plain statements scored bare lean unsafe).
:meth:`MLPMDocumentFilter.calibrated` sets the threshold from documents known to be clean (for
example the indexed corpus).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForChainRun, CallbackManagerForChainRun
from langchain_core.documents import BaseDocumentTransformer, Document
from langchain_core.runnables import RunnableConfig, RunnableSerializable
from pydantic import Field

from mlpm_guard import Policy, Verdict

from ._common import FLAG_KEY, aemit, emit
from ._settings import GuardSettings

class MLPMDocumentFilter(GuardSettings, BaseDocumentTransformer, RunnableSerializable[Sequence[Document],
                                                                                     list[Document]]):
    """Drop (or flag) documents the guard judges unsafe.

    Usable as a runnable (``retriever | MLPMDocumentFilter()``) and as a document transformer
    (``transform_documents``). Each kept document is a copy whose ``metadata["mlpm_guard"]``
    holds ``unsafe``, ``p_unsafe``, ``tier`` and ``category``; the input documents are not changed.

    Args:
        guard: the core guard (``None``: the shared default ``mlpm_guard.Guard()``).
        action: ``"drop"`` removes unsafe documents; ``"flag"`` keeps them all, flagged.
        threshold: P(unsafe) from which a document counts as unsafe (``None``: the policy's
            unsafe tier, or ``unsafe_at`` when set).
        metadata_key: the metadata key of the verdict.
    """

    action: Literal["drop", "flag"] = "drop"
    threshold: float | None = Field(default=None, gt=0, lt=1)
    metadata_key: str = FLAG_KEY

    @classmethod
    def is_lc_serializable(cls) -> bool:
        return False

    def _unsafe(self, verdict: Verdict) -> bool:
        return verdict.p_unsafe >= self.threshold if self.threshold is not None else verdict.unsafe

    def _verdicts(self, documents: Sequence[Document]) -> list[Verdict]:
        guard = self.resolved_guard()
        return guard.check_content_batch([d.page_content for d in documents], policy=self.call_policy(guard))

    async def _averdicts(self, documents: Sequence[Document]) -> list[Verdict]:
        guard = self.resolved_guard()
        return await guard.acheck_content_batch([d.page_content for d in documents], policy=self.call_policy(guard))

    def calibrated(self, clean: Sequence[Document | str], *, max_flag_rate: float = 0.01) -> MLPMDocumentFilter:
        """A copy whose ``threshold`` flags at most ``max_flag_rate`` of documents known to be clean.

        Args:
            clean: documents (or texts) of the corpus the filter will see, known to be harmless.
            max_flag_rate: the share of them that may still be flagged.
        """
        docs = [d if isinstance(d, Document) else Document(page_content=d) for d in clean]
        scores = [v.p_unsafe for v in self._verdicts(docs)]
        threshold = Policy().calibrated(scores, max_flag_rate=max_flag_rate).unsafe_at
        return self.model_copy(update={"threshold": threshold})

    def _apply(self, documents: Sequence[Document], verdicts: Sequence[Verdict]) -> tuple[list[Document], dict]:
        """The documents to pass on, and the summary that goes out as the ``mlpm_guard`` event."""
        kept, unsafe_at = [], []
        for i, (doc, verdict) in enumerate(zip(documents, verdicts)):
            unsafe = self._unsafe(verdict)
            if unsafe:
                unsafe_at.append(i)
                if self.action == "drop":
                    continue
            record = {"unsafe": unsafe, **verdict.summary()}
            if self.threshold is not None:
                record["threshold"] = self.threshold
            kept.append(doc.model_copy(update={"metadata": {**doc.metadata, self.metadata_key: record}}))
        summary = {"stage": "documents", "action": self.action, "n_documents": len(documents),
                   "n_unsafe": len(unsafe_at), "unsafe": unsafe_at,
                   "unsafe_ids": [documents[i].id for i in unsafe_at]}
        return kept, summary

    def _split(self, batches: list[Sequence[Document]], verdicts: list[Verdict]) -> list[list[Verdict]]:
        out, start = [], 0
        for docs in batches:
            out.append(verdicts[start:start + len(docs)])
            start += len(docs)
        return out

    # ------------------------------------------------------------------ runnable
    def invoke(self, input: Sequence[Document], config: RunnableConfig | None = None, **kwargs: Any) -> list[Document]:
        return self._call_with_config(self._invoke, input, config)

    def _invoke(self, input: Sequence[Document], run_manager: CallbackManagerForChainRun,
                config: RunnableConfig) -> list[Document]:
        kept, summary = self._apply(input, self._verdicts(input))
        emit(summary, config)
        return kept

    async def ainvoke(self, input: Sequence[Document], config: RunnableConfig | None = None,
                      **kwargs: Any) -> list[Document]:
        return await self._acall_with_config(self._ainvoke, input, config)

    async def _ainvoke(self, input: Sequence[Document], run_manager: AsyncCallbackManagerForChainRun,
                       config: RunnableConfig) -> list[Document]:
        kept, summary = self._apply(input, await self._averdicts(input))
        await aemit(summary, config)
        return kept

    def batch(self, inputs: list[Sequence[Document]], config: RunnableConfig | list[RunnableConfig] | None = None,
              *, return_exceptions: bool = False, **kwargs: Any) -> list[list[Document]]:
        return self._batch_with_config(self._batch, inputs, config, return_exceptions=return_exceptions)

    def _batch(self, inputs: list[Sequence[Document]], run_manager: list[CallbackManagerForChainRun],
               config: list[RunnableConfig]) -> list[list[Document]]:
        # Every document of every input in one batched check.
        flat = self._verdicts([d for docs in inputs for d in docs])
        out = []
        for docs, verdicts, cfg in zip(inputs, self._split(inputs, flat), config):
            kept, summary = self._apply(docs, verdicts)
            emit(summary, cfg)
            out.append(kept)
        return out

    async def abatch(self, inputs: list[Sequence[Document]],
                     config: RunnableConfig | list[RunnableConfig] | None = None, *, return_exceptions: bool = False,
                     **kwargs: Any) -> list[list[Document]]:
        return await self._abatch_with_config(self._abatch, inputs, config, return_exceptions=return_exceptions)

    async def _abatch(self, inputs: list[Sequence[Document]], run_manager: list[AsyncCallbackManagerForChainRun],
                      config: list[RunnableConfig]) -> list[list[Document]]:
        flat = await self._averdicts([d for docs in inputs for d in docs])
        out = []
        for docs, verdicts, cfg in zip(inputs, self._split(inputs, flat), config):
            kept, summary = self._apply(docs, verdicts)
            await aemit(summary, cfg)
            out.append(kept)
        return out

    # ------------------------------------------------------------------ document transformer
    def transform_documents(self, documents: Sequence[Document], **kwargs: Any) -> Sequence[Document]:
        return self.invoke(list(documents), kwargs.get("config"))

    async def atransform_documents(self, documents: Sequence[Document], **kwargs: Any) -> Sequence[Document]:
        return await self.ainvoke(list(documents), kwargs.get("config"))
