"""What the guard reads of fitted prototypes: the :class:`Scorer` protocol.

:class:`~mlpm_guard.Prototypes` is the scorer the guard ships with; the SIREN-style
:class:`~mlpm_guard.estimator.siren.NeuronProbe` is another. The scoring path, the pipeline and the server
take any object of this shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from ..vocabulary.types import Verdict

if TYPE_CHECKING:
    from ..model.backbone import Backbone


class Scorer(Protocol):
    """Fitted prototypes as the guard reads them.

    Attributes:
        threshold_ / controversial_threshold_: the refusal line and the controversial line.
        layer_ids_: the layers the scorer reads, with ``poolings_`` (``"last"``, ``"mean"``).
    """

    threshold_: float
    controversial_threshold_: float
    layer_ids_: list[int]

    @property
    def poolings_(self) -> tuple[str, ...]: ...

    @property
    def backbone(self) -> Backbone | None: ...

    def bind(self, backbone: Backbone) -> Any: ...

    def for_kind(self, kind: str) -> Scorer: ...

    def verdicts(self, X: Any, *, n_truncated: Sequence[int] | None = None) -> list[Verdict]: ...
