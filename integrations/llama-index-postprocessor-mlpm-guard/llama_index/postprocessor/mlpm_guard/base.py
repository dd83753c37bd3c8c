"""``MLPMGuardNodePostprocessor``: score retrieved nodes with the guard and drop or flag the unsafe ones.

Retrieved text is the way a poisoned document (an injected instruction, harmful how-to content)
reaches the prompt. All nodes of a retrieval are scored in one call to
:meth:`mlpm_guard.Guard.check_content_batch` (retrieved text is judged as content, not as the user's request), which batches them on the device; a node that cannot be
scored is judged unsafe (the guard fails closed unless its policy fails open).
"""

from __future__ import annotations

from typing import List, Literal, Optional

from llama_index.core.bridge.pydantic import Field
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle

from mlpm_guard import Verdict

from .common import GuardedComponent
from .events import GuardNodesEvent

dispatcher = get_dispatcher(__name__)

#: Metadata keys a flagged node gets (kept out of the text the LLM and the embedder see).
FLAG_KEYS = ("mlpm_guard_unsafe", "mlpm_guard_p_unsafe", "mlpm_guard_tier", "mlpm_guard_category")


class MLPMGuardNodePostprocessor(GuardedComponent, BaseNodePostprocessor):
    """Drop, or flag in metadata, the retrieved nodes the guard judges unsafe.

    Args:
        guard: the :class:`mlpm_guard.Guard` that scores (``None``: the shared embedded default).
        mode: ``"drop"`` removes unsafe nodes; ``"flag"`` keeps every node and writes
            ``mlpm_guard_unsafe``, ``mlpm_guard_p_unsafe``, ``mlpm_guard_tier`` and
            ``mlpm_guard_category`` into a copy of its metadata (the retrieved node objects,
            which may be the docstore's own, are not changed).
        threshold: P(unsafe) at which a node counts as unsafe (``None``: the verdict's label
            under the guard's policy).
        metadata_mode: which text of a node is scored. The default, ``MetadataMode.NONE``, scores
            the node's own text: the prototypes read metadata lines such as a reader's
            ``file_path: /tmp/...`` as noise (one benign passage went from P(unsafe) 0.005 to
            0.77 with its path in front). Pass ``MetadataMode.LLM`` to score exactly what the
            LLM is shown, metadata included, when metadata can carry untrusted text.

    Example:
        >>> post = MLPMGuardNodePostprocessor(guard, mode="flag")                  # doctest: +SKIP
        >>> engine = index.as_query_engine(llm=llm, node_postprocessors=[post])    # doctest: +SKIP
    """

    mode: Literal["drop", "flag"] = Field(default="drop", description="drop unsafe nodes, or flag them in metadata")
    threshold: Optional[float] = Field(default=None, gt=0, lt=1, description="None: the verdict's label")
    metadata_mode: MetadataMode = Field(default=MetadataMode.NONE, description="the node text that is scored")

    @classmethod
    def class_name(cls) -> str:
        return "MLPMGuardNodePostprocessor"

    def _texts(self, nodes: List[NodeWithScore]) -> list[str]:
        return [n.node.get_content(metadata_mode=self.metadata_mode) for n in nodes]

    def _postprocess_nodes(self, nodes: List[NodeWithScore],
                           query_bundle: Optional[QueryBundle] = None) -> List[NodeWithScore]:
        if not nodes:
            return []
        return self._apply(nodes, self.guard.check_content_batch(self._texts(nodes)))

    @dispatcher.span
    async def _apostprocess_nodes(self, nodes: List[NodeWithScore],
                                  query_bundle: Optional[QueryBundle] = None) -> List[NodeWithScore]:
        if not nodes:
            return []
        return self._apply(nodes, await self.guard.acheck_content_batch(self._texts(nodes)))

    def _is_unsafe(self, verdict: Verdict) -> bool:
        return verdict.unsafe if self.threshold is None else verdict.p_unsafe >= self.threshold

    def _apply(self, nodes: List[NodeWithScore], verdicts: list[Verdict]) -> List[NodeWithScore]:
        unsafe = [self._is_unsafe(v) for v in verdicts]
        if self.mode == "drop":
            kept = [n for n, bad in zip(nodes, unsafe) if not bad]
        else:
            kept = [_flagged(n, v, bad) for n, v, bad in zip(nodes, verdicts, unsafe)]
        dispatcher.event(GuardNodesEvent(
            mode=self.mode, n_nodes=len(nodes), n_unsafe=sum(unsafe), n_dropped=len(nodes) - len(kept),
            node_ids=[n.node.node_id for n, bad in zip(nodes, unsafe) if bad],
            verdicts=[v.to_dict() for v in verdicts]))
        return kept


def _flagged(node: NodeWithScore, verdict: Verdict, unsafe: bool) -> NodeWithScore:
    """A copy of ``node`` carrying the guard's flag in metadata hidden from the LLM and embedder."""
    inner = node.node
    flags = dict(zip(FLAG_KEYS, (unsafe, verdict.p_unsafe, verdict.tier.value, verdict.category)))

    def hidden(keys: list[str]) -> list[str]:
        return [*keys, *(k for k in FLAG_KEYS if k not in keys)]

    copy = inner.model_copy(update={
        "metadata": {**inner.metadata, **flags},
        "excluded_llm_metadata_keys": hidden(inner.excluded_llm_metadata_keys),
        "excluded_embed_metadata_keys": hidden(inner.excluded_embed_metadata_keys),
    })
    return NodeWithScore(node=copy, score=node.score)
