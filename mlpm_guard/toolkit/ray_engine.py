"""Hidden-state extraction on Ray Data, for ``mlpm-guard fit|eval --engine ray``.

The driver tokenizes and plans the forward batches exactly as the local engine would (the same
length-sorted batches, in the same chunks), and a pool of actors, each holding one backbone (a GPU
each when the cluster has them), runs them with ``map_batches``. The states land in the feature
cache, or go straight to fitting, and the fitting and metrics code is the local one: results equal
the local engine's on the same data.

Needs the ``ray`` extra (``pip install 'mlpm-guard[ray]'``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..estimator.readings import select
from ..model import cpu
from ..model.backbone import Backbone, BackboneConfig, Encoded
from ..vocabulary.errors import ConfigError
from .features import CHUNK, FeatureCache

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide the extraction runs.

    Attributes:
        actors: backbones loaded in parallel (at most one per GPU when the cluster has GPUs).
        address: a running cluster (``"auto"`` or ``ray://...``); ``None`` starts a local instance.
        cpus_per_actor: CPU cores reserved for each actor.
        threads: torch threads of each CPU actor; ``None`` takes the driver's count, because CPU
            matrix kernels round differently with another thread count, and the same count makes
            the states bit-identical to the local engine's. Set it to ``cpus_per_actor`` for
            throughput when exact equality does not matter.
    """

    actors: int = 2
    address: str | None = None
    cpus_per_actor: int = 1
    threads: int | None = None


@dataclass(frozen=True)
class RayStats:
    prompts: int
    batches: int
    actors: int
    gpus_per_actor: int
    seconds: float

    @property
    def prompts_per_s(self) -> float:
        return self.prompts / self.seconds if self.seconds > 0 else float("nan")


class StatesActor:
    """One backbone per actor; turns planned forward batches into states of layers 1..depth at ``poolings``."""

    def __init__(self, config: dict[str, Any], fingerprint: str, depth: int, threads: int,
                 poolings: Sequence[str] = ("last",)) -> None:
        import torch

        torch.set_num_threads(threads)
        self.backbone = Backbone(BackboneConfig(**config))
        if self.backbone.fingerprint != fingerprint:
            raise ConfigError(f"the actor loaded {self.backbone!r}, not the driver's backbone "
                              "(is the model the same on every node?)")
        self.layers = list(range(1, depth + 1))
        self.poolings = tuple(poolings)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        out: dict[str, list[Any]] = {"batch": [], "states": [], "shape": []}
        for index, ids in zip(batch["batch"], batch["ids"]):
            rows = [Encoded(tuple(r)) for r in json.loads(ids)]
            states = self.backbone.layer_states(rows, self.layers, poolings=self.poolings)
            out["batch"].append(int(index))
            out["states"].append(states.tobytes())
            out["shape"].append(list(states.shape))
        return {"batch": np.array(out["batch"]), "states": np.array(out["states"], dtype=object),
                "shape": np.array(out["shape"])}


def _plan(backbone: Backbone, rows: Sequence[Encoded], chunk: int | None) -> list[list[int]]:
    """The forward batches (row indices) the local engine runs for ``rows``: length-sorted batches
    of each ``chunk`` of rows, or of all rows when ``chunk`` is None. Running the very same batches
    makes every state bit-identical to the local engine's (padding changes the last bits)."""
    groups = [list(range(len(rows)))] if chunk is None else \
        [list(range(s, min(s + chunk, len(rows)))) for s in range(0, len(rows), chunk)]
    plan = []
    for group in groups:
        for batch in backbone.batches([len(rows[i]) for i in group]):
            plan.append([group[j] for j in batch])
    return plan


def _ensure_ray(options: RayOptions) -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("--engine ray needs the ray extra: pip install 'mlpm-guard[ray]'") from None
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
        if options.address:
            ray.init(address=options.address, **kwargs)
        else:
            ray.init(address="local", num_cpus=options.actors * options.cpus_per_actor, **kwargs)
    return ray


def run_batches(backbone: Backbone, rows: Sequence[Encoded], plan: Sequence[Sequence[int]], depth: int,
                options: RayOptions, *, poolings: Sequence[str] = ("last",),
                progress: bool = False) -> tuple[np.ndarray, RayStats]:
    """States of layers 1..depth at ``poolings`` for the rows named in ``plan``, one planned batch per actor call.

    Returns:
        float32 array (len(rows), len(poolings) * depth, hidden_size), pooling-major; rows not in
        the plan are left as zeros.
    """
    ray = _ensure_ray(options)
    start = time.perf_counter()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    gpus_per_actor = 1 if gpus else 0
    actors = min(options.actors, gpus) if gpus else options.actors
    out = np.zeros((len(rows), len(poolings) * depth, backbone.hidden_size), dtype=np.float32)
    if not plan:
        return out, RayStats(0, 0, actors, gpus_per_actor, 0.0)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    items = [{"batch": b, "ids": json.dumps([list(rows[i].ids) for i in batch])} for b, batch in enumerate(plan)]
    config = backbone.config.model_dump()
    threads = options.threads or torch.get_num_threads()
    if gpus_per_actor:
        config["device"] = "cuda"
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), max(actors * 4, 1)))
    ds = ds.map_batches(StatesActor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors),
                        num_cpus=options.cpus_per_actor,
                        num_gpus=gpus_per_actor,
                        runtime_env={"env_vars": cpu.passive_env()},  # OpenMP reads it when the actor imports torch
                        fn_constructor_kwargs={"config": config, "fingerprint": backbone.fingerprint,
                                               "depth": depth, "threads": threads, "poolings": tuple(poolings)})
    for row in ds.iter_rows():
        batch = plan[int(row["batch"])]
        out[batch] = np.frombuffer(row["states"], dtype=np.float32).reshape(row["shape"])
    stats = RayStats(sum(len(b) for b in plan), len(plan), actors, gpus_per_actor, time.perf_counter() - start)
    logger.info("ray: %d prompts in %d batches on %d actor(s) in %.1f s (%.1f prompts/s)", stats.prompts,
                stats.batches, stats.actors, stats.seconds, stats.prompts_per_s)
    return out, stats


def extract(backbone: Backbone, prompts: Sequence[Any], layers: Sequence[int], options: RayOptions, *,
            poolings: Sequence[str] = ("last",), progress: bool = False) -> tuple[np.ndarray, RayStats]:
    """Ray twin of ``features.extract(..., cache=False)``: states of ``layers`` at ``poolings`` for ``prompts``."""
    layers = backbone.check_layers(layers)
    rows = backbone.encode(list(prompts))
    depth = max(layers)
    states, stats = run_batches(backbone, rows, _plan(backbone, rows, None), depth, options, poolings=poolings,
                                progress=progress)
    return select(states, list(range(1, depth + 1)), layers, poolings), stats


def warm_cache(backbone: Backbone, prompt_sets: Iterable[Sequence[Any]], depth: int, cache: FeatureCache,
               options: RayOptions, *, poolings: Sequence[str] = ("last",), progress: bool = False) -> RayStats:
    """Fill ``cache`` with what ``features.extract`` would compute for each prompt set in turn.

    Each set stands for one ``extract`` call of the local engine (a fit, or one evaluated file):
    its prompts missing from the cache, chunked and batched the same way, run on the actors, so the
    local code that reads the cache afterwards finds every state it needs, bit-identical.
    """
    known: set[str] = set()
    rows: list[Encoded] = []
    plan: list[list[int]] = []
    for prompts in prompt_sets:
        encoded = backbone.encode(list(prompts))
        keys = [tuple(FeatureCache.key(r.ids, p) for p in poolings) for r in encoded]
        flat = {k for ks in keys for k in ks}
        found = set(cache.get(sorted(flat - known), depth)) | known
        todo = sorted({ks: i for i, ks in enumerate(keys) if not set(ks) <= found}.values())
        known |= flat
        todo_rows = [encoded[i] for i in todo]
        offset = len(rows)
        rows.extend(todo_rows)
        plan.extend([[offset + i for i in batch] for batch in _plan(backbone, todo_rows, CHUNK)])
    states, stats = run_batches(backbone, rows, plan, depth, options, poolings=poolings, progress=progress)
    if rows:
        blocks = np.split(states, len(poolings), axis=1)  # pooling-major: one (n, depth, d) block each
        cache.put({FeatureCache.key(r.ids, p): block[i] for p, block in zip(poolings, blocks)
                   for i, r in enumerate(rows)})
    return stats
