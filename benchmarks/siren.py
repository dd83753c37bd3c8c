"""Prototypes against the SIREN-style neuron probe, each fitted on the same release mix with the same
family held out, on the generalisation benchmark's held-out families.

For every family (``benchmarks/generalisation.py``: a family whose source is in the release recipe
is scored by fits without that source; the others by the release fit itself) both scorers are
fitted on the same rows and the same hidden states (every layer, last token and mean-pooled), at
the release lines (refuse from 0.8, safety prompt from 0.35), and every prompt is scored as
``Guard.check`` scores it (its views; the strictest decides). Reported per family: harmful F1 and
recall, benign prompts flagged, and for both kinds the share that leaves ``PASS``; then fit time
per fit and scoring time per 1,000 prompts (states given: the scorer's own cost on top of the
backbone's forward pass, which both share).

    python benchmarks/siren.py --data ../shared/data [--n 60] [--groups harmful,benign,lookalikes] [--json]

The framings of the bypass benchmark take the neuron probe like prototypes:
``mlpm-guard fit-siren ... --out probe`` then ``python benchmarks/adversarial.py --prototypes probe PROTOS``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Scorer  # noqa: E402
from generalisation import _metrics, families  # noqa: E402

from mlpm_guard.estimator.readings import select  # noqa: E402
from mlpm_guard.estimator.siren import RELEASE_PARAMS as SIREN_PARAMS, NeuronProbe  # noqa: E402
from mlpm_guard.toolkit.features import extract  # noqa: E402
from mlpm_guard.toolkit.training import RELEASE_PARAMS, fit_examples, recipe_poolings, release_examples  # noqa: E402

GROUPS = ("harmful", "benign", "lookalikes", "moderation")


def run(backbone: Any, data_dir: Path, n: int, groups: set[str]) -> dict[str, Any]:
    fams = [f for f in families(data_dir, n) if f.group in groups]
    poolings = recipe_poolings(RELEASE_PARAMS)
    scorer = Scorer(backbone, [it for fam in fams for it in fam.items], poolings, whole=False,
                    desc="siren benchmark: hidden states")
    layers = list(range(1, backbone.num_layers + 1))
    full = release_examples(data_dir)
    states = extract(backbone, [e.prompt for e in full], layers, poolings=poolings, desc="release mix: hidden states")
    row = {e.prompt: i for i, e in enumerate(full)}
    fits: dict[str, dict[str, Any]] = {}
    fit_seconds: dict[str, list[float]] = {"prototypes": [], "siren": []}
    results: dict[str, Any] = {}
    for fam in fams:
        if fam.fit_key not in fits:
            mix = release_examples(data_dir, exclude=fam.exclude)
            H = states[[row[e.prompt] for e in mix]]
            start = time.perf_counter()
            protos = fit_examples(backbone, mix, states=H, progress=False, **RELEASE_PARAMS)
            fit_seconds["prototypes"].append(time.perf_counter() - start)
            start = time.perf_counter()
            probe = NeuronProbe(**SIREN_PARAMS).fit(H, [e.label for e in mix], backbone=backbone,
                                                    sources=[e.source for e in mix])
            fit_seconds["siren"].append(time.perf_counter() - start)
            fits[fam.fit_key] = {"prototypes": protos, "siren": probe}
            print(f"fit without {fam.fit_key}: {len(mix)} rows, prototypes {fit_seconds['prototypes'][-1]:.1f} s, "
                  f"siren {fit_seconds['siren'][-1]:.1f} s", file=sys.stderr)
        y = np.array([it.label for it in fam.items])
        out: dict[str, Any] = {"group": fam.group, "held_out_fit": fam.fit_key}
        for name, model in fits[fam.fit_key].items():
            p, _, lines = scorer.proba(model, fam.items)
            out[name] = _metrics(y, p, lines, model.controversial_threshold_)
        results[fam.name] = out
    release = fits.get("release") or next(iter(fits.values()))
    return {"families": results, "fit_seconds": {k: float(np.mean(v)) for k, v in fit_seconds.items()},
            "n_fits": len(fits), "scoring_ms_per_1000": scoring_cost(release, scorer.H, layers, poolings),
            "siren_readings": [r.key for r in release["siren"].readings_],
            "siren_neurons": int(sum(len(x) for x in release["siren"].neurons_))}


def scoring_cost(models: dict[str, Any], H: np.ndarray, layers: list[int], poolings: tuple[str, ...],
                 repeats: int = 3) -> dict[str, float]:
    """Milliseconds per 1,000 prompts of each scorer's own maths, from states already read."""
    out = {}
    for name, model in models.items():
        X = select(H, layers, model.layer_ids_, poolings if name == "prototypes" else model.poolings_)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            model.predict_proba(X)
            best = min(best, time.perf_counter() - start)
        out[name] = 1000.0 * best / len(X) * 1000.0
    return out


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """Per group and scorer: the mean of the group's metric (harmful F1, benign and look-alike flags)."""
    out: dict[str, Any] = {}
    for group, metric in (("harmful", "f1"), ("benign", "flagged"), ("lookalikes", "flagged"), ("moderation", "f1")):
        rows = [r for r in results.values() if r["group"] == group]
        if rows:
            out[group] = {"metric": metric, **{s: float(np.mean([r[s][metric] for r in rows if metric in r[s]]))
                                              for s in ("prototypes", "siren")}}
    return out


def print_tables(result: dict[str, Any], file: Any = sys.stdout) -> None:
    def pct(v: Any) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    def f1(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"

    print("| held-out family | group | n | F1 prototypes | F1 siren | caught prototypes | caught siren | "
          "benign flagged prototypes | benign flagged siren | not passed prototypes | not passed siren |", file=file)
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|", file=file)
    for name, r in result["families"].items():
        p, s = r["prototypes"], r["siren"]
        passed = "safe_not_passed" if "flagged" in p else "not_passed"
        print(f"| {name} | {r['group']} | {p['n']} | {f1(p.get('f1'))} | {f1(s.get('f1'))} | {pct(p.get('recall'))} | "
              f"{pct(s.get('recall'))} | {pct(p.get('flagged'))} | {pct(s.get('flagged'))} | {pct(p.get(passed))} | "
              f"{pct(s.get(passed))} |", file=file)
    print("\n| group | metric | prototypes | siren |", file=file)
    print("|---|---|---:|---:|", file=file)
    for group, s in result["summary"].items():
        print(f"| {group} | {s['metric']} | {s['prototypes']:.3f} | {s['siren']:.3f} |", file=file)
    fs, sc = result["fit_seconds"], result["scoring_ms_per_1000"]
    print(f"\nfit: prototypes {fs['prototypes']:.1f} s, siren {fs['siren']:.1f} s (mean of {result['n_fits']} fits); "
          f"scoring from states: prototypes {sc['prototypes']:.1f} ms, siren {sc['siren']:.1f} ms per 1,000 readings; "
          f"siren reads {len(result['siren_readings'])} readings, {result['siren_neurons']} neurons", file=file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the shared data folder")
    parser.add_argument("--n", type=int, default=60, help="most prompts per public family (seeded sample)")
    parser.add_argument("--groups", default=",".join(GROUPS), help=f"family groups to run (default {','.join(GROUPS)})")
    parser.add_argument("--backbone", default="embedded")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args(argv)

    from mlpm_guard import Backbone

    start = time.perf_counter()
    backbone = Backbone(args.backbone)
    result = run(backbone, Path(args.data), args.n, {g.strip() for g in args.groups.split(",") if g.strip()})
    result["summary"] = summary(result["families"])
    print_tables(result)
    dtype = str(backbone.dtype).replace("torch.", "")
    print(f"\n({time.perf_counter() - start:.0f} s; {dtype})")
    if args.json:
        print(json.dumps({"n": args.n, "dtype": dtype, **result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
