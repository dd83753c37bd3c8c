"""Hidden-state extraction with an on-disk cache, so re-fitting or re-evaluating never re-runs the model.

The cache is one SQLite file per backbone (fingerprint and dtype), keyed by the exact token ids the
model saw (after the chat template and any truncation) and the pooling (:mod:`mlpm_guard.estimator.readings`).
Each entry holds the states of layers 1..depth at one pooling; a request for shallower layers is
served from a deeper entry.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from .._io import cache_home
from .._sqlite import SqliteStore

if TYPE_CHECKING:
    from ..model.backbone import Backbone

CHUNK = 256  # prompts per forward-and-store round, so an interrupted run keeps what it did


class FeatureCache(SqliteStore):
    """Hidden states on disk for one backbone.

    Args:
        path: the SQLite file; by default ``<cache home>/features/<fingerprint>-<dtype>.sqlite``.
    """

    table = "states"
    schema = "CREATE TABLE IF NOT EXISTS states (key TEXT PRIMARY KEY, depth INTEGER, dtype TEXT, data BLOB)"

    @classmethod
    def for_backbone(cls, backbone: Backbone, root: str | Path | None = None) -> FeatureCache:
        dtype = str(backbone.dtype).replace("torch.", "")
        root = Path(root) if root is not None else cache_home() / "features"
        return cls(root / f"{backbone.fingerprint}-{dtype}.sqlite")

    @staticmethod
    def key(ids: Sequence[int], pooling: str = "last") -> str:
        """The entry of a prompt's token ids at a pooling (last-token entries keep their older plain key)."""
        digest = hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()
        return digest if pooling == "last" else f"{digest}:{pooling}"

    def get(self, keys: Sequence[str], depth: int) -> dict[str, np.ndarray]:
        """Entries that hold at least ``depth`` layers, as arrays of shape (depth, d)."""
        rows = self.select_keys(keys, "key, depth, dtype, data", where="depth >= ?", params=[depth])
        return {key: np.frombuffer(blob, dtype=dtype).reshape(stored, -1)[:depth].astype(np.float32)
                for key, stored, dtype, blob in rows}

    def put(self, items: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Store arrays of shape (depth, d) (layers 1..depth); a deeper entry is never replaced by a shallower one.

        Returns the arrays as stored (float16 when they fit), so fresh and cached reads agree.
        """
        rows, stored = [], {}
        for key, arr in items.items():
            small = np.abs(arr).max() < 6e4 if arr.size else True
            data = arr.astype(np.float16 if small else np.float32)
            rows.append((key, int(arr.shape[0]), str(data.dtype), data.tobytes()))
            stored[key] = data.astype(np.float32)
        self.write("INSERT INTO states VALUES (?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET "
                   "depth=excluded.depth, dtype=excluded.dtype, data=excluded.data "
                   "WHERE excluded.depth > states.depth", rows)
        return stored


def extract(backbone: Backbone, prompts: Sequence[Any], layers: Sequence[int], *,
            poolings: Sequence[str] = ("last",), cache: FeatureCache | bool | None = True,
            progress: bool = True, desc: str = "hidden states") -> np.ndarray:
    """States of ``layers`` at ``poolings`` for ``prompts``, served from the cache where possible.

    Args:
        poolings: ``"last"`` and/or ``"mean"`` (:mod:`mlpm_guard.estimator.readings`); a prompt missing
            any of them is run once for all.
        cache: a :class:`FeatureCache`, ``True`` for the backbone's default cache, or
            ``False``/``None`` to always run the model.

    Returns:
        float32 array of shape (len(prompts), len(poolings) * len(layers), hidden_size), pooling-major.
    """
    layers = backbone.check_layers(layers)
    poolings = tuple(poolings)
    rows = backbone.encode(list(prompts))
    if cache is True:
        cache = FeatureCache.for_backbone(backbone)
    if cache is None or cache is False:  # an empty FeatureCache is falsy (len 0) but still a cache
        return backbone.layer_states(rows, layers, poolings=poolings, progress=progress)

    depth = max(layers)
    all_layers = list(range(1, depth + 1))
    keys = [[FeatureCache.key(r.ids, pooling) for pooling in poolings] for r in rows]
    found = cache.get(sorted({k for row in keys for k in row}), depth)
    todo = sorted({tuple(ks): i for i, ks in enumerate(keys) if any(k not in found for k in ks)}.values())
    bar = tqdm(total=len(todo), desc=desc, unit="prompt", disable=not progress or not todo)
    with bar:
        for start in range(0, len(todo), CHUNK):
            part = todo[start:start + CHUNK]
            states = backbone.layer_states([rows[i] for i in part], all_layers, poolings=poolings)
            blocks = np.split(states, len(poolings), axis=1)  # pooling-major: one (n, depth, d) block each
            found.update(cache.put({keys[i][p]: block[j] for p, block in enumerate(blocks) for j, i in enumerate(part)}))
            bar.update(len(part))
    index = [layer - 1 for layer in layers]
    out = np.empty((len(rows), len(poolings) * len(layers), backbone.hidden_size), dtype=np.float32)
    for i, ks in enumerate(keys):
        out[i] = np.concatenate([found[k][index] for k in ks])
    return out
