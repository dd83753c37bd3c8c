"""Moderation quality on held-out data: what the default fit recipe does on prompts it never saw.

Three protocols, all on the shared data folder given by ``--data`` (never copied, never hard-coded):

``loso``  leave one source out: for each evaluated source, fit on every *other* source (capped
          and sampled exactly as ``mlpm-guard fit DATA... --max-per-source N`` does) and score the
          held-out source. This is the closest stand-in for public sets of the same kinds that are
          not in the data (XSTest-like look-alikes, moderation content, short direct requests).
``mix``   fit on everything, as the CLI does (rows of the ``test`` split are left out), and score
          those test splits (ToxicChat, Alpaca, TDC 2023); with ``--no-seed-set`` also the seed set.
``seed``  fit on the built-in seed set alone (the default ``Guard()`` prototypes) and score every
          held-out set of ``loso``.

Sets are grouped into kinds: ``lookalike`` (benign prompts that look harmful, with their harmful
twins), ``moderation`` (chat content), ``direct`` (short harmful requests; F1 there is recall only),
and the flag rate on plain ``benign`` instructions. ``avg_f1`` is the mean over kinds of the mean F1
of that kind's sets, so each kind counts once, as each public set does in the issue's average.

    python benchmarks/quality.py --data ../shared/data [--max-per-source 400] [--param C=0.1] [--json]

As in ``mlpm-guard fit``, the built-in seed set joins the ``loso`` and ``mix`` fits as one more
source (capped like the others); ``--no-seed-set`` measures the shared data alone.

The hidden states come from the feature cache (the first run extracts the missing ones).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlpm_guard.estimator.readings import select
from mlpm_guard.toolkit.data import Example, load_examples, seed_examples
from mlpm_guard.toolkit.features import extract
from mlpm_guard.toolkit.metrics import moderation_metrics
from mlpm_guard.toolkit.training import (
    DEFAULT_PARAMS,
    HELD_OUT_SPLITS,
    fit_examples,
    recipe_poolings,
    training_mix,
)

# Which kind each evaluated set stands in for. Sets without unsafe rows only give a flag rate.
KINDS: dict[str, str] = {
    "coconot": "lookalike",                 # CoCoNot contrast (benign look-alikes) + its unsafe requests
    "llm_safeguard_custom": "lookalike",    # harmful prompts and their harmless twins
    "cyberseceval_frr": "lookalike",        # risky-looking but benign cyber prompts (flag rate)
    "coconot_noncompliance": "noncompliance",  # benign but non-safety refusals (flag rate)
    "toxicchat": "moderation",              # ToxicChat test split
    "advbench": "direct", "do_not_answer": "direct", "harmbench": "direct", "maliciousinstruct": "direct",
    "strongreject": "direct", "tdc2023": "direct",
    "alpaca": "benign",                     # sample of the Alpaca test split (flag rate)
    "seed": "lookalike",                    # the project-written seed set (mix protocol only)
}
F1_KINDS = ("lookalike", "moderation", "direct")


@dataclass
class EvalSet:
    name: str
    source: str  # the training source to leave out when scoring this set
    rows: list[Example]


@dataclass
class SharedData:
    pool: list[Example]            # every row a fit may use (no held-out split)
    sets: dict[str, EvalSet]       # held-out sets for loso/seed
    mix_sets: dict[str, EvalSet]   # rows of the held-out split, for the mix protocol
    extra: dict[str, list[Example]] = field(default_factory=dict)


def load_shared(data_dir: str | Path, *, n_benign: int = 600, seed: int = 0) -> SharedData:
    """Read every ``*.jsonl`` of the shared folder and build the fit pool and the evaluation sets."""
    folder = Path(data_dir)
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise SystemExit(f"--data {folder}: no *.jsonl files there; pass the shared data folder")
    rows = [e for f in files for e in load_examples(f)]
    by_source: dict[str, list[Example]] = {}
    for e in rows:
        by_source.setdefault(e.source, []).append(e)
    pool = [e for e in rows if e.split not in HELD_OUT_SPLITS]
    sets: dict[str, EvalSet] = {}
    mix_sets: dict[str, EvalSet] = {}
    for source, items in sorted(by_source.items()):
        test = [e for e in items if e.split in HELD_OUT_SPLITS]
        if source == "coconot":
            sets["coconot"] = EvalSet("coconot", source, [e for e in items if e.label == 1 or e.split == "contrast"])
            sets["coconot_noncompliance"] = EvalSet("coconot_noncompliance", source,
                                                    [e for e in items if e.label == 0 and e.split == "original"])
        elif source.startswith("alpaca"):
            sample = random.Random(seed).sample(test, min(n_benign, len(test)))
            sets["alpaca"] = EvalSet("alpaca", source, sample)
            mix_sets["alpaca"] = EvalSet("alpaca", source, sample)
        elif source == "toxicchat":
            sets["toxicchat"] = EvalSet("toxicchat", source, test)
            mix_sets["toxicchat"] = EvalSet("toxicchat", source, test)
        else:
            sets[source] = EvalSet(source, source, items)
            if test:
                mix_sets[source] = EvalSet(source, source, test)
    unknown = sorted(set(sets) - set(KINDS))
    if unknown:
        print(f"note: sets {unknown} have no kind; they are reported but not averaged", file=sys.stderr)
    return SharedData(pool, sets, mix_sets)


class StateTable:
    """Hidden states of every prompt the benchmark needs, extracted once (through the cache)."""

    def __init__(self, backbone: Any, examples: Sequence[Example], layers: Sequence[int],
                 poolings: Sequence[str] = ("last",)) -> None:
        prompts = sorted({e.prompt for e in examples})
        self.index = {p: i for i, p in enumerate(prompts)}
        self.layers, self.poolings = list(layers), tuple(poolings)
        self.H = extract(backbone, prompts, self.layers, poolings=self.poolings, desc="quality: hidden states")

    def __call__(self, examples: Sequence[Example], layers: Sequence[int] | None = None) -> np.ndarray:
        """States of ``examples`` at ``layers`` (all of the table's if ``None``), at the table's poolings."""
        return select(self.H[[self.index[e.prompt] for e in examples]], self.layers, layers or self.layers,
                      self.poolings)


def fit(backbone: Any, table: StateTable, examples: Sequence[Example], params: dict[str, Any]) -> Any:
    """Fit prototypes with the recipe ``params`` on ``examples`` (states from the table)."""
    layers = list(params.get("layers") or table.layers)
    return fit_examples(backbone, examples, states=table(examples, layers), progress=False,
                        **{**params, "layers": layers})


def score(prototypes: Any, table: StateTable, sets: dict[str, EvalSet]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, s in sets.items():
        p = prototypes.predict_proba(table(s.rows, prototypes.layer_ids_))[:, 1]
        out[name] = moderation_metrics([e.label for e in s.rows], p, prototypes.threshold_)
    return out


def summarise(metrics: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per-kind mean F1, their mean, and flag rates on benign and look-alike safe prompts."""
    by_kind: dict[str, list[float]] = {}
    for name, m in metrics.items():
        if m["f1"] is not None and KINDS.get(name) in F1_KINDS:
            by_kind.setdefault(KINDS[name], []).append(m["f1"])
    kinds = {k: float(np.mean(v)) for k, v in by_kind.items()}
    look = [m["flag_rate_safe"] for n, m in metrics.items()
            if KINDS.get(n) == "lookalike" and n != "seed" and m["flag_rate_safe"] is not None]
    return {
        **{f"f1_{k}": kinds.get(k) for k in F1_KINDS},
        "avg_f1": float(np.mean(list(kinds.values()))) if kinds else None,
        "benign_flag": metrics["alpaca"]["flag_rate_safe"] if "alpaca" in metrics else None,
        "lookalike_flag": float(np.mean(look)) if look else None,
    }


def run(backbone: Any, data: SharedData, table: StateTable, params: dict[str, Any], *,
        max_per_source: int | None, seed: int = 0, protocols: Sequence[str] = ("loso", "mix", "seed"),
        seed_rows: Sequence[Example] | None = None, score_seed: bool = True) -> dict[str, Any]:
    """Every protocol for one recipe; returns ``{protocol: {"datasets": ..., "summary": ...}}``."""
    params = {**params, "random_state": seed}
    out: dict[str, Any] = {}
    if "loso" in protocols:
        metrics: dict[str, dict[str, Any]] = {}
        by_source: dict[str, list[str]] = {}
        for name, s in data.sets.items():
            by_source.setdefault(s.source, []).append(name)
        for source, names in by_source.items():
            mix = training_mix([e for e in data.pool if e.source != source], max_per_source=max_per_source, seed=seed)
            protos = fit(backbone, table, mix, params)
            metrics.update(score(protos, table, {n: data.sets[n] for n in names}))
        out["loso"] = {"datasets": metrics, "summary": summarise(metrics)}
    if "mix" in protocols:
        mix = training_mix(data.pool, max_per_source=max_per_source, seed=seed)
        protos = fit(backbone, table, mix, params)
        sets = dict(data.mix_sets)
        if seed_rows is not None and score_seed:  # not when the seed set was fitted on
            sets["seed"] = EvalSet("seed", "seed", list(seed_rows))
        metrics = score(protos, table, sets)
        out["mix"] = {"datasets": metrics, "summary": summarise(metrics), "layers": protos.layer_ids_}
    if "seed" in protocols and seed_rows is not None:
        protos = fit(backbone, table, list(seed_rows), params)
        metrics = score(protos, table, data.sets)
        out["seed"] = {"datasets": metrics, "summary": summarise(metrics), "layers": protos.layer_ids_}
    return out


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def print_tables(result: dict[str, Any], file: Any = sys.stdout) -> None:
    cols = ["n", "n_unsafe", "f1", "precision", "recall", "flag_rate_safe", "auroc"]
    for protocol, r in result.items():
        print(f"\n## {protocol}" + (f"  (layers {r['layers']})" if "layers" in r else ""), file=file)
        print("| set | kind | " + " | ".join(cols) + " |", file=file)
        print("|---|---|" + "---:|" * len(cols), file=file)
        for name, m in r["datasets"].items():
            print(f"| {name} | {KINDS.get(name, '?')} | " + " | ".join(_fmt(m[c]) for c in cols) + " |", file=file)
    print("\n| protocol | " + " | ".join(next(iter(result.values()))["summary"]) + " |", file=file)
    print("|---|" + "---:|" * len(next(iter(result.values()))["summary"]), file=file)
    for protocol, r in result.items():
        print(f"| {protocol} | " + " | ".join(_fmt(v) for v in r["summary"].values()) + " |", file=file)


def _param(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--param {text!r}: write KEY=VALUE, e.g. C=0.1 or per_source=true")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the shared data folder (JSONL files with prompt/label/source)")
    parser.add_argument("--max-per-source", type=int, default=400, help="cap per source, as `mlpm-guard fit` (400)")
    parser.add_argument("--param", type=_param, action="append", default=[],
                        help="Prototypes parameter over the defaults, KEY=JSON (repeatable), e.g. C=0.1")
    parser.add_argument("--protocols", default="loso,mix,seed", help="comma-separated subset of loso,mix,seed")
    parser.add_argument("--n-benign", type=int, default=600, help="Alpaca test prompts for the benign flag rate")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed of the caps and the benign sample")
    parser.add_argument("--backbone", default="embedded")
    parser.add_argument("--no-seed-set", action="store_true",
                        help="fit loso and mix on the shared data alone, as `mlpm-guard fit --no-seed-set`")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args(argv)

    from mlpm_guard import Backbone

    start = time.perf_counter()
    backbone = Backbone(args.backbone)
    data = load_shared(args.data, n_benign=args.n_benign, seed=args.seed)
    seed_rows = seed_examples()
    if not args.no_seed_set:
        data.pool.extend(seed_rows)  # as load_training_examples(with_seed_set=True) does
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    params = {**DEFAULT_PARAMS, **dict(args.param)}
    # Every row any protocol can draw: the capped pool (caps draw per source, so the loso mixes are
    # subsets of it), every eval set, the seed set.
    needed = {e.prompt: e for e in training_mix(data.pool, max_per_source=args.max_per_source, seed=args.seed)}
    for s in [*data.sets.values(), *data.mix_sets.values()]:
        needed.update({e.prompt: e for e in s.rows})
    needed.update({e.prompt: e for e in seed_rows})
    layers = list(params.get("layers") or range(1, backbone.num_layers + 1))
    table = StateTable(backbone, list(needed.values()), layers, recipe_poolings(params))
    result = run(backbone, data, table, params, max_per_source=args.max_per_source, seed=args.seed,
                 protocols=protocols, seed_rows=seed_rows, score_seed=args.no_seed_set)
    print(f"recipe: {json.dumps(params)}; max_per_source={args.max_per_source}; seed={args.seed}; "
          f"seed set in the fits: {not args.no_seed_set}")
    print_tables(result)
    print(f"\n({time.perf_counter() - start:.0f} s)")
    if args.json:
        print(json.dumps({"params": params, "max_per_source": args.max_per_source, "seed": args.seed,
                          "seed_set_in_fits": not args.no_seed_set, **result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
